"""Reading a SCPI error queue (``SYSTem:ERRor?``) until it reports ``0``.

Shared by the drivers; each wraps the outcome in its own exception classes.
"""

from __future__ import annotations

from collections.abc import Callable


class MalformedErrorReplyError(ValueError):
    """A reply to the error query that is not ``<code>,"<message>"``."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def drain_error_queue(ask: Callable[[str], str], command: str = "SYST:ERR?",
                      max_reads: int = 32) -> tuple[list[tuple[int, str]], bool]:
    """Read and empty the queue: ``([(code, message), ...] oldest first, emptied)``.

    ``emptied`` is False when ``max_reads`` replies came without the ``0`` entry.
    Raises :class:`MalformedErrorReplyError` for a reply that is not an error entry.
    """
    errors: list[tuple[int, str]] = []
    for _ in range(max_reads):
        reply = ask(command)
        code_text, _, message = reply.partition(",")
        try:
            code = int(code_text)
        except ValueError:
            raise MalformedErrorReplyError(reply) from None
        if code == 0:
            return errors, True
        errors.append((code, message.strip().strip('"')))
    return errors, False
