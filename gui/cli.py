"""``qkdlab gui``: the live dashboard from the command line (Qt imported only when run).

    qkdlab gui                              idle; Start runs the mock bench
    qkdlab gui --mock                       start a mock run at once
    qkdlab gui --station FILE               Start runs on that bench
    qkdlab gui --connect ADDR [--control ADDR2]   watch (and stop) a run started elsewhere
    qkdlab gui --mock --screenshot out.png --after 5

``--screenshot`` grabs the window ``--after`` seconds after the first frame arrived
(a mock run needs several seconds to open its bench and synchronise before its
first frame; a screenshot of empty plots would show nothing), then stops the run
and exits.  It works headless with ``QT_QPA_PLATFORM=offscreen``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``qkdlab gui`` on ``parser``."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--mock", action="store_true",
                       help="start a run on the packaged mock bench at once")
    where.add_argument("--station", type=Path, default=None,
                       help="Start runs on the bench of this station file")
    parser.add_argument("--connect", metavar="ADDR", default=None,
                        help="watch the live stream of a run started elsewhere "
                             "(e.g. tcp://127.0.0.1:5555)")
    parser.add_argument("--control", metavar="ADDR", default=None,
                        help="that run's control address (for Stop)")
    parser.add_argument("--duration", type=_positive, default=60.0, metavar="S",
                        help="acquisition time of a started run (s; default 60)")
    parser.add_argument("--distance-km", type=float, default=25.0, metavar="D",
                        help="fibre length of the mock bench (km; default 25)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="where started runs write (default ./data)")
    parser.add_argument("--history", type=_positive, default=1800.0, metavar="S",
                        help="acquisition time shown (s; default 1800)")
    parser.add_argument("--screenshot", type=Path, default=None, metavar="PNG",
                        help="grab the window to this PNG and exit")
    parser.add_argument("--after", type=float, default=5.0, metavar="S",
                        help="with --screenshot: seconds after the first frame (default 5)")
    parser.add_argument("--timeout", type=_positive, default=90.0, metavar="S",
                        help="with --screenshot: grab anyway after this long without a "
                             "frame (s; default 90), exit status 1")
    parser.add_argument("--size", type=_size, default=(1600, 1000), metavar="WxH",
                        help="window size in pixels (default 1600x1000)")
    parser.set_defaults(func=cmd_gui)
    return parser


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]
               ) -> argparse.ArgumentParser:
    """Add ``gui`` to ``qkdlab``'s subcommands."""
    parser = subparsers.add_parser("gui", help="live dashboard of BB84 runs",
                                   description=__doc__.splitlines()[0])
    return configure_parser(parser)


def cmd_gui(args: argparse.Namespace) -> int:
    """Open the dashboard; with ``--screenshot``, grab it and exit."""
    if args.distance_km is not None and not 0 <= args.distance_km <= 500:
        print(f"qkdlab: error: --distance-km must lie in [0, 500] km, got {args.distance_km}",
              file=sys.stderr)
        return 2
    from pyqtgraph.Qt import QtCore, QtWidgets

    from qkdlab.gui.app import Dashboard, RunRequest

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    request = RunRequest(mock=args.station is None, station=args.station,
                         duration_s=args.duration, distance_km=args.distance_km,
                         data_dir=args.data_dir)
    window = Dashboard(connect=args.connect, control=args.control, request=request,
                       history_s=args.history)
    window.resize(*args.size)
    window.show()
    if args.mock and not window.start_run():
        print(f"qkdlab: error: {window.model.errors[-1]}", file=sys.stderr)
    if args.screenshot is None:
        try:
            return int(app.exec())
        finally:
            window.shutdown()
    outcome: dict[str, Any] = {"code": 1}
    started = time.monotonic()
    first_frame: list[float] = []

    def check() -> None:
        now = time.monotonic()
        if window.model.frames_total and not first_frame:
            first_frame.append(now)
        if first_frame and now - first_frame[0] >= args.after:
            outcome["code"] = 0
        elif now - started < args.timeout:
            return
        else:
            print(f"qkdlab: error: no frame within {args.timeout:g} s; grabbing anyway",
                  file=sys.stderr)
        poll.stop()
        try:
            path = window.save_snapshot(args.screenshot)
            print(f"screenshot: {path}")
        except OSError as err:
            print(f"qkdlab: error: {err}", file=sys.stderr)
            outcome["code"] = 1
        app.quit()

    poll = QtCore.QTimer()
    poll.setInterval(50)
    poll.timeout.connect(check)
    poll.start()
    try:
        app.exec()
    finally:
        window.shutdown()
        window.close()
    return int(outcome["code"])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qkdlab.gui.cli`` (the same options as ``qkdlab gui``)."""
    parser = configure_parser(argparse.ArgumentParser(prog="qkdlab gui",
                                                      description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
