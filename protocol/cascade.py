"""Cascade information reconciliation, as optimised by Martinez-Mateo et al.

J. Martinez-Mateo, C. Pacher, M. Peev, A. Ciurana, V. Martin, "Demystifying the
information reconciliation protocol Cascade", Quantum Inf. Comput. 15, 453 (2015),
arXiv:1407.3257.  Default parameters are their "Cascade opt. (8)":

* block sizes k1 = 2^⌈α⌉, k2 = 2^⌈(α+12)/2⌉, k3 = 4096 with α = log2(1/p) − 1/2
  (p the QBER estimate), then passes that split the key into two random halves,
  14 passes in all;
* sub-block reuse: every parity Alice disclosed is remembered (the sibling's parity
  follows from the parent's), and after each correction the *maximal odd known
  sub-blocks* of every pass, not only odd top-level blocks, are searched, descending for
  free through known parities;
* block-parity inference: once pass 1 has fixed the parity of the whole frame, the last
  block of each later pass is not asked for.

Roles: Bob drives, Alice answers parity queries.  Each round Bob sends the left-half
ranges of all binary searches in progress, in every pass and every frame, as one message
and Alice answers with their parities, so the message count grows with the longest
correction chain, not with the number of errors.  Several frames may be reconciled
together (as in Pedersen & Toyran, QIC 15, 2015): each keeps its own blocks, so each
frame's disclosure is exactly that of Cascade run alone, while the rounds are shared.

Alice counts every parity she discloses; that count is λ_EC for the finite-key length.
Efficiency f = disclosed / (n·h(p)) (Shannon limit f = 1).  Frames whose keys still
differ are caught by :mod:`qkdlab.protocol.verification`.

Layout of a pass: frames stay apart; inside a frame the positions are permuted (not in
pass 1 by default: with independent errors a permutation adds nothing) and cut into
blocks of k; for k ≥ n/2 the frame is instead split into two random halves (a random
mask: cheap, and materialised only if a half turns out odd).  Both sides derive every
layout from a seed Alice sends; keys never leave either side.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numba
import numpy as np
import numpy.typing as npt

from qkdlab.protocol.bits import Bits, as_bits, binary_entropy, prefix_parity
from qkdlab.protocol.channel import (
    ChannelTimeoutError,
    ClassicalChannel,
    InProcessChannel,
    Message,
    ProtocolError,
)

IntArray = npt.NDArray[np.int64]
I32Array = npt.NDArray[np.int32]

MAX_PASSES = 64
MIN_QBER = 1e-5


# --- numba kernels ----------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _shuffled_frames(frames: IntArray, seeds: npt.NDArray[np.uint64]) -> I32Array:
    """Per-frame Fisher–Yates permutations (splitmix64 stream seeded per frame), offset by
    each frame's start; identical on both sides for the same seeds.  The swap index is
    Lemire's multiply-shift reduction of the top 32 bits (frames < 2^32 bits)."""
    out = np.empty(frames[-1], dtype=np.int32)
    for f in range(frames.size - 1):
        f0, f1 = frames[f], frames[f + 1]
        for i in range(f0, f1):
            out[i] = i
        state = seeds[f]
        for i in range(f1 - f0 - 1, 0, -1):
            state += np.uint64(0x9E3779B97F4A7C15)
            z = state
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            j = np.int64(((z >> np.uint64(32)) * np.uint64(i + 1)) >> np.uint64(32))
            out[f0 + i], out[f0 + j] = out[f0 + j], out[f0 + i]
    return out


@numba.njit(cache=True, nogil=True)
def _halves_parities(key: Bits, mask: Bits, frames: IntArray) -> Bits:
    """Per frame f: parity of the mask-0 half (out[2f]) and of the mask-1 half (out[2f+1]).

    Bytes hold 0/1, so XOR-ing 8-byte words keeps one parity per byte lane; the lanes are
    folded at the end.
    """
    out = np.zeros(2 * (frames.size - 1), dtype=np.uint8)
    kw = key[: key.size - key.size % 8].view(np.uint64)
    mw = mask[: mask.size - mask.size % 8].view(np.uint64)
    for f in range(frames.size - 1):
        f0, f1 = frames[f], frames[f + 1]
        total = np.uint64(0)
        second = np.uint64(0)
        i = f0
        while i < f1 and i % 8 != 0:
            total ^= np.uint64(key[i])
            second ^= np.uint64(key[i] & mask[i])
            i += 1
        while i + 8 <= f1:
            w = kw[i // 8]
            total ^= w
            second ^= w & mw[i // 8]
            i += 8
        while i < f1:
            total ^= np.uint64(key[i])
            second ^= np.uint64(key[i] & mask[i])
            i += 1
        for sh in (32, 16, 8):
            total ^= total >> np.uint64(sh)
            second ^= second >> np.uint64(sh)
        t, s2 = np.uint8(total & np.uint64(1)), np.uint8(second & np.uint64(1))
        out[2 * f] = t ^ s2
        out[2 * f + 1] = s2
    return out


@numba.njit(cache=True, nogil=True)
def _halves_order(frames: IntArray, mask: Bits) -> I32Array:
    """Per frame: the positions with mask 0 (in order), then those with mask 1."""
    out = np.empty(mask.size, dtype=np.int32)
    for f in range(frames.size - 1):
        f0, f1 = frames[f], frames[f + 1]
        ones = 0
        for i in range(f0, f1):
            ones += mask[i]
        z, o = f0, f1 - ones
        for i in range(f0, f1):
            if mask[i]:
                out[o] = i
                o += 1
            else:
                out[z] = i
                z += 1
    return out


@numba.njit(cache=True, nogil=True)
def _inverse(order: I32Array) -> I32Array:
    inv = np.empty(order.size, dtype=np.int32)
    for i in range(order.size):
        inv[order[i]] = i
    return inv


@numba.njit(cache=True, nogil=True)
def _gather_prefix(key: Bits, order: I32Array) -> Bits:
    """Prefix parities of ``key[order]`` (length n + 1), without the gathered copy."""
    out = np.empty(order.size + 1, dtype=np.uint8)
    out[0] = 0
    c = np.uint8(0)
    for i in range(order.size):
        c ^= key[order[i]]
        out[i + 1] = c
    return out


@numba.njit(cache=True, nogil=True)
def _prefix_to_fenwick(cum: Bits) -> Bits:
    """Prefix parities to a GF(2) Fenwick tree, in place: fen[i] = cum[i] ^ cum[i - lsb(i)]."""
    for i in range(cum.size - 1, 0, -1):
        cum[i] ^= cum[i - (i & -i)]
    return cum


@numba.njit(cache=True, inline="always")
def _fen_prefix(fen: Bits, i: int) -> int:
    r = 0
    while i > 0:
        r ^= fen[i]
        i -= i & -i
    return r


@numba.njit(cache=True)
def _descend(
    known: Bits, heap: int, fen: Bits,
    tb: IntArray, th: IntArray, tlo: IntArray, thi: IntArray, count: int, found: IntArray,
) -> tuple[int, int]:
    """Walk each search token down through known parities.

    A token (block, heap index, [lo, hi)) has odd error parity.  It stops where the left
    child's parity is unknown (a query is needed: token kept) or at a single bit (an
    error: its position goes to ``found``).  Tokens are compacted in place; returns
    (tokens kept, errors found).
    """
    kept = 0
    nfound = 0
    for t in range(count):
        b, h, lo, hi = tb[t], th[t], tlo[t], thi[t]
        base = b * heap
        while True:
            if hi - lo == 1:
                bob = _fen_prefix(fen, hi) ^ _fen_prefix(fen, lo)
                if ((known[base + h] - 1) ^ bob) != 1:
                    raise RuntimeError("Cascade invariant broken: leaf without error")
                found[nfound] = lo
                nfound += 1
                break
            mid = lo + (hi - lo) // 2
            kl = known[base + 2 * h]
            if kl == 0:
                tb[kept], th[kept], tlo[kept], thi[kept] = b, h, lo, hi
                kept += 1
                break
            bob = _fen_prefix(fen, mid) ^ _fen_prefix(fen, lo)
            if ((kl - 1) ^ bob) == 1:
                h, hi = 2 * h, mid
            else:
                h, lo = 2 * h + 1, mid
    return kept, nfound


@numba.njit(cache=True)
def _store(known: Bits, heap: int, tb: IntArray, th: IntArray, answers: Bits) -> None:
    """Record Alice's answer for each token's left child and infer the right child."""
    for t in range(answers.size):
        base = tb[t] * heap
        h = th[t]
        parent = known[base + h] - 1
        known[base + 2 * h] = answers[t] + 1
        known[base + 2 * h + 1] = (parent ^ answers[t]) + 1


@numba.njit(cache=True)
def _flip_pass(
    known: Bits, heap: int, fen: Bits, starts: IntArray, pos: IntArray, walk: Bits,
    tb: IntArray, th: IntArray, tlo: IntArray, thi: IntArray, count: int,
) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """Apply corrections at the (sorted) pass positions ``pos`` and update the tokens.

    Tokens whose range holds a flipped bit are dropped.  Then, for each flipped bit with
    ``walk`` set, the path of known sub-blocks containing it is walked from its block's
    root: every odd node on it whose parent on the path is even (or that is the root)
    becomes a token.  Only nodes holding a flipped bit change parity, so all odd known
    sub-blocks are covered (a kept token may now sit below a new one: both searches find
    real errors).  A bit located by this pass's own search needs no walk: the known
    nodes holding it are exactly that search's path, all odd before and even after.
    """
    for p in pos:
        i = p + 1
        n = fen.size - 1
        while i <= n:
            fen[i] ^= 1
            i += i & -i
    cap = count + 4 * pos.size + 16
    nb = np.empty(cap, np.int64)
    nh = np.empty(cap, np.int64)
    nlo = np.empty(cap, np.int64)
    nhi = np.empty(cap, np.int64)
    m = 0
    for t in range(count):
        if np.searchsorted(pos, tlo[t]) < np.searchsorted(pos, thi[t]):
            continue
        nb[m], nh[m], nlo[m], nhi[m] = tb[t], th[t], tlo[t], thi[t]
        m += 1
    block_first = m
    prev_b = -1
    for w in range(pos.size):
        if not walk[w]:
            continue
        p = pos[w]
        b = np.searchsorted(starts, p, side="right") - 1
        if b != prev_b:
            block_first = m
            prev_b = b
        base = b * heap
        h, lo, hi = 1, starts[b], starts[b + 1]
        plo, phi = _fen_prefix(fen, lo), _fen_prefix(fen, hi)
        parent_odd = False
        while True:
            odd = ((known[base + h] - 1) ^ phi ^ plo) == 1
            if odd and not parent_odd:
                dup = False
                for u in range(block_first, m):
                    if nb[u] == b and nh[u] == h:
                        dup = True
                        break
                if not dup:
                    if m == nb.size:
                        nb = np.concatenate((nb, np.empty(nb.size, np.int64)))
                        nh = np.concatenate((nh, np.empty(nh.size, np.int64)))
                        nlo = np.concatenate((nlo, np.empty(nlo.size, np.int64)))
                        nhi = np.concatenate((nhi, np.empty(nhi.size, np.int64)))
                    nb[m], nh[m], nlo[m], nhi[m] = b, h, lo, hi
                    m += 1
            parent_odd = odd
            if hi - lo <= 1 or known[base + 2 * h] == 0:
                break
            mid = lo + (hi - lo) // 2
            pmid = _fen_prefix(fen, mid)
            if p < mid:
                h, hi, phi = 2 * h, mid, pmid
            else:
                h, lo, plo = 2 * h + 1, mid, pmid
    return nb[:m], nh[:m], nlo[:m], nhi[:m]


# --- parameters and results --------------------------------------------------------------


@dataclass(frozen=True)
class CascadeParameters:
    """Block size of each pass; ``k >= ceil(n/2)`` means a random split into halves."""

    block_sizes: tuple[int, ...]
    shuffle_first_pass: bool = False

    def __post_init__(self) -> None:
        if not 1 <= len(self.block_sizes) <= MAX_PASSES:
            raise ValueError(f"need 1..{MAX_PASSES} passes, got {len(self.block_sizes)}")
        if any(k < 1 for k in self.block_sizes):
            raise ValueError("block sizes must be >= 1")

    @classmethod
    def for_qber(cls, qber: float, n: int, *, passes: int = 14) -> CascadeParameters:
        """Cascade opt. (8) of Martinez-Mateo et al. (2015) for QBER estimate ``qber``.

        ``n`` is the frame length; block sizes are capped at n/2 (a halves pass).
        """
        p = min(max(qber, MIN_QBER), 0.5)
        alpha = math.log2(1.0 / p) - 0.5
        half = max(1, (n + 1) // 2)
        sizes = [2 ** math.ceil(alpha), 2 ** math.ceil((alpha + 12.0) / 2.0), 4096]
        sizes += [half] * max(0, passes - 3)
        return cls(tuple(min(k, half) for k in sizes[:passes]))

    @classmethod
    def original(cls, qber: float, n: int, *, passes: int = 4) -> CascadeParameters:
        """Brassard & Salvail (EUROCRYPT '93): k1 = ⌈0.73/p⌉, doubled each pass."""
        k1 = math.ceil(0.73 / min(max(qber, MIN_QBER), 0.5))
        half = max(1, (n + 1) // 2)
        return cls(tuple(min(k1 << i, half) for i in range(passes)), shuffle_first_pass=True)


@dataclass(frozen=True)
class PassReport:
    """What one pass cost and achieved, summed over the frames."""

    block_size: int
    blocks: int
    top_parities: int
    search_parities: int
    corrections: int


@dataclass(frozen=True, repr=False)
class CascadeResult:
    """Bob's outcome for one frame.  ``key`` is secret and never shown by ``repr``.

    ``disclosed_bits`` is the frame's leak (top-level plus binary-search parities).
    """

    key: Bits
    n: int
    qber_estimate: float
    disclosed_bits: int
    corrected_bits: int
    rounds: int
    passes: tuple[PassReport, ...] = field(default_factory=tuple)

    def __repr__(self) -> str:
        return (
            f"CascadeResult(n={self.n}, disclosed_bits={self.disclosed_bits}, "
            f"corrected_bits={self.corrected_bits}, rounds={self.rounds}, "
            f"efficiency={self.efficiency:.4f})"
        )

    @property
    def efficiency(self) -> float:
        """f = disclosed / (n·h(QBER estimate)); ``inf`` if the estimate is 0."""
        return self.efficiency_at(self.qber_estimate)

    def efficiency_at(self, qber: float) -> float:
        """f = disclosed / (n·h(qber)) for a given QBER (e.g. the true one in a test)."""
        ideal = self.n * binary_entropy(qber)
        return self.disclosed_bits / ideal if ideal > 0 else math.inf


# --- layouts -----------------------------------------------------------------------------


class _Layout:
    """Positions of one pass over the concatenated frames (identical on both sides).

    ``order[pos]`` is the key index at pass position ``pos``; blocks are the position
    ranges ``[starts[b], starts[b+1])`` and never cross frames.
    """

    def __init__(self, frames: IntArray, k: int, seed: int, index: int, shuffle: bool) -> None:
        self.frames = frames  # frame boundaries, length F+1
        self.n = int(frames[-1])
        if self.n >= 2**31 - 1:
            raise ValueError("at most 2^31 - 2 bits per Cascade run")
        lengths = np.diff(frames)
        longest = int(lengths.max(initial=0))
        self.halves = bool(2 * k >= longest and longest > 1)
        self._order: I32Array | None = None
        self._inv: I32Array | None = None
        if self.halves:
            rng = np.random.default_rng([seed, index])
            self.mask = np.unpackbits(
                rng.integers(0, 256, (self.n + 7) // 8, np.uint8), count=self.n
            )
            ones = np.array(
                [np.count_nonzero(self.mask[a:b]) for a, b in itertools.pairwise(frames)],
                dtype=np.int64,
            )
            starts = np.empty(2 * lengths.size + 1, dtype=np.int64)
            starts[0:-1:2] = frames[:-1]
            starts[1:-1:2] = frames[1:] - ones
            starts[-1] = self.n
            self.starts = starts
            self.block_frame = np.repeat(np.arange(lengths.size, dtype=np.int64), 2)
            self.k = int(max((lengths - ones).max(initial=1), ones.max(initial=1)))
        else:
            self.k = k
            per = -(-lengths // k)
            self.starts = np.concatenate(
                [f0 + np.minimum(np.arange(m, dtype=np.int64) * k, ln)
                 for f0, m, ln in zip(frames[:-1], per, lengths, strict=True)]
                + [np.array([self.n], dtype=np.int64)]
            )
            self.block_frame = np.repeat(np.arange(lengths.size, dtype=np.int64), per)
            if shuffle:
                seeds = np.array(
                    [_subseed(seed, index, f) for f in range(lengths.size)], dtype=np.uint64
                )
                self._order = _shuffled_frames(frames, seeds)
        self.identity = not self.halves and self._order is None
        self.blocks = int(self.starts.size - 1)
        # the last non-empty block of each frame (its parity is implied after pass 1)
        last = np.zeros(self.blocks, dtype=bool)
        if self.blocks:
            ends = np.searchsorted(self.starts, frames[1:], side="left") - 1
            last[ends[lengths > 0]] = True
        self.last_of_frame = last & (np.diff(self.starts) > 0)
        self.heap = 2 << max(0, math.ceil(math.log2(max(self.k, 1))))

    @property
    def order(self) -> I32Array:
        """Key index of each pass position (built on first use for a halves pass)."""
        if self._order is None:
            if self.halves:
                self._order = _halves_order(self.frames, self.mask)
            else:
                self._order = np.arange(self.n, dtype=np.int32)
        return self._order

    def to_positions(self, idx: IntArray) -> IntArray:
        """Pass positions of key indices ``idx``."""
        if self.identity:
            return idx
        if self._inv is None:
            self._inv = _inverse(self.order)
        return self._inv[idx].astype(np.int64)

    def to_indices(self, pos: IntArray) -> IntArray:
        """Key indices at pass positions ``pos``."""
        return pos if self.identity else self.order[pos].astype(np.int64)

    def prefix(self, key: Bits) -> Bits:
        """Prefix parities of the key in this pass's order (length n + 1)."""
        return prefix_parity(key) if self.identity else _gather_prefix(key, self.order)

    def halves_parities(self, key: Bits) -> Bits:
        """Parities of every block of a halves pass without materialising the order."""
        return _halves_parities(key, self.mask, self.frames)


def _subseed(seed: int, index: int, frame: int) -> np.uint64:
    return np.random.SeedSequence([seed, index, frame]).generate_state(1, np.uint64)[0]


def _frame_bounds(lengths: Sequence[int]) -> IntArray:
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)


# --- Alice -------------------------------------------------------------------------------


class CascadeAlice:
    """Alice's side: answers Bob's parity queries on her (reference) keys.

    Use :meth:`serve` on a channel (blocking, until Bob's ``done``), or :meth:`step`
    (non-blocking, one message) to run both roles in one thread.  ``keys`` is one frame or
    a sequence of frames, in the order Bob uses.
    """

    def __init__(self, keys: Bits | Sequence[Bits], rng: np.random.Generator) -> None:
        frames = [keys] if isinstance(keys, np.ndarray) else list(keys)
        self._key = np.concatenate([as_bits(k) for k in frames] + [np.zeros(0, np.uint8)])
        self._frames = _frame_bounds([k.size for k in frames])
        self._rng = rng
        self._layouts: list[_Layout] = []
        self._cum: dict[int, Bits] = {}
        self._halves_par: dict[int, Bits] = {}
        self.disclosed_bits = 0
        self.done = False

    def __repr__(self) -> str:
        return f"CascadeAlice(n={self._key.size}, disclosed_bits={self.disclosed_bits})"

    def handle(self, msg: Message) -> Message | None:
        """Answer one message of Bob's."""
        if msg.kind == "cascade/start":
            return self._start(msg)
        if msg.kind == "cascade/ask":
            return self._answer(msg)
        if msg.kind == "cascade/done":
            self.done = True
            return Message("cascade/done", disclosed_bits=self.disclosed_bits)
        raise ProtocolError(f"Cascade (Alice) cannot handle a {msg.kind!r} message")

    def serve(self, channel: ClassicalChannel, timeout: float | None = None) -> int:
        """Answer until Bob is done; return the number of parity bits disclosed."""
        while not self.done:
            reply = self.handle(channel.recv(timeout))
            if reply is not None:
                channel.send(reply)
        return self.disclosed_bits

    def step(self, channel: ClassicalChannel) -> bool:
        """Handle one waiting message if there is one; True if one was handled."""
        try:
            msg = channel.recv(timeout=0)
        except ChannelTimeoutError:
            return False
        reply = self.handle(msg)
        if reply is not None:
            channel.send(reply)
        return True

    def _start(self, msg: Message) -> Message:
        lengths = msg.get_array("frames", np.int64)
        if not np.array_equal(_frame_bounds(lengths.tolist()), self._frames):
            raise ProtocolError(
                f"Bob's frames {lengths.tolist()[:8]}... differ from Alice's "
                f"{np.diff(self._frames).tolist()[:8]}..."
            )
        sizes = msg.get_array("block_sizes", np.int64)
        params = CascadeParameters(tuple(int(k) for k in sizes), bool(msg.get_int("shuffle")))
        seed = int(self._rng.integers(0, 2**40))
        self._layouts = [
            _Layout(self._frames, k, seed, i, params.shuffle_first_pass or i > 0)
            for i, k in enumerate(params.block_sizes)
        ]
        self._cum.clear()
        self._halves_par.clear()
        self.disclosed_bits = 0
        self.done = False
        return Message("cascade/seed", seed=seed)

    def _answer(self, msg: Message) -> Message:
        passes = msg.get_array("pass", np.uint8).astype(np.int64)
        lo = msg.get_array("lo").astype(np.int64)
        hi = msg.get_array("hi").astype(np.int64)
        n = self._key.size
        if not passes.size == lo.size == hi.size:
            raise ProtocolError("pass, lo and hi must have equal lengths")
        if passes.size and (
            passes.max() >= len(self._layouts) or lo.min() < 0 or hi.max() > n
            or np.any(lo >= hi)
        ):
            raise ProtocolError("parity query outside the key or the agreed passes")
        if self.disclosed_bits + passes.size > n + 64 * len(self._layouts):
            raise ProtocolError("Bob asked for more parities than Cascade can need")
        if passes.size and passes.min() == passes.max():
            out = self._parities(int(passes[0]), lo, hi)
        else:
            out = np.empty(passes.size, dtype=np.uint8)
            for q in np.unique(passes):
                sel = passes == q
                out[sel] = self._parities(int(q), lo[sel], hi[sel])
        self.disclosed_bits += int(passes.size)
        return Message("cascade/parities", parity=np.packbits(out), count=int(out.size))

    def _parities(self, q: int, lo: IntArray, hi: IntArray) -> Bits:
        lay = self._layouts[q]
        if lay.halves and q not in self._cum:
            b = np.searchsorted(lay.starts, lo, side="right") - 1
            if np.all((lay.starts[b] == lo) & (lay.starts[b + 1] == hi)):
                par = self._halves_par.get(q)
                if par is None:
                    par = self._halves_par[q] = lay.halves_parities(self._key)
                return par[b]
        cum = self._cum.get(q)
        if cum is None:
            cum = self._cum[q] = lay.prefix(self._key)
        return cum[lo] ^ cum[hi]


# --- Bob ---------------------------------------------------------------------------------


class _BobPass:
    """Bob's state in one pass: known parities of Alice, Fenwick tree, search tokens."""

    def __init__(self, layout: _Layout, alice_roots: Bits) -> None:
        self.lay = layout
        self.alice_roots = alice_roots
        self.known: Bits | None = None
        self.fen: Bits | None = None
        self.root_err: Bits | None = None  # lazy halves pass: error parity per block
        e = np.zeros(0, np.int64)
        self.tb, self.th, self.tlo, self.thi = e, e, e, e
        self.top = 0
        self.search = 0
        self.corrections = 0

    @property
    def tokens(self) -> int:
        return int(self.tb.size)

    def materialise(self, key: Bits) -> None:
        """Build the known-parity tree and Fenwick tree; odd blocks become tokens."""
        lay = self.lay
        self.known = np.zeros(lay.blocks * lay.heap, dtype=np.uint8)
        b = np.arange(lay.blocks, dtype=np.int64)
        self.known[b * lay.heap + 1] = self.alice_roots + 1
        cum = lay.prefix(key)
        odd = np.flatnonzero(self.alice_roots ^ cum[lay.starts[:-1]] ^ cum[lay.starts[1:]])
        self.fen = _prefix_to_fenwick(cum)
        self.tb, self.th = odd, np.ones(odd.size, np.int64)
        self.tlo, self.thi = lay.starts[odd], lay.starts[odd + 1]
        self.root_err = None


@dataclass
class _Batch:
    """The parity queries of one round: per pass, the asking tokens and their ranges."""

    q: list[int] = field(default_factory=list)
    tb: list[IntArray] = field(default_factory=list)
    th: list[IntArray] = field(default_factory=list)
    lo: list[IntArray] = field(default_factory=list)
    hi: list[IntArray] = field(default_factory=list)

    def add(self, q: int, tb: IntArray, th: IntArray, lo: IntArray, hi: IntArray) -> None:
        if lo.size:
            self.q.append(q)
            self.tb.append(tb)
            self.th.append(th)
            self.lo.append(lo)
            self.hi.append(hi)

    def __len__(self) -> int:
        return sum(x.size for x in self.lo)


class CascadeBob:
    """Bob's side: drives the passes and corrects his key(s) (see the module docstring).

    ``keys`` is one frame or a sequence of frames (reconciled together, sharing rounds).
    """

    def __init__(
        self,
        keys: Bits | Sequence[Bits],
        qber_estimate: float,
        params: CascadeParameters | None = None,
    ) -> None:
        frames = [keys] if isinstance(keys, np.ndarray) else list(keys)
        self._lengths = [int(k.size) for k in frames]
        self._frames = _frame_bounds(self._lengths)
        self._key0 = np.concatenate([as_bits(k) for k in frames] + [np.zeros(0, np.uint8)])
        self.n = int(self._key0.size)
        self.qber_estimate = float(qber_estimate)
        self.params = params or CascadeParameters.for_qber(
            qber_estimate, max(self._lengths, default=0)
        )
        self._key = self._key0.copy()
        self._passes: list[_BobPass] = []
        self._channel: ClassicalChannel | None = None
        self._timeout: float | None = None
        self.rounds = 0
        self.disclosed_bits = 0
        self._disclosed_frame = np.zeros(len(frames), dtype=np.int64)
        self._alice_total = np.zeros(len(frames), dtype=np.uint8)

    def __repr__(self) -> str:
        return f"CascadeBob(n={self.n}, rounds={self.rounds}, disclosed={self.disclosed_bits})"

    def run(self, channel: ClassicalChannel, timeout: float | None = None) -> list[CascadeResult]:
        """Reconcile over ``channel`` with a :class:`CascadeAlice`; one result per frame."""
        self._channel = channel
        self._timeout = timeout
        reply = channel.request(
            Message(
                "cascade/start",
                frames=np.asarray(self._lengths, dtype=np.int64),
                block_sizes=np.array(self.params.block_sizes, dtype=np.int64),
                shuffle=int(self.params.shuffle_first_pass),
            ),
            timeout,
        ).expect("cascade/seed")
        seed = reply.get_int("seed")
        for i, k in enumerate(self.params.block_sizes):
            lay = _Layout(self._frames, k, seed, i, self.params.shuffle_first_pass or i > 0)
            self._start_pass(lay, first=i == 0)
            while True:
                batch = self._advance()
                if not len(batch):
                    break
                self._ask_and_store(batch)
        done = channel.request(Message("cascade/done"), timeout).expect("cascade/done")
        alice_count = done.get_int("disclosed_bits")
        if alice_count != self.disclosed_bits:
            raise ProtocolError(
                f"Alice counts {alice_count} disclosed parities, Bob {self.disclosed_bits}"
            )
        reports = tuple(
            PassReport(p.lay.k, p.lay.blocks, p.top, p.search, p.corrections)
            for p in self._passes
        )
        return [
            CascadeResult(
                key=self._key[f0:f1].copy(),
                n=f1 - f0,
                qber_estimate=self.qber_estimate,
                disclosed_bits=int(self._disclosed_frame[f]),
                corrected_bits=int(np.count_nonzero(self._key[f0:f1] != self._key0[f0:f1])),
                rounds=self.rounds,
                passes=reports,
            )
            for f, (f0, f1) in enumerate(zip(self._frames[:-1], self._frames[1:], strict=True))
        ]

    # -- messaging -------------------------------------------------------------------
    def _query(self, q: IntArray, lo: IntArray, hi: IntArray) -> Bits:
        assert self._channel is not None
        dtype = np.uint32 if self.n < 2**32 else np.uint64
        reply = self._channel.request(
            Message(
                "cascade/ask", **{"pass": q.astype(np.uint8)},
                lo=lo.astype(dtype), hi=hi.astype(dtype),
            ),
            self._timeout,
        ).expect("cascade/parities")
        count = reply.get_int("count")
        if count != q.size:
            raise ProtocolError(f"asked {q.size} parities, got {count}")
        self.rounds += 1
        self.disclosed_bits += int(q.size)
        frame = np.searchsorted(self._frames, lo, side="right") - 1
        self._disclosed_frame += np.bincount(frame, minlength=self._disclosed_frame.size)
        return np.unpackbits(reply.get_array("parity", np.uint8), count=count)

    def _start_pass(self, lay: _Layout, first: bool) -> None:
        q = len(self._passes)
        # block-parity inference: after pass 1 the last block of each frame is implied
        ask = np.ones(lay.blocks, dtype=bool) if first else ~lay.last_of_frame
        ask &= np.diff(lay.starts) > 0
        b = np.flatnonzero(ask)
        answers = (
            self._query(np.full(b.size, q), lay.starts[b], lay.starts[b + 1])
            if b.size else np.zeros(0, np.uint8)
        )
        roots = np.zeros(lay.blocks, dtype=np.uint8)
        roots[b] = answers
        if first:
            self._alice_total = self._frame_xor(roots, lay)
        else:
            implied = self._alice_total ^ self._frame_xor(roots, lay)
            last = np.flatnonzero(lay.last_of_frame)
            roots[last] = implied[lay.block_frame[last]]
        bp = _BobPass(lay, roots)
        bp.top = int(b.size)
        self._passes.append(bp)
        if lay.halves:
            bp.root_err = roots ^ lay.halves_parities(self._key)
            if bp.root_err.any():
                bp.materialise(self._key)
        else:
            bp.materialise(self._key)

    def _frame_xor(self, per_block: Bits, lay: _Layout) -> Bits:
        """XOR of per-block values over the blocks of each frame."""
        out = np.zeros(len(self._lengths), dtype=np.uint8)
        np.bitwise_xor.at(out, lay.block_frame, per_block)
        return out

    def _ask_and_store(self, batch: _Batch) -> None:
        q = np.concatenate([np.full(x.size, qq) for qq, x in zip(batch.q, batch.lo, strict=True)])
        answers = self._query(q, np.concatenate(batch.lo), np.concatenate(batch.hi))
        start = 0
        for qq, tb, th in zip(batch.q, batch.tb, batch.th, strict=True):
            bp = self._passes[qq]
            assert bp.known is not None
            _store(bp.known, bp.lay.heap, tb, th, answers[start : start + tb.size])
            bp.search += int(tb.size)
            start += tb.size

    def _advance(self) -> _Batch:
        """Walk the tokens through known parities, correct located errors, repeat.

        Scheduling (the serial Cascade searches the smallest odd block first): passes are
        visited by increasing block size; a token of a pass whose blocks exceed 1/16 of
        the shortest frame waits while its frame has tokens in a pass of smaller blocks,
        since a big block is likely to lose its odd parity to the smaller searches, which
        would waste the parities disclosed for it.  Returns the queries of the next round
        (empty once no pass has an odd known sub-block left).
        """
        order = sorted(range(len(self._passes)), key=lambda q: self._passes[q].lay.k)
        short = min(self._lengths) if self._lengths else 0
        while True:
            batch = _Batch()
            found: list[IntArray] = []
            found_in: list[int] = []
            busy = np.zeros(len(self._lengths), dtype=bool)
            for q in order:
                bp = self._passes[q]
                if not bp.tokens:
                    continue
                assert bp.known is not None
                assert bp.fen is not None
                frames = bp.lay.block_frame[bp.tb]
                if 16 * bp.lay.k > short and busy.any():
                    go = ~busy[frames]
                    parked = np.flatnonzero(~go)
                    active = np.flatnonzero(go)
                else:
                    parked = np.zeros(0, np.int64)
                    active = np.arange(bp.tokens)
                busy[frames] = True
                if not active.size:
                    continue
                tb, th, tlo, thi = bp.tb[active], bp.th[active], bp.tlo[active], bp.thi[active]
                out = np.empty(active.size, dtype=np.int64)
                kept, nfound = _descend(
                    bp.known, bp.lay.heap, bp.fen, tb, th, tlo, thi, active.size, out
                )
                tb, th, tlo, thi = tb[:kept], th[:kept], tlo[:kept], thi[:kept]
                if kept > 1:  # two tokens may meet at the same node: ask once
                    _, first = np.unique(tb * bp.lay.heap + th, return_index=True)
                    if first.size < kept:
                        tb, th, tlo, thi = tb[first], th[first], tlo[first], thi[first]
                if nfound:
                    bp.corrections += nfound
                    found.append(bp.lay.to_indices(out[:nfound]))
                    found_in.append(q)
                batch.add(q, tb, th, tlo, tlo + (thi - tlo) // 2)
                bp.tb = np.concatenate((bp.tb[parked], tb))
                bp.th = np.concatenate((bp.th[parked], th))
                bp.tlo = np.concatenate((bp.tlo[parked], tlo))
                bp.thi = np.concatenate((bp.thi[parked], thi))
            if not found:
                return batch
            self._flip(np.unique(np.concatenate(found)), found, found_in)

    def _flip(self, idx: IntArray, found: list[IntArray], found_in: list[int]) -> None:
        """Correct the key bits ``idx``; update every started pass's parities and tokens.

        ``found[i]`` are the bits located by pass ``found_in[i]`` (no path walk there).
        """
        self._key[idx] ^= 1
        for q, bp in enumerate(self._passes):
            lay = bp.lay
            if bp.fen is None:  # lazy halves pass: only its two roots per frame can change
                assert bp.root_err is not None
                blocks = 2 * (np.searchsorted(lay.frames, idx, side="right") - 1) + lay.mask[idx]
                np.bitwise_xor.at(bp.root_err, blocks, 1)
                if bp.root_err.any():
                    bp.materialise(self._key)
                continue
            assert bp.known is not None
            mine = [f for f, fq in zip(found, found_in, strict=True) if fq == q]
            walk = (
                ~np.isin(idx, np.concatenate(mine), assume_unique=False) if mine
                else np.ones(idx.size, dtype=bool)
            )
            pos = lay.to_positions(idx)
            order = np.argsort(pos, kind="stable")
            bp.tb, bp.th, bp.tlo, bp.thi = _flip_pass(
                bp.known, lay.heap, bp.fen, lay.starts, pos[order],
                walk[order].view(np.uint8), bp.tb, bp.th, bp.tlo, bp.thi, bp.tokens,
            )


def reconcile_in_process(
    alice_keys: Bits | Sequence[Bits],
    bob_keys: Bits | Sequence[Bits],
    qber_estimate: float,
    rng: np.random.Generator,
    params: CascadeParameters | None = None,
    channels: tuple[ClassicalChannel, ClassicalChannel] | None = None,
) -> tuple[list[CascadeResult], int]:
    """Run both roles in this thread over an in-process (zero-latency) channel.

    ``channels`` (Alice's end, Bob's end) may wrap an :class:`InProcessChannel` pair, e.g.
    in :class:`~qkdlab.protocol.channel.AuthenticatedChannel`; Bob's raw end must be an
    :class:`InProcessChannel` (its idle hook runs Alice).  Returns Bob's results (one per
    frame) and Alice's count of disclosed bits.
    """
    if channels is None:
        channels = InProcessChannel.pair()
    a_end, b_end = channels
    raw = b_end
    while not isinstance(raw, InProcessChannel):
        inner = getattr(raw, "inner", None)
        if inner is None:
            raise TypeError("Bob's end must wrap an InProcessChannel")
        raw = inner
    alice = CascadeAlice(alice_keys, rng)
    raw.idle_hook = lambda: alice.step(a_end)
    try:
        results = CascadeBob(bob_keys, qber_estimate, params).run(b_end)
    finally:
        raw.idle_hook = None
    return results, alice.disclosed_bits
