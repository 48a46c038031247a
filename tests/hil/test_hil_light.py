"""HIL light tests: they switch a laser on, move the modulator bias or the waveplates,
and run a short BB84 acquisition.  Skipped without ``--hil-allow-light``.

Around each, the plugin snapshots the involved instruments; afterwards — pass or
fail — light sources and detectors go to their safe state and every other setting
goes back to its snapshot (qkdlab.testing.state).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qkdlab.station import LoadedStation
from qkdlab.testing.hil import HILSession
from qkdlab.testing.tolerances import Tolerances

pytestmark = [pytest.mark.hil, pytest.mark.light]


def _switch_on(laser: Any, settings: dict[str, float]) -> None:
    unknown = sorted(set(settings) - set(laser.parameters))
    assert not unknown, f"{laser.name} has no parameter {unknown[0]!r} (laser: test_settings)"
    if not laser.interlock_closed():
        pytest.fail(f"{laser.name}: interlock open; close it to test emission")
    for name, value in settings.items():
        laser.parameters[name](value)
    laser.output_on()


@pytest.mark.needs_roles("laser")
def test_laser_on_at_low_power_then_off(hil_role: Callable[[str], Any],
                                        hil_tolerance: Callable[[str, str], Any],
                                        hil_tolerances: Tolerances) -> None:
    laser = hil_role("laser")
    settings = hil_tolerance("laser", "test_settings")
    _switch_on(laser, settings)
    try:
        assert laser.is_on()
        tol = hil_tolerances.find("laser", "current_tol_a")
        if tol is not None and "current" in settings and "measured_current" in laser.parameters:
            measured = laser.measured_current()
            assert abs(measured - settings["current"]) <= tol, (
                f"measured {measured:.6g} A for a setpoint of {settings['current']} A")
    finally:
        laser.output_off()
    assert not laser.is_on()


@pytest.mark.needs_roles("laser", "power_meter")
def test_power_meter_sees_the_laser(hil_role: Callable[[str], Any],
                                    hil_tolerance: Callable[[str, str], Any]) -> None:
    low, high = hil_tolerance("power_meter", "light_power_w")
    laser, meter = hil_role("laser"), hil_role("power_meter")
    _switch_on(laser, hil_tolerance("laser", "test_settings"))
    try:
        power = meter.read_power_w()
    finally:
        laser.output_off()
    assert math.isfinite(power), power
    assert low <= power <= high, (
        f"{power:.3e} W with the laser at its test settings, outside [{low:.3e}, {high:.3e}] W")


@pytest.mark.needs_roles("modulator")
def test_modulator_bias_moves_and_reads_back(hil_role: Callable[[str], Any],
                                             hil_tolerance: Callable[[str, str], Any]) -> None:
    step, tol = hil_tolerance("modulator", "bias_step_v"), hil_tolerance("modulator", "bias_tol_v")
    modulator = hil_role("modulator")
    start = modulator.get_bias()
    target = start - step if start > 0 else start + step  # towards 0: within any range
    modulator.set_bias(target)
    assert abs(modulator.get_bias() - target) <= tol


@pytest.mark.needs_roles("polarization")
def test_polarization_actuators_move_and_read_back(
        hil_role: Callable[[str], Any], hil_tolerance: Callable[[str, str], Any]) -> None:
    step, tol = hil_tolerance("polarization", "step"), hil_tolerance("polarization", "tol")
    controller = hil_role("polarization")
    start = controller.get_actuators()
    target = [a + step for a in start]
    controller.set_actuators(target)
    reached = controller.get_actuators()
    assert all(abs(r - t) <= tol for r, t in zip(reached, target, strict=True)), (
        f"asked {target}, reached {reached}")


@pytest.mark.needs_roles("laser", "transmitter", "tagger", "detectors")
def test_short_bb84_run_writes_its_dataset(hil_station: LoadedStation, hil_session: HILSession,
                                           hil_tolerance: Callable[[str, str], Any],
                                           hil_data_dir: Path) -> None:
    from qcodes.dataset import load_by_guid
    from qcodes.dataset.sqlite.database import connect

    from qkdlab.cli import bb84_settings
    from qkdlab.experiments.bb84.run import run_bb84
    from qkdlab.roles import bb84_roles

    duration = hil_tolerance("bb84", "duration_s")
    qber_max = hil_tolerance("bb84", "qber_max")
    detections_min = hil_tolerance("bb84", "detections_min")
    result = run_bb84(bb84_roles(hil_station), bb84_settings(hil_session.station_path),
                      duration_s=duration, data_dir=hil_data_dir, progress=False,
                      metadata={"station": str(hil_session.station_path), "hil": True})
    summary = result.summary()

    assert result.status == "completed", result.status
    assert summary["detections"] >= detections_min, summary
    for basis in ("qber_z", "qber_x"):
        assert summary[basis] is not None, summary
        assert summary[basis] <= qber_max, summary
    conn = connect(result.database)
    try:
        dataset = load_by_guid(str(result.dataset_guid), conn=conn)
        assert dataset.metadata["status"] == "completed"
        frames = dataset.get_parameter_data("qber_z")["qber_z"]
        assert len(frames["qber_z"]) >= 1
        assert len(frames["frame"]) == len(frames["qber_z"])
    finally:
        conn.close()
    assert Path(result.raw_tags).stat().st_size > 0
