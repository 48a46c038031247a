"""Malformed station files: one clear error naming the file, the line and the key.

Each case changes one line of a valid station and is checked through the library
(:func:`qkdlab.station.open_station`, or the BB84 settings for the ``bb84`` section)
and the command line (``qkdlab station check``, ``qkdlab run bb84 --station``).  Every
error comes before anything is started or contacted: mocks and instrument connections
are replaced by tripwires.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qkdlab.cli import bb84_settings, main
from qkdlab.station import StationError, open_station, read_station_file

BASE = """\
qkdlab:
  description: bad-input bench
  mock_bench:
    seed: 3
  roles:
    laser: laser
    laser_settings: {current: 0.014}
    transmitter: pattern
    tagger: tagger
    detectors: {1: [0, 0], 2: [0, 1]}
    marker_channel: null
  bb84:
    p_z: 0.8
    mu_signal: 0.5
    mu_decoy: 0.1
    rep_rate_hz: 1.0e+8
instruments:
  laser:
    type: qkdlab.drivers.thorlabs.itc4001.ThorlabsITC4001
    address: mock://thorlabs/itc4001
    init:
      current_limit_a: 0.05
  pattern:
    type: qkdlab.drivers.fpga.pattern_generator.FPGAPatternGenerator
    address: mock://fpga/pattern_generator
  tagger:
    type: qkdlab.drivers.idquantique.time_controller.IDQTimeController
    address: mock://idquantique/id1000
"""
LINES = BASE.splitlines()


def line_of(text: str, lines: list[str] = LINES) -> int:
    """1-based line of ``lines`` that is ``text`` (or, failing that, holds it)."""
    found = [i + 1 for i, line in enumerate(lines) if line == text] or \
        [i + 1 for i, line in enumerate(lines) if text in line]
    assert len(found) == 1, (text, found)
    return found[0]


# (id, line to change, its replacement, error at that line (regex, after "file:line: "))
FILE_CASES = [
    ("yaml-syntax", "address: mock://thorlabs/itc4001", "address: [mock://thorlabs/itc4001",
     r"not valid YAML"),
    ("yaml-tab", "    init:", "\tinit:", r"not valid YAML: found character '\\t'"),
    ("yaml-duplicate-key", "    mu_decoy: 0.1", "    mu_decoy: 0.1\n    mu_decoy: 0.2",
     r"not valid YAML: found duplicate key \"mu_decoy\""),
    ("unknown-top-key", "instruments:", "instrument:", r"unknown top-level key 'instrument'"),
    ("unknown-qkdlab-key", "  bb84:", "  bb48:", r"unknown key 'bb48' in 'qkdlab' \(allowed:"),
    ("unknown-instrument-key", "      current_limit_a: 0.05",
     "      current_limit_a: 0.05\n    adress: x", r"instrument 'laser': unknown key 'adress'"),
    ("missing-type", "    type: qkdlab.drivers.fpga.pattern_generator.FPGAPatternGenerator",
     "    driver: x", r"instrument 'pattern': missing 'type'"),
    ("type-not-a-string", "    type: qkdlab.drivers.fpga.pattern_generator.FPGAPatternGenerator",
     "    type: 5", r"instrument 'pattern': 'type' must be a string .*got a number 5"),
    ("address-not-a-string", "    address: mock://fpga/pattern_generator", "    address: 5025",
     r"instrument 'pattern': 'address' must be a string .*got a number 5025"),
    ("init-not-a-mapping", "    init:", "    init: 0.05\n    parameters:",
     r"instrument 'laser': 'init' must be a mapping of constructor keywords, got a number"),
    ("bb84-section-not-a-mapping", "  bb84:", "  bb84: fast\n  calibration:",
     r"'qkdlab: bb84' must be a mapping of BB84 settings, got a string"),
    ("seed-not-an-integer", "    seed: 3", "    seed: three",
     r"'qkdlab: mock_bench: seed' must be an integer >= 0, got 'three'"),
    ("role-not-an-instrument", "    tagger: tagger", "    tagger: tager",
     r"role 'tagger' names 'tager', which is not an instrument of this station "
     r"\(instruments: laser, pattern, tagger\)"),
    ("role-wrong-type", "    transmitter: pattern", "    transmitter: 5",
     r"role 'transmitter' must name an instrument \(or a list of instruments\), got a number"),
    ("laser-settings-with-unit", "    laser_settings: {current: 0.014}",
     "    laser_settings: {current: 14 mA}",
     r"'qkdlab: roles: laser_settings: current' must be a number in SI units, got a string "
     r"'14 mA'; write a plain number in A, without the unit: '14 mA' is 0\.014"),
    ("detector-map", "    detectors: {1: [0, 0], 2: [0, 1]}",
     "    detectors: {1: [0, 0], 2: [0, 2]}",
     r"'qkdlab: roles: detectors': channel '2' must be an integer mapped to \[basis, bit\], "
     r"each 0 or 1"),
    ("marker-channel", "    marker_channel: null", "    marker_channel: sync",
     r"'qkdlab: roles: marker_channel' must be a tagger channel \(an integer\) or null, "
     r"got 'sync'"),
    ("driver-module-missing", "    type: qkdlab.drivers.thorlabs.itc4001.ThorlabsITC4001",
     "    type: qkdlab.drivers.thorlabs.itc4002.ThorlabsITC4002",
     r"instrument 'laser': cannot import driver module 'qkdlab\.drivers\.thorlabs\.itc4002'"),
    ("driver-class-missing", "    type: qkdlab.drivers.thorlabs.itc4001.ThorlabsITC4001",
     "    type: qkdlab.drivers.thorlabs.itc4001.ThorlabsITC4002",
     r"instrument 'laser': 'qkdlab\.drivers\.thorlabs\.itc4001' has no driver class "
     r"'ThorlabsITC4002'"),
    ("unknown-mock", "    address: mock://idquantique/id1000",
     "    address: mock://idquantique/id1001", r"instrument 'tagger': no mock for"),
]
# the error's line: that of the (last) changed line, or of the one given here
ERROR_LINE = {"driver-module-missing": "  laser:", "driver-class-missing": "  laser:",
              "unknown-mock": "  tagger:", "missing-type": "  pattern:",
              "init-not-a-mapping": "    init: 0.05", "bb84-section-not-a-mapping": "  bb84: fast"}

# the safety limits: refused with the unit and the bound, at the instrument's line
LIMIT_CASES = [
    ("current-in-mA-as-A", "    laser_settings: {current: 0.014}",
     "    laser_settings: {current: 14}",
     r"instrument 'laser' \(Thorlabs ITC4001 laser-diode controller\): roles: laser_settings "
     r"current = 14 A is above current_limit_a = 0\.05 A \(laser-diode current limit\)"),
    ("limit-in-mA-as-A", "      current_limit_a: 0.05", "      current_limit_a: 50",
     r"instrument 'laser' \(Thorlabs ITC4001 laser-diode controller\): current_limit_a = 50 A "
     r"is above the model's rating 1 A \(laser-diode current limit"),
    ("limit-with-unit", "      current_limit_a: 0.05", "      current_limit_a: 50 mA",
     r"instrument 'laser' \(Thorlabs ITC4001 laser-diode controller\): current_limit_a = "
     r"'50 mA' is not a number \(laser-diode current limit, in A\)"),
]

# the BB84 section: checked by `station check` and before a run
BB84_CASES = [
    ("p_z-out-of-range", "    p_z: 0.8", "    p_z: 1.5",
     r"'qkdlab: bb84: p_z' must lie in \(0, 1\), got 1\.5"),
    ("p_z-not-a-number", "    p_z: 0.8", "    p_z: high",
     r"'qkdlab: bb84: p_z' must be a number, got 'high'"),
    ("mu-negative", "    mu_decoy: 0.1", "    mu_decoy: -0.1",
     r"'qkdlab: bb84: mu_decoy': need 0 <= mu_vacuum < mu_decoy and mu_decoy \+ mu_vacuum "
     r"< mu_signal, got 0\.5, -0\.1, 0\.0"),
    ("rate-with-unit", "    rep_rate_hz: 1.0e+8", "    rep_rate_hz: 100 MHz",
     r"'qkdlab: bb84: rep_rate_hz' must be a number, got '100 MHz'; write a plain number in "
     r"Hz, without the unit: '100 MHz' is 1e\+08"),
    ("window-with-unit", "    rep_rate_hz: 1.0e+8", "    window_ps: 2 ns",
     r"'qkdlab: bb84: window_ps' must be a number or null, got '2 ns'; write a plain number "
     r"in ps, without the unit: '2 ns' is 2000"),
    ("unknown-bb84-key", "    p_z: 0.8", "    pz: 0.8",
     r"unknown key 'pz' in 'qkdlab: bb84' \(allowed: abort_qber, .*window_ps\)"),
    ("bool-for-int", "    p_z: 0.8", "    p_z: 0.8\n    frame_pulses: true",
     r"'qkdlab: bb84: frame_pulses' must be an integer, got True"),
]


def bad_station(tmp_path: Path, old: str, new: str) -> Path:
    assert BASE.count(old) == 1, old
    path = tmp_path / "station.yaml"
    path.write_text(BASE.replace(old, new))
    return path


@pytest.fixture
def tripwires(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a mock starts or an instrument is contacted."""
    from qcodes.station import Station

    from qkdlab.mock_instruments.launcher import MockLauncher

    def tripped(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a bad station file must fail before this")

    monkeypatch.setattr(MockLauncher, "__init__", tripped)
    monkeypatch.setattr(Station, "load_instrument", tripped)


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with ``qkdlab: error: ...``; the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkdlab: error: "), err
    return err.removeprefix("qkdlab: error: ").strip()


def test_the_base_station_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "station.yaml"
    path.write_text(BASE)
    station = read_station_file(path)
    assert station.where_key("qkdlab", "bb84", "p_z") == f"{path}:{line_of('p_z: 0.8')}"
    assert bb84_settings(path).p_z == 0.8


@pytest.mark.usefixtures("tripwires")
@pytest.mark.parametrize(("old", "new", "error"), [c[1:] for c in FILE_CASES],
                         ids=[c[0] for c in FILE_CASES])
def test_malformed_file_names_file_line_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest,
        old: str, new: str, error: str) -> None:
    case = request.node.callspec.id
    path = bad_station(tmp_path, old, new)
    line = line_of(ERROR_LINE.get(case, new.splitlines()[-1]), path.read_text().splitlines())
    if case == "yaml-syntax":  # the parser notices the open bracket a line later
        line += 1
    expected = rf"^{re.escape(str(path))}:{line}: {error}"
    with pytest.raises(StationError, match=expected), open_station(path):
        pass
    assert re.match(expected, cli_error(capsys, ["station", "check", str(path)]))
    assert re.match(expected, cli_error(capsys, ["station", "check", "--no-connect",
                                                 str(path)]))
    run = ["run", "bb84", "--station", str(path), "--calibration", "warn",
           "--data-dir", str(tmp_path / "data")]
    assert re.match(expected, cli_error(capsys, run))
    assert not (tmp_path / "data" / "raw").exists()


@pytest.mark.usefixtures("tripwires")
@pytest.mark.parametrize(("old", "new", "error"), [c[1:] for c in LIMIT_CASES],
                         ids=[c[0] for c in LIMIT_CASES])
def test_values_in_the_wrong_unit_are_refused_with_unit_and_bound(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str,
        error: str) -> None:
    path = bad_station(tmp_path, old, new)
    expected = rf"{re.escape(str(path))}:{line_of('  laser:')}: {error}"
    with pytest.raises(StationError, match=expected), open_station(path):
        pass
    message = cli_error(capsys, ["station", "check", "--no-connect", str(path)])
    assert message.startswith("unsafe limits in the station file:")
    assert re.search(expected, message)


@pytest.mark.usefixtures("tripwires")
@pytest.mark.parametrize(("old", "new", "error"), [c[1:] for c in BB84_CASES],
                         ids=[c[0] for c in BB84_CASES])
def test_bad_bb84_settings_name_line_key_and_range(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str,
        error: str) -> None:
    path = bad_station(tmp_path, old, new)
    line = line_of(new.splitlines()[-1], path.read_text().splitlines())
    if "mu_decoy" in error:  # the range names three keys: the one in the section is given
        line = line_of("    mu_decoy: -0.1", path.read_text().splitlines())
    expected = rf"^{re.escape(str(path))}:{line}: {error}"
    with pytest.raises(StationError, match=expected):
        bb84_settings(path)
    assert re.match(expected, cli_error(capsys, ["station", "check", "--no-connect",
                                                 str(path)]))
    run = ["run", "bb84", "--station", str(path), "--calibration", "warn",
           "--data-dir", str(tmp_path / "data")]
    assert re.match(expected, cli_error(capsys, run))


def test_an_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert re.match(rf"{re.escape(str(missing))}: cannot read station file: No such file",
                    cli_error(capsys, ["station", "check", str(missing)]))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert re.match(rf"{re.escape(str(binary))}: cannot read station file: not UTF-8",
                    cli_error(capsys, ["station", "check", str(binary)]))
