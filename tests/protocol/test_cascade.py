"""Cascade reconciliation over a binary symmetric channel."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qkdlab.protocol.authentication import AuthSession, KeyPool
from qkdlab.protocol.bits import binary_entropy, binary_symmetric_channel, random_bits
from qkdlab.protocol.cascade import (
    CascadeAlice,
    CascadeBob,
    CascadeParameters,
    reconcile_in_process,
)
from qkdlab.protocol.channel import AuthenticatedChannel, InProcessChannel, ProtocolError
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
    assert out["verify"].match
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
