"""Time-tagger model: timebase error, channel delays, jitter, int64 ps, rate limit.

An event at true time t (int64 ps) on channel ch becomes the tag
``x + round(x·ppm·1e-6) + delay_ps[ch] + round(N(0, σ²))`` with ``x = t + offset_ps``,
i.e. ``round((t + offset)·(1 + ppm·1e-6))`` on the tagger's own clock.

Sustained-rate limit: a leaky bucket of ``buffer_tags`` drained at ``max_rate_hz`` and
evaluated on coarse bins of ``bucket_bin_ps`` (tagger time).  A bin's arrivals enter
at its start, then the bin drains; arrivals that find the buffer full are the bin's
last tags and are lost — counted and reported as ``[begin_ps, end_ps)`` intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt

from .config import TaggerConfig
from .detection import Events, truncated_normal

IntArray = npt.NDArray[np.int64]
I16Array = npt.NDArray[np.int16]
I8Array = npt.NDArray[np.int8]


@dataclass(frozen=True)
class TagBatch:
    """Tags with ground truth: tagger time (ps), channel, origin and pulse index."""

    time_ps: IntArray
    channel: I16Array
    origin: I8Array
    pulse_index: IntArray

    @classmethod
    def empty(cls) -> TagBatch:
        """No tags."""
        return cls(
            np.zeros(0, np.int64), np.zeros(0, np.int16), np.zeros(0, np.int8),
            np.zeros(0, np.int64),
        )

    def __len__(self) -> int:
        return int(self.time_ps.size)

    def take(self, sel: slice | IntArray | npt.NDArray[np.bool_]) -> TagBatch:
        """Subset of the tags."""
        return TagBatch(self.time_ps[sel], self.channel[sel], self.origin[sel],
                        self.pulse_index[sel])

    @classmethod
    def concatenate(cls, batches: list[TagBatch]) -> TagBatch:
        """Join batches (no sorting)."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return cls.empty()
        if len(batches) == 1:
            return batches[0]
        return cls(
            np.concatenate([b.time_ps for b in batches]),
            np.concatenate([b.channel for b in batches]),
            np.concatenate([b.origin for b in batches]),
            np.concatenate([b.pulse_index for b in batches]),
        )

    def sorted(self) -> TagBatch:
        """Sorted by tag time (stable)."""
        t = self.time_ps
        if t.size < 2 or bool(np.all(t[1:] >= t[:-1])):
            return self
        return self.take(np.argsort(t, kind="stable"))


def timebase_ps(t_true_ps: IntArray, offset_ps: int, ppm: float) -> IntArray:
    """Tagger clock reading of true times: x + round(x·ppm·1e-6), x = t + offset (int64 ps)."""
    x = t_true_ps + np.int64(offset_ps)
    if ppm == 0.0:
        return x
    corr = x.astype(np.float64)
    corr *= ppm * 1e-6
    return x + np.rint(corr).astype(np.int64)


def timebase_scalar_ps(t_true_ps: int, offset_ps: int, ppm: float) -> int:
    """Scalar :func:`timebase_ps` (same rounding: half to even)."""
    x = t_true_ps + offset_ps
    return x + round(float(x) * (ppm * 1e-6))


def lookahead_ps(cfg: TaggerConfig) -> int:
    """True-time lead needed so that no later event can tag before an emitted one.

    Covers the largest |delay| and 8σ of the largest jitter, stretched by the clock
    error (|ppm| ≤ 1000) plus rounding.
    """
    reach = cfg.max_abs_delay_ps + 8.0 * cfg.max_jitter_ps + 2.0
    return int(np.ceil(reach * 1.002)) + 2


def final_tag_limit_ps(true_front_ps: int, cfg: TaggerConfig) -> int:
    """Tags below this tagger time are final once true time is simulated to ``true_front``."""
    reach = cfg.max_abs_delay_ps + int(np.ceil(8.0 * cfg.max_jitter_ps)) + 2
    return timebase_scalar_ps(true_front_ps, cfg.offset_ps, cfg.ppm) - reach


def tag_events(
    rng: np.random.Generator, events: Events, channel: int, cfg: TaggerConfig
) -> TagBatch:
    """Tags of one channel's events (timebase, input delay, jitter, int64 ps)."""
    t = timebase_ps(events.time_ps, cfg.offset_ps, cfg.ppm)
    t += np.int64(cfg.delay_of(channel))
    if cfg.jitter_ps > 0 and t.size:
        jit = truncated_normal(rng, t.size, cfg.jitter_ps)
        t += np.rint(jit).astype(np.int64)
    return TagBatch(t, np.full(t.size, channel, np.int16), events.origin, events.pulse_index)


@numba.njit(cache=True)
def _leaky_bucket(
    bins: IntArray,
    counts: IntArray,
    bin_ps: int,
    rate_per_ps: float,
    capacity: float,
    level: float,
    drained_ps: int,
) -> tuple[IntArray, float, int]:
    """Tags lost per occupied bin of a leaky bucket; returns (lost, level, drained_until)."""
    lost = np.zeros(bins.size, np.int64)
    for j in range(bins.size):
        begin = bins[j] * bin_ps
        if begin > drained_ps:
            level = max(0.0, level - rate_per_ps * (begin - drained_ps))
            drained_ps = begin
        excess = level + counts[j] - capacity
        if excess > 0:
            lost[j] = min(counts[j], np.int64(np.ceil(excess)))
        level = min(capacity, level + counts[j] - lost[j])
        end = begin + bin_ps
        level = max(0.0, level - rate_per_ps * (end - drained_ps))
        drained_ps = end
    return lost, level, drained_ps


@dataclass
class BucketState:
    """Leaky-bucket memory: buffer fill (tags) and the time it is drained up to (ps)."""

    level: float = 0.0
    drained_ps: int = -(2**62)


def apply_rate_limit(
    batch: TagBatch, cfg: TaggerConfig, state: BucketState
) -> tuple[TagBatch, int, IntArray]:
    """Drop the tags the buffer cannot hold; returns (kept, lost count, (k, 2) intervals)."""
    if len(batch) == 0:
        return batch, 0, np.zeros((0, 2), np.int64)
    bin_of = np.floor_divide(batch.time_ps, np.int64(cfg.bucket_bin_ps))
    starts = np.flatnonzero(np.concatenate(([True], bin_of[1:] != bin_of[:-1])))
    counts = np.diff(np.append(starts, bin_of.size)).astype(np.int64)
    bins = bin_of[starts]
    lost, state.level, state.drained_ps = _leaky_bucket(
        bins, counts, cfg.bucket_bin_ps, cfg.max_rate_hz * 1e-12, float(cfg.buffer_tags),
        state.level, state.drained_ps,
    )
    n_lost = int(lost.sum())
    if n_lost == 0:
        return batch, 0, np.zeros((0, 2), np.int64)
    rank = np.arange(bin_of.size, dtype=np.int64) - np.repeat(starts, counts)
    keep = rank < np.repeat(counts - lost, counts)
    hit = bins[lost > 0]
    intervals = np.stack([hit * cfg.bucket_bin_ps, (hit + 1) * cfg.bucket_bin_ps], axis=1)
    return batch.take(keep), n_lost, intervals


def merge_intervals(intervals: IntArray, start_ps: int, stop_ps: int) -> IntArray:
    """Clip ``[begin, end)`` intervals to the block and join touching ones."""
    if intervals.size == 0:
        return np.zeros((0, 2), np.int64)
    iv = np.clip(intervals, start_ps, stop_ps)
    iv = iv[iv[:, 1] > iv[:, 0]]
    if iv.shape[0] == 0:
        return np.zeros((0, 2), np.int64)
    new = np.concatenate(([True], iv[1:, 0] > iv[:-1, 1]))
    group = np.cumsum(new) - 1
    ends = np.zeros(int(group[-1]) + 1, np.int64)
    np.maximum.at(ends, group, iv[:, 1])
    return np.stack([iv[new, 0], ends], axis=1).astype(np.int64)
