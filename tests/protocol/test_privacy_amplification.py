"""Toeplitz privacy amplification: exact against the GF(2) matrix product."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qkdlab.protocol import privacy_amplification as pa
from qkdlab.protocol.channel import InProcessChannel
from qkdlab.protocol.privacy_amplification import (
    ExactnessError,
    ToeplitzHasher,
    amplify_alice,
    amplify_bob,
    seed_length,
    toeplitz_hash,
    toeplitz_hash_baseline,
    toeplitz_hash_direct,
)


def bits(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2, n, dtype=np.uint8)


def test_direct_product_matches_the_definition() -> None:
    x = np.array([1, 0, 1, 1], np.uint8)
    s = np.array([1, 1, 0, 1, 0], np.uint8)  # n + m - 1 = 5 for m = 2
    t = np.array([[s[i - j + 3] for j in range(4)] for i in range(2)])
    assert np.array_equal(toeplitz_hash_direct(x, s, 2), (t @ x) % 2)


@pytest.mark.parametrize("seed", range(4))
def test_fft_hash_is_exact_for_random_sizes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(60):
        n = int(rng.integers(1, 700))
        m = int(rng.integers(0, n + 1))
        x, s = bits(rng, n), bits(rng, seed_length(n, m))
        expected = toeplitz_hash_direct(x, s, m)
        assert np.array_equal(toeplitz_hash(x, s, m), expected), (n, m)
        assert np.array_equal(toeplitz_hash_baseline(x, s, m), expected), (n, m)


@pytest.mark.parametrize(("n", "m"), [(1, 0), (1, 1), (2, 1), (2, 2), (3, 3), (64, 63),
                                      (1000, 1000), (997, 1)])
def test_edge_sizes(n: int, m: int) -> None:
    rng = np.random.default_rng(n * 7 + m)
    for _ in range(5):
        x, s = bits(rng, n), bits(rng, seed_length(n, m))
        assert np.array_equal(toeplitz_hash(x, s, m), toeplitz_hash_direct(x, s, m))


def test_all_ones_input_stays_exact() -> None:
    """Largest convolution sums (every term 1) at a size where they reach 2^17."""
    n, m = 1 << 17, 1 << 16
    x = np.ones(n, np.uint8)
    s = np.ones(seed_length(n, m), np.uint8)
    hasher = ToeplitzHasher(n, m)
    assert np.array_equal(hasher.hash(x, s), np.full(m, n % 2, np.uint8))
    assert hasher.last_max_deviation < 1e-6


def test_large_block_rows_match_direct_parities() -> None:
    """n = 300 000: spot-check rows against y_i = parity(s[i:i+n] reversed · x)."""
    rng = np.random.default_rng(5)
    n, m = 300_000, 120_000
    x, s = bits(rng, n), bits(rng, seed_length(n, m))
    hasher = ToeplitzHasher(n, m)
    y = hasher.hash(x, s)
    for i in rng.integers(0, m, 25):
        row = s[i : i + n][::-1]  # T[i, j] = s[i - j + n - 1]
        assert y[i] == int(np.count_nonzero(row & x)) % 2
    assert np.array_equal(hasher.hash(x, s), y)  # buffers reused: same result
    assert hasher.last_max_deviation < 1e-6


def test_different_seeds_give_different_keys() -> None:
    rng = np.random.default_rng(6)
    n, m = 5000, 2000
    x = bits(rng, n)
    y1 = toeplitz_hash(x, bits(rng, seed_length(n, m)), m)
    y2 = toeplitz_hash(x, bits(rng, seed_length(n, m)), m)
    # two independent outputs agree on each bit with probability 1/2
    agreement = np.count_nonzero(y1 == y2) / m
    assert abs(agreement - 0.5) < 0.05  # 4.5 sigma for m = 2000


def test_size_checks() -> None:
    x = np.ones(10, np.uint8)
    with pytest.raises(ValueError, match="n \\+ m − 1 = 14"):
        toeplitz_hash(x, np.ones(13, np.uint8), 5)
    with pytest.raises(ValueError, match="cannot extract"):
        toeplitz_hash(x, np.ones(20, np.uint8), 11)
    with pytest.raises(ValueError, match="key must have 10 bits"):
        ToeplitzHasher(10, 5).hash(np.ones(9, np.uint8), np.ones(14, np.uint8))


def test_inexact_result_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pa, "EXACTNESS_MARGIN", -1.0)
    with pytest.raises(ExactnessError):
        toeplitz_hash(np.ones(8, np.uint8), np.ones(11, np.uint8), 4)


def test_alice_and_bob_amplify_over_a_channel() -> None:
    rng = np.random.default_rng(7)
    key = bits(rng, 4000)
    a, b = InProcessChannel.pair(timeout=10)
    out: dict[str, np.ndarray] = {}
    t = threading.Thread(target=lambda: out.__setitem__("bob", amplify_bob(b, key.copy())))
    t.start()
    out["alice"] = amplify_alice(a, key, 1500, np.random.default_rng(8))
    t.join(10)
    assert out["alice"].size == 1500
    assert np.array_equal(out["alice"], out["bob"])
