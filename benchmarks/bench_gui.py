"""Live dashboard figures: publish-to-drawn latency, redraw rate, and no cost to a run.

``run() -> list[dict]`` rows ``{"name", "value", "unit", "baseline", "ratio", "note"}``:

* latency from a frame's publish to the end of the repaint that drew it, over a
  synthetic 30-minute stream (9000 frames of 0.2 s, 4 detectors, 100-bin histograms)
  replayed as fast as the dashboard accepts it (at most 25 frames ahead): median and
  95th percentile over the first and the last 500 frames (goal <= 100 ms, and flat:
  the end, with full 9000-point curves, no slower than the start);
* redraws per second while another process floods the stream (goal >= 20 /s);
* tags processed by a 1 s mock run with and without the dashboard attached (equal).

Headless (``QT_QPA_PLATFORM=offscreen``).  ``QKDLAB_BENCH_SCALE`` (default 1) scales
the stream length.  Run as a script to print the table.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SCALE = float(os.environ.get("QKDLAB_BENCH_SCALE", "1"))
FRAMES = max(1000, int(9000 * SCALE))  # 30 min at 5 frames/s
EDGE = 500
CREDIT = 25
Row = dict[str, Any]


def _row(name: str, value: float, unit: str, baseline: float | None = None,
         note: str = "") -> Row:
    ratio = value / baseline if baseline else None
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio,
            "note": note}


def synthetic_frame(i: int) -> dict[str, Any]:
    """A frame body like ``frame_message``'s (4 detectors, 100-bin histograms)."""
    wobble = (i * 7919) % 101 / 100.0
    hist = [[(b * 31 + i + d) % 50 + (2000 if 45 <= b < 55 else 0) for b in range(100)]
            for d in range(4)]
    return {"frame": i, "pulses": 2e7, "rate_total": 1.28e6 + 1e3 * wobble,
            **{f"rate_ch{c}": 3.2e5 + 250 * c * wobble for c in (1, 2, 3, 4)},
            "gain_signal": 0.017, "gain_decoy": 0.0035, "gain_vacuum": 1.3e-4,
            "qber_z": 0.015 + 0.001 * wobble, "qber_x": 0.015 - 0.001 * wobble,
            "qber_by_intensity": [0.014, 0.023, 0.3 + 0.1 * wobble],
            "sifted_bits": 126_000 + 100 * wobble, "unassigned": 2300.0, "lost_tags": 0.0,
            "sync_period_ps": 10000.125, "sync_offset_ps": 1.2e8 + 5 * wobble,
            "sync_drift_ppm": 12.5, "duration_s": 0.2, "histogram": hist,
            "histogram_range_ps": [-5000.0, 5000.0], "window_ps": 4000.0,
            "channels": [1, 2, 3, 4]}


def _app() -> Any:
    from pyqtgraph.Qt import QtWidgets

    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def _window(**kw: Any) -> Any:
    from qkdlab.gui.app import Dashboard

    window = Dashboard(**kw)
    window.resize(1600, 1000)
    window.show()
    return window


def latency_flatness() -> tuple[list[Row], Any]:
    """Latency of frames 0..EDGE vs the last EDGE of a FRAMES-long stream."""
    from qkdlab.experiments.live import LivePublisher

    app = _app()
    window = _window()
    latencies: list[float] = []

    def drawn(when: float, publish_times: list[float]) -> None:
        latencies.extend(when - t for t in publish_times)

    window.drawn.connect(drawn)
    pub = LivePublisher(hwm=1000)
    window.connect_stream(pub.address)
    while window.model.messages == 0:  # past ZeroMQ's slow-joiner gap
        pub.run_event("status", "benchmark")
        app.processEvents()
        time.sleep(0.01)
    frames = [synthetic_frame(i) for i in range(FRAMES)]

    def at_real_rate(first: int, count: int = 25) -> list[float]:
        """Publish ``count`` frames one per 0.2 s; their latencies (ms)."""
        settle = time.perf_counter() + 0.5  # earlier frames painted first
        while time.perf_counter() < settle:
            app.processEvents()
            time.sleep(0.001)
        latencies.clear()
        for i in range(first, first + count):
            pub.publish(frames[i % FRAMES] | {"frame": i})
            end = time.perf_counter() + 0.2
            while time.perf_counter() < end:
                app.processEvents()
                time.sleep(0.001)
        return [1000 * x for x in latencies]

    live_first = at_real_rate(0)
    window.model.reset_run()
    latencies.clear()
    done = threading.Event()
    base = window.model.frames_total

    def feed() -> None:
        for i, frame in enumerate(frames):
            while window.model.frames_total - base < i - CREDIT:  # as fast as accepted
                time.sleep(0.0005)
            pub.publish(frame)
        done.set()

    started = time.perf_counter()
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    while not (done.is_set() and window.model.frames_total - base >= FRAMES) and \
            time.perf_counter() - started < 1200:
        app.processEvents()
        time.sleep(0.001)
    elapsed = time.perf_counter() - started
    feeder.join(5)
    points = len(window.model.xy("t_s")[0])
    ms = [1000 * x for x in latencies]
    first, last = ms[:EDGE], ms[-EDGE:]
    live_ms = at_real_rate(FRAMES)
    p95 = statistics.quantiles
    rows = [
        _row("gui_latency_median_first500", statistics.median(first), "ms",
             note="publish -> repainted, frames 0-499 (goal <= 100 ms)"),
        _row("gui_latency_median_last500", statistics.median(last), "ms",
             statistics.median(first),
             note=f"frames {FRAMES - EDGE}-{FRAMES - 1}, curves at {points} points; "
                  "baseline: the first 500 (flat: ratio ~1)"),
        _row("gui_latency_p95_first500", p95(first, n=20)[-1], "ms"),
        _row("gui_latency_p95_last500", p95(last, n=20)[-1], "ms", p95(first, n=20)[-1]),
        _row("gui_latency_max", max(ms), "ms", note=f"over {len(ms)} frames"),
        _row("gui_latency_median_at_5hz_empty", statistics.median(live_first), "ms",
             note="25 frames at the real 5 Hz into empty plots (goal <= 100 ms)"),
        _row("gui_latency_median_at_5hz_full", statistics.median(live_ms), "ms",
             statistics.median(live_first),
             note=f"25 frames at 5 Hz after the replay, {points}-point series "
                  "(baseline: into empty plots; flat: ratio ~1)"),
        _row("gui_latency_max_at_5hz_full", max(live_ms), "ms",
             note=f"{len(live_ms)} of 25 frames drawn"),
        _row("gui_replay_rate", FRAMES / elapsed, "frames/s",
             note=f"{FRAMES} frames (= {FRAMES * 0.2 / 60:.0f} min at 5 Hz) replayed as fast "
                  f"as accepted, {window.refreshes} redraws"),
    ]
    pub.close()
    window.drawn.disconnect(drawn)
    return rows, window


def redraw_cost(cycles: int = 60) -> list[Row]:
    """CPU time of one redraw (ingest a frame, refresh, paint) with short and full series.

    CPU time of this process (``time.process_time``), so other load on the machine
    distorts it less than wall time; the implied rate is 1000 / (ms per redraw).
    """
    app = _app()
    window = _window(max_points=FRAMES)
    frames = [synthetic_frame(i) | {"type": "frame", "seq": i, "source": "cost",
                                    "time_unix_s": time.time()} for i in range(FRAMES)]

    def per_redraw(start: int) -> float:
        for m in frames[:start]:
            window.model.ingest(m)
        window.tick()
        app.processEvents()
        t0 = time.process_time()
        for m in frames[start:start + cycles]:
            window.model.ingest(m)
            window.tick(redraw_now=True)
            window.panels.widget.viewport().repaint()
        return 1000 * (time.process_time() - t0) / cycles

    short = per_redraw(10)
    window.model.reset_run()
    full = per_redraw(FRAMES - cycles)
    window.shutdown()
    window.close()
    return [
        _row("gui_redraw_cpu_short_series", short, "ms",
             note="ingest 1 frame + refresh + synchronous repaint, series of 10-70 points"),
        _row("gui_redraw_cpu_full_series", full, "ms", short,
             note=f"the same with {FRAMES}-point series (30 min); baseline: short series"),
        _row("gui_redraw_rate_implied_full", 1000 / full, "redraws/s", 20.0,
             note="1000 / CPU ms per redraw with full series; baseline: the 20 /s goal"),
    ]


FLOOD = """
import sys, time
sys.path.insert(0, {here!r})
from bench_gui import synthetic_frame
from qkdlab.experiments.live import LivePublisher
pub = LivePublisher({address!r})
end = time.monotonic() + {seconds}
i = 0
while time.monotonic() < end:
    pub.publish(synthetic_frame(i)); i += 1
    time.sleep({pause})
print(i)
pub.close()
"""


def refresh_under_flood(window: Any, seconds: float = 6.0, rate_hz: float = 500.0
                        ) -> list[Row]:
    """Redraws per second while another process publishes at ``rate_hz``."""
    from qkdlab.gui.app import free_local_addresses

    app = _app()
    address = free_local_addresses(1)[0]
    window.connect_stream(address)
    script = FLOOD.format(here=str(Path(__file__).resolve().parent), address=address,
                          seconds=seconds, pause=1.0 / rate_hz)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    while window.model.frames == 0 and proc.poll() is None:  # wait for the stream
        app.processEvents()
        time.sleep(0.001)
    frames0, redraws0, t0 = window.model.frames_total, window.refreshes, time.perf_counter()
    while proc.poll() is None:
        app.processEvents()
        time.sleep(0.001)
    elapsed = time.perf_counter() - t0
    app.processEvents()
    sent = int((proc.stdout.read() if proc.stdout else "0").strip() or 0)
    redraws = (window.refreshes - redraws0) / elapsed
    got = window.model.frames_total - frames0
    return [
        _row("gui_redraw_rate_under_flood", redraws, "redraws/s", 20.0,
             note=f"another process publishing ~{rate_hz:.0f} frames/s; redraws capped at 25/s; "
                  "baseline: the 20 /s goal"),
        _row("gui_frames_ingested_under_flood", got / elapsed, "frames/s",
             note=f"{sent} published in all; the rest dropped and counted "
                  f"({window.model.dropped} sequence gaps seen)"),
    ]


def _mock_run(data_dir: Path, window: Any = None) -> tuple[Any, int]:
    from qkdlab.cli import DEFAULT_MOCK_STATION, bb84_settings
    from qkdlab.experiments.bb84.run import run_bb84
    from qkdlab.experiments.live import LiveSession
    from qkdlab.roles import bb84_roles
    from qkdlab.station import open_station

    settings = bb84_settings(DEFAULT_MOCK_STATION, seed=5)
    if window is None:
        with open_station(DEFAULT_MOCK_STATION, seed=11) as loaded:
            return run_bb84(bb84_roles(loaded), settings, duration_s=1.0, data_dir=data_dir,
                            progress=False), 0
    app = _app()
    box: dict[str, Any] = {}
    with LiveSession("tcp://127.0.0.1:*", "tcp://127.0.0.1:*") as live:
        assert live.publisher is not None
        window.connect_stream(live.publisher.address)
        window.model.reset_run()
        while window.model.messages == 0 or window.model.run.status != "running":
            live.run_started(duration_s=1.0)
            app.processEvents()
            time.sleep(0.01)

        def go() -> None:
            with open_station(DEFAULT_MOCK_STATION, seed=11) as loaded:
                box["result"] = run_bb84(bb84_roles(loaded), settings, duration_s=1.0,
                                         data_dir=data_dir, progress=False,
                                         publish=live.publish,
                                         stop_requested=live.stop_requested)
        thread = threading.Thread(target=go, daemon=True)
        thread.start()
        while thread.is_alive():
            app.processEvents()
            time.sleep(0.002)
        live.run_ended(box["result"].summary())
        end = time.monotonic() + 5
        while window.model.frames < box["result"].totals.frames and time.monotonic() < end:
            app.processEvents()
            time.sleep(0.005)
    return box["result"], window.model.frames


def tags_with_and_without_gui(window: Any) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        alone, _ = _mock_run(Path(tmp) / "alone")
        watched, drawn = _mock_run(Path(tmp) / "watched", window)
    tags_alone = sum(alone.totals.counts.values())
    tags_watched = sum(watched.totals.counts.values())
    return [
        _row("mock_run_tags_with_gui", tags_watched, "tags", tags_alone,
             note="1 s mock run, same seeds; baseline: without the dashboard (equal: ratio 1)"),
        _row("mock_run_sifted_with_gui", int(watched.totals.sifted.sum()), "bits",
             int(alone.totals.sifted.sum())),
        _row("mock_run_frames_drawn", drawn, "frames", watched.totals.frames,
             note="frames the dashboard drew; baseline: frames the run published"),
    ]


def run() -> list[Row]:
    import qcodes

    db = qcodes.config.core.db_location
    with tempfile.TemporaryDirectory() as tmp:
        qcodes.config.core.db_location = str(Path(tmp) / "bench.db")
        try:
            rows = redraw_cost()
            more, window = latency_flatness()
            rows += more
            rows += refresh_under_flood(window)
            rows += tags_with_and_without_gui(window)
            window.shutdown()
            window.close()
        finally:
            qcodes.config.core.db_location = db
    return rows


if __name__ == "__main__":
    for r in run():
        base = "" if r["baseline"] is None else f"  baseline {r['baseline']:.4g}"
        ratio = "" if r["ratio"] is None else f"  ratio {r['ratio']:.3g}"
        print(f"{r['name']:<36} {r['value']:>12.4g} {r['unit']:<10}{base}{ratio}  {r['note']}")
