"""Detector calibration: dark counts, dead time, afterpulsing and efficiency per channel.

1. **Dark counts** — laser off (Laser role); tag rate per channel over ``dark_s``,
   corrected for dead time and afterpulses (:func:`~qkdlab.calibration.fitting.primary_rate`).
2. **Dead time, afterpulsing, primary rate** — laser on at a low flux (attenuator at
   ``count_attenuation_db``), maximum-likelihood fit of the gaps between consecutive
   clicks of each channel (:func:`~qkdlab.calibration.fitting.fit_interarrival`).
3. **Efficiency** — against a calibrated photon flux: the power meter reads Alice's
   output at a high power (attenuator at ``meter_attenuation_db``, background taken
   with the laser off); the flux per detector follows from the known added VOA
   attenuation, the configured link and Bob losses and the detector's share:
   Φ_d = P·T_s·10^(−(ΔA + L_meter + L_link + L_bob)/10)·share_d/(h·c/λ), with T_s the
   modulator's signal-class transmission when the meter sits before the modulator
   (from the bias record's extinction ratio; then the bias calibration comes first).  Then
   η_d = (r_on − r_dark)/Φ_d with the dead-time- and afterpulse-corrected primary
   rates.  The pattern sends every pulse in the signal class while measuring, so power
   and counts see the same light.

Quick check: a short dark-count acquisition must agree with the record within 5σ of
the Poisson counts (or 30 %, whichever is larger).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qkdlab.calibration.fitting import fit_interarrival, gaps_by_channel, primary_rate
from qkdlab.calibration.graph import CheckResult
from qkdlab.calibration.measure import CalibrationContext
from qkdlab.calibration.records import CalibrationError, CalibrationRecord, Quantity


@dataclass(frozen=True)
class DetectorSettings:
    """Durations (s) and attenuator settings (dB) of the detector calibration."""

    dark_s: float = 1.0
    bright_s: float = 0.5
    meter_reads: int = 3
    meter_attenuation_db: float | None = None  # None: the attenuator's lowest setting
    count_attenuation_db: float | None = None  # None: the attenuator's highest setting
    check_s: float = 0.3


class DetectorCalibration:
    """The ``detectors`` node."""

    node = "detectors"

    def __init__(self, ctx: CalibrationContext,
                 settings: DetectorSettings | None = None) -> None:
        self.ctx = ctx
        self.settings = settings or DetectorSettings()

    def run(self) -> CalibrationRecord:
        """Measure and return the record (the caller stores it)."""
        ctx, s = self.ctx, self.settings
        roles, cfg = ctx.roles, ctx.config
        roles.need("laser", "attenuator", "power_meter")
        assert roles.attenuator is not None
        channels = roles.detectors.channel_list
        att_lo, att_hi = cfg.attenuator_limits_db
        a_meter = att_lo if s.meter_attenuation_db is None else s.meter_attenuation_db
        a_count = att_hi if s.count_attenuation_db is None else s.count_attenuation_db
        for a in (a_meter, a_count):
            if not att_lo <= a <= att_hi:
                raise CalibrationError(f"attenuation {a} dB outside the limits {att_lo}…{att_hi}")
        share = cfg.share(channels)
        t_signal, t_signal_err = ctx.signal_transmission()
        path_db = cfg.meter_to_output_db + cfg.output_to_detectors_db()
        a_before = roles.attenuator.get_attenuation_db()
        ctx.use_pattern(cfg.pattern.only(0))
        try:
            # 1. dark counts, and the meter's background, with the light off
            ctx.light(False)
            dark_block = ctx.acquire(s.dark_s)
            dark_tags = dark_block.counts(channels)
            dark_rate = ctx.rates(dark_block)
            # 2. power at a high level (background subtracted)
            roles.attenuator.set_attenuation_db(a_meter)
            power, power_err, background = ctx.power_above_background(s.meter_reads)
            if not power > 10 * max(power_err, 1e-18):
                raise CalibrationError(f"power meter reads {power:.3g} ± {power_err:.2g} W "
                                       "above background: no light at the meter?")
            # 3. clicks at a low flux
            roles.attenuator.set_attenuation_db(a_count)
            ctx.light(True)
            bright = ctx.acquire(s.bright_s)
        finally:
            roles.attenuator.set_attenuation_db(a_before)
        bright_rate = ctx.rates(bright)
        gaps = gaps_by_channel(bright.time_ps, bright.channel, channels)
        q: dict[str, Quantity] = {}
        photons_per_s = (power * t_signal / cfg.photon_energy_j
                         * 10 ** (-((a_count - a_meter) + path_db) / 10))
        rel_flux_err = math.hypot(power_err / power, t_signal_err / t_signal)
        hist_edges = np.linspace(0.0, 20e-6, 201)
        columns: dict[str, tuple[str, list[float]]] = {}
        for ch in channels:
            fit = fit_interarrival(gaps[ch])
            r_dark = primary_rate(dark_rate[ch], fit.dead_time_s, fit.afterpulse_prob,
                                  fit.afterpulse_tau_s)
            r_dark_err = r_dark / math.sqrt(max(dark_tags[ch], 1))
            flux = photons_per_s * share[ch]
            eta = (fit.primary_rate_hz - r_dark) / flux
            eta_err = math.sqrt((fit.primary_rate_error_hz / flux) ** 2 + (r_dark_err / flux) ** 2
                                + (eta * rel_flux_err) ** 2)
            q[f"dark_cps_ch{ch}"] = Quantity(r_dark, r_dark_err, "Hz")
            q[f"dead_time_s_ch{ch}"] = Quantity(fit.dead_time_s, fit.dead_time_error_s, "s")
            q[f"afterpulse_prob_ch{ch}"] = Quantity(fit.afterpulse_prob, fit.afterpulse_prob_error)
            q[f"afterpulse_tau_s_ch{ch}"] = Quantity(fit.afterpulse_tau_s,
                                                     fit.afterpulse_tau_error_s, "s")
            q[f"efficiency_ch{ch}"] = Quantity(eta, eta_err)
            q[f"tag_rate_hz_ch{ch}"] = Quantity(bright_rate[ch],
                                                math.sqrt(bright_rate[ch] / s.bright_s), "Hz")
            counts, _ = np.histogram(gaps[ch], bins=hist_edges)
            columns[f"gaps_ch{ch}"] = ("", counts.tolist())
        q["photon_flux_hz"] = Quantity(photons_per_s, photons_per_s * rel_flux_err, "Hz")
        q["meter_power_w"] = Quantity(power, power_err, "W")
        settings = {"meter_attenuation_db": a_meter, "signal_transmission": t_signal,
                    "count_attenuation_db": a_count, "path_loss_db": path_db,
                    "detector_share": {str(k): v for k, v in share.items()},
                    "meter_background_w": background, "dark_s": s.dark_s, "bright_s": s.bright_s}
        dataset = ctx.save("detectors", ("gap_s", "s", (hist_edges[:-1] + hist_edges[1:]) / 2),
                           columns, {**settings, "quantities": {k: v.to_json()
                                                                for k, v in q.items()}})
        bad = [ch for ch in channels if not 0 < q[f"efficiency_ch{ch}"].value <= 1]
        note = f"efficiency outside (0, 1] on channel(s) {bad}" if bad else ""
        return ctx.make_record(self.node, q, settings, dataset, good=not bad, note=note)

    def check(self, record: CalibrationRecord) -> CheckResult:
        """Dark counts again, short: within 5σ (Poisson) or 30 % of the record."""
        ctx = self.ctx
        channels = ctx.roles.detectors.channel_list
        ctx.light(False)
        block = ctx.acquire(self.settings.check_s)
        counts = block.counts(channels)
        worst = ""
        for ch in channels:
            expected = record.value(f"dark_cps_ch{ch}") * self.settings.check_s
            tol = max(5 * math.sqrt(max(expected, 1.0)), 0.3 * expected)
            if abs(counts[ch] - expected) > tol:
                worst = f"channel {ch}: {counts[ch]} dark counts, expected {expected:.0f}"
                return CheckResult(False, worst)
        return CheckResult(True, "dark counts as recorded")
