"""Bit-array helpers shared by the post-processing steps.

In memory a key is a 1-D ``uint8`` array of 0/1 values (one byte per bit, easy to index);
on disk and on the wire it is packed 8 bits per byte, most significant bit first
(``numpy.packbits`` order).  No function here logs or prints key material.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import numpy.typing as npt

Bits = npt.NDArray[np.uint8]
"""A key or any bit string: 1-D ``uint8`` array holding only 0 and 1."""


def as_bits(values: npt.ArrayLike) -> Bits:
    """Return ``values`` as a contiguous 1-D ``uint8`` 0/1 array (validated, copied if needed).

    Raises:
        ValueError: if the input is not 1-D or holds anything other than 0 and 1.
    """
    arr = np.ascontiguousarray(values)
    if arr.ndim != 1:
        raise ValueError(f"a bit array must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.view(np.uint8)
    if arr.size and (arr.dtype.kind not in "biu" or arr.min() < 0 or arr.max() > 1):
        raise ValueError("a bit array may hold only the values 0 and 1")
    return arr.astype(np.uint8, copy=False)


def random_bits(rng: np.random.Generator, n: int) -> Bits:
    """``n`` uniformly random bits drawn from ``rng``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    words = rng.integers(0, 256, size=(n + 7) // 8, dtype=np.uint8)
    return np.unpackbits(words, count=n)


def binary_symmetric_channel(bits: Bits, qber: float, rng: np.random.Generator) -> Bits:
    """Copy of ``bits`` with each bit flipped independently with probability ``qber``.

    The BSC of Shannon's model; used to make Bob's noisy key in tests and benchmarks.
    """
    if not 0.0 <= qber <= 1.0:
        raise ValueError(f"qber must be in [0, 1], got {qber}")
    flips = (rng.random(bits.size) < qber).astype(np.uint8)
    return np.bitwise_xor(bits, flips)


def pack(bits: Bits) -> npt.NDArray[np.uint8]:
    """Pack 0/1 bits into bytes, MSB first; the last byte is zero-padded."""
    return np.packbits(bits)


def unpack(packed: npt.NDArray[np.uint8], n: int) -> Bits:
    """Inverse of :func:`pack`: the first ``n`` bits of ``packed``."""
    if n < 0 or n > 8 * packed.size:
        raise ValueError(f"cannot unpack {n} bits from {packed.size} bytes")
    return np.unpackbits(packed, count=n)


def parity(bits: Bits) -> int:
    """Parity (XOR of all bits) of a bit array, 0 or 1."""
    return int(np.bitwise_xor.reduce(bits)) if bits.size else 0


@numba.njit(cache=True, nogil=True)
def prefix_parity(bits: Bits) -> Bits:
    """Prefix XOR ``c`` of length ``n + 1`` with ``c[0] = 0``: parity(bits[a:b]) = c[a] ^ c[b]."""
    out = np.empty(bits.size + 1, dtype=np.uint8)
    out[0] = 0
    c = np.uint8(0)
    for i in range(bits.size):
        c ^= bits[i]
        out[i + 1] = c
    return out


def hamming_distance(a: Bits, b: Bits) -> int:
    """Number of positions where two equal-length bit arrays differ."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return int(np.count_nonzero(a != b))


def binary_entropy(p: float) -> float:
    """Binary entropy h(p) = −p log2 p − (1−p) log2(1−p) in bits, with h(0) = h(1) = 0.

    Shannon (1948); used for the Cascade efficiency f = leak / (n h(QBER)) and for the
    phase-error term of the finite-key length (Lim et al. 2014, Eq. 1).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"h(p) needs p in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)
