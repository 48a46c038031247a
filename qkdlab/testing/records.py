"""Synthetic sifted records for post-processing tests (no bench, no tags)."""

from __future__ import annotations

import numpy as np

from qkdlab.protocol.pipeline import SiftedRecord


def sifted_records(n: int, qber: float, seed: int) -> tuple[SiftedRecord, SiftedRecord]:
    """Alice's and Bob's records of ``n`` sifted pulses: balanced bases, intensity
    classes 85/13/2 % (signal/decoy/vacuum), and Bob's bits flipped with probability
    ``qber``."""
    rng = np.random.default_rng(seed)
    pulse = np.sort(rng.choice(50 * n, n, replace=False)).astype(np.int64)
    basis = rng.integers(0, 2, n).astype(np.int8)
    intensity = rng.choice(3, n, p=[0.85, 0.13, 0.02]).astype(np.int8)
    alice = rng.integers(0, 2, n).astype(np.uint8)
    bob = alice ^ (rng.random(n) < qber).astype(np.uint8)
    return SiftedRecord(pulse, basis, alice, intensity), SiftedRecord(pulse, basis, bob)
