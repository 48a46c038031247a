"""The standard calibration graph of a QKD link and its loops, over one context.

Nodes and dependencies::

    bias ──► mu ◄── detectors ( ◄── bias, when the power meter sits before the modulator)
    timing ──► polarization

``mu`` after ``bias`` (μ is set at the bias working point) and ``detectors`` (its
count-rate verification); ``polarization`` after ``timing`` (its frames use the
calibrated acceptance window); ``detectors`` after ``bias`` when the photon flux needs
the modulator's transmission.  Before a node's quick check, the settings its record
holds are put back into the instruments (delays, working point, attenuation,
actuators), so a check tests the calibration as recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qkdlab.calibration.bias import BiasCalibration
from qkdlab.calibration.detectors import DetectorCalibration
from qkdlab.calibration.graph import CalibrationGraph, CheckResult, Node
from qkdlab.calibration.measure import CalibrationContext
from qkdlab.calibration.mu import MuCalibration
from qkdlab.calibration.polarization import PolarizationCalibration
from qkdlab.calibration.records import CalibrationRecord
from qkdlab.calibration.timing import TimingCalibration


@dataclass
class Loops:
    """One instance of every loop over a context."""

    detectors: DetectorCalibration
    timing: TimingCalibration
    bias: BiasCalibration
    mu: MuCalibration
    polarization: PolarizationCalibration

    @classmethod
    def over(cls, ctx: CalibrationContext) -> Loops:
        return cls(DetectorCalibration(ctx), TimingCalibration(ctx), BiasCalibration(ctx),
                   MuCalibration(ctx), PolarizationCalibration(ctx))


def apply_record(ctx: CalibrationContext, record: CalibrationRecord) -> None:
    """Put the instrument settings of ``record`` back (no-op for detector records)."""
    roles = ctx.roles
    if record.node == "timing":
        for ch, delay in record.settings.get("input_delay_ps", {}).items():
            roles.tagger.set_input_delay(int(ch), int(delay))
    elif record.node == "bias" and roles.modulator is not None:
        roles.modulator.set_bias(float(record.settings["working_point_v"]))
    elif record.node == "mu":
        MuCalibration(ctx).apply(record)
    elif record.node == "polarization" and roles.polarization is not None:
        PolarizationCalibration(ctx).apply(record)


def _checked(ctx: CalibrationContext,
             check: Callable[[CalibrationRecord], CheckResult]
             ) -> Callable[[CalibrationRecord], CheckResult]:
    def run(record: CalibrationRecord) -> CheckResult:
        ctx.operating_point()
        apply_record(ctx, record)
        return check(record)
    return run


def _calibrated(ctx: CalibrationContext, loop: Any) -> Callable[[], CalibrationRecord]:
    def run() -> CalibrationRecord:
        ctx.operating_point()
        record: CalibrationRecord = loop.run()
        return record
    return run


def build_graph(ctx: CalibrationContext, loops: Loops | None = None) -> CalibrationGraph:
    """The standard graph over ``ctx`` (records in ``ctx.store``)."""
    loops = loops or Loops.over(ctx)
    cfg = ctx.config
    graph = CalibrationGraph(ctx.store)
    graph.add(Node("bias", _calibrated(ctx, loops.bias), _checked(ctx, loops.bias.check),
                   cfg.validity("bias")))
    meter_first = cfg.power_meter_point == "after_attenuator"
    graph.add(Node("detectors", _calibrated(ctx, loops.detectors),
                   _checked(ctx, loops.detectors.check), cfg.validity("detectors"),
                   ("bias",) if meter_first else ()))
    graph.add(Node("timing", _calibrated(ctx, loops.timing), _checked(ctx, loops.timing.check),
                   cfg.validity("timing")))
    graph.add(Node("mu", _calibrated(ctx, loops.mu), _checked(ctx, loops.mu.check),
                   cfg.validity("mu"), ("bias", "detectors")))
    graph.add(Node("polarization", _calibrated(ctx, loops.polarization),
                   _checked(ctx, loops.polarization.check), cfg.validity("polarization"),
                   ("timing",)))
    return graph
