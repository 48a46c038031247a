"""A small SCPI engine for mock instruments, and its TCP server.

Commands are declared with their documented long/short form, e.g.
``SOURce[1]:CURRent[:LEVel][:IMMediate][:AMPLitude]``: upper-case letters are the
short form, ``[...]`` is optional, ``<n>`` after a keyword is a captured numeric suffix
(``OUTPut<n>`` matches ``OUTP``, ``OUTP2``...).  IEEE 488.2 basics are built in:
``*IDN?``, ``*RST``, ``*CLS``, ``*OPC?``, ``*ESR?`` and an error queue read by
``SYSTem:ERRor[:NEXT]?``.  An unknown header queues ``-113,"Undefined header"`` and,
as on real instruments, gives no reply; the server keeps serving.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from qkdlab.mock_instruments.server.faults import GARBAGE_REPLY
from qkdlab.mock_instruments.server.tcp import Connection, TcpServer

# Standard SCPI error numbers (SCPI-99 vol. 2, ch. 21.8) used by the mocks.
NO_ERROR = (0, "No error")
COMMAND_ERROR = (-100, "Command error")
SYNTAX_ERROR = (-102, "Syntax error")
MISSING_PARAMETER = (-109, "Missing parameter")
UNDEFINED_HEADER = (-113, "Undefined header")
PARAMETER_ERROR = (-220, "Parameter error")
SETTINGS_CONFLICT = (-221, "Settings conflict")
DATA_OUT_OF_RANGE = (-222, "Data out of range")
ILLEGAL_PARAMETER = (-224, "Illegal parameter value")
EXECUTION_ERROR = (-200, "Execution error")
QUEUE_OVERFLOW = (-350, "Queue overflow")


class ScpiError(Exception):
    """Raised by a command handler to queue a SCPI error instead of replying."""

    def __init__(self, error: tuple[int, str], detail: str = "") -> None:
        super().__init__(f"{error[0]},{error[1]}{'; ' + detail if detail else ''}")
        self.code, self.message = error
        self.detail = detail


Handler = Callable[[list[str], tuple[int, ...]], str | None]


def _keyword_regex(keyword: str) -> str:
    """``CURRent`` -> ``(?:CURR|CURRENT)``; ``OUTPut<n>`` adds a captured suffix."""
    suffix = ""
    if keyword.endswith("<n>"):
        keyword, suffix = keyword[:-3], r"(\d*)"
    short = "".join(c for c in keyword if c.isupper() or c.isdigit() or c in "*?_")
    forms = {short.upper(), keyword.upper()}
    alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    return f"(?:{alternatives}){suffix}"


def compile_header(pattern: str) -> re.Pattern[str]:
    """Compile a documented SCPI header (with ``[...]`` optional parts) to a regex."""
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "[":
            out.append("(?:")
            i += 1
        elif char == "]":
            out.append(")?")
            i += 1
        elif char == ":":
            out.append(":")
            i += 1
        elif char.isdigit():  # literal suffix such as SOURce[1]
            out.append(re.escape(char))
            i += 1
        else:
            match = re.match(r"[A-Za-z*][A-Za-z0-9_]*(?:<n>)?", pattern[i:])
            if match is None:
                raise ValueError(f"bad SCPI pattern {pattern!r} at {pattern[i:]!r}")
            word = match.group(0)
            out.append(_keyword_regex(word))
            i += len(word)
    return re.compile("".join(out), re.IGNORECASE)


@dataclass
class _Command:
    pattern: str
    regex: re.Pattern[str]
    query: Handler | None
    write: Handler | None


def parse_number(text: str, name: str = "value") -> float:
    """Parse a SCPI <NRf> with an optional engineering suffix (``5m`` = 5e-3)."""
    multipliers = {"P": 1e-12, "N": 1e-9, "U": 1e-6, "M": 1e-3, "K": 1e3, "MA": 1e6, "G": 1e9}
    match = re.fullmatch(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*", text)
    if match is None:
        raise ScpiError(PARAMETER_ERROR, f"{name}: {text!r} is not a number")
    value = float(match.group(1))
    unit = match.group(2)
    if unit:
        # case: m = milli, M / MA = mega in SCPI; keep it simple and documented
        key = unit if unit in ("MA",) else unit[0].upper() if unit[0] != "m" else "M"
        if key not in multipliers:
            raise ScpiError(PARAMETER_ERROR, f"{name}: unknown suffix {unit!r}")
        value *= multipliers[key]
    return value


def parse_bool(text: str, name: str = "value") -> bool:
    """Parse a SCPI boolean (``ON``/``OFF``/``1``/``0``)."""
    word = text.strip().upper()
    if word in ("1", "ON"):
        return True
    if word in ("0", "OFF"):
        return False
    raise ScpiError(ILLEGAL_PARAMETER, f"{name}: {text!r} is not ON/OFF/1/0")


class ScpiInstrument:
    """Command table, state lock and error queue of one SCPI mock instrument.

    Subclasses register commands in ``__init__`` with :meth:`add_command` or
    :meth:`add_value`, and override :meth:`reset` (``*RST``) and :attr:`idn`.
    """

    idn = "qkdlab,MockInstrument,0,0.1"
    error_queue_size = 10

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._commands: list[_Command] = []
        self._errors: deque[tuple[int, str]] = deque()
        self.event_status = 0
        self.add_command("*IDN", query=lambda a, s: self.idn)
        self.add_command("*RST", write=lambda a, s: self._reset_cmd())
        self.add_command("*CLS", write=lambda a, s: self._clear_status())
        self.add_command("*OPC", query=lambda a, s: "1", write=lambda a, s: None)
        self.add_command("*WAI", write=lambda a, s: None)
        self.add_command("*ESR", query=lambda a, s: self._read_esr())
        self.add_command("SYSTem:ERRor[:NEXT]", query=lambda a, s: self.pop_error())
        self.add_command("SYSTem:ERRor:COUNt", query=lambda a, s: str(len(self._errors)))

    # -- declaration ---------------------------------------------------------------
    def add_command(
        self, pattern: str, *, query: Handler | None = None, write: Handler | None = None
    ) -> None:
        """Register a header; ``query`` answers ``HEADER?``, ``write`` takes ``HEADER args``."""
        self._commands.append(_Command(pattern, compile_header(pattern), query, write))

    def add_value(
        self,
        pattern: str,
        get: Callable[[], float],
        set_: Callable[[float], None] | None,
        *,
        limits: tuple[float, float],
        default: float | None = None,
        fmt: str = "{:.6E}",
    ) -> None:
        """A numeric setting with ``MIN``/``MAX``/``DEF`` and range checking (-222)."""
        lo, hi = limits

        def query(args: list[str], _s: tuple[int, ...]) -> str:
            if args:
                word = args[0].strip().upper()
                table = {"MIN": lo, "MINIMUM": lo, "MAX": hi, "MAXIMUM": hi}
                if default is not None:
                    table.update({"DEF": default, "DEFAULT": default})
                if word not in table:
                    raise ScpiError(ILLEGAL_PARAMETER, f"{pattern}? {args[0]}")
                return fmt.format(table[word])
            return fmt.format(get())

        def write(args: list[str], _s: tuple[int, ...]) -> None:
            assert set_ is not None
            if not args:
                raise ScpiError(MISSING_PARAMETER, pattern)
            word = args[0].strip().upper()
            named = {"MIN": lo, "MINIMUM": lo, "MAX": hi, "MAXIMUM": hi}
            if default is not None:
                named.update({"DEF": default, "DEFAULT": default})
            value = named[word] if word in named else parse_number(args[0], pattern)
            if not lo <= value <= hi:
                raise ScpiError(DATA_OUT_OF_RANGE, f"{pattern} {value} not in [{lo}, {hi}]")
            set_(value)

        self.add_command(pattern, query=query, write=write if set_ is not None else None)

    # -- behaviour -----------------------------------------------------------------
    def reset(self) -> None:
        """``*RST``: put the instrument in its documented reset state."""

    def push_error(self, error: tuple[int, str], detail: str = "") -> None:
        """Queue an error; the last slot becomes ``-350,"Queue overflow"`` when full."""
        with self.lock:
            text = f"{error[1]}; {detail}" if detail else error[1]
            if len(self._errors) >= self.error_queue_size:
                self._errors[-1] = QUEUE_OVERFLOW
                return
            self._errors.append((error[0], text))

    def pop_error(self) -> str:
        """Oldest queued error as ``code,"message"`` (``0,"No error"`` when empty)."""
        with self.lock:
            code, message = self._errors.popleft() if self._errors else NO_ERROR
        return f'{code:+d},"{message}"' if code else '+0,"No error"'

    def handle_message(self, message: str) -> str | None:
        """Execute one program message (``;``-separated); the joined replies, if any."""
        replies: list[str] = []
        path: list[str] = []
        with self.lock:
            for unit in _split_units(message):
                unit = unit.strip()
                if not unit:
                    continue
                header, _, arg_text = unit.partition(" ")
                if header.startswith(":"):
                    header = header[1:]
                elif not header.startswith("*") and path:
                    header = ":".join([*path, header])
                if not header.startswith("*"):
                    path = header.rstrip("?").split(":")[:-1]
                try:
                    reply = self._execute(header, arg_text)
                except ScpiError as err:
                    self.push_error((err.code, err.message), err.detail)
                    continue
                if reply is not None:
                    replies.append(reply)
        return ";".join(replies) if replies else None

    def _execute(self, header: str, arg_text: str) -> str | None:
        is_query = header.endswith("?")
        bare = header[:-1] if is_query else header
        args = _split_args(arg_text)
        for command in self._commands:
            match = command.regex.fullmatch(bare)
            if match is None:
                continue
            suffixes = tuple(int(g) if g else 1 for g in match.groups())
            handler = command.query if is_query else command.write
            if handler is None:
                kind = "query" if is_query else "command"
                raise ScpiError(UNDEFINED_HEADER, f"{header} has no {kind} form")
            reply = handler(args, suffixes)
            return reply if is_query else None
        raise ScpiError(UNDEFINED_HEADER, header)

    def _reset_cmd(self) -> None:
        self.reset()

    def _clear_status(self) -> None:
        self._errors.clear()
        self.event_status = 0

    def _read_esr(self) -> str:
        value, self.event_status = self.event_status, 0
        return str(value)


def _split_units(message: str) -> list[str]:
    """Split on ``;`` outside quoted strings."""
    return [u for u in re.split(r';(?=(?:[^"]*"[^"]*")*[^"]*$)', message)]


def _split_args(text: str) -> list[str]:
    text = text.strip()
    if not text:
        return []
    return [a.strip() for a in re.split(r',(?=(?:[^"]*"[^"]*")*[^"]*$)', text)]


class ScpiServer(TcpServer):
    """Serves a :class:`ScpiInstrument` over a raw TCP socket, newline-terminated.

    pyvisa reaches it as ``TCPIP::127.0.0.1::<port>::SOCKET`` with ``\\n`` as read
    and write termination.
    """

    def __init__(self, name: str, instrument: ScpiInstrument, terminator: bytes = b"\n") -> None:
        super().__init__(name)
        self.instrument = instrument
        self.terminator = terminator

    @property
    def address(self) -> str:
        """The pyvisa resource name of this server."""
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    def serve(self, conn: Connection) -> None:
        buffer = b""
        while True:
            data = conn.recv()
            if data is None:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                message = line.rstrip(b"\r").decode("ascii", errors="replace")
                reply = self.instrument.handle_message(message)
                if reply is not None and not self._send_reply(conn, reply):
                    return

    def _send_reply(self, conn: Connection, reply: str) -> bool:
        delay, garbage, mute = self.faults.take_reply_fault()
        if mute:
            return True
        if delay:
            time.sleep(delay)
        payload = GARBAGE_REPLY if garbage else reply.encode("ascii")
        return conn.send(payload + self.terminator)
