"""Serve mock instruments over real transports (TCP SCPI sockets, serial-over-socket)."""

from qkdlab.mock_instruments.server.faults import FaultInjector
from qkdlab.mock_instruments.server.raw import ByteProtocol, SerialSocketServer
from qkdlab.mock_instruments.server.scpi import (
    DATA_OUT_OF_RANGE,
    EXECUTION_ERROR,
    ILLEGAL_PARAMETER,
    SETTINGS_CONFLICT,
    ScpiError,
    ScpiInstrument,
    ScpiServer,
    parse_bool,
    parse_number,
)
from qkdlab.mock_instruments.server.scripted import ScriptedScpiServer
from qkdlab.mock_instruments.server.tcp import Connection, TcpServer

__all__ = [
    "DATA_OUT_OF_RANGE",
    "EXECUTION_ERROR",
    "ILLEGAL_PARAMETER",
    "SETTINGS_CONFLICT",
    "ByteProtocol",
    "Connection",
    "FaultInjector",
    "ScpiError",
    "ScpiInstrument",
    "ScpiServer",
    "ScriptedScpiServer",
    "SerialSocketServer",
    "TcpServer",
    "parse_bool",
    "parse_number",
]
