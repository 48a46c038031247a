"""The two parties' post-processing over the authenticated in-process channel."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from qkdlab.protocol import pipeline
from qkdlab.protocol.pipeline import PostProcessingParameters, postprocess_in_process
from qkdlab.testing.records import sifted_records as records

PARAMS = PostProcessingParameters(intensities=(0.5, 0.1, 0.0), probabilities=(0.7, 0.2, 0.1),
                                  timeout_s=20.0)


def test_alice_never_asks_for_more_key_than_the_block_holds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = pipeline.secure_key_length

    def too_long(*args: Any, **kwargs: Any) -> Any:  # a bound gone wrong
        return dataclasses.replace(real(*args, **kwargs), length=10**9, reason=None)

    monkeypatch.setattr(pipeline, "secure_key_length", too_long)
    pool = np.random.default_rng(1).integers(0, 2, 1 << 20, dtype=np.uint8)
    a, b = postprocess_in_process(*records(200_000, 0.02, 2), PARAMS, pool, seed=3)
    assert a.aborted
    assert b.aborted
    assert a.key is None
    assert b.key is None
    assert a.reason is not None
    assert "exceeds the" in a.reason
    assert "inconsistent bounds" in a.reason


def test_a_released_outcome_keeps_its_figures_and_drops_its_key_material() -> None:
    pool = np.random.default_rng(1).integers(0, 2, 1 << 20, dtype=np.uint8)
    a, _ = postprocess_in_process(*records(400_000, 0.02, 4), PARAMS, pool, seed=5)
    assert not a.aborted
    assert a.key is not None
    assert a.pool_refill is not None
    assert a.pool_refill.size
    n = a.key.size
    released = a.released()
    assert released.key is None
    assert released.pool_refill is None
    assert released.secure_key_bits == n > 0
    assert released.summary() == a.summary()
    assert released.released().secure_key_bits == n  # idempotent
    assert a.key is not None  # the original is untouched
