"""The live dashboard window: panels, run controls, the stream and the run process.

A Qt timer reads the live stream every 5 ms and applies messages to the model
(O(message) each); the plots are redrawn only if something changed and at most
``refresh_hz`` times a second (default 25), text at most 4 times a second.  Message
arrival and drawing are decoupled: a burst of messages costs one redraw.

A run started here is a subprocess::

    python -m qkdlab.cli run bb84 --mock --publish ADDR --control ADDR2 \
        --duration D --distance-km L --data-dir DIR      (or --station FILE)

Stop sends ``stop`` on the run-control address; if the run has not ended
``stop_grace_s`` later it gets SIGINT (the CLI then closes the dataset as
"interrupted"), and if that does not end it either, it is killed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyqtgraph.Qt import QtCore, QtWidgets

from qkdlab.experiments.live import LiveSubscriber, RunControlClient
from qkdlab.gui.model import DEFAULT_HISTORY_S, DEFAULT_MAX_POINTS, DashboardModel
from qkdlab.gui.panels import CalibrationPanel, ErrorPanel, InstrumentPanel, PlotPanels

log = logging.getLogger(__name__)

RUN_COMMAND_PREFIX: list[str] = [sys.executable, "-m", "qkdlab.cli"]
"""How a run is started (the ``qkdlab`` CLI of this interpreter)."""


@dataclass
class RunRequest:
    """What the Start button starts."""

    mock: bool = True
    station: Path | None = None
    duration_s: float = 60.0
    distance_km: float = 25.0
    data_dir: Path = Path("data")

    def argv(self, publish: str, control: str,
             prefix: list[str] | None = None) -> list[str]:
        """The command line of the run process."""
        cmd = [*(RUN_COMMAND_PREFIX if prefix is None else prefix), "run", "bb84"]
        if self.mock:
            cmd += ["--mock", "--distance-km", f"{self.distance_km:g}"]
        else:
            if self.station is None:
                raise ValueError("a run on a bench needs a station file")
            cmd += ["--station", str(self.station)]
        return [*cmd, "--duration", f"{self.duration_s:g}", "--data-dir", str(self.data_dir),
                "--publish", publish, "--control", control]


def check_qt_binding() -> None:
    """Refuse a Qt binding that corrupts ``None``'s reference count.

    PySide6 6.12.0 on Python < 3.12 returns ``None`` from void methods without a new
    reference (it relies on 3.12's immortal ``None``): after a few thousand calls the
    interpreter aborts with "deallocating None".  Fail early with the fix instead.
    """
    probe = QtCore.QObject()
    before = sys.getrefcount(None)
    for _ in range(50):
        probe.setObjectName("probe")
    if sys.getrefcount(None) <= before - 50:
        raise RuntimeError(
            f"this Qt binding ({QtCore.__name__.split('.')[0]} {QtCore.qVersion()}) "
            f"corrupts None's reference count on Python {sys.version.split()[0]} and would "
            "crash the dashboard; install PySide6-Essentials<6.12 (or use Python >= 3.12)")


def free_local_addresses(n: int) -> list[str]:
    """``n`` distinct ``tcp://127.0.0.1:PORT`` addresses free right now (OS-chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in socks]
    finally:
        for s in socks:
            s.close()


class Dashboard(QtWidgets.QMainWindow):
    """The live dashboard.

    Args:
        connect: a live-stream address to subscribe to at once.
        control: that run's control address (else taken from its ``run`` start message).
        request: the run the Start button starts (mock or station, duration, distance).
        history_s: acquisition time shown (s); max_points: points kept per series.
        refresh_hz: highest plot redraw rate (Hz).
        run_command_prefix: the CLI the run process is started with.
        stop_grace_s: how long a stopped run may take before it gets SIGINT (s).
    """

    TEXT_HZ = 4.0
    """Refresh rate of labels and tables (Hz)."""
    POLL_MS = 5
    """How often the stream is read (ms): a frame waits at most this for its redraw,
    unless the last redraw was less than 1/refresh_hz ago."""

    drawn = QtCore.Signal(float, object)
    """After the plots were painted with new data: (time.time() when painted, publish
    times of the frames first shown by that paint)."""

    def __init__(self, *, connect: str | None = None, control: str | None = None,
                 request: RunRequest | None = None, history_s: float = DEFAULT_HISTORY_S,
                 max_points: int = DEFAULT_MAX_POINTS, refresh_hz: float = 25.0,
                 run_command_prefix: list[str] | None = None,
                 stop_grace_s: float = 30.0) -> None:
        check_qt_binding()
        super().__init__()
        self.setWindowTitle("qkdlab — live BB84 dashboard")
        self.model = DashboardModel(history_s=history_s, max_points=max_points)
        self.request = request or RunRequest()
        self.run_command_prefix = run_command_prefix
        self.stop_grace_s = stop_grace_s
        self.subscriber = LiveSubscriber()
        self.control: RunControlClient | None = None
        self.process: Any = None
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self.refreshes = 0
        self._drawn_version = -1
        self._stop_sent_at: float | None = None
        self._interrupted = False
        self._last_slow_refresh = 0.0
        self._last_text = 0.0
        self._text_version = -1
        self._stream_address: str | None = None
        self._closed = False

        self._undrawn: list[float] = []
        self.panels = PlotPanels()
        self.panels.widget.painted.connect(self._painted)
        self.calibration_panel = CalibrationPanel()
        self.instrument_panel = InstrumentPanel()
        self.error_panel = ErrorPanel()
        self._build()
        self.resize(1600, 1000)

        self.redraw_interval_s = 1.0 / refresh_hz
        self._last_redraw = 0.0
        self.timer = QtCore.QTimer(self)  # polls the socket; redraws are rate-limited
        self.timer.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
        self.timer.setInterval(self.POLL_MS)
        self.timer.timeout.connect(self.tick)
        self.timer.start()
        if connect:
            self.connect_stream(connect, control)
        self._update_controls()

    # -- layout ----------------------------------------------------------------------
    def _build(self) -> None:
        controls = QtWidgets.QWidget()
        controls.setFixedWidth(270)
        side = QtWidgets.QVBoxLayout(controls)
        side.setContentsMargins(6, 6, 6, 6)

        run_box = QtWidgets.QGroupBox("Run")
        form = QtWidgets.QFormLayout(run_box)
        self.mock_radio = QtWidgets.QRadioButton("Mock bench")
        self.station_radio = QtWidgets.QRadioButton("Station file")
        (self.mock_radio if self.request.mock else self.station_radio).setChecked(True)
        self.mock_radio.toggled.connect(self._update_controls)
        where = QtWidgets.QHBoxLayout()
        where.addWidget(self.mock_radio)
        where.addWidget(self.station_radio)
        form.addRow(where)
        self.distance_spin = QtWidgets.QDoubleSpinBox()
        self.distance_spin.setRange(0.0, 500.0)
        self.distance_spin.setDecimals(1)
        self.distance_spin.setSuffix(" km")
        self.distance_spin.setValue(self.request.distance_km)
        form.addRow("Fibre length", self.distance_spin)
        self.duration_spin = QtWidgets.QDoubleSpinBox()
        self.duration_spin.setRange(0.2, 86400.0)
        self.duration_spin.setDecimals(1)
        self.duration_spin.setSuffix(" s")
        self.duration_spin.setValue(self.request.duration_s)
        form.addRow("Duration", self.duration_spin)
        self.station_edit = QtWidgets.QLineEdit(str(self.request.station or ""))
        self.station_edit.setPlaceholderText("station.yaml")
        browse = QtWidgets.QPushButton("…")
        browse.setFixedWidth(28)
        browse.clicked.connect(self._browse_station)
        station_row = QtWidgets.QHBoxLayout()
        station_row.addWidget(self.station_edit)
        station_row.addWidget(browse)
        form.addRow("Station", station_row)
        self.data_dir_edit = QtWidgets.QLineEdit(str(self.request.data_dir))
        form.addRow("Data dir", self.data_dir_edit)
        buttons = QtWidgets.QHBoxLayout()
        self.start_button = QtWidgets.QPushButton("Start")
        self.start_button.clicked.connect(self.start_run)
        self.stop_button = QtWidgets.QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop_run)
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        form.addRow(buttons)
        side.addWidget(run_box)

        info_box = QtWidgets.QGroupBox("Live stream")
        info = QtWidgets.QFormLayout(info_box)
        self.info_labels: dict[str, Any] = {}
        for key, label in (("stream", "Stream"), ("run_id", "Run"), ("status", "Status"),
                           ("frames", "Frames"), ("dropped", "Dropped"),
                           ("rate", "Total rate"),
                           ("acq", "Acquired"), ("sifted", "Sifted"), ("qber", "QBER Z / X"),
                           ("sync", "Sync offset"),
                           ("secure", "Secure rate")):
            value = QtWidgets.QLabel("–")
            value.setWordWrap(True)
            value.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)
            self.info_labels[key] = value
            info.addRow(label, value)
        side.addWidget(info_box)

        self.snapshot_button = QtWidgets.QPushButton("Save snapshot (PNG)")
        self.snapshot_button.clicked.connect(lambda: self.save_snapshot())
        side.addWidget(self.snapshot_button)
        side.addStretch(1)

        bottom = QtWidgets.QWidget()
        row = QtWidgets.QHBoxLayout(bottom)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.calibration_panel, 4)
        row.addWidget(self.instrument_panel, 4)
        row.addWidget(self.error_panel, 5)
        splitter = QtWidgets.QSplitter(QtCore.Qt.Orientation.Vertical)
        splitter.addWidget(self.panels.widget)
        splitter.addWidget(bottom)
        splitter.setStretchFactor(0, 4)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([720, 230])
        splitter.setChildrenCollapsible(False)
        bottom.setMinimumHeight(170)

        central = QtWidgets.QWidget()
        main = QtWidgets.QHBoxLayout(central)
        main.setContentsMargins(4, 4, 4, 4)
        main.addWidget(controls)
        main.addWidget(splitter, 1)
        self.setCentralWidget(central)
        self.statusBar().showMessage("idle")

    def _browse_station(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, "Station file", "",
                                                        "Station files (*.yaml *.yml)")
        if path:
            self.station_edit.setText(path)
            self.station_radio.setChecked(True)

    # -- stream ----------------------------------------------------------------------
    def connect_stream(self, address: str, control: str | None = None) -> None:
        """Show the stream at ``address`` (instead of the current one)."""
        if self._stream_address is not None:
            self.subscriber.disconnect(self._stream_address)
        self.subscriber.connect(address)
        self._stream_address = address
        self._set_control(control)
        self.info_labels["stream"].setText(address)
        self._update_controls()

    def _set_control(self, address: str | None) -> None:
        if self.control is not None and (address is None or self.control.address != address):
            self.control.close()
            self.control = None
        if address and self.control is None:
            self.control = RunControlClient(address)

    def ingest(self, message: dict[str, Any]) -> None:
        """Apply one live-stream message (drawn at the next tick)."""
        self.model.ingest(message)

    def tick(self, *, redraw_now: bool = False) -> None:
        """Read what arrived and redraw what changed (the timer's slot).

        Plots are redrawn when data came, at most ``refresh_hz`` times a second; text
        (labels, tables, errors) at most ``TEXT_HZ`` times a second: relaying out text
        widgets at the plot rate cost a third of the redraw time.
        """
        if self._closed:
            return
        for message in self.subscriber.poll(0.0, max_messages=5000):
            self.model.ingest(message)
        run = self.model.run
        if self.control is None and run.control and not run.ended and self.process is None:
            self._set_control(run.control)  # a run started elsewhere said where to stop it
        now = time.monotonic()
        due = redraw_now or now - self._last_redraw >= self.redraw_interval_s
        if self.model.version != self._drawn_version and due:
            self._last_redraw = now
            self._drawn_version = self.model.version
            self.panels.refresh(self.model)
            self.refreshes += 1
            self._undrawn.extend(self.model.take_pending())
        self._refresh_text(force=False)

    def refresh_now(self) -> None:
        """Apply everything received, plots and text, at once (snapshots, tests)."""
        self.tick(redraw_now=True)
        self._refresh_text(force=True)

    def _refresh_text(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_text < 1 / self.TEXT_HZ:
            return
        if force or self.model.version != self._text_version:
            self._text_version = self.model.version
            self.instrument_panel.refresh(self.model)
            self.error_panel.refresh(self.model)
            self._update_info()
        if force or now - self._last_slow_refresh >= 1.0:  # ages move on by themselves
            self._last_slow_refresh = now
            self.calibration_panel.refresh(self.model)
            self._check_stop_escalation()
        self._update_controls()
        self._last_text = now

    def _painted(self) -> None:
        if self._undrawn:
            done, self._undrawn = self._undrawn, []
            self.drawn.emit(time.time(), done)

    def _label(self, key: str, text: str) -> None:
        """Set an info label's text (untouched if equal: no relayout)."""
        label = self.info_labels[key]
        if label.text() != text:
            label.setText(text)

    def _update_info(self) -> None:
        m = self.model
        run = m.run
        self._label("run_id", run.run_id or ("(id given at its end)" if run.info or m.frames
                                             else "–"))
        self._label("status", run.status)
        self._label("frames", f"{m.frames:,} (this run), {m.frames_total:,} in all")
        dropped = max(m.dropped, self.subscriber.dropped)
        self._label("dropped", f"{dropped:,} messages (sequence gaps)")
        t, _ = m.xy("t_s")
        self._label("acq", f"{t[-1]:.1f} s" if t.size else "–")
        _, total = m.xy("rate_total")
        self._label("rate", f"{total[-1]:,.0f} Hz (all channels)" if total.size else "–")
        _, z = m.xy("qber_z")
        _, x = m.xy("qber_x")
        self._label("qber", f"{z[-1]:.2f} % / {x[-1]:.2f} %" if z.size else "–")
        _, sifted = m.xy("sifted_rate_bps")
        self._label("sifted", f"{sifted[-1]:,.0f} bit/s" if sifted.size else "–")
        ref, now = m.sync_offset_ref_ps, m.sync_offset_ps
        self._label("sync", f"{now:,.0f} ps (first {ref:,.0f} ps)" if math.isfinite(ref)
                    else "–")
        est, kind = m.secure_rate_estimate
        self._label("secure", f"{est:,.0f} bit/s ({kind})" if math.isfinite(est)
                    else "not in stream (sifted only)")
        message = f"error: {m.errors[-1]}" if m.errors else f"{run.status}; {m.frames} frames"
        if self.statusBar().currentMessage() != message:
            self.statusBar().showMessage(message)

    # -- run process -----------------------------------------------------------------
    def _current_request(self) -> RunRequest:
        station = self.station_edit.text().strip()
        return RunRequest(mock=self.mock_radio.isChecked(),
                          station=Path(station) if station else None,
                          duration_s=self.duration_spin.value(),
                          distance_km=self.distance_spin.value(),
                          data_dir=Path(self.data_dir_edit.text().strip() or "data"))

    def start_run(self) -> bool:
        """Start a run process as the controls say; False (and an error shown) if not."""
        if self.process is not None:
            self.model.add_error("[gui] a run is already going; stop it first")
            return False
        request = self._current_request()
        publish, control = free_local_addresses(2)
        try:
            argv = request.argv(publish, control, self.run_command_prefix)
        except ValueError as err:
            self.model.add_error(f"[gui] {err}")
            return False
        self.request = request
        self.connect_stream(publish, control)
        self.model.reset_run()
        self.model.run.status = "starting"
        self.stderr_tail.clear()
        proc = QtCore.QProcess(self)
        proc.setProgram(argv[0])
        proc.setArguments(argv[1:])
        env = QtCore.QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        proc.setProcessEnvironment(env)
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.readyReadStandardOutput.connect(self._read_stdout)
        proc.finished.connect(self._process_finished)
        proc.errorOccurred.connect(self._process_error)
        self.process = proc
        self._stop_sent_at = None
        self._interrupted = False
        log.info("starting run: %s", " ".join(argv))
        proc.start()
        self.statusBar().showMessage("starting: " + " ".join(argv[3:]))
        self._update_controls()
        return True

    def stop_run(self) -> bool:
        """Ask the run to stop cleanly (dataset closed, status "stopped")."""
        if self.control is None:
            self.model.add_error("[gui] no run-control address: cannot stop this run")
            return False
        if not self.control.stop():
            self.model.add_error("[gui] stop command could not be queued")
            return False
        self._stop_sent_at = time.monotonic()
        self.model.run.status = "stop requested"
        self.model.version += 1
        self._update_controls()
        return True

    def _check_stop_escalation(self) -> None:
        if self._stop_sent_at is None or self.process is None:
            return
        waited = time.monotonic() - self._stop_sent_at
        pid = int(self.process.processId())
        if waited > self.stop_grace_s and not self._interrupted and pid > 0:
            self.model.add_error(f"[gui] run did not stop within {self.stop_grace_s:g} s; "
                                 "sending SIGINT")
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGINT)
            self._interrupted = True
        elif waited > 2 * self.stop_grace_s:
            self.model.add_error("[gui] run did not end after SIGINT; killing it")
            self.process.kill()

    def _read_stdout(self) -> None:
        if self.process is None:
            return
        text = bytes(self.process.readAllStandardOutput()).decode(errors="replace")
        for line in text.splitlines():
            if line.strip():
                log.info("run: %s", line)

    def _read_stderr(self) -> None:
        if self.process is None:
            return
        text = bytes(self.process.readAllStandardError()).decode(errors="replace")
        for line in text.splitlines():
            if not line.strip():
                continue
            self.stderr_tail.append(line)
            if line.startswith("qkdlab: error") or line.startswith(("ERROR", "CRITICAL")):
                self.model.add_error(f"[run process] {line}")

    def _process_error(self, error: Any) -> None:
        if error == QtCore.QProcess.ProcessError.FailedToStart:
            self.model.add_error(f"[gui] run process failed to start: "
                                 f"{self.process.errorString() if self.process else error}")
            self._finish_process(-1)

    def _process_finished(self, code: int, status: Any) -> None:
        self._read_stderr()
        self._read_stdout()
        self._finish_process(code)

    def _finish_process(self, code: int) -> None:
        if self.process is None:
            return
        crashed = self.process.exitStatus() == QtCore.QProcess.ExitStatus.CrashExit
        self.process.deleteLater()
        self.process = None
        run = self.model.run
        # a run that announced its end told how it went (a stopped run exits with 1);
        # otherwise the exit code and the last lines on stderr are all there is
        if crashed or (code != 0 and not run.ended):
            shown = {e.split(" ", 1)[-1] for e in self.model.errors}
            tail = [line for line in list(self.stderr_tail)[-6:]
                    if f"[run process] {line}" not in shown]
            how = "crashed" if crashed else f"exited with code {code}"
            self.model.add_error(f"[gui] run process {how}" +
                                 (": " + " | ".join(tail) if tail else ""))
        if not run.ended:
            run.status = f"{run.status}; process ended (exit code {code})"
        run.control = None
        self.model.version += 1
        self._stop_sent_at = None
        self._set_control(None)
        self._update_controls()

    def _update_controls(self) -> None:
        mock = self.mock_radio.isChecked()
        self.distance_spin.setEnabled(mock)
        self.station_edit.setEnabled(not mock)
        running = self.process is not None
        self.start_button.setEnabled(not running)
        self.stop_button.setEnabled(self.control is not None and self._stop_sent_at is None
                                    and (running or not self.model.run.ended))

    # -- snapshot and shutdown -------------------------------------------------------
    def save_snapshot(self, path: str | Path | None = None) -> Path:
        """Grab the window to a PNG (default: DATA_DIR/snapshots/dashboard-TIME.png)."""
        if path is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = Path(self.data_dir_edit.text() or "data") / "snapshots" / \
                f"dashboard-{stamp}.png"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.refresh_now()
        if not self.grab().save(str(path), "PNG"):
            self.model.add_error(f"[gui] could not write {path}")
            raise OSError(f"could not write the snapshot {path}")
        self.statusBar().showMessage(f"snapshot saved: {path}")
        return path

    def shutdown(self, timeout_s: float = 20.0) -> None:
        """Stop our run process (cleanly if it listens), then close the sockets."""
        self.timer.stop()
        proc = self.process
        not_running = QtCore.QProcess.ProcessState.NotRunning
        if proc is not None and proc.state() != not_running:
            if self.control is not None:
                self.control.stop("the dashboard is closing")
            if not proc.waitForFinished(round(timeout_s * 1000)):
                pid = int(proc.processId())
                if pid > 0 and proc.state() != not_running:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGINT)
                if not proc.waitForFinished(round(timeout_s * 1000)):
                    proc.kill()
                    proc.waitForFinished(2000)
        if self.control is not None:
            self.control.close()
            self.control = None
        if not self._closed:
            self._closed = True
            self.subscriber.close()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self.shutdown()
        super().closeEvent(event)
