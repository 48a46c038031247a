"""Privacy amplification by Toeplitz hashing, computed exactly with a float64 FFT.

The m × n Toeplitz matrix T[i, j] = s[i − j + n − 1] is defined by n + m − 1 seed bits s
(drawn by Alice, sent over the authenticated channel); the family is 2-universal
(Krawczyk, CRYPTO '94; Carter & Wegman 1979), so by the leftover hash lemma the output is
ε-close to uniform for m below the smooth min-entropy (the finite-key length of
:mod:`qkdlab.protocol.finite_key`).  The key is y = T x over GF(2):

    y_i = (Σ_j s[i − j + n − 1] x_j) mod 2 = c[i + n − 1] mod 2,   c = s ⊛ x,

i.e. entries n − 1 … n + m − 2 of the integer linear convolution of the seed with the
key.  A cyclic convolution of any length N ≥ n + m − 1 agrees with c there.

Exactness: every c_k is an integer ≤ n < 2^53.  The FFT rounding error is bounded by
≈ u·log2(N)·‖x‖‖s‖ (u = 2^-53; Higham, "Accuracy and Stability of Numerical Algorithms",
§24.1), below 10^-6 for n ≤ 2^28, far from the 1/2 that rounding tolerates; the largest
distance of any output to the nearest integer is nevertheless checked on every call
(:class:`ExactnessError` beyond 0.1).

Speed (:class:`ToeplitzHasher`): x and s ride together as the real and imaginary parts of
one complex transform of length N = N1·N2, computed by the four-step algorithm (Bailey,
J. Supercomputing 4, 23 (1990)) so each small FFT fits in cache; the two spectra are
separated by Hermitian symmetry, multiplied, and the real-valued inverse is done as a
complex transform of length N/2 (even and odd samples as real and imaginary parts).
Work buffers are kept between calls (first-touch of fresh pages is slow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt

from qkdlab.protocol.bits import Bits, as_bits
from qkdlab.protocol.channel import ClassicalChannel, Message, ProtocolError

Complex = npt.NDArray[np.complex128]

EXACTNESS_MARGIN = 0.1


class ExactnessError(ArithmeticError):
    """The floating-point convolution strayed too far from integers to be rounded safely."""


def seed_length(n: int, m: int) -> int:
    """Seed bits needed for an m × n Toeplitz matrix: n + m − 1."""
    return n + m - 1


def toeplitz_hash_direct(key: Bits, seed: Bits, m: int) -> Bits:
    """Reference y = T x mod 2 by an explicit GF(2) matrix product (O(n·m); tests only)."""
    x = as_bits(key)
    s = as_bits(seed)
    n = x.size
    _check_sizes(n, m, s.size)
    if m == 0:
        return np.zeros(0, np.uint8)
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    matrix = s[i - j + n - 1]
    return ((matrix.astype(np.int64) @ x.astype(np.int64)) & 1).astype(np.uint8)


def toeplitz_hash_baseline(key: Bits, seed: Bits, m: int) -> Bits:
    """Straightforward numpy version: real FFTs of length 2^⌈log2(n+m−1)⌉ (benchmark baseline)."""
    x = as_bits(key)
    s = as_bits(seed)
    n = x.size
    _check_sizes(n, m, s.size)
    if m == 0 or n == 0:
        return np.zeros(m, np.uint8)
    size = 1 << math.ceil(math.log2(n + m - 1))
    c = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(s, size), size)[n - 1 : n - 1 + m]
    return (np.rint(c).astype(np.int64) & 1).astype(np.uint8)


def _check_sizes(n: int, m: int, seed_bits: int) -> None:
    if n < 0 or m < 0:
        raise ValueError("n and m must be >= 0")
    if m > n:
        raise ValueError(f"cannot extract m = {m} bits from n = {n}")
    if n and seed_bits != n + m - 1:
        raise ValueError(f"seed must have n + m − 1 = {n + m - 1} bits, got {seed_bits}")


def _smooth_numbers(limit: int) -> list[int]:
    """All 2^a 3^b 5^c ≤ limit, sorted."""
    out = []
    p2 = 1
    while p2 <= limit:
        p3 = p2
        while p3 <= limit:
            p5 = p3
            while p5 <= limit:
                out.append(p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return sorted(out)


def _plan(size: int) -> tuple[int, int]:
    """Smallest N1·N2 ≥ size with 5-smooth factors near √size and N2 even."""
    root = max(2, math.isqrt(size))
    cands = [c for c in _smooth_numbers(8 * root + 16) if c >= max(1, root // 8)]
    best: tuple[int, int, int] | None = None
    for n2 in cands:
        if n2 % 2:
            continue
        n1 = next((c for c in cands if c * n2 >= size), None)
        if n1 is None:
            continue
        key = (n1 * n2, abs(n1 - n2), n1)
        if best is None or key < best:
            best = key
    if best is None:  # pragma: no cover - cands always hold a pair
        raise ValueError(f"no FFT plan for size {size}")
    return best[2], best[0] // best[2]


def _phase_table(rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64], total: int,
                 sign: float) -> Complex:
    """exp(sign·2πi·(r·c mod total)/total) for every row r and column c."""
    prod = (rows[:, None] * cols[None, :]) % total
    return np.exp(sign * 2j * np.pi * prod.astype(np.float64) / total)


@numba.njit(cache=True, nogil=True)
def _fill(z: Complex, x: Bits, s: Bits) -> None:
    """z = x + i·s, zero-padded (z flattened row-major)."""
    flat = z.reshape(-1)
    for i in range(flat.size):
        re = 1.0 if i < x.size and x[i] else 0.0
        im = 1.0 if i < s.size and s[i] else 0.0
        flat[i] = complex(re, im)


@numba.njit(cache=True, nogil=True)
def _twiddle(z: Complex, hi: Complex, lo: Complex, split: int) -> None:
    """z[k1, n2] *= hi[k1 // split, n2] · lo[k1 % split, n2]."""
    for k1 in range(z.shape[0]):
        a, b = k1 // split, k1 % split
        for c in range(z.shape[1]):
            z[k1, c] *= hi[a, c] * lo[b, c]


@numba.njit(cache=True, nogil=True)
def _fold(z: Complex, q: Complex, f1: Complex, f2: Complex) -> None:
    """Spectrum product folded to length N/2 for the real-output inverse.

    With Z = FFT(x + i·s) in four-step layout z[k1, k2] = Z[k1 + N1·k2]:
    P[k] = X[k]·S[k] = (Z[k]² − conj(Z[−k])²)/4i, and
    Q[k] = ½[(P[k] + P[k + N/2]) + i·e^(2πik/N)·(P[k] − P[k + N/2])] for k < N/2,
    whose inverse FFT of length N/2 holds the real result's even and odd samples as
    real and imaginary parts.  −k ↦ row (−k1 mod N1), column (−k2 − [k1 ≠ 0]) mod N2.
    """
    n1, n2 = z.shape
    half = n2 // 2
    for k1 in range(n1):
        r = (n1 - k1) % n1
        for c in range(half):
            c2 = c + half
            nl = (n2 - c) % n2 if k1 == 0 else n2 - 1 - c
            nr = (n2 - c2) % n2 if k1 == 0 else n2 - 1 - c2
            a, b = z[k1, c], z[r, nl].conjugate()
            pl = (a * a - b * b) * (-0.25j)
            a, b = z[k1, c2], z[r, nr].conjugate()
            pr = (a * a - b * b) * (-0.25j)
            q[k1, c] = 0.5 * ((pl + pr) + 1j * f1[k1] * f2[c] * (pl - pr))


class _Twiddles:
    """W^(k1·n2) = exp(sign·2πi k1 n2 / total) for a row block, from two small tables."""

    def __init__(self, n_rows: int, n_cols: int, total: int, sign: float) -> None:
        self.split = max(1, math.isqrt(n_rows))
        cols = np.arange(n_cols, dtype=np.int64)
        hi = np.arange(0, n_rows + self.split, self.split, dtype=np.int64)
        lo = np.arange(self.split, dtype=np.int64)
        self.hi = _phase_table(hi, cols, total, sign)
        self.lo = _phase_table(lo, cols, total, sign)


@dataclass(frozen=True)
class _Shape:
    n: int
    m: int
    n1: int
    n2: int

    @property
    def size(self) -> int:
        return self.n1 * self.n2


class ToeplitzHasher:
    """Toeplitz hashing n → m bits; reuse one instance for many blocks of the same size.

    ``hash(key, seed)`` returns the m output bits.  Memory: about 24·N bytes
    (N ≈ n + m), kept between calls.
    """

    def __init__(self, n: int, m: int) -> None:
        if n < 1 or not 0 <= m <= n:
            raise ValueError(f"need 1 <= n and 0 <= m <= n, got n={n}, m={m}")
        n1, n2 = _plan(n + m - 1)
        self.shape = _Shape(n, m, n1, n2)
        self._fwd = _Twiddles(n1, n2, n1 * n2, -1.0)
        half = n2 // 2
        self._inv = _Twiddles(n1, half, n1 * half, +1.0)
        self._f1 = np.exp(2j * np.pi * np.arange(n1) / (n1 * n2))
        self._f2 = np.exp(2j * np.pi * np.arange(half) / n2)
        self._z: Complex | None = None
        self._q: Complex | None = None
        self.last_max_deviation = 0.0

    def __repr__(self) -> str:
        sh = self.shape
        return f"ToeplitzHasher(n={sh.n}, m={sh.m}, fft={sh.n1}x{sh.n2})"

    def hash(self, key: Bits, seed: Bits) -> Bits:
        """y = T(seed) · key over GF(2); exact (see the module docstring)."""
        sh = self.shape
        x = as_bits(key)
        s = as_bits(seed)
        if x.size != sh.n:
            raise ValueError(f"key must have {sh.n} bits, got {x.size}")
        _check_sizes(sh.n, sh.m, s.size)
        if sh.m == 0:
            return np.zeros(0, np.uint8)
        n1, n2 = sh.n1, sh.n2
        half = n2 // 2
        if self._z is None or self._q is None:
            self._z = np.empty((n1, n2), dtype=np.complex128)
            self._q = np.empty((n1, half), dtype=np.complex128)
        z, q = self._z, self._q
        _fill(z, x, s)
        # forward four-step FFT of z = x + i·s: columns, twiddles, rows
        np.fft.fft(z, axis=0, out=z)
        _twiddle(z, self._fwd.hi, self._fwd.lo, self._fwd.split)
        np.fft.fft(z, axis=1, out=z)
        _fold(z, q, self._f1, self._f2)
        # inverse four-step FFT of length N/2: rows, twiddles, columns
        np.fft.ifft(q, axis=1, out=q)
        _twiddle(q, self._inv.hi, self._inv.lo, self._inv.split)
        np.fft.ifft(q, axis=0, out=q)
        conv = q.reshape(-1).view(np.float64)[sh.n - 1 : sh.n - 1 + sh.m]
        rounded = np.rint(conv)
        dev = float(np.max(np.abs(conv - rounded)))
        self.last_max_deviation = dev
        if dev > EXACTNESS_MARGIN:
            raise ExactnessError(f"FFT result {dev:.3g} away from an integer; not exact")
        return (rounded.astype(np.int64) & 1).astype(np.uint8)


def toeplitz_hash(key: Bits, seed: Bits, m: int) -> Bits:
    """One-shot Toeplitz hash (builds a :class:`ToeplitzHasher`)."""
    x = as_bits(key)
    _check_sizes(x.size, m, as_bits(seed).size)
    if m == 0 or x.size == 0:
        return np.zeros(m, np.uint8)
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
    """Alice: draw the n + m − 1 seed bits, send them, return her m-bit final key."""
    x = as_bits(key)
    seed = rng.integers(0, 2, size=seed_length(x.size, m), dtype=np.uint8)
    channel.send(Message("pa/seed", n=int(x.size), m=int(m), seed=np.packbits(seed)))
    channel.recv(timeout).expect("pa/ack")
    return (hasher or ToeplitzHasher(x.size, m)).hash(x, seed) if m else np.zeros(0, np.uint8)


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
    n, m = msg.get_int("n"), msg.get_int("m")
    if n != x.size or not 0 <= m <= n:
        raise ProtocolError(f"PA for n={n}, m={m} but Bob holds {x.size} bits")
    seed = np.unpackbits(msg.get_array("seed", np.uint8), count=seed_length(n, m))
    channel.send(Message("pa/ack"))
    return (hasher or ToeplitzHasher(n, m)).hash(x, seed) if m else np.zeros(0, np.uint8)
