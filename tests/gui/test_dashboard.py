"""The live dashboard (headless): it shows what a run published, stops runs, shows errors."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qkdlab.experiments.live import LivePublisher, LiveSession

qtpy = pytest.importorskip("pyqtgraph.Qt")

from qkdlab.gui.app import Dashboard, RunRequest  # noqa: E402
from qkdlab.gui.panels import NO_SECURE_TITLE, SECURE_TITLE  # noqa: E402

QtCore = qtpy.QtCore

# ---------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def dashboard(qtbot: Any) -> Iterator[Dashboard]:
    window = Dashboard(refresh_hz=50, stop_grace_s=30)
    qtbot.addWidget(window)
    window.show()
    yield window
    window.shutdown(timeout_s=5)


def synthetic_frame(i: int, seq: int | None = None, source: str = "test",
                    duration_s: float = 0.2) -> dict[str, Any]:
    return {"type": "frame", "seq": i if seq is None else seq, "source": source,
            "time_unix_s": time.time(), "frame": i, "duration_s": duration_s,
            "channels": [1, 2], "rate_ch1": 1000.0 + i, "rate_ch2": 2000.0 + i,
            "rate_total": 3000.0 + 2 * i, "qber_z": 0.01, "qber_x": 0.02,
            "qber_by_intensity": [0.01, 0.02, None], "sifted_bits": 100.0 + i,
            "sync_offset_ps": 5e7 + i, "sync_drift_ppm": 1.5, "sync_period_ps": 1e4,
            "histogram": [[i] * 100, [2 * i] * 100], "histogram_range_ps": [-5e3, 5e3],
            "window_ps": 4e3}


def wait_connected(qtbot: Any, window: Dashboard, send: Any) -> None:
    """Send until the dashboard has heard something (ZeroMQ's slow-joiner gap)."""
    def heard() -> bool:
        send()
        window.tick()
        return window.model.messages > 0
    qtbot.waitUntil(heard, timeout=10_000)


class MockRun:
    """A BB84 run on the mock bench in a thread, published through a LiveSession."""

    def __init__(self, tmp_path: Path, duration_s: float) -> None:
        self.tmp_path = tmp_path
        self.duration_s = duration_s
        self.live = LiveSession("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
        assert self.live.publisher is not None
        self.address = self.live.publisher.address
        self.published: list[dict[str, Any]] = []
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _publish(self, message: dict[str, Any]) -> None:
        self.published.append(message)
        assert self.live.publish is not None
        self.live.publish(message)

    def _run(self) -> None:
        from qkdlab.cli import DEFAULT_MOCK_STATION, bb84_settings
        from qkdlab.experiments.bb84.run import run_bb84
        from qkdlab.roles import bb84_roles
        from qkdlab.station import open_station

        try:
            with self.live, open_station(DEFAULT_MOCK_STATION, seed=11) as loaded:
                self.result = run_bb84(
                    bb84_roles(loaded), bb84_settings(DEFAULT_MOCK_STATION, seed=5),
                    duration_s=self.duration_s, data_dir=self.tmp_path, progress=False,
                    publish=self._publish, stop_requested=self.live.stop_requested)
                self.live.run_ended(self.result.summary())
        except BaseException as err:  # reported by the test
            self.error = err

    def start(self, qtbot: Any, window: Dashboard) -> None:
        window.connect_stream(self.address)
        wait_connected(qtbot, window, lambda: self.live.run_started(duration_s=self.duration_s))
        self.thread.start()

    def join(self, timeout_s: float = 120) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "mock run did not end"
        if self.error is not None:
            raise self.error


def curve(window: Dashboard, item: Any) -> tuple[np.ndarray, np.ndarray]:
    return window.panels.curve_data(item)


def published_series(frames: list[dict[str, Any]], key: str, scale: float = 1.0
                     ) -> np.ndarray:
    return np.array([np.nan if m[key] is None else scale * m[key] for m in frames])


# ---------------------------------------------------------------------------------------
# a real mock run


def test_panels_show_exactly_what_a_mock_run_published(qtbot: Any, dashboard: Dashboard,
                                                       tmp_path: Path) -> None:
    import json

    run = MockRun(tmp_path, duration_s=0.8)
    run.start(qtbot, dashboard)
    run.join()
    assert run.result.status == "completed"
    frames = [json.loads(json.dumps(m)) for m in run.published]  # as on the wire
    frames = [{k: (None if isinstance(v, float) and v != v else v) for k, v in m.items()}
              for m in frames]
    assert len(frames) >= 3
    qtbot.waitUntil(lambda: bool(dashboard.model.run.summary), timeout=10_000)
    dashboard.refresh_now()
    assert dashboard.model.frames == len(frames)
    assert dashboard.model.dropped == 0

    t_expected = np.cumsum([m["duration_s"] for m in frames])
    channels = frames[0]["channels"]
    assert sorted(dashboard.panels.rate_curves) == channels
    for ch in channels:
        x, y = curve(dashboard, dashboard.panels.rate_curves[ch])
        np.testing.assert_array_equal(y, published_series(frames, f"rate_ch{ch}"))
        np.testing.assert_allclose(x, t_expected, rtol=1e-12)
    for key in ("qber_z", "qber_x"):
        _, y = curve(dashboard, dashboard.panels.qber_curves[key])
        np.testing.assert_array_equal(y, published_series(frames, key, 100.0))
    for k, name in enumerate(("signal", "decoy", "vacuum")):
        _, y = curve(dashboard, dashboard.panels.qber_curves[f"qber_{name}"])
        expected = [np.nan if m["qber_by_intensity"][k] is None
                    else 100.0 * m["qber_by_intensity"][k] for m in frames]
        np.testing.assert_array_equal(y, expected)
    _, y = curve(dashboard, dashboard.panels.sifted_curve)
    np.testing.assert_array_equal(y, [m["sifted_bits"] / m["duration_s"] for m in frames])
    _, y = curve(dashboard, dashboard.panels.sync_offset_curve)
    offsets = published_series(frames, "sync_offset_ps")
    np.testing.assert_array_equal(y, offsets - offsets[0])
    _, y = curve(dashboard, dashboard.panels.sync_drift_curve)
    np.testing.assert_array_equal(y, published_series(frames, "sync_drift_ppm"))

    last = frames[-1]
    lo, hi = last["histogram_range_ps"]
    for i, ch in enumerate(channels):
        x, y = curve(dashboard, dashboard.panels.hist_curves[ch])
        np.testing.assert_array_equal(y, last["histogram"][i])
        np.testing.assert_allclose(x, np.linspace(lo, hi, 101))
    region = dashboard.panels.window_region.getRegion()
    assert region == pytest.approx((-last["window_ps"] / 2, last["window_ps"] / 2))

    # no secure rate in the frames: the key panel says so, until the run's estimate
    summary = run.result.summary()
    assert dashboard.model.run.status == "completed"
    assert dashboard.model.run.run_id == summary["run_id"]
    assert dashboard.panels.key.titleLabel.text == SECURE_TITLE
    distilled = summary["secure_key_bits"] > 0
    expected = summary["secure_key_rate_bps" if distilled else "key_rate_bps"]
    assert dashboard.panels.secure_line.value() == pytest.approx(expected)
    assert dashboard.info_labels["run_id"].text() == summary["run_id"]


def test_stop_button_ends_the_run_stopped_with_its_dataset_closed(
        qtbot: Any, dashboard: Dashboard, tmp_path: Path) -> None:
    from qcodes.dataset import load_by_guid

    run = MockRun(tmp_path, duration_s=60.0)
    run.start(qtbot, dashboard)
    qtbot.waitUntil(lambda: dashboard.model.frames >= 1, timeout=60_000)
    assert dashboard.control is not None  # learnt from the run's start message
    assert dashboard.stop_button.isEnabled()
    qtbot.mouseClick(dashboard.stop_button, QtCore.Qt.MouseButton.LeftButton)
    run.join(timeout_s=60)
    assert run.result.status == "stopped"
    dataset = load_by_guid(run.result.dataset_guid)
    assert dataset.metadata["status"] == "stopped"
    assert dataset.completed  # the dataset was closed
    assert run.result.totals.pulses < 0.5 * 60.0 * run.result.settings.rep_rate_hz
    qtbot.waitUntil(lambda: dashboard.model.run.status == "stopped", timeout=10_000)
    assert not dashboard.stop_button.isEnabled()


# ---------------------------------------------------------------------------------------
# errors, status panels


def test_an_error_message_shows_in_the_window(qtbot: Any, dashboard: Dashboard) -> None:
    with LivePublisher() as pub:
        dashboard.connect_stream(pub.address)
        wait_connected(qtbot, dashboard, lambda: pub.run_event("status", "running"))
        pub.error("detector 3 stopped answering", origin="run", fatal=True)
        qtbot.waitUntil(lambda: any("detector 3 stopped answering" in t
                                    for t in dashboard.error_panel.texts()), timeout=5000)
    assert "detector 3 stopped answering" in dashboard.statusBar().currentMessage()
    assert dashboard.error_panel.title() == "Errors (1)"


def test_a_failing_run_process_shows_its_error_in_the_window(qtbot: Any,
                                                             dashboard: Dashboard) -> None:
    dashboard.run_command_prefix = [
        sys.executable, "-c",
        "import sys; sys.stderr.write('qkdlab: error: no such station\\n'); sys.exit(2)"]
    qtbot.mouseClick(dashboard.start_button, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: dashboard.process is None, timeout=20_000)
    dashboard.refresh_now()
    texts = dashboard.error_panel.texts()
    assert any("[run process] qkdlab: error: no such station" in t for t in texts)
    assert any("run process exited with code 2" in t for t in texts)
    assert dashboard.start_button.isEnabled()


def test_start_builds_the_run_command_and_listens_to_its_stream(
        qtbot: Any, dashboard: Dashboard, tmp_path: Path) -> None:
    dashboard.run_command_prefix = [sys.executable, "-c", "import time; time.sleep(60)"]
    dashboard.distance_spin.setValue(40.0)
    dashboard.duration_spin.setValue(12.5)
    dashboard.data_dir_edit.setText(str(tmp_path))
    assert dashboard.start_run()
    args = list(dashboard.process.arguments())
    publish = args[args.index("--publish") + 1]
    control = args[args.index("--control") + 1]
    assert args[2:] == ["run", "bb84", "--mock", "--distance-km", "40", "--duration", "12.5",
                        "--data-dir", str(tmp_path), "--publish", publish,
                        "--control", control]
    assert dashboard.subscriber.addresses == [publish]
    assert dashboard.control is not None
    assert dashboard.control.address == control
    assert not dashboard.start_button.isEnabled()
    assert not dashboard.start_run()  # one run at a time
    proc = dashboard.process
    dashboard.shutdown(timeout_s=0.5)  # the fake run ignores stop: SIGINT ends it
    assert proc.state() == QtCore.QProcess.ProcessState.NotRunning
    assert dashboard.process is None


def test_a_bench_run_needs_a_station_file() -> None:
    request = RunRequest(mock=False, station=Path("bench.yaml"), duration_s=5, data_dir=Path("d"))
    argv = request.argv("tcp://a", "tcp://b", prefix=["qkdlab"])
    assert argv == ["qkdlab", "run", "bb84", "--station", "bench.yaml", "--duration", "5",
                    "--data-dir", "d", "--publish", "tcp://a", "--control", "tcp://b"]
    with pytest.raises(ValueError, match="station file"):
        RunRequest(mock=False).argv("tcp://a", "tcp://b")


def test_calibration_and_instrument_status_show_with_staleness(
        qtbot: Any, dashboard: Dashboard) -> None:
    now = time.time()
    with LivePublisher() as pub:
        dashboard.connect_stream(pub.address)
        wait_connected(qtbot, dashboard, lambda: pub.run_event("status", "running"))
        pub.calibration([
            {"name": "efficiency ch1", "value": 0.2, "unit": "", "id": "c1",
             "timestamp_unix_s": now - 3600, "max_age_s": 86400, "ok": True},
            {"name": "IM bias", "value": 1.2, "unit": "V", "id": "c2",
             "timestamp_unix_s": now - 3 * 86400, "max_age_s": 86400, "ok": True},
            {"name": "polarisation", "value": None, "unit": "", "id": "c3",
             "timestamp_unix_s": now, "max_age_s": 3600, "ok": False}])
        pub.instruments([
            {"name": "laser", "connected": True, "errors": [], "interlock": "ok"},
            {"name": "tagger", "connected": True, "errors": ["overflow ch 3"],
             "interlock": None},
            {"name": "snspd", "connected": False, "errors": [], "interlock": "tripped"}])
        qtbot.waitUntil(lambda: dashboard.instrument_panel.table.rowCount() == 3
                        and dashboard.calibration_panel.table.rowCount() == 3, timeout=5000)
    assert dashboard.calibration_panel.states() == ["OK", "STALE", "FAILED"]
    assert dashboard.calibration_panel.table.item(1, 2).text() == "3.0 d"
    assert dashboard.calibration_panel.table.item(1, 1).text() == "1.2 V"
    panel = dashboard.instrument_panel
    assert [panel.cell(r, 1) for r in range(3)] == ["yes", "yes", "NO"]
    assert panel.cell(1, 2) == "1: overflow ch 3"
    assert [panel.cell(r, 3) for r in range(3)] == ["OK", "none", "TRIPPED"]
    assert panel.note.text() == "3 instruments, 2 need attention"


def test_key_panel_shows_the_distilled_rate_else_the_estimate(dashboard: Dashboard) -> None:
    panels = dashboard.panels
    dashboard.ingest(synthetic_frame(0))
    dashboard.refresh_now()
    assert panels.key.titleLabel.text == NO_SECURE_TITLE
    assert not panels.secure_line.isVisible()
    assert dashboard.info_labels["secure"].text() == "not in stream (sifted only)"
    end = {"type": "run", "seq": 1, "source": "test", "event": "end", "status": "completed"}
    dashboard.ingest(end | {"summary": {"key_rate_bps": 2.0e5, "secure_key_bits": 0,
                                        "secure_key_rate_bps": 0.0, "key_file": None}})
    dashboard.refresh_now()
    assert panels.key.titleLabel.text == SECURE_TITLE
    assert panels.secure_line.value() == 2.0e5
    assert panels.key.legend.getLabel(panels.secure_line_proxy).text == \
        "secure (asymptotic estimate)"
    dashboard.ingest(end | {"seq": 2, "summary": {
        "key_rate_bps": 2.0e5, "secure_key_bits": 180_000, "secure_key_rate_bps": 4.5e4,
        "key_file": "keys/alice/k.key"}})
    dashboard.refresh_now()
    assert panels.secure_line.value() == 4.5e4
    assert panels.key.legend.getLabel(panels.secure_line_proxy).text == \
        "secure (distilled key)"
    assert dashboard.info_labels["secure"].text() == "45,000 bit/s (distilled key)"


def test_calibration_goes_stale_as_time_passes(dashboard: Dashboard) -> None:
    now = time.time()
    dashboard.ingest({"type": "calibration", "seq": 0, "source": "s", "time_unix_s": now,
                      "records": [{"name": "bias", "value": 1.0, "unit": "V",
                                   "timestamp_unix_s": now - 50, "max_age_s": 60}]})
    dashboard.calibration_panel.refresh(dashboard.model, now_unix_s=now)
    assert dashboard.calibration_panel.states() == ["OK"]
    dashboard.calibration_panel.refresh(dashboard.model, now_unix_s=now + 20)
    assert dashboard.calibration_panel.states() == ["STALE"]


# ---------------------------------------------------------------------------------------
# bounded cost, drops, runs, snapshot


def test_series_are_bounded_ring_buffers(qtbot: Any) -> None:
    window = Dashboard(max_points=50, history_s=float("inf"))
    qtbot.addWidget(window)
    for i in range(500):
        window.ingest(synthetic_frame(i))
    window.refresh_now()
    x, y = window.panels.curve_data(window.panels.rate_curves[1])
    np.testing.assert_array_equal(y, 1000.0 + np.arange(450, 500))
    np.testing.assert_allclose(x, 0.2 * np.arange(451, 501))
    assert all(ring._buf.size == 100 for ring in window.model.series.values())
    window.shutdown()


def test_only_the_shown_history_is_drawn(qtbot: Any) -> None:
    window = Dashboard(history_s=5.0)
    qtbot.addWidget(window)
    for i in range(100):  # 20 s of 0.2 s frames
        window.ingest(synthetic_frame(i))
    window.refresh_now()
    x, y = window.panels.curve_data(window.panels.rate_curves[2])
    assert x[0] == pytest.approx(15.0)
    assert x[-1] == pytest.approx(20.0)
    np.testing.assert_array_equal(y, 2000.0 + np.arange(74, 100))
    window.shutdown()


def test_sequence_gaps_are_counted_and_shown(dashboard: Dashboard) -> None:
    for i, seq in enumerate([0, 1, 5, 6, 10]):
        dashboard.ingest(synthetic_frame(i, seq=seq))
    dashboard.refresh_now()
    assert dashboard.model.dropped == 6
    assert dashboard.info_labels["dropped"].text().startswith("6 messages")


def test_a_new_run_clears_the_plots(dashboard: Dashboard) -> None:
    for i in range(10):
        dashboard.ingest(synthetic_frame(i, source="run-1"))
    for i in range(3):  # another process publishes: another run
        dashboard.ingest(synthetic_frame(i, source="run-2"))
    dashboard.refresh_now()
    _, y = dashboard.panels.curve_data(dashboard.panels.rate_curves[1])
    np.testing.assert_array_equal(y, [1000.0, 1001.0, 1002.0])
    assert dashboard.model.frames == 3
    assert dashboard.model.frames_total == 13


def test_snapshot_button_saves_the_window_as_png(qtbot: Any, dashboard: Dashboard,
                                                 tmp_path: Path) -> None:
    from pyqtgraph.Qt import QtGui

    dashboard.data_dir_edit.setText(str(tmp_path))
    for i in range(5):
        dashboard.ingest(synthetic_frame(i))
    qtbot.mouseClick(dashboard.snapshot_button, QtCore.Qt.MouseButton.LeftButton)
    files = list((tmp_path / "snapshots").glob("dashboard-*.png"))
    assert len(files) == 1
    image = QtGui.QImage(str(files[0]))
    assert (image.width(), image.height()) == (dashboard.width(), dashboard.height())
    assert str(files[0]) in dashboard.statusBar().currentMessage()


# ---------------------------------------------------------------------------------------
# the command line


def _gui_command(args: list[str]) -> int:
    """``qkdlab gui ...`` as its own process: it runs (and ends) a Qt application, which
    in this process would leave Qt unable to drive a later test's QProcess."""
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    done = subprocess.run([sys.executable, "-m", "qkdlab.gui.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    return done.returncode


def test_gui_cli_screenshot_of_a_connected_stream(qtbot: Any, tmp_path: Path) -> None:
    out = tmp_path / "shot.png"
    stop = threading.Event()
    with LivePublisher() as pub:
        def feed() -> None:
            i = 0
            while not stop.is_set():
                pub.publish({k: v for k, v in synthetic_frame(i).items()
                             if k not in ("type", "seq", "source", "time_unix_s")})
                i += 1
                time.sleep(0.05)
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            code = _gui_command(["--connect", pub.address, "--screenshot", str(out),
                                 "--after", "0.3", "--timeout", "60", "--size", "1200x800"])
        finally:
            stop.set()
            feeder.join(5)
    assert code == 0
    from pyqtgraph.Qt import QtGui

    image = QtGui.QImage(str(out))
    assert (image.width(), image.height()) == (1200, 800)


def test_gui_cli_screenshot_without_frames_still_grabs_and_fails(tmp_path: Path,
                                                                 qtbot: Any) -> None:
    out = tmp_path / "empty.png"
    code = _gui_command(["--connect", "tcp://127.0.0.1:9", "--screenshot", str(out),
                         "--after", "0", "--timeout", "0.5"])
    assert code == 1
    assert out.stat().st_size > 0


def test_gui_subcommand_plugs_into_a_parser() -> None:
    import argparse

    from qkdlab.gui.cli import add_parser, cmd_gui

    parser = argparse.ArgumentParser(prog="qkdlab")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["gui", "--mock", "--duration", "5", "--distance-km", "50"])
    assert args.func is cmd_gui
    assert (args.mock, args.duration, args.distance_km) == (True, 5.0, 50.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["gui", "--mock", "--station", "x.yaml"])


def test_stream_and_cli_modules_do_not_import_qt() -> None:
    code = ("import sys, qkdlab.gui, qkdlab.gui.cli, qkdlab.gui.model, qkdlab.experiments.live;"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('PySide6', 'PyQt6', 'PyQt5', 'pyqtgraph')]; print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _cli_has_live_flags() -> bool:
    from qkdlab.cli import build_parser

    try:
        build_parser().parse_args(["run", "bb84", "--mock", "--publish", "tcp://x:1",
                                   "--control", "tcp://x:2"])
    except SystemExit:
        return False
    return True


def test_start_and_stop_a_mock_run_through_the_cli(qtbot: Any, dashboard: Dashboard,
                                                   tmp_path: Path, capsys: Any) -> None:
    assert _cli_has_live_flags()
    dashboard.data_dir_edit.setText(str(tmp_path))
    dashboard.duration_spin.setValue(60.0)
    assert dashboard.start_run()
    try:
        qtbot.waitUntil(lambda: dashboard.model.frames >= 2, timeout=90_000)
    except Exception:
        raise AssertionError(f"no frames; run stderr: {list(dashboard.stderr_tail)[-15:]}; "
                             f"errors: {list(dashboard.model.errors)[-5:]}") from None
    qtbot.mouseClick(dashboard.stop_button, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: dashboard.process is None, timeout=60_000)
    dashboard.refresh_now()
    assert dashboard.model.run.status == "stopped"
    assert dashboard.model.run.summary["status"] == "stopped"
    assert not dashboard.model.errors  # a requested stop is no error (though it exits 1)


def test_long_series_are_drawn_as_their_envelope(qtbot: Any) -> None:
    from qkdlab.gui.model import decimate
    from qkdlab.gui.panels import MAX_DRAWN_POINTS

    rng = np.random.default_rng(1)
    y = rng.normal(size=9001)
    y[100:300] = np.nan  # a gap: NaN blocks stay NaN, without warnings
    x = np.arange(y.size, dtype=float)
    xs, ys = decimate(x, y, 1200)
    assert xs.size <= 1202
    block = -(-y.size // 600)  # 600 blocks of min and max
    assert (xs[-1], ys[-1]) == (x[-1], np.nanmax(y[-block:]))
    assert np.nanmax(ys) == np.nanmax(y)
    assert np.nanmin(ys) == np.nanmin(y)
    assert np.isnan(ys).any()
    assert np.all(np.diff(xs) >= 0)

    window = Dashboard(history_s=float("inf"))
    qtbot.addWidget(window)
    for i in range(3000):
        window.ingest(synthetic_frame(i))
    window.refresh_now()
    xd, yd = window.panels.curve_data(window.panels.rate_curves[1])
    assert xd.size <= MAX_DRAWN_POINTS + 2
    assert (yd.min(), yd.max()) == (1000.0, 1000.0 + 2999)
    assert xd[-1] == pytest.approx(0.2 * 3000)
    window.shutdown()
