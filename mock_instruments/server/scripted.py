"""A scripted SCPI peer that checks the exact bytes a driver sends.

This is our ``expected_protocol`` (after PyMeasure's): a test lists every
``(command, reply)`` pair in order, the driver talks to this server over the real
pyvisa TCP transport, and the test fails on the first unexpected byte.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from qkdlab.mock_instruments.server.tcp import Connection, TcpServer

Exchange = tuple[str, str | None]


class ScriptedScpiServer(TcpServer):
    """Expects exactly ``script`` (newline-terminated lines) and replies as listed."""

    def __init__(self, script: Sequence[Exchange], terminator: bytes = b"\n") -> None:
        super().__init__("scripted")
        self.script = list(script)
        self.terminator = terminator
        self.position = 0
        self.mismatch: str | None = None
        self._done = threading.Event()

    @property
    def address(self) -> str:
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    def serve(self, conn: Connection) -> None:
        buffer = b""
        while self.mismatch is None:
            data = conn.recv()
            if data is None:
                return
            buffer += data
            while self.terminator in buffer and self.mismatch is None:
                raw, buffer = buffer.split(self.terminator, 1)
                line = raw.decode("ascii", errors="replace")
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
                if reply is not None:
                    conn.send(reply.encode("ascii") + self.terminator)

    def check_complete(self, wait_s: float = 1.0) -> None:
        """Raise AssertionError unless every scripted exchange happened, in order.

        Writes get no reply, so the last lines may still be in flight when the driver
        returns: wait up to ``wait_s`` for them before judging.
        """
        deadline = time.monotonic() + wait_s
        while (self.mismatch is None and self.position < len(self.script)
               and time.monotonic() < deadline):
            time.sleep(0.005)
        if self.mismatch is not None:
            raise AssertionError(self.mismatch)
        if self.position != len(self.script):
            missing = self.script[self.position]
            raise AssertionError(
                f"driver stopped after {self.position} of {len(self.script)} exchanges; "
                f"next expected {missing[0]!r}"
            )
