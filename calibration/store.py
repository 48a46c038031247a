"""Persistent calibration store: JSON lines, append-only, with staleness.

Every record ever written stays in the file (the history of a bench); the latest
record of a node is the one in force.  A record is *stale* once the clock passes its
``valid_until_s``, *bad* when its loop flagged it.  ``path=None`` keeps records in
memory only (tests, dry runs).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from qkdlab.calibration.records import NODES, CalibrationRecord

Clock = Callable[[], float]


@dataclass(frozen=True)
class StatusRow:
    """One line of ``qkdlab calibrate status``."""

    node: str
    state: str  # "valid", "stale", "bad", "missing"
    record_id: str | None
    created_s: float
    valid_until_s: float
    summary: str

    def remaining_s(self, now_s: float) -> float:
        """Seconds of validity left (negative when stale; NaN when missing)."""
        return self.valid_until_s - now_s if math.isfinite(self.valid_until_s) else math.nan


class CalibrationStore:
    """Calibration records of one bench.

    Args:
        path: JSON-lines file (created on first write); None keeps records in memory.
        clock: the time source for staleness (Unix s).
    """

    def __init__(self, path: str | Path | None = None, clock: Clock = time.time) -> None:
        self.path = None if path is None else Path(path)
        self.clock = clock
        self._lock = threading.Lock()
        self._records: list[CalibrationRecord] = []
        if self.path is not None and self.path.exists():
            self._records = list(_read(self.path))

    # -- writing -----------------------------------------------------------------------
    def add(self, record: CalibrationRecord) -> CalibrationRecord:
        """Append ``record`` (persisted at once; flushed and fsynced)."""
        with self._lock:
            self._records.append(record)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(record.to_json() + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
        return record

    # -- reading -----------------------------------------------------------------------
    def latest(self, node: str) -> CalibrationRecord | None:
        """The record in force for ``node`` (the last one written), or None."""
        with self._lock:
            for record in reversed(self._records):
                if record.node == node:
                    return record
        return None

    def get(self, record_id: str) -> CalibrationRecord | None:
        """The record with ``record_id`` (any age), or None."""
        with self._lock:
            return next((r for r in self._records if r.id == record_id), None)

    def history(self, node: str) -> list[CalibrationRecord]:
        """Every record of ``node``, oldest first."""
        with self._lock:
            return [r for r in self._records if r.node == node]

    def valid(self, node: str, now_s: float | None = None) -> CalibrationRecord | None:
        """The latest record of ``node`` if it is good and not stale, else None."""
        record = self.latest(node)
        now = self.clock() if now_s is None else now_s
        return record if record is not None and record.is_valid(now) else None

    def state_of(self, node: str, now_s: float | None = None) -> str:
        """``valid``, ``stale``, ``bad`` or ``missing``."""
        record = self.latest(node)
        now = self.clock() if now_s is None else now_s
        if record is None:
            return "missing"
        if not record.good:
            return "bad"
        return "valid" if record.is_valid(now) else "stale"

    def stale(self, nodes: Iterable[str], now_s: float | None = None) -> list[str]:
        """The nodes among ``nodes`` without a valid record."""
        now = self.clock() if now_s is None else now_s
        return [n for n in nodes if self.valid(n, now) is None]

    def status(self, nodes: Iterable[str] = NODES,
               now_s: float | None = None) -> list[StatusRow]:
        """One :class:`StatusRow` per node (for the status table)."""
        now = self.clock() if now_s is None else now_s
        rows = []
        for node in nodes:
            record = self.latest(node)
            if record is None:
                rows.append(StatusRow(node, "missing", None, math.nan, math.nan, ""))
                continue
            rows.append(StatusRow(node, self.state_of(node, now), record.id, record.created_s,
                                  record.valid_until_s, summarise(record)))
        return rows


def _read(path: Path) -> Iterable[CalibrationRecord]:
    """Records of a JSON-lines file; a torn last line (crash while writing) is skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield CalibrationRecord.from_json(line)
        except (ValueError, KeyError, TypeError) as err:
            if n == len(lines) - 1:
                continue  # an interrupted append; the rest of the file is intact
            raise ValueError(f"{path}:{n + 1}: unreadable calibration record: {err}") from err


_SUMMARY_KEYS = {
    "detectors": ("efficiency", "dark_cps"),
    "timing": ("jitter_fwhm_ps",),
    "bias": ("v_pi_v", "extinction_ratio_db", "working_point_v"),
    "mu": ("mu_signal", "mu_decoy", "mu_vacuum"),
    "polarization": ("qber_z", "qber_x"),
}


def summarise(record: CalibrationRecord, digits: int = 4) -> str:
    """A short text of the main figures of a record."""
    parts = []
    for key in _SUMMARY_KEYS.get(record.node, ()):
        if key in record.quantities:
            q = record.quantities[key]
            parts.append(f"{key}={q.value:.{digits}g}{(' ' + q.unit) if q.unit else ''}")
            continue
        per = record.per_channel(key)
        if per:
            unit = next(q.unit for k, q in record.quantities.items() if k.startswith(key))
            values = "/".join(f"{v:.3g}" for _, v in sorted(per.items()))
            parts.append(f"{key}={values}{(' ' + unit) if unit else ''}")
    if "window_ps" in record.quantities:
        parts.append(f"window={record.value('window_ps'):.0f} ps")
    if record.note and not record.good:
        parts.append(record.note)
    return ", ".join(parts)
