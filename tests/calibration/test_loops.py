"""Each loop recovers the mock bench's ground truth from a random start.

Tolerances: 5σ of the loop's own counting-statistics uncertainty (its record), plus
the model's stated simplifications where noted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from qkdlab.calibration.bias import BiasCalibration
from qkdlab.calibration.detectors import DetectorCalibration
from qkdlab.calibration.mu import MuCalibration
from qkdlab.calibration.polarization import PolarizationCalibration
from qkdlab.calibration.timing import TimingCalibration

from .conftest import mock_rig

RNG = np.random.default_rng(20241123)


def within(value: float, truth: float, sigma: float, n_sigma: float = 5.0) -> bool:
    return abs(value - truth) <= n_sigma * sigma


def assert_aligned(rec: Any, delays: dict[int, int]) -> None:
    """A good timing record: the skews it saw before alignment are the bench's delay
    differences, and after it bench delay + applied input delay agree on every channel
    (1 ps grid)."""
    assert rec.good, rec.note
    for ch in (2, 3, 4):
        skew = rec.quantities[f"skew_before_ps_ch{ch}"]
        assert within(skew.value, delays[ch] - delays[1], skew.uncertainty), ch
    total = {ch: delays[ch] + rec.value(f"delay_ps_ch{ch}") for ch in delays}
    spread = max(total.values()) - min(total.values())
    sigma = max(rec.uncertainty(f"delay_ps_ch{ch}") for ch in delays)
    assert spread <= 5 * sigma * math.sqrt(2) + 1


def test_timing_aligns_random_channel_delays_and_measures_the_jitter() -> None:
    delays = {ch: int(d) for ch, d in zip((1, 2, 3, 4), RNG.integers(0, 3000, 4), strict=True)}
    with mock_rig(seed=31, tagger={"delay_ps": delays}) as rig:
        rec = TimingCalibration(rig.ctx).run()
        cfg = rig.bench.config()
    assert_aligned(rec, delays)
    # jitter: detector σ (100 ps) and tagger σ (9 ps) in quadrature
    fwhm = 2 * math.sqrt(2 * math.log(2)) * math.hypot(cfg.bob.detectors[0].jitter_ps,
                                                       cfg.tagger.jitter_ps)
    for ch in delays:
        q = rec.quantities[f"jitter_fwhm_ps_ch{ch}"]
        assert within(q.value, fwhm, q.uncertainty), (ch, q, fwhm)
    assert rec.value("window_ps") == pytest.approx(6 * fwhm / 2.3548, rel=0.05)


def test_timing_aligns_delays_of_several_pulse_periods() -> None:
    # 100 MHz: channels 3 and 4 lag by 1.3 and 2.7 periods (metres of extra cable); the
    # detection phases alone would place them 3 ns and 3 ns early, on the wrong pulse
    delays = {1: 0, 2: 500, 3: 13_000, 4: 27_000}
    with mock_rig(seed=33, tagger={"delay_ps": delays}) as rig:
        period = rig.ctx.config.period_ps
        assert period == pytest.approx(10_000)
        rec = TimingCalibration(rig.ctx).run()
    assert_aligned(rec, delays)


def test_bias_detectors_and_mu_recover_the_bench_from_a_random_start() -> None:
    phase = float(RNG.uniform(-math.pi, math.pi))
    v_pi = float(RNG.uniform(3.5, 5.0))
    voa = float(RNG.uniform(5.0, 15.0))
    with mock_rig(seed=32, alice={"im_phase_rad": phase, "v_pi_v": v_pi,
                                  "attenuation_db": voa}) as rig:
        ctx, bench = rig.ctx, rig.bench
        bias = BiasCalibration(ctx).run()
        ctx.store.add(bias)
        theta = math.pi * bench.alice.im_bias_v / v_pi + bench.modulator_phase_rad()
        det = DetectorCalibration(ctx).run()
        ctx.store.add(det)
        mu = MuCalibration(ctx).run()
        ctx.store.add(mu)
        truth_mu = bench.mean_photon_numbers()
        cfg = bench.config()
    # bias: Vπ and φ of the modulator; the signal class at the transfer maximum
    assert within(bias.value("v_pi_v"), v_pi, bias.uncertainty("v_pi_v"))
    assert within(math.remainder(bias.value("phase_rad") - phase, 2 * math.pi), 0.0,
                  bias.uncertainty("phase_rad"))
    assert abs(math.remainder(theta, 2 * math.pi)) <= 5 * bias.uncertainty("phase_rad")
    assert within(bias.value("extinction_ratio_db"), cfg.alice.extinction_ratio_db,
                  bias.uncertainty("extinction_ratio_db"))
    # detectors: every channel's parameters
    d0 = cfg.bob.detectors[0]
    for ch in (1, 2, 3, 4):
        q = det.quantities
        assert within(q[f"efficiency_ch{ch}"].value, d0.efficiency,
                      q[f"efficiency_ch{ch}"].uncertainty), ch
        assert within(q[f"dark_cps_ch{ch}"].value, d0.dark_count_cps,
                      q[f"dark_cps_ch{ch}"].uncertainty), ch
        assert within(q[f"afterpulse_prob_ch{ch}"].value, d0.afterpulse_prob,
                      q[f"afterpulse_prob_ch{ch}"].uncertainty), ch
        # the edge of the gap distribution: tagger jitter (9 ps) and ~1/(N·f0) spacing
        assert q[f"dead_time_s_ch{ch}"].value == pytest.approx(d0.dead_time_s, abs=1e-9)
    # mu: the set μ_signal and the measured decoy and vacuum levels
    for k, name in enumerate(("mu_signal", "mu_decoy", "mu_vacuum")):
        assert within(mu.value(name), truth_mu[k], mu.uncertainty(name) + 1e-3 * truth_mu[k]), \
            (name, mu.value(name), truth_mu[k])  # + the VOA's 0.001 dB setting grid
    assert truth_mu[0] == pytest.approx(0.5, rel=0.02)
    assert mu.good, mu.note


def test_polarization_undoes_a_random_fibre_rotation() -> None:
    with mock_rig(seed=33) as rig:
        bench = rig.bench
        with bench.lock:  # a random fibre rotation: a burst of polarization diffusion
            bench.channel.pol_diffusion_rad2_per_s = 500.0
            bench.alice.laser_on = False
            bench.acquire(0.01)
            before = bench.channel_rotation()
            bench.channel.pol_diffusion_rad2_per_s = 0.0
        start = [float(x) for x in RNG.uniform(20.0, 340.0, 3)]
        controller = rig.ctx.roles.polarization
        assert controller is not None
        controller.set_actuators(start)
        misaligned = bench.bob.pc_rotation @ before
        rec = PolarizationCalibration(rig.ctx).run()
        after = bench.bob.pc_rotation @ bench.channel_rotation()
        e_mis = bench.config().bob.misalignment
    angle = lambda r: math.acos(min(1.0, (np.trace(r) - 1) / 2))  # noqa: E731
    assert angle(misaligned) > 0.5  # a real misalignment to undo
    # the QBER a residual rotation leaves (≈ α²/6 averaged) within 5σ of e_mis + extras
    for basis in ("qber_z", "qber_x"):
        q = rec.quantities[basis]
        assert q.value <= e_mis + 0.01 + 5 * q.uncertainty, (basis, q)
    assert angle(after) < 0.15
    assert rec.good
