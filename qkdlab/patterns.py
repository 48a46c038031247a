"""Alice's pseudo-random BB84 pattern: symbols as a pure function of (seed, pulse index).

The algorithm of the pattern generator (``ALGORITHM``), shared by the transmitter's
record look-up (the driver) and the firmware it emulates (the mock bench), so that
Alice's record can be read back for any pulse indices without storing 10⁹ symbols.

A counter-based generator: pulse ``i`` gets the 64-bit word
``splitmix64(key + (i + 1)·γ)`` (γ = 0x9E3779B97F4A7C15, ``key`` derived from the seed
and a per-use salt), computed in vectorised numpy ``uint64`` arithmetic.  The same
indices give the same symbols in any order or chunking.

Bit allocation of the word ``h``: bits 63…32 choose the intensity class, bits 31…1 the
basis, bit 0 the bit value.  Conventions: basis 0 = Z, 1 = X; intensity 0 = signal,
1 = decoy, 2 = vacuum.

A pseudo-random pattern is reproducible from its seed, so keys made with it are for
tests and demonstrations; a QKD link in service draws its symbols from a QRNG.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

ALGORITHM = "splitmix64-bb84-v1"

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
SALT_SYMBOLS = 0x5EED_0001
SALT_EVE = 0x5EED_0002

U32 = np.uint64(32)
LOW32 = np.uint64(0xFFFFFFFF)
ONE = np.uint64(1)

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
    z += ONE
    z *= np.uint64(GOLDEN_GAMMA)
    z += np.uint64(stream_key(seed, salt))
    return mix64_inplace(z)


def threshold32(p: float) -> np.uint64:
    """``p`` scaled to a 32-bit threshold (p = 1 maps to 2³², never reached)."""
    return np.uint64(round(p * 2.0**32))


def intensity_from_words(h: U64Array, p_signal: float, p_decoy: float) -> I8Array:
    """Intensity class (0 signal, 1 decoy, 2 vacuum) from bits 63…32 of ``h``."""
    hi = h >> U32
    k = (hi >= threshold32(p_signal)).view(np.int8)
    k += (hi >= threshold32(p_signal + p_decoy)).view(np.int8)
    return k


def basis_threshold31(p_z: float) -> np.uint64:
    """``p_z`` scaled to the 31-bit threshold of the basis bits."""
    return np.uint64(round(p_z * 2.0**31))


def basis_from_words(h: U64Array, p_z: float) -> I8Array:
    """Basis (0 = Z with probability ``p_z``, 1 = X) from bits 31…1 of ``h``."""
    mid = (h & LOW32) >> ONE
    return (mid >= basis_threshold31(p_z)).view(np.int8)


def bit_from_words(h: U64Array) -> I8Array:
    """Bit value from bit 0 of ``h``."""
    return (h & ONE).astype(np.int8)


def symbol_constants(seed: int, p_z: float = 0.5, p_signal: float = 0.7,
                     p_decoy: float = 0.2) -> npt.NDArray[np.uint64]:
    """What a compiled look-up needs to reproduce :func:`bb84_symbols` for one pattern.

    Returns ``uint64[4]``: the stream key of the symbol counter, the basis threshold
    (:func:`basis_threshold31`) and the two intensity thresholds (:func:`threshold32` of
    ``p_signal`` and ``p_signal + p_decoy``).  Word ``h`` of pulse ``i`` is
    ``mix(key + (i + 1)·γ)``; basis = ``((h & 0xFFFFFFFF) >> 1) >= t_z``, bit = ``h & 1``,
    intensity = ``(h >> 32 >= t_s) + (h >> 32 >= t_sd)``.
    """
    return np.array([stream_key(seed, SALT_SYMBOLS), basis_threshold31(p_z),
                     threshold32(p_signal), threshold32(p_signal + p_decoy)], dtype=np.uint64)


def bb84_symbols(
    seed: int,
    pulse_index: npt.ArrayLike,
    p_z: float = 0.5,
    p_signal: float = 0.7,
    p_decoy: float = 0.2,
) -> tuple[I8Array, I8Array, I8Array]:
    """Alice's ``(basis, bit, intensity)`` (int8 arrays) of the given pulse indices.

    P(basis = Z) = ``p_z``; P(intensity = signal, decoy, vacuum) = ``p_signal``,
    ``p_decoy``, ``1 − p_signal − p_decoy``; bits uniform.
    """
    h = hash_words(seed, SALT_SYMBOLS, pulse_index)
    return basis_from_words(h, p_z), bit_from_words(h), intensity_from_words(
        h, p_signal, p_decoy
    )
