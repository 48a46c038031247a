"""Parsing SCPI replies: numbers, booleans and the error queue (``SYSTem:ERRor?``).

Shared by the drivers; each wraps the outcome in its own exception classes.  Every
parser takes the reply as the transport decoded it and either returns a value of the
promised type (a *finite* float, an int, a bool) or raises :class:`MalformedReplyError`
(a :class:`ValueError`) whose message quotes the reply.  Python's own ``float()`` is too
lenient for replies: it takes ``nan``, ``inf``, ``1_000`` and non-ASCII digits, and
``1e999`` becomes infinity.

Numbers follow SCPI's <NR1>/<NR2>/<NR3> forms (``+12``, ``-0.5``, ``1.25E-03``),
with surrounding white space allowed.

:func:`harden_reply_parsers` applies the same rules to every parameter of a driver,
including those inherited from upstream QCoDeS drivers (``get_parser=float``): a
driver calls it once at the end of its constructor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_SHOWN = 80
"""Characters of a reply quoted in an error message."""


def _quote(reply: str) -> str:
    shown = reply if len(reply) <= _SHOWN else reply[:_SHOWN]
    more = "" if len(reply) <= _SHOWN else f"... ({len(reply)} characters)"
    return f"{shown!r}{more}"


class MalformedReplyError(ValueError):
    """A reply that is not what the query returns (the message quotes the reply)."""

    def __init__(self, reply: str, expected: str, command: str | None = None) -> None:
        to = f" to {command!r}" if command else ""
        super().__init__(f"reply {_quote(reply)}{to} is not {expected}")
        self.reply = reply
        self.expected = expected
        self.command = command


class MalformedErrorReplyError(MalformedReplyError):
    """A reply to the error query that is not ``<code>,"<message>"``."""

    def __init__(self, reply: str, command: str | None = None) -> None:
        super().__init__(reply, "an error entry '<code>,\"<message>\"'", command)


def parse_number(reply: str, command: str | None = None) -> float:
    """A finite float from an <NR1>/<NR2>/<NR3> reply; :class:`MalformedReplyError` else."""
    text = reply.strip()
    if _NUMBER.fullmatch(text) is None:
        raise MalformedReplyError(reply, "a number", command)
    value = float(text)
    if not math.isfinite(value):
        raise MalformedReplyError(reply, "a finite number", command)
    return value


def parse_int(reply: str, command: str | None = None) -> int:
    """An integer from an <NR1> reply (or an <NR2>/<NR3> one holding a whole number)."""
    text = reply.strip()
    if _INTEGER.fullmatch(text) is not None:
        return int(text)
    value = parse_number(reply, command)
    if not value.is_integer():
        raise MalformedReplyError(reply, "an integer", command)
    return int(value)


def parse_bool(reply: str, command: str | None = None) -> bool:
    """``1``/``ON`` -> True, ``0``/``OFF`` -> False (case-insensitive, white space allowed)."""
    word = reply.strip().upper()
    if word in ("1", "ON"):
        return True
    if word in ("0", "OFF"):
        return False
    raise MalformedReplyError(reply, "a boolean (0/1, ON/OFF)", command)


def parse_error_entry(reply: str, command: str | None = None) -> tuple[int, str]:
    """``-113,"Undefined header"`` -> ``(-113, "Undefined header")``.

    The message may be unquoted; a quoted one has its doubled quotes (``""``) undone.
    A bare code (``0``) is accepted with an empty message.
    """
    code_text, _, message = reply.partition(",")
    code_text = code_text.strip()
    if _INTEGER.fullmatch(code_text) is None:
        raise MalformedErrorReplyError(reply, command)
    message = message.strip()
    if len(message) >= 2 and message[0] == message[-1] == '"':
        message = message[1:-1].replace('""', '"')
    return int(code_text), message


def drain_error_queue(ask: Callable[[str], str], command: str = "SYST:ERR?",
                      max_reads: int = 32) -> tuple[list[tuple[int, str]], bool]:
    """Read and empty the queue: ``([(code, message), ...] oldest first, emptied)``.

    ``emptied`` is False when ``max_reads`` replies came without the ``0`` entry.
    Raises :class:`MalformedErrorReplyError` for a reply that is not an error entry.
    """
    errors: list[tuple[int, str]] = []
    for _ in range(max_reads):
        code, message = parse_error_entry(ask(command), command)
        if code == 0:
            return errors, True
        errors.append((code, message))
    return errors, False


_CONVERSION_ERRORS = (ArithmeticError, IndexError, TypeError, ValueError)
"""What a bare ``float()``/``int()``/``round()`` parser raises on a garbage reply."""


def _parameters(node: Any) -> Iterator[Any]:
    """Every parameter of an instrument and of its channels (each once)."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield from getattr(module, "parameters", {}).values()
        for sub in getattr(module, "submodules", {}).values():
            members = sub if hasattr(sub, "__iter__") and not hasattr(sub, "parameters") \
                else [sub]
            stack.extend(members)


def _accepts(validator: Any, value: Any) -> bool:
    if validator is None:
        return False
    try:
        validator.validate(value)
    except (TypeError, ValueError):
        return False
    return True


def harden_reply_parsers(instrument: Any) -> None:
    """Make every gettable parameter's reply parsing strict (idempotent).

    Each ``get_parser`` (or, without one, the value ``get_cmd`` returns) is wrapped:

    * a conversion error of the parser (``float("abc")``, ``round(float("inf"))``...)
      becomes :class:`MalformedReplyError` quoting the reply;
    * a NaN, or an infinity the parameter's validator does not accept, is refused;
    * for an enumerated parameter without ``val_mapping`` (validator ``Enum``), a value
      outside the enumeration is refused.
    """
    from qcodes import validators as vals

    for parameter in _parameters(instrument):
        inner = getattr(parameter, "get_parser", None)
        if not getattr(parameter, "gettable", False) or getattr(inner, "hardened", False):
            continue
        check_enum = (isinstance(parameter.vals, vals.Enum)
                      and getattr(parameter, "val_mapping", None) is None)
        parameter.get_parser = _hardened(parameter, inner, check_enum)


def _hardened(parameter: Any, inner: Callable[[Any], Any] | None,
              check_enum: bool) -> Callable[[Any], Any]:
    name = parameter.name

    def parse(raw: Any) -> Any:
        reply = raw if isinstance(raw, str) else repr(raw)
        try:
            value = raw if inner is None else inner(raw)
        except MalformedReplyError:
            raise
        except _CONVERSION_ERRORS as err:
            raise MalformedReplyError(
                reply, f"a valid {name!r} reading ({type(err).__name__}: {err})") from None
        if isinstance(value, float) and (
                math.isnan(value) or (math.isinf(value) and not _accepts(parameter.vals, value))):
            raise MalformedReplyError(reply, f"a finite {name!r} reading (it gives {value})")
        if check_enum and not _accepts(parameter.vals, value):
            raise MalformedReplyError(reply, f"a {name!r} reading: one of "
                                             f"{parameter.vals.valid_values}")
        return value

    parse.hardened = True  # type: ignore[attr-defined]
    return parse
