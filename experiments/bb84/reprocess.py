"""Offline re-processing of a BB84 run from its raw tag file.

The raw file's header holds the run's settings and detector map; Alice's record is
recomputed from the pattern generator's algorithm and seed.  The same
:class:`~qkdlab.experiments.bb84.processing.FrameProcessor` sees the same blocks, so
the figures are identical to the live run's.

A damaged raw file (corrupted or truncated block) raises
:class:`~qkdlab.experiments.bb84.rawtags.RawTagFileError`, which names the byte offset
and how much before it is intact; ``reprocess(path, salvage=True)`` processes that
intact part instead and says what was lost (:attr:`Reprocessed.damage`).  The raw file
is only ever read.
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
from qkdlab.experiments.bb84.rawtags import RawTagFileError, RawTagReader
from qkdlab.experiments.bb84.sync import DetectorMap
from qkdlab.patterns import ALGORITHM, bb84_symbols


class ReprocessError(ValueError):
    """The raw file lacks what offline processing needs."""


@dataclass(frozen=True)
class Reprocessed:
    """Totals and estimate recomputed from a raw tag file.

    Attributes:
        blocks, tags: blocks and time tags processed.
        damage: with ``salvage``, the damage that ended reading (None: whole file read).
    """

    totals: RunTotals
    estimate: Estimate
    metadata: dict[str, Any]
    blocks: int = 0
    tags: int = 0
    damage: RawTagFileError | None = None


def reprocess(path: str | Path, *, salvage: bool = False) -> Reprocessed:
    """Re-run sync, sifting and estimation over a raw tag file.

    ``salvage``: process the intact blocks before the first damaged one (a torn tail
    after a crash, a corrupted block) instead of raising; the result's ``damage``
    says what ended reading.
    """
    reader = RawTagReader(path)
    meta = reader.metadata
    try:
        settings = BB84Settings(**meta["settings"])
        detectors = DetectorMap({int(ch): (int(v[0]), int(v[1]))
                                 for ch, v in meta["detectors"].items()})
        marker = meta.get("marker_channel")
        if marker is not None and (isinstance(marker, bool) or not isinstance(marker, int)):
            raise TypeError(f"marker_channel must be an integer or null, got {marker!r}")
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as err:
        raise ReprocessError(f"{path}: run metadata incomplete or malformed: "
                             f"{type(err).__name__}: {err}") from err
    if meta.get("pattern_algorithm") != ALGORITHM:
        raise ReprocessError(
            f"{path}: Alice's record cannot be recomputed (pattern algorithm "
            f"{meta.get('pattern_algorithm')!r}, this version knows {ALGORITHM!r})"
        )

    def record(index: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int8], ...]:
        return bb84_symbols(settings.seed, index, settings.p_z, settings.p_signal,
                            settings.p_decoy)

    processor = FrameProcessor(settings, detectors, record, marker)
    blocks = tags = 0
    for block in reader.salvage() if salvage else reader.blocks():
        processor.feed(block)
        blocks += 1
        tags += len(block)
    processor.flush()
    return Reprocessed(totals=processor.totals, estimate=estimate(processor.totals, settings),
                       metadata=meta, blocks=blocks, tags=tags, damage=reader.damage)
