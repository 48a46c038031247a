"""Soak: one long BB84 run on the mock bench with drift, the loops on, and the process
watched for leaks.  A benchmark script, not a CI test (``make soak``; 30 min by default).

The bench drifts as in ``bench_calibration`` (modulator bias walk and phase diffusion,
fibre polarization diffusion).  Before the run, the timing, bias and polarization loops
calibrate from scratch; during it a :class:`~qkdlab.calibration.RunSupervisor` takes
every frame: a bias-lock step every ``--bias-period`` seconds of bench time, read from a
monitor photodiode on a tap after the modulator (a second power meter in the soak's
station: a count probe needs the tagger, which is streaming), and the polarization
tracker.  Every frame the script samples the process: resident memory, open file
descriptors, threads; and the frame's QBER.

It prints a table per ``--window`` minutes of bench time and a verdict:

- QBER held: every window's mean QBER under ``--qber-limit`` (2 %),
- memory flat: growth of the RSS *floor* (a window's lowest sample: key blocks in flight
  swing the RSS by a few hundred MB, so a single sample says little) from the second
  window (the first is the warm-up, while the first key blocks fill) to the last under
  ``--rss-limit-mb``, and the slope of a line through those windows' floors (MB/h),
- no handle growth: the fewest open file descriptors and threads in the last window equal
  those in the first (a leak raises the floor; a thread or file open for a moment does not).

Usage::

    python benchmarks/soak.py [--minutes 30] [--distance-km 25] [--seed 7] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

os.environ.setdefault("PYVISA_LIBRARY", "@py")

HERE = Path(__file__).resolve().parent
DRIFT: dict[str, Any] = {
    "alice": {"im_drift_rad_per_s": 4e-4, "im_phase_diffusion_rad2_per_s": 1e-5},
    "channel": {"pol_diffusion_rad2_per_s": 4e-6},
    "simulation": {"drift_step_s": 1.0},
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Resident set size of this process (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 1e6


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def soak_station(directory: Path) -> Path:
    """The mock station plus a monitor photodiode after the modulator (bias-lock probe)."""
    from qkdlab.cli import DEFAULT_MOCK_STATION

    doc = yaml.safe_load(Path(DEFAULT_MOCK_STATION).read_text())
    meter = dict(doc["instruments"]["power_meter"])
    meter["address"] = "mock://thorlabs/pm100d?point=modulator_tap"
    doc["instruments"]["monitor_pd"] = meter
    path = directory / "soak_station.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Sampler:
    """Per-frame samples of the process and of the frame."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.rows: list[dict[str, float]] = []
        self.started = time.perf_counter()
        self._next_report = -math.inf

    def on_frame(self, stats: Any) -> None:
        from qkdlab.calibration.polarization import mean_qber

        row = {"bench_s": float(self.clock()), "wall_s": time.perf_counter() - self.started,
               "qber": mean_qber(stats), "rss_mb": rss_mb(), "fds": float(open_fds()),
               "threads": float(threading.active_count()), "lost": float(stats.lost_tags)}
        self.rows.append(row)
        if row["bench_s"] >= self._next_report:  # a line a minute: progress, and the
            self._next_report = row["bench_s"] + 60.0  # figures if the run is cut short
            print("soak " + json.dumps({k: round(v, 5) for k, v in row.items()}),
                  file=sys.stderr, flush=True)


def windows(rows: list[dict[str, float]], window_s: float) -> list[dict[str, float]]:
    """Per window of bench time: mean/max QBER and the process figures at its end."""
    out: list[dict[str, float]] = []
    if not rows:
        return out
    t0 = rows[0]["bench_s"]
    edges = np.arange(t0, rows[-1]["bench_s"] + window_s, window_s)
    for lo, hi in itertools.pairwise(edges):
        chunk = [r for r in rows if lo <= r["bench_s"] < hi]
        if not chunk:
            continue
        q = np.array([r["qber"] for r in chunk])
        q = q[np.isfinite(q)]
        out.append({"from_min": (lo - t0) / 60, "to_min": (hi - t0) / 60,
                    "frames": len(chunk),
                    "qber_mean": float(q.mean()) if q.size else math.nan,
                    "qber_max": float(q.max()) if q.size else math.nan,
                    "rss_mb": chunk[-1]["rss_mb"],
                    "rss_floor_mb": min(r["rss_mb"] for r in chunk),
                    "rss_peak_mb": max(r["rss_mb"] for r in chunk),
                    # floors too: a worker thread or file open for a moment is no leak
                    "fds": min(r["fds"] for r in chunk),
                    "threads": min(r["threads"] for r in chunk),
                    "lost": float(sum(r["lost"] for r in chunk))})
    return out


def soak(minutes: float, distance_km: float, seed: int, out: Path,
         bias_period_s: float, drift: bool = True) -> dict[str, Any]:
    from qkdlab.calibrate_cmd import calibration_config, calibration_roles
    from qkdlab.calibration import (
        CalibrationContext,
        CalibrationStore,
        Loops,
        RunSupervisor,
        check_before_run,
    )
    from qkdlab.cli import bb84_settings
    from qkdlab.experiments.bb84.run import run_bb84
    from qkdlab.roles import bb84_roles
    from qkdlab.station import open_station

    out.mkdir(parents=True, exist_ok=True)
    station = soak_station(out)
    base: dict[str, Any] = DRIFT if drift else {"channel": {}}
    overrides = {**base, "channel": {**base["channel"], "length_km": distance_km}}
    with open_station(station, seed=seed, bench_overrides=overrides) as loaded:
        assert loaded.launcher is not None
        bench = loaded.launcher.bench
        cfg = calibration_config(loaded, station, True, qber_threshold=0.015)
        store = CalibrationStore(out / "calibration.jsonl")
        ctx = CalibrationContext(calibration_roles(loaded), cfg, store,
                                 rng=np.random.default_rng(seed))
        loops = Loops.over(ctx)
        # the bias loop and its lock read the monitor photodiode after the modulator: the
        # lock's reference (ψ, depth) must come from the probe the lock will use
        monitor = loaded.station.components["monitor_pd"]
        bias_ctx = CalibrationContext(
            dataclasses.replace(ctx.roles, power_meter=monitor),
            dataclasses.replace(cfg, power_meter_point="after_modulator"), store,
            rng=np.random.default_rng(seed + 1))
        bias_loop = Loops.over(bias_ctx).bias
        t = time.perf_counter()
        records = {}
        # from scratch in dependency order; then the bias again on the monitor photodiode
        for loop in (loops.timing, loops.bias, loops.detectors, loops.mu, loops.polarization,
                     bias_loop):
            record = loop.run()
            store.add(record)
            records[record.node] = record
        calibrate_s = time.perf_counter() - t
        supervisor = RunSupervisor(
            clock=lambda: bench.now_s, bias_lock=bias_loop.lock(records["bias"]),
            tracker=loops.polarization.tracker(), bias_period_s=bias_period_s)
        sampler = Sampler(lambda: bench.now_s)

        def on_frame(stats: Any) -> None:
            supervisor.on_frame(stats)
            sampler.on_frame(stats)

        calibration = check_before_run(store, policy="warn")
        settings = calibration.apply(bb84_settings(station, seed=seed))
        truth = bench.mean_photon_numbers()
        print(f"mu calibrated {settings.mu_signal:.4f}/{settings.mu_decoy:.4f}/"
              f"{settings.mu_vacuum:.5f}, bench {truth[0]:.4f}/{truth[1]:.4f}/{truth[2]:.5f}",
              file=sys.stderr)
        fds_before = open_fds()
        result = run_bb84(bb84_roles(loaded), settings, duration_s=minutes * 60.0,
                          data_dir=out / "data", progress=sys.stderr.isatty(),
                          on_frame=on_frame, metadata=calibration.metadata())
    summary = result.summary()
    return {"summary": summary, "samples": sampler.rows, "calibrate_s": calibrate_s,
            "fds_before_run": fds_before, "fds_after_close": open_fds(),
            "lock_steps": sum("bias_v" in e for e in supervisor.log)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="bench time of the run")
    parser.add_argument("--distance-km", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--window", type=float, default=5.0, help="table window (min)")
    parser.add_argument("--bias-period", type=float, default=30.0, help="bias lock (s)")
    parser.add_argument("--no-drift", action="store_true", help="a still bench (control)")
    parser.add_argument("--qber-limit", type=float, default=0.02)
    parser.add_argument("--rss-limit-mb", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the data here (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qkdlab-soak-") as tmp:
        out = args.out or Path(tmp)
        done = soak(args.minutes, args.distance_km, args.seed, out, args.bias_period,
                    drift=not args.no_drift)
        raw_bytes = Path(done["summary"]["raw_tags"]).stat().st_size
    rows = done["samples"]
    table = windows(rows, args.window * 60.0)
    s = done["summary"]
    print(f"\nSoak: {args.minutes:g} min of bench time, {args.distance_km:g} km, seed "
          f"{args.seed}; drift {'off' if args.no_drift else json.dumps(DRIFT)}")
    print(f"calibration from scratch {done['calibrate_s']:.1f} s; run wall time "
          f"{s['wall_time_s']:.0f} s; status {s['status']}; raw tags {raw_bytes / 1e9:.2f} GB; "
          f"bias-lock steps {done['lock_steps']}")
    print(f"\n{'window (min)':>14} {'frames':>7} {'QBER mean':>10} {'QBER max':>9} "
          f"{'RSS floor':>10} {'RSS peak':>9} {'fds':>5} {'threads':>8} {'lost tags':>10}")
    for w in table:
        print(f"{w['from_min']:6.1f}–{w['to_min']:<6.1f} {w['frames']:>7} "
              f"{100 * w['qber_mean']:>9.2f}% {100 * w['qber_max']:>8.2f}% "
              f"{w['rss_floor_mb']:>10.0f} {w['rss_peak_mb']:>9.0f} {w['fds']:>5.0f} "
              f"{w['threads']:>8.0f} {w['lost']:>10.0f}")
    if len(table) < 3:
        print("too short for a verdict (need three windows)")
        return 1
    first, last = table[0], table[-1]
    # after the first window (warm-up: the first key blocks fill), the floor's growth
    # and its trend over the windows (MB per hour of bench time)
    steady = table[1:]
    t_h = np.array([(w["from_min"] + w["to_min"]) / 2 for w in steady]) / 60
    floors = [w["rss_floor_mb"] for w in steady]
    slope = float(np.polyfit(t_h, floors, 1)[0]) if len(steady) > 2 else math.nan
    growth = steady[-1]["rss_floor_mb"] - steady[0]["rss_floor_mb"]
    held = all(w["qber_mean"] < args.qber_limit for w in table)
    flat = growth < args.rss_limit_mb
    handles = last["fds"] == first["fds"] and last["threads"] == first["threads"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(f"\nQBER held (< {100 * args.qber_limit:g} % per window): {held}")
    print(f"memory flat: RSS floor {steady[0]['rss_floor_mb']:.0f} → "
          f"{last['rss_floor_mb']:.0f} MB after the first window (growth {growth:+.0f} MB, "
          f"trend of the window floors {slope:+.1f} MB/h, "
          f"peak {peak:.0f} MB; limit {args.rss_limit_mb:g} MB): {flat}")
    print(f"no handle growth: fds {first['fds']:.0f} → {last['fds']:.0f}, threads "
          f"{first['threads']:.0f} → {last['threads']:.0f}; fds before the run "
          f"{done['fds_before_run']}, after closing the station {done['fds_after_close']}: "
          f"{handles}")
    print(f"key: {s['secure_key_bits']} secure bits, aborted {s['aborted']} "
          f"({s['abort_reason']}); sifted {s['sifted_bits']}, QBER Z/X {s['qber_z']:.4f}/"
          f"{s['qber_x']:.4f}, gains {s['gain_signal']:.3g}/{s['gain_decoy']:.3g}/"
          f"{s['gain_vacuum']:.3g}, Y1 ≥ {s['y1_lower']}, e1 ≤ {s['e1_upper']}")
    return 0 if held and flat and handles else 1


if __name__ == "__main__":
    sys.exit(main())
