"""Calibration loops and the calibration store."""
