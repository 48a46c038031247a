"""Detector blinding on the mock bench and the detector monitors that catch it.

The QBER of a blinded link is zero, so the QBER check alone passes it; each monitor
flags it from the first frame and stays silent on honest links (several seeds, two
receivers), and a blinded run aborts with the monitor's reason, no key, laser off.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from qkdlab.cli import DEFAULT_MOCK_STATION, bb84_settings, main
from qkdlab.experiments.bb84.monitoring import FrameMonitor
from qkdlab.experiments.bb84.monitors import (
    BiasCurrentMonitor,
    DarkCountMonitor,
    DoubleClickMonitor,
    default_monitors,
    poisson_tail_bound,
    spent_alpha,
)
from qkdlab.experiments.bb84.processing import BB84Settings, FrameProcessor, FrameStats
from qkdlab.experiments.bb84.run import BB84Result, run_bb84
from qkdlab.experiments.bb84.sync import DetectorMap
from qkdlab.mock_instruments.bench import Bench, config_from_mapping
from qkdlab.mock_instruments.idquantique.id120 import MockID120
from qkdlab.roles import bb84_roles
from qkdlab.station import LoadedStation, open_station
from qkdlab.tags import TagBlock

DETECTORS = DetectorMap({1: (0, 0), 2: (0, 1), 3: (1, 0), 4: (1, 1)})
# the packaged mock station's detectors (tagger channels 1-4 are bench detectors 0-3)
SPAD = {"efficiency": 0.2, "dark_count_cps": 200.0, "dead_time_s": 1e-6,
        "afterpulse_prob": 0.02}
# what the detector calibration would report for them: (value, 1σ)
CALIBRATION = {f"{name}_ch{ch}": (value, 0.02 * value) for ch in DETECTORS.channel_list
               for name, value in (("dark_cps", 200.0), ("dead_time_s", 1e-6),
                                   ("afterpulse_prob", 0.02))}


def bench_frames(seed: int, z_fraction: float, blinding: bool, n: int = 3,
                 frame_s: float = 0.1) -> tuple[BB84Settings, list[FrameStats]]:
    """Frames of the bench's tags through the run's frame processor (no instruments)."""
    bench = Bench(config_from_mapping({
        "bob": {"z_fraction": z_fraction, "detectors": SPAD},
        "alice": {"pattern": {"p_z": z_fraction}}, "eve": {"blinding": blinding}}),
        seed=seed)
    mu = bench.mean_photon_numbers()
    settings = BB84Settings(p_z=z_fraction, mu_signal=mu[0], mu_decoy=mu[1], mu_vacuum=mu[2],
                            seed=seed)
    processor = FrameProcessor(settings, DETECTORS, bench.alice_symbols, marker_channel=0)
    frames: list[FrameStats] = []
    while len(frames) < n:
        frames.extend(processor.feed(TagBlock(**bench.acquire(frame_s).tag_block_fields())))
    return settings, frames[:n]


def counting_monitors(settings: BB84Settings) -> list[FrameMonitor]:
    """The two counting monitors, the dark-count one from the calibration."""
    return [m for m in default_monitors(settings, DETECTORS, CALIBRATION)
            if not isinstance(m, BiasCurrentMonitor)]


# ---------------------------------------------------------------- the statistics


def test_poisson_tail_bound_is_a_bound() -> None:
    # exact Poisson tails, summed term by term
    def pmf(k: int, lam: float) -> float:
        return math.exp(-lam + k * math.log(lam) - math.lgamma(k + 1))

    for lam in (3.0, 40.0, 400.0):
        for n in (0, int(lam / 4), int(lam / 2), int(0.9 * lam)):
            below = sum(pmf(k, lam) for k in range(n + 1))
            assert below <= poisson_tail_bound(n, lam) <= 1.0
        for n in (int(1.5 * lam) + 1, int(3 * lam)):
            above = sum(pmf(k, lam) for k in range(n, n + 2000))
            assert above <= poisson_tail_bound(n, lam) <= 1.0
    assert poisson_tail_bound(0, 20.0) == pytest.approx(math.exp(-20.0))
    assert poisson_tail_bound(40, 40.0) == 1.0
    # the run's budget: Σ_k α_k = α
    assert sum(spent_alpha(1e-6, k) for k in range(1, 200_000)) == pytest.approx(1e-6, rel=1e-5)


# ---------------------------------------------------------------- frames of the bench


@pytest.mark.parametrize("z_fraction", [0.5, 0.8])
def test_blinding_passes_the_qber_check_but_not_the_monitors(z_fraction: float) -> None:
    settings, frames = bench_frames(seed=3, z_fraction=z_fraction, blinding=True, n=1)
    frame = frames[0]
    # what the QBER check sees: no error at all, far below the 11 % abort threshold
    assert sum(map(sum, frame.sifted)) > 10_000
    assert frame.qber(0) == 0.0
    assert frame.qber(1) == 0.0
    # ...no detection outside the window, no double click
    assert frame.unassigned == 0
    for monitor in counting_monitors(settings):
        reason = monitor.check(frame, {})
        assert reason is not None, type(monitor).__name__
        assert "detector blinding suspected" in reason


@pytest.mark.parametrize(("seed", "z_fraction"), [(1, 0.5), (2, 0.8), (3, 0.8), (4, 0.5)])
def test_honest_frames_raise_no_alarm(seed: int, z_fraction: float) -> None:
    settings, frames = bench_frames(seed=seed, z_fraction=z_fraction, blinding=False)
    dark, double = (DarkCountMonitor, DoubleClickMonitor)
    monitors = counting_monitors(settings)
    for frame in frames:
        for monitor in monitors:
            assert monitor.check(frame, {}) is None
            # not near the threshold either: the honest count is above its lower bound
            if isinstance(monitor, dark):
                assert frame.unassigned > monitor.expected_outside(frame)
            if isinstance(monitor, double):
                seen, lam = monitor.observed(frame), monitor.expected(frame)
                assert lam > 300
                assert abs(seen - lam) < 5 * math.sqrt(lam) + 0.05 * lam


def test_double_click_monitor_flags_a_careless_eve_too() -> None:
    # Eve's triggers at 3x the always-click energy make the other arm click as well
    bench = Bench(config_from_mapping({
        "bob": {"z_fraction": 0.5, "detectors": SPAD},
        "eve": {"blinding": True, "trigger_margin": 3.0, "avoid_double_clicks": False}}),
        seed=5)
    settings = BB84Settings(p_z=0.5, seed=5)
    processor = FrameProcessor(settings, DETECTORS, bench.alice_symbols, marker_channel=0)
    frames: list[FrameStats] = []
    while not frames:
        frames = processor.feed(TagBlock(**bench.acquire(0.1).tag_block_fields()))
    reason = DoubleClickMonitor(settings, DETECTORS).check(frames[0], {})
    assert reason is not None
    assert reason.startswith("detector control suspected")


def test_bias_current_monitor_reads_a_current_monitor_on_the_bias_line() -> None:
    bench = Bench(config_from_mapping({"bob": {"detectors": SPAD}}), seed=1)
    spads = [MockID120(bench, d, seed=d, bench_physics=True) for d in range(4)]
    for spad in spads:
        spad.start_at(185.0)
    calibrated, uncalibrated = (
        next(m for m in default_monitors(BB84Settings(), DETECTORS, cal)
             if isinstance(m, BiasCurrentMonitor)) for cal in (CALIBRATION, None))
    assert calibrated.threshold_a == pytest.approx(2e-12 / 1e-6)  # 2·Q/τ, τ calibrated
    assert uncalibrated.threshold_a == pytest.approx(2e-12 / 22e-9)  # fastest τ known

    def readings() -> dict[str, dict[str, float]]:
        return {f"spad{d + 1}": {"count_rate_cps": spad.measured_rate_cps(),
                                 "bias_current_a": spad.bias_current_a()}
                for d, spad in enumerate(spads)}

    frame = bench_frames(1, 0.5, False, n=1)[1][0]
    honest = readings()
    assert max(r["bias_current_a"] for r in honest.values()) < calibrated.threshold_a / 2
    for monitor in (calibrated, uncalibrated):
        assert monitor.check(frame, honest) is None
    bench.eve.blinding = True
    blinded = readings()
    for monitor in (calibrated, uncalibrated):
        reason = monitor.check(frame, blinded)
        assert reason is not None
        assert "bias current" in reason
    assert calibrated.frames_with_readings == uncalibrated.frames_with_readings == 2
    # no current monitor on the station: no verdict, and the monitor says it saw nothing
    silent = BiasCurrentMonitor(1e-6)
    assert silent.check(frame, {"spad1": {"count_rate_cps": 1e5}}) is None
    assert silent.frames_with_readings == 0


# ---------------------------------------------------------------- runs on the mock station


@contextmanager
def mock_station(**overrides: Any) -> Iterator[LoadedStation]:
    with open_station(DEFAULT_MOCK_STATION, seed=11, bench_overrides=overrides) as loaded:
        yield loaded


class CurrentMonitorUnit:
    """A current monitor on one SPAD's bias line, as a detector unit the run polls.

    Stands for the separate instrument a real bench would need (the ID120 documents no
    current read-back); it reads the mock SPAD's bias current.
    """

    def __init__(self, name: str, spad: MockID120) -> None:
        self.name = name
        self.spad = spad
        self.parameters = {"bias_current": spad.bias_current_a}

    def count_rates(self) -> list[float]:
        return [self.spad.measured_rate_cps()]

    def enable(self) -> None: ...

    def disable(self) -> None: ...

    def safe_state(self) -> None: ...


def run(loaded: LoadedStation, tmp_path: Path, duration_s: float, *,
        current_monitors: bool = False) -> BB84Result:
    roles = bb84_roles(loaded)
    if current_monitors:
        servers = loaded.launcher.servers  # type: ignore[union-attr]
        units = {f"imon{d}": CurrentMonitorUnit(f"imon{d}", servers[f"spad{d}"].instrument)
                 for d in range(1, 5)}
        roles.detector_units = {**roles.detector_units, **units}
    settings = bb84_settings(DEFAULT_MOCK_STATION, seed=5)
    return run_bb84(roles, settings, duration_s=duration_s, data_dir=tmp_path, progress=False,
                    monitors=default_monitors(settings, roles.detectors, CALIBRATION))


def test_blinded_run_aborts_on_the_photocurrent_with_no_key(tmp_path: Path) -> None:
    with mock_station(eve={"blinding": True}) as loaded:
        result = run(loaded, tmp_path, 0.6, current_monitors=True)
        laser_on = loaded.launcher.bench.alice.laser_on  # type: ignore[union-attr]
    summary = result.summary()
    assert summary["status"].startswith("aborted: BiasCurrentMonitor: detector blinding")
    assert summary["aborted"]
    assert summary["qber_z"] == 0.0  # the QBER alone would have let it through
    assert summary["secure_key_bits"] == 0
    assert summary["key_file"] is None
    assert not (tmp_path / "keys" / "alice").exists() or not list(
        (tmp_path / "keys" / "alice").iterdir())
    assert not laser_on


def test_honest_run_with_monitors_completes_with_a_key(tmp_path: Path) -> None:
    with mock_station() as loaded:
        result = run(loaded, tmp_path, 4.0, current_monitors=True)
    summary = result.summary()
    assert summary["status"] == "completed", summary["status"]
    assert not summary["aborted"], summary["abort_reason"]
    assert summary["keys_match"]
    assert summary["secure_key_bits"] > 0, summary


def test_cli_blinding_flag_ends_aborted_by_a_monitor(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "bb84", "--mock", "--blinding", "--duration", "0.6", "--json",
                 "--data-dir", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1
    # no calibration here: the double-click monitor (it needs none) catches it
    assert summary["status"].startswith("aborted: DoubleClickMonitor: detector blinding")
    assert summary["secure_key_bits"] == 0
    assert summary["key_file"] is None
    code = main(["run", "bb84", "--station", str(DEFAULT_MOCK_STATION), "--blinding",
                 "--data-dir", str(tmp_path)])
    assert code == 2
    assert "--blinding set the mock bench; use --mock" in capsys.readouterr().err
