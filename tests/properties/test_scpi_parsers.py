"""Property tests: SCPI reply parsing never crashes with an unrelated exception.

Every gettable parameter of every SCPI driver is read with arbitrary replies (the
transport is replaced by one that answers the drawn text; writes go nowhere).  A
reply either parses to a value of the parameter's type — a *finite* number where a
number is meant, one of the allowed values of an enum — or raises a clear error: a
:class:`ValueError` (the shared parsers' ``MalformedReplyError``), QCoDeS' ``KeyError``
for an unmapped value, or the driver's own error class, whose message shows the reply.
Never an ``OverflowError``, ``TypeError``, ``IndexError``..., never NaN, never a hang.

The reply parsers of :mod:`qkdlab.drivers.scpi_errors` are checked directly too:
valid numbers, integers, booleans and error entries round-trip exactly.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcodes import validators as vals

from qkdlab.drivers.scpi_errors import (
    MalformedErrorReplyError,
    MalformedReplyError,
    drain_error_queue,
    parse_bool,
    parse_error_entry,
    parse_int,
    parse_number,
)
from qkdlab.station import LoadedStation, open_station
from qkdlab.testing.state import _submodules

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None)

STATION = textwrap.dedent("""\
    instruments:
      laser: {type: qkdlab.drivers.thorlabs.itc4001.ThorlabsITC4001,
              address: "mock://thorlabs/itc4001"}
      pattern: {type: qkdlab.drivers.fpga.pattern_generator.FPGAPatternGenerator,
                address: "mock://fpga/pattern_generator"}
      modulator: {type: qkdlab.drivers.thorlabs.mbx.ThorlabsMBX, address: "mock://thorlabs/mbx"}
      tagger: {type: qkdlab.drivers.idquantique.time_controller.IDQTimeController,
               address: "mock://idquantique/id1000"}
      meter: {type: qkdlab.drivers.thorlabs.pm100d.ThorlabsPM100D,
              address: "mock://thorlabs/pm100d", init: {settle_s: 0}}
      spad: {type: qkdlab.drivers.idquantique.id120.IDQID120, address: "mock://idquantique/id120"}
      awg: {type: qkdlab.drivers.keysight.awg33500b.Keysight33500BPattern,
            address: "mock://keysight/33500b"}
    """)

MAX_QUERIES_PER_GET = 200
"""A get asking more often than this on garbage replies is looping (a hang)."""

SPECIAL = ["", " ", "nan", "NaN", "inf", "-inf", "+INF", "1e999", "-1e999", "1_000", "٣",
           "0x10", "1,2", "ON", "OFF", "TRUE", "FALSE", "9.9E37", "9.91E+37", '+0,"No error"',
           "1.5.2", "--1", "e5", "1e", ".", "+", "\x00", "1\x00", "\n", '"quoted"', "CURR",
           "POW", "1.0E-02V", "500mV", "1234TB", "NORM", "1e308", "-0", "00000001"]

REPLIES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(SPECIAL),
    st.from_regex(r"[ ]?[+-]?[0-9]{0,4}\.?[0-9]{0,4}([eE][+-]?[0-9]{1,3})?[a-zA-Z]{0,3}[ ]?",
                  fullmatch=True),
    st.floats().map(repr),
    st.floats().map(lambda x: f"{x:E}"),
    st.integers(-(2**70), 2**70).map(str),
    st.binary(max_size=16).map(lambda b: b.decode("latin-1")),
)


@pytest.fixture(autouse=True)
def _close_all_instruments() -> None:
    """Overrides the suite's per-test close: the instruments here live for the module."""


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedStation]:
    path = tmp_path_factory.mktemp("scpi") / "scpi.yaml"
    path.write_text(STATION)
    with open_station(path) as loaded:
        yield loaded
        for instrument in loaded.instruments.values():  # the real transport again
            for attribute in ("ask_raw", "write_raw"):
                vars(instrument).pop(attribute, None)


class Replier:
    """Stands in for an instrument's transport: every query gets ``reply``."""

    def __init__(self) -> None:
        self.reply = ""
        self.queries = 0

    def ask_raw(self, cmd: str) -> str:
        self.queries += 1
        if self.queries > MAX_QUERIES_PER_GET:
            raise AssertionError(f"more than {MAX_QUERIES_PER_GET} queries for one get "
                                 f"(last {cmd!r}): a loop on the reply {self.reply!r}")
        return self.reply

    def write_raw(self, cmd: str) -> None:
        pass


def gettable_parameters(instrument: Any) -> dict[str, Any]:
    """Every gettable parameter of an instrument and its channels, by path."""
    out: dict[str, Any] = {}
    for path, module in [("", instrument), *_submodules(instrument)]:
        for name, parameter in module.parameters.items():
            if parameter.gettable and name not in ("IDN", "timeout"):
                out[f"{path}.{name}" if path else name] = parameter
    return out


def _first_message(err: BaseException) -> str:
    return str(err.args[0]) if err.args else ""


def _alnum(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def _mentions_reply(message: str, reply: str) -> bool:
    """The message shows the reply: the first letters and digits of it, if it has any
    (leading zeros aside: a parser may show the number it read).  Python's bare
    "cannot convert float NaN to integer" shows no reply: not a clear error."""
    if not message or re.match(r"cannot convert float (NaN|infinity)", message):
        return False
    shown = _alnum(message)
    return any(_alnum(form).lstrip("0")[:6] in shown
               for form in (reply, repr(reply)[1:-1], ascii(reply)[1:-1]))


def _check_value(path: str, parameter: Any, value: Any, reply: str) -> None:
    where = f"{path} from reply {reply!r} gave {value!r}"
    if isinstance(value, float):
        assert math.isfinite(value) or (math.isinf(value) and parameter.vals is not None
                                        and _accepts(parameter.vals, value)), where
    validator = parameter.vals
    if isinstance(validator, vals.Numbers):
        assert isinstance(value, int | float), where
        assert not isinstance(value, bool), where
    elif isinstance(validator, vals.Ints):
        assert isinstance(value, int), where
        assert not isinstance(value, bool), where
    elif isinstance(validator, vals.Bool):
        assert isinstance(value, bool), where
    elif isinstance(validator, vals.Enum):
        assert _accepts(validator, value), where
    else:
        assert isinstance(value, str | int | float | bool | dict | list | tuple), where


def _accepts(validator: Any, value: Any) -> bool:
    try:
        validator.validate(value)
    except (TypeError, ValueError):
        return False
    return True


def _driver_errors(instrument: Any) -> tuple[type[BaseException], ...]:
    """The driver's own exception classes (those defined in its module)."""
    import sys

    module = sys.modules[type(instrument).__module__]
    return tuple(v for v in vars(module).values()
                 if isinstance(v, type) and issubclass(v, Exception)
                 and v.__module__ == module.__name__)


@pytest.mark.parametrize("name", ["laser", "pattern", "modulator", "tagger", "meter", "spad",
                                  "awg"])
def test_any_reply_parses_or_raises_a_clear_error(bench: LoadedStation, name: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # upstream PM100D's power read sleeps 0.2 s
    monkeypatch.setattr("qcodes_contrib_drivers.drivers.Thorlabs.PM100D.sleep", lambda _s: None)
    instrument = bench.instruments[name]
    parameters = gettable_parameters(instrument)
    if name == "awg":  # channel 2 is channel 1's code again
        parameters = {p: v for p, v in parameters.items() if not p.startswith("ch2.")}
    assert len(parameters) >= 5
    replier = Replier()
    allowed = (ValueError, KeyError, *_driver_errors(instrument))
    instrument.ask_raw = replier.ask_raw  # type: ignore[method-assign]
    instrument.write_raw = replier.write_raw  # type: ignore[method-assign]
    try:
        for path, parameter in parameters.items():
            check_parameter(path, parameter, replier, allowed)
    finally:
        del instrument.ask_raw, instrument.write_raw


def check_parameter(path: str, parameter: Any, replier: Replier,
                    allowed: tuple[type[BaseException], ...]) -> None:
    def check_one(reply: str) -> None:
        replier.reply, replier.queries = reply, 0
        try:
            value = parameter.get()
        except allowed as err:
            message = _first_message(err)
            assert _mentions_reply(message, reply), (
                f"{path}: error for reply {reply!r} does not show it: {message!r}")
            return
        _check_value(path, parameter, value, reply)

    for reply in SPECIAL:  # every known trap, on every parameter
        check_one(reply)

    @SETTINGS
    @given(reply=REPLIES)
    def check(reply: str) -> None:
        check_one(reply)

    check()


# -- the shared parsers, directly ----------------------------------------------------------
@FAST
@given(st.floats(allow_nan=False, allow_infinity=False),
       st.sampled_from(["{:.16E}", "{:+.16e}", "{!r}", "{:.17g}", "  {!r}\t"]))
def test_numbers_round_trip(x: float, fmt: str) -> None:
    assert parse_number(fmt.format(x)) == x


@FAST
@given(st.integers(-(10**30), 10**30), st.sampled_from(["{}", "{:+d}", " {} "]))
def test_integers_round_trip(n: int, fmt: str) -> None:
    assert parse_int(fmt.format(n)) == n


@FAST
@given(REPLIES)
def test_number_parsers_return_finite_values_or_malformed_reply(reply: str) -> None:
    for parse in (parse_number, parse_int, parse_bool):
        outcome: Any
        try:
            outcome = parse(reply, "MEAS?")
        except MalformedReplyError as err:
            outcome = err
        if isinstance(outcome, MalformedReplyError):
            assert outcome.reply == reply
            assert "'MEAS?'" in str(outcome)
        elif parse is parse_bool:
            assert isinstance(outcome, bool)
        else:
            assert isinstance(outcome, int | float)
            assert math.isfinite(outcome)
            assert float(outcome) == float(reply.strip())  # what the text says, no rounding


@pytest.mark.parametrize("reply", ["nan", "inf", "-INF", "1e999", "1_000", "٣", "0x10", "",
                                   "1.5.2", "12 V"])
def test_parse_number_refuses_what_python_float_would_bend(reply: str) -> None:
    with pytest.raises(MalformedReplyError, match=r"is not a (finite )?number"):
        parse_number(reply)


MESSAGES = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)


@FAST
@given(st.lists(st.tuples(st.integers(-999, 999).filter(bool), MESSAGES), max_size=6),
       st.integers(1, 8))
def test_error_queue_round_trips(entries: list[tuple[int, str]], max_reads: int) -> None:
    """SCPI strings double their inner quotes; entries come back exactly, in order."""
    replies = [f'{code:+d},"{message.replace(chr(34), chr(34) * 2)}"'
               for code, message in entries] + ['+0,"No error"']
    asked: list[str] = []

    def ask(command: str) -> str:
        asked.append(command)
        return replies[len(asked) - 1]

    errors, emptied = drain_error_queue(ask, "SYST:ERR?", max_reads)
    n = min(len(entries), max_reads)
    assert errors == entries[:n]
    assert emptied == (len(entries) < max_reads)
    assert asked == ["SYST:ERR?"] * min(len(replies), max_reads)


@FAST
@given(st.lists(REPLIES, min_size=1, max_size=5))
def test_error_queue_never_crashes_on_garbage(replies: list[str]) -> None:
    it = iter(replies * 8)
    bad = next((r for r in replies if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", r.partition(",")[0])),
               None)
    first_zero = next((i for i, r in enumerate(replies)
                       if re.fullmatch(r"\s*[+-]?0+\s*", r.partition(",")[0])), len(replies))
    if bad is not None and replies.index(bad) < first_zero:
        with pytest.raises(MalformedErrorReplyError, match=r"'SYST:ERR\?'") as caught:
            drain_error_queue(lambda _c: next(it), max_reads=len(replies))
        assert caught.value.reply == bad
        return
    errors, emptied = drain_error_queue(lambda _c: next(it), max_reads=len(replies))
    assert [code for code, _ in errors] == [int(r.partition(",")[0])
                                            for r in replies[:first_zero]]
    assert all(isinstance(c, int) and c != 0 and isinstance(m, str) for c, m in errors)
    assert len(errors) <= len(replies)
    assert emptied == (len(errors) < len(replies))


def test_error_entry_forms() -> None:
    assert parse_error_entry('-113,"Undefined header"') == (-113, "Undefined header")
    assert parse_error_entry('+0,"No error"') == (0, "No error")
    assert parse_error_entry("0") == (0, "")
    assert parse_error_entry('-222,"Data out of range; ""CURR"" 5"') == (
        -222, 'Data out of range; "CURR" 5')
    for bad in ("", "No error", "1_0,\"x\"", "٣,\"x\"", "nan,x", "+,x"):
        with pytest.raises(MalformedErrorReplyError, match=r"is not an error entry"):
            parse_error_entry(bad)


