"""Calibration on the packaged mock station (power meter and polarization controller
included), with the bench at hand for ground truth."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qkdlab.calibrate_cmd import calibration_config, calibration_roles
from qkdlab.calibration.measure import CalibrationContext
from qkdlab.calibration.store import CalibrationStore
from qkdlab.cli import DEFAULT_MOCK_STATION
from qkdlab.station import LoadedStation, open_station


@pytest.fixture(autouse=True)
def _no_pm100d_upstream_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """qcodes_contrib_drivers' PM100D sleeps ~5.4 s at construction and 0.2 s per reading
    for the hardware's sake; the mock measures at once."""
    from qcodes_contrib_drivers.drivers.Thorlabs import PM100D as upstream  # noqa: N811

    monkeypatch.setattr(upstream, "sleep", lambda _s: None)


@dataclass
class Rig:
    """A calibration context on the mock bench, with the bench for ground truth."""

    ctx: CalibrationContext
    loaded: LoadedStation
    bench: Any


@contextmanager
def mock_rig(seed: int = 21, *, clock: Any = None, config: dict[str, Any] | None = None,
             station: Path = DEFAULT_MOCK_STATION, **overrides: Any) -> Iterator[Rig]:
    """The packaged mock station, or a variant of it (bench ``overrides``) as a
    calibration context."""
    with open_station(station, seed=seed, bench_overrides=overrides) as loaded:
        assert loaded.launcher is not None
        roles = calibration_roles(loaded)
        assert roles.power_meter is not None
        assert roles.polarization is not None
        cfg = calibration_config(loaded, station, True, **(config or {}))
        store = CalibrationStore(None, clock=clock) if clock else CalibrationStore(None)
        ctx = CalibrationContext(roles, cfg, store, rng=np.random.default_rng(seed))
        yield Rig(ctx, loaded, loaded.launcher.bench)
