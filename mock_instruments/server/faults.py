"""Fault injection for mock instruments: dropped links, slow replies, garbage replies."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class FaultInjector:
    """Faults one mock server applies to its connections.

    All methods are thread-safe and take effect on the next reply (or at once, for
    :meth:`drop_connection`).

    Attributes:
        reply_delay_s: every reply is held back this long (s); set past the client's
            timeout to simulate an instrument that stopped answering in time.
        garbage_replies: the next ``garbage_replies`` replies are replaced by bytes that
            parse as nothing the driver expects (``-1`` = until :meth:`clear`).
        mute: swallow replies entirely (the instrument stopped answering).
    """

    reply_delay_s: float = 0.0
    garbage_replies: int = 0
    mute: bool = False
    _refuse_until: float = 0.0
    _drop_generation: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def drop_connection(self, refuse_for_s: float = 0.0) -> None:
        """Close every open connection now; refuse new ones for ``refuse_for_s`` seconds."""
        with self._lock:
            self._drop_generation += 1
            self._refuse_until = time.monotonic() + refuse_for_s

    def delay_replies(self, seconds: float) -> None:
        """Hold every reply back by ``seconds`` (s)."""
        with self._lock:
            self.reply_delay_s = seconds

    def send_garbage(self, count: int = 1) -> None:
        """Replace the next ``count`` replies by garbage (``-1``: all, until cleared)."""
        with self._lock:
            self.garbage_replies = count

    def silence(self, mute: bool = True) -> None:
        """Stop (or resume) answering queries while keeping the link up."""
        with self._lock:
            self.mute = mute

    def clear(self) -> None:
        """Remove every fault; the next connection is accepted normally."""
        with self._lock:
            self.reply_delay_s = 0.0
            self.garbage_replies = 0
            self.mute = False
            self._refuse_until = 0.0

    @property
    def drop_generation(self) -> int:
        """Increments on each :meth:`drop_connection`; connections of older generations close."""
        return self._drop_generation

    def refusing(self) -> bool:
        """True while new connections must be refused."""
        return time.monotonic() < self._refuse_until

    def take_reply_fault(self) -> tuple[float, bool, bool]:
        """Consume the faults for one reply: ``(delay_s, garbage, mute)``."""
        with self._lock:
            garbage = self.garbage_replies != 0
            if self.garbage_replies > 0:
                self.garbage_replies -= 1
            return self.reply_delay_s, garbage, self.mute


GARBAGE_REPLY = b"\x15#?\xfe\xff garbage \x00\x07"
