"""Polarization alignment: drive Bob's compensator to the lowest QBER in both bases.

The objective is the mean of the Z- and X-basis QBERs of a short frame (the run's
pattern, processed by the experiment's FrameProcessor after a qubit-based sync whose
period and channel delays are reused between frames).  A bounded Nelder–Mead search
(:class:`~qkdlab.calibration.optimise.NelderMead`) moves the actuators: never outside
``actuator_limits`` (less ``margin``), never more than ``max_step`` per move from the
best point so far.  It restarts from a random point (the context's generator) when it
converges above ``accept_qber``.

:class:`PolarizationTracker` is the in-run form: fed one frame at a time, it starts a
small local search (``track_*`` settings) when the QBER passes the threshold, asks for
one point per frame (ignoring ``settle_frames`` frames after each move, whose light may
straddle the move), and returns to watching when done.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkdlab.calibration.graph import CheckResult
from qkdlab.calibration.measure import CalibrationContext
from qkdlab.calibration.optimise import NelderMead
from qkdlab.calibration.records import CalibrationError, CalibrationRecord, Quantity
from qkdlab.drivers.roles import PolarizationController
from qkdlab.experiments.bb84.processing import FrameStats
from qkdlab.experiments.bb84.sync import SyncSolution


@dataclass(frozen=True)
class PolarizationSettings:
    """Search settings (actuator units: degrees for rotation mounts)."""

    frame_s: float = 0.03
    final_frame_s: float = 0.1
    initial_step: float = 25.0
    max_step: float = 45.0
    margin: float = 1.0
    xtol: float = 0.3
    ftol: float = 0.001
    max_evals: int = 70
    accept_qber: float = 0.03
    restarts: int = 3
    track_method: str = "coordinate"
    track_step: float = 8.0
    track_max_step: float = 10.0
    track_max_evals: int = 12
    settle_frames: int = 0


def mean_qber(stats: FrameStats) -> float:
    """Mean of the Z and X QBERs of a frame (a basis without sifted bits counts 0.5)."""
    q = [stats.qber(b) for b in (0, 1)]
    return float(np.mean([0.5 if math.isnan(x) else x for x in q]))


def recentre(x: np.ndarray, lower: np.ndarray, upper: np.ndarray, period: float | None,
             keep_clear: float) -> np.ndarray:
    """``x`` with each actuator within ``keep_clear`` of a limit moved by whole periods
    toward the middle (an equivalent setting), when that lands inside the limits."""
    out = np.array(x, dtype=np.float64)
    if period is None:
        return out
    mid = 0.5 * (lower + upper)
    for i in range(out.size):
        if lower[i] + keep_clear <= out[i] <= upper[i] - keep_clear:
            continue
        k = round((mid[i] - out[i]) / period)
        cand = out[i] + k * period
        if lower[i] <= cand <= upper[i]:
            out[i] = cand
    return out


def _limits(ctx: CalibrationContext, n: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = ctx.config.actuator_limits
    return np.full(n, lo + margin), np.full(n, hi - margin)


class PolarizationCalibration:
    """The ``polarization`` node."""

    node = "polarization"

    def __init__(self, ctx: CalibrationContext,
                 settings: PolarizationSettings | None = None) -> None:
        self.ctx = ctx
        self.settings = settings or PolarizationSettings()
        self._sol: SyncSolution | None = None

    def _controller(self) -> PolarizationController:
        pc = self.ctx.roles.polarization
        if pc is None:
            raise CalibrationError("no polarization role (Bob's polarization controller)")
        return pc

    def measure(self, duration_s: float | None = None) -> FrameStats:
        """One frame at the present actuator settings."""
        settings = self.ctx.bb84_settings()
        stats, self._sol, _ = self.ctx.frame(duration_s or self.settings.frame_s, settings,
                                             known=self._sol)
        return stats

    def objective(self) -> Callable[[np.ndarray], float]:
        """x → mean QBER after setting the actuators to x."""
        pc = self._controller()

        def fun(x: np.ndarray) -> float:
            pc.set_actuators([float(v) for v in x])
            return mean_qber(self.measure())

        return fun

    def run(self) -> CalibrationRecord:
        ctx, s = self.ctx, self.settings
        pc = self._controller()
        ctx.use_pattern(ctx.config.pattern)
        ctx.light(True)
        self._sol = None
        x0 = np.asarray(pc.get_actuators(), dtype=np.float64)
        lower, upper = _limits(ctx, x0.size, s.margin)
        x0 = recentre(x0, lower, upper, ctx.config.actuator_period, s.initial_step)
        fun = self.objective()
        best_x, best_f, evaluations = x0, math.inf, 0
        history: list[tuple[np.ndarray, float]] = []
        for attempt in range(s.restarts + 1):
            start = x0 if attempt == 0 else ctx.rng.uniform(lower, upper)
            opt = NelderMead(start, s.initial_step, lower, upper, max_step=s.max_step,
                             xtol=s.xtol, ftol=s.ftol, max_evals=s.max_evals)
            while not opt.done:
                x = opt.ask()
                opt.tell(fun(x))
            x, f = opt.best()
            evaluations += opt.evaluations
            history += opt.history
            if f < best_f:
                best_x, best_f = x, f
            if best_f <= s.accept_qber:
                break
        pc.set_actuators([float(v) for v in best_x])
        final = self.measure(s.final_frame_s)
        qz, qx = final.qber(0), final.qber(1)
        nz, nx = (max(1, sum(final.sifted[b])) for b in (0, 1))
        q = {"qber_z": Quantity(qz, math.sqrt(qz * (1 - qz) / nz)),
             "qber_x": Quantity(qx, math.sqrt(qx * (1 - qx) / nx)),
             "evaluations": Quantity(float(evaluations))}
        for i, v in enumerate(best_x):
            q[f"actuator_{i}"] = Quantity(float(v))
        settings = {"actuators": [float(v) for v in best_x], "frame_s": s.frame_s}
        dataset = ctx.save("polarization", ("evaluation", "", list(range(len(history)))),
                           {"mean_qber": ("", [f for _, f in history]),
                            **{f"actuator_{i}": ("", [x[i] for x, _ in history])
                               for i in range(best_x.size)}},
                           {**settings, "quantities": {k: v.to_json() for k, v in q.items()}})
        good = max(qz, qx) <= s.accept_qber
        note = "" if good else f"QBER {qz:.2%} / {qx:.2%} above {s.accept_qber:.1%}"
        return ctx.make_record(self.node, q, settings, dataset, good=good, note=note)

    def apply(self, record: CalibrationRecord) -> None:
        """Put the actuators where the record left them."""
        self._controller().set_actuators([float(v) for v in record.settings["actuators"]])

    def check(self, record: CalibrationRecord) -> CheckResult:
        """One frame: both QBERs below the run's threshold."""
        ctx = self.ctx
        ctx.use_pattern(ctx.config.pattern)
        ctx.light(True)
        self._sol = None
        stats = self.measure(self.settings.final_frame_s)
        q = mean_qber(stats)
        ok = q <= ctx.config.qber_threshold
        return CheckResult(ok, f"mean QBER {q:.2%} (threshold {ctx.config.qber_threshold:.1%})")

    def tracker(self, **kwargs: Any) -> PolarizationTracker:
        """A :class:`PolarizationTracker` on this context's controller."""
        s = self.settings
        pc = self._controller()
        n = len(pc.get_actuators())
        lower, upper = _limits(self.ctx, n, s.margin)
        return PolarizationTracker(pc, lower, upper, period=self.ctx.config.actuator_period,
                                   threshold=kwargs.pop("threshold",
                                                        self.ctx.config.qber_threshold),
                                   step=kwargs.pop("step", s.track_step),
                                   max_step=kwargs.pop("max_step", s.track_max_step),
                                   max_evals=int(kwargs.pop("max_evals", s.track_max_evals)),
                                   settle_frames=int(kwargs.pop("settle_frames",
                                                                s.settle_frames)),
                                   method=str(kwargs.pop("method", s.track_method)))


class PolarizationTracker:
    """Re-optimises the compensator during a run when the QBER passes a threshold.

    Feed it every frame with :meth:`on_frame`; it sets the actuators for the next one.
    ``method="coordinate"`` (default): one sweep of a bounded coordinate search, each
    actuator tried at ±``step`` and moved to the vertex of the parabola through the
    three values (at most ``max_step``; toward the better side if the parabola opens
    down) — 2 frames per actuator — then one frame at the swept point, kept only if it
    is better than where the sweep started; while that is still above the threshold
    another sweep follows (at most ``max_sweeps``).  ``method="nelder-mead"``: a local
    bounded simplex search of at most ``max_evals`` frames.  Points never leave ``[lower, upper]``.
    """

    def __init__(self, controller: PolarizationController, lower: np.ndarray,
                 upper: np.ndarray, *, threshold: float, step: float, max_step: float,
                 max_evals: int, settle_frames: int = 0, method: str = "coordinate",
                 period: float | None = None, max_sweeps: int = 3) -> None:
        if method not in ("coordinate", "nelder-mead"):
            raise ValueError(f"method must be 'coordinate' or 'nelder-mead', got {method!r}")
        self.controller = controller
        self.lower, self.upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
        self.threshold = threshold
        self.step, self.max_step, self.max_evals = step, max_step, max_evals
        self.settle_frames = settle_frames
        self.method = method
        self.period = period
        self.max_sweeps = max_sweeps
        self._opt: NelderMead | None = None
        self._coord: dict[str, object] | None = None
        self._skip = 0
        self.searches = 0
        self.frames_optimising = 0

    @property
    def active(self) -> bool:
        """True while a search is running."""
        return self._opt is not None or self._coord is not None

    def on_frame(self, stats: FrameStats) -> str:
        """Take one frame's QBER; returns ``watching``, ``started``, ``searching``, ``done``."""
        q = mean_qber(stats)
        if not self.active:
            if q <= self.threshold:
                return "watching"
            x_now = np.clip(np.asarray(self.controller.get_actuators(), np.float64),
                            self.lower, self.upper)
            x0 = recentre(x_now, self.lower, self.upper, self.period, 2 * self.max_step)
            if not np.array_equal(x0, x_now):
                # an equivalent setting away from a limit; this frame no longer applies
                self.controller.set_actuators([float(v) for v in x0])
                self.searches += 1
                self._coord = {"x": x0, "f0": math.nan, "i": -1, "values": [],
                               "start": (x0, math.inf)}
                self._skip = self.settle_frames
                return "started"
            self.searches += 1
            if self.method == "nelder-mead":
                self._opt = NelderMead(x0, self.step, self.lower, self.upper,
                                       max_step=self.max_step, xtol=0.2, ftol=0.0005,
                                       max_evals=self.max_evals)
                self._opt.ask()
                self._opt.tell(q)  # this frame was taken at x0
            else:
                self._coord = {"x": x0, "f0": q, "i": 0, "values": [], "start": (x0, q)}
            self._move()
            return "started"
        self.frames_optimising += 1
        if self._skip > 0:
            self._skip -= 1
            return "searching"
        if self._opt is not None:
            self._opt.tell(q)
            if self._opt.done:
                x, _ = self._opt.best()
                self._finish(x)
                return "done"
        elif self._coord is not None and self._coordinate_step(q):
            return "done"
        self._move()
        return "searching"

    def _finish(self, x: np.ndarray) -> None:
        self.controller.set_actuators([float(v) for v in np.clip(x, self.lower, self.upper)])
        self._opt = None
        self._coord = None

    def _coord_point(self) -> np.ndarray:
        c = self._coord
        assert c is not None
        x = np.array(c["x"], dtype=np.float64)
        if c.get("verify"):
            return x
        i = int(c["i"])  # type: ignore[call-overload]
        x[i] += self.step if not c["values"] else -self.step
        return np.clip(x, self.lower, self.upper)

    def _coordinate_step(self, q: float) -> bool:
        """Absorb the value at the last point; True when the sweep is finished."""
        c = self._coord
        assert c is not None
        if int(c["i"]) < 0:  # type: ignore[call-overload]
            c.update(i=0, f0=q, start=(c["x"], q))  # the frame after a recentring move
            return False
        if c.get("verify"):  # the frame at the swept point: keep it only if it is better
            start = c["start"]
            assert isinstance(start, tuple)
            x0, f_start = np.asarray(start[0], np.float64), float(start[1])
            swept = np.asarray(c["x"], np.float64)
            keep_x, keep_f = (swept, q) if q <= f_start else (x0, f_start)
            sweeps = int(c.get("sweeps", 1))  # type: ignore[call-overload]
            if keep_f > self.threshold and sweeps < self.max_sweeps:
                # still above the threshold: sweep again from the better point
                self.controller.set_actuators([float(v) for v in keep_x])
                self._coord = {"x": keep_x, "f0": keep_f, "i": 0,
                               "values": [], "start": (keep_x, keep_f), "sweeps": sweeps + 1}
                return False
            self._finish(np.asarray(keep_x, np.float64))
            return True
        values = c["values"]
        assert isinstance(values, list)
        values.append(q)
        if len(values) < 2:
            return False
        x = np.array(c["x"], dtype=np.float64)
        i = int(c["i"])  # type: ignore[call-overload]
        f_plus, f_minus, f0 = values[0], values[1], float(c["f0"])  # type: ignore[arg-type]
        curvature = f_plus + f_minus - 2 * f0
        if curvature > 0:
            delta = 0.5 * self.step * (f_minus - f_plus) / curvature
            f_new = f0 - (f_minus - f_plus) ** 2 / (8 * curvature)
        else:  # no minimum bracketed: go to the better side
            delta = self.step if f_plus < f_minus else -self.step
            f_new = min(f_plus, f_minus)
        if min(f_plus, f_minus) < f0 and f_new > min(f_plus, f_minus):
            f_new = min(f_plus, f_minus)
        x[i] += float(np.clip(delta, -self.max_step, self.max_step))
        x = np.clip(x, self.lower, self.upper)
        c.update(x=x, f0=f_new, i=i + 1, values=[])
        if i + 1 >= x.size:
            c["verify"] = True  # one more frame, at the swept point
        return False

    def _move(self) -> None:
        x = self._opt.ask() if self._opt is not None else self._coord_point()
        self.controller.set_actuators([float(v) for v in x])
        self._skip = self.settle_frames
