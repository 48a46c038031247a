"""Distil a secure key from a BB84 run: Alice's and Bob's post-processing, key stores.

Alice's record is her sifted bits with pulse, basis and intensity; Bob's the same
without the intensity.  They run :mod:`qkdlab.protocol.pipeline` over an authenticated
in-process channel (``qkdlab alice`` / ``qkdlab bob`` run them as two processes).  Each
side's net key goes to its own key store; the authentication key it used is paid back
into the authentication pool store (``keys/auth_pool``), from which the next block's
pool is drawn.

Two secrets must not be predictable from anything written before the run:

* **Alice's post-processing randomness** (which bits are test bits, the hash seeds):
  an Eve who knew the test bits in advance would attack only the others.  It comes
  from the OS's CSPRNG (:func:`secrets.randbits`), fresh per block.
* **The first authentication key**: it must be pre-shared (``qkdlab auth-pool add``);
  without one, a block is aborted with that reason and its sifted records stay on disk
  for ``qkdlab alice``/``bob`` once a key is in place.

On a simulated bench (``seeded_secrets``: the station launched mock instruments) both
are derived from the run seed instead, so that a seeded run is reproducible bit for bit;
such a key authenticates nothing a real adversary could not forge.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qkdlab.experiments.bb84.processing import BB84Settings, RunTotals
from qkdlab.protocol.keystore import KeyStore, KeyStoreError
from qkdlab.protocol.pipeline import (
    KEY_BASIS,
    KeyOutcome,
    PostProcessingParameters,
    SiftedRecord,
    postprocess_in_process,
)

log = logging.getLogger(__name__)

POOL_BITS = 1 << 20
"""Authentication key drawn for one block (bits)."""


@dataclass
class Distilled:
    """Both sides' outcomes (their key material already stored and released from
    memory: :meth:`KeyOutcome.released`) and where their keys went."""

    alice: KeyOutcome
    bob: KeyOutcome
    alice_key_file: str | None
    bob_key_file: str | None
    pool_source: str
    keys_match: bool
    """Both sides ended with a key, and the two keys were equal bit for bit."""


BLOCK_ID = re.compile(r"-b\d{4,}$")
"""Key ids of key blocks (``<run_id>-b0000``): the same on both sides."""


def block_id(run_id: str, block: int) -> str:
    """The key id (and sifted-record file stem) of ``block`` of a run."""
    return f"{run_id}-b{block:04d}"


def block_seed(seed: int, block: int) -> int:
    """Seed of Alice's post-processing randomness (test-bit sampling, hashing seeds) for
    ``block`` on a simulated bench: block 0 keeps the run seed; later blocks draw their
    own.  Real hardware uses :func:`fresh_seed` instead."""
    if block == 0:
        return seed
    return int(np.random.SeedSequence([seed, block]).generate_state(1, np.uint64)[0] >> 1)


def fresh_seed() -> int:
    """A seed for Alice's post-processing randomness from the OS's CSPRNG (63 bits)."""
    return secrets.randbits(63)


def alice_seed(settings: BB84Settings, block: int, seeded_secrets: bool) -> int:
    """Alice's post-processing seed for ``block``: :func:`block_seed` on a simulated
    bench (reproducible), else :func:`fresh_seed`."""
    return block_seed(settings.seed, block) if seeded_secrets else fresh_seed()


def _records_of(arrays: dict[str, Any]) -> tuple[SiftedRecord, SiftedRecord]:
    alice = SiftedRecord(arrays["pulse"], arrays["basis"], arrays["alice"],
                         arrays["intensity"])
    bob = SiftedRecord(arrays["pulse"], arrays["basis"], arrays["bob"])
    return alice, bob


def records(totals: RunTotals) -> tuple[SiftedRecord, SiftedRecord]:
    """Alice's and Bob's sifted records of a run."""
    return _records_of(totals.sifted_arrays())


def take_records(parts: Sequence[RunTotals]) -> tuple[SiftedRecord, SiftedRecord]:
    """Alice's and Bob's sifted records held by ``parts`` (a run's segments, in order),
    which give them up: a key block's records leave memory with it.

    Pulse indices of later parts are shifted past the earlier ones' last index, so they
    stay unique and in order within the block.
    """
    chunks: dict[str, list[np.ndarray[Any, Any]]] = {k: [] for k in
                                                     ("pulse", "basis", "intensity",
                                                      "alice", "bob")}
    offset = 0
    for part in parts:
        arrays = part.sifted_arrays()
        for lst in (part.sifted_pulse, part.sifted_basis, part.sifted_intensity,
                    part.sifted_alice, part.sifted_bob):
            lst.clear()
        if not arrays["pulse"].size:
            continue
        chunks["pulse"].append(arrays["pulse"] + offset)
        offset = int(chunks["pulse"][-1][-1]) + 1
        for k in ("basis", "intensity", "alice", "bob"):
            chunks[k].append(arrays[k])
    dtypes = {"pulse": np.int64, "basis": np.int8, "intensity": np.int8,
              "alice": np.uint8, "bob": np.uint8}
    return _records_of({k: np.concatenate(v) if v else np.zeros(0, dtypes[k])
                        for k, v in chunks.items()})


def save_records(totals: RunTotals, directory: str | Path, run_id: str) -> tuple[Path, Path]:
    """Alice's and Bob's sifted records as two files (0600) for ``qkdlab alice``/``bob``.

    Each holds one party's raw key material only: Bob's file has no intensities.
    """
    return save_record_pair(*records(totals), directory, run_id)


def save_record_pair(alice: SiftedRecord, bob: SiftedRecord, directory: str | Path,
                     stem: str) -> tuple[Path, Path]:
    """``<stem>-alice.npz`` and ``<stem>-bob.npz`` (0600), each written atomically."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = (directory / f"{stem}-alice.npz", directory / f"{stem}-bob.npz")
    for path, record in zip(paths, (alice, bob), strict=True):
        if path.exists():
            raise FileExistsError(f"{path} exists: sifted records are never overwritten")
        arrays = {"pulse": record.pulse, "basis": record.basis,
                  "bits": np.packbits(record.bits), "n": np.array([record.bits.size])}
        if record.intensity is not None:
            arrays["intensity"] = record.intensity
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # a crash leaves no file or a whole one
        finally:
            if tmp.exists():
                tmp.unlink()
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


class NoAuthenticationKeyError(KeyStoreError):
    """No pre-shared authentication key left for a block (real hardware)."""


def authentication_pool(key_dir: Path, seed: int, *, bootstrap: bool = False,
                        ) -> tuple[np.ndarray[Any, Any], str]:
    """Pre-shared key for this block (:data:`POOL_BITS` bits) from the pool store
    (``keys/auth_pool``: pre-shared, then refilled by earlier keys).

    An empty store raises :class:`NoAuthenticationKeyError`, unless ``bootstrap`` (a
    simulated bench): then a secret derived from the run seed, reproducible and so
    authenticating nothing a real adversary could not forge.
    """
    store = KeyStore(key_dir / "auth_pool")
    try:
        return store.consume(POOL_BITS), "auth-pool store"
    except KeyStoreError as err:
        if not bootstrap:
            raise NoAuthenticationKeyError(
                f"no pre-shared authentication key: {store.path} holds fewer than "
                f"{POOL_BITS} bits ({err}); add the same secret on both sides with "
                "'qkdlab auth-pool add FILE'") from err
        rng = np.random.default_rng([seed, 0xA117])
        return rng.integers(0, 2, POOL_BITS, dtype=np.uint8), "bootstrap (mock, not secret)"


def reconcile_key_stores(key_dir: str | Path) -> list[str]:
    """Delete key blocks that only one party's store holds; the ids deleted.

    Alice's key is stored before Bob's: a process killed in between leaves a key the
    other side lacks, and first-in-first-out consumption would then pair different
    keys.  Only key-block ids (:data:`BLOCK_ID`) are considered.  Two parties on two
    machines would compare their ids over the authenticated channel instead.
    """
    key_dir = Path(key_dir)
    stores = {side: KeyStore(key_dir / side) for side in ("alice", "bob")}
    ids = {side: {r.key_id for r in store.list() if BLOCK_ID.search(r.key_id)}
           for side, store in stores.items()}
    removed = []
    for side, other in (("alice", "bob"), ("bob", "alice")):
        for key_id in sorted(ids[side] - ids[other]):
            stores[side].delete(key_id)
            removed.append(key_id)
            log.warning("key store %s: removed key %s that %s never stored (interrupted "
                        "distillation)", side, key_id, other)
    return removed


def distill_block(alice_record: SiftedRecord, bob_record: SiftedRecord,
                  settings: BB84Settings, key_dir: str | Path, run_id: str, block: int,
                  *, seeded_secrets: bool = False) -> Distilled:
    """Post-process one key block into stored keys (id :func:`block_id`) or an abort
    reason.  Each block estimates its own parameters from its own test bits.

    ``seeded_secrets``: a simulated bench's reproducible randomness and bootstrap
    authentication key (module docstring); without, no pre-shared key aborts the block.
    """
    key_dir = Path(key_dir)
    reconcile_key_stores(key_dir)
    params = parameters(settings)
    try:
        pool, source = authentication_pool(key_dir, settings.seed, bootstrap=seeded_secrets)
    except NoAuthenticationKeyError as err:
        log.warning("key block %s: %s", block_id(run_id, block), err)
        aborted = KeyOutcome(aborted=True, reason=str(err),
                             sifted_key_bits=int(np.sum(alice_record.basis == KEY_BASIS)))
        return Distilled(alice=aborted, bob=aborted, alice_key_file=None,
                         bob_key_file=None, pool_source="none", keys_match=False)
    a, b = postprocess_in_process(alice_record, bob_record, params, pool,
                                  alice_seed(settings, block, seeded_secrets))
    files: list[str | None] = [None, None]
    match = a.key is not None and b.key is not None and bool(np.array_equal(a.key, b.key))
    if not a.aborted and not b.aborted and a.key is not None and b.key is not None:
        if not match:  # verification passed, so this cannot happen
            raise RuntimeError("keys differ after verification")
        for i, (side, outcome) in enumerate((("alice", a), ("bob", b))):
            store = KeyStore(key_dir / side)
            assert outcome.key is not None
            record = store.save(outcome.key, run_id=run_id, eps_sec=params.eps_sec,
                                eps_cor=params.eps_cor, key_id=block_id(run_id, block))
            files[i] = str(store.file_of(record.key_id))
        if a.pool_refill is not None and a.pool_refill.size:
            KeyStore(key_dir / "auth_pool").save(a.pool_refill, run_id=run_id,
                                                 eps_sec=params.eps_sec,
                                                 eps_cor=params.eps_cor)
    # stored (or aborted): a run of many blocks must not hold every key in memory
    return Distilled(alice=a.released(), bob=b.released(), alice_key_file=files[0],
                     bob_key_file=files[1], pool_source=source, keys_match=match)
