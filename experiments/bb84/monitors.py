"""Detector monitors: per-frame checks that catch detector blinding during a BB84 run.

In the blinding attack (Lydersen et al., Nat. Photon. 4, 686 (2010)) bright CW light
holds Bob's APDs below breakdown (linear mode) and Eve's bright faked states make them
click only when Bob's basis matches hers: Eve holds the key and the QBER stays low, so
the QBER check does not see it.  What does show (each a monitor here):

* :class:`BiasCurrentMonitor` — a blinded APD conducts a continuous photocurrent far
  above anything Geiger-mode operation can draw;
* :class:`DarkCountMonitor` — blinded detectors have no dark counts and no afterpulses:
  the detections outside the acceptance window vanish;
* :class:`DoubleClickMonitor` — Eve can suppress the double clicks the channel's
  coherent states must produce (or, if careless, cause far too many).

Each monitor is a :class:`~qkdlab.experiments.bb84.monitoring.FrameMonitor` for
``run_bb84(..., monitors=...)``: ``check(stats, detectors)`` gets a frame's
:class:`~qkdlab.experiments.bb84.processing.FrameStats` and the readings the run polled
from the detector units (name → ``{"count_rate_cps": ..., ...}``); a string is an alarm
(the run aborts with that reason, no key).

Statistics.  The counting checks test Poisson counts against a *lower bound* of their
honest mean (or an upper bound, for the upper tail), with the Chernoff bound of the tail
probability, ``P(N ≤ n) ≤ exp(n − λ − n·ln(n/λ))`` for ``n < λ`` (and the same
expression for ``P(N ≥ n)``, ``n > λ``): a conservative p-value, so the false-alarm
probability is at most the level used.  Each monitor spends its run false-alarm budget
``alpha`` over its checks as ``α_k = α·6/(π²·k²)`` (k = 1, 2, …; Σ α_k = α), so a run
of any length raises a false alarm with probability ≤ ``alpha`` per monitor.  Frames
that lost tags (tagger overflow) are skipped by the counting checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from qkdlab.experiments.bb84.monitoring import FrameMonitor, Readings
from qkdlab.experiments.bb84.processing import BB84Settings, FrameStats
from qkdlab.experiments.bb84.sync import DetectorMap

DEFAULT_ALPHA = 1e-6
"""Default false-alarm budget of one monitor over a whole run."""

BIAS_CURRENT_KEY = "bias_current_a"
"""Reading of a current monitor on a detector's bias line (A)."""

DEFAULT_AVALANCHE_CHARGE_C = 1e-12
"""Charge of one avalanche (C): the pC order of InGaAs SPADs (a datasheet figure; not a
calibration).  Used when the station does not give its detectors' value."""

CALIBRATION_SIGMAS = 5.0
"""Calibrated values enter the dark-count monitor this many σ towards fewer counts."""

SHORTEST_DEAD_TIME_S = 22e-9
"""Shortest dead time among the detectors of shared/PHYSICS.md (Si SPAD, 22 ns): the
Geiger-mode current bound when no detector calibration gives the dead time."""


def poisson_tail_bound(observed: float, mean: float) -> float:
    """Chernoff bound of the Poisson tail from ``observed`` away from ``mean``.

    ``P(N ≤ n)`` for ``n < λ`` and ``P(N ≥ n)`` for ``n > λ``, both bounded by
    ``exp(n − λ − n·ln(n/λ))``; 1 at ``n = λ``.  Exact for n = 0.
    """
    n, lam = float(observed), float(mean)
    if lam <= 0.0:
        return 1.0 if n <= 0 else 0.0
    if n <= 0.0:
        return math.exp(-lam)
    if n == lam:
        return 1.0
    return min(1.0, math.exp(n - lam - n * math.log(n / lam)))


def spent_alpha(alpha: float, k: int) -> float:
    """False-alarm level of the k-th check (k ≥ 1): ``α·6/(π²·k²)``, summing to α."""
    return alpha * 6.0 / (math.pi**2 * k * k)


def _detector_counts(stats: FrameStats, detectors: DetectorMap) -> dict[int, int]:
    """Tags per detector channel in the frame."""
    return {ch: int(stats.counts.get(ch, 0)) for ch in detectors.channel_list}


# -- (a) bias current --------------------------------------------------------------------
@dataclass
class BiasCurrentMonitor:
    """Alarm when a detector's bias current exceeds what Geiger mode can draw.

    A SPAD in Geiger mode passes one avalanche charge Q per click and clicks at most
    once per dead time τ, so its mean current is at most Q/τ (plus a dark current of
    nA).  A larger current means the diode conducts continuously — a photocurrent in
    linear mode, which is what blinding light causes (Lydersen et al. 2010; monitoring
    the photocurrent is among the countermeasures Yuan, Dynes and Shields discuss in
    their reply, Nat. Photon. 4, 800 (2010)).

    Threshold: ``threshold_a`` (A), normally from :meth:`from_geiger_limit` with the
    calibrated dead time (detector calibration record, ``dead_time_s_ch<n>``) and the
    detectors' avalanche charge (datasheet).  Readings come from the run's detector
    polling under the key :data:`BIAS_CURRENT_KEY`; a frame without any such reading
    gets no verdict (:attr:`frames_with_readings` tells whether the monitor ever saw
    one).  A reading is a measurement, not a count: no statistics are applied beyond
    the factor ``margin`` between the bound and the threshold.
    """

    threshold_a: float
    key: str = BIAS_CURRENT_KEY
    frames_with_readings: int = 0

    def __post_init__(self) -> None:
        if not self.threshold_a > 0:
            raise ValueError(f"threshold_a must be > 0 A, got {self.threshold_a}")

    @classmethod
    def from_geiger_limit(cls, dead_time_s: float,
                          avalanche_charge_c: float = DEFAULT_AVALANCHE_CHARGE_C,
                          margin: float = 2.0) -> BiasCurrentMonitor:
        """Threshold ``margin``·Q/τ: above the Geiger-mode ceiling by ``margin``."""
        if not dead_time_s > 0:
            raise ValueError(f"dead_time_s must be > 0 s, got {dead_time_s}")
        if not avalanche_charge_c > 0:
            raise ValueError(f"avalanche_charge_c must be > 0 C, got {avalanche_charge_c}")
        if not margin >= 1:
            raise ValueError(f"margin must be >= 1, got {margin}")
        return cls(threshold_a=margin * avalanche_charge_c / dead_time_s)

    def check(self, stats: FrameStats, detectors: Readings) -> str | None:
        """An alarm naming the detector with the largest bias current, if above threshold."""
        del stats
        currents = {name: readings[self.key] for name, readings in detectors.items()
                    if math.isfinite(readings.get(self.key, math.nan))}
        if not currents:
            return None
        self.frames_with_readings += 1
        name, current = max(currents.items(), key=lambda item: item[1])
        if current <= self.threshold_a:
            return None
        return (f"detector blinding suspected: {name} bias current {current * 1e6:.4g} µA "
                f"above the Geiger-mode limit {self.threshold_a * 1e6:.4g} µA "
                "(photocurrent monitor)")


# -- (b) dark counts -----------------------------------------------------------------------
@dataclass
class DarkCountMonitor:
    """Alarm when too few detections fall outside the acceptance window.

    Honest detectors click outside the window from dark counts and afterpulses; blinded
    ones (linear mode) have neither.  Lower bound of the honest mean per frame, summed
    over detector channels c:

        λ = f·Δt·(1 − W/T)·Σ_c (d_c + p_c·r_c)·max(0, 1 − r_c·τ_c)

    with d_c the calibrated dark-count rate, p_c the afterpulse probability per click,
    τ_c the dead time (detector calibration record: ``dark_cps_ch<n>``,
    ``afterpulse_prob_ch<n>``, ``dead_time_s_ch<n>``), r_c the frame's tag rate, W/T the
    acceptance window over the period and Δt the frame length.  Afterpulses fall
    uniformly in the period (their delay, µs, ≫ the period); 1 − r·τ is the fraction of
    time a non-paralysable detector is live.  Photon clicks whose jitter leaves the
    window only add to the honest count.  ``model_factor`` (0.9) covers the
    approximations (afterpulses lost in the dead time of later clicks, the live fraction
    of a pulsed rather than Poisson input): on the bench at 0–100 km the honest count
    came out at 0.96–1.13 × the unscaled λ (four 0.2 s frames per point, two seeds).

    Two tests per frame (each at half the spent level): this frame's count against its
    λ, and the run's cumulative count against the cumulative λ (slow dark rates).
    """

    settings: BB84Settings
    detectors: DetectorMap
    dark_cps: Mapping[int, float]
    dead_time_s: Mapping[int, float]
    afterpulse_prob: Mapping[int, float] = field(default_factory=dict)
    alpha: float = DEFAULT_ALPHA
    model_factor: float = 0.9
    checks: int = 0
    observed_total: int = 0
    expected_total: float = 0.0

    def __post_init__(self) -> None:
        for ch in self.detectors.channel_list:
            for name, table in (("dark_cps", self.dark_cps), ("dead_time_s", self.dead_time_s)):
                if ch not in table:
                    raise ValueError(f"{name} has no value for detector channel {ch}")
            if not self.dark_cps[ch] >= 0 or not self.dead_time_s[ch] >= 0:
                raise ValueError(f"channel {ch}: dark_cps and dead_time_s must be >= 0")
            if not 0 <= self.afterpulse_prob.get(ch, 0.0) <= 1:
                raise ValueError(f"channel {ch}: afterpulse_prob must lie in [0, 1]")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if not 0 < self.model_factor <= 1:
            raise ValueError(f"model_factor must lie in (0, 1], got {self.model_factor}")

    def expected_outside(self, stats: FrameStats) -> float:
        """λ: lower bound of the honest mean of detections outside the window."""
        outside = max(0.0, 1.0 - self.settings.acceptance_ps / self.settings.period_ps)
        total = 0.0
        for ch in self.detectors.channel_list:
            rate = stats.rate_cps(ch)
            live = max(0.0, 1.0 - rate * self.dead_time_s[ch])
            total += (self.dark_cps[ch] + self.afterpulse_prob.get(ch, 0.0) * rate) * live
        return self.model_factor * total * outside * stats.duration_s

    def check(self, stats: FrameStats, detectors: Readings) -> str | None:
        """Alarm when the outside-window count is implausibly low for honest detectors."""
        del detectors
        if stats.overflow or stats.lost_tags:
            return None
        lam = self.expected_outside(stats)
        self.checks += 1
        self.observed_total += stats.unassigned
        self.expected_total += lam
        level = spent_alpha(self.alpha, self.checks) / 2
        for observed, mean, what in ((stats.unassigned, lam, "this frame"),
                                     (self.observed_total, self.expected_total, "this run")):
            if observed < mean and poisson_tail_bound(observed, mean) < level:
                return (f"detector blinding suspected: {observed} detections outside the "
                        f"acceptance window in {what}, dark counts and afterpulses predict "
                        f">= {mean:.1f} (p < {level:.1e}; dark-count monitor)")
        return None


# -- (c) double clicks ---------------------------------------------------------------------
@dataclass
class DoubleClickMonitor:
    """Alarm when the frame's multi-click pulses disagree with the channel's prediction.

    Observed: detections assigned to started pulses minus the pulses detected, i.e.
    ``Σ_c counts_c − unassigned − before_start − Σ_k detected_k`` (one per double click).
    Predicted from the same frame: with coherent states the photon numbers reaching
    different detectors are independent Poisson variables, and a basis arm's total
    click probability does not depend on Alice's polarization.  Per intensity class k
    (N_k pulses, D_k detected), arm b receives a click with probability a_b = ρ_b·x_k,
    ρ_b the arm's share of the tags and x_k solving ``1 − Π_b(1 − ρ_b·x) = D_k/N_k``:

        λ = Σ_k N_k·[Σ_{b<b'} a_b·a_b' + Σ_b (1 − π_b)·(1 − √(1 − a_b))²]

    (clicks in two arms, and both detectors of arm b when Alice's basis is not b, which
    splits the arm's light evenly; π_b is Alice's probability of basis b).  The
    matched-basis pair (misalignment leak) is left out.  Dead time and dark counts act
    through the measured D_k and ρ_b.  ``tolerance`` is the model's relative accuracy:
    the lower test uses (1 − tol)·λ, the upper (1 + tol)·λ; blinding with Eve avoiding
    double clicks gives none at all, a careless Eve far too many.  On the bench (honest,
    0–25 km, both splitters, λ = 800–4500 per 0.2 s frame) the observed count came out at
    1.00–1.03 × λ, the excess being the matched-basis pairs left out.
    """

    settings: BB84Settings
    detectors: DetectorMap
    alpha: float = DEFAULT_ALPHA
    tolerance: float = 0.2
    checks: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must lie in [0, 1), got {self.tolerance}")

    def observed(self, stats: FrameStats) -> int:
        """Extra clicks on pulses that had more than one (one per double click)."""
        assigned = sum(_detector_counts(stats, self.detectors).values()) - stats.unassigned
        return max(0, assigned - stats.before_start - sum(stats.detected))

    def expected(self, stats: FrameStats) -> float:
        """λ: the channel's mean number of double-click pulses in this frame."""
        counts = _detector_counts(stats, self.detectors)
        per_basis: dict[int, list[int]] = {}
        for ch, (basis, _bit) in self.detectors.channels.items():
            per_basis.setdefault(basis, []).append(counts[ch])
        total = sum(counts.values())
        if total == 0:
            return 0.0
        shares = {b: sum(n) / total for b, n in per_basis.items()}
        pi = {0: self.settings.p_z, 1: 1.0 - self.settings.p_z}
        lam = 0.0
        for k, prob in enumerate(self.settings.intensity_probs):
            n_k = stats.pulses * prob
            if n_k <= 0 or stats.detected[k] <= 0:
                continue
            x = _click_scale(min(stats.detected[k] / n_k, 1.0), list(shares.values()))
            a = {b: shares[b] * x for b in shares}
            bases = sorted(a)
            cross = sum(a[b] * a[c] for i, b in enumerate(bases) for c in bases[i + 1:])
            same = sum((1.0 - pi[b]) * (1.0 - math.sqrt(max(0.0, 1.0 - min(a[b], 1.0)))) ** 2
                       for b in bases if len(per_basis[b]) >= 2)
            lam += n_k * (cross + same)
        return lam

    def check(self, stats: FrameStats, detectors: Readings) -> str | None:
        """Alarm when double clicks are far below or far above the prediction."""
        del detectors
        if stats.overflow or stats.lost_tags:
            return None
        lam = self.expected(stats)
        seen = self.observed(stats)
        self.checks += 1
        level = spent_alpha(self.alpha, self.checks) / 2
        low, high = (1.0 - self.tolerance) * lam, (1.0 + self.tolerance) * lam
        if seen < low and poisson_tail_bound(seen, low) < level:
            return (f"detector blinding suspected: {seen} double clicks in this frame, the "
                    f"channel predicts {lam:.1f} (p < {level:.1e}; double-click monitor)")
        if seen > high and poisson_tail_bound(seen, high) < level:
            return (f"detector control suspected: {seen} double clicks in this frame, the "
                    f"channel predicts {lam:.1f} (p < {level:.1e}; double-click monitor)")
        return None


def _click_scale(detected_fraction: float, shares: list[float]) -> float:
    """x with ``1 − Π_b(1 − s_b·x) = detected_fraction`` (bisection; x ≥ the fraction)."""
    if detected_fraction <= 0:
        return 0.0
    hi = 1.0 / max(shares)
    lo = 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        none = 1.0
        for s in shares:
            none *= 1.0 - s * mid
        if 1.0 - none < detected_fraction:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def default_monitors(settings: BB84Settings, detectors: DetectorMap,
                     calibration: Mapping[str, tuple[float, float]] | None = None, *,
                     alpha: float = DEFAULT_ALPHA,
                     avalanche_charge_c: float = DEFAULT_AVALANCHE_CHARGE_C,
                     ) -> list[FrameMonitor]:
    """The monitors a run has by default, thresholds from the detector calibration.

    ``calibration``: the detector calibration record's quantities by name, as (value,
    1σ uncertainty) — ``dark_cps_ch<n>``, ``dead_time_s_ch<n>``,
    ``afterpulse_prob_ch<n>`` — or None.  The dark-count monitor takes each at
    :data:`CALIBRATION_SIGMAS` σ on the side that lowers its honest prediction (fewer
    dark counts and afterpulses, longer dead time), so a calibration that is off by
    chance does not raise false alarms.

    In this order (the first alarm of a frame is the run's reason):

    * :class:`BiasCurrentMonitor` — always; threshold 2·Q/τ with the shortest calibrated
      dead time, or :data:`SHORTEST_DEAD_TIME_S` without a record (it acts only where
      the detector units report a bias current);
    * :class:`DarkCountMonitor` — only with calibrated dark counts and dead times for
      every detector channel: without them there is no honest reference;
    * :class:`DoubleClickMonitor` — always (it predicts from the frame itself).
    """
    cal = dict(calibration or {})
    channels = detectors.channel_list
    k = CALIBRATION_SIGMAS

    def bound(name: str, sign: float, lo: float, hi: float) -> dict[int, float]:
        out = {}
        for ch in channels:
            if f"{name}_ch{ch}" in cal:
                value, sigma = cal[f"{name}_ch{ch}"]
                sigma = sigma if math.isfinite(sigma) else 0.0
                out[ch] = min(hi, max(lo, value + sign * k * sigma))
        return out

    dead = bound("dead_time_s", +1.0, 0.0, math.inf)
    dark = bound("dark_cps", -1.0, 0.0, math.inf)
    shortest = min((cal[f"dead_time_s_ch{ch}"][0] for ch in dead
                    if cal[f"dead_time_s_ch{ch}"][0] > 0), default=SHORTEST_DEAD_TIME_S)
    monitors: list[FrameMonitor] = [
        BiasCurrentMonitor.from_geiger_limit(shortest, avalanche_charge_c)]
    if len(dead) == len(dark) == len(channels):
        afterpulse = bound("afterpulse_prob", -1.0, 0.0, 1.0)
        monitors.append(DarkCountMonitor(settings, detectors, dark, dead, afterpulse,
                                         alpha=alpha))
    monitors.append(DoubleClickMonitor(settings, detectors, alpha=alpha))
    return monitors
