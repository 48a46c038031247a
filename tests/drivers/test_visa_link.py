"""ReconnectingVisaLink (drivers/visa_link.py): the reconnect loop the VISA drivers share.

Exercised on a minimal driver over a real TCP mock; the drivers' own test files cover
their choice of ``RETRY_ONCE`` and their probe and reopen hooks.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import pyvisa.errors
from pyvisa.constants import StatusCode
from qcodes.instrument import VisaInstrument

from qkdlab.drivers.visa_link import ReconnectingVisaLink
from qkdlab.mock_instruments.server import ScpiServer
from qkdlab.mock_instruments.server.scpi import ScpiInstrument
from qkdlab.mock_instruments.server.tcp import Connection

IDN = "qkdlab,LinkMeter,7,1.0"


class LinkError(Exception):
    """The test driver's error (garbled reply)."""


class LinkCommunicationError(LinkError):
    """The test driver's communication error."""


class Meter(ScpiInstrument):
    """A setting (``VOLT``) and a query with a side effect (``COUNT?``, like SYST:ERR?)."""

    idn = IDN

    def __init__(self) -> None:
        super().__init__()
        self.volts = 0.0
        self.count = 0
        self.add_value("VOLTage", lambda: self.volts, self._set_volts, limits=(0.0, 10.0))
        self.add_command("COUNt", query=lambda _a, _s: self._next_count())

    def _set_volts(self, value: float) -> None:
        self.volts = value

    def _next_count(self) -> str:
        self.count += 1
        return str(self.count)


class Driver(ReconnectingVisaLink, VisaInstrument):
    """The smallest driver on the mixin; no default terminator (it comes as a kwarg)."""

    default_terminator = None
    error_cls: ClassVar[type[Exception]] = LinkError
    communication_error_cls: ClassVar[type[Exception]] = LinkCommunicationError

    def __init__(self, name: str, address: str, **kwargs: Any) -> None:
        self.init_link(address, dict(kwargs))
        super().__init__(name, address, **kwargs)

    def _link_answers(self, reply: str) -> bool:
        return reply == IDN


class NoRetryDriver(Driver):
    RETRY_ONCE: ClassVar[bool] = False


class LateLineServer(ScpiServer):
    """From its second connection on, a stale line precedes the first reply on each
    connection: what a serial port delivers after a reply that came too late."""

    def __init__(self, instrument: ScpiInstrument) -> None:
        super().__init__("late-line", instrument)
        self.connections: list[Connection] = []

    def _send_reply(self, conn: Connection, reply: str) -> bool:
        if conn not in self.connections:
            self.connections.append(conn)
            if len(self.connections) > 1 and not conn.send(b"+5.000000E+00\n"):
                return False
        return super()._send_reply(conn, reply)


KWARGS: dict[str, Any] = {"terminator": "\n", "timeout": 0.3, "visalib": "@py",
                          "device_clear": False}


@pytest.fixture
def meter() -> Meter:
    return Meter()


@pytest.fixture
def server(meter: Meter) -> Iterator[ScpiServer]:
    srv = ScpiServer("link", meter)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(params=[Driver, NoRetryDriver], ids=["retry", "no-retry"])
def dut(request: pytest.FixtureRequest, server: ScpiServer) -> Iterator[Driver]:
    driver = request.param("dut", server.address, **KWARGS)
    driver.reconnect_timeout_s = 0.3
    yield driver
    driver.close()


def listening(server: ScpiServer) -> None:
    """Wait until the server accepts connections again (it listens anew after a refusal)."""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            socket.create_connection((server.host, server.port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def refuse(server: ScpiServer, seconds: float) -> None:
    """Drop the link and refuse new ones; wait until the accept loop refuses too."""
    server.faults.drop_connection(refuse_for_s=seconds)
    time.sleep(0.15)  # TcpServer polls accept() every 50 ms


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timeout_s": 0.0}, r"dut\.reconnect: timeout_s must be > 0 s, got 0\.0"),
        ({"attempts": 0}, r"dut\.reconnect: attempts must be >= 1, got 0"),
        ({"wait_s": -0.1}, r"dut\.reconnect: wait_s must be in \[0, 60\] s, got -0\.1"),
    ],
)
def test_reconnect_rejects_bad_arguments(dut: Driver, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dut.reconnect(**kwargs)


def test_reconnect_gives_up_after_its_attempts(dut: Driver, server: ScpiServer) -> None:
    refuse(server, 5.0)
    with pytest.raises(LinkCommunicationError,
                       match=r"dut: could not reconnect to TCPIP::127\.0\.0\.1::\d+::SOCKET "
                             r"\(3 attempt\(s\) in"):
        dut.reconnect(attempts=3, wait_s=0.0)


def test_reconnect_waits_for_the_instrument(dut: Driver, server: ScpiServer,
                                            meter: Meter) -> None:
    dut.write("VOLT 2.5")
    assert dut.ask("*OPC?") == "1"  # the write has landed before the link drops
    refuse(server, 0.3)
    generation = dut._link_generation
    dut.reconnect(timeout_s=3.0, wait_s=0.02)
    assert dut._link_generation > generation + 1  # refused attempts came first
    assert float(dut.ask("VOLT?")) == pytest.approx(2.5)
    assert meter.volts == pytest.approx(2.5)


def test_retry_once_resends_and_no_retry_does_not(dut: Driver, meter: Meter,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A query whose reply is lost: resending it repeats its side effect."""
    handle = dut.visa_handle
    query = handle.query

    def reply_lost(message: str, *args: Any, **kwargs: Any) -> str:
        if message == "COUNT?":
            query(message)  # the instrument counts; its reply never reaches the driver
            raise pyvisa.errors.VisaIOError(StatusCode.error_timeout)
        return str(query(message, *args, **kwargs))

    monkeypatch.setattr(handle, "query", reply_lost)
    if dut.RETRY_ONCE:
        assert dut.ask("COUNT?") == "2"  # resent on a new link: reading 1 is lost
        assert meter.count == 2
        return
    with pytest.raises(LinkCommunicationError,
                       match=r"dut: no reply in time on 'COUNT\?' \(timeout 0\.3 s\); not resent"):
        dut.ask("COUNT?")
    assert meter.count == 1
    generation = dut._link_generation
    assert dut.ask("COUNT?") == "2"  # the next command starts on a new link
    assert dut._link_generation == generation + 1


def test_a_failed_reconnect_leaves_a_usable_driver(dut: Driver, server: ScpiServer,
                                                   meter: Meter) -> None:
    """The closed handle a refused reopen leaves behind is reopened, never used."""
    meter.volts = 1.5
    refuse(server, 5.0)
    with pytest.raises(LinkCommunicationError, match=r"dut: .* on 'VOLT\?'"):
        dut.ask("VOLT?")
    with pytest.raises(LinkCommunicationError,
                       match=r"dut: link not re-established before 'VOLT\?'"):
        dut.ask("VOLT?")
    server.faults.clear()
    listening(server)
    assert float(dut.ask("VOLT?")) == pytest.approx(1.5)  # no reconnect() needed


def test_terminators_and_timeout_carry_over_to_the_new_link(dut: Driver) -> None:
    dut.timeout(0.25)
    dut.reconnect(attempts=1)
    assert (dut.visa_handle.read_termination, dut.visa_handle.write_termination) == ("\n", "\n")
    assert dut.timeout() == pytest.approx(0.25)
    assert dut.ask("*IDN?") == IDN


def test_garbled_reply_is_the_drivers_error(dut: Driver, server: ScpiServer) -> None:
    server.faults.send_garbage(1)
    with pytest.raises(LinkError) as info:
        dut.ask("VOLT?")
    assert info.value.args[0].startswith("dut: garbled reply to 'VOLT?' (b'\\x15#?")
    assert float(dut.ask("VOLT?")) == 0.0


def test_the_probe_reads_past_a_stale_reply(meter: Meter) -> None:
    server = LateLineServer(meter)
    server.start()
    dut = Driver("dut", server.address, **KWARGS)
    try:
        meter.volts = 7.0
        assert dut.ask("*IDN?") == IDN  # the first connection: no stale line
        dut.reconnect(attempts=1)  # its probe is answered by the stale line first
        assert float(dut.ask("VOLT?")) == pytest.approx(7.0)
        assert len(server.connections) == 2
    finally:
        dut.close()
        server.stop()


def test_a_probe_never_answered_as_expected_fails(dut: Driver,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(type(dut), "_link_answers", lambda _self, _reply: False)
    with pytest.raises(LinkCommunicationError,
                       match=r"could not reconnect .*: unexpected reply 'qkdlab,LinkMeter"):
        dut.reconnect(attempts=1)
