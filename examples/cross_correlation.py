"""Start-stop histogram between two tagger channels: the delay from each start tag to
the next stop tag.

    python examples/cross_correlation.py --mock --duration 2 --light
    python examples/cross_correlation.py --station lab.yaml --channels 1 3 --range-ns 200

The tags come from the time tagger (``tagger`` role) block by block; each block's
start-stop delays are found at once with numpy (``searchsorted``: for every start,
the first stop at or after it) and added to the histogram.  A start whose next stop
lies in the following block is not counted (a fraction range/block length of them,
negligible).  The histogram is saved as one QCoDeS dataset; with a pulsed source its
comb of peaks shows the pulse period, printed at the end.  Copy this file and edit it.
"""

from __future__ import annotations

import argparse
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
parser.add_argument("--channels", type=int, nargs=2, metavar=("START", "STOP"), default=None,
                    help="tagger channels (default: the first two detector channels)")
parser.add_argument("--range-ns", type=float, default=100.0, help="histogram range (ns)")
parser.add_argument("--bin-ps", type=int, default=100, help="bin width (ps)")
parser.add_argument("--light", action="store_true",
                    help="switch Alice's light on at the station's operating point")
parser.add_argument("--data-dir", type=Path, default=Path("data"),
                    help="folder of the QCoDeS database (default ./data)")
args = parser.parse_args()
station_file = DEFAULT_MOCK_STATION if args.mock else args.station

range_ps = int(args.range_ns * 1000)
edges_ps = np.arange(0, range_ps + args.bin_ps, args.bin_ps, dtype=np.int64)
histogram = np.zeros(len(edges_ps) - 1, dtype=np.int64)


def start_stop_delays(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Delay (ps) from each start to the first stop at or after it (starts with none dropped)."""
    nxt = np.searchsorted(stops, starts, side="left")
    has_stop = nxt < len(stops)
    return stops[nxt[has_stop]] - starts[has_stop]


args.data_dir.mkdir(parents=True, exist_ok=True)
database = args.data_dir / "qkdlab.db"
initialise_or_create_database_at(database)
experiment = load_or_create_experiment("cross_correlation", sample_name="qkd-bench")

with open_station(station_file) as bench:
    tagger = instrument_for(bench, "tagger")
    detector_channels = sorted(int(ch) for ch in bench.file.qkdlab["roles"]["detectors"])
    start_ch, stop_ch = args.channels or detector_channels[:2]
    if args.light:
        start_alice(bb84_roles(bench), bb84_settings(station_file))

    n_starts = 0
    with tqdm(total=args.duration, unit="s", bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s",
              ) as bar:
        for block in tagger.stream(args.duration):
            starts, stops = block.select(start_ch), block.select(stop_ch)
            histogram += np.histogram(start_stop_delays(starts, stops), bins=edges_ps)[0]
            n_starts += len(starts)
            bar.set_postfix_str(f"{histogram.sum():,} pairs")
            bar.update(block.duration_ps * 1e-12)

meas = Measurement(exp=experiment, name="cross_correlation")
meas.register_custom_parameter("delay", label=f"Delay ch{start_ch} -> ch{stop_ch}", unit="s",
                               paramtype="array")
meas.register_custom_parameter("counts", label="Start-stop pairs", unit="",
                               setpoints=("delay",), paramtype="array")
centres_s = (edges_ps[:-1] + args.bin_ps / 2) * 1e-12
with meas.run() as saver:
    saver.add_result(("delay", centres_s), ("counts", histogram))
    saver.dataset.add_metadata("station", str(station_file))
    saver.dataset.add_metadata("channels", f"{start_ch},{stop_ch}")
    dataset = saver.dataset

# the comb of a pulsed source: the strongest non-zero frequency of the histogram
spectrum = np.abs(np.fft.rfft(histogram - histogram.mean()))
freqs = np.fft.rfftfreq(len(histogram), d=args.bin_ps)  # 1/ps
peak = int(np.argmax(spectrum[1:])) + 1
print(f"\n{histogram.sum():,} start-stop pairs from {n_starts:,} starts on channel "
      f"{start_ch} (stops on channel {stop_ch}) within {args.range_ns:g} ns")
print(f"strongest periodicity: {1e-3 / freqs[peak]:.3f} ns "
      f"(a pulsed source's period; resolution ±{args.range_ns / peak**2:.3f} ns)")
print(f"data: dataset #{dataset.run_id} ({dataset.name}) in {database}")
