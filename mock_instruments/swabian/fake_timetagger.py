"""A FAITHFUL FAKE of the part of Swabian's Time Tagger Python API that qkdlab uses.

This is **not** Swabian's library.  The real one is the PyPI package
``swabian-timetagger`` (imported as ``from Swabian import TimeTagger``).  Its virtual
tagger needs a licence fetched from a connected device, so nothing of it can run
without hardware; the driver is therefore tested against this fake, which
reproduces — names, signatures, return types and documented semantics — only the
subset below, backed by the bench physics model instead of a USB device.

Sources (facts only; no prose or code copied):

* *Time Tagger User Manual / API reference*, Swabian Instruments, as shipped in the
  ``swabian-timetagger`` 2.22.6 wheel (the docstrings of ``Swabian.TimeTagger``) and
  online at swabianinstruments.com/static/documentation/TimeTagger/:
  ``api/TimeTagger.html`` (``createTimeTagger``, ``createTimeTaggerVirtual``,
  ``freeTimeTagger``, ``setTriggerLevel``/``getTriggerLevel`` — the level read back
  may differ from the request by the DAC step —, ``setInputDelay``/``getInputDelay``
  — software delay on the TT20 or beyond the hardware range, hardware delay of
  ±2 µs on the Ultra and ±2.5 µs on the X —, ``setDeadtime`` — minimum one clock
  period: 6 ns TT20, 2 ns Ultra, 1.333 ns X; the TT20 rounds to a multiple of 6 ns;
  the actual value is returned; maximum 393 µs TT20, 2147 µs Ultra, 716 µs X,
  larger raises —, ``getSerial``, ``getModel``, ``setHardwareBufferSize`` — 64 MTags
  default, 32 kTags to 512 MTags; TT20 8 MTags —, ``getOverflows``);
  ``api/measurements/time_tag_streaming.html`` (``TimeTagStream(tagger,
  n_max_events, channels)``: a buffer of ``n_max_events`` filled until ``getData()``
  hands it over and starts an empty one, tags beyond it are lost; the tag format:
  8-bit type, 16-bit missed-event count, 32-bit channel, 64-bit time in ps since
  device start-up; ``TimeTagStreamBuffer``: ``getTimestamps``, ``getChannels``,
  ``getEventTypes``, ``getMissedEvents``, properties ``size``, ``hasOverflows``,
  ``tStart``, ``tGetData``); the ``Tag::Type`` enum: TimeTag 0, Error 1,
  OverflowBegin 2, OverflowEnd 3, MissedEvents 4 — in overflow mode the timing of
  every event is skipped and only the number of events per channel is sent as
  MissedEvents tags, possibly several per interval and channel (uint16 counts);
  ``api/measurements/event_counting.html`` (``Countrate(tagger, channels)``, counts
  per second, correct even when the transfer rate is exceeded);
  ``api/measurements/time_histograms.html`` and the ``Correlation`` docstring
  (``Correlation(tagger, channel_1, channel_2=CHANNEL_UNUSED, binwidth=1000,
  n_bins=1000)``: time differences of clicks on ``channel_1`` minus ``channel_2``,
  both signs); ``api/Measurements.html`` (``IteratorBase``: measurements start on
  creation; ``start``, ``startFor(capture_duration, clear=True)``, ``stop``,
  ``clear``, ``isRunning``, ``waitUntilFinished(timeout=-1)``,
  ``getCaptureDuration``); ``sections/hardware.html`` (trigger level ranges: 0…2.5 V
  TT20, −2.5…2.5 V Ultra, −1…1 V X; inputs 1…8/18 rising, negative numbers falling).
* Swabian knowledge base, "Transfer rate limits for each Time Tagger model": about
  80 M tags/s for the Ultra and the X over USB 3, about 9 M tags/s for the TT20
  (USB 2); "Parameters for improving maximum data transfer rate": stream blocks of
  131072 events or 20 ms latency (the 2.22.6 docstring of ``setStreamBlockSize``
  says the default block is 1 M events; both agree on 20 ms).

The fake's own choices (the documentation is silent; marked *fake* below):

* **time**: the tagger's stream time only advances when a consumer asks for data:
  ``TimeTagStream.getData()`` of a running stream advances it by one block latency
  (``getdata_advance_s``, 20 ms), ``waitUntilFinished()`` until the measurement ends.
  A slow consumer therefore never makes the link overflow (the device's rate limit
  does, below), but a ``TimeTagStream`` whose ``n_max_events`` is smaller than one
  block's tags loses the excess exactly as the real buffer does;
* **inputs**: every detector pulse and marker has the amplitude
  ``pulse_amplitude_v`` (1 V, positive from a 0 V baseline); an input tags a pulse
  only if ``0 < trigger level < amplitude``; the trigger DAC has 12 bits over the
  model's range; falling-edge (negative) channels are not modelled;
* **link**: the device buffer (``buffer_tags``) is drained at the model's sustained
  rate (``max_rate_hz``).  A tag that finds it full starts an overflow interval
  (OverflowBegin at that tag's time); inside it every tag is counted, not timed, until
  the buffer has drained to ``resume_fraction`` of its size (OverflowEnd).  Counts are
  sent as MissedEvents tags per channel at the interval's end, or at the end of each
  block while it lasts;
* **order**: dead time (non-paralysable, per channel, on the input's raw times), then
  input delay, then the link.  Changing a delay while a measurement runs may leave
  tags out of order at the change;
* **timebase**: timestamps are the bench's tagger time (its ``offset_ps``/``ppm``
  clock); ``Countrate`` divides by the capture duration (stream time);
* **Correlation** bins: bin *k* holds ``channel_1 − channel_2`` differences in
  ``[lo + k·binwidth, lo + (k+1)·binwidth)`` with ``lo = −(n_bins·binwidth)//2``;
  ``getIndex()`` returns those left edges (Swabian's exact index convention was not
  verified; the driver passes ``getIndex()`` through unchanged).

Bench coupling: :meth:`FakeDevice.attach_bench` (channel map, and — unless
``own_link_limit=False`` — it raises ``bench.tagger.max_rate_hz`` to 1e15 so that the
bench itself never drops a tag: this fake models the Swabian link) and
:meth:`FakeDevice._bench_window` are the only places the bench is touched.  Bench
channel ``c >= 1`` is tagger input ``c``; the bench's sync channel 0 becomes the
first input no detector uses (5 with the default bench), or give ``channel_map``.

Usage::

    from qkdlab.mock_instruments.swabian import fake_timetagger as fake
    lib = fake.FakeSwabianLibrary()
    device = lib.attach(bench, model="Time Tagger Ultra")
    tt = SwabianTimeTagger("tt", library=lib)      # or attach to the module-level
    ...                                            # library and pass the module
"""

# The vendor API is camelCase (getData, startFor, ...): the fake keeps its names.
# ruff: noqa: N802, N816

from __future__ import annotations

import enum
import itertools
import logging
import math
import threading
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
I32Array = npt.NDArray[np.int32]
U8Array = npt.NDArray[np.uint8]
U16Array = npt.NDArray[np.uint16]
BoolArray = npt.NDArray[np.bool_]

PS_PER_S = 10**12
CHANNEL_UNUSED = -134217728  # value of Swabian.TimeTagger.CHANNEL_UNUSED (2.22.6)
MAX_MISSED_PER_TAG = 2**16 - 1  # the missed-event count of a tag is a uint16
FAKE_VERSION = "2.22.6+qkdlab-fake"
DAC_BITS = 12  # *fake*: trigger DAC resolution
_NEVER = -(2**62)


class TagType(enum.IntEnum):
    """``Tag::Type`` of the Time Tagger API (values as in the 2.22.6 library)."""

    TimeTag = 0
    Error = 1
    OverflowBegin = 2
    OverflowEnd = 3
    MissedEvents = 4


class Resolution(enum.IntEnum):
    """``Resolution`` of ``createTimeTagger`` (values as in the 2.22.6 library)."""

    Standard = 0
    HighResA = 1
    HighResB = 2
    HighResC = 3


@dataclass(frozen=True)
class ModelSpec:
    """Documented figures of one Time Tagger model (see the module docstring)."""

    name: str
    n_inputs: int
    ps_per_clock: int
    dead_time_min_ps: int
    dead_time_max_ps: int
    dead_time_rounds_to_clock: bool
    trigger_range_v: tuple[float, float]
    max_rate_hz: float
    buffer_tags: int
    hardware_delay_ps: int  # |hardware delay| range; 0 = software delay only


MODELS: dict[str, ModelSpec] = {
    "Time Tagger 20": ModelSpec("Time Tagger 20", 8, 6000, 6000, 393_000_000, True,
                                (0.0, 2.5), 9e6, 8 * 2**20, 0),
    "Time Tagger Ultra": ModelSpec("Time Tagger Ultra", 8, 2000, 2000, 2_147_000_000, False,
                                   (-2.5, 2.5), 80e6, 64 * 2**20, 2_000_000),
    "Time Tagger X": ModelSpec("Time Tagger X", 8, 1333, 1333, 716_000_000, False,
                               (-1.0, 1.0), 80e6, 64 * 2**20, 2_500_000),
}
VIRTUAL_SPEC = ModelSpec("Time Tagger Virtual", 18, 1, 0, 2_147_000_000, False,
                         (-2.5, 2.5), 1e12, 512 * 2**20, 0)
MIN_HW_BUFFER = 32 * 2**10
MAX_HW_BUFFER = 512 * 2**20


# ------------------------------------------------------------------ kernels


@numba.njit(cache=True)
def _dead_time_kernel(times: IntArray, chans: I32Array, dead_ps: IntArray,
                      last_kept: IntArray) -> BoolArray:  # pragma: no cover - numba
    """Non-paralysable dead time per channel; ``last_kept`` carries across calls."""
    n = times.size
    keep = np.empty(n, np.bool_)
    for i in range(n):
        c = chans[i]
        t = times[i]
        if t - last_kept[c] >= dead_ps[c]:
            keep[i] = True
            last_kept[c] = t
        else:
            keep[i] = False
    return keep


@numba.njit(cache=True)
def _link_kernel(times: IntArray, t_end: int, rate_per_ps: float, capacity: float,
                 resume_level: float, fstate: npt.NDArray[np.float64],
                 istate: IntArray) -> tuple[BoolArray, I32Array, IntArray,
                                            npt.NDArray[np.int8], I32Array]:  # pragma: no cover
    """Device buffer drained at ``rate_per_ps``; overflow mode while it is full.

    Returns (kept mask, interval ordinal of each missed tag or −1, transition times,
    transition kinds 2/3, ordinal of each transition).  Ordinal 0 is the interval
    open at the start when the link was already in overflow.
    """
    n = times.size
    keep = np.empty(n, np.bool_)
    ival = np.full(n, -1, np.int32)
    tr_time = np.empty(n + 2, np.int64)
    tr_kind = np.empty(n + 2, np.int8)
    tr_ord = np.empty(n + 2, np.int32)
    ntr = 0
    level = fstate[0]
    last_t = istate[0]
    in_ovf = istate[1] != 0
    cur = -1
    nint = 0
    if in_ovf:
        cur = 0
        nint = 1
    for i in range(n + 1):
        t = times[i] if i < n else t_end
        if t > last_t:
            new_level = level - rate_per_ps * (t - last_t)
            if in_ovf and new_level <= resume_level:
                tc = last_t + np.int64(math.ceil((level - resume_level) / rate_per_ps))
                tc = max(tc, last_t)
                tc = min(tc, t)
                if i < n or tc < t_end:
                    tr_time[ntr] = tc
                    tr_kind[ntr] = 3
                    tr_ord[ntr] = cur
                    ntr += 1
                    in_ovf = False
                    cur = -1
            level = max(0.0, new_level)
            last_t = t
        if i == n:
            break
        if in_ovf:
            keep[i] = False
            ival[i] = cur
        elif level + 1.0 > capacity:
            in_ovf = True
            cur = nint
            nint += 1
            tr_time[ntr] = t
            tr_kind[ntr] = 2
            tr_ord[ntr] = cur
            ntr += 1
            keep[i] = False
            ival[i] = cur
        else:
            level += 1.0
            keep[i] = True
    fstate[0] = level
    istate[0] = last_t
    istate[1] = 1 if in_ovf else 0
    return keep, ival, tr_time[:ntr], tr_kind[:ntr], tr_ord[:ntr]


# ------------------------------------------------------------------ bookkeeping


@dataclass
class Ledger:
    """Ground truth kept by the fake device: tags per tagger channel at each stage."""

    n_inputs: int
    offered: IntArray = field(init=False)  # bench tags reaching the inputs
    trigger_suppressed: IntArray = field(init=False)  # no edge at this trigger level
    dead_time_suppressed: IntArray = field(init=False)  # inside the input's dead time
    sent: IntArray = field(init=False)  # time tags that crossed the link
    missed: IntArray = field(init=False)  # counted, not timed (overflow mode)
    unmapped: int = 0  # bench tags on channels with no tagger input
    overflows: int = 0  # overflow intervals begun
    bench_lost: int = 0  # tags the bench itself reported lost
    errors: int = 0  # Error tags sent

    def __post_init__(self) -> None:
        for name in ("offered", "trigger_suppressed", "dead_time_suppressed", "sent",
                     "missed"):
            setattr(self, name, np.zeros(self.n_inputs + 1, np.int64))

    def add(self, name: str, channels: I32Array) -> None:
        """Count ``channels`` into the array ``name``."""
        if channels.size:
            arr = getattr(self, name)
            arr += np.bincount(channels, minlength=arr.size)[: arr.size]

    def total(self, name: str) -> int:
        """Sum over channels of one stage."""
        return int(getattr(self, name).sum())


@dataclass(frozen=True)
class WindowRecord:
    """Bench tags of one window after the channel map (tagger channels, ps)."""

    start_ps: int
    stop_ps: int
    time_ps: IntArray
    channel: I32Array


@dataclass
class _Window:
    time_ps: IntArray
    channel: I32Array
    start_ps: int
    stop_ps: int
    bench_lost: int


@dataclass
class _Events:
    """One block of the event stream (sorted by time)."""

    time: IntArray
    channel: I32Array
    kind: U8Array
    missed: U16Array
    overflow_at_start: bool

    @classmethod
    def empty(cls) -> _Events:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint8),
                   np.zeros(0, np.uint16), False)


# ------------------------------------------------------------------ the device


class FakeDevice:
    """An attached (USB-connected) fake Time Tagger: bench, model, link options.

    Args:
        spec: model figures (:data:`MODELS`).
        serial: serial number reported by ``getSerial``.
        bench: the bench model feeding the inputs (None: no signals).
        channel_map: bench channel -> tagger input (default: see module docstring).
        pulse_amplitude_v: pulse height on every input, or per tagger input (V).
        max_rate_hz: sustained link rate (tags/s; default the model's).
        buffer_tags: device buffer (tags; default the model's).
        getdata_advance_s: stream time one ``TimeTagStream.getData()`` advances (s).
        resume_fraction: overflow ends when the buffer has drained to this fraction.
        history_windows: bench windows kept in :attr:`history` (0: none).
        own_link_limit: raise the bench's own rate limit so that only this fake drops.
    """

    def __init__(self, spec: ModelSpec, serial: str, bench: Any | None, *,
                 channel_map: Mapping[int, int] | None = None,
                 pulse_amplitude_v: float | Mapping[int, float] = 1.0,
                 max_rate_hz: float | None = None, buffer_tags: int | None = None,
                 getdata_advance_s: float = 0.02, resume_fraction: float = 0.5,
                 history_windows: int = 256, own_link_limit: bool = True) -> None:
        if not 0.0 <= resume_fraction < 1.0:
            raise ValueError(f"resume_fraction must be in [0, 1), got {resume_fraction}")
        if getdata_advance_s <= 0:
            raise ValueError(f"getdata_advance_s must be > 0, got {getdata_advance_s}")
        self.spec = spec
        self.serial = serial
        self.bench = bench
        self.max_rate_hz = float(max_rate_hz if max_rate_hz is not None else spec.max_rate_hz)
        self.buffer_tags = int(buffer_tags if buffer_tags is not None else spec.buffer_tags)
        self.getdata_advance_ps = round(getdata_advance_s * PS_PER_S)
        self.resume_fraction = resume_fraction
        self.in_use = False
        self.unplugged = False
        self.generation = 0  # bumped by unplug(): taggers opened before are dead
        self.ledger = Ledger(spec.n_inputs)
        self.history: deque[WindowRecord] = deque(maxlen=max(history_windows, 0) or None)
        self.keep_history = history_windows > 0
        self._pending_errors = 0
        self._synthetic_ps = 0
        self._map = np.zeros(0, np.int32)
        self.attach_bench(channel_map, own_link_limit)
        amps = np.zeros(spec.n_inputs + 1, np.float64)
        if isinstance(pulse_amplitude_v, Mapping):
            for ch, amp in pulse_amplitude_v.items():
                amps[self._input_index(int(ch))] = float(amp)
        else:
            amps[:] = float(pulse_amplitude_v)
        self.pulse_amplitude_v = amps

    def _input_index(self, channel: int) -> int:
        if not 1 <= channel <= self.spec.n_inputs:
            raise ValueError(f"{self.spec.name} {self.serial}: no input {channel} "
                             f"(inputs 1..{self.spec.n_inputs})")
        return channel

    # -- the two places the bench is touched ---------------------------------------
    def attach_bench(self, channel_map: Mapping[int, int] | None,
                     own_link_limit: bool) -> None:
        """Build the bench-channel -> input map; take the link limit from the bench."""
        bench = self.bench
        if bench is None:
            return
        with bench.lock:
            detectors = [int(c) for c in bench.tagger.detector_channels]
            sync = int(bench.tagger.sync_channel)
            if own_link_limit:
                bench.tagger.max_rate_hz = 1e15
        if channel_map is None:
            used = {c for c in (*detectors, sync) if c >= 1}
            spare = next(c for c in itertools.count(1) if c not in used)
            channel_map = {c: (c if c >= 1 else spare) for c in (*detectors, sync)}
        size = max(channel_map) + 1 if channel_map else 1
        table = np.zeros(size, np.int32)
        for bench_ch, tag_ch in channel_map.items():
            table[int(bench_ch)] = self._input_index(int(tag_ch))
        self._map = table

    def _bench_window(self, duration_ps: int) -> _Window:
        """Bench tags of the next ``duration_ps`` ps, mapped to tagger inputs."""
        if self.bench is None:
            t0 = self._synthetic_ps
            self._synthetic_ps += duration_ps
            return _Window(np.zeros(0, np.int64), np.zeros(0, np.int32), t0,
                           self._synthetic_ps, 0)
        tags = self.bench.acquire(duration_ps / PS_PER_S)
        bench_ch = np.asarray(tags.channel)
        times = np.asarray(tags.time_ps, np.int64)
        if bench_ch.size and int(bench_ch.max()) < self._map.size and int(bench_ch.min()) >= 0:
            channel = self._map[bench_ch]
        else:
            inside = (bench_ch >= 0) & (bench_ch < self._map.size)
            channel = np.zeros(bench_ch.size, np.int32)
            channel[inside] = self._map[bench_ch[inside]]
        mapped = channel > 0
        if not mapped.all():
            self.ledger.unmapped += int(np.count_nonzero(~mapped))
            times, channel = times[mapped], channel[mapped]
        if self.keep_history:
            self.history.append(WindowRecord(int(tags.start_ps), int(tags.stop_ps), times,
                                             channel))
        return _Window(times, channel, int(tags.start_ps), int(tags.stop_ps),
                       int(tags.lost_tags))

    # -- fault injection -------------------------------------------------------------
    def inject_error(self) -> None:
        """The next block carries an Error tag (e.g. an external clock was plugged in)."""
        self._pending_errors += 1

    def unplug(self) -> None:
        """Pull the USB cable: every call on an open tagger raises RuntimeError."""
        self.unplugged = True
        self.generation += 1

    def replug(self) -> None:
        """Plug the cable back (open taggers stay dead; create a new one)."""
        self.unplugged = False
        self.in_use = False

    def truth(self, start_ps: int, stop_ps: int) -> tuple[IntArray, I32Array]:
        """Bench tags (tagger inputs, before trigger/dead time/delay) in ``[start, stop)``."""
        times = [w.time_ps for w in self.history]
        chans = [w.channel for w in self.history]
        if not times:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        t = np.concatenate(times)
        c = np.concatenate(chans)
        sel = (t >= start_ps) & (t < stop_ps)
        return t[sel], c[sel]


# ------------------------------------------------------------------ the tagger


class FakeTimeTagger:
    """The object ``createTimeTagger()`` returns: settings, stream time, measurements."""

    def __init__(self, device: FakeDevice, resolution: int = Resolution.Standard) -> None:
        self._device = device
        self._generation = device.generation
        self._spec = device.spec
        self._resolution = int(resolution)
        self._lock = threading.RLock()
        self._freed = False
        self._measurements: weakref.WeakSet[_Measurement] = weakref.WeakSet()
        n = self._spec.n_inputs + 1
        self._trigger = np.zeros(n, np.float64)
        self._delay = np.zeros(n, np.int64)
        self._dead = np.zeros(n, np.int64)
        self._last_kept = np.full(n, _NEVER, np.int64)
        self._carry_t = np.zeros(0, np.int64)
        self._carry_c = np.zeros(0, np.int32)
        self._fstate = np.zeros(1, np.float64)
        self._istate = np.zeros(2, np.int64)
        self._overflows = 0
        self._defaults()
        window = device._bench_window(0)
        self._front = window.stop_ps
        self._istate[0] = window.stop_ps

    def _defaults(self) -> None:
        self._trigger[:] = self._quantise(0.5)
        self._delay[:] = 0
        self._dead[:] = self._spec.dead_time_min_ps

    # -- helpers ---------------------------------------------------------------------
    def _check_open(self) -> FakeTimeTagger:
        if self._freed:
            raise RuntimeError("fake Time Tagger: this tagger has been freed "
                               "(freeTimeTagger was called)")
        if self._device.unplugged or self._generation != self._device.generation:
            raise RuntimeError(f"Time Tagger {self._device.serial} disconnected: USB error "
                               "(qkdlab fake library)")
        return self

    def _input(self, channel: int) -> int:
        self._check_open()
        phys = abs(int(channel))
        if not 1 <= phys <= self._spec.n_inputs:
            raise ValueError(f"Invalid channel number {channel} for {self._spec.name} "
                             f"(inputs 1..{self._spec.n_inputs})")
        return phys

    def _quantise(self, volts: float) -> float:
        lo, hi = self._spec.trigger_range_v
        step = (hi - lo) / (2**DAC_BITS - 1)
        return lo + round((volts - lo) / step) * step

    def _register(self, measurement: _Measurement) -> None:
        self._check_open()
        self._measurements.add(measurement)

    @property
    def front_ps(self) -> int:
        """Current stream time (ps): every tag before it has been delivered."""
        return self._front

    @property
    def device(self) -> FakeDevice:
        """The attached fake device (ground truth, fault injection)."""
        return self._device

    # -- TimeTagger API: identity ----------------------------------------------------
    def getSerial(self) -> str:
        """Serial number string."""
        self._check_open()
        return self._device.serial

    def getModel(self) -> str:
        """Model name, e.g. ``Time Tagger Ultra``."""
        self._check_open()
        return self._spec.name

    def getPsPerClock(self) -> int:
        """Clock period (ps)."""
        self._check_open()
        return self._spec.ps_per_clock

    def reset(self) -> None:
        """Back to the start-up settings (trigger 0.5 V, no delay, minimum dead time)."""
        with self._lock:
            self._check_open()
            self._defaults()

    # -- TimeTagger API: inputs -------------------------------------------------------
    def getTriggerLevelRange(self, channel: int) -> list[float]:
        """[min, max] trigger level of ``channel`` (V)."""
        self._input(channel)
        return list(self._spec.trigger_range_v)

    def setTriggerLevel(self, channel: int, voltage: float) -> None:
        """Trigger level of an input (V), applied at the DAC step."""
        with self._lock:
            phys = self._input(channel)
            lo, hi = self._spec.trigger_range_v
            if not lo <= float(voltage) <= hi:
                raise ValueError(f"Trigger level {voltage} V out of range [{lo}, {hi}] V "
                                 f"for {self._spec.name}")  # *fake*: raises
            self._trigger[phys] = self._quantise(float(voltage))

    def getTriggerLevel(self, channel: int) -> float:
        """Applied trigger level (V; may differ from the request by the DAC step)."""
        return float(self._trigger[self._input(channel)])

    def setInputDelay(self, channel: int, delay: int) -> None:
        """Delay added to the channel's tags (integer ps, positive or negative)."""
        with self._lock:
            phys = self._input(channel)
            if int(delay) != delay:
                raise TypeError(f"delay must be an integer number of ps, got {delay!r}")
            self._delay[phys] = int(delay)

    def getInputDelay(self, channel: int) -> int:
        """Delay of the channel (ps)."""
        return int(self._delay[self._input(channel)])

    def getDeadtimeRange(self, channel: int) -> list[int]:
        """[min, max] dead time of ``channel`` (ps)."""
        self._input(channel)
        return [self._spec.dead_time_min_ps, self._spec.dead_time_max_ps]

    def setDeadtime(self, channel: int, deadtime: int) -> int:
        """Dead time of an input (ps); returns the value applied.

        At least one clock period; the TT20 rounds to a multiple of its 6 ns clock;
        above the model's maximum it raises.
        """
        with self._lock:
            phys = self._input(channel)
            spec = self._spec
            value = int(deadtime)
            if value > spec.dead_time_max_ps:
                raise ValueError(f"Dead time {value} ps exceeds the maximum "
                                 f"{spec.dead_time_max_ps} ps of {spec.name}")
            if spec.dead_time_rounds_to_clock:
                value = round(value / spec.ps_per_clock) * spec.ps_per_clock
            value = max(value, spec.dead_time_min_ps)
            self._dead[phys] = value
            return value

    def getDeadtime(self, channel: int) -> int:
        """Dead time of the channel (ps)."""
        return int(self._dead[self._input(channel)])

    # -- TimeTagger API: link ---------------------------------------------------------
    def setHardwareBufferSize(self, size: int) -> None:
        """Device buffer (tags, 32 kTags … 512 MTags)."""
        with self._lock:
            self._check_open()
            if not MIN_HW_BUFFER <= int(size) <= MAX_HW_BUFFER:
                raise ValueError(f"hardware buffer size {size} not in [{MIN_HW_BUFFER}, "
                                 f"{MAX_HW_BUFFER}] tags")
            self._device.buffer_tags = int(size)

    def getHardwareBufferSize(self) -> int:
        """Device buffer (tags)."""
        self._check_open()
        return self._device.buffer_tags

    def getOverflows(self) -> int:
        """Overflow intervals since start-up or ``clearOverflows()``."""
        self._check_open()
        return self._overflows

    def clearOverflows(self) -> None:
        """Reset the overflow counter."""
        self._check_open()
        self._overflows = 0

    # -- the stream --------------------------------------------------------------------
    def _advance_to(self, target_ps: int) -> None:
        """Run the stream until its time reaches ``target_ps`` (in block steps)."""
        with self._lock:
            self._check_open()
            step = self._device.getdata_advance_ps
            while self._front < target_ps:
                self._pump(min(step, target_ps - self._front))

    def _pump(self, duration_ps: int) -> None:
        """One block: bench window -> inputs -> delays -> link -> measurements."""
        dev = self._device
        led = dev.ledger
        window = dev._bench_window(duration_ps)
        t, c = window.time_ps, window.channel
        led.add("offered", c)
        active = (self._trigger > 0.0) & (self._trigger < dev.pulse_amplitude_v)
        if c.size and not active[1:].all():
            ok = active[c]
            if not ok.all():
                led.add("trigger_suppressed", c[~ok])
                t, c = t[ok], c[ok]
        if c.size:
            ok = _dead_time_kernel(t, c, self._dead, self._last_kept)
            if not ok.all():
                led.add("dead_time_suppressed", c[~ok])
                t, c = t[ok], c[ok]
        delays = self._delay[1:]
        if c.size and delays.any():
            t = t + self._delay[c]
        shifted = bool(self._carry_t.size) or bool(delays.any())
        pool_t = np.concatenate((self._carry_t, t)) if self._carry_t.size else t
        pool_c = np.concatenate((self._carry_c, c)) if self._carry_c.size else c
        if shifted and pool_t.size > 1 and not bool(np.all(pool_t[1:] >= pool_t[:-1])):
            order = np.argsort(pool_t, kind="stable")
            pool_t, pool_c = pool_t[order], pool_c[order]
        limit = max(self._front, window.stop_ps + min(0, int(delays.min(initial=0))))
        k = int(np.searchsorted(pool_t, limit, side="left"))
        self._carry_t, self._carry_c = pool_t[k:], pool_c[k:]
        events = self._link(pool_t[:k], pool_c[:k], limit, window)
        f0 = self._front
        self._front = limit
        for m in list(self._measurements):
            m._feed(events, f0, limit)

    def _link(self, t: IntArray, c: I32Array, t_end: int, window: _Window) -> _Events:
        """Device buffer and overflow mode; builds the block's event stream."""
        dev = self._device
        led = dev.ledger
        overflow_at_start = bool(self._istate[1])
        keep, ival, tr_t, tr_k, tr_o = _link_kernel(
            t, t_end, dev.max_rate_hz / PS_PER_S, float(dev.buffer_tags),
            dev.buffer_tags * dev.resume_fraction, self._fstate, self._istate)
        all_kept = bool(keep.all())
        kept_t, kept_c = (t, c) if all_kept else (t[keep], c[keep])
        led.add("sent", kept_c)
        specials: list[tuple[int, int, int, int, int]] = []  # time, side, kind, ch, missed
        if window.bench_lost:
            led.bench_lost += window.bench_lost
            log.error("fake Time Tagger %s: the bench reported %d lost tags; sending an "
                      "Error tag", dev.serial, window.bench_lost)
            dev._pending_errors += 1
        if dev._pending_errors and t_end > self._front:
            led.errors += dev._pending_errors
            for _ in range(dev._pending_errors):
                specials.append((self._front, 0, TagType.Error, CHANNEL_UNUSED, 0))
            dev._pending_errors = 0
        end_of: dict[int, int] = {}
        for time_, kind, ordinal in zip(tr_t.tolist(), tr_k.tolist(), tr_o.tolist(),
                                        strict=True):
            if kind == TagType.OverflowBegin:
                self._overflows += 1
                led.overflows += 1
                specials.append((time_, 1, TagType.OverflowBegin, CHANNEL_UNUSED, 0))
            else:
                end_of[ordinal] = time_
        if not all_kept:
            missed_sel = ~keep
            mc = c[missed_sel]
            led.add("missed", mc)
            mo = ival[missed_sel].astype(np.int64)
            width = self._spec.n_inputs + 1
            counts = np.bincount(mo * width + mc, minlength=(int(mo.max()) + 1) * width)
            for key in np.flatnonzero(counts).tolist():
                ordinal, ch = divmod(int(key), width)
                n = int(counts[key])
                closed = ordinal in end_of
                when = end_of[ordinal] if closed else t_end - 1
                side = 0 if closed else 1
                while n > 0:
                    part = min(n, MAX_MISSED_PER_TAG)
                    specials.append((when, side, TagType.MissedEvents, ch, part))
                    n -= part
        for time_ in end_of.values():
            specials.append((time_, 0, TagType.OverflowEnd, CHANNEL_UNUSED, 0))
        n_kept = kept_t.size
        if not specials:
            return _Events(kept_t, kept_c.astype(np.int32, copy=False),
                           np.zeros(n_kept, np.uint8), np.zeros(n_kept, np.uint16),
                           overflow_at_start)
        rank = {TagType.Error: 0, TagType.OverflowBegin: 1, TagType.MissedEvents: 2,
                TagType.OverflowEnd: 3}
        specials.sort(key=lambda s: (s[0], rank[TagType(s[2])]))
        s_t = np.array([s[0] for s in specials], np.int64)
        left = np.searchsorted(kept_t, s_t, side="left")
        right = np.searchsorted(kept_t, s_t, side="right")
        pos = np.where(np.array([s[1] for s in specials]) == 0, left, right)
        order = np.argsort(pos, kind="stable")
        pos = pos[order]
        ordered = [specials[i] for i in order.tolist()]
        return _Events(
            np.insert(kept_t, pos, [s[0] for s in ordered]),
            np.insert(kept_c.astype(np.int32, copy=False), pos, [s[3] for s in ordered]),
            np.insert(np.zeros(n_kept, np.uint8), pos, [int(s[2]) for s in ordered]),
            np.insert(np.zeros(n_kept, np.uint16), pos, [s[4] for s in ordered]),
            overflow_at_start)

    def _free(self) -> None:
        with self._lock:
            for m in list(self._measurements):
                m._running = False
            self._freed = True


# ------------------------------------------------------------------ measurements


class _Measurement:
    """``IteratorBase``: the common start/stop interface of every measurement."""

    def __init__(self, tagger: FakeTimeTagger) -> None:
        if not isinstance(tagger, FakeTimeTagger):
            raise TypeError(f"expected a fake TimeTagger, got {type(tagger).__name__}")
        self._tagger = tagger._check_open()
        self._running = False
        self._t_start = tagger.front_ps
        self._t_stop: int | None = None
        self._capture_ps = 0
        tagger._register(self)
        self.start()  # measurements run from their creation

    def _reset_data(self) -> None:
        """Discard accumulated data (subclasses)."""

    def _accept(self, ev: _Events, i0: int, i1: int) -> None:
        """Take events ``[i0, i1)`` of a block (subclasses)."""

    def _feed(self, ev: _Events, f0: int, f1: int) -> None:
        if not self._running:
            return
        lo = max(f0, self._t_start)
        hi = f1 if self._t_stop is None else min(f1, self._t_stop)
        if hi > lo:
            i0 = int(np.searchsorted(ev.time, lo, side="left"))
            i1 = int(np.searchsorted(ev.time, hi, side="left"))
            self._capture_ps += hi - lo
            self._accept(ev, i0, i1)
        if self._t_stop is not None and f1 >= self._t_stop:
            self._running = False

    def start(self) -> None:
        """Start or continue accumulating (no time limit)."""
        with self._tagger._lock:
            self._tagger._check_open()
            self._t_start = self._tagger.front_ps
            self._t_stop = None
            self._running = True

    def startFor(self, capture_duration: int, clear: bool = True) -> None:
        """Accumulate for ``capture_duration`` ps of stream time, then stop."""
        duration = round(float(capture_duration))
        if duration < 0:
            raise ValueError(f"capture_duration must be >= 0, got {capture_duration}")
        with self._tagger._lock:
            self._tagger._check_open()
            if clear:
                self.clear()
            self._t_start = self._tagger.front_ps
            self._t_stop = self._t_start + duration
            self._running = duration > 0

    def stop(self) -> None:
        """Stop accumulating; data are kept."""
        self._running = False

    def clear(self) -> None:
        """Discard accumulated data and the capture duration."""
        with self._tagger._lock:
            self._capture_ps = 0
            self._reset_data()

    def abort(self) -> None:
        """Stop and discard."""
        self.stop()
        self.clear()

    def isRunning(self) -> bool:
        """True while accumulating."""
        return self._running

    def getCaptureDuration(self) -> int:
        """Stream time accumulated since creation or ``clear()`` (ps)."""
        return self._capture_ps

    def waitUntilFinished(self, timeout: int = -1) -> bool:
        """Run the stream until a ``startFor`` measurement has finished.

        ``timeout`` in ms of stream time for an endless measurement; *fake*: an endless
        measurement with ``timeout < 0`` raises instead of blocking forever.
        """
        tagger = self._tagger
        if not self._running:
            return True
        if self._t_stop is None:
            if timeout < 0:
                raise RuntimeError("fake Time Tagger: waitUntilFinished() without a timeout "
                                   "on a measurement started without startFor() never "
                                   "returns")
            tagger._advance_to(tagger.front_ps + round(timeout * 1e9))
            return not self._running
        tagger._advance_to(self._t_stop)
        return not self._running

    def __enter__(self) -> _Measurement:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _check_channels(channels: Sequence[int]) -> list[int]:
    chans = [int(c) for c in channels]
    if any(c < 0 for c in chans):
        raise NotImplementedError("fake Time Tagger: falling-edge (negative) channels are "
                                  "not modelled")
    return chans


class TimeTagStreamBuffer:
    """What ``TimeTagStream.getData()`` returns: arrays of one poll."""

    def __init__(self, time: IntArray, channel: I32Array, kind: U8Array, missed: U16Array,
                 t_start: int, t_getdata: int, overflow: bool) -> None:
        self._time = time
        self._channel = channel
        self._kind = kind
        self._missed = missed
        self._t_start = t_start
        self._t_getdata = t_getdata
        self._overflow = overflow

    def getTimestamps(self) -> IntArray:
        """Event times (int64 ps)."""
        return self._time

    def getChannels(self) -> I32Array:
        """Channel of every event (int32)."""
        return self._channel

    def getEventTypes(self) -> U8Array:
        """``Tag::Type`` of every event (0 TimeTag … 4 MissedEvents)."""
        return self._kind

    def getMissedEvents(self) -> U16Array:
        """Missed-event count of every event (non-zero on MissedEvents tags)."""
        return self._missed

    @property
    def size(self) -> int:
        """Number of events (== ``n_max_events``: events have likely been discarded)."""
        return int(self._time.size)

    @property
    def hasOverflows(self) -> bool:
        """True if the stream was in overflow mode during this buffer."""
        return self._overflow

    @property
    def tStart(self) -> int:
        """Stream time at which the ``TimeTagStream`` started (ps)."""
        return self._t_start

    @property
    def tGetData(self) -> int:
        """Stream time of the ``getData()`` call that made this buffer (ps)."""
        return self._t_getdata


_OVERFLOW_KINDS = (TagType.OverflowBegin, TagType.OverflowEnd, TagType.MissedEvents)


class TimeTagStream(_Measurement):
    """A copy of the time-tag stream of ``channels`` in a buffer of ``n_max_events``."""

    def __init__(self, tagger: FakeTimeTagger, n_max_events: int,
                 channels: Sequence[int]) -> None:
        if int(n_max_events) < 1:
            raise ValueError(f"n_max_events must be >= 1, got {n_max_events}")
        self.n_max_events = int(n_max_events)
        self.channels = _check_channels(channels)
        self._subscribed = np.zeros(max(self.channels, default=0) + 1, np.bool_)
        self._subscribed[self.channels] = True
        self._chunks: list[_Events] = []
        self._count = 0
        self._overflow = False
        self.discarded = 0  # *fake only*: events lost because the buffer was full
        self.peak_size = 0  # *fake only*: largest buffer handed out
        super().__init__(tagger)

    def _reset_data(self) -> None:
        self._chunks = []
        self._count = 0
        self._overflow = False

    def _accept(self, ev: _Events, i0: int, i1: int) -> None:
        if i1 <= i0:
            if ev.overflow_at_start:
                self._overflow = True
            return
        kind = ev.kind[i0:i1]
        chan = ev.channel[i0:i1]
        plain = not bool(kind.any())  # time tags only
        if ev.overflow_at_start or (not plain and bool(np.isin(kind, _OVERFLOW_KINDS).any())):
            self._overflow = True
        table = self._subscribed
        inside = (chan > 0) & (chan < table.size)
        mine = np.zeros(chan.size, np.bool_)
        mine[inside] = table[chan[inside]]
        if not plain:
            mine |= (kind != TagType.TimeTag) & (kind != TagType.MissedEvents)
        room = self.n_max_events - self._count
        if bool(mine.all()):
            take = min(i1 - i0, room)
            self.discarded += (i1 - i0) - take
            sel: slice | IntArray = slice(i0, i0 + take)
            n = take
        else:
            idx = np.flatnonzero(mine) + i0
            if idx.size > room:
                self.discarded += idx.size - room
                idx = idx[:room]
            sel, n = idx, int(idx.size)
        if n:
            self._chunks.append(_Events(ev.time[sel], ev.channel[sel], ev.kind[sel],
                                        ev.missed[sel], False))
            self._count += n

    def getCounts(self) -> int:
        """Events stored since the last ``getData()``."""
        return self._count

    def getData(self) -> TimeTagStreamBuffer:
        """Hand over the buffer and start an empty one.

        *fake*: a running stream first advances the stream time by one block latency.
        """
        tagger = self._tagger
        with tagger._lock:
            tagger._check_open()
            if self._running:
                target = tagger.front_ps + tagger.device.getdata_advance_ps
                if self._t_stop is not None:
                    target = min(target, self._t_stop)
                tagger._advance_to(target)
            chunks = self._chunks
            if chunks:
                buf = TimeTagStreamBuffer(
                    np.concatenate([ch.time for ch in chunks]),
                    np.concatenate([ch.channel for ch in chunks]),
                    np.concatenate([ch.kind for ch in chunks]),
                    np.concatenate([ch.missed for ch in chunks]),
                    self._t_start, tagger.front_ps, self._overflow)
            else:
                buf = TimeTagStreamBuffer(np.zeros(0, np.int64), np.zeros(0, np.int32),
                                          np.zeros(0, np.uint8), np.zeros(0, np.uint16),
                                          self._t_start, tagger.front_ps, self._overflow)
            self.peak_size = max(self.peak_size, buf.size)
            self._reset_data()
            return buf


class Countrate(_Measurement):
    """Average count rate (counts/s) of ``channels``, MissedEvents included."""

    def __init__(self, tagger: FakeTimeTagger, channels: Sequence[int]) -> None:
        self.channels = _check_channels(channels)
        self._counts = np.zeros(len(self.channels), np.int64)
        super().__init__(tagger)

    def _reset_data(self) -> None:
        self._counts = np.zeros(len(self.channels), np.int64)

    def _accept(self, ev: _Events, i0: int, i1: int) -> None:
        kind = ev.kind[i0:i1]
        chan = ev.channel[i0:i1]
        tags = kind == TagType.TimeTag
        miss = kind == TagType.MissedEvents
        for j, ch in enumerate(self.channels):
            on = chan == ch
            self._counts[j] += int(np.count_nonzero(on & tags))
            self._counts[j] += int(ev.missed[i0:i1][on & miss].sum(dtype=np.int64))

    def getData(self) -> npt.NDArray[np.float64]:
        """Counts per second of each channel over the capture duration."""
        seconds = self._capture_ps / PS_PER_S
        if seconds <= 0:
            return np.zeros(len(self.channels), np.float64)
        out: npt.NDArray[np.float64] = self._counts / seconds
        return out

    def getCountsTotal(self) -> IntArray:
        """Counts of each channel since creation or ``clear()``."""
        return self._counts.copy()


class Correlation(_Measurement):
    """Histogram of ``channel_1 − channel_2`` time differences (both signs)."""

    max_pairs_per_step = 4_000_000

    def __init__(self, tagger: FakeTimeTagger, channel_1: int,
                 channel_2: int = CHANNEL_UNUSED, binwidth: int = 1000,
                 n_bins: int = 1000) -> None:
        if channel_2 == CHANNEL_UNUSED:
            channel_2 = channel_1
        _check_channels([channel_1, channel_2])
        if int(binwidth) < 1 or int(n_bins) < 1:
            raise ValueError("binwidth and n_bins must be >= 1")
        self.channel_1 = int(channel_1)
        self.channel_2 = int(channel_2)
        self.binwidth = int(binwidth)
        self.n_bins = int(n_bins)
        self._lo = -(self.n_bins * self.binwidth) // 2
        self._hi = self._lo + self.n_bins * self.binwidth
        self._hist = np.zeros(self.n_bins, np.int64)
        self._old1 = np.zeros(0, np.int64)
        self._old2 = np.zeros(0, np.int64)
        super().__init__(tagger)

    def _reset_data(self) -> None:
        self._hist = np.zeros(self.n_bins, np.int64)
        self._old1 = np.zeros(0, np.int64)
        self._old2 = np.zeros(0, np.int64)

    def _pairs(self, a: IntArray, b: IntArray, exclude_same: bool = False) -> None:
        """Add every ``a − b`` in range to the histogram (``a``, ``b`` sorted)."""
        if a.size == 0 or b.size == 0:
            return
        j0 = np.searchsorted(b, a - self._hi, side="right")
        j1 = np.searchsorted(b, a - self._lo, side="right")
        n = j1 - j0
        cum = np.cumsum(n)
        start = 0
        while start < a.size:
            base = int(cum[start - 1]) if start else 0
            stop = int(np.searchsorted(cum, base + self.max_pairs_per_step, side="right"))
            stop = min(max(stop, start + 1), a.size)
            counts = n[start:stop]
            total = int(counts.sum())
            if total:
                ai = np.repeat(np.arange(start, stop), counts)
                offs = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
                bi = np.repeat(j0[start:stop], counts) + offs
                diff = a[ai] - b[bi]
                if exclude_same:
                    diff = diff[ai != bi]
                k = (diff - self._lo) // self.binwidth
                self._hist += np.bincount(k, minlength=self.n_bins)[: self.n_bins]
            start = stop

    def _accept(self, ev: _Events, i0: int, i1: int) -> None:
        kind = ev.kind[i0:i1]
        chan = ev.channel[i0:i1]
        times = ev.time[i0:i1]
        tags = kind == TagType.TimeTag
        new1 = times[tags & (chan == self.channel_1)]
        if self.channel_1 == self.channel_2:
            both = np.concatenate((self._old1, new1))
            self._pairs(both, both, exclude_same=True)
            if self._old1.size:  # pairs among the old tags were counted before
                old = self._old1
                self._hist -= self._hist_of(old, old)
            self._old1 = both
            self._old2 = both
        else:
            new2 = times[tags & (chan == self.channel_2)]
            all1 = np.concatenate((self._old1, new1))
            self._pairs(all1, new2)
            self._pairs(new1, self._old2)
            self._old1 = all1
            self._old2 = np.concatenate((self._old2, new2))
        front = self._tagger.front_ps
        if self.channel_1 == self.channel_2:
            self._old1 = self._old1[self._old1 >= front + min(self._lo, 1 - self._hi)]
            self._old2 = self._old1
        else:
            self._old1 = self._old1[self._old1 >= front + self._lo]
            self._old2 = self._old2[self._old2 > front - self._hi]

    def _hist_of(self, a: IntArray, b: IntArray) -> IntArray:
        saved = self._hist
        self._hist = np.zeros(self.n_bins, np.int64)
        self._pairs(a, b, exclude_same=True)
        out = self._hist
        self._hist = saved
        return out

    def getData(self) -> IntArray:
        """Counts per bin (``n_bins``)."""
        return self._hist.copy()

    def getIndex(self) -> IntArray:
        """Left edge of every bin (ps)."""
        return self._lo + self.binwidth * np.arange(self.n_bins, dtype=np.int64)


# ------------------------------------------------------------------ the library


class FakeSwabianLibrary:
    """Stands in for the ``Swabian.TimeTagger`` module: devices, factories, classes."""

    TagType = TagType
    Resolution = Resolution
    CHANNEL_UNUSED = CHANNEL_UNUSED
    TimeTagStream = TimeTagStream
    TimeTagStreamBuffer = TimeTagStreamBuffer
    Countrate = Countrate
    Correlation = Correlation

    def __init__(self) -> None:
        self.devices: dict[str, FakeDevice] = {}
        self._serials = itertools.count(1)
        self._lock = threading.Lock()
        self._licensed = False

    # -- fake-only: plug devices in -------------------------------------------------
    def attach(self, bench: Any | None, *, model: str = "Time Tagger Ultra",
               serial: str | None = None, **options: Any) -> FakeDevice:
        """Connect a fake device fed by ``bench`` (options: :class:`FakeDevice`)."""
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)}")
        with self._lock:
            serial = serial or f"FAKE{next(self._serials):06d}"
            if serial in self.devices:
                raise ValueError(f"a fake device with serial {serial!r} is attached already")
            device = FakeDevice(MODELS[model], serial, bench, **options)
            self.devices[serial] = device
            self._licensed = True
            return device

    def detach(self, serial: str) -> None:
        """Unplug a device."""
        with self._lock:
            self.devices.pop(serial, None)

    def detach_all(self) -> None:
        """Unplug every device."""
        with self._lock:
            self.devices.clear()

    # -- library API ---------------------------------------------------------------
    def getVersion(self) -> str:
        """Library version string."""
        return FAKE_VERSION

    def scanTimeTagger(self) -> list[str]:
        """Serials of the attached devices not in use."""
        with self._lock:
            return [s for s, d in self.devices.items() if not d.in_use and not d.unplugged]

    def createTimeTagger(self, serial: str = "",
                         resolution: int = Resolution.Standard) -> FakeTimeTagger:
        """Open the first free device, or the one with ``serial``."""
        with self._lock:
            candidates = [d for s, d in self.devices.items()
                          if not d.in_use and not d.unplugged and (not serial or s == serial)]
            if not candidates:
                which = f" with serial {serial!r}" if serial else ""
                raise RuntimeError(f"No Time Tagger{which} attached or already in use. "
                                   "(qkdlab fake library)")
            device = candidates[0]
            device.in_use = True
        try:
            return FakeTimeTagger(device, resolution)
        except BaseException:
            device.in_use = False
            raise

    def createTimeTaggerVirtual(self, filename: str = "", begin: int = 0,
                                duration: int = -1) -> FakeTimeTagger:
        """A virtual tagger with 18 silent inputs (needs a device seen once, as the real)."""
        if not self._licensed:
            raise RuntimeError("No license file found or no Time Tagger connected. Please "
                               "connect a Time Tagger if you want to use the virtual Time "
                               "Tagger for the first time. (qkdlab fake library)")
        if filename:
            raise NotImplementedError("fake Time Tagger: replaying .ttbin files is not "
                                      "modelled")
        return FakeTimeTagger(FakeDevice(VIRTUAL_SPEC, "VIRTUAL", None, history_windows=0))

    def freeTimeTagger(self, tagger: FakeTimeTagger) -> None:
        """Close a tagger; its device can be opened again."""
        if not isinstance(tagger, FakeTimeTagger):
            raise TypeError(f"expected a fake TimeTagger, got {type(tagger).__name__}")
        tagger._free()
        if tagger._generation == tagger.device.generation:
            tagger.device.in_use = False


# module-level library, so that this module itself can be handed to the driver
_default = FakeSwabianLibrary()
attach = _default.attach
detach = _default.detach
detach_all = _default.detach_all
devices = _default.devices
getVersion = _default.getVersion
scanTimeTagger = _default.scanTimeTagger
createTimeTagger = _default.createTimeTagger
createTimeTaggerVirtual = _default.createTimeTaggerVirtual
freeTimeTagger = _default.freeTimeTagger
