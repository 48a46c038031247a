"""Alice's pattern source: a pure, counter-based function of (seed, pulse index)."""

from __future__ import annotations

import numpy as np
import pytest

from qkdlab.mock_instruments.bench import PatternConfig, marker_pulse_indices, symbols
from qkdlab.mock_instruments.bench.symbols import (
    GOLDEN_GAMMA,
    MASK64,
    SALT_SYMBOLS,
    hash_words,
    splitmix64_scalar,
    stream_key,
)


def test_hash_is_splitmix64_of_the_counter() -> None:
    """Word i is splitmix64's finaliser of key + (i + 1)·γ (reference scalar code)."""
    idx = np.array([0, 1, 2, 12345, 2**40 + 7, 2**62], dtype=np.int64)
    key = stream_key(42, SALT_SYMBOLS)
    expected = [splitmix64_scalar((key + (int(i) + 1) * GOLDEN_GAMMA) & MASK64) for i in idx]
    assert hash_words(42, SALT_SYMBOLS, idx).tolist() == expected


def test_symbols_are_a_pure_function_of_seed_and_index() -> None:
    """Any order or chunking of the same indices gives the same symbols."""
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 10**13, size=20_000, dtype=np.int64)
    whole = symbols(3, idx)
    perm = rng.permutation(idx.size)
    shuffled = symbols(3, idx[perm])
    chunks = [symbols(3, part) for part in np.array_split(idx, 7)]
    for k in range(3):
        assert whole[k].dtype == np.int8
        np.testing.assert_array_equal(shuffled[k], whole[k][perm])
        np.testing.assert_array_equal(np.concatenate([c[k] for c in chunks]), whole[k])
    other = symbols(4, idx)
    assert not all(np.array_equal(other[k], whole[k]) for k in range(3))


@pytest.mark.parametrize("pattern", [PatternConfig(), PatternConfig(0.9, 0.5, 0.3, 0.2)])
def test_symbol_frequencies_match_probabilities(pattern: PatternConfig) -> None:
    """Basis, bit and class frequencies within 5σ of their binomial spread (n = 10⁶)."""
    n = 1_000_000
    basis, bit, klass = symbols(11, np.arange(n, dtype=np.int64), pattern)

    def within_5_sigma(count: int, p: float) -> bool:
        return abs(count - n * p) < 5.0 * np.sqrt(n * p * (1 - p))

    assert within_5_sigma(int(np.count_nonzero(basis == 0)), pattern.p_z)
    assert within_5_sigma(int(np.count_nonzero(bit == 1)), 0.5)
    for k, p in enumerate(pattern.intensity_probs):
        assert within_5_sigma(int(np.count_nonzero(klass == k)), p)
    assert set(np.unique(basis)) <= {0, 1}
    assert set(np.unique(klass)) <= {0, 1, 2}


def test_bits_are_independent_of_basis_and_class() -> None:
    """P(bit = 1 | basis, class) = ½ within 5σ in every cell."""
    n = 600_000
    basis, bit, klass = symbols(5, np.arange(n, dtype=np.int64))
    for b in (0, 1):
        for k in (0, 1, 2):
            cell = (basis == b) & (klass == k)
            m = int(np.count_nonzero(cell))
            ones = int(np.count_nonzero(bit[cell]))
            assert abs(ones - m / 2) < 5 * np.sqrt(m / 4)


def test_marker_indices_are_frame_starts() -> None:
    """Frame markers at the multiples of frame_pulses inside [first, stop)."""
    np.testing.assert_array_equal(marker_pulse_indices(0, 10, 4), [0, 4, 8])
    np.testing.assert_array_equal(marker_pulse_indices(5, 12, 4), [8])
    np.testing.assert_array_equal(marker_pulse_indices(8, 9, 4), [8])
    assert marker_pulse_indices(9, 12, 4).size == 0
