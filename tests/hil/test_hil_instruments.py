"""Read-only, low-risk HIL checks of every instrument and role of a station.

Identity, every parameter readable, error queues empty, a short tagger acquisition with
dark-count rates in range, detector count rates, the power meter's dark reading.
Nothing here switches light on, raises a bias or moves optics; the dark checks are
skipped if the laser is found on.  Run: ``pytest tests/hil --hil lab.yaml``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from qkdlab.station import LoadedStation

pytestmark = pytest.mark.hil
log = logging.getLogger(__name__)


def _snapshot_values(snap: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, value)`` of every parameter in a QCoDeS snapshot, channels included."""
    for name, par in (snap.get("parameters") or {}).items():
        if "value" in par:
            yield f"{prefix}{name}", par["value"]
    for name, sub in (snap.get("submodules") or {}).items():
        if isinstance(sub, dict):
            yield from _snapshot_values(sub, f"{prefix}{name}.")
        elif isinstance(sub, list):  # a channel list snapshots as a list of channels
            for i, channel in enumerate(sub):
                yield from _snapshot_values(channel, f"{prefix}{name}[{i}].")


def _dark_or_skip(hil_station: LoadedStation) -> None:
    """Skip a dark measurement while the station's laser emits (it is not ours to switch)."""
    name = (hil_station.file.qkdlab.get("roles") or {}).get("laser")
    laser = hil_station.instruments.get(name) if isinstance(name, str) else None
    if laser is not None and laser.is_on():
        pytest.skip(f"laser {name!r} is on: a dark measurement needs it off")


def test_identity(hil_instrument: Any) -> None:
    idn = hil_instrument.get_idn()
    assert idn.get("vendor"), f"{hil_instrument.name}: get_idn() names no vendor: {idn}"
    assert idn.get("model"), f"{hil_instrument.name}: get_idn() names no model: {idn}"


def test_every_parameter_reads(hil_instrument: Any) -> None:
    snap = hil_instrument.snapshot(update=True)
    values = dict(_snapshot_values(snap))
    assert values, f"{hil_instrument.name}: snapshot holds no parameter value"
    not_finite = [p for p, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    assert not not_finite, f"{hil_instrument.name}: non-finite readings: {not_finite}"


def test_error_queue_empty_after_reading_everything(hil_instrument: Any) -> None:
    check = getattr(hil_instrument, "check_errors", None)
    if not callable(check):
        pytest.skip(f"{type(hil_instrument).__name__} has no error queue (check_errors)")
    try:  # errors left from before this run: drained and logged, not ours
        check()
    except Exception as err:
        log.warning("%s: stale errors drained before the check: %s", hil_instrument.name, err)
    hil_instrument.snapshot(update=True)
    check()  # raises, listing the errors our reads caused


@pytest.mark.needs_roles("tagger", "detectors")
def test_tagger_short_dark_acquisition(hil_station: LoadedStation,
                                       hil_role: Callable[[str], Any],
                                       hil_tolerance: Callable[[str, str], Any]) -> None:
    seconds = hil_tolerance("tagger", "acquire_s")
    low, high = hil_tolerance("tagger", "dark_rate_cps")
    rel_tol = hil_tolerance("tagger", "duration_rel_tol")
    channels = sorted(int(c) for c in hil_station.file.qkdlab["roles"]["detectors"])
    _dark_or_skip(hil_station)

    block = hil_role("tagger").acquire(seconds)

    assert block.time_ps.dtype == np.int64
    assert np.all(np.diff(block.time_ps) >= 0), "tags not in time order"
    if len(block):
        assert block.start_ps <= block.time_ps[0]
        assert block.time_ps[-1] < block.stop_ps
    assert abs(block.duration_ps * 1e-12 / seconds - 1) <= rel_tol, (
        f"asked {seconds} s, got a block of {block.duration_ps * 1e-12} s")
    assert not block.overflow, "the tagger overflowed in a dark acquisition"
    assert block.lost_tags == 0, "tags lost in a dark acquisition"
    counts = block.counts(channels)
    rates = {ch: n / (block.duration_ps * 1e-12) for ch, n in counts.items()}
    outside = {ch: round(r, 1) for ch, r in rates.items() if not low <= r <= high}
    assert not outside, f"dark count rates outside [{low}, {high}] cps: {outside}"


@pytest.mark.needs_roles("spd")
def test_detector_count_rates(hil_roles: Callable[[str], list[Any]],
                              hil_tolerance: Callable[[str, str], Any]) -> None:
    low, high = hil_tolerance("spd", "dark_rate_cps")
    for detector in hil_roles("spd"):
        rates = detector.count_rates()
        assert rates, f"{detector.name}: no channel reported"
        outside = [r for r in rates if not (math.isfinite(r) and low <= r <= high)]
        assert not outside, f"{detector.name}: count rates {rates} outside [{low}, {high}] cps"


@pytest.mark.needs_roles("power_meter")
def test_power_meter_dark_reading(hil_station: LoadedStation, hil_role: Callable[[str], Any],
                                  hil_tolerance: Callable[[str, str], Any]) -> None:
    low, high = hil_tolerance("power_meter", "dark_power_w")
    _dark_or_skip(hil_station)
    power = hil_role("power_meter").read_power_w()
    assert math.isfinite(power), power
    assert low <= power <= high, f"dark reading {power:.3e} W outside [{low:.3e}, {high:.3e}] W"
