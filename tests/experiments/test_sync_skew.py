"""Channel delays beyond half a period, on the mock bench.

The detection phases give each channel's delay only modulo one pulse period; a detector
with more than T/2 of extra cable must still be read against the right pulse of Alice
(else its QBER is ~50 %).  One detector at a time is delayed by 0.6, 1.3 and 2.7 periods
(the reference channel among them), at 1 GHz and at the bench's default 100 MHz, with
and without the sync channel; the tagger runs 42 ppm slow with an offset.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import cache

import numpy as np
import pytest

from qkdlab.experiments.bb84.processing import BB84Settings, FrameProcessor, RunTotals
from qkdlab.experiments.bb84.sync import DetectorMap, SyncError, SyncSolution, assign, synchronise
from qkdlab.mock_instruments.bench import (
    ORIGIN_PHOTON,
    Bench,
    BenchTags,
    config_from_mapping,
    rotation_from_angles,
)
from qkdlab.tags import TagBlock

DETECTORS = DetectorMap({1: (0, 0), 2: (0, 1), 3: (1, 0), 4: (1, 1)})
MARKER = 0
E_MIS = 0.01  # the bench's optical misalignment (its QBER floor)
SEED = 11
# (extra delay in periods, the channel that gets it); channel 1 is the sync's reference
SKEWS = [(0.6, 4), (1.3, 1), (2.7, 3)]
RATES = [1e9, 100e6]  # 1 GHz and the bench default


def bench_config(rate_hz: float, delays_ps: dict[int, int],
                 detectors: object = None) -> dict[str, object]:
    return {
        "alice": {"rep_rate_hz": rate_hz},
        # no afterpulses and few dark counts: the QBER is the misalignment alone
        "bob": {"misalignment": E_MIS, "detectors": detectors or {
            "efficiency": 0.2, "dead_time_s": 1e-6, "afterpulse_prob": 0.0,
            "dark_count_cps": 100.0}},
        "tagger": {"ppm": -42.0, "offset_ps": 987_654_321, "max_rate_hz": 1e12,
                   "buffer_tags": 2**24, "delay_ps": delays_ps},
    }


@cache
def bench_run(rate_hz: float, skew: float, skewed: int) -> tuple[Bench, tuple[BenchTags, ...]]:
    """Two 25 ms blocks; small everyday delays on the other channels."""
    period = 1e12 / rate_hz
    delays = {1: 0, 2: 40, 3: -30, 4: 15}
    delays[skewed] += round(skew * period)
    bench = Bench(config_from_mapping(bench_config(rate_hz, delays)), seed=SEED)
    return bench, (bench.acquire(0.025), bench.acquire(0.025))


def process(bench: Bench, blocks: tuple[BenchTags, ...], rate_hz: float, use_sync: bool,
            solution: SyncSolution | None = None) -> FrameProcessor:
    """The run's frame processor over the blocks (synchronising itself unless given)."""
    settings = BB84Settings(rep_rate_hz=rate_hz, seed=SEED, use_sync_channel=use_sync)
    processor = FrameProcessor(settings, DETECTORS, bench.alice_symbols, marker_channel=MARKER)
    processor.solution = solution
    for tags in blocks:
        processor.feed(TagBlock(**tags.tag_block_fields()))
    processor.flush()
    assert processor.totals.frames == len(blocks)
    return processor


def qber_per_channel(totals: RunTotals) -> dict[int, tuple[float, int]]:
    """(QBER, sifted bits) of each detector, from the sifted records."""
    rows = totals.sifted_arrays()
    out = {}
    for ch, (basis, bit) in DETECTORS.channels.items():
        mine = (rows["basis"] == basis) & (rows["bob"] == bit)
        n = int(mine.sum())
        out[ch] = (float((rows["alice"][mine] != rows["bob"][mine]).mean()), n)
    return out


def wrong_pulses(blocks: tuple[BenchTags, ...], sol: SyncSolution) -> dict[int, float]:
    """Fraction of each channel's photon tags assigned to another pulse than their own
    (channels that saw photons)."""
    photon = np.concatenate([b.origin == ORIGIN_PHOTON for b in blocks])
    t = np.concatenate([b.time_ps for b in blocks])[photon]
    c = np.concatenate([b.channel for b in blocks])[photon]
    truth = np.concatenate([b.pulse_index for b in blocks])[photon]
    # a window of one whole period: every tag is assigned, rows stay aligned with tags
    got = assign(t, c, sol, DETECTORS, window_ps=sol.period_ps)
    assert got.pulse_index.size == t.size
    return {ch: float(np.mean(got.pulse_index[c == ch] != truth[c == ch]))
            for ch in DETECTORS.channel_list if np.any(c == ch)}


def wrapped(sol: SyncSolution) -> SyncSolution:
    """The solution with every delay folded into ±T/2 (nearest pulse, the old sync)."""
    t = sol.period_ps
    return replace(sol, channel_delay_ps={ch: (d + t / 2) % t - t / 2
                                          for ch, d in sol.channel_delay_ps.items()})


@pytest.mark.parametrize("use_sync", [False, True], ids=["qubit-sync", "sync-channel"])
@pytest.mark.parametrize("rate_hz", RATES, ids=["1GHz", "100MHz"])
@pytest.mark.parametrize(("skew", "skewed"), SKEWS, ids=[f"{s}T-ch{c}" for s, c in SKEWS])
def test_a_detector_delayed_by_periods_is_read_against_its_own_pulses(
        skew: float, skewed: int, rate_hz: float, use_sync: bool) -> None:
    bench, blocks = bench_run(rate_hz, skew, skewed)
    processor = process(bench, blocks, rate_hz, use_sync)
    sol = processor.solution
    assert sol is not None
    # the clock and every channel's delay, relative to channel 1, whole periods included
    assert sol.drift_ppm == pytest.approx(-42.0, abs=0.01)
    true_delay = bench.config().tagger.delay_of
    for ch in DETECTORS.channel_list:
        assert sol.channel_delay_ps[ch] == pytest.approx(true_delay(ch) - true_delay(1),
                                                         abs=10.0), ch
    # every photon tag on its own pulse, on every channel
    for ch, wrong in wrong_pulses(blocks, sol).items():
        assert wrong < 1e-4, (ch, wrong)
    # each detector's QBER is the bench's misalignment (5 σ of its sifted bits; the
    # dark counts, 100 cps against ~10⁵ cps of photons, add less than 0.1 %)
    for ch, (qber, n) in qber_per_channel(processor.totals).items():
        assert n > 2000, ch
        assert abs(qber - E_MIS) < 5 * math.sqrt(E_MIS / n) + 0.001, (ch, qber, n)
    # and the scenario needs it: with nearest-pulse delays some detector reads the
    # neighbouring pulse of Alice, at a QBER of one half
    folded = process(bench, blocks, rate_hz, use_sync, solution=wrapped(sol))
    worst = max(q for q, _ in qber_per_channel(folded.totals).values())
    assert worst == pytest.approx(0.5, abs=0.05)


def test_a_delay_beyond_the_searched_skew_fails_naming_the_channel() -> None:
    bench, blocks = bench_run(100e6, 2.7, 3)
    # the run's settings carry the limit to the sync
    settings = BB84Settings(seed=SEED, use_sync_channel=False, max_skew_periods=2)
    processor = FrameProcessor(settings, DETECTORS, bench.alice_symbols)
    with pytest.raises(SyncError, match=r"channel 3: .* no shift within ±2 periods"):
        processor.feed(TagBlock(**blocks[0].tag_block_fields()))
    with pytest.raises(ValueError, match="max_skew_periods must be >= 0 periods, got -1"):
        BB84Settings(max_skew_periods=-1)
    tags = blocks[0]
    with pytest.raises(ValueError, match="max_skew_periods must be >= 0, got -1"):
        synchronise(tags.time_ps, tags.channel, DETECTORS, bench.alice_symbols, 10_000.0,
                    max_skew_periods=-1)


def test_a_channel_with_dark_counts_only_does_not_stop_the_sync() -> None:
    # detector 1 (channel 2) sees no light, only its dark counts: no pattern to match,
    # no pulsed phase; the others are resolved as usual (channel 4 at +2.7 periods)
    spad = {"efficiency": 0.2, "dead_time_s": 1e-6, "afterpulse_prob": 0.0,
            "dark_count_cps": 100.0}
    dark = {**spad, "efficiency": 0.0, "dark_count_cps": 20_000.0}
    bench = Bench(config_from_mapping(bench_config(100e6, {4: 27_000},
                                                   [spad, dark, spad, spad])), seed=SEED)
    tags = bench.acquire(0.025)
    assert int(np.sum(tags.channel == 2)) > 200
    sol = synchronise(tags.time_ps, tags.channel, DETECTORS, bench.alice_symbols, 10_000.0)
    assert sol.channel_delay_ps[4] == pytest.approx(27_000.0, abs=10.0)
    assert abs(sol.channel_delay_ps[2]) <= 5_000.0  # nearest pulse: nothing to resolve
    wrong = wrong_pulses((tags,), sol)
    assert set(wrong) == {1, 3, 4}
    assert max(wrong.values()) < 1e-4


def test_a_delayed_detector_whose_bits_say_nothing_is_placed_by_the_intensities() -> None:
    # the receiver's controller turns D/A into circular light: the X detectors click at
    # random whatever Alice's bit, so only the intensity pattern (brighter pulses click
    # more) can tell which pulse channel 3, 1.3 periods late, is reading
    bench = Bench(config_from_mapping({
        **bench_config(100e6, {3: 13_000}),
        "bob": {"misalignment": E_MIS, "pc_rotation": rotation_from_angles(math.pi / 2, 0.0,
                                                                           0.0).ravel().tolist(),
                "detectors": {"efficiency": 0.2, "dead_time_s": 1e-6, "afterpulse_prob": 0.0,
                              "dark_count_cps": 100.0}}}), seed=SEED)
    blocks = (bench.acquire(0.025),)
    processor = process(bench, blocks, 100e6, use_sync=False)
    sol = processor.solution
    assert sol is not None
    assert sol.channel_delay_ps[3] == pytest.approx(13_000.0, abs=10.0)
    assert max(wrong_pulses(blocks, sol).values()) < 1e-4
    qber = qber_per_channel(processor.totals)
    assert max(qber[1][0], qber[2][0]) < E_MIS + 0.01  # Z untouched
    assert min(qber[3][0], qber[4][0]) > 0.4  # X: random bits, as the rotation makes them


def test_few_detections_of_an_aligned_receiver_still_synchronise() -> None:
    # ~60 detections a channel: too few for a significant whole-period shift, but the
    # nearest pulse matching best is taken as before (no new failure for short syncs)
    for seed in range(5):
        bench = Bench(config_from_mapping(bench_config(100e6, {2: 40, 3: -30})), seed=seed)
        tags = bench.acquire(0.002)
        last = int(np.flatnonzero(tags.channel > 0)[250]) + 1
        sol = synchronise(tags.time_ps[:last], tags.channel[:last], DETECTORS,
                          bench.alice_symbols, 10_000.0)
        counts = np.bincount(tags.channel[:last], minlength=5)
        for ch, delay in ((2, 40.0), (3, -30.0)):  # 5 σ: ~100 ps jitter, ch and ch 1
            sigma = 100.0 * math.sqrt(1 / counts[ch] + 1 / counts[1])
            assert sol.channel_delay_ps[ch] == pytest.approx(delay, abs=5 * sigma)
        assert max(wrong_pulses((tags,), sol).values()) == 0.0
