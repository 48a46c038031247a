"""Timing synchronisation against synthetic tags with known period, offset and ppm."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import pytest

from qkdlab.experiments.bb84.sync import (
    AssignBuffers,
    DetectorMap,
    SyncError,
    assign,
    assign_frame,
    sort_rows,
    synchronise,
    track,
)

DETECTORS = DetectorMap({1: (0, 0), 2: (0, 1), 3: (1, 0), 4: (1, 1)})
NOMINAL_PS = 10_000.0  # 100 MHz


def symbols(index: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int8], ...]:
    """A stand-in for Alice's record: a hash of the pulse index (seed 7)."""
    x = (index.astype(np.uint64) + np.uint64(7)) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    basis = (x & np.uint64(1)).astype(np.int8)
    bit = ((x >> np.uint64(1)) & np.uint64(1)).astype(np.int8)
    u = (x >> np.uint64(8)).astype(np.float64) / 2.0**56
    intensity = np.where(u < 0.7, 0, np.where(u < 0.9, 1, 2)).astype(np.int8)
    return basis, bit, intensity


@dataclass
class Truth:
    period_ps: float
    origin_ps: float
    delays: dict[int, float]


def make_tags(seconds: float, ppm: float, origin_ps: float, rate_cps: float = 2e5,
              dark_cps: float = 2e3, jitter_ps: float = 40.0, seed: int = 1,
              marker_every: int | None = None
              ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16], npt.NDArray[np.int64],
                         Truth]:
    rng = np.random.default_rng(seed)
    period = NOMINAL_PS * (1 + ppm * 1e-6)
    n_pulses = int(seconds / (NOMINAL_PS * 1e-12))
    p = rate_cps * NOMINAL_PS * 1e-12
    n = np.cumsum(rng.geometric(p, size=int(n_pulses * p * 1.2) + 100)) - 1
    n = n[n < n_pulses].astype(np.int64)
    basis, bit, intensity = symbols(n)
    keep = rng.random(n.size) < np.array([1.0, 0.3, 0.002])[intensity]
    n, basis, bit = n[keep], basis[keep], bit[keep]
    bob_basis = rng.integers(0, 2, n.size).astype(np.int8)
    flip = rng.random(n.size) < 0.02
    bob_bit = np.where(bob_basis == basis, bit ^ flip, rng.integers(0, 2, n.size)).astype(np.int8)
    ch = (1 + 2 * bob_basis + bob_bit).astype(np.int16)
    delays = {1: 0.0, 2: 150.0, 3: -320.0, 4: 2600.0}
    dl = np.array([0, *delays.values()])
    t = origin_ps + n * period + dl[ch] + rng.normal(0, jitter_ps, n.size)
    n_dark = rng.poisson(dark_cps * seconds)
    t_dark = rng.uniform(0, seconds * 1e12, n_dark)
    ch_dark = rng.integers(1, 5, n_dark).astype(np.int16)
    times = np.concatenate([t, t_dark])
    chans = np.concatenate([ch, ch_dark])
    truth_index = np.concatenate([n, np.full(n_dark, -1)])
    if marker_every:
        k = np.arange(0, n_pulses, marker_every)
        times = np.concatenate([times, origin_ps + 5_000.0 + k * period])
        chans = np.concatenate([chans, np.zeros(k.size, dtype=np.int16)])
        truth_index = np.concatenate([truth_index, np.full(k.size, -2)])
    order = np.argsort(times, kind="stable")
    times = np.rint(times[order]).astype(np.int64)
    return times, chans[order], truth_index[order], Truth(period, origin_ps, delays)


@pytest.mark.parametrize("ppm", [-100.0, -3.7, 0.0, 42.0, 100.0])
def test_qubit_based_sync_recovers_period_offset_and_ppm(ppm: float) -> None:
    # 1 s of detections; 2e5 cps gives the statistics of ~25 km with a 100 MHz source
    times, chans, truth_index, truth = make_tags(1.0, ppm, origin_ps=123_456.0)
    sol = synchronise(times, chans, DETECTORS, symbols, NOMINAL_PS)
    assert sol.drift_ppm == pytest.approx(ppm, abs=0.01)
    assert sol.origin_ps == pytest.approx(truth.origin_ps, abs=10.0)
    for ch, delay in truth.delays.items():
        assert sol.channel_delay_ps[ch] == pytest.approx(delay, abs=10.0)
    result = assign(times, chans, sol, DETECTORS, window_ps=1000.0)
    photons = truth_index >= 0
    assigned_truth = truth_index[np.isin(times, result.time_ps) & photons]
    assert result.pulse_index.size >= 0.999 * photons.sum()
    matched = np.isin(result.pulse_index, assigned_truth)
    assert matched.mean() > 0.995


def test_sync_channel_mode_recovers_the_same() -> None:
    times, chans, _, truth = make_tags(0.5, 57.0, origin_ps=9_876_543.0, marker_every=1 << 16)
    sol = synchronise(times, chans, DETECTORS, symbols, NOMINAL_PS, marker_channel=0,
                      frame_pulses=1 << 16)
    assert sol.drift_ppm == pytest.approx(57.0, abs=0.01)
    assert sol.origin_ps == pytest.approx(truth.origin_ps, abs=10.0)


def test_large_offset_found_within_search_range() -> None:
    # pulse 0 arrived long before the tagger started: a negative origin of 1.5 M pulses
    origin = -1_500_000 * NOMINAL_PS + 777.0
    times, chans, _, _ = make_tags(0.3, 10.0, origin_ps=origin, seed=5)
    times_start = times[times >= 0]
    chans_start = chans[times >= 0]
    sol = synchronise(times_start, chans_start, DETECTORS, symbols, NOMINAL_PS,
                      offset_search=(-(1 << 21), 1 << 21))
    assert sol.origin_ps == pytest.approx(origin, abs=10.0)


def test_offset_outside_search_range_fails_loudly() -> None:
    times, chans, _, _ = make_tags(0.2, 0.0, origin_ps=-3_000_000 * NOMINAL_PS, seed=6)
    sel = times >= 0
    with pytest.raises(SyncError, match="no pulse offset found"):
        synchronise(times[sel], chans[sel], DETECTORS, symbols, NOMINAL_PS,
                    offset_search=(-1000, 1000))


def test_too_few_detections_is_a_clear_error() -> None:
    times, chans, _, _ = make_tags(0.0005, 0.0, origin_ps=0.0)
    with pytest.raises(SyncError, match="needs detections"):
        synchronise(times[:50], chans[:50], DETECTORS, symbols, NOMINAL_PS)


def test_tracking_follows_a_drifting_clock() -> None:
    # an estimate 0.001 ppm off drifts 200 ps per 0.2 s frame: after 2 s the pulses fall
    # outside a ±500 ps window unless each frame's residuals correct the clock model
    times, chans, _, _ = make_tags(2.0, -20.0, origin_ps=0.0, seed=9)
    first = times < 2e11
    start_sol = synchronise(times[first], chans[first], DETECTORS, symbols, NOMINAL_PS)
    spoiled = replace(start_sol, period_ps=start_sol.period_ps * (1 + 1e-9))

    def run(tracking: bool) -> tuple[float, float, float]:
        sol = spoiled
        for start in np.arange(0, 2e12, 2e11):
            sel = (times >= start) & (times < start + 2e11)
            result = assign(times[sel], chans[sel], sol, DETECTORS, window_ps=1000.0)
            if tracking:
                sol = track(sol, result)
        kept = result.pulse_index.size / (result.pulse_index.size + result.unassigned)
        return sol.drift_ppm, float(np.median(np.abs(result.residual_ps))), kept

    drift, last_residual, kept = run(tracking=True)
    assert drift == pytest.approx(-20.0, abs=0.0005)
    assert last_residual < 60.0  # the jitter (40 ps RMS) dominates, not the clock model
    assert kept > 0.95  # all but dark counts outside the window
    _, _, kept_untracked = run(tracking=False)
    assert kept_untracked < 0.2


def test_frame_assignment_is_assign_plus_counts() -> None:
    times, chans, _, _ = make_tags(0.2, 12.0, origin_ps=5_000_000.0, seed=4,
                                   marker_every=1 << 14)
    sol = synchronise(times, chans, DETECTORS, symbols, NOMINAL_PS, marker_channel=0,
                      frame_pulses=1 << 14)
    sol = replace(sol, origin_ps=sol.origin_ps + 1e6 * NOMINAL_PS)  # some pulses < 0
    plain = assign(times, chans, sol, DETECTORS, 1000.0, histogram_bins=50)
    buffers = AssignBuffers()
    frame = assign_frame(times, chans, sol, DETECTORS, 1000.0, 50, buffers)
    np.testing.assert_array_equal(frame.pulse_index, plain.pulse_index)
    np.testing.assert_array_equal(frame.detector, plain.detector)
    np.testing.assert_array_equal(frame.residual_ps, plain.residual_ps)
    assert plain.histogram is not None
    np.testing.assert_array_equal(frame.histogram, plain.histogram)
    assert frame.unassigned == plain.unassigned > 0
    assert frame.before_start == int((plain.pulse_index < 0).sum()) > 0
    assert frame.channel_counts == {int(c): int(n) for c, n in
                                    zip(*np.unique(chans, return_counts=True), strict=True)}
    # every detector tag is in the histogram, assigned or not
    assert int(frame.histogram.sum()) == plain.pulse_index.size + plain.unassigned
    assert frame.in_pulse_order == bool(np.all(np.diff(plain.pulse_index) >= 0))


def test_sort_rows_is_a_stable_sort() -> None:
    rng = np.random.default_rng(3)
    buffers = AssignBuffers()
    pulse = np.repeat(np.arange(20_000, dtype=np.int64), 2)
    swap = np.flatnonzero(rng.random(pulse.size - 1) < 0.01)
    pulse[swap], pulse[swap + 1] = pulse[swap + 1], pulse[swap]  # near-sorted
    shuffled = rng.permutation(pulse)  # the merge-sort fallback
    for rows in (pulse, shuffled):
        det = rng.integers(0, 4, rows.size).astype(np.int8)
        order = np.argsort(rows, kind="stable")
        p, d = sort_rows(rows, det, buffers)
        np.testing.assert_array_equal(p, rows[order])
        np.testing.assert_array_equal(d, det[order])
