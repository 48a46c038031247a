"""Loops never push an actuator past its hard limit: optimiser, bias lock, tracker."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkdlab.calibration.bias import BiasLock, working_point
from qkdlab.calibration.optimise import NelderMead, minimise
from qkdlab.calibration.polarization import PolarizationTracker, recentre
from qkdlab.calibration.records import CalibrationError, CalibrationRecord, Quantity


def test_nelder_mead_never_asks_outside_the_box_nor_jumps() -> None:
    lower, upper = np.array([0.0, 0.0]), np.array([10.0, 10.0])
    asked: list[np.ndarray] = []

    def fun(x: np.ndarray) -> float:  # minimum far outside the box
        asked.append(x.copy())
        return float((x[0] - 25.0) ** 2 + (x[1] + 7.0) ** 2)

    opt = NelderMead([5.0, 5.0], 2.0, lower, upper, max_step=1.5, max_evals=200)
    result = minimise(fun, opt)
    pts = np.array(asked)
    assert np.all(pts >= lower)
    assert np.all(pts <= upper)
    np.testing.assert_allclose(result.x, [10.0, 0.0], atol=1e-3)  # the constrained optimum
    # every point after the initial simplex lies within max_step of an earlier best
    best = pts[0]
    best_f = fun(best)
    for x in pts[3:]:
        assert np.max(np.abs(x - best)) <= 1.5 + 2.0 + 1e-9  # step from best or a vertex
        f = (x[0] - 25.0) ** 2 + (x[1] + 7.0) ** 2
        if f < best_f:
            best, best_f = x, f


def test_nelder_mead_finds_a_quadratic_minimum_inside() -> None:
    opt = NelderMead([1.0, 1.0, 1.0], 0.5, [-5] * 3, [5] * 3, xtol=1e-6, ftol=1e-12,
                     max_evals=2000)
    result = minimise(lambda x: float(np.sum((x - [0.3, -1.2, 2.0]) ** 2)), opt)
    np.testing.assert_allclose(result.x, [0.3, -1.2, 2.0], atol=1e-4)


class FakeModulator:
    """A bias controller whose transfer phase drifts; refuses biases beyond ±10 V."""

    def __init__(self, v_pi: float, phase: float) -> None:
        self.v_pi, self.phase, self.bias = v_pi, phase, 0.0
        self.history: list[float] = []

    def set_bias(self, volts: float) -> None:
        if abs(volts) > 10.0:
            raise ValueError(f"bias {volts} V beyond the hard limit")
        self.bias = volts
        self.history.append(volts)

    def get_bias(self) -> float:
        return self.bias

    def safe_state(self) -> None:
        pass

    def light(self) -> float:
        """Signal-only light (ψ = 0, depth 1 − ε): ½(1 + v cos θ)."""
        return 0.5 * (1 + 0.99 * math.cos(math.pi * self.bias / self.v_pi + self.phase))


def bias_record(v_pi: float, working_v: float) -> CalibrationRecord:
    q = {"v_pi_v": Quantity(v_pi), "lock_offset_rad": Quantity(0.0),
         "mixed_depth": Quantity(0.99), "working_point_v": Quantity(working_v)}
    return CalibrationRecord("bias", q, 0.0, 1e9)


def test_bias_lock_follows_drift_across_the_range_without_passing_the_limits() -> None:
    mod = FakeModulator(v_pi=4.0, phase=0.0)
    lock = BiasLock(mod, mod.light, bias_record(4.0, 0.0), (-10.0, 10.0), 1.0, gain=1.0,
                    max_step_v=1.0)
    wrapped = 0
    for _ in range(80):  # φ drifts by 0.3 rad per step: 24 rad, three periods and more
        mod.phase += 0.3
        step = lock.step()
        wrapped += step.wrapped
        theta = math.pi * mod.bias / mod.v_pi + mod.phase
        assert abs(math.remainder(theta, 2 * math.pi)) < 0.05
    assert wrapped >= 2  # jumped back by 2·Vπ instead of running into the limit
    assert max(abs(v) for v in mod.history) <= 10.0
    assert max(abs(v) for v in mod.history) <= 9.0 + lock.dither_v + 1e-12


def test_bias_lock_refuses_a_dither_wider_than_its_margin() -> None:
    mod = FakeModulator(v_pi=8.0, phase=0.0)
    with pytest.raises(CalibrationError):
        BiasLock(mod, mod.light, bias_record(8.0, 0.0), (-10.0, 10.0), 0.5, dither_rad=0.5)


def test_working_point_is_inside_the_limits_or_refused() -> None:
    assert working_point(0.7, 4.0, -9.0, 9.0) == pytest.approx(-0.7 * 4 / math.pi)
    v = working_point(-3.0, 4.0, -9.0, 9.0)
    assert -9.0 <= v <= 9.0
    with pytest.raises(CalibrationError):
        working_point(1.0, 30.0, -1.0, 1.0)


class FakeController:
    def __init__(self, x: list[float], lo: float = 0.0, hi: float = 360.0) -> None:
        self.x, self.lo, self.hi = list(x), lo, hi
        self.history: list[list[float]] = []

    def set_actuators(self, values: list[float]) -> None:
        if any(not self.lo <= v <= self.hi for v in values):
            raise ValueError(f"{values} outside {self.lo}…{self.hi}")
        self.x = list(values)
        self.history.append(list(values))

    def get_actuators(self) -> list[float]:
        return list(self.x)

    def safe_state(self) -> None:
        pass


class Frame:
    """Minimal FrameStats stand-in: one QBER for both bases."""

    def __init__(self, q: float) -> None:
        self.q = q

    def qber(self, _basis: int) -> float:
        return self.q


@pytest.mark.parametrize("method", ["coordinate", "nelder-mead"])
def test_tracker_stays_inside_the_limits_when_the_optimum_is_outside(method: str) -> None:
    pc = FakeController([3.0, 358.0, 180.0])
    lower, upper = np.full(3, 1.0), np.full(3, 359.0)
    tracker = PolarizationTracker(pc, lower, upper, threshold=0.01, step=5.0, max_step=8.0,
                                  max_evals=12, method=method)
    target = np.array([-20.0, 400.0, 170.0])  # unreachable
    for _ in range(200):
        q = 0.01 + 1e-4 * float(np.sum((np.array(pc.x) - target) ** 2))
        tracker.on_frame(Frame(q))  # type: ignore[arg-type]
    hist = np.array(pc.history)
    assert np.all(hist >= 1.0)
    assert np.all(hist <= 359.0)
    steps = np.abs(np.diff(hist, axis=0))
    assert np.all(steps <= 2 * 8.0 + 1e-9)  # bounded moves (probe ± step, or a capped step)


def test_recentre_uses_the_actuator_period_and_stays_inside() -> None:
    lo, hi = np.full(3, 1.0), np.full(3, 359.0)
    out = recentre(np.array([2.0, 180.0, 355.0]), lo, hi, 180.0, 10.0)
    np.testing.assert_allclose(out, [182.0, 180.0, 175.0])
    np.testing.assert_allclose(recentre(np.array([2.0]), lo[:1], hi[:1], None, 10.0), [2.0])
