"""Mock PicoQuant HydraHarp 400 / MultiHarp 150/160: T2-mode PTU files from the bench.

PicoQuant's snAPI opens a PTU file as a "file device" and replays it through the same
measurement classes as the hardware, so this mock writes what the instrument's own
software would have written for a T2 measurement of the bench, and the driver
(``qkdlab.drivers.picoquant.harp``) reads it back through the vendor's library.

Sources (facts only):

* PicoQuant, *PicoQuant-Time-Tagged-File-Format-Demos* (GitHub ``PicoQuant/``
  ``PicoQuant-Time-Tagged-File-Format-Demos``), ``doc/apx_tttrrecords.html`` "TTTR Record
  Format" (HydraHarp, MultiHarp and TimeHarp260 T2 format): 32-bit little-endian
  records, from the MSB ``special:1 channel:6 timetag:25``; special + channel 63 =
  overflow, the timetag field holding the number of overflows (all types but HydraHarp
  V1); special + channel 0 = sync event; special + channel 1–15 = markers (bit mask);
  overflow period 33 554 432 for record types ``$01010204`` (HydraHarp V2 T2) and the
  MultiHarp T2 type (``$00010207`` in the type list and in PicoQuant's ``Read_PTU.py``;
  the table of the same page prints ``$01010207``; snAPI and ptufile accept
  ``$00010207``).  Global time = overflows × period + timetag, times
  ``MeasDesc_GlobalResolution``.
* same repository, ``doc/apx_tagdictionary.html`` "PicoQuant Unified Tag Dictionary"
  (2021-05-06) and ``PTU/Python/Read_PTU.py``: preamble ``PQTTTR`` + version, then
  tags of 32-byte identifier, int32 index (−1 = not indexed), uint32 type code and an
  8-byte value (strings: int64 length then the bytes), ending with ``Header_End``.
  Tags written here and their meaning: ``Measurement_Mode`` (T2 = 2),
  ``Measurement_SubMode`` (0 = point), ``MeasDesc_GlobalResolution`` /
  ``MeasDesc_Resolution`` (s), ``MeasDesc_AcquisitionTime`` (ms),
  ``TTResult_NumberOfRecords``, ``TTResult_SyncRate`` (counts/s),
  ``TTResult_StopReason`` (0 time over, −2 FiFo overrun), ``TTResult_StopAfter`` (ms),
  ``TTResult_MDescWarningFlags`` (0x040 InptRateTooHigh, 0x080 EventsDropped),
  ``TTResultFormat_TTTRRecType``, ``TTResultFormat_BitsPerRecord`` (32),
  ``HW_Type``, ``HW_SerialNo``, ``HW_InpChannels``, ``HW_BaseResolution`` (s),
  ``HWSync_Divider``, ``HWSync_Offset`` (ps), ``HWInpChan_Enabled/Offset(i)`` and
  ``HWInpChan_CFDLevel(i)`` (HydraHarp) or ``HWInpChan_TrgLevel(i)`` (MultiHarp, mV),
  and user tags ``Usr<Ident>`` (allowed for "additional user defined content").
* *HydraHarp 400 User's Manual and Technical Data*, version 3.0.0.1, PicoQuant
  (pages at easymanua.ls, §5.3.2 T2 mode): T2 throughput up to 40 Mcps over USB,
  shared by all input channels; FiFo of 2 M event records and TDC speed 12.5 Mcps
  per channel (DESY HydraHarp notes, hasyweb.desy.de); base resolution 1 ps.
* *MultiHarp Software* manual V3.1.0.0, PicoQuant (easymanua.ls, §5.3.1–5.3.2): up to
  90 Mcps over USB 3; front-end FIFO losses are flagged by the hardware.  MultiHarp 160
  product page: 5 ps base resolution, 650 ps dead time, 16 inputs per unit.

Device model (*mock* marks the mock's own choices):

* bench tagger channel 0 (Alice's frame marker) is the SYNC input, written as sync
  records; bench channel ``c >= 1`` is input ``c`` (record channel code ``c − 1``); so
  snAPI's channel numbering (0 = sync, 1… inputs) equals the bench's;
* per channel a non-paralysable TDC dead time: 80 ns on the HydraHarp (*mock*: the
  12.5 Mcps TDC figure as a dead time), 650 ps on the MultiHarp.  Events inside it are
  never recorded and never reported (as on the hardware); they are counted in
  :class:`PtuWriteResult` (``dead_time_dropped``);
* the FiFo: ``fifo_records`` records drained at ``max_rate_hz`` (the USB throughput),
  an exact per-event leaky bucket (Lindley recursion).  An event that finds the FiFo
  full stops the measurement, as the vendor's software does on a FiFo-full flag: no
  record after it, ``TTResult_StopReason`` = −2 (FiFo overrun),
  ``TTResult_StopAfter`` = that time (ms, rounded up), warning flag 0x080
  (EventsDropped).  The bench keeps running to the requested end; every event offered
  from the overrun on is lost (``PtuWriteResult.lost``, and *mock* user tags
  ``UsrMockLostEvents`` / ``UsrMockOverrunAt_ps`` with the exact figures, which the
  driver does not need);
* overflow records are written as the hardware writes them (compressed, count in the
  timetag field), including trailing ones up to the end of the acquisition, so a
  reader knows the span covered; they are bookkeeping, not loss;
* times are floored to the model's resolution (1 ps HydraHarp: exact; 5 ps MultiHarp);
  PTU time 0 is the bench tagger time at the start of :func:`write_ptu`
  (``PtuWriteResult.origin_ps``).

The bench is touched only in :func:`_acquire_from_bench` (its generic tagger rate limit
is lifted there for the duration of the write: this model replaces it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from qkdlab.mock_instruments.server import FaultInjector

log = logging.getLogger(__name__)

PS_PER_S = 10**12
I64Array = npt.NDArray[np.int64]
I16Array = npt.NDArray[np.int16]

# ---- tag type codes (tag dictionary / Read_PTU.py) ------------------------------------
TY_EMPTY8 = 0xFFFF0008
TY_BOOL8 = 0x00000008
TY_INT8 = 0x10000008
TY_BITSET64 = 0x11000008
TY_FLOAT8 = 0x20000008
TY_TDATETIME = 0x21000008
TY_ANSISTRING = 0x4001FFFF
PTU_MAGIC = b"PQTTTR\x00\x00"
PTU_VERSION = b"1.0.00\x00\x00"

# ---- T2 record layout (apx_tttrrecords.html) -------------------------------------------
REC_HYDRAHARP2_T2 = 0x01010204
REC_MULTIHARP_T2 = 0x00010207
T2_WRAP = 33_554_432  # overflow period (time units) of HydraHarp V2 / MultiHarp T2
T2_SPECIAL = np.uint32(1 << 31)
T2_CHANNEL_SHIFT = 25
T2_TIMETAG_MASK = (1 << 25) - 1
T2_OVERFLOW_CODE = 63
MAX_OVERFLOW_COUNT = T2_TIMETAG_MASK  # overflows one compressed record can carry

STOP_TIME_OVER = 0
STOP_FIFO_OVERRUN = -2
WARN_INPT_RATE_TOO_HIGH = 0x040
WARN_EVENTS_DROPPED = 0x080

USR_LOST_EVENTS = "UsrMockLostEvents"
USR_OVERRUN_AT_PS = "UsrMockOverrunAt_ps"


@dataclass(frozen=True)
class HarpModel:
    """What the mock needs to know about one PicoQuant model (see the module docstring)."""

    key: str
    name: str
    hw_type: str
    record_type: int
    resolution_ps: int
    inputs: int
    max_rate_hz: float
    dead_time_ps: int
    fifo_records: int
    cfd_inputs: bool  # HydraHarp: CFD inputs; MultiHarp: edge triggers


MODELS: dict[str, HarpModel] = {
    "hydraharp": HarpModel("hydraharp", "HydraHarp 400", "HydraHarp", REC_HYDRAHARP2_T2,
                           resolution_ps=1, inputs=8, max_rate_hz=40e6, dead_time_ps=80_000,
                           fifo_records=2**21, cfd_inputs=True),
    "multiharp150": HarpModel("multiharp150", "MultiHarp 150 8P", "MultiHarp",
                              REC_MULTIHARP_T2, resolution_ps=5, inputs=8, max_rate_hz=90e6,
                              dead_time_ps=650, fifo_records=2**21, cfd_inputs=False),
    "multiharp160": HarpModel("multiharp160", "MultiHarp 160", "MultiHarp",
                              REC_MULTIHARP_T2, resolution_ps=5, inputs=16, max_rate_hz=90e6,
                              dead_time_ps=650, fifo_records=2**21, cfd_inputs=False),
}
"""Models by key.  MultiHarp FiFo depth: *mock* (not found; the HydraHarp's 2 M used)."""


def model_by_key(key: str) -> HarpModel:
    """The :class:`HarpModel` named ``key`` (case-insensitive)."""
    try:
        return MODELS[key.lower()]
    except KeyError:
        raise ValueError(f"unknown PicoQuant model {key!r}; known: {sorted(MODELS)}") from None


# ------------------------------------------------------------------ header tags


def encode_tag(ident: str, value: object, index: int = -1, *, bitset: bool = False) -> bytes:
    """One tag: 32-byte identifier, int32 index, uint32 type, 8-byte value (+ string bytes)."""
    name = ident.encode("ascii")
    if len(name) > 31:
        raise ValueError(f"tag identifier {ident!r} longer than 31 characters")
    head = struct.pack("<32si", name, index)
    if value is None:
        return head + struct.pack("<I", TY_EMPTY8) + bytes(8)
    if isinstance(value, bool):
        return head + struct.pack("<Iq", TY_BOOL8, int(value))
    if isinstance(value, int):
        return head + struct.pack("<Iq", TY_BITSET64 if bitset else TY_INT8, value)
    if isinstance(value, float):
        return head + struct.pack("<Id", TY_FLOAT8, value)
    if isinstance(value, datetime):
        days = (value - datetime(1899, 12, 30)) / timedelta(days=1)
        return head + struct.pack("<Id", TY_TDATETIME, days)
    if isinstance(value, str):
        data = value.encode("latin-1") + b"\x00"
        data += bytes(-len(data) % 8)
        return head + struct.pack("<Iq", TY_ANSISTRING, len(data)) + data
    raise TypeError(f"cannot encode tag {ident!r} of type {type(value).__name__}")


@dataclass
class _Header:
    """Header bytes plus the offsets of the 8-byte values patched when the file closes."""

    data: bytearray = field(default_factory=lambda: bytearray(PTU_MAGIC + PTU_VERSION))
    patch: dict[str, int] = field(default_factory=dict)

    def add(self, ident: str, value: object, index: int = -1, *, bitset: bool = False,
            patchable: bool = False) -> None:
        if patchable:
            self.patch[ident] = len(self.data) + 40
        self.data += encode_tag(ident, value, index, bitset=bitset)


# ------------------------------------------------------------------ record encoding


def encode_t2(ticks: I64Array, codes: npt.NDArray[np.int64], overflows_done: int,
              upto_overflow: int | None = None) -> tuple[npt.NDArray[np.uint32], int]:
    """T2 records of events (``ticks`` sorted, in resolution units; ``codes`` = channel
    code: −1 sync, ``k >= 0`` input ``k + 1``) after ``overflows_done`` overflows.

    Overflow records (compressed: count in the timetag field) precede each event whose
    overflow index grew; ``upto_overflow`` appends trailing ones up to that index.
    Returns the records and the overflow count reached.  Vectorised.
    """
    n = ticks.size
    ovf = ticks // T2_WRAP
    prev = np.empty(n + 1, np.int64)
    prev[0] = overflows_done
    prev[1:] = ovf
    steps = np.diff(prev)
    if n and steps.min() < 0:
        raise ValueError("T2 events must be sorted and after the overflows already written")
    last = int(prev[-1])
    tail = 0 if upto_overflow is None else max(0, upto_overflow - last)
    counts = np.append(steps, tail)  # overflows before event i; last entry: trailing
    k = -(-counts // MAX_OVERFLOW_COUNT)  # records needed for each gap
    total = n + int(k.sum())
    out = np.empty(total, np.uint32)
    pos_after = np.cumsum(k) + np.arange(n + 1)  # position of event i (entry n: end)
    event_pos = pos_after[:n]
    words = (ticks - ovf * T2_WRAP).astype(np.uint32)
    is_sync = codes < 0
    chan = np.where(is_sync, 0, codes).astype(np.uint32) << np.uint32(T2_CHANNEL_SHIFT)
    words |= chan
    words[is_sync] |= T2_SPECIAL
    out[event_pos] = words
    n_ovf = int(k.sum())
    if n_ovf:
        owner = np.repeat(np.arange(n + 1), k)
        first = pos_after[owner] - k[owner]
        rank = np.arange(n_ovf) - np.repeat(np.cumsum(k) - k, k)
        cnt = np.where(rank < k[owner] - 1, MAX_OVERFLOW_COUNT,
                       counts[owner] - (k[owner] - 1) * MAX_OVERFLOW_COUNT)
        out[first + rank] = (T2_SPECIAL | np.uint32(T2_OVERFLOW_CODE << T2_CHANNEL_SHIFT)
                             | cnt.astype(np.uint32))
    return out, last + tail


# ------------------------------------------------------------------ device model


def dead_time_mask(times: I64Array, dead_ps: int, last_kept: int | None) -> tuple[
        npt.NDArray[np.bool_], int | None]:
    """Events a non-paralysable dead time keeps (one channel, sorted) and the last kept.

    Events ``>= dead_ps`` after their predecessor always start a chain; inside runs of
    closer events the kept chain is followed with ``searchsorted``, all runs per round.
    """
    n = times.size
    if n == 0 or dead_ps <= 0:
        return np.ones(n, bool), (int(times[-1]) if n else last_kept)
    kept = np.zeros(n, bool)
    start = 0
    if last_kept is not None:
        start = int(np.searchsorted(times, last_kept + dead_ps, side="left"))
    if start >= n:
        return kept, last_kept
    t = times
    frontier_mask = np.zeros(n, bool)
    frontier_mask[start] = True
    if start + 1 < n:
        frontier_mask[start + 1:] = (t[start + 1:] - t[start:-1]) >= dead_ps
    cur = np.flatnonzero(frontier_mask)
    kept[cur] = True
    while cur.size:
        nxt = np.searchsorted(t, t[cur] + dead_ps, side="left")
        nxt = nxt[nxt < n]
        nxt = np.unique(nxt[~kept[nxt]])
        kept[nxt] = True
        cur = nxt
    return kept, int(t[np.flatnonzero(kept)[-1]])


@dataclass
class _Fifo:
    """Exact per-event leaky bucket: ``capacity`` records drained at ``rate_hz``."""

    capacity: int
    rate_hz: float
    level: float = 0.0  # records in the FiFo just after the last event
    time_ps: int = 0  # time of the last event

    def first_overrun(self, times: I64Array) -> int:
        """Index of the first event that finds the FiFo full (``times.size`` if none).

        Lindley recursion ``L_i = max(L_{i−1} − R·Δt, 0) + 1`` in closed form: with
        ``S_i = i − R·t_i``, ``L_i = S_i + max(L_0 − S_0, max_{j<=i}(1 − S_j))``.
        """
        n = times.size
        if n == 0:
            return 0
        rate = self.rate_hz / PS_PER_S
        rel = (times - self.time_ps).astype(np.float64)
        s = np.arange(1, n + 1, dtype=np.float64) - rate * rel
        x = np.maximum.accumulate(np.maximum(1.0 - s, self.level))
        level = s + x
        over = np.flatnonzero(level > self.capacity + 1e-9)
        if over.size:
            return int(over[0])
        self.level = float(level[-1])
        self.time_ps = int(times[-1])
        return n


@dataclass
class PtuWriteResult:
    """What a write produced, with the ground truth the file does not hold."""

    path: Path
    model: HarpModel
    origin_ps: int  # bench tagger time of PTU time 0
    duration_ps: int
    records: int = 0
    data_offset: int = 0  # byte offset of the first record
    written: dict[int, int] = field(default_factory=dict)  # events per channel in the file
    offered: dict[int, int] = field(default_factory=dict)  # events reaching the inputs
    dead_time_dropped: dict[int, int] = field(default_factory=dict)
    lost: int = 0  # events lost to the FiFo overrun (not recorded, device stopped)
    overrun_ps: int | None = None  # PTU time of the overrun
    truth_time_ps: I64Array | None = None  # events written (PTU time, quantised), if kept
    truth_channel: I16Array | None = None
    truth_lost_time_ps: I64Array | None = None  # events lost to the overrun, if kept

    @property
    def address(self) -> str:
        """``file://`` address of the written file (what the driver opens)."""
        return self.path.resolve().as_uri()


def _add(counter: dict[int, int], channel: I16Array) -> None:
    uniq, n = np.unique(channel, return_counts=True)
    for c, k in zip(uniq.tolist(), n.tolist(), strict=True):
        counter[c] = counter.get(c, 0) + k


class HarpRecorder:
    """A PicoQuant device in T2 mode recording to a PTU file (feed it sorted tags).

    Args:
        path: file to write.
        duration_ps: requested acquisition time (ps; ``MeasDesc_AcquisitionTime``).
        model: :class:`HarpModel` or its key.
        max_rate_hz / fifo_records / dead_time_ps: override the model's figures.
        keep_truth: keep every written and lost event for tests.
        serial, comment, sync_divider, sync_rate_hz, input_offsets_ps,
        input_levels_mv: header content.
    """

    def __init__(self, path: str | os.PathLike[str], duration_ps: int,
                 model: HarpModel | str = "hydraharp", *, max_rate_hz: float | None = None,
                 fifo_records: int | None = None, dead_time_ps: int | None = None,
                 keep_truth: bool = False, serial: str = "1000001", comment: str = "",
                 sync_divider: int = 1, sync_rate_hz: int = 0,
                 input_offsets_ps: Mapping[int, int] | None = None,
                 input_levels_mv: Mapping[int, int] | None = None,
                 origin_ps: int = 0) -> None:
        self.model = model_by_key(model) if isinstance(model, str) else model
        if duration_ps <= 0:
            raise ValueError(f"duration must be > 0 ps, got {duration_ps}")
        self.duration_ps = int(duration_ps)
        self.fifo = _Fifo(int(fifo_records or self.model.fifo_records),
                          float(max_rate_hz or self.model.max_rate_hz))
        self.dead_ps = self.model.dead_time_ps if dead_time_ps is None else int(dead_time_ps)
        self.keep_truth = keep_truth
        self.result = PtuWriteResult(Path(path), self.model, origin_ps, self.duration_ps)
        self._last_kept: dict[int, int | None] = {}
        self._overflows = 0
        self._last_tick = -1
        self._truth: list[tuple[I64Array, I16Array]] = []
        self._lost_truth: list[I64Array] = []
        self._closed = False
        acq_ms = math.ceil(self.duration_ps / 1e9)
        hdr = _Header()
        hdr.add("File_GUID", f"{{{str(uuid.uuid4()).upper()}}}")
        hdr.add("File_CreatingTime", datetime.now())
        hdr.add("File_Comment", comment or f"qkdlab mock {self.model.name} T2")
        hdr.add("CreatorSW_Name", "qkdlab mock_instruments.picoquant")
        hdr.add("CreatorSW_Version", "0.1")
        hdr.add("Measurement_Mode", 2)
        hdr.add("Measurement_SubMode", 0)
        hdr.add("HW_Type", self.model.hw_type)
        hdr.add("HW_PartNo", self.model.name)
        hdr.add("HW_SerialNo", serial)
        hdr.add("HW_InpChannels", self.model.inputs)
        hdr.add("HW_BaseResolution", self.model.resolution_ps * 1e-12)
        hdr.add("HWSync_Divider", int(sync_divider))
        hdr.add("HWSync_Offset", 0)
        offsets = dict(input_offsets_ps or {})
        levels = dict(input_levels_mv or {})
        level_tag = "HWInpChan_CFDLevel" if self.model.cfd_inputs else "HWInpChan_TrgLevel"
        for i in range(self.model.inputs):
            hdr.add("HWInpChan_Enabled", True, i)
            hdr.add("HWInpChan_Offset", int(offsets.get(i + 1, 0)), i)
            hdr.add(level_tag, int(levels.get(i + 1, 100 if self.model.cfd_inputs else -50)), i)
        hdr.add("MeasDesc_GlobalResolution", self.model.resolution_ps * 1e-12)
        hdr.add("MeasDesc_Resolution", self.model.resolution_ps * 1e-12)
        hdr.add("MeasDesc_BinningFactor", 1)
        hdr.add("MeasDesc_AcquisitionTime", acq_ms)
        hdr.add("TTResult_SyncRate", int(sync_rate_hz))
        hdr.add("TTResult_StopReason", STOP_TIME_OVER, patchable=True)
        hdr.add("TTResult_StopAfter", acq_ms, patchable=True)
        hdr.add("TTResult_MDescWarningFlags", 0, bitset=True, patchable=True)
        hdr.add("TTResult_NumberOfRecords", 0, patchable=True)
        hdr.add("TTResultFormat_TTTRRecType", self.model.record_type)
        hdr.add("TTResultFormat_BitsPerRecord", 32)
        hdr.add(USR_LOST_EVENTS, 0, patchable=True)
        hdr.add(USR_OVERRUN_AT_PS, -1, patchable=True)
        hdr.add("Header_End", None)
        self._header = hdr
        self._fh: IO[bytes] = open(self.result.path, "wb")  # noqa: SIM115 (closed in close())
        self._fh.write(bytes(hdr.data))
        self.result.data_offset = len(hdr.data)

    @property
    def stopped(self) -> bool:
        """True once a FiFo overrun stopped the measurement."""
        return self.result.overrun_ps is not None

    def feed(self, time_ps: I64Array, channel: I16Array) -> None:
        """Events (PTU time in ps, sorted; bench channel numbers) reaching the inputs."""
        if self._closed:
            raise RuntimeError("recorder already closed")
        time_ps = np.asarray(time_ps, np.int64)
        channel = np.asarray(channel, np.int16)
        if time_ps.size == 0:
            return
        if time_ps[0] < 0 or time_ps[-1] >= self.duration_ps:
            raise ValueError("events outside [0, duration) of the PTU file")
        if channel.min() < 0 or channel.max() > self.model.inputs:
            raise ValueError(f"channel outside 0 (sync) … {self.model.inputs} of the "
                             f"{self.model.name}")
        res = self.result
        _add(res.offered, channel)
        if self.stopped:
            res.lost += int(time_ps.size)
            if self.keep_truth:
                self._lost_truth.append(time_ps.copy())
            return
        keep = np.ones(time_ps.size, bool)
        for c in np.unique(channel).tolist():
            sel = np.flatnonzero(channel == c)
            mask, self._last_kept[c] = dead_time_mask(time_ps[sel], self.dead_ps,
                                                      self._last_kept.get(c))
            keep[sel[~mask]] = False
        if not keep.all():
            _add(res.dead_time_dropped, channel[~keep])
            time_ps, channel = time_ps[keep], channel[keep]
        cut = self.fifo.first_overrun(time_ps)
        if cut < time_ps.size:
            res.overrun_ps = int(time_ps[cut])
            res.lost += int(time_ps.size - cut)
            if self.keep_truth:
                self._lost_truth.append(time_ps[cut:].copy())
            time_ps, channel = time_ps[:cut], channel[:cut]
            log.warning("mock %s: FiFo overrun at %d ps; measurement stopped",
                        self.model.name, res.overrun_ps)
        self._write(time_ps, channel)

    def _write(self, time_ps: I64Array, channel: I16Array, upto_overflow: int | None = None
               ) -> None:
        ticks = time_ps // self.model.resolution_ps
        codes = channel.astype(np.int64) - 1
        records, self._overflows = encode_t2(ticks, codes, self._overflows, upto_overflow)
        self._fh.write(records.tobytes())
        self.result.records += int(records.size)
        if time_ps.size:
            _add(self.result.written, channel)
            if self.keep_truth:
                self._truth.append((ticks * self.model.resolution_ps, channel.copy()))

    def close(self) -> PtuWriteResult:
        """Trailing overflows, final header values; the result (idempotent)."""
        res = self.result
        if self._closed:
            return res
        end_ps = res.overrun_ps if res.overrun_ps is not None else self.duration_ps
        end_tick = max(0, end_ps - 1) // self.model.resolution_ps
        self._write(np.zeros(0, np.int64), np.zeros(0, np.int16),
                    upto_overflow=end_tick // T2_WRAP)
        patches: dict[str, bytes] = {
            "TTResult_NumberOfRecords": struct.pack("<q", res.records),
            USR_LOST_EVENTS: struct.pack("<q", res.lost),
        }
        if res.overrun_ps is not None:
            patches["TTResult_StopReason"] = struct.pack("<q", STOP_FIFO_OVERRUN)
            patches["TTResult_StopAfter"] = struct.pack("<q", math.ceil(res.overrun_ps / 1e9))
            patches["TTResult_MDescWarningFlags"] = struct.pack("<q", WARN_EVENTS_DROPPED)
            patches[USR_OVERRUN_AT_PS] = struct.pack("<q", res.overrun_ps)
        for ident, value in patches.items():
            self._fh.seek(self._header.patch[ident])
            self._fh.write(value)
        self._fh.close()
        self._closed = True
        if self.keep_truth:
            if self._truth:
                res.truth_time_ps = np.concatenate([t for t, _ in self._truth])
                res.truth_channel = np.concatenate([c for _, c in self._truth])
            else:
                res.truth_time_ps, res.truth_channel = np.zeros(0, np.int64), np.zeros(0, np.int16)
            res.truth_lost_time_ps = (np.concatenate(self._lost_truth) if self._lost_truth
                                      else np.zeros(0, np.int64))
        return res

    def __enter__(self) -> HarpRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ bench access


@contextlib.contextmanager
def _lifted_tagger_limit(bench: Any) -> Iterator[None]:
    """The bench's generic tagger rate limit lifted (this model applies its own)."""
    with bench.lock:
        saved = (bench.tagger.max_rate_hz, bench.tagger.buffer_tags)
        bench.tagger.max_rate_hz = 1e15
        bench.tagger.buffer_tags = 2**50
    try:
        yield
    finally:
        with bench.lock:
            bench.tagger.max_rate_hz, bench.tagger.buffer_tags = saved


def _acquire_from_bench(bench: Any, duration_ps: int, chunk_ps: int
                        ) -> Iterator[tuple[int, I64Array, I16Array, int]]:
    """THE bench access: consecutive ``bench.acquire`` blocks covering ``duration_ps``.

    Yields ``(block start on the bench tagger timebase, time_ps, channel, lost_tags)``.
    """
    done = 0
    with _lifted_tagger_limit(bench):
        while done < duration_ps:
            step = min(chunk_ps, duration_ps - done)
            block = bench.acquire(step / PS_PER_S)
            done += step
            yield int(block.start_ps), block.time_ps, block.channel, int(block.lost_tags)


def write_ptu(bench: Any, path: str | os.PathLike[str], duration_s: float,
              model: HarpModel | str = "hydraharp", *, chunk_s: float = 0.01,
              **recorder_kwargs: Any) -> PtuWriteResult:
    """Record ``duration_s`` of the bench as the PicoQuant device would (T2 PTU file).

    ``recorder_kwargs`` go to :class:`HarpRecorder` (``max_rate_hz``, ``fifo_records``,
    ``dead_time_ps``, ``keep_truth``, header content).
    """
    duration_ps = round(duration_s * PS_PER_S)
    chunk_ps = max(1, round(chunk_s * PS_PER_S))
    recorder: HarpRecorder | None = None
    try:
        for start, t, ch, lost in _acquire_from_bench(bench, duration_ps, chunk_ps):
            if recorder is None:
                recorder = HarpRecorder(path, duration_ps, model, origin_ps=start,
                                        **recorder_kwargs)
            if lost:
                log.warning("bench reported %d lost tags despite the lifted limit", lost)
            rel = t - np.int64(recorder.result.origin_ps)
            inside = rel < duration_ps  # clock-rate error may stretch the last block
            recorder.feed(rel[inside], ch[inside])
    finally:
        if recorder is not None:
            recorder.close()
    if recorder is None:
        raise ValueError(f"duration must be > 0 s, got {duration_s}")
    return recorder.result


def write_ptu_tags(path: str | os.PathLike[str], blocks: Iterable[tuple[I64Array, I16Array]],
                   duration_s: float, model: HarpModel | str = "hydraharp",
                   **recorder_kwargs: Any) -> PtuWriteResult:
    """Record given ``(time_ps, channel)`` blocks (sorted, PTU time) without a bench."""
    with HarpRecorder(path, round(duration_s * PS_PER_S), model, **recorder_kwargs) as rec:
        for t, ch in blocks:
            rec.feed(t, ch)
    return rec.result


# ------------------------------------------------------------------ launcher shim


class PtuFileServer:
    """Launcher shim for ``mock://picoquant/<model>?duration=…``: no socket, a file.

    ``start()`` records ``duration`` seconds of the bench into a PTU file; ``address``
    is then its ``file://`` URI (what :class:`~qkdlab.drivers.picoquant.harp.PicoQuantHarp`
    opens); ``stop()`` deletes the file if the shim created its folder.  ``faults`` is
    a :class:`FaultInjector` for interface parity only: a file has no link to drop.
    ``truncate_file(n_bytes)`` and ``corrupt_records(n)`` damage the file instead.
    """

    def __init__(self, name: str, bench: Any, duration_s: float, model: str,
                 directory: str | None = None, **recorder_kwargs: Any) -> None:
        self.name = name
        self.bench = bench
        self.duration_s = duration_s
        self.model = model_by_key(model)
        self.recorder_kwargs = recorder_kwargs
        self.faults = FaultInjector()
        self._own_dir = directory is None
        self._dir = Path(directory) if directory is not None else None
        self.result: PtuWriteResult | None = None

    @property
    def path(self) -> Path:
        if self._dir is None:
            raise RuntimeError(f"mock {self.name}: not started")
        return self._dir / f"{self.name}.ptu"

    @property
    def address(self) -> str:
        """``file://`` URI of the recorded file (after :meth:`start`)."""
        return self.path.resolve().as_uri()

    def start(self) -> None:
        """Record the file (runs the bench for ``duration_s``)."""
        if self.bench is None:
            raise ValueError(f"mock {self.name}: a PTU file device needs the bench")
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="qkdlab-picoquant-"))
        self.result = write_ptu(self.bench, self.path, self.duration_s, self.model,
                                **self.recorder_kwargs)

    def stop(self) -> None:
        """Remove the file (and the folder the shim made); idempotent."""
        if self._dir is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._own_dir:
            with contextlib.suppress(OSError):
                self._dir.rmdir()
            self._dir = None

    def truncate_file(self, n_bytes: int) -> None:
        """Cut the last ``n_bytes`` off the file (an interrupted copy)."""
        size = self.path.stat().st_size
        os.truncate(self.path, max(0, size - n_bytes))

    def corrupt_records(self, count: int, seed: int = 0) -> None:
        """Overwrite ``count`` random records with input-channel codes the model lacks."""
        if self.result is None:
            raise RuntimeError(f"mock {self.name}: not started")
        header_end = self.result.data_offset
        rng = np.random.default_rng(seed)
        with open(self.path, "r+b") as fh:
            for idx in rng.integers(0, max(1, self.result.records), count).tolist():
                fh.seek(header_end + 4 * idx)
                fh.write(struct.pack("<I", (62 << T2_CHANNEL_SHIFT) | 1))


def serve(name: str, bench: Any = None, options: Mapping[str, str] | None = None
          ) -> PtuFileServer:
    """Factory for the launcher (``mock://picoquant/hydraharp?duration=0.1``).

    Options: ``duration`` (s, default 0.1), ``dir`` (folder; default a temporary one),
    ``max_rate_hz``, ``fifo_records``, ``dead_time_ps``, ``serial``, ``chunk_s``.  The
    model is the address path (``hydraharp``, ``multiharp150``, ``multiharp160``) or
    the ``model`` option.
    """
    opts = dict(options or {})
    model = opts.pop("model", "hydraharp")
    duration = float(opts.pop("duration", "0.1"))
    directory = opts.pop("dir", None)
    kwargs: dict[str, Any] = {}
    for key, conv in (("max_rate_hz", float), ("fifo_records", int), ("dead_time_ps", int),
                      ("serial", str), ("chunk_s", float)):
        if key in opts:
            kwargs[key] = conv(opts.pop(key))
    if opts:
        raise ValueError(f"unknown PicoQuant mock option(s): {', '.join(sorted(opts))}")
    return PtuFileServer(name, bench, duration, model, directory, **kwargs)


def serve_hydraharp(name: str, bench: Any = None, options: Mapping[str, str] | None = None
                    ) -> PtuFileServer:
    """Launcher factory of ``mock://picoquant/hydraharp``."""
    return serve(name, bench, {**dict(options or {}), "model": "hydraharp"})


def serve_multiharp150(name: str, bench: Any = None, options: Mapping[str, str] | None = None
                       ) -> PtuFileServer:
    """Launcher factory of ``mock://picoquant/multiharp150``."""
    return serve(name, bench, {**dict(options or {}), "model": "multiharp150"})


def serve_multiharp160(name: str, bench: Any = None, options: Mapping[str, str] | None = None
                       ) -> PtuFileServer:
    """Launcher factory of ``mock://picoquant/multiharp160``."""
    return serve(name, bench, {**dict(options or {}), "model": "multiharp160"})
