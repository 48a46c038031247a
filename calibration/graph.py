"""Dependency graph of calibrations (after AutoDepGraph, Rol et al.).

Each :class:`Node` has a *quick check* (cheap: is the calibration still right?) and a
*full calibration*, a validity time after which its record is stale, and the nodes it
depends on.  :meth:`CalibrationGraph.maintain` brings a node to a good state:

1. maintain its dependencies (each at most once per call); if one ends *bad*, the
   node is *bad* too and nothing of it is run;
2. no record (*unknown*) → calibrate;
3. a record exists (valid, stale or bad) → run the quick check; if it passes the record
   is renewed (same values, new validity) and the node is *good*; if it fails →
   calibrate;
4. a calibration that raises or returns a record flagged bad leaves the node *bad*.

States come from the store (:meth:`CalibrationGraph.state`): *good* (valid record),
*needs calibration* (stale record), *bad* (flagged record or failed maintenance in this
session), *unknown* (no record).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from qkdlab.calibration.records import CalibrationError, CalibrationRecord
from qkdlab.calibration.store import CalibrationStore

log = logging.getLogger(__name__)


class State(enum.Enum):
    """State of a calibration node."""

    GOOD = "good"
    NEEDS_CALIBRATION = "needs calibration"
    BAD = "bad"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class CheckResult:
    """Outcome of a quick check: ``passed`` and what was seen."""

    passed: bool
    detail: str = ""


@dataclass
class Node:
    """A calibration step.

    Attributes:
        name: node name (the record's ``node``).
        calibrate: runs the full calibration, returns the record (the graph stores it).
        check: quick check against the latest record (None: a record in force is
            trusted until it is stale, then recalibrated).
        validity_s: how long a record holds (s).
        depends_on: nodes maintained first.
    """

    name: str
    calibrate: Callable[[], CalibrationRecord]
    check: Callable[[CalibrationRecord], CheckResult] | None = None
    validity_s: float = 3600.0
    depends_on: tuple[str, ...] = ()


@dataclass
class MaintainReport:
    """What :meth:`CalibrationGraph.maintain` did, node by node (in order)."""

    actions: list[tuple[str, str, str]] = field(default_factory=list)
    """(node, action, detail): action is ``checked``, ``calibrated``, ``failed``,
    ``blocked`` or ``kept``."""

    def did(self, node: str) -> list[str]:
        """Actions taken on ``node``."""
        return [a for n, a, _ in self.actions if n == node]


class CalibrationGraph:
    """Calibration nodes over one store.

    Args:
        store: where records are read and written (its clock decides staleness).
    """

    def __init__(self, store: CalibrationStore) -> None:
        self.store = store
        self.nodes: dict[str, Node] = {}
        self._failed: set[str] = set()

    def add(self, node: Node) -> Node:
        """Add ``node``; its dependencies must already be in the graph (no cycles)."""
        for dep in node.depends_on:
            if dep not in self.nodes:
                raise ValueError(f"node {node.name!r} depends on unknown node {dep!r}")
        if node.name in self.nodes:
            raise ValueError(f"node {node.name!r} already in the graph")
        self.nodes[node.name] = node
        return node

    def order(self, names: Sequence[str] | None = None) -> list[str]:
        """``names`` (default: all) and their dependencies, dependencies first."""
        out: list[str] = []

        def visit(name: str) -> None:
            if name in out:
                return
            for dep in self._node(name).depends_on:
                visit(dep)
            out.append(name)

        for name in names if names is not None else list(self.nodes):
            visit(name)
        return out

    def state(self, name: str) -> State:
        """State of ``name`` from its latest record (and failures of this session)."""
        self._node(name)
        if name in self._failed:
            return State.BAD
        record = self.store.latest(name)
        if record is None:
            return State.UNKNOWN
        if not record.good:
            return State.BAD
        return State.GOOD if record.is_valid(self.store.clock()) else State.NEEDS_CALIBRATION

    def maintain(self, name: str, report: MaintainReport | None = None,
                 _done: dict[str, State] | None = None) -> State:
        """Dependencies, then the quick check, then a calibration only if needed."""
        report = MaintainReport() if report is None else report
        done = {} if _done is None else _done
        if name in done:
            return done[name]
        node = self._node(name)
        for dep in node.depends_on:
            if self.maintain(dep, report, done) is not State.GOOD:
                report.actions.append((name, "blocked", f"dependency {dep} is not good"))
                self._failed.add(name)
                done[name] = State.BAD
                return State.BAD
        record = self.store.latest(name)
        if record is not None:
            if node.check is None:
                if record.is_valid(self.store.clock()):
                    report.actions.append((name, "kept", "valid record, no quick check"))
                    self._failed.discard(name)
                    done[name] = State.GOOD
                    return State.GOOD
            else:
                result = self._run_check(node, record)
                report.actions.append((name, "checked", result.detail))
                if result.passed:
                    now = self.store.clock()
                    self.store.add(record.renewed(now, node.validity_s,
                                                  f"confirmed by check: {result.detail}"))
                    self._failed.discard(name)
                    done[name] = State.GOOD
                    return State.GOOD
        done[name] = self.calibrate(name, report)
        return done[name]

    def maintain_all(self, names: Sequence[str] | None = None) -> MaintainReport:
        """Maintain ``names`` (default: every node) in dependency order."""
        report = MaintainReport()
        done: dict[str, State] = {}
        for name in self.order(names):
            self.maintain(name, report, done)
        return report

    def calibrate(self, name: str, report: MaintainReport | None = None) -> State:
        """Run the full calibration of ``name`` now (no dependency handling)."""
        node = self._node(name)
        try:
            record = node.calibrate()
        except CalibrationError as err:
            log.warning("calibration %s failed: %s", name, err)
            if report is not None:
                report.actions.append((name, "failed", str(err)))
            self._failed.add(name)
            return State.BAD
        self.store.add(record)
        if report is not None:
            report.actions.append((name, "calibrated" if record.good else "failed",
                                   record.note))
        if not record.good:
            self._failed.add(name)
            return State.BAD
        self._failed.discard(name)
        return State.GOOD

    def _run_check(self, node: Node, record: CalibrationRecord) -> CheckResult:
        assert node.check is not None
        try:
            return node.check(record)
        except CalibrationError as err:
            return CheckResult(False, f"check failed: {err}")

    def _node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"no calibration node {name!r} (have: "
                           f"{', '.join(self.nodes)})") from None
