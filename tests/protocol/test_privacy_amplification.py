"""[I | T] Toeplitz privacy amplification: exact against the GF(2) matrix product."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from qkdlab.protocol.channel import InProcessChannel, Message, ProtocolError
from qkdlab.protocol.privacy_amplification import (
    MAX_KEY_BITS,
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
    """y = x[:m] ⊕ T x[m:], T[i, j] = s[i − j + n − m − 1] (n = 5, m = 2: T is 2 × 3)."""
    x = np.array([1, 0, 1, 1, 0], np.uint8)
    s = np.array([1, 1, 0, 1], np.uint8)  # n − 1 = 4 seed bits
    t = np.array([[s[i - j + 2] for j in range(3)] for i in range(2)])
    h = np.concatenate([np.eye(2, dtype=np.int64), t], axis=1)
    assert np.array_equal(toeplitz_hash_direct(x, s, 2), (h @ x) % 2)


def test_seed_length() -> None:
    assert seed_length(10, 4) == 9
    assert seed_length(10, 1) == 9
    assert seed_length(10, 0) == 0  # no output, nothing to hash
    assert seed_length(10, 10) == 0  # H = I
    with pytest.raises(ValueError, match="cannot extract"):
        seed_length(3, 4)


def test_family_is_universal_exhaustively() -> None:
    """n = 10, m = 3: for every key difference d ≠ 0, exactly 2^(9 − 3) of the 2^9 seeds
    map d to 0 when its T part is non-zero (collision probability 2^−m), and none when
    only its identity part is non-zero."""
    n, m = 10, 3
    seeds = np.array(list(itertools.product((0, 1), repeat=n - 1)), np.uint8)
    diffs = np.array(list(itertools.product((0, 1), repeat=n))[1:], np.uint8)
    i = np.arange(m)[:, None]
    j = np.arange(n - m)[None, :]
    t = seeds[:, i - j + n - m - 1].astype(np.int64)  # (seeds, m, n − m)
    td = np.einsum("sij,dj->sdi", t, diffs[:, m:].astype(np.int64)) & 1
    collide = np.all(td == diffs[None, :, :m], axis=2)  # (seeds, diffs)
    counts = collide.sum(axis=0)
    t_part = diffs[:, m:].any(axis=1)
    assert np.all(counts[t_part] == 2 ** (n - 1 - m))
    assert np.all(counts[~t_part] == 0)
    # and the fast path agrees with the matrix for a sample of (seed, difference) pairs
    rng = np.random.default_rng(0)
    for k in rng.integers(0, seeds.shape[0], 8):
        d = diffs[rng.integers(0, diffs.shape[0])]
        assert np.array_equal(toeplitz_hash(d, seeds[k], m), toeplitz_hash_direct(d, seeds[k], m))


@pytest.mark.parametrize("seed", range(4))
def test_hash_is_exact_for_random_sizes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(1, 900))
        m = int(rng.integers(0, n + 1))
        x, s = bits(rng, n), bits(rng, seed_length(n, m))
        expected = toeplitz_hash_direct(x, s, m)
        assert np.array_equal(toeplitz_hash(x, s, m), expected), (n, m)
        assert np.array_equal(toeplitz_hash_baseline(x, s, m), expected), (n, m)


@pytest.mark.parametrize(("n", "m"), [(1, 0), (1, 1), (2, 1), (2, 2), (3, 3), (64, 63),
                                      (1000, 1000), (997, 1), (257, 128), (258, 1),
                                      (769, 300), (770, 769), (1025, 512), (3073, 1)])
def test_edge_sizes(n: int, m: int) -> None:
    """Trivial shapes, and n − 1 on both sides of transform lengths (256, 768, 1024, 3072)."""
    rng = np.random.default_rng(n * 7 + m)
    for _ in range(4):
        x, s = bits(rng, n), bits(rng, seed_length(n, m))
        assert np.array_equal(toeplitz_hash(x, s, m), toeplitz_hash_direct(x, s, m))


def test_all_ones_input() -> None:
    """Every product term 1: T·x[m:] has n − m ones per row, so y = 1 ⊕ (n − m) mod 2."""
    for n, m in ((1 << 17, 1 << 16), ((1 << 17) + 1, 1 << 16)):
        x = np.ones(n, np.uint8)
        s = np.ones(seed_length(n, m), np.uint8)
        assert np.array_equal(ToeplitzHasher(n, m).hash(x, s),
                              np.full(m, 1 ^ ((n - m) % 2), np.uint8))


def test_large_block_rows_match_direct_parities() -> None:
    """n = 300 000: rows against y_i = x_i ⊕ parity(s[i : i + n − m] reversed · x[m:])."""
    rng = np.random.default_rng(5)
    n, m = 300_000, 120_000
    x, s = bits(rng, n), bits(rng, seed_length(n, m))
    hasher = ToeplitzHasher(n, m)
    y = hasher.hash(x, s)
    width = n - m
    for i in rng.integers(0, m, 25):
        row = s[i : i + width][::-1]  # T[i, j] = s[i − j + width − 1]
        assert y[i] == x[i] ^ (int(np.count_nonzero(row & x[m:])) % 2)
    assert np.array_equal(hasher.hash(x, s), y)  # buffers reused: same result
    # another key through the same buffers: its first 50 output bits are the hash of
    # (x[:50], x[m:]) with the first 50 + width − 1 seed bits
    x2 = bits(rng, n)
    head = toeplitz_hash_direct(np.concatenate([x2[:50], x2[m:]]), s[: 50 + width - 1], 50)
    assert np.array_equal(hasher.hash(x2, s)[:50], head)


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
    with pytest.raises(ValueError, match="seed must have 9 bits"):
        toeplitz_hash(x, np.ones(13, np.uint8), 5)
    with pytest.raises(ValueError, match="cannot extract"):
        toeplitz_hash(x, np.ones(9, np.uint8), 11)
    with pytest.raises(ValueError, match="key must have 10 bits"):
        ToeplitzHasher(10, 5).hash(np.ones(9, np.uint8), np.ones(9, np.uint8))
    with pytest.raises(ValueError, match="need 1 <= n"):
        ToeplitzHasher(0, 0)
    with pytest.raises(ValueError, match=f"key length n must be <= {MAX_KEY_BITS}"):
        ToeplitzHasher(MAX_KEY_BITS + 1, 1)
    with pytest.raises(ValueError, match="only the values 0 and 1"):
        toeplitz_hash(np.full(10, 2, np.uint8), np.ones(9, np.uint8), 5)


def _run_pair(key_a: np.ndarray, key_b: np.ndarray, m: int) -> dict[str, np.ndarray]:
    a, b = InProcessChannel.pair(timeout=10)
    out: dict[str, np.ndarray] = {}
    t = threading.Thread(target=lambda: out.__setitem__("bob", amplify_bob(b, key_b)))
    t.start()
    out["alice"] = amplify_alice(a, key_a, m, np.random.default_rng(8))
    t.join(10)
    return out


def test_alice_and_bob_amplify_over_a_channel() -> None:
    rng = np.random.default_rng(7)
    key = bits(rng, 4000)
    out = _run_pair(key, key.copy(), 1500)
    assert out["alice"].size == 1500
    assert np.array_equal(out["alice"], out["bob"])
    # a key differing in one bit hashes to an unrelated output
    other = key.copy()
    other[-1] ^= 1
    out2 = _run_pair(key, other, 1500)
    assert abs(np.count_nonzero(out2["alice"] == out2["bob"]) / 1500 - 0.5) < 0.06


def test_bob_refuses_another_hash_family() -> None:
    a, b = InProcessChannel.pair(timeout=5)
    key = np.ones(100, np.uint8)
    a.send(Message("pa/seed", family="toeplitz", n=100, m=10,
                   seed=np.packbits(np.ones(99, np.uint8))))
    with pytest.raises(ProtocolError, match="family 'toeplitz'"):
        amplify_bob(b, key)


def test_bob_refuses_a_short_seed() -> None:
    a, b = InProcessChannel.pair(timeout=5)
    a.send(Message("pa/seed", family="toeplitz-I|T", n=100, m=10,
                   seed=np.packbits(np.ones(80, np.uint8))))
    with pytest.raises(ProtocolError, match="seed has 10 bytes, need 13"):
        amplify_bob(b, np.ones(100, np.uint8))
