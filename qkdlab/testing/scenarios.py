"""The metro-link scenario of the end-to-end benchmark and of the finite-key model test.

80 MHz source, μ = 0.1 / 0.05 / vacuum (p = 0.5 / 0.3 / 0.2, p_Z = 0.8), 1 km of fibre,
1.5 % misalignment, four fast 20 % detectors (recovery below one 12.5 ns period, no
afterpulsing: the light-load regime the model describes; the station's InGaAs units with
their 1 µs hold-off would lose ~25 %).  The bench is set to the scenario through its
overrides; :func:`model_of` gives the model's inputs for the bench as it ran.  One
place, so that ``benchmarks/bench_end_to_end.py`` and
``tests/experiments/test_secure_key_model.py`` measure the same link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdlab.mock_instruments.bench import config_from_mapping
from qkdlab.mock_instruments.bench.config import BenchConfig
from qkdlab.mock_instruments.bench.optics import (
    channel_transmission,
    db_to_transmission,
    mean_photon_numbers,
    modulator_visibility,
)
from qkdlab.protocol.finite_key import DecoyStatistics, expected_statistics_passive

REP_RATE_HZ = 80e6
MU_SIGNAL = 0.1
DECOY_RATIO = 0.5
"""μ_decoy/μ_signal: at μ_signal = 0.1 a decoy of a fifth leaves s₁ too loose for
seconds-long blocks."""
PROBABILITIES = (0.5, 0.3, 0.2)
"""Signal, decoy, vacuum."""
P_Z = 0.8
"""Alice's key-basis probability; Bob's passive splitter sends the same share to Z."""
LENGTH_KM = 1.0
MISALIGNMENT = 0.015
DETECTORS: dict[str, float] = {"efficiency": 0.2, "dark_count_cps": 200.0,
                               "dead_time_s": 10e-9, "afterpulse_prob": 0.0}
VOA_STEP_DB = 0.01
"""Setpoint resolution of the station's attenuator (MBX)."""


def bench_overrides(length_km: float = LENGTH_KM) -> dict[str, Any]:
    """Mock-bench overrides: rate, pattern, fibre, Bob's detectors; the decoy by the
    modulator drive and μ_signal by the attenuator (to its setpoint resolution)."""
    over: dict[str, Any] = {
        "alice": {"rep_rate_hz": REP_RATE_HZ,
                  "pattern": {"p_z": P_Z, "p_signal": PROBABILITIES[0],
                              "p_decoy": PROBABILITIES[1], "p_vacuum": PROBABILITIES[2]}},
        "channel": {"length_km": length_km},
        "bob": {"z_fraction": P_Z, "misalignment": MISALIGNMENT, "detectors": DETECTORS},
    }
    cfg = config_from_mapping(over)
    a = cfg.alice
    vis = modulator_visibility(a.extinction_ratio_db)
    drive = list(a.drive_v)  # T(V)/T(0) = DECOY_RATIO at bias 0, φ = 0
    drive[1] = math.acos((DECOY_RATIO * (1 + vis) - 1) / vis) * a.v_pi_v / math.pi
    mu_now = float(mean_photon_numbers(a, 0.0)[0])
    attenuation = a.attenuation_db + 10 * math.log10(mu_now / MU_SIGNAL)
    over["alice"]["drive_v"] = drive
    over["alice"]["attenuation_db"] = round(attenuation / VOA_STEP_DB) * VOA_STEP_DB
    return over


def settings(station: str | Path, seed: int) -> Any:
    """The run's BB84 settings for the scenario: the μ the bench sends, qubit-based sync."""
    from qkdlab.cli import bb84_settings

    mus = mean_photon_numbers(config_from_mapping(bench_overrides()).alice, 0.0)
    return bb84_settings(Path(station), seed=seed, rep_rate_hz=REP_RATE_HZ, p_z=P_Z,
                         p_signal=PROBABILITIES[0], p_decoy=PROBABILITIES[1],
                         mu_signal=float(mus[0]), mu_decoy=float(mus[1]),
                         mu_vacuum=float(mus[2]), use_sync_channel=False)


@dataclass(frozen=True)
class Model:
    """The bench's parameters as the finite-key model sees them."""

    mus: tuple[float, float, float]
    probabilities: tuple[float, float, float]
    p_key: float
    eta: float
    """Channel, Bob's optics and detector efficiency."""
    dark: float
    """Dark-count probability per detector and acceptance window."""
    misalignment: float
    key_fraction: float
    pulses: int

    def stats(self, eta_scale: float = 1.0) -> DecoyStatistics:
        """Expected counts of our passive four-detector receiver."""
        return expected_statistics_passive(
            self.pulses, self.mus, self.probabilities, transmittance=self.eta * eta_scale,
            p_key=self.p_key, key_fraction=self.key_fraction, dark_count=self.dark,
            misalignment=self.misalignment)


def model_of(cfg: BenchConfig, pulses: int, acceptance_ps: float) -> Model:
    """The model of the bench ``cfg`` (as it ran, light on) for ``pulses`` pulses."""
    det = cfg.bob.detectors[0]
    if any(d != det for d in cfg.bob.detectors):
        raise ValueError("the model needs four identical detectors")
    eta = (channel_transmission(cfg.channel) * db_to_transmission(cfg.bob.optics_loss_db)
           * det.efficiency)
    mus = mean_photon_numbers(cfg.alice, cfg.alice.im_phase_rad)
    return Model(mus=(float(mus[0]), float(mus[1]), float(mus[2])),
                 probabilities=cfg.alice.pattern.intensity_probs,
                 p_key=cfg.alice.pattern.p_z, eta=eta,
                 dark=-math.expm1(-det.dark_count_cps * acceptance_ps * 1e-12),
                 misalignment=cfg.bob.misalignment, key_fraction=cfg.bob.z_fraction,
                 pulses=pulses)
