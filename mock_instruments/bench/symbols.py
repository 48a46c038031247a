"""Alice's pattern source on the bench: :mod:`qkdlab.patterns` with the bench's settings.

A counter-based generator: pulse ``i`` gets the 64-bit word
``splitmix64(key + (i + 1)·γ)`` (γ = 0x9E3779B97F4A7C15, ``key`` derived from the seed
and a per-use salt), computed in vectorised numpy ``uint64`` arithmetic.  The same
indices therefore give the same symbols in any order or chunking, and the symbols can
be read back only at the detected indices.

Bit allocation of the word ``h``: bits 63…32 choose the intensity class, bits 31…1 the
basis, bit 0 the bit value.  Conventions: basis 0 = Z, 1 = X; intensity 0 = signal,
1 = decoy, 2 = vacuum.
"""

from __future__ import annotations

import sys

import numpy as np
import numpy.typing as npt

from qkdlab.patterns import (
    GOLDEN_GAMMA,
    LOW32,
    MASK64,
    ONE,
    SALT_EVE,
    SALT_SYMBOLS,
    U32,
    basis_from_words,
    bit_from_words,
    hash_words,
    intensity_from_words,
    mix64_inplace,
    splitmix64_scalar,
    stream_key,
    threshold32,
)

from .config import PatternConfig

IntArray = npt.NDArray[np.int64]
U64Array = npt.NDArray[np.uint64]
I8Array = npt.NDArray[np.int8]

__all__ = [
    "GOLDEN_GAMMA",
    "MASK64",
    "SALT_EVE",
    "SALT_SYMBOLS",
    "eve_resend_state",
    "hash_words",
    "marker_pulse_indices",
    "mix64_inplace",
    "splitmix64_scalar",
    "state_and_intensity",
    "stream_key",
    "symbols",
]


def symbols(
    seed: int, pulse_index: npt.ArrayLike, pattern: PatternConfig | None = None
) -> tuple[I8Array, I8Array, I8Array]:
    """Alice's ``(basis, bit, intensity)`` (int8 arrays) of the given pulse indices.

    A pure function of ``(seed, pulse_index, pattern)``: P(basis = Z) = ``pattern.p_z``,
    P(intensity = k) = ``pattern.intensity_probs[k]``, bits uniform.
    """
    pat = PatternConfig() if pattern is None else pattern
    h = hash_words(seed, SALT_SYMBOLS, _pattern_index(pulse_index, pat))
    return (basis_from_words(h, pat.p_z), bit_from_words(h),
            intensity_from_words(h, pat.p_signal, pat.p_decoy))


def _pattern_index(pulse_index: npt.ArrayLike, pattern: PatternConfig) -> IntArray:
    """Bench pulse indices -> the pattern's own symbol counter (0 at its start)."""
    idx = np.asarray(pulse_index, dtype=np.int64)
    return idx - np.int64(pattern.start_index) if pattern.start_index else idx


def _halves(h: U64Array) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
    """(low, high) 32-bit halves of each word, as zero-copy views where possible."""
    if sys.byteorder == "little" and h.flags.c_contiguous:
        pair = h.view(np.uint32)
        return pair[0::2], pair[1::2]
    return (h & LOW32).astype(np.uint32), (h >> U32).astype(np.uint32)


def state_and_intensity(
    seed: int, pulse_index: IntArray, pattern: PatternConfig
) -> tuple[I8Array, I8Array]:
    """Polarization state index ``2·basis + bit`` (H, V, D, A = 0…3) and intensity class.

    Same bits as :func:`symbols`, read through 32-bit views to save passes: basis is
    ``(low >> 1) >= T_z``, i.e. ``low >= 2·T_z``; the bit is ``low & 1``.
    """
    h = hash_words(seed, SALT_SYMBOLS, _pattern_index(pulse_index, pattern))
    low, high = _halves(h)
    t_z = np.uint32(min(2 * round(pattern.p_z * 2.0**31), 2**32 - 1))
    state = np.bitwise_and(low, np.uint32(1), dtype=np.uint32).astype(np.int8)
    basis_x = low >= t_z
    if pattern.p_z >= 1.0:
        basis_x[:] = False
    state += basis_x.view(np.int8) * np.int8(2)
    klass = (high >= np.uint32(min(round(pattern.p_signal * 2.0**32), 2**32 - 1))).view(np.int8)
    if pattern.p_signal >= 1.0:
        klass[:] = 0
    upper = pattern.p_signal + pattern.p_decoy
    if upper < 1.0:
        klass += (high >= np.uint32(round(upper * 2.0**32))).view(np.int8)
    return state, klass


def eve_resend_state(
    seed: int, pulse_index: IntArray, alice_state: I8Array, fraction: float
) -> I8Array:
    """State index Bob receives after Eve's intercept-resend on a ``fraction`` of pulses.

    Eve attacks pulse i when bits 63…32 of its Eve word fall below ``fraction``·2³²;
    she measures in the basis of bit 1 and, when it differs from Alice's, reads the
    random bit 0; she resends her result with the same mean photon number.
    """
    if fraction <= 0.0:
        return alice_state
    h = hash_words(seed, SALT_EVE, pulse_index)
    attacked = (h >> U32) < threshold32(fraction)
    eve_basis = ((h >> ONE) & ONE).astype(np.int8)
    alice_basis = alice_state // 2
    eve_bit = np.where(eve_basis == alice_basis, alice_state % 2, (h & ONE).astype(np.int8))
    resent = (2 * eve_basis + eve_bit).astype(np.int8)
    return np.where(attacked, resent, alice_state).astype(np.int8)


def marker_pulse_indices(first: int, stop: int, frame_pulses: int,
                         start_index: int = 0) -> IntArray:
    """Pulse indices in ``[first, stop)`` that start a frame of a pattern begun at
    ``start_index`` (``start_index`` + multiples of ``frame_pulses``)."""
    lo = -(-(max(first, start_index) - start_index) // frame_pulses)
    hi = -(-(max(stop, start_index) - start_index) // frame_pulses)
    return np.arange(lo, hi, dtype=np.int64) * frame_pulses + start_index
