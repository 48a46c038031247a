"""The SCPI mock engine and its TCP/serial servers, through real pyvisa/pyserial clients."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import pyvisa
import serial

from qkdlab.mock_instruments.server import (
    ByteProtocol,
    ScpiInstrument,
    ScpiServer,
    SerialSocketServer,
)
from qkdlab.mock_instruments.server.scpi import compile_header


class Dummy(ScpiInstrument):
    idn = "ACME,DUMMY,SN1,1.0"

    def __init__(self) -> None:
        super().__init__()
        self.current = 0.0
        self.outputs = {1: False, 2: False}
        self.add_value(
            "SOURce[1]:CURRent[:LEVel][:IMMediate][:AMPLitude]",
            lambda: self.current,
            self._set_current,
            limits=(0.0, 0.1),
            default=0.0,
        )
        self.add_command(
            "OUTPut<n>[:STATe]",
            query=lambda a, s: "1" if self.outputs[s[0]] else "0",
            write=lambda a, s: self.outputs.__setitem__(s[0], a[0].upper() in ("1", "ON")),
        )

    def _set_current(self, value: float) -> None:
        self.current = value

    def reset(self) -> None:
        self.current = 0.0
        self.outputs = {1: False, 2: False}


@pytest.fixture
def server() -> Iterator[ScpiServer]:
    srv = ScpiServer("dummy", Dummy())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def resource(server: ScpiServer) -> Iterator[pyvisa.resources.MessageBasedResource]:
    rm = pyvisa.ResourceManager("@py")
    res = rm.open_resource(server.address, read_termination="\n", write_termination="\n",
                           timeout=500)
    yield res  # type: ignore[misc]
    res.close()
    rm.close()


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        ("SOUR:CURR", True),
        ("SOURCE:CURRENT:LEVEL:IMMEDIATE:AMPLITUDE", True),
        ("sour1:curr:lev", True),
        ("SOURC:CURR", False),  # neither short nor long form
        ("SOUR2:CURR", False),  # the documented suffix is [1] only
        ("CURR", False),
    ],
)
def test_header_long_and_short_forms(header: str, matches: bool) -> None:
    regex = compile_header("SOURce[1]:CURRent[:LEVel][:IMMediate][:AMPLitude]")
    assert (regex.fullmatch(header) is not None) is matches


def test_identity_and_round_trip(resource: pyvisa.resources.MessageBasedResource) -> None:
    assert resource.query("*IDN?") == "ACME,DUMMY,SN1,1.0"
    resource.write("SOUR:CURR 25m")  # engineering suffix: 25 mA
    assert float(resource.query("SOURce:CURRent:LEVel?")) == pytest.approx(0.025)
    assert float(resource.query("SOUR:CURR? MAX")) == pytest.approx(0.1)


def test_chained_commands_keep_the_subsystem_path(
    resource: pyvisa.resources.MessageBasedResource,
) -> None:
    # "CURR?" after "SOUR:CURR 0.02;" is relative to SOUR; ":OUTP2?" goes back to the root
    assert resource.query("SOUR:CURR 0.02;CURR?;:OUTP2?") == "2.000000E-02;0"


def test_out_of_range_is_queued_not_applied(
    server: ScpiServer, resource: pyvisa.resources.MessageBasedResource
) -> None:
    resource.write("SOUR:CURR 0.05")
    resource.write("SOUR:CURR 5")
    code, _, message = resource.query("SYST:ERR?").partition(",")
    assert int(code) == -222
    assert "out of range" in message.lower()
    assert server.instrument.current == pytest.approx(0.05)  # type: ignore[attr-defined]
    assert resource.query("SYST:ERR?") == '+0,"No error"'


def test_unknown_command_queues_error_and_keeps_serving(
    resource: pyvisa.resources.MessageBasedResource,
) -> None:
    resource.write("FOO:BAR 1")
    assert resource.query("*IDN?").startswith("ACME")
    assert resource.query("SYST:ERR?").startswith("-113,")


def test_error_queue_overflow_reports_350(
    resource: pyvisa.resources.MessageBasedResource,
) -> None:
    for _ in range(Dummy.error_queue_size + 5):
        resource.write("NOPE")
    codes = [int(resource.query("SYST:ERR?").split(",")[0]) for _ in range(Dummy.error_queue_size)]
    assert codes[:-1] == [-113] * (Dummy.error_queue_size - 1)
    assert codes[-1] == -350
    assert resource.query("SYST:ERR?") == '+0,"No error"'


def test_reset_and_numeric_suffix(server: ScpiServer,
                                  resource: pyvisa.resources.MessageBasedResource) -> None:
    resource.write("OUTP2 ON")
    assert resource.query("OUTP2?") == "1"
    assert resource.query("OUTP1:STAT?") == "0"
    resource.write("*RST")
    assert resource.query("OUTP2?") == "0"


def test_fault_delay_past_timeout_then_recovers(server: ScpiServer) -> None:
    rm = pyvisa.ResourceManager("@py")
    res = rm.open_resource(server.address, read_termination="\n", write_termination="\n",
                           timeout=300)
    server.faults.delay_replies(0.6)
    with pytest.raises(pyvisa.errors.VisaIOError, match="Timeout"):
        res.query("SOUR:CURR?")  # type: ignore[attr-defined]
    server.faults.clear()
    time.sleep(0.7)
    # the late reply is still on the link: the next query reads the stale answer,
    # which is why drivers reconnect after a timeout instead of carrying on
    assert res.query("*IDN?") == "0.000000E+00"  # type: ignore[attr-defined]
    res.close()
    res = rm.open_resource(server.address, read_termination="\n", write_termination="\n",
                           timeout=300)
    assert res.query("*IDN?") == "ACME,DUMMY,SN1,1.0"  # type: ignore[attr-defined]
    res.close()
    rm.close()


def test_fault_garbage_reply(server: ScpiServer,
                             resource: pyvisa.resources.MessageBasedResource) -> None:
    server.faults.send_garbage(1)
    resource.write("*IDN?")
    raw = resource.read_raw()
    assert not raw.startswith(b"ACME")
    assert resource.query("*IDN?") == "ACME,DUMMY,SN1,1.0"  # only one reply was spoiled


def test_fault_mute_times_out(server: ScpiServer,
                              resource: pyvisa.resources.MessageBasedResource) -> None:
    server.faults.silence()
    with pytest.raises(pyvisa.errors.VisaIOError, match="Timeout"):
        resource.query("*IDN?")


def test_fault_drop_then_reconnect(server: ScpiServer) -> None:
    rm = pyvisa.ResourceManager("@py")
    res = rm.open_resource(server.address, read_termination="\n", write_termination="\n",
                           timeout=300)
    assert res.query("*IDN?").startswith("ACME")  # type: ignore[attr-defined]
    server.faults.drop_connection(refuse_for_s=0.3)
    with pytest.raises(pyvisa.errors.VisaIOError):
        res.query("*IDN?")  # type: ignore[attr-defined]
    res.close()
    time.sleep(0.35)
    res = rm.open_resource(server.address, read_termination="\n", write_termination="\n",
                           timeout=300)
    assert res.query("*IDN?").startswith("ACME")  # type: ignore[attr-defined]
    res.close()
    rm.close()


class Echo(ByteProtocol):
    """Replies to each complete 4-byte frame with the frame reversed."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        out = b""
        while len(self.buffer) >= 4:
            frame, self.buffer = self.buffer[:4], self.buffer[4:]
            out += frame[::-1]
        return out


def test_serial_over_socket_with_pyserial() -> None:
    server = SerialSocketServer("echo", Echo())
    server.start()
    try:
        port = serial.serial_for_url(server.address, baudrate=9600, timeout=0.5)
        port.write(b"\x01\x02")
        port.write(b"\x03\x04\xaa\xbb\xcc\xdd")
        assert port.read(8) == b"\x04\x03\x02\x01\xdd\xcc\xbb\xaa"
        port.close()
    finally:
        server.stop()


def test_refusing_server_refuses_at_once(server: ScpiServer) -> None:
    import socket

    server.faults.drop_connection(refuse_for_s=0.5)
    time.sleep(0.1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=1.0)
    time.sleep(0.6)
    with socket.create_connection((server.host, server.port), timeout=1.0) as sock:
        sock.sendall(b"*IDN?\n")
        assert sock.recv(100).startswith(b"ACME")
