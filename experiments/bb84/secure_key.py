"""Distil a secure key from a BB84 run: Alice's and Bob's post-processing, key stores.

Alice's record is her sifted bits with pulse, basis and intensity; Bob's the same
without the intensity.  They run :mod:`qkdlab.protocol.pipeline` over an authenticated
in-process channel (``qkdlab alice`` / ``qkdlab bob`` run them as two processes).  Each
side's net key goes to its own key store; the authentication key it used is paid back
into the authentication pool store, from which the next block's pool is drawn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qkdlab.experiments.bb84.processing import BB84Settings, RunTotals
from qkdlab.protocol.keystore import KeyStore, KeyStoreError
from qkdlab.protocol.pipeline import (
    KeyOutcome,
    PostProcessingParameters,
    SiftedRecord,
    postprocess_in_process,
)

POOL_BITS = 1 << 20
"""Authentication key drawn for one block (bits)."""


@dataclass
class Distilled:
    """Both sides' outcomes and where their keys went."""

    alice: KeyOutcome
    bob: KeyOutcome
    alice_key_file: str | None
    bob_key_file: str | None
    pool_source: str

    @property
    def keys_match(self) -> bool:
        a, b = self.alice.key, self.bob.key
        return a is not None and b is not None and bool(np.array_equal(a, b))


def records(totals: RunTotals) -> tuple[SiftedRecord, SiftedRecord]:
    """Alice's and Bob's sifted records of a run."""
    arrays = totals.sifted_arrays()
    alice = SiftedRecord(arrays["pulse"], arrays["basis"], arrays["alice"],
                         arrays["intensity"])
    bob = SiftedRecord(arrays["pulse"], arrays["basis"], arrays["bob"])
    return alice, bob


def save_records(totals: RunTotals, directory: str | Path, run_id: str) -> tuple[Path, Path]:
    """Alice's and Bob's sifted records as two files (0600) for ``qkdlab alice``/``bob``.

    Each holds one party's raw key material only: Bob's file has no intensities.
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    alice, bob = records(totals)
    paths = (directory / f"{run_id}-alice.npz", directory / f"{run_id}-bob.npz")
    for path, record in zip(paths, (alice, bob), strict=True):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            arrays = {"pulse": record.pulse, "basis": record.basis,
                      "bits": np.packbits(record.bits), "n": np.array([record.bits.size])}
            if record.intensity is not None:
                arrays["intensity"] = record.intensity
            np.savez(f, **arrays)
    return paths


def load_record(path: str | Path) -> SiftedRecord:
    """A party's sifted record saved by :func:`save_records`."""
    with np.load(path) as data:
        n = int(data["n"][0])
        return SiftedRecord(pulse=data["pulse"], basis=data["basis"],
                            bits=np.unpackbits(data["bits"], count=n),
                            intensity=data.get("intensity", None))


def parameters(settings: BB84Settings) -> PostProcessingParameters:
    return PostProcessingParameters(
        intensities=(settings.mu_signal, settings.mu_decoy, settings.mu_vacuum),
        probabilities=settings.intensity_probs, abort_qber=settings.abort_qber)


def authentication_pool(key_dir: Path, seed: int) -> tuple[np.ndarray[Any, Any], str]:
    """Pre-shared key for this block: from the pool store (refilled by earlier keys) or,
    on a fresh bench, a bootstrap secret derived from the run seed (mock benches only:
    it is reproducible, so it authenticates nothing a real adversary could not forge)."""
    store = KeyStore(key_dir / "auth_pool")
    try:
        return store.consume(POOL_BITS), "auth-pool store"
    except KeyStoreError:
        rng = np.random.default_rng([seed, 0xA117])
        return rng.integers(0, 2, POOL_BITS, dtype=np.uint8), "bootstrap (mock, not secret)"


def distill(totals: RunTotals, settings: BB84Settings, key_dir: str | Path, run_id: str,
            ) -> Distilled:
    """Post-process a run's sifted bits into stored keys (or an abort reason)."""
    key_dir = Path(key_dir)
    params = parameters(settings)
    pool, source = authentication_pool(key_dir, settings.seed)
    alice_record, bob_record = records(totals)
    a, b = postprocess_in_process(alice_record, bob_record, params, pool, settings.seed)
    files: list[str | None] = [None, None]
    if not a.aborted and not b.aborted and a.key is not None and b.key is not None:
        if not np.array_equal(a.key, b.key):  # verification passed, so this cannot happen
            raise RuntimeError("keys differ after verification")
        for i, (side, outcome) in enumerate((("alice", a), ("bob", b))):
            store = KeyStore(key_dir / side)
            assert outcome.key is not None
            record = store.save(outcome.key, run_id=run_id, eps_sec=params.eps_sec,
                                eps_cor=params.eps_cor)
            files[i] = str(store.file_of(record.key_id))
        if a.pool_refill is not None and a.pool_refill.size:
            KeyStore(key_dir / "auth_pool").save(a.pool_refill, run_id=run_id,
                                                 eps_sec=params.eps_sec,
                                                 eps_cor=params.eps_cor)
    return Distilled(alice=a, bob=b, alice_key_file=files[0], bob_key_file=files[1],
                     pool_source=source)
