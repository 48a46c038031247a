r"""Mock Keysight 33500B / 33600A Trueform generator (33512B, 33522B, 33622A).

Command set after the *Keysight Trueform Series Operating and Service Guide*
(part 33500-90901, "SCPI Programming Reference"; see the driver
``qkdlab.drivers.keysight.awg33500b`` for how its facts were sourced).  Modelled:
everything QCoDeS' ``Keysight33522B`` sends at construction and for its parameters,
plus the arbitrary-waveform commands of the pattern driver.  ``<n>`` is the channel
(1 or 2, default 1); every header takes its long and short forms.

=====================================================  ================================
Header                                                 notes
=====================================================  ================================
``*IDN?`` ``*RST`` ``*CLS`` ``*OPC`` ``SYST:ERR?``     built in (ScpiInstrument)
``*OPT?``                                              ``0`` or e.g. ``MEM``
``*TRG``, ``[SOURce<n>:]PHASe:SYNChronize``            accepted
``[SOURce<n>:]FUNCtion``                               SIN SQU TRI RAMP PULS PRBS NOIS ARB DC
``[SOURce<n>:]FREQuency``, ``:MODE``, ``PHASe``        model's sine limit
``[SOURce<n>:]VOLTage``, ``:OFFSet``, ``:UNIT``        load-dependent limits, see below
``[SOURce<n>:]VOLTage:LIMit:HIGH|LOW|STATe``           enforced while STATe ON
``OUTPut<n>``, ``:LOAD``, ``:POLarity``                1 Ω…10 kΩ or INF
``OUTPut[<n>]:SYNC``, ``OUTPut:SYNC:SOURce``
``[SOURce<n>:]FUNCtion:RAMP:SYMMetry``, ``:PULSe:WIDTh``
``TRIGger<n>:SOURce|SLOPe|COUNt|DELay|TIMer``
``[SOURce<n>:]BURSt:STATe|MODE|NCYCles|PHASe``,
``:GATE:POLarity``, ``:INTernal:PERiod``
``FORMat:BORDer NORMal|SWAPped``                       byte order of binary blocks
``[SOURce<n>:]DATA:ARBitrary:DAC <name>,<codes>``      int16 block or ASCII list, ±32767
``[SOURce<n>:]DATA:ARBitrary <name>,<values>``         float32 block or ASCII, ±1
``[SOURce<n>:]DATA:VOLatile:CLEar|CATalog?|FREE?``
``[SOURce<n>:]DATA:ATTRibute:POINts? [<name>]``
``[SOURce<n>:]FUNCtion:ARBitrary``, ``:SRATe``,
``:FILTer``, ``:PTPeak``
``MMEMory:STORe:DATA<n> "<file>.arb"``                 kept in :attr:`MockKeysight33500B.files`
=====================================================  ================================

Binary blocks: pyvisa sends ``header,#<n><len><bytes>\n`` and the bytes contain
``\n``; the framework's :class:`ScpiServer` splits on ``\n``, so this module has
:class:`BlockScpiServer` (framing by IEEE-488.2 definite-length blocks) and
:class:`BlockScpiInstrument` (handlers fetch a block's bytes with
:meth:`BlockScpiInstrument.take_block`).  Both belong in the framework.

Mock choices (the guide leaves them to the hardware, or they could not be checked):

* A setting outside its range queues ``-222,"Data out of range"`` and is not applied
  (the real unit clips some values instead); an amplitude/offset pair outside the
  output limits or the armed voltage limits queues ``-221,"Settings conflict"``.
* Output limits at the set load R: Vpp in [2 mV, 20 V]·k and |offset| + Vpp/2 ≤ 10 V·k
  with k = R/(R + 50 Ω) (1 for INF), i.e. 1 mVpp…10 Vpp, ±5 V into 50 Ω.  Changing
  ``OUTP:LOAD`` rescales the displayed amplitude and offset by k_new/k_old.
* ``DATA:VOL:CAT?`` lists the built-in default ``"INT:\BUILTIN\EXP_RISE.ARB"`` first,
  then each downloaded name, quoted, comma-separated; ``DATA:VOL:CLE`` keeps only the
  default and selects it.  Uploading to a name already in memory queues -221.
* ``*RST`` restores the defaults below, switches outputs off and selects the default
  arb; downloaded arbs stay in volatile memory.

Physics (intensity-modulator drive).  When a ``bench`` is given, the pattern
channel (``channel`` option, default 1) drives Alice's modulator, and
:meth:`MockKeysight33500B._push_to_bench` (the only code that touches the bench)
writes ``bench.alice.drive_v`` — the drive (V) of the intensity classes (signal,
decoy, vacuum) = (0, 1, 2) of DESIGN.md — with this mapping:

* the distinct DAC codes of the playing arb become voltages at the modulator,
  ``V = offset ± code/32767·Vpp/2`` (− with ``OUTP:POL INV``), times
  k(actual)/k(set) when the real termination (``load_ohm`` option, default 50 Ω)
  differs from ``OUTP:LOAD``;
* sorted ascending, the lowest is the signal class, the highest the vacuum class and
  the second lowest the decoy class (with two levels the decoy gets the high one,
  with one level every class gets it).  This is the driver's convention that symbol
  value k = intensity class k with ``levels_v`` ascending, as for the bench default
  (0 V, ≈2.83 V, Vπ) at zero bias: more drive, less light;
* output off: 0 V for every class; output on with a function other than ARB (or
  with the built-in default arb, whose shape is not modelled): the offset (the mean
  level) for every class.

The bench keeps its configured ``drive_v`` until the pattern channel's output is
first switched on; from then on every change is pushed.
"""

from __future__ import annotations

import contextlib
import math
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from qkdlab.mock_instruments.server.scpi import (
    DATA_OUT_OF_RANGE,
    EXECUTION_ERROR,
    ILLEGAL_PARAMETER,
    MISSING_PARAMETER,
    SETTINGS_CONFLICT,
    UNDEFINED_HEADER,
    ScpiError,
    ScpiInstrument,
    ScpiServer,
    parse_bool,
    parse_number,
)
from qkdlab.mock_instruments.server.tcp import Connection

BLOCK_DATA_ERROR = (-161, "Invalid block data")
DAC_FULL_SCALE = 32767
SOURCE_IMPEDANCE_OHM = 50.0
MAX_OPEN_CIRCUIT_PEAK_V = 10.0
MIN_OPEN_CIRCUIT_VPP = 2e-3
DEFAULT_ARB = "INT:\\BUILTIN\\EXP_RISE.ARB"
INF_REPLY = 9.9e37
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,11}")


@dataclass(frozen=True)
class MockModel:
    """Per-model numbers of the mock (see the driver's MODELS for sources)."""

    max_frequency_hz: float
    max_sample_rate_hz: float
    min_points: int
    standard_points: int
    extended_points: int


MODELS: dict[str, MockModel] = {
    "33512B": MockModel(20e6, 160e6, 8, 1_048_576, 16_777_216),
    "33522B": MockModel(30e6, 250e6, 8, 1_048_576, 16_777_216),
    "33622A": MockModel(120e6, 1e9, 32, 4_194_304, 67_108_864),
}


def load_factor(load_ohm: float) -> float:
    """R/(R + 50 Ω): the part of the open-circuit voltage a load R sees (1 for ∞)."""
    return 1.0 if math.isinf(load_ohm) else load_ohm / (load_ohm + SOURCE_IMPEDANCE_OHM)


def _num(value: float) -> str:
    """A number as the 33500B replies (``+1.000000000000000E+03``)."""
    if math.isinf(value):
        value = INF_REPLY
    return f"{value:+.15E}"


def _words(*spec: str) -> dict[str, str]:
    """``"SINusoid"`` -> {"SIN": "SIN", "SINUSOID": "SIN"} (reply = short form)."""
    table: dict[str, str] = {}
    for word in spec:
        short = "".join(c for c in word if c.isupper() or c.isdigit())
        table[short] = short
        table[word.upper()] = short
    return table


# ---------------------------------------------------------------- binary-block framing


class BlockFramer:
    r"""Split a byte stream into SCPI messages, honouring IEEE-488.2 definite blocks.

    ``#<n><len>`` (n = 1…9 digits giving len) starts a block of exactly ``len``
    bytes that may contain ``\n``; a ``\n`` outside blocks and quoted strings ends
    the message.  Each block is replaced in the message text by the placeholder
    ``\x00<index>`` and returned beside it.  ``#`` followed by anything else (``#H1F``
    numbers, garbage) stays text.  Work per received chunk is linear in its size.
    """

    PLACEHOLDER = "\x00{}"

    def __init__(self, max_block_bytes: int = 2 * 67_108_864 * 4) -> None:
        self.max_block_bytes = max_block_bytes
        self._pending = bytearray()
        self._text = bytearray()
        self._blocks: list[bytes] = []
        self._block = bytearray()
        self._remaining = 0
        self._in_block = False
        self._quote: int | None = None

    def feed(self, data: bytes) -> list[tuple[str, list[bytes]]]:
        """Consume ``data``; every message completed by it, as ``(text, blocks)``."""
        self._pending += data
        buf = self._pending
        done: list[tuple[str, list[bytes]]] = []
        pos = 0
        while pos < len(buf):
            if self._in_block:
                take = min(self._remaining, len(buf) - pos)
                self._block += buf[pos : pos + take]
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._close_block()
                continue
            if self._quote is not None:
                end = self._find(buf, pos, (self._quote, 0x0A))
                if end < 0:
                    self._text += buf[pos:]
                    pos = len(buf)
                    break
                if buf[end] == 0x0A:  # unterminated string: the newline still ends it
                    self._text += buf[pos:end]
                    done.append(self._emit())
                else:
                    self._text += buf[pos : end + 1]
                    self._quote = None
                pos = end + 1
                continue
            end = self._find(buf, pos, (0x0A, 0x23, 0x22, 0x27))  # \n # " '
            if end < 0:
                self._text += buf[pos:]
                pos = len(buf)
                break
            self._text += buf[pos:end]
            char = buf[end]
            if char == 0x0A:
                done.append(self._emit())
                pos = end + 1
            elif char in (0x22, 0x27):
                self._text.append(char)
                self._quote = char
                pos = end + 1
            else:  # '#'
                started = self._start_block(buf, end)
                if started is None:  # header not complete yet: wait for more bytes
                    pos = end
                    break
                pos = started
        del buf[:pos]
        return done

    @staticmethod
    def _find(buf: bytearray, start: int, chars: tuple[int, ...]) -> int:
        hits = [i for i in (buf.find(bytes([c]), start) for c in chars) if i >= 0]
        return min(hits) if hits else -1

    def _start_block(self, buf: bytearray, at: int) -> int | None:
        """Position after a block header at ``at``, or after a plain ``#``; None = wait."""
        if at + 1 >= len(buf):
            return None
        digit = buf[at + 1]
        if not 0x31 <= digit <= 0x39:
            self._text.append(0x23)
            return at + 1
        n_digits = digit - 0x30
        if at + 2 + n_digits > len(buf):
            return None
        length_text = bytes(buf[at + 2 : at + 2 + n_digits])
        if not length_text.isdigit() or int(length_text) > self.max_block_bytes:
            self._text.append(0x23)
            return at + 1
        self._remaining = int(length_text)
        self._in_block = True
        self._block = bytearray()
        if self._remaining == 0:
            self._close_block()
        return at + 2 + n_digits

    def _close_block(self) -> None:
        self._text += self.PLACEHOLDER.format(len(self._blocks)).encode("ascii")
        self._blocks.append(bytes(self._block))
        self._block = bytearray()
        self._in_block = False

    def _emit(self) -> tuple[str, list[bytes]]:
        text = self._text.decode("ascii", errors="replace").rstrip("\r")
        blocks = self._blocks
        self._text = bytearray()
        self._blocks = []
        self._quote = None
        return text, blocks


class BlockScpiInstrument(ScpiInstrument):
    """A :class:`ScpiInstrument` whose handlers can receive binary blocks."""

    def __init__(self) -> None:
        super().__init__()
        self._blocks: list[bytes] = []

    def handle_block_message(self, message: str, blocks: list[bytes]) -> str | None:
        """:meth:`handle_message` with ``blocks`` available to :meth:`take_block`."""
        with self.lock:
            self._blocks = blocks
            try:
                return self.handle_message(message)
            finally:
                self._blocks = []

    def take_block(self, arg: str) -> bytes | None:
        """The bytes of the block an argument stands for, or None if it is not one."""
        if not arg.startswith("\x00"):
            return None
        try:
            return self._blocks[int(arg[1:])]
        except (ValueError, IndexError):
            raise ScpiError(BLOCK_DATA_ERROR, "stray block placeholder") from None


def _ack_now(conn: Connection) -> None:
    """Acknowledge received data at once (Linux ``TCP_QUICKACK``, re-armed per read).

    pyvisa-py does not set ``TCP_NODELAY`` on SOCKET sessions, so a query right
    after a write waits for the ACK of the write; with the peer's delayed ACK that
    is ~40 ms per write-then-query.  Quick ACKs keep the mock fast.
    """
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is not None:
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.IPPROTO_TCP, option, 1)


class BlockScpiServer(ScpiServer):
    """:class:`ScpiServer` that frames messages by IEEE-488.2 definite-length blocks."""

    instrument: BlockScpiInstrument

    def __init__(self, name: str, instrument: BlockScpiInstrument) -> None:
        super().__init__(name, instrument)

    def serve(self, conn: Connection) -> None:
        framer = BlockFramer()
        while True:
            data = conn.recv()
            if data is None:
                return
            if not data:
                continue
            _ack_now(conn)
            for message, blocks in framer.feed(data):
                reply = self.instrument.handle_block_message(message, blocks)
                if reply is not None and not self._send_reply(conn, reply):
                    return


# ---------------------------------------------------------------- the instrument


@dataclass
class ChannelState:
    """One output channel (values as displayed, i.e. at the set load)."""

    function: str = "SIN"
    frequency_hz: float = 1e3
    frequency_mode: str = "CW"
    phase_deg: float = 0.0
    amplitude_vpp: float = 0.1
    offset_v: float = 0.0
    unit: str = "VPP"
    output: bool = False
    load_ohm: float = 50.0
    polarity: str = "NORM"
    ramp_symmetry_pct: float = 100.0
    pulse_width_s: float = 1e-4
    trigger_source: str = "IMM"
    trigger_slope: str = "POS"
    trigger_count: float = 1.0
    trigger_delay_s: float = 0.0
    trigger_timer_s: float = 1e-3
    burst_state: bool = False
    burst_mode: str = "TRIG"
    burst_ncycles: float = 1.0
    burst_phase_deg: float = 0.0
    burst_gate_polarity: str = "NORM"
    burst_period_s: float = 1e-2
    arb: str = DEFAULT_ARB
    arb_sample_rate_hz: float = 40e3
    arb_filter: str = "NORM"
    limit_high_v: float = 5.0
    limit_low_v: float = -5.0
    limit_on: bool = False
    volatile: dict[str, npt.NDArray[np.int16]] = field(default_factory=dict)


_RESET_FIELDS = [f.name for f in fields(ChannelState) if f.name != "volatile"]


class MockKeysight33500B(BlockScpiInstrument):
    """SCPI twin of a two-channel Trueform generator (see the module docstring).

    Args:
        bench: optional bench model; the pattern channel's drive goes to
            ``bench.alice.drive_v``.
        model: ``33512B``, ``33522B`` (default) or ``33622A``.
        options: installed options as ``*OPT?`` lists them (``"MEM"`` = large memory).
        channel: the channel wired to the intensity modulator.
        load_ohm: the modulator's real termination (Ω; ``math.inf`` = open).

    Attributes (thread-safe under :attr:`lock`): ``channels`` (1 and 2),
    ``byte_order`` (``NORM``/``SWAP``), ``files`` (``MMEM:STOR:DATA`` results),
    ``bench_pushes`` (every ``drive_v`` written, in order).
    """

    def __init__(
        self,
        bench: Any = None,
        *,
        model: str = "33522B",
        options: str = "",
        serial: str = "MY00000001",
        channel: int = 1,
        load_ohm: float = 50.0,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted(MODELS))}")
        if channel not in (1, 2):
            raise ValueError(f"channel must be 1 or 2, got {channel}")
        super().__init__()
        self.bench = bench
        self.model = model
        self.spec = MODELS[model]
        self.option_list = tuple(o.strip().upper() for o in options.split(",") if o.strip())
        self.idn = f"Keysight Technologies,{model},{serial},A.03.00-3.15-2.00-58-00"
        self.pattern_channel = channel
        self.actual_load_ohm = load_ohm
        self.memory_points = (
            self.spec.extended_points if "MEM" in self.option_list else self.spec.standard_points
        )
        self.channels = {1: ChannelState(), 2: ChannelState()}
        self.byte_order = "NORM"
        self.sync_output = True
        self.sync_source = "CH1"
        self.files: dict[str, npt.NDArray[np.int16]] = {}
        self.triggers = 0
        self.bench_pushes: list[tuple[float, float, float]] = []
        self._bench_armed = False
        self._register()

    # -- helpers -----------------------------------------------------------------------
    def _ch(self, suffix: tuple[int, ...]) -> ChannelState:
        n = suffix[0] if suffix else 1
        if n not in self.channels:
            raise ScpiError(UNDEFINED_HEADER, f"channel {n} does not exist")
        return self.channels[n]

    def _value(
        self,
        pattern: str,
        attr: str,
        limits: tuple[float, float],
        *,
        extra: Mapping[str, float] | None = None,
        check: Callable[[ChannelState, float], None] | None = None,
    ) -> None:
        """A per-channel number with MIN/MAX (and ``extra`` words such as INF)."""
        lo, hi = limits
        words = {"MIN": lo, "MINIMUM": lo, "MAX": hi, "MAXIMUM": hi, **(extra or {})}

        def query(args: list[str], suffix: tuple[int, ...]) -> str:
            if args:
                word = args[0].strip().upper()
                if word not in words:
                    raise ScpiError(ILLEGAL_PARAMETER, f"{pattern}? {args[0]}")
                return _num(words[word])
            return _num(getattr(self._ch(suffix), attr))

        def write(args: list[str], suffix: tuple[int, ...]) -> None:
            if not args:
                raise ScpiError(MISSING_PARAMETER, pattern)
            word = args[0].strip().upper()
            value = words[word] if word in words else parse_number(args[0], pattern)
            if not (lo <= value <= hi or word in (extra or {})):
                raise ScpiError(DATA_OUT_OF_RANGE, f"{pattern} {value:g} not in [{lo:g}, {hi:g}]")
            ch = self._ch(suffix)
            if check is not None:
                check(ch, value)
            setattr(ch, attr, value)

        self.add_command(pattern, query=query, write=write)

    def _choice(self, pattern: str, attr: str, table: dict[str, str]) -> None:
        """A per-channel keyword setting; replies with the short form."""

        def query(_a: list[str], suffix: tuple[int, ...]) -> str:
            return str(getattr(self._ch(suffix), attr))

        def write(args: list[str], suffix: tuple[int, ...]) -> None:
            if not args:
                raise ScpiError(MISSING_PARAMETER, pattern)
            word = args[0].strip().upper()
            if word not in table:
                raise ScpiError(ILLEGAL_PARAMETER, f"{pattern} {args[0]}")
            setattr(self._ch(suffix), attr, table[word])

        self.add_command(pattern, query=query, write=write)

    def _flag(self, pattern: str, attr: str) -> None:
        """A per-channel ON/OFF setting; replies ``1``/``0``."""

        def query(_a: list[str], suffix: tuple[int, ...]) -> str:
            return "1" if getattr(self._ch(suffix), attr) else "0"

        def write(args: list[str], suffix: tuple[int, ...]) -> None:
            if not args:
                raise ScpiError(MISSING_PARAMETER, pattern)
            setattr(self._ch(suffix), attr, parse_bool(args[0], pattern))

        self.add_command(pattern, query=query, write=write)

    # -- command table -------------------------------------------------------------------
    def _register(self) -> None:
        spec = self.spec
        self.add_command("*OPT", query=lambda a, s: ",".join(self.option_list) or "0")
        self.add_command("*TRG", write=lambda a, s: self._count_trigger())
        self.add_command("[SOURce<n>:]PHASe:SYNChronize", write=lambda a, s: None)
        self.add_command("FORMat:BORDer", query=lambda a, s: self.byte_order,
                         write=self._write_border)
        # function and frequency ([Guide] FUNCtion, FREQuency, PHASe)
        self._choice("[SOURce<n>:]FUNCtion[:SHAPe]", "function",
                     _words("SINusoid", "SQUare", "TRIangle", "RAMP", "PULSe", "PRBS",
                            "NOISe", "ARB", "DC"))
        self._value("[SOURce<n>:]FREQuency[:CW]", "frequency_hz", (1e-6, spec.max_frequency_hz))
        self._choice("[SOURce<n>:]FREQuency:MODE", "frequency_mode",
                     _words("CW", "LIST", "SWEep", "FIXed"))
        self._value("[SOURce<n>:]PHASe", "phase_deg", (-360.0, 360.0))
        self._value("[SOURce<n>:]FUNCtion:RAMP:SYMMetry", "ramp_symmetry_pct", (0.0, 100.0))
        self._value("[SOURce<n>:]FUNCtion:PULSe:WIDTh", "pulse_width_s", (16e-9, 1e6))
        # voltages ([Guide] SOURce:VOLTage subsystem)
        self._choice("[SOURce<n>:]VOLTage:UNIT", "unit", _words("VPP", "VRMS", "DBM"))
        self.add_command("[SOURce<n>:]VOLTage[:LEVel][:IMMediate][:AMPLitude]",
                         query=self._query_amplitude, write=self._write_amplitude)
        self.add_command("[SOURce<n>:]FUNCtion:ARBitrary:PTPeak",
                         query=self._query_amplitude, write=self._write_amplitude)
        self.add_command("[SOURce<n>:]VOLTage[:LEVel][:IMMediate]:OFFSet",
                         query=self._query_offset, write=self._write_offset)
        self._value("[SOURce<n>:]VOLTage:LIMit:HIGH", "limit_high_v", (-10.0, 10.0))
        self._value("[SOURce<n>:]VOLTage:LIMit:LOW", "limit_low_v", (-10.0, 10.0))
        self.add_command("[SOURce<n>:]VOLTage:LIMit:STATe", query=self._query_limit_state,
                         write=self._write_limit_state)
        # outputs ([Guide] OUTPut subsystem)
        self.add_command("OUTPut<n>[:STATe]", query=self._query_output,
                         write=self._write_output)
        self.add_command("OUTPut<n>:LOAD", query=self._query_load, write=self._write_load)
        self._choice("OUTPut<n>:POLarity", "polarity", _words("NORMal", "INVerted"))
        self.add_command("OUTPut<n>:SYNC[:STATe]",
                         query=lambda a, s: "1" if self.sync_output else "0",
                         write=self._write_sync)
        self.add_command("OUTPut:SYNC:SOURce", query=lambda a, s: self.sync_source,
                         write=self._write_sync_source)
        # trigger ([Guide] TRIGger subsystem)
        self._choice("TRIGger<n>:SOURce", "trigger_source",
                     _words("IMMediate", "EXTernal", "TIMer", "BUS"))
        self._choice("TRIGger<n>:SLOPe", "trigger_slope", _words("POSitive", "NEGative"))
        self._value("TRIGger<n>:COUNt", "trigger_count", (1.0, 1e6),
                    extra={"INF": math.inf, "INFINITY": math.inf})
        self._value("TRIGger<n>:DELay", "trigger_delay_s", (0.0, 1000.0))
        self._value("TRIGger<n>:TIMer", "trigger_timer_s", (1e-6, 8000.0))
        # burst ([Guide] BURSt subsystem)
        self._flag("[SOURce<n>:]BURSt:STATe", "burst_state")
        self._choice("[SOURce<n>:]BURSt:MODE", "burst_mode", _words("TRIGgered", "GATed"))
        self._value("[SOURce<n>:]BURSt:NCYCles", "burst_ncycles", (1.0, 1e8),
                    extra={"INF": math.inf, "INFINITY": math.inf})
        self._value("[SOURce<n>:]BURSt:PHASe", "burst_phase_deg", (-360.0, 360.0))
        self._choice("[SOURce<n>:]BURSt:GATE:POLarity", "burst_gate_polarity",
                     _words("NORMal", "INVerted"))
        self._value("[SOURce<n>:]BURSt:INTernal:PERiod", "burst_period_s", (1e-6, 8000.0))
        # arbitrary waveforms ([Guide] DATA, FUNCtion:ARBitrary, MMEMory)
        self.add_command("[SOURce<n>:]DATA:ARBitrary:DAC", write=self._write_dac)
        self.add_command("[SOURce<n>:]DATA:ARBitrary", write=self._write_arb_float)
        self.add_command("[SOURce<n>:]DATA:VOLatile:CLEar", write=self._clear_volatile)
        self.add_command("[SOURce<n>:]DATA:VOLatile:CATalog", query=self._catalog)
        self.add_command("[SOURce<n>:]DATA:VOLatile:FREE",
                         query=lambda a, s: str(self.free_points(self._ch(s))))
        self.add_command("[SOURce<n>:]DATA:ATTRibute:POINts", query=self._points)
        self.add_command("[SOURce<n>:]FUNCtion:ARBitrary", query=self._query_arb,
                         write=self._select_arb)
        self._value("[SOURce<n>:]FUNCtion:ARBitrary:SRATe", "arb_sample_rate_hz",
                    (1e-6, spec.max_sample_rate_hz))
        self._choice("[SOURce<n>:]FUNCtion:ARBitrary:FILTer", "arb_filter",
                     _words("NORMal", "STEP", "OFF"))
        self.add_command("MMEMory:STORe:DATA<n>", write=self._store_data)

    # -- voltages ------------------------------------------------------------------------
    def _check_output(self, ch: ChannelState, amplitude: float, offset: float,
                      load_ohm: float | None = None) -> None:
        k = load_factor(ch.load_ohm if load_ohm is None else load_ohm)
        lowest, highest = MIN_OPEN_CIRCUIT_VPP * k, 2 * MAX_OPEN_CIRCUIT_PEAK_V * k
        if not lowest * (1 - 1e-9) <= amplitude <= highest * (1 + 1e-9):
            raise ScpiError(DATA_OUT_OF_RANGE, f"amplitude {amplitude:g} Vpp at this load")
        if abs(offset) + amplitude / 2 > MAX_OPEN_CIRCUIT_PEAK_V * k * (1 + 1e-9):
            raise ScpiError(SETTINGS_CONFLICT,
                            f"offset {offset:g} V with {amplitude:g} Vpp exceeds the output")
        if ch.limit_on and (offset + amplitude / 2 > ch.limit_high_v + 1e-9
                            or offset - amplitude / 2 < ch.limit_low_v - 1e-9):
            raise ScpiError(SETTINGS_CONFLICT, "outside the armed voltage limits")

    def _query_amplitude(self, args: list[str], suffix: tuple[int, ...]) -> str:
        ch = self._ch(suffix)
        k = load_factor(ch.load_ohm)
        if args:
            word = args[0].strip().upper()
            if word in ("MIN", "MINIMUM"):
                return _num(MIN_OPEN_CIRCUIT_VPP * k)
            if word in ("MAX", "MAXIMUM"):
                return _num(2 * (MAX_OPEN_CIRCUIT_PEAK_V * k - abs(ch.offset_v)))
            raise ScpiError(ILLEGAL_PARAMETER, f"VOLTage? {args[0]}")
        return _num(ch.amplitude_vpp)

    def _write_amplitude(self, args: list[str], suffix: tuple[int, ...]) -> None:
        ch = self._ch(suffix)
        if not args:
            raise ScpiError(MISSING_PARAMETER, "VOLTage")
        word = args[0].strip().upper()
        k = load_factor(ch.load_ohm)
        if word in ("MIN", "MINIMUM"):
            value = MIN_OPEN_CIRCUIT_VPP * k
        elif word in ("MAX", "MAXIMUM"):
            value = 2 * (MAX_OPEN_CIRCUIT_PEAK_V * k - abs(ch.offset_v))
        else:
            value = parse_number(args[0].split()[0], "VOLTage")
        self._check_output(ch, value, ch.offset_v)
        ch.amplitude_vpp = value

    def _query_offset(self, args: list[str], suffix: tuple[int, ...]) -> str:
        return _num(self._ch(suffix).offset_v)

    def _write_offset(self, args: list[str], suffix: tuple[int, ...]) -> None:
        ch = self._ch(suffix)
        if not args:
            raise ScpiError(MISSING_PARAMETER, "VOLTage:OFFSet")
        value = parse_number(args[0], "VOLTage:OFFSet")
        self._check_output(ch, ch.amplitude_vpp, value)
        ch.offset_v = value

    def _query_limit_state(self, _a: list[str], suffix: tuple[int, ...]) -> str:
        return "1" if self._ch(suffix).limit_on else "0"

    def _write_limit_state(self, args: list[str], suffix: tuple[int, ...]) -> None:
        ch = self._ch(suffix)
        if not args:
            raise ScpiError(MISSING_PARAMETER, "VOLTage:LIMit:STATe")
        on = parse_bool(args[0], "VOLTage:LIMit:STATe")
        if on:
            if ch.limit_low_v >= ch.limit_high_v:
                raise ScpiError(SETTINGS_CONFLICT, "voltage limit low ≥ high")
            if (ch.offset_v + ch.amplitude_vpp / 2 > ch.limit_high_v + 1e-9
                    or ch.offset_v - ch.amplitude_vpp / 2 < ch.limit_low_v - 1e-9):
                raise ScpiError(SETTINGS_CONFLICT, "present output outside the voltage limits")
        ch.limit_on = on

    # -- outputs -------------------------------------------------------------------------
    def _query_output(self, _a: list[str], suffix: tuple[int, ...]) -> str:
        return "1" if self._ch(suffix).output else "0"

    def _write_output(self, args: list[str], suffix: tuple[int, ...]) -> None:
        if not args:
            raise ScpiError(MISSING_PARAMETER, "OUTPut")
        ch = self._ch(suffix)
        ch.output = parse_bool(args[0], "OUTPut")
        if ch.output and suffix[0] == self.pattern_channel:
            self._bench_armed = True

    def _query_load(self, args: list[str], suffix: tuple[int, ...]) -> str:
        if args:
            word = args[0].strip().upper()
            table = {"MIN": 1.0, "MINIMUM": 1.0, "MAX": 10_000.0, "MAXIMUM": 10_000.0}
            if word not in table:
                raise ScpiError(ILLEGAL_PARAMETER, f"OUTPut:LOAD? {args[0]}")
            return _num(table[word])
        return _num(self._ch(suffix).load_ohm)

    def _write_load(self, args: list[str], suffix: tuple[int, ...]) -> None:
        ch = self._ch(suffix)
        if not args:
            raise ScpiError(MISSING_PARAMETER, "OUTPut:LOAD")
        word = args[0].strip().upper()
        named = {"INF": math.inf, "INFINITY": math.inf, "MIN": 1.0, "MINIMUM": 1.0,
                 "MAX": 10_000.0, "MAXIMUM": 10_000.0, "DEF": 50.0, "DEFAULT": 50.0}
        value = named[word] if word in named else parse_number(args[0], "OUTPut:LOAD")
        if not (math.isinf(value) or 1.0 <= value <= 10_000.0):
            raise ScpiError(DATA_OUT_OF_RANGE, f"OUTPut:LOAD {value:g} not in [1, 10000] Ω")
        ratio = load_factor(value) / load_factor(ch.load_ohm)
        ch.amplitude_vpp *= ratio
        ch.offset_v *= ratio
        ch.load_ohm = value

    def _write_sync(self, args: list[str], _s: tuple[int, ...]) -> None:
        if not args:
            raise ScpiError(MISSING_PARAMETER, "OUTPut:SYNC")
        self.sync_output = parse_bool(args[0], "OUTPut:SYNC")

    def _write_sync_source(self, args: list[str], _s: tuple[int, ...]) -> None:
        word = args[0].strip().upper() if args else ""
        if word not in ("CH1", "CH2"):
            raise ScpiError(ILLEGAL_PARAMETER, f"OUTPut:SYNC:SOURce {word}")
        self.sync_source = word

    def _count_trigger(self) -> None:
        self.triggers += 1

    def _write_border(self, args: list[str], _s: tuple[int, ...]) -> None:
        table = _words("NORMal", "SWAPped")
        word = args[0].strip().upper() if args else ""
        if word not in table:
            raise ScpiError(ILLEGAL_PARAMETER, f"FORMat:BORDer {word}")
        self.byte_order = table[word]

    # -- arbitrary waveforms -----------------------------------------------------------
    def free_points(self, ch: ChannelState) -> int:
        """Points left in a channel's volatile memory."""
        return self.memory_points - sum(int(c.size) for c in ch.volatile.values())

    def _new_arb(self, args: list[str], suffix: tuple[int, ...], what: str
                 ) -> tuple[ChannelState, str, list[str]]:
        if len(args) < 2:
            raise ScpiError(MISSING_PARAMETER, f"{what} needs a name and data")
        ch = self._ch(suffix)
        name = args[0].strip().strip('"')
        if _NAME_RE.fullmatch(name) is None:
            raise ScpiError(ILLEGAL_PARAMETER, f"arb name {name!r}: ≤ 12 chars, letter first")
        if name.upper() in (n.upper() for n in ch.volatile):
            raise ScpiError(SETTINGS_CONFLICT, f"arb {name} already in volatile memory")
        return ch, name, args[1:]

    def _store_arb(self, ch: ChannelState, name: str, codes: npt.NDArray[np.int16]) -> None:
        if codes.size < self.spec.min_points:
            raise ScpiError(DATA_OUT_OF_RANGE,
                            f"{codes.size} points, at least {self.spec.min_points} needed")
        if codes.size > self.free_points(ch):
            raise ScpiError(EXECUTION_ERROR,
                            f"{codes.size} points, only {self.free_points(ch)} free")
        ch.volatile[name] = codes

    def _write_dac(self, args: list[str], suffix: tuple[int, ...]) -> None:
        ch, name, data = self._new_arb(args, suffix, "DATA:ARBitrary:DAC")
        block = self.take_block(data[0].strip())
        if block is not None:
            if len(data) != 1 or len(block) % 2:
                raise ScpiError(BLOCK_DATA_ERROR, "DAC block must hold whole int16 points")
            dtype = ">i2" if self.byte_order == "NORM" else "<i2"
            values = np.frombuffer(block, dtype=dtype).astype(np.int64)
        else:
            try:
                values = np.array([int(v) for v in data], dtype=np.int64)
            except ValueError:
                raise ScpiError(ILLEGAL_PARAMETER, "DAC values must be integers") from None
        if values.size and np.abs(values).max() > DAC_FULL_SCALE:
            raise ScpiError(DATA_OUT_OF_RANGE, "DAC codes must lie in -32767…+32767")
        self._store_arb(ch, name, values.astype(np.int16))

    def _write_arb_float(self, args: list[str], suffix: tuple[int, ...]) -> None:
        ch, name, data = self._new_arb(args, suffix, "DATA:ARBitrary")
        block = self.take_block(data[0].strip())
        if block is not None:
            if len(data) != 1 or len(block) % 4:
                raise ScpiError(BLOCK_DATA_ERROR, "float block must hold whole float32 points")
            dtype = ">f4" if self.byte_order == "NORM" else "<f4"
            values = np.frombuffer(block, dtype=dtype).astype(np.float64)
        else:
            values = np.array([parse_number(v, "DATA:ARBitrary") for v in data])
        if values.size and (not np.all(np.isfinite(values)) or np.abs(values).max() > 1.0):
            raise ScpiError(DATA_OUT_OF_RANGE, "arb values must lie in -1…+1")
        self._store_arb(ch, name, np.rint(values * DAC_FULL_SCALE).astype(np.int16))

    def _clear_volatile(self, _a: list[str], suffix: tuple[int, ...]) -> None:
        ch = self._ch(suffix)
        ch.volatile.clear()
        ch.arb = DEFAULT_ARB

    def _catalog(self, _a: list[str], suffix: tuple[int, ...]) -> str:
        names = [DEFAULT_ARB, *self._ch(suffix).volatile]
        return ",".join(f'"{name}"' for name in names)

    def _lookup(self, ch: ChannelState, name: str) -> str | None:
        for known in ch.volatile:
            if known.upper() == name.upper():
                return known
        return None

    def _points(self, args: list[str], suffix: tuple[int, ...]) -> str:
        ch = self._ch(suffix)
        name = args[0].strip().strip('"') if args else ch.arb
        known = self._lookup(ch, name)
        if known is None:
            raise ScpiError(ILLEGAL_PARAMETER, f"no arb {name!r} in volatile memory")
        return str(ch.volatile[known].size)

    def _query_arb(self, _a: list[str], suffix: tuple[int, ...]) -> str:
        return f'"{self._ch(suffix).arb}"'

    def _select_arb(self, args: list[str], suffix: tuple[int, ...]) -> None:
        if not args:
            raise ScpiError(MISSING_PARAMETER, "FUNCtion:ARBitrary")
        ch = self._ch(suffix)
        name = args[0].strip().strip('"')
        if name.upper() == DEFAULT_ARB.upper():
            ch.arb = DEFAULT_ARB
            return
        known = self._lookup(ch, name)
        if known is None:
            raise ScpiError(ILLEGAL_PARAMETER, f"no arb {name!r} in volatile memory")
        ch.arb = known

    def _store_data(self, args: list[str], suffix: tuple[int, ...]) -> None:
        ch = self._ch(suffix)
        if not args or not (args[0].startswith('"') and args[0].endswith('"')):
            raise ScpiError(ILLEGAL_PARAMETER, 'MMEMory:STORe:DATA needs a quoted "file.arb"')
        path = args[0][1:-1]
        if not path.lower().endswith(".arb"):
            raise ScpiError(ILLEGAL_PARAMETER, f"{path!r} is not an .arb file")
        known = self._lookup(ch, ch.arb)
        if known is None:
            raise ScpiError(SETTINGS_CONFLICT, "the selected arb is not in volatile memory")
        self.files[path] = ch.volatile[known].copy()

    # -- reset and state -----------------------------------------------------------------
    def reset(self) -> None:
        """``*RST``: settings to defaults, outputs off; volatile arbs kept."""
        with self.lock:
            fresh = ChannelState()
            for ch in self.channels.values():
                for name in _RESET_FIELDS:
                    setattr(ch, name, getattr(fresh, name))
            self.byte_order = "NORM"
            self.sync_output = True
            self.sync_source = "CH1"

    def handle_message(self, message: str) -> str | None:
        reply = super().handle_message(message)
        self._push_to_bench()
        return reply

    # -- physics ---------------------------------------------------------------------------
    def waveform_v(self, channel: int | None = None) -> npt.NDArray[np.float64]:
        """Voltage (V) of every point of the playing arb at the modulator's real load."""
        with self.lock:
            ch = self.channels[self.pattern_channel if channel is None else channel]
            known = self._lookup(ch, ch.arb)
            if known is None:
                return np.empty(0)
            return self._to_volts(ch, ch.volatile[known])

    def _to_volts(self, ch: ChannelState, codes: npt.NDArray[np.int16]) -> npt.NDArray[np.float64]:
        sign = -1.0 if ch.polarity == "INV" else 1.0
        unit = codes.astype(np.float64) / DAC_FULL_SCALE
        shown = ch.offset_v + sign * unit * ch.amplitude_vpp / 2
        return shown * (load_factor(self.actual_load_ohm) / load_factor(ch.load_ohm))

    def drive_per_class(self) -> tuple[float, float, float]:
        """Modulator drive (V) of the (signal, decoy, vacuum) classes (module docstring)."""
        with self.lock:
            ch = self.channels[self.pattern_channel]
            if not ch.output:
                return (0.0, 0.0, 0.0)
            scale = load_factor(self.actual_load_ohm) / load_factor(ch.load_ohm)
            known = self._lookup(ch, ch.arb) if ch.function == "ARB" else None
            if known is None:
                level = ch.offset_v * scale
                return (level, level, level)
            volts = np.unique(self._to_volts(ch, np.unique(ch.volatile[known])))
            decoy = volts[1] if volts.size >= 3 else volts[-1]
            return (float(volts[0]), float(decoy), float(volts[-1]))

    def _push_to_bench(self) -> None:
        """The one place that touches the bench: ``bench.alice.drive_v`` (V per class).

        Only once the pattern channel's output has been switched on, and only when the
        drive changed; takes ``bench.lock`` if the bench has one.
        """
        if self.bench is None or not self._bench_armed:
            return
        drive = self.drive_per_class()
        if self.bench_pushes and self.bench_pushes[-1] == drive:
            return
        self.bench_pushes.append(drive)
        lock = getattr(self.bench, "lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            self.bench.alice.drive_v = drive


def serve(name: str, bench: Any = None, options: Mapping[str, str] | None = None
          ) -> BlockScpiServer:
    """Factory for :mod:`qkdlab.mock_instruments.launcher`: an unstarted server.

    Options (``mock://keysight/33500b?model=33512B&options=MEM&channel=1&load_ohm=50``):
    ``model``, ``options`` (``*OPT?`` list, e.g. ``MEM``), ``serial``, ``channel`` (the
    one wired to the modulator), ``load_ohm`` (its real termination, ``inf`` = open).
    """
    opts = dict(options or {})
    kwargs: dict[str, Any] = {}
    for key in ("model", "options", "serial"):
        if key in opts:
            kwargs[key] = opts.pop(key).upper() if key == "model" else opts.pop(key)
    if "channel" in opts:
        kwargs["channel"] = int(opts.pop("channel"))
    if "load_ohm" in opts:
        kwargs["load_ohm"] = float(opts.pop("load_ohm"))
    if opts:
        raise ValueError(f"unknown 33500B mock option(s): {', '.join(sorted(opts))}")
    return BlockScpiServer(name, MockKeysight33500B(bench, **kwargs))

