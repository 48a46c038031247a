"""Drivers for Single Quantum instruments (SNSPD systems driven through WebSQ)."""
