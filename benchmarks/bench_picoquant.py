"""PicoQuant HydraHarp driver: tags/s decoded from a 5 s T2 PTU at 40 M counts/s.

The mock writes 5 s of 8 inputs at 5 M/s each (gaps ≥ 80 ns, so the HydraHarp's TDC
dead time drops nothing; 40 M/s total = the USB limit, so the FiFo never overruns)
into a temporary PTU file; :class:`PicoQuantHarp` then streams it through PicoQuant's
snAPI file device in 50 ms blocks.  Figures: stream tags/s and wall time per data
second, peak RSS while streaming (psutil, sampled every 20 ms) against the RSS before,
and the driver's numpy T2 decoder alone on the same records (no snAPI).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from qkdlab.drivers.picoquant.harp import PicoQuantHarp, T2DecodeState, decode_t2_records
from qkdlab.mock_instruments.picoquant.ptu import write_ptu_tags

MB = 1024 * 1024
CHUNK_PS = 10**10  # 10 ms of synthetic tags per write


def _source(seconds: float, rate_per_input: float, inputs: int = 8,
            seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    mean_gap = 1e12 / rate_per_input
    n = int(rate_per_input * CHUNK_PS / 1e12 * 1.3) + 100
    carry = np.zeros(inputs, np.int64)
    for k in range(round(seconds * 1e12 / CHUNK_PS)):
        end = (k + 1) * CHUNK_PS
        times, chans = [], []
        for i in range(inputs):
            gaps = 80_000 + rng.exponential(mean_gap - 80_000, n).astype(np.int64)
            t = carry[i] + np.cumsum(gaps)
            t = t[t < end]
            carry[i] = t[-1] if t.size else carry[i]
            times.append(t)
            chans.append(np.full(t.size, i + 1, np.int16))
        t_all = np.concatenate(times)
        order = np.argsort(t_all, kind="stable")
        yield t_all[order], np.concatenate(chans)[order]


def _stream_file(address: str, seconds: float) -> dict[str, Any]:
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
    tags = blocks = lost = 0
    try:
        with PicoQuantHarp("pq_bench", address, block_duration_s=0.05) as hh:
            t0 = time.perf_counter()
            for block in hh.stream(seconds):
                tags += len(block)
                blocks += 1
                lost += int(block.overflow)
            wall = time.perf_counter() - t0
            stats = hh.last_stream_stats
    finally:
        done.set()
        sampler.join()
    return {"tags": tags, "blocks": blocks, "wall": wall, "rss0": rss0, "peak": peak[0],
            "stats": stats, "flagged": lost}


def _numpy_decode_rate(path: Path, data_offset: int, records: int) -> float:
    """Driver's numpy decoder over the file (memory-mapped, 4 Mi-record chunks)."""
    recs = np.memmap(path, np.uint32, "r", offset=data_offset, shape=(records,))
    state = T2DecodeState()
    n = 0
    t0 = time.perf_counter()
    for i in range(0, records, 4 * 2**20):
        t, _ = decode_t2_records(recs[i:i + 4 * 2**20], 1, state)
        n += t.size
    return n / (time.perf_counter() - t0)


def run(seconds: float = 5.0) -> list[dict[str, Any]]:
    """Benchmark rows: {name, value, unit, baseline, ratio}."""
    folder = Path(tempfile.mkdtemp(prefix="qkdlab-bench-pq-"))
    try:
        t0 = time.perf_counter()
        res = write_ptu_tags(folder / "run.ptu", _source(seconds, 5e6), seconds)
        write_s = time.perf_counter() - t0
        offered = sum(res.written.values())
        rate_offered = offered / seconds
        out = _stream_file(res.address, seconds)
        numpy_rate = _numpy_decode_rate(res.path, res.data_offset, res.records)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rate = out["tags"] / out["wall"]
    rows: list[dict[str, Any]] = [
        {"name": "pq file written: counts/s in the PTU", "value": rate_offered,
         "unit": "counts/s", "baseline": 40e6, "ratio": rate_offered / 40e6},
        {"name": "pq mock write time per data second", "value": write_s / seconds,
         "unit": "s/s", "baseline": 1.0, "ratio": write_s / seconds},
        {"name": "pq snAPI stream tags/s decoded (5 s @ 40 M/s)", "value": rate,
         "unit": "tags/s", "baseline": rate_offered, "ratio": rate / rate_offered},
        {"name": "pq snAPI stream wall / data time", "value": out["wall"] / seconds,
         "unit": "s/s", "baseline": 1.0, "ratio": out["wall"] / seconds},
        {"name": "pq stream peak RSS", "value": out["peak"] / MB, "unit": "MB",
         "baseline": out["rss0"] / MB, "ratio": out["peak"] / out["rss0"]},
        {"name": "pq stream peak snAPI block (entries)",
         "value": out["stats"].peak_snapi_block, "unit": "entries",
         "baseline": out["stats"].block_records,
         "ratio": out["stats"].peak_snapi_block / out["stats"].block_records},
        {"name": "pq tags missing (written − streamed)", "value": offered - out["tags"],
         "unit": "tags", "baseline": 0, "ratio": None},
        {"name": "pq blocks flagged overflow", "value": out["flagged"], "unit": "blocks",
         "baseline": 0, "ratio": None},
        {"name": "pq numpy T2 decoder alone (1 core)", "value": numpy_rate,
         "unit": "tags/s", "baseline": rate, "ratio": numpy_rate / rate},
    ]
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
