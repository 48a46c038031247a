"""Station files: one clear error line naming file, line, instrument and problem."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import pytest

from qkdlab.cli import main
from qkdlab.station import StationError, open_station, read_station_file


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "station.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        instruments:
          laser:
            type: qcodes.instrument.VisaInstrument
            address: [unclosed
        """)
    with pytest.raises(StationError, match=r"station\.yaml:\d+: not valid YAML"):
        read_station_file(path)


def test_unknown_instrument_key_names_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        instruments:
          laser:
            type: qcodes.instrument.VisaInstrument
            adress: TCPIP::1.2.3.4::5025::SOCKET
        """)
    match = r"station\.yaml:4: instrument 'laser': unknown key 'adress'"
    with pytest.raises(StationError, match=match):
        read_station_file(path)


def test_missing_type(tmp_path: Path) -> None:
    path = write(tmp_path, "instruments:\n  laser:\n    address: x\n")
    with pytest.raises(StationError, match=r":2: instrument 'laser': missing 'type'"):
        read_station_file(path)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "instrument:\n  laser:\n    type: x.Y\n")
    with pytest.raises(StationError, match=r":1: unknown top-level key 'instrument'"):
        read_station_file(path)


def test_unimportable_driver_names_instrument(tmp_path: Path) -> None:
    path = write(tmp_path, "instruments:\n  laser:\n    type: qkdlab.drivers.nope.Laser\n")
    match = r":2: instrument 'laser': cannot import driver module"
    with pytest.raises(StationError, match=match), open_station(path):
        pass


def test_unknown_mock_model(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        instruments:
          laser:
            type: qcodes.instrument.VisaInstrument
            address: mock://acme/laser9000
        """)
    match = r"instrument 'laser': no mock for 'acme/laser9000'"
    with pytest.raises(StationError, match=match), open_station(path):
        pass


def test_unreachable_address_is_one_line_naming_instrument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, f"""\
        instruments:
          laser:
            type: qcodes.instrument.VisaInstrument
            address: TCPIP::127.0.0.1::{closed_port()}::SOCKET
            init:
              visalib: "@py"
              timeout: 0.5
        """)
    assert main(["station", "check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("qkdlab: error: ")
    assert "instrument 'laser'" in err
    assert "cannot connect" in err
