"""Scan the intensity modulator's DC bias and record its transfer curve.

    python examples/bias_scan.py --mock --signal counts --duration 0.2
    python examples/bias_scan.py --station lab.yaml --start -6 --stop 6 --points 49

The laser goes on at the station's operating point (``roles: laser_settings``), the
pattern stays off, and the bias of the ``modulator`` role (an IntensityModulator) is
stepped from --start to --stop.  At each point the script records the optical power
of the ``power_meter`` role or, with --signal counts or without a meter, the summed
count rate of the detector channels over --duration seconds.  A Mach–Zehnder passes
a + A cos(π V / Vπ + φ); the fit (least squares over a grid of Vπ) gives Vπ, the
biases of the peak and the null, and the extinction ratio.  At the end the bias goes
back to where it was and the laser off.  Copy this file and edit it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from qcodes.dataset import Measurement, initialise_or_create_database_at, load_or_create_experiment
from tqdm import tqdm

from qkdlab.cli import DEFAULT_MOCK_STATION
from qkdlab.roles import bb84_roles, instrument_for
from qkdlab.station import open_station

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
where = parser.add_mutually_exclusive_group(required=True)
where.add_argument("--mock", action="store_true", help="the packaged mock bench")
where.add_argument("--station", type=Path, help="station file of your bench")
parser.add_argument("--start", type=float, default=-8.0, help="first bias (V)")
parser.add_argument("--stop", type=float, default=8.0, help="last bias (V)")
parser.add_argument("--points", type=int, default=33, help="number of bias points")
parser.add_argument("--signal", choices=("auto", "power", "counts"), default="auto",
                    help="what to record (auto: the power meter if the station has one)")
parser.add_argument("--duration", type=float, default=0.2,
                    help="count time per point with --signal counts (s)")
parser.add_argument("--data-dir", type=Path, default=Path("data"),
                    help="folder of the QCoDeS database (default ./data)")
args = parser.parse_args()
station_file = DEFAULT_MOCK_STATION if args.mock else args.station


def fit_transfer(v: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """y = a + A cos(π v / Vπ + φ): linear least squares in (a, b, c) for each Vπ on a grid
    (b cos + c sin), keeping the Vπ with the smallest residual."""
    best: tuple[float, float, np.ndarray] = (np.inf, np.nan, np.zeros(3))
    span = float(np.ptp(v))
    for v_pi in np.linspace(span / 20, 2 * span, 4000):
        x = np.column_stack([np.ones_like(v), np.cos(np.pi * v / v_pi), np.sin(np.pi * v / v_pi)])
        coef, residual, *_ = np.linalg.lstsq(x, y, rcond=None)
        if residual.size and residual[0] < best[0]:
            best = (float(residual[0]), float(v_pi), coef)
    _, v_pi, (a, b, c) = best
    amplitude, phase = float(np.hypot(b, c)), float(np.arctan2(-c, b))
    peak_v = (-phase / np.pi) * v_pi  # π v / Vπ + φ = 0
    centre = (args.start + args.stop) / 2  # report the peak and null nearest the scan centre
    peak_v -= 2 * v_pi * np.round((peak_v - centre) / (2 * v_pi))
    null_v = min((peak_v - v_pi, peak_v + v_pi), key=lambda v: abs(v - centre))
    ratio = (a + amplitude) / (a - amplitude) if a > amplitude else np.inf
    return {"v_pi_v": v_pi, "peak_bias_v": float(peak_v), "null_bias_v": float(null_v),
            "extinction_ratio_db": float(10 * np.log10(ratio))}


args.data_dir.mkdir(parents=True, exist_ok=True)
database = args.data_dir / "qkdlab.db"
initialise_or_create_database_at(database)
experiment = load_or_create_experiment("modulator_bias", sample_name="qkd-bench")
biases = np.linspace(args.start, args.stop, args.points)

with open_station(station_file) as bench:
    modulator = instrument_for(bench, "modulator")
    meter = instrument_for(bench, "power_meter", required=False)
    use_power = args.signal == "power" or (args.signal == "auto" and meter is not None)
    if use_power and meter is None:
        parser.error("--signal power: the station has no 'power_meter' role")
    roles = bb84_roles(bench)
    channels = roles.detectors.channel_list

    meas = Measurement(exp=experiment, name="bias_scan")
    meas.register_custom_parameter("bias", label="Modulator bias", unit="V")
    if use_power:
        meas.register_custom_parameter("power", label="Optical power", unit="W",
                                       setpoints=("bias",))
    else:
        meas.register_custom_parameter("count_rate", label="Count rate, all detectors",
                                       unit="Hz", setpoints=("bias",))

    start_bias = modulator.get_bias()
    roles.transmitter.stop()  # no pattern: the DC transfer curve
    for name, value in roles.laser_settings.items():  # the station's operating point
        roles.laser.parameters[name](value)
    roles.laser.output_on()
    values = []
    try:
        with meas.run() as saver:
            saver.dataset.add_metadata("station", str(station_file))
            for bias in tqdm(biases, unit="point"):
                modulator.set_bias(float(bias))
                if use_power:
                    value = meter.read_power_w()
                    saver.add_result(("bias", bias), ("power", value))
                else:
                    block = roles.tagger.acquire(args.duration)
                    value = sum(block.counts(channels).values()) / (block.duration_ps * 1e-12)
                    saver.add_result(("bias", bias), ("count_rate", value))
                values.append(value)
            fit = fit_transfer(biases, np.array(values))
            saver.dataset.add_metadata("fit", json.dumps(fit))
            dataset = saver.dataset
    finally:
        roles.laser.output_off()
        modulator.set_bias(start_bias)

print(f"\n{'power (W)' if use_power else 'count rate (Hz)'} over {args.points} biases "
      f"from {args.start:g} V to {args.stop:g} V:")
print(f"  Vπ                 {fit['v_pi_v']:8.3f} V")
print(f"  peak at            {fit['peak_bias_v']:8.3f} V")
print(f"  null at            {fit['null_bias_v']:8.3f} V")
print(f"  extinction ratio   {fit['extinction_ratio_db']:8.1f} dB   (of the recorded signal)")
print(f"bias back at {start_bias:g} V, laser off")
print(f"data: dataset #{dataset.run_id} ({dataset.name}) in {database}")
