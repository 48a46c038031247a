"""Drivers for OIF-ITLA (Integrable Tunable Laser Assembly) tunable lasers."""
