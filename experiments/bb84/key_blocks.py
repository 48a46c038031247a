"""Key blocks: a run's sifted records cut into blocks and distilled while it runs.

A run holds each sifted bit's record (pulse, basis, intensity, both parties' bits: 12
bytes) until it is post-processed.  Held for a whole run, that is memory growing with
the run (about 9 MB/s at 25 km on the mock station: 16 GB in half an hour), so records
are cut into **key blocks** of ``block_bits`` sifted key-basis bits: each block's records
are written to ``sifted/<block id>-{alice,bob}.npz`` and distilled in a worker thread
(its own parameter estimation, error correction, verification and privacy
amplification: a block is a finite-key block of its own), and leave memory.  At most
one block is in the worker while the next one fills; a block ready before the worker
is free waits for it (memory stays at about two blocks).

How the run ends decides the last, partial block: a completed run distils it with the
others; a run that failed, stopped or aborted drops it (a partial block never becomes
key) but keeps the whole blocks before it, each of which was verified on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from qkdlab.experiments.bb84.heap import release_free_heap
from qkdlab.experiments.bb84.processing import BB84Settings, FrameStats, RunTotals
from qkdlab.experiments.bb84.secure_key import (
    Distilled,
    block_id,
    distill_block,
    save_record_pair,
    take_records,
)
from qkdlab.protocol.pipeline import SiftedRecord

log = logging.getLogger(__name__)

DEFAULT_BLOCK_BITS = 1 << 23
"""Sifted key-basis bits per key block (8.4 Mbit, ~100 MB of records): large enough
for the finite-key terms to cost little at 25 km, small enough to keep memory flat."""


class KeyBlocks:
    """Cuts the sifted records of a run into key blocks and distils them.

    Args:
        settings: the run's settings (intensities, probabilities, seed).
        data_dir: the run's data folder (``sifted/`` and ``keys/`` go there).
        run_id: the run; block ids are ``<run_id>-b0000``, ``-b0001``...
        block_bits: sifted key-basis bits per block; ``None``: one block at the end.
        distill: distil the blocks into keys (else only their records are written).
        seeded_secrets: a simulated bench's reproducible post-processing randomness and
            bootstrap authentication key (:func:`distill_block`).
    """

    def __init__(self, settings: BB84Settings, data_dir: Path, run_id: str,
                 block_bits: int | None, distill: bool, *,
                 seeded_secrets: bool = False) -> None:
        if block_bits is not None and block_bits < 1:
            raise ValueError(f"key_block_bits must be >= 1 or None, got {block_bits}")
        self.settings = settings
        self.data_dir = data_dir
        self.run_id = run_id
        self.block_bits = block_bits
        self.distill = distill
        self.seeded_secrets = seeded_secrets
        self.blocks: list[Distilled] = []
        self.block_files: list[tuple[Path, Path]] = []
        self._pending_key_bits = 0
        self._next = 0
        self._worker: ThreadPoolExecutor | None = None
        self._inflight: Future[Distilled | None] | None = None

    @property
    def cut(self) -> int:
        """Blocks cut so far (distilled or in the worker)."""
        return self._next

    def on_frame(self, stats: FrameStats, parts: Sequence[RunTotals]) -> None:
        """Count the frame's sifted key-basis bits; cut a block when there are enough."""
        self._pending_key_bits += int(np.sum(stats.sifted[0]))
        if self.block_bits is not None and self._pending_key_bits >= self.block_bits:
            self._submit(parts)

    def finish(self, parts: Sequence[RunTotals], last_block: bool) -> list[Distilled]:
        """Wait for the worker; distil the partial block if ``last_block``, else drop it.

        Raises what a block's post-processing raised (a bug, not an abort: aborts are
        outcomes).
        """
        try:
            if last_block:
                self._submit(parts)
            else:
                dropped = take_records(parts)[0].bits.size
                if dropped:
                    log.info("run %s: the last %d sifted bits (a partial key block) are "
                             "dropped", self.run_id, dropped)
            self._collect()
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
                self._worker = None
        return self.blocks

    def _submit(self, parts: Sequence[RunTotals]) -> None:
        self._collect()  # back-pressure: one block in the worker at a time
        alice, bob = take_records(parts)
        self._pending_key_bits = 0
        if not alice.bits.size:
            return
        index = self._next
        self._next += 1
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"keyblocks-{self.run_id}")
        self._inflight = self._worker.submit(self._process, alice, bob, index)

    def _process(self, alice: SiftedRecord, bob: SiftedRecord, index: int
                 ) -> Distilled | None:
        # what the block before this one freed (its records are gone once the executor
        # dropped its work item, before it took this one)
        release_free_heap()
        name = block_id(self.run_id, index)
        self.block_files.append(save_record_pair(alice, bob, self.data_dir / "sifted", name))
        if not self.distill:
            return None
        return distill_block(alice, bob, self.settings, self.data_dir / "keys", self.run_id,
                             index, seeded_secrets=self.seeded_secrets)

    def _collect(self) -> None:
        if self._inflight is None:
            return
        future, self._inflight = self._inflight, None
        done = future.result()
        if done is not None:
            self.blocks.append(done)
