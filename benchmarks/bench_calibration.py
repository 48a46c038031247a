"""Calibration on the mock bench: time to a full calibration from scratch, and the QBER
over an hour of drift with the loops on and off (plotted to benchmarks/out/drift_qber.png).

``run() -> list[dict]`` rows: name, value, unit, and where there is one, baseline and
ratio (value / baseline).  The bench starts from a random modulator phase and Vπ,
random channel delays, a random VOA setting and a random fibre rotation.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("PYVISA_LIBRARY", "@py")

OUT = Path(__file__).resolve().parent / "out"
SEED = 7
DRIFT: dict[str, Any] = {
    "alice": {"im_drift_rad_per_s": 4e-4, "im_phase_diffusion_rad2_per_s": 1e-5},
    "channel": {"pol_diffusion_rad2_per_s": 4e-6},
    "simulation": {"drift_step_s": 1.0},
}
STEPS, STEP_S = 24, 150.0


def _context(loaded: Any, seed: int, **config: Any) -> Any:
    from qkdlab.calibrate_cmd import calibration_config, calibration_roles
    from qkdlab.calibration import CalibrationContext, CalibrationStore
    from qkdlab.cli import DEFAULT_MOCK_STATION

    cfg = calibration_config(loaded, DEFAULT_MOCK_STATION, True, **config)
    return CalibrationContext(calibration_roles(loaded), cfg, CalibrationStore(None),
                              rng=np.random.default_rng(seed))


def _advance(bench: Any) -> Any:
    def run_for(seconds: float) -> None:
        with bench.lock:
            on = bench.alice.laser_on
            bench.alice.laser_on = False
            bench.acquire(seconds)
            bench.alice.laser_on = on
    return run_for


def _truth(bench: Any) -> Any:
    def now() -> dict[str, float]:
        return {"mu_signal": bench.mean_photon_numbers()[0]}
    return now


def full_calibration() -> tuple[float, dict[str, str]]:
    """Seconds to calibrate every node from scratch; the final state of each node."""
    from qkdlab.calibration import build_graph
    from qkdlab.cli import DEFAULT_MOCK_STATION
    from qkdlab.station import open_station

    rng = np.random.default_rng(SEED)
    overrides = {"alice": {"im_phase_rad": float(rng.uniform(-math.pi, math.pi)),
                           "v_pi_v": float(rng.uniform(3.5, 5.0)),
                           "attenuation_db": float(rng.uniform(5.0, 15.0))},
                 "tagger": {"delay_ps": {c: int(rng.integers(0, 3000)) for c in (1, 2, 3, 4)}}}
    with open_station(DEFAULT_MOCK_STATION, seed=SEED, bench_overrides=overrides) as loaded:
        assert loaded.launcher is not None
        bench = loaded.launcher.bench
        with bench.lock:  # a random fibre rotation
            bench.channel.pol_diffusion_rad2_per_s = 500.0
            bench.alice.laser_on = False
            bench.acquire(0.01)
            bench.channel_rotation()
            bench.channel.pol_diffusion_rad2_per_s = 0.0
        ctx = _context(loaded, SEED)
        started = time.perf_counter()
        graph = build_graph(ctx)
        graph.maintain_all()
        elapsed = time.perf_counter() - started
        return elapsed, {n: graph.state(n).value for n in graph.nodes}


def drift_run(loops_on: bool, records: list[Any] | None = None
              ) -> tuple[list[dict[str, Any]], list[Any]]:
    """One hour of drift in 24 steps; the records (timing, bias, polarization) made."""
    from qkdlab.calibration import Loops, RunSupervisor, apply_record, monitor_drift
    from qkdlab.cli import DEFAULT_MOCK_STATION
    from qkdlab.station import open_station

    with open_station(DEFAULT_MOCK_STATION, seed=SEED, bench_overrides=DRIFT) as loaded:
        assert loaded.launcher is not None
        bench = loaded.launcher.bench
        ctx = _context(loaded, SEED, qber_threshold=0.015)
        loops = Loops.over(ctx)
        if records is None:
            records = []
            for loop in (loops.timing, loops.bias, loops.polarization):
                records.append(loop.run())
                ctx.store.add(records[-1])
        else:
            for record in records:
                ctx.store.add(record)
                apply_record(ctx, record)
        supervisor = None
        if loops_on:
            supervisor = RunSupervisor(clock=lambda: bench.now_s,
                                       bias_lock=loops.bias.lock(records[1]),
                                       tracker=loops.polarization.tracker(), bias_period_s=0.0)
        rows = monitor_drift(ctx, steps=STEPS, step_s=STEP_S, advance=_advance(bench),
                             supervisor=supervisor, truth=_truth(bench))
    return rows, records


def plot(on: list[dict[str, Any]], off: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for rows, label, style in ((on, "loops on", "o-"), (off, "loops off", "s--")):
        t = np.array([r["time_s"] for r in rows]) / 60
        ax1.plot(t, [100 * r["qber"] for r in rows], style, label=label)
        ax2.plot(t, [r["mu_signal"] for r in rows], style, label=label)
    ax1.axhline(2.0, color="grey", lw=0.8)
    ax1.set_ylabel("mean QBER (%)")
    ax1.legend()
    ax2.set_ylabel("μ signal (photons/pulse)")
    ax2.set_xlabel("bench time (min)")
    fig.suptitle("Mock bench, 1 h of modulator and polarization drift")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run() -> list[dict[str, Any]]:
    import qcodes
    from qcodes.dataset import initialise_or_create_database_at

    OUT.mkdir(parents=True, exist_ok=True)
    db = OUT / "calibration-bench.db"
    previous = qcodes.config.core.db_location
    initialise_or_create_database_at(db)
    try:
        seconds, states = full_calibration()
        on, records = drift_run(True)
        off, _ = drift_run(False, records)
    finally:
        qcodes.config.core.db_location = previous
    plot(on, off, OUT / "drift_qber.png")
    q_on = np.array([r["qber"] for r in on])
    q_off = np.array([r["qber"] for r in off])
    mu_on = np.array([r["mu_signal"] for r in on])
    mu_off = np.array([r["mu_signal"] for r in off])
    good = sum(v == "good" for v in states.values())
    return [
        {"name": "calibration: full, from scratch (mock bench)", "value": round(seconds, 2),
         "unit": "s"},
        {"name": "calibration: nodes good after the full calibration", "value": good,
         "unit": f"of {len(states)}"},
        {"name": "drift 1 h: mean QBER, loops on", "value": round(float(q_on.mean()), 5),
         "unit": "", "baseline": round(float(q_off.mean()), 5),
         "ratio": round(float(q_on.mean() / q_off.mean()), 3)},
        {"name": "drift 1 h: max QBER, loops on", "value": round(float(q_on.max()), 5),
         "unit": "", "baseline": round(float(q_off.max()), 5),
         "ratio": round(float(q_on.max() / q_off.max()), 3)},
        {"name": "drift 1 h: final μ_signal, loops on", "value": round(float(mu_on[-1]), 4),
         "unit": "photons/pulse", "baseline": round(float(mu_off[-1]), 4),
         "ratio": round(float(mu_on[-1] / mu_off[-1]), 3)},
        {"name": "drift 1 h: tracker frames", "value": int(sum(r["search_frames"] for r in on)),
         "unit": "frames"},
    ]


if __name__ == "__main__":  # pragma: no cover
    for row in run():
        print(row)
