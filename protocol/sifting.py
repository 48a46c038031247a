"""Basis reconciliation (sifting) and per-basis, per-intensity counting.

Input is one row per detection after timing synchronisation: the pulse it belongs to,
the detector that clicked, and Alice's symbol for that pulse (looked up from her record
at the detected indices only).  Several clicks in one pulse are squashed as usual:
clicks in one basis only give that basis and a random bit when the bits disagree; clicks
in both bases give a random basis and bit (Lütkenhaus' squashing for BB84 detectors).

Conventions: basis 0 = Z, 1 = X; intensity 0 = signal, 1 = decoy, 2 = vacuum.
One compiled pass over the detections (numba: the per-pulse group-by of multi-clicks
is sequential by nature); no Python loop per detection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

N_BASES = 2
N_INTENSITIES = 3

IntArray = npt.NDArray[np.int64]
SmallArray = npt.NDArray[np.int8]


@dataclass(frozen=True)
class SiftResult:
    """Sifted bits and counts.

    Attributes:
        pulse_index: pulse of each sifted bit (sorted, unique).
        basis, intensity: Alice's basis and intensity class of each sifted bit.
        alice_bit, bob_bit: the two raw keys (uint8 0/1), equal except for errors.
        detected: pulses with at least one click, per intensity class (shape 3).
        sifted: sifted bits per basis and intensity (shape 2×3).
        errors: sifted bits where Alice's and Bob's bits differ, per basis and intensity.
        double_clicks: pulses with clicks on more than one detector.
        cross_basis_clicks: pulses with clicks in both of Bob's bases.
    """

    pulse_index: IntArray
    basis: SmallArray
    intensity: SmallArray
    alice_bit: npt.NDArray[np.uint8]
    bob_bit: npt.NDArray[np.uint8]
    detected: IntArray
    sifted: IntArray
    errors: IntArray
    double_clicks: int
    cross_basis_clicks: int

    def qber(self, basis: int, intensity: int | None = None) -> float:
        """Error rate of the sifted bits of one basis (and intensity); NaN if none."""
        if intensity is None:
            n, e = self.sifted[basis].sum(), self.errors[basis].sum()
        else:
            n, e = self.sifted[basis, intensity], self.errors[basis, intensity]
        return float(e / n) if n else float("nan")

    def qber_intensity(self, intensity: int) -> float:
        """Error rate of the sifted bits of one intensity class over both bases."""
        n = self.sifted[:, intensity].sum()
        return float(self.errors[:, intensity].sum() / n) if n else float("nan")

    def key(self, basis: int = 0) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        """Alice's and Bob's raw keys from one basis (all intensities, as in Lim et al.)."""
        mask = self.basis == basis
        return self.alice_bit[mask], self.bob_bit[mask]


def sift(
    pulse_index: IntArray,
    detector: npt.NDArray[np.integer],
    alice_basis: SmallArray,
    alice_bit: SmallArray,
    alice_intensity: SmallArray,
    detector_basis: npt.ArrayLike,
    detector_bit: npt.ArrayLike,
    rng: np.random.Generator,
) -> SiftResult:
    """Sift detections into raw keys and counts.

    Args:
        pulse_index: pulse of each detection (any order; several rows may share a pulse).
        detector: detector index of each detection.
        alice_basis, alice_bit, alice_intensity: Alice's symbol for each row's pulse.
        detector_basis, detector_bit: Bob's basis and bit value for each detector index.
        rng: draws the random bits and bases of squashed multi-clicks.
    """
    det_basis = np.asarray(detector_basis, dtype=np.int8)
    det_bit = np.asarray(detector_bit, dtype=np.int8)
    pulse_index = np.asarray(pulse_index, dtype=np.int64)
    if pulse_index.size < 2 or bool(np.all(pulse_index[1:] >= pulse_index[:-1])):
        order = None  # tags in time order: usually already sorted by pulse
    else:
        order = np.argsort(pulse_index, kind="stable")

    def take(a: npt.ArrayLike, dtype: type) -> npt.NDArray[Any]:
        arr: npt.NDArray[Any] = np.asarray(a, dtype=dtype)
        return arr if order is None else arr[order]

    pulses = take(pulse_index, np.int64)
    det = take(detector, np.int64)
    # random basis/bit for squashed multi-clicks: drawn up front (one per row), so the
    # result is a pure function of the inputs and the generator's state
    coin_basis = rng.integers(0, 2, size=pulses.size, dtype=np.int8)
    coin_bit = rng.integers(0, 2, size=pulses.size, dtype=np.uint8)
    (uniq, s_basis, s_int, s_alice, s_bob, detected, sifted, errors, doubles,
     cross) = _sift_kernel(pulses, det_basis[det], det_bit[det], take(alice_basis, np.int8),
                           take(alice_bit, np.int8), take(alice_intensity, np.int8),
                           coin_basis, coin_bit)
    return SiftResult(
        pulse_index=uniq, basis=s_basis, intensity=s_int, alice_bit=s_alice,
        bob_bit=s_bob, detected=detected, sifted=sifted, errors=errors,
        double_clicks=int(doubles), cross_basis_clicks=int(cross),
    )


@njit(cache=True)
def _sift_kernel(pulses: IntArray, b_basis: SmallArray, b_bit: SmallArray,
                 a_basis: SmallArray, a_bit: SmallArray, a_int: SmallArray,
                 coin_basis: SmallArray, coin_bit: npt.NDArray[np.uint8]) -> tuple[Any, ...]:
    """One pass over detections sorted by pulse: squash each pulse's clicks, keep the
    pulses where Bob's basis matches Alice's, count per basis and intensity."""
    n = pulses.size
    uniq = np.empty(n, np.int64)
    s_basis = np.empty(n, np.int8)
    s_int = np.empty(n, np.int8)
    s_alice = np.empty(n, np.uint8)
    s_bob = np.empty(n, np.uint8)
    detected = np.zeros(N_INTENSITIES, np.int64)
    sifted = np.zeros((N_BASES, N_INTENSITIES), np.int64)
    errors = np.zeros((N_BASES, N_INTENSITIES), np.int64)
    doubles = 0
    cross_count = 0
    k = 0
    i = 0
    while i < n:
        j = i + 1
        bmin = b_basis[i]
        bmax = b_basis[i]
        vmin = b_bit[i]
        vmax = b_bit[i]
        while j < n and pulses[j] == pulses[i]:
            bmin = min(bmin, b_basis[j])
            bmax = max(bmax, b_basis[j])
            vmin = min(vmin, b_bit[j])
            vmax = max(vmax, b_bit[j])
            j += 1
        if j - i > 1:
            doubles += 1
        cross = bmin != bmax
        if cross:
            cross_count += 1
        basis = coin_basis[i] if cross else bmin
        bit = coin_bit[i] if (cross or vmin != vmax) else np.uint8(vmin)
        klass = a_int[i]
        detected[klass] += 1
        if basis == a_basis[i]:
            uniq[k] = pulses[i]
            s_basis[k] = basis
            s_int[k] = klass
            s_alice[k] = np.uint8(a_bit[i])
            s_bob[k] = bit
            sifted[basis, klass] += 1
            if s_alice[k] != bit:
                errors[basis, klass] += 1
            k += 1
        i = j
    return (uniq[:k], s_basis[:k], s_int[:k], s_alice[:k], s_bob[:k], detected, sifted,
            errors, doubles, cross_count)
