"""QCoDeS driver for PicoQuant HydraHarp 400 / MultiHarp 150 / 160 in T2 mode via snAPI.

The vendor's Python package ``snapi`` (PyPI, import ``snAPI``; 1.2.5 tested, Linux
x86_64 / Windows; optional extra ``picoquant = ["snapi"]``) drives the hardware over
USB and also opens a PTU file as a "file device" that replays a recorded measurement
through the same measurement classes.  Addresses:

* ``usb://<serial>`` or a bare serial number: the device (``usb://`` alone: the first
  one found); ``snAPI.getDevice`` + ``initDevice(MeasMode.T2)``;
* ``file:///path/run.ptu``: a T2 PTU file (``snAPI.getFileDevice``), e.g. one written by
  ``qkdlab.mock_instruments.picoquant.ptu``.

Sources (facts only; nothing copied):

* snAPI 1.2.5 API reference — the docstrings of ``snAPI/Main.py`` in the PyPI wheel
  (PicoQuant, T. Krause, 2026): ``snAPI(systemIni)`` / ``initAPI`` (system ini: data
  path, log to file/console, ``[Params] BufferSize`` in MiB blocks), ``getDevice``,
  ``getFileDevice``, ``initDevice``, ``closeDevice``, ``deviceConfig`` (JSON: Model,
  PartNo, ID, Version, BaseResolution/Resolution in ps, NumChans, ChansCfg…),
  ``getMeasDescription`` (AcqTime ms, StopReason, StopAfter ms, WarningsFlag, NumRecs),
  ``Device.setSyncDiv`` (MH150/160, HH400: 1, 2, 4, 8, 16), ``setSyncCFD`` /
  ``setInputCFD`` (HH400: discriminator 0…1000 mV, zero cross 0…40 mV),
  ``setSyncEdgeTrig`` / ``setInputEdgeTrig`` (MH150/160: −1200…1200 mV, edge 0 falling
  / 1 rising), ``setSyncChannelOffset`` / ``setInputChannelOffset`` (−99999…99999 ps,
  MH150/160 and HH400), ``setInputChannelEnable`` (MH/HH400), ``setSyncChannelEnable``
  (MH only), ``setInputDeadTime`` / ``setSyncDeadTime`` (MH150/160 only: 800…160000
  ps, ≤ 800 = off; not HH400), ``getCountRates`` (sync first, 100 ms gate);
  ``Unfold.startBlock(acqTime ms, size records)`` / ``getBlock`` / ``isFinished`` /
  ``stopMeasure``: 64-bit times (ps) and 8-bit channels (0 sync, 1… inputs, ``0x80 |
  mask`` markers); a store overrun is logged as "UfStore buffer overrun - clearing!".
* *PicoQuant-Time-Tagged-File-Format-Demos*, ``doc/apx_tttrrecords.html`` (T2 record
  format, overflow period 33 554 432, compressed overflows) and
  ``doc/apx_tagdictionary.html`` (2021-05-06: ``TTResult_StopReason`` −2 = FiFo overrun,
  ``TTResult_MDescWarningFlags`` 0x080 = EventsDropped) — used by the numpy decoder
  :func:`decode_t2_records` and to interpret snAPI's ``measDescription``.
* *HydraHarp 400 User's Manual and Technical Data* V3.0.0.1 §5.3.2: T2 throughput up to
  40 Mcps over USB shared by all inputs; FiFo 2 M records; TDC 12.5 Mcps per channel
  (a fixed dead time, not settable on the HH400).  *MultiHarp Software* V3.1.0.0
  §5.3.1–5.3.2: up to 90 Mcps over USB 3.

=======================================  ================================  =========
snAPI call                               reference (Main.py docstring)     used by
=======================================  ================================  =========
``snAPI(systemIni)``                     ``initAPI``                       open
``getDevice`` / ``initDevice(T2)``       ``getDevice``, ``initDevice``     open (USB)
``getFileDevice``                        ``getFileDevice``                 open (file)
``deviceConfig`` / ``getDeviceConfig``   ``deviceConfig``                  idn, params
``getMeasDescription``                   ``measDescription``               overflow
``device.setSyncDiv``                    ``Device.setSyncDiv``             sync_divider
``device.setSyncCFD``/``setInputCFD``    ``Device.setSyncCFD``…            HH400 level
``device.setSyncEdgeTrig``/``…EdgeTrig`` ``Device.setSyncEdgeTrig``…       MH level
``device.set…ChannelOffset``             ``Device.setInputChannelOffset``  offset
``device.set…ChannelEnable``             ``Device.setInputChannelEnable``  enabled
``device.set…DeadTime``                  ``Device.setInputDeadTime``       MH dead time
``device.getCountRates``                 ``Device.getCountRates``          count_rates
``unfold.startBlock``/``getBlock``…      ``Unfold``                        acquire/stream
``unfold.stopMeasure`` / ``closeDevice`` ``Unfold.stopMeasure``            safe_state
=======================================  ================================  =========

Behaviour found by running snAPI 1.2.5 here (Linux x86_64, Python 3.11), and the
driver's answers:

* the setter functions have no ctypes ``restype``: they return a C ``bool`` read as an
  ``int`` whose upper bytes are garbage; the driver tests the low byte;
* on a file device every setter "succeeds", even out of range (2000 mV CFD level,
  divider 3), and the replay is not changed: the driver validates every value itself
  before calling snAPI, and for a file device applies input offsets, channel enables
  and dead times to the replayed tags in software;
* ``Unfold.startBlock`` on a file device deadlocks when ``size`` is smaller than the
  chunk the library reads internally (set by the system ini ``BufferSize``: 4 MiB gives
  2 Mi-record chunks; 32 MiB ≥ 14 Mi records).  The driver writes its own system ini
  (``BufferSize`` = ``snapi_buffer_mib``, logs off, data path in a private temporary
  folder) and refuses a ``block_records`` below 2 × the chunk;
* the replay delivers overflow records as channel 255 entries (bookkeeping, never loss);
* ``import snAPI.Main`` replaces ``sys.excepthook``; the driver restores it.

Overflow reporting (never silent): PTU/TTTR overflow records are *not* loss.  Loss is
(a) a FiFo overrun — snAPI's ``StopReason`` ``FiFoOverrun`` or warning flag 0x080: the
device stopped, every tag from the last record on is missing; the blocks from there to
the requested end carry ``overflow=True`` with that interval and ``lost_tags=0`` (the
hardware cannot count them); (b) host-side loss — fewer records received than
``NumRecs``: a trailing block reports the difference (records) over the whole run.

HydraHarp 400: dead time fixed by the hardware (12.5 Mcps per channel ≈ 80 ns);
:meth:`PicoQuantHarp.set_dead_time` applies a longer non-paralysable dead time in the
driver.  MultiHarp: programmable 0.8–160 ns in the device (the driver applies longer
ones itself).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

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
I64Array = npt.NDArray[np.int64]
U32Array = npt.NDArray[np.uint32]

# T2 record layout (apx_tttrrecords.html)
T2_WRAP = 33_554_432
T2_SPECIAL = np.uint32(1 << 31)
T2_OVERFLOW_CODE = 63
OVERFLOW_CHANNEL = 255  # snAPI Unfold: overflow entry
MARKER_FLAG = 0x80  # snAPI Unfold: marker entry, low bits = marker mask
MARKER_CHANNEL_BASE = 64  # TagBlock channel of a marker record = 64 + mask (1–15)

STOP_FIFO_OVERRUN = "FiFoOverrun"
WARN_EVENTS_DROPPED = 0x080

OFFSET_LIMIT_PS = 99_999  # snAPI setInputChannelOffset range (MH150/160, HH400)
SYNC_DIVIDERS = (1, 2, 4, 8, 16)  # snAPI setSyncDiv, MH150/160 and HH400
HH_CFD_LEVEL_V = (0.0, 1.0)  # snAPI setInputCFD, HH400 discriminator level
HH_ZERO_CROSS_V = (0.0, 0.040)
MH_TRIGGER_LEVEL_V = (-1.2, 1.2)  # snAPI setInputEdgeTrig, MH150/160
MH_DEAD_TIME_PS = (800, 160_000)  # snAPI setInputDeadTime, MH150/160 (<= 800: off)
HH_FIXED_DEAD_TIME_PS = 80_000  # 1 / 12.5 Mcps
MAX_DRIVER_DEAD_TIME_S = 1e-3


class PicoQuantHarpError(Exception):
    """snAPI refused an operation or returned data the driver cannot use."""


class PicoQuantHarpCommunicationError(PicoQuantHarpError):
    """No device / file, or the library stopped delivering data in time."""


# ------------------------------------------------------------------ numpy decoder


@dataclass
class T2DecodeState:
    """Overflow accumulator carried between chunks of one T2 record stream."""

    overflow_ticks: int = 0


def decode_t2_records(records: U32Array, resolution_ps: int, state: T2DecodeState,
                      hydraharp_v1: bool = False) -> tuple[I64Array, npt.NDArray[np.int16]]:
    """Tags of HydraHarp V1/V2 / MultiHarp T2 records (vectorised).

    Returns times (int64 ps) and channels (0 sync, 1… inputs, 64 + mask markers);
    overflow records only advance ``state``.  ``hydraharp_v1``: one overflow per record
    with period 33 552 000.
    """
    rec = np.asarray(records, np.uint32)
    special = (rec & T2_SPECIAL) != 0
    code = ((rec >> np.uint32(25)) & np.uint32(63)).astype(np.int64)
    tag = (rec & np.uint32((1 << 25) - 1)).astype(np.int64)
    is_ovf = special & (code == T2_OVERFLOW_CODE)
    if hydraharp_v1:
        wrap = 33_552_000
        step = np.where(is_ovf, 1, 0)
    else:
        wrap = T2_WRAP
        step = np.where(is_ovf, np.where(tag == 0, 1, tag), 0)
    acc = np.cumsum(step) * wrap + state.overflow_ticks
    if rec.size:
        state.overflow_ticks = int(acc[-1])
    keep = ~is_ovf & (~special | (code <= 15))
    ticks = (acc + tag)[keep]
    chan = np.where(special, np.where(code == 0, 0, MARKER_CHANNEL_BASE + code), code + 1)[keep]
    return ticks * np.int64(resolution_ps), chan.astype(CHANNEL_DTYPE)


def apply_dead_time(times_ps: I64Array, dead_ps: int,
                    last_kept_ps: int | None) -> tuple[npt.NDArray[np.bool_], int | None]:
    """Mask of the tags a non-paralysable dead time keeps (one channel, sorted).

    Tags ``>= dead_ps`` after their predecessor start chains; within runs of closer
    tags the kept chain is followed with ``searchsorted`` for all runs per round.
    """
    n = times_ps.size
    if n == 0 or dead_ps <= 0:
        return np.ones(n, bool), (int(times_ps[-1]) if n else last_kept_ps)
    start = 0 if last_kept_ps is None else int(
        np.searchsorted(times_ps, last_kept_ps + dead_ps, side="left"))
    kept = np.zeros(n, bool)
    if start >= n:
        return kept, last_kept_ps
    head = np.zeros(n, bool)
    head[start] = True
    head[start + 1:] = (times_ps[start + 1:] - times_ps[start:-1]) >= dead_ps
    cur = np.flatnonzero(head)
    kept[cur] = True
    while cur.size:
        nxt = np.searchsorted(times_ps, times_ps[cur] + dead_ps, side="left")
        nxt = nxt[nxt < n]
        nxt = np.unique(nxt[~kept[nxt]])
        kept[nxt] = True
        cur = nxt
    return kept, int(times_ps[np.flatnonzero(kept)[-1]])


# ------------------------------------------------------------------ snAPI wrapper


def _ok(result: object) -> bool:
    """snAPI setters return a C bool read as int (garbage upper bytes): test the low byte."""
    if isinstance(result, bool):
        return result
    return bool(int(result) & 0xFF)  # type: ignore[call-overload]


_SNAPI_LOCK = threading.Lock()


def _import_snapi() -> Any:
    """``snAPI.Main`` (imported on first use; ``sys.excepthook`` restored)."""
    hook = sys.excepthook
    try:
        snapi_main = importlib.import_module("snAPI.Main")
    except (ImportError, OSError) as err:  # OSError: native library failed to load
        raise PicoQuantHarpError(
            f"PicoQuant snAPI is not usable here ({type(err).__name__}: {err}); install "
            "the optional extra: pip install 'qkdlab[picoquant]'") from err
    finally:
        sys.excepthook = hook
    return snapi_main


@dataclass
class StreamStats:
    """Memory and bookkeeping figures of the last acquisition (tests, benchmarks)."""

    snapi_blocks: int = 0
    peak_snapi_block: int = 0  # entries in the largest block snAPI returned
    block_records: int = 0  # snAPI block buffer (entries)
    records: int = 0  # entries received (tags + overflows + markers)
    overflow_records: int = 0
    tags: int = 0
    peak_pending_tags: int = 0  # tags held by the driver between blocks


@dataclass
class _Replay:
    """One running snAPI Unfold block measurement and the tags not yet handed out."""

    times: list[I64Array] = field(default_factory=list)
    chans: list[npt.NDArray[np.int16]] = field(default_factory=list)
    finished: bool = False
    records: int = 0
    horizon_ps: int = 0  # every tag before this time has been received
    dead_state: dict[int, int | None] = field(default_factory=dict)


# ------------------------------------------------------------------ channels


class PicoQuantHarpChannel(InstrumentChannel):
    """The SYNC input (channel 0) or input ``1…N`` in T2 mode.

    Parameters: ``level`` (V; HydraHarp: CFD discriminator level, MultiHarp: edge trigger
    level), ``zero_cross`` (V, HydraHarp CFD), ``edge`` (MultiHarp), ``offset`` (s, set in
    integer ps), ``enabled``, ``dead_time`` (s).
    """

    def __init__(self, parent: PicoQuantHarp, name: str, channel: int) -> None:
        super().__init__(parent, name)
        self.channel = channel
        self._harp = parent
        hh = parent.is_hydraharp
        lo, hi = HH_CFD_LEVEL_V if hh else MH_TRIGGER_LEVEL_V
        what = "CFD discriminator level" if hh else "edge trigger level"
        self.level: Parameter = self.add_parameter(
            "level", label=f"{name} {what}", unit="V", initial_cache_value=0.1 if hh else -0.05,
            set_cmd=self._set_level, get_cmd=None, vals=vals.Numbers(lo, hi),
            docstring=f"{what} (V; sent in mV, {lo}…{hi} V).")
        self.zero_cross: Parameter = self.add_parameter(
            "zero_cross", label=f"{name} CFD zero cross", unit="V", initial_cache_value=0.01,
            set_cmd=lambda v: self._program(zero_cross_v=v), get_cmd=None,
            vals=vals.Numbers(*HH_ZERO_CROSS_V),
            docstring="CFD zero-cross level (V, HydraHarp only; 0…40 mV).")
        self.edge: Parameter = self.add_parameter(
            "edge", label=f"{name} trigger edge", initial_cache_value="falling",
            set_cmd=lambda v: self._program(edge=v), get_cmd=None,
            vals=vals.Enum("rising", "falling"),
            docstring="Trigger edge (MultiHarp only).")
        self.offset: Parameter = self.add_parameter(
            "offset", label=f"{name} offset", unit="s", initial_cache_value=0.0,
            set_cmd=self._set_offset, get_cmd=None,
            vals=vals.Numbers(-OFFSET_LIMIT_PS * 1e-12, OFFSET_LIMIT_PS * 1e-12),
            docstring="Timing offset added to this input (s; integer ps, ±99 999 ps).")
        self.enabled: Parameter = self.add_parameter(
            "enabled", label=f"{name} enabled", initial_cache_value=True,
            set_cmd=self._set_enabled, get_cmd=None, vals=vals.Bool(),
            docstring="Input on/off (SYNC: MultiHarp only; a file device filters in the "
                      "driver).")
        self.dead_time: Parameter = self.add_parameter(
            "dead_time", label=f"{name} dead time", unit="s", initial_cache_value=0.0,
            set_cmd=self._set_dead_time, get_cmd=None,
            vals=vals.Numbers(0.0, MAX_DRIVER_DEAD_TIME_S),
            docstring="Extended dead time (s).  MultiHarp: device 0.8–160 ns; longer, and "
                      "any on HydraHarp (fixed ≈ 80 ns in hardware) or a file device, "
                      "applied by the driver (non-paralysable).")

    # -- setters: validate (vals) → snAPI → cache -----------------------------------------
    def _set_level(self, volts: float) -> None:
        self._program(level_v=volts)

    def _program(self, level_v: float | None = None, zero_cross_v: float | None = None,
                 edge: str | None = None) -> None:
        """Level + zero cross (HydraHarp CFD) or level + edge (MultiHarp): one snAPI call."""
        harp = self._harp
        lvl = round(1000 * (self.level.cache.get() if level_v is None else level_v))
        if harp.is_hydraharp:
            zc = round(1000 * float(self.zero_cross.cache.get() if zero_cross_v is None
                                    else zero_cross_v))
            if self.channel == 0:
                harp._call("setSyncCFD", lvl, zc)
            else:
                harp._call("setInputCFD", self.channel - 1, lvl, zc)
        else:
            rising = int((self.edge.cache.get() if edge is None else edge) == "rising")
            if self.channel == 0:
                harp._call("setSyncEdgeTrig", lvl, rising)
            else:
                harp._call("setInputEdgeTrig", self.channel - 1, lvl, rising)

    def _set_offset(self, seconds: float) -> None:
        ps = round(seconds * PS_PER_S)
        if self.channel == 0:
            self._harp._call("setSyncChannelOffset", ps)
        else:
            self._harp._call("setInputChannelOffset", self.channel - 1, ps)

    def _set_enabled(self, on: bool) -> None:
        if self.channel == 0:
            if self._harp.is_hydraharp and not self._harp.is_file_device:
                raise PicoQuantHarpError(f"{self.full_name}: the HydraHarp 400 SYNC input "
                                         "cannot be disabled (snAPI: MultiHarp only)")
            self._harp._call("setSyncChannelEnable", int(on))
        else:
            self._harp._call("setInputChannelEnable", self.channel - 1, int(on))

    def _set_dead_time(self, seconds: float) -> None:
        harp = self._harp
        ps = round(seconds * PS_PER_S)
        if harp.is_hydraharp or harp.is_file_device:
            return  # applied by the driver
        device_ps = ps if MH_DEAD_TIME_PS[0] < ps <= MH_DEAD_TIME_PS[1] else MH_DEAD_TIME_PS[0]
        if self.channel == 0:
            harp._call("setSyncDeadTime", device_ps)
        else:
            harp._call("setInputDeadTime", self.channel - 1, device_ps)

    # -- what the driver applies itself -------------------------------------------------
    @property
    def software_dead_time_ps(self) -> int:
        """Dead time the driver applies to this channel's tags (0 = none)."""
        ps = round(float(self.dead_time.cache.get()) * PS_PER_S)
        harp = self._harp
        if harp.is_file_device:
            return ps
        if harp.is_hydraharp:
            return ps if ps > HH_FIXED_DEAD_TIME_PS else 0
        return ps if ps > MH_DEAD_TIME_PS[1] else 0

    @property
    def offset_ps(self) -> int:
        return round(float(self.offset.cache.get()) * PS_PER_S)


# ------------------------------------------------------------------ instrument


class PicoQuantHarp(Instrument):
    """PicoQuant HydraHarp 400 / MultiHarp 150 / 160 time tagger (T2 mode) via snAPI.

    Satisfies :class:`qkdlab.drivers.roles.TimeTagger`: TagBlock channel 0 is SYNC,
    1… the inputs (64 + mask: marker records); times int64 ps since the measurement
    start (a file device keeps the file's timebase and replays it in order: each
    ``acquire``/``stream`` continues where the previous one stopped).

    Args:
        name: instrument name.
        address: ``file:///path.ptu``, ``usb://<serial>``, ``usb://`` or a serial.
        block_duration_s: length of each :meth:`stream` block (s).
        block_records: snAPI Unfold block buffer (entries; memory ≈ 36 B per entry).
        snapi_buffer_mib: ``[Params] BufferSize`` of the private system ini (MiB).
        poll_interval_s: wait between two ``getBlock`` calls when none is ready (s).
        stall_timeout_s: no data and no finish for this long raises (s).
        max_block_tags: a stream block holding more tags raises (memory bound).
    """

    def __init__(self, name: str, address: str, *, block_duration_s: float = 0.05,
                 block_records: int = 8 * 2**20, snapi_buffer_mib: int = 4,
                 poll_interval_s: float = 0.005, stall_timeout_s: float = 30.0,
                 max_block_tags: int = 20_000_000,
                 **kwargs: Unpack[InstrumentBaseKWArgs]) -> None:
        super().__init__(name, **kwargs)
        if block_duration_s <= 0:
            raise ValueError(f"{name}: block_duration_s must be > 0, got {block_duration_s}")
        chunk = snapi_buffer_mib * 2**19  # entries per internal chunk (4 MiB → 2 Mi)
        if block_records < 2 * chunk:
            raise ValueError(f"{name}: block_records must be >= {2 * chunk} with a "
                             f"{snapi_buffer_mib} MiB snAPI buffer (smaller blocks deadlock "
                             "snAPI's file replay)")
        self.address = address
        self.block_duration_s = block_duration_s
        self.block_records = int(block_records)
        self.poll_interval_s = poll_interval_s
        self.stall_timeout_s = stall_timeout_s
        self.max_block_tags = max_block_tags
        self.last_stream_stats = StreamStats()
        self._replay: _Replay | None = None
        self._cursor_ps = 0  # file device: replay position
        self._file_end_ps: int | None = None
        self._file_records = 0
        self._tmp = Path(tempfile.mkdtemp(prefix="qkdlab-snapi-"))
        ini = self._tmp / "system.ini"
        ini.write_text(
            f"[Paths]\nData = {self._tmp}\n[Log]\nFile = false\nConsole = false\n"
            "[LogLevel]\nApi = false\nConfig = false\nDevice = false\nDataFile = false\n"
            f"Manipulators = false\n[Params]\nBufferSize = {int(snapi_buffer_mib)}\n")
        self._sn: Any = None
        self._main = _import_snapi()
        if not _SNAPI_LOCK.acquire(blocking=False):
            shutil.rmtree(self._tmp, ignore_errors=True)
            Instrument.close(self)
            raise PicoQuantHarpError(f"{name}: another PicoQuantHarp holds snAPI in this "
                                     "process (the library keeps one current device)")
        self._holds_lock = True
        try:
            self._sn = self._main.snAPI(str(ini))
            self._open(address)
        except Exception:
            self._release()
            Instrument.close(self)
            raise
        cfg = self._sn.deviceConfig
        self.n_inputs = int(cfg.get("NumChans", 0))
        self.sync_divider: Parameter = self.add_parameter(
            "sync_divider", label="sync divider", initial_cache_value=int(cfg.get("SyncDiv", 1)),
            set_cmd=lambda d: self._call("setSyncDiv", int(d)), get_cmd=None,
            vals=vals.Enum(*SYNC_DIVIDERS),
            docstring="SYNC input divider (1, 2, 4, 8, 16); T2 mode normally uses 1.")
        self.resolution: Parameter = self.add_parameter(
            "resolution", label="time resolution", unit="s", set_cmd=False,
            get_cmd=lambda: float(self._sn.deviceConfig.get("Resolution", 0.0)) * 1e-12,
            docstring="Time tag resolution in T2 mode = base resolution (s; HydraHarp "
                      "1 ps, MultiHarp 5 or 80 ps).  Binning applies to T3/histograms only.")
        self.count_rates: Parameter = self.add_parameter(
            "count_rates", label="count rates", unit="Hz", set_cmd=False,
            get_cmd=self._count_rates,
            docstring="Rates of SYNC and each input (counts/s, 100 ms hardware gate; a "
                      "file device reports the file's average).")
        channels = ChannelList(self, "channels", PicoQuantHarpChannel)
        for ch in range(self.n_inputs + 1):
            chan = PicoQuantHarpChannel(self, "sync" if ch == 0 else f"input{ch}", ch)
            channels.append(chan)
            self.add_submodule(chan.short_name, chan)
        self.channels = channels
        self.add_submodule("channels", channels.to_channel_tuple())
        self.connect_message()

    # -- opening / closing ----------------------------------------------------------------
    @property
    def is_file_device(self) -> bool:
        """True when replaying a PTU file."""
        return int(self._sn.deviceConfig.get("DeviceType", 0)) == 1

    @property
    def is_hydraharp(self) -> bool:
        """True for a HydraHarp (CFD inputs, fixed dead time)."""
        return "hydra" in str(self._sn.deviceConfig.get("Model", "")).lower()

    def _open(self, address: str) -> None:
        parts = urlsplit(address)
        if parts.scheme == "file":
            path = Path(unquote(parts.path))
            if not path.is_file():
                raise PicoQuantHarpCommunicationError(f"{self.name}: no PTU file at {path}")
            if not _ok(self._sn.getFileDevice(str(path))):
                raise PicoQuantHarpCommunicationError(
                    f"{self.name}: snAPI cannot open {path} as a file device (not a PTU T2 "
                    "file?)")
            desc = self._sn.measDescription
            if int(self._sn.deviceConfig.get("MeasMode", -1)) != 2:
                raise PicoQuantHarpError(f"{self.name}: {path} is not a T2 measurement")
            self._file_end_ps = round(float(desc.get("AcqTime", 0)) * 1e9)
            self._file_records = int(desc.get("NumRecs", 0))  # header; snAPI later
            return                                               # reports what it read
        serial = parts.netloc if parts.scheme == "usb" else address
        found = self._sn.getDevice(serial) if serial else self._sn.getDevice()
        if not _ok(found):
            raise PicoQuantHarpCommunicationError(
                f"{self.name}: no PicoQuant device {serial or '(any)'} found by snAPI")
        if not _ok(self._sn.initDevice(self._main.MeasMode.T2)):
            raise PicoQuantHarpCommunicationError(f"{self.name}: snAPI initDevice(T2) failed")

    def _release(self) -> None:
        sn = getattr(self, "_sn", None)
        if sn is not None:
            with contextlib.suppress(Exception):
                sn.closeDevice(True)
            with contextlib.suppress(Exception):
                sn.exitAPI()
            sn.exitAPI = lambda: None  # its __del__ must not exit twice
            self._sn = None
        if getattr(self, "_holds_lock", False):
            self._holds_lock = False
            _SNAPI_LOCK.release()
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def close(self) -> None:
        """Stop any measurement, close the device and snAPI, then the instrument."""
        if getattr(self, "_sn", None) is not None:
            self.safe_state()
        self._release()
        super().close()

    def __enter__(self) -> PicoQuantHarp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, function: str, *args: int) -> None:
        """One snAPI ``Device`` setter; raises if the library refuses it."""
        if self._replay is not None and not self.is_file_device:
            raise PicoQuantHarpError(f"{self.name}: {function} refused while measuring")
        if not _ok(getattr(self._sn.device, function)(*args)):
            raise PicoQuantHarpError(f"{self.name}: snAPI {function}{args} failed")

    # -- identity, reset -------------------------------------------------------------------
    def get_idn(self) -> dict[str, str | None]:
        """Vendor, model (``PartNo``/``Model``), serial (``ID``) and version from snAPI."""
        cfg = self._sn.deviceConfig
        model = cfg.get("PartNo") or cfg.get("Model") or None
        return {"vendor": "PicoQuant", "model": model, "serial": cfg.get("ID") or None,
                "firmware": cfg.get("Version") or None}

    def reset(self) -> None:
        """Defaults on every input (offset 0, enabled, no extra dead time, divider 1);
        a file device also rewinds its replay."""
        self.safe_state()
        self._cursor_ps = 0
        self.sync_divider(1)
        for ch in self.channels:
            ch.offset(0.0)
            ch.enabled(True)
            ch.dead_time(0.0)

    def _count_rates(self) -> list[float]:
        if self.is_file_device:
            desc, cfg = self._sn.measDescription, self._sn.deviceConfig
            return self._file_rates(desc, cfg)
        return [float(x) for x in self._sn.device.getCountRates()]

    def _file_rates(self, desc: dict[str, Any], cfg: dict[str, Any]) -> list[float]:
        """Average rates of a file: one pass over the replay (counts/s)."""
        counts = np.zeros(self.n_inputs + 1, np.int64)
        self._stop_replay()
        saved = self._cursor_ps
        self._cursor_ps = 0
        end = self._file_end_ps or 0
        try:
            for block in self._blocks(None, apply_settings=False):
                inputs = block.channel[block.channel <= self.n_inputs]
                counts += np.bincount(inputs, minlength=self.n_inputs + 1)
        finally:
            self._cursor_ps = saved
            self._stop_replay()
        return (counts / max(end, 1) * PS_PER_S).tolist()

    # -- TimeTagger role -------------------------------------------------------------------
    def channel(self, channel: int) -> PicoQuantHarpChannel:
        """Channel 0 = SYNC, 1… = inputs."""
        if not 0 <= channel <= self.n_inputs:
            raise ValueError(f"{self.name}: channel {channel} does not exist (0 = SYNC, "
                             f"1–{self.n_inputs})")
        ch: PicoQuantHarpChannel = self.channels[channel]
        return ch

    def set_trigger_level(self, channel: int, level_v: float) -> None:
        """Discriminator level of ``channel`` (V; HydraHarp CFD level, MultiHarp edge level)."""
        self.channel(channel).level(level_v)

    def set_input_delay(self, channel: int, delay_ps: int) -> None:
        """Offset added to ``channel``'s tags (integer ps, ±99 999)."""
        if int(delay_ps) != delay_ps:
            raise ValueError(f"{self.name}: delay_ps must be an integer, got {delay_ps}")
        self.channel(channel).offset(int(delay_ps) * 1e-12)

    def set_dead_time(self, channel: int, dead_time_ps: int) -> None:
        """Minimum spacing of ``channel``'s tags (ps)."""
        self.channel(channel).dead_time(int(dead_time_ps) * 1e-12)

    def acquire(self, duration_s: float) -> TagBlock:
        """Tags of the next ``duration_s`` (one block in memory)."""
        if not 1e-6 <= duration_s <= 3600:
            raise ValueError(f"{self.name}: acquire duration {duration_s} s not in [1 µs, 1 h]")
        blocks = list(self._blocks(round(duration_s * PS_PER_S), block_ps=None))
        return blocks[0] if len(blocks) == 1 else TagBlock.concatenate(blocks)

    def stream(self, duration_s: float | None = None) -> Iterator[TagBlock]:
        """Consecutive blocks of ``block_duration_s`` (endless when None; a file ends)."""
        if duration_s is not None and duration_s <= 0:
            raise ValueError(f"{self.name}: stream duration must be > 0, got {duration_s}")
        total = None if duration_s is None else round(duration_s * PS_PER_S)
        return self._blocks(total)

    def safe_state(self) -> None:
        """Stop a running measurement (never raises)."""
        try:
            self._stop_replay()
        except Exception as err:
            log.warning("%s: safe_state failed: %s", self.name, err)

    # -- acquisition machinery -------------------------------------------------------------
    def _start_replay(self, acq_ms: int) -> _Replay:
        rep = _Replay()
        if not _ok(self._sn.unfold.startBlock(acqTime=acq_ms, size=self.block_records,
                                              savePTU=False)):
            raise PicoQuantHarpError(f"{self.name}: snAPI unfold.startBlock failed")
        self._replay = rep
        return rep

    def _stop_replay(self) -> None:
        rep = getattr(self, "_replay", None)
        self._replay = None
        if rep is not None and not rep.finished:
            self._sn.unfold.stopMeasure()
            deadline = time.monotonic() + 5.0
            while not self._sn.unfold.isFinished() and time.monotonic() < deadline:
                self._sn.unfold.getBlock()
                time.sleep(self.poll_interval_s)

    def _pull(self, rep: _Replay, stats: StreamStats) -> bool:
        """One ``getBlock``: decode into ``rep``; False when nothing came."""
        finished = bool(self._sn.unfold.isFinished())
        times, chans = self._sn.unfold.getBlock()
        n = len(times)
        if n:
            t = np.array(times, dtype=np.uint64).astype(np.int64)  # copy out of snAPI's buffer
            c = np.array(chans, dtype=np.uint8)
            stats.snapi_blocks += 1
            stats.peak_snapi_block = max(stats.peak_snapi_block, n)
            stats.records += n
            rep.records += n
            ovf = c == OVERFLOW_CHANNEL
            stats.overflow_records += int(np.count_nonzero(ovf))
            rep.horizon_ps = max(rep.horizon_ps, int(t[-1]))
            keep = ~ovf
            c16 = c.astype(np.int16)
            marker = (c16 & MARKER_FLAG) != 0
            c16[marker] = MARKER_CHANNEL_BASE + (c16[marker] & 0x0F)
            rep.times.append(t[keep])
            rep.chans.append(c16[keep])
        if finished and n == 0:
            rep.finished = True
        return n > 0

    def _take_until(self, rep: _Replay, stop_ps: int) -> tuple[I64Array, npt.NDArray[np.int16]]:
        """Remove and return the pending tags before ``stop_ps`` (sorted by snAPI)."""
        if not rep.times:
            return np.zeros(0, TIME_DTYPE), np.zeros(0, CHANNEL_DTYPE)
        t = np.concatenate(rep.times) if len(rep.times) > 1 else rep.times[0]
        c = np.concatenate(rep.chans) if len(rep.chans) > 1 else rep.chans[0]
        k = int(np.searchsorted(t, stop_ps, side="left"))
        rep.times, rep.chans = ([t[k:]], [c[k:]]) if k < t.size else ([], [])
        return t[:k], c[:k]

    def _apply_settings(self, rep: _Replay, t: I64Array, c: npt.NDArray[np.int16],
                        start: int, stop: int) -> tuple[I64Array, npt.NDArray[np.int16]]:
        """Driver-side enables and offsets (file device), the block's window, dead times.

        Raw tags whose shifted time falls at or after ``stop`` go back to the pending
        tags unshifted (they belong to the next block).
        """
        file = self.is_file_device
        shifted = t.copy()
        keep = np.ones(t.size, bool)
        if file:
            for ch in self.channels:
                sel = c == ch.channel
                if not ch.enabled.cache.get():
                    keep &= ~sel
                elif ch.offset_ps:
                    shifted[sel] += ch.offset_ps
        late = keep & (shifted >= stop)
        if late.any():
            rep.times.insert(0, t[late])
            rep.chans.insert(0, c[late])
            self._resort_pending(rep)
        keep &= (shifted >= start) & (shifted < stop)
        t, c = shifted[keep], c[keep]
        if t.size > 1 and bool(np.any(t[1:] < t[:-1])):
            order = np.argsort(t, kind="stable")
            t, c = t[order], c[order]
        dead_keep = np.ones(t.size, bool)
        for ch in self.channels:
            dead = ch.software_dead_time_ps
            if not dead:
                continue
            idx = np.flatnonzero(c == ch.channel)
            mask, rep.dead_state[ch.channel] = apply_dead_time(
                t[idx], dead, rep.dead_state.get(ch.channel))
            dead_keep[idx[~mask]] = False
        return t[dead_keep], c[dead_keep]

    def _blocks(self, total_ps: int | None, block_ps: int | None = -1,
                apply_settings: bool = True) -> Iterator[TagBlock]:
        """Blocks covering ``total_ps`` (None: until stopped / the file ends)."""
        if self._replay is not None and not self.is_file_device:
            raise PicoQuantHarpError(f"{self.name}: a measurement is already running")
        if block_ps == -1:
            block_ps = round(self.block_duration_s * PS_PER_S)
        stats = StreamStats(block_records=self.block_records)
        self.last_stream_stats = stats
        file = self.is_file_device
        end: int | None
        if file:
            start = self._cursor_ps
            end_limit = self._file_end_ps or 0
            if total_ps is not None and start + total_ps > end_limit:
                raise PicoQuantHarpError(
                    f"{self.name}: the file holds {end_limit / PS_PER_S:.6g} s; "
                    f"{start / PS_PER_S:.6g} s already read, {total_ps / PS_PER_S:.6g} s asked")
            end = end_limit if total_ps is None else start + total_ps
            rep = self._replay if self._replay is not None else self._start_replay(0)
        else:
            start = 0
            end = None if total_ps is None else total_ps
            rep = self._start_replay(0 if total_ps is None else -(-total_ps // 10**9))
        step = (end - start) if block_ps is None and end is not None else (block_ps or 1)
        offsets_ps = max((abs(ch.offset_ps) for ch in self.channels), default=0) if file else 0
        completed = False
        try:
            cursor = start
            while end is None or cursor < end:
                stop = cursor + step if end is None else min(cursor + step, end)
                yield self._one_block(rep, cursor, stop, offsets_ps, apply_settings, stats)
                cursor = stop
                if file:
                    self._cursor_ps = cursor
                if rep.finished and not rep.times and end is None:
                    break
            completed = True
        finally:
            if not file or not completed or (total_ps is None):
                self._stop_replay()
        trailing = self._host_loss_block(rep, cursor) if rep.finished else None
        if trailing is not None:
            yield trailing

    def _one_block(self, rep: _Replay, start: int, stop: int, reach_ps: int,
                   apply_settings: bool, stats: StreamStats) -> TagBlock:
        """Wait until every tag before ``stop`` (+ offset reach) arrived; one TagBlock."""
        idle_since = time.monotonic()
        while not rep.finished and rep.horizon_ps < stop + reach_ps:
            if self._pull(rep, stats):
                idle_since = time.monotonic()
            else:
                if time.monotonic() - idle_since > self.stall_timeout_s:
                    raise PicoQuantHarpCommunicationError(
                        f"{self.name}: snAPI delivered no data for {self.stall_timeout_s} s "
                        f"(waiting for tags up to {stop} ps)")
                time.sleep(self.poll_interval_s)
            stats.peak_pending_tags = max(stats.peak_pending_tags,
                                          sum(x.size for x in rep.times))
        t, c = self._take_until(rep, stop + reach_ps)
        if apply_settings:
            t, c = self._apply_settings(rep, t, c, start, stop)
        else:
            inside = t >= start
            t, c = t[inside], c[inside]
        if t.size > self.max_block_tags:
            raise PicoQuantHarpError(f"{self.name}: block [{start}, {stop}) ps holds "
                                     f"{t.size} tags > max_block_tags={self.max_block_tags}")
        stats.tags += int(t.size)
        lost_iv = self._overrun_interval(rep, start, stop)
        return TagBlock(channel=c.astype(CHANNEL_DTYPE, copy=False),
                        time_ps=t.astype(TIME_DTYPE, copy=False), start_ps=start, stop_ps=stop,
                        overflow=lost_iv is not None, lost_tags=0,
                        overflow_intervals=(np.array([lost_iv], np.int64) if lost_iv
                                            else np.zeros((0, 2), np.int64)))

    @staticmethod
    def _resort_pending(rep: _Replay) -> None:
        t = np.concatenate(rep.times)
        c = np.concatenate(rep.chans)
        order = np.argsort(t, kind="stable")
        rep.times, rep.chans = [t[order]], [c[order]]

    def _overrun_interval(self, rep: _Replay, start: int, stop: int) -> tuple[int, int] | None:
        """``[begin, end)`` of this block lost to a FiFo overrun, if the run had one."""
        if not rep.finished:
            return None
        self._sn.getMeasDescription()
        desc = self._sn.measDescription
        overrun = (str(desc.get("StopReason", "")) == STOP_FIFO_OVERRUN
                   or int(desc.get("WarningsFlag", 0)) & WARN_EVENTS_DROPPED)
        if not overrun:
            return None
        lost_from = rep.horizon_ps + 1  # nothing was recorded after the last record
        begin, end = max(start, lost_from), stop
        if begin >= end:
            return None
        log.error("%s: FiFo overrun — tags in [%d, %d) ps were not recorded", self.name,
                  begin, end)
        return begin, end

    def _host_loss_block(self, rep: _Replay, at_ps: int) -> TagBlock | None:
        """A trailing block if snAPI delivered fewer records than the run holds."""
        if self.is_file_device:
            expected = self._file_records
        else:
            self._sn.getMeasDescription()
            expected = int(self._sn.measDescription.get("NumRecs", rep.records))
        missing = expected - rep.records
        if missing <= 0 or not rep.finished:
            return None
        log.error("%s: snAPI delivered %d of %d records (host-side loss)", self.name,
                  rep.records, expected)
        return TagBlock(channel=np.zeros(0, CHANNEL_DTYPE), time_ps=np.zeros(0, TIME_DTYPE),
                        start_ps=at_ps, stop_ps=at_ps, overflow=True, lost_tags=missing,
                        overflow_intervals=np.array([[0, at_ps]], np.int64))
