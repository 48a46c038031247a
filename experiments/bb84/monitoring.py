"""What a BB84 run watches between frames, and how it tells faults apart.

* :class:`FrameMonitor` — the hook for security monitors (e.g. detector blinding): called
  after every frame with the frame's figures and the latest detector readings; a
  non-None return is an alarm and the run aborts at once (no key).
* :func:`poll_detector` — one reading of a detector unit: count rate plus what its
  driver exposes (temperature, bias, bias current), SI units in the keys.
* :class:`FaultPolicy` and :func:`is_link_error` — which failures a run retries.

The fault policy of a run (:func:`~qkdlab.experiments.bb84.run.run_bb84`):

===========================  ==================================  ==========================
fault                        what the run does                   what is lost
===========================  ==================================  ==========================
tagger stream: link error    retried, at most ``tagger_retries``  the tagger time of the gap
(no reply in time, link      times: tagger reconnected, Alice's  (reported per retry:
lost, garbled reply)         pattern restarted with a fresh      ``gap_wall_s``); blocks of
                             seed: a new *segment* with its own  a segment that never
                             sync and raw tag file; the run      synchronised
                             goes on for the remaining time
tagger: retries exhausted,   stops: ``failed: <tagger>: <what>``  the rest of the run; no
or any other tagger error                                        key
detector unit (polled once   stops: ``failed: <unit>: <what>``    the rest of the run; no
per frame): no reply after   (its driver already reconnected     key
its driver's retry, garbage  and retried once)
laser: off (interlock) or    stops: ``failed: <laser>: <what>``   the rest of the run; no
not answering (per frame)                                        key
transmitter: error queue or  stops: ``failed: <transmitter>:      the rest of the run; no
garbled reply (per frame)    <what>``                            key
an instrument failing at     stops: ``failed: <instrument>:      the run; no key
start-up (enable, configure) <what>``
a monitor's alarm            stops: ``aborted: <Monitor>:         the rest of the run; no
                             <reason>``                          key
===========================  ==================================  ==========================

However a run stops, every completed frame stays in the dataset (flushed frame by
frame), its ``status`` says why, every instrument gets its safe state (a failure there
is appended to the status, never raised over the original error), and only a
``completed`` run's sifted records are saved and distilled into key.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from qkdlab.experiments.bb84.processing import FrameStats

Readings = Mapping[str, Mapping[str, float]]
"""Detector unit name -> its latest readings (``count_rate_cps`` and more, SI units)."""


@runtime_checkable
class FrameMonitor(Protocol):
    """A check run after every frame; a non-None return is an alarm that aborts the run."""

    def check(self, stats: FrameStats, detectors: Readings) -> str | None:
        """The alarm's reason, or None when the frame looks sound.

        Args:
            stats: the frame's figures (counts per channel, gains, QBER, lost tags...).
            detectors: detector unit name -> its readings polled after this frame:
                ``count_rate_cps`` (cps, summed over the unit's channels) and, where the
                driver exposes them, ``temperature_c`` (°C), ``bias_v`` (V),
                ``bias_current_a`` (A).
        """


DETECTOR_READINGS: tuple[tuple[str, str, str], ...] = (
    # (parameter on the driver, reading key, unit)
    ("temperature", "temperature_c", "°C"),
    ("bias_voltage", "bias_v", "V"),
    ("bias_current", "bias_current_a", "A"),
)
"""Readings taken from a detector driver's QCoDeS parameters when it has them."""


def reading_units(readings: Mapping[str, float]) -> dict[str, str]:
    """Unit of each reading key (for dataset parameters)."""
    units = {key: unit for _, key, unit in DETECTOR_READINGS}
    units["count_rate_cps"] = "cps"
    return {key: units.get(key, "") for key in readings}


def poll_detector(detector: Any) -> dict[str, float]:
    """One reading of a detector unit: ``count_rate_cps`` plus :data:`DETECTOR_READINGS`.

    The count rate is summed over the unit's channels; the other readings are taken from
    scalar parameters only (a multi-channel unit's per-channel lists, e.g. an SNSPD
    driver's ``bias_current`` of every channel, are not one reading and are left out).
    Raises whatever the driver raises (a unit that does not answer is a fault).
    """
    readings = {"count_rate_cps": float(sum(detector.count_rates()))}
    parameters = getattr(detector, "parameters", {})
    for parameter, key, _unit in DETECTOR_READINGS:
        if parameter in parameters:
            value = parameters[parameter]()
            if isinstance(value, numbers.Real):
                readings[key] = float(value)
    return readings


def is_link_error(err: BaseException) -> bool:
    """True for a failure of the link to an instrument rather than of the instrument.

    By the drivers' convention every link failure (no reply in time, link lost and not
    restored, garbled reply) raises the driver's ``<Model>CommunicationError``; the
    socket layer's ``ConnectionError`` and ``TimeoutError`` count too.
    """
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    return any(cls.__name__.endswith("CommunicationError") for cls in type(err).__mro__)


@dataclass(frozen=True)
class FaultPolicy:
    """Which faults a run survives (see the module docstring for the whole table).

    Attributes:
        tagger_retries: times a link error on the tagger stream is retried per run
            (0: never); each retry starts a new segment.
        retry_wait_s: pause before reconnecting (s), giving a dropped link time to return.
        transient: tells a retriable tagger error from a fatal one.
    """

    tagger_retries: int = 2
    retry_wait_s: float = 0.5
    transient: Callable[[BaseException], bool] = is_link_error

    def __post_init__(self) -> None:
        if not (isinstance(self.tagger_retries, int) and 0 <= self.tagger_retries <= 100):
            raise ValueError(f"tagger_retries must be an integer in [0, 100], "
                             f"got {self.tagger_retries!r}")
        if not (math.isfinite(self.retry_wait_s) and 0 <= self.retry_wait_s <= 600):
            raise ValueError(f"retry_wait_s must lie in [0, 600] s, got {self.retry_wait_s}")


class InstrumentFaultError(RuntimeError):
    """An instrument failed during a run: names it and says what happened."""

    def __init__(self, instrument: str, what: str) -> None:
        what = what.removeprefix(f"{instrument}: ")  # drivers name themselves too
        super().__init__(f"{instrument}: {what}")
        self.instrument = instrument
        self.what = what


class MonitorAlarmError(RuntimeError):
    """A :class:`FrameMonitor` raised an alarm: the run aborts."""


def describe(err: BaseException) -> str:
    """One line saying what went wrong (the error's first line, its type if empty)."""
    if isinstance(err, UnicodeDecodeError):  # a reply that is not text
        reply = bytes(err.object[:40]).rstrip(b"\r\n")
        return f"garbled reply {reply!r} ({err.reason})"
    # QCoDeS appends "asking '...' to <instrument>" to a driver error's args: the first
    # argument is the driver's own message
    text = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first or type(err).__name__
