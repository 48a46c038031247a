"""Mean photon numbers: set μ_signal with the power meter and the attenuator, measure
μ_decoy and μ_vacuum, verify by count rates.

1. Every pulse in the signal class; the power meter reads the light at a high level
   (attenuator at its lowest setting, background from a laser-off reading):
   μ_s(A₀) = P·T_s·10^(−L_meter/10)/(h·c/λ·f), with T_s the modulator's signal
   transmission when the meter sits before the modulator (bias record).
2. The attenuator goes to A = A₀ + 10·log10(μ_s(A₀)/μ_target) (inside its limits).
3. Class ratios from count rates, all pulses in one class at a time (primary rates:
   dead time, afterpulses and dark counts removed with the detector record):
   ρ_decoy = r_decoy/r_signal at the highest attenuation (linear regime), ρ_vacuum at
   the lowest (the vacuum class is dim) scaled by the known attenuation step.
   μ_k = ρ_k·μ_s.  The decoy and vacuum levels are set by Alice's drive amplitudes,
   which no role exposes: they are measured and recorded, not changed.
4. Verification: with the run's pattern at A, the tag rate of every detector is
   predicted from the μ's, the detector record (efficiency, dark counts, dead time,
   afterpulses) and the configured link loss; the measured/predicted ratio must lie
   within ``verify_tolerance``.

Quick check: the power meter at the set attenuation (background subtracted) must give
μ_signal within 3 % (or 5σ) of the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qkdlab.calibration.fitting import primary_rate
from qkdlab.calibration.graph import CheckResult
from qkdlab.calibration.measure import CalibrationContext
from qkdlab.calibration.records import CalibrationError, CalibrationRecord, Quantity


@dataclass(frozen=True)
class MuSettings:
    """Readings, durations (s) and tolerances of the μ calibration."""

    meter_reads: int = 3
    count_s: float = 0.3
    verify_s: float = 0.2
    verify_tolerance: float = 0.05
    check_tolerance: float = 0.03


class MuCalibration:
    """The ``mu`` node."""

    node = "mu"

    def __init__(self, ctx: CalibrationContext, settings: MuSettings | None = None) -> None:
        self.ctx = ctx
        self.settings = settings or MuSettings()

    def _mu_per_watt(self) -> tuple[float, float]:
        """Signal photons per pulse at Alice's output per W at the meter, and its error."""
        cfg = self.ctx.config
        t_sig, t_err = self.ctx.signal_transmission()
        scale = 10 ** (-cfg.meter_to_output_db / 10) / (cfg.photon_energy_j * cfg.rep_rate_hz)
        return scale * t_sig, scale * t_err

    def _primary_total(self, rates: dict[int, float], det: CalibrationRecord) -> float:
        """Σ over channels of the primary photon rate (dark counts removed), Hz."""
        total = 0.0
        for ch, rate in rates.items():
            r = primary_rate(rate, det.value(f"dead_time_s_ch{ch}"),
                             det.value(f"afterpulse_prob_ch{ch}"),
                             det.value(f"afterpulse_tau_s_ch{ch}"))
            total += r - det.value(f"dark_cps_ch{ch}")
        return total

    def run(self) -> CalibrationRecord:
        ctx, s, cfg = self.ctx, self.settings, self.ctx.config
        roles = ctx.roles
        roles.need("laser", "attenuator", "power_meter")
        assert roles.attenuator is not None
        det = ctx.latest_good("detectors")
        if det is None:
            raise CalibrationError("the μ calibration needs a detector calibration first")
        a_lo, a_hi = cfg.attenuator_limits_db
        channels = roles.detectors.channel_list
        per_w, per_w_err = self._mu_per_watt()
        a_before = roles.attenuator.get_attenuation_db()
        ok = False
        try:
            ctx.use_pattern(cfg.pattern.only(0))
            roles.attenuator.set_attenuation_db(a_lo)
            power, power_err, background = ctx.power_above_background(s.meter_reads)
            mu0 = power * per_w
            mu0_err = math.hypot(power_err * per_w, power * per_w_err)
            if not mu0 > 0:
                raise CalibrationError(f"no light at the power meter ({power:.3g} W)")
            a_set = a_lo + 10 * math.log10(mu0 / cfg.mu_signal_target)
            if not a_lo <= a_set <= a_hi:
                raise CalibrationError(
                    f"μ_signal = {cfg.mu_signal_target} needs {a_set:.2f} dB, outside the "
                    f"attenuator's {a_lo}…{a_hi} dB (μ at {a_lo} dB: {mu0:.4g})")
            # class ratios by counting
            rate: dict[int, float] = {}
            err: dict[int, float] = {}
            for k, att in ((0, a_hi), (1, a_hi), (2, a_lo)):
                ctx.use_pattern(cfg.pattern.only(k))
                roles.attenuator.set_attenuation_db(att)
                block = ctx.acquire(s.count_s)
                counts = block.counts(channels)
                rate[k] = self._primary_total(ctx.rates(block), det)
                dark_err = math.sqrt(sum(det.uncertainty(f"dark_cps_ch{c}") ** 2
                                         for c in channels))
                err[k] = math.hypot(math.sqrt(sum(counts.values())) / s.count_s, dark_err)
                if k == 2:  # measured at the lowest attenuation: back to the same scale
                    scale = 10 ** (-(a_hi - a_lo) / 10)
                    rate[k] *= scale
                    err[k] *= scale
            if not rate[0] > 0:
                raise CalibrationError("no signal counts at the detectors")
            roles.attenuator.set_attenuation_db(a_set)
            a_set = roles.attenuator.get_attenuation_db()  # as the device resolved it
            mu_s = mu0 * 10 ** (-(a_set - a_lo) / 10)
            mu_s_err = mu0_err * 10 ** (-(a_set - a_lo) / 10)
            mus = {k: mu_s * rate[k] / rate[0] for k in (0, 1, 2)}
            mu_errs = {0: mu_s_err}
            for k in (1, 2):
                rel = math.hypot(err[k] / max(rate[k], 1e-300), err[0] / rate[0],
                                 mu_s_err / mu_s)
                mu_errs[k] = abs(mus[k]) * rel
            # verify with the run's pattern
            ctx.use_pattern(cfg.pattern)
            block = ctx.acquire(s.verify_s)
            measured = ctx.rates(block)
            predicted = self.predicted_rates(det, mus)
            ratio = sum(measured.values()) / sum(predicted.values())
            ratio_err = math.sqrt(sum(block.counts(channels).values())) / s.verify_s \
                / sum(predicted.values())
            ok = True
        finally:
            if not ok:
                roles.attenuator.set_attenuation_db(a_before)
        q = {
            "mu_signal": Quantity(mus[0], mu_errs[0]),
            "mu_decoy": Quantity(mus[1], mu_errs[1]),
            "mu_vacuum": Quantity(mus[2], mu_errs[2]),
            "attenuation_db": Quantity(a_set, 10 / math.log(10) * mu0_err / mu0, "dB"),
            "count_ratio": Quantity(ratio, ratio_err),
            "meter_power_w": Quantity(power, power_err, "W"),
        }
        settings = {"attenuation_db": a_set, "meter_attenuation_db": a_lo,
                    "meter_background_w": background,
                    "pattern": [cfg.pattern.p_signal, cfg.pattern.p_decoy]}
        dataset = ctx.save("mu", ("channel", "", channels),
                           {"tag_rate": ("Hz", [measured[c] for c in channels]),
                            "predicted_rate": ("Hz", [predicted[c] for c in channels])},
                           {**settings, "quantities": {k: v.to_json() for k, v in q.items()}})
        good = abs(ratio - 1) <= s.verify_tolerance
        note = "" if good else (f"count rates {ratio:.3f}× the prediction: link loss, "
                                "efficiency or μ wrong")
        return ctx.make_record(self.node, q, settings, dataset, good=good, note=note)

    def predicted_rates(self, det: CalibrationRecord, mus: dict[int, float]) -> dict[int, float]:
        """Tag rate (Hz) per detector channel for the run's pattern at these μ's."""
        cfg = self.ctx.config
        channels = self.ctx.roles.detectors.channel_list
        share = cfg.share(channels)
        t_link = 10 ** (-cfg.output_to_detectors_db() / 10)
        probs = cfg.pattern.intensity_probs
        out = {}
        for ch in channels:
            eta = det.value(f"efficiency_ch{ch}") * share[ch] * t_link
            p_click = sum(p * -math.expm1(-eta * mus[k]) for k, p in enumerate(probs))
            r = cfg.rep_rate_hz * p_click + det.value(f"dark_cps_ch{ch}")
            tau = det.value(f"dead_time_s_ch{ch}")
            p_ap = det.value(f"afterpulse_prob_ch{ch}")
            tau_ap = det.value(f"afterpulse_tau_s_ch{ch}")
            out[ch] = 1 / (tau + (1 - p_ap) / r + p_ap / (r + 1 / tau_ap))
        return out

    def apply(self, record: CalibrationRecord) -> None:
        """Put the attenuator back where the record set it."""
        att = self.ctx.roles.attenuator
        if att is not None:
            att.set_attenuation_db(float(record.settings["attenuation_db"]))

    def check(self, record: CalibrationRecord) -> CheckResult:
        """μ_signal from the power meter at the recorded attenuation."""
        ctx = self.ctx
        self.apply(record)
        ctx.use_pattern(ctx.config.pattern.only(0))
        power, power_err, _ = ctx.power_above_background(self.settings.meter_reads)
        per_w, _ = self._mu_per_watt()
        mu = power * per_w
        expected = record.value("mu_signal")
        tol = max(self.settings.check_tolerance * expected, 5 * power_err * per_w)
        ctx.use_pattern(ctx.config.pattern)
        ok = abs(mu - expected) <= tol
        return CheckResult(ok, f"μ_signal {mu:.4g} (recorded {expected:.4g})")
