"""Byte-stream mocks: serial instruments served as pyserial ``socket://`` URLs."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from qkdlab.mock_instruments.server.faults import GARBAGE_REPLY
from qkdlab.mock_instruments.server.tcp import Connection, TcpServer


class ByteProtocol(ABC):
    """The device side of a binary or line protocol: bytes in, bytes out."""

    @abstractmethod
    def feed(self, data: bytes) -> bytes:
        """Consume received bytes; return the bytes to send back (may be empty)."""


class SerialSocketServer(TcpServer):
    """Serves a :class:`ByteProtocol` where a driver expects a serial port.

    pyserial opens it with ``serial.serial_for_url("socket://127.0.0.1:<port>")``;
    baud rate and parity are accepted and ignored, as on a serial-to-Ethernet bridge.
    """

    def __init__(self, name: str, protocol: ByteProtocol) -> None:
        super().__init__(name)
        self.protocol = protocol

    @property
    def address(self) -> str:
        """The pyserial URL of this server."""
        return f"socket://{self.host}:{self.port}"

    def serve(self, conn: Connection) -> None:
        while True:
            data = conn.recv()
            if data is None:
                return
            if not data:
                continue
            reply = self.protocol.feed(data)
            if not reply:
                continue
            delay, garbage, mute = self.faults.take_reply_fault()
            if mute:
                continue
            if delay:
                time.sleep(delay)
            if not conn.send(GARBAGE_REPLY[: len(reply)] if garbage else reply):
                return
