"""Swabian Time Tagger driver streaming through the fake vendor library and the bench.

Figures: tags/s delivered by ``SwabianTimeTagger.stream`` for 5 s of data at about
80 M tags/s offered (the Time Tagger Ultra's sustained USB 3 rate; the bench's sync
channel fires on every pulse of a 79.5 MHz clock, plus the four detectors), the peak
resident memory while streaming, the largest stream buffer against ``n_max_events``,
and lost tags reported by the driver against the fake device's ground truth — once
below the limit (expect 0) and once above it (100 M tags/s for 1 s into a 1 M-tag
device buffer: every lost tag must be reported).  Everything runs in this process on
2 cores: the bench model generates the tags, so the rate is a lower bound of what the
driver alone sustains; the driver's own decoding is measured separately.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import psutil

from qkdlab.drivers.swabian.timetagger import StreamStats, SwabianTimeTagger, _OverflowState
from qkdlab.mock_instruments.bench import Bench, config_from_mapping
from qkdlab.mock_instruments.swabian import fake_timetagger as fake

MB = 1024 * 1024
PS = 10**12


def _bench(rep_hz: float) -> Bench:
    cfg = config_from_mapping({"alice": {"rep_rate_hz": rep_hz, "pattern": {"frame_pulses": 1}}})
    return Bench(cfg, seed=1)


def _stream(name: str, rep_hz: float, seconds: float,
            buffer_tags: int | None = None) -> dict[str, Any]:
    lib = fake.FakeSwabianLibrary()
    device = lib.attach(_bench(rep_hz), model="Time Tagger Ultra", history_windows=0,
                        buffer_tags=buffer_tags)
    tt = SwabianTimeTagger(name, library=lib, channels=(1, 2, 3, 4, 5),
                           poll_interval_s=0.0)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak = [rss0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    received = reported_lost = 0
    t0 = time.perf_counter()
    try:
        for block in tt.stream(seconds):
            received += len(block)
            reported_lost += block.lost_tags
        wall = time.perf_counter() - t0
        stats = tt.last_stream_stats
    finally:
        done.set()
        sampler.join()
        tt.close()
    led = device.ledger
    return {"received": received, "reported_lost": reported_lost, "wall": wall,
            "offered": led.total("offered"), "truth_lost": led.total("missed"),
            "rss0": rss0, "peak": peak[0], "stats": stats, "seconds": seconds}


def _decode_rate(n_tags: int = 1_600_000, repeats: int = 10) -> float:
    """The driver's buffer -> TagBlock conversion alone (tags/s, one core)."""
    rng = np.random.default_rng(0)
    times = np.sort(rng.integers(0, 20 * 10**9, n_tags)).astype(np.int64)
    buf = fake.TimeTagStreamBuffer(times, rng.integers(1, 6, n_tags).astype(np.int32),
                                   np.zeros(n_tags, np.uint8), np.zeros(n_tags, np.uint16),
                                   0, 20 * 10**9, False)
    lib = fake.FakeSwabianLibrary()
    lib.attach(None, model="Time Tagger Ultra", history_windows=0)
    tt = SwabianTimeTagger("swabian_decode_bench", library=lib)
    try:
        t0 = time.perf_counter()
        for _ in range(repeats):
            tt._decode(buf, 0, 20 * 10**9, _OverflowState(), 2**21, StreamStats())
        return n_tags * repeats / (time.perf_counter() - t0)
    finally:
        tt.close()


def _ratio(value: float, baseline: float) -> float | None:
    return value / baseline if baseline else None


def run() -> list[dict[str, Any]]:
    """Benchmark rows: {name, value, unit, baseline, ratio}."""
    rows: list[dict[str, Any]] = []
    alone = _decode_rate()
    rows.append({"name": "swabian driver decode alone (1 core)", "value": alone,
                 "unit": "tags/s", "baseline": 80e6, "ratio": alone / 80e6})
    ok = _stream("swabian_bench", 79.5e6, 5.0)
    rate = ok["received"] / ok["wall"]
    offered_rate = ok["offered"] / ok["seconds"]
    rows.append({"name": "swabian stream tags/s (Ultra, ~80 M/s offered, 5 s)", "value": rate,
                 "unit": "tags/s", "baseline": offered_rate,
                 "ratio": _ratio(rate, offered_rate)})
    rows.append({"name": "swabian stream wall time / data time",
                 "value": ok["wall"] / ok["seconds"], "unit": "s/s", "baseline": 1.0,
                 "ratio": ok["wall"] / ok["seconds"]})
    rows.append({"name": "swabian stream peak RSS", "value": ok["peak"] / MB, "unit": "MB",
                 "baseline": ok["rss0"] / MB, "ratio": _ratio(ok["peak"], ok["rss0"])})
    stats = ok["stats"]
    rows.append({"name": "swabian stream largest buffer / n_max_events",
                 "value": stats.peak_buffer_events, "unit": "events",
                 "baseline": stats.n_max_events,
                 "ratio": _ratio(stats.peak_buffer_events, stats.n_max_events)})
    rows.append({"name": "swabian lost tags below limit (reported / truth)",
                 "value": ok["reported_lost"], "unit": "tags", "baseline": ok["truth_lost"],
                 "ratio": _ratio(ok["reported_lost"], ok["truth_lost"])})
    rows.append({"name": "swabian tags missing below limit (offered − received − lost)",
                 "value": ok["offered"] - ok["received"] - ok["reported_lost"], "unit": "tags",
                 "baseline": 0, "ratio": None})
    over = _stream("swabian_bench_over", 100e6, 1.0, buffer_tags=2**20)
    rows.append({"name": "swabian lost tags above limit (reported / truth, 100 M/s)",
                 "value": over["reported_lost"], "unit": "tags", "baseline": over["truth_lost"],
                 "ratio": _ratio(over["reported_lost"], over["truth_lost"])})
    rows.append({"name": "swabian unreported missing tags above limit",
                 "value": over["offered"] - over["received"] - over["reported_lost"],
                 "unit": "tags", "baseline": 0, "ratio": None})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
