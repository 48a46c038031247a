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
    tracked = track(solution, assignment)
    delays = dict(tracked.channel_delay_ps)
    ref_shift = 0.0
    stride = max(1, assignment.detector.size // 80_000)
    det = assignment.detector[::stride]
    res = assignment.residual_ps[::stride]
    for i, ch in enumerate(detectors.channel_list):
        r = res[det == i]
        if r.size < 20:
            continue
        shift = _robust_centre(r)
        if i == 0:
            ref_shift = shift
        delays[ch] = solution.channel_delay_ps[ch] + shift - ref_shift
    return replace(tracked, channel_delay_ps=delays)


def _robust_centre(r: npt.NDArray[np.float64]) -> float:
    """Mean of the central part of a residual distribution (ignores flat background)."""
    med = float(np.median(r))
    mad = 1.4826 * float(np.median(np.abs(r - med))) or 1.0
    core = np.abs(r - med) < 3 * mad
    return float(np.mean(r[core])) if core.any() else med


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


def assign(time_ps: npt.NDArray[np.int64], channel: npt.NDArray[np.int16],
           solution: SyncSolution, detectors: DetectorMap, window_ps: float,
           histogram_bins: int = 0) -> Assignment:
    """Pulse index of every detection within ±window_ps/2 of its pulse's expected time.

    With ``histogram_bins`` > 0 the same pass also folds every detector tag on the
    period (``Assignment.histogram``: detectors × bins over [−T/2, T/2)).
    """
    chans = detectors.channel_list
    size = max(int(max(chans)) + 1, 1)
    lut_delay = np.zeros(size)
    lut_det = np.full(size, -1, dtype=np.int8)
    for i, ch in enumerate(chans):
        lut_delay[ch] = solution.channel_delay_ps.get(ch, 0.0)
        lut_det[ch] = i
    base = round(solution.origin_ps)
    pulse, det, residual, kept, hist, unassigned = _assign_kernel(
        time_ps, channel.astype(np.int64), lut_delay, lut_det, base,
        solution.origin_ps - base, solution.period_ps, window_ps / 2, len(chans),
        histogram_bins)
    return Assignment(pulse_index=pulse, detector=det, residual_ps=residual, time_ps=kept,
                      unassigned=int(unassigned), histogram=hist)


@njit(cache=True)
def _assign_kernel(t: npt.NDArray[np.int64], ch: npt.NDArray[np.int64],
                   lut_delay: npt.NDArray[np.float64], lut_det: npt.NDArray[np.int8],
                   base: int, frac: float, period: float, half_window: float,
                   n_det: int, bins: int) -> tuple[Any, ...]:
    """One pass: nearest pulse, residual, window test and folded histogram per tag."""
    n = t.size
    pulse = np.empty(n, np.int64)
    det = np.empty(n, np.int8)
    residual = np.empty(n, np.float64)
    kept = np.empty(n, np.int64)
    hist = np.zeros((n_det, max(bins, 1)), np.int64)
    k = 0
    outside = 0
    for i in range(n):
        c = ch[i]
        if c < 0 or c >= lut_det.size or lut_det[c] < 0:
            continue
        d = lut_det[c]
        x = float(t[i] - base) - frac - lut_delay[c]
        q = x / period
        m = np.floor(q + 0.5)
        r = x - m * period
        if bins > 0:
            b = int((q + 0.5 - np.floor(q + 0.5)) * bins)
            hist[d, min(b, bins - 1)] += 1
        if abs(r) <= half_window:
            pulse[k] = np.int64(m)
            det[k] = d
            residual[k] = r
            kept[k] = t[i]
            k += 1
        else:
            outside += 1
    return pulse[:k], det[:k], residual[:k], kept[:k], hist, outside


def track(solution: SyncSolution, assignment: Assignment, gain: float = 1.0,
          max_points: int = 20_000) -> SyncSolution:
    """Update period and origin from one frame's residuals (drift tracking).

    A weighted line fit of residual against pulse index gives the period and origin
    corrections; ``gain`` < 1 smooths them over frames.  At most ``max_points`` evenly
    spread detections enter the fit (20 000 already pin the offset to ~1 ps at 100 ps
    jitter), so its cost does not grow with the count rate.
    """
    if assignment.pulse_index.size < 50:
        return solution
    stride = max(1, assignment.pulse_index.size // max_points)
    n = assignment.pulse_index[::stride].astype(np.float64)
    r = assignment.residual_ps[::stride]
    # robust: ignore the tails (dark counts, afterpulses spread over the window)
    med = float(np.median(r))
    mad = 1.4826 * float(np.median(np.abs(r - med))) or 1.0
    core = np.abs(r - med) < 3 * mad
    if core.sum() < 50:
        return solution
    slope, intercept = np.polyfit(n[core], r[core], 1)
    return replace(
        solution,
        period_ps=solution.period_ps + gain * float(slope),
        origin_ps=solution.origin_ps + gain * float(intercept),
    )
