"""Keysight 33500B / 33600A Trueform generator as Alice's symbol-pattern source.

:class:`Keysight33500BPattern` extends QCoDeS' own
:class:`~qcodes.instrument_drivers.Keysight.Keysight33522B` (not a fork: every base
parameter — ``chN.function_type``, ``frequency``, ``amplitude``, ``offset``,
``output``, trigger, burst, sync — is untouched) with what the base lacks: upload of
an arbitrary waveform as int16 DAC codes and the
:class:`~qkdlab.drivers.roles.PatternSource` role (``load_pattern``, ``run``,
``stop``, ``safe_state``).

Source of the command set
-------------------------
*Keysight Trueform Series Operating and Service Guide* (33500B and 33600A Series),
Keysight part number 33500-90901 [Guide]; its chapter "SCPI Programming Reference"
is this family's command reference (there is no separate programmer's manual).  The
guide's PDF could not be opened from where this driver was written; the facts below
come from it as quoted or used by public code that cites it (Keysight's SCPI
definition file of the 33500B rendered as a generated Python API, with its help
texts; the PyMeasure ``Agilent33500`` driver; lab code and drivers citing [Guide]'s
"Models and Options" and command pages).  Facts found in a single secondary source
are marked *(verify)*.  Sections are named, not paginated.

================================================  ============================== ===============
Command (as sent)                                 [Guide] section                used by
================================================  ============================== ===============
``*IDN?``, ``*OPT?``, ``*RST``                    IEEE-488 Common Commands       init, reset()
``SYSTem:ERRor?``                                 SYSTem Subsystem               check_errors()
``FORMat:BORDer NORMal|SWAPped``                  FORMat:BORDer                  load_pattern()
``SOURce<n>:DATA:VOLatile:CLEar``                 DATA Subsystem                 load_pattern()
``SOURce<n>:DATA:ARBitrary:DAC <name>,<block>``   DATA Subsystem (DATA:ARB:DAC)  load_pattern()
``SOURce<n>:DATA:VOLatile:CATalog?``              DATA Subsystem                 catalog()
``SOURce<n>:DATA:VOLatile:FREE?``                 DATA Subsystem                 chN.free_points
``SOURce<n>:FUNCtion:ARBitrary <name>``           FUNCtion:ARBitrary             load_pattern()
``SOURce<n>:FUNCtion ARB``                        FUNCtion                       load_pattern()
``SOURce<n>:FUNCtion:ARBitrary:FILTer``           FUNCtion:ARBitrary:FILTer      chN.arb_filter
``SOURce<n>:FUNCtion:ARBitrary:SRATe``            FUNCtion:ARBitrary:SRATe       chN.arb_sample_rate
``OUTPut<n>:LOAD``                                OUTPut:LOAD                    chN.load
``SOURce<n>:VOLTage:UNIT``, ``VOLTage``,          SOURce:VOLTage Subsystem       load_pattern()
``VOLTage:OFFSet``
``SOURce<n>:VOLTage:LIMit:HIGH|LOW|STATe``        SOURce:VOLTage:LIMit           load_pattern()
``OUTPut<n> ON|OFF``                              OUTPut                         run(), stop()
``MMEMory:STORe:DATA<n> "<file>"``                MMEMory Subsystem              store_pattern()
================================================  ============================== ===============

Facts used (and where a number comes from):

* DAC codes are int16 in −32767…+32767; +32767 is ``offset + amplitude/2`` and
  −32767 ``offset − amplitude/2`` at the set load ([Guide] DATA:ARB:DAC).
* Binary blocks are IEEE-488.2 definite-length ``#<n><len><bytes>``, two bytes per
  point; ``FORMat:BORDer NORMal`` (the default) = most-significant byte first,
  ``SWAPped`` = least-significant first.  This driver always sends ``FORM:BORD NORM``
  before a block and packs big-endian, so the instrument's previous setting never
  matters.
* ``DATA:VOL:CLE`` clears the channel's waveform memory and reloads the default arb.
* Arb names: at most 12 characters *(verify)*, a letter first, then letters, digits
  or ``_``.
* Points per arb: at least 8 (33500B) *(verify)*; at most 1 048 576 per channel,
  16 777 216 with option MEM (33500B "1 MSa / 16 MSa") *(verify the exact counts)*;
  33600A "4 MSa / 64 MSa" taken as 4 194 304 / 67 108 864 *(verify)*.  ``*OPT?``
  listing ``MEM`` means the large memory.
* Sample rate (``FUNC:ARB:SRAT``): 1 µSa/s up to 160 MSa/s (20 MHz models, 33512B),
  250 MSa/s (30 MHz models, 33522B), 1 GSa/s (33600A); the 33500B allows at most
  62.5 MSa/s with ``FUNC:ARB:FILT OFF`` *(verify)*.
* Output: 50 Ω source; 1 mVpp … 10 Vpp and |offset| + Vpp/2 ≤ 5 V into 50 Ω, twice
  that into an open circuit ("high Z").  For any other ``OUTP:LOAD`` R the limits are
  scaled by the divider R/(R + 50 Ω), which is the 50 Ω source physics, not a number
  from [Guide].
* 33510B/33520B have no arb option *(verify)*, which is why they are not in
  :data:`MODELS`.

Waveform built by :meth:`Keysight33500BPattern.load_pattern`
-------------------------------------------------------------
``levels_v[k]`` is the drive (V at the load) of symbol value ``k``.  The amplitude
spans the lowest to the highest level (at least the 1 mVpp minimum), the offset is
their mid-point, and level ``V`` becomes code ``round((V − offset)/(Vpp/2)·32767)``
(quantisation ≤ Vpp/131068).  Each symbol becomes ``samples_per_symbol`` equal
samples (``None`` = 1 with the ``STEP``/``OFF`` filters, where a sample is held flat,
and the largest N ≤ 8 the sample-rate and memory limits allow with ``NORMAL``, whose
interpolation needs oversampling for flat symbol tops); the sample rate is
``N·rate_hz``.  A pattern shorter than the minimum arb length is repeated whole (the
played sequence is unchanged).  The default filter is ``STEP``.

Not covered (not needed by the PatternSource role; documented so nobody assumes
otherwise): arb sequences (``DATA:SEQuence``), float uploads (``DATA:ARB`` without
``:DAC``), two-channel ``DATA:ARB2``, ``MMEM:LOAD``, IQ-player and modulation
commands, ``FUNC:ARB:ADVance`` (sample-by-trigger).  Burst and trigger settings are
the base driver's parameters and are not changed by :meth:`load_pattern`: with burst
off the pattern plays continuously.

Open points (verify on hardware): the exact reply format of ``*OPT?`` and of
``DATA:VOL:CAT?`` (parsed leniently: comma-separated, quotes stripped); the 33600A's
minimum arb length (32 is assumed) and its ``FILT OFF`` sample-rate limit (unknown,
so ``OFF`` is refused on a 33600A).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import numpy.typing as npt
from qcodes import validators as vals
from qcodes.instrument import InstrumentChannel
from qcodes.instrument_drivers.Keysight import Keysight33522B

from qkdlab.drivers.scpi_errors import (
    MalformedErrorReplyError,
    drain_error_queue,
    harden_reply_parsers,
)
from qkdlab.drivers.visa_link import ReconnectingVisaLink

if TYPE_CHECKING:
    from qcodes.instrument import VisaInstrumentKWArgs
    from typing_extensions import Unpack

DAC_FULL_SCALE = 32767
"""Largest DAC code magnitude ([Guide] DATA:ARB:DAC: −32767…+32767)."""
SOURCE_IMPEDANCE_OHM = 50.0
"""Output impedance of every channel (Ω)."""
MAX_OPEN_CIRCUIT_PEAK_V = 10.0
"""|offset| + Vpp/2 limit into an open circuit (V); 5 V into 50 Ω ([Guide])."""
MIN_OPEN_CIRCUIT_VPP = 2e-3
"""Smallest amplitude into an open circuit (Vpp); 1 mVpp into 50 Ω ([Guide])."""
MIN_SAMPLE_RATE_HZ = 1e-6
"""Lowest ``FUNC:ARB:SRAT`` (Sa/s) ([Guide])."""
LOAD_RANGE_OHM = (1.0, 10_000.0)
"""Finite ``OUTP:LOAD`` settings (Ω); ``INF`` is the other choice ([Guide])."""
ARB_FILTERS = ("NORMAL", "STEP", "OFF")
"""``FUNC:ARB:FILT`` choices ([Guide] FUNCtion:ARBitrary:FILTer)."""
AUTO_OVERSAMPLING_MAX = 8
"""Cap of the automatic samples per symbol with the ``NORMAL`` filter."""
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,11}")
_INF_REPLY = 9.9e37  # SCPI's "infinity" (e.g. OUTP:LOAD? with INF)



class Keysight33500BError(Exception):
    """The generator refused a setting, reported errors, or answered nonsense."""


class Keysight33500BCommunicationError(Keysight33500BError):
    """No reply in time, or the link was lost and could not be restored."""


@dataclass(frozen=True)
class ModelSpec:
    """Arbitrary-waveform limits of one model ([Guide] "Models and Options").

    Attributes:
        max_sample_rate_hz: top of ``FUNC:ARB:SRAT`` with the NORMAL/STEP filters (Sa/s).
        max_sample_rate_filter_off_hz: top with ``FUNC:ARB:FILT OFF`` (Sa/s); None
            where the guide's figure is not known here (then OFF is refused).
        standard_points: arb memory per channel without option MEM (points).
        extended_points: arb memory per channel with option MEM (points).
        min_points: shortest arb (points).
    """

    max_sample_rate_hz: float
    max_sample_rate_filter_off_hz: float | None
    standard_points: int
    extended_points: int
    min_points: int

    def max_sample_rate(self, arb_filter: str) -> float | None:
        """Top sample rate (Sa/s) with ``arb_filter``; None if unknown."""
        if arb_filter == "OFF":
            return self.max_sample_rate_filter_off_hz
        return self.max_sample_rate_hz


MODELS: dict[str, ModelSpec] = {
    # 20 MHz, two channels, arb
    "33512B": ModelSpec(160e6, 62.5e6, 1_048_576, 16_777_216, 8),
    # 30 MHz, two channels, arb
    "33522B": ModelSpec(250e6, 62.5e6, 1_048_576, 16_777_216, 8),
    # 120 MHz Trueform, two channels (min points and OFF-filter rate: see open points)
    "33622A": ModelSpec(1e9, None, 4_194_304, 67_108_864, 32),
}
"""Dual-channel models with arbitrary waveforms that the QCoDeS base class knows."""


def load_factor(load_ohm: float) -> float:
    """Fraction R/(R + 50 Ω) of the open-circuit voltage that reaches a load R (1 for ∞)."""
    if math.isinf(load_ohm):
        return 1.0
    return load_ohm / (load_ohm + SOURCE_IMPEDANCE_OHM)


def output_peak_limit_v(load_ohm: float) -> float:
    """Largest |offset| + Vpp/2 (V) the generator reaches at load ``load_ohm``."""
    return MAX_OPEN_CIRCUIT_PEAK_V * load_factor(load_ohm)


def check_arb_name(name: str) -> str:
    """Return ``name`` if it is a valid arb name (≤ 12 chars, letter first, [A-Za-z0-9_])."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"arb name {name!r} is invalid: 1 to 12 characters, a letter first, "
            "then letters, digits or '_'"
        )
    return name


def _fmt(value: float) -> str:
    """A number as sent on the wire (10 significant digits, no trailing zeros)."""
    return f"{value:.10g}"


@dataclass(frozen=True)
class PatternPlan:
    """What :meth:`Keysight33500BPattern.load_pattern` uploads and programs.

    Attributes:
        codes: int16 DAC codes, one per sample (the whole arb).
        level_codes: the DAC code of each entry of ``levels_v``.
        samples_per_symbol: identical samples per symbol.
        repeats: times the symbol sequence is repeated to reach the minimum length.
        sample_rate_hz: ``FUNC:ARB:SRAT`` (Sa/s) = samples_per_symbol · symbol rate.
        symbol_rate_hz: symbols per second.
        amplitude_vpp: amplitude at the load (Vpp), exactly as sent.
        offset_v: offset at the load (V), exactly as sent.
        n_symbols: length of the symbol sequence (one period of the pattern).
    """

    codes: npt.NDArray[np.int16]
    level_codes: npt.NDArray[np.int16]
    samples_per_symbol: int
    repeats: int
    sample_rate_hz: float
    symbol_rate_hz: float
    amplitude_vpp: float
    offset_v: float
    n_symbols: int

    @property
    def n_points(self) -> int:
        """Points in the uploaded arb."""
        return int(self.codes.size)

    def level_voltages(self) -> npt.NDArray[np.float64]:
        """The voltage (V, at the load) each level actually gets after quantisation."""
        half = self.amplitude_vpp / 2
        return self.offset_v + self.level_codes.astype(np.float64) / DAC_FULL_SCALE * half


def _as_symbols(symbols: bytes | bytearray | memoryview | Sequence[int] | npt.NDArray[Any]
                ) -> npt.NDArray[np.intp]:
    if isinstance(symbols, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(symbols), dtype=np.uint8).astype(np.intp)
    array = np.asarray(symbols)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError("symbols must be bytes or a 1-D sequence of integers")
    return array.astype(np.intp)


def plan_pattern(
    levels_v: Sequence[float],
    symbols: bytes | bytearray | memoryview | Sequence[int] | npt.NDArray[Any],
    rate_hz: float,
    *,
    spec: ModelSpec,
    max_points: int,
    arb_filter: str = "STEP",
    samples_per_symbol: int | None = None,
    max_drive_v: float = math.inf,
    load_ohm: float = 50.0,
) -> PatternPlan:
    """Check a pattern against the instrument's limits and build its DAC codes.

    Pure function (no I/O): every limit is checked here, before anything is written.

    Args:
        levels_v: drive voltage (V at the load) of each symbol value.
        symbols: symbol values, indices into ``levels_v``.
        rate_hz: symbols per second.
        spec: the model's limits.
        max_points: arb memory per channel (points).
        arb_filter: ``NORMAL``, ``STEP`` or ``OFF``.
        samples_per_symbol: samples per symbol, or None for the automatic choice.
        max_drive_v: hard ceiling of |V| at the load (V), e.g. the modulator's rating.
        load_ohm: the load the generator is told about (Ω, ``inf`` for high Z).

    Raises:
        ValueError: naming the quantity, its value and the allowed range.
    """
    levels = np.asarray(levels_v, dtype=np.float64)
    if levels.ndim != 1 or levels.size == 0:
        raise ValueError("levels_v must be a non-empty 1-D sequence of voltages")
    if not np.all(np.isfinite(levels)):
        raise ValueError(f"levels_v must be finite, got {levels.tolist()}")
    syms = _as_symbols(symbols)
    if syms.size == 0:
        raise ValueError("symbols is empty")
    if syms.min() < 0 or syms.max() >= levels.size:
        raise ValueError(
            f"symbol values must index levels_v (0…{levels.size - 1}), "
            f"got {int(syms.min())}…{int(syms.max())}"
        )
    if not (math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate_hz must be a positive number, got {rate_hz}")
    arb_filter = arb_filter.upper()
    if arb_filter not in ARB_FILTERS:
        raise ValueError(f"arb_filter {arb_filter!r} not one of {ARB_FILTERS}")

    # -- voltages at the load -------------------------------------------------------
    peak_limit = output_peak_limit_v(load_ohm)
    v_limit = min(peak_limit, max_drive_v)
    worst = float(np.max(np.abs(levels)))
    if worst > v_limit + 1e-12:
        raise ValueError(
            f"levels_v reach {worst:g} V; allowed |V| ≤ {v_limit:g} V at load "
            f"{load_ohm:g} Ω (generator limit {peak_limit:g} V, max_drive_v {max_drive_v:g} V)"
        )
    v_lo, v_hi = float(levels.min()), float(levels.max())
    min_vpp = MIN_OPEN_CIRCUIT_VPP * load_factor(load_ohm)
    amplitude = float(_fmt(max(v_hi - v_lo, min_vpp)))
    offset = float(_fmt((v_hi + v_lo) / 2))
    if abs(offset) + amplitude / 2 > peak_limit + 1e-9:
        raise ValueError(
            f"offset {offset:g} V with amplitude {amplitude:g} Vpp exceeds the generator's "
            f"|offset| + Vpp/2 ≤ {peak_limit:g} V at load {load_ohm:g} Ω"
        )
    scaled = np.rint((levels - offset) / (amplitude / 2) * DAC_FULL_SCALE)
    level_codes = np.clip(scaled, -DAC_FULL_SCALE, DAC_FULL_SCALE).astype(np.int16)

    # -- timing and memory ----------------------------------------------------------
    max_rate = spec.max_sample_rate(arb_filter)
    if max_rate is None:
        raise ValueError(f"the FUNC:ARB:FILT {arb_filter} sample-rate limit of this model is "
                         "not known; use STEP or NORMAL")
    n_symbols = int(syms.size)
    if samples_per_symbol is None:
        if arb_filter == "NORMAL":
            by_rate = int(max_rate // rate_hz)
            by_memory = max_points // n_symbols
            samples_per_symbol = max(1, min(AUTO_OVERSAMPLING_MAX, by_rate, by_memory))
        else:
            samples_per_symbol = 1
    if not isinstance(samples_per_symbol, int) or samples_per_symbol < 1:
        raise ValueError(f"samples_per_symbol must be an integer ≥ 1, got {samples_per_symbol}")
    sample_rate = float(_fmt(samples_per_symbol * rate_hz))
    if sample_rate > max_rate * (1 + 1e-12):
        raise ValueError(
            f"sample rate {sample_rate:g} Sa/s ({samples_per_symbol} sample(s)/symbol × "
            f"{rate_hz:g} Hz) exceeds {max_rate:g} Sa/s (filter {arb_filter})"
        )
    if sample_rate < MIN_SAMPLE_RATE_HZ:
        raise ValueError(f"sample rate {sample_rate:g} Sa/s is below {MIN_SAMPLE_RATE_HZ} Sa/s")
    period_points = n_symbols * samples_per_symbol
    repeats = max(1, math.ceil(spec.min_points / period_points))
    n_points = period_points * repeats
    if n_points > max_points:
        raise ValueError(
            f"the pattern needs {n_points} points ({n_symbols} symbols × {samples_per_symbol} "
            f"sample(s)/symbol); the arb memory holds at most {max_points}"
        )
    one_period = np.repeat(level_codes[syms], samples_per_symbol)
    codes = np.tile(one_period, repeats).astype(np.int16)
    return PatternPlan(
        codes=codes,
        level_codes=level_codes,
        samples_per_symbol=samples_per_symbol,
        repeats=repeats,
        sample_rate_hz=sample_rate,
        symbol_rate_hz=float(rate_hz),
        amplitude_vpp=amplitude,
        offset_v=offset,
        n_symbols=n_symbols,
    )


def _parse_catalog(reply: str) -> list[str]:
    """``"A","B"`` (or unquoted) -> ``["A", "B"]``."""
    names = [part.strip().strip('"').strip("'") for part in reply.split(",")]
    return [name for name in names if name]


def _parse_load(reply: str) -> float:
    value = float(reply)
    return math.inf if value >= _INF_REPLY else value


def _format_load(value: float) -> str:
    return "INF" if math.isinf(value) else _fmt(value)


@contextlib.contextmanager
def _quiet_model_name_warning() -> Iterator[None]:
    """Drop the base class's "class name does not match the model" log line.

    Keysight33xxx warns when the model is not a substring of the class name; this
    subclass checks the model itself against :data:`MODELS`.
    """
    logger = logging.getLogger("qcodes.instrument_drivers.Keysight.KeysightAgilent_33XXX")

    def keep(record: logging.LogRecord) -> bool:
        return "does not match the detected model" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class Keysight33500BPattern(ReconnectingVisaLink, Keysight33522B):
    """Keysight 33512B / 33522B / 33622A playing Alice's symbol pattern.

    Satisfies :class:`qkdlab.drivers.roles.PatternSource` on ``channel``; every
    parameter of the QCoDeS base class stays available on ``ch1``/``ch2``, and each
    channel gains ``load`` (Ω), ``arb_sample_rate`` (Sa/s, unit Hz), ``arb_filter``,
    ``arb_name``, ``voltage_limit_high``/``_low`` (V), ``voltage_limit_enabled`` and
    ``free_points``.

    Args:
        name: QCoDeS instrument name.
        address: VISA resource (``TCPIP0::<host>::inst0::INSTR``,
            ``TCPIP::<host>::5025::SOCKET``, USB...; the mock serves a SOCKET).
        channel: output that drives the intensity modulator (1 or 2).
        max_drive_v: hard ceiling of |V| at the load (V), e.g. the modulator's RF
            input rating; default and upper bound: the generator's own limit at
            ``load_ohm``.  Enforced before anything is written and, after each
            :meth:`load_pattern`, by the instrument's ``VOLT:LIM`` on that channel.
        load_ohm: the termination seen by ``channel`` (Ω; ``math.inf`` = high Z),
            programmed into ``OUTP:LOAD`` by :meth:`load_pattern`.
        arb_name: volatile-memory name of the pattern (≤ 12 chars, letter first).
        memory_points: arb memory per channel (points); default from ``*OPT?``.
        **kwargs: forwarded to :class:`~qcodes.instrument.VisaInstrument`.
    """

    default_terminator = "\n"
    default_timeout = 10.0

    RECONNECT_TIMEOUT_S: ClassVar[float] = 3.0
    error_cls: ClassVar[type[Exception]] = Keysight33500BError
    communication_error_cls: ClassVar[type[Exception]] = Keysight33500BCommunicationError
    """Default of :attr:`reconnect_timeout_s` (s)."""
    ERROR_QUEUE_MAX: ClassVar[int] = 21
    """Most ``SYST:ERR?`` reads per check (the queue holds 20, plus the final "No error")."""

    def __init__(
        self,
        name: str,
        address: str,
        *,
        channel: int = 1,
        max_drive_v: float | None = None,
        load_ohm: float = 50.0,
        arb_name: str = "QKDPAT",
        memory_points: int | None = None,
        **kwargs: Unpack[VisaInstrumentKWArgs],
    ) -> None:
        if channel not in (1, 2):
            raise ValueError(f"{name}: channel must be 1 or 2, got {channel}")
        if not (math.isinf(load_ohm) or LOAD_RANGE_OHM[0] <= load_ohm <= LOAD_RANGE_OHM[1]):
            raise ValueError(
                f"{name}: load_ohm={load_ohm} must be in [{LOAD_RANGE_OHM[0]:g}, "
                f"{LOAD_RANGE_OHM[1]:g}] Ω or inf"
            )
        limit = output_peak_limit_v(load_ohm)
        if max_drive_v is None:
            max_drive_v = limit
        if not 0 < max_drive_v <= limit:
            raise ValueError(
                f"{name}: max_drive_v={max_drive_v} V must be in (0, {limit:g}] V "
                f"(the generator's limit at {load_ohm:g} Ω)"
            )
        check_arb_name(arb_name)
        self.init_link(address, dict(kwargs))
        with _quiet_model_name_warning():
            super().__init__(name, address, silent=True, **kwargs)
        if self.model not in MODELS:
            known, model = ", ".join(sorted(MODELS)), self.model
            self.close()
            raise Keysight33500BError(
                f"{name}: model {model} is not supported (arbitrary waveforms and two "
                f"channels needed: {known})"
            )
        self.spec: ModelSpec = MODELS[self.model]
        """Arbitrary-waveform limits of the connected model."""
        self.pattern_channel = channel
        """Output (1 or 2) that drives the modulator."""
        self.max_drive_v = float(max_drive_v)
        """Hard ceiling of |V| at the load on :attr:`pattern_channel` (V)."""
        self.load_ohm = float(load_ohm)
        """Termination of :attr:`pattern_channel` (Ω; inf = high Z)."""
        self.arb_name = arb_name
        """Volatile-memory name of the pattern."""
        self.options: tuple[str, ...] = self._read_options()
        """Installed options from ``*OPT?`` (``MEM`` = large arb memory)."""
        if memory_points is None:
            memory_points = (
                self.spec.extended_points if "MEM" in self.options else self.spec.standard_points
            )
        if not self.spec.min_points <= memory_points <= self.spec.extended_points:
            self.close()
            raise ValueError(
                f"{name}: memory_points={memory_points} must be in "
                f"[{self.spec.min_points}, {self.spec.extended_points}]"
            )
        self.memory_points = int(memory_points)
        """Arb memory per channel (points)."""
        self.pattern: PatternPlan | None = None
        """The pattern last loaded by :meth:`load_pattern` (None before)."""

        for number in (1, 2):
            self._add_arb_parameters(number)
        self._guard_pattern_channel()
        harden_reply_parsers(self)  # garbage replies: a clear error, never NaN (scpi_errors)
        self.connect_message()

    # -- extra per-channel parameters -------------------------------------------------
    def _channel(self, number: int) -> InstrumentChannel:
        return self.ch1 if number == 1 else self.ch2

    def _add_arb_parameters(self, n: int) -> None:
        """Parameters the base channel lacks ([Guide] OUTPut:LOAD, FUNC:ARB, VOLT:LIM)."""
        ch = self._channel(n)
        ch.add_parameter(
            "load",
            label=f"Channel {n} load",
            unit="Ω",
            get_cmd=f"OUTPut{n}:LOAD?",
            get_parser=_parse_load,
            set_cmd=f"OUTPut{n}:LOAD {{}}",
            set_parser=_format_load,
            vals=vals.MultiType(vals.Numbers(*LOAD_RANGE_OHM), vals.Enum(math.inf)),
            docstring="Termination the amplitude and offset refer to (Ω; inf = high Z). "
            "Changing it rescales the displayed voltages, not the volts at the connector.",
        )
        ch.add_parameter(
            "arb_sample_rate",
            label=f"Channel {n} arb sample rate",
            unit="Hz",
            get_cmd=f"SOURce{n}:FUNCtion:ARBitrary:SRATe?",
            get_parser=float,
            set_cmd=f"SOURce{n}:FUNCtion:ARBitrary:SRATe {{}}",
            set_parser=_fmt,
            vals=vals.Numbers(MIN_SAMPLE_RATE_HZ, self.spec.max_sample_rate_hz),
            docstring="Arbitrary-waveform sample rate (Sa/s).",
        )
        ch.add_parameter(
            "arb_filter",
            label=f"Channel {n} arb filter",
            get_cmd=f"SOURce{n}:FUNCtion:ARBitrary:FILTer?",
            set_cmd=f"SOURce{n}:FUNCtion:ARBitrary:FILTer {{}}",
            val_mapping={"NORMAL": "NORM", "STEP": "STEP", "OFF": "OFF"},
            docstring="Interpolation between arb points: NORMAL (flat spectrum), STEP "
            "(held steps, smoothed), OFF (abrupt steps; 33500B ≤ 62.5 MSa/s).",
        )
        ch.add_parameter(
            "arb_name",
            label=f"Channel {n} selected arb",
            get_cmd=f"SOURce{n}:FUNCtion:ARBitrary?",
            get_parser=lambda reply: reply.strip().strip('"'),
            docstring="Name (or file) of the arb the channel plays when its function is ARB.",
        )
        ch.add_parameter(
            "free_points",
            label=f"Channel {n} free arb memory",
            unit="points",
            get_cmd=f"SOURce{n}:DATA:VOLatile:FREE?",
            get_parser=lambda reply: int(float(reply)),
            docstring="Arb points still free in the channel's volatile memory.",
        )
        for edge in ("high", "low"):
            ch.add_parameter(
                f"voltage_limit_{edge}",
                label=f"Channel {n} voltage limit {edge}",
                unit="V",
                get_cmd=f"SOURce{n}:VOLTage:LIMit:{edge.upper()}?",
                get_parser=float,
                set_cmd=f"SOURce{n}:VOLTage:LIMit:{edge.upper()} {{}}",
                set_parser=_fmt,
                vals=vals.Numbers(-MAX_OPEN_CIRCUIT_PEAK_V, MAX_OPEN_CIRCUIT_PEAK_V),
                docstring=f"{edge.capitalize()} output limit (V at the set load), "
                "enforced by the instrument while voltage_limit_enabled.",
            )
        ch.add_parameter(
            "voltage_limit_enabled",
            label=f"Channel {n} voltage limits on",
            get_cmd=f"SOURce{n}:VOLTage:LIMit:STATe?",
            set_cmd=f"SOURce{n}:VOLTage:LIMit:STATe {{}}",
            val_mapping={True: 1, False: 0},
            docstring="True while the instrument refuses settings outside the voltage limits.",
        )

    def _guard_pattern_channel(self) -> None:
        """Hard limits on the base parameters of the modulator's channel.

        ``offset`` within ±max_drive_v and ``amplitude`` (only settable in VPP on this
        channel) at most 2·max_drive_v, checked before anything is written.
        """
        ch = self._channel(self.pattern_channel)
        vmax = self.max_drive_v
        ch.parameters["offset"].add_validator(vals.Numbers(-vmax, vmax))
        unit = ch.parameters["amplitude_unit"]

        def vpp_only(value: float) -> None:
            current = unit.cache.get(get_if_invalid=False)
            if current not in (None, "VPP"):
                raise ValueError(
                    f"{ch.full_name}.amplitude: the modulator channel is only set in VPP "
                    f"(amplitude_unit is {current})"
                )

        ch.parameters["amplitude"].add_validator(_CallbackValidator(vpp_only))
        ch.parameters["amplitude"].add_validator(vals.Numbers(0.0, 2 * vmax))

    def _read_options(self) -> tuple[str, ...]:
        reply = self.ask("*OPT?")
        tokens = (token.strip().strip('"').upper() for token in reply.split(","))
        return tuple(token for token in tokens if token and token != "0")

    # -- role: PatternSource -------------------------------------------------------------
    def plan(
        self,
        levels_v: Sequence[float],
        symbols: bytes | bytearray | memoryview | Sequence[int] | npt.NDArray[Any],
        rate_hz: float,
        *,
        arb_filter: str = "STEP",
        samples_per_symbol: int | None = None,
    ) -> PatternPlan:
        """The :class:`PatternPlan` :meth:`load_pattern` would upload (no I/O)."""
        try:
            return plan_pattern(
                levels_v,
                symbols,
                rate_hz,
                spec=self.spec,
                max_points=self.memory_points,
                arb_filter=arb_filter,
                samples_per_symbol=samples_per_symbol,
                max_drive_v=self.max_drive_v,
                load_ohm=self.load_ohm,
            )
        except ValueError as err:
            raise ValueError(f"{self.full_name}.load_pattern: {err}") from None

    def load_pattern(
        self,
        levels_v: list[float],
        symbols: bytes,
        rate_hz: float,
        *,
        arb_filter: str = "STEP",
        samples_per_symbol: int | None = None,
    ) -> None:
        """Upload ``symbols`` (indices into ``levels_v``, V at the load) at ``rate_hz``.

        Every limit is checked first (:func:`plan_pattern`); then the output is
        switched off, the channel's volatile memory cleared, the DAC codes uploaded
        as one big-endian binary block, the arb selected, filter, sample rate, load,
        amplitude and offset set, the instrument's voltage limits armed at
        ±``max_drive_v``, and the error queue read (raising if anything was refused).
        If the link had to be re-established meanwhile (writes into a just-dropped
        TCP link vanish silently), the whole sequence is sent once more.  The output
        stays off until :meth:`run`.
        """
        plan = self.plan(levels_v, symbols, rate_hz, arb_filter=arb_filter,
                         samples_per_symbol=samples_per_symbol)
        self.pattern = None
        # a link left unproven by an earlier failure is re-established first, so that
        # its new generation is not mistaken for a drop during the upload
        self.ensure_link(before="load_pattern")
        # A write into a link the peer has just closed is lost without an error; only the
        # next query notices.  If the link was re-established while the sequence ran,
        # part of it may be missing: send the whole (idempotent) sequence once more.
        for attempt in (1, 2):
            generation = self._link_generation
            try:
                self._send_pattern(plan, arb_filter.upper())
                self.check_errors(context="load_pattern")
            except Keysight33500BError:
                if attempt == 1 and self._link_generation != generation:
                    continue
                raise
            if self._link_generation == generation:
                break
            self.visa_log.warning("link re-established during load_pattern; sending it again")
        else:
            raise Keysight33500BCommunicationError(
                f"{self.full_name}.load_pattern: the link was lost twice while loading"
            )
        for parameter in ("output", "function_type", "amplitude", "offset", "amplitude_unit"):
            self._channel(self.pattern_channel).parameters[parameter].cache.invalidate()
        self.pattern = plan

    def _send_pattern(self, plan: PatternPlan, arb_filter: str) -> None:
        """The write sequence of :meth:`load_pattern` (documented there)."""
        n = self.pattern_channel
        self.write(f"OUTPut{n} OFF")
        self.write(f"SOURce{n}:VOLTage:LIMit:STATe OFF")
        self.write(f"SOURce{n}:DATA:VOLatile:CLEar")
        self.write("FORMat:BORDer NORMal")
        self._write_block(f"SOURce{n}:DATA:ARBitrary:DAC {self.arb_name},", plan.codes)
        self.write(f"SOURce{n}:FUNCtion:ARBitrary {self.arb_name}")
        self.write(f"SOURce{n}:FUNCtion ARB")
        self.write(f"SOURce{n}:FUNCtion:ARBitrary:FILTer {arb_filter}")
        self.write(f"SOURce{n}:FUNCtion:ARBitrary:SRATe {_fmt(plan.sample_rate_hz)}")
        self.write(f"OUTPut{n}:LOAD {_format_load(self.load_ohm)}")
        self.write(f"SOURce{n}:VOLTage:UNIT VPP")
        # offset 0 first: every amplitude ≤ the limit is then legal, whatever came before
        self.write(f"SOURce{n}:VOLTage:OFFSet 0")
        self.write(f"SOURce{n}:VOLTage {_fmt(plan.amplitude_vpp)}")
        self.write(f"SOURce{n}:VOLTage:OFFSet {_fmt(plan.offset_v)}")
        self.write(f"SOURce{n}:VOLTage:LIMit:HIGH {_fmt(self.max_drive_v)}")
        self.write(f"SOURce{n}:VOLTage:LIMit:LOW {_fmt(-self.max_drive_v)}")
        self.write(f"SOURce{n}:VOLTage:LIMit:STATe ON")

    def run(self) -> None:
        """Switch the pattern channel's output on and read it back.

        Refused before :meth:`load_pattern`.
        """
        if self.pattern is None:
            raise Keysight33500BError(
                f"{self.full_name}.run: no pattern loaded by this driver; call load_pattern first"
            )
        self._set_output_verified(self.pattern_channel, "ON")

    def stop(self) -> None:
        """Switch the pattern channel's output off and read it back."""
        self._set_output_verified(self.pattern_channel, "OFF")

    def safe_state(self) -> None:
        """Both outputs off, each read back (harmless when already off)."""
        for n in (1, 2):
            self._set_output_verified(n, "OFF")

    def _set_output_verified(self, n: int, state: str) -> None:
        """``OUTPut<n> 1|0``, then ``OUTPut<n>?``; sent again once if the readback differs
        (e.g. the write went into a link that had just dropped)."""
        output = self._channel(n).parameters["output"]
        for _ in range(2):
            output(state)
            if output.get() == state:
                return
        raise Keysight33500BError(
            f"{self.full_name}: output {n} did not switch {state} (OUTPut{n}? disagrees)"
        )

    # -- other instrument functions --------------------------------------------------------
    def catalog(self, channel: int | None = None) -> list[str]:
        """Names in the channel's volatile arb memory (``DATA:VOL:CAT?``)."""
        n = self.pattern_channel if channel is None else channel
        return _parse_catalog(self.ask(f"SOURce{n}:DATA:VOLatile:CATalog?"))

    def store_pattern(self, filename: str | None = None) -> str:
        r"""Save the selected arb of the pattern channel to internal memory.

        ``MMEMory:STORe:DATA<n> "<filename>"``; default ``INT:\<arb_name>.arb``.
        Returns the file name used.
        """
        if filename is None:
            filename = f"INT:\\{self.arb_name}.arb"
        if not filename.lower().endswith(".arb") or '"' in filename:
            raise ValueError(f"{self.full_name}.store_pattern: {filename!r} must end in .arb "
                             "and contain no quote")
        self.write(f'MMEMory:STORe:DATA{self.pattern_channel} "{filename}"')
        self.check_errors(context="store_pattern")
        return filename

    def reset(self) -> None:
        """``*RST`` (outputs off, factory settings) and forget the loaded pattern."""
        self.write("*RST")
        self.pattern = None
        for channel in (self.ch1, self.ch2):
            for parameter in channel.parameters.values():
                parameter.cache.invalidate()

    def read_errors(self) -> list[tuple[int, str]]:
        """Empty the error queue: every ``(code, message)`` read, oldest first.

        ``SYST:ERR?`` removes the entry it reports, so a reply lost with a dropped link
        (the query is then resent on a new link) loses that entry: a read that spanned
        a reconnect raises :class:`Keysight33500BCommunicationError` saying so, rather
        than report a queue that may be missing an error.
        """
        self.ensure_link(before="SYSTem:ERRor?")
        generation = self._link_generation
        try:
            errors, _ = drain_error_queue(self.ask, "SYSTem:ERRor?", self.ERROR_QUEUE_MAX)
        except MalformedErrorReplyError as err:
            raise Keysight33500BError(
                f"{self.full_name}: reply {err.reply!r} to 'SYSTem:ERRor?' is not an error entry"
            ) from None
        if self._link_generation != generation:
            read = "; ".join(f"{code},{message!r}" for code, message in errors) or "none"
            raise Keysight33500BCommunicationError(
                f"{self.full_name}: the link was re-established while the error queue was "
                f"read; an entry may have been lost with it (read: {read})")
        return errors

    def check_errors(self, context: str = "") -> None:
        """Raise :class:`Keysight33500BError` listing the queued errors, if any."""
        errors = self.read_errors()
        if errors:
            where = f" after {context}" if context else ""
            listed = "; ".join(f"{code},{message!r}" for code, message in errors)
            raise Keysight33500BError(f"{self.full_name}: instrument errors{where}: {listed}")

    # -- link handling -------------------------------------------------------------------
    def _write_block(self, header: str, codes: npt.NDArray[np.int16]) -> None:
        """``header`` + IEEE-488.2 block of big-endian int16 ``codes`` + terminator."""
        shown = f"{header}#<{2 * codes.size} bytes>"
        self.visa_log.debug(f"Writing: {shown}")

        def send() -> None:
            values = cast("Sequence[int]", codes)  # pyvisa packs numpy arrays directly
            self.visa_handle.write_binary_values(header, values, datatype="h",
                                                 is_big_endian=True)

        self._with_link(shown, send)

class _CallbackValidator(vals.Validator[float]):
    """A validator running ``check(value)`` (which raises ValueError to refuse)."""

    def __init__(self, check: Callable[[float], None]) -> None:
        self._check = check
        self._valid_values = (0.0,)

    def validate(self, value: float, context: str = "") -> None:
        self._check(value)

