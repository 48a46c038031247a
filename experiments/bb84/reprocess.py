"""Offline re-processing of a BB84 run from its raw tag file.

The raw file's header holds the run's settings and detector map; Alice's record is
recomputed from the pattern generator's algorithm and seed.  The same
:class:`~qkdlab.experiments.bb84.processing.FrameProcessor` sees the same blocks, so
the figures are identical to the live run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from qkdlab.experiments.bb84.processing import (
    BB84Settings,
    Estimate,
    FrameProcessor,
    RunTotals,
    estimate,
)
from qkdlab.experiments.bb84.rawtags import RawTagReader
from qkdlab.experiments.bb84.sync import DetectorMap
from qkdlab.patterns import ALGORITHM, bb84_symbols


class ReprocessError(ValueError):
    """The raw file lacks what offline processing needs."""


@dataclass(frozen=True)
class Reprocessed:
    """Totals and estimate recomputed from a raw tag file."""

    totals: RunTotals
    estimate: Estimate
    metadata: dict[str, Any]


def reprocess(path: str | Path) -> Reprocessed:
    """Re-run sync, sifting and estimation over a raw tag file."""
    reader = RawTagReader(path)
    meta = reader.metadata
    try:
        settings = BB84Settings(**meta["settings"])
        detectors = DetectorMap({int(ch): (int(v[0]), int(v[1]))
                                 for ch, v in meta["detectors"].items()})
    except (KeyError, TypeError, ValueError) as err:
        raise ReprocessError(f"{path}: run metadata incomplete: {err}") from err
    if meta.get("pattern_algorithm") != ALGORITHM:
        raise ReprocessError(
            f"{path}: Alice's record cannot be recomputed (pattern algorithm "
            f"{meta.get('pattern_algorithm')!r}, this version knows {ALGORITHM!r})"
        )

    def record(index: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int8], ...]:
        return bb84_symbols(settings.seed, index, settings.p_z, settings.p_signal,
                            settings.p_decoy)

    processor = FrameProcessor(settings, detectors, record, meta.get("marker_channel"))
    for block in reader.blocks():
        processor.feed(block)
    processor.flush()
    return Reprocessed(totals=processor.totals, estimate=estimate(processor.totals, settings),
                       metadata=meta)
