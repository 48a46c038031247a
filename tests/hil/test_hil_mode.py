"""The HIL mode itself, against the mock bench served out of process (like hardware).

``qkdlab mock serve --write-station`` runs in a child process (through
qkdlab.testing.mocklab, which adds the roles and the mock bench's tolerances); pytest
runs the HIL tests against it in another child process, as a lab would.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from qkdlab.station import read_station_file
from qkdlab.testing.mocklab import serve_mock_lab

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HIL_TESTS = [REPO / "tests" / "hil" / "test_hil_instruments.py",
             REPO / "tests" / "hil" / "test_hil_light.py"]
LIGHT_TESTS = len(re.findall(r"^def test_", HIL_TESTS[1].read_text(), re.MULTILINE))
INSTRUMENTS = {"laser": "THORLABS ITC4001", "pattern": "QKDLAB FPGA-PG1",
               "modulator": "Thorlabs MBX", "tagger": "ID Quantique ID1000",
               "power_meter": "THORLABS PM100D", "polarization": "Thorlabs ELL14"}

FAILING_LIGHT_TEST = '''
import pytest


@pytest.mark.light
@pytest.mark.needs_roles("laser")
def test_changes_the_laser_current_then_fails(hil_role):
    laser = hil_role("laser")
    laser.current(0.02)
    laser.output_on()
    assert laser.current() == pytest.approx(0.02) and laser.is_on()
    raise AssertionError("deliberate failure with the laser on at 20 mA")
'''


@pytest.fixture(autouse=True)
def _not_under_hil(request: pytest.FixtureRequest) -> None:
    if request.config.getoption("hil", default=None):
        pytest.skip("the HIL mode's own tests run without --hil")


@pytest.fixture(scope="module")
def mock_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A lab-like station file for the mock bench running in its own process."""
    station = tmp_path_factory.mktemp("mock_lab") / "lab.yaml"
    with serve_mock_lab(station, seed=3):
        yield station


def _plugin_args() -> list[str]:
    """``-p qkdlab.testing.hil`` unless the pytest11 entry point loads it already."""
    registered = any(ep.value == "qkdlab.testing.hil" for ep in entry_points(group="pytest11"))
    return [] if registered else ["-p", "qkdlab.testing.hil"]


def _pytest(tmp_path: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pytest", *_plugin_args(), "-p", "no:cacheprovider",
           "-c", str(REPO / "pyproject.toml"), f"--basetemp={tmp_path / 'inner'}", "-rs",
           *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _table(output: str) -> dict[str, list[str]]:
    """The HIL summary rows: instrument -> [model..., passed, failed, skipped]."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"=+ qkdlab HIL: ", line))
    rows = {}
    for line in lines[start + 2:]:
        if line.startswith("="):
            break
        fields = line.split()
        rows[fields[0]] = fields[1:]
    return rows


def _connect(station: Path, name: str) -> Any:
    """A fresh connection to one instrument of the station (not the HIL run's)."""
    from qkdlab.station import import_driver

    entry = read_station_file(station).instruments[name]
    cls: Any = import_driver(entry["type"], name)
    init = dict(entry.get("init") or {})
    return cls(f"{name}_check", entry["address"], **init)


def _bench_state(station: Path) -> dict[str, Any]:
    laser, modulator, plates = (_connect(station, n)
                                for n in ("laser", "modulator", "polarization"))
    try:
        return {"current": laser.current(), "output": laser.is_on(),
                "attenuation": modulator.get_attenuation_db(),
                "angles": plates.get_actuators()}
    finally:
        for instrument in (laser, modulator, plates):
            instrument.close()


def test_hil_run_passes_with_summary_and_skips_light(mock_lab: Path, tmp_path: Path) -> None:
    done = _pytest(tmp_path, "--hil", mock_lab, *HIL_TESTS)

    assert done.returncode == 0, done.stdout + done.stderr
    table = _table(done.stdout)
    for name, model in INSTRUMENTS.items():
        assert " ".join(table[name]).startswith(model), table[name]
        assert int(table[name][-2]) == 0  # failed
    assert sum(int(row[-3]) for row in table.values()) > 0  # passed
    light_skips = re.findall(r"SKIPPED \[1\] tests/hil/test_hil_light\.py:\d+: light test .*"
                             r"--hil-allow-light", done.stdout)
    assert len(light_skips) == LIGHT_TESTS
    assert "(no light tests)" in done.stdout


def test_light_tests_run_and_leave_the_bench_as_found(mock_lab: Path, tmp_path: Path) -> None:
    before = _bench_state(mock_lab)

    done = _pytest(tmp_path, "--hil", mock_lab, "--hil-allow-light",
                   "--hil-data-dir", tmp_path / "data", HIL_TESTS[1])

    assert done.returncode == 0, done.stdout + done.stderr
    # the mock bench's meter cannot see the laser: that one test is skipped, saying why
    assert re.search(rf"\b{LIGHT_TESTS - 1} passed, 1 skipped\b", done.stdout), done.stdout
    assert "no HIL tolerance 'power_meter: light_power_w'" in done.stdout
    assert list((tmp_path / "data").glob("qkdlab.db")), "the BB84 run wrote no database"
    after = _bench_state(mock_lab)
    # the BB84 run's safe state set the VOA to 20 dB, the tests ran the laser and moved
    # the plates: all back as found, with the laser off
    assert after["current"] == pytest.approx(before["current"])
    assert after["attenuation"] == pytest.approx(before["attenuation"])
    assert after["attenuation"] != pytest.approx(20.0)
    assert after["angles"] == pytest.approx(before["angles"])
    assert after["output"] is False


def test_settings_restored_after_a_failing_light_test(mock_lab: Path, tmp_path: Path) -> None:
    laser = _connect(mock_lab, "laser")
    try:
        laser.current(0.003)  # the operator's setting, output off
        assert not laser.is_on()
    finally:
        laser.close()
    test_file = tmp_path / "test_failing_light.py"
    test_file.write_text(FAILING_LIGHT_TEST)

    done = _pytest(tmp_path, "--hil", mock_lab, "--hil-allow-light", test_file)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "deliberate failure with the laser on at 20 mA" in done.stdout
    assert re.search(r"\b1 failed\b", done.stdout)
    assert " error" not in done.stdout
    assert _table(done.stdout)["laser"][-3:] == ["0", "1", "0"]
    laser = _connect(mock_lab, "laser")
    try:
        assert laser.current() == pytest.approx(0.003)  # restored
        assert laser.is_on() is False                   # safe
    finally:
        laser.close()
