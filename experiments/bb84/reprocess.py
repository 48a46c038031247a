"""Offline re-processing of a BB84 run from its raw tag files.

Each raw file's header holds its segment's settings and the detector map; Alice's
record is recomputed from the pattern generator's algorithm and seed.  A run whose
tagger stream was retried has one file per segment
(:mod:`~qkdlab.experiments.bb84.segments`): they are found next to the given file and
replayed in order, each through its own
:class:`~qkdlab.experiments.bb84.processing.FrameProcessor` (fresh sync, the segment's
seed), exactly as the live run fed them.  So the per-frame figures (frames numbered
across segments, as in the dataset) and the merged totals are identical to the live
run's (a run that a fault or an alarm stopped may have written blocks whose frames it
never saved: those frames come out too).  ``whole_run=False`` replays the given file
alone.

A damaged raw file (corrupted or truncated block) raises
:class:`~qkdlab.experiments.bb84.rawtags.RawTagFileError`, which names the file, the
byte offset and how much before it is intact; ``reprocess(path, salvage=True)``
processes the intact part of each segment instead (later segments have their own time
origin and sync, so they are still read) and says what was lost
(:attr:`Reprocessed.damage`, :attr:`SegmentReplay.damage`).  Raw files are only ever
read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from qkdlab.experiments.bb84.processing import (
    BB84Settings,
    Estimate,
    FrameProcessor,
    FrameStats,
    RunTotals,
    estimate,
)
from qkdlab.experiments.bb84.rawtags import RawTagFileError, RawTagReader
from qkdlab.experiments.bb84.run import frame_values
from qkdlab.experiments.bb84.segments import later_segment_files, merge_totals, raw_name
from qkdlab.experiments.bb84.sync import DetectorMap, SyncError
from qkdlab.patterns import ALGORITHM, bb84_symbols


class ReprocessError(ValueError):
    """The raw files lack what offline processing needs."""


@dataclass(frozen=True)
class SegmentReplay:
    """What re-processing one segment's raw file read and produced.

    Attributes:
        index: the segment (0 for the run's first stream).
        path: its raw tag file.
        blocks, tags: blocks and time tags processed.
        frames: frames it produced (0: it never synchronised, as in the live run).
        damage: with ``salvage``, the damage that ended reading it (None: read whole).
    """

    index: int
    path: Path
    blocks: int
    tags: int
    frames: int
    damage: RawTagFileError | None = None


@dataclass(frozen=True)
class Reprocessed:
    """Per-frame figures, totals and estimate recomputed from a run's raw tag files.

    Attributes:
        frames: one entry per dataset parameter of the live run (``frame``,
            ``segment``, the frame figures and ``rate_ch<n>``), each an array with one
            value per frame.
        blocks, tags: blocks and time tags processed, over every segment.
        damage: with ``salvage``, the first damage met (None: every file read whole).
        segments: what each segment's file gave.
    """

    totals: RunTotals
    estimate: Estimate
    metadata: dict[str, Any]
    blocks: int = 0
    tags: int = 0
    damage: RawTagFileError | None = None
    segments: tuple[SegmentReplay, ...] = ()
    frames: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)


def reprocess(path: str | Path, *, salvage: bool = False,
              whole_run: bool = True) -> Reprocessed:
    """Re-run sync, sifting and estimation over a run's raw tag files.

    ``path``: any segment's raw file; with ``whole_run`` every segment of its run is
    replayed (:func:`run_files`), else that file alone.  ``salvage``: process the
    intact blocks before the first damaged one of each file (a torn tail after a
    crash, a corrupted block) instead of raising; ``damage`` says what ended reading.

    Raises :class:`ReprocessError` when the files lack what processing needs (or a
    segment of the run is missing), :class:`RawTagFileError` for a damaged file, and
    :class:`~qkdlab.experiments.bb84.sync.SyncError` when no segment synchronised.
    """
    readers = run_files(path) if whole_run else [RawTagReader(path)]
    parts: list[RunTotals] = []
    replays: list[SegmentReplay] = []
    table = _FrameTable()
    sync_error: SyncError | None = None
    for reader in readers:
        settings, detectors, marker = _setup(reader)
        index = _segment_index(reader)

        def record(pulse: npt.NDArray[np.int64], s: BB84Settings = settings
                   ) -> tuple[npt.NDArray[np.int8], ...]:
            return bb84_symbols(s.seed, pulse, s.p_z, s.p_signal, s.p_decoy)

        processor = FrameProcessor(settings, detectors, record, marker)
        blocks = tags = 0
        frames_before = len(table)
        for block in reader.salvage() if salvage else reader.blocks():
            for stats in processor.feed(block):
                table.add(index, stats, settings, detectors)
            blocks += 1
            tags += len(block)
        try:
            for stats in processor.flush():
                table.add(index, stats, settings, detectors)
        except SyncError as err:  # as the live run: a segment that never synchronised
            sync_error = err
        parts.append(processor.totals)
        replays.append(SegmentReplay(index=index, path=reader.path, blocks=blocks, tags=tags,
                                     frames=len(table) - frames_before,
                                     damage=reader.damage))
    if sync_error is not None and not len(table):
        raise sync_error
    totals = merge_totals(parts)
    first = readers[0]
    damage = next((r.damage for r in replays if r.damage is not None), None)
    return Reprocessed(totals=totals, estimate=estimate(totals, _setup(first)[0]),
                       metadata=first.metadata, blocks=sum(r.blocks for r in replays),
                       tags=sum(r.tags for r in replays), damage=damage,
                       segments=tuple(replays), frames=table.arrays())


def run_files(path: str | Path) -> list[RawTagReader]:
    """Readers of every segment's raw file of the run ``path`` belongs to, in order.

    Segment 0 is ``path`` itself if its header says so (or has no segment: a run
    before segments existed), else ``bb84-<run id>.qkt`` next to it; segments 1, 2...
    are the ``bb84-<run id>-s<k>.qkt`` files next to it.  A gap in their numbering, or
    a header naming another run or segment, is a :class:`ReprocessError`.
    """
    given = RawTagReader(path)
    run_id = given.metadata.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        return [given]  # no run to look for: the file alone
    directory = given.path.parent
    index = _segment_index(given)
    files = {0: given.path if index == 0 else directory / raw_name(run_id, 0),
             **later_segment_files(directory, run_id)}
    files[index] = given.path
    missing = [directory / raw_name(run_id, k) for k in range(max(files) + 1)
               if k not in files or not files[k].is_file()]
    if missing:
        raise ReprocessError(
            f"{given.path}: run {run_id} is missing the raw tag file of "
            f"segment(s) {', '.join(str(m) for m in missing)} (reprocess a single file "
            "with whole_run=False)")
    readers = []
    for k, file in sorted(files.items()):
        reader = given if file == given.path else RawTagReader(file)
        if reader.metadata.get("run_id") != run_id or _segment_index(reader) != k:
            raise ReprocessError(
                f"{file}: its header names segment {_segment_index(reader)} of run "
                f"{reader.metadata.get('run_id')!r}, not segment {k} of run {run_id}")
        readers.append(reader)
    return readers


def _segment_index(reader: RawTagReader) -> int:
    index = reader.metadata.get("segment", 0)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ReprocessError(f"{reader.path}: run metadata malformed: segment must be an "
                             f"integer >= 0, got {index!r}")
    return index


def _setup(reader: RawTagReader) -> tuple[BB84Settings, DetectorMap, int | None]:
    """Settings, detector map and marker channel from a raw file's header."""
    meta = reader.metadata
    try:
        settings = BB84Settings(**meta["settings"])
        detectors = DetectorMap({int(ch): (int(v[0]), int(v[1]))
                                 for ch, v in meta["detectors"].items()})
        marker = meta.get("marker_channel")
        if marker is not None and (isinstance(marker, bool) or not isinstance(marker, int)):
            raise TypeError(f"marker_channel must be an integer or null, got {marker!r}")
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as err:
        raise ReprocessError(f"{reader.path}: run metadata incomplete or malformed: "
                             f"{type(err).__name__}: {err}") from err
    if meta.get("pattern_algorithm") != ALGORITHM:
        raise ReprocessError(
            f"{reader.path}: Alice's record cannot be recomputed (pattern algorithm "
            f"{meta.get('pattern_algorithm')!r}, this version knows {ALGORITHM!r})"
        )
    return settings, detectors, marker


class _FrameTable:
    """Dataset rows of the replayed frames, column by column (frames numbered across
    segments, as the live run numbers them)."""

    def __init__(self) -> None:
        self._columns: dict[str, list[float]] = {"frame": [], "segment": []}

    def __len__(self) -> int:
        return len(self._columns["frame"])

    def add(self, segment: int, stats: FrameStats, settings: BB84Settings,
            detectors: DetectorMap) -> None:
        row = {"frame": float(len(self)), "segment": float(segment),
               **frame_values(stats, settings, detectors)}
        if len(self) and row.keys() != self._columns.keys():
            raise ReprocessError(f"segment {segment}: its frames have the figures "
                                 f"{sorted(row)}, earlier frames {sorted(self._columns)}")
        for key, value in row.items():
            self._columns.setdefault(key, []).append(value)

    def arrays(self) -> dict[str, npt.NDArray[np.float64]]:
        return {key: np.asarray(values, dtype=np.float64)
                for key, values in self._columns.items()}
