"""Live count rates: detections per second on each detector channel of the time tagger.

    python examples/live_count_rates.py --mock --duration 10 --light
    python examples/live_count_rates.py --station lab.yaml --duration 60

Streams tag blocks from the tagger (the station's ``tagger`` role) for --duration
seconds, counts the tags of each detector channel (``qkdlab: roles: detectors``),
shows the rates as they come and saves one row per block to a QCoDeS dataset.
With --light, Alice's laser and pattern run at the station's operating point;
without, you see dark counts.  On exit every instrument goes to its safe state.
Copy this file and edit it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
parser.add_argument("--duration", type=float, default=5.0, help="how long to count (s)")
parser.add_argument("--light", action="store_true",
                    help="switch Alice's light on at the station's operating point")
parser.add_argument("--data-dir", type=Path, default=Path("data"),
                    help="folder of the QCoDeS database (default ./data)")
args = parser.parse_args()
station_file = DEFAULT_MOCK_STATION if args.mock else args.station

args.data_dir.mkdir(parents=True, exist_ok=True)
database = args.data_dir / "qkdlab.db"
initialise_or_create_database_at(database)
experiment = load_or_create_experiment("count_rates", sample_name="qkd-bench")

with open_station(station_file) as bench:
    tagger = instrument_for(bench, "tagger")
    channels = sorted(int(ch) for ch in bench.file.qkdlab["roles"]["detectors"])
    if args.light:
        start_alice(bb84_roles(bench), bb84_settings(station_file))

    meas = Measurement(exp=experiment, name="live_count_rates")
    meas.register_custom_parameter("time", label="Time since start", unit="s")
    for ch in channels:
        meas.register_custom_parameter(f"rate_ch{ch}", label=f"Count rate, channel {ch}",
                                       unit="Hz", setpoints=("time",))

    totals = dict.fromkeys(channels, 0)
    elapsed_s = 0.0
    with meas.run() as saver, tqdm(total=args.duration, unit="s",
                                   bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s") as bar:
        saver.dataset.add_metadata("station", str(station_file))
        saver.dataset.add_metadata("light", str(args.light))
        for block in tagger.stream(args.duration):
            seconds = block.duration_ps * 1e-12
            counts = block.counts(channels)
            rates = {ch: counts[ch] / seconds for ch in channels}
            elapsed_s += seconds
            saver.add_result(("time", elapsed_s),
                             *((f"rate_ch{ch}", rates[ch]) for ch in channels))
            for ch in channels:
                totals[ch] += counts[ch]
            bar.set_postfix_str("  ".join(f"ch{ch} {rates[ch]:,.0f}/s" for ch in channels))
            bar.update(seconds)
        dataset = saver.dataset

print("\nmean count rate per detector channel:")
for ch in channels:
    print(f"  channel {ch}: {totals[ch] / max(elapsed_s, 1e-12):12,.0f} counts/s")
print(f"data: dataset #{dataset.run_id} ({dataset.name}) in {database}")
