"""Mocks of OIF-ITLA (Integrable Tunable Laser Assembly) tunable lasers."""
