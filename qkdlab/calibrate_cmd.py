"""``qkdlab calibrate``: run calibration loops on a station, or show what is valid.

::

    qkdlab calibrate [all|detectors|timing|bias|mu|polarization] (--mock | --station FILE)
                     [--json] [--force] [--data-dir DIR] [--seed N]
    qkdlab calibrate status [--json] [--data-dir DIR]

A target is *maintained*: its dependencies first, then its quick check, and a full
calibration only if the check fails or there is no record (``--force``: calibrate the
target, and for ``all`` every node, without checking).  Records go to
``DIR/calibration.jsonl``, datasets to ``DIR/qkdlab.db``.  This module sits in the root
package because it opens stations (which may start mocks); :mod:`qkdlab.calibration`
never does.  ``cli.py`` wires it with ``calibrate_cmd.add_parser(sub)``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from qkdlab.station import StationError

TARGETS = ("all", "detectors", "timing", "bias", "mu", "polarization")

def mock_calibration_section(qkdlab_section: dict[str, Any]) -> dict[str, Any]:
    """The mock bench's ``qkdlab: calibration:`` section, for a station file without one.

    The packaged mock's optical path: a tap after Alice's attenuator (mock.yaml's
    PM100D), the fibre at 0.2 dB/km (bench default) over the station's length, Bob's
    optics 1 dB (bench default), a passive basis splitter sending ``z_fraction`` to the Z
    arm with balanced states (half of an arm's light per detector), waveplates in
    rotation mounts (0…360°, period 180°).
    """
    bench = qkdlab_section.get("mock_bench") or {}
    length_km = float((bench.get("channel") or {}).get("length_km", 25.0))
    z = float((bench.get("bob") or {}).get("z_fraction", 0.5))
    detectors = (qkdlab_section.get("roles") or {}).get("detectors") or {}
    share = {int(ch): (z if int(v[0]) == 0 else 1.0 - z) / 2 for ch, v in detectors.items()}
    return {"power_meter_point": "after_attenuator", "meter_to_output_db": 0.0,
            "link_loss_db": 0.2 * length_km, "bob_loss_db": 1.0,
            "detector_share": share or None,
            "actuator_limits": [0.0, 360.0], "actuator_period": 180.0}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``calibrate`` to the ``qkdlab`` subcommands."""
    cal = sub.add_parser("calibrate", help="calibrate the link (or show calibration status)")
    cal.add_argument("target", nargs="?", default="all", choices=(*TARGETS, "status"),
                     help="what to calibrate (default all), or 'status'")
    where = cal.add_mutually_exclusive_group()
    where.add_argument("--mock", action="store_true", help="on the packaged mock bench")
    where.add_argument("--station", type=Path, help="station file of a bench")
    cal.add_argument("--data-dir", type=Path, default=Path("data"),
                     help="calibration records and datasets (default ./data)")
    cal.add_argument("--force", action="store_true",
                     help="calibrate without trying the quick check first")
    cal.add_argument("--seed", type=int, default=1,
                     help="mock bench seed and the calibration's random choices (default 1)")
    cal.add_argument("--json", action="store_true", help="print one JSON object")
    cal.set_defaults(func=cmd_calibrate)


def _store(data_dir: Path) -> Any:
    from qkdlab.calibration.store import CalibrationStore

    return CalibrationStore(data_dir / "calibration.jsonl")


def _when(t: float) -> str:
    if not math.isfinite(t):
        return "-"
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _left(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds <= 0:
        return "expired"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status_rows(store: Any, now: float | None = None) -> list[dict[str, Any]]:
    """The status table as dicts (node, state, record id, valid until, left, summary)."""
    now = time.time() if now is None else now
    return [{"node": r.node, "state": r.state, "record_id": r.record_id,
             "created": _when(r.created_s), "valid_until": _when(r.valid_until_s),
             "valid_until_s": r.valid_until_s if math.isfinite(r.valid_until_s) else None,
             "left": _left(r.remaining_s(now)), "summary": r.summary}
            for r in store.status(now_s=now)]


def format_status(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`status_rows`."""
    head = f"{'node':<13}{'state':<9}{'valid until':<21}{'left':<10}{'record':<18}figures"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['node']:<13}{r['state']:<9}{r['valid_until']:<21}{r['left']:<10}"
                     f"{(r['record_id'] or '-'):<18}{r['summary']}")
    return "\n".join(lines)


def calibration_roles(loaded: Any) -> Any:
    """Calibration roles of a loaded station (the optional ones None when absent)."""
    from qkdlab.calibration.config import CalibrationRoles
    from qkdlab.roles import bb84_roles, instrument_for

    b = bb84_roles(loaded)
    extra = {name: instrument_for(loaded, name, required=False)
             for name in ("modulator", "attenuator", "power_meter", "polarization")}
    used = {id(x) for x in (b.transmitter, b.tagger, b.laser, *extra.values())}
    return CalibrationRoles(transmitter=b.transmitter, tagger=b.tagger, detectors=b.detectors,
                            laser=b.laser, laser_settings=dict(b.laser_settings),
                            others=[o for o in b.others if id(o) not in used],
                            detector_units=dict(b.detector_units),
                            attenuation_db=b.attenuation_db, **extra)


def calibration_config(loaded: Any, station: Path, mock: bool, **overrides: Any) -> Any:
    """The station's calibration config; the run's pattern and μ targets from its
    ``bb84`` section; with ``mock`` and no section, :func:`mock_calibration_section`."""
    from qkdlab.calibration.config import CalibrationConfig, Pattern
    from qkdlab.cli import bb84_settings

    section = loaded.file.qkdlab.get("calibration")
    if section is None and mock:
        section = mock_calibration_section(loaded.file.qkdlab)
    s = bb84_settings(station)
    pattern = Pattern(p_z=s.p_z, p_signal=s.p_signal, p_decoy=s.p_decoy, seed=s.seed or 1,
                      frame_pulses=s.frame_pulses)
    try:
        return CalibrationConfig.from_mapping(section, **{
            "pattern": pattern, "rep_rate_hz": s.rep_rate_hz, "mu_signal_target": s.mu_signal,
            "mu_decoy_target": s.mu_decoy, **overrides})
    except (TypeError, ValueError) as err:
        raise StationError(f"{station}: 'qkdlab: calibration': {err}") from err


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Maintain (or force) the target's calibration; print the actions and the status."""
    store = _store(args.data_dir)
    if args.target == "status":
        rows = status_rows(store)
        print(json.dumps({"status": rows}) if args.json else format_status(rows))
        return 0
    if not args.mock and args.station is None:
        raise StationError("calibrate needs --mock or --station FILE")
    import numpy as np
    from qcodes.dataset import initialise_or_create_database_at

    from qkdlab.calibration.graph import MaintainReport, State
    from qkdlab.calibration.measure import CalibrationContext
    from qkdlab.calibration.suite import build_graph
    from qkdlab.cli import DEFAULT_MOCK_STATION
    from qkdlab.station import open_station

    station = DEFAULT_MOCK_STATION if args.mock else args.station
    args.data_dir.mkdir(parents=True, exist_ok=True)
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    started = time.perf_counter()
    with quiet:
        initialise_or_create_database_at(args.data_dir / "qkdlab.db")
        with open_station(station, seed=args.seed if args.mock else None) as loaded:
            cfg = calibration_config(loaded, station, args.mock)
            ctx = CalibrationContext(calibration_roles(loaded), cfg, store,
                                     rng=np.random.default_rng(args.seed))
            graph = build_graph(ctx)
            names = list(graph.nodes) if args.target == "all" else [args.target]
            report = MaintainReport()
            if args.force:
                for name in graph.order(names) if args.target == "all" else names:
                    graph.calibrate(name, report)
            else:
                done: dict[str, State] = {}
                for name in graph.order(names):
                    graph.maintain(name, report, done)
            states = {n: graph.state(n).value for n in graph.order(names)}
    rows = status_rows(store)
    out = {"target": args.target, "station": str(station),
           "actions": [{"node": n, "action": a, "detail": d} for n, a, d in report.actions],
           "states": states, "status": rows,
           "wall_time_s": round(time.perf_counter() - started, 2)}
    if args.json:
        print(json.dumps(out))
    else:
        for n, a, d in report.actions:
            print(f"{n:<13}{a:<11}{d}")
        print()
        print(format_status(rows))
    return 0 if all(v == State.GOOD.value for v in states.values()) else 1
