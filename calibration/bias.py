"""Intensity-modulator bias: transfer curve, working point, and a lock against drift.

Calibration (the ``bias`` node):

1. Alice sends every pulse in the signal class (drive 0 V), so the light after the
   modulator follows the DC transfer curve P(V) = P_in·½·[1 + v·cos(π·V/Vπ + φ)].
2. The bias is scanned across its range (inside ``bias_margin_v`` of the hard limits)
   and the transmitted light measured: the power meter after the modulator (background
   from a laser-off reading), or else the detectors' count rate (dead-time corrected).
3. A fit gives Vπ, φ and the extinction ratio 10·log10((1 + v)/(1 − v)); the working
   point puts the signal class at the transfer maximum, π·V/Vπ + φ ≡ 0 (mod 2π), at
   the solution nearest 0 V.
4. With the run's pattern (signal, decoy, vacuum mixed), the light is a cosine of the
   same period with an extra phase ψ (the pattern's weighted drive phases).  A short
   scan around the working point measures ψ: the lock's reference.

Lock (:class:`BiasLock`), for a run to call between frames: two readings at V ∓ d
(δ = π·d/Vπ), each less the calibration's background (the probe's reading without
light, as the fit's readings were), give
u = (P₋ − P₊)/(P₋ + P₊) = D·sin x·sin δ/(1 + D·cos x·cos δ), with D
the mixed curve's modulation depth from the calibration, hence its present phase x
(u = 0 exactly at x = 0, so an error in D only changes the loop gain); the
signal-class phase error is θ = x − ψ and the bias moves by −θ·Vπ/π (bounded per
step).  When following the drift would leave the limits the lock jumps by
2·Vπ to the equivalent point inside; it never sets a bias outside the limits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qkdlab.calibration.fitting import fit_transfer, gaps_by_channel, primary_rate
from qkdlab.calibration.graph import CheckResult
from qkdlab.calibration.measure import CalibrationContext
from qkdlab.calibration.records import CalibrationError, CalibrationRecord, Quantity
from qkdlab.drivers.roles import IntensityModulator

log = logging.getLogger(__name__)

Probe = Callable[[], float]


def wrap_pi(x: float) -> float:
    """Angle wrapped to (−π, π]."""
    return float(math.pi - (math.pi - x) % (2 * math.pi))


@dataclass(frozen=True)
class BiasSettings:
    """Probe choice and scan details."""

    probe: str = "auto"  # "power", "counts" or "auto" (power meter if there is one)
    count_s: float = 0.02  # acquisition per point of a count-rate probe, scan (s)
    lock_count_s: float = 0.05  # the same for the lock's readings and the ψ scan (s)
    count_attenuation_db: float | None = None  # None: the attenuator's highest setting
    meter_attenuation_db: float | None = None  # None: the attenuator's lowest setting
    lock_points: int = 9  # points of the mixed-pattern scan around the working point
    dither_rad: float = 0.5  # lock dither δ (rad of modulator phase)
    check_tolerance_rad: float = 0.06


def make_probe(ctx: CalibrationContext, kind: str, count_s: float = 0.02) -> Probe:
    """A callable returning a reading proportional to the light after the modulator."""
    if kind == "power":
        return lambda: ctx.read_power(1)[0]
    if kind != "counts":
        raise ValueError(f"probe must be 'power' or 'counts', got {kind!r}")
    det = ctx.latest_good("detectors")
    channels = ctx.roles.detectors.channel_list

    def counts() -> float:
        """Summed primary click rate (Hz): dead time and afterpulses from the detector
        record, else the dead time seen in the block itself (its shortest gap)."""
        block = ctx.acquire(count_s)
        rates = ctx.rates(block)
        gaps = None if det is not None else gaps_by_channel(block.time_ps, block.channel,
                                                            channels)
        total = 0.0
        for ch, rate in rates.items():
            if det is not None:
                total += primary_rate(rate, det.value(f"dead_time_s_ch{ch}"),
                                      det.value(f"afterpulse_prob_ch{ch}"),
                                      det.value(f"afterpulse_tau_s_ch{ch}"))
            else:
                assert gaps is not None
                dead = float(gaps[ch].min()) if gaps[ch].size > 100 else 0.0
                total += primary_rate(rate, dead)
        return total

    return counts


def working_point(phase: float, v_pi: float, lo: float, hi: float) -> float:
    """Bias (V) with π·V/Vπ + φ ≡ 0 (mod 2π) nearest 0 V inside [lo, hi]."""
    base = -phase * v_pi / math.pi
    period = 2 * v_pi
    candidates = [base + k * period for k in range(-20, 21)]
    inside = [v for v in candidates if lo <= v <= hi]
    if not inside:
        raise CalibrationError(f"no working point inside {lo}…{hi} V (Vπ = {v_pi:.3g} V)")
    return min(inside, key=abs)


class BiasCalibration:
    """The ``bias`` node."""

    node = "bias"

    def __init__(self, ctx: CalibrationContext, settings: BiasSettings | None = None) -> None:
        self.ctx = ctx
        self.settings = settings or BiasSettings()

    def _probe_kind(self) -> str:
        kind = self.settings.probe
        if kind == "auto":
            cfg = self.ctx.config
            after = cfg.power_meter_point == "after_modulator"
            return "power" if self.ctx.roles.power_meter is not None and after else "counts"
        if kind == "power" and self.ctx.config.meter_before_modulator:
            raise CalibrationError("the power meter sits before the modulator: it cannot "
                                   "see the bias; use the count-rate probe")
        return kind

    def run(self) -> CalibrationRecord:
        ctx, s, cfg = self.ctx, self.settings, self.ctx.config
        ctx.roles.need("modulator")
        mod = ctx.roles.modulator
        assert mod is not None
        kind = self._probe_kind()
        lo, hi = cfg.bias_limits_v
        lo_in, hi_in = lo + cfg.bias_margin_v, hi - cfg.bias_margin_v
        att = ctx.roles.attenuator
        a_before = att.get_attenuation_db() if att is not None else None
        ctx.use_pattern(cfg.pattern.only(0))
        try:
            if att is not None:
                lo_db, hi_db = cfg.attenuator_limits_db
                if kind == "power":
                    att.set_attenuation_db(lo_db if s.meter_attenuation_db is None
                                           else s.meter_attenuation_db)
                else:  # low flux: the detectors stay near their linear range
                    att.set_attenuation_db(hi_db if s.count_attenuation_db is None
                                           else s.count_attenuation_db)
            probe = make_probe(ctx, kind, s.count_s)
            ctx.light(False)
            background = float(np.mean([probe() for _ in range(3)]))
            ctx.light(True)
            volts = np.linspace(lo_in, hi_in, cfg.bias_scan_points)
            if abs(mod.get_bias() - hi_in) < abs(mod.get_bias() - lo_in):
                volts = volts[::-1]  # start at the near end: shorter ramp
            readings = []
            for v in volts:
                mod.set_bias(float(v))
                readings.append(probe() - background)
            fit = fit_transfer(volts, np.array(readings), (1.0, 2.0 * (hi_in - lo_in)))
            v_star = working_point(fit.phase, fit.v_pi, lo_in, hi_in)
            # the run's pattern: phase offset ψ of the mixed curve (lock reference)
            ctx.use_pattern(cfg.pattern)
            probe = make_probe(ctx, kind, s.lock_count_s)
            half = 0.5 * fit.v_pi  # ±π/2 of modulator phase around the working point
            mixed_v = np.clip(np.linspace(v_star - half, v_star + half, s.lock_points), lo, hi)
            mixed = []
            for v in mixed_v:
                mod.set_bias(float(v))
                mixed.append(probe() - background)
            k = math.pi / fit.v_pi
            design = np.column_stack([np.ones_like(mixed_v), np.cos(k * mixed_v),
                                      np.sin(k * mixed_v)])
            (a_m, c_m, s_m), *_ = np.linalg.lstsq(design, np.array(mixed), rcond=None)
            psi = wrap_pi(math.atan2(-s_m, c_m) - fit.phase)
            depth = math.hypot(c_m, s_m) / a_m if a_m > 0 else math.nan
            mod.set_bias(v_star)
        finally:
            if att is not None and a_before is not None:
                att.set_attenuation_db(a_before)
        er_db = fit.extinction_ratio_db
        q = {
            "v_pi_v": Quantity(fit.v_pi, fit.errors[2], "V"),
            "phase_rad": Quantity(fit.phase, fit.errors[3], "rad"),
            "extinction_ratio_db": Quantity(er_db, _er_error(fit), "dB"),
            "working_point_v": Quantity(v_star, fit.errors[3] * fit.v_pi / math.pi, "V"),
            "lock_offset_rad": Quantity(psi, math.nan, "rad"),
            "mixed_depth": Quantity(depth, math.nan),
            "transfer_max": Quantity(fit.offset + fit.amplitude, fit.errors[0],
                                     "W" if kind == "power" else "Hz"),
        }
        settings = {"probe": kind, "working_point_v": v_star, "background": background,
                    "pattern": [cfg.pattern.p_signal, cfg.pattern.p_decoy],
                    "limits_v": [lo, hi], "margin_v": cfg.bias_margin_v}
        dataset = ctx.save("bias", ("bias_v", "V", list(volts)),
                           {"signal_light": ("W" if kind == "power" else "Hz", readings),
                            "fit": ("W" if kind == "power" else "Hz", list(fit(volts)))},
                           {**settings, "quantities": {k: v.to_json() for k, v in q.items()}})
        return ctx.make_record(self.node, q, settings, dataset)

    def lock(self, record: CalibrationRecord, probe: Probe | None = None,
             **kwargs: float) -> BiasLock:
        """A :class:`BiasLock` on this context's modulator from ``record``."""
        mod = self.ctx.roles.modulator
        if mod is None:
            raise CalibrationError("no modulator role in the station")
        cfg = self.ctx.config
        return BiasLock(mod, probe or make_probe(self.ctx, self._probe_kind(),
                                                 self.settings.lock_count_s),
                        record, cfg.bias_limits_v, cfg.bias_margin_v,
                        dither_rad=kwargs.pop("dither_rad", self.settings.dither_rad), **kwargs)

    def check(self, record: CalibrationRecord) -> CheckResult:
        """The lock's phase measurement: the signal class within tolerance of the peak."""
        ctx = self.ctx
        ctx.use_pattern(ctx.config.pattern)
        ctx.light(True)
        lock = self.lock(record, gain=0.0)
        step = lock.step()
        ok = abs(step.phase_error_rad) <= self.settings.check_tolerance_rad
        return CheckResult(ok, f"bias phase error {step.phase_error_rad:+.3f} rad")


def _er_error(fit: object) -> float:
    """1σ error of the extinction ratio (dB) from the offset and amplitude errors."""
    from qkdlab.calibration.fitting import TransferFit

    assert isinstance(fit, TransferFit)
    lo = fit.offset - fit.amplitude
    if lo <= 0:
        return math.inf
    err_lo = math.hypot(fit.errors[0], fit.errors[1])
    return 10 / math.log(10) * err_lo / lo


@dataclass(frozen=True)
class LockStep:
    """One lock step: the phase error seen, where the bias went, and why."""

    phase_error_rad: float
    bias_v: float
    previous_v: float
    wrapped: bool = False
    at_limit: bool = False


class BiasLock:
    """Keeps the signal class at the modulator's transfer maximum during a run.

    Args:
        modulator: the IntensityModulator role.
        probe: reading proportional to the light after the modulator (power meter; a
            count probe needs the tagger, so not during a streaming run).
        record: the ``bias`` calibration (Vπ, working point, lock offset ψ, and the
            probe's ``background`` reading without light, subtracted from every reading;
            0 when the record has none).
        limits_v: hard bias limits (V); margin_v: kept inside them.
        dither_rad: dither δ of the three-point phase measurement (rad).
        gain: fraction of the measured error corrected per step (0: measure only).
        max_step_v: largest bias change per step (V).
    """

    def __init__(self, modulator: IntensityModulator, probe: Probe, record: CalibrationRecord,
                 limits_v: tuple[float, float], margin_v: float, *, dither_rad: float = 0.5,
                 gain: float = 1.0, max_step_v: float = 1.0) -> None:
        self.modulator = modulator
        self.probe = probe
        self.v_pi = record.value("v_pi_v")
        self.psi = record.value("lock_offset_rad")
        self.background = float(record.settings.get("background", 0.0))
        if not math.isfinite(self.background):
            raise CalibrationError(f"bias record {record.id}: background "
                                   f"{self.background} is not a finite reading")
        self.depth = record.value("mixed_depth")
        if not 0 < self.depth <= 1:
            raise CalibrationError(f"bias record {record.id}: mixed-pattern depth "
                                   f"{self.depth} is not in (0, 1]")
        self.lo, self.hi = limits_v
        self.margin = margin_v
        self.dither_v = dither_rad * self.v_pi / math.pi
        if self.dither_v >= margin_v:
            raise CalibrationError(f"bias dither {self.dither_v:.3g} V must stay inside the "
                                   f"{margin_v} V margin to the limits")
        self.gain = gain
        self.max_step_v = max_step_v
        self.bias_v = float(record.value("working_point_v"))
        self.steps: list[LockStep] = []

    def _set(self, volts: float) -> None:
        if not self.lo <= volts <= self.hi:  # defence in depth: never past a hard limit
            raise CalibrationError(f"bias lock asked for {volts:.3f} V outside "
                                   f"{self.lo}…{self.hi} V")
        self.modulator.set_bias(volts)

    def measure_phase(self, centre_v: float) -> float:
        """Signal-class phase error θ (rad) at bias ``centre_v`` (two readings, V ∓ d)."""
        d = self.dither_v
        self._set(centre_v - d)
        p_minus = self.probe() - self.background
        self._set(centre_v + d)
        p_plus = self.probe() - self.background
        self._set(centre_v)
        total = p_minus + p_plus
        if not total > 0:
            raise CalibrationError("bias lock: no light at the probe above its background")
        u = (p_minus - p_plus) / total
        delta = math.pi * d / self.v_pi
        # u·(1 + D cos δ cos x) = D sin δ sin x  →  R·sin(x − β) = u
        big_r = self.depth * math.hypot(math.sin(delta), u * math.cos(delta))
        beta = math.atan2(u * math.cos(delta), math.sin(delta))
        x = beta + math.asin(max(-1.0, min(1.0, u / big_r)))
        return wrap_pi(x - self.psi)

    def step(self) -> LockStep:
        """Measure the phase error, move the bias against it; never past the limits."""
        v0 = self.bias_v
        theta = self.measure_phase(v0)
        dv = float(np.clip(-self.gain * theta * self.v_pi / math.pi,
                           -self.max_step_v, self.max_step_v))
        v1 = v0 + dv
        lo_in, hi_in = self.lo + self.margin, self.hi - self.margin
        wrapped = at_limit = False
        if not lo_in <= v1 <= hi_in:
            jump = -2 * self.v_pi if v1 > hi_in else 2 * self.v_pi
            if lo_in <= v1 + jump <= hi_in:
                v1 += jump
                wrapped = True
                log.info("bias lock: %.3f V would leave the range; jumped to %.3f V", v0 + dv, v1)
            else:
                v1 = min(max(v1, lo_in), hi_in)
                at_limit = True
                log.warning("bias lock: working point held at the limit %.3f V", v1)
        self._set(v1)
        self.bias_v = v1
        out = LockStep(theta, v1, v0, wrapped, at_limit)
        self.steps.append(out)
        return out
