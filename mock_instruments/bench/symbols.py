"""Alice's pattern source: symbols as a pure function of (seed, pulse index).

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

from .config import PatternConfig

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
SALT_SYMBOLS = 0x5EED_0001
SALT_EVE = 0x5EED_0002

_U32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_ONE = np.uint64(1)

IntArray = npt.NDArray[np.int64]
U64Array = npt.NDArray[np.uint64]
I8Array = npt.NDArray[np.int8]


def splitmix64_scalar(x: int) -> int:
    """splitmix64 finaliser of one Python integer (mod 2⁶⁴)."""
    z = x & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def mix64_inplace(z: U64Array) -> U64Array:
    """splitmix64 finaliser applied in place to a ``uint64`` array (wraps mod 2⁶⁴)."""
    tmp = np.empty_like(z)
    np.right_shift(z, np.uint64(30), out=tmp)
    z ^= tmp
    z *= np.uint64(0xBF58476D1CE4E5B9)
    np.right_shift(z, np.uint64(27), out=tmp)
    z ^= tmp
    z *= np.uint64(0x94D049BB133111EB)
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp
    return z


def stream_key(seed: int, salt: int) -> int:
    """64-bit key of the counter stream ``salt`` of ``seed``."""
    return splitmix64_scalar(splitmix64_scalar(seed & MASK64) ^ salt)


def hash_words(seed: int, salt: int, pulse_index: npt.ArrayLike) -> U64Array:
    """One pseudo-random 64-bit word per pulse index: a pure function of (seed, salt, i)."""
    idx = np.asarray(pulse_index, dtype=np.int64)
    z = idx.astype(np.uint64)  # two's complement wrap for negative indices
    z += _ONE
    z *= np.uint64(GOLDEN_GAMMA)
    z += np.uint64(stream_key(seed, salt))
    return mix64_inplace(z)


def _threshold32(p: float) -> np.uint64:
    """``p`` scaled to a 32-bit threshold (p = 1 maps to 2³², never reached)."""
    return np.uint64(round(p * 2.0**32))


def intensity_from_words(h: U64Array, pattern: PatternConfig) -> I8Array:
    """Intensity class (0 signal, 1 decoy, 2 vacuum) from bits 63…32 of ``h``."""
    hi = h >> _U32
    k = (hi >= _threshold32(pattern.p_signal)).view(np.int8)
    k += (hi >= _threshold32(pattern.p_signal + pattern.p_decoy)).view(np.int8)
    return k


def basis_from_words(h: U64Array, p_z: float) -> I8Array:
    """Basis (0 = Z with probability ``p_z``, 1 = X) from bits 31…1 of ``h``."""
    mid = (h & _LOW32) >> _ONE
    return (mid >= np.uint64(round(p_z * 2.0**31))).view(np.int8)


def bit_from_words(h: U64Array) -> I8Array:
    """Bit value from bit 0 of ``h``."""
    return (h & _ONE).astype(np.int8)


def symbols(
    seed: int, pulse_index: npt.ArrayLike, pattern: PatternConfig | None = None
) -> tuple[I8Array, I8Array, I8Array]:
    """Alice's ``(basis, bit, intensity)`` (int8 arrays) of the given pulse indices.

    A pure function of ``(seed, pulse_index, pattern)``: P(basis = Z) = ``pattern.p_z``,
    P(intensity = k) = ``pattern.intensity_probs[k]``, bits uniform.
    """
    pat = PatternConfig() if pattern is None else pattern
    h = hash_words(seed, SALT_SYMBOLS, pulse_index)
    return basis_from_words(h, pat.p_z), bit_from_words(h), intensity_from_words(h, pat)


def _halves(h: U64Array) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
    """(low, high) 32-bit halves of each word, as zero-copy views where possible."""
    if sys.byteorder == "little" and h.flags.c_contiguous:
        pair = h.view(np.uint32)
        return pair[0::2], pair[1::2]
    return (h & _LOW32).astype(np.uint32), (h >> _U32).astype(np.uint32)


def state_and_intensity(
    seed: int, pulse_index: IntArray, pattern: PatternConfig
) -> tuple[I8Array, I8Array]:
    """Polarization state index ``2·basis + bit`` (H, V, D, A = 0…3) and intensity class.

    Same bits as :func:`symbols`, read through 32-bit views to save passes: basis is
    ``(low >> 1) >= T_z``, i.e. ``low >= 2·T_z``; the bit is ``low & 1``.
    """
    h = hash_words(seed, SALT_SYMBOLS, pulse_index)
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
    attacked = (h >> _U32) < _threshold32(fraction)
    eve_basis = ((h >> _ONE) & _ONE).astype(np.int8)
    alice_basis = alice_state // 2
    eve_bit = np.where(eve_basis == alice_basis, alice_state % 2, (h & _ONE).astype(np.int8))
    resent = (2 * eve_basis + eve_bit).astype(np.int8)
    return np.where(attacked, resent, alice_state).astype(np.int8)


def marker_pulse_indices(first: int, stop: int, frame_pulses: int) -> IntArray:
    """Pulse indices in ``[first, stop)`` that start a frame (multiples of ``frame_pulses``)."""
    lo = -(-max(first, 0) // frame_pulses)
    hi = -(-max(stop, 0) // frame_pulses)
    return np.arange(lo, hi, dtype=np.int64) * frame_pulses
