"""Thorlabs ITC4001 driver: exact bytes, the mock over real TCP, pyvisa-sim, the bench hook."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import pytest
import pyvisa.errors
from pyvisa.constants import StatusCode

from qkdlab.drivers.roles import Laser
from qkdlab.drivers.thorlabs.itc4001 import (
    ITC4001CommunicationError,
    ITC4001InstrumentError,
    ITC4001InterlockError,
    ITC4001SafetyError,
    ThorlabsITC4001,
)
from qkdlab.mock_instruments.server import ScpiServer
from qkdlab.mock_instruments.thorlabs.itc4001 import (
    IDN,
    SLOPE_EFFICIENCY_W_PER_A,
    THRESHOLD_CURRENT_A,
    MockITC4001,
    serve,
)

ExpectedProtocol = Callable[..., AbstractContextManager[ThorlabsITC4001]]

FAST: dict[str, Any] = {"current_step_a": 0.01, "current_step_delay_s": 0.0, "visalib": "@py"}
"""Quick ramps (10 mA steps, no delay); ``@py`` skips pyvisa's search for an IVI library."""

IDN_EXCHANGE = ("*IDN?", IDN)
SYNC = ("*OPC?", "1")
"""A query that ends a script: every write before it has been checked."""


# -- 1. exact bytes on the wire ------------------------------------------------------------
def test_construction_sends_only_idn(expected_protocol: ExpectedProtocol) -> None:
    with expected_protocol(ThorlabsITC4001, [IDN_EXCHANGE], **FAST) as laser:
        assert isinstance(laser, Laser)
        assert laser.current_limit_a == pytest.approx(0.1)


def test_parameter_gets(expected_protocol: ExpectedProtocol) -> None:
    cases: list[tuple[str, str, str, Any]] = [
        ("current", "SOUR:CURR?", "1.0E-02", 0.01),
        ("current_limit", "SOUR:CURR:LIM?", "8.0E-02", 0.08),
        ("power_setpoint", "SOUR:POW?", "2.5E-03", 0.0025),
        ("mode", "SOUR:FUNC:MODE?", "CURR", "current"),
        ("mode", "SOUR:FUNC:MODE?", "POW", "power"),
        ("output", "OUTP?", "1", True),
        ("interlock_tripped", "OUTP:PROT:INTL:TRIP?", "0", False),
        ("keylock_tripped", "OUTP:PROT:KEYL:TRIP?", "1", True),
        ("measured_current", "MEAS:CURR1?", "4.99E-02", 0.0499),
        ("measured_voltage", "MEAS:VOLT1?", "1.15E+00", 1.15),
        ("pd_current", "MEAS:CURR2?", "5.0E-04", 5e-4),
        ("measured_power", "MEAS:POW2?", "1.0E-02", 0.01),
        ("tec_output", "OUTP2?", "0", False),
        ("temperature_setpoint", "SOUR2:TEMP?", "2.5E+01", 25.0),
        ("temperature", "MEAS:TEMP?", "2.498E+01", 24.98),
    ]
    script = [IDN_EXCHANGE] + [(command, reply) for _, command, reply, _ in cases]
    with expected_protocol(ThorlabsITC4001, script, **FAST) as laser:
        for name, _, _, expected in cases:
            assert laser.parameters[name].get() == pytest.approx(expected), name


def test_parameter_sets(expected_protocol: ExpectedProtocol) -> None:
    script = [
        IDN_EXCHANGE,
        ("SOUR:CURR?", "1.000000E-02"),  # the ramp starts from a fresh read
        ("SOUR:CURR 0.02", None),
        ("SOUR:CURR 0.03", None),
        ("SOUR:CURR:LIM 0.05", None),
        ("SOUR:POW 0.001", None),
        ("SOUR:FUNC:MODE POW", None),
        ("SOUR:FUNC:MODE CURR", None),
        ("OUTP2 ON", None),
        ("OUTP2 OFF", None),
        ("SOUR2:TEMP 25.5", None),
        SYNC,
    ]
    with expected_protocol(ThorlabsITC4001, script, **FAST) as laser:
        laser.current(0.03)
        laser.current_limit(0.05)
        laser.power_setpoint(1e-3)
        laser.mode("power")
        laser.mode("current")
        laser.tec_output(True)
        laser.tec_output(False)
        laser.temperature_setpoint(25.5)
        laser.ask("*OPC?")


def test_output_on_checks_interlock_key_and_limit(expected_protocol: ExpectedProtocol) -> None:
    script = [
        IDN_EXCHANGE,
        ("OUTP:PROT:INTL:TRIP?", "0"),
        ("OUTP:PROT:KEYL:TRIP?", "0"),
        ("SOUR:CURR:LIM?", "5.000000E-02"),
        ("OUTP ON", None),
        ("OUTP?", "1"),  # read back: the output is really on when output_on returns
        ("OUTP OFF", None),
        SYNC,
    ]
    with expected_protocol(ThorlabsITC4001, script, **FAST) as laser:
        laser.output_on()
        laser.output_off()
        laser.ask("*OPC?")


def test_output_on_raises_when_the_output_reads_back_off(
        expected_protocol: ExpectedProtocol) -> None:
    script = [
        IDN_EXCHANGE,
        ("OUTP:PROT:INTL:TRIP?", "0"),
        ("OUTP:PROT:KEYL:TRIP?", "0"),
        ("SOUR:CURR:LIM?", "5.000000E-02"),
        ("OUTP ON", None),
        ("OUTP?", "0"),  # the loop opened between the check and the switch
    ]
    with expected_protocol(ThorlabsITC4001, script, **FAST) as laser, \
            pytest.raises(ITC4001InterlockError, match=r"did not switch on \(OUTP\? reads 0"):
        laser.output_on()


@pytest.mark.parametrize(
    ("script", "error", "match"),
    [
        ([("OUTP:PROT:INTL:TRIP?", "1")], ITC4001InterlockError, "interlock is open"),
        (
            [("OUTP:PROT:INTL:TRIP?", "0"), ("OUTP:PROT:KEYL:TRIP?", "1")],
            ITC4001InterlockError,
            "key switch is off",
        ),
        (
            [
                ("OUTP:PROT:INTL:TRIP?", "0"),
                ("OUTP:PROT:KEYL:TRIP?", "0"),
                ("SOUR:CURR:LIM?", "2.000000E-01"),
            ],
            ITC4001SafetyError,
            "0.2 A, above the driver's hard limit",
        ),
    ],
)
def test_output_on_refused_sends_no_output_command(
    expected_protocol: ExpectedProtocol,
    script: list[tuple[str, str]],
    error: type[Exception],
    match: str,
) -> None:
    with expected_protocol(ThorlabsITC4001, [IDN_EXCHANGE, *script, SYNC], **FAST) as laser:
        with pytest.raises(error, match=match):
            laser.output_on()
        laser.ask("*OPC?")


def test_safe_state_ramps_down_then_switches_off(expected_protocol: ExpectedProtocol) -> None:
    script = [
        IDN_EXCHANGE,
        ("SOUR:CURR?", "2.000000E-02"),
        ("SOUR:CURR 0.01", None),
        ("SOUR:CURR 0", None),
        ("OUTP OFF", None),
        SYNC,
    ]
    with expected_protocol(ThorlabsITC4001, script, **FAST) as laser:
        laser.safe_state()
        laser.ask("*OPC?")


def test_reset_and_error_reading(expected_protocol: ExpectedProtocol) -> None:
    script = [
        IDN_EXCHANGE,
        ("*RST", None),
        ("SYST:ERR?", '-222,"Data out of range"'),
        ("SYST:ERR?", '-113,"Undefined header"'),
        ("SYST:ERR?", '+0,"No error"'),
        ("SYST:ERR?", '+0,"No error"'),
    ]
    with expected_protocol(ThorlabsITC4001, script, **FAST) as laser:
        laser.reset()
        with pytest.raises(ITC4001InstrumentError, match=r'dut reported.*-222,"Data out') as info:
            laser.check_errors()
        assert info.value.errors == [(-222, "Data out of range"), (-113, "Undefined header")]
        assert laser.error_queue() == []


def test_hard_limit_rejected_before_anything_is_written(
    expected_protocol: ExpectedProtocol,
) -> None:
    with expected_protocol(
        ThorlabsITC4001, [IDN_EXCHANGE, SYNC], current_limit_a=0.08, **FAST
    ) as laser:
        with pytest.raises(ValueError, match=r"between 0\.0 and 0\.08.*dut\.current"):
            laser.current(0.09)
        with pytest.raises(ValueError, match=r"between 0\.0 and 0\.08.*dut\.current_limit"):
            laser.current_limit(0.5)
        laser.ask("*OPC?")


def test_constructor_rejects_a_limit_beyond_the_instrument() -> None:
    with pytest.raises(ValueError, match="current_limit_a"):
        ThorlabsITC4001("dut", "TCPIP::127.0.0.1::1::SOCKET", current_limit_a=2.0)


# -- 2. through the mock over pyvisa's TCP transport -------------------------------------
@dataclass
class Rig:
    laser: ThorlabsITC4001
    mock: MockITC4001
    server: ScpiServer

    def sync(self) -> None:
        """Wait until the mock has executed every command sent so far."""
        assert self.laser.ask("*OPC?") == "1"


@pytest.fixture
def rig() -> Iterator[Rig]:
    mock = MockITC4001()
    mock.current_limit_a = 0.08  # the device limit configured at the laser's rating
    server = ScpiServer("itc4001", mock)
    server.start()
    laser = ThorlabsITC4001("dut", server.address, current_limit_a=0.08, timeout=0.3, **FAST)
    try:
        yield Rig(laser, mock, server)
    finally:
        laser.close()
        server.stop()


@pytest.mark.parametrize(
    ("name", "value", "unit", "attribute"),
    [
        ("current", 0.05, "A", "current_setpoint_a"),
        ("current_limit", 0.07, "A", "current_limit_a"),
        ("power_setpoint", 2e-3, "W", "power_setpoint_w"),
        ("temperature_setpoint", 30.5, "°C", "temperature_setpoint_c"),
    ],
)
def test_numeric_round_trip(rig: Rig, name: str, value: float, unit: str, attribute: str) -> None:
    parameter = rig.laser.parameters[name]
    assert parameter.unit == unit
    parameter.set(value)
    rig.sync()
    assert getattr(rig.mock, attribute) == pytest.approx(value)
    parameter.cache.invalidate()
    assert parameter.get() == pytest.approx(value)


def test_switch_round_trips(rig: Rig) -> None:
    laser, mock = rig.laser, rig.mock
    laser.mode("power")
    assert laser.mode() == "power"
    assert mock.mode == "POW"
    laser.mode("current")
    assert laser.mode() == "current"
    laser.tec_output(True)
    assert laser.tec_output() is True
    assert mock.tec_on
    laser.output(True)
    assert laser.is_on()
    assert mock.ld_on
    laser.output(False)
    assert not laser.is_on()
    assert not mock.ld_on
    assert laser.interlock_closed()


def test_measurements_follow_the_laser_model(rig: Rig) -> None:
    laser = rig.laser
    laser.current(0.05)
    laser.temperature_setpoint(30.0)
    assert laser.measured_power() == 0.0  # output off
    assert laser.temperature() == pytest.approx(25.0)  # TEC off: ambient
    laser.tec_output(True)
    laser.output_on()
    power = SLOPE_EFFICIENCY_W_PER_A * (0.05 - THRESHOLD_CURRENT_A)
    assert laser.measured_current() == pytest.approx(0.05)
    assert laser.measured_power() == pytest.approx(power)
    assert laser.measured_voltage() == pytest.approx(0.9 + 5.0 * 0.05)
    assert laser.pd_current() == pytest.approx(0.05 * power)
    assert laser.temperature() == pytest.approx(30.0)
    laser.current(0.005)  # below threshold: no light
    assert laser.measured_power() == 0.0
    laser.mode("power")
    laser.power_setpoint(5e-3)
    assert laser.measured_power() == pytest.approx(5e-3)
    assert laser.measured_current() == pytest.approx(THRESHOLD_CURRENT_A + 5e-3 / 0.25)


@pytest.mark.parametrize(
    ("name", "bad", "match"),
    [
        ("current", 0.09, r"0\.09 is invalid: must be between 0\.0 and 0\.08.*dut\.current"),
        ("current", -0.01, r"must be between 0\.0 and 0\.08.*dut\.current"),
        ("current_limit", 0.5, r"must be between 0\.0 and 0\.08.*dut\.current_limit"),
        ("power_setpoint", -1e-3, r"must be between 0\.0 and inf.*dut\.power_setpoint"),
        ("temperature_setpoint", 200.0, r"between -50\.0 and 150\.0.*dut\.temperature_setpoint"),
    ],
)
def test_validators_raise_before_anything_is_written(
    rig: Rig, name: str, bad: float, match: str
) -> None:
    before = (
        rig.mock.current_setpoint_a,
        rig.mock.current_limit_a,
        rig.mock.power_setpoint_w,
        rig.mock.temperature_setpoint_c,
    )
    with pytest.raises(ValueError, match=match):
        rig.laser.parameters[name].set(bad)
    rig.sync()
    after = (
        rig.mock.current_setpoint_a,
        rig.mock.current_limit_a,
        rig.mock.power_setpoint_w,
        rig.mock.temperature_setpoint_c,
    )
    assert after == before
    assert rig.mock.current_setpoints == []
    assert rig.laser.error_queue() == []


def test_current_changes_ramp_in_steps(rig: Rig) -> None:
    laser, mock = rig.laser, rig.mock
    laser.current.inter_delay = 0.02
    start = time.perf_counter()
    laser.current(0.05)
    elapsed = time.perf_counter() - start
    rig.sync()
    assert mock.current_setpoints == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    assert elapsed >= 4 * 0.02
    mock.current_setpoint_a = 0.03  # changed on the front panel: the ramp must not jump
    laser.current(0.01)
    rig.sync()
    assert mock.current_setpoints[5:] == pytest.approx([0.02, 0.01])


def test_documented_long_forms_and_min_max(rig: Rig) -> None:
    laser, mock = rig.laser, rig.mock
    laser.write("SOURce1:CURRent:LEVel:IMMediate:AMPLitude 0.02")
    laser.write("SOURce:CURRent:LIMit:AMPLitude 0.06")
    laser.write("OUTPut1:STATe ON")
    laser.write("OUTPut2:STATe 1")
    laser.write("SOURce2:TEMPerature:SPOint 20")
    rig.sync()
    assert (mock.current_setpoint_a, mock.current_limit_a) == (0.02, 0.06)
    assert mock.ld_on
    assert mock.tec_on
    assert mock.temperature_setpoint_c == 20.0
    assert float(laser.ask("MEASure:SCALar:CURRent1:DC?")) == pytest.approx(0.02)
    assert float(laser.ask("SOUR:CURR? MAX")) == pytest.approx(1.0)
    assert float(laser.ask("SOUR2:TEMP? MIN")) == pytest.approx(5.0)
    assert laser.ask("OUTPut:PROTection:INTLock:TRIPped?") == "0"
    assert laser.error_queue() == []


def test_device_range_error_is_queued_and_reported(rig: Rig) -> None:
    rig.laser.temperature_setpoint(60.0)  # inside the driver's sanity range, outside the TEC's
    with pytest.raises(ITC4001InstrumentError, match=r'dut reported error\(s\): -222,"Data out'):
        rig.laser.check_errors()
    assert rig.mock.temperature_setpoint_c == 25.0


def test_error_queue_after_a_bad_command(rig: Rig) -> None:
    rig.laser.write("SOUR:BOGUS 1")
    errors = rig.laser.error_queue()
    assert [code for code, _ in errors] == [-113]
    assert "Undefined header" in errors[0][1]
    assert rig.laser.error_queue() == []


def test_output_on_refused_while_interlock_open(rig: Rig) -> None:
    laser, mock = rig.laser, rig.mock
    mock.interlock_open = True
    assert not laser.interlock_closed()
    with pytest.raises(ITC4001InterlockError, match=r"dut: refusing.*interlock is open"):
        laser.output_on()
    with pytest.raises(ITC4001InterlockError):
        laser.output(True)
    assert not mock.ld_on
    mock.interlock_open = False
    mock.keylock_off = True
    with pytest.raises(ITC4001InterlockError, match="key switch"):
        laser.output_on()
    mock.keylock_off = False
    laser.output_on()
    assert laser.is_on()
    mock.interlock_open = True  # opening the loop while emitting trips the output
    assert not laser.is_on()
    assert laser.error_queue() == []


def test_output_on_refused_when_device_limit_exceeds_hard_limit(rig: Rig) -> None:
    rig.mock.current_limit_a = 0.5  # e.g. raised on the front panel
    with pytest.raises(
        ITC4001SafetyError, match=r"is 0\.5 A, above .* hard limit current_limit_a = 0\.08"
    ):
        rig.laser.output_on()
    assert not rig.mock.ld_on


def test_safe_state(rig: Rig) -> None:
    laser, mock = rig.laser, rig.mock
    laser.current(0.03)
    laser.output_on()
    laser.safe_state()
    rig.sync()
    assert mock.current_setpoints == pytest.approx([0.01, 0.02, 0.03, 0.02, 0.01, 0.0])
    assert not mock.ld_on
    assert mock.current_setpoint_a == 0.0
    laser.safe_state()  # already safe: no error
    assert not laser.is_on()


def test_reset(rig: Rig) -> None:
    laser, mock = rig.laser, rig.mock
    laser.current(0.02)
    laser.mode("power")
    laser.tec_output(True)
    laser.output_on()
    laser.reset()
    rig.sync()
    assert not mock.ld_on
    assert not mock.tec_on
    assert mock.mode == "CURR"
    assert mock.current_setpoint_a == 0.0
    assert laser.current.cache.valid is False
    assert laser.current() == 0.0
    assert laser.mode() == "current"


def test_identity_and_snapshot(rig: Rig) -> None:
    assert rig.laser.get_idn() == {
        "vendor": "THORLABS",
        "model": "ITC4001",
        "serial": "M00000001",
        "firmware": "1.5.0/1.0.0/1.2.0",
    }
    parameters = rig.laser.snapshot(update=True)["parameters"]
    assert parameters["current"]["value"] == 0.0
    assert parameters["current"]["unit"] == "A"
    assert parameters["temperature"]["unit"] == "°C"
    assert parameters["interlock_tripped"]["value"] is False


def test_reply_timeout_names_instrument_and_command(rig: Rig) -> None:
    rig.laser.current(0.02)
    rig.server.faults.delay_replies(0.5)
    with pytest.raises(
        ITC4001CommunicationError,
        match=r"dut: no reply in time on 'MEAS:TEMP\?' \(timeout 0\.3 s\); not resent",
    ):
        rig.laser.temperature()
    rig.server.faults.clear()
    time.sleep(0.3)  # the late reply arrives; the next command discards it
    assert rig.laser.current() == pytest.approx(0.02)
    assert rig.laser.temperature() == pytest.approx(25.0)


def test_garbage_reply_names_instrument_and_command(rig: Rig) -> None:
    rig.server.faults.send_garbage(1)
    with pytest.raises(
        ITC4001CommunicationError, match=r"dut: garbled reply to 'SOUR:CURR\?'"
    ):
        rig.laser.current()
    assert rig.laser.current() == 0.0


def test_reconnect_after_dropped_link(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    laser = rig.laser
    laser.current(0.02)
    # the mock has applied the ramp's last write before the link drops (a write still
    # in the socket buffer would be lost with the connection)
    rig.sync()
    rig.server.faults.drop_connection(refuse_for_s=5.0)
    with pytest.raises(ITC4001CommunicationError, match="dut: no reply in time on 'SOUR:CURR:LIM"):
        laser.current_limit()
    back = threading.Timer(0.3, rig.server.faults.clear)  # the instrument comes back
    back.start()
    try:
        with caplog.at_level(logging.INFO):
            laser.reconnect(attempts=20, wait_s=0.1)
    finally:
        back.join()
    assert re.search(r"reconnected to TCPIP.* after ([2-9]|1\d) attempt", caplog.text)
    assert laser.current() == pytest.approx(0.02)
    assert laser.current_limit() == pytest.approx(0.08)


def test_a_ramp_cut_by_a_lost_link_is_not_resumed_by_a_resend(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No automatic retry (module docstring): a resent step would skip the ramp."""
    laser, mock = rig.laser, rig.mock
    handle = laser.visa_handle
    send = handle.write

    def cut_cable(message: str, *args: Any, **kwargs: Any) -> int:
        if message == "SOUR:CURR 0.02":  # into a socket the peer just closed: vanishes
            return len(message)
        if message == "SOUR:CURR 0.03":  # the next write notices the lost link
            raise pyvisa.errors.VisaIOError(StatusCode.error_connection_lost)
        return int(send(message, *args, **kwargs))

    monkeypatch.setattr(handle, "write", cut_cable)
    with pytest.raises(ITC4001CommunicationError, match=r"dut: link error .* on 'SOUR:CURR 0\.03'"):
        laser.current(0.05)
    rig.sync()  # a new link (the old one stays cut)
    assert mock.current_setpoints == pytest.approx([0.01])  # 0.03 was not sent again
    laser.current(0.05)  # from a fresh read of where the current really is
    rig.sync()
    assert mock.current_setpoints == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])


def test_every_new_link_gets_a_device_clear(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    clears: list[str | None] = []
    device_clear = ThorlabsITC4001.device_clear

    def counting_clear(laser: ThorlabsITC4001) -> None:
        clears.append(laser.address)
        device_clear(laser)

    monkeypatch.setattr(ThorlabsITC4001, "device_clear", counting_clear)
    rig.laser.reconnect(attempts=1)
    rig.laser.reconnect(timeout_s=1.0)
    assert len(clears) == 2
    assert rig.laser.current_limit() == pytest.approx(0.08)


def test_reinstantiate_after_dropped_link(rig: Rig) -> None:
    address = rig.laser.address
    assert address is not None
    rig.server.faults.drop_connection(refuse_for_s=0.2)
    rig.laser.close()
    time.sleep(0.25)
    rig.laser = ThorlabsITC4001("dut", address, timeout=0.3, **FAST)
    assert rig.laser.get_idn()["model"] == "ITC4001"


def test_reconnect_gives_up_with_a_clear_error(rig: Rig) -> None:
    rig.server.faults.drop_connection(refuse_for_s=5.0)
    with pytest.raises(ITC4001CommunicationError, match="dut: could not reconnect"):
        rig.laser.reconnect(attempts=2, wait_s=0.05)


# -- 3. pyvisa-sim --------------------------------------------------------------------------
def test_pyvisa_sim_file() -> None:
    laser = ThorlabsITC4001(
        "sim_laser",
        "USB0::0x1313::0x804A::M00000001::INSTR",
        pyvisa_sim_file="qkdlab.drivers.thorlabs.sim:itc4001.yaml",
        current_step_a=0.01,
        current_step_delay_s=0.0,
    )
    assert laser.get_idn()["model"] == "ITC4001"
    assert laser.current() == 0.0
    laser.current(0.02)
    assert laser.current() == pytest.approx(0.02)
    laser.current_limit(0.05)
    assert laser.current_limit() == pytest.approx(0.05)
    laser.mode("power")
    assert laser.mode() == "power"
    laser.temperature_setpoint(30.0)
    assert laser.temperature_setpoint() == pytest.approx(30.0)
    laser.output_on()
    assert laser.is_on()
    laser.temperature_setpoint(60.0)  # outside the simulated TEC range
    assert laser.error_queue() == [(-100, "Command error")]
    laser.safe_state()
    assert not laser.is_on()
    assert laser.current() == 0.0


# -- 4. the bench: LD current -> emitted power --------------------------------------------
def test_laser_current_sets_the_bench_power() -> None:
    from qkdlab.mock_instruments.bench import Bench

    bench = Bench(seed=1)
    server = serve("itc4001", bench, {"threshold_a": "0.01", "slope_w_per_a": "0.2"})
    server.start()
    try:
        assert bench.optical_power_at("laser") == 0.0  # the controller starts with LD off
        laser = ThorlabsITC4001("dut", server.address, timeout=0.3, **FAST)
        laser.current(0.06)
        laser.output_on()
        laser.ask("*OPC?")
        assert bench.alice.laser_on is True
        assert bench.optical_power_at("laser") == pytest.approx(0.2 * (0.06 - 0.01))
        signal_mu = bench.mean_photon_numbers()[0]
        laser.current(0.035)
        laser.ask("*OPC?")
        assert bench.optical_power_at("laser") == pytest.approx(0.2 * (0.035 - 0.01))
        assert bench.mean_photon_numbers()[0] == pytest.approx(signal_mu / 2)
        laser.safe_state()
        laser.ask("*OPC?")
        assert bench.alice.laser_on is False
        assert bench.optical_power_at("laser") == 0.0
        laser.close()
    finally:
        server.stop()


def test_serve_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="colour"):
        serve("itc4001", None, {"colour": "red"})
