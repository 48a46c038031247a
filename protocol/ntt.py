"""Exact cyclic convolution of bit vectors by a number-theoretic transform (NTT).

Arithmetic is in GF(p), p = 15·2^27 + 1 = 2013265921 (generator 31), which has roots of
unity of every order N = 2^a or 3·2^a with a ≤ 27.  Every entry of the cyclic
convolution of two 0/1 vectors of length ≤ N is an integer in [0, N] ⊂ [0, p), so it is
recovered exactly from its residue: no rounding, no error bound to check.

Layout (four-step, Bailey, J. Supercomputing 4, 23 (1990)): the length-N vector is an
N1 × N2 matrix, N2 = 2^b, N1 = 2^a or 3·2^a, both ≈ √N.  Every butterfly works on 16
adjacent uint32 lanes (one AVX-512 register), i.e. on 16 independent sequences at once
(:mod:`qkdlab.protocol.ntt_kernels`):

0. the bits are rearranged into 16-column blocks (one sequential read);
1. *columns*: each block, N1 × 16 (fits in L2), is transformed along N1 (a radix-3
   stage if 3 | N1, then radix-4/2 decimation in frequency), multiplied by the twiddles
   ω_N^(k1·n2) and stored as 16 × 16 transposed squares into 16-row *tiles*;
2. *rows*: per tile (N2 × 16), both operands are transformed along N2, multiplied
   pointwise and transformed back (decimation in time, inverse roots);
3. *inverse columns*: blocks are gathered back, untwiddled and transformed back along
   N1; the residues' parities are read off in block layout and rearranged.

The transforms leave their output in digit-reversed order; the pointwise product does
not care and the inverse stages undo it, so no permutation pass is made.  Constant
factors use Shoup's precomputed quotients, the pointwise product Montgomery's
reduction; its factor 2^−32 and 1/N are folded into the inverse twiddles.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import numpy.typing as npt

from qkdlab.protocol import ntt_kernels as kern

U32 = npt.NDArray[np.uint32]
Bits = npt.NDArray[np.uint8]

P = 2013265921
"""The prime modulus 15·2^27 + 1."""
GENERATOR = 31
MAX_TWO_POWER = 27
LANES = 16
MIN_SIDE = 16
MAX_SIZE = 3 << MAX_TWO_POWER
"""Longest transform: 3·2^27 ≈ 4.0·10^8 points."""

_R_MOD_P = (1 << 32) % P


def transform_size(minimum: int) -> int:
    """Smallest supported length N = 2^a or 3·2^a with N ≥ max(minimum, 256)."""
    if minimum < 0 or minimum > MAX_SIZE:
        raise ValueError(f"convolution length must be in [0, {MAX_SIZE}], got {minimum}")
    want = max(minimum, MIN_SIDE * MIN_SIDE)
    best = MAX_SIZE
    for r in (1, 3):  # a ≥ 8: N1 and N2 ≥ 16, N1 a multiple of 16
        a = max(8, math.ceil(math.log2(want / r)))
        while r << a < want:  # guard against float rounding in log2
            a += 1
        if a <= MAX_TWO_POWER:
            best = min(best, r << a)
    return best


def _split(size: int) -> tuple[int, int]:
    """N = N1·N2 with N2 = 2^b, N1 holding the factor 3, both ≥ 16 and N1 ≈ N2."""
    r = 3 if size % 3 == 0 else 1
    a = (size // r).bit_length() - 1
    b = max(4, min(a - 4, (a + 1) // 2))
    return size >> b, 1 << b


# --------------------------------------------------------------------------- tables


def _root(order: int, inverse: bool = False) -> int:
    w = pow(GENERATOR, (P - 1) // order, P)
    return pow(w, P - 2, P) if inverse else w


@numba.njit(cache=True)
def _powers(w: int, count: int) -> U32:
    out = np.empty(count, np.uint32)
    v = 1
    for k in range(count):
        out[k] = v
        v = v * w % P
    return out


@numba.njit(cache=True)
def _pow_each(bases: npt.NDArray[np.int64], exps: npt.NDArray[np.int64]) -> U32:
    """bases[i]^exps[i] mod p, elementwise (square and multiply)."""
    out = np.empty(bases.size, np.uint32)
    for i in range(bases.size):
        b, e, acc = bases[i] % P, exps[i], 1
        while e:
            if e & 1:
                acc = acc * b % P
            b = b * b % P
            e >>= 1
        out[i] = acc
    return out


@numba.njit(cache=True)
def _geometric(ratio: U32, count: int) -> U32:
    """out[c·len(ratio) + r] = ratio[r]^c mod p."""
    rows = ratio.size
    out = np.empty(count * rows, np.uint32)
    for r in range(rows):
        acc = np.int64(1)
        g = np.int64(ratio[r])
        for c in range(count):
            out[c * rows + r] = acc
            acc = acc * g % P
    return out


def _shoup(w: npt.ArrayLike) -> U32:
    """Shoup's quotient ⌊w·2^32/p⌋ for each w < p."""
    return ((np.asarray(w, np.uint64) << np.uint64(32)) // np.uint64(P)).astype(np.uint32)


class _Pow2Tables:
    """Twiddles of a length-M (M = 2^a ≥ 16) radix-4/2 transform, forward or inverse.

    Decimation in frequency runs one radix-2 stage (half M/2) when a is odd, then radix-4
    stages with quarter q = 4^i; the radix-4 table for q holds ω_{4q}^{j}, ω_{4q}^{2j},
    ω_{4q}^{3j} at index q + j.  ``i4`` is ω_4 (its inverse for the inverse tables).
    Each value sits next to its Shoup quotient.
    """

    def __init__(self, size: int, inverse: bool) -> None:
        pw = _powers(_root(size, inverse), size)
        j_all = np.arange(size, dtype=np.int64)
        w1 = np.zeros(size, np.uint32)
        w2 = np.zeros(size, np.uint32)
        w3 = np.zeros(size, np.uint32)
        q = 1
        while 4 * q <= size:
            step = size // (4 * q)
            j = j_all[:q]
            w1[q : 2 * q] = pw[(j * step) % size]
            w2[q : 2 * q] = pw[(2 * j * step) % size]
            w3[q : 2 * q] = pw[(3 * j * step) % size]
            q *= 4
        self.w = np.stack([w1, _shoup(w1), w2, _shoup(w2), w3, _shoup(w3)])
        r2 = pw[: size // 2]
        self.r2 = np.stack([r2, _shoup(r2)])
        i4 = int(pw[size // 4])
        self.i4 = np.array([i4, int(_shoup(i4))], np.uint32)


class _ColumnTables:
    """Column transform (length N1 = r·M) plus the four-step twiddles, one direction."""

    def __init__(self, n1: int, n2: int, inverse: bool) -> None:
        size = n1 * n2
        self.radix = 3 if n1 % 3 == 0 else 1
        m = n1 // self.radix
        self.pow2 = _Pow2Tables(m, inverse)
        if self.radix == 3:
            w = _powers(_root(n1, inverse), n1)
            j = np.arange(m)
            t1, t2 = w[j], w[2 * j]
            w3 = _root(3, inverse)
            self.r3 = np.stack([t1, _shoup(t1), t2, _shoup(t2)])
            self.w3 = np.array([w3, int(_shoup(w3))], np.uint32)
        else:
            self.r3 = np.zeros((4, 1), np.uint32)
            self.w3 = np.zeros(2, np.uint32)
        # frequency index k1 of each output row of the forward column transform:
        # row t·M + j holds k1 = t + r·bitrev(j)
        bits = m.bit_length() - 1
        rows = np.arange(m, dtype=np.int64)
        rev = np.zeros(m, np.int64)
        for b in range(bits):
            rev |= ((rows >> b) & 1) << (bits - 1 - b)
        k1 = (np.arange(self.radix, dtype=np.int64)[:, None] + self.radix * rev[None, :]).ravel()
        # twiddle ω_N^(±k1·c) = U[c0/16, r]·V[r, l] for column c = c0 + l: V is applied in
        # the last column stage (whose own twiddles are 1), U as a per-row factor
        wn = _root(size, inverse)
        scale = 1
        if inverse:  # fold 1/N and Montgomery's 2^32 into the inverse twiddles
            scale = _R_MOD_P * pow(size, P - 2, P) % P
        k1_lanes = (k1[:, None] * np.arange(LANES)[None, :]).ravel()
        v = _pow_each(np.full(k1_lanes.size, wn, np.int64), k1_lanes)
        v = (v.astype(np.uint64) * np.uint64(scale) % np.uint64(P)).astype(np.uint32)
        self.v = np.stack([v, _shoup(v)])
        g = _pow_each(np.full(n1, wn, np.int64), (LANES * k1) % size)
        u = _geometric(g, n2 // LANES)
        self.u = np.stack([u, _shoup(u)])


# --------------------------------------------------------------------------- public


class BitConvolution:
    """Window of the cyclic convolution of two 0/1 vectors, mod 2, exactly.

    ``BitConvolution(minimum)`` plans a transform of length N ≥ ``minimum`` (see
    :func:`transform_size`); ``parity_window(a, b, lo, count)`` returns
    (Σ_j a[j]·b[(k − j) mod N]) mod 2 for k = lo … lo + count − 1, XOR-ed with ``xor``
    if given.  Tables (≈ N bytes) and work buffers (≈ 9·N bytes, allocated on the first
    call) are kept between calls; single-threaded.
    """

    def __init__(self, minimum: int) -> None:
        self.size = transform_size(minimum)
        self.n1, self.n2 = _split(self.size)
        self._fwd = _ColumnTables(self.n1, self.n2, inverse=False)
        self._inv = _ColumnTables(self.n1, self.n2, inverse=True)
        self._row_fwd = _Pow2Tables(self.n2, inverse=False)
        self._row_inv = _Pow2Tables(self.n2, inverse=True)
        self._buf = np.empty(self.n1 * LANES, np.uint32)
        self._a: U32 | None = None
        self._b: U32 | None = None
        self._blocks: Bits | None = None

    def __repr__(self) -> str:
        return f"BitConvolution(N={self.size} = {self.n1}x{self.n2})"

    def parity_window(self, a: Bits, b: Bits, lo: int, count: int,
                      xor: Bits | None = None) -> Bits:
        """(a ⊛_N b)[lo : lo + count] mod 2 (⊕ xor); a, b: uint8 0/1 of length ≤ N."""
        self._check(a, b, lo, count)
        if xor is not None and xor.size != count:
            raise ValueError(f"xor must have count = {count} bits, got {xor.size}")
        blocks = self._convolve(a, b, np.zeros(0, np.uint32))
        out = np.empty(count, np.uint8)
        x = np.zeros(0, np.uint8) if xor is None else np.ascontiguousarray(xor, np.uint8)
        kern.from_blocks(blocks, out, lo, x, self.n1, self.n2)
        return out

    def values(self, a: Bits, b: Bits) -> npt.NDArray[np.int64]:
        """The whole cyclic convolution a ⊛_N b as integers (exact; for checks)."""
        self._check(a, b, 0, self.size)
        raw = np.empty(self.size, np.uint32)
        self._convolve(a, b, raw)
        # block layout [c0/16][r][l] → natural index r·N2 + c0 + l
        nat = raw.reshape(self.n2 // LANES, self.n1, LANES).transpose(1, 0, 2).ravel()
        return nat.astype(np.int64)

    def _check(self, a: Bits, b: Bits, lo: int, count: int) -> None:
        n = self.size
        if a.size > n or b.size > n:
            raise ValueError(f"inputs must have at most N = {n} bits, got {a.size}, {b.size}")
        if not (lo >= 0 and count >= 0 and lo + count <= n):
            raise ValueError(f"window [{lo}, {lo + count}) must lie in [0, {n}]")

    def _convolve(self, a: Bits, b: Bits, raw: U32) -> Bits:
        """All passes; parities (or residues into ``raw``) in block layout."""
        n = self.size
        if self._a is None or self._b is None or self._blocks is None:
            self._a = np.empty(n, np.uint32)
            self._b = np.empty(n, np.uint32)
            self._blocks = np.empty(n, np.uint8)
        fw, iv = self._fwd, self._inv
        for bits, tiles in ((a, self._a), (b, self._b)):
            kern.to_blocks(np.ascontiguousarray(bits, np.uint8), self._blocks, self.n1,
                           self.n2)
            kern.columns_forward(self._blocks, tiles, self._buf, self.n1, self.n2, fw.radix,
                                 fw.pow2.w, fw.pow2.r2, fw.pow2.i4, fw.r3, fw.w3, fw.v, fw.u,
                                 LANES)
        rf, ri = self._row_fwd, self._row_inv
        kern.rows(self._a, self._b, self.n1, self.n2, rf.w, rf.r2, rf.i4, ri.w, ri.r2, ri.i4)
        kern.columns_inverse(self._a, self._buf, self._blocks, raw, self.n1, self.n2,
                             iv.radix, iv.pow2.w, iv.pow2.r2, iv.pow2.i4, iv.r3, iv.w3, iv.v,
                             iv.u, LANES)
        return self._blocks
