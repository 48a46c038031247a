"""Thorlabs MBX driver: exact bytes, the mock over real TCP, pyvisa-sim, bench physics."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import pyvisa.errors
from pyvisa.constants import StatusCode

from qkdlab.drivers.roles import Attenuator, IntensityModulator
from qkdlab.drivers.thorlabs.mbx import (
    MBXCommunicationError,
    MBXError,
    MBXInstrumentError,
    ThorlabsMBX,
)
from qkdlab.mock_instruments.bench import Bench
from qkdlab.mock_instruments.bench.optics import modulator_visibility
from qkdlab.mock_instruments.server.tcp import Connection, TcpServer
from qkdlab.mock_instruments.thorlabs.mbx import (
    FIRMWARE,
    MODEL,
    SERIAL,
    STANDALONE_EXTINCTION_DB,
    STANDALONE_LASER_W,
    STANDALONE_V_PI_V,
    VOA_INSERTION_LOSS_DB,
    MBXServer,
    MockMBX,
    serve,
)

FAST: dict[str, Any] = {
    "bias_step_v": 0.5,
    "bias_step_delay_s": 0.0,
    "timeout": 0.5,
    "device_clear": False,  # pyvisa-py's clear() on a socket idles 0.1 s
    "visalib": "@py",  # skip pyvisa's search for a vendor VISA library (~0.3 s each)
}
"""Driver settings that keep the tests quick."""

IDN_SCRIPT = [
    ("SYSTEM:MODEL?", MODEL),
    ("SYSTEM:SERIAL?", SERIAL),
    ("SYSTEM:FIRMWARE?", FIRMWARE),
]


# -- a scripted peer checking exact bytes (CR out, LF back) ------------------------------------
class ScriptedMBXPeer(TcpServer):
    """Expects exactly ``script``: each line must end in CR alone; replies end in LF."""

    def __init__(self, script: Sequence[tuple[str, str]]) -> None:
        super().__init__("scripted-mbx")
        self.script = list(script)
        self.position = 0
        self.mismatch: str | None = None
        self.received = b""

    @property
    def address(self) -> str:
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    def serve(self, conn: Connection) -> None:
        buffer = b""
        while self.mismatch is None:
            data = conn.recv()
            if data is None:
                return
            self.received += data
            buffer += data
            while b"\r" in buffer and self.mismatch is None:
                raw, buffer = buffer.split(b"\r", 1)
                line = raw.decode("ascii", errors="replace")
                if "\n" in line:
                    self.mismatch = f"line {line!r} holds an LF: commands must end in CR only"
                    return
                if self.position >= len(self.script):
                    self.mismatch = f"unexpected extra command {line!r}"
                    return
                expected, reply = self.script[self.position]
                if line != expected:
                    self.mismatch = (
                        f"exchange {self.position}: expected {expected!r}, driver sent {line!r}"
                    )
                    return
                self.position += 1
                conn.send(reply.encode("ascii") + b"\n")

    def check_complete(self) -> None:
        if self.mismatch is not None:
            raise AssertionError(self.mismatch)
        if self.position != len(self.script):
            raise AssertionError(
                f"driver stopped after {self.position} of {len(self.script)} exchanges; "
                f"next expected {self.script[self.position][0]!r}"
            )


@contextmanager
def expect(script: Sequence[tuple[str, str]], **kwargs: Any) -> Iterator[ThorlabsMBX]:
    """A driver on a scripted peer that must see exactly IDN_SCRIPT + ``script``."""
    peer = ScriptedMBXPeer([*IDN_SCRIPT, *script])
    peer.start()
    try:
        mbx = ThorlabsMBX("dut", peer.address, **{**FAST, **kwargs})
        try:
            yield mbx
        finally:
            mbx.close()
        peer.check_complete()
    finally:
        peer.stop()


# -- 1. exact bytes on the wire ------------------------------------------------------------
def test_construction_sends_only_identity_queries_cr_terminated() -> None:
    with expect([]) as mbx:
        assert mbx.IDN.get_latest() == {
            "vendor": "Thorlabs",
            "model": MODEL,
            "serial": SERIAL,
            "firmware": FIRMWARE,
        }
        assert isinstance(mbx, IntensityModulator)
        assert isinstance(mbx, Attenuator)


def test_wire_bytes_are_cr_terminated() -> None:
    peer = ScriptedMBXPeer([*IDN_SCRIPT, ("VOA:ATTEN: 12.50", "1")])
    peer.start()
    try:
        mbx = ThorlabsMBX("dut", peer.address, **FAST)
        mbx.attenuation(12.5)
        mbx.close()
        peer.check_complete()
        assert peer.received == (
            b"SYSTEM:MODEL?\rSYSTEM:SERIAL?\rSYSTEM:FIRMWARE?\rVOA:ATTEN: 12.50\r"
        )
    finally:
        peer.stop()


def test_parameter_gets_convert_units() -> None:
    cases: list[tuple[str, str, str, Any]] = [
        ("bias_mode", "MZM:MODE?", "0", "off"),
        ("bias_mode", "MZM:MODE?", "1", "auto_peak"),
        ("bias_mode", "MZM:MODE?", "2", "auto_null"),
        ("bias_mode", "MZM:MODE?", "3", "auto_quad_pos"),
        ("bias_mode", "MZM:MODE?", "4", "auto_quad_neg"),
        ("bias_mode", "MZM:MODE?", "5", "hold_quad_pos"),
        ("bias_mode", "MZM:MODE?", "6", "hold_quad_neg"),
        ("bias_mode", "MZM:MODE?", "7", "manual"),
        ("bias_mode", "MZM:MODE?", "8", "auto_power_pos"),
        ("bias_mode", "MZM:MODE?", "9", "auto_power_neg"),
        ("bias_setpoint", "MZM:HOLD:VOLTAGE?", "-2500", -2.5),
        ("bias_voltage", "MZM:VOLTAGE?", "5.42", 5.42),
        ("bias_power_ratio", "MZM:HOLD:RATIO?", "500", 5.0),
        ("bias_locked", "MZM:SETPOINT?", "1", True),
        ("bias_calibrating", "MZM:CALIBRATING?", "0", False),
        ("dither_amplitude", "MZM:DITHER:AMPLITUDE?", "150", 0.150),
        ("dither_frequency", "MZM:DITHER:FREQUENCY?", "2000", 2000.0),
        ("mzm_output_power", "MZM:TAP:MW?", "1.23", 1.23e-3),
        ("attenuation", "VOA:ATTEN?", "12.50", 12.5),
        ("attenuation_measured", "VOA:MEASURED?", "12.43", 12.43),
        ("attenuation_error", "VOA:ERROR?", "-0.07", -0.07),
        ("voa_mode", "VOA:MODE?", "0", "attenuation"),
        ("voa_mode", "VOA:MODE?", "1", "power"),
        ("voa_enabled", "VOA:POWER?", "1", True),
        ("voa_settled", "VOA:SETPOINT?", "0", False),
        ("voa_power_setpoint", "VOA:OUTPUT:MW?", "0.500", 5e-4),
        ("voa_output_power", "VOA:TAP:MW?", "0.25", 2.5e-4),
    ]
    with expect([(command, reply) for _, command, reply, _ in cases]) as mbx:
        for name, _, _, expected in cases:
            value = mbx.parameters[name].get()
            if isinstance(expected, float):
                assert value == pytest.approx(expected), name
            else:
                assert value == expected, name
    units = {
        "bias_setpoint": "V",
        "bias_voltage": "V",
        "dither_amplitude": "V",
        "dither_frequency": "Hz",
        "mzm_output_power": "W",
        "attenuation": "dB",
        "attenuation_measured": "dB",
        "voa_power_setpoint": "W",
        "voa_output_power": "W",
    }
    with expect([]) as mbx:
        for name, unit in units.items():
            assert mbx.parameters[name].unit == unit, name


def test_parameter_sets_send_documented_syntax() -> None:
    script = [
        ("MZM:MODE: 2", "1"),
        ("MZM:HOLD:RATIO: 425", "1"),
        ("MZM:DITHER:AMPLITUDE: 250", "1"),
        ("MZM:DITHER:FREQUENCY: 3000", "1"),
        ("VOA:ATTEN: 7.25", "1"),
        ("VOA:MODE: 1", "1"),
        ("VOA:POWER: 0", "1"),
        ("VOA:OUTPUT:MW: 0.250", "1"),
        ("MZM:RESET", "1"),
    ]
    with expect(script) as mbx:
        mbx.bias_mode("auto_null")
        mbx.bias_power_ratio(4.25)
        mbx.dither_amplitude(0.25)
        mbx.dither_frequency(3000)
        mbx.attenuation(7.25)
        mbx.voa_mode("power")
        mbx.voa_enabled(False)
        mbx.voa_power_setpoint(2.5e-4)
        mbx.recalibrate_bias()


def test_bias_setpoint_ramps_from_a_fresh_read() -> None:
    script = [
        ("MZM:HOLD:VOLTAGE?", "0"),
        ("MZM:HOLD:VOLTAGE: 500", "1"),
        ("MZM:HOLD:VOLTAGE: 1000", "1"),
        ("MZM:HOLD:VOLTAGE: 1200", "1"),
    ]
    with expect(script) as mbx:
        mbx.bias_setpoint(1.2)


def test_set_bias_from_a_lock_holds_the_present_bias_first() -> None:
    script = [
        ("MZM:MODE?", "3"),
        ("MZM:VOLTAGE?", "1.234"),
        ("MZM:HOLD:VOLTAGE: 1234", "1"),  # hold where the loop left the bias
        ("MZM:MODE: 7", "1"),  # then manual: no jump
        ("MZM:HOLD:VOLTAGE?", "1234"),
        ("MZM:HOLD:VOLTAGE: 734", "1"),
        ("MZM:HOLD:VOLTAGE: 234", "1"),
        ("MZM:HOLD:VOLTAGE: -266", "1"),
        ("MZM:VOLTAGE?", "-0.266"),
    ]
    with expect(script) as mbx:
        mbx.set_bias(-0.266)
        assert mbx.get_bias() == pytest.approx(-0.266)


def test_set_attenuation_db_engages_constant_attenuation() -> None:
    script = [
        ("VOA:ATTEN: 11.92", "1"),
        ("VOA:MODE?", "1"),
        ("VOA:MODE: 0", "1"),
        ("VOA:POWER?", "0"),
        ("VOA:POWER: 1", "1"),
        ("VOA:ATTEN?", "11.92"),
    ]
    with expect(script) as mbx:
        mbx.set_attenuation_db(11.92)
        assert mbx.get_attenuation_db() == pytest.approx(11.92)


def test_safe_state_sets_maximum_attenuation_in_a_safe_order() -> None:
    script = [("VOA:ATTEN: 20.00", "1"), ("VOA:MODE: 0", "1"), ("VOA:POWER: 1", "1")]
    with expect(script * 2) as mbx:
        mbx.safe_state()
        mbx.safe_state()  # idempotent, never raises when already safe


def test_err_reply_raises_naming_command_and_reason() -> None:
    with expect([("VOA:ATTEN: 19.00", "Err: Execution error")]) as mbx:
        with pytest.raises(MBXInstrumentError, match=r"dut rejected 'VOA:ATTEN: 19.00'") as info:
            mbx.attenuation(19.0)
        assert info.value.command == "VOA:ATTEN: 19.00"
        assert info.value.reply == "Err: Execution error"
        assert mbx.last_error == "Err: Execution error"


def test_unexpected_set_reply_is_a_communication_error() -> None:
    with (
        expect([("VOA:POWER: 1", "OK")]) as mbx,
        pytest.raises(MBXCommunicationError, match=r"dut: unexpected reply 'OK' to 'VOA:POWER: 1'"),
    ):
        mbx.voa_enabled(True)


# -- 2. through the mock over TCP ---------------------------------------------------------------
@pytest.fixture
def server() -> Iterator[MBXServer]:
    srv = serve("mbx", None, {"lock_time_s": "0.05"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def mock(server: MBXServer) -> MockMBX:
    return server.instrument


@pytest.fixture
def mbx(server: MBXServer) -> ThorlabsMBX:
    return ThorlabsMBX("dut", server.address, **FAST)


def test_round_trips_through_the_mock(mbx: ThorlabsMBX, mock: MockMBX) -> None:
    settings: list[tuple[str, Any]] = [
        ("bias_setpoint", -3.217),
        ("bias_power_ratio", 7.5),
        ("dither_amplitude", 0.8),
        ("dither_frequency", 7000.0),
        ("attenuation", 13.75),
        ("voa_power_setpoint", 3e-4),
        ("voa_mode", "power"),
        ("voa_mode", "attenuation"),
        ("voa_enabled", False),
        ("voa_enabled", True),
        ("bias_mode", "auto_peak"),
        ("bias_mode", "manual"),
    ]
    for name, value in settings:
        mbx.parameters[name].set(value)
        mbx.parameters[name].cache.invalidate()
        got = mbx.parameters[name].get()
        if isinstance(value, float):
            assert got == pytest.approx(value), name
        else:
            assert got == value, name
    # the instrument holds the documented raw units
    assert mock.hold_mv == -3217
    assert mock.ratio == 750
    assert mock.dither_mvpp == 800
    assert mock.dither_hz == 7000
    assert mock.output_setpoint_mw == pytest.approx(0.3)
    assert mock.attenuation_setpoint_db == pytest.approx(13.75)
    assert mbx.get_bias() == pytest.approx(-3.217)


def test_identity_through_the_mock(mbx: ThorlabsMBX) -> None:
    idn = mbx.get_idn()
    assert idn == {"vendor": "Thorlabs", "model": MODEL, "serial": SERIAL, "firmware": FIRMWARE}


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.set_bias(10.5), "bias_setpoint"),
        (lambda m: m.set_bias(-12.0), "bias_setpoint"),
        (lambda m: m.bias_setpoint(10.001), "bias_setpoint"),
        (lambda m: m.set_attenuation_db(0.5), "attenuation"),
        (lambda m: m.set_attenuation_db(20.5), "attenuation"),
        (lambda m: m.dither_amplitude(2.5), "dither_amplitude"),
        (lambda m: m.dither_frequency(500), "dither_frequency"),
        (lambda m: m.bias_power_ratio(1.0), "bias_power_ratio"),
        (lambda m: m.voa_power_setpoint(0.2), "voa_power_setpoint"),
        (lambda m: m.bias_mode("lock_harder"), "bias_mode"),
        (lambda m: m.voa_mode("loud"), "voa_mode"),
    ],
)
def test_validators_raise_before_anything_is_written(
    mbx: ThorlabsMBX, mock: MockMBX, call: Any, match: str
) -> None:
    before = list(mock.commands)
    state = (mock.hold_mv, mock.mode, mock.attenuation_setpoint_db, mock.dither_mvpp)
    with pytest.raises(ValueError, match=match):
        call(mbx)
    assert mock.commands == before
    assert (mock.hold_mv, mock.mode, mock.attenuation_setpoint_db, mock.dither_mvpp) == state


def test_bias_ramp_steps_and_timing(server: MBXServer, mock: MockMBX) -> None:
    mbx = ThorlabsMBX("dut", server.address, **{**FAST, "bias_step_delay_s": 0.02})
    mbx.set_bias(0.0)
    start = len(mock.commands)
    t0 = time.perf_counter()
    mbx.set_bias(2.0)
    elapsed = time.perf_counter() - t0
    sent = [c for c in mock.commands[start:] if c.startswith("MZM:HOLD:VOLTAGE: ")]
    assert sent == [f"MZM:HOLD:VOLTAGE: {mv}" for mv in (500, 1000, 1500, 2000)]
    assert elapsed >= 3 * 0.02  # inter_delay between the four steps
    # every intermediate bias the controller applied was on the ramp
    assert mock.bias_v == pytest.approx(2.0)


def test_hard_limit_is_enforced_by_the_instrument_too(mbx: ThorlabsMBX, mock: MockMBX) -> None:
    with pytest.raises(MBXInstrumentError, match="Data out of range"):
        mbx.write("MZM:HOLD:VOLTAGE: 10001")
    assert mbx.last_error == "Err: Data out of range"
    assert mock.hold_mv == 0


def test_error_replies_are_read_and_raised(mbx: ThorlabsMBX) -> None:
    cases = [
        ("VOA:ATTEN: 25", "Err: Data out of range"),
        ("VOA:ATTEN: loud", "Err: Data type error"),
        ("MZM:MODE: 12", "Err: Parameter error"),
        ("MZM:HOLD:VOLTAGE: 1.5", "Err: Data type error"),
        ("AMP:GAIN: 15", "Err: Feature not present"),
        ("FOO:BAR: 1", "Err: Undefined header"),
    ]
    for command, reply in cases:
        with pytest.raises(MBXInstrumentError) as info:
            mbx.write(command)
        assert info.value.reply == reply, command
        assert mbx.last_error == reply
    with pytest.raises(MBXInstrumentError, match="Undefined header"):
        mbx.ask("MZM:NOTHING?")
    assert mbx.attenuation() == pytest.approx(10.0)  # still in step after the errors


def test_timeout_names_instrument_and_command_then_resyncs(
    mbx: ThorlabsMBX, server: MBXServer
) -> None:
    mbx.timeout(0.2)
    server.faults.delay_replies(0.4)
    with pytest.raises(
        MBXCommunicationError, match=r"dut: no reply in time on 'VOA:ATTEN\?' \(timeout 0\.2 s\)"
    ):
        mbx.attenuation.get()
    server.faults.clear()
    time.sleep(0.3)  # the late reply arrives; the next command must skip it
    assert mbx.voa_mode() == "attenuation"
    assert mbx.bias_mode() == "manual"


def test_garbage_reply_names_instrument_and_command(mbx: ThorlabsMBX, server: MBXServer) -> None:
    server.faults.send_garbage(1)
    with pytest.raises(MBXCommunicationError, match=r"dut: garbled reply to 'MZM:VOLTAGE\?'"):
        mbx.bias_voltage()
    server.faults.send_garbage(1)
    with pytest.raises(MBXCommunicationError, match=r"dut: garbled reply to 'VOA:POWER: 1'"):
        mbx.voa_enabled(True)
    assert mbx.bias_voltage() == pytest.approx(0.0)


def test_reconnect_after_a_dropped_link(mbx: ThorlabsMBX, server: MBXServer, mock: MockMBX) -> None:
    mbx.set_attenuation_db(15.0)
    server.faults.drop_connection(refuse_for_s=0.3)
    with pytest.raises(MBXCommunicationError, match=r"dut: .*'VOA:ATTEN\?'"):
        mbx.attenuation.get()
    mbx.reconnect(attempts=30, wait_s=0.05)
    assert mbx.attenuation() == pytest.approx(15.0)  # the instrument kept its state
    assert mock.attenuation_setpoint_db == pytest.approx(15.0)


def test_an_action_whose_reply_was_lost_is_not_sent_again(
    mbx: ThorlabsMBX, mock: MockMBX, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No automatic retry (module docstring): MZM:RESET restarts the calibration."""
    mbx.lock_bias("auto_peak")
    handle = mbx.visa_handle
    query = handle.query

    def reply_lost(message: str, *args: Any, **kwargs: Any) -> str:
        if message == "MZM:RESET":
            query(message)  # the controller acts on it; its '1' never reaches the driver
            raise pyvisa.errors.VisaIOError(StatusCode.error_timeout)
        return str(query(message, *args, **kwargs))

    monkeypatch.setattr(handle, "query", reply_lost)
    with pytest.raises(MBXCommunicationError, match=r"dut: no reply in time on 'MZM:RESET'"):
        mbx.recalibrate_bias()
    assert mbx.bias_mode() == "auto_peak"  # on a new link: the late '1' answers nothing
    assert mock.commands.count("MZM:RESET") == 1
    assert mock.commands[-2:] == ["SYSTEM:SERIAL?", "MZM:MODE?"]


def test_reconnect_gives_up_with_a_clear_error(mbx: ThorlabsMBX, server: MBXServer) -> None:
    mbx.timeout(0.1)
    server.faults.drop_connection(refuse_for_s=5.0)
    # TcpServer's accept loop notices a refusal only between 50 ms accept() polls; a
    # connect inside that window is still served (framework race), so let it notice.
    time.sleep(0.15)
    with pytest.raises(MBXCommunicationError, match="dut: could not reconnect"):
        mbx.reconnect(attempts=2, wait_s=0.01)
    server.faults.clear()


def test_restart_restores_power_on_state(mbx: ThorlabsMBX, mock: MockMBX) -> None:
    mbx.set_attenuation_db(17.0)
    mbx.set_bias(2.5)
    mbx.dither_frequency(9000)
    mbx.restart(wait_s=0.05, attempts=40, retry_s=0.05)
    assert mbx.attenuation() == pytest.approx(10.0)
    assert mbx.bias_mode() == "manual"
    assert mbx.bias_setpoint() == pytest.approx(0.0)
    assert mbx.dither_frequency() == pytest.approx(5000.0)
    assert mock.commands[-1] == "MZM:DITHER:FREQUENCY?"


def test_lock_calibrates_then_reports_locked(mbx: ThorlabsMBX) -> None:
    mbx.lock_bias("auto_quad_neg")
    assert mbx.bias_calibrating() is True
    assert mbx.bias_locked() is False
    mbx.wait_for_bias_lock(timeout_s=2.0, poll_s=0.01)
    assert mbx.bias_locked() is True
    # quadrature, negative slope: π·V/Vπ + φ = +π/2 with φ = 0 and Vπ = 4 V -> V = 2 V
    assert mbx.get_bias() == pytest.approx(2.0, abs=1e-3)
    assert mbx.mzm_output_power() == pytest.approx(0.5 * STANDALONE_LASER_W, rel=1e-3)


def test_wait_for_bias_lock_times_out(mbx: ThorlabsMBX) -> None:
    mbx.bias_mode("off")
    with pytest.raises(MBXError, match=r"dut: bias not locked after 0\.05 s"):
        mbx.wait_for_bias_lock(timeout_s=0.05, poll_s=0.01)


def test_voa_taps_and_power_mode(mbx: ThorlabsMBX) -> None:
    mbx.set_bias(0.0)  # peak with φ = 0: the MZM passes (1 + v)/2
    vis = modulator_visibility(STANDALONE_EXTINCTION_DB)
    p_mzm = STANDALONE_LASER_W * 0.5 * (1 + vis)
    assert mbx.mzm_output_power() == pytest.approx(p_mzm, rel=1e-4)
    mbx.set_attenuation_db(6.0)
    assert mbx.voa_output_power() == pytest.approx(p_mzm * 10**-0.6, rel=1e-4)
    assert mbx.attenuation_measured() == pytest.approx(6.0)
    assert mbx.voa_settled() is True
    mbx.voa_power_setpoint(1e-4)  # 0.1 mW out of ~1 mW: ≈ 10 dB
    mbx.voa_mode("power")
    assert mbx.voa_output_power() == pytest.approx(1e-4, rel=1e-3)
    assert mbx.attenuation_measured() == pytest.approx(10 * math.log10(p_mzm / 1e-4), abs=0.01)
    assert mbx.attenuation() == pytest.approx(6.0)  # the cached attenuation setpoint
    mbx.voa_enabled(False)
    assert mbx.attenuation_measured() == pytest.approx(VOA_INSERTION_LOSS_DB)
    mbx.safe_state()
    assert mbx.attenuation_measured() == pytest.approx(20.0)
    assert mbx.voa_output_power() == pytest.approx(p_mzm * 1e-2, rel=1e-4)


# -- 3. pyvisa-sim --------------------------------------------------------------------------
def test_through_pyvisa_sim() -> None:
    kwargs = {k: v for k, v in FAST.items() if k != "visalib"}
    mbx = ThorlabsMBX(
        "sim", "ASRL1::INSTR", pyvisa_sim_file="qkdlab.drivers.thorlabs.sim:mbx.yaml", **kwargs
    )
    assert mbx.IDN.get_latest()["model"] == "MBX"
    mbx.set_bias(1.3)
    assert mbx.bias_setpoint() == pytest.approx(1.3)
    assert mbx.bias_mode() == "manual"
    mbx.set_attenuation_db(12.25)
    assert mbx.get_attenuation_db() == pytest.approx(12.25)
    mbx.dither_amplitude(0.5)
    assert mbx.dither_amplitude() == pytest.approx(0.5)
    mbx.voa_power_setpoint(2e-3)
    assert mbx.voa_power_setpoint() == pytest.approx(2e-3)
    with pytest.raises(MBXInstrumentError, match="Data out of range"):
        mbx.write("VOA:ATTEN: 30")
    with pytest.raises(MBXInstrumentError, match="Undefined header"):
        mbx.ask("NOPE?")
    mbx.safe_state()
    assert (mbx.attenuation(), mbx.voa_mode(), mbx.voa_enabled()) == (20.0, "attenuation", True)


# -- 4. mock physics on a fake clock (no transport) -----------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _phase_of(mock: MockMBX) -> float:
    """π·V/Vπ + φ(t) of the standalone mock, folded into (−π, π]."""
    phase = mock.phase_rad + mock.drift_rad_per_s * (mock.clock() - 100.0)
    x = math.pi * mock.bias_v / STANDALONE_V_PI_V + phase
    return math.pi - (math.pi - x) % (2 * math.pi)


@pytest.mark.parametrize(
    ("mode", "target"),
    [(1, 0.0), (2, math.pi), (3, -math.pi / 2), (4, math.pi / 2)],
)
def test_lock_tracks_the_drifting_phase(mode: int, target: float) -> None:
    clock = FakeClock()
    mock = MockMBX(phase_rad=0.3, drift_rad_per_s=0.5, lock_time_s=1.0, clock=clock)
    assert mock.handle_line(f"MZM:MODE: {mode}") == "1"
    assert mock.handle_line("MZM:CALIBRATING?") == "1"
    assert mock.handle_line("MZM:SETPOINT?") == "0"
    assert mock.bias_v == 0.0  # held while calibrating
    clock.t += 1.0
    biases = []
    for _ in range(200):  # 100 s: φ moves by 50 rad, the bias must wrap by 2·Vπ
        clock.t += 0.5
        volts = float(mock.handle_line("MZM:VOLTAGE?") or "nan")
        biases.append(volts)
        assert abs(volts) <= 10.0
        assert abs(math.remainder(_phase_of(mock) - target, 2 * math.pi)) < 1e-3
        assert mock.handle_line("MZM:SETPOINT?") == "1"
    assert max(biases) - min(biases) > 2 * STANDALONE_V_PI_V - 1.0  # it wrapped
    vis = modulator_visibility(STANDALONE_EXTINCTION_DB)
    expected_t = 0.5 * (1 + vis * math.cos(target))
    assert mock.mzm_transmission() == pytest.approx(expected_t, abs=1e-6)


def test_quadrature_slopes_have_the_documented_sign() -> None:
    for mode, sign in ((3, +1), (4, -1), (8, +1), (9, -1)):
        clock = FakeClock()
        mock = MockMBX(phase_rad=-0.7, lock_time_s=0.0, clock=clock)
        mock.handle_line("MZM:HOLD:RATIO: 400")
        mock.handle_line(f"MZM:MODE: {mode}")
        t0 = mock.mzm_transmission()
        mock.bias_v += 0.01
        assert math.copysign(1.0, mock.mzm_transmission() - t0) == sign, mode
        if mode in (8, 9):
            assert t0 == pytest.approx(0.25, abs=1e-6)  # P_in/P_out = 4


def test_hold_quad_finds_quadrature_once_then_holds() -> None:
    clock = FakeClock()
    mock = MockMBX(phase_rad=0.2, drift_rad_per_s=0.1, lock_time_s=0.5, clock=clock)
    mock.handle_line("MZM:MODE: 5")
    clock.t += 0.5
    held = float(mock.handle_line("MZM:VOLTAGE?") or "nan")
    assert abs(math.remainder(_phase_of(mock) + math.pi / 2, 2 * math.pi)) < 1e-6
    assert mock.handle_line("MZM:SETPOINT?") == "1"
    clock.t += 2.0  # φ drifts by 0.2 rad: the voltage stays, the flag drops
    assert float(mock.handle_line("MZM:VOLTAGE?") or "nan") == held
    assert mock.handle_line("MZM:SETPOINT?") == "0"
    mock.handle_line("MZM:RESET")  # recalibration finds the new quadrature
    clock.t += 0.5
    assert float(mock.handle_line("MZM:VOLTAGE?") or "nan") != held
    assert mock.handle_line("MZM:SETPOINT?") == "1"


def test_off_and_manual_modes() -> None:
    mock = MockMBX(lock_time_s=0.0, clock=FakeClock())
    mock.handle_line("MZM:HOLD:VOLTAGE: -4321")
    assert mock.handle_line("MZM:VOLTAGE?") == "-4.321"
    mock.handle_line("MZM:MODE: 0")
    assert mock.handle_line("MZM:VOLTAGE?") == "0.000"
    assert mock.handle_line("MZM:SETPOINT?") == "0"


def test_mock_accepts_short_forms_and_any_terminator(server: MBXServer, mock: MockMBX) -> None:
    import socket

    with socket.create_connection((server.host, server.port), timeout=1.0) as sock:
        sock.sendall(b"voa:att: 3.5\nVOA:ATT?\r\nMZM:D:AMPL: 300\n\rMZM:D:AMPL?\r")
        data = b""
        while data.count(b"\n") < 4:
            data += sock.recv(100)
    assert data == b"1\n3.50\n1\n300\n"
    assert mock.attenuation_setpoint_db == pytest.approx(3.5)


def test_serve_options() -> None:
    srv = serve("x", None, {"lock_time_s": "0.3", "phase_rad": "1", "laser_w": "0.002"})
    try:
        assert srv.instrument.lock_time_s == pytest.approx(0.3)
        assert srv.instrument.phase_rad == pytest.approx(1.0)
        assert srv.address.startswith("TCPIP::127.0.0.1::")
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="unknown MBX mock option"):
        serve("y", None, {"volume": "11"})


# -- 5. the shared bench --------------------------------------------------------------------------
def test_starting_the_mock_leaves_the_bench_unchanged() -> None:
    bench = Bench(seed=1)
    mu = bench.mean_photon_numbers()
    attenuation = bench.alice.attenuation_db
    MockMBX(bench)
    assert bench.alice.attenuation_db == pytest.approx(attenuation)
    assert bench.alice.im_bias_v == 0.0
    assert bench.mean_photon_numbers() == pytest.approx(mu)


def test_driver_sets_the_bench_voa_and_bias() -> None:
    bench = Bench(seed=1)
    a0 = bench.alice.attenuation_db
    mu0 = bench.mean_photon_numbers()[0]
    srv = serve("mbx", bench, {"lock_time_s": "0"})
    srv.start()
    try:
        mbx = ThorlabsMBX("dut", srv.address, **FAST)
        mbx.set_attenuation_db(a0 + 3.0)  # sent with 0.01 dB resolution
        sent = round(a0 + 3.0, 2)
        assert bench.alice.attenuation_db == pytest.approx(sent)
        assert bench.mean_photon_numbers()[0] == pytest.approx(mu0 * 10 ** (-(sent - a0) / 10))
        mbx.safe_state()
        assert bench.alice.attenuation_db == pytest.approx(20.0)
        assert bench.mean_photon_numbers()[0] == pytest.approx(mu0 * 10 ** (-(20.0 - a0) / 10))
        mbx.voa_enabled(False)  # a VOA switched off passes the most light
        assert bench.alice.attenuation_db == pytest.approx(VOA_INSERTION_LOSS_DB)
        mbx.set_bias(bench.alice.v_pi_v)  # Vπ: the signal level moves to the null
        assert bench.alice.im_bias_v == pytest.approx(bench.alice.v_pi_v)
        assert bench.mean_photon_numbers()[0] < 0.01 * bench.mean_photon_numbers()[2] + 1e-3
    finally:
        srv.stop()


def test_peak_lock_follows_the_bench_modulator_drift() -> None:
    bench = Bench(seed=2)
    bench.alice.im_phase_rad = 0.4
    bench.alice.im_drift_rad_per_s = 0.8
    mu_peak = (
        bench.mean_photon_numbers()[0]
        / (0.5 * (1 + modulator_visibility(bench.alice.extinction_ratio_db) * math.cos(0.4)))
        * 0.5
        * (1 + modulator_visibility(bench.alice.extinction_ratio_db))
    )
    srv = serve("mbx", bench, {"lock_time_s": "0"})
    srv.start()
    try:
        mbx = ThorlabsMBX("dut", srv.address, **FAST)
        mbx.lock_bias("auto_peak")
        mbx.wait_for_bias_lock(timeout_s=1.0, poll_s=0.01)
        v_pi = bench.alice.v_pi_v
        assert mbx.get_bias() == pytest.approx(-0.4 * v_pi / math.pi, abs=2e-3)
        assert bench.mean_photon_numbers()[0] == pytest.approx(mu_peak, rel=1e-6)
        bench.alice.laser_on = False  # let bench time run cheaply: 0.5 s of dark counts
        bench.acquire(0.5)
        bench.alice.laser_on = True
        expected = -(0.4 + 0.8 * bench.now_s) * v_pi / math.pi
        assert mbx.get_bias() == pytest.approx(expected, abs=2e-3)
        assert bench.alice.im_bias_v == pytest.approx(expected, abs=2e-3)
        assert bench.mean_photon_numbers()[0] == pytest.approx(mu_peak, rel=1e-5)
        # without the lock the same drift costs signal photons
        mbx.set_bias(mbx.get_bias())
        bench.alice.laser_on = False
        bench.acquire(0.5)
        bench.alice.laser_on = True
        assert mbx.get_bias() == pytest.approx(expected, abs=2e-3)
        assert bench.mean_photon_numbers()[0] < 0.97 * mu_peak
    finally:
        srv.stop()


def test_tracker_thread_updates_the_bench_without_queries() -> None:
    bench = Bench(seed=3)
    bench.alice.im_drift_rad_per_s = 1.0
    srv = serve("mbx", bench, {"lock_time_s": "0"})
    srv.start()
    try:
        srv.instrument.handle_line("MZM:MODE: 2")  # null lock
        bench.alice.laser_on = False
        bench.acquire(0.25)
        bench.alice.laser_on = True
        target = (math.pi - 1.0 * bench.now_s) * bench.alice.v_pi_v / math.pi
        done = threading.Event()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not done.is_set():
            if abs(bench.alice.im_bias_v - target) < 1e-6:
                done.set()
            time.sleep(0.005)
        assert done.is_set(), (bench.alice.im_bias_v, target)
    finally:
        srv.stop()
