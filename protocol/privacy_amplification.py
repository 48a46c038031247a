"""Privacy amplification by (modified) Toeplitz hashing, computed exactly by an NTT.

The n-bit reconciled key x is compressed to m bits by the m × n matrix H = [I_m | T],
T the m × (n − m) Toeplitz matrix T[i, j] = s[i − j + n − m − 1] of n − 1 seed bits s
drawn by Alice and sent over the authenticated channel (Hayashi & Tsurumaru, IEEE Trans.
Inf. Theory 62, 2213 (2016)):

    y = x[:m] ⊕ T·x[m:]   over GF(2).

The family is 2-universal (Carter & Wegman 1979), so the leftover hash lemma applies as
for the plain Toeplitz family (Krawczyk, CRYPTO '94) and the output is ε-close to
uniform for m below the smooth min-entropy (the finite-key length of
:mod:`qkdlab.protocol.finite_key`).  Proof: two keys differing by d = (d1, d2) collide iff
d1 = T·d2.  If d2 = 0 that never happens (d1 ≠ 0).  Otherwise let j* be the last index
with d2[j*] = 1; row i of T·d2 is s[i − j* + n − m − 1] plus seed bits of higher index
only, and these leading bits differ between rows, so for a uniform seed T·d2 is uniform
on GF(2)^m and the collision probability is exactly 2^−m.  Compared with the full
Toeplitz matrix (n + m − 1 seed bits) the seed is shorter (n − 1 bits) and so is the
convolution (n − 1 instead of n + m − 1 points).

T·x[m:] is entries n − m − 1 … n − 2 of the integer linear convolution s ⊛ x[m:], taken
mod 2; a cyclic convolution of any length N ≥ n − 1 agrees with it there.
:class:`ToeplitzHasher` computes that cyclic convolution by a number-theoretic transform
mod a prime (:mod:`qkdlab.protocol.ntt`): every entry is an integer ≤ n − m below the
prime, so the result is exact by construction — no rounding to check.
"""

from __future__ import annotations

import math

import numpy as np

from qkdlab.protocol.bits import Bits, as_bits
from qkdlab.protocol.channel import ClassicalChannel, Message, ProtocolError
from qkdlab.protocol.ntt import MAX_SIZE, BitConvolution

FAMILY = "toeplitz-I|T"
"""Name of the hash family, sent with the seed so that both sides agree on it."""

MAX_KEY_BITS = MAX_SIZE + 1
"""Longest key the NTT can hash (its transform length N ≥ n − 1 is bounded)."""


def seed_length(n: int, m: int) -> int:
    """Seed bits for hashing n → m bits: n − 1 (none if m = 0 or m = n: H is then 0 or I)."""
    _check_sizes(n, m)
    return n - 1 if 0 < m < n else 0


def _check_sizes(n: int, m: int, seed_bits: int | None = None) -> None:
    if n < 0 or m < 0:
        raise ValueError(f"n and m must be >= 0, got n={n}, m={m}")
    if m > n:
        raise ValueError(f"cannot extract m = {m} bits from n = {n}")
    if n > MAX_KEY_BITS:
        raise ValueError(f"key length n must be <= {MAX_KEY_BITS}, got {n}")
    if seed_bits is not None:
        want = n - 1 if 0 < m < n else 0
        if seed_bits != want:
            raise ValueError(f"seed must have {want} bits for n={n}, m={m}, got {seed_bits}")


def toeplitz_hash_direct(key: Bits, seed: Bits, m: int) -> Bits:
    """Reference y = [I | T]·x mod 2 by an explicit GF(2) matrix product (O(n·m); tests)."""
    x = as_bits(key)
    s = as_bits(seed)
    n = x.size
    _check_sizes(n, m, s.size)
    width = n - m
    if m == 0 or width == 0:
        return x[:m].copy()
    i = np.arange(m)[:, None]
    j = np.arange(width)[None, :]
    matrix = np.concatenate([np.eye(m, dtype=np.int64), s[i - j + width - 1]], axis=1)
    return ((matrix @ x.astype(np.int64)) & 1).astype(np.uint8)


def toeplitz_hash_baseline(key: Bits, seed: Bits, m: int) -> Bits:
    """Straightforward numpy version: float real FFTs of length 2^⌈log2(2n − m − 2)⌉.

    The benchmark's baseline; exact while the float error stays below 1/2 (it does for
    the benchmark sizes, and the benchmark compares it with :class:`ToeplitzHasher`).
    """
    x = as_bits(key)
    s = as_bits(seed)
    n = x.size
    _check_sizes(n, m, s.size)
    width = n - m
    if m == 0 or width == 0:
        return x[:m].copy()
    size = 1 << math.ceil(math.log2(s.size + width - 1))
    conv = np.fft.irfft(np.fft.rfft(x[m:], size) * np.fft.rfft(s, size), size)
    t_x = np.rint(conv[width - 1 : width - 1 + m]).astype(np.int64) & 1
    return (x[:m] ^ t_x).astype(np.uint8)


class ToeplitzHasher:
    """[I | T] hashing n → m bits; reuse one instance for many blocks of the same size.

    ``hash(key, seed)`` returns the m output bits.  The transform plan and its work
    buffers (about 10·n bytes in all) are kept between calls; not thread-safe.
    """

    def __init__(self, n: int, m: int) -> None:
        if n < 1 or not 0 <= m <= n:
            raise ValueError(f"need 1 <= n and 0 <= m <= n, got n={n}, m={m}")
        _check_sizes(n, m)
        self.n, self.m = n, m
        self._conv = BitConvolution(n - 1) if 0 < m < n else None

    def __repr__(self) -> str:
        return f"ToeplitzHasher(n={self.n}, m={self.m}, {self._conv!r})"

    def hash(self, key: Bits, seed: Bits) -> Bits:
        """y = x[:m] ⊕ T(seed)·x[m:] over GF(2); exact."""
        x = as_bits(key)
        s = as_bits(seed)
        if x.size != self.n:
            raise ValueError(f"key must have {self.n} bits, got {x.size}")
        _check_sizes(self.n, self.m, s.size)
        if self._conv is None:  # m = 0 or m = n: H is empty or the identity
            return x[: self.m].copy()
        width = self.n - self.m
        return self._conv.parity_window(s, x[self.m :], width - 1, self.m, x[: self.m])


def toeplitz_hash(key: Bits, seed: Bits, m: int) -> Bits:
    """One-shot hash (builds a :class:`ToeplitzHasher`)."""
    x = as_bits(key)
    _check_sizes(x.size, m, as_bits(seed).size)
    if m == 0 or m == x.size:
        return x[:m].copy()
    return ToeplitzHasher(x.size, m).hash(x, seed)


def amplify_alice(
    channel: ClassicalChannel,
    key: Bits,
    m: int,
    rng: np.random.Generator,
    *,
    hasher: ToeplitzHasher | None = None,
    timeout: float | None = None,
) -> Bits:
    """Alice: draw the n − 1 seed bits, send them, return her m-bit final key."""
    x = as_bits(key)
    seed = rng.integers(0, 2, size=seed_length(x.size, m), dtype=np.uint8)
    channel.send(Message("pa/seed", family=FAMILY, n=int(x.size), m=int(m),
                         seed=np.packbits(seed)))
    channel.recv(timeout).expect("pa/ack")
    if m == 0:
        return np.zeros(0, np.uint8)
    return (hasher or ToeplitzHasher(x.size, m)).hash(x, seed)


def amplify_bob(
    channel: ClassicalChannel,
    key: Bits,
    *,
    hasher: ToeplitzHasher | None = None,
    timeout: float | None = None,
) -> Bits:
    """Bob: receive the seed and output length, return his m-bit final key."""
    x = as_bits(key)
    msg = channel.recv(timeout).expect("pa/seed")
    family = msg.get_str("family")
    if family != FAMILY:
        raise ProtocolError(f"PA hash family {family!r} is not {FAMILY!r}")
    n, m = msg.get_int("n"), msg.get_int("m")
    if n != x.size or not 0 <= m <= n:
        raise ProtocolError(f"PA for n={n}, m={m} but Bob holds {x.size} bits")
    packed = msg.get_array("seed", np.uint8)
    bits_needed = seed_length(n, m)
    if packed.size != (bits_needed + 7) // 8:
        raise ProtocolError(f"PA seed has {packed.size} bytes, need {(bits_needed + 7) // 8}")
    seed = np.unpackbits(packed, count=bits_needed)
    channel.send(Message("pa/ack"))
    if m == 0:
        return np.zeros(0, np.uint8)
    return (hasher or ToeplitzHasher(n, m)).hash(x, seed)
