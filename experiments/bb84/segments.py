"""Segments of a BB84 run: one per tagger stream, each with its own sync and raw file.

A run is one segment unless the tagger stream fails and is retried
(:class:`~qkdlab.experiments.bb84.monitoring.FaultPolicy`).  A new stream has a new time
origin, so the timing is found afresh; Alice's pattern restarts at pulse 0 with a
fresh seed derived from the run's (:func:`segment_seed`: restarting with the same seed
would repeat her symbols).  Each segment's raw tag file carries that segment's settings
and index in its header; the files of one run sit side by side (:func:`raw_name`), so
``qkdlab reprocess`` finds them all and replays them in order, as the run processed
them.  The run's totals are the segments' totals merged, pulse indices shifted so that
they keep increasing.
"""

from __future__ import annotations

import dataclasses
import glob
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkdlab.experiments.bb84.processing import BB84Settings, FrameProcessor, RunTotals
from qkdlab.experiments.bb84.rawtags import RawTagWriter

MAX_SEED = 2**63 - 1


def segment_seed(seed: int, index: int) -> int:
    """Alice's pattern seed for segment ``index`` (the run's seed for segment 0)."""
    if index == 0:
        return seed
    words = np.random.SeedSequence([seed, index, 0x5E6]).generate_state(2, np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & MAX_SEED


def raw_name(run_id: str, index: int) -> str:
    """File name of segment ``index``'s raw tags (segment 0 keeps the run's plain name)."""
    suffix = "" if index == 0 else f"-s{index}"
    return f"bb84-{run_id}{suffix}.qkt"


def raw_path(data_dir: Path, run_id: str, index: int) -> Path:
    """Raw tag file of segment ``index`` of a run whose data folder is ``data_dir``."""
    return data_dir / "raw" / raw_name(run_id, index)


def later_segment_files(directory: Path, run_id: str) -> dict[int, Path]:
    """Raw files of segments 1, 2... of run ``run_id`` found in ``directory``, by index."""
    pattern = re.compile(rf"bb84-{re.escape(run_id)}-s([1-9][0-9]*)\.qkt")
    found: dict[int, Path] = {}
    for path in directory.glob(f"bb84-{glob.escape(run_id)}-s*.qkt"):
        match = pattern.fullmatch(path.name)
        if match is not None:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


@dataclass
class Segment:
    """One tagger stream of a run: its settings, processor and raw tag file."""

    index: int
    settings: BB84Settings
    processor: FrameProcessor
    raw: RawTagWriter
    blocks: int = 0
    frames: int = 0

    @property
    def unprocessed_blocks(self) -> int:
        """Blocks written to the raw file that produced no frame (never synchronised)."""
        return self.blocks - self.frames


def settings_for(settings: BB84Settings, index: int) -> BB84Settings:
    """The run's settings with segment ``index``'s pattern seed."""
    return dataclasses.replace(settings, seed=segment_seed(settings.seed, index))


def merge_totals(parts: Sequence[RunTotals]) -> RunTotals:
    """Totals of several segments as one run (one segment: returned as is; none: empty).

    Counts add up; sifted records are concatenated with each segment's pulse indices
    shifted past the previous segment's last one, so that they stay unique and in order.
    """
    if len(parts) == 1:
        return parts[0]
    out = RunTotals()
    offset = 0
    for part in parts:
        out.pulses += part.pulses
        out.frames += part.frames
        out.detected += part.detected
        out.sifted += part.sifted
        out.errors += part.errors
        for ch, n in part.counts.items():
            out.counts[ch] = out.counts.get(ch, 0) + n
        out.unassigned += part.unassigned
        out.before_start += part.before_start
        out.lost_tags += part.lost_tags
        out.overflow_frames += part.overflow_frames
        out.sifted_pulse.extend(p + offset for p in part.sifted_pulse)
        out.sifted_basis.extend(part.sifted_basis)
        out.sifted_intensity.extend(part.sifted_intensity)
        out.sifted_alice.extend(part.sifted_alice)
        out.sifted_bob.extend(part.sifted_bob)
        last = max((int(p.max()) for p in part.sifted_pulse if p.size), default=-1)
        offset += last + 1
    return out
