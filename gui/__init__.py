"""Live pyqtgraph dashboard (Qt is imported lazily, never at module import).

* :mod:`qkdlab.gui.model`: ring buffers and state built from live-stream messages
  (no Qt; O(message) per message, O(kept points) per redraw);
* :mod:`qkdlab.gui.panels`: the plots and status tables (imports Qt);
* :mod:`qkdlab.gui.app`: the window, run controls and the run subprocess (imports Qt);
* :mod:`qkdlab.gui.cli`: ``qkdlab gui`` (imports Qt only when it runs).

The dashboard only listens to the live stream (:mod:`qkdlab.experiments.live`).
"""
