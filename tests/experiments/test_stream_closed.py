"""A run that ends on an error stops the tagger's stream itself, before the safe state:
not later, when the generator happens to be collected.  An error the run re-raises
(Ctrl-C, a bug) keeps the generator alive in its traceback until the caller is done."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qkdlab.cli import DEFAULT_MOCK_STATION, bb84_settings
from qkdlab.experiments.bb84.processing import FrameStats
from qkdlab.experiments.bb84.run import run_bb84
from qkdlab.roles import bb84_roles
from qkdlab.station import open_station


class Interrupt:
    """A monitor that raises KeyboardInterrupt on the third frame (Ctrl-C mid-run)."""

    def __init__(self) -> None:
        self.frames = 0

    def check(self, stats: FrameStats, detectors: object) -> str | None:
        self.frames += 1
        if self.frames == 3:
            raise KeyboardInterrupt
        return None


def test_an_interrupted_run_closes_the_stream_before_the_safe_state(tmp_path: Path) -> None:
    settings = bb84_settings(DEFAULT_MOCK_STATION, seed=2)
    with open_station(DEFAULT_MOCK_STATION, seed=2) as loaded:
        roles = bb84_roles(loaded)
        tagger: Any = roles.tagger
        real_stream, real_safe_state = tagger.stream, tagger.safe_state
        events: list[str] = []

        def stream(duration_s: float) -> Iterator[Any]:
            events.append("opened")
            try:
                yield from real_stream(duration_s)
            finally:
                events.append("closed")

        def safe_state() -> None:
            events.append("safe state")
            real_safe_state()

        tagger.stream, tagger.safe_state = stream, safe_state
        with pytest.raises(KeyboardInterrupt):
            run_bb84(roles, settings, duration_s=5.0, data_dir=tmp_path, progress=False,
                     monitors=[Interrupt()])
        assert events == ["opened", "closed", "safe state"]
