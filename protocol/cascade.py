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
mask, kept packed; a frame's half order is built only once one of its halves turns out
odd).  Both sides derive every layout from a seed Alice sends; keys never leave either
side.  The per-round work (Bob's searches and corrections over all passes and frames,
Alice's answers) runs in the numba kernels of :mod:`qkdlab.protocol.cascade_kernels`, so
a round costs two messages and a few kernel calls whatever the number of frames.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from qkdlab.protocol import cascade_kernels as kern
from qkdlab.protocol.bits import Bits, as_bits, binary_entropy
from qkdlab.protocol.channel import (
    ChannelTimeoutError,
    ClassicalChannel,
    InProcessChannel,
    Message,
    ProtocolError,
)

IntArray = npt.NDArray[np.int64]
I32Array = npt.NDArray[np.int32]
_Int = TypeVar("_Int", np.uint8, np.uint64)

MAX_PASSES = 64
MIN_QBER = 1e-5
_NO_ORDER = np.zeros(0, dtype=np.int32)


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


class _Plan:
    """Layouts of all passes over the concatenated frames (identical on both sides).

    Pass q cuts the positions into blocks ``starts[soff[q]:soff[q + 1]]`` that never
    cross frames.  Its kind is identity (positions are key indices), shuffled (position p
    holds key index ``order[p]``, a per-frame Fisher–Yates permutation built when the pass
    starts) or halves (per frame, the mask-0 bits then the mask-1 bits; ``masks[hrow[q]]``
    is the packed mask, ``ones[hrow[q]]`` its ones count every 64 bits).
    """

    def __init__(
        self, frames: IntArray, block_sizes: Sequence[int], seed: int, shuffle_first: bool
    ) -> None:
        self.frames = frames
        self.n = n = int(frames[-1])
        if n >= 2**31 - 1:
            raise ValueError("at most 2^31 - 2 bits per Cascade run")
        lengths = np.diff(frames)
        self.lengths = lengths
        longest = int(lengths.max(initial=0))
        nbytes = 8 * ((n + 63) // 64)  # the mask's (n + 7) // 8 bytes, zero-padded to words
        npass, nframes = len(block_sizes), lengths.size
        self.kinds = np.zeros(npass, dtype=np.int64)
        self.ks = np.zeros(npass, dtype=np.int64)
        self.srow = np.full(npass, -1, dtype=np.int64)
        self.hrow = np.full(npass, -1, dtype=np.int64)
        self.first_block = np.zeros((npass, nframes), dtype=np.int64)
        self.seeds: dict[int, npt.NDArray[np.uint64]] = {}
        halves = [q for q, k in enumerate(block_sizes) if 2 * k >= longest and longest > 1]
        self.masks = np.zeros((len(halves), nbytes), dtype=np.uint8)
        self.ones = np.zeros((len(halves), nbytes // 8 + 1), dtype=np.int64)
        self.starts_list: list[IntArray] = []
        self.block_frame: list[IntArray] = []
        self.last_of_frame: list[npt.NDArray[np.bool_]] = []
        for q, k in enumerate(block_sizes):
            if q in halves:
                h = self.hrow[q] = halves.index(q)
                mask = self.masks[h]
                mask[: (n + 7) // 8] = np.random.default_rng([seed, q]).integers(
                    0, 256, (n + 7) // 8, np.uint8
                )
                if n % 8:
                    mask[n // 8] &= (0xFF << (8 - n % 8)) & 0xFF  # no ones past the end
                self.ones[h] = kern.ones_directory(mask.view(np.uint64))
                per_frame = kern.halves_ones(mask, self.ones[h], frames)
                st = np.empty(2 * nframes + 1, dtype=np.int64)
                st[0:-1:2] = frames[:-1]
                st[1:-1:2] = frames[1:] - per_frame
                st[-1] = n
                bf = np.repeat(np.arange(nframes, dtype=np.int64), 2)
                self.kinds[q] = kern.HALVES
                self.ks[q] = max((lengths - per_frame).max(initial=1), per_frame.max(initial=1))
                self.first_block[q] = 2 * np.arange(nframes)
            else:
                per = -(-lengths // k)
                bf = np.repeat(np.arange(nframes, dtype=np.int64), per)
                first = np.cumsum(per) - per
                within = np.arange(bf.size, dtype=np.int64) - first[bf]
                st = np.concatenate([frames[:-1][bf] + within * k, [n]]).astype(np.int64)
                self.ks[q] = k
                self.first_block[q] = first
                if shuffle_first or q > 0:
                    self.kinds[q] = kern.SHUFFLED
                    self.srow[q] = len(self.seeds)
                    self.seeds[q] = np.array(
                        [_subseed(seed, q, f) for f in range(nframes)], dtype=np.uint64
                    )
            self.starts_list.append(st)
            self.block_frame.append(bf)
            # the last non-empty block of each frame (its parity is implied after pass 1)
            last = np.zeros(st.size - 1, dtype=bool)
            if st.size > 1:
                ends = np.searchsorted(st, frames[1:], side="left") - 1
                last[ends[lengths > 0]] = True
            self.last_of_frame.append(last & (np.diff(st) > 0))
        # all passes' block starts concatenated (pass q from soff[q]), block -> frame (pass
        # q from soff[q] - q)
        self.soff = np.concatenate(
            [[0], np.cumsum([st.size for st in self.starts_list])]
        ).astype(np.int64)
        self.starts = np.concatenate([*self.starts_list, np.zeros(0, np.int64)]).astype(np.int64)
        self.bframe = np.concatenate([*self.block_frame, np.zeros(0, np.int64)]).astype(np.int64)
        self.max_blocks = max((st.size - 1 for st in self.starts_list), default=0)
        # passes visited by increasing block size (the serial Cascade's smallest-first)
        self.rank = np.array(sorted(range(npass), key=lambda q: int(self.ks[q])), dtype=np.int64)

    @property
    def passes(self) -> int:
        return int(self.kinds.size)

    def shuffled(self, q: int, out: I32Array) -> I32Array:
        """Pass q's order (a shuffled pass) written into ``out``."""
        kern.shuffle_into(out, self.frames, self.seeds[q])
        return out


def _subseed(seed: int, index: int, frame: int) -> np.uint64:
    return np.random.SeedSequence([seed, index, frame]).generate_state(1, np.uint64)[0]


def _frame_bounds(lengths: Sequence[int]) -> IntArray:
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)


def _sparse_zeros(rows: int, cols: int, dtype: type[_Int]) -> npt.NDArray[_Int]:
    """Zero array from an anonymous mapping: the OS supplies zero pages on first touch,
    4 KiB at a time.  (numpy asks for transparent huge pages for big arrays, so a row
    touched only at its block ends would cost 2 MiB of zeroing per touch.)"""
    size = rows * cols
    buf = mmap.mmap(-1, max(size * np.dtype(dtype).itemsize, 1))
    return np.frombuffer(buf, dtype=dtype, count=size).reshape(rows, cols)


def _words(key: Bits) -> npt.NDArray[np.uint64]:
    """The key's first n - n % 8 bytes as little-endian words (a view: follows flips)."""
    return key[: key.size - key.size % 8].view(np.uint64)


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
        self._keyw = _words(self._key)
        self._frames = _frame_bounds([k.size for k in frames])
        self._rng = rng
        self._plan: _Plan | None = None
        self._cum = np.zeros((0, self._key.size + 1), dtype=np.uint8)
        self._crow = np.zeros(0, dtype=np.int64)
        self._built = 0  # passes < _built have their prefix row (if not halves)
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
        plan = self._plan = _Plan(
            self._frames, params.block_sizes, seed, params.shuffle_first_pass
        )
        plain = np.flatnonzero(plan.kinds != kern.HALVES)
        self._crow = np.full(plan.passes, -1, dtype=np.int64)
        self._crow[plain] = np.arange(plain.size)
        self._cum = np.empty((plain.size, self._key.size + 1), dtype=np.uint8)
        self._built = 0
        self.disclosed_bits = 0
        self.done = False
        return Message("cascade/seed", seed=seed)

    def _prefixes_up_to(self, last: int) -> None:
        """Prefix rows of passes ``_built .. last`` (the identity and shuffled ones)."""
        plan = self._plan
        assert plan is not None
        scratch: I32Array | None = None
        for q in range(self._built, last + 1):
            kind = plan.kinds[q]
            if kind == kern.HALVES:
                continue
            order = _NO_ORDER
            if kind == kern.SHUFFLED:
                if scratch is None:
                    scratch = np.empty(self._key.size, dtype=np.int32)
                order = plan.shuffled(q, scratch)
            kern.gather_prefix_into(
                self._key, order, kind == kern.IDENTITY, self._cum[self._crow[q]]
            )
        self._built = max(self._built, last + 1)

    def _answer(self, msg: Message) -> Message:
        plan = self._plan
        if plan is None:
            raise ProtocolError("parity query before cascade/start")
        passes = msg.get_array("pass", np.uint8)
        lo, hi = msg.get_array("lo"), msg.get_array("hi")
        n = self._key.size
        if not passes.size == lo.size == hi.size:
            raise ProtocolError("pass, lo and hi must have equal lengths")
        if lo.dtype != hi.dtype or lo.dtype not in (np.uint32, np.uint64):
            raise ProtocolError("lo and hi must both be uint32 or both uint64 arrays")
        if self.disclosed_bits + passes.size > n + 64 * plan.passes:
            raise ProtocolError("Bob asked for more parities than Cascade can need")
        out = np.empty(passes.size, dtype=np.uint8)
        if passes.size:
            last = int(passes.max())
            if self._built <= last < plan.passes:
                self._prefixes_up_to(last)
            code, bad = kern.answer(
                passes, lo, hi, plan.kinds, plan.starts, plan.soff, plan.frames, self._cum,
                self._crow, self._key, self._keyw, plan.masks, plan.ones, plan.hrow, out,
            )
            if code == 1:
                raise ProtocolError("parity query outside the key or the agreed passes")
            if code == 2:
                raise ProtocolError(
                    f"parity query {bad} (pass {passes[bad]}, [{lo[bad]}, {hi[bad]})) "
                    "is not inside one half of a frame"
                )
        self.disclosed_bits += int(passes.size)
        return Message("cascade/parities", parity=np.packbits(out), count=int(out.size))


# --- Bob ---------------------------------------------------------------------------------


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
        self._keyw = _words(self._key)
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
        plan = _Plan(
            self._frames, self.params.block_sizes, reply.get_int("seed"),
            self.params.shuffle_first_pass,
        )
        state = _BobState(plan, self.n)
        for q in range(plan.passes):
            self._start_pass(plan, state, q)
            while True:
                state.pool, state.cur, state.batch, state.aux, nb = kern.advance(
                    self._key, plan.frames, min(self._lengths, default=0), plan.kinds,
                    plan.ks, plan.rank, state.started, plan.starts, plan.soff, plan.bframe,
                    plan.first_block, state.known, state.pk, plan.srow, state.order,
                    state.inv, plan.hrow, plan.masks, plan.ones, state.root_err, state.built,
                    state.pool, state.cur, state.tcount, state.batch, state.aux,
                    state.corrections, state.flags,
                )
                if not nb:
                    break
                batch = state.batch[:nb]
                answers = self._query(batch[:, 0], batch[:, 2], batch[:, 3])
                kern.store(
                    state.known, plan.frames, batch, answers, state.search,
                    self._disclosed_frame,
                )
        done = channel.request(Message("cascade/done"), timeout).expect("cascade/done")
        alice_count = done.get_int("disclosed_bits")
        if alice_count != self.disclosed_bits:
            raise ProtocolError(
                f"Alice counts {alice_count} disclosed parities, Bob {self.disclosed_bits}"
            )
        reports = tuple(
            PassReport(int(plan.ks[q]), plan.starts_list[q].size - 1, int(state.top[q]),
                       int(state.search[q]), int(state.corrections[q]))
            for q in range(plan.passes)
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
        return np.unpackbits(reply.get_array("parity", np.uint8), count=count)

    def _start_pass(self, plan: _Plan, state: _BobState, q: int) -> None:
        """Ask the block parities of pass q, build Bob's trees, odd blocks become tokens."""
        first = q == 0
        starts, bframe = plan.starts_list[q], plan.block_frame[q]
        blocks = starts.size - 1
        # block-parity inference: after pass 1 the last block of each frame is implied
        ask = np.ones(blocks, dtype=bool) if first else ~plan.last_of_frame[q]
        ask &= np.diff(starts) > 0
        b = np.flatnonzero(ask)
        answers = (
            self._query(np.full(b.size, q), starts[b], starts[b + 1])
            if b.size else np.zeros(0, np.uint8)
        )
        self._disclosed_frame += np.bincount(bframe[b], minlength=len(self._lengths))
        roots = np.zeros(blocks, dtype=np.uint8)
        roots[b] = answers
        if first:
            self._alice_total = self._frame_xor(roots, bframe)
        else:
            implied = self._alice_total ^ self._frame_xor(roots, bframe)
            last = np.flatnonzero(plan.last_of_frame[q])
            roots[last] = implied[bframe[last]]
        state.top[q] = b.size
        kern.set_roots(state.known, q, plan.frames, starts, bframe, roots)
        kind = plan.kinds[q]
        if kind == kern.HALVES:
            mask = plan.masks[plan.hrow[q]]
            state.root_err[q] = roots ^ kern.halves_block_parities(
                self._key, self._keyw, mask, plan.frames
            )
            new = kern.start_halves(
                q, self._key, plan.frames, state.root_err, plan.masks, plan.hrow, state.pk,
                state.built, plan.starts, plan.soff,
            )
        else:
            order, inv = _NO_ORDER, _NO_ORDER
            if kind == kern.SHUFFLED:
                order = plan.shuffled(q, state.order[plan.srow[q]])
                inv = state.inv[plan.srow[q]]
            par = kern.build_row(
                self._key, order, kind == kern.IDENTITY, state.pk[q], inv, starts
            )
            state.built[q] = 1
            odd = np.flatnonzero(par ^ roots)
            new = np.stack([np.full(odd.size, q), odd, starts[odd], starts[odd + 1]],
                           axis=1).astype(np.int64)
        state.add_tokens(q, new, plan.rank)
        state.started = q + 1

    def _frame_xor(self, per_block: Bits, block_frame: IntArray) -> Bits:
        """XOR of per-block values over the blocks of each frame."""
        out = np.zeros(len(self._lengths), dtype=np.uint8)
        np.bitwise_xor.at(out, block_frame, per_block)
        return out


class _BobState:
    """Bob's per-pass arrays (rows indexed by pass) and his search tokens.

    ``known`` (Alice's parities, by block boundary) and ``pk`` (Bob's key in pass order,
    packed): see :mod:`~qkdlab.protocol.cascade_kernels`; both are mapped lazily, so a
    halves pass costs memory only at its block ends and in the frames it builds.
    ``order``/``inv``: one row per shuffled pass.  ``pool[cur]`` holds the tokens
    (pass, block, lo, hi) of the odd known nodes still to search, grouped by
    ``plan.rank``, ``tcount[q]`` per pass; ``pool``, ``batch`` and ``aux`` are the work
    arrays of :func:`~qkdlab.protocol.cascade_kernels.advance`, reused every round.
    """

    def __init__(self, plan: _Plan, n: int) -> None:
        npass, nf = plan.passes, plan.lengths.size
        shuffled = len(plan.seeds)
        self.known = _sparse_zeros(npass, n + 1, np.uint8)
        self.pk = _sparse_zeros(npass, n // 64 + 1, np.uint64)
        self.order = np.empty((shuffled, n), dtype=np.int32)
        self.inv = np.empty((shuffled, n), dtype=np.int32)
        self.root_err = np.zeros((npass, 2 * nf), dtype=np.uint8)
        self.built = np.zeros((npass, nf), dtype=np.uint8)
        self.pool, self.batch, self.aux = kern.new_work(max(plan.max_blocks, 1))
        self.cur = 0
        self.flags = np.zeros(max(plan.max_blocks, 1), dtype=np.uint8)
        self.tcount = np.zeros(npass, dtype=np.int64)
        self.top = np.zeros(npass, dtype=np.int64)
        self.search = np.zeros(npass, dtype=np.int64)
        self.corrections = np.zeros(npass, dtype=np.int64)
        self.started = 0

    def add_tokens(self, q: int, new: IntArray, rank: IntArray) -> None:
        """Add pass q's tokens, keeping the pool grouped by ``rank``."""
        total = int(self.tcount.sum())
        tok = np.concatenate([self.pool[self.cur, :total], new]).astype(np.int64)
        where = np.empty(rank.size, dtype=np.int64)
        where[rank] = np.arange(rank.size)
        tok = tok[np.argsort(where[tok[:, 0]], kind="stable")]
        if tok.shape[0] > self.pool.shape[1]:
            self.pool, self.batch, self.aux = kern.new_work(tok.shape[0])
        self.pool[self.cur, : tok.shape[0]] = tok
        self.tcount[q] += new.shape[0]


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
