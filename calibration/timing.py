"""Timing calibration: channel delays, acceptance window and jitter per detector.

1. All tagger input delays go to a known base (``base_delay_ps``); one frame with the
   run's pattern is synchronised on the detections (qubit-based) and every detection is
   assigned to its pulse within a wide window (80 % of the period).
2. Per channel, the residuals (tag time − expected time of its pulse) are fitted by a
   Gaussian on a flat background (:func:`~qkdlab.calibration.fitting.fit_peak`): centre,
   σ and FWHM of the jitter (detector and tagger together).
3. Input delays are set so that every channel's peak sits at the latest channel's: the
   detectors are aligned to one another and to Alice's pulse grid.  A second frame
   verifies the alignment (residual centres near 0 ps).
4. The acceptance window for the run is ``window_sigmas`` × the largest σ (default 6:
   ±3σ, 99.7 % of the photons), never more than 80 % of the period.

Delays are found modulo one pulse period (the detections cannot tell pulses apart).
Quick check: one frame; every channel's centre within ``check_tolerance_ps`` and its
σ within 20 % of the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qkdlab.calibration.fitting import PeakFit, fit_peak
from qkdlab.calibration.graph import CheckResult
from qkdlab.calibration.measure import CalibrationContext
from qkdlab.calibration.records import CalibrationError, CalibrationRecord, Quantity
from qkdlab.experiments.bb84.sync import SyncSolution, assign
from qkdlab.tags import TagBlock


@dataclass(frozen=True)
class TimingSettings:
    """Frame length (s), window rule and limits of the timing calibration."""

    frame_s: float = 0.1
    window_sigmas: float = 6.0
    base_delay_ps: int = 0
    max_delay_ps: int = 4_000_000  # ID900/ID1000: above 4 µs the delay buffer may overflow
    check_tolerance_ps: float = 25.0


class TimingCalibration:
    """The ``timing`` node."""

    node = "timing"

    def __init__(self, ctx: CalibrationContext, settings: TimingSettings | None = None) -> None:
        self.ctx = ctx
        self.settings = settings or TimingSettings()

    def _peaks(self, block: TagBlock, sol: SyncSolution) -> dict[int, PeakFit]:
        """Residual peak of each channel, relative to the solution's reference channel."""
        detectors = self.ctx.roles.detectors
        span = 0.8 * sol.period_ps
        res = assign(block.time_ps, block.channel, sol, detectors, span)
        out = {}
        for i, ch in enumerate(detectors.channel_list):
            r = res.residual_ps[res.detector == i] + sol.channel_delay_ps[ch]
            out[ch] = fit_peak(r, span)
        return out

    def _frame(self) -> tuple[TagBlock, SyncSolution]:
        settings = self.ctx.bb84_settings(window_ps=0.8 * self.ctx.config.period_ps)
        _, sol, block = self.ctx.frame(self.settings.frame_s, settings)
        return block, sol

    def run(self) -> CalibrationRecord:
        ctx, s = self.ctx, self.settings
        roles = ctx.roles
        channels = roles.detectors.channel_list
        ctx.use_pattern(ctx.config.pattern)
        ctx.light(True)
        for ch in channels:
            roles.tagger.set_input_delay(ch, s.base_delay_ps)
        block, sol = self._frame()
        before = self._peaks(block, sol)
        latest = max(p.centre for p in before.values())
        delays = {ch: s.base_delay_ps + round(latest - before[ch].centre) for ch in channels}
        for ch, d in delays.items():
            if not 0 <= d <= s.max_delay_ps:
                raise CalibrationError(f"channel {ch}: delay {d} ps outside 0…{s.max_delay_ps} ps")
        for ch, d in delays.items():
            roles.tagger.set_input_delay(ch, int(d))
        block, sol = self._frame()
        after = self._peaks(block, sol)
        ref = after[channels[0]].centre
        sigma_max = max(p.sigma for p in after.values())
        window = min(s.window_sigmas * sigma_max, 0.8 * ctx.config.period_ps)
        q: dict[str, Quantity] = {"window_ps": Quantity(window, s.window_sigmas * max(
            p.sigma_error for p in after.values()), "ps")}
        for ch in channels:
            b, a = before[ch], after[ch]
            q[f"delay_ps_ch{ch}"] = Quantity(float(delays[ch]), b.centre_error, "ps")
            q[f"skew_before_ps_ch{ch}"] = Quantity(b.centre - before[channels[0]].centre,
                                                   math.hypot(b.centre_error,
                                                              before[channels[0]].centre_error),
                                                   "ps")
            q[f"centre_ps_ch{ch}"] = Quantity(a.centre - ref, a.centre_error, "ps")
            q[f"jitter_fwhm_ps_ch{ch}"] = Quantity(a.fwhm, a.fwhm_error, "ps")
            q[f"signal_fraction_ch{ch}"] = Quantity(a.signal_fraction, math.nan)
        q["jitter_fwhm_ps"] = Quantity(max(p.fwhm for p in after.values()),
                                       max(p.fwhm_error for p in after.values()), "ps")
        q["period_ps"] = Quantity(sol.period_ps, math.nan, "ps")
        settings = {"input_delay_ps": {str(k): v for k, v in delays.items()},
                    "window_sigmas": s.window_sigmas, "frame_s": s.frame_s}
        edges = np.linspace(-0.4 * sol.period_ps, 0.4 * sol.period_ps, 401)
        res = assign(block.time_ps, block.channel, sol, roles.detectors, 0.8 * sol.period_ps)
        columns = {f"counts_ch{ch}": ("", np.histogram(
            res.residual_ps[res.detector == i], bins=edges)[0].tolist())
            for i, ch in enumerate(channels)}
        dataset = ctx.save("timing", ("residual_ps", "ps", (edges[:-1] + edges[1:]) / 2), columns,
                           {**settings, "quantities": {k: v.to_json() for k, v in q.items()}})
        worst = max(abs(q[f"centre_ps_ch{ch}"].value) for ch in channels)
        good = worst <= s.check_tolerance_ps
        note = "" if good else f"channels still {worst:.0f} ps apart after alignment"
        return ctx.make_record(self.node, q, settings, dataset, good=good, note=note)

    def check(self, record: CalibrationRecord) -> CheckResult:
        """One frame: centres within tolerance, jitter within 20 % of the record."""
        ctx = self.ctx
        ctx.use_pattern(ctx.config.pattern)
        ctx.light(True)
        block, sol = self._frame()
        peaks = self._peaks(block, sol)
        channels = ctx.roles.detectors.channel_list
        ref = peaks[channels[0]].centre
        for ch in channels:
            centre = peaks[ch].centre - ref
            if abs(centre) > self.settings.check_tolerance_ps:
                return CheckResult(False, f"channel {ch} off by {centre:.0f} ps")
            fwhm = record.value(f"jitter_fwhm_ps_ch{ch}")
            if abs(peaks[ch].fwhm - fwhm) > 0.2 * fwhm:
                return CheckResult(False, f"channel {ch} jitter {peaks[ch].fwhm:.0f} ps, "
                                          f"recorded {fwhm:.0f} ps")
        return CheckResult(True, "delays and jitter as recorded")
