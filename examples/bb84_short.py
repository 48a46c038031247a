"""A short decoy-state BB84 run and a table of what it achieved.

    python examples/bb84_short.py --mock --duration 1
    python examples/bb84_short.py --station lab.yaml --duration 10

Alice's pattern and laser (``transmitter`` and ``laser`` roles) run at the station's
settings (``qkdlab: bb84:``), Bob's tagger (``tagger``, with the ``detectors`` map)
streams tags; ``run_bb84`` synchronises, sifts and estimates frame by frame, writes
one QCoDeS dataset row per frame and the raw tags to a file next to the database.
However the run ends, the dataset is closed with its status and every instrument is
put in its safe state.  Copy this file and edit it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qkdlab.cli import DEFAULT_MOCK_STATION, bb84_settings
from qkdlab.experiments.bb84.run import run_bb84
from qkdlab.roles import bb84_roles
from qkdlab.station import open_station

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
where = parser.add_mutually_exclusive_group(required=True)
where.add_argument("--mock", action="store_true", help="the packaged mock bench")
where.add_argument("--station", type=Path, help="station file of your bench")
parser.add_argument("--duration", type=float, default=1.0, help="acquisition time (s)")
parser.add_argument("--seed", type=int, default=1, help="seed of Alice's pattern")
parser.add_argument("--data-dir", type=Path, default=Path("data"),
                    help="folder of the QCoDeS database and raw tags (default ./data)")
args = parser.parse_args()
station_file = DEFAULT_MOCK_STATION if args.mock else args.station

settings = bb84_settings(station_file, seed=args.seed)
with open_station(station_file) as bench:
    result = run_bb84(bb84_roles(bench), settings, duration_s=args.duration,
                      data_dir=args.data_dir, metadata={"station": str(station_file)},
                      progress=True)  # run_bb84 shows its own tqdm bar


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def num(x: float | None, fmt: str = ".4g") -> str:
    return "n/a" if x is None else format(x, fmt)


s = result.summary()
rows = [
    ("status", s["status"] + (f" ({s['abort_reason']})" if s["aborted"] else "")),
    ("pulses sent", f"{s['pulses']:,}"),
    ("detections", f"{s['detections']:,}"),
    ("sifted bits (Z basis)", f"{s['sifted_bits']:,} ({s['sifted_bits_z']:,})"),
    ("QBER Z / X", f"{pct(s['qber_z'])} / {pct(s['qber_x'])}"),
    ("gain signal / decoy / vacuum",
     f"{num(s['gain_signal'])} / {num(s['gain_decoy'])} / {num(s['gain_vacuum'])}"),
    ("single-photon yield Y1 >=", num(s["y1_lower"])),
    ("single-photon error e1 <=", pct(s["e1_upper"])),
    ("secure key rate (asymptotic)", f"{num(s['key_rate_bps'], ',.0f')} bit/s"),
    ("pulse period on the tagger", f"{num(s['sync_period_ps'], '.4f')} ps"),
]
width = max(len(label) for label, _ in rows)
print(f"\nBB84 run {s['run_id']}, {args.duration:g} s")
for label, value in rows:
    print(f"  {label:<{width}}  {value}")
print(f"data: dataset #{s['dataset']} in {s['database']}; raw tags {s['raw_tags']}")
sys.exit(0 if s["status"] == "completed" else 1)
