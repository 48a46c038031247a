"""The ``qkdlab`` command line.

Subcommands (more arrive with later features)::

    qkdlab mock serve [--station FILE] [--seed N] [--write-station OUT]
    qkdlab station check FILE [--seed N]
    qkdlab demo [--station FILE] [--seconds S]
    qkdlab run bb84 (--mock | --station FILE) [...]
    qkdlab reprocess RUN [--data-dir DIR] [--salvage] [--json]
    qkdlab runs [--data-dir DIR] [--stale-after S] [--json]

Errors print one line, ``qkdlab: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qkdlab.station import StationError

DEFAULT_MOCK_STATION = Path(__file__).resolve().parent / "stations" / "mock.yaml"


def _add_mock(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mock = sub.add_parser("mock", help="hardware-free mock bench")
    mock_sub = mock.add_subparsers(dest="mock_command", required=True)
    serve = mock_sub.add_parser(
        "serve", help="serve a station's mock instruments until Ctrl-C; print their addresses"
    )
    serve.add_argument("--station", type=Path, default=DEFAULT_MOCK_STATION,
                       help="station file whose mock:// instruments to serve "
                            "(default: the packaged mock station)")
    serve.add_argument("--seed", type=int, default=None, help="bench seed (default: the file's)")
    serve.add_argument("--write-station", type=Path, default=None, metavar="OUT",
                       help="also write a station file pointing at the running mocks")
    serve.set_defaults(func=cmd_mock_serve)


def _add_station(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    station = sub.add_parser("station", help="station files")
    station_sub = station.add_subparsers(dest="station_command", required=True)
    check = station_sub.add_parser(
        "check", help="load a station file, connect every instrument, print identities"
    )
    check.add_argument("file", type=Path)
    check.add_argument("--seed", type=int, default=None, help="mock bench seed override")
    check.add_argument("--no-connect", action="store_true",
                       help="check the file and its safety limits only")
    check.set_defaults(func=cmd_station_check)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="tour of the mock bench, ending with a BB84 run")
    demo.add_argument("--station", type=Path, default=DEFAULT_MOCK_STATION)
    demo.add_argument("--seconds", type=float, default=1.0,
                      help="how long to show live count rates (s)")
    demo.add_argument("--run-seconds", type=float, default=4.0,
                      help="length of the BB84 run (s of tagger time)")
    demo.add_argument("--data-dir", type=Path, default=Path("data"))
    demo.add_argument("--seed", type=int, default=None)
    demo.set_defaults(func=cmd_demo)


def _positive(kind: type, name: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"{name} must be > 0 and finite, got {text}")
        return value
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run an experiment")
    run_sub = run.add_subparsers(dest="experiment", required=True)
    bb84 = run_sub.add_parser("bb84", help="decoy-state BB84 acquisition")
    where = bb84.add_mutually_exclusive_group(required=True)
    where.add_argument("--mock", action="store_true", help="on the packaged mock bench")
    where.add_argument("--station", type=Path, help="station file of a bench")
    length = bb84.add_mutually_exclusive_group()
    length.add_argument("--duration", type=_positive(float, "--duration"), default=None,
                        metavar="S", help="acquisition time (s; default 1)")
    length.add_argument("--pulses", type=_positive(int, "--pulses"), default=None,
                        metavar="N", help="pulses to send instead of a duration")
    bb84.add_argument("--distance-km", type=float, default=None, metavar="D",
                      help="fibre length of the mock bench (km)")
    bb84.add_argument("--eve-fraction", type=_fraction, default=None, metavar="P",
                      help="mock eavesdropper: intercept-resend on a fraction P of pulses")
    bb84.add_argument("--blinding", action="store_true",
                      help="mock eavesdropper: blind Bob's detectors with bright CW light and "
                           "resend faked states (Lydersen et al. 2010)")
    bb84.add_argument("--no-monitors", action="store_true",
                      help="run without the detector monitors (blinding checks)")
    bb84.add_argument("--seed", type=int, default=1, help="seed of the mock bench and of "
                      "Alice's pattern (default 1)")
    bb84.add_argument("--no-sync-channel", action="store_true",
                      help="find the clock from the detections (qubit-based sync)")
    bb84.add_argument("--rate", type=_positive(float, "--rate"), default=100e6, metavar="HZ",
                      help="pulse repetition rate (Hz; default 100e6)")
    bb84.add_argument("--data-dir", type=Path, default=Path("data"),
                      help="where the database and raw tag files go (default ./data)")
    bb84.add_argument("--key-block-bits", type=_positive(int, "--key-block-bits"),
                      default=None, metavar="N",
                      help="sifted key-basis bits per key block, distilled while the run "
                           "goes on (default 2^23 = 8388608)")
    bb84.add_argument("--json", action="store_true", help="print one JSON object")
    bb84.add_argument("--calibration", choices=("warn", "refuse"), default=None,
                      help="stale or missing calibration records: refuse to run, or warn "
                           "and go on (default: refuse on a station, warn on --mock)")
    bb84.add_argument("--publish", metavar="ADDR", default=None,
                      help="live stream for the GUI: ZeroMQ PUB bound here "
                           "(e.g. tcp://127.0.0.1:5556)")
    bb84.add_argument("--control", metavar="ADDR", default=None,
                      help="run control: ZeroMQ PULL bound here ('stop' ends the run cleanly)")
    bb84.set_defaults(func=cmd_run_bb84)


def _add_reprocess(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rep = sub.add_parser("reprocess", help="re-process a BB84 run from its raw tag files")
    rep.add_argument("run", help="raw tag file (any segment's: the run's other segments "
                                 "are found next to it), or the run id of a run under "
                                 "--data-dir")
    rep.add_argument("--data-dir", type=Path, default=Path("data"))
    rep.add_argument("--json", action="store_true", help="print one JSON object")
    rep.add_argument("--salvage", action="store_true",
                     help="a damaged file (torn tail after a crash, corrupted block): process "
                          "the intact blocks before the damage and say what was lost")
    rep.set_defaults(func=cmd_reprocess)


def _add_runs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    runs = sub.add_parser(
        "runs", help="list the runs of a data folder with their status; a run whose "
                     "process died is marked 'died: ...' first")
    runs.add_argument("--data-dir", type=Path, default=Path("data"),
                      help="the data folder (its qkdlab.db; default ./data)")
    runs.add_argument("--stale-after", type=_positive(float, "--stale-after"), default=None,
                      metavar="S", help="a 'running' run silent for longer than this is "
                                        "dead (s; default 120)")
    runs.add_argument("--json", action="store_true", help="print one JSON object")
    runs.set_defaults(func=cmd_runs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkdlab", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_mock(sub)
    _add_station(sub)
    _add_demo(sub)
    _add_run(sub)
    _add_reprocess(sub)
    _add_runs(sub)
    from qkdlab import auth_pool_cmd, calibrate_cmd, parties
    from qkdlab.gui.cli import add_parser as add_gui  # no Qt import until the command runs

    calibrate_cmd.add_parser(sub)
    parties.add_parsers(sub)
    auth_pool_cmd.add_parser(sub)
    add_gui(sub)
    return parser


def cmd_mock_serve(args: argparse.Namespace) -> int:
    """Start the mocks named in a station file and block until interrupted."""
    from qkdlab.mock_instruments.launcher import MockLauncher
    from qkdlab.station import dump_station, has_mocks, read_station_file, resolve_mocks

    station_file = read_station_file(args.station)
    if not has_mocks(station_file):
        raise StationError(f"{args.station}: no instrument has a mock:// address to serve")
    seed = station_file.mock_seed if args.seed is None else args.seed
    try:
        launcher = MockLauncher(seed=seed, bench_overrides=station_file.bench_overrides)
    except (TypeError, ValueError) as err:
        raise StationError(f"{station_file.where_key('qkdlab', 'mock_bench')}: 'qkdlab: "
                           f"mock_bench': {err}") from err
    try:
        resolved = resolve_mocks(station_file, launcher)
        print(f"mock bench (seed {seed}) serving {len(launcher.servers)} instruments:")
        for name in launcher.servers:
            print(f"  {name:<16} {launcher.models[name]:<24} {resolved[name]['address']}")
        if args.write_station is not None:
            args.write_station.write_text(dump_station(resolved))
            print(f"station file for these addresses: {args.write_station}")
        print("Ctrl-C to stop.", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        launcher.stop()
    return 0


def _identity(instrument: object) -> str:
    get_idn = getattr(instrument, "get_idn", None)
    if not callable(get_idn):
        return "(no identity query)"
    idn = get_idn()
    fields = [str(idn.get(k)) for k in ("vendor", "model", "serial", "firmware") if idn.get(k)]
    return ", ".join(fields) if fields else "(identity not reported)"


def cmd_station_check(args: argparse.Namespace) -> int:
    """Check safety limits, connect every instrument of a station file, print identities."""
    from qkdlab.safety import check_limits
    from qkdlab.station import (
        check_driver_types,
        check_mock_addresses,
        check_roles,
        open_station,
        read_station_file,
    )

    problems = check_limits(args.file)  # reads the file only, never connects
    if problems:
        raise StationError("unsafe limits in the station file:\n  " + "\n  ".join(problems))
    station_file = read_station_file(args.file)
    check_roles(station_file)
    if station_file.qkdlab.get("bb84"):
        bb84_settings(args.file)  # the run's settings: types and ranges
    if args.no_connect:
        check_driver_types(station_file)
        check_mock_addresses(station_file)
        print(f"{args.file}: limits within the models' ratings (nothing connected)")
        return 0

    with open_station(args.file, seed=args.seed) as loaded:
        print(f"{args.file}: {len(loaded.instruments)} instruments connected")
        for name, instrument in loaded.instruments.items():
            driver = type(instrument).__name__
            print(f"  {name:<16} {driver:<22} {_identity(instrument)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Mock bench tour: identities, live count rates, then a BB84 run and its summary."""
    from qkdlab.experiments.bb84.run import run_bb84, start_alice
    from qkdlab.roles import bb84_roles
    from qkdlab.station import open_station

    settings = bb84_settings(args.station, seed=args.seed or 1)
    mark_orphans(args.data_dir)
    out = sys.stdout  # QCoDeS' notes go to stderr; the tour to stdout
    with contextlib.redirect_stdout(sys.stderr), \
            open_station(args.station, seed=args.seed) as loaded:
        roles = bb84_roles(loaded)
        print(f"mock bench from {args.station}:", file=out)
        for name, instrument in loaded.instruments.items():
            print(f"  {name:<12} {type(instrument).__name__:<22} {_identity(instrument)}",
                  file=out)
        start_alice(roles, settings)
        channels = roles.detectors.channel_list
        print("\nlaser on; tag rate per detector channel (counts/s):", file=out)
        print("  " + "".join(f"{'ch ' + str(c):>12}" for c in channels), file=out)
        for _ in range(max(1, round(args.seconds / 0.2))):
            block = roles.tagger.acquire(0.2)
            counts = block.counts(channels)
            rates = [counts[c] / (block.duration_ps * 1e-12) for c in channels]
            print("  " + "".join(f"{r:>12,.0f}" for r in rates), file=out,
                  flush=True)
        print(f"\ndecoy-state BB84 over the mock link, {args.run_seconds:g} s:",
              file=out, flush=True)
        result = run_bb84(roles, settings, duration_s=args.run_seconds,
                          data_dir=args.data_dir, metadata={"station": str(args.station)},
                          progress=sys.stderr.isatty(),
                          monitors=detector_monitors(settings, roles.detectors, None))
    print(format_bb84_summary(result.summary()))
    print("\nlaser off and instruments in their safe state; mocks stopped.")
    return 0 if result.status == "completed" else 1


def cmd_run_bb84(args: argparse.Namespace) -> int:
    """Open the station, run BB84, print the summary (or JSON)."""
    import json

    from qkdlab.experiments.bb84.key_blocks import DEFAULT_BLOCK_BITS
    from qkdlab.experiments.bb84.run import run_bb84
    from qkdlab.roles import bb84_roles
    from qkdlab.station import open_station

    overrides: dict[str, Any] = {}
    if args.distance_km is not None:
        if not 0 <= args.distance_km <= 500:
            raise StationError(f"--distance-km must lie in [0, 500] km, got {args.distance_km}")
        overrides.setdefault("channel", {})["length_km"] = args.distance_km
    if args.eve_fraction is not None:
        overrides.setdefault("channel", {})["eve_fraction"] = args.eve_fraction
    if args.blinding:
        overrides.setdefault("eve", {})["blinding"] = True
    if overrides and not args.mock:
        raise StationError("--distance-km, --eve-fraction and --blinding set the mock bench; "
                           "use --mock")
    station = DEFAULT_MOCK_STATION if args.mock else args.station
    settings = bb84_settings(station, rep_rate_hz=args.rate,
                             use_sync_channel=not args.no_sync_channel, seed=args.seed)
    duration = (args.pulses / args.rate if args.pulses is not None
                else args.duration if args.duration is not None else 1.0)
    # the staleness rule: calibrated values (mu, acceptance window) replace the file's
    from qkdlab.calibration.records import StaleCalibrationError
    from qkdlab.calibration.runtime import check_before_run
    from qkdlab.calibration.store import CalibrationStore

    policy = args.calibration or ("warn" if args.mock else "refuse")
    try:
        calibration = check_before_run(CalibrationStore(args.data_dir / "calibration.jsonl"),
                                       policy=policy)
    except StaleCalibrationError as err:
        raise StationError(f"{err} (run 'qkdlab calibrate all', or --calibration warn)"
                           ) from err
    settings = calibration.apply(settings)
    mark_orphans(args.data_dir)
    # with --json, stdout carries the JSON object only (QCoDeS prints progress notes)
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    from qkdlab.experiments.live import LiveSession

    # the live session opens first, so a station error reaches the GUI too
    with quiet, LiveSession(args.publish, args.control) as live, \
            open_station(station, seed=args.seed if args.mock else None,
                         bench_overrides=overrides) as loaded:
        roles = bb84_roles(loaded)
        mu_record = calibration.records.get("mu")
        if mu_record is not None and "attenuation_db" in mu_record.settings:
            # the calibrated μ values hold at the attenuation the μ loop measured them at
            roles.attenuation_db = float(mu_record.settings["attenuation_db"])
        live.run_started(station=str(station), mock=bool(args.mock), duration_s=duration,
                         bench_overrides=overrides)
        if live.publisher is not None:  # status panels of the GUI
            live.publisher.instruments(_instrument_status(loaded))
            live.publisher.calibration(_calibration_status(calibration))
        result = run_bb84(roles, settings, duration_s=duration, data_dir=args.data_dir,
                          metadata={"station": str(station), "mock": bool(args.mock),
                                    "bench_overrides": overrides, **calibration.metadata()},
                          progress=not args.json and sys.stderr.isatty(),
                          publish=live.publish, stop_requested=live.stop_requested,
                          key_block_bits=args.key_block_bits or DEFAULT_BLOCK_BITS,
                          monitors=() if args.no_monitors else detector_monitors(
                              settings, roles.detectors, calibration.records.get("detectors")))
        live.run_ended(result.summary())
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_bb84_summary(summary))
    return 0 if summary["status"] == "completed" else 1


def cmd_reprocess(args: argparse.Namespace) -> int:
    """Re-run sync, sifting and estimation offline; print the same figures."""
    import json

    from qkdlab.experiments.bb84.rawtags import RawTagFileError
    from qkdlab.experiments.bb84.reprocess import ReprocessError, reprocess

    path = Path(args.run)
    if not path.exists():
        path = args.data_dir / "raw" / f"bb84-{args.run}.qkt"
    if not path.exists():
        raise StationError(f"no raw tag file {args.run!r} (nor {path})")
    try:
        done = reprocess(path, salvage=args.salvage)
    except RawTagFileError as err:
        hint = ("; 'qkdlab reprocess --salvage' processes them"
                if err.block is not None and err.blocks_before else "")
        raise StationError(f"{err}{hint}") from err
    except ReprocessError as err:
        raise StationError(str(err)) from err
    except OSError as err:
        raise StationError(f"{path}: cannot read the raw tag file: {err.strerror or err}"
                           ) from err
    est, tot = done.estimate, done.totals
    damage = done.damage
    for seg in done.segments:
        if seg.damage is not None:
            where = f" in {seg.path}" if len(done.segments) > 1 else ""
            print(f"qkdlab: salvaged {seg.blocks} block(s), {seg.tags:,} tags (bytes "
                  f"0-{seg.damage.offset} of {seg.path.stat().st_size}); not read: "
                  f"{seg.damage.problem} at byte {seg.damage.offset}{where}", file=sys.stderr)

    def damage_of(err: Any) -> dict[str, Any] | None:
        return None if err is None else {"offset": err.offset, "problem": err.problem,
                                         "torn_tail": err.torn}

    summary = {
        "run_id": done.metadata.get("run_id"), "raw_tags": str(path),
        "blocks_read": done.blocks, "tags_read": done.tags, "damage": damage_of(damage),
        "segments": [{"segment": seg.index, "path": str(seg.path), "blocks": seg.blocks,
                      "tags": seg.tags, "frames": seg.frames,
                      "damage": damage_of(seg.damage)} for seg in done.segments],
        "frames": int(tot.frames),
        "pulses": int(tot.pulses), "detections": int(tot.detected.sum()),
        "sifted_bits": int(tot.sifted.sum()), "qber_z": _json_num(est.qber_z),
        "qber_x": _json_num(est.qber_x), "gain_signal": _json_num(est.gains[0]),
        "gain_decoy": _json_num(est.gains[1]), "gain_vacuum": _json_num(est.gains[2]),
        "y1_lower": _json_num(est.bounds.y1_lower) if est.bounds else None,
        "e1_upper": _json_num(est.bounds.e1_upper) if est.bounds else None,
        "aborted": est.aborted, "abort_reason": est.abort_reason,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            if key == "segments":
                value = ", ".join(f"{s['segment']}: {s['frames']} frames" for s in value)
            print(f"  {key:<14} {value}")
    return 0


DATABASE_NAME = "qkdlab.db"
"""The QCoDeS database of a data folder (as :func:`run_bb84` names it)."""


def mark_orphans(data_dir: Path) -> list[tuple[int, str]]:
    """Mark the runs of ``data_dir`` whose process died (``died: ...``); say so on stderr.

    Housekeeping before a new run: a failure here is logged, never stops the run.
    """
    from qkdlab.experiments.bb84.liveness import mark_orphaned_runs

    database = data_dir / DATABASE_NAME
    if not database.is_file():
        return []
    try:
        marked = mark_orphaned_runs(database)
    except Exception as err:
        logging.getLogger(__name__).warning("%s: could not check for runs whose process "
                                            "died: %s", database, describe_error(err))
        return []
    for dataset, reason in marked:
        print(f"qkdlab: run #{dataset} in {database} never ended ({reason}): "
              "marked 'died'", file=sys.stderr)
    return marked


def cmd_runs(args: argparse.Namespace) -> int:
    """List a data folder's runs and their status, after marking the dead ones."""
    import json

    from qkdlab.experiments.bb84.liveness import STALE_AFTER_S, list_runs, mark_orphaned_runs

    database = args.data_dir / DATABASE_NAME
    if not database.is_file():
        raise StationError(f"no runs in {args.data_dir}: {database} does not exist "
                           "(give the data folder of your runs with --data-dir)")
    stale = STALE_AFTER_S if args.stale_after is None else args.stale_after
    marked = mark_orphaned_runs(database, stale_after_s=stale)
    runs = list_runs(database, stale_after_s=stale)
    if args.json:
        print(json.dumps({"database": str(database),
                          "marked": [{"dataset": d, "reason": r} for d, r in marked],
                          "runs": [vars(run) for run in runs]}))
        return 0
    for dataset, reason in marked:
        print(f"qkdlab: run #{dataset} never ended ({reason}): marked 'died'",
              file=sys.stderr)
    print(f"{len(runs)} run(s) in {database}")
    print(f"  {'#':>4}  {'experiment':<12} {'run id':<13} {'started':<20} status")
    for run in runs:
        status = run.status or "-"
        if run.state == "running" and run.heartbeat_age_s is not None:
            status += f" (heartbeat {run.heartbeat_age_s:.0f} s ago)"
        print(f"  {run.dataset:>4}  {run.experiment:<12} {run.run_id or '-':<13} "
              f"{run.started:<20} {status}")
    return 0


def detector_monitors(settings: Any, detectors: Any, record: Any) -> list[Any]:
    """The run's detector monitors, thresholds from the detector calibration record
    (None: the monitors that need no calibration)."""
    from qkdlab.experiments.bb84.monitors import default_monitors

    calibration = None if record is None else {
        name: (q.value, q.uncertainty) for name, q in record.quantities.items()}
    monitors = default_monitors(settings, detectors, calibration)
    logging.getLogger(__name__).info("detector monitors: %s",
                                     ", ".join(type(m).__name__ for m in monitors))
    return monitors


def _json_num(x: float) -> float | None:
    import math

    return float(x) if math.isfinite(x) else None


_FIELD_TYPES = {"float": "a number", "int": "an integer", "bool": "true or false",
                "float | None": "a number or null"}


def _bb84_value(kind: str, value: Any) -> tuple[bool, Any]:
    """``(ok, value)`` for a ``qkdlab: bb84`` value of field type ``kind`` (a whole
    float is taken for an integer: YAML reads ``2.0e4`` as a float)."""
    from qkdlab.station import is_number

    if value is None:
        return "None" in kind, value
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    return is_number(value), value


def bb84_settings(station: Path, **overrides: Any) -> Any:
    """BB84Settings from the station's ``qkdlab: bb84:`` section and the command line.

    A bad value is a :class:`StationError` naming the file, the line and the key (or
    the command-line value) and what is allowed.
    """
    import re
    from dataclasses import fields

    from qkdlab.experiments.bb84.processing import BB84Settings
    from qkdlab.station import read_station_file, unit_hint

    station_file = read_station_file(station)
    section = dict(station_file.qkdlab.get("bb84") or {})
    types = {f.name: str(f.type) for f in fields(BB84Settings)}

    def where(key: str | None, *, in_file: bool = False) -> str:
        if key is None:
            return f"{station_file.where_key('qkdlab', 'bb84')}: 'qkdlab: bb84'"
        if key in overrides and not in_file:
            return f"{station}: {key} (from the command line)"
        return f"{station_file.where_key('qkdlab', 'bb84', key)}: 'qkdlab: bb84: {key}'"

    for key, value in section.items():
        if key not in types:
            raise StationError(f"{station_file.where_key('qkdlab', 'bb84', key)}: unknown key "
                               f"{key!r} in 'qkdlab: bb84' (allowed: {', '.join(sorted(types))})")
        ok, section[key] = _bb84_value(types[key], value)
        if not ok:
            raise StationError(f"{where(key, in_file=True)} must be "
                               f"{_FIELD_TYPES.get(types[key], types[key])}, got {value!r}"
                               f"{unit_hint(value, key)}")
    try:
        settings = BB84Settings(**{**section, **overrides})
        if not 0 <= settings.seed < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63 - 1], got {settings.seed}")
        return settings
    except (TypeError, ValueError) as err:
        text = str(err)
        named = [k for k in types if re.search(rf"\b{k}\b", text)
                 and (k in section or k in overrides)]
        key = min(named, key=lambda k: text.index(k)) if named else None
        if key is not None and text.startswith(f"{key} "):
            raise StationError(f"{where(key)}{text[len(key):]}") from err
        raise StationError(f"{where(key)}: {text}") from err


def _instrument_status(loaded: Any) -> list[dict[str, Any]]:
    """Connected instruments for the live stream: errors queued, interlock of lasers."""
    from qkdlab.drivers.roles import Laser

    status = []
    for name, instrument in loaded.instruments.items():
        interlock = None
        if isinstance(instrument, Laser):
            try:
                interlock = "ok" if instrument.interlock_closed() else "tripped"
            except Exception as err:  # reported, never fatal for the status panel
                interlock = f"unknown ({type(err).__name__})"
        status.append({"name": name, "connected": True, "errors": [],
                       "interlock": interlock})
    return status


def _calibration_status(calibration: Any) -> list[dict[str, Any]]:
    """The calibration records a run uses, for the live stream (first quantity each)."""
    out = []
    for node, record in calibration.records.items():
        name, quantity = next(iter(record.quantities.items()), ("-", None))
        out.append({"name": f"{node}: {name}",
                    "value": None if quantity is None else quantity.value,
                    "unit": "" if quantity is None else quantity.unit, "id": record.id,
                    "timestamp_unix_s": record.created_s,
                    "max_age_s": record.valid_until_s - record.created_s,
                    "ok": record.good})
    return out


def format_bb84_summary(s: dict[str, Any]) -> str:
    """A readable summary of a BB84 run."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.2f} %"

    def num(x: float | None, fmt: str = ".4g") -> str:
        return "n/a" if x is None else format(x, fmt)

    lines = [
        f"BB84 run {s['run_id']}: {s['status']}",
        f"  pulses sent          {s['pulses']:,}",
        f"  detections           {s['detections']:,}  (outside window: {s['unassigned']:,})",
        f"  sifted bits          {s['sifted_bits']:,}  (Z basis: {s['sifted_bits_z']:,})",
        f"  QBER Z / X           {pct(s['qber_z'])} / {pct(s['qber_x'])}",
        f"  gains s / d / v      {num(s['gain_signal'])} / {num(s['gain_decoy'])} / "
        f"{num(s['gain_vacuum'])}",
        f"  decoy bounds         Y1 >= {num(s['y1_lower'])}, e1 <= {pct(s['e1_upper'])}",
        f"  key rate (asympt.)   {num(s['key_rate_bps'], ',.0f')} bit/s "
        f"({num(s['key_rate_per_pulse'])} per pulse)",
        f"  sync                 period {num(s['sync_period_ps'], '.4f')} ps, "
        f"drift {num(s['sync_drift_ppm'], '+.4f')} ppm",
        f"  error correction     {s['ec_disclosed_bits']:,} bits disclosed, "
        f"f = {num(s['ec_efficiency'], '.3f')}",
        f"  privacy amplif.      {s['pa_input_bits']:,} -> {s['pa_output_bits']:,} bits "
        f"(authentication used {s['auth_key_used_bits']:,})",
        f"  secure key           {s['secure_key_bits']:,} bits "
        f"({num(s['secure_key_rate_bps'], ',.0f')} bit/s)",
    ]
    if s.get("key_file"):
        lines.append(f"  key files            {s['key_file']} (Alice), {s['bob_key_file']} "
                     f"(Bob), identical: {s['keys_match']}")
    if s["aborted"]:
        lines.append(f"  ABORTED: {s['abort_reason']}")
    lines += [f"  dataset              #{s['dataset']} in {s['database']}",
              f"  raw tags             {s['raw_tags']}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except StationError as err:
        print(f"qkdlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkdlab: interrupted (instruments in their safe state, data closed)",
              file=sys.stderr)
        return 130
    except Exception as err:  # one line (drivers' own errors too); -v for the traceback
        if args.verbose:
            raise
        print(f"qkdlab: error: {type(err).__name__}: {describe_error(err)} "
              "(-v for the traceback)", file=sys.stderr)
        return 1


def describe_error(err: BaseException) -> str:
    """An exception's message on one line; QCoDeS' added context (``'setting x to 5'``)
    goes in parentheses instead of a tuple's repr."""
    args = err.args
    if len(args) > 1 and all(isinstance(a, str) for a in args):
        text = f"{args[0]} ({'; '.join(args[1:])})"
    else:
        text = str(err)
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
