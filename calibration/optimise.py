"""Derivative-free optimisation with hard bounds and bounded steps (numpy only).

:class:`NelderMead` is an ask/tell state machine, so that the same optimiser can be
driven by a blocking loop (``minimise``) or by a running experiment that gets one
objective value per frame.  Every point it asks for lies inside ``[lower, upper]``
(projection) and at most ``max_step`` (per coordinate) away from the best point so
far: a noisy or misbehaving objective can never push an actuator past its limits or
make it jump.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass
class OptimiseResult:
    """Best point, its value, and how many evaluations it took."""

    x: FloatArray
    fun: float
    evaluations: int
    converged: bool
    history: list[tuple[FloatArray, float]] = field(default_factory=list)


class NelderMead:
    """Nelder–Mead simplex search, bounded, in ask/tell form.

    Args:
        x0: start point (clipped into the bounds).
        step: initial simplex edge per coordinate.
        lower, upper: hard bounds (never asked outside).
        max_step: largest change per coordinate of an asked point from the best point.
        xtol: stop when every simplex edge is below this (per coordinate, same unit).
        ftol: stop when the simplex values differ by less than this.
        max_evals: stop after this many evaluations.
    """

    def __init__(self, x0: npt.ArrayLike, step: npt.ArrayLike, lower: npt.ArrayLike,
                 upper: npt.ArrayLike, *, max_step: npt.ArrayLike | None = None,
                 xtol: float = 1e-3, ftol: float = 1e-4, max_evals: int = 200) -> None:
        self.lower = np.asarray(lower, dtype=np.float64)
        self.upper = np.asarray(upper, dtype=np.float64)
        if np.any(self.upper <= self.lower):
            raise ValueError("NelderMead: every upper bound must exceed its lower bound")
        x = self._clip(np.asarray(x0, dtype=np.float64))
        n = x.size
        steps = np.broadcast_to(np.asarray(step, dtype=np.float64), (n,))
        self.max_step = (None if max_step is None
                         else np.broadcast_to(np.asarray(max_step, np.float64), (n,)).copy())
        self.xtol, self.ftol, self.max_evals = xtol, ftol, max_evals
        vertices = [x]
        for i in range(n):
            v = x.copy()
            # step inwards when the outward vertex would leave the box
            v[i] = x[i] + steps[i] if x[i] + steps[i] <= self.upper[i] else x[i] - steps[i]
            vertices.append(self._clip(v))
        self._queue: list[FloatArray] = vertices
        self._simplex: list[tuple[FloatArray, float]] = []
        self._phase = "init"
        self._pending: FloatArray | None = None
        self._trial: dict[str, tuple[FloatArray, float]] = {}
        self.evaluations = 0
        self.history: list[tuple[FloatArray, float]] = []
        self.done = False

    # -- public ask/tell ---------------------------------------------------------------------
    def ask(self) -> FloatArray:
        """Next point to evaluate (inside the bounds, within ``max_step`` of the best)."""
        if self.done:
            raise RuntimeError("NelderMead: optimisation finished; read best()")
        if self._pending is None:
            self._pending = self._next_point()
        return self._pending.copy()

    def tell(self, value: float) -> None:
        """Objective value at the last asked point (NaN counts as +inf)."""
        if self._pending is None:
            raise RuntimeError("NelderMead: tell() without ask()")
        x, self._pending = self._pending, None
        f = float(value) if math.isfinite(value) else math.inf
        self.evaluations += 1
        self.history.append((x.copy(), f))
        self._absorb(x, f)
        if self.evaluations >= self.max_evals or self._converged():
            self.done = True

    def best(self) -> tuple[FloatArray, float]:
        """Best point evaluated so far and its value."""
        if not self.history:
            raise RuntimeError("NelderMead: nothing evaluated yet")
        x, f = min(self.history, key=lambda h: h[1])
        return x.copy(), f

    def result(self) -> OptimiseResult:
        x, f = self.best()
        return OptimiseResult(x, f, self.evaluations, self._converged(), list(self.history))

    # -- the simplex machine -------------------------------------------------------------------
    def _clip(self, x: FloatArray) -> FloatArray:
        return np.clip(x, self.lower, self.upper)

    def _bounded(self, x: FloatArray) -> FloatArray:
        """Project ``x`` into the box and within ``max_step`` of the best vertex."""
        if self.max_step is not None and self._simplex:
            best = self._simplex[0][0]
            x = best + np.clip(x - best, -self.max_step, self.max_step)
        return self._clip(x)

    def _centroid(self) -> FloatArray:
        pts = np.array([p for p, _ in self._simplex[:-1]])
        return np.asarray(pts.mean(axis=0), dtype=np.float64)

    def _next_point(self) -> FloatArray:
        if self._queue:
            return self._queue[0]
        worst = self._simplex[-1][0]
        c = self._centroid()
        if self._phase == "reflect":
            return self._bounded(c + (c - worst))
        if self._phase == "expand":
            return self._bounded(c + 2.0 * (c - worst))
        if self._phase == "contract_out":
            return self._bounded(c + 0.5 * (c - worst))
        if self._phase == "contract_in":
            return self._bounded(c - 0.5 * (c - worst))
        raise RuntimeError(f"NelderMead: bad phase {self._phase}")  # pragma: no cover

    def _sort(self) -> None:
        self._simplex.sort(key=lambda v: v[1])

    def _absorb(self, x: FloatArray, f: float) -> None:
        if self._queue:  # initial vertices or a shrink
            self._queue.pop(0)
            self._simplex.append((x, f))
            if not self._queue:
                self._sort()
                self._phase = "reflect"
            return
        best_f = self._simplex[0][1]
        second_worst_f = self._simplex[-2][1]
        worst_f = self._simplex[-1][1]
        if self._phase == "reflect":
            self._trial["r"] = (x, f)
            if f < best_f:
                self._phase = "expand"
            elif f < second_worst_f:
                self._replace_worst(x, f)
            elif f < worst_f:
                self._phase = "contract_out"
            else:
                self._phase = "contract_in"
            return
        if self._phase == "expand":
            xr, fr = self._trial["r"]
            if f < fr:
                self._replace_worst(x, f)
            else:
                self._replace_worst(xr, fr)
            return
        xr, fr = self._trial["r"]
        if self._phase == "contract_out":
            if f <= fr:
                self._replace_worst(x, f)
            else:
                self._shrink()
            return
        if f < worst_f:  # contract_in
            self._replace_worst(x, f)
        else:
            self._shrink()

    def _replace_worst(self, x: FloatArray, f: float) -> None:
        self._simplex[-1] = (x, f)
        self._sort()
        self._phase = "reflect"

    def _shrink(self) -> None:
        best = self._simplex[0]
        self._queue = [self._clip(best[0] + 0.5 * (p - best[0])) for p, _ in self._simplex[1:]]
        self._simplex = [best]

    def _converged(self) -> bool:
        if self._queue or len(self._simplex) < 2:
            return False
        pts = np.array([p for p, _ in self._simplex])
        vals = np.array([v for _, v in self._simplex])
        size = float(np.max(np.abs(pts - pts[0])))
        spread = float(np.max(vals) - np.min(vals))
        return size < self.xtol or (math.isfinite(spread) and spread < self.ftol
                                     and size < 100 * self.xtol)


def minimise(fun: Callable[[FloatArray], float], optimiser: NelderMead) -> OptimiseResult:
    """Drive ``optimiser`` with a blocking objective until it finishes."""
    while not optimiser.done:
        x = optimiser.ask()
        optimiser.tell(fun(x))
    return optimiser.result()


def numeric_hessian(fun: Callable[[FloatArray], float], x: FloatArray,
                    steps: FloatArray) -> FloatArray:
    """Central-difference Hessian of ``fun`` at ``x`` with per-coordinate ``steps``."""
    n = x.size
    h = np.zeros((n, n))
    f0 = fun(x)
    for i in range(n):
        ei = np.zeros(n)
        ei[i] = steps[i]
        h[i, i] = (fun(x + ei) - 2 * f0 + fun(x - ei)) / steps[i] ** 2
        for j in range(i):
            ej = np.zeros(n)
            ej[j] = steps[j]
            h[i, j] = h[j, i] = (fun(x + ei + ej) - fun(x + ei - ej) - fun(x - ei + ej)
                                 + fun(x - ei - ej)) / (4 * steps[i] * steps[j])
    return h
