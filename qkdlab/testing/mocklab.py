"""The mock bench out of process, addressed like a lab: a stand-in for hardware.

``qkdlab mock serve --write-station OUT`` serves the mocks of a station in their own
process and writes ``OUT`` with their real transport addresses — but only the
``instruments:`` part.  :func:`complete_station` adds what experiments and the HIL
tests also need: the template's ``qkdlab:`` section (roles, BB84 settings; not the
mock-bench physics, which has no meaning for real addresses) and HIL tolerances in
``OUT``'s sibling ``.hil.yaml``.  :func:`serve_mock_lab` does both and keeps the
server running; from a shell::

    python -m qkdlab.testing.mocklab --write-station examples/station_mock_as_lab.yaml
    # in another shell, while it runs:
    pytest tests/hil --hil examples/station_mock_as_lab.yaml --hil-allow-light
    python examples/live_count_rates.py --station examples/station_mock_as_lab.yaml

The ports are the operating system's choice of that run: regenerate the file every
time, never trust a stale one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MOCK_BENCH_TOLERANCES = Path(__file__).resolve().parent / "mock_bench.hil.yaml"
"""HIL tolerances of the packaged mock bench (its dark counts, its meter's offset...)."""
READY_LINE = "Ctrl-C to stop."
"""What ``qkdlab mock serve`` prints once the station file is written."""
HEADER = """\
# The mock bench served OUT OF PROCESS and addressed like hardware (generated).
# Regenerate, never reuse (the ports are the OS's choice of one run):
#   python -m qkdlab.testing.mocklab --write-station {name}
# which runs `qkdlab mock serve --write-station {name}` and adds the roles and
# BB84 settings of the template station, and HIL tolerances in {hil}.
"""


def _default_template() -> Path:
    from qkdlab.cli import DEFAULT_MOCK_STATION

    return DEFAULT_MOCK_STATION


def complete_station(written: str | Path, template: str | Path | None = None,
                     tolerances: str | Path | None = MOCK_BENCH_TOLERANCES) -> Path:
    """Give a station written by ``mock serve`` the template's ``qkdlab:`` section.

    A section already in ``written`` (a future ``mock serve`` may write it) is kept.
    ``mock_bench`` is left out: the bench runs in the server, not here.  With
    ``tolerances``, that file is copied to ``written``'s ``.hil.yaml`` sibling.
    Returns ``written``.
    """
    import ruamel.yaml

    from qkdlab.station import read_station_file
    from qkdlab.testing.tolerances import sibling_path

    written = Path(written)
    station = read_station_file(written)
    section = dict(station.qkdlab)
    if not section.get("roles"):
        section = dict(read_station_file(template or _default_template()).qkdlab)
    section.pop("mock_bench", None)
    yaml = ruamel.yaml.YAML(typ="rt")
    yaml.default_flow_style = None
    yaml.width = 100
    yaml.representer.add_representer(  # `marker_channel: null`, not an empty value
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    stream = io.StringIO()
    yaml.dump({"qkdlab": section, "instruments": station.instruments}, stream)
    hil = sibling_path(written)
    written.write_text(HEADER.format(name=written, hil=hil.name) + stream.getvalue())
    if tolerances is not None:
        shutil.copyfile(tolerances, hil)
    return written


@contextlib.contextmanager
def serve_mock_lab(out: str | Path, template: str | Path | None = None,
                   seed: int | None = None, *, timeout_s: float = 60.0,
                   tolerances: str | Path | None = MOCK_BENCH_TOLERANCES,
                   ) -> Iterator[subprocess.Popen[str]]:
    """Run ``qkdlab mock serve --write-station OUT`` in a child process while inside.

    On entry the station file is written and completed (:func:`complete_station`);
    on exit the server is stopped (SIGTERM, then killed if it does not end).
    """
    template = Path(template) if template is not None else _default_template()
    cmd = [sys.executable, "-m", "qkdlab.cli", "mock", "serve", "--station", str(template),
           "--write-station", str(out)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines: queue.Queue[str | None] = queue.Queue()
    transcript: list[str] = []

    def pump() -> None:  # keep reading, or a chatty server would block on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            transcript.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, name="mock-serve-output", daemon=True)
    reader.start()
    try:
        while True:
            try:
                line = lines.get(timeout=timeout_s)
            except queue.Empty:
                raise RuntimeError(f"qkdlab mock serve did not get ready in {timeout_s:g} s:"
                                   f"\n{''.join(transcript)}") from None
            if line is None:
                raise RuntimeError(f"qkdlab mock serve ended (status {proc.wait()}):\n"
                                   f"{''.join(transcript)}")
            if line.strip() == READY_LINE:
                break
        complete_station(out, template, tolerances)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=timeout_s)
        if proc.stdout is not None:
            proc.stdout.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qkdlab.testing.mocklab",
        description="serve the mock bench out of process and write a lab-like station file")
    parser.add_argument("--write-station", type=Path, required=True, metavar="OUT")
    parser.add_argument("--station", type=Path, default=None,
                        help="template station with mock:// addresses (default: packaged)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    with serve_mock_lab(args.write_station, args.station, args.seed) as proc:
        print(f"mock bench serving (pid {proc.pid}); station: {args.write_station}, "
              f"HIL tolerances next to it.  Ctrl-C to stop.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5) and proc.poll() is None:
                pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
