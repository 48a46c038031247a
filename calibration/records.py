"""Calibration records: what a loop measured, how well, when, and until when it holds.

A :class:`CalibrationRecord` is immutable and JSON-serialisable.  Each quantity carries
its value, 1σ uncertainty and unit (SI; times of events in ps).  ``settings`` holds the
instrument settings the loop applied or observed (e.g. the bias working point, tagger
input delays), ``dataset_id``/``dataset_guid`` link the QCoDeS dataset of the
measurement.  Times are Unix seconds from the calibration context's clock.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

NODES = ("detectors", "timing", "bias", "mu", "polarization")
"""The calibration nodes of a QKD link, in a valid order."""


class CalibrationError(RuntimeError):
    """A calibration could not be done (missing role, fit failed, out of range)."""


class StaleCalibrationError(CalibrationError):
    """A run needs calibration records that are missing, bad or past their validity."""

    def __init__(self, message: str, stale: list[str]) -> None:
        super().__init__(message)
        self.stale = list(stale)


@dataclass(frozen=True)
class Quantity:
    """A measured value with its 1σ uncertainty and unit."""

    value: float
    uncertainty: float = math.nan
    unit: str = ""

    def to_json(self) -> list[Any]:
        return [_json_float(self.value), _json_float(self.uncertainty), self.unit]

    @classmethod
    def from_json(cls, raw: Any) -> Quantity:
        value, unc, unit = raw
        return cls(_from_json_float(value), _from_json_float(unc), str(unit))


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _from_json_float(x: float | None) -> float:
    return math.nan if x is None else float(x)


@dataclass(frozen=True)
class CalibrationRecord:
    """One calibration result.

    Attributes:
        node: which calibration (``detectors``, ``timing``, ``bias``, ``mu``,
            ``polarization``).
        quantities: name → :class:`Quantity` (per-channel values are named
            ``<quantity>_ch<n>``).
        created_s: when it was measured (Unix s).
        valid_until_s: after this time the record is stale (Unix s).
        settings: instrument settings applied or observed (JSON-able).
        dataset_id, dataset_guid: the QCoDeS dataset of the measurement (None if none).
        good: False when the loop measured but the result failed its acceptance test.
        note: free text (why it is bad, what a check found).
        id: unique record id (what a run records to say which calibration it used).
    """

    node: str
    quantities: dict[str, Quantity]
    created_s: float
    valid_until_s: float
    settings: dict[str, Any] = field(default_factory=dict)
    dataset_id: int | None = None
    dataset_guid: str | None = None
    good: bool = True
    note: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    def value(self, name: str) -> float:
        """The value of quantity ``name`` (KeyError naming the record if absent)."""
        try:
            return self.quantities[name].value
        except KeyError:
            raise KeyError(f"calibration record {self.node}/{self.id} has no quantity "
                           f"{name!r} (has: {', '.join(sorted(self.quantities))})") from None

    def uncertainty(self, name: str) -> float:
        """1σ uncertainty of quantity ``name``."""
        return self.quantities[name].uncertainty

    def per_channel(self, name: str) -> dict[int, float]:
        """``{channel: value}`` of the quantities named ``<name>_ch<channel>``."""
        prefix = f"{name}_ch"
        return {int(k[len(prefix):]): q.value for k, q in self.quantities.items()
                if k.startswith(prefix) and k[len(prefix):].isdigit()}

    def is_valid(self, now_s: float) -> bool:
        """Good and not yet past its validity."""
        return self.good and now_s < self.valid_until_s

    def renewed(self, now_s: float, validity_s: float, note: str) -> CalibrationRecord:
        """A copy confirmed by a quick check: new id and time, same values."""
        return replace(self, id=uuid.uuid4().hex[:16], created_s=now_s,
                       valid_until_s=now_s + validity_s, note=note)

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps({
            "id": self.id, "node": self.node, "created_s": self.created_s,
            "valid_until_s": self.valid_until_s, "good": self.good, "note": self.note,
            "quantities": {k: q.to_json() for k, q in self.quantities.items()},
            "settings": self.settings, "dataset_id": self.dataset_id,
            "dataset_guid": self.dataset_guid,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> CalibrationRecord:
        raw = json.loads(line)
        return cls(
            id=str(raw["id"]), node=str(raw["node"]), created_s=float(raw["created_s"]),
            valid_until_s=float(raw["valid_until_s"]), good=bool(raw["good"]),
            note=str(raw.get("note", "")),
            quantities={k: Quantity.from_json(v) for k, v in raw["quantities"].items()},
            settings=dict(raw.get("settings") or {}), dataset_id=raw.get("dataset_id"),
            dataset_guid=raw.get("dataset_guid"),
        )


def channel_quantities(name: str, values: dict[int, float], errors: dict[int, float],
                       unit: str) -> dict[str, Quantity]:
    """``{f"{name}_ch{c}": Quantity}`` for per-channel results."""
    return {f"{name}_ch{c}": Quantity(float(values[c]), float(errors.get(c, math.nan)), unit)
            for c in sorted(values)}
