"""Timing synchronisation: map Bob's time tags to Alice's pulse indices.

Two ways to find the tagger's view of Alice's clock (period ``T'`` in tagger ps, which
carries the tagger's frequency error, and the tag time of pulse 0 on each channel):

* **sync channel** — Alice's frame marker arrives every ``frame_pulses`` pulses on a
  tagger input; a straight-line fit of marker times gives ``T'`` directly.
* **qubit-based** (no sync channel; after Calderaro et al., PR Applied 13, 054041, 2020) —
  the period comes from the detections themselves: a periodogram around the nominal
  rate over a short stretch (±``max_ppm``), refined by unwrapping the detection phase
  over ever longer segments.

In both cases the fractional phase of each channel comes from the circular mean of its
detection phases, and the integer pulse offset from an FFT cross-correlation of the
detections with Alice's known pattern: a Z-arm click scores +1 when Alice sent the bit
that detector measures in Z and −1 for the other bit (likewise the X arm), vacuum
pulses score 0.  The correct offset stands out by ~0.66·√N for N detections; the
search fails loudly (:class:`SyncError`) when no peak is significant.

Times are int64 ps; periods and phases are float64 ps.  Everything is vectorised.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

SymbolFn = Callable[[npt.NDArray[np.int64]], tuple[npt.NDArray[np.int8], ...]]
"""Alice's record: pulse indices -> (basis, bit, intensity) arrays."""

TWO_PI = 2.0 * np.pi


class SyncError(RuntimeError):
    """Synchronisation could not be established (too few detections, no peak)."""


@dataclass(frozen=True)
class DetectorMap:
    """What each tagger channel measures: ``channel -> (basis, bit)``."""

    channels: dict[int, tuple[int, int]]

    @property
    def channel_list(self) -> list[int]:
        return sorted(self.channels)

    def basis_of(self, channel: npt.NDArray[np.int16]) -> npt.NDArray[np.int8]:
        lut = np.full(int(max(self.channels)) + 1, -1, dtype=np.int8)
        for ch, (basis, _) in self.channels.items():
            lut[ch] = basis
        return lut[channel]

    def detector_of(self, channel: npt.NDArray[np.int16]) -> npt.NDArray[np.int8]:
        """Index of each channel in :attr:`channel_list` (the detector number)."""
        lut = np.full(int(max(self.channels)) + 1, -1, dtype=np.int8)
        for i, ch in enumerate(self.channel_list):
            lut[ch] = i
        return lut[channel]


@dataclass(frozen=True)
class SyncSolution:
    """Tagger time of pulse ``n`` on channel ``c``: ``origin_ps + n·period_ps + delay_ps[c]``.

    Attributes:
        period_ps: pulse period on the tagger's timebase (ps).
        origin_ps: tagger time of pulse 0 on the reference (first) channel (ps).
        channel_delay_ps: extra delay of each channel relative to the reference (ps).
        nominal_period_ps: Alice's period on her own clock (ps).
        peak_sigma: significance of the offset correlation peak (σ of the noise).
    """

    period_ps: float
    origin_ps: float
    channel_delay_ps: dict[int, float]
    nominal_period_ps: float
    peak_sigma: float = float("nan")

    @property
    def drift_ppm(self) -> float:
        """Frequency error of the tagger relative to Alice (ppm; positive = tagger fast)."""
        return (self.period_ps / self.nominal_period_ps - 1.0) * 1e6

    def expected_time_ps(
        self, pulse_index: npt.NDArray[np.int64], channel: int
    ) -> npt.NDArray[np.float64]:
        """Tagger time (ps) at which pulse ``pulse_index`` is expected on ``channel``."""
        t = self.origin_ps + pulse_index * self.period_ps + self.channel_delay_ps[channel]
        return np.asarray(t, dtype=np.float64)


# -- period ---------------------------------------------------------------------------
def _phasor_power(times: npt.NDArray[np.float64], groups: npt.NDArray[np.int64],
                  n_groups: int, freqs: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Σ_groups |Σ_i exp(2πi f t_i)| for each trial frequency f (per-channel incoherent)."""
    power = np.zeros(freqs.size)
    for start in range(0, freqs.size, 64):
        f = freqs[start:start + 64]
        phase = np.exp(1j * TWO_PI * np.outer(f, times))  # (nf, ntags)
        sums = np.zeros((f.size, n_groups), dtype=np.complex128)
        for g in range(n_groups):
            sums[:, g] = phase[:, groups == g].sum(axis=1)
        power[start:start + 64] = np.abs(sums).sum(axis=1)
    return power


def estimate_period_from_detections(
    time_ps: npt.NDArray[np.int64],
    channel: npt.NDArray[np.int16],
    nominal_period_ps: float,
    max_ppm: float = 150.0,
    coarse_tags: int = 3000,
) -> float:
    """Pulse period on the tagger's timebase from detections alone (ps).

    A periodogram over the first ``coarse_tags`` detections finds the frequency to
    within a fraction of its peak width; phase unwrapping over segments of growing
    length then refines it using all detections.
    """
    if time_ps.size < 200:
        raise SyncError(f"qubit-based sync needs detections: got {time_ps.size} (< 200)")
    _, groups = np.unique(channel, return_inverse=True)
    n_groups = int(groups.max()) + 1
    t0 = time_ps[0]
    rel = (time_ps - t0).astype(np.float64)
    f_nom = 1.0 / nominal_period_ps
    head = min(coarse_tags, rel.size)
    span = rel[head - 1]
    if span <= 0:
        raise SyncError("detections span no time")
    # peak half-width 1/span; step a quarter of that
    step = 0.25 / span
    half = max_ppm * 1e-6 * f_nom
    freqs = f_nom + np.arange(-half, half + step, step)
    power = _phasor_power(rel[:head], groups[:head], n_groups, freqs)
    f = float(freqs[int(np.argmax(power))])
    # refine: segment phases must move by < 1/4 cycle per segment at the current error
    seg = span / 4.0
    total = rel[-1]
    while True:
        f = _refine_frequency(rel, groups, n_groups, f, seg)
        if seg >= total:
            break
        seg = min(seg * 8.0, total)
    return 1.0 / f


def _refine_frequency(rel: npt.NDArray[np.float64], groups: npt.NDArray[np.int64],
                      n_groups: int, f: float, seg: float) -> float:
    """One refinement: segment circular-mean phases, unwrapped, fitted by a line."""
    seg_index = (rel // seg).astype(np.int64)
    n_seg = int(seg_index[-1]) + 1
    if n_seg < 2:
        return f
    phasor = np.exp(1j * TWO_PI * f * rel)
    slope_num, slope_den = 0.0, 0.0
    for g in range(n_groups):
        sel = groups == g
        sums = np.bincount(seg_index[sel], weights=phasor[sel].real, minlength=n_seg) + 1j * \
            np.bincount(seg_index[sel], weights=phasor[sel].imag, minlength=n_seg)
        mid = (np.bincount(seg_index[sel], weights=rel[sel], minlength=n_seg)
               / np.maximum(np.bincount(seg_index[sel], minlength=n_seg), 1))
        ok = np.abs(sums) > 0
        if ok.sum() < 2:
            continue
        phase = np.unwrap(np.angle(sums[ok])) / TWO_PI  # cycles
        w = np.abs(sums[ok])
        x = mid[ok]
        xm = np.average(x, weights=w)
        ym = np.average(phase, weights=w)
        slope_num += float(np.sum(w * (x - xm) * (phase - ym)))
        slope_den += float(np.sum(w * (x - xm) ** 2))
    if slope_den == 0:
        return f
    # phase (cycles) grows as (f_true - f)·t with the sign of exp(+i 2π f t) mixing
    return f - slope_num / slope_den


def estimate_period_from_markers(
    marker_ps: npt.NDArray[np.int64], frame_pulses: int, nominal_period_ps: float,
    max_ppm: float = 150.0,
) -> tuple[float, float]:
    """Period (ps) and tagger time of the first marker from frame markers, by a line fit."""
    if marker_ps.size < 2:
        raise SyncError(f"sync channel: need at least 2 frame markers, got {marker_ps.size}")
    frame_ps = nominal_period_ps * frame_pulses
    rel = (marker_ps - marker_ps[0]).astype(np.float64)
    k = np.round(rel / frame_ps)
    if np.any(np.abs(rel - k * frame_ps) > max_ppm * 1e-6 * rel + 0.25 * frame_ps):
        raise SyncError("sync channel: markers are not on a frame grid (missing or spurious)")
    slope, intercept = np.polyfit(k, rel, 1)
    return float(slope / frame_pulses), float(marker_ps[0] + intercept)


# -- phase and offset ----------------------------------------------------------------
def channel_phases(time_ps: npt.NDArray[np.int64], channel: npt.NDArray[np.int16],
                   period_ps: float, t_ref: int, channels: Sequence[int]) -> dict[int, float]:
    """Circular-mean arrival phase of each channel, in ps within one period after t_ref."""
    out: dict[int, float] = {}
    for ch in channels:
        t = (time_ps[channel == ch] - t_ref).astype(np.float64)
        if t.size == 0:
            raise SyncError(f"no detections on channel {ch}")
        z = np.exp(1j * TWO_PI * t / period_ps).mean()
        out[ch] = float((np.angle(z) / TWO_PI) % 1.0 * period_ps)
    return out


def resolve_pulse_offset(
    pulse_number: npt.NDArray[np.int64],
    basis: npt.NDArray[np.int8],
    bit: npt.NDArray[np.int8],
    symbols: SymbolFn,
    search: tuple[int, int],
    min_sigma: float = 8.0,
) -> tuple[int, float]:
    """Integer K with pulse_index = pulse_number + K, by FFT cross-correlation.

    Args:
        pulse_number: each detection's pulse count relative to the local reference.
        basis, bit: what the detector of each detection measures.
        symbols: Alice's record.
        search: inclusive range of candidate K.
        min_sigma: required significance of the peak (robust noise σ).
    Returns:
        (K, significance in σ).
    """
    lo_k, hi_k = search
    n0 = int(pulse_number.min())
    span = int(pulse_number.max()) - n0 + 1
    n_lags = hi_k - lo_k + 1
    size = 1 << int(np.ceil(np.log2(span + n_lags)))
    idx = (pulse_number - n0).astype(np.int64)
    alice_idx = n0 + lo_k + np.arange(span + n_lags - 1, dtype=np.int64)
    a_basis, a_bit, a_int = symbols(alice_idx)[:3]
    # +1 / -1 for the bit a detector of that basis reads, 0 for vacuum; float32 keeps
    # the FFTs fast and is exact enough for sums of a few thousand ±1 terms
    sign = ((1 - 2 * a_bit.astype(np.float32)) * (a_int != 2)).astype(np.float32)
    score = np.zeros(n_lags)
    for b in (0, 1):
        sel = basis == b
        if not sel.any():
            continue
        det = np.zeros(size, dtype=np.float32)
        np.add.at(det, idx[sel], (1.0 - 2.0 * bit[sel]).astype(np.float32))
        ref = np.zeros(size, dtype=np.float32)
        ref[: alice_idx.size] = sign * (a_basis == b)
        corr = np.fft.irfft(np.conj(np.fft.rfft(det)) * np.fft.rfft(ref), size)
        score += corr[:n_lags]
    best = int(np.argmax(score))
    noise = np.delete(score, slice(max(best - 2, 0), best + 3))
    sigma = 1.4826 * float(np.median(np.abs(noise - np.median(noise)))) if noise.size else 0.0
    significance = (score[best] - float(np.median(noise))) / sigma if sigma > 0 else np.inf
    if significance < min_sigma:
        raise SyncError(
            f"no pulse offset found in [{lo_k}, {hi_k}]: best peak {significance:.1f} σ "
            f"(< {min_sigma} σ); widen the search or collect more detections"
        )
    return lo_k + best, float(significance)


# -- one-shot solution ---------------------------------------------------------------
def synchronise(
    time_ps: npt.NDArray[np.int64],
    channel: npt.NDArray[np.int16],
    detectors: DetectorMap,
    symbols: SymbolFn,
    nominal_period_ps: float,
    *,
    marker_channel: int | None = None,
    frame_pulses: int | None = None,
    max_ppm: float = 150.0,
    offset_search: tuple[int, int] = (-(1 << 19), 1 << 19),
    correlation_tags: int = 3000,
    window_ps: float | None = None,
) -> SyncSolution:
    """Find period, per-channel delays and pulse offset from one stretch of tags.

    Args:
        time_ps, channel: tags (all channels; non-detector channels are ignored except
            the marker channel).
        detectors: tagger channel -> (basis, bit) of each detector.
        symbols: Alice's record for any pulse indices.
        nominal_period_ps: Alice's pulse period on her own clock (ps).
        marker_channel, frame_pulses: use Alice's frame marker for the period.
        max_ppm: largest tagger frequency error searched (ppm).
        offset_search: candidate range of the integer pulse offset (pulses) relative to
            the first detection's pulse count; the default spans ±5 ms at 100 MHz.
        correlation_tags: detections used for the offset search (SNR ≈ 0.66·√N).
        window_ps: acceptance window of the final least-squares refinement
            (default: 40 % of the period).
    """
    det_mask = np.isin(channel, detectors.channel_list)
    t_det, c_det = time_ps[det_mask], channel[det_mask]
    if marker_channel is not None:
        if frame_pulses is None:
            raise ValueError("frame_pulses is needed with a marker channel")
        markers = time_ps[channel == marker_channel]
        period, _ = estimate_period_from_markers(markers, frame_pulses, nominal_period_ps,
                                                 max_ppm)
    else:
        period = estimate_period_from_detections(t_det, c_det, nominal_period_ps, max_ppm)
    t_ref = int(t_det[0])
    phases = channel_phases(t_det, c_det, period, t_ref, detectors.channel_list)
    ref_ch = detectors.channel_list[0]
    # delays relative to the reference channel, wrapped to (-T/2, T/2]
    delays = {ch: float((phases[ch] - phases[ref_ch] + period / 2) % period - period / 2)
              for ch in detectors.channel_list}
    origin_local = t_ref + phases[ref_ch]
    head = slice(0, min(correlation_tags, t_det.size))
    t_h, c_h = t_det[head], c_det[head]
    delay_arr = np.zeros(int(max(detectors.channels)) + 1)
    for ch, d in delays.items():
        delay_arr[ch] = d
    n_local = np.rint((t_h - origin_local - delay_arr[c_h]) / period).astype(np.int64)
    lut_basis = np.zeros(delay_arr.size, dtype=np.int8)
    lut_bit = np.zeros(delay_arr.size, dtype=np.int8)
    for ch, (b, v) in detectors.channels.items():
        lut_basis[ch], lut_bit[ch] = b, v
    k, sigma = resolve_pulse_offset(n_local, lut_basis[c_h], lut_bit[c_h], symbols,
                                    offset_search)
    origin = origin_local - k * period
    solution = SyncSolution(period_ps=period, origin_ps=origin, channel_delay_ps=delays,
                            nominal_period_ps=nominal_period_ps, peak_sigma=sigma)
    # final least-squares fit of period, origin and channel delays on every detection
    window = 0.4 * period if window_ps is None else window_ps
    for _ in range(2):
        solution = refine(solution, assign(t_det, c_det, solution, detectors, window),
                          detectors)
    return solution


def refine(solution: SyncSolution, assignment: Assignment,
           detectors: DetectorMap) -> SyncSolution:
    """Least-squares period and origin, then per-channel delays, from assigned detections."""
    return refine_rows(solution, assignment.pulse_index, assignment.detector,
                       assignment.residual_ps, detectors)


def refine_rows(solution: SyncSolution, pulse_index: npt.NDArray[np.int64],
                detector: npt.NDArray[np.int8], residual_ps: npt.NDArray[np.float64],
                detectors: DetectorMap) -> SyncSolution:
    """:func:`refine` on the arrays of an assignment (pulse, detector, residual per row).

    At most ~80 000 evenly spread rows enter the per-channel delay estimates (each
    channel's shift: the mean of its core residuals, see :func:`_median_and_limit`, or
    the median if the core is empty), at most 20 000 the period/origin fit
    (:func:`track`), so the cost does not grow with the count rate.  Medians are exact
    (bucket selection, :func:`_ranked_pair`) and the fit is ``np.polyfit``'s arithmetic
    (:func:`_line_fit`): the same numbers as the plain numpy formulation.
    """
    tracked = track_rows(solution, pulse_index, residual_ps)
    delays = dict(tracked.channel_delay_ps)
    ref_shift = 0.0
    chans = detectors.channel_list
    stride = max(1, detector.size // 80_000)
    sizes, medians, n_core, core = _robust_centre_parts(detector, residual_ps, stride,
                                                        len(chans), solution.period_ps / 2)
    start = 0
    for i, ch in enumerate(chans):
        if sizes[i] < 20:
            continue
        # the mean of the core (numpy's pairwise sum), else the median
        shift = float(np.mean(core[start:start + n_core[i]])) if n_core[i] else medians[i]
        start += n_core[i]
        if i == 0:
            ref_shift = shift
        delays[ch] = solution.channel_delay_ps[ch] + shift - ref_shift
    return replace(tracked, channel_delay_ps=delays)


@njit(cache=True)
def _ranked_pair(v: npt.NDArray[np.float64], k: int, centre: float, deviation: bool,
                 lo: float, hi: float) -> tuple[float, float]:
    """The k-th and (k+1)-th smallest (0-based; the second clipped to the last) of
    ``v``, or of ``|v − centre|`` with ``deviation``.

    Exact, in two passes: values are counted into equal-width buckets over [lo, hi]
    (outliers in the end buckets: a monotonic map, so bucket order is value order), and
    only the bucket(s) holding the two ranks are sorted.  ``lo``/``hi`` only steer the
    speed.
    """
    n = v.size
    k2 = min(k + 1, n - 1)
    n_buckets = max(16, min(4096, n // 8))
    scale = n_buckets / (hi - lo) if hi > lo else 0.0
    if not (0.0 < scale < np.inf):
        scale = 0.0  # one bucket: a plain sort
    top = float(n_buckets - 1)
    counts = np.zeros(n_buckets, np.int64)
    for x in v:
        y = abs(x - centre) if deviation else x
        counts[int(min(max((y - lo) * scale, 0.0), top))] += 1
    below = 0
    first = 0
    while below + counts[first] <= k:
        below += counts[first]
        first += 1
    last = first
    upto = below + counts[first]
    while upto <= k2:
        last += 1
        upto += counts[last]
    sel = np.empty(upto - below)
    m = 0
    for x in v:
        y = abs(x - centre) if deviation else x
        b = int(min(max((y - lo) * scale, 0.0), top))
        if first <= b <= last:
            sel[m] = y
            m += 1
    sel.sort()
    return sel[k - below], sel[k2 - below]


@njit(cache=True)
def _median_of(v: npt.NDArray[np.float64], centre: float, deviation: bool, lo: float,
               hi: float) -> float:
    """``np.median(v)`` (or of ``|v − centre|``) for a non-empty array without NaN, to
    the bit: the middle value, or the two middle values' sum halved."""
    a, b = _ranked_pair(v, (v.size - 1) >> 1, centre, deviation, lo, hi)
    return a if v.size & 1 else (a + b) / 2


@njit(cache=True)
def _median_and_limit(r: npt.NDArray[np.float64], half_period: float) -> tuple[float, float]:
    """Median of residuals ``r`` (mostly within ±half_period) and 3 robust σ
    (1.4826·MAD, 1 if that is 0): residuals closer to the median than that are the
    core, the rest (dark counts, afterpulses spread over the window) ignored."""
    med = _median_of(r, 0.0, False, -half_period, half_period)
    mad = 1.4826 * _median_of(r, med, True, 0.0, half_period + abs(med))
    if mad == 0.0:
        mad = 1.0
    return med, 3 * mad


@njit(cache=True)
def _robust_centre_parts(det: npt.NDArray[np.int8], residual: npt.NDArray[np.float64],
                         stride: int, n_det: int, half_period: float) -> tuple[Any, ...]:
    """Per detector, over every ``stride``-th row: row count, median and core residuals
    (within 3 robust σ of the median, in row order).

    The cores of the detectors with at least 20 rows follow one another in ``core``.
    """
    room = (det.size + stride - 1) // stride
    grouped = np.empty((n_det, room))
    sizes = np.zeros(n_det, np.int64)
    for j in range(0, det.size, stride):
        d = det[j]
        grouped[d, sizes[d]] = residual[j]
        sizes[d] += 1
    medians = np.zeros(n_det)
    n_core = np.zeros(n_det, np.int64)
    core = np.empty(room)
    out = 0
    for d in range(n_det):
        if sizes[d] < 20:
            continue
        r = grouped[d, :sizes[d]]
        med, limit = _median_and_limit(r, half_period)
        medians[d] = med
        for x in r:
            if abs(x - med) < limit:
                core[out] = x
                out += 1
                n_core[d] += 1
    return sizes, medians, n_core, core


# -- assignment and tracking -------------------------------------------------------------
@dataclass(frozen=True)
class Assignment:
    """Detections mapped to pulses.

    Attributes:
        pulse_index: pulse of each assigned detection (int64).
        detector: detector number (index into the detector map's channel list).
        residual_ps: tag time minus the expected time of its pulse (ps).
        unassigned: detections outside the acceptance window.
    """

    pulse_index: npt.NDArray[np.int64]
    detector: npt.NDArray[np.int8]
    residual_ps: npt.NDArray[np.float64]
    time_ps: npt.NDArray[np.int64]
    unassigned: int
    histogram: npt.NDArray[np.int64] | None = None


def _detector_tuples(solution: SyncSolution, detectors: DetectorMap
                     ) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Detector channels (in detector-number order) and their delays (ps), as tuples:
    the assignment kernel is compiled for the detector count."""
    chans = detectors.channel_list
    if chans[0] < 0:
        raise ValueError(f"detector channels must be >= 0, got {chans}")
    return (tuple(int(c) for c in chans),
            tuple(float(solution.channel_delay_ps.get(c, 0.0)) for c in chans))


def assign(time_ps: npt.NDArray[np.int64], channel: npt.NDArray[np.int16],
           solution: SyncSolution, detectors: DetectorMap, window_ps: float,
           histogram_bins: int = 0) -> Assignment:
    """Pulse index of every detection within ±window_ps/2 of its pulse's expected time.

    With ``histogram_bins`` > 0 the same pass also folds every detector tag on the
    period (``Assignment.histogram``: detectors × bins over [−T/2, T/2)).
    """
    det_ch, det_delay = _detector_tuples(solution, detectors)
    n = time_ps.size
    pulse = np.empty(n, np.int64)
    det = np.empty(n, np.int8)
    residual = np.empty(n, np.float64)
    kept = np.empty(n, np.int64)
    hist = np.zeros((len(det_ch), max(histogram_bins, 1)), np.int64)
    base = round(solution.origin_ps)
    k, unassigned, _, _, _ = _assign_kernel(
        time_ps, channel, det_ch, det_delay, base, solution.origin_ps - base,
        solution.period_ps, window_ps / 2, histogram_bins, pulse, det, residual, kept, hist,
        np.zeros(0, np.int64))
    return Assignment(pulse_index=pulse[:k], detector=det[:k], residual_ps=residual[:k],
                      time_ps=kept[:k], unassigned=int(unassigned),
                      histogram=hist if histogram_bins > 0 else None)


class AssignBuffers:
    """Output buffers reused frame after frame by :func:`assign_frame`.

    Fresh arrays the size of a frame cost a page fault per 4 KiB on first touch; these
    grow when a larger frame comes and are otherwise written in place.
    """

    def __init__(self) -> None:
        self.pulse = np.empty(0, np.int64)
        self.det = np.empty(0, np.int8)
        self.residual = np.empty(0, np.float64)
        self.counts = np.zeros(int(np.iinfo(np.int16).max) + 1, np.int64)
        self.sorted_pulse = np.empty(0, np.int64)
        self.sorted_det = np.empty(0, np.int8)

    def reserve(self, n: int) -> None:
        if self.pulse.size < n:
            size = max(n, self.pulse.size + self.pulse.size // 4)
            self.pulse = np.empty(size, np.int64)
            self.det = np.empty(size, np.int8)
            self.residual = np.empty(size, np.float64)
            self.sorted_pulse = np.empty(size, np.int64)
            self.sorted_det = np.empty(size, np.int8)


def sort_rows(pulse_index: npt.NDArray[np.int64], detector: npt.NDArray[np.int8],
              buffers: AssignBuffers
              ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]]:
    """Rows ordered by pulse, ties in their original order (a stable sort).

    Tags arrive in time order, so rows are out of pulse order only where channel delays
    swap neighbouring pulses: an insertion sort restores that in one pass (into
    ``buffers``, valid until their next use); a badly shuffled input falls back to a
    merge sort.
    """
    n = pulse_index.size
    buffers.reserve(n)
    out_pulse, out_det = buffers.sorted_pulse[:n], buffers.sorted_det[:n]
    if _insertion_sort(pulse_index, detector, out_pulse, out_det, 8 * n + 64):
        return out_pulse, out_det
    order = np.argsort(pulse_index, kind="stable")
    return pulse_index[order], detector[order]


@njit(cache=True)
def _insertion_sort(pulse: npt.NDArray[np.int64], det: npt.NDArray[np.int8],
                    out_pulse: npt.NDArray[np.int64], out_det: npt.NDArray[np.int8],
                    max_moves: int) -> bool:
    """Stable insertion sort of (pulse, det) rows by pulse into ``out_*``; False (and
    ``out_*`` unusable) once more than ``max_moves`` rows had to move."""
    moves = 0
    for i in range(pulse.size):
        p = pulse[i]
        d = det[i]
        j = i
        while j > 0 and out_pulse[j - 1] > p:
            out_pulse[j] = out_pulse[j - 1]
            out_det[j] = out_det[j - 1]
            j -= 1
        moves += i - j
        if moves > max_moves:
            return False
        out_pulse[j] = p
        out_det[j] = d
    return True


@dataclass(frozen=True)
class FrameAssignment:
    """One frame's tags mapped to pulses (arrays are views into reused buffers).

    Attributes:
        pulse_index, detector, residual_ps: per assigned detection, in tag order.
        unassigned: detector tags outside the acceptance window.
        before_start: assigned detections of pulses before pulse 0 (index < 0).
        in_pulse_order: the pulse indices never decrease.
        histogram: detectors × bins, every detector tag folded on the period.
        channel_counts: tags per channel (every channel >= 0 present in the block).
    """

    pulse_index: npt.NDArray[np.int64]
    detector: npt.NDArray[np.int8]
    residual_ps: npt.NDArray[np.float64]
    unassigned: int
    before_start: int
    in_pulse_order: bool
    histogram: npt.NDArray[np.int64]
    channel_counts: dict[int, int]


def assign_frame(time_ps: npt.NDArray[np.int64], channel: npt.NDArray[np.int16],
                 solution: SyncSolution, detectors: DetectorMap, window_ps: float,
                 histogram_bins: int, buffers: AssignBuffers) -> FrameAssignment:
    """:func:`assign` for the frame loop: the same pass also counts tags per channel.

    The arrays returned are valid until the next call with the same ``buffers``.
    """
    if channel.dtype != np.int16:
        raise TypeError(f"channel must be int16 (a TagBlock's), got {channel.dtype}")
    if histogram_bins < 1:
        raise ValueError(f"histogram_bins must be >= 1, got {histogram_bins}")
    det_ch, det_delay = _detector_tuples(solution, detectors)
    buffers.reserve(time_ps.size)
    counts = buffers.counts  # all zero between calls
    hist = np.zeros((len(det_ch), histogram_bins), np.int64)
    base = round(solution.origin_ps)
    k, unassigned, before, ordered, top = _assign_kernel(
        time_ps, channel, det_ch, det_delay, base, solution.origin_ps - base,
        solution.period_ps, window_ps / 2, histogram_bins, buffers.pulse, buffers.det,
        buffers.residual, _NO_TIMES, hist, counts)
    seen = counts[:top]
    present = np.flatnonzero(seen)
    channel_counts = {int(c): int(seen[c]) for c in present}
    seen[:] = 0
    return FrameAssignment(
        pulse_index=buffers.pulse[:k], detector=buffers.det[:k],
        residual_ps=buffers.residual[:k], unassigned=int(unassigned),
        before_start=int(before), in_pulse_order=bool(ordered), histogram=hist,
        channel_counts=channel_counts)


_NO_TIMES = np.zeros(0, np.int64)


_CHUNK = 256
"""Tags per step of the assignment kernel: its arithmetic runs as SIMD over a chunk,
then a scalar pass folds and compacts the chunk while it is in L1."""


@njit(cache=True)
def _assign_kernel(t: npt.NDArray[np.int64], ch: npt.NDArray[np.integer],
                   det_ch: tuple[int, ...], det_delay: tuple[float, ...], base: int,
                   frac: float, period: float, half_window: float, bins: int,
                   pulse: npt.NDArray[np.int64], det: npt.NDArray[np.int8],
                   residual: npt.NDArray[np.float64], kept: npt.NDArray[np.int64],
                   hist: npt.NDArray[np.int64], counts: npt.NDArray[np.int64]
                   ) -> tuple[int, int, int, bool, int]:
    """Nearest pulse, residual, window test and folded histogram of every tag.

    A tag on detector channel ``det_ch[d]`` at time t lies x = t − base − frac −
    det_delay[d] ps after pulse 0; its pulse is m = ⌊x/T + ½⌋, its residual x − m·T, its
    histogram bin ⌊(x/T + ½ − m)·bins⌋.  Assigned rows (|residual| <= half_window) go
    to ``pulse``/``det``/``residual`` (the tag time to ``kept`` unless it is empty);
    ``hist`` (detectors × max(bins, 1)) gets every detector tag when bins > 0;
    ``counts[c]`` (unless empty) counts the tags of every channel c >= 0.  Returns
    (rows, detector tags outside the window, rows with pulse < 0, whether the rows'
    pulses never decrease, 1 + the largest channel counted).
    """
    n = t.size
    n_det = len(det_ch)
    n_bins = max(bins, 1)
    fbins = float(bins)
    other = n_det * n_bins  # histogram slot of non-detector tags
    flat = np.zeros(other + 1, np.int64)
    keep_time = kept.size > 0
    count = counts.size > 0
    rs = np.empty(_CHUNK)
    ms = np.empty(_CHUNK, np.int64)
    hs = np.empty(_CHUNK, np.int64)
    ds = np.empty(_CHUNK, np.int8)
    oks = np.empty(_CHUNK, np.bool_)
    k = 0
    top = 0  # 1 + the largest channel counted
    for start in range(0, n, _CHUNK):
        tt = t[start:start + _CHUNK]
        cc = ch[start:start + _CHUNK]
        others = 0
        for j in range(tt.size):  # branch-free: compiles to SIMD
            c = cc[j]
            delay = 0.0
            d = -1
            for e in range(n_det):
                if c == det_ch[e]:
                    delay = det_delay[e]
                    d = e
            x = float(tt[j] - base) - frac - delay
            q = x / period
            m = np.floor(q + 0.5)
            r = x - m * period
            rs[j] = r
            ms[j] = np.int64(m)
            in_bin = np.int64((q + 0.5 - m) * fbins)
            in_bin = in_bin if in_bin < n_bins else np.int64(n_bins - 1)
            hs[j] = d * n_bins + in_bin if d >= 0 else other
            ds[j] = d
            oks[j] = (d >= 0) & (abs(r) <= half_window)
            others += d < 0
        for j in range(tt.size):
            flat[hs[j]] += 1
        if count and others:
            for j in range(tt.size):
                if ds[j] < 0 and cc[j] >= 0:
                    counts[cc[j]] += 1
                    top = max(top, cc[j] + 1)
        if keep_time:
            for j in range(tt.size):  # compaction, branch-free
                pulse[k] = ms[j]
                det[k] = ds[j]
                residual[k] = rs[j]
                kept[k] = tt[j]
                k += oks[j]
        else:
            for j in range(tt.size):  # compaction, branch-free
                pulse[k] = ms[j]
                det[k] = ds[j]
                residual[k] = rs[j]
                k += oks[j]
    before = 0
    ordered = True
    for i in range(k):
        before += pulse[i] < 0
        if i > 0 and pulse[i] < pulse[i - 1]:
            ordered = False
    detector_tags = 0
    for d in range(n_det):
        row = 0
        for b in range(n_bins):
            row += flat[d * n_bins + b]
            if bins > 0:
                hist[d, b] = flat[d * n_bins + b]
        detector_tags += row
        if count and row:
            counts[det_ch[d]] += row
            top = max(top, det_ch[d] + 1)
    return k, detector_tags - k, before, ordered, top


def track(solution: SyncSolution, assignment: Assignment, gain: float = 1.0,
          max_points: int = 20_000) -> SyncSolution:
    """Update period and origin from one frame's residuals (drift tracking).

    A weighted line fit of residual against pulse index gives the period and origin
    corrections; ``gain`` < 1 smooths them over frames.  At most ``max_points`` evenly
    spread detections enter the fit (20 000 already pin the offset to ~1 ps at 100 ps
    jitter), so its cost does not grow with the count rate.
    """
    return track_rows(solution, assignment.pulse_index, assignment.residual_ps, gain,
                      max_points)


def track_rows(solution: SyncSolution, pulse_index: npt.NDArray[np.int64],
               residual_ps: npt.NDArray[np.float64], gain: float = 1.0,
               max_points: int = 20_000) -> SyncSolution:
    """:func:`track` on the arrays of an assignment."""
    if pulse_index.size < 50:
        return solution
    stride = max(1, pulse_index.size // max_points)
    # robust: ignore the tails (dark counts, afterpulses spread over the window)
    x, y = _fit_points(pulse_index, residual_ps, stride, solution.period_ps / 2)
    if x.size < 50:
        return solution
    slope, intercept = _line_fit(x, y)
    return replace(
        solution,
        period_ps=solution.period_ps + gain * slope,
        origin_ps=solution.origin_ps + gain * intercept,
    )


@njit(cache=True)
def _fit_points(pulse: npt.NDArray[np.int64], residual: npt.NDArray[np.float64],
                stride: int, half_period: float
                ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Every ``stride``-th row within 3 robust σ of the median residual: (pulse, residual)."""
    r = residual[::stride].copy()
    med, limit = _median_and_limit(r, half_period)
    x = np.empty(r.size)
    y = np.empty(r.size)
    k = 0
    for j in range(r.size):
        if abs(r[j] - med) < limit:
            x[k] = float(pulse[j * stride])
            y[k] = r[j]
            k += 1
    return x[:k], y[:k]


def _line_fit(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> tuple[float, float]:
    """``np.polyfit(x, y, 1)`` (slope, intercept), without its generic overhead.

    The same arithmetic: columns x and 1 scaled by their norms (the sums of squares
    accumulated in order, as numpy's column sum does), LAPACK least squares, rescaled.
    """
    scale = np.array([math.sqrt(_sum_squares(x)), math.sqrt(float(x.size))])
    lhs = np.empty((x.size, 2))
    np.divide(x, scale[0], out=lhs[:, 0])
    lhs[:, 1] = 1.0 / scale[1]
    coef, _, rank, _ = np.linalg.lstsq(lhs, y, rcond=x.size * np.finfo(np.float64).eps)
    if rank != 2:
        warnings.warn("Polyfit may be poorly conditioned", np.exceptions.RankWarning,
                      stacklevel=2)
    coef = coef / scale
    return float(coef[0]), float(coef[1])


@njit(cache=True)
def _sum_squares(x: npt.NDArray[np.float64]) -> float:
    """Σ x², accumulated in index order."""
    s = 0.0
    for v in x:
        s += v * v
    return s
