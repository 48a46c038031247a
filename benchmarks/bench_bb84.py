"""BB84 tag processing throughput: sync assignment + Alice's record + sifting, one core.

Tags come from the bench model (1 GHz source, 25 km, the mock station's detectors) in
0.2 s frames; ``FrameProcessor.feed`` does per frame what a running acquisition does:
assignment with the folded histogram and per-channel counts, Alice's record, sifting
with multi-click squashing, the sifted records kept, the clock model refitted.  The
timing solution is found (and every compiled kernel loaded or compiled) on the first
frame, outside the timed part.  CPU time (``time.process_time``) over the other
frames; the best of ``REPEATS`` passes, each with a fresh processor.  Baseline in the
same run: the same steps written the obvious way (numpy assignment per channel, then
a Python dict grouping the clicks of each pulse), on one frame, the best of
``BASELINE_REPEATS`` passes.  (The machine may be shared: the best of several passes
is the figure least disturbed by other processes; a pass of ours takes ~0.05 s.)

The clock refit on its own (``refine_rows``, every frame: drift fit and channel
delays), against the same refit in plain numpy (``np.median``, ``np.polyfit``,
``np.mean``), both on the assignments of the timed frames, the best of ``REPEATS``.

A second figure, without baseline: a fast link (SNSPDs at 0 km, ~22 M tags/s) in
50 ms frames of ~1.1 M tags, where the fixed cost per frame (the clock refit) weighs
less per tag.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from qkdlab.experiments.bb84.processing import BB84Settings, FrameProcessor
from qkdlab.experiments.bb84.sync import (
    AssignBuffers,
    DetectorMap,
    SyncSolution,
    assign_frame,
    refine_rows,
    sort_rows,
)
from qkdlab.mock_instruments.bench import Bench, config_from_mapping
from qkdlab.patterns import bb84_symbols
from qkdlab.tags import TagBlock

DETECTORS = DetectorMap({1: (0, 0), 2: (0, 1), 3: (1, 0), 4: (1, 1)})


INGAAS = {"efficiency": 0.2, "dead_time_s": 50e-9}  # the mock station's detectors
SNSPD = {"efficiency": 0.8, "dead_time_s": 10e-9}


def _bench_blocks(seconds: float, frame_s: float, detectors: dict[str, float] = INGAAS,
                  **channel: float) -> tuple[list[TagBlock], BB84Settings]:
    settings = BB84Settings(rep_rate_hz=1e9, p_z=0.8, seed=5, use_sync_channel=False)
    bench = Bench(config_from_mapping({
        "alice": {"rep_rate_hz": 1e9, "pattern": {"p_z": 0.8, "seed": 5}},
        "bob": {"z_fraction": 0.8, "detectors": detectors},
        "tagger": {"max_rate_hz": 1e12, "buffer_tags": 2**30},
        **({"channel": channel} if channel else {}),
    }), seed=3)
    blocks = []
    for _ in range(round(seconds / frame_s)):
        tags = bench.acquire(frame_s)
        blocks.append(TagBlock(**tags.tag_block_fields()))
    return blocks, settings


def _record(settings: BB84Settings) -> Any:
    def record(index: np.ndarray) -> tuple[np.ndarray, ...]:
        return bb84_symbols(settings.seed, index, settings.p_z, settings.p_signal,
                            settings.p_decoy)
    return record


def _baseline(block: TagBlock, processor: FrameProcessor, record: Any) -> int:
    """The obvious way: numpy assignment per channel, then a Python dict of clicks per
    pulse for the sifting."""
    sol = processor.solution
    if sol is None:
        raise RuntimeError("not synchronised")
    half = processor.settings.acceptance_ps / 2
    pulses, dets = [], []
    for i, ch in enumerate(DETECTORS.channel_list):
        t = block.time_ps[block.channel == ch].astype(np.float64)
        x = t - sol.origin_ps - sol.channel_delay_ps[ch]
        n = np.rint(x / sol.period_ps)
        ok = np.abs(x - n * sol.period_ps) <= half
        pulses.append(n[ok].astype(np.int64))
        dets.append(np.full(int(ok.sum()), i))
    pulse = np.concatenate(pulses)
    det = np.concatenate(dets)
    basis, bit, _ = record(pulse)
    clicks: dict[int, list[tuple[int, int, int]]] = {}
    for n, d, a_basis, a_bit in zip(pulse.tolist(), det.tolist(), basis.tolist(),
                                    bit.tolist(), strict=True):
        clicks.setdefault(n, []).append((d, a_basis, a_bit))
    errors = 0
    for rows in clicks.values():
        d, a_basis, a_bit = rows[0]
        if len(rows) == 1 and d // 2 == a_basis:
            errors += int(d % 2 != a_bit)
    return errors


REPEATS = 7
BASELINE_REPEATS = 3


def _numpy_refit(sol: SyncSolution, pulse: np.ndarray, det: np.ndarray,
                 res: np.ndarray) -> SyncSolution:
    """``refine_rows`` the obvious way: the same subsamples and robust cores with
    ``np.median``, the drift line with ``np.polyfit``, the core means with ``np.mean``."""
    def core(r: np.ndarray) -> tuple[float, np.ndarray]:
        med = float(np.median(r))
        mad = 1.4826 * float(np.median(np.abs(r - med))) or 1.0
        return med, np.abs(r - med) < 3 * mad

    stride = max(1, pulse.size // 20_000)
    r = res[::stride]
    _, fit = core(r)
    slope, intercept = np.polyfit(pulse[::stride][fit].astype(np.float64), r[fit], 1)
    tracked = replace(sol, period_ps=sol.period_ps + float(slope),
                      origin_ps=sol.origin_ps + float(intercept))
    stride = max(1, det.size // 80_000)
    d, rr = det[::stride], res[::stride]
    delays = dict(tracked.channel_delay_ps)
    ref_shift = 0.0
    for i, ch in enumerate(DETECTORS.channel_list):
        med, inside = core(rr[d == i])
        shift = float(np.mean(rr[d == i][inside])) if inside.any() else med
        ref_shift = shift if i == 0 else ref_shift
        delays[ch] = sol.channel_delay_ps[ch] + shift - ref_shift
    return replace(tracked, channel_delay_ps=delays)


def _refit_rates(blocks: list[TagBlock], processor: FrameProcessor) -> tuple[float, float]:
    """Rows/s (CPU) of ``refine_rows`` and of the numpy refit over the frames' rows."""
    sol = processor.solution
    if sol is None:
        raise RuntimeError("not synchronised")
    settings = processor.settings
    frames = []
    for block in blocks:
        a = assign_frame(block.time_ps, block.channel, sol, DETECTORS, settings.acceptance_ps,
                         100, AssignBuffers())
        frames.append((a.pulse_index.copy(), a.detector.copy(), a.residual_ps.copy()))
    rows = sum(f[0].size for f in frames)
    best = {}
    for name, refit in (("ours", lambda p, d, r: refine_rows(sol, p, d, r, DETECTORS)),
                        ("numpy", lambda p, d, r: _numpy_refit(sol, p, d, r))):
        times = []
        for _ in range(REPEATS):
            start = time.process_time()
            for p, d, r in frames:
                refit(p, d, r)
            times.append(time.process_time() - start)
        best[name] = rows / min(times)
    return best["ours"], best["numpy"]


def _timed_pass(blocks: list[TagBlock], settings: BB84Settings, record: Any) -> float:
    """CPU seconds to feed ``blocks[1:]`` to a processor synchronised on ``blocks[0]``."""
    processor = FrameProcessor(settings, DETECTORS, record)
    processor.feed(blocks[0])
    processor.flush()
    if processor.solution is None or processor.record_is_pattern is not True:
        raise RuntimeError("the first frame did not synchronise and recognise the pattern")
    start = time.process_time()
    for block in blocks[1:]:
        processor.feed(block)
    return time.process_time() - start


def _throughput(blocks: list[TagBlock], settings: BB84Settings) -> tuple[float, int]:
    """Best tags/s (CPU time) of REPEATS passes over ``blocks[1:]``; tags timed."""
    record = _record(settings)
    n_tags = sum(len(b) for b in blocks[1:])
    return n_tags / min(_timed_pass(blocks, settings, record) for _ in range(REPEATS)), n_tags


def run() -> list[dict[str, Any]]:
    # load (or compile) the kernel that only frames out of pulse order need
    sort_rows(np.array([2, 1], np.int64), np.zeros(2, np.int8), AssignBuffers())
    frame_s = 0.2  # the ID1000's record length
    blocks, settings = _bench_blocks(2.0, frame_s)
    ours, n_tags = _throughput(blocks, settings)
    record = _record(settings)
    processor = FrameProcessor(settings, DETECTORS, record)
    processor.feed(blocks[0])
    processor.flush()
    sample = blocks[1]
    base_s = []
    for _ in range(BASELINE_REPEATS):
        start = time.process_time()
        _baseline(sample, processor, record)
        base_s.append(time.process_time() - start)
    base = len(sample) / min(base_s)
    refit, refit_numpy = _refit_rates(blocks[1:], processor)
    # a fast link: SNSPDs at 0 km, ~22 M tags/s into the tagger, 50 ms frames
    fast_blocks, fast_settings = _bench_blocks(0.3, 0.05, SNSPD, length_km=0.0)
    fast, n_fast = _throughput(fast_blocks, fast_settings)
    rows = [
        {"name": "bb84 tag processing (assign+record+sift), 1 GHz 25 km",
         "value": ours, "unit": "tags/s", "baseline": base, "ratio": ours / base},
        {"name": "bb84 tags per 0.2 s frame, 25 km", "value": n_tags / (len(blocks) - 1),
         "unit": "tags"},
        {"name": "bb84 clock refit (refine_rows), 25 km 0.2 s frames", "value": refit,
         "unit": "rows/s", "baseline": refit_numpy, "ratio": refit / refit_numpy},
        {"name": "bb84 tag processing, 1 GHz 0 km SNSPD, 50 ms frames", "value": fast,
         "unit": "tags/s"},
        {"name": "bb84 tags per 50 ms frame, 0 km SNSPD",
         "value": n_fast / (len(fast_blocks) - 1), "unit": "tags"},
    ]
    for row in rows:
        extra = (f"   baseline {row['baseline']:,.0f}, ratio {row['ratio']:.1f}"
                 if "ratio" in row else "")
        print(f"{row['name']:<58} {row['value']:>14,.0f} {row['unit']}{extra}")
    return rows


if __name__ == "__main__":
    run()
