"""Per-frame BB84 processing: tags -> pulse indices -> Alice's record -> sifted counts.

Pure computation (no instrument, no dataset): the live run and the offline
``qkdlab reprocess`` feed the same :class:`FrameProcessor` the same blocks and get the
same numbers, bit for bit (the only randomness, squashing of multi-clicks, comes
from a generator seeded by the run seed and the frame index).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from qkdlab.experiments.bb84.sync import (
    AssignBuffers,
    DetectorMap,
    SyncError,
    SyncSolution,
    assign_frame,
    refine_rows,
    sort_rows,
    synchronise,
)
from qkdlab.patterns import bb84_symbols, symbol_constants
from qkdlab.protocol.keyrate import DecoyBounds, gllp_rate, three_intensity_decoy_bounds
from qkdlab.protocol.sifting import (
    N_INTENSITIES,
    SiftedStore,
    SiftResult,
    sift,
    sift_pattern,
)
from qkdlab.tags import TagBlock

RecordFn = Callable[[npt.NDArray[np.int64]], tuple[npt.NDArray[np.int8], ...]]


@dataclass(frozen=True)
class BB84Settings:
    """What Alice sends and how Bob's tags are processed.

    Attributes:
        rep_rate_hz: Alice's pulse rate (Hz).
        p_z: probability of the Z basis; p_signal, p_decoy: intensity-class
            probabilities (vacuum takes the rest).
        mu_signal, mu_decoy, mu_vacuum: mean photon numbers of the three classes, as
            calibrated (the estimation trusts them; a modulator's finite extinction
            leaves the "vacuum" class slightly above 0, and the bounds account for it).
        frame_pulses: pulses between Alice's frame markers.
        use_sync_channel: find the clock from the marker channel (else from qubits).
        window_ps: acceptance window around each pulse (ps); None: 40 % of the period.
        max_ppm: largest tagger frequency error searched (ppm).
        max_skew_periods: largest difference of channel delays resolved by the sync,
            in whole pulse periods (delays may differ by up to this + ½ periods).
        sync_detections: detections gathered before synchronising.
        abort_qber: a QBER above this in either basis aborts the run (no key).
        seed: Alice's pattern seed, also seeds multi-click squashing.
    """

    rep_rate_hz: float = 100e6
    p_z: float = 0.5
    p_signal: float = 0.7
    p_decoy: float = 0.2
    mu_signal: float = 0.5
    mu_decoy: float = 0.1
    mu_vacuum: float = 0.0
    frame_pulses: int = 2**20
    use_sync_channel: bool = True
    window_ps: float | None = None
    max_ppm: float = 150.0
    max_skew_periods: int = 32
    sync_detections: int = 20_000
    abort_qber: float = 0.11
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.rep_rate_hz > 0, f"rep_rate_hz must be > 0 Hz, got {self.rep_rate_hz}"),
            (0 < self.p_z < 1, f"p_z must lie in (0, 1), got {self.p_z}"),
            (0 < self.p_signal < 1, f"p_signal must lie in (0, 1), got {self.p_signal}"),
            (0 < self.p_decoy < 1, f"p_decoy must lie in (0, 1), got {self.p_decoy}"),
            (self.p_signal + self.p_decoy < 1,
             f"p_signal + p_decoy must be < 1 (vacuum needs a share), got "
             f"{self.p_signal + self.p_decoy}"),
            (0 <= self.mu_vacuum < self.mu_decoy
             and self.mu_decoy + self.mu_vacuum < self.mu_signal,
             f"need 0 <= mu_vacuum < mu_decoy and mu_decoy + mu_vacuum < mu_signal, got "
             f"{self.mu_signal}, {self.mu_decoy}, {self.mu_vacuum}"),
            (0 < self.abort_qber <= 0.5, f"abort_qber must lie in (0, 0.5], got {self.abort_qber}"),
            (self.frame_pulses >= 1, f"frame_pulses must be >= 1, got {self.frame_pulses}"),
            (self.max_skew_periods >= 0,
             f"max_skew_periods must be >= 0 periods, got {self.max_skew_periods}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def period_ps(self) -> float:
        return 1e12 / self.rep_rate_hz

    @property
    def intensity_probs(self) -> tuple[float, float, float]:
        return (self.p_signal, self.p_decoy, 1.0 - self.p_signal - self.p_decoy)

    @property
    def acceptance_ps(self) -> float:
        return 0.4 * self.period_ps if self.window_ps is None else self.window_ps


@dataclass
class FrameStats:
    """Results of one frame (one TagBlock)."""

    frame: int
    start_ps: int
    stop_ps: int
    pulses: int
    counts: dict[int, int]
    detected: list[int]
    sifted: list[list[int]]
    errors: list[list[int]]
    unassigned: int
    before_start: int
    overflow: bool
    lost_tags: int
    sync_period_ps: float
    sync_origin_ps: float
    sync_drift_ppm: float
    histogram: list[list[int]] = field(default_factory=list)
    """Detections per detector folded on the pulse period: HISTOGRAM_BINS bins over
    [−T/2, T/2) around each pulse's expected time (the acceptance window is ±W/2)."""

    @property
    def duration_s(self) -> float:
        return (self.stop_ps - self.start_ps) * 1e-12

    def rate_cps(self, channel: int) -> float:
        """Tags per second on a channel in this frame."""
        return self.counts.get(channel, 0) / self.duration_s if self.duration_s > 0 else 0.0

    def qber(self, basis: int) -> float:
        n = sum(self.sifted[basis])
        return sum(self.errors[basis]) / n if n else math.nan

    def gain(self, intensity: int, probs: tuple[float, float, float]) -> float:
        sent = self.pulses * probs[intensity]
        return self.detected[intensity] / sent if sent else math.nan

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunTotals:
    """Counts accumulated over a run, and the Z-basis raw keys for post-processing."""

    pulses: int = 0
    frames: int = 0
    detected: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(3, np.int64))
    sifted: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros((2, 3), np.int64))
    errors: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros((2, 3), np.int64))
    counts: dict[int, int] = field(default_factory=dict)
    unassigned: int = 0
    before_start: int = 0
    lost_tags: int = 0
    overflow_frames: int = 0
    # sifted bits of both bases, in pulse order (never printed: raw key material)
    sifted_pulse: list[npt.NDArray[np.int64]] = field(default_factory=list, repr=False)
    sifted_basis: list[npt.NDArray[np.int8]] = field(default_factory=list, repr=False)
    sifted_intensity: list[npt.NDArray[np.int8]] = field(default_factory=list, repr=False)
    sifted_alice: list[npt.NDArray[np.uint8]] = field(default_factory=list, repr=False)
    sifted_bob: list[npt.NDArray[np.uint8]] = field(default_factory=list, repr=False)

    def add(self, stats: FrameStats) -> None:
        self.frames += 1
        self.pulses += stats.pulses
        self.detected += np.asarray(stats.detected)
        self.sifted += np.asarray(stats.sifted)
        self.errors += np.asarray(stats.errors)
        for ch, n in stats.counts.items():
            self.counts[ch] = self.counts.get(ch, 0) + n
        self.unassigned += stats.unassigned
        self.before_start += stats.before_start
        self.lost_tags += stats.lost_tags
        self.overflow_frames += int(stats.overflow)

    def qber(self, basis: int, intensity: int | None = None) -> float:
        if intensity is None:
            n, e = self.sifted[basis].sum(), self.errors[basis].sum()
        else:
            n, e = self.sifted[basis, intensity], self.errors[basis, intensity]
        return float(e / n) if n else math.nan

    def qber_intensity(self, intensity: int) -> float:
        n = self.sifted[:, intensity].sum()
        return float(self.errors[:, intensity].sum() / n) if n else math.nan

    def gain(self, intensity: int, probs: tuple[float, float, float]) -> float:
        sent = self.pulses * probs[intensity]
        return float(self.detected[intensity] / sent) if sent else math.nan

    def sifted_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """Every sifted bit of the run: pulse, basis, intensity, Alice's and Bob's bit."""
        def cat(parts: list[npt.NDArray[Any]], dtype: Any) -> npt.NDArray[Any]:
            return np.concatenate(parts) if parts else np.zeros(0, dtype)

        return {"pulse": cat(self.sifted_pulse, np.int64),
                "basis": cat(self.sifted_basis, np.int8),
                "intensity": cat(self.sifted_intensity, np.int8),
                "alice": cat(self.sifted_alice, np.uint8),
                "bob": cat(self.sifted_bob, np.uint8)}

    def raw_key(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
        """Alice's and Bob's Z-basis sifted bits over the run, in pulse order."""
        arrays = self.sifted_arrays()
        z = arrays["basis"] == 0
        return arrays["alice"][z], arrays["bob"][z]


HISTOGRAM_BINS = 100
PATTERN_PROBE_ROWS = 1024
"""Detections on which Alice's record must agree with the settings' pattern before the
pattern is computed inside the sifting pass instead of looked up."""


class FrameProcessor:
    """Turns consecutive TagBlocks into frame results.

    Blocks are buffered until ``settings.sync_detections`` detections allow the
    timing to be found, then every buffered and later block is processed in order.
    Drift is tracked frame by frame.

    Per frame: one compiled pass assigns the tags to pulses (with the folded histogram
    and the per-channel counts), one sifts them.  Alice's record is looked up through
    ``record`` until a frame shows that it is the settings' pseudo-random pattern (the
    same symbols at ``PATTERN_PROBE_ROWS`` or more detected pulses, as on the mock bench
    and for ``qkdlab reprocess``); from then on the sifting pass computes each pulse's
    symbol itself (``pattern_lookup=False`` keeps the look-up).  Either way the results
    are the same.
    """

    def __init__(self, settings: BB84Settings, detectors: DetectorMap, record: RecordFn,
                 marker_channel: int | None = None, max_buffered_blocks: int = 64,
                 pattern_lookup: bool = True) -> None:
        self.settings = settings
        self.detectors = detectors
        self.record = record
        self.marker_channel = marker_channel if settings.use_sync_channel else None
        self.max_buffered = max_buffered_blocks
        self.solution: SyncSolution | None = None
        self.totals = RunTotals()
        self._pending: list[TagBlock] = []
        self._pending_detections = 0
        self._frame = 0
        self._det_channels = np.asarray(detectors.channel_list, dtype=np.int16)
        chans = detectors.channel_list
        self._det_basis = np.array([detectors.channels[ch][0] for ch in chans], np.int8)
        self._det_bit = np.array([detectors.channels[ch][1] for ch in chans], np.int8)
        self._pattern = symbol_constants(settings.seed, settings.p_z, settings.p_signal,
                                         settings.p_decoy)
        # None: not yet known whether ``record`` is the settings' pattern
        self.record_is_pattern: bool | None = None if pattern_lookup else False
        self._buffers = AssignBuffers()
        self._store = SiftedStore()

    def feed(self, block: TagBlock) -> list[FrameStats]:
        """Process one block; the frames completed by it (none while not yet synced)."""
        if self.solution is None:
            self._pending.append(block)
            self._pending_detections += int(np.isin(block.channel, self._det_channels).sum())
            if (self._pending_detections < self.settings.sync_detections
                    and len(self._pending) < self.max_buffered):
                return []
            self._synchronise()
            pending, self._pending = self._pending, []
            return [self._process(b) for b in pending]
        return [self._process(block)]

    def flush(self) -> list[FrameStats]:
        """At the end of a run: sync on whatever was gathered and process it."""
        if self.solution is None and self._pending:
            self._synchronise()
            pending, self._pending = self._pending, []
            return [self._process(b) for b in pending]
        return []

    def _synchronise(self) -> None:
        blocks = self._pending
        times = np.concatenate([b.time_ps for b in blocks])
        channels = np.concatenate([b.channel for b in blocks])
        s = self.settings
        self.solution = synchronise(
            times, channels, self.detectors, self.record, s.period_ps,
            marker_channel=self.marker_channel, frame_pulses=s.frame_pulses,
            max_ppm=s.max_ppm, window_ps=s.acceptance_ps, max_skew_periods=s.max_skew_periods,
        )

    def _process(self, block: TagBlock) -> FrameStats:
        if self.solution is None:  # pragma: no cover - guarded by feed()
            raise SyncError("not synchronised")
        s = self.settings
        sol = self.solution
        result = assign_frame(block.time_ps, block.channel, sol, self.detectors,
                              s.acceptance_ps, HISTOGRAM_BINS, self._buffers)
        pulse_index, detector = result.pulse_index, result.detector
        if result.before_start:
            started = pulse_index >= 0
            pulse_index, detector = pulse_index[started], detector[started]
        if not result.in_pulse_order:
            pulse_index, detector = sort_rows(pulse_index, detector, self._buffers)
        sifted = self._sift(pulse_index, detector, np.random.default_rng([s.seed, self._frame]))
        self.totals.sifted_pulse.append(sifted.pulse_index)
        self.totals.sifted_basis.append(sifted.basis)
        self.totals.sifted_intensity.append(sifted.intensity)
        self.totals.sifted_alice.append(sifted.alice_bit)
        self.totals.sifted_bob.append(sifted.bob_bit)
        stats = FrameStats(
            frame=self._frame, start_ps=block.start_ps, stop_ps=block.stop_ps,
            pulses=self._pulses_in(block, sol), counts=result.channel_counts,
            detected=[int(x) for x in sifted.detected[:N_INTENSITIES]],
            sifted=sifted.sifted.tolist(), errors=sifted.errors.tolist(),
            unassigned=result.unassigned, before_start=result.before_start,
            overflow=block.overflow, lost_tags=block.lost_tags,
            sync_period_ps=sol.period_ps, sync_origin_ps=sol.origin_ps,
            sync_drift_ppm=sol.drift_ppm, histogram=result.histogram.tolist(),
        )
        self.totals.add(stats)
        self._frame += 1
        # follow the clock: refit period/origin and channel delays on this frame
        if result.pulse_index.size >= 200:
            self.solution = refine_rows(sol, result.pulse_index, result.detector,
                                        result.residual_ps, self.detectors)
        return stats

    def _sift(self, pulse_index: npt.NDArray[np.int64], detector: npt.NDArray[np.int8],
              rng: np.random.Generator) -> SiftResult:
        """Sift one frame's started detections (sorted by pulse)."""
        if self.record_is_pattern:
            return sift_pattern(pulse_index, detector, self._pattern, self._det_basis,
                                self._det_bit, rng, self._store)
        basis, bit, intensity = self.record(pulse_index)[:3]
        if self.record_is_pattern is None and pulse_index.size >= PATTERN_PROBE_ROWS:
            s = self.settings
            mine = bb84_symbols(s.seed, pulse_index, s.p_z, s.p_signal, s.p_decoy)
            self.record_is_pattern = all(
                np.array_equal(a, b) for a, b in zip(mine, (basis, bit, intensity),
                                                      strict=True))
        return sift(pulse_index, detector, basis, bit, intensity, self._det_basis,
                    self._det_bit, rng)

    @staticmethod
    def _pulses_in(block: TagBlock, sol: SyncSolution) -> int:
        """Pattern pulses (index >= 0) whose light falls in the block's stretch."""
        first = math.ceil((block.start_ps - sol.origin_ps) / sol.period_ps)
        stop = math.ceil((block.stop_ps - sol.origin_ps) / sol.period_ps)
        return max(0, stop - max(first, 0))


@dataclass(frozen=True)
class Estimate:
    """Parameter estimation over a whole run (asymptotic decoy analysis)."""

    gains: tuple[float, float, float]
    qber_z: float
    qber_x: float
    qber_by_intensity: tuple[float, float, float]
    bounds: DecoyBounds | None
    key_rate_per_pulse: float
    aborted: bool
    abort_reason: str | None


def _or_half(qber: float) -> float:
    """A class with no sifted bits has no measured error rate: assume random (1/2)."""
    return 0.5 if math.isnan(qber) else qber


def estimate(totals: RunTotals, settings: BB84Settings, f_ec: float = 1.16) -> Estimate:
    """Gains, QBERs, decoy bounds and the asymptotic GLLP rate; abort checks."""
    probs = settings.intensity_probs
    gains = (totals.gain(0, probs), totals.gain(1, probs), totals.gain(2, probs))
    qz, qx = totals.qber(0), totals.qber(1)
    per_intensity = (totals.qber_intensity(0), totals.qber_intensity(1),
                     totals.qber_intensity(2))
    reason = None
    bounds = None
    rate = 0.0
    if totals.sifted.sum() == 0:
        reason = "no sifted bits (no light reached Bob, or sync found nothing)"
    elif not (qz <= settings.abort_qber and qx <= settings.abort_qber):
        reason = (f"QBER above the abort threshold {settings.abort_qber:.1%}: "
                  f"Z {qz:.2%}, X {qx:.2%}")
    else:
        q_mu, q_nu, q_vac = gains
        bounds = three_intensity_decoy_bounds(
            (settings.mu_signal, settings.mu_decoy, settings.mu_vacuum), (q_mu, q_nu, q_vac),
            (per_intensity[1] * q_nu, _or_half(per_intensity[2]) * q_vac))
        if not bounds.consistent:
            reason = (f"decoy bounds inconsistent: Y1 lower bound {bounds.y1_lower:.3g}, "
                      f"e1 upper bound {bounds.e1_upper:.3g}")
        else:
            q = settings.p_z**2  # key from Z-basis matches (efficient BB84 when p_z > 1/2)
            rate = gllp_rate(q, q_mu, per_intensity[0], bounds.q1_lower, bounds.e1_upper, f_ec)
            if rate <= 0:
                reason = "no positive key rate at these gains and error rates"
    return Estimate(gains=gains, qber_z=qz, qber_x=qx, qber_by_intensity=per_intensity,
                    bounds=bounds, key_rate_per_pulse=rate, aborted=reason is not None,
                    abort_reason=reason)
