"""The bias lock against a probe with an offset (a power meter's dark reading).

The lock's three-point phase measurement is a ratio of readings; ψ and the depth D it
uses were fitted to background-subtracted readings, so the lock must subtract the same
background.  A power meter reading pW of light on a 200 pW offset is the case that
showed it: without the subtraction the lock misread the phase and walked away.
"""

from __future__ import annotations

import math

import pytest

from qkdlab.calibration.bias import BiasLock
from qkdlab.calibration.records import CalibrationError, CalibrationRecord, Quantity

V_PI = 4.0
PHASE = 0.3  # signal-class transfer max where k·V + PHASE = 0
PSI = 0.33  # mixed-pattern phase offset
DEPTH = 0.48
LIGHT = 4e-12  # W, mean of the mixed pattern at the probe
OFFSET = 2e-10  # W, the meter's reading in the dark


class FakeModulator:
    def __init__(self, bias_v: float) -> None:
        self.bias_v = bias_v

    def set_bias(self, volts: float) -> None:
        self.bias_v = volts

    def get_bias(self) -> float:
        return self.bias_v


def probe_of(mod: FakeModulator, offset: float) -> float:
    k = math.pi / V_PI
    return offset + LIGHT * (1 + DEPTH * math.cos(k * mod.bias_v + PHASE + PSI))


def record(background: float | None) -> CalibrationRecord:
    v_star = -PHASE * V_PI / math.pi
    settings = {} if background is None else {"background": background}
    return CalibrationRecord(
        node="bias", created_s=0.0, valid_until_s=1.0, settings=settings,
        quantities={"v_pi_v": Quantity(V_PI, unit="V"),
                    "working_point_v": Quantity(v_star, unit="V"),
                    "lock_offset_rad": Quantity(PSI, unit="rad"),
                    "mixed_depth": Quantity(DEPTH)})


def phase_error_after(steps: int, background: float | None, start_offset_v: float,
                      offset: float = OFFSET) -> float:
    rec = record(background)
    mod = FakeModulator(rec.value("working_point_v") + start_offset_v)
    lock = BiasLock(mod, lambda: probe_of(mod, offset), rec, (-10.0, 10.0), 1.0)
    lock.bias_v = mod.bias_v
    for _ in range(steps):
        lock.step()
    return math.pi / V_PI * mod.bias_v + PHASE


def test_lock_subtracts_the_calibrated_background_and_finds_the_peak() -> None:
    # starts 0.4 rad off the transfer maximum; one step lands within 1e-6 rad
    assert abs(phase_error_after(1, OFFSET, 0.5)) < 1e-6
    assert abs(phase_error_after(5, OFFSET, -0.5)) < 1e-6


def test_without_the_subtraction_the_offset_hides_the_error() -> None:
    # the mechanism: a lock that takes the 200 pW offset for light reads a u some 50
    # times too small, misjudges the phase and walks away from the peak (0.4 rad off at
    # the start, 0.7 rad after one step, 1.9 rad after five)
    assert abs(phase_error_after(1, None, 0.5)) > 0.4
    assert abs(phase_error_after(5, None, 0.5)) > abs(phase_error_after(1, None, 0.5))


def test_a_record_with_a_non_finite_background_is_refused() -> None:
    mod = FakeModulator(0.0)
    with pytest.raises(CalibrationError, match="background"):
        BiasLock(mod, lambda: probe_of(mod, OFFSET), record(math.nan), (-10.0, 10.0), 1.0)


def test_a_lock_reading_the_light_alone_finds_the_peak() -> None:
    # the same lock with no background to subtract (a probe without offset) converges
    assert abs(phase_error_after(1, 0.0, 0.5, offset=0.0)) < 1e-6
    assert abs(phase_error_after(5, None, -0.5, offset=0.0)) < 1e-6
