"""Launcher hook for the fake Swabian library: an in-process "mock", no transport.

Swabian's Time Tagger is reached through a vendor library, not a socket; its mock is a
fake of that library attached to the bench.  The launcher hands the driver the fake
library object (``driver_kwargs``) instead of an address.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qkdlab.mock_instruments.server.faults import FaultInjector
from qkdlab.mock_instruments.swabian.fake_timetagger import FakeSwabianLibrary


class InProcessSwabian:
    """A fake Time Tagger attached to the bench; the driver gets ``library`` and ``serial``."""

    def __init__(self, name: str, bench: Any | None, model: str) -> None:
        self.name = name
        self.bench = bench
        self.model = model
        self.faults = FaultInjector()  # library faults: use the fake device's own hooks
        self.library = FakeSwabianLibrary()
        self.device: Any = None

    def start(self) -> InProcessSwabian:
        self.device = self.library.attach(self.bench, model=self.model)
        return self

    def stop(self) -> None:
        """Nothing to close: the driver frees its device."""

    @property
    def address(self) -> str:
        serial = getattr(self.device, "serial", "?")
        return f"inprocess://swabian/{serial}"

    @property
    def driver_kwargs(self) -> dict[str, Any]:
        return {"library": self.library, "serial": self.device.serial}


def serve_ultra(name: str, bench: Any | None, options: Mapping[str, str]) -> InProcessSwabian:
    """``mock://swabian/ultra``: a Time Tagger Ultra (≈ 80 M tags/s over USB 3)."""
    return InProcessSwabian(name, bench, "Time Tagger Ultra")


def serve_tt20(name: str, bench: Any | None, options: Mapping[str, str]) -> InProcessSwabian:
    """``mock://swabian/tt20``: a Time Tagger 20 (≈ 9 M tags/s over USB 2)."""
    return InProcessSwabian(name, bench, "Time Tagger 20")
