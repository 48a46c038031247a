"""What a BB84 run does with calibrations: refuse or renew stale ones, record which it
used, and keep the bias and polarization in trim while it runs.

Before a run::

    cal = check_before_run(store, policy="refuse")           # or "recalibrate", graph=...
    settings = cal.apply(settings)                            # μ's and window from records
    run_bb84(..., metadata={**cal.metadata()}, on_frame=supervisor.on_frame)

During a run, :class:`RunSupervisor.on_frame` takes each frame: every
``bias_period_s`` one :class:`~qkdlab.calibration.bias.BiasLock` step (needs a probe
that does not use the tagger while it streams, i.e. a power meter after the
modulator; it reads the probe right after each bias move, so it never sees frames),
and every frame to the :class:`~qkdlab.calibration.polarization.PolarizationTracker`.

Frames reach ``on_frame`` late: the tagger streams on while blocks wait in its queues
and are synchronised and processed (several frames under CPU load).  A frame handed
in just after a polarization move was mostly taken *before* it, so the tracker judges
a setting only by frames dated after the move on a :class:`StreamClock` (the
supervisor's ``clock``, anchored when the stream starts: give the run
``supervisor.dating(tagger)`` as its tagger, or make the supervisor right before the
run).  Judging by a frame count instead (``settle_frames``) fails as soon as the lag
changes.

:func:`monitor_drift` is the same loop over discrete short acquisitions (soak tests,
drift studies): between steps an ``advance`` callable lets time pass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from qkdlab.calibration.bias import BiasLock, LockStep
from qkdlab.calibration.graph import CalibrationGraph, State
from qkdlab.calibration.measure import CalibrationContext
from qkdlab.calibration.polarization import PolarizationTracker, mean_qber
from qkdlab.calibration.records import NODES, CalibrationRecord, StaleCalibrationError
from qkdlab.calibration.store import CalibrationStore, Clock
from qkdlab.drivers.roles import TimeTagger
from qkdlab.experiments.bb84.processing import BB84Settings, FrameStats
from qkdlab.experiments.bb84.sync import SyncSolution
from qkdlab.tags import TagBlock

log = logging.getLogger(__name__)

RATE_TOLERANCE = 50e-6
"""Largest rate difference between a tagger's timebase and the clock that dates its
frames (crystal oscillators: tens of ppm; the mock bench's tagger runs 12.5 ppm fast)."""

RUN_NODES = NODES
"""What a BB84 run relies on: every node."""

POLICIES = ("refuse", "recalibrate", "warn")


@dataclass(frozen=True)
class RunCalibration:
    """The calibration records a run uses, and what was stale when it started."""

    records: dict[str, CalibrationRecord]
    stale: list[str] = field(default_factory=list)

    @property
    def ids(self) -> dict[str, str]:
        """Node → record id (what the run's dataset should keep)."""
        return {node: r.id for node, r in self.records.items()}

    def metadata(self) -> dict[str, Any]:
        """Run metadata: ``calibration_ids``, ``calibration_valid_until``, stale nodes."""
        return {"calibration_ids": self.ids,
                "calibration_valid_until": {n: r.valid_until_s for n, r in self.records.items()},
                "calibration_stale": list(self.stale)}

    def apply(self, settings: BB84Settings) -> BB84Settings:
        """``settings`` with the calibrated μ's (mu record) and window (timing record)."""
        changes: dict[str, float] = {}
        mu = self.records.get("mu")
        if mu is not None:
            changes.update(mu_signal=mu.value("mu_signal"), mu_decoy=mu.value("mu_decoy"),
                           mu_vacuum=max(0.0, mu.value("mu_vacuum")))
        timing = self.records.get("timing")
        if timing is not None:
            changes["window_ps"] = timing.value("window_ps")
        return dataclasses.replace(settings, **changes)


def check_before_run(store: CalibrationStore, nodes: Sequence[str] = RUN_NODES, *,
                     policy: str = "refuse", graph: CalibrationGraph | None = None,
                     now_s: float | None = None) -> RunCalibration:
    """Staleness rule for a run.

    ``refuse``: raise :class:`StaleCalibrationError` naming every node without a valid
    record.  ``recalibrate``: ``graph.maintain`` each such node (check, calibrate if the
    check fails), then refuse if any is still not good.  ``warn``: log and go on with
    the latest good records (they are listed as stale in the metadata).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    stale = store.stale(nodes, now_s)
    if stale and policy == "recalibrate":
        if graph is None:
            raise ValueError("policy 'recalibrate' needs the calibration graph")
        for node in stale:
            graph.maintain(node)
        still = [n for n in nodes if graph.state(n) is not State.GOOD]
        if still:
            raise StaleCalibrationError(f"calibration not good after recalibrating: "
                                        f"{', '.join(still)}", still)
        return RunCalibration({n: r for n in nodes if (r := store.latest(n)) is not None}, stale)
    if stale and policy == "refuse":
        detail = ", ".join(f"{n} ({store.state_of(n, now_s)})" for n in stale)
        raise StaleCalibrationError(f"refusing to run: calibration missing, bad or stale: "
                                    f"{detail}; run 'qkdlab calibrate'", stale)
    if stale:
        log.warning("running with stale calibrations: %s", ", ".join(stale))
    records = {}
    for n in nodes:
        record = store.latest(n)
        if record is not None and record.good:
            records[n] = record
    return RunCalibration(records, stale)


class StreamClock:
    """Dates each frame's light on a clock that runs with the tagger (s).

    A frame's own times (``FrameStats.start_ps``/``stop_ps``) are on the tagger's
    timebase, whose zero the clock does not know: a tagger may count from its power-up
    (Swabian) or from the start of the stream (ID1000 records).  What is known: the
    stream starts after :meth:`start` (called when this is made, and again before any
    new stream), and frames come in stream order.  So the first frame began no earlier
    than the clock's reading at :meth:`start`, and a later frame of the same timebase
    ``start − first start`` later (less ``rate_tolerance`` of that, for a tagger
    clock that runs fast); a frame that starts before its predecessor stopped opens a
    new timebase (the stream was restarted) and is dated from the previous one's end.
    Every date is a lower bound, which is what matters: a frame dated after a move was
    taken after it.  Time between :meth:`start` and the real start of the stream (a
    run's set-up) only makes the dates earlier, so the tracker waits longer after each
    move; call :meth:`start` right before the stream starts to keep that short.

    Args:
        clock: present time (s) on any scale that runs at the tagger's rate: the mock
            bench's time (``lambda: bench.now_s``), the tagger's own time where the
            driver reports it, else ``time.monotonic`` (a tagger time-stamps in real time).
        rate_tolerance: largest rate error of the tagger's clock against ``clock``.
    """

    def __init__(self, clock: Clock, rate_tolerance: float = RATE_TOLERANCE) -> None:
        if not 0 <= rate_tolerance < 0.01:
            raise ValueError(f"rate_tolerance must lie in [0, 0.01), got {rate_tolerance}")
        self.clock = clock
        self.rate_tolerance = rate_tolerance
        self.start()

    def start(self) -> None:
        """A (new) stream starts after this call: its first frame is dated from now."""
        self._anchor = self.clock()
        self._origin: tuple[float, float] | None = None  # (frame time, its clock date)
        self._last: tuple[int, int, int] | None = None  # (frame, start_ps, stop_ps)
        self._last_date = (math.nan, math.nan)  # dates of the last frame's start, stop
        self._warned = False

    def now(self) -> float:
        """The clock's present reading (s)."""
        return self.clock()

    def frame_start(self, stats: FrameStats) -> float:
        """Earliest clock time at which the frame's light may have been taken (s).

        Call once per frame in stream order (a repeated call for the same frame returns
        the same date)."""
        key = (stats.frame, stats.start_ps, stats.stop_ps)
        if key == self._last:
            return self._last_date[0]
        start, stop = stats.start_ps * 1e-12, stats.stop_ps * 1e-12
        if self._origin is None:
            self._origin = (start, self._anchor)
        elif self._last is not None and stats.start_ps < self._last[2]:
            self._origin = (start, self._last_date[1])  # the stream restarted
        t0, date0 = self._origin
        scale = 1.0 - self.rate_tolerance
        dates = (date0 + (start - t0) * scale, date0 + (stop - t0) * scale)
        now = self.clock()
        if dates[1] > now:  # light dated in the future: start() came after the stream did
            if not self._warned:
                log.warning("frame %d is dated %.3f s after its arrival: the stream started "
                            "before StreamClock.start(), or the clock does not run with "
                            "the tagger; dating from the arrival instead", stats.frame,
                            dates[1] - now)
                self._warned = True
            shift = dates[1] - now
            self._origin = (t0, date0 - shift)
            dates = (dates[0] - shift, now)
        self._last, self._last_date = key, dates
        return dates[0]


@dataclass
class RunSupervisor:
    """Frame hook of a run: periodic bias lock steps and the polarization tracker.

    Its :class:`StreamClock` dates the run's frames from the start of the stream — the
    call of ``stream()`` on :meth:`dating`'s tagger, else :meth:`stream_starting`, else
    when the supervisor is made — and a tracker without a ``frame_clock`` is given it,
    so that after every move the tracker waits for frames taken after the move however
    late they arrive.

    Args:
        clock: time (s) on a scale that runs with the tagger — the mock bench's time,
            the tagger's own time where the driver reports it, else ``time.monotonic``
            (see :class:`StreamClock`); also paces the bias lock.
        bias_lock: None to leave the bias alone.
        tracker: None to leave the polarization alone.
        bias_period_s: time between bias lock steps.
        stream: the frames' clock (default: a :class:`StreamClock` on ``clock``).
    """

    clock: Clock
    bias_lock: BiasLock | None = None
    tracker: PolarizationTracker | None = None
    bias_period_s: float = 60.0
    log: list[dict[str, Any]] = field(default_factory=list)
    stream: StreamClock | None = None
    _last_lock: float = -math.inf

    def __post_init__(self) -> None:
        if self.stream is None:
            self.stream = StreamClock(self.clock)
        if self.tracker is not None and self.tracker.frame_clock is None:
            self.tracker.frame_clock = self.stream

    def stream_starting(self) -> None:
        """The tagger's stream (re)starts after this call: frames are dated from now."""
        assert self.stream is not None
        self.stream.start()

    def dating(self, tagger: TimeTagger) -> TimeTagger:
        """``tagger`` whose :meth:`stream` first calls :meth:`stream_starting`.

        Give it to the run (``BB84Roles.tagger``): frames are then dated from the moment
        each stream starts — after the run's set-up (detector bias ramps, laser), and
        again for a segment retried after a link error — rather than from when the
        supervisor was made, which only costs waiting.  Everything else is the tagger's.
        """
        return _DatedTagger(tagger, self.stream_starting)

    def on_frame(self, stats: FrameStats) -> None:
        """Call after every frame (``run_bb84(on_frame=...)``)."""
        entry: dict[str, Any] = {"frame": stats.frame, "qber": mean_qber(stats)}
        now = self.clock()
        if self.bias_lock is not None and now - self._last_lock >= self.bias_period_s:
            step: LockStep = self.bias_lock.step()
            self._last_lock = now
            entry["bias_error_rad"] = step.phase_error_rad
            entry["bias_v"] = step.bias_v
        if self.tracker is not None:
            entry["polarization"] = self.tracker.on_frame(stats)
        self.log.append(entry)


class _DatedTagger:
    """A tagger whose stream start is announced first (:meth:`RunSupervisor.dating`)."""

    def __init__(self, tagger: TimeTagger, starting: Callable[[], None]) -> None:
        self._tagger = tagger
        self._starting = starting

    def stream(self, duration_s: float | None = None) -> Iterator[TagBlock]:
        self._starting()
        return self._tagger.stream(duration_s)

    def acquire(self, duration_s: float) -> TagBlock:
        return self._tagger.acquire(duration_s)

    def set_trigger_level(self, channel: int, level_v: float) -> None:
        self._tagger.set_trigger_level(channel, level_v)

    def set_input_delay(self, channel: int, delay_ps: int) -> None:
        self._tagger.set_input_delay(channel, delay_ps)

    def set_dead_time(self, channel: int, dead_time_ps: int) -> None:
        self._tagger.set_dead_time(channel, dead_time_ps)

    def safe_state(self) -> None:
        self._tagger.safe_state()

    def __getattr__(self, name: str) -> Any:  # name, reconnect, channels ... of the tagger
        return getattr(self._tagger, name)


def monitor_drift(ctx: CalibrationContext, *, steps: int, step_s: float,
                  advance: Callable[[float], None], frame_s: float = 0.05,
                  supervisor: RunSupervisor | None = None, max_track_frames: int = 30,
                  truth: Callable[[], dict[str, float]] | None = None
                  ) -> list[dict[str, Any]]:
    """A long run in coarse steps: let ``step_s`` pass, then measure a frame.

    Each step measures a frame (its QBER is the one reported: before any correction);
    with a supervisor the frame then goes to it (a bias lock step if due, the tracker)
    and, while the tracker searches, frames keep coming for it (at most
    ``max_track_frames``; a frame still above the threshold starts another search).
    Every frame is an acquisition of its own, so the supervisor's stream clock is
    restarted before each.  Returns one row per step: time, QBER Z/X, frames spent
    searching and ``truth()`` extras.
    """
    settings = ctx.bb84_settings()
    ctx.use_pattern(ctx.config.pattern)
    ctx.light(True)
    sol: SyncSolution | None = None
    rows = []
    elapsed = 0.0
    for i in range(steps):
        advance(step_s)
        elapsed += step_s
        row: dict[str, Any] = {"step": i, "time_s": elapsed}
        if supervisor is not None:
            supervisor.stream_starting()
        stats, sol, _ = ctx.frame(frame_s, settings, known=sol)
        row.update(qber_z=stats.qber(0), qber_x=stats.qber(1), qber=mean_qber(stats))
        extra = 0
        if supervisor is not None:
            supervisor.on_frame(stats)
            last = supervisor.log[-1]
            row["bias_error_rad"] = last.get("bias_error_rad", math.nan)
            tracker = supervisor.tracker
            # as a run would: frames keep coming while the tracker searches, and a frame
            # still above the threshold after a search starts the next one
            while tracker is not None and tracker.active and extra < max_track_frames:
                supervisor.stream_starting()
                stats, sol, _ = ctx.frame(frame_s, settings, known=sol)
                tracker.on_frame(stats)
                extra += 1
        row["search_frames"] = extra
        if truth is not None:
            row.update(truth())
        rows.append(row)
    return rows
