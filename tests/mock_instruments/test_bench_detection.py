"""Detector internals: candidate thinning, the lazy-jitter dead-time scan, block joins."""

from __future__ import annotations

import itertools
import math

import numpy as np

from qkdlab.mock_instruments.bench import Bench, config_from_mapping
from qkdlab.mock_instruments.bench.detection import (
    ORIGIN_PHOTON,
    DeadTime,
    DetectorState,
    Events,
    PhotonStream,
    draw_candidates,
    resolve_photons,
    scan_window,
)


def test_candidates_are_a_bernoulli_process() -> None:
    """Geometric gaps: count within 5σ of n·p, gaps' mean 1/p within 5σ, all in range."""
    rng = np.random.default_rng(1)
    p, first, stop = 0.003, 10**12, 10**12 + 50_000_000
    cand = draw_candidates(rng, first, stop, p)
    n = stop - first
    assert cand.min() >= first
    assert cand.max() < stop
    assert np.all(np.diff(cand) > 0)
    assert abs(cand.size - n * p) < 5 * math.sqrt(n * p * (1 - p))
    gaps = np.diff(cand)
    # geometric: variance (1 − p)/p²
    assert abs(gaps.mean() - 1 / p) < 5 * math.sqrt((1 - p) / p**2 / gaps.size)
    ones = np.count_nonzero(gaps == 1)  # P(gap = 1) = p
    assert abs(ones - p * gaps.size) < 5 * math.sqrt(gaps.size * p * (1 - p))


def _scan(photons: PhotonStream, dead_ps: int, seed: int) -> Events:
    """Accepted clicks of one window holding every photon."""
    rng = np.random.default_rng(seed)
    end = int(photons.nominal_rel(photons.pulse[-1:])[0]) + 10**6
    return scan_window((rng, rng), photons, Events.empty(), DetectorState(), (0, end),
                       DeadTime(dead_ps, 0.0, 1.0))


def test_lazy_jitter_scan_matches_eager_resolution() -> None:
    """Skipping the jitter of certainly-dead photons changes nothing in distribution.

    A dense 1 GHz click train (p = 0.3 per pulse) with σ = 400 ps and a 3 ns dead time:
    clicks overlap within ±8σ all the time, so the order matters.  The eager reference
    resolves every jitter, sorts, then scans.  Accepted counts and the mean jitter of
    accepted clicks (biased by the dead time, which favours late-jittered clicks just
    after its end) agree within 5σ.
    """
    rng = np.random.default_rng(0)
    n_pulses, p, sigma, dead = 2_000_000, 0.3, 400.0, 3_000
    pulses = np.flatnonzero(rng.random(n_pulses) < p).astype(np.int64)
    flags = np.ones(pulses.size, np.uint8)
    photons = PhotonStream(pulses, flags, 0, 5_000.0, 1000.0, sigma)
    lazy = _scan(photons, dead, 1)
    eager_events = resolve_photons(np.random.default_rng(2), photons, 0, 0)
    rng_ref = np.random.default_rng(3)
    eager = scan_window((rng_ref, rng_ref), PhotonStream.empty(), eager_events, DetectorState(),
                        (0, int(eager_events.time_ps[-1]) + 1), DeadTime(dead, 0.0, 1.0))
    assert np.all(np.diff(lazy.time_ps) >= dead)
    assert np.all(lazy.origin == ORIGIN_PHOTON)
    n_l, n_e = len(lazy), len(eager)
    # accepted counts of a dead-time-limited train: Poisson bound on each
    assert abs(n_l - n_e) < 5 * math.sqrt(n_l + n_e)

    def residual(ev: Events) -> np.ndarray:
        return ev.time_ps - (5_000.0 + ev.pulse_index * 1000.0)

    r_l, r_e = residual(lazy), residual(eager)
    assert abs(r_l.mean()) > 0.05 * sigma  # the dead time selects on jitter: order matters
    se = math.sqrt(r_l.var() / n_l + r_e.var() / n_e)
    assert abs(r_l.mean() - r_e.mean()) < 5 * se


def test_dead_time_and_afterpulses_carry_across_blocks() -> None:
    """Many short acquisitions: no interval below τ across block joins, afterpulses kept."""
    cfg = config_from_mapping({"bob": {"detectors": {
        "dark_count_cps": 200_000.0, "dead_time_s": 10e-6, "afterpulse_prob": 0.5,
        "afterpulse_tau_s": 3e-6}}, "tagger": {"jitter_ps": 0.0}})
    bench = Bench(cfg, seed=4)
    bench.alice.laser_on = False
    blocks = [bench.acquire(0.0007) for _ in range(100)]
    for a, b in itertools.pairwise(blocks):
        assert b.start_ps == a.stop_ps
    times = np.concatenate([b.select(1) for b in blocks])
    origin = np.concatenate([b.origin[b.channel == 1] for b in blocks])
    assert np.all(np.diff(times) >= 10_000_000)
    assert np.count_nonzero(origin == 2) > 0.1 * origin.size


def test_rep_rate_and_length_changes_keep_the_pulse_grid() -> None:
    """After a change of f_rep or fibre length, photon tags sit at e(i) + L·n_g/c ± 8σ."""
    cfg = config_from_mapping({"bob": {"detectors": {"dead_time_s": 0.0,
                                                     "afterpulse_prob": 0.0}},
                               "tagger": {"jitter_ps": 0.0}})
    bench = Bench(cfg, seed=5)
    bench.acquire(0.002)
    for change in ({"rep_rate_hz": 50e6}, {"length_km": 10.0}):
        if "rep_rate_hz" in change:
            bench.alice.rep_rate_hz = change["rep_rate_hz"]
        else:
            bench.channel.length_km = change["length_km"]
        tags = bench.acquire(0.003)
        delay = bench.propagation_delay_ps()
        # light emitted after the change: arrives one fibre delay (+ 10 µs) into the block
        fresh = (tags.origin == ORIGIN_PHOTON) & (tags.time_ps > tags.start_ps + delay + 1e7)
        idx = tags.pulse_index[fresh]
        assert idx.size > 1000
        resid = tags.time_ps[fresh] - bench.emission_time_ps(idx) - delay
        assert np.abs(resid).max() <= 8 * 100.0 + 1
