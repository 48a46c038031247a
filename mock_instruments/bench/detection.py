"""Detector clicks: exact thinning of candidate pulses, dark counts, dead time, afterpulses.

Coherent-state exactness: a coherent state split into modes gives independent Poisson
photon numbers, so detector d clicks on pulse i with probability 1 − exp(−m_d),
independently of the other detectors, where m_d = μ_k·T_ch·η_bob·q_arm·P_d(state)·η_d.

Cost scales with detections: per basis arm, candidate pulses are drawn as a Bernoulli
process with the arm's largest click probability p_max (geometric gaps), then thinned
exactly with one uniform u per candidate against the cumulative conditional
probabilities (a only, b only, both) / p_max.  Dark counts are a Poisson count with
uniform times.  The non-paralysable dead time with afterpulsing is a sequential scan
(numba) whose state carries across calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
F32Array = npt.NDArray[np.float32]
I8Array = npt.NDArray[np.int8]
BoolArray = npt.NDArray[np.bool_]

ORIGIN_PHOTON = 0
ORIGIN_DARK = 1
ORIGIN_AFTERPULSE = 2
ORIGIN_MARKER = 3
NO_PULSE = -1
NEVER_PS = -(2**62)  # "last click" of a detector that never clicked (ps)
PENDING_CAPACITY = 4096  # afterpulses waiting at once per detector (ample: τ_ap ≪ rate⁻¹)


@dataclass(frozen=True)
class Events:
    """Detector-side events, sorted by true time (ps): time, origin and pulse index."""

    time_ps: IntArray
    origin: I8Array
    pulse_index: IntArray

    @classmethod
    def empty(cls) -> Events:
        """No events."""
        return cls(
            np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int64)
        )

    def __len__(self) -> int:
        return int(self.time_ps.size)

    def take(self, sel: slice | IntArray | BoolArray) -> Events:
        """Subset of the events (slice, index or mask)."""
        return Events(self.time_ps[sel], self.origin[sel], self.pulse_index[sel])

    def sorted(self) -> Events:
        """The events sorted by time (stable; a no-op check when already sorted)."""
        t = self.time_ps
        if t.size < 2 or bool(np.all(t[1:] >= t[:-1])):
            return self
        return self.take(np.argsort(t, kind="stable"))


# ---------------------------------------------------------------- candidates and thinning


def draw_candidates(rng: np.random.Generator, first: int, stop: int, p: float) -> IntArray:
    """Indices in ``[first, stop)`` of a Bernoulli(p) process, drawn by geometric gaps."""
    n = stop - first
    if n <= 0 or p <= 0.0:
        return np.zeros(0, dtype=np.int64)
    if p >= 1.0:
        return np.arange(first, stop, dtype=np.int64)
    scale = -1.0 / math.log1p(-p)  # gap − 1 = floor(E·scale) ~ Geometric₀(p), E ~ Exp(1)
    parts: list[IntArray] = []
    last = first - 1
    while True:
        remaining = (stop - 1 - last) * p
        k = int(remaining + 6.0 * math.sqrt(remaining) + 16.0)
        pos = rng.standard_exponential(k)
        pos *= scale
        np.floor(pos, out=pos)
        pos += 1.0
        np.cumsum(pos, out=pos)  # integer-valued floats: exact below 2⁵³ (chunks are ≪)
        cut = int(np.searchsorted(pos, float(stop - last), side="left"))
        idx = pos[:cut].astype(np.int64)
        idx += last
        parts.append(idx)
        if cut < k:
            break
        last = int(idx[-1])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass(frozen=True)
class ArmTable:
    """Click probabilities of one basis arm, tabulated per (drift step, state, class).

    ``r1, r2, r3`` are the cumulative conditional probabilities P(a only),
    P(a only) + P(b only), P(any click) divided by ``p_max`` (float32, flat index
    ``(step·4 + state)·3 + class``).
    """

    det_a: int
    det_b: int
    p_max: float
    r1: F32Array
    r2: F32Array
    r3: F32Array


def arm_table(
    det_a: int, det_b: int, mean_a: FloatArray, mean_b: FloatArray
) -> ArmTable:
    """Tabulate an arm from the mean photon numbers reaching detectors a and b.

    ``mean_a``/``mean_b`` have shape (steps, 4 states, 3 classes) and already include
    efficiency, so P(click) = 1 − exp(−m).
    """
    pa = -np.expm1(-mean_a)
    pb = -np.expm1(-mean_b)
    c1 = pa * (1.0 - pb)
    c3 = -np.expm1(-(mean_a + mean_b))
    c2 = np.minimum(c1 + pb * (1.0 - pa), c3)
    p_max = float(c3.max()) if c3.size else 0.0
    scale = 1.0 / p_max if p_max > 0 else 0.0
    return ArmTable(
        det_a,
        det_b,
        p_max,
        (c1 * scale).astype(np.float32).ravel(),
        (c2 * scale).astype(np.float32).ravel(),
        (c3 * scale).astype(np.float32).ravel(),
    )


def thin_candidates(
    rng: np.random.Generator, table: ArmTable, index: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Exact thinning: 0/1 flags of candidates on which detector a / detector b click.

    One uniform u per candidate: u < r1 → a only; r1 ≤ u < r2 → b only;
    r2 ≤ u < r3 → both; u ≥ r3 → no click.
    """
    u = rng.random(index.size, dtype=np.float32)
    r1 = np.take(table.r1, index)
    r2 = np.take(table.r2, index)
    r3 = np.take(table.r3, index)
    below3 = u < r3
    click_b = u >= r1
    click_b &= below3
    click_a = u >= r2
    click_a &= below3
    click_a |= u < r1
    return click_a.view(np.uint8), click_b.view(np.uint8)


def dark_count_times(
    rng: np.random.Generator, rate_cps: float, start_ps: int, stop_ps: int
) -> IntArray:
    """Sorted dark-count times (ps) in ``[start_ps, stop_ps)``: Poisson count, uniform times."""
    if rate_cps <= 0.0 or stop_ps <= start_ps:
        return np.zeros(0, dtype=np.int64)
    n = int(rng.poisson(rate_cps * (stop_ps - start_ps) * 1e-12))
    times = rng.integers(start_ps, stop_ps, size=n, dtype=np.int64)
    times.sort()
    return times


def truncated_normal(
    rng: np.random.Generator, n: int, sigma: float, bound: float = 8.0
) -> F32Array:
    """N(0, σ²) samples clipped at ±bound·σ (float32; clipping mass 1e-15 at 8σ)."""
    z = rng.standard_normal(n, dtype=np.float32)
    np.clip(z, -bound, bound, out=z)
    z *= np.float32(sigma)
    return z


# ---------------------------------------------------------------- dead time and afterpulses

JITTER_BOUND = 8.0  # detector and tagger jitter are N(0, σ²) clipped at ±8σ (mass 1e-15)
BUFFER_CAPACITY = 4096  # resolved photons waiting in the scan (those within ±8σ of the front)


@dataclass(frozen=True)
class PhotonStream:
    """Photon clicks of one detector: the candidates of its arm where ``clicks`` is set.

    Candidates are sorted pulse indices; nominal time of pulse i is
    ``s0 + base_rel + (i − p0)·period`` (ps).  The true click time adds the detector
    jitter N(0, σ²) clipped at ±8σ, drawn only when it can matter.
    """

    pulse: IntArray
    clicks: npt.NDArray[np.uint8]
    p0: int
    base_rel_ps: float
    period_ps: float
    sigma_ps: float

    @classmethod
    def empty(cls) -> PhotonStream:
        """No photons."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.uint8), 0, 0.0, 1.0, 0.0)

    def nominal_rel(self, pulses: IntArray) -> FloatArray:
        """Nominal times (ps, relative to the window start s0) of some clicked pulses."""
        rel = np.subtract(pulses, self.p0, dtype=np.float64)
        rel *= self.period_ps
        rel += self.base_rel_ps
        return rel


@numba.njit(cache=True)
def _next_exact(
    o_t: IntArray, j: int, pend: IntArray, n_pend: int, bt: IntArray, n_b: int
) -> tuple[int, int, int]:
    """Earliest exact event: (time, source 0 other / 1 afterpulse / 2 buffer, pending slot)."""
    big = np.int64(2**62)
    t_star = o_t[j] if j < o_t.size else big
    src = 0
    slot = -1
    for q in range(n_pend):
        if pend[q] < t_star:
            t_star = pend[q]
            src = 1
            slot = q
    if n_b > 0 and bt[n_b - 1] < t_star:
        t_star = bt[n_b - 1]
        src = 2
    return int(t_star), src, slot


@numba.njit(cache=True)
def _buffer_insert(bt: IntArray, bp: IntArray, n_b: int, t: int, pulse: int) -> None:
    """Insert into the buffer kept in descending time order (ties: first in, first out)."""
    i = n_b
    while i > 0 and bt[i - 1] <= t:
        bt[i] = bt[i - 1]
        bp[i] = bp[i - 1]
        i -= 1
    bt[i] = t
    bp[i] = pulse


@numba.njit(cache=True)
def _bounds(ph: IntArray, ph_geom: FloatArray, k: int, s0: int) -> tuple[int, int]:
    """Conservative (lo, hi) of photon k's click time (ps): nominal ± (8σ + 1) ± 1."""
    rel = ph_geom[1] + (ph[k] - ph_geom[0]) * ph_geom[2]
    lo = s0 + np.int64(np.floor(rel - ph_geom[4])) - 1
    hi = s0 + np.int64(np.ceil(rel + ph_geom[4])) + 1
    return int(lo), int(hi)


@numba.njit(cache=True)
def _skip_dead(ph: IntArray, ph_geom: FloatArray, k: int, s0: int, limit: int) -> int:
    """First photon from k whose window is not wholly below ``limit`` (hi ≥ limit or lo ≥ limit).

    Photons k… are known to start after the last click; those with hi < ``limit`` =
    min(next exact event, end of dead time) are rejected whatever their jitter.  Both
    bounds grow with k, so gallop then bisect.
    """
    n = ph.size
    step = 1
    good = k  # photon ``good`` is known to be skippable
    bad = n
    while good + step < n:
        lo, hi = _bounds(ph, ph_geom, good + step, s0)
        if hi < limit and lo < limit:
            good += step
            step *= 2
        else:
            bad = good + step
            break
    while bad - good > 1:
        mid = (good + bad) // 2
        lo, hi = _bounds(ph, ph_geom, mid, s0)
        if hi < limit and lo < limit:
            good = mid
        else:
            bad = mid
    return good + 1


@numba.njit(cache=True)
def _dead_time_scan(
    ph: IntArray, ph_on: npt.NDArray[np.uint8], ph_geom: FloatArray, k: int,
    o_t: IntArray, o_o: I8Array, o_p: IntArray, j: int,
    s0: int, t_end: int, dead: int, p_ap: float, tau_ap: float,
    last: int, pend: IntArray, n_pend: int, bt: IntArray, bp: IntArray, n_b: int,
    z: FloatArray, u: FloatArray, e: FloatArray,
    out_t: IntArray, out_o: I8Array, out_p: IntArray,
) -> tuple[int, int, int, int, int, int, int]:
    """Non-paralysable dead time with afterpulsing, merging three sorted sources.

    Sources: photon clicks (candidates ``ph`` where ``ph_on``) with nominal times
    (``ph_geom`` = p0, base_rel, period, σ, bound), exact other events (carry and dark
    counts) and pending afterpulses.  A run of photons whose time windows [lo, hi] lie
    wholly inside the current dead time is rejected without drawing their jitter (their
    exact times cannot matter); any other photon gets its jitter from ``z`` and waits,
    exact, in the buffer ``bt/bp``.  An exact event is taken only once no unresolved
    photon can precede it.  An accepted click draws u and, if u < p_ap, schedules an
    afterpulse at t + dead + E·τ_ap.

    Returns (k, j, n_out, last, n_pend, n_b, status): status 0 done, 1 a pool ran short
    (call again with fresh pools), 2 a fixed buffer is full.
    """
    p0, base_rel, period, sigma, bound = ph_geom[0], ph_geom[1], ph_geom[2], ph_geom[3], ph_geom[4]
    big = np.int64(2**62)
    n_ph = ph.size
    n_out = 0
    nz = 0
    nu = 0
    ne = 0
    while True:
        t_star, src, slot = _next_exact(o_t, j, pend, n_pend, bt, n_b)
        lo = big
        rel = 0.0
        while k < n_ph and ph_on[k] == 0:
            k += 1  # a candidate of the arm on which this detector did not click
        if k < n_ph:
            rel = base_rel + (ph[k] - p0) * period
            lo = s0 + np.int64(np.floor(rel - bound)) - 1
        if t_star >= t_end and lo >= t_end:
            return k, j, n_out, last, n_pend, n_b, 0
        if lo < t_star:
            hi = s0 + np.int64(np.ceil(rel + bound)) + 1
            if dead > 0 and lo >= last and hi < last + dead:
                # certainly inside the dead time, whatever the jitter: skip the whole run
                k = _skip_dead(ph, ph_geom, k, s0, min(t_star, last + dead))
                continue
            if nz >= z.size:
                return k, j, n_out, last, n_pend, n_b, 1
            if n_b >= bt.size:
                return k, j, n_out, last, n_pend, n_b, 2
            jit = min(max(z[nz], -8.0), 8.0) * sigma
            nz += 1
            _buffer_insert(bt, bp, n_b, int(s0 + np.int64(np.rint(rel + jit))), int(ph[k]))
            n_b += 1
            k += 1
            continue
        if n_out >= out_t.size or (p_ap > 0.0 and (nu >= u.size or ne >= e.size)):
            return k, j, n_out, last, n_pend, n_b, 1
        if src == 0:
            origin = o_o[j]
            pidx = o_p[j]
            j += 1
        elif src == 1:
            origin = np.int8(2)
            pidx = np.int64(-1)
            n_pend -= 1
            pend[slot] = pend[n_pend]
        else:
            origin = np.int8(0)
            pidx = bp[n_b - 1]
            n_b -= 1
        if t_star - last < dead:
            continue
        out_t[n_out] = t_star
        out_o[n_out] = origin
        out_p[n_out] = pidx
        n_out += 1
        last = t_star
        if p_ap > 0.0:
            x = u[nu]
            nu += 1
            if x < p_ap:
                if n_pend >= pend.size:
                    return k, j, n_out, last, n_pend, n_b, 2
                pend[n_pend] = t_star + dead + np.int64(np.rint(e[ne] * tau_ap))
                ne += 1
                n_pend += 1


@dataclass
class DetectorState:
    """What a detector remembers between windows.

    The last accepted click, pending afterpulses, and the exact events (photons, dark
    counts) that fell at or after the previous window's end.
    """

    last_click_ps: int = NEVER_PS
    pending_ps: IntArray = field(default_factory=lambda: np.zeros(PENDING_CAPACITY, np.int64))
    n_pending: int = 0
    carry: Events = field(default_factory=Events.empty)

    def switch_off(self) -> None:
        """Bias off: forget pending afterpulses and carried events."""
        self.n_pending = 0
        self.carry = Events.empty()


@dataclass(frozen=True)
class DeadTime:
    """Dead time and afterpulsing of a detector (ps)."""

    dead_ps: int
    afterpulse_prob: float
    afterpulse_tau_ps: float


def _pool_size(n_events: int, p_ap: float, span_ps: int, dead_ps: int) -> int:
    """Accepted-event bound for one scan call: the inputs (+ afterpulses) or the dead time."""
    by_count = int(n_events * (1.0 + 2.0 * p_ap)) + 64
    if dead_ps <= 0:
        return by_count
    return min(by_count, span_ps // dead_ps + 2)


def resolve_photons(rng: np.random.Generator, photons: PhotonStream, s0: int, first: int) -> Events:
    """Exact (jittered, int64 ps) times of the clicks from candidate ``first`` on, sorted."""
    pulses = photons.pulse[first:][photons.clicks[first:].view(bool)]
    rel = photons.nominal_rel(pulses)
    if photons.sigma_ps > 0 and rel.size:
        rel += truncated_normal(rng, rel.size, photons.sigma_ps, JITTER_BOUND)
    t = np.rint(rel).astype(np.int64)
    t += s0
    return Events(t, np.full(t.size, ORIGIN_PHOTON, np.int8), pulses).sorted()


def _concat_sorted(parts: list[Events]) -> Events:
    """Concatenate event sets and sort them by time (stable)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Events.empty()
    if len(parts) == 1:
        return parts[0].sorted()
    return Events(
        np.concatenate([p.time_ps for p in parts]),
        np.concatenate([p.origin for p in parts]),
        np.concatenate([p.pulse_index for p in parts]),
    ).sorted()


def scan_window(
    rngs: tuple[np.random.Generator, np.random.Generator],
    photons: PhotonStream,
    others: Events,
    state: DetectorState,
    window: tuple[int, int],
    dead: DeadTime,
) -> Events:
    """Accepted clicks of one detector in ``window = [s0, t_end)``.

    ``rngs = (jitter stream, afterpulse stream)``; ``others`` are this window's dark
    counts (sorted).  Photons and events at or after ``t_end`` go to ``state.carry``;
    afterpulses scheduled later stay pending.
    """
    rng_jit, rng_ap = rngs
    s0, t_end = window
    other = _concat_sorted([state.carry, others])
    bound = JITTER_BOUND * photons.sigma_ps + 1.0
    geom = np.array([photons.p0, photons.base_rel_ps, photons.period_ps, photons.sigma_ps,
                     bound], dtype=np.float64)
    bt = np.empty(BUFFER_CAPACITY, np.int64)
    bp = np.empty(BUFFER_CAPACITY, np.int64)
    k = j = n_b = 0
    p_ap = dead.afterpulse_prob
    parts: list[Events] = []
    while True:
        span = t_end - max(s0, state.last_click_ps + dead.dead_ps)
        n_left = photons.pulse.size - k + len(other) - j + state.n_pending  # bound
        pool = _pool_size(n_left, p_ap, max(span, 0), dead.dead_ps)
        z = rng_jit.standard_normal(pool) if photons.sigma_ps > 0 else np.zeros(pool)
        u = rng_ap.random(pool) if p_ap > 0 else np.zeros(0)
        n_e = int(pool * p_ap + 6.0 * math.sqrt(pool * p_ap) + 8) if p_ap > 0 else 0
        e = rng_ap.standard_exponential(n_e)
        out = Events(np.empty(pool, np.int64), np.empty(pool, np.int8), np.empty(pool, np.int64))
        k, j, n_out, last, n_pend, n_b, status = _dead_time_scan(
            photons.pulse, photons.clicks, geom, k,
            other.time_ps, other.origin, other.pulse_index, j,
            s0, t_end, dead.dead_ps, p_ap, dead.afterpulse_tau_ps,
            state.last_click_ps, state.pending_ps, state.n_pending, bt, bp, n_b,
            z, u, e, out.time_ps, out.origin, out.pulse_index,
        )
        state.last_click_ps, state.n_pending = int(last), int(n_pend)
        parts.append(out.take(slice(0, n_out)))
        if status == 0:
            break
        if status == 2:
            raise RuntimeError("dead-time scan buffer full (afterpulse queue or jitter buffer)")
    waiting = Events(bt[:n_b][::-1].copy(), np.zeros(n_b, np.int8), bp[:n_b][::-1].copy())
    late = resolve_photons(rng_jit, photons, s0, k)
    state.carry = _concat_sorted([waiting, other.take(slice(j, None)), late])
    return _concat_sorted(parts) if len(parts) > 1 else parts[0]
