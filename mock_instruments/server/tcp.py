"""A threaded TCP server on 127.0.0.1 with an OS-chosen port, the base of every mock."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from abc import ABC, abstractmethod

from qkdlab.mock_instruments.server.faults import FaultInjector

log = logging.getLogger(__name__)

_POLL_S = 0.05
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class Connection:
    """One client connection: buffered reads with a poll so faults and shutdown act promptly."""

    def __init__(self, sock: socket.socket, server: TcpServer) -> None:
        self.sock = sock
        self.server = server
        self.generation = server.faults.drop_generation
        sock.settimeout(_POLL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def alive(self) -> bool:
        """False once the server stops or a fault dropped this link."""
        return self.server.running and self.generation == self.server.faults.drop_generation

    def recv(self) -> bytes | None:
        """Bytes from the client; ``b""`` if none yet, ``None`` when the link is gone."""
        if not self.alive:
            return None
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return b""
        except OSError:
            return None
        if data and _QUICKACK is not None:
            # acknowledge at once: clients that do not set TCP_NODELAY (pyvisa-py's
            # SOCKET sessions) otherwise wait ~40 ms (Nagle vs delayed ACK) on every
            # write followed by a query
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return data if data else None

    def send(self, data: bytes) -> bool:
        """Send all of ``data``; False if the link is gone."""
        if not self.alive:
            return False
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class TcpServer(ABC):
    """Accepts connections on ``127.0.0.1:<free port>`` and serves each in a thread.

    Subclasses implement :meth:`serve` for one connection.  ``faults`` applies to every
    connection of this server.
    """

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.faults = FaultInjector()
        self._listener: socket.socket | None = self._listen(host, port)
        self.host, self.port = self._listener.getsockname()[:2]
        self.running = False
        self._threads: list[threading.Thread] = []
        self._accept_thread: threading.Thread | None = None

    def start(self) -> TcpServer:
        """Start accepting in a daemon thread; returns self."""
        self.running = True
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"mock-{self.name}-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection and wait for the threads."""
        self.running = False
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=2)
        for thread in self._threads:
            thread.join(timeout=2)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> TcpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _listen(host: str, port: int) -> socket.socket:
        listener = socket.create_server((host, port))  # sets SO_REUSEADDR on POSIX
        listener.settimeout(_POLL_S)
        return listener

    def _accept_loop(self) -> None:
        while self.running:
            if self.faults.refusing():
                # a real refusal: no listener, so clients get ECONNREFUSED at once
                # (accepting and closing makes pyvisa-py's clear() spin forever)
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                time.sleep(_POLL_S / 5)
                continue
            if self._listener is None:
                try:
                    self._listener = self._listen(self.host, self.port)
                except OSError:  # port still in TIME_WAIT; try again shortly
                    time.sleep(_POLL_S / 5)
                    continue
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.faults.refusing():  # the fault arrived while accept() waited
                sock.close()
                continue
            conn = Connection(sock, self)
            thread = threading.Thread(
                target=self._serve_and_close, args=(conn,), name=f"mock-{self.name}", daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _serve_and_close(self, conn: Connection) -> None:
        try:
            self.serve(conn)
        except Exception:  # a mock must never take the test process down
            log.exception("mock %s: connection handler failed", self.name)
        finally:
            conn.close()

    @property
    @abstractmethod
    def address(self) -> str:
        """The address a client library opens (pyvisa resource name or pyserial URL)."""

    @abstractmethod
    def serve(self, conn: Connection) -> None:
        """Serve one connection until ``conn.recv()`` returns None."""
