"""Basis reconciliation (sifting) and per-basis, per-intensity counting.

Input is one row per detection after timing synchronisation: the pulse it belongs to,
the detector that clicked, and Alice's symbol for that pulse (looked up from her record
at the detected indices only).  Several clicks in one pulse are squashed as usual:
clicks in one basis only give that basis and a random bit when the bits disagree; clicks
in both bases give a random basis and bit (Lütkenhaus' squashing for BB84 detectors).

Conventions: basis 0 = Z, 1 = X; intensity 0 = signal, 1 = decoy, 2 = vacuum.
All work is vectorised over detections.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

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
    order = np.argsort(pulse_index, kind="stable")
    pulses = np.asarray(pulse_index)[order]
    b_basis = det_basis[np.asarray(detector)[order]]
    b_bit = det_bit[np.asarray(detector)[order]]
    a_basis = np.asarray(alice_basis)[order]
    a_bit = np.asarray(alice_bit)[order]
    a_int = np.asarray(alice_intensity)[order]

    # group the rows of one pulse: first row of each group and group sizes
    if pulses.size:
        starts = np.flatnonzero(np.r_[True, pulses[1:] != pulses[:-1]])
    else:
        starts = np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, pulses.size])
    uniq = pulses[starts]

    basis_min = np.minimum.reduceat(b_basis, starts) if starts.size else b_basis[:0]
    basis_max = np.maximum.reduceat(b_basis, starts) if starts.size else b_basis[:0]
    bit_min = np.minimum.reduceat(b_bit, starts) if starts.size else b_bit[:0]
    bit_max = np.maximum.reduceat(b_bit, starts) if starts.size else b_bit[:0]
    cross = basis_min != basis_max
    bob_basis = basis_min.copy()
    bob_basis[cross] = rng.integers(0, 2, size=int(cross.sum()), dtype=np.int8)
    # within one basis, disagreeing clicks give a random bit; cross-basis: random bit too
    conflict = cross | (bit_min != bit_max)
    bob_bit = bit_min.astype(np.uint8)
    bob_bit[conflict] = rng.integers(0, 2, size=int(conflict.sum()), dtype=np.uint8)

    g_basis, g_bit, g_int = a_basis[starts], a_bit[starts], a_int[starts]
    detected = np.bincount(g_int.astype(np.int64), minlength=N_INTENSITIES)[:N_INTENSITIES]
    keep = bob_basis == g_basis
    s_basis, s_int = g_basis[keep], g_int[keep]
    s_alice = g_bit[keep].astype(np.uint8)
    s_bob = bob_bit[keep]
    cell = s_basis.astype(np.int64) * N_INTENSITIES + s_int
    sifted = np.bincount(cell, minlength=N_BASES * N_INTENSITIES).reshape(N_BASES, N_INTENSITIES)
    wrong = s_alice != s_bob
    errors = np.bincount(cell[wrong], minlength=N_BASES * N_INTENSITIES).reshape(
        N_BASES, N_INTENSITIES
    )
    return SiftResult(
        pulse_index=uniq[keep].astype(np.int64),
        basis=s_basis,
        intensity=s_int,
        alice_bit=s_alice,
        bob_bit=s_bob,
        detected=detected.astype(np.int64),
        sifted=sifted.astype(np.int64),
        errors=errors.astype(np.int64),
        double_clicks=int(np.count_nonzero(sizes > 1)),
        cross_basis_clicks=int(np.count_nonzero(cross)),
    )
