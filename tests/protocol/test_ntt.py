"""Exact cyclic convolution of bit vectors by the NTT mod p = 15·2^27 + 1."""

from __future__ import annotations

import numpy as np
import pytest

from qkdlab.protocol.ntt import MAX_SIZE, BitConvolution, P, transform_size


def cyclic(a: np.ndarray, b: np.ndarray, size: int) -> np.ndarray:
    """Integer cyclic convolution of length ``size`` by numpy (reference)."""
    full = np.convolve(a.astype(np.int64), b.astype(np.int64))
    out = np.zeros(size, np.int64)
    for start in range(0, full.size, size):
        part = full[start : start + size]
        out[: part.size] += part
    return out


def test_prime_and_root_orders() -> None:
    assert P == 15 * 2**27 + 1
    assert np.all(P % np.arange(2, int(P**0.5) + 1) != 0)  # prime
    assert all(pow(31, (P - 1) // q, P) != 1 for q in (2, 3, 5))  # 31 generates GF(p)*


@pytest.mark.parametrize("minimum", [0, 1, 255, 256, 257, 700, 768, 769, 1025, 3000, 5000,
                                     99_999_999])
def test_transform_size(minimum: int) -> None:
    n = transform_size(minimum)
    assert n >= max(minimum, 256)
    odd = n // (n & -n)
    assert odd in (1, 3)
    # minimal: no allowed length in [max(minimum, 256), n)
    smaller = [r << a for r in (1, 3) for a in range(8, 28) if max(minimum, 256) <= r << a < n]
    assert smaller == []


def test_transform_size_range() -> None:
    assert transform_size(MAX_SIZE) == MAX_SIZE
    with pytest.raises(ValueError, match="convolution length must be in"):
        transform_size(MAX_SIZE + 1)
    with pytest.raises(ValueError, match="convolution length must be in"):
        transform_size(-1)


# N = N1·N2: 2^8 = 16·16, 2^9 = 16·32 (a radix-2 row stage), 3·2^8 = 48·16 (radix-3
# column stage), 3·2^9 = 48·32, 2^11 = 32·64 (a radix-2 column stage), 3·2^13 = 192·128
@pytest.mark.parametrize("minimum", [256, 512, 768, 1536, 2048, 2**14 + 1])
def test_values_equal_integer_convolution(minimum: int) -> None:
    rng = np.random.default_rng(minimum)
    conv = BitConvolution(minimum)
    n = conv.size
    for la, lb in ((n, n), (n // 3, n - 7), (1, n)):
        a = rng.integers(0, 2, la, dtype=np.uint8)
        b = rng.integers(0, 2, lb, dtype=np.uint8)
        assert np.array_equal(conv.values(a, b), cyclic(a, b, n)), (conv, la, lb)
    ones = np.ones(n, np.uint8)
    assert np.all(conv.values(ones, ones) == n)  # the largest possible entries
    assert np.all(conv.values(ones, np.zeros(n, np.uint8)) == 0)


def test_parity_window_and_xor() -> None:
    rng = np.random.default_rng(3)
    conv = BitConvolution(3000)
    n = conv.size
    a = rng.integers(0, 2, n - 100, dtype=np.uint8)
    b = rng.integers(0, 2, 1234, dtype=np.uint8)
    ref = cyclic(a, b, n) & 1
    for lo, count in ((0, n), (17, 1), (n - 5, 5), (999, 1500), (0, 0)):
        assert np.array_equal(conv.parity_window(a, b, lo, count), ref[lo : lo + count])
        mask = rng.integers(0, 2, count, dtype=np.uint8)
        assert np.array_equal(conv.parity_window(a, b, lo, count, mask),
                              ref[lo : lo + count] ^ mask)


def test_argument_checks() -> None:
    conv = BitConvolution(300)
    n = conv.size
    ok = np.zeros(10, np.uint8)
    with pytest.raises(ValueError, match=f"at most N = {n} bits"):
        conv.parity_window(np.zeros(n + 1, np.uint8), ok, 0, 1)
    with pytest.raises(ValueError, match="window"):
        conv.parity_window(ok, ok, n - 1, 2)
    with pytest.raises(ValueError, match="xor must have count = 3"):
        conv.parity_window(ok, ok, 0, 3, np.zeros(2, np.uint8))
