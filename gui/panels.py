"""The dashboard's panels: pyqtgraph plots and status tables, redrawn from the model.

Every plot has labelled axes with units and a legend.  Time-series x axes are the
run's acquisition time (s, summed frame durations, tagger clock).  Curves are
updated with ``setData`` on the model's bounded ring views; drawing is clipped to the
view and peak-downsampled, so a redraw costs O(points kept), not O(run length).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pyqtgraph as pg
from pyqtgraph.Qt import QtCore, QtGui, QtWidgets

from qkdlab.gui.model import INTENSITIES, DashboardModel, decimate

# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
           "#000000")
TIME_LABEL = ("Acquisition time", "s")
STATE_COLOURS = {"ok": "#1b7f3b", "stale": "#b86e00", "failed": "#c0392b",
                 "unknown": "#555555", "tripped": "#c0392b", "disconnected": "#c0392b"}

MAX_DRAWN_POINTS = 1200
"""Points handed to a curve: about two per pixel column of a plot at full HD."""

NO_SECURE_TITLE = "Key rate (sifted only: no secure estimate in the stream)"
SECURE_TITLE = "Key rate (sifted; secure from the run's result)"


def pen(i: int, width: float = 1.0, style: Any = None) -> Any:
    """The i-th palette colour as a pen (width 1: Qt strokes wider pens far slower)."""
    kw: dict[str, Any] = {"color": PALETTE[i % len(PALETTE)], "width": width}
    if style is not None:
        kw["style"] = style
    return pg.mkPen(**kw)


def format_age(seconds: float) -> str:
    """A human age: '12 s', '3.5 min', '2.0 h', '4.1 d' ('?' when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


class LayoutWidget(pg.GraphicsLayoutWidget):
    """A GraphicsLayoutWidget that says when it has painted (for latency figures)."""

    painted = QtCore.Signal()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        super().paintEvent(event)
        self.painted.emit()


class PlotPanels:
    """All plots in one GraphicsLayoutWidget (one scene: cheap to redraw).

    No grid lines: pyqtgraph draws them with every axis repaint, which doubled the
    redraw time of the full window (see benchmarks/bench_gui.py).
    """

    def __init__(self) -> None:
        pg.setConfigOptions(antialias=False, background="w", foreground="k")
        self.widget = LayoutWidget()
        self.widget.setMinimumSize(900, 560)
        lay = self.widget.ci
        lay.setSpacing(6)
        self.rates = self._plot(0, 0, "Count rate per detector", ("Count rate", "Hz"))
        self.qber_basis = self._plot(0, 1, "QBER per basis", ("QBER", "%"), si=False)
        self.qber_intensity = self._plot(0, 2, "QBER per intensity (both bases, log scale)",
                                         ("QBER", "%"), si=False)
        self.qber_intensity.setLogMode(y=True)
        self.key = self._plot(1, 0, NO_SECURE_TITLE, ("Key rate", "bit/s"))
        self.hist = self._plot(1, 1, "Timing histogram (latest frame)",
                               ("Detections per bin", ""), bottom=("Time from pulse", "ps"),
                               si=False, legend_columns=3)
        self.hist.getViewBox().setLimits(yMin=0)  # counts: no padding below zero
        self.sync = self._plot(1, 2, "Timing sync: offset change, clock drift",
                               ("Offset change since first frame", "ps"), si=False)
        # drift on a second y axis (right) sharing the time axis
        self.sync_drift_view = pg.ViewBox()
        self.sync_drift_view.suggestPadding = lambda axis: 0.01 if axis == 0 else 0.2
        self.sync.showAxis("right")
        self.sync.scene().addItem(self.sync_drift_view)
        right = self.sync.getAxis("right")
        right.linkToView(self.sync_drift_view)
        right.setLabel("Clock drift", units="ppm")
        right.enableAutoSIPrefix(False)
        right.setWidth(84)  # room for "12.500005"-long ticks and the label
        for col in range(3):
            lay.layout.setColumnStretchFactor(col, 1)
        self.sync_drift_view.setXLink(self.sync)
        self.sync.getViewBox().sigResized.connect(self._align_drift_view)
        for p in (self.qber_basis, self.qber_intensity, self.key, self.sync):
            p.setXLink(self.rates)
        self.rate_curves: dict[int, Any] = {}
        self.qber_curves = {
            "qber_z": self._curve(self.qber_basis, "Z basis", 0),
            "qber_x": self._curve(self.qber_basis, "X basis", 1),
        }
        for i, name in enumerate(INTENSITIES):
            self.qber_curves[f"qber_{name}"] = self._curve(self.qber_intensity, name, 2 + i)
        self.sifted_curve = self._curve(self.key, "sifted", 0)
        self.secure_curve = self.key.plot(pen=pen(2), connect="finite")  # legend: when used
        self.secure_in_legend = False
        self.secure_line = pg.InfiniteLine(angle=0, movable=False,
                                           pen=pen(1, 1.0, QtCore.Qt.PenStyle.DashLine))
        self.secure_line.setVisible(False)
        self.key.addItem(self.secure_line)
        self.secure_line_label: str | None = None
        self.secure_line_proxy = pg.PlotDataItem([], [], pen=pen(1, 1.0,
                                                 QtCore.Qt.PenStyle.DashLine))
        self.sync_offset_curve = self._curve(self.sync, "offset change (left)", 0)
        self.sync_drift_curve = pg.PlotDataItem(pen=pen(1), connect="finite")
        self.sync_drift_curve.setClipToView(True)
        self.sync_drift_curve.setDownsampling(auto=True, method="peak")
        self.sync_drift_curve.opts["autoDownsampleFactor"] = 1.0
        self.sync_drift_view.addItem(self.sync_drift_curve)
        self.sync.legend.addItem(self.sync_drift_curve, "drift (right)")
        self.hist_curves: dict[int, Any] = {}
        self.window_region = pg.LinearRegionItem(
            values=(0, 0), orientation="vertical", movable=False,
            brush=pg.mkBrush(0, 114, 178, 35), pen=pg.mkPen("#0072B2", width=1))
        self.window_region.setZValue(-10)
        self.window_region.setVisible(False)
        self.hist.addItem(self.window_region)
        proxy = pg.PlotDataItem([], [], pen=pg.mkPen("#0072B2"), fillLevel=0,
                                brush=pg.mkBrush(0, 114, 178, 60))
        self.hist.legend.addItem(proxy, "window")
        self.window_proxy = proxy
        self._window_shown = math.nan

    # -- construction ----------------------------------------------------------------
    def _plot(self, row: int, col: int, title: str, left: tuple[str, str],
              bottom: tuple[str, str] = TIME_LABEL, *, si: bool = True,
              layout: Any = None, legend_columns: int = 6, headroom: float = 0.2) -> Any:
        plot = (layout or self.widget.ci).addPlot(row=row, col=col)
        plot.setTitle(title, size="10pt")
        plot.setLabel("left", left[0], units=left[1] or None)
        plot.setLabel("bottom", bottom[0], units=bottom[1] or None)
        if not si:
            plot.getAxis("left").enableAutoSIPrefix(False)
        # time stays in s ("ks" after 17 min would confuse), ps stays in ps; labels on
        # major ticks only, so linked time axes of different widths look alike
        plot.getAxis("bottom").enableAutoSIPrefix(False)
        plot.getAxis("bottom").setStyle(maxTextLevel=0)
        plot.setClipToView(True)
        plot.setDownsampling(auto=True, mode="peak")
        # one-row legend at the top right, with head-room above the data for it
        plot.addLegend(offset=(-4, 2), labelTextSize="8pt",
                       colCount=legend_columns, brush=pg.mkBrush(255, 255, 255, 210),
                       verSpacing=-6)
        view = plot.getViewBox()
        view.setDefaultPadding(headroom)
        # the head-room is for the legend: little padding along x
        view.suggestPadding = lambda axis: 0.01 if axis == 0 else headroom
        return plot

    @staticmethod
    def _curve(plot: Any, name: str, colour: int) -> Any:
        curve = plot.plot(name=name, pen=pen(colour), connect="finite")
        curve.opts["autoDownsampleFactor"] = 1.0  # (peak) min and max per pixel column
        return curve

    def _ensure_channels(self, channels: list[int]) -> None:
        if list(self.rate_curves) == channels:
            return
        for curve in self.rate_curves.values():
            self.rates.removeItem(curve)
        for curve in self.hist_curves.values():
            self.hist.removeItem(curve)
        self.rate_curves = {ch: self._curve(self.rates, f"ch {ch}", i)
                            for i, ch in enumerate(channels)}
        self.hist_curves = {ch: self.hist.plot(name=f"ch {ch}", pen=pen(i), stepMode="center")
                            for i, ch in enumerate(channels)}

    # -- drawing -----------------------------------------------------------------------
    def refresh(self, model: DashboardModel) -> None:
        """Hand the model's current data to every curve."""
        self._ensure_channels(model.channels)
        for ch, curve in self.rate_curves.items():
            self._set(curve, model, f"rate_ch{ch}")
        for name, curve in self.qber_curves.items():
            self._set(curve, model, name)
        self._set(self.sifted_curve, model, "sifted_rate_bps")
        if model.secure_in_stream:
            if not self.secure_in_legend:
                self.key.legend.addItem(self.secure_curve, "secure (stream)")
                self.secure_in_legend = True
            self._set(self.secure_curve, model, "secure_rate_bps")
        else:
            self.secure_curve.setData([], [])
        estimate, kind = model.secure_rate_estimate
        self.secure_line.setVisible(math.isfinite(estimate))
        if math.isfinite(estimate):
            self.secure_line.setValue(estimate)
            label = f"secure ({kind})"
            if self.secure_line_label is None:
                self.secure_line_label = label
                self.key.legend.addItem(self.secure_line_proxy, label)
            elif self.secure_line_label != label:
                self.secure_line_label = label
                self.key.legend.getLabel(self.secure_line_proxy).setText(label)
        has_secure = model.secure_in_stream or math.isfinite(estimate)
        title = SECURE_TITLE if has_secure else NO_SECURE_TITLE
        if self.key.titleLabel.text != title:
            self.key.setTitle(title, size="10pt")
        self._set(self.sync_offset_curve, model, "sync_offset_change_ps")
        self._set(self.sync_drift_curve, model, "sync_drift_ppm")
        self._draw_histogram(model)

    def _align_drift_view(self) -> None:
        self.sync_drift_view.setGeometry(self.sync.getViewBox().sceneBoundingRect())
        self.sync_drift_view.linkedViewChanged(self.sync.getViewBox(),
                                               self.sync_drift_view.XAxis)

    @staticmethod
    def _set(curve: Any, model: DashboardModel, name: str) -> None:
        x, y = decimate(*model.xy(name), MAX_DRAWN_POINTS)
        curve.setData(np.array(x), np.array(y))  # copies: the rings move on

    def _draw_histogram(self, model: DashboardModel) -> None:
        hist = model.histogram
        lo, hi = model.histogram_range_ps
        if hist.size == 0 or not (math.isfinite(lo) and math.isfinite(hi)):
            return
        edges = np.linspace(lo, hi, hist.shape[1] + 1)
        for row, curve in zip(hist, self.hist_curves.values(), strict=False):
            curve.setData(edges, row.astype(np.float64))
        w = model.window_ps
        self.window_region.setVisible(math.isfinite(w))
        if math.isfinite(w) and w != self._window_shown:
            self._window_shown = w
            self.window_region.setRegion((-w / 2, w / 2))
            self.hist.legend.getLabel(self.window_proxy).setText(
                f"window ±{w / 2:,.0f} ps")

    def curve_data(self, curve: Any) -> tuple[np.ndarray, np.ndarray]:
        """The data a curve was given (before clipping and downsampling)."""
        x, y = curve.getOriginalDataset()
        if x is None:
            return np.zeros(0), np.zeros(0)
        return np.asarray(x), np.asarray(y)


def _item(text: str, colour: str | None = None, tip: str | None = None) -> Any:
    item = QtWidgets.QTableWidgetItem(text)
    item.setFlags(item.flags() & ~QtCore.Qt.ItemFlag.ItemIsEditable)
    if colour is not None:
        item.setForeground(QtGui.QBrush(QtGui.QColor(colour)))
    if tip:
        item.setToolTip(tip)
    return item


def _table(headers: list[str]) -> Any:
    table = QtWidgets.QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.verticalHeader().setVisible(False)
    header = table.horizontalHeader()
    header.setSectionResizeMode(QtWidgets.QHeaderView.ResizeMode.ResizeToContents)
    header.setSectionResizeMode(0, QtWidgets.QHeaderView.ResizeMode.Stretch)
    table.setHorizontalScrollBarPolicy(QtCore.Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    table.setWordWrap(False)
    table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.NoSelection)
    return table


class CalibrationPanel(QtWidgets.QGroupBox):
    """Calibration records with their age; stale or failed ones in colour."""

    EMPTY = "no calibration status received"

    def __init__(self) -> None:
        super().__init__("Calibration status")
        self.table = _table(["Calibration", "Value", "Age", "State"])
        self.note = QtWidgets.QLabel(self.EMPTY)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addWidget(self.note)
        lay.addWidget(self.table)
        self._shown: list[Any] = []

    def refresh(self, model: DashboardModel, now_unix_s: float | None = None) -> None:
        now = time.time() if now_unix_s is None else now_unix_s
        rows = model.calibration
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            state = r.state(now)
            value = f"{r.value} {r.unit}".strip()
            max_age = (f"stale after {format_age(r.max_age_s)}" if math.isfinite(r.max_age_s)
                       else "no maximum age")
            self.table.setItem(i, 0, _item(r.name, tip=f"id {r.id}" if r.id else None))
            self.table.setItem(i, 1, _item(value))
            self.table.setItem(i, 2, _item(format_age(r.age_s(now)), STATE_COLOURS.get(state)
                                           if state == "stale" else None, max_age))
            self.table.setItem(i, 3, _item(state.upper(), STATE_COLOURS.get(state), max_age))
        stale = sum(r.state(now) != "ok" for r in rows)
        if not rows:
            self.note.setText(self.EMPTY)
        else:
            self.note.setText(f"{len(rows)} records, {stale} not ok; received "
                              f"{format_age(now - model.calibration_received_unix_s)} ago")

    def states(self) -> list[str]:
        return [self.table.item(i, 3).text() for i in range(self.table.rowCount())]


class InstrumentPanel(QtWidgets.QGroupBox):
    """Instruments: connected, error count (last error as tooltip), interlock."""

    EMPTY = "no instrument status received"

    def __init__(self) -> None:
        super().__init__("Instrument status")
        self.table = _table(["Instrument", "Connected", "Errors", "Interlock"])
        self.note = QtWidgets.QLabel(self.EMPTY)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addWidget(self.note)
        lay.addWidget(self.table)

    def refresh(self, model: DashboardModel) -> None:
        rows = model.instruments
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            connected = "yes" if r.connected else "NO"
            self.table.setItem(i, 0, _item(r.name))
            self.table.setItem(i, 1, _item(connected, None if r.connected
                                            else STATE_COLOURS["disconnected"]))
            errors = f"{len(r.errors)}" + (f": {r.errors[-1]}" if r.errors else "")
            self.table.setItem(i, 2, _item(errors, STATE_COLOURS["failed"] if r.errors else None,
                                           "\n".join(r.errors) or None))
            interlock = r.interlock or "none"
            colour = STATE_COLOURS.get(interlock)
            self.table.setItem(i, 3, _item(interlock.upper() if colour else interlock, colour))
        bad = sum((not r.connected) or bool(r.errors) or r.interlock == "tripped" for r in rows)
        self.note.setText(f"{len(rows)} instruments, {bad} need attention" if rows
                          else self.EMPTY)

    def cell(self, row: int, col: int) -> str:
        return str(self.table.item(row, col).text())


class ErrorPanel(QtWidgets.QGroupBox):
    """Errors from the run (stream and process), newest last."""

    def __init__(self) -> None:
        super().__init__("Errors")
        self.list = QtWidgets.QListWidget()
        self.list.setWordWrap(True)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addWidget(self.list)
        self._shown = 0
        self._first: str | None = None

    def refresh(self, model: DashboardModel) -> None:
        errors = list(model.errors)
        # the deque is bounded: rebuild when its oldest entry changed, else append
        if errors and errors[0] != self._first:
            self.list.clear()
            self._shown = 0
            self._first = errors[0]
        for text in errors[self._shown:]:
            item = QtWidgets.QListWidgetItem(text)
            item.setForeground(QtGui.QBrush(QtGui.QColor(STATE_COLOURS["failed"])))
            self.list.addItem(item)
        if len(errors) > self._shown:
            self.list.scrollToBottom()
        self._shown = len(errors)
        self.setTitle(f"Errors ({len(errors)})")

    def texts(self) -> list[str]:
        return [self.list.item(i).text() for i in range(self.list.count())]
