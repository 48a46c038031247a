"""Calibration after a run: the run's safe state ramped Bob's detector bias down and
left Alice's attenuator at its highest setting; calibration puts both back to their
operating points before a loop counts anything."""

from __future__ import annotations

import math

from qkdlab.calibration.graph import MaintainReport, State
from qkdlab.calibration.suite import build_graph
from qkdlab.roles import bb84_roles

from .conftest import mock_rig

COUNT_S = 0.2


def test_operating_point_restores_what_a_run_safe_state_left() -> None:
    with mock_rig(seed=3) as rig:
        ctx = rig.ctx
        assert len(ctx.roles.detector_units) == 4
        assert ctx.operating_attenuation_db() == ctx.roles.attenuation_db is not None
        ctx.use_pattern(ctx.config.pattern)
        ctx.light(True)
        fresh = ctx.rates(ctx.acquire(COUNT_S))
        assert bb84_roles(rig.loaded).safe_state() == []  # as at the end of a run
        assert not any(d.enabled for d in rig.bench.bob.detectors)
        ctx.operating_point()
        ctx.use_pattern(ctx.config.pattern)
        ctx.light(True)
        after = ctx.rates(ctx.acquire(COUNT_S))
        assert all(d.enabled for d in rig.bench.bob.detectors)
        target = ctx.roles.attenuation_db
        assert target is not None
        assert abs(rig.bench.alice.attenuation_db - target) < 0.006  # the VOA's 0.01 dB steps
        channels = ctx.roles.detectors.channel_list
        assert len(channels) == 4
        for ch in channels:
            n_fresh, n_after = fresh[ch] * COUNT_S, after[ch] * COUNT_S
            assert n_fresh > 1000
            # same light, same detectors: the same rate within 5 sigma of counting
            assert abs(n_after - n_fresh) < 5 * math.sqrt(n_fresh + n_after), (ch, fresh, after)


def test_a_detector_calibration_after_a_run_measures_the_bench() -> None:
    with mock_rig(seed=4) as rig:
        assert bb84_roles(rig.loaded).safe_state() == []  # a run ended just before
        graph = build_graph(rig.ctx)
        report = MaintainReport()
        assert graph.maintain("detectors", report) is State.GOOD, report.actions
        det = rig.ctx.latest_good("detectors")
        assert det is not None
        truth = rig.bench.config().bob.detectors[0]
        for ch in rig.ctx.roles.detectors.channel_list:
            eff = det.quantities[f"efficiency_ch{ch}"]
            dark = det.quantities[f"dark_cps_ch{ch}"]
            assert abs(eff.value - truth.efficiency) <= 5 * eff.uncertainty, ch
            assert abs(dark.value - truth.dark_count_cps) <= 5 * dark.uncertainty, ch
