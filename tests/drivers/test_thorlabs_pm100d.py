"""Thorlabs PM100D (contrib driver + adapter): exact bytes, the mock, pyvisa-sim, physics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import pyvisa.errors
import qcodes_contrib_drivers.drivers.Thorlabs.PM100D
from pyvisa.constants import StatusCode

from qkdlab.drivers.roles import PowerMeter
from qkdlab.drivers.thorlabs.pm100d import PM100DCommunicationError, PM100DError, ThorlabsPM100D
from qkdlab.mock_instruments.bench import Bench
from qkdlab.mock_instruments.server import ScpiServer
from qkdlab.mock_instruments.thorlabs.pm100d import (
    DARK_OFFSET_W,
    IDN,
    MockPM100D,
    serve,
)

ExpectedProtocol = Callable[..., AbstractContextManager[ThorlabsPM100D]]
FAST: dict[str, Any] = {"timeout": 2.0, "visalib": "@py", "settle_s": 0.0}


@pytest.fixture(autouse=True)
def _no_upstream_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream waits ~5.4 s while constructing and 0.2 s per power read (time.sleep);
    the mock answers at once, so the waits are skipped to keep the file fast."""
    monkeypatch.setattr(qcodes_contrib_drivers.drivers.Thorlabs.PM100D, "sleep", lambda _s: None)


CONSTRUCTION = [
    ("STAT:OPER:PTR 512", None),
    ("STAT:OPER:NTR 0", None),
    ("STAT:OPER?", "0"),
    ("AVER", None),  # upstream's averaging(300): no value on the wire
    ("CONF:POW", None),
    ("ABOR;:STAT:OPER?", "0"),
    ("INIT", None),
    ("*IDN?", IDN),
    ("SYST:ERR?", '-109,"Missing parameter"'),  # the adapter drains the bare AVER's error
    ("SYST:ERR?", '+0,"No error"'),
    ("SENS:AVER:COUN 300", None),
]
POWER_READ = [("CONF:POW", None), ("ABOR;:STAT:OPER?", "512"), ("INIT", None),
              ("MEAS:POW", None)]  # fmt: skip
SYNC = ("*OPC?", "1")


# -- 1. exact bytes on the wire ------------------------------------------------------------
def test_construction(expected_protocol: ExpectedProtocol) -> None:
    with expected_protocol(ThorlabsPM100D, CONSTRUCTION, **FAST) as pm:
        assert isinstance(pm, PowerMeter)
        assert pm.averaging.cache.get() == 300


def test_parameter_gets(expected_protocol: ExpectedProtocol) -> None:
    cases: list[tuple[str, str, str, Any]] = [
        ("averaging", "SENS:AVER:COUN?", "300", 300),
        ("wavelength", "SENS:CORR:WAV?", "1.550000E+03", 1550e-9),
        ("attenuation", "CORR?", "3.000000E+00", 3.0),
        ("power_range", "SENS:POW:RANG:UPP?", "1.000000E-03", 1e-3),
        ("auto_range", "SENS:POW:RANG:AUTO?", "1", True),
        ("frequency", "MEAS:FREQ?", "0.000000E+00", 0.0),
        ("current", "MEAS:CURR?", "2.500000E-04", 2.5e-4),
        ("current_range", "SENS:CURR:RANG:UPP?", "1.000000E-03", 1e-3),
        ("zero_value", "CORR:COLL:ZERO:MAGN?", "2.000000E-10", 2e-10),
        ("beam_diameter", "CORR:BEAM?", "9.500000E+00", 9.5e-3),
    ]
    script = [*CONSTRUCTION, *((command, reply) for _, command, reply, _ in cases)]
    with expected_protocol(ThorlabsPM100D, script, **FAST) as pm:
        for name, _, _, expected in cases:
            assert pm.parameters[name].get() == pytest.approx(expected), name


def test_parameter_sets(expected_protocol: ExpectedProtocol) -> None:
    script = [
        *CONSTRUCTION,
        ("SENS:AVER:COUN 10", None),
        ("SENS:CORR:WAV 1310.0", None),
        ("CORR 3.0", None),
        ("SENS:POW:RANG:UPP 0.0001", None),
        ("SENS:POW:RANG:AUTO 1", None),
        ("CORR:BEAM 5.0", None),
        ("CORR:COLL:ZERO", None),
        ("*RST", None),
        SYNC,
    ]
    with expected_protocol(ThorlabsPM100D, script, **FAST) as pm:
        pm.averaging(10)
        pm.wavelength(1310e-9)
        pm.attenuation(3.0)
        pm.power_range(1e-4)
        pm.auto_range(True)
        pm.beam_diameter(5e-3)
        pm.zero()
        pm.reset()
        pm.ask("*OPC?")


def test_read_power_sequence(expected_protocol: ExpectedProtocol) -> None:
    script = CONSTRUCTION + POWER_READ + [("FETC?", "1.234000E-03")]
    with expected_protocol(ThorlabsPM100D, script, **FAST) as pm:
        assert pm.read_power_w() == pytest.approx(1.234e-3)


def test_error_reading(expected_protocol: ExpectedProtocol) -> None:
    script = [
        *CONSTRUCTION,
        ("SYST:ERR?", '-222,"Data out of range"'),
        ("SYST:ERR?", '+0,"No error"'),
        ("SYST:ERR?", '+0,"No error"'),
    ]
    with expected_protocol(ThorlabsPM100D, script, **FAST) as pm:
        with pytest.raises(PM100DError, match=r'dut reported error\(s\): -222,"Data out') as e:
            pm.check_errors()
        assert e.value.errors == [(-222, "Data out of range")]
        assert pm.error_queue() == []


def test_constructor_rejects_bad_averaging() -> None:
    with pytest.raises(ValueError, match="averaging must be in"):
        ThorlabsPM100D("dut", "TCPIP::127.0.0.1::1::SOCKET", averaging=0)


# -- 2. through the mock over pyvisa's TCP transport ---------------------------------------
@dataclass
class Rig:
    pm: ThorlabsPM100D
    mock: MockPM100D
    server: ScpiServer


@pytest.fixture
def rig() -> Iterator[Rig]:
    server = serve("pm100d", None, {"seed": "5"})
    mock = server.instrument
    assert isinstance(mock, MockPM100D)
    mock.input_power_w = 1e-3
    server.start()
    pm = ThorlabsPM100D("dut", server.address, **FAST)
    # writes get no reply: make sure the construction's last ones reached the mock
    assert pm.ask("*OPC?") == "1"
    try:
        yield Rig(pm, mock, server)
    finally:
        pm.close()
        server.stop()


def test_identity_and_snapshot(rig: Rig) -> None:
    assert rig.pm.get_idn() == {"vendor": "THORLABS", "model": "PM100D",
                                "serial": "P0012345", "firmware": "2.4.0"}
    parameters = rig.pm.snapshot(update=True)["parameters"]
    assert parameters["power"]["unit"] == "W"
    assert parameters["wavelength"]["unit"] == "m"
    assert parameters["averaging"]["value"] == 300


@pytest.mark.parametrize(
    ("name", "value", "unit", "attribute", "stored"),
    [
        ("averaging", 25, "", "averaging", 25),
        ("wavelength", 1310e-9, "m", "wavelength_nm", 1310.0),
        ("attenuation", -3.5, "dB", "loss_db", -3.5),
        ("power_range", 1e-5, "W", "power_range_w", 1e-5),
        ("beam_diameter", 2.5e-3, "m", "beam_mm", 2.5),
    ],
)
def test_numeric_round_trip(
    rig: Rig, name: str, value: float, unit: str, attribute: str, stored: float
) -> None:
    parameter = rig.pm.parameters[name]
    assert parameter.unit == unit
    parameter.set(value)
    parameter.cache.invalidate()
    assert parameter.get() == pytest.approx(value)
    assert getattr(rig.mock, attribute) == pytest.approx(stored)
    assert rig.pm.error_queue() == []


def test_auto_range_round_trip(rig: Rig) -> None:
    rig.pm.power_range(1e-4)  # a manual range switches auto-ranging off
    assert rig.pm.auto_range() is False
    rig.pm.auto_range(True)
    assert rig.pm.auto_range() is True
    assert rig.mock.auto_range


@pytest.mark.parametrize(
    ("name", "bad", "match"),
    [
        ("wavelength", 30e-6, r"3e-05 is invalid: must be between 1\.85e-07 and 2\.5e-05"),
        ("attenuation", 70.0, r"70\.0 is invalid: must be between -60 and 60"),
        ("averaging", 0, r"0 is invalid: must be between 1 and 10000"),
    ],
)
def test_validators_raise_before_anything_is_written(
    rig: Rig, name: str, bad: float, match: str
) -> None:
    assert rig.pm.ask("*OPC?") == "1"  # writes get no reply: let construction's land first
    before = (rig.mock.wavelength_nm, rig.mock.loss_db, rig.mock.averaging)
    with pytest.raises(ValueError, match=match):
        rig.pm.parameters[name].set(bad)
    assert rig.pm.ask("*OPC?") == "1"
    assert (rig.mock.wavelength_nm, rig.mock.loss_db, rig.mock.averaging) == before
    assert rig.pm.error_queue() == []


def test_sensor_range_error_is_queued(rig: Rig) -> None:
    rig.pm.wavelength(2000e-9)  # within upstream's validator, outside the S122C's range
    with pytest.raises(PM100DError, match=r'dut reported error\(s\): -222,"Data out of range'):
        rig.pm.check_errors()
    assert rig.mock.wavelength_nm == 1550.0


def test_error_queue_after_a_bad_command(rig: Rig) -> None:
    rig.pm.write("SENS:BOGUS 1")
    assert [code for code, _ in rig.pm.error_queue()] == [-113]


def test_reset(rig: Rig) -> None:
    rig.pm.averaging(7)
    rig.pm.wavelength(1310e-9)
    rig.pm.power_range(1e-5)
    rig.pm.reset()
    assert rig.pm.averaging() == 1
    assert rig.pm.wavelength() == pytest.approx(1550e-9)
    assert rig.pm.auto_range() is True


def test_documented_long_forms(rig: Rig) -> None:
    rig.pm.write("SENSe:AVERage:COUNt 12")
    rig.pm.write("SENSe:CORRection:LOSS:INPut:MAGNitude 1.5")
    rig.pm.write("SENSe:POWer:DC:RANGe:UPPer 2E-6")
    assert rig.pm.ask("*OPC?") == "1"  # every write above has been executed
    assert (rig.mock.averaging, rig.mock.loss_db) == (12, 1.5)
    assert rig.mock.power_range_w == pytest.approx(1e-5)  # rounded up to the next decade
    assert rig.pm.ask("SYSTem:SENSor:IDN?").startswith("S122C,")
    assert float(rig.pm.ask("SENS:CORR:WAV? MAX")) == pytest.approx(1700.0)
    assert rig.pm.error_queue() == []


def test_timeout_names_instrument_and_command(rig: Rig) -> None:
    rig.pm.visa_handle.timeout = 300
    rig.server.faults.delay_replies(0.6)
    with pytest.raises(PM100DCommunicationError,
                       match=r"asking 'SENS:AVER:COUN\?' to <ThorlabsPM100D: dut>") as info:
        rig.pm.averaging.get()
    assert info.value.args[0].startswith("dut: no reply in time on 'SENS:AVER:COUN?'")
    rig.server.faults.clear()
    rig.pm.reconnect()  # drops the late reply with the old link
    assert rig.pm.averaging.get() == 300


def test_garbage_names_instrument_and_command(rig: Rig) -> None:
    rig.server.faults.send_garbage(1)
    with pytest.raises(PM100DCommunicationError) as info:
        rig.pm.attenuation.get()
    assert info.value.args[0].startswith("dut: garbled reply to 'CORR?'")
    assert "asking 'CORR?' to <ThorlabsPM100D: dut>" in str(info.value.args)
    assert rig.pm.attenuation.get() == 0.0


def test_a_reading_cut_by_a_lost_link_is_not_completed_by_a_resend(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """No automatic retry (module docstring): a resent FETC? after a lost MEAS:POW would
    return a reading nobody started."""
    received: list[str] = []
    handle_message = rig.mock.handle_message

    def spy(message: str) -> str | None:
        received.append(message)
        return handle_message(message)

    monkeypatch.setattr(rig.mock, "handle_message", spy)
    handle = rig.pm.visa_handle
    send = handle.write

    def cut_cable(message: str, *args: Any, **kwargs: Any) -> int:
        if message == "MEAS:POW":  # into a socket the peer just closed: vanishes
            return len(message)
        if message == "FETC?":  # the next command notices the lost link
            raise pyvisa.errors.VisaIOError(StatusCode.error_connection_lost)
        return int(send(message, *args, **kwargs))

    monkeypatch.setattr(handle, "write", cut_cable)
    with pytest.raises(PM100DCommunicationError, match=r"dut: link error .* on 'FETC\?'"):
        rig.pm.read_power_w()
    assert rig.pm.ask("*OPC?") == "1"  # on a new link
    assert received == ["CONF:POW", "ABOR;:STAT:OPER?", "INIT", "*IDN?", "*OPC?"]
    assert rig.pm.read_power_w() == pytest.approx(1e-3, rel=0.01)
    assert received[-2:] == ["MEAS:POW", "FETC?"]


def test_reconnect_after_a_dropped_link(rig: Rig) -> None:
    rig.pm.averaging(42)
    # a write still in the socket buffer when the link drops is lost, as on a real
    # cable: wait until the mock has executed it
    assert rig.pm.ask("*OPC?") == "1"
    rig.server.faults.drop_connection(refuse_for_s=5.0)
    time.sleep(0.15)  # see test_reconnect_gives_up_with_a_clear_error
    back = threading.Timer(0.3, rig.server.faults.clear)
    back.start()
    try:
        rig.pm.reconnect(attempts=20, wait_s=0.1)
    finally:
        back.join()
    assert rig.pm.averaging() == 42
    assert rig.pm.read_power_w() == pytest.approx(1e-3, rel=0.01)


def test_reconnect_gives_up_with_a_clear_error(rig: Rig) -> None:
    rig.server.faults.drop_connection(refuse_for_s=5.0)
    # TcpServer's accept loop notices a refusal only between 50 ms accept() polls; a
    # connect inside that window is accepted and closed, and its probe then waits for the
    # whole 2 s timeout: let it notice first.
    time.sleep(0.15)
    with pytest.raises(PM100DError, match="dut: could not reconnect"):
        rig.pm.reconnect(attempts=2, wait_s=0.05)


# -- 3. physics: the bench's power, ranges, averaging, corrections ---------------------------
def test_reads_the_bench_at_the_chosen_point() -> None:
    bench = Bench(seed=4)
    servers = {point: serve(f"pm_{point}", bench, {"point": point, "seed": "1"})
               for point in ("laser", "after_attenuator")}  # fmt: skip
    meters: dict[str, ThorlabsPM100D] = {}
    try:
        for point, server in servers.items():
            server.start()
            meters[point] = ThorlabsPM100D(f"pm_{point}", server.address, averaging=100, **FAST)
        assert meters["laser"].read_power_w() == pytest.approx(1e-3, rel=2e-3)
        weak = bench.optical_power_at("after_attenuator")  # ≈ 6.4 pW behind 82 dB
        reading = meters["after_attenuator"].read_power_w()
        assert abs(reading - (weak + DARK_OFFSET_W)) < 5e-12  # 10 nW range noise / √100
        assert meters["after_attenuator"].power_range() == pytest.approx(1e-8)  # auto-ranged
        bench.alice.attenuation_db -= 3.0
        assert meters["laser"].read_power_w() == pytest.approx(1e-3, rel=2e-3)
        with bench.lock:
            bench.alice.laser_on = False
        assert abs(meters["laser"].read_power_w()) < 2e-9  # dark offset + noise only
    finally:
        for meter in meters.values():
            meter.close()
        for server in servers.values():
            server.stop()


def test_averaging_range_and_corrections(rig: Rig) -> None:
    pm, mock = rig.pm, rig.mock
    pm.averaging(1)
    single = np.array([pm.read_power_w() for _ in range(40)])
    pm.averaging(400)
    averaged = np.array([pm.read_power_w() for _ in range(40)])
    assert single.mean() == pytest.approx(1e-3, rel=1e-3)
    assert averaged.std() < single.std() / 5  # σ/√N
    assert pm.power_range() == pytest.approx(1e-2)  # auto range: 1 mW needs headroom
    pm.attenuation(10.0)  # a 10 dB attenuator in front of the sensor is compensated
    assert pm.read_power_w() == pytest.approx(1e-2, rel=1e-3)
    pm.attenuation(0.0)
    pm.power_range(1e-4)  # manual range below the signal: the reading saturates
    assert pm.read_power_w() == pytest.approx(1e-4)
    mock.input_power_w = 0.0
    pm.auto_range(True)
    assert pm.read_power_w() == pytest.approx(DARK_OFFSET_W, abs=2e-12)
    pm.zero()  # zero adjustment with the input dark removes the offset
    assert pm.zero_value() == pytest.approx(DARK_OFFSET_W)
    assert abs(pm.read_power_w()) < 2e-12
    assert pm.current() == pytest.approx(0.0, abs=2e-12)  # responsivity × P
    assert pm.frequency() == 0.0


def test_noise_is_seeded() -> None:
    readings = []
    for _ in range(2):
        mock = MockPM100D(seed=9)
        mock.input_power_w = 5e-6
        readings.append([mock.reading() for _ in range(5)])
    assert readings[0] == readings[1]
    assert len(set(readings[0])) == 5


def test_serve_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="colour"):
        serve("pm100d", None, {"colour": "red"})
    with pytest.raises(ValueError, match="unknown power point"):
        serve("pm100d", None, {"point": "moon"})


# -- 4. pyvisa-sim ---------------------------------------------------------------------------
def test_pyvisa_sim_file() -> None:
    pm = ThorlabsPM100D(
        "sim_pm",
        "USB0::0x1313::0x8078::P0012345::INSTR",
        pyvisa_sim_file="qkdlab.drivers.thorlabs.sim:pm100d.yaml", settle_s=0.0,
    )
    assert pm.get_idn()["model"] == "PM100D"
    assert pm.read_power_w() == pytest.approx(1e-3)
    assert pm.averaging() == 300
    pm.wavelength(1310e-9)
    assert pm.wavelength() == pytest.approx(1310e-9)
    pm.power_range(1e-4)
    assert pm.power_range() == pytest.approx(1e-4)
    pm.auto_range(False)
    assert pm.auto_range() is False
    pm.beam_diameter(2e-3)
    assert pm.beam_diameter() == pytest.approx(2e-3)
    assert pm.error_queue() == []
    pm.wavelength(2000e-9)  # outside the simulated sensor range
    assert pm.error_queue() == [(-100, "Command error")]
