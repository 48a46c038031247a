"""Sifting: counts, errors and multi-click squashing on hand-made detections."""

from __future__ import annotations

import numpy as np
import pytest

from qkdlab.protocol.sifting import sift

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
