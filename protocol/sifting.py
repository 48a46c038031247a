"""Basis reconciliation (sifting) and per-basis, per-intensity counting.

Input is one row per detection after timing synchronisation: the pulse it belongs to,
the detector that clicked, and Alice's symbol for that pulse (looked up from her record
at the detected indices only).  Several clicks in one pulse are squashed as usual:
clicks in one basis only give that basis and a random bit when the bits disagree; clicks
in both bases give a random basis and bit (Lütkenhaus' squashing for BB84 detectors).

Conventions: basis 0 = Z, 1 = X; intensity 0 = signal, 1 = decoy, 2 = vacuum.
A few compiled passes over the detections (numba), no Python loop per detection: each
row's outcome as if it were alone in its pulse (branch-free, SIMD), then one
sequential pass that keeps the matching rows and squashes the rare multi-click pulses.
When Alice's record is the counter-based pattern of :mod:`qkdlab.patterns`,
:func:`sift_pattern` computes each pulse's symbol in the first pass instead of taking
looked-up arrays.  The squashing coins are a pure function of the generator handed in
(:func:`coin_words`); from numpy's PCG64 only the words a frame's multi-clicks need
are computed, by jumping ahead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt
from numba import njit

from qkdlab.patterns import GOLDEN_GAMMA

N_BASES = 2
N_INTENSITIES = 3

IntArray = npt.NDArray[np.int64]
IntLike = int | np.integer[Any]
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


def coin_words(rng: np.random.Generator, n: int) -> tuple[npt.NDArray[np.uint64], int]:
    """The squashing coins of ``n`` sorted rows, packed: (words, offset of the bit coins).

    Row ``i``'s basis coin is the top bit of byte ``i`` of the words' little-endian
    byte stream, its bit coin the top bit of byte ``offset + i`` (``offset = 4·⌈n/4⌉``).
    These are exactly ``rng.integers(0, 2, n, int8)`` then ``rng.integers(0, 2, n,
    uint8)``: numpy draws a 0/1 int8 as the top bit of the next byte of its 32-bit
    draws, and a 64-bit generator gives the low half of each word first.
    """
    offset = 4 * ((n + 3) // 4)
    size = (offset + n + 7) // 8
    bitgen = rng.bit_generator
    if _fresh_pcg64(bitgen):
        return bitgen.random_raw(size), offset
    stream = np.zeros(8 * size, np.uint8)
    stream[:n] = rng.integers(0, 2, size=n, dtype=np.int8).view(np.uint8) << 7
    stream[offset:offset + n] = rng.integers(0, 2, size=n, dtype=np.uint8) << 7
    return stream.view("<u8").astype(np.uint64), offset


def _fresh_pcg64(bitgen: np.random.BitGenerator) -> TypeGuard[np.random.PCG64]:
    """A PCG64 holding no buffered half-word: its raw words are its 32-bit draws."""
    return isinstance(bitgen, np.random.PCG64) and not bitgen.state["has_uint32"]


_MASK64 = (1 << 64) - 1
NO_WORDS = np.zeros(0, np.uint64)


def _coin_source(rng: np.random.Generator, n: int
                 ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], int]:
    """How the kernel reads the coins of ``n`` rows: (PCG64 state, words, offset).

    From a fresh PCG64 only the 128-bit state is handed over (uint64[4]: state hi/lo,
    increment hi/lo) and the kernel computes just the words its multi-clicks need by
    jumping ahead; the generator is then advanced past all the coins, as drawing them
    would.  Any other generator draws every coin (:func:`coin_words`).
    """
    offset = 4 * ((n + 3) // 4)
    bitgen = rng.bit_generator
    if isinstance(bitgen, np.random.PCG64):
        full = bitgen.state  # one read: building the dict costs µs
        if not full["has_uint32"]:
            value, inc = int(full["state"]["state"]), int(full["state"]["inc"])
            pcg = np.array([value >> 64, value & _MASK64, inc >> 64, inc & _MASK64],
                           dtype=np.uint64)
            bitgen.advance((offset + n + 7) // 8)
            return pcg, NO_WORDS, offset
    words, offset = coin_words(rng, n)
    return NO_WORDS, words, offset


class SiftedStore:
    """Where the sifted records of successive frames are written, once.

    Frames' records outlive the frame, so their memory is fresh: carved out of large
    blocks (numpy asks the OS for transparent huge pages for blocks of 4 MiB and more,
    one page fault per 2 MiB instead of per 4 KiB).  Each frame's arrays are views.
    """

    def __init__(self, block_rows: int = 1 << 22) -> None:
        self.block_rows = block_rows
        self._blocks: tuple[npt.NDArray[Any], ...] = ()
        self._used = 0
        self._scratch: tuple[npt.NDArray[Any], ...] = (
            np.empty(0, np.uint8), np.empty(0, np.uint32), np.empty(1, np.uint8),
            np.empty(0, np.uint32))

    def claim(self, n: int) -> tuple[npt.NDArray[Any], ...]:
        """Room for up to ``n`` records: (pulse, basis, intensity, alice, bob) arrays."""
        if not self._blocks or self._used + n > self._blocks[0].size:
            rows = max(self.block_rows, n)
            self._blocks = (np.empty(rows, np.int64), np.empty(rows, np.int8),
                            np.empty(rows, np.int8), np.empty(rows, np.uint8),
                            np.empty(rows, np.uint8))
            self._used = 0
        start = self._used
        return tuple(b[start:start + n] for b in self._blocks)

    def commit(self, k: int) -> None:
        """The last claim's first ``k`` records are kept."""
        self._used += k

    def scratch(self, n: int) -> tuple[npt.NDArray[Any], ...]:
        """Working arrays for ``n`` rows, reused frame after frame: code (uint8),
        packed record (uint32), shared-pulse flags (uint8, n + 1), kept (uint32)."""
        if self._scratch[0].size < n:
            rows = max(n, self._scratch[0].size + self._scratch[0].size // 4)
            self._scratch = (np.empty(rows, np.uint8), np.empty(rows, np.uint32),
                             np.empty(rows + 1, np.uint8), np.empty(rows, np.uint32))
        code, packed, same, kept = self._scratch
        return code[:n], packed[:n], same[:n + 1], kept[:n]


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
        detector_basis, detector_bit: Bob's basis and bit value for each detector index
            (at most 8 detectors).
        rng: draws the random bits and bases of squashed multi-clicks: one coin of each
            per row in pulse order, as ``rng.integers(0, 2, n, int8)`` then
            ``rng.integers(0, 2, n, uint8)`` would (:func:`coin_words`).
    """
    det_basis = np.asarray(detector_basis, dtype=np.int8)
    det_bit = np.asarray(detector_bit, dtype=np.int8)
    _check_detectors(det_basis, det_bit)
    pulse_index = np.asarray(pulse_index, dtype=np.int64)
    if pulse_index.size < 2 or bool(np.all(pulse_index[1:] >= pulse_index[:-1])):
        order = None  # tags in time order: usually already sorted by pulse
    else:
        order = np.argsort(pulse_index, kind="stable")

    def take(a: npt.ArrayLike, dtype: type) -> npt.NDArray[Any]:
        arr: npt.NDArray[Any] = np.asarray(a, dtype=dtype)
        return arr if order is None else arr[order]

    for name, values, top in (("alice_basis", alice_basis, 1), ("alice_bit", alice_bit, 1),
                              ("alice_intensity", alice_intensity, N_INTENSITIES - 1)):
        arr = np.asarray(values)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > top):
            raise ValueError(f"{name} must lie in [0, {top}], got values in "
                             f"[{int(arr.min())}, {int(arr.max())}]")
    pulses = take(pulse_index, np.int64)
    # detector numbers as numpy indexes them (negative from the end; out of range raises)
    det = np.arange(det_basis.size, dtype=np.int8)[take(detector, np.int64)]
    out = SiftedStore(max(pulses.size, 1)).claim(pulses.size)
    return _run_kernel(pulses, det, det_basis, det_bit, take(alice_basis, np.int8),
                       take(alice_bit, np.int8), take(alice_intensity, np.int8), NO_PATTERN,
                       rng, out)


NO_PATTERN = np.zeros(0, np.uint64)
_NO_SYMBOLS = np.zeros(0, np.int8)


def sift_pattern(
    pulse_index: IntArray,
    detector: npt.NDArray[np.int8],
    pattern: npt.NDArray[np.uint64],
    detector_basis: npt.NDArray[np.int8],
    detector_bit: npt.NDArray[np.int8],
    rng: np.random.Generator,
    store: SiftedStore | None = None,
) -> SiftResult:
    """:func:`sift` with Alice's record computed in the pass from her pattern.

    Args:
        pulse_index: pulse of each detection, sorted (ties in detection order).
        detector: detector index of each detection (0 … len(detector_basis) − 1).
        pattern: :func:`qkdlab.patterns.symbol_constants` of Alice's pattern.
        detector_basis, detector_bit: Bob's basis and bit value per detector (int8).
        rng: as for :func:`sift`.
        store: where the sifted records go (default: fresh arrays).
    Gives what :func:`sift` gives with ``bb84_symbols`` looked up at ``pulse_index``.
    """
    if pattern.dtype != np.uint64 or pattern.shape != (4,):
        raise ValueError(f"pattern must be uint64[4] (symbol_constants), got "
                         f"{pattern.dtype}{list(pattern.shape)}")
    if detector_basis.dtype != np.int8 or detector_bit.dtype != np.int8:
        raise TypeError("detector_basis and detector_bit must be int8")
    _check_detectors(detector_basis, detector_bit)
    if store is None:
        store = SiftedStore(max(pulse_index.size, 1))
    return _run_kernel(pulse_index, detector, detector_basis, detector_bit, _NO_SYMBOLS,
                       _NO_SYMBOLS, _NO_SYMBOLS, pattern, rng, store.claim(pulse_index.size),
                       store)


def _check_detectors(det_basis: SmallArray, det_bit: SmallArray) -> None:
    if not 1 <= det_basis.size <= _MAX_DETECTORS or det_bit.size != det_basis.size:
        raise ValueError(f"detector_basis and detector_bit: 1 to {_MAX_DETECTORS} "
                         f"detectors, one entry each, got {det_basis.size} and "
                         f"{det_bit.size}")


def _run_kernel(pulses: IntArray, det: npt.NDArray[np.int8], det_basis: SmallArray,
                det_bit: SmallArray, a_basis: SmallArray, a_bit: SmallArray,
                a_int: SmallArray, pattern: npt.NDArray[np.uint64], rng: np.random.Generator,
                out: tuple[npt.NDArray[Any], ...], store: SiftedStore | None = None
                ) -> SiftResult:
    """The compiled passes (each a simple loop, compiled on its own so that it
    vectorises): row codes, shared pulses, compaction with squashing, unpacking."""
    n = pulses.size
    if det.size and (int(det.min()) < 0 or int(det.max()) >= det_basis.size):
        raise ValueError(f"detector must lie in [0, {det_basis.size - 1}], got values in "
                         f"[{int(det.min())}, {int(det.max())}]")
    pad = (0,) * (_MAX_DETECTORS - det_basis.size)
    bases = tuple(int(b) for b in det_basis) + pad
    bits = tuple(int(v) for v in det_bit) + pad
    code, packed, same, kept = (store or SiftedStore(1)).scratch(n)
    _, ordered = _same_pulse(pulses, same)
    if not ordered:
        raise ValueError("pulse_index must be sorted (ascending) for sift_pattern")
    _row_codes(pulses, det, bases, bits, pattern, a_basis, a_bit, a_int, code, packed)
    pcg, words, offset = _coin_source(rng, n)
    k, codes, doubles, cross = _compact(pulses, det, bases, bits, pattern, a_basis, code,
                                        packed, same, pcg, words, offset, out[0], kept)
    uniq, s_basis, s_int, s_alice, s_bob = (o[:k] for o in out)
    _unpack(kept[:k], s_basis, s_int, s_alice, s_bob)
    if store is not None:
        store.commit(k)
    detected, sifted, errors = _counts(codes)
    return SiftResult(
        pulse_index=uniq, basis=s_basis, intensity=s_int, alice_bit=s_alice,
        bob_bit=s_bob, detected=detected, sifted=sifted, errors=errors,
        double_clicks=int(doubles), cross_basis_clicks=int(cross),
    )


_GAMMA = np.uint64(GOLDEN_GAMMA)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
_U1 = np.uint64(1)
_U27 = np.uint64(27)
_U30 = np.uint64(30)
_U31 = np.uint64(31)
_U32 = np.uint64(32)
_U58 = np.uint64(58)
_U63 = np.uint64(63)
_B8 = np.uint32(8)
_B16 = np.uint32(16)
_B24 = np.uint32(24)
_BYTE = np.uint32(0xFF)
_PCG_MULT_HI = np.uint64(0x2360ED051FC65DA4)
_PCG_MULT_LO = np.uint64(0x4385DF649FCCF645)


@njit(cache=True)
def pattern_word(key: np.uint64, pulse: np.int64) -> np.uint64:
    """The pattern's 64-bit word of one pulse: splitmix64(key + (pulse + 1)·γ)
    (:func:`qkdlab.patterns.hash_words`, scalar and compiled)."""
    z = key + (np.uint64(pulse) + _U1) * _GAMMA
    z = (z ^ (z >> _U30)) * _MIX1
    z = (z ^ (z >> _U27)) * _MIX2
    return z ^ (z >> _U31)


@njit(cache=True)
def _mul_64(a: np.uint64, b: np.uint64) -> tuple[np.uint64, np.uint64]:
    """Full 128-bit product of two 64-bit words: (high, low)."""
    a0 = a & _LOW32
    a1 = a >> _U32
    b0 = b & _LOW32
    b1 = b >> _U32
    p00 = a0 * b0
    p01 = a0 * b1
    p10 = a1 * b0
    mid = (p00 >> _U32) + (p01 & _LOW32) + (p10 & _LOW32)
    high = a1 * b1 + (p01 >> _U32) + (p10 >> _U32) + (mid >> _U32)
    return high, (mid << _U32) | (p00 & _LOW32)


@njit(cache=True)
def _muladd_128(a_hi: np.uint64, a_lo: np.uint64, x_hi: np.uint64, x_lo: np.uint64,
                c_hi: np.uint64, c_lo: np.uint64) -> tuple[np.uint64, np.uint64]:
    """a·x + c mod 2¹²⁸ on (high, low) word pairs."""
    hi, lo = _mul_64(a_lo, x_lo)
    hi += a_hi * x_lo + a_lo * x_hi
    low = lo + c_lo
    return hi + c_hi + np.uint64(low < lo), low


@njit(cache=True)
def _pcg64_jumps(inc_hi: np.uint64, inc_lo: np.uint64
                 ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """numpy's PCG64 steps its 128-bit state s -> s·M + inc; 2^b steps at once are
    s -> m_b·s + c_b.  Returns (m_b, c_b) for b = 0…63 as (high, low) word pairs."""
    jump_m = np.empty((64, 2), np.uint64)
    jump_c = np.empty((64, 2), np.uint64)
    m_hi, m_lo, c_hi, c_lo = _PCG_MULT_HI, _PCG_MULT_LO, inc_hi, inc_lo
    zero = np.uint64(0)
    for b in range(64):
        jump_m[b, 0], jump_m[b, 1] = m_hi, m_lo
        jump_c[b, 0], jump_c[b, 1] = c_hi, c_lo
        # c_{b+1} = (m_b + 1)·c_b, m_{b+1} = m_b²
        p_hi = m_hi + np.uint64(m_lo == np.uint64(0xFFFFFFFFFFFFFFFF))
        c_hi, c_lo = _muladd_128(p_hi, m_lo + _U1, c_hi, c_lo, zero, zero)
        m_hi, m_lo = _muladd_128(m_hi, m_lo, m_hi, m_lo, zero, zero)
    return jump_m, jump_c


@njit(cache=True)
def _pcg64_advance(s_hi: np.uint64, s_lo: np.uint64, delta: int,
                   jump_m: npt.NDArray[np.uint64], jump_c: npt.NDArray[np.uint64]
                   ) -> tuple[np.uint64, np.uint64]:
    """The PCG64 state ``delta`` >= 0 steps on (the jumps of delta's set bits)."""
    b = 0
    while delta > 0:
        if delta & 1:
            s_hi, s_lo = _muladd_128(jump_m[b, 0], jump_m[b, 1], s_hi, s_lo,
                                     jump_c[b, 0], jump_c[b, 1])
        delta >>= 1
        b += 1
    return s_hi, s_lo


@njit(cache=True)
def _pcg64_output(s_hi: np.uint64, s_lo: np.uint64) -> np.uint64:
    """PCG64's output for a state: XSL-RR (high ^ low, rotated right by high >> 58)."""
    x = s_hi ^ s_lo
    rot = s_hi >> _U58
    return (x >> rot) | (x << ((np.uint64(64) - rot) & _U63))


@njit(cache=True)
def _pcg64_words(pcg: npt.NDArray[np.uint64], index: IntArray) -> npt.NDArray[np.uint64]:
    """Raw words ``index`` (ascending, 0 = the next) of numpy's PCG64 in state ``pcg``
    (state hi, lo, increment hi, lo): word w is the output after w + 1 steps."""
    jump_m, jump_c = _pcg64_jumps(pcg[2], pcg[3])
    s_hi, s_lo = pcg[0], pcg[1]
    out = np.empty(index.size, np.uint64)
    steps = 0
    for j in range(index.size):
        s_hi, s_lo = _pcg64_advance(s_hi, s_lo, index[j] + 1 - steps, jump_m, jump_c)
        steps = index[j] + 1
        out[j] = _pcg64_output(s_hi, s_lo)
    return out


@njit(cache=True)
def _coin_at(byte: int, cursor: npt.NDArray[np.uint64], jump_m: npt.NDArray[np.uint64],
             jump_c: npt.NDArray[np.uint64], words: npt.NDArray[np.uint64]) -> np.int8:
    """Top bit of byte ``byte`` of the coin stream: from ``words`` if given, else from
    the PCG64 ``cursor`` (state hi, lo, steps taken, its word), which only moves on
    (call with non-decreasing bytes)."""
    if words.size > 0:
        return _coin(words, byte)
    steps = (byte >> 3) + 1
    taken = int(cursor[2])
    if taken != steps:
        cursor[0], cursor[1] = _pcg64_advance(cursor[0], cursor[1], steps - taken, jump_m,
                                              jump_c)
        cursor[2] = np.uint64(steps)
        cursor[3] = _pcg64_output(cursor[0], cursor[1])
    return np.int8((cursor[3] >> np.uint64(8 * (byte & 7) + 7)) & _U1)


@njit(cache=True)
def _coin(words: npt.NDArray[np.uint64], byte: int) -> np.int8:
    """Top bit of byte ``byte`` of the words' little-endian byte stream."""
    return np.int8((words[byte >> 3] >> np.uint64(8 * (byte & 7) + 7)) & _U1)


_MAX_DETECTORS = 8
_CODES = 1 + N_INTENSITIES * (1 + N_BASES * 2)  # see _row_codes


@njit(cache=True)
def _row_codes(pulses: IntArray, det: npt.NDArray[np.int8], det_basis: tuple[int, ...],
               det_bit: tuple[int, ...], pattern: npt.NDArray[np.uint64],
               a_basis: SmallArray, a_bit: SmallArray, a_int: SmallArray,
               code: npt.NDArray[np.uint8], packed: npt.NDArray[np.uint32]) -> None:
    """Each row as if alone in its pulse (SIMD): its count code, 1 + intensity plus
    3·(1 + basis + 2·error) when Bob's basis is Alice's, and its record packed in 4
    bytes (Bob's basis, intensity, Alice's bit, Bob's bit).  Alice's symbols from the
    pattern when ``pattern`` holds its constants, else from ``a_*``."""
    b0, b1, b2, b3, b4, b5, b6, b7 = det_basis
    v0, v1, v2, v3, v4, v5, v6, v7 = det_bit
    hashed = pattern.size == 4
    key = pattern[0] if hashed else _U1
    t_z = pattern[1] if hashed else _U1
    t_s = pattern[2] if hashed else _U1
    t_sd = pattern[3] if hashed else _U1
    if hashed:
        for i in range(pulses.size):
            h = pattern_word(key, pulses[i])
            hi = h >> _U32
            d = det[i]
            b_b = (b0 if d == 0 else b1 if d == 1 else b2 if d == 2 else b3 if d == 3 else
                   b4 if d == 4 else b5 if d == 5 else b6 if d == 6 else b7)
            b_v = (v0 if d == 0 else v1 if d == 1 else v2 if d == 2 else v3 if d == 3 else
                   v4 if d == 4 else v5 if d == 5 else v6 if d == 6 else v7)
            code[i], packed[i] = _code_of(np.int64(((h & _LOW32) >> _U1) >= t_z),
                                          np.int64(h & _U1),
                                          np.int64(hi >= t_s) + np.int64(hi >= t_sd),
                                          b_b, b_v)
    else:
        for i in range(pulses.size):
            d = det[i]
            b_b = (b0 if d == 0 else b1 if d == 1 else b2 if d == 2 else b3 if d == 3 else
                   b4 if d == 4 else b5 if d == 5 else b6 if d == 6 else b7)
            b_v = (v0 if d == 0 else v1 if d == 1 else v2 if d == 2 else v3 if d == 3 else
                   v4 if d == 4 else v5 if d == 5 else v6 if d == 6 else v7)
            code[i], packed[i] = _code_of(np.int64(a_basis[i]), np.int64(a_bit[i]),
                                          np.int64(a_int[i]), b_b, b_v)


@njit(cache=True)
def _code_of(a_b: IntLike, a_v: IntLike, klass: IntLike, b_b: IntLike, b_v: IntLike
             ) -> tuple[np.uint8, np.uint32]:
    """Count code and packed record of a pulse (see :func:`_row_codes`)."""
    match = np.int64(b_b == a_b)
    code = np.uint8(1 + klass + 3 * match * (1 + b_b + 2 * np.int64(a_v != b_v)))
    return code, np.uint32(b_b | (klass << 8) | (a_v << 16) | (b_v << 24))


@njit(cache=True)
def _same_pulse(pulses: IntArray, same: npt.NDArray[np.uint8]) -> tuple[int, bool]:
    """same[i] = row i shares row i − 1's pulse (same[0] = same[n] = 0), SIMD.
    Returns (how many rows share their pulse with the row before, whether the pulses
    never decrease)."""
    n = pulses.size
    same[0] = 0
    same[n] = 0
    shared = 0
    descents = 0
    for i in range(1, n):
        same[i] = pulses[i] == pulses[i - 1]
        shared += same[i]
        descents += pulses[i] < pulses[i - 1]
    return shared, descents == 0


@njit(cache=True)
def _compact(pulses: IntArray, det: npt.NDArray[np.int8], det_basis: tuple[int, ...],
             det_bit: tuple[int, ...], pattern: npt.NDArray[np.uint64], a_basis: SmallArray,
             code: npt.NDArray[np.uint8], packed: npt.NDArray[np.uint32],
             same: npt.NDArray[np.uint8], pcg: npt.NDArray[np.uint64],
             words: npt.NDArray[np.uint64], coin_offset: int, uniq: IntArray,
             kept: npt.NDArray[np.uint32]) -> tuple[Any, ...]:
    """The sifted records (pulse to ``uniq``, packed record to ``kept``) and the count
    of each code, rows in pulse order: a row alone in its pulse is kept when its bases
    match; the clicks of a multi-click pulse are squashed at its first row, with that
    row's coins (:func:`coin_words`, from ``words`` or the PCG64 state ``pcg``, only
    the words needed).  Returns (records, counts per code, multi-click pulses,
    cross-basis pulses)."""
    n = pulses.size
    jump_m, jump_c = _pcg64_jumps(pcg[2], pcg[3]) if pcg.size == 4 else (
        np.zeros((64, 2), np.uint64), np.zeros((64, 2), np.uint64))
    basis_cursor = np.zeros(4, np.uint64)  # the basis coins: bytes 0 …
    bit_cursor = np.zeros(4, np.uint64)  # the bit coins: bytes coin_offset …
    if pcg.size == 4:
        basis_cursor[0], basis_cursor[1] = pcg[0], pcg[1]
        bit_cursor[0], bit_cursor[1] = pcg[0], pcg[1]
    hashed = pattern.size == 4
    tally = np.zeros((4, _CODES), np.int64)  # 4 interleaved tallies: no store chains
    n_multi = 0
    cross_count = 0
    k = 0
    for i in range(n):
        if same[i] | same[i + 1]:  # a row of a multi-click pulse
            if same[i]:
                continue  # squashed at the pulse's first row
            p = pulses[i]
            bmin = bmax = np.int8(det_basis[det[i]])
            vmin = vmax = np.int8(det_bit[det[i]])
            r = i + 1
            while r < n and pulses[r] == p:
                bmin = min(bmin, np.int8(det_basis[det[r]]))
                bmax = max(bmax, np.int8(det_basis[det[r]]))
                vmin = min(vmin, np.int8(det_bit[det[r]]))
                vmax = max(vmax, np.int8(det_bit[det[r]]))
                r += 1
            n_multi += 1
            cross = bmin != bmax
            cross_count += cross
            basis = _coin_at(i, basis_cursor, jump_m, jump_c, words) if cross else bmin
            bit = (_coin_at(coin_offset + i, bit_cursor, jump_m, jump_c, words)
                   if (cross or vmin != vmax) else vmin)
            if hashed:
                a_b = np.int8(((pattern_word(pattern[0], p) & _LOW32) >> _U1) >= pattern[1])
            else:
                a_b = a_basis[i]
            w = packed[i]  # Alice's bit and the intensity are the pulse's
            klass = np.int64((w >> _B8) & _BYTE)
            a_v = np.int64((w >> _B16) & _BYTE)
            c, record = _code_of(np.int64(a_b), a_v, klass, np.int64(basis), np.int64(bit))
            tally[0, c] += 1
            if c > N_INTENSITIES:
                uniq[k] = p
                kept[k] = record
                k += 1
            continue
        uniq[k] = pulses[i]  # written always, kept when the bases match
        kept[k] = packed[i]
        c = code[i]
        tally[i & 3, c] += 1
        k += c > N_INTENSITIES
    return k, tally[0] + tally[1] + tally[2] + tally[3], n_multi, cross_count


@njit(cache=True)
def _unpack(kept: npt.NDArray[np.uint32], s_basis: SmallArray, s_int: SmallArray,
            s_alice: npt.NDArray[np.uint8], s_bob: npt.NDArray[np.uint8]) -> None:
    """Packed records to the four record arrays (SIMD)."""
    for q in range(kept.size):
        w = kept[q]
        s_basis[q] = np.int8(w & _BYTE)
        s_int[q] = np.int8((w >> _B8) & _BYTE)
        s_alice[q] = np.uint8((w >> _B16) & _BYTE)
        s_bob[q] = np.uint8(w >> _B24)


def _counts(codes: IntArray) -> tuple[IntArray, IntArray, IntArray]:
    """Detected per intensity, sifted and errors per basis and intensity, from the
    count of each code (code 1 + klass: detected, not sifted; 1 + klass + 3·(1 +
    basis + 2·error): sifted)."""
    detected = np.zeros(N_INTENSITIES, np.int64)
    sifted = np.zeros((N_BASES, N_INTENSITIES), np.int64)
    errors = np.zeros((N_BASES, N_INTENSITIES), np.int64)
    for klass in range(N_INTENSITIES):
        detected[klass] += codes[1 + klass]
        for basis in range(N_BASES):
            for err in range(2):
                count = codes[1 + klass + 3 * (1 + basis + 2 * err)]
                detected[klass] += count
                sifted[basis, klass] += count
                errors[basis, klass] += count * err
    return detected, sifted, errors
