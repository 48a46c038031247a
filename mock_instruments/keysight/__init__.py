"""Mock Keysight instruments."""
