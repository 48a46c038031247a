"""Calibration records, the store's staleness, the graph's maintain logic, the run rule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from qkdlab.calibration.graph import CalibrationGraph, CheckResult, MaintainReport, Node, State
from qkdlab.calibration.records import (
    CalibrationError,
    CalibrationRecord,
    Quantity,
    StaleCalibrationError,
)
from qkdlab.calibration.runtime import check_before_run
from qkdlab.calibration.store import CalibrationStore
from qkdlab.experiments.bb84.processing import BB84Settings


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def record(node: str, now: float, validity: float = 100.0, good: bool = True,
           **values: float) -> CalibrationRecord:
    return CalibrationRecord(node, {k: Quantity(v, 0.1 * v, "") for k, v in values.items()},
                             now, now + validity, good=good)


def test_records_round_trip_through_the_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "cal.jsonl"
    clock = Clock()
    store = CalibrationStore(path, clock)
    first = store.add(record("bias", clock.t, v_pi_v=4.0))
    second = store.add(CalibrationRecord(
        "timing", {"delay_ps_ch1": Quantity(12.0, math.nan, "ps")}, clock.t, clock.t + 5,
        settings={"input_delay_ps": {"1": 12}}, dataset_id=3, dataset_guid="g"))
    again = CalibrationStore(path, clock)
    assert again.latest("bias") == first
    assert again.latest("timing") == second  # NaN uncertainties survive as null
    assert math.isnan(again.latest("timing").uncertainty("delay_ps_ch1"))  # type: ignore[union-attr]
    assert again.get(first.id) == first
    # a torn last line (crash while appending) is skipped, earlier lines are kept
    with path.open("a") as fh:
        fh.write('{"id": "x", "node": "bi')
    assert CalibrationStore(path, clock).latest("bias") == first


def test_store_staleness_follows_the_clock() -> None:
    clock = Clock()
    store = CalibrationStore(None, clock)
    assert store.state_of("mu") == "missing"
    store.add(record("mu", clock.t, validity=60, mu_signal=0.5))
    assert store.state_of("mu") == "valid"
    clock.t += 59.9
    assert store.valid("mu") is not None
    clock.t += 0.2
    assert store.state_of("mu") == "stale"
    assert store.stale(["mu", "bias"]) == ["mu", "bias"]
    store.add(record("bias", clock.t, good=False, v_pi_v=4.0))
    assert store.state_of("bias") == "bad"
    rows = {r.node: r for r in store.status(["mu", "bias", "timing"])}
    assert rows["mu"].state == "stale"
    assert rows["mu"].remaining_s(clock.t) < 0
    assert rows["timing"].state == "missing"


class FakeLoop:
    """Counts calls; its check passes while ``healthy``; calibration may fail."""

    def __init__(self, clock: Clock, node: str) -> None:
        self.clock, self.node = clock, node
        self.healthy = True
        self.fail = False
        self.calibrations = 0
        self.checks = 0

    def calibrate(self) -> CalibrationRecord:
        self.calibrations += 1
        if self.fail:
            raise CalibrationError("no light")
        self.healthy = True
        return record(self.node, self.clock.t, validity=100, value=1.0)

    def check(self, _record: CalibrationRecord) -> CheckResult:
        self.checks += 1
        return CheckResult(self.healthy, "ok" if self.healthy else "drifted")


def graph_of(clock: Clock) -> tuple[CalibrationGraph, dict[str, FakeLoop]]:
    store = CalibrationStore(None, clock)
    graph = CalibrationGraph(store)
    loops = {n: FakeLoop(clock, n) for n in ("bias", "detectors", "timing", "mu",
                                             "polarization")}
    deps = {"bias": (), "detectors": ("bias",), "timing": (), "mu": ("bias", "detectors"),
            "polarization": ("timing",)}
    for name, loop in loops.items():
        graph.add(Node(name, loop.calibrate, loop.check, 100.0, deps[name]))
    return graph, loops


def test_maintain_calibrates_unknown_nodes_once_in_dependency_order() -> None:
    clock = Clock()
    graph, loops = graph_of(clock)
    assert graph.state("mu") is State.UNKNOWN
    report = graph.maintain_all()
    order = [n for n, a, _ in report.actions if a == "calibrated"]
    assert order == ["bias", "detectors", "timing", "mu", "polarization"]
    assert all(loop.calibrations == 1 for loop in loops.values())
    assert all(loop.checks == 0 for loop in loops.values())
    assert all(graph.state(n) is State.GOOD for n in loops)


def test_maintain_checks_first_and_calibrates_only_when_the_check_fails() -> None:
    clock = Clock()
    graph, loops = graph_of(clock)
    graph.maintain_all()
    clock.t += 150  # every record stale
    assert graph.state("mu") is State.NEEDS_CALIBRATION
    loops["detectors"].healthy = False
    report = MaintainReport()
    assert graph.maintain("mu", report) is State.GOOD
    assert report.did("bias") == ["checked"]  # check passed: renewed, not recalibrated
    assert report.did("detectors") == ["checked", "calibrated"]
    assert report.did("mu") == ["checked"]
    assert loops["bias"].calibrations == 1
    assert loops["detectors"].calibrations == 2
    assert graph.state("mu") is State.GOOD
    assert graph.store.latest("bias").created_s == clock.t  # type: ignore[union-attr]
    assert "confirmed by check" in graph.store.latest("bias").note  # type: ignore[union-attr]
    assert loops["timing"].checks == 0  # not a dependency of mu: untouched


def test_a_failed_dependency_blocks_its_dependants() -> None:
    clock = Clock()
    graph, loops = graph_of(clock)
    loops["bias"].fail = True
    report = MaintainReport()
    graph.maintain("mu", report)
    assert graph.state("bias") is State.BAD
    assert graph.state("mu") is State.BAD
    assert report.did("mu") == ["blocked"]
    assert loops["mu"].calibrations == 0
    assert loops["detectors"].calibrations == 0
    loops["bias"].fail = False
    assert graph.maintain("mu") is State.GOOD


def test_a_bad_record_is_bad_until_recalibrated() -> None:
    clock = Clock()
    graph, _ = graph_of(clock)
    graph.store.add(record("timing", clock.t, good=False, value=1.0))
    assert graph.state("timing") is State.BAD


def test_the_run_refuses_stale_calibrations_or_renews_them() -> None:
    clock = Clock()
    graph, loops = graph_of(clock)
    store = graph.store
    with pytest.raises(StaleCalibrationError) as err:
        check_before_run(store)
    assert set(err.value.stale) == set(loops)
    graph.maintain_all()
    store.add(record("mu", clock.t, validity=100, mu_signal=0.45, mu_decoy=0.09,
                     mu_vacuum=0.001))
    store.add(record("timing", clock.t, validity=100, window_ps=600.0))
    cal = check_before_run(store)
    assert cal.stale == []
    assert cal.ids["mu"] == store.latest("mu").id  # type: ignore[union-attr]
    meta = cal.metadata()
    assert set(meta["calibration_ids"]) == set(loops)
    settings = cal.apply(BB84Settings())
    assert (settings.mu_signal, settings.mu_decoy, settings.window_ps) == (0.45, 0.09, 600.0)
    clock.t += 150
    with pytest.raises(StaleCalibrationError):
        check_before_run(store, policy="refuse")
    warned = check_before_run(store, policy="warn")
    assert set(warned.stale) == set(loops)
    renewed = check_before_run(store, policy="recalibrate", graph=graph)
    assert renewed.stale
    assert store.stale(list(loops)) == []
