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
one point per frame and returns to watching when done.  Every value it uses comes from
a frame taken entirely after the move to that point: in a streaming run frames reach it
late (the tagger streams ahead while frames queue), so it dates each frame on a
:class:`FrameClock` and skips the ones older than its last move.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from qkdlab.calibration.graph import CheckResult
from qkdlab.calibration.measure import CalibrationContext
from qkdlab.calibration.optimise import NelderMead
from qkdlab.calibration.records import CalibrationError, CalibrationRecord, Quantity
from qkdlab.drivers.roles import PolarizationController
from qkdlab.experiments.bb84.processing import FrameStats
from qkdlab.experiments.bb84.sync import SyncSolution

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class PolarizationSettings:
    """Search settings (actuator units: degrees for rotation mounts).

    ``track_*`` and ``settle_*`` are the in-run tracker's (:class:`PolarizationTracker`
    documents each): probe step and largest move per actuator, the common turn of all
    plates (used when the config gives an ``actuator_period``), sweeps per search, how
    far below the threshold a search aims and how much worse a failed search's link must
    get before it is retried (QBER, absolute), and the settling after a move (frames, for
    frames without a clock; seconds on the frame clock).
    """

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
    track_common_step: float = 24.0
    track_max_sweeps: int = 3
    track_hysteresis: float = 0.001
    track_retry_margin: float = 0.002
    settle_frames: int = 0  # frames skipped after a move when frames carry no clock
    settle_s: float = 0.0  # settling after a move has finished, on the frame clock (s)


def mean_qber(stats: FrameStats) -> float:
    """Mean of the Z and X QBERs of a frame (a basis without sifted bits counts 0.5)."""
    q = [stats.qber(b) for b in (0, 1)]
    return float(np.mean([0.5 if math.isnan(x) else x for x in q]))


def qber_sigma(stats: FrameStats) -> float:
    """Counting-noise σ of :func:`mean_qber` (binomial in each basis; 0 for a frame
    that carries no counts)."""
    sifted = getattr(stats, "sifted", None)
    if sifted is None:
        return 0.0
    var = 0.0
    for b in (0, 1):
        n, q = sum(sifted[b]), stats.qber(b)
        var += q * (1 - q) / n if n and not math.isnan(q) else 0.25
    return 0.5 * math.sqrt(var)


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
        """A :class:`PolarizationTracker` on this context's controller (``kwargs``
        override the settings; ``frame_clock`` is usually left to the
        :class:`~qkdlab.calibration.runtime.RunSupervisor`)."""
        s = self.settings
        pc = self._controller()
        n = len(pc.get_actuators())
        lower, upper = _limits(self.ctx, n, s.margin)
        options: dict[str, Any] = {
            "threshold": self.ctx.config.qber_threshold, "step": s.track_step,
            "max_step": s.track_max_step, "max_evals": s.track_max_evals,
            "settle_frames": s.settle_frames, "method": s.track_method,
            "max_sweeps": s.track_max_sweeps, "common_step": s.track_common_step,
            "hysteresis": s.track_hysteresis, "retry_margin": s.track_retry_margin,
            "settle_s": s.settle_s,
            "period": self.ctx.config.actuator_period}
        unknown = set(kwargs) - set(options) - {"frame_clock"}
        if unknown:
            raise TypeError(f"tracker() got unknown options {sorted(unknown)}")
        options.update(kwargs)
        return PolarizationTracker(pc, lower, upper, **options)


class FrameClock(Protocol):
    """A clock that runs with the tagger, and where on it each frame's light was taken.

    :class:`~qkdlab.calibration.runtime.StreamClock` is the implementation a run uses.
    """

    def now(self) -> float:
        """The present time (s)."""

    def frame_start(self, stats: FrameStats) -> float:
        """A time (s, same clock) no later than the start of the frame's light; called
        once per frame, in stream order."""


@dataclass
class _Sweep:
    """One coordinate search: where it is, what it measured, what it waits for."""

    x: FloatArray  # base point of the direction being probed
    f0: float  # value at x: measured at the sweep's start, then the parabolas' estimate
    start: tuple[FloatArray, float]  # where the present sweep started (measured)
    best: tuple[FloatArray, float]  # best start or swept point of the whole search
    stage: str = "probe"  # "probe" (±step), "verify" (swept point), "measure" (new start)
    k: int = 0  # direction being probed
    values: list[float] = field(default_factory=list)  # f(x + step·d_k), f(x − step·d_k)
    sweeps: int = 1


class PolarizationTracker:
    """Re-optimises the compensator during a run when the QBER passes a threshold.

    Feed it every frame with :meth:`on_frame`; it moves the actuators and judges each
    setting by a frame taken entirely after the move.  With a ``frame_clock`` (a
    streaming run: frames reach the tracker while the tagger is already further on) a
    frame counts only if ``frame_clock.frame_start(stats)`` is at least ``settle_s``
    after the clock's reading once the last move had finished; older frames, taken at
    a previous setting or straddling the move, are skipped (``settling``) — in watching
    as in searching, so a late frame of a probe never starts a search either.  Without
    a clock every frame is taken to follow the previous :meth:`on_frame` (a synchronous
    acquisition, as :func:`~qkdlab.calibration.runtime.monitor_drift`), less
    ``settle_frames`` skipped after each move.

    ``method="coordinate"`` (default): sweeps of a bounded direction search.  Each
    direction is tried at ±its step and the point moved to the vertex of the parabola
    through the three values (at most its largest step; toward the better side if the
    parabola opens down) — 2 frames per direction — then one frame at the swept point,
    kept only if it is better than where the sweep started.  The directions are the
    actuators (``step``, ``max_step``) and, for waveplate angles (``period`` given),
    all plates turned together (``common_step``, at most ``period/4``): a
    quarter/half/quarter-wave stack that holds the link near the identity sits close
    to its singular configurations (θ1 + θ3 − 2·θ2 a multiple of 90°), where no small
    move of single plates corrects a rotation about one axis of the linear plane.  On
    the branch that holds the identity the stack is a rotation about S3, which turning
    it as a whole leaves unchanged while turning that unreachable axis: the common line
    costs little QBER and its parabola is the one measured at the sweep's start, so it
    comes first.  A search aims below ``threshold −
    hysteresis``: while above that, another sweep follows if the last one gained more
    than 3σ of the frame's counting noise (at most ``max_sweeps``).  It ends at the best
    point a sweep started or ended at (never a probe: the lowest of many noisy probe
    frames is mostly a low draw of the noise).  A search that ends clearly above the
    threshold (by 3σ) is not restarted until a frame is ``retry_margin`` (and 3σ) worse
    than that: a floor above the threshold costs one search, not one per frame.

    ``method="nelder-mead"``: a local bounded simplex search of at most ``max_evals``
    frames.  Points never leave ``[lower, upper]``.
    """

    def __init__(self, controller: PolarizationController, lower: np.ndarray,
                 upper: np.ndarray, *, threshold: float, step: float, max_step: float,
                 max_evals: int, settle_frames: int = 0, method: str = "coordinate",
                 period: float | None = None, common_step: float | None = None,
                 max_sweeps: int = 3, frame_clock: FrameClock | None = None,
                 settle_s: float = 0.0, hysteresis: float = 0.001,
                 retry_margin: float = 0.002) -> None:
        if method not in ("coordinate", "nelder-mead"):
            raise ValueError(f"method must be 'coordinate' or 'nelder-mead', got {method!r}")
        for name, value in (("step", step), ("max_step", max_step)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in (("settle_frames", settle_frames), ("max_sweeps", max_sweeps),
                            ("settle_s", settle_s), ("hysteresis", hysteresis),
                            ("retry_margin", retry_margin)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.controller = controller
        self.lower, self.upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
        self.threshold = threshold
        self.target = threshold - hysteresis
        self.step, self.max_step, self.max_evals = step, max_step, max_evals
        self.settle_frames = settle_frames
        self.method = method
        self.period = period
        self.max_sweeps = max_sweeps
        self.frame_clock = frame_clock
        self.settle_s = settle_s
        self.retry_margin = retry_margin
        n = self.lower.size
        # (direction, probe step, largest move) of each line a sweep searches along
        self.directions: list[tuple[FloatArray, float, float]] = [
            (np.eye(n)[i], step, max_step) for i in range(n)]
        if common_step is not None and period is not None and n > 1:
            if not 0 < common_step <= period / 4:
                raise ValueError(f"common_step must lie in (0, period/4 = {period / 4}], "
                                 f"got {common_step}")
            self.directions.insert(0, (np.ones(n), common_step, period / 4))
        self._opt: NelderMead | None = None
        self._sweep: _Sweep | None = None
        self._skip = 0
        self._moved_at = -math.inf
        self._rearm = -math.inf
        self.searches = 0
        self.frames_optimising = 0
        self.stale_frames = 0

    @property
    def active(self) -> bool:
        """True while a search is running."""
        return self._opt is not None or self._sweep is not None

    def on_frame(self, stats: FrameStats) -> str:
        """Take one frame; returns ``watching``, ``started``, ``searching``, ``done``, or
        ``settling`` for a frame skipped as taken before the last move had finished."""
        if self.active:
            self.frames_optimising += 1
        if not self._fresh(stats):
            self.stale_frames += 1
            return "settling"
        q = mean_qber(stats)
        if not self.active:
            if q <= self.threshold:
                self._rearm = -math.inf
                return "watching"
            if q <= self._rearm:  # the last search could do no better: wait for worse
                return "watching"
            self._start(q)
            return "started"
        if self._opt is not None:
            self._opt.tell(q)
            if self._opt.done:
                x, f = self._opt.best()
                self._finish(x, f, qber_sigma(stats))
                return "done"
            self._move(self._opt.ask())
            return "searching"
        return "done" if self._coordinate(q, qber_sigma(stats)) else "searching"

    # -- timing -----------------------------------------------------------------------
    def _fresh(self, stats: FrameStats) -> bool:
        """True if the frame's light was all taken after the last move had finished."""
        if self.frame_clock is not None:
            return self.frame_clock.frame_start(stats) >= self._moved_at + self.settle_s
        if self._skip > 0:
            self._skip -= 1
            return False
        return True

    def _move(self, x: FloatArray) -> None:
        x = np.clip(np.asarray(x, np.float64), self.lower, self.upper)
        self.controller.set_actuators([float(v) for v in x])
        if self.frame_clock is not None:
            self._moved_at = self.frame_clock.now()  # read once the move has finished
        self._skip = self.settle_frames

    # -- search -----------------------------------------------------------------------
    def _start(self, q: float) -> None:
        self.searches += 1
        x_now = np.clip(np.asarray(self.controller.get_actuators(), np.float64),
                        self.lower, self.upper)
        x0 = recentre(x_now, self.lower, self.upper, self.period, 2 * self.max_step)
        if not np.array_equal(x0, x_now):
            # an equivalent setting away from a limit: measured afresh before probing
            self._sweep = _Sweep(x=x0, f0=math.nan, start=(x0, math.inf), best=(x_now, q),
                                 stage="measure")
            self._move(x0)
            return
        if self.method == "nelder-mead":
            self._opt = NelderMead(x0, self.step, self.lower, self.upper,
                                   max_step=self.max_step, xtol=0.2, ftol=0.0005,
                                   max_evals=self.max_evals)
            self._opt.ask()
            self._opt.tell(q)  # this frame was taken at x0
            self._move(self._opt.ask())
            return
        self._sweep = _Sweep(x=x0, f0=q, start=(x0, q), best=(x0, q))
        self._move(self._probe_point())

    def _finish(self, x: FloatArray, f: float, sigma: float) -> None:
        x = np.clip(np.asarray(x, np.float64), self.lower, self.upper)
        if not np.allclose(x, self.controller.get_actuators(), rtol=0.0, atol=1e-9):
            self._move(x)
        self._opt = None
        self._sweep = None
        # a search that clearly could not reach the threshold (by more than 3σ of the
        # frames' noise) is retried only once the link is worse than what it left (its
        # best value, the lower of noisy frames, is biased low: 3σ more)
        self._rearm = (f + self.retry_margin + 3 * sigma if f > self.threshold + 3 * sigma
                       else -math.inf)

    def _probe_point(self) -> FloatArray:
        s = self._sweep
        assert s is not None
        direction, step, _ = self.directions[s.k]
        sign = 1.0 if not s.values else -1.0
        return np.clip(s.x + sign * step * direction, self.lower, self.upper)

    def _coordinate(self, q: float, sigma: float) -> bool:
        """Absorb the value at the pending point and move on; True when finished."""
        s = self._sweep
        assert s is not None
        if s.stage in ("measure", "verify") and q < s.best[1]:
            s.best = (np.array(s.x, dtype=np.float64), q)  # a start or a swept point
        if s.stage == "measure":  # the frame at a new starting point
            s.f0, s.start, s.stage, s.k, s.values = q, (s.x, q), "probe", 0, []
            self._move(self._probe_point())
            return False
        if s.stage == "verify":
            return self._end_of_sweep(q, sigma)
        s.values.append(q)
        if len(s.values) < 2:
            self._move(self._probe_point())
            return False
        direction, step, largest = self.directions[s.k]
        f_plus, f_minus, f0 = s.values[0], s.values[1], s.f0
        curvature = f_plus + f_minus - 2 * f0
        if curvature > 0:
            delta = 0.5 * step * (f_minus - f_plus) / curvature
            f_new = f0 - (f_minus - f_plus) ** 2 / (8 * curvature)
        else:  # no minimum bracketed: go to the better side
            delta = step if f_plus < f_minus else -step
            f_new = min(f_plus, f_minus)
        if min(f_plus, f_minus) < f0 and f_new > min(f_plus, f_minus):
            f_new = min(f_plus, f_minus)
        x = s.x + float(np.clip(delta, -largest, largest)) * direction
        s.x, s.f0, s.k, s.values = np.clip(x, self.lower, self.upper), f_new, s.k + 1, []
        if s.k >= len(self.directions):
            s.stage = "verify"  # one frame at the swept point
            self._move(s.x)
        else:
            self._move(self._probe_point())
        return False

    def _end_of_sweep(self, q: float, sigma: float) -> bool:
        """The frame at the swept point: keep the better of it and the sweep's start,
        then sweep again or finish at the best point measured."""
        s = self._sweep
        assert s is not None
        x_start, f_start = s.start
        keep_x, keep_f = (s.x, q) if q <= f_start else (x_start, f_start)
        best_x, best_f = s.best
        if best_f > self.target and s.sweeps < self.max_sweeps and \
                f_start - keep_f > 3 * sigma:
            self._sweep = _Sweep(x=keep_x, f0=keep_f, start=(keep_x, keep_f), best=s.best,
                                 sweeps=s.sweeps + 1)
            self._move(self._probe_point())
            return False
        self._finish(best_x, best_f, sigma)
        return True
