"""What a BB84 run does with calibrations: refuse or renew stale ones, record which it
used, and keep the bias and polarization in trim while it runs.

Before a run::

    cal = check_before_run(store, policy="refuse")           # or "recalibrate", graph=...
    settings = cal.apply(settings)                            # μ's and window from records
    run_bb84(..., metadata={**cal.metadata()}, on_frame=supervisor.on_frame)

During a run, :class:`RunSupervisor.on_frame` takes each frame: every
``bias_period_s`` one :class:`~qkdlab.calibration.bias.BiasLock` step (needs a probe
that does not use the tagger while it streams, i.e. a power meter after the
modulator), and every frame to the
:class:`~qkdlab.calibration.polarization.PolarizationTracker`.

:func:`monitor_drift` is the same loop over discrete short acquisitions (soak tests,
drift studies): between steps an ``advance`` callable lets time pass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qkdlab.calibration.bias import BiasLock, LockStep
from qkdlab.calibration.graph import CalibrationGraph, State
from qkdlab.calibration.measure import CalibrationContext
from qkdlab.calibration.polarization import PolarizationTracker, mean_qber
from qkdlab.calibration.records import NODES, CalibrationRecord, StaleCalibrationError
from qkdlab.calibration.store import CalibrationStore, Clock
from qkdlab.experiments.bb84.processing import BB84Settings, FrameStats
from qkdlab.experiments.bb84.sync import SyncSolution

log = logging.getLogger(__name__)

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


@dataclass
class RunSupervisor:
    """Frame hook of a run: periodic bias lock steps and the polarization tracker.

    Args:
        clock: time source for the bias period (s).
        bias_lock: None to leave the bias alone.
        tracker: None to leave the polarization alone.
        bias_period_s: time between bias lock steps.
    """

    clock: Clock
    bias_lock: BiasLock | None = None
    tracker: PolarizationTracker | None = None
    bias_period_s: float = 60.0
    log: list[dict[str, Any]] = field(default_factory=list)
    _last_lock: float = -math.inf

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


def monitor_drift(ctx: CalibrationContext, *, steps: int, step_s: float,
                  advance: Callable[[float], None], frame_s: float = 0.05,
                  supervisor: RunSupervisor | None = None, max_track_frames: int = 30,
                  truth: Callable[[], dict[str, float]] | None = None
                  ) -> list[dict[str, Any]]:
    """A long run in coarse steps: let ``step_s`` pass, then measure a frame.

    Each step measures a frame (its QBER is the one reported: before any correction);
    with a supervisor the frame then goes to it (a bias lock step if due, the tracker)
    and, while the tracker searches, frames keep coming for it (at most
    ``max_track_frames``; a frame still above the threshold starts another search).  Returns one
    row per step: time, QBER Z/X, frames spent searching and ``truth()`` extras.
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
                stats, sol, _ = ctx.frame(frame_s, settings, known=sol)
                tracker.on_frame(stats)
                extra += 1
        row["search_frames"] = extra
        if truth is not None:
            row.update(truth())
        rows.append(row)
    return rows
