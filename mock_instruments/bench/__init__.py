"""Bench physics model (in progress)."""
