"""Cascade reconciliation over a binary symmetric channel."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from qkdlab.protocol import cascade_kernels as kern
from qkdlab.protocol.authentication import AuthSession, KeyPool
from qkdlab.protocol.bits import binary_entropy, binary_symmetric_channel, random_bits
from qkdlab.protocol.cascade import (
    CascadeAlice,
    CascadeBob,
    CascadeParameters,
    reconcile_in_process,
)
from qkdlab.protocol.channel import AuthenticatedChannel, InProcessChannel, Message, ProtocolError
from qkdlab.protocol.verification import (
    VerificationError,
    correctness_bound,
    verify_alice,
    verify_bob,
)


def frames(
    n: int, qber: float, count: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], np.random.Generator]:
    rng = np.random.default_rng(seed)
    alice = [random_bits(rng, n) for _ in range(count)]
    bob = [binary_symmetric_channel(a, qber, rng) for a in alice]
    return alice, bob, rng


def test_parameters_follow_martinez_mateo_option_8() -> None:
    # α = log2(1/p) − 1/2: p = 3 % -> α = 4.56, k1 = 2^5, k2 = 2^⌈8.28⌉ = 2^9, k3 = 4096
    params = CascadeParameters.for_qber(0.03, 100_000)
    assert params.block_sizes[:3] == (32, 512, 4096)
    assert params.block_sizes[3:] == (50_000,) * 11
    assert len(params.block_sizes) == 14
    assert CascadeParameters.for_qber(0.01, 10_000).block_sizes[:3] == (128, 1024, 4096)
    assert CascadeParameters.for_qber(0.05, 1000).block_sizes[2:4] == (500, 500)
    assert CascadeParameters.original(0.05, 10_000).block_sizes == (15, 30, 60, 120)


# Efficiency bounds: the mean f over the frames of one run.  Measured means are about
# 1.05–1.10 at n = 10^4 (1.07 ± 0.05 for one frame at 1 %, fewer errors per frame) and
# 1.03–1.05 at n = 10^5; the spread of a frame's f is dominated by the binomial spread of
# its error count, σ_f/f ≈ 1/√(n p) ≈ 10 % for n p = 100, 2 % for n p = 3000, so the
# bounds leave several standard errors of the mean.
@pytest.mark.parametrize(
    ("qber", "bound"), [(0.01, 1.20), (0.02, 1.16), (0.03, 1.15), (0.05, 1.12), (0.08, 1.12)]
)
def test_bsc_frames_of_10k_bits_are_corrected(qber: float, bound: float) -> None:
    alice, bob, rng = frames(10_000, qber, count=12, seed=int(qber * 1000))
    results, alice_disclosed = reconcile_in_process(alice, bob, qber, rng)
    assert alice_disclosed == sum(r.disclosed_bits for r in results)
    for a, b, r in zip(alice, bob, results, strict=True):
        assert np.array_equal(r.key, a)
        assert r.corrected_bits == int(np.count_nonzero(a != b))
    effs = [r.efficiency_at(qber) for r in results]
    assert np.mean(effs) < bound
    assert min(effs) > 0.8  # cannot beat Shannon by much: only the error count fluctuates


@pytest.mark.parametrize(("qber", "seed"), [(0.02, 1), (0.05, 2)])
def test_bsc_frames_of_100k_bits_are_corrected_efficiently(qber: float, seed: int) -> None:
    alice, bob, rng = frames(100_000, qber, count=3, seed=seed)
    results, _ = reconcile_in_process(alice, bob, qber, rng)
    for a, b, r in zip(alice, bob, results, strict=True):
        assert np.array_equal(r.key, a)
        assert r.corrected_bits == int(np.count_nonzero(a != b))
    assert np.mean([r.efficiency_at(qber) for r in results]) < 1.08


def test_error_free_frame_discloses_only_top_level_parities() -> None:
    rng = np.random.default_rng(3)
    key = random_bits(rng, 10_000)
    (result,), disclosed = reconcile_in_process(key, key.copy(), 0.02, rng)
    assert np.array_equal(result.key, key)
    assert result.corrected_bits == 0
    tops = sum(p.top_parities for p in result.passes)
    assert disclosed == result.disclosed_bits == tops
    assert all(p.search_parities == 0 for p in result.passes)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000])
def test_tiny_frames(n: int) -> None:
    rng = np.random.default_rng(n)
    a = random_bits(rng, n)
    b = binary_symmetric_channel(a, 0.1, rng)
    (result,), _ = reconcile_in_process(a, b, 0.1, rng)
    if np.count_nonzero(a != b) <= 1 or n >= 64:
        assert np.array_equal(result.key, a)
    # at most every bit plus one top parity and one search path per pass
    assert result.disclosed_bits <= n + 14 * (1 + n.bit_length())


def test_frames_of_different_lengths_in_one_run() -> None:
    rng = np.random.default_rng(4)
    alice = [random_bits(rng, n) for n in (5000, 12_345, 0, 800)]
    bob = [binary_symmetric_channel(a, 0.04, rng) for a in alice]
    results, disclosed = reconcile_in_process(alice, bob, 0.04, rng)
    assert [r.n for r in results] == [5000, 12_345, 0, 800]
    assert disclosed == sum(r.disclosed_bits for r in results)
    for a, r in zip(alice, results, strict=True):
        assert np.array_equal(r.key, a)


def test_original_cascade_parameters_also_work_but_leak_more() -> None:
    alice, bob, rng = frames(20_000, 0.03, count=4, seed=5)
    orig, _ = reconcile_in_process(alice, bob, 0.03, rng, CascadeParameters.original(0.03, 20_000))
    opt, _ = reconcile_in_process(alice, bob, 0.03, rng)
    assert all(np.array_equal(r.key, a) for r, a in zip(opt, alice, strict=True))
    assert sum(r.disclosed_bits for r in opt) < sum(r.disclosed_bits for r in orig)


def test_over_authenticated_channel_with_threads_and_verification() -> None:
    """Alice serves in a thread; every message is tagged; verification confirms the key."""
    alice_key, bob_key, rng = frames(30_000, 0.03, count=1, seed=6)
    pool_bits = np.random.default_rng(60).integers(0, 2, 400_000, dtype=np.uint8)
    a_raw, b_raw = InProcessChannel.pair(timeout=20)
    a_ch = AuthenticatedChannel(a_raw, AuthSession(KeyPool(pool_bits)), local_id="alice",
                                peer_id="bob")
    b_ch = AuthenticatedChannel(b_raw, AuthSession(KeyPool(pool_bits)), local_id="bob",
                                peer_id="alice")
    out: dict[str, object] = {}

    def alice() -> None:
        out["disclosed"] = CascadeAlice(alice_key[0], rng).serve(a_ch)
        out["verify"] = verify_alice(a_ch, alice_key[0], np.random.default_rng(61))

    t = threading.Thread(target=alice)
    t.start()
    (result,) = CascadeBob(bob_key[0], 0.03).run(b_ch)
    bob_verdict = verify_bob(b_ch, result.key)
    t.join(20)
    assert bob_verdict.match
    assert out["verify"].match  # type: ignore[attr-defined]
    assert out["disclosed"] == result.disclosed_bits
    assert np.array_equal(result.key, alice_key[0])
    # every message cost one 64-bit pad slot in each direction's round (2·64 bits/message)
    sent = a_ch.messages_sent + b_ch.messages_sent
    assert a_ch.session.bits_drawn == b_ch.session.bits_drawn >= 64 * sent


def test_alice_rejects_a_mismatched_frame_layout() -> None:
    rng = np.random.default_rng(7)
    a_raw, b_raw = InProcessChannel.pair(timeout=5)
    alice = CascadeAlice(random_bits(rng, 1000), rng)
    b_raw.idle_hook = lambda: alice.step(a_raw)
    with pytest.raises(ProtocolError, match="differ from Alice's"):
        CascadeBob(random_bits(rng, 999), 0.02).run(b_raw)


def test_efficiency_definition() -> None:
    alice, bob, rng = frames(10_000, 0.03, count=1, seed=8)
    (r,), _ = reconcile_in_process(alice, bob, 0.03, rng)
    assert r.efficiency == pytest.approx(r.disclosed_bits / (10_000 * binary_entropy(0.03)))
    assert "disclosed_bits" in repr(r)
    assert "key=" not in repr(r)


def test_verification_reports_a_failed_frame() -> None:
    """A residual error left by reconciliation is caught, on both sides."""
    rng = np.random.default_rng(9)
    key = random_bits(rng, 50_000)
    wrong = key.copy()
    wrong[12_345] ^= 1
    a, b = InProcessChannel.pair(timeout=10)
    out: dict[str, object] = {}

    def bob() -> None:
        out["bob"] = verify_bob(b, wrong, raise_on_mismatch=False)

    t = threading.Thread(target=bob)
    t.start()
    with pytest.raises(VerificationError, match="frame discarded"):
        verify_alice(a, key, np.random.default_rng(10))
    t.join(10)
    assert out["bob"].match is False  # type: ignore[attr-defined]


def test_verification_bound() -> None:
    # n = 10^6: L = 15 625 words + 1 length word; 64-bit tag -> ≈ 2^-50, 128-bit -> ≈ 2^-100
    assert correctness_bound(10**6) == pytest.approx(15_626 / 2**64)
    assert correctness_bound(10**6, 128) == pytest.approx((15_626 / 2**64) ** 2)
    a, b = InProcessChannel.pair(timeout=10)
    key = random_bits(np.random.default_rng(11), 1000)
    t = threading.Thread(target=lambda: verify_bob(b, key.copy()))
    t.start()
    res = verify_alice(a, key, np.random.default_rng(12), tag_bits=128)
    t.join(10)
    assert res.match
    assert res.leaked_bits == 128
    assert res.epsilon_cor == correctness_bound(1000, 128)


# --- the kernels behind the passes ---------------------------------------------------------


def _started_alice(
    keys: list[np.ndarray], sizes: tuple[int, ...], shuffle: bool = False
) -> tuple[CascadeAlice, int]:
    """An Alice that accepted a cascade/start; returns her and the layout seed."""
    alice = CascadeAlice(keys, np.random.default_rng(21))
    reply = alice.handle(
        Message(
            "cascade/start",
            frames=np.array([k.size for k in keys], dtype=np.int64),
            block_sizes=np.array(sizes, dtype=np.int64),
            shuffle=int(shuffle),
        )
    )
    assert reply is not None
    return alice, reply.get_int("seed")


def _ask(alice: CascadeAlice, q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    reply = alice.handle(
        Message("cascade/ask", **{"pass": q.astype(np.uint8)}, lo=lo.astype(np.uint32),
                hi=hi.astype(np.uint32))
    )
    assert reply is not None
    return np.unpackbits(reply.get_array("parity", np.uint8), count=q.size)


def _halves_order(n: int, frames: np.ndarray, seed: int, q: int) -> np.ndarray:
    """A halves pass's order straight from its definition: per frame, the positions whose
    mask bit is 0, then those whose mask bit is 1 (mask: Alice's seed, MSB-first bits)."""
    mask = np.unpackbits(
        np.random.default_rng([seed, q]).integers(0, 256, (n + 7) // 8, np.uint8), count=n
    )
    return np.concatenate(
        [np.concatenate([np.flatnonzero(mask[a:b] == 0), np.flatnonzero(mask[a:b] == 1)]) + a
         for a, b in itertools.pairwise(frames)]
        + [np.zeros(0, np.int64)]
    )


def test_alice_answers_parities_of_any_range_inside_a_block() -> None:
    """Parities of random sub-ranges, against the key gathered in each pass's order."""
    rng = np.random.default_rng(22)
    lengths = [1000, 77, 0, 513, 2]
    keys = [random_bits(rng, n) for n in lengths]
    key = np.concatenate(keys)
    frames = np.concatenate([[0], np.cumsum(lengths)])
    sizes = (16, 100, 1000, 1000)  # identity, shuffled, then two halves passes
    alice, seed = _started_alice(keys, sizes)
    plan = alice._plan
    assert plan is not None
    assert list(plan.kinds) == [kern.IDENTITY, kern.SHUFFLED, kern.HALVES, kern.HALVES]
    orders = [
        np.arange(key.size),
        plan.shuffled(1, np.empty(key.size, np.int32)),
        _halves_order(key.size, frames, seed, 2),
        _halves_order(key.size, frames, seed, 3),
    ]
    for q, order in enumerate(orders):
        assert np.array_equal(np.sort(order), np.arange(key.size))  # a permutation
        starts = plan.starts_list[q]
        nonempty = np.flatnonzero(np.diff(starts) > 0)
        b = rng.choice(nonempty, 300)
        lo = starts[b] + (rng.random(300) * np.diff(starts)[b]).astype(np.int64)
        hi = lo + 1 + (rng.random(300) * (starts[b + 1] - lo)).astype(np.int64)
        hi = np.minimum(hi, starts[b + 1])
        lo[:5], hi[:5] = starts[b[:5]], starts[b[:5] + 1]  # whole blocks too
        expected = [int(np.bitwise_xor.reduce(key[order[a:e]]))
                    for a, e in zip(lo, hi, strict=True)]
        assert list(_ask(alice, np.full(300, q), lo, hi)) == expected


def test_alice_rejects_malformed_queries() -> None:
    rng = np.random.default_rng(23)
    alice, _ = _started_alice([random_bits(rng, 1000)], (16, 600))
    plan = alice._plan
    assert plan is not None
    half = int(plan.starts_list[1][1])  # the mask-1 half starts here
    with pytest.raises(ProtocolError, match="not inside one half"):
        _ask(alice, np.array([1]), np.array([half - 3]), np.array([half + 3]))
    with pytest.raises(ProtocolError, match="outside the key or the agreed passes"):
        _ask(alice, np.array([2]), np.array([0]), np.array([5]))
    with pytest.raises(ProtocolError, match="outside the key or the agreed passes"):
        _ask(alice, np.array([0]), np.array([990]), np.array([1001]))
    with pytest.raises(ProtocolError, match="outside the key or the agreed passes"):
        _ask(alice, np.array([0]), np.array([7]), np.array([7]))
    with pytest.raises(ProtocolError, match="uint32 or both uint64"):
        alice.handle(Message("cascade/ask", **{"pass": np.zeros(1, np.uint8)},
                             lo=np.zeros(1, np.int64), hi=np.ones(1, np.int64)))
    fresh = CascadeAlice(random_bits(rng, 10), rng)
    with pytest.raises(ProtocolError, match="before cascade/start"):
        _ask(fresh, np.array([0]), np.array([0]), np.array([1]))


def test_halves_pass_maps_indices_and_positions_both_ways() -> None:
    """Bob's rank/select maps of a halves pass agree with the order built from the mask."""
    rng = np.random.default_rng(24)
    lengths = [700, 1, 333, 64]
    keys = [random_bits(rng, n) for n in lengths]
    frames = np.concatenate([[0], np.cumsum(lengths)])
    n = int(frames[-1])
    alice, seed = _started_alice(keys, (8, 400))
    plan = alice._plan
    assert plan is not None
    order = _halves_order(n, frames, seed, 1)
    inv = np.empty(n, np.int64)
    inv[order] = np.arange(n)
    empty = np.zeros((0, n), np.int32)  # no shuffled pass: no order rows
    for i in range(n):
        f = int(np.searchsorted(frames, i, side="right") - 1)
        args = (plan.kinds, plan.srow, empty, plan.hrow, plan.masks, plan.ones, plan.starts,
                plan.soff, plan.frames)
        p = kern._to_position(1, i, f, *args)
        assert p == inv[i]
        assert kern._to_index(1, p, f, *args) == i


def test_packed_parity_of_any_range() -> None:
    rng = np.random.default_rng(25)
    bits = random_bits(rng, 1000)
    padded = np.concatenate([bits, np.zeros(88, np.uint8)])  # 17 whole words
    words = np.packbits(padded, bitorder="little").view("<u8").astype(np.uint64)
    for lo, hi in [(0, 0), (0, 1), (63, 65), (64, 128), (5, 999), (0, 1000), (128, 130)]:
        assert kern._parity(words, lo, hi) == int(np.bitwise_xor.reduce(bits[lo:hi]))
    for _ in range(300):
        lo, hi = np.sort(rng.integers(0, 1001, 2))
        assert kern._parity(words, lo, hi) == int(np.bitwise_xor.reduce(bits[lo:hi]))


def test_sort_helper_sorts_a_prefix_in_place() -> None:
    rng = np.random.default_rng(29)
    for n in (0, 1, 63, 64, 2049, 30_000):
        for top in (2, 2**11, 2**12, 2**40):
            a = rng.integers(0, top, n + 3)
            before = a.copy()
            kern._sort(a, n)
            assert np.array_equal(a[:n], np.sort(before[:n]))
            assert np.array_equal(a[n:], before[n:])


def test_error_free_frames_disclose_only_block_parities_among_noisy_frames() -> None:
    """Frames are reconciled together but searched apart: a frame without errors
    discloses just its top-level block parities (the last block of each later pass
    implied), however many errors the other frames hold."""
    rng = np.random.default_rng(26)
    n, qber = 8000, 0.04
    alice = [random_bits(rng, n) for _ in range(6)]
    bob = [binary_symmetric_channel(a, qber, rng) if i % 2 else a.copy()
           for i, a in enumerate(alice)]
    params = CascadeParameters.for_qber(qber, n)
    results, disclosed = reconcile_in_process(alice, bob, qber, rng, params)
    assert disclosed == sum(r.disclosed_bits for r in results)
    tops = sum(
        (2 if 2 * k >= n else -(-n // k)) - (q > 0) for q, k in enumerate(params.block_sizes)
    )
    for i, (a, r) in enumerate(zip(alice, results, strict=True)):
        assert np.array_equal(r.key, a)
        if i % 2:
            assert r.corrected_bits > 0
            assert r.disclosed_bits > tops
        else:
            assert r.corrected_bits == 0
            assert r.disclosed_bits == tops


def test_halves_passes_locate_errors_left_by_small_blocks() -> None:
    """With one pass of small blocks and then only random halves, the halves passes must
    search (frame by frame, as their halves turn odd) and the keys still agree."""
    alice, bob, rng = frames(4000, 0.01, count=5, seed=27)
    params = CascadeParameters((16,) + (4000,) * 12)
    results, _ = reconcile_in_process(alice, bob, 0.01, rng, params)
    for a, b, r in zip(alice, bob, results, strict=True):
        assert np.array_equal(r.key, a)
        assert r.corrected_bits == int(np.count_nonzero(a != b))
    passes = results[0].passes
    assert all(p.blocks == 10 for p in passes[1:])  # two halves per frame
    assert sum(p.corrections for p in passes[1:]) > 0
    assert sum(p.search_parities for p in passes[1:]) > 0


class _LyingAlice(CascadeAlice):
    """Answers the binary-search queries of every third round with flipped parities."""

    rounds = 0

    def _answer(self, msg: Message) -> Message:
        reply = super()._answer(msg)
        self.rounds += 1
        if self.rounds % 3 == 0 and self.rounds > 14:
            reply.fields["parity"] = reply.get_array("parity", np.uint8) ^ np.uint8(0xFF)
        return reply


def test_inconsistent_parities_stop_bob_with_an_error() -> None:
    """Bob cannot tell a lie from an error, but he must stop: wrong parities make him flip
    bits back and forth without asking anything new, which he detects (more corrections
    than key bits) instead of looping for ever."""
    alice_keys, bob_keys, rng = frames(20_000, 0.03, count=2, seed=28)
    a_raw, b_raw = InProcessChannel.pair(timeout=5)
    liar = _LyingAlice(alice_keys, rng)
    b_raw.idle_hook = lambda: liar.step(a_raw)
    with pytest.raises(RuntimeError, match="more corrections than key bits"):
        CascadeBob(bob_keys, 0.03).run(b_raw)
