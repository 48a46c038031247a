"""What the dashboard shows, built from live-stream messages (no Qt here).

Every message costs O(its size): time series go into bounded ring buffers, the
histogram is replaced, status tables are replaced.  Panels read contiguous views of
the rings, so a redraw costs O(ring length), never O(run length).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

INTENSITIES = ("signal", "decoy", "vacuum")
DEFAULT_HISTORY_S = 1800.0
DEFAULT_MAX_POINTS = 10_000
"""Points per series kept (30 min of 0.2 s frames is 9000)."""


def _float(value: Any) -> float:
    """A message value as float; None (a non-finite value on the wire) becomes NaN."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def decimate(x: FloatArray, y: FloatArray, max_points: int
             ) -> tuple[FloatArray, FloatArray]:
    """At most ``max_points`` points keeping each block's minimum and maximum.

    The newest point always survives (blocks are aligned to the end); NaN values are
    ignored within a block (a block of only NaN stays NaN, a gap in the curve).  Costs
    O(len(y)) in numpy, so a plot never draws more than ``max_points`` points.
    """
    n = y.size
    if n <= max_points or max_points < 2:
        return x, y
    k = -(-n // (max_points // 2))  # block length
    start = n % k
    xb, yb = x[start:].reshape(-1, k), y[start:].reshape(-1, k)
    xs = np.empty(2 * xb.shape[0])
    ys = np.empty(2 * xb.shape[0])
    xs[0::2], xs[1::2] = xb[:, 0], xb[:, -1]
    ys[0::2] = np.fmin.reduce(yb, axis=1)
    ys[1::2] = np.fmax.reduce(yb, axis=1)
    if start:  # the oldest, partial block
        head_x, head_y = x[:start], y[:start]
        xs = np.concatenate([[head_x[0], head_x[-1]], xs])
        ys = np.concatenate([[np.fmin.reduce(head_y), np.fmax.reduce(head_y)], ys])
    return xs, ys


class Ring:
    """The last ``capacity`` values of a series: O(1) amortised append, copy-free view.

    Values live in a buffer twice the capacity; when it is full the newest half is
    moved to the front, so the view is always one contiguous slice.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._buf = np.full(2 * capacity, np.nan)
        self._end = 0

    def append(self, value: float) -> None:
        if self._end == self._buf.size:
            self._buf[: self.capacity] = self._buf[self.capacity:]
            self._end = self.capacity
        self._buf[self._end] = value
        self._end += 1

    def view(self) -> FloatArray:
        """The kept values, oldest first (a view: copy it to keep it)."""
        return self._buf[max(0, self._end - self.capacity): self._end]

    def clear(self) -> None:
        self._end = 0

    def __len__(self) -> int:
        return min(self._end, self.capacity)


@dataclass
class CalibrationRow:
    name: str
    value: str
    unit: str
    id: str
    timestamp_unix_s: float
    max_age_s: float
    ok: bool

    def age_s(self, now_unix_s: float) -> float:
        return now_unix_s - self.timestamp_unix_s

    def state(self, now_unix_s: float) -> str:
        """"failed", "stale" (older than max_age_s), "ok" or "unknown" (no timestamp)."""
        if not self.ok:
            return "failed"
        if not math.isfinite(self.timestamp_unix_s):
            return "unknown"
        if math.isfinite(self.max_age_s) and self.age_s(now_unix_s) > self.max_age_s:
            return "stale"
        return "ok"


@dataclass
class InstrumentRow:
    name: str
    connected: bool
    errors: list[str]
    interlock: str | None


@dataclass
class RunState:
    run_id: str | None = None
    status: str = "no run"
    control: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    ended: bool = False
    """A ``run`` end message arrived (its status says how the run ended)."""


class DashboardModel:
    """Ring buffers and state of the live dashboard.

    Args:
        history_s: acquisition time shown (s); older points are not drawn.
        max_points: points kept per series (bounds memory and redraw cost).
    """

    def __init__(self, history_s: float = DEFAULT_HISTORY_S,
                 max_points: int = DEFAULT_MAX_POINTS) -> None:
        self.history_s = history_s
        self.max_points = max_points
        self.series: dict[str, Ring] = {}
        self.channels: list[int] = []
        self.histogram: npt.NDArray[np.int64] = np.zeros((0, 0), np.int64)
        self.histogram_range_ps: tuple[float, float] = (math.nan, math.nan)
        self.window_ps = math.nan
        self.sync_offset_ref_ps = math.nan
        self.sync_offset_ps = math.nan
        self.secure_in_stream = False
        self.run = RunState()
        self.calibration: list[CalibrationRow] = []
        self.calibration_received_unix_s = math.nan
        self.instruments: list[InstrumentRow] = []
        self.errors: deque[str] = deque(maxlen=200)
        self.frames = 0
        self.frames_total = 0
        self.messages = 0
        self.dropped = 0
        self.version = 0
        """Bumped by every message that changes what is drawn."""
        self.pending_publish_times: list[float] = []
        """Publish times (Unix s) of frames ingested since the last ``take_pending``."""
        self._source: str | None = None
        self._last_seq: int | None = None
        self._last_frame: int | None = None
        self._acq_end_s = 0.0

    # -- series ----------------------------------------------------------------------
    def _ring(self, name: str) -> Ring:
        ring = self.series.get(name)
        if ring is None:
            ring = self.series[name] = Ring(self.max_points)
            # a series that appears late (a new channel) lines up with the time axis
            for _ in range(len(self.series.get("t_s", ())) - 1 if name != "t_s" else 0):
                ring.append(math.nan)
        return ring

    def xy(self, name: str) -> tuple[FloatArray, FloatArray]:
        """(acquisition time in s, values) of a series within the shown history."""
        ring, t_ring = self.series.get(name), self.series.get("t_s")
        if ring is None or t_ring is None:
            return np.zeros(0), np.zeros(0)
        y, t = ring.view(), t_ring.view()
        n = min(y.size, t.size)
        y, t = y[y.size - n:], t[t.size - n:]
        if n and math.isfinite(self.history_s):
            first = int(np.searchsorted(t, t[-1] - self.history_s, side="left"))
            return t[first:], y[first:]
        return t, y

    def reset_run(self) -> None:
        """Forget the time series and histogram (a new run starts)."""
        for ring in self.series.values():
            ring.clear()
        self.series = {}
        self.channels = []
        self.histogram = np.zeros((0, 0), np.int64)
        self.sync_offset_ref_ps = math.nan
        self.secure_in_stream = False
        self.frames = 0
        self._last_frame = None
        self._acq_end_s = 0.0
        self.version += 1

    # -- messages --------------------------------------------------------------------
    def ingest(self, message: dict[str, Any]) -> str:
        """Take one live-stream message; its type."""
        self.messages += 1
        kind = str(message.get("type", ""))
        self._track_source(message)
        if kind == "frame":
            self._frame(message)
        elif kind == "run":
            self._run(message)
        elif kind == "error":
            origin = message.get("origin", "run")
            self.add_error(f"[{origin}] {message.get('message', '(no text)')}",
                           message.get("time_unix_s"))
        elif kind == "calibration":
            self._calibration(message)
        elif kind == "instruments":
            self._instruments(message)
        else:
            return kind
        self.version += 1
        return kind

    def add_error(self, text: str, when_unix_s: float | None = None) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(when_unix_s or time.time()))
        self.errors.append(f"{stamp} {text}")
        self.version += 1

    def _track_source(self, message: dict[str, Any]) -> None:
        source, seq = message.get("source"), message.get("seq")
        if source is None or not isinstance(seq, int):
            return
        if source != self._source:
            if self._source is not None:
                self.reset_run()  # another process: another run
            self._source, self._last_seq = str(source), None
        if self._last_seq is not None and seq > self._last_seq + 1:
            self.dropped += seq - self._last_seq - 1
        self._last_seq = seq

    def _frame(self, m: dict[str, Any]) -> None:
        frame = int(m.get("frame", self.frames))
        duration = _float(m.get("duration_s"))
        if self._last_frame is not None and frame <= self._last_frame:
            self.reset_run()  # frame numbers restarted: a new run
        missed = frame - self._last_frame - 1 if self._last_frame is not None else frame
        step = duration if math.isfinite(duration) else 0.0
        self._acq_end_s += step * (1 + max(0, missed))
        self._last_frame = frame
        self.frames += 1
        self.frames_total += 1
        channels = [int(c) for c in m.get("channels", [])]
        if channels != self.channels:
            self.channels = channels
        self._ring("t_s").append(self._acq_end_s)
        self._ring("frame").append(frame)
        self._ring("rate_total").append(_float(m.get("rate_total")))
        for ch in channels:
            self._ring(f"rate_ch{ch}").append(_float(m.get(f"rate_ch{ch}")))
        self._ring("qber_z").append(100 * _float(m.get("qber_z")))
        self._ring("qber_x").append(100 * _float(m.get("qber_x")))
        by_intensity = list(m.get("qber_by_intensity") or [])
        by_intensity += [None] * (len(INTENSITIES) - len(by_intensity))
        for name, value in zip(INTENSITIES, by_intensity, strict=False):
            self._ring(f"qber_{name}").append(100 * _float(value))
        sifted = _float(m.get("sifted_bits"))
        self._ring("sifted_rate_bps").append(sifted / duration if duration > 0 else math.nan)
        secure = m.get("secure_key_rate_bps")
        self.secure_in_stream = self.secure_in_stream or secure is not None
        self._ring("secure_rate_bps").append(_float(secure))
        offset = _float(m.get("sync_offset_ps"))
        if not math.isfinite(self.sync_offset_ref_ps):
            self.sync_offset_ref_ps = offset
        self.sync_offset_ps = offset
        self._ring("sync_offset_change_ps").append(offset - self.sync_offset_ref_ps)
        self._ring("sync_drift_ppm").append(_float(m.get("sync_drift_ppm")))
        self._ring("sync_period_ps").append(_float(m.get("sync_period_ps")))
        hist = m.get("histogram")
        if hist:
            self.histogram = np.asarray(hist, dtype=np.int64)
            lo, hi = (m.get("histogram_range_ps") or [math.nan, math.nan])[:2]
            self.histogram_range_ps = (_float(lo), _float(hi))
        self.window_ps = _float(m.get("window_ps"))
        t = m.get("time_unix_s")
        if isinstance(t, (int, float)):
            self.pending_publish_times.append(float(t))
            if len(self.pending_publish_times) > 2 * self.max_points:  # nobody takes them
                del self.pending_publish_times[: self.max_points]

    def _run(self, m: dict[str, Any]) -> None:
        event = m.get("event")
        if event == "start" and not m.get("replay"):
            self.reset_run()
            self.run = RunState()
        run = self.run
        run.status = str(m.get("status", run.status))
        run.run_id = m.get("run_id") or run.run_id
        run.control = m.get("control") or run.control
        if event == "start":
            run.info = dict(m.get("info") or {})
        if event == "end":
            run.summary = dict(m.get("summary") or {})
            run.ended = True
        if event == "status" and m.get("reason"):
            run.status = f"{run.status}: {m['reason']}"

    def _calibration(self, m: dict[str, Any]) -> None:
        rows = []
        for r in m.get("records") or []:
            if not isinstance(r, dict):
                continue
            value = r.get("value")
            rows.append(CalibrationRow(
                name=str(r.get("name", "?")),
                value="" if value is None else (f"{value:.6g}" if isinstance(value, float)
                                                else str(value)),
                unit=str(r.get("unit") or ""), id=str(r.get("id") or ""),
                timestamp_unix_s=_float(r.get("timestamp_unix_s")),
                max_age_s=_float(r.get("max_age_s")), ok=bool(r.get("ok", True))))
        self.calibration = rows
        self.calibration_received_unix_s = _float(m.get("time_unix_s"))

    def _instruments(self, m: dict[str, Any]) -> None:
        rows = []
        for i in m.get("instruments") or []:
            if not isinstance(i, dict):
                continue
            errors = i.get("errors") or []
            if isinstance(errors, (str, int)):
                errors = [str(errors)] if errors else []
            interlock = i.get("interlock")
            rows.append(InstrumentRow(name=str(i.get("name", "?")),
                                      connected=bool(i.get("connected", False)),
                                      errors=[str(e) for e in errors],
                                      interlock=None if interlock is None else str(interlock)))
        self.instruments = rows

    def take_pending(self) -> list[float]:
        """Publish times of the frames ingested since the last call (and forget them)."""
        pending, self.pending_publish_times = self.pending_publish_times, []
        return pending

    @property
    def secure_rate_estimate(self) -> tuple[float, str]:
        """The run's secure key rate (bit/s) from its end summary, and what it is.

        The distilled key's rate (``secure_key_rate_bps``: finite-key, after error
        correction and privacy amplification) when the run distilled a key, else the
        asymptotic decoy estimate (``key_rate_bps``); NaN before the run's end.
        """
        s = self.run.summary
        if s.get("key_file") or (_float(s.get("secure_key_bits")) or 0) > 0:
            return _float(s.get("secure_key_rate_bps")), "distilled key"
        return _float(s.get("key_rate_bps")), "asymptotic estimate"

    @property
    def secure_rate_estimate_bps(self) -> float:
        """The value of :attr:`secure_rate_estimate` (bit/s; NaN if none)."""
        return self.secure_rate_estimate[0]
