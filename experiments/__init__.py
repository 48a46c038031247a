"""Experiments (BB84 acquisition, timing synchronisation) written against roles."""
