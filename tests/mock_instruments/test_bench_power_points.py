"""Where a power meter can sit on the bench, and what it reads there."""

from __future__ import annotations

import math

import pytest

from qkdlab.mock_instruments.bench import Bench, config_from_mapping


def test_modulator_tap_is_alices_output_before_the_fixed_attenuation() -> None:
    bench = Bench(config_from_mapping({}), seed=1)
    bench.alice.laser_on = True
    fixed_db = bench.config().alice.fixed_attenuation_db
    out = bench.optical_power_at("after_modulator")
    tap = bench.optical_power_at("modulator_tap")
    assert tap == pytest.approx(out * 10 ** (fixed_db / 10), rel=1e-12)
    assert tap > 1e-7  # µW: readable by a power meter, unlike Alice's output (pW)


def test_modulator_tap_follows_the_bias_through_the_mixed_pattern() -> None:
    bench = Bench(config_from_mapping({}), seed=1)
    bench.alice.laser_on = True
    mu_in = bench.config()
    readings = {}
    for bias in (-2.0, 0.0, 2.0):
        bench.alice.im_bias_v = bias
        mus = bench.mean_photon_numbers()
        probs = mu_in.alice.pattern.intensity_probs
        mixed = sum(p * m for p, m in zip(probs, mus, strict=True))
        readings[bias] = (bench.optical_power_at("modulator_tap"), mixed)
    # the tap reads the pattern-weighted transmission: its ratio to the mixed μ is fixed
    ratios = [tap / mixed for tap, mixed in readings.values()]
    assert max(ratios) / min(ratios) == pytest.approx(1.0, abs=1e-9)
    assert not math.isclose(readings[-2.0][0], readings[2.0][0], rel_tol=0.05)
