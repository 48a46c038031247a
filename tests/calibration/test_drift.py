"""A run on a drifting bench: the loops keep the QBER and μ in trim; without them both
degrade.  For each of five bench seeds.

Half an hour of bench time in 12 steps of 150 s, a 0.1 s frame per step (and the frames
the polarization tracker asks for).  The modulator phase drifts linearly (plus a random
walk).  The polarization drifts two ways: the fibre diffuses (an SO(3) random walk) and
Alice's encoder reference turns steadily about S3 (0.4 rad over the run, as the DC
drift of a polarization modulator turns it; applied between steps through the bench's
preparation-error setting).  The two runs of a seed share the same drift (same bench
seed).  Between steps the bench's clock moves on with the laser off (only dark counts
are simulated: cheap) — both test-only uses of the ground truth.  The ID1000 mock
delivers each record as soon as it is made rather than in wall-clock time
(``realtime=0``): the same tags, a third less waiting.

Why these numbers.  The tracker sees the link once per step, so between two looks the
link must not drift from just below the tracker's threshold (1.4 %) past the 2 % ceiling,
while the loops-off run must get past 2 % within the run.  A pure random walk cannot do
both: its excursion in one step is 1/√steps of its excursion over the run.  The first
version of this test (12 steps of 5 min, 50 ms frames, fibre diffusion 4e-6 rad²/s only)
passed by its seed: on the closed-form model of this bench
(:mod:`.polarization_link`) its loops-on ceiling fails for 21 % of seeds and its
loops-off assertions for 22 % (1000 seeds, today's tracker) — seed 5 here read 2.2 % at
the first step, before the tracker had seen a frame.  This design failed
neither over 1000 seeds of that model (worst loops-on step 1.99 %, lowest loops-off
maximum 2.25 %); ``test_tracking`` runs it over 40 more.  The 0.1 s frames keep
counting noise from hiding a threshold crossing (with 50 ms frames: 8 failures in 1000).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from qkdlab.calibration.records import CalibrationRecord
from qkdlab.calibration.runtime import RunSupervisor, monitor_drift
from qkdlab.calibration.suite import Loops, apply_record
from qkdlab.cli import DEFAULT_MOCK_STATION
from qkdlab.mock_instruments.bench.optics import rotation_about_axis

from .conftest import Rig, mock_rig

DRIFT: dict[str, Any] = {
    "alice": {"im_drift_rad_per_s": 8e-4, "im_phase_diffusion_rad2_per_s": 2e-5},
    "channel": {"pol_diffusion_rad2_per_s": 1e-6},
    "simulation": {"drift_step_s": 1.0},  # drifts piecewise constant over 1 s
}
STEPS, STEP_S, FRAME_S = 12, 150.0, 0.1
TURN_RAD_PER_S = 0.4 / (STEPS * STEP_S)  # Alice's encoder reference, about S3
THRESHOLD = 0.014  # the tracker's (the mock's floor is ≈ 1.25 %)
SEEDS = (4, 5, 6, 7, 8)


def turn_now(rig: Rig) -> float:
    """Alice's encoder turn (rad) at the bench's present time."""
    return TURN_RAD_PER_S * rig.bench.now_s


def advance(rig: Rig) -> Callable[[float], None]:
    bench = rig.bench

    def run_for(seconds: float) -> None:
        with bench.lock:
            on = bench.alice.laser_on
            bench.alice.laser_on = False
            bench.acquire(seconds)
            bench.alice.laser_on = on
            bench.alice.prep_error_rad = [turn_now(rig)] * 4
    return run_for


def truth(rig: Rig) -> Callable[[], dict[str, float]]:
    bench = rig.bench

    def now() -> dict[str, float]:
        encoder = rotation_about_axis(2, turn_now(rig))
        r = bench.bob.pc_rotation @ bench.channel_rotation() @ encoder
        return {"mu_signal": bench.mean_photon_numbers()[0],
                "misalignment_rad": math.acos(min(1.0, (float(np.trace(r)) - 1) / 2))}
    return now


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged mock station, its ID1000 not paced by the wall clock."""
    doc = yaml.safe_load(Path(DEFAULT_MOCK_STATION).read_text())
    tagger = doc["instruments"]["tagger"]
    tagger["address"] = f"{tagger['address']}?realtime=0"
    path = tmp_path_factory.mktemp("drift") / "station.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def records(station: Path) -> list[CalibrationRecord]:
    """Timing and bias records, made once: they depend on the bench's settings, which
    every seed shares, not on its random streams."""
    from qcodes_contrib_drivers.drivers.Thorlabs import PM100D as upstream  # noqa: N811

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(upstream, "sleep", lambda _s: None)  # as the conftest does per test
        with mock_rig(seed=4, station=station, **DRIFT) as rig:
            rig.ctx.save_datasets = False  # module scope: no per-test database yet
            loops = Loops.over(rig.ctx)
            made = []
            for loop in (loops.timing, loops.bias):
                made.append(loop.run())
                rig.ctx.store.add(made[-1])
    return made


def drift_run(seed: int, station: Path, records: list[CalibrationRecord], loops_on: bool
              ) -> tuple[list[dict[str, Any]], float]:
    """One run of the drift; its rows and μ_signal at the start."""
    config = {"qber_threshold": THRESHOLD}
    with mock_rig(seed=seed, config=config, station=station, **DRIFT) as rig:
        ctx = rig.ctx
        for record in records:
            ctx.store.add(record)
            apply_record(ctx, record)
        ctx.light(True)
        deadline = time.monotonic() + 10.0  # the laser mock applies writes as they come
        while not rig.bench.alice.laser_on and time.monotonic() < deadline:
            time.sleep(0.01)
        mu0 = rig.bench.mean_photon_numbers()[0]
        supervisor = None
        if loops_on:
            loops = Loops.over(ctx)
            supervisor = RunSupervisor(clock=lambda: rig.bench.now_s,
                                       bias_lock=loops.bias.lock(records[-1]),
                                       tracker=loops.polarization.tracker(),
                                       bias_period_s=0.0)
        rows = monitor_drift(ctx, steps=STEPS, step_s=STEP_S, advance=advance(rig),
                             frame_s=FRAME_S, supervisor=supervisor, truth=truth(rig))
    return rows, mu0


@pytest.mark.parametrize("seed", SEEDS)
def test_loops_hold_qber_and_mu_through_half_an_hour_of_drift(
        seed: int, station: Path, records: list[CalibrationRecord]) -> None:
    on, mu0 = drift_run(seed, station, records, loops_on=True)
    off, _ = drift_run(seed, station, records, loops_on=False)  # the same drift, loops off
    q_on = np.array([r["qber"] for r in on])
    q_off = np.array([r["qber"] for r in off])
    # loops on: every step's QBER (measured before that step's corrections) below 2 %
    assert q_on.max() < 0.02, q_on
    # the signal intensity stays at its calibrated value (the lock's ±0.05 rad noise
    # costs < 0.2 %; the drift between steps is 0.12 rad: < 1 %)
    mu_on = np.array([r["mu_signal"] for r in on])
    assert np.all(np.abs(mu_on / mu0 - 1) < 0.02), mu_on
    # loops off: μ falls with the bias drift (1.44 rad in the run), the polarization
    # wanders off and the QBER rises above the loops-on figures
    mu_off = np.array([r["mu_signal"] for r in off])
    assert mu_off[-1] / mu0 < 0.8
    mis_on = np.array([r["misalignment_rad"] for r in on])
    mis_off = np.array([r["misalignment_rad"] for r in off])
    assert mis_off.mean() > mis_on.mean()
    # the mean of 12 frames has σ ≈ 0.015 %; the off run's is higher by more than that
    assert q_off.mean() > q_on.mean() + 0.001, (q_off, q_on)
    assert q_off.max() > 0.02
