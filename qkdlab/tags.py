"""Time-tag blocks: the one data shape every tagger driver returns.

Times are absolute int64 picoseconds on the tagger's own timebase; never floats.
This module imports numpy only, so drivers, experiments and protocol may all use it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

CHANNEL_DTYPE = np.dtype(np.int16)
TIME_DTYPE = np.dtype(np.int64)


@dataclass(frozen=True)
class TagBlock:
    """A contiguous stretch of time tags from one tagger.

    Attributes:
        channel: input channel of each tag (int16).
        time_ps: arrival time of each tag in ps on the tagger's timebase (int64, sorted).
        start_ps: start of the stretch this block covers (ps); tags satisfy
            ``start_ps <= time_ps < stop_ps``.
        stop_ps: end of the stretch (ps, exclusive).
        overflow: True if the tagger lost tags inside this stretch (buffer full).
        lost_tags: how many tags the tagger reports lost (0 if it cannot count them).
        overflow_intervals: ``(k, 2)`` int64 array of ``[begin_ps, end_ps)`` stretches
            in which tags were lost; empty when ``overflow`` is False.
    """

    channel: npt.NDArray[np.int16]
    time_ps: npt.NDArray[np.int64]
    start_ps: int
    stop_ps: int
    overflow: bool = False
    lost_tags: int = 0
    overflow_intervals: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.zeros((0, 2), dtype=TIME_DTYPE)
    )

    def __post_init__(self) -> None:
        if self.channel.dtype != CHANNEL_DTYPE:
            raise TypeError(f"TagBlock.channel must be int16, got {self.channel.dtype}")
        if self.time_ps.dtype != TIME_DTYPE:
            raise TypeError(f"TagBlock.time_ps must be int64 ps, got {self.time_ps.dtype}")
        if self.channel.shape != self.time_ps.shape or self.time_ps.ndim != 1:
            raise ValueError(
                "TagBlock.channel and TagBlock.time_ps must be 1-D and of equal length, "
                f"got {self.channel.shape} and {self.time_ps.shape}"
            )
        if self.stop_ps < self.start_ps:
            raise ValueError(f"TagBlock stop_ps ({self.stop_ps}) < start_ps ({self.start_ps})")

    def __len__(self) -> int:
        return int(self.time_ps.size)

    @property
    def duration_ps(self) -> int:
        """Length of the stretch covered, in ps."""
        return self.stop_ps - self.start_ps

    def counts(self, channels: list[int] | None = None) -> dict[int, int]:
        """Number of tags per channel (all channels present, or the ones asked for)."""
        if channels is None:
            uniq, n = np.unique(self.channel, return_counts=True)
            return {int(c): int(k) for c, k in zip(uniq, n, strict=True)}
        return {c: int(np.count_nonzero(self.channel == c)) for c in channels}

    def select(self, channel: int) -> npt.NDArray[np.int64]:
        """Times (ps) of the tags on one channel."""
        return self.time_ps[self.channel == channel]

    @classmethod
    def empty(cls, start_ps: int = 0, stop_ps: int = 0) -> TagBlock:
        """A block with no tags covering ``[start_ps, stop_ps)``."""
        return cls(
            channel=np.zeros(0, dtype=CHANNEL_DTYPE),
            time_ps=np.zeros(0, dtype=TIME_DTYPE),
            start_ps=start_ps,
            stop_ps=stop_ps,
        )

    @classmethod
    def concatenate(cls, blocks: list[TagBlock]) -> TagBlock:
        """Join consecutive blocks (each must start where the previous stopped)."""
        if not blocks:
            return cls.empty()
        for a, b in itertools.pairwise(blocks):
            if b.start_ps != a.stop_ps:
                raise ValueError(
                    f"TagBlocks are not consecutive: one stops at {a.stop_ps} ps, "
                    f"the next starts at {b.start_ps} ps"
                )
        return cls(
            channel=np.concatenate([b.channel for b in blocks]),
            time_ps=np.concatenate([b.time_ps for b in blocks]),
            start_ps=blocks[0].start_ps,
            stop_ps=blocks[-1].stop_ps,
            overflow=any(b.overflow for b in blocks),
            lost_tags=sum(b.lost_tags for b in blocks),
            overflow_intervals=np.concatenate([b.overflow_intervals for b in blocks]),
        )
