"""Calibration loops and the calibration store.

Loops (one module each, each a QCoDeS measurement writing a dataset and a
:class:`~qkdlab.calibration.records.CalibrationRecord`): :mod:`.detectors`,
:mod:`.timing`, :mod:`.bias` (with :class:`~qkdlab.calibration.bias.BiasLock`),
:mod:`.mu`, :mod:`.polarization` (with
:class:`~qkdlab.calibration.polarization.PolarizationTracker`).  Records persist in a
:class:`~qkdlab.calibration.store.CalibrationStore`; :mod:`.graph` maintains them in
dependency order (:func:`~qkdlab.calibration.suite.build_graph`); :mod:`.runtime` is
what a BB84 run uses (staleness rule, record ids, frame hooks).
"""

from qkdlab.calibration.config import CalibrationConfig, CalibrationRoles, Pattern
from qkdlab.calibration.graph import CalibrationGraph, CheckResult, MaintainReport, Node, State
from qkdlab.calibration.measure import CalibrationContext
from qkdlab.calibration.records import (
    NODES,
    CalibrationError,
    CalibrationRecord,
    Quantity,
    StaleCalibrationError,
)
from qkdlab.calibration.runtime import (
    RunCalibration,
    RunSupervisor,
    StreamClock,
    check_before_run,
    monitor_drift,
)
from qkdlab.calibration.store import CalibrationStore
from qkdlab.calibration.suite import Loops, apply_record, build_graph

__all__ = [
    "NODES",
    "CalibrationConfig",
    "CalibrationContext",
    "CalibrationError",
    "CalibrationGraph",
    "CalibrationRecord",
    "CalibrationRoles",
    "CalibrationStore",
    "CheckResult",
    "Loops",
    "MaintainReport",
    "Node",
    "Pattern",
    "Quantity",
    "RunCalibration",
    "RunSupervisor",
    "StaleCalibrationError",
    "State",
    "StreamClock",
    "apply_record",
    "build_graph",
    "check_before_run",
    "monitor_drift",
]
