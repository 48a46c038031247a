"""ID900/ID1000 Time Controller driver streaming through its mock (ZeroMQ, real sockets).

Figures: sustained tags/s received by ``IDQTimeController.stream`` for 5 s of data at
9.6 M timestamps/s offered (just below the 10 M/s link limit, PHYSICS.md), the peak
resident memory while streaming, and lost tags reported by the driver against the
mock's ground truth — once below the limit (expect 0) and once above it (15 M/s
offered for 2 s: every lost tag must be reported).  Driver and mock share this
process (2 cores): the rate is a lower bound of what the driver alone sustains.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import psutil

from qkdlab.drivers.idquantique.time_controller import (
    IDQTimeController,
    decode_timestamps,
    merge_channels,
)
from qkdlab.mock_instruments.idquantique.time_controller import serve

MB = 1024 * 1024


def _stream(name: str, rate_hz: float, seconds: float, pattern: str) -> dict[str, Any]:
    per_input = rate_hz / 4
    srv = serve(name, None, {"synthetic_rates_hz": f"0,{per_input},{per_input},{per_input},"
                                                   f"{per_input}",
                             "synthetic_pattern": pattern, "seed": "1"})
    srv.start()
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
    tc = IDQTimeController(name, srv.address, timeout=10)
    period_s = tc.sub_acquisition_s + tc.record_gap_s
    received = reported_lost = blocks = 0
    t0 = time.perf_counter()
    try:
        for block in tc.stream(seconds):
            received += len(block)
            reported_lost += block.lost_tags
            blocks += 1
        wall = time.perf_counter() - t0
        stats = tc.last_stream_stats
    finally:
        done.set()
        sampler.join()
        tc.close()
        srv.stop()
    history = list(srv.device.history)
    offered = sum(sum(h.offered.values()) for h in history)
    truth_lost = sum(sum(h.lost.values()) for h in history)
    data_s = blocks * period_s
    return {"received": received, "offered": offered, "wall": wall, "data_s": data_s,
            "reported_lost": reported_lost, "truth_lost": truth_lost,
            "missing": offered - received, "rss0": rss0, "peak": peak[0],
            "stats": stats}


def _decode_merge_rate(tags_per_channel: int = 480_000, repeats: int = 5) -> float:
    """Driver-side decode + 4-channel merge alone (no transport), tags/s on one core."""
    rng = np.random.default_rng(0)
    width = 2 * 10**11
    messages = [np.sort(rng.integers(0, width, tags_per_channel)).astype("<u8").tobytes()
                for _ in range(4)]
    t0 = time.perf_counter()
    for rep in range(repeats):
        times = []
        for msg in messages:
            ticks, _ = decode_timestamps(msg)
            t = ticks.astype(np.int64)
            t += np.int64(rep * width)
            times.append(t)
        merge_channels(times, [1, 2, 3, 4])
    return 4 * tags_per_channel * repeats / (time.perf_counter() - t0)


def _ratio(value: float, baseline: float) -> float | None:
    return value / baseline if baseline else None


def run() -> list[dict[str, Any]]:
    """Benchmark rows: {name, value, unit, baseline, ratio}."""
    rows: list[dict[str, Any]] = []
    alone = _decode_merge_rate()
    rows.append({"name": "tc driver decode+merge alone (1 core)", "value": alone,
                 "unit": "tags/s", "baseline": 10e6, "ratio": alone / 10e6})
    ok = _stream("tc_bench", 9.6e6, 5.0, "random")
    rate = ok["received"] / ok["wall"]
    offered_rate = ok["offered"] / ok["data_s"]
    rows.append({"name": "tc stream tags/s (9.6 M/s offered, 5 s)", "value": rate,
                 "unit": "tags/s", "baseline": offered_rate,
                 "ratio": _ratio(rate, offered_rate)})
    rows.append({"name": "tc stream wall time / data time", "value": ok["wall"] / ok["data_s"],
                 "unit": "s/s", "baseline": 1.0, "ratio": ok["wall"] / ok["data_s"]})
    rows.append({"name": "tc stream peak RSS", "value": ok["peak"] / MB, "unit": "MB",
                 "baseline": ok["rss0"] / MB, "ratio": _ratio(ok["peak"], ok["rss0"])})
    rows.append({"name": "tc stream peak queued blocks", "value": ok["stats"].peak_queue_blocks,
                 "unit": "blocks", "baseline": ok["stats"].queue_limit,
                 "ratio": _ratio(ok["stats"].peak_queue_blocks, ok["stats"].queue_limit)})
    rows.append({"name": "tc lost tags below limit (reported / truth)",
                 "value": ok["reported_lost"], "unit": "tags", "baseline": ok["truth_lost"],
                 "ratio": _ratio(ok["reported_lost"], ok["truth_lost"])})
    rows.append({"name": "tc tags missing below limit (truth − received)",
                 "value": ok["missing"], "unit": "tags", "baseline": 0, "ratio": None})
    over = _stream("tc_bench_over", 15e6, 2.0, "periodic")
    rows.append({"name": "tc lost tags above limit (reported / truth, 15 M/s)",
                 "value": over["reported_lost"], "unit": "tags", "baseline": over["truth_lost"],
                 "ratio": _ratio(over["reported_lost"], over["truth_lost"])})
    rows.append({"name": "tc unreported missing tags above limit",
                 "value": over["missing"] - over["reported_lost"], "unit": "tags",
                 "baseline": 0, "ratio": None})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
