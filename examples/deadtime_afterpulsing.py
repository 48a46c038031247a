"""Dead time and afterpulsing of a detector from its inter-arrival histogram.

    python examples/deadtime_afterpulsing.py --mock --duration 2 --light
    python examples/deadtime_afterpulsing.py --station lab.yaml --channel 3 --range-us 50

The time between consecutive tags of one detector channel (tagger role) is
histogrammed.  A Poisson source seen through a detector gives:

* a hole below the dead time τ_d: no gap is shorter;
* beyond it an exponential, ∝ exp(-r t), with r the primary click rate;
* on top of it, just after τ_d, an excess: afterpulses.

The fit: τ_d is the 0.1 % quantile of the gaps.  Past it (s = gap - τ_d) the gap
density of a dead-time detector with afterpulse probability p is

    (1 - p) r e^(-r s)  +  p q e^(-q s),      q = r + 1/τ_ap

(with probability p an afterpulse competes with the next photon: the first wins), so
the histogram is fitted with two exponentials by Poisson maximum likelihood; their
areas give p, their rates r and τ_ap.  Histogram and fit go to a QCoDeS dataset.
Copy this file and edit it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from qcodes.dataset import Measurement, initialise_or_create_database_at, load_or_create_experiment
from tqdm import tqdm

from qkdlab.cli import DEFAULT_MOCK_STATION, bb84_settings
from qkdlab.experiments.bb84.run import start_alice
from qkdlab.roles import bb84_roles, instrument_for
from qkdlab.station import open_station

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
where = parser.add_mutually_exclusive_group(required=True)
where.add_argument("--mock", action="store_true", help="the packaged mock bench")
where.add_argument("--station", type=Path, help="station file of your bench")
parser.add_argument("--duration", type=float, default=2.0, help="acquisition time (s)")
parser.add_argument("--channel", type=int, default=None,
                    help="tagger channel (default: the first detector channel)")
parser.add_argument("--range-us", type=float, default=20.0, help="histogram range (µs)")
parser.add_argument("--bin-ns", type=float, default=20.0, help="bin width (ns)")
parser.add_argument("--light", action="store_true",
                    help="switch Alice's light on at the station's operating point")
parser.add_argument("--data-dir", type=Path, default=Path("data"),
                    help="folder of the QCoDeS database (default ./data)")
args = parser.parse_args()
station_file = DEFAULT_MOCK_STATION if args.mock else args.station

bin_ps = int(args.bin_ns * 1e3)
edges_ps = np.arange(0, int(args.range_us * 1e6) + bin_ps, bin_ps, dtype=np.int64)
histogram = np.zeros(len(edges_ps) - 1, dtype=np.int64)
low_quantile_gaps: list[np.ndarray] = []  # the shortest gaps of each block, for τ_d

args.data_dir.mkdir(parents=True, exist_ok=True)
database = args.data_dir / "qkdlab.db"
initialise_or_create_database_at(database)
experiment = load_or_create_experiment("detector_timing", sample_name="qkd-bench")

with open_station(station_file) as bench:
    tagger = instrument_for(bench, "tagger")
    channel = args.channel or min(int(ch) for ch in bench.file.qkdlab["roles"]["detectors"])
    if args.light:
        start_alice(bb84_roles(bench), bb84_settings(station_file))

    n_gaps, sum_gaps_ps = 0, 0
    with tqdm(total=args.duration, unit="s", bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s",
              ) as bar:
        for block in tagger.stream(args.duration):
            gaps = np.diff(block.select(channel))  # gaps across block boundaries are lost
            histogram += np.histogram(gaps, bins=edges_ps)[0]
            n_gaps += len(gaps)
            sum_gaps_ps += int(gaps.sum())
            low_quantile_gaps.append(np.sort(gaps)[: max(1, len(gaps) // 100)])
            bar.set_postfix_str(f"{n_gaps:,} gaps")
            bar.update(block.duration_ps * 1e-12)

# -- fit ----------------------------------------------------------------------------------
def fit_two_exponentials(s_us: np.ndarray, counts: np.ndarray, guess: np.ndarray) -> np.ndarray:
    """``counts ~ Poisson(a e^(-r s) + b e^(-q s))``: (a, r, b, q) by Fisher scoring on
    the Poisson likelihood (empty bins count too), from ``guess``."""
    x = guess.astype(float)
    for _ in range(200):
        a, r, b, q = x
        ea, eb = np.exp(-r * s_us), np.exp(-q * s_us)
        mu = np.maximum(a * ea + b * eb, 1e-300)
        jac = np.column_stack([ea, -a * s_us * ea, eb, -b * s_us * eb])
        step = np.linalg.lstsq(jac.T @ (jac / mu[:, None]), jac.T @ (counts / mu - 1),
                               rcond=None)[0]
        while np.any(x + step <= 0):  # keep amplitudes and rates positive
            step /= 2
        x = x + step
        if np.max(np.abs(step / x)) < 1e-9:
            break
    return x


def fit_gaps(t_us: np.ndarray, counts: np.ndarray, dead_time_us: float,
             mean_wait_us: float) -> dict[str, float]:
    """Primary rate, afterpulse probability and time from the histogram past τ_d."""
    after = t_us > dead_time_us + args.bin_ns * 1e-3  # bins wholly past the dead time
    s_us, n = t_us[after] - dead_time_us, counts[after].astype(float)
    # start from the tail's exponential and the excess over it near the dead time
    tail = (s_us > 3 * mean_wait_us) & (n > 0)
    slope, log_a = np.polyfit(s_us[tail], np.log(n[tail]), 1)
    guess = np.array([np.exp(log_a), -slope, max(n[0] - np.exp(log_a), 1.0), -3 * slope])
    a, r, b, q = fit_two_exponentials(s_us, n, guess)
    if q < r:  # name the faster exponential the afterpulses'
        a, r, b, q = b, q, a, r
    return {"rate_hz": r * 1e6, "afterpulse_probability": (b / q) / (a / r + b / q),
            "afterpulse_tau_s": 1e-6 / (q - r)}


t_us = (edges_ps[:-1] + bin_ps / 2) * 1e-6  # bin centres (µs)
dead_time_us = float(np.quantile(np.concatenate(low_quantile_gaps), 0.1)) * 1e-6
fit: dict[str, float] = {"dead_time_s": dead_time_us * 1e-6, "gaps": n_gaps}
if histogram.sum() >= 1000:
    mean_wait_us = sum_gaps_ps * 1e-6 / n_gaps - dead_time_us
    fit |= fit_gaps(t_us, histogram, dead_time_us, mean_wait_us)

meas = Measurement(exp=experiment, name="deadtime_afterpulsing")
meas.register_custom_parameter("gap", label=f"Time between tags, channel {channel}", unit="s",
                               paramtype="array")
meas.register_custom_parameter("counts", label="Gaps per bin", unit="", setpoints=("gap",),
                               paramtype="array")
with meas.run() as saver:
    saver.add_result(("gap", t_us * 1e-6), ("counts", histogram))
    saver.dataset.add_metadata("station", str(station_file))
    saver.dataset.add_metadata("channel", channel)
    saver.dataset.add_metadata("fit", json.dumps(fit))
    dataset = saver.dataset

print(f"\nchannel {channel}: {n_gaps:,} gaps, {histogram.sum():,} of them below "
      f"{args.range_us:g} µs")
if "rate_hz" in fit:
    print(f"  dead time            {dead_time_us * 1e3:10.1f} ns   (no gap shorter: the hole)")
    print(f"  primary click rate   {fit['rate_hz']:10,.0f} /s   (the slow exponential)")
    print(f"  afterpulse prob.     {100 * fit['afterpulse_probability']:10.2f} %    "
          "(area of the fast excess)")
    print(f"  afterpulse time      {fit['afterpulse_tau_s'] * 1e6:10.2f} µs")
else:
    print("  too few gaps in range for a fit: more light (--light), a longer --duration "
          "or a wider --range-us")
print(f"data: dataset #{dataset.run_id} ({dataset.name}) in {database}")
