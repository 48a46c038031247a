"""Sifting: counts, errors and multi-click squashing on hand-made detections."""

from __future__ import annotations

import numpy as np
import pytest

from qkdlab.patterns import bb84_symbols, symbol_constants
from qkdlab.protocol.sifting import SiftedStore, sift, sift_pattern

# four detectors: Z arm (H=0, V=1), X arm (D=0, A=1)
DET_BASIS = [0, 0, 1, 1]
DET_BIT = [0, 1, 0, 1]


def run(rows: list[tuple[int, int, int, int, int]], seed: int = 0):  # type: ignore[no-untyped-def]
    arr = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return sift(arr[:, 0], arr[:, 1], arr[:, 2].astype(np.int8), arr[:, 3].astype(np.int8),
                arr[:, 4].astype(np.int8), DET_BASIS, DET_BIT, np.random.default_rng(seed))


def test_matching_and_mismatching_bases() -> None:
    # (pulse, detector, alice basis, alice bit, intensity)
    result = run([
        (10, 0, 0, 0, 0),  # Z, correct
        (11, 1, 0, 0, 0),  # Z, error
        (12, 2, 0, 1, 1),  # Bob X, Alice Z: discarded
        (13, 3, 1, 1, 1),  # X, correct, decoy
        (14, 2, 1, 1, 2),  # X, error, vacuum
    ])
    assert result.pulse_index.tolist() == [10, 11, 13, 14]
    assert result.detected.tolist() == [2, 2, 1]
    assert result.sifted.tolist() == [[2, 0, 0], [0, 1, 1]]
    assert result.errors.tolist() == [[1, 0, 0], [0, 0, 1]]
    assert result.qber(0) == pytest.approx(0.5)
    assert result.qber(1, 1) == 0.0
    alice, bob = result.key(0)
    assert alice.tolist() == [0, 0]
    assert bob.tolist() == [0, 1]


def test_rows_in_any_order_give_the_same_result() -> None:
    rows = [(5, 0, 0, 0, 0), (3, 3, 1, 1, 0), (9, 1, 0, 1, 1)]
    a, b = run(rows), run(rows[::-1])
    assert a.pulse_index.tolist() == b.pulse_index.tolist() == [3, 5, 9]
    assert np.array_equal(a.bob_bit, b.bob_bit)


def test_double_clicks_are_squashed_to_random_bits() -> None:
    # the same pulse clicks H and V (Z basis): a random bit, counted once
    rows = [(p, d, 0, 0, 0) for p in range(4000) for d in (0, 1)]
    result = run(rows, seed=3)
    assert result.double_clicks == 4000
    assert result.sifted[0, 0] == 4000
    # the random bit is wrong half the time: 5 sigma of a binomial(4000, 1/2)
    assert abs(result.errors[0, 0] - 2000) < 5 * np.sqrt(4000 * 0.25)


def test_cross_basis_clicks_pick_a_random_basis() -> None:
    rows = [(p, d, 0, 0, 0) for p in range(4000) for d in (0, 2)]
    result = run(rows, seed=4)
    assert result.cross_basis_clicks == 4000
    assert abs(result.sifted[0, 0] - 2000) < 5 * np.sqrt(4000 * 0.25)


def test_empty_input() -> None:
    result = run([])
    assert result.pulse_index.size == 0
    assert result.detected.tolist() == [0, 0, 0]
    assert np.isnan(result.qber(0))


def test_multi_click_coins_are_the_generators_integer_draws() -> None:
    # the squashing coins of a pulse are those of its first row (in pulse order) from
    # rng.integers(0, 2, n, int8) then rng.integers(0, 2, n, uint8): checked on pulses
    # whose clicks disagree in basis (random basis and bit) at every row position
    rows = [(p, d, 0, 0, 0) for p in range(300) for d in (0, 3)]
    result = run(rows, seed=9)
    rng = np.random.default_rng(9)
    coin_basis = rng.integers(0, 2, size=len(rows), dtype=np.int8)
    coin_bit = rng.integers(0, 2, size=len(rows), dtype=np.uint8)
    first = np.arange(0, len(rows), 2)  # the first row of each pulse
    kept = coin_basis[first] == 0  # Alice sent Z: kept when the coin says Z
    assert result.pulse_index.tolist() == np.flatnonzero(kept).tolist()
    assert result.bob_bit.tolist() == coin_bit[first][kept].tolist()


def test_sift_pattern_equals_sift_with_the_record_looked_up() -> None:
    rng = np.random.default_rng(2)
    pulses = np.sort(rng.integers(0, 10**7, 30_000))
    pulses = np.sort(np.concatenate([pulses, pulses[rng.random(pulses.size) < 0.05]]))
    det = rng.integers(0, 4, pulses.size).astype(np.int8)
    pattern = symbol_constants(7, 0.8, 0.6, 0.3)
    basis, bit, intensity = bb84_symbols(7, pulses, 0.8, 0.6, 0.3)
    a = sift(pulses, det, basis, bit, intensity, DET_BASIS, DET_BIT, np.random.default_rng(4))
    b = sift_pattern(pulses, det, pattern, np.array(DET_BASIS, np.int8),
                     np.array(DET_BIT, np.int8), np.random.default_rng(4))
    assert a.double_clicks == b.double_clicks > 1000
    for field in ("pulse_index", "basis", "intensity", "alice_bit", "bob_bit", "detected",
                  "sifted", "errors"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_sifted_store_keeps_each_frames_records() -> None:
    store = SiftedStore(block_rows=1000)
    pattern = symbol_constants(1)
    results = []
    for frame in range(5):  # 5 × ~300 records: the store moves on to new blocks
        pulses = np.arange(frame * 1000, frame * 1000 + 600, dtype=np.int64)
        results.append(sift_pattern(pulses, (pulses % 4).astype(np.int8), pattern,
                                    np.array(DET_BASIS, np.int8), np.array(DET_BIT, np.int8),
                                    np.random.default_rng(frame), store))
    for frame, result in enumerate(results):  # earlier frames untouched by later ones
        assert result.pulse_index.min() >= frame * 1000
        assert result.pulse_index.max() < frame * 1000 + 600
        expected_basis = bb84_symbols(1, result.pulse_index)[0]
        np.testing.assert_array_equal(result.basis, expected_basis)


def test_bad_rows_are_refused_with_the_allowed_range() -> None:
    with pytest.raises(ValueError, match=r"alice_intensity must lie in \[0, 2\]"):
        run([(1, 0, 0, 0, 3)])
    with pytest.raises(IndexError):
        run([(1, 7, 0, 0, 0)])  # no detector 7
    with pytest.raises(ValueError, match=r"detector must lie in \[0, 3\]"):
        sift_pattern(np.array([1], np.int64), np.array([5], np.int8), symbol_constants(1),
                     np.array(DET_BASIS, np.int8), np.array(DET_BIT, np.int8),
                     np.random.default_rng(0))


def test_sift_pattern_refuses_unsorted_rows_and_too_many_detectors() -> None:
    pattern = symbol_constants(1)
    basis, bit = np.array(DET_BASIS, np.int8), np.array(DET_BIT, np.int8)
    rows = np.arange(2000, dtype=np.int64)
    rows[1500], rows[1501] = rows[1501], rows[1500]
    with pytest.raises(ValueError, match="must be sorted"):
        sift_pattern(rows, np.zeros(rows.size, np.int8), pattern, basis, bit,
                     np.random.default_rng(0))
    with pytest.raises(ValueError, match="1 to 8 detectors"):
        sift(np.arange(3), np.zeros(3, np.int64), np.zeros(3, np.int8), np.zeros(3, np.int8),
             np.zeros(3, np.int8), [0] * 9, [0] * 9, np.random.default_rng(0))
