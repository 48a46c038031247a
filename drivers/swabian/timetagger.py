"""QCoDeS driver for the Swabian Instruments Time Tagger 20 / Ultra / X.

The instrument is driven through Swabian's own Python library, PyPI package
``swabian-timetagger`` (2.22.x; Linux glibc ≥ 2.28 or Windows wheels), imported as
``from Swabian import TimeTagger`` — *not* ``import TimeTagger`` (older installers'
name, which the qcodes_contrib_drivers wrapper still uses).  The ``library`` argument
takes the module object; by default it is imported lazily when the instrument opens.

**Testing**: the library's virtual tagger needs a licence fetched from a connected
device, so the real library cannot run here.  The tests drive this driver through a
FAITHFUL FAKE of the API subset below,
:mod:`qkdlab.mock_instruments.swabian.fake_timetagger` (backed by the bench physics
model), plus conformance checks of the fake's names against the real wheel when it is
installed.

Sources (facts only; no prose or code copied): *Time Tagger User Manual / API
reference*, Swabian Instruments, software 2.22 (the docstrings of the 2.22.6 wheel and
swabianinstruments.com/static/documentation/TimeTagger/), and the Swabian knowledge
base on transfer rates:

================================  =====================================  =========
library call                      documentation                          used by
================================  =====================================  =========
``createTimeTagger(serial)``      api/TimeTagger.html                    __init__
``freeTimeTagger(tagger)``        api/TimeTagger.html                    close
``getModel``/``getSerial``        api/TimeTagger.html                    get_idn
``setTriggerLevel``/``get…``      api/TimeTagger.html (DAC step)         trigger_level
``getTriggerLevelRange``          api/TimeTagger.html                    validator
``setInputDelay``/``get…``        api/TimeTagger.html (hw ±2 µs Ultra)   input_delay
``setDeadtime``/``getDeadtime``   api/TimeTagger.html (returns actual)   dead_time
``getDeadtimeRange``              api/TimeTagger.html                    validator
``reset``                         api/TimeTagger.html                    reset
``TimeTagStream(t, n, chans)``    api/measurements/time_tag_streaming    acquire, stream
``TimeTagStreamBuffer``           same page; tag format, ``Tag::Type``   acquire, stream
``Countrate(t, chans)``           api/measurements/event_counting        count_rates
``Correlation(t, c1, c2, bw, n)`` api/measurements/time_histograms       correlation
``startFor``/``waitUntilFinished``  api/Measurements.html (IteratorBase)  all of them
``isRunning``/``stop``/``clear``  api/Measurements.html (IteratorBase)   all of them
================================  =====================================  =========

Facts the driver relies on:

* every timestamp is int64 ps since device start-up; channels 1…8 (TT20) or 1…18
  rising edges, negative numbers falling edges (sections/hardware.html);
* a ``TimeTagStream`` fills a buffer of ``n_max_events``; ``getData()`` hands it over
  and starts an empty one; events beyond ``n_max_events`` are lost and the only sign
  is ``size == n_max_events``.  ``tStart``/``tGetData`` give the stream positions of
  the start and of the call (used as block bounds);
* event types: TimeTag 0, Error 1, OverflowBegin 2, OverflowEnd 3, MissedEvents 4.
  Above the sustained transfer rate the device enters overflow mode: timing is dropped
  and only per-channel counts arrive as MissedEvents tags (uint16 each, possibly
  several per interval and channel);
* sustained rates: ≈ 80 M tags/s Ultra and X (USB 3; 82 M/s measured, ≈ 93 M/s with
  1 M-event blocks), ≈ 9 M tags/s TT20 (USB 2); stream blocks are sent every 131072
  events or 20 ms (knowledge base; the 2.22.6 ``setStreamBlockSize`` docstring gives
  1 M events as default block);
* dead time: at least one clock (6 ns TT20, 2 ns Ultra, 1.333 ns X), the TT20 rounds
  to its 6 ns clock, ``setDeadtime`` returns the value applied; maximum 393 µs TT20,
  2147 µs Ultra, 716 µs X;
* trigger level ranges 0…2.5 V TT20, −2.5…2.5 V Ultra, −1…1 V X; the level read back
  is the DAC's, which may differ from the request.

Driver choices: input delays are limited to ±1 ms (software delays hold tags in PC
memory; the library documents no limit); an ``Error`` tag marks the rest of its block
as an overflow interval (it invalidates the time base); a full stream buffer marks the
stretch after its last event as an overflow interval with an unknown count.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt
from qcodes import validators as vals
from qcodes.instrument import ChannelList, Instrument, InstrumentChannel
from qcodes.parameters import Parameter

from qkdlab.tags import CHANNEL_DTYPE, TIME_DTYPE, TagBlock

if TYPE_CHECKING:
    from qcodes.instrument import InstrumentBaseKWArgs
    from typing_extensions import Unpack

log = logging.getLogger(__name__)

PS_PER_S = 10**12
LIBRARY_MODULE = "Swabian.TimeTagger"

# Tag::Type (api/measurements/time_tag_streaming.html)
TAG_TIME_TAG = 0
TAG_ERROR = 1
TAG_OVERFLOW_BEGIN = 2
TAG_OVERFLOW_END = 3
TAG_MISSED_EVENTS = 4

MAX_INPUT_DELAY_S = 1e-3  # driver's guard, see module docstring
MAX_ACQUIRE_S = 3600.0
DEFAULT_STREAM_EVENTS = 2**21  # > 20 ms of 80 M tags/s


@dataclass(frozen=True)
class ModelLimits:
    """Documented limits of one model (see the module docstring)."""

    trigger_range_v: tuple[float, float]
    dead_time_range_ps: tuple[int, int]
    max_rate_hz: float


MODEL_LIMITS: dict[str, ModelLimits] = {
    "Time Tagger 20": ModelLimits((0.0, 2.5), (6000, 393_000_000), 9e6),
    "Time Tagger Ultra": ModelLimits((-2.5, 2.5), (2000, 2_147_000_000), 80e6),
    "Time Tagger X": ModelLimits((-1.0, 1.0), (1333, 716_000_000), 80e6),
}
FALLBACK_LIMITS = ModelLimits((-2.5, 2.5), (1333, 2_147_000_000), 80e6)

I64Array = npt.NDArray[np.int64]


class SwabianTimeTaggerError(Exception):
    """The library refused a call, the device is gone, or the data are inconsistent."""


@dataclass
class StreamStats:
    """Figures of the last acquisition or stream (tests, benchmarks, logs)."""

    n_max_events: int = 0
    blocks: int = 0
    tags: int = 0
    peak_buffer_events: int = 0
    lost_tags: int = 0
    overflow_blocks: int = 0
    buffer_full_blocks: int = 0
    error_tags: int = 0


class CorrelationResult(NamedTuple):
    """A correlation histogram: bin times (ps, as ``getIndex()``), counts, capture (ps)."""

    delay_ps: I64Array
    counts: I64Array
    duration_ps: int


def load_library(library: ModuleType | str | Any | None) -> Any:
    """The Time Tagger library: a module object, a module name, or ``Swabian.TimeTagger``."""
    if library is None or isinstance(library, str):
        name = library or LIBRARY_MODULE
        try:
            return importlib.import_module(name)
        except ImportError as err:
            hint = (" (pip install swabian-timetagger: wheels for Linux glibc >= 2.28 and "
                    "Windows; the import is 'from Swabian import TimeTagger')"
                    if name == LIBRARY_MODULE else "")
            raise SwabianTimeTaggerError(f"cannot import the Time Tagger library "
                                         f"{name!r}: {err}{hint}") from err
    return library


def _merge_intervals(pairs: list[tuple[int, int]], start: int, stop: int) -> I64Array:
    """Clip ``[begin, end)`` pairs to the block, widen empty ones to 1 ps, join overlaps."""
    if not pairs:
        return np.zeros((0, 2), np.int64)
    iv = np.array(sorted(pairs), np.int64)
    iv[:, 1] = np.maximum(iv[:, 1], iv[:, 0] + 1)
    iv = np.clip(iv, start, max(stop, start))
    iv = iv[iv[:, 1] > iv[:, 0]]
    if iv.shape[0] == 0:
        return np.zeros((0, 2), np.int64)
    out = [list(iv[0])]
    for b, e in iv[1:].tolist():
        if b <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([b, e])
    return np.array(out, np.int64)


# ------------------------------------------------------------------ channels


class SwabianTimeTaggerInput(InstrumentChannel):
    """One input (rising-edge channel ``n``): trigger level (V), delay (s), dead time (s)."""

    def __init__(self, parent: SwabianTimeTagger, name: str, channel: int,
                 trigger_range_v: tuple[float, float],
                 dead_time_range_ps: tuple[int, int]) -> None:
        super().__init__(parent, name)
        self.channel = channel
        self._tt = parent
        lo_v, hi_v = trigger_range_v
        lo_ps, hi_ps = dead_time_range_ps
        # api/TimeTagger.html: setTriggerLevel / getTriggerLevel (V, DAC step)
        self.trigger_level: Parameter = self.add_parameter(
            "trigger_level", label=f"input {channel} trigger level", unit="V",
            get_cmd=lambda: self._tt.call("getTriggerLevel", channel),
            set_cmd=lambda v: self._tt.call("setTriggerLevel", channel, float(v)),
            get_parser=float, vals=vals.Numbers(lo_v, hi_v),
            docstring=f"Discriminator level (V, {lo_v}…{hi_v} V on this model); a pulse "
                      "that does not cross it gives no tag.  get() returns the DAC's "
                      "applied level, which may differ from the request by one step.")
        # api/TimeTagger.html: setInputDelay / getInputDelay (integer ps)
        self.input_delay: Parameter = self.add_parameter(
            "input_delay", label=f"input {channel} delay", unit="s",
            get_cmd=lambda: self._tt.call("getInputDelay", channel),
            set_cmd=lambda ps: self._tt.call("setInputDelay", channel, ps),
            set_parser=lambda s: round(float(s) * PS_PER_S),
            get_parser=lambda ps: int(ps) / PS_PER_S,
            vals=vals.Numbers(-MAX_INPUT_DELAY_S, MAX_INPUT_DELAY_S),
            docstring="Delay added to this input's tags (s; sent as integer ps).  The "
                      "library applies it on board within the hardware range (Ultra "
                      "±2 µs, X ±2.5 µs) and in software otherwise (always on the TT20).")
        # api/TimeTagger.html: setDeadtime (returns the applied value) / getDeadtime
        self.dead_time: Parameter = self.add_parameter(
            "dead_time", label=f"input {channel} dead time", unit="s",
            get_cmd=lambda: self._tt.call("getDeadtime", channel),
            set_cmd=self._set_dead_time_ps,
            set_parser=lambda s: round(float(s) * PS_PER_S),
            get_parser=lambda ps: int(ps) / PS_PER_S,
            vals=vals.Numbers(lo_ps / PS_PER_S, hi_ps / PS_PER_S),
            docstring="Minimum spacing of this input's tags (s).  At least one clock "
                      "period; the TT20 rounds to its 6 ns clock: get() returns the "
                      "applied value.")

    def _set_dead_time_ps(self, ps: int) -> None:
        applied = int(self._tt.call("setDeadtime", self.channel, int(ps)))
        if applied != ps:
            log.info("%s: dead time %d ps requested, %d ps applied", self.full_name, ps,
                     applied)


# ------------------------------------------------------------------ instrument


class _OverflowState:
    """Overflow interval still open at the end of the previous block."""

    def __init__(self) -> None:
        self.open_since: int | None = None


class SwabianTimeTagger(Instrument):
    """Swabian Time Tagger 20 / Ultra / X through the vendor library.

    Satisfies :class:`qkdlab.drivers.roles.TimeTagger`.  Tag channels are the library's
    (1…N rising edges); ``TagBlock`` times are int64 ps on the device clock.

    Args:
        name: instrument name.
        serial: serial number of the device to open ("" = the first free one).
        library: the Time Tagger library (module object or module name); default
            ``Swabian.TimeTagger``, imported here.
        resolution: ``createTimeTagger`` resolution mode (None: library default).
        channels: the inputs this instrument uses (1…N).
        stream_buffer_events: ``n_max_events`` of each ``TimeTagStream`` (memory bound).
        poll_interval_s: target time between two ``getData()`` calls (s).
        count_integration_s: integration time of :meth:`count_rates` (s).
    """

    def __init__(
        self,
        name: str,
        serial: str = "",
        *,
        library: ModuleType | str | Any | None = None,
        resolution: int | None = None,
        channels: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8),
        stream_buffer_events: int = DEFAULT_STREAM_EVENTS,
        poll_interval_s: float = 0.01,
        count_integration_s: float = 0.1,
        **kwargs: Unpack[InstrumentBaseKWArgs],
    ) -> None:
        chans = tuple(int(c) for c in channels)
        if not chans or len(set(chans)) != len(chans) or any(c < 1 for c in chans):
            raise ValueError(f"{name}: channels must be distinct inputs >= 1, got "
                             f"{channels!r}")
        self.library = load_library(library)
        self.serial_requested = serial
        self.resolution = resolution
        self.tagger: Any = None
        self._lock = threading.RLock()
        self._active: list[Any] = []
        self._stop_requested = False
        self.last_stream_stats = StreamStats()
        super().__init__(name, **kwargs)
        self.channels = chans
        try:
            self._open()
            model = self.call("getModel")
        except Exception:
            super().close()  # unregister the name: nothing was opened
            raise
        self.limits = MODEL_LIMITS.get(str(model), FALLBACK_LIMITS)

        self.model: Parameter = self.add_parameter(
            "model", label="model", get_cmd=lambda: self.call("getModel"), set_cmd=False,
            docstring="Model name reported by the library (e.g. 'Time Tagger Ultra').")
        self.serial_number: Parameter = self.add_parameter(
            "serial_number", label="serial number", get_cmd=lambda: self.call("getSerial"),
            set_cmd=False, docstring="Serial number of the open device.")
        self.stream_buffer_events: Parameter = self.add_parameter(
            "stream_buffer_events", label="stream buffer", unit="events",
            initial_value=int(stream_buffer_events), get_cmd=None, set_cmd=None,
            vals=vals.Ints(1024, 2**28),
            docstring="n_max_events of each TimeTagStream: the most events one poll can "
                      "hold; more are lost by the library (reported as overflow).")
        self.poll_interval: Parameter = self.add_parameter(
            "poll_interval", label="poll interval", unit="s", initial_value=poll_interval_s,
            get_cmd=None, set_cmd=None, vals=vals.Numbers(0.0, 1.0),
            docstring="Target time between two getData() calls while streaming (s).")
        self.count_integration_time: Parameter = self.add_parameter(
            "count_integration_time", label="count-rate integration", unit="s",
            initial_value=count_integration_s, get_cmd=None, set_cmd=None,
            vals=vals.Numbers(1e-6, 3600.0),
            docstring="Integration time of count_rates() (s).")

        inputs = ChannelList(self, "inputs", SwabianTimeTaggerInput)
        for ch in chans:
            inp = SwabianTimeTaggerInput(self, f"ch{ch}", ch, self._trigger_range(ch),
                                         self._dead_time_range(ch))
            inputs.append(inp)
            self.add_submodule(f"ch{ch}", inp)
        self.inputs = inputs
        self.add_submodule("inputs", inputs.to_channel_tuple())
        self.connect_message()

    # -- library access ---------------------------------------------------------------
    def _open(self) -> None:
        args: list[Any] = [self.serial_requested]
        if self.resolution is not None:
            args.append(self.resolution)
        try:
            self.tagger = self.library.createTimeTagger(*args)
        except Exception as err:
            which = f"serial {self.serial_requested!r}" if self.serial_requested else \
                "the first free device"
            raise SwabianTimeTaggerError(f"{self.name}: createTimeTagger({which}) failed: "
                                         f"{err}") from err

    def call(self, method: str, *args: Any) -> Any:
        """``tagger.<method>(*args)``; library errors become :class:`SwabianTimeTaggerError`."""
        if self.tagger is None:
            raise SwabianTimeTaggerError(f"{self.name}: no open Time Tagger (closed?)")
        try:
            return getattr(self.tagger, method)(*args)
        except SwabianTimeTaggerError:
            raise
        except Exception as err:
            arglist = ", ".join(repr(a) for a in args)
            raise SwabianTimeTaggerError(f"{self.name}: {method}({arglist}) failed: "
                                         f"{type(err).__name__}: {err}") from err

    def _measure(self, what: str, make: Any) -> Any:
        """Create a measurement object; library errors name the instrument."""
        try:
            return make()
        except Exception as err:
            raise SwabianTimeTaggerError(f"{self.name}: {what} failed: "
                                         f"{type(err).__name__}: {err}") from err

    def _trigger_range(self, channel: int) -> tuple[float, float]:
        if hasattr(self.tagger, "getTriggerLevelRange"):
            lo, hi = self.call("getTriggerLevelRange", channel)
            return float(lo), float(hi)
        return self.limits.trigger_range_v

    def _dead_time_range(self, channel: int) -> tuple[int, int]:
        if hasattr(self.tagger, "getDeadtimeRange"):
            lo, hi = self.call("getDeadtimeRange", channel)
            return int(lo), int(hi)
        return self.limits.dead_time_range_ps

    def reconnect(self) -> None:
        """Open the device again (after an unplug) and re-apply the cached settings."""
        self.safe_state()
        old, self.tagger = self.tagger, None
        if old is not None:
            with contextlib.suppress(Exception):
                self.library.freeTimeTagger(old)
        self._open()
        for inp in self.inputs:
            for param in (inp.trigger_level, inp.input_delay, inp.dead_time):
                if param.cache.valid:
                    param.set(param.cache.get(get_if_invalid=False))

    def close(self) -> None:
        """Stop measurements, free the device, close the instrument."""
        if "_lock" not in self.__dict__:  # already closed (QCoDeS strips attributes)
            super().close()
            return
        self.safe_state()
        tagger, self.tagger = self.tagger, None
        if tagger is not None:
            try:
                self.library.freeTimeTagger(tagger)
            except Exception as err:
                log.warning("%s: freeTimeTagger failed: %s", self.name, err)
        super().close()

    # -- identity, reset ----------------------------------------------------------------
    def get_idn(self) -> dict[str, str | None]:
        """Vendor, model, serial and firmware (library version when no firmware call)."""
        firmware: str | None = None
        if hasattr(self.tagger, "getFirmwareVersion"):
            with contextlib.suppress(Exception):
                firmware = str(self.tagger.getFirmwareVersion())
        if firmware is None and hasattr(self.library, "getVersion"):
            firmware = f"library {self.library.getVersion()}"
        return {"vendor": "Swabian Instruments", "model": str(self.call("getModel")),
                "serial": str(self.call("getSerial")), "firmware": firmware}

    def reset(self) -> None:
        """Start-up settings of the device (``reset``); parameter caches invalidated."""
        self.call("reset")
        for inp in self.inputs:
            for param in (inp.trigger_level, inp.input_delay, inp.dead_time):
                param.cache.invalidate()

    # -- TimeTagger role -----------------------------------------------------------------
    def input_channel(self, channel: int) -> SwabianTimeTaggerInput:
        """The input object of tag channel ``channel``."""
        for inp in self.inputs:
            if inp.channel == channel:
                found: SwabianTimeTaggerInput = inp
                return found
        raise ValueError(f"{self.name}: channel {channel} is not one of {self.channels}")

    def set_trigger_level(self, channel: int, level_v: float) -> None:
        """Discriminator level of ``channel`` (V)."""
        self.input_channel(channel).trigger_level(level_v)

    def set_input_delay(self, channel: int, delay_ps: int) -> None:
        """Delay added to ``channel``'s tags (integer ps)."""
        if int(delay_ps) != delay_ps:
            raise ValueError(f"{self.name}: delay_ps must be an integer, got {delay_ps}")
        self.input_channel(channel).input_delay(int(delay_ps) / PS_PER_S)

    def set_dead_time(self, channel: int, dead_time_ps: int) -> None:
        """Dead time of ``channel`` (ps; the device may round it, see ``dead_time``)."""
        inp = self.input_channel(channel)
        inp.dead_time(int(dead_time_ps) / PS_PER_S)
        inp.dead_time.get()  # the cache holds the applied value

    def acquire(self, duration_s: float) -> TagBlock:
        """Tags of the next ``duration_s`` seconds as one block (memory ∝ duration)."""
        duration_ps = self._duration_ps(duration_s)
        blocks = list(self._run_stream(duration_ps))
        block = TagBlock.concatenate(blocks)
        if block.duration_ps < duration_ps:
            raise SwabianTimeTaggerError(
                f"{self.name}: acquisition stopped after {block.duration_ps} of "
                f"{duration_ps} ps (safe_state or the device stopped it)")
        return block

    def stream(self, duration_s: float | None = None) -> Iterator[TagBlock]:
        """Consecutive blocks, one per ``getData()`` poll (endless when None).

        Memory is bounded by ``stream_buffer_events``; each block reports overflow
        (MissedEvents counts, OverflowBegin/End intervals, a full buffer).
        """
        duration_ps = None if duration_s is None else self._duration_ps(duration_s)
        return self._skip_empty(self._run_stream(duration_ps))

    @staticmethod
    def _skip_empty(blocks: Iterator[TagBlock]) -> Iterator[TagBlock]:
        """Drop zero-length empty blocks (a poll right after the end); close the source."""
        try:
            for block in blocks:
                if block.duration_ps or len(block) or block.overflow:
                    yield block
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                close()

    def count_rates(self, channels: Sequence[int] | None = None) -> list[float]:
        """Counts per second of ``channels`` (default all) over ``count_integration_time``.

        Library ``Countrate``: MissedEvents are counted, so the rates stay right in
        overflow.
        """
        chans = [int(c) for c in (channels if channels is not None else self.channels)]
        for c in chans:
            self.input_channel(c)
        duration_ps = round(float(self.count_integration_time()) * PS_PER_S)
        meas = self._measure(f"Countrate({chans})",
                             lambda: self.library.Countrate(self.tagger, chans))
        self._run_measurement(meas, duration_ps, "Countrate")
        return [float(x) for x in np.asarray(meas.getData(), np.float64)]

    def correlation(self, channel_1: int, channel_2: int, binwidth_ps: int, n_bins: int,
                    duration_s: float) -> CorrelationResult:
        """Histogram of ``channel_1 − channel_2`` time differences over ``duration_s``.

        Library ``Correlation``; bin times as its ``getIndex()`` (ps).
        """
        self.input_channel(channel_1)
        self.input_channel(channel_2)
        if int(binwidth_ps) != binwidth_ps or binwidth_ps < 1:
            raise ValueError(f"{self.name}: binwidth_ps must be an integer >= 1, got "
                             f"{binwidth_ps}")
        if int(n_bins) != n_bins or not 1 <= n_bins <= 10**7:
            raise ValueError(f"{self.name}: n_bins must be an integer in 1…1e7, got {n_bins}")
        duration_ps = self._duration_ps(duration_s)
        meas = self._measure(
            f"Correlation({channel_1}, {channel_2}, {binwidth_ps}, {n_bins})",
            lambda: self.library.Correlation(self.tagger, int(channel_1), int(channel_2),
                                             int(binwidth_ps), int(n_bins)))
        self._run_measurement(meas, duration_ps, "Correlation")
        return CorrelationResult(np.asarray(meas.getIndex(), np.int64),
                                 np.asarray(meas.getData(), np.int64),
                                 int(meas.getCaptureDuration()))

    def safe_state(self) -> None:
        """Stop every running measurement of this instrument (never raises)."""
        if "_lock" not in self.__dict__:  # closed
            return
        self._stop_requested = True
        with self._lock:
            active = list(self._active)
        for meas in active:
            try:
                meas.stop()
            except Exception as err:
                log.warning("%s: stopping a measurement failed: %s", self.name, err)

    # -- machinery ---------------------------------------------------------------------
    def _duration_ps(self, duration_s: float) -> int:
        if not 0.0 < float(duration_s) <= MAX_ACQUIRE_S or math.isnan(duration_s):
            raise ValueError(f"{self.name}: duration {duration_s} s not in (0, "
                             f"{MAX_ACQUIRE_S:g}] s")
        return max(1, round(float(duration_s) * PS_PER_S))

    def _run_measurement(self, meas: Any, duration_ps: int, what: str) -> None:
        """``startFor`` + ``waitUntilFinished`` with a timeout; always stopped after."""
        with self._lock:
            self._active.append(meas)
        try:
            meas.startFor(duration_ps)
            timeout_ms = int(duration_ps / 1e9) + 10_000
            if not meas.waitUntilFinished(timeout_ms):
                raise SwabianTimeTaggerError(
                    f"{self.name}: {what} did not finish within {timeout_ms} ms")
        except SwabianTimeTaggerError:
            raise
        except Exception as err:
            raise SwabianTimeTaggerError(f"{self.name}: {what} failed: "
                                         f"{type(err).__name__}: {err}") from err
        finally:
            with contextlib.suppress(Exception):
                meas.stop()
            with self._lock:
                self._active.remove(meas)

    def _run_stream(self, duration_ps: int | None) -> Iterator[TagBlock]:
        n_max = int(self.stream_buffer_events())
        stream = self._measure(
            f"TimeTagStream({n_max}, {list(self.channels)})",
            lambda: self.library.TimeTagStream(self.tagger, n_max, list(self.channels)))
        stats = StreamStats(n_max_events=n_max)
        self.last_stream_stats = stats
        state = _OverflowState()
        self._stop_requested = False
        with self._lock:
            self._active.append(stream)
        try:
            try:
                if duration_ps is None:
                    stream.clear()
                    stream.start()
                else:
                    stream.startFor(duration_ps)
            except Exception as err:
                raise SwabianTimeTaggerError(f"{self.name}: starting the TimeTagStream "
                                             f"failed: {err}") from err
            prev_stop: int | None = None
            while True:
                polled = time.monotonic()
                try:
                    running = bool(stream.isRunning())
                    buf = stream.getData()
                except Exception as err:
                    raise SwabianTimeTaggerError(
                        f"{self.name}: TimeTagStream.getData() failed after "
                        f"{stats.blocks} blocks: {type(err).__name__}: {err}") from err
                start = int(buf.tStart) if prev_stop is None else prev_stop
                stop = int(buf.tGetData)
                if duration_ps is not None:
                    stop = min(stop, int(buf.tStart) + duration_ps)
                block = self._decode(buf, start, max(stop, start), state, n_max, stats)
                prev_stop = block.stop_ps
                yield block
                if not running or self._stop_requested:
                    break
                pause = float(self.poll_interval()) - (time.monotonic() - polled)
                if pause > 0:
                    time.sleep(pause)
        finally:
            with contextlib.suppress(Exception):
                stream.stop()
            with self._lock:
                if stream in self._active:
                    self._active.remove(stream)

    def _decode(self, buf: Any, start: int, stop: int, state: _OverflowState, n_max: int,
                stats: StreamStats) -> TagBlock:
        """One ``TimeTagStreamBuffer`` as a TagBlock with its overflow report."""
        size = int(buf.size)
        ts = np.asarray(buf.getTimestamps(), dtype=np.int64)
        kinds = np.asarray(buf.getEventTypes())
        chans = np.asarray(buf.getChannels())
        if not ts.size == kinds.size == chans.size:
            raise SwabianTimeTaggerError(
                f"{self.name}: inconsistent stream buffer ({ts.size} timestamps, "
                f"{kinds.size} types, {chans.size} channels)")
        intervals: list[tuple[int, int]] = []
        lost = 0
        overflow = bool(buf.hasOverflows)
        special = kinds != TAG_TIME_TAG
        if special.any():
            missed = np.asarray(buf.getMissedEvents())
            for i in np.flatnonzero(special).tolist():
                kind, t = int(kinds[i]), int(ts[i])
                if kind == TAG_OVERFLOW_BEGIN:
                    if state.open_since is None:
                        state.open_since = t
                elif kind == TAG_OVERFLOW_END:
                    began = state.open_since if state.open_since is not None else start
                    intervals.append((began, t))
                    state.open_since = None
                elif kind == TAG_MISSED_EVENTS:
                    lost += int(missed[i])
                    if state.open_since is None:
                        state.open_since = start
                else:
                    stats.error_tags += 1
                    log.error("%s: the library reports an error event (type %d) at %d ps; "
                              "the rest of the block is marked as overflow", self.name,
                              kind, t)
                    intervals.append((t, stop))
            keep = ~special
            ts, chans = ts[keep], chans[keep]
        if state.open_since is not None:
            intervals.append((state.open_since, stop))
            state.open_since = stop
        if size >= n_max:
            stats.buffer_full_blocks += 1
            last = int(ts[-1]) + 1 if ts.size else start
            log.warning("%s: TimeTagStream buffer full (%d events): tags after %d ps are "
                        "lost; raise stream_buffer_events or poll faster", self.name, size,
                        last)
            intervals.append((last, stop))
        if ts.size:
            if ts.size > 1 and not bool(np.all(ts[1:] >= ts[:-1])):
                log.warning("%s: stream tags out of order (delay changed while streaming?)"
                            "; sorted", self.name)
                order = np.argsort(ts, kind="stable")
                ts, chans = ts[order], chans[order]
            if int(ts[0]) < start:
                log.warning("%s: %d tags before the block start %d ps (delay changed while "
                            "streaming?)", self.name, int(np.count_nonzero(ts < start)), start)
            stop = max(stop, int(ts[-1]) + 1)  # the next block starts here
        if overflow and not intervals and lost == 0:
            intervals.append((start, stop))  # the library says so, but not where
        iv = _merge_intervals(intervals, start, stop)
        overflow = overflow or lost > 0 or iv.shape[0] > 0
        stats.blocks += 1
        stats.tags += int(ts.size)
        stats.peak_buffer_events = max(stats.peak_buffer_events, size)
        stats.lost_tags += lost
        stats.overflow_blocks += int(overflow)
        if lost:
            log.warning("%s: %d tags lost in overflow mode in [%d, %d) ps", self.name, lost,
                        start, stop)
        return TagBlock(channel=chans.astype(CHANNEL_DTYPE), time_ps=ts.astype(TIME_DTYPE,
                        copy=False), start_ps=start, stop_ps=stop, overflow=overflow,
                        lost_tags=lost, overflow_intervals=iv)
