"""The ``qkdlab`` command line.

Subcommands (more arrive with later features)::

    qkdlab mock serve [--station FILE] [--seed N] [--write-station OUT]
    qkdlab station check FILE [--seed N]
    qkdlab demo [--station FILE] [--seconds S]

Errors print one line, ``qkdlab: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

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
    check.set_defaults(func=cmd_station_check)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="start the mock bench and show live detector rates")
    demo.add_argument("--station", type=Path, default=DEFAULT_MOCK_STATION)
    demo.add_argument("--seconds", type=float, default=3.0, help="how long to show rates (s)")
    demo.add_argument("--seed", type=int, default=None)
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkdlab", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_mock(sub)
    _add_station(sub)
    _add_demo(sub)
    return parser


def cmd_mock_serve(args: argparse.Namespace) -> int:
    """Start the mocks named in a station file and block until interrupted."""
    from qkdlab.mock_instruments.launcher import MockLauncher
    from qkdlab.station import dump_station, has_mocks, read_station_file, resolve_mocks

    station_file = read_station_file(args.station)
    if not has_mocks(station_file):
        raise StationError(f"{args.station}: no instrument has a mock:// address to serve")
    seed = station_file.mock_seed if args.seed is None else args.seed
    launcher = MockLauncher(seed=seed, bench_overrides=station_file.bench_overrides)
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
    """Connect every instrument of a station file and print its identity."""
    from qkdlab.station import open_station

    with open_station(args.file, seed=args.seed) as loaded:
        print(f"{args.file}: {len(loaded.instruments)} instruments connected")
        for name, instrument in loaded.instruments.items():
            driver = type(instrument).__name__
            print(f"  {name:<16} {driver:<22} {_identity(instrument)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Mock bench tour: identities, then live count rates with the laser on."""
    import time

    from qkdlab.drivers.roles import Laser, SinglePhotonDetector
    from qkdlab.station import open_station

    with open_station(args.station, seed=args.seed) as loaded:
        print(f"mock bench from {args.station}")
        for name, instrument in loaded.instruments.items():
            print(f"  {name:<16} {type(instrument).__name__:<22} {_identity(instrument)}")
        lasers = [i for i in loaded.instruments.values() if isinstance(i, Laser)]
        detectors = {n: i for n, i in loaded.instruments.items()
                     if isinstance(i, SinglePhotonDetector)}
        for detector in detectors.values():
            detector.enable()
        for laser in lasers:
            laser.output_on()
        print(f"\nlaser on; count rates per detector (cps) for {args.seconds:g} s:")
        print("  " + "".join(f"{n:>14}" for n in detectors))
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            rates = [sum(d.count_rates()) for d in detectors.values()]
            print("  " + "".join(f"{r:>14,.0f}" for r in rates), flush=True)
            time.sleep(0.5)
        print("\nlaser off, detector bias down; mocks stopped.")
    return 0


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
        print("qkdlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
