"""The HIL mode's parts, in process: tolerance files and the snapshot/safe-state/restore
around light tests (qkdlab.testing.tolerances, qkdlab.testing.state)."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from qcodes.instrument import Instrument

from qkdlab.drivers.thorlabs.itc4001 import ThorlabsITC4001
from qkdlab.mock_instruments.thorlabs.itc4001 import serve
from qkdlab.testing.state import RestoreError, guarded
from qkdlab.testing.tolerances import ToleranceError, load_tolerances, sibling_path


# -- tolerances ---------------------------------------------------------------------------
def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lab.hil.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_tolerances_are_read_and_missing_ones_named(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        tagger:
          dark_rate_cps: [10, 5000]
        laser:
          test_settings: {current: 0.012}
        """)
    tol = load_tolerances(path)
    assert tol.find("tagger", "dark_rate_cps") == [10, 5000]
    assert tol.find("laser", "test_settings") == {"current": 0.012}
    assert tol.find("bb84", "qber_max") is None
    assert tol.missing("bb84", "qber_max") == (
        f"no HIL tolerance 'bb84: qber_max' in {path}; add it to run this test")
    assert sibling_path(tmp_path / "lab.yaml") == path


@pytest.mark.parametrize(("text", "error"), [
    ("tagger:\n  dark_rate: [1, 2]\n", r":2: unknown key 'dark_rate' in 'tagger'"),
    ("taggers:\n  acquire_s: 1\n", r":1: unknown section 'taggers'"),
    ("tagger:\n  dark_rate_cps: [5000, 10]\n", r":2: tagger.dark_rate_cps = \[5000, 10\] must be"),
    ("bb84:\n  qber_max: 5\n", r":2: bb84.qber_max = 5 must be a number in \[0, 1\]"),
    ("laser:\n  test_settings: {current: high}\n", r":2: laser.test_settings = .* must map"),
    ("tagger: [1, 2]\n", r":1: section 'tagger' must be a mapping"),
])
def test_bad_tolerances_are_refused_with_file_and_line(tmp_path: Path, text: str,
                                                       error: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ToleranceError, match=f"^{path}{error}"):
        load_tolerances(path)


# -- snapshot, safe state, restore ----------------------------------------------------------
@pytest.fixture
def laser() -> Iterator[ThorlabsITC4001]:
    """An ITC4001 driver on its mock twin, over TCP."""
    server = serve("laser")
    server.start()
    instrument = ThorlabsITC4001("hil_laser", server.address, visalib="@py",
                                 current_limit_a=0.05, current_step_a=0.01,
                                 current_step_delay_s=0.0)
    instrument.current_limit(0.05)  # the device's own limit within the driver's
    try:
        yield instrument
    finally:
        instrument.close()
        server.stop()


def test_a_light_change_is_made_safe_and_settings_restored(laser: ThorlabsITC4001) -> None:
    laser.current(0.003)
    laser.temperature_setpoint(22.0)

    with guarded([laser]):
        laser.current(0.02)
        laser.temperature_setpoint(30.0)
        laser.output_on()

    assert laser.is_on() is False                          # safe: the laser's output
    assert laser.current() == pytest.approx(0.003)         # restored
    assert laser.temperature_setpoint() == pytest.approx(22.0)


def test_restore_also_after_the_body_fails(laser: ThorlabsITC4001) -> None:
    def failing_light_test() -> None:
        with guarded([laser]):
            laser.current(0.03)
            laser.output_on()
            raise ZeroDivisionError

    laser.current(0.004)
    with pytest.raises(ZeroDivisionError):
        failing_light_test()
    assert laser.is_on() is False
    assert laser.current() == pytest.approx(0.004)


class Dial(Instrument):
    """A model the safety table does not know: ``level`` is what its safe state zeroes;
    ``stuck`` refuses to be set while ``locked``."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.values = {"level": 1.0, "gain": 2.0, "stuck": 0.0}
        self.locked = False
        for key in self.values:
            self.add_parameter(key, get_cmd=partial(self.values.get, key),
                               set_cmd=partial(self._set, key))

    def _set(self, key: str, value: float) -> None:
        if key == "stuck" and self.locked:
            raise OSError("read-only after calibration")
        self.values[key] = value

    def safe_state(self) -> None:
        self.parameters["level"](0.0)


@pytest.fixture
def dial() -> Iterator[Dial]:
    instrument = Dial("hil_dial")
    try:
        yield instrument
    finally:
        instrument.close()


def test_unknown_model_keeps_what_its_safe_state_changed(dial: Dial) -> None:
    with guarded([dial]):
        dial.parameters["level"](5.0)
        dial.parameters["gain"](7.0)
    assert dial.parameters["level"]() == 0.0  # its safe state's, not the snapshot's 1.0
    assert dial.parameters["gain"]() == 2.0   # restored


def test_a_setting_that_cannot_be_restored_is_reported(dial: Dial) -> None:
    def light_test() -> None:
        with guarded([dial]):
            dial.parameters["stuck"](3.0)
            dial.locked = True
            dial.parameters["gain"](9.0)

    with pytest.raises(RestoreError, match=r"hil_dial\.stuck: cannot restore 0\.0: .*read-only"):
        light_test()
    assert dial.parameters["gain"]() == 2.0  # the others were still restored


# -- what a HIL test needs of the station ---------------------------------------------------
def test_roles_and_instruments_a_test_needs(tmp_path: Path) -> None:
    from qkdlab.station import read_station_file
    from qkdlab.testing.hil import HILSession, role_instrument_names
    from qkdlab.testing.tolerances import Tolerances

    path = tmp_path / "lab.yaml"
    path.write_text(textwrap.dedent("""\
        qkdlab:
          roles:
            laser: laser
            spd: [spad1, spad2]
            power_meter: meter
            detectors: {1: [0, 0]}
        instruments:
          laser: {type: qkdlab.drivers.thorlabs.itc4001.ThorlabsITC4001, address: x}
          spad1: {type: qkdlab.drivers.idquantique.id120.IDQID120, address: y}
          spad2: {type: qkdlab.drivers.idquantique.id120.IDQID120, address: z}
        """))
    station = read_station_file(path)
    session = HILSession(station_path=path, station=station,
                         tolerances=Tolerances(tmp_path / "lab.hil.yaml"), allow_light=False,
                         data_dir=None)

    assert role_instrument_names(station, "spd") == ["spad1", "spad2"]
    assert role_instrument_names(station, "detectors") is None  # a map, not instruments
    assert session.missing_roles(("laser", "spd", "detectors")) == []
    assert session.missing_roles(("tagger", "power_meter")) == [
        "no role 'tagger' (add 'qkdlab: roles: tagger: ...')",
        "role 'power_meter' names 'meter', not an instrument"]
    assert session.match_instruments("IDQID120") == ["spad1", "spad2"]  # by driver class
    assert session.match_instruments("laser") == ["laser"]              # by name
    assert session.match_instruments("ThorlabsPM100D") == []
