"""Bad input through the mocks and the command line: a clear error, nothing written to an
instrument, nothing lost on disk.

* out-of-range settings: the drivers refuse them before a byte goes out (the mock's
  received messages and its state are compared before and after);
* bad BB84 run parameters on the command line: refused before any mock starts;
* an init keyword a driver does not take, an address nobody answers at, a bad VISA
  resource: one error line naming the instrument, its address (and the file's line);
* damaged raw tag files: ``qkdlab reprocess`` names the file and the byte offset, says
  how much is intact, ``--salvage`` processes exactly that part; the file is never changed.

Malformed station files are in ``test_station_errors.py``, random damage of raw tag
files in ``properties/test_rawtag_reader.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import socket
import textwrap
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from qkdlab.cli import main
from qkdlab.experiments.bb84.rawtags import RawTagReader
from qkdlab.station import LoadedStation, StationError, open_station

ITC = "qkdlab.drivers.thorlabs.itc4001.ThorlabsITC4001"
ID120 = "qkdlab.drivers.idquantique.id120.IDQID120"
FPGA = "qkdlab.drivers.fpga.pattern_generator.FPGAPatternGenerator"
IDQ_TC = "qkdlab.drivers.idquantique.time_controller.IDQTimeController"
ELL14 = "qkdlab.drivers.thorlabs.ell14.ThorlabsELL14Compensator"

# instrument names are global in QCoDeS: these differ from the packaged mock station's
BENCH = f"""\
qkdlab:
  mock_bench: {{seed: 5}}
instruments:
  bi_laser:
    type: {ITC}
    address: mock://thorlabs/itc4001
    init: {{current_limit_a: 0.05, current_step_delay_s: 0}}
  bi_spad:
    type: {ID120}
    address: mock://idquantique/id120
    init: {{bias_max_v: 50.0}}
  bi_pattern:
    type: {FPGA}
    address: mock://fpga/pattern_generator
"""


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_station(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "station.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# -- out-of-range settings on the mock bench ------------------------------------------------
@pytest.fixture(autouse=True)
def _close_all_instruments() -> None:
    """The module's bench stays open across tests (it closes itself at the end)."""


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedStation]:
    path = tmp_path_factory.mktemp("bench") / "bench.yaml"
    path.write_text(BENCH)
    with open_station(path) as loaded:
        yield loaded


def _plain(value: Any) -> bool:
    if isinstance(value, int | float | bool | str | type(None)):
        return True
    if isinstance(value, list | tuple | deque):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


class Wire:
    """Every program message a mock instrument receives, and its state."""

    def __init__(self, loaded: LoadedStation, name: str) -> None:
        assert loaded.launcher is not None
        self.mock = loaded.launcher.servers[name].instrument  # type: ignore[attr-defined]
        self.messages: list[str] = []
        original = self.mock.handle_message

        def spy(message: str) -> str | None:
            self.messages.append(message)
            return original(message)  # type: ignore[no-any-return]

        self.mock.handle_message = spy

    def writes(self) -> list[str]:
        return [m for m in self.messages if not m.rstrip().endswith("?")]

    def state(self) -> dict[str, Any]:
        """The mock's settings: every attribute made of plain values (error queue too)."""
        return {k: copy.deepcopy(list(v) if isinstance(v, deque) else v)
                for k, v in vars(self.mock).items() if _plain(v)}

    def close(self) -> None:
        del self.mock.handle_message


@pytest.fixture
def wire(bench: LoadedStation) -> Iterator[Callable[[str], Wire]]:
    wires: list[Wire] = []

    def spy_on(name: str) -> Wire:
        wires.append(Wire(bench, name))
        return wires[-1]

    yield spy_on
    for w in wires:
        w.close()


OUT_OF_RANGE = [
    ("bi_laser", "current", 0.2,
     r"0\.2 is invalid: must be between 0(\.0)? and 0\.05 inclusive; Parameter: bi_laser\.current"),
    ("bi_laser", "current", 14,  # mA meant, A taken
     r"14 is invalid: must be between 0(\.0)? and 0\.05 inclusive; Parameter: bi_laser\.current"),
    ("bi_laser", "current", -0.001, r"-0\.001 is invalid: must be between 0(\.0)? and 0\.05"),
    ("bi_laser", "current", float("nan"), r"nan is invalid: must be between 0(\.0)? and 0\.05"),
    ("bi_laser", "current", "14 mA",
     r"'14 mA' is not an int or float; Parameter: bi_laser\.current"),
    ("bi_laser", "current_limit", 0.06,
     r"0\.06 is invalid: must be between 0(\.0)? and 0\.05 inclusive; Parameter: "
     r"bi_laser\.current_limit"),
    ("bi_spad", "bias_voltage", 60.0,
     r"60\.0 is invalid: must be between 0(\.0)? and 50\.0 inclusive; Parameter: "
     r"bi_spad\.bias_voltage"),
    ("bi_spad", "bias_voltage", 205_000.0,  # mV meant, V taken
     r"205000\.0 is invalid: must be between 0(\.0)? and 50\.0 inclusive"),
    ("bi_pattern", "p_z", 1.5, r"1\.5 is invalid: must be between 0(\.0)? and 1(\.0)? inclusive; "
     r"Parameter: bi_pattern\.p_z"),
    ("bi_pattern", "rep_rate", 1e12, r"1000000000000\.0 is invalid: must be between 1000\.0 and "
     r"2500000000\.0 inclusive; Parameter: bi_pattern\.rep_rate"),
]


@pytest.mark.parametrize(("name", "parameter", "value", "error"), OUT_OF_RANGE,
                         ids=[f"{n}.{p}={v!r}" for n, p, v, _ in OUT_OF_RANGE])
def test_out_of_range_settings_write_nothing(bench: LoadedStation,
                                            wire: Callable[[str], Wire], name: str,
                                            parameter: str, value: Any, error: str) -> None:
    instrument = bench.instruments[name]
    spy = wire(name)
    before = spy.state()
    with pytest.raises((TypeError, ValueError), match=error):
        instrument.parameters[parameter](value)
    assert spy.writes() == []
    assert spy.state() == before


@pytest.mark.parametrize(("change", "error"), [
    ({"p_z": 1.5}, r"1\.5 is invalid: must be between 0(\.0)? and 1(\.0)? inclusive; "
                   r"Parameter: bi_pattern\.p_z"),
    ({"p_signal": 0.9, "p_decoy": 0.2}, r"bi_pattern: p_signal \+ p_decoy must be <= 1, "
                                        r"got 0\.9 \+ 0\.2"),
    ({"seed": -1}, r"-1 is invalid: must be between 0 and 9223372036854775807"),
    ({"rep_rate_hz": 0.0}, r"0\.0 is invalid: must be between 1000\.0 and"),
])
def test_a_bad_pattern_is_refused_before_anything_is_written(
        bench: LoadedStation, wire: Callable[[str], Wire], change: dict[str, Any],
        error: str) -> None:
    spy = wire("bi_pattern")
    before = spy.state()
    settings = {"seed": 1, "p_z": 0.5, "p_signal": 0.7, "p_decoy": 0.2, "frame_pulses": 1024,
                "rep_rate_hz": 1e8, **change}
    with pytest.raises(ValueError, match=error):
        bench.instruments["bi_pattern"].configure(**settings)
    assert spy.writes() == []
    assert spy.state() == before


def test_garbage_replies_never_become_a_value(bench: LoadedStation,
                                             wire: Callable[[str], Wire]) -> None:
    """A NaN from the wire would start a bias ramp from nowhere: refused, named."""
    spad = bench.instruments["bi_spad"]
    spy = wire("bi_spad")
    original = spad.ask_raw
    try:
        spad.ask_raw = lambda cmd: "NaN" if cmd.startswith("BIAS") else original(cmd)
        with pytest.raises(Exception, match=r"bi_spad: reply 'NaN' to 'BIAS:VOLTAGE\?' is not a "
                                            r"number"):
            spad.bias_voltage(10.0)  # the ramp reads the bias first
    finally:
        del spad.ask_raw
    assert spy.writes() == []


# -- the BB84 command line ------------------------------------------------------------------
@pytest.fixture
def no_mock_may_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkdlab.mock_instruments.launcher import MockLauncher

    def tripped(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("refused input must be refused before a mock starts")

    monkeypatch.setattr(MockLauncher, "__init__", tripped)


BAD_RUNS = [
    (["--duration", "0"], r"argument --duration: --duration must be > 0 and finite, got 0"),
    (["--duration", "-1"], r"argument --duration: --duration must be > 0 and finite, got -1"),
    (["--duration", "inf"], r"--duration must be > 0 and finite, got inf"),
    (["--duration", "1s"], r"argument --duration: --duration must be a number, got '1s'"),
    (["--pulses", "0"], r"argument --pulses: --pulses must be > 0 and finite, got 0"),
    (["--rate", "nan"], r"argument --rate: --rate must be > 0 and finite, got nan"),
    (["--eve-fraction", "2"], r"argument --eve-fraction: must lie in \[0, 1\], got 2"),
    (["--eve-fraction", "25%"], r"argument --eve-fraction: must be a number, got '25%'"),
]


@pytest.mark.usefixtures("no_mock_may_start")
@pytest.mark.parametrize(("args", "error"), BAD_RUNS, ids=[" ".join(a) for a, _ in BAD_RUNS])
def test_bad_run_arguments_are_refused_by_the_parser(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        error: str) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["run", "bb84", "--mock", "--data-dir", str(tmp_path / "d"), *args])
    assert caught.value.code == 2
    assert re.search(error, capsys.readouterr().err)
    assert not (tmp_path / "d").exists()


@pytest.mark.usefixtures("no_mock_may_start")
@pytest.mark.parametrize(("args", "error"), [
    (["--distance-km", "-5"], r"--distance-km must lie in \[0, 500\] km, got -5\.0"),
    (["--distance-km", "25000"], r"--distance-km must lie in \[0, 500\] km, got 25000\.0"),
    (["--distance-km", "nan"], r"--distance-km must lie in \[0, 500\] km, got nan"),
    (["--seed", "-1"], r"seed \(from the command line\) must lie in \[0, 2\*\*63 - 1\], got -1"),
])
def test_bad_run_values_are_refused_before_any_mock_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        error: str) -> None:
    assert main(["run", "bb84", "--mock", "--data-dir", str(tmp_path / "d"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkdlab: error: ")
    assert re.search(error, err), err
    assert len(err.strip().splitlines()) == 1


def test_run_bb84_refuses_a_duration_before_touching_a_role(tmp_path: Path) -> None:
    from qkdlab.experiments.bb84.processing import BB84Settings
    from qkdlab.experiments.bb84.run import run_bb84

    roles = mock.MagicMock()
    for duration in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"duration_s must be > 0 s, got"):
            run_bb84(roles, BB84Settings(), duration_s=duration, data_dir=tmp_path,
                     progress=False)
    assert roles.mock_calls == []
    assert list(tmp_path.iterdir()) == []


# -- instruments that cannot be reached or constructed --------------------------------------
def test_an_init_keyword_the_driver_does_not_take(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = write_station(tmp_path, f"""\
        instruments:
          laser:
            type: {ITC}
            address: mock://thorlabs/itc4001
            init:
              current_limit_a: 0.05
              current_limt_a: 0.04
        """)
    expected = (rf"^{re.escape(str(path))}:7: instrument 'laser' at mock://thorlabs/itc4001: "
                r"cannot connect: ThorlabsITC4001 takes no init keyword 'current_limt_a'")
    with pytest.raises(StationError, match=expected), open_station(path):
        pass
    assert main(["station", "check", str(path)]) == 2
    assert re.match(expected, capsys.readouterr().err.removeprefix("qkdlab: error: "))


UNREACHABLE = [
    ("tcp-port-closed", ITC, "TCPIP::127.0.0.1::{port}::SOCKET",
     "init: {{current_limit_a: 0.05, timeout: 0.5}}",
     r"cannot connect: no answer to '\*IDN\?' \(\[Errno 111\] Connection refused\)"),
    ("fpga-tcp-port-closed", FPGA, "TCPIP::127.0.0.1::{port}::SOCKET", "init: {{timeout: 0.5}}",
     r"cannot connect: \[Errno 111\] Connection refused"),
    ("bad-visa-resource", ITC, "NOT-A-VISA-RESOURCE", "init: {{current_limit_a: 0.05}}",
     r"cannot connect: VI_ERROR_INV_RSRC_NAME"),
    ("zmq-nobody-listens", IDQ_TC, "tcp://127.0.0.1:{port}", "init: {{timeout: 0.3}}",
     r"cannot connect: dev: no reply from the Time Controller at tcp://127\.0\.0\.1:\d+ to "
     r"'\*IDN\?' within 0\.3 s"),
    ("serial-port-missing", ELL14, "/dev/ttyQKDLAB-NONE", "",
     r"cannot connect: .*could not open port /dev/ttyQKDLAB-NONE"),
]


@pytest.mark.parametrize(("driver", "address", "init", "error"), [c[1:] for c in UNREACHABLE],
                         ids=[c[0] for c in UNREACHABLE])
def test_unreachable_address_is_one_line_naming_instrument_and_address(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], driver: str, address: str,
        init: str, error: str) -> None:
    address = address.format(port=closed_port())
    path = write_station(tmp_path, f"instruments:\n  dev:\n    type: {driver}\n"
                                   f"    address: {address}\n    {init.format()}\n")
    expected = (rf"^{re.escape(str(path))}:2: instrument 'dev' at {re.escape(address)}: "
                rf"{error}")
    with pytest.raises(StationError, match=expected), open_station(path):
        pass
    assert main(["station", "check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # no traceback, no QCoDeS warnings
    assert re.match(expected, err.removeprefix("qkdlab: error: "))


# -- damaged raw tag files ------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short BB84 run on the mock bench; its raw tag file (at least two blocks)."""
    import contextlib
    import io

    data = tmp_path_factory.mktemp("run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", "bb84", "--mock", "--duration", "0.3", "--seed", "3",
                     "--data-dir", str(data), "--json"]) == 0
    path = Path(json.loads(out.getvalue())["raw_tags"])
    assert RawTagReader(path).scan().blocks >= 2
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def block_offsets(path: Path) -> list[int]:
    """Byte offsets of every block and of the file's end."""
    reader = RawTagReader(path)
    offsets = [reader.data_offset]
    for block in reader.blocks():
        offsets.append(offsets[-1] + 37 + 16 * len(block.overflow_intervals)
                       + 10 * len(block) + 4)
    return offsets


def reprocess_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["reprocess", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_torn_file_says_what_is_intact_and_salvage_processes_exactly_that(
        raw_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    offsets = block_offsets(raw_run)
    last = len(offsets) - 2  # index of the last block
    torn = tmp_path / "torn.qkt"
    torn.write_bytes(raw_run.read_bytes()[: offsets[last] + 100])  # a crash mid-block
    prefix = tmp_path / "prefix.qkt"
    prefix.write_bytes(raw_run.read_bytes()[: offsets[last]])  # the whole blocks before
    digest = sha256(torn)

    code, _, err = reprocess_cli(capsys, str(torn), "--json")
    assert code == 2
    assert re.fullmatch(
        rf"qkdlab: error: {re.escape(str(torn))}: at byte {offsets[last]} \(block {last + 1}\): "
        rf"truncated: 100 of its {offsets[last + 1] - offsets[last]} bytes are in the file; "
        rf"the {last} block\(s\) before it \([\d,]+ tags, bytes 0-{offsets[last]}\) are intact; "
        r"'qkdlab reprocess --salvage' processes them\n", err), err

    code, out, err = reprocess_cli(capsys, str(torn), "--json", "--salvage")
    assert code == 0
    assert re.match(rf"qkdlab: salvaged {last} block\(s\), [\d,]+ tags \(bytes "
                    rf"0-{offsets[last]} of {offsets[last] + 100}\); not read: truncated", err)
    salvaged = json.loads(out)
    assert salvaged["blocks_read"] == last
    assert salvaged["damage"] == {"offset": offsets[last], "torn_tail": True,
                                  "problem": f"truncated: 100 of its "
                                             f"{offsets[last + 1] - offsets[last]} bytes "
                                             "are in the file"}
    code, out, _ = reprocess_cli(capsys, str(prefix), "--json")
    assert code == 0
    clean = json.loads(out)
    figures = ("pulses", "detections", "sifted_bits", "qber_z", "qber_x", "gain_signal",
               "tags_read")
    assert {k: salvaged[k] for k in figures} == {k: clean[k] for k in figures}
    assert clean["detections"] > 0
    assert sha256(torn) == digest  # reading never changes the file


def test_a_corrupted_block_is_named_by_its_offset(
        raw_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    offsets = block_offsets(raw_run)
    bad = tmp_path / "bad.qkt"
    data = bytearray(raw_run.read_bytes())
    data[offsets[0] + 200] ^= 0x01  # one bit, in the first block's time stamps
    bad.write_bytes(bytes(data))
    digest = sha256(bad)
    code, _, err = reprocess_cli(capsys, str(bad))
    assert code == 2
    assert re.fullmatch(
        rf"qkdlab: error: {re.escape(str(bad))}: at byte {offsets[0]} \(block 1\): checksum "
        r"mismatch \(stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}\); the 0 block\(s\) before "
        rf"it \(0 tags, bytes 0-{offsets[0]}\) are intact\n", err), err
    assert sha256(bad) == digest


@pytest.mark.parametrize(("content", "error"), [
    (lambda raw: b"", r"at byte 0: empty file \(0 bytes\), not a qkdlab raw tag file"),
    (lambda raw: b"instruments:\n  laser: {}\n",
     r"at byte 0: not a qkdlab raw tag file: it starts with b'instrume', not b'QKDTAGS2'"),
    (lambda raw: raw[:5], r"at byte 5: truncated header: the file ends inside the 8-byte file "
                          r"marker b'QKDTAGS2'"),
    (lambda raw: raw[:10], r"at byte 10: truncated header: the file ends inside the 4-byte "
                           r"metadata length"),
    (lambda raw: raw[:40], r"at byte 40: truncated header: the file ends 28 bytes into the "
                           r"\d+-byte run metadata"),
    (lambda raw: raw[:12] + b"[" + raw[13:], r"at byte [1-9]\d: corrupted header: run "
                                             r"metadata is not valid JSON \(Expecting .*\)"),
], ids=["empty", "not-a-tag-file", "mid-magic", "mid-length", "mid-metadata", "bad-json"])
def test_damaged_headers_are_named_by_file_and_offset(
        raw_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        content: Callable[[bytes], bytes], error: str) -> None:
    path = tmp_path / "damaged.qkt"
    path.write_bytes(content(raw_run.read_bytes()[:4096]))
    digest = sha256(path)
    code, _, err = reprocess_cli(capsys, str(path), "--salvage")
    assert code == 2
    assert re.fullmatch(rf"qkdlab: error: {re.escape(str(path))}: {error}\n", err), err
    assert sha256(path) == digest


def test_a_directory_is_not_a_raw_tag_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = reprocess_cli(capsys, str(tmp_path))
    assert code == 2
    assert re.fullmatch(rf"qkdlab: error: {re.escape(str(tmp_path))}: cannot read the raw tag "
                        r"file: Is a directory\n", err), err
