"""Swabian Instruments time taggers (through the vendor's Python library)."""
