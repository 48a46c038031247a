"""Live pyqtgraph dashboard (Qt is imported lazily, never at module import)."""
