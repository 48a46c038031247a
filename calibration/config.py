"""What the calibration loops need to know about the bench, and the roles they drive.

:class:`CalibrationConfig` is read from the station file's ``qkdlab: calibration:``
section (every key optional except the optical path the efficiency calibration needs)::

    qkdlab:
      calibration:
        wavelength_m: 1.55e-6
        # where the power meter taps Alice's light: before the intensity modulator
        # (after_attenuator) or after it (after_modulator, Alice's output)
        power_meter_point: after_attenuator
        # optical path of the photon-flux calibration (dB): power meter point → Alice's
        # output (modulator transmission excluded), fibre and connectors, Bob's optics
        meter_to_output_db: 0.0
        link_loss_db: 5.0
        bob_loss_db: 1.0
        # share of Bob's light each detector gets (passive basis choice, balanced
        # states: ½ per arm × ½ per analyser); default 1/number of detectors
        detector_share: {1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25}
        attenuator_limits_db: [1.0, 20.0]
        bias_limits_v: [-10.0, 10.0]
        actuator_limits: [0.0, 360.0]
        actuator_period: 180.0   # waveplates: θ and θ + 180° act alike
        validity_s: {detectors: 86400, timing: 3600, bias: 1800, mu: 3600, polarization: 900}

:class:`CalibrationRoles` are the instruments by role (never by vendor), like
:class:`~qkdlab.experiments.bb84.run.BB84Roles` plus the ones only calibration uses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qkdlab.calibration.records import CalibrationError
from qkdlab.drivers.roles import (
    Attenuator,
    BB84Transmitter,
    IntensityModulator,
    Laser,
    PolarizationController,
    PowerMeter,
    SafeStateCapable,
    SinglePhotonDetector,
    TimeTagger,
)
from qkdlab.experiments.bb84.sync import DetectorMap

PLANCK_J_S = 6.62607015e-34
LIGHT_SPEED_M_S = 299_792_458.0

METER_POINTS = ("after_attenuator", "after_modulator")
"""Where the power meter may tap Alice's light."""

DEFAULT_VALIDITY_S: dict[str, float] = {
    "detectors": 24 * 3600.0, "timing": 3600.0, "bias": 1800.0, "mu": 3600.0,
    "polarization": 900.0,
}


@dataclass(frozen=True)
class Pattern:
    """Alice's pattern for a measurement: basis bias, class probabilities, seed."""

    p_z: float = 0.5
    p_signal: float = 0.7
    p_decoy: float = 0.2
    seed: int = 1
    frame_pulses: int = 2**20

    def only(self, intensity: int) -> Pattern:
        """The same pattern with every pulse in one intensity class (0, 1 or 2)."""
        probs = [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)][intensity]
        return dataclasses.replace(self, p_signal=probs[0], p_decoy=probs[1])

    @property
    def intensity_probs(self) -> tuple[float, float, float]:
        return (self.p_signal, self.p_decoy, max(0.0, 1.0 - self.p_signal - self.p_decoy))


@dataclass(frozen=True)
class CalibrationConfig:
    """Bench knowledge and loop settings (SI units; dB for losses).

    Attributes:
        wavelength_m, rep_rate_hz: Alice's light.
        pattern: the run's pattern (seed, probabilities) used where a loop needs one.
        mu_signal_target, mu_decoy_target: intensities the run wants (photons/pulse).
        power_meter_point: ``after_attenuator`` (the meter sees the light entering the
            modulator: μ needs the modulator's transmission from the bias record) or
            ``after_modulator`` (the meter sees Alice's output; it can also probe the
            bias); None: unknown, the loops that read the meter refuse.
        meter_to_output_db: loss from the power meter's point to Alice's output,
            excluding the modulator's transmission.
        link_loss_db, bob_loss_db: Alice's output → Bob's input; Bob's optics before
            the detectors' splitters (None: not known, the efficiency loop refuses).
        detector_share: mean share of Bob's light per detector channel (None: 1/n).
        attenuator_limits_db, bias_limits_v, actuator_limits: hard limits of the VOA,
            the modulator bias and the polarization actuators.
        actuator_period: actuator change that leaves the polarization transformation
            unchanged (180° for a waveplate in a rotation mount; None: not periodic).
            An actuator near a limit is moved by whole periods toward the middle.
        bias_margin_v: the working point is kept this far inside the bias limits.
        bias_scan_points: points of the bias scan across the limits (minus margins).
        validity_s: record validity per node (s).
        sync_offset_search: pulse-offset range searched after a pattern restart (the
            first light arrives one fibre delay after the tagger starts: ±655 µs at 100 MHz).
        window_ps: acceptance window before a timing calibration (ps; None: 40 % of T).
        qber_threshold: mean QBER above which the run's polarization tracker acts.
    """

    wavelength_m: float = 1550e-9
    rep_rate_hz: float = 100e6
    pattern: Pattern = field(default_factory=Pattern)
    mu_signal_target: float = 0.5
    mu_decoy_target: float = 0.1
    power_meter_point: str | None = None
    meter_to_output_db: float = 0.0
    link_loss_db: float | None = None
    bob_loss_db: float | None = None
    detector_share: dict[int, float] | None = None
    attenuator_limits_db: tuple[float, float] = (1.0, 20.0)
    bias_limits_v: tuple[float, float] = (-10.0, 10.0)
    bias_margin_v: float = 1.0
    bias_scan_points: int = 21
    actuator_limits: tuple[float, float] = (0.0, 360.0)
    actuator_period: float | None = None
    validity_s: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_VALIDITY_S))
    sync_offset_search: tuple[int, int] = (-(1 << 16), 1 << 16)
    window_ps: float | None = None
    qber_threshold: float = 0.016

    @property
    def photon_energy_j(self) -> float:
        """h·c/λ (J)."""
        return PLANCK_J_S * LIGHT_SPEED_M_S / self.wavelength_m

    @property
    def period_ps(self) -> float:
        return 1e12 / self.rep_rate_hz

    def validity(self, node: str) -> float:
        return float(self.validity_s.get(node, DEFAULT_VALIDITY_S.get(node, 3600.0)))

    def share(self, channels: list[int]) -> dict[int, float]:
        """Mean share of Bob's light reaching each channel."""
        if self.detector_share is None:
            return {c: 1.0 / len(channels) for c in channels}
        missing = [c for c in channels if c not in self.detector_share]
        if missing:
            raise CalibrationError(f"calibration config: detector_share has no channel {missing}")
        return {c: float(self.detector_share[c]) for c in channels}

    @property
    def meter_before_modulator(self) -> bool:
        """True when the power meter sees the light before the intensity modulator."""
        if self.power_meter_point not in METER_POINTS:
            raise CalibrationError(
                "set 'power_meter_point' (one of: " + ", ".join(METER_POINTS) + ") in the "
                "station's 'qkdlab: calibration:' section")
        return self.power_meter_point == "after_attenuator"

    def output_to_detectors_db(self) -> float:
        """Loss (dB) from Alice's output to Bob's detector splitters."""
        if self.link_loss_db is None or self.bob_loss_db is None:
            raise CalibrationError(
                "the photon-flux calibration needs 'link_loss_db' and 'bob_loss_db' in the "
                "station's 'qkdlab: calibration:' section")
        return self.link_loss_db + self.bob_loss_db

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None,
                     **overrides: Any) -> CalibrationConfig:
        """Config from a station section (unknown keys raise ValueError)."""
        raw = {**dict(section or {}), **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown key(s) in 'qkdlab: calibration': {', '.join(unknown)} "
                             f"(allowed: {', '.join(sorted(names))})")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "pattern" and isinstance(value, Mapping):
                values[key] = Pattern(**value)
            elif key in ("attenuator_limits_db", "bias_limits_v", "actuator_limits",
                         "sync_offset_search"):
                lo, hi = value
                values[key] = (type(lo)(lo), type(hi)(hi))
            elif key == "detector_share" and value is not None:
                values[key] = {int(k): float(v) for k, v in dict(value).items()}
            elif key == "validity_s":
                values[key] = {**DEFAULT_VALIDITY_S, **{str(k): float(v)
                                                         for k, v in dict(value).items()}}
            else:
                values[key] = value
        cfg = cls(**values)
        for lo, hi, name in ((*cfg.attenuator_limits_db, "attenuator_limits_db"),
                             (*cfg.bias_limits_v, "bias_limits_v"),
                             (*cfg.actuator_limits, "actuator_limits")):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"calibration config: {name} must be [low, high], got "
                                 f"{[lo, hi]}")
        return cfg


@dataclass
class CalibrationRoles:
    """The instruments calibration drives, by role.

    ``laser_settings`` are laser parameters set (through the driver's validators and
    ramps) before the light goes on, as in a BB84 run.  ``detector_units`` are Bob's
    detector units, brought to their operating point before anything is counted (a
    run's safe state leaves their bias ramped down).  ``attenuation_db`` is the
    station's operating attenuation (``roles: attenuation_db``), used until a ``mu``
    record gives one (a run's safe state leaves the attenuator at its highest setting).
    """

    transmitter: BB84Transmitter
    tagger: TimeTagger
    detectors: DetectorMap
    laser: Laser | None = None
    laser_settings: dict[str, float] = field(default_factory=dict)
    modulator: IntensityModulator | None = None
    attenuator: Attenuator | None = None
    power_meter: PowerMeter | None = None
    polarization: PolarizationController | None = None
    others: list[SafeStateCapable] = field(default_factory=list)
    detector_units: dict[str, SinglePhotonDetector] = field(default_factory=dict)
    attenuation_db: float | None = None

    def need(self, *names: str) -> None:
        """Raise :class:`CalibrationError` naming the missing roles among ``names``."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise CalibrationError(f"no instrument for role(s) {', '.join(missing)} in the "
                                   "station ('qkdlab: roles:')")
