"""The compiled frame path against a straightforward reference, bit for bit.

The reference below does every step the obvious way: numpy assignment per tag,
Alice's record looked up with ``bb84_symbols``, the squashing coins drawn with
``rng.integers``, a Python loop over the clicks of each pulse, ``np.bincount`` /
``np.add.at`` for the counts and the histogram, and the drift refinement with
``np.median``, ``np.mean`` and the closed-form least-squares line (sums in row order,
``np.cumsum``; checked against ``np.polyfit`` below).  ``FrameProcessor`` must give
exactly its per-frame stats, histograms, sifted records and clock model, on bench tags
that have everything: dark counts, tags outside the window, tags before pulse 0, the
marker channel, misaligned channel delays (rows out of pulse order), injected
multi-clicks in one and in both bases, and a multi-click pulse cut in two by a block
boundary.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from qkdlab.experiments.bb84.processing import (
    HISTOGRAM_BINS,
    BB84Settings,
    FrameProcessor,
    FrameStats,
)
from qkdlab.experiments.bb84.sync import (
    DetectorMap,
    SyncSolution,
    _fit_line,
    _median_mad,
    refine_rows,
    synchronise,
)
from qkdlab.mock_instruments.bench import Bench, config_from_mapping
from qkdlab.patterns import bb84_symbols
from qkdlab.protocol.sifting import _coin_source, _pcg64_words, coin_words
from qkdlab.tags import TagBlock

DETECTORS = DetectorMap({1: (0, 0), 2: (0, 1), 3: (1, 0), 4: (1, 1)})
MARKER = 0
# a wide window (±450 ps of 1000): with the channel delays below, dark counts of
# neighbouring pulses on different channels arrive out of pulse order in every frame
SETTINGS = BB84Settings(rep_rate_hz=1e9, p_z=0.8, seed=5, use_sync_channel=False,
                        sync_detections=5_000, window_ps=900.0)


def _record(index: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int8], ...]:
    s = SETTINGS
    return bb84_symbols(s.seed, index, s.p_z, s.p_signal, s.p_decoy)


@cache
def bench_blocks() -> tuple[TagBlock, ...]:
    """60 ms of 1 GHz / 25 km bench tags with extra multi-clicks, cut into 6 blocks."""
    bench = Bench(config_from_mapping({
        "alice": {"rep_rate_hz": 1e9, "pattern": {"p_z": 0.8, "seed": 5}},
        "bob": {"z_fraction": 0.8,
                "detectors": {"efficiency": 0.2, "dead_time_s": 20e-9,
                              "dark_count_cps": 30_000.0}},
        # delays up to ~T/2 apart: tags of neighbouring pulses arrive out of order
        "tagger": {"max_rate_hz": 1e12, "buffer_tags": 2**26,
                   "delay_ps": {1: 0, 2: 430, 3: -380, 4: 260}},
    }), seed=3)
    tags = bench.acquire(0.06)
    time_ps, channel = tags.time_ps.copy(), tags.channel.copy()
    rng = np.random.default_rng(17)
    on_det = np.flatnonzero(channel > 0)
    # a second click in the same pulse on another detector (either basis), a few ps
    # away; 3 % of the detections
    pick = rng.choice(on_det, size=on_det.size * 3 // 100, replace=False)
    extra_ch = (1 + (channel[pick] - 1 + rng.integers(1, 4, pick.size)) % 4).astype(np.int16)
    delay = np.array([0, 0, 430, -380, 260])  # each channel's input delay (ps)
    extra_t = time_ps[pick] + delay[extra_ch] - delay[channel[pick]] + rng.integers(-30, 30,
                                                                                    pick.size)
    time_ps = np.concatenate([time_ps, extra_t])
    channel = np.concatenate([channel, extra_ch])
    order = np.argsort(time_ps, kind="stable")
    time_ps, channel = time_ps[order], channel[order]
    # block boundaries every 10 ms, one of them inside a multi-click pulse
    cuts = [tags.start_ps + k * 10_000_000_000 for k in range(1, 6)]
    pair = int(np.searchsorted(time_ps, cuts[2]))
    while time_ps[pair + 1] - time_ps[pair] > 100 or channel[pair] == channel[pair + 1]:
        pair += 1
    cuts[2] = int(time_ps[pair + 1])  # the pair's second click opens the next block
    edges = [tags.start_ps, *cuts, tags.stop_ps]
    blocks = []
    for a, b in itertools.pairwise(edges):
        lo, hi = np.searchsorted(time_ps, [a, b])
        blocks.append(TagBlock(channel=channel[lo:hi].copy(), time_ps=time_ps[lo:hi].copy(),
                               start_ps=a, stop_ps=b))
    return tuple(blocks)


# -- the reference ------------------------------------------------------------------------
def row_order_sum(v: npt.NDArray[np.float64]) -> float:
    """Σ v accumulated from the first element to the last."""
    return float(np.cumsum(v)[-1])


def reference_line(pulse: npt.NDArray[np.int64], y: npt.NDArray[np.float64],
                   p0: int) -> tuple[float, float] | None:
    """Least-squares line y = slope·pulse + intercept, centred closed form: x = pulse −
    p0, slope = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)², intercept = ȳ − slope·(x̄ + p0); None
    when every x is the same."""
    x = (pulse - p0).astype(np.float64)
    xm, ym = row_order_sum(x) / x.size, row_order_sum(y) / y.size
    dx = x - xm
    sxx = row_order_sum(dx * dx)
    if sxx == 0:
        return None
    slope = row_order_sum(dx * (y - ym)) / sxx
    return slope, ym - slope * (xm + float(p0))


def reference_refine(sol: SyncSolution, pulse: npt.NDArray[np.int64],
                     det: npt.NDArray[np.int64], res: npt.NDArray[np.float64]) -> SyncSolution:
    """Drift tracking and channel delays with numpy's median and mean and the
    closed-form line."""
    def robust(r: npt.NDArray[np.float64]) -> tuple[float, npt.NDArray[np.bool_]]:
        med = float(np.median(r))
        mad = 1.4826 * float(np.median(np.abs(r - med))) or 1.0
        return med, np.abs(r - med) < 3 * mad

    tracked = sol
    if pulse.size >= 50:
        stride = max(1, pulse.size // 20_000)
        r = res[::stride]
        _, core = robust(r)
        line = (reference_line(pulse[::stride][core], r[core], int(pulse[0]))
                if core.sum() >= 50 else None)
        if line is not None:
            tracked = replace(sol, period_ps=sol.period_ps + line[0],
                              origin_ps=sol.origin_ps + line[1])
    delays = dict(tracked.channel_delay_ps)
    stride = max(1, det.size // 80_000)
    d, rr = det[::stride], res[::stride]
    ref_shift = 0.0
    for i, ch in enumerate(DETECTORS.channel_list):
        r = rr[d == i]
        if r.size < 20:
            continue
        med, core = robust(r)
        shift = float(np.mean(r[core])) if core.any() else med
        if i == 0:
            ref_shift = shift
        delays[ch] = sol.channel_delay_ps[ch] + shift - ref_shift
    return replace(tracked, channel_delay_ps=delays)


def reference_sift(pulse: npt.NDArray[np.int64], det: npt.NDArray[np.int64],
                   rng: np.random.Generator) -> dict[str, Any]:
    """Python loop over the pulses' clicks (rows sorted by pulse, ties in tag order)."""
    n = pulse.size
    coin_basis = rng.integers(0, 2, size=n, dtype=np.int8)
    coin_bit = rng.integers(0, 2, size=n, dtype=np.uint8)
    a_basis, a_bit, a_int = _record(pulse)
    chans = DETECTORS.channel_list
    b_basis = [DETECTORS.channels[c][0] for c in chans]
    b_bit = [DETECTORS.channels[c][1] for c in chans]
    detected = [0, 0, 0]
    sifted = [[0, 0, 0], [0, 0, 0]]
    errors = [[0, 0, 0], [0, 0, 0]]
    records: list[tuple[int, int, int, int, int]] = []
    multi = cross = 0
    i = 0
    while i < n:
        j = i
        while j < n and pulse[j] == pulse[i]:
            j += 1
        bases = {b_basis[det[r]] for r in range(i, j)}
        bits = {b_bit[det[r]] for r in range(i, j)}
        multi += j - i > 1
        cross += len(bases) > 1
        basis = int(coin_basis[i]) if len(bases) > 1 else bases.pop()
        bit = int(coin_bit[i]) if len(bases) > 1 or len(bits) > 1 else bits.pop()
        klass = int(a_int[i])
        detected[klass] += 1
        if basis == a_basis[i]:
            sifted[basis][klass] += 1
            errors[basis][klass] += int(a_bit[i]) != bit
            records.append((int(pulse[i]), basis, klass, int(a_bit[i]), bit))
        i = j
    rec = np.array(records, dtype=np.int64).reshape(-1, 5)
    return {"detected": detected, "sifted": sifted, "errors": errors, "multi": multi,
            "cross": cross,
            "pulse": rec[:, 0], "basis": rec[:, 1].astype(np.int8),
            "intensity": rec[:, 2].astype(np.int8), "alice": rec[:, 3].astype(np.uint8),
            "bob": rec[:, 4].astype(np.uint8)}


def reference_run(blocks: tuple[TagBlock, ...]) -> tuple[list[FrameStats],
                                                         dict[str, Any], SyncSolution]:
    """FrameProcessor's job, the obvious way."""
    s = SETTINGS
    chans = np.array(DETECTORS.channel_list)
    # sync on the first blocks holding sync_detections detections (as FrameProcessor)
    n_pending, pending = 0, []
    for block in blocks:
        pending.append(block)
        n_pending += int(np.isin(block.channel, chans).sum())
        if n_pending >= s.sync_detections:
            break
    sol = synchronise(np.concatenate([b.time_ps for b in pending]),
                      np.concatenate([b.channel for b in pending]), DETECTORS, _record,
                      s.period_ps, max_ppm=s.max_ppm, window_ps=s.acceptance_ps)
    frames, parts = [], []
    for frame, block in enumerate(blocks):
        on = np.isin(block.channel, chans)
        t, c = block.time_ps[on], block.channel[on]
        d = np.searchsorted(chans, c)
        delay = np.array([sol.channel_delay_ps[int(ch)] for ch in chans])
        base = round(sol.origin_ps)
        x = (t - base).astype(np.float64) - (sol.origin_ps - base) - delay[d]
        q = x / sol.period_ps
        m = np.floor(q + 0.5)
        r = x - m * sol.period_ps
        hist = np.zeros((chans.size, HISTOGRAM_BINS), np.int64)
        np.add.at(hist, (d, np.minimum(((q + 0.5 - m) * HISTOGRAM_BINS).astype(np.int64),
                                       HISTOGRAM_BINS - 1)), 1)
        ok = np.abs(r) <= s.acceptance_ps / 2
        pulse, det, res = m[ok].astype(np.int64), d[ok], r[ok]
        started = pulse >= 0
        sifted_in_order = bool(np.all(np.diff(pulse) >= 0))
        order = np.argsort(pulse[started], kind="stable")
        sifted = reference_sift(pulse[started][order], det[started][order],
                                np.random.default_rng([s.seed, frame]))
        parts.append(sifted | {"in_order": sifted_in_order})
        counts = np.bincount(block.channel[block.channel >= 0])
        first = math.ceil((block.start_ps - sol.origin_ps) / sol.period_ps)
        stop = math.ceil((block.stop_ps - sol.origin_ps) / sol.period_ps)
        frames.append(FrameStats(
            frame=frame, start_ps=block.start_ps, stop_ps=block.stop_ps,
            pulses=max(0, stop - max(first, 0)),
            counts={int(ch): int(k) for ch, k in enumerate(counts) if k},
            detected=sifted["detected"], sifted=sifted["sifted"], errors=sifted["errors"],
            unassigned=int((~ok).sum()), before_start=int((~started).sum()),
            overflow=block.overflow, lost_tags=block.lost_tags,
            sync_period_ps=sol.period_ps, sync_origin_ps=sol.origin_ps,
            sync_drift_ppm=sol.drift_ppm, histogram=hist.tolist()))
        if pulse.size >= 200:
            sol = reference_refine(sol, pulse, det, res)
    records: dict[str, Any] = {key: np.concatenate([p[key] for p in parts])
                               for key in ("pulse", "basis", "intensity", "alice", "bob")}
    records["coverage"] = {key: [p[key] for p in parts] for key in ("multi", "cross",
                                                                    "in_order")}
    return frames, records, sol


@cache
def reference() -> tuple[list[FrameStats], dict[str, Any], SyncSolution]:
    return reference_run(bench_blocks())


def test_bench_frames_have_what_the_comparison_needs() -> None:
    frames, records, _ = reference()
    coverage = records["coverage"]
    assert len(frames) == 6
    assert all(f.unassigned > 100 for f in frames)  # dark counts outside the window
    assert frames[0].before_start > 0  # dark counts before pulse 0
    assert all(MARKER in f.counts for f in frames)
    # the injected second clicks: ~3 % of the pulses, in one basis and in both
    assert all(m > 300 for m in coverage["multi"])
    assert all(300 > c > 50 for c in coverage["cross"]) or all(
        0.3 < c / m < 0.9 for c, m in zip(coverage["cross"], coverage["multi"], strict=True))
    # misaligned delays: rows out of pulse order in some frames (both paths are taken)
    assert any(coverage["in_order"])
    assert not all(coverage["in_order"])
    # a multi-click pulse cut in two by the boundary of blocks 2 and 3
    blocks = bench_blocks()
    assert blocks[3].time_ps[0] - blocks[2].time_ps[-1] < 100
    assert blocks[3].channel[0] != blocks[2].channel[-1]


@pytest.mark.parametrize("pattern_lookup", [True, False])
def test_frame_processor_matches_the_reference_bit_for_bit(pattern_lookup: bool) -> None:
    ref_frames, ref_records, ref_solution = reference()
    processor = FrameProcessor(SETTINGS, DETECTORS, _record, marker_channel=None,
                               pattern_lookup=pattern_lookup)
    frames = []
    for block in bench_blocks():
        frames += processor.feed(block)
    frames += processor.flush()
    # the fused path recognised the record as the settings' pattern (or was told not to)
    assert processor.record_is_pattern is pattern_lookup
    assert [f.as_dict() for f in frames] == [f.as_dict() for f in ref_frames]
    records = processor.totals.sifted_arrays()
    for key in ("pulse", "basis", "intensity", "alice", "bob"):
        expected = ref_records[key]
        assert records[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(records[key], expected, err_msg=key)
    assert processor.solution == ref_solution


def test_a_record_that_is_not_the_settings_pattern_is_looked_up() -> None:
    # Alice's record is not the pattern of the settings' seed (as with a QRNG record):
    # the processor must sift the record it was given, never the settings' pattern
    # (which would give half the bits wrong here)
    processor = FrameProcessor(replace(SETTINGS, seed=6), DETECTORS, _record)
    for block in bench_blocks()[:3]:
        processor.feed(block)
    assert processor.record_is_pattern is False
    assert processor.totals.qber(0) < 0.05


# -- the compiled pieces against numpy ---------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 1001, 40_000])
def test_coins_are_those_of_rng_integers(n: int) -> None:
    drawn = np.random.default_rng([3, n])
    basis = drawn.integers(0, 2, size=n, dtype=np.int8)
    bit = drawn.integers(0, 2, size=n, dtype=np.uint8)
    words, offset = coin_words(np.random.default_rng([3, n]), n)
    stream = (words.astype("<u8").view(np.uint8) >> 7)
    np.testing.assert_array_equal(stream[:n], basis)
    np.testing.assert_array_equal(stream[offset:offset + n], bit)
    # the PCG64 state handed to the kernel: same words, generator left where drawing
    # the coins would leave it
    rng = np.random.default_rng([3, n])
    pcg, no_words, offset2 = _coin_source(rng, n)
    assert no_words.size == 0
    assert offset2 == offset
    if n:
        np.testing.assert_array_equal(_pcg64_words(pcg, np.arange(words.size)), words)
    assert rng.integers(0, 2**62, 4).tolist() == drawn.integers(0, 2**62, 4).tolist()


def test_other_generators_give_the_same_coins_through_the_slow_path() -> None:
    for make in (lambda: np.random.Generator(np.random.MT19937(4)),
                 lambda: np.random.default_rng(4)):
        rng = make()
        rng.integers(0, 2**32, size=3, dtype=np.uint32)  # a PCG64 now holds a half word
        expected = (rng.integers(0, 2, 50, np.int8), rng.integers(0, 2, 50, np.uint8))
        rng = make()
        rng.integers(0, 2**32, size=3, dtype=np.uint32)
        pcg, words, offset = _coin_source(rng, 50)
        assert pcg.size == 0
        stream = words.astype("<u8").view(np.uint8) >> 7
        np.testing.assert_array_equal(stream[:50], expected[0])
        np.testing.assert_array_equal(stream[offset:offset + 50], expected[1])


def test_pcg64_jumps_reach_far_words() -> None:
    rng = np.random.default_rng(8)
    bitgen = rng.bit_generator
    assert isinstance(bitgen, np.random.PCG64)
    state = bitgen.state["state"]
    pcg = np.array([state["state"] >> 64, state["state"] & (2**64 - 1),
                    state["inc"] >> 64, state["inc"] & (2**64 - 1)], dtype=np.uint64)
    index = np.array([0, 0, 5, 1000, 123_456, 1 << 33], dtype=np.int64)
    expected = []
    for w in index:
        far = np.random.PCG64(np.random.SeedSequence(8))
        far.advance(int(w))
        expected.append(int(far.random_raw()))
    assert _pcg64_words(pcg, index).tolist() == expected


def test_median_and_mad_are_numpys_to_the_bit() -> None:
    rng = np.random.default_rng(0)
    for trial in range(1200):
        n = int(rng.integers(1, 3000)) if trial % 3 else int(rng.integers(1, 80))
        r = [rng.normal(0, 80, n), np.round(rng.normal(0, 80, n)) + 0.37,
             np.repeat(rng.normal(0, 1, 3), n)[:n],
             np.concatenate([rng.normal(0, 1, n), [1e300, -1e300, 7e4]]),
             # a peak on a flat background (the residuals of a frame)
             np.where(rng.random(n) < 0.5, rng.normal(0, 40, n), rng.uniform(-500, 500, n)),
             rng.integers(-3, 4, n) * 0.25,  # heavy ties
             np.concatenate([rng.normal(300, 5, n), rng.normal(-480, 3, n // 3)]),
             ][trial % 7]
        med = np.median(r)
        for lo, hi in ((-500.0, 500.0), (0.0, 0.0), (-1e-3, 1e-3), (100.0, 200.0)):
            assert _median_mad(r, lo, hi) == (med, np.median(np.abs(r - med))), (trial, lo)


def test_fit_line_is_the_least_squares_line() -> None:
    rng = np.random.default_rng(1)
    for n, stride in ((300, 1), (20_000, 1), (250_000, 12)):
        pulse = np.sort(rng.integers(10**9, 10**10, n))
        res = np.where(rng.random(n) < 0.9, rng.normal(0, 60, n), rng.uniform(-400, 400, n))
        res += 3e-9 * (pulse - pulse[0])  # a drifting clock: 3e-9 ps per pulse
        slope, intercept, points = _fit_line(pulse, res, stride, 500.0)
        x, y = pulse[::stride], res[::stride]
        med = np.median(y)
        core = np.abs(y - med) < 3 * 1.4826 * np.median(np.abs(y - med))
        assert points == core.sum() > 0.85 * x.size
        # the documented arithmetic, to the bit
        assert (slope, intercept) == reference_line(x[core], y[core], int(pulse[0]))
        # the least-squares line, as np.polyfit finds it (to rounding: ~1e-15 relative)
        ref_slope, ref_intercept = np.polyfit(x[core].astype(np.float64), y[core], 1)
        assert slope == pytest.approx(ref_slope, rel=1e-12, abs=0)
        assert intercept == pytest.approx(ref_intercept, rel=0, abs=1e-11)
        # and the drift itself, within 5 σ of its statistical error
        assert slope == pytest.approx(3e-9, abs=5 * 60 / (np.sqrt(points) * x[core].std()))
    # every row in one pulse: no line
    assert _fit_line(np.full(100, 7), rng.normal(0, 1, 100), 1, 500.0) == (0.0, 0.0, 0)


def test_refine_matches_the_numpy_refinement() -> None:
    blocks = bench_blocks()
    processor = FrameProcessor(SETTINGS, DETECTORS, _record)
    for block in blocks[:2]:
        processor.feed(block)
    sol = processor.solution
    assert sol is not None
    rng = np.random.default_rng(5)
    for n in (300, 20_000, 250_000):
        pulse = np.sort(rng.integers(0, 10**9, n))
        det = rng.integers(0, 4, n).astype(np.int8)
        res = np.where(rng.random(n) < 0.9, rng.normal(0, 40, n), rng.uniform(-200, 200, n))
        res = (np.round(res) + 0.25).astype(np.float64)
        assert refine_rows(sol, pulse, det, res, DETECTORS) == reference_refine(
            sol, pulse, det.astype(np.int64), res)
