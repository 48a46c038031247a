"""Key blocks: a run's sifted records distilled block by block while it runs.

Memory stays at about two blocks of records however long the run; whole blocks become
keys on their own; a run that ends badly keeps its whole blocks and drops the partial
one; the key stores of the two parties never disagree on which blocks exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qkdlab.cli import DEFAULT_MOCK_STATION, bb84_settings
from qkdlab.experiments.bb84.processing import FrameStats, RunTotals
from qkdlab.experiments.bb84.run import BB84Result, run_bb84
from qkdlab.experiments.bb84.secure_key import block_id, reconcile_key_stores, take_records
from qkdlab.protocol.keystore import KeyStore
from qkdlab.roles import bb84_roles
from qkdlab.station import open_station

# 1 km, balanced bases and fast detectors: 1 s of the mock gives ~1 M key-basis bits,
# enough for 400 kbit blocks to yield key
OVERRIDES: dict[str, Any] = {
    "channel": {"length_km": 1.0},
    "alice": {"pattern": {"p_z": 0.5, "p_signal": 0.5, "p_decoy": 0.3, "p_vacuum": 0.2}},
    "bob": {"z_fraction": 0.5, "detectors": {"dead_time_s": 10e-9, "afterpulse_prob": 0.0}},
}
BLOCK = 400_000


def run(data_dir: Path, **kw: Any) -> BB84Result:
    settings = bb84_settings(DEFAULT_MOCK_STATION, seed=4, p_z=0.5, p_signal=0.5,
                             p_decoy=0.3)
    with open_station(DEFAULT_MOCK_STATION, seed=3, bench_overrides=OVERRIDES) as loaded:
        return run_bb84(bb84_roles(loaded), settings, duration_s=1.0, data_dir=data_dir,
                        progress=False, key_block_bits=BLOCK, **kw)


def stored(data_dir: Path, side: str) -> dict[str, np.ndarray[Any, Any]]:
    store = KeyStore(data_dir / "keys" / side)
    return {r.key_id: store.load(r.key_id) for r in store.list()}


def test_a_run_is_distilled_in_blocks_with_every_sifted_bit_accounted_for(
        tmp_path: Path) -> None:
    result = run(tmp_path)
    s = result.summary()
    assert s["status"] == "completed"
    z_bits = s["sifted_bits_z"]
    blocks = result.keys
    # every key-basis bit went into exactly one block: whole blocks of >= BLOCK, then the rest
    assert s["key_blocks"] == len(blocks) == z_bits // BLOCK + 1
    inputs = [b.bob.summary()["pa_input_bits"] for b in blocks]
    assert sum(inputs) == s["pa_input_bits"] == z_bits
    assert all(BLOCK <= n < 1.1 * BLOCK for n in inputs[:-1])
    # whole blocks give key on their own, identical on both sides, stored under the block id
    with_key = [i for i, b in enumerate(blocks) if not b.alice.aborted]
    assert with_key[:2] == [0, 1], s["key_block_abort_reasons"]
    assert s["secure_key_bits"] > 0
    assert not s["aborted"]
    assert s["keys_match"]
    alice, bob = stored(tmp_path, "alice"), stored(tmp_path, "bob")
    assert sorted(alice) == sorted(bob) == [block_id(result.run_id, i) for i in with_key]
    for key_id, bits in alice.items():
        np.testing.assert_array_equal(bits, bob[key_id])
    assert sum(b.size for b in alice.values()) == s["secure_key_bits"]
    # the run keeps each block's figures, not its key: a long run's memory stays flat
    assert [b.alice.secure_key_bits for b in blocks] == [
        alice[block_id(result.run_id, i)].size if i in with_key else 0
        for i in range(len(blocks))]
    assert all(o.key is None and o.pool_refill is None
               for b in blocks for o in (b.alice, b.bob))
    # each block's records are on disk for 'qkdlab alice'/'bob', and no longer in memory
    names = sorted(p.name for p in (tmp_path / "sifted").iterdir())
    assert names == sorted(f"{block_id(result.run_id, i)}-{side}.npz"
                           for i in range(len(blocks)) for side in ("alice", "bob"))
    assert not result.totals.sifted_pulse
    assert not result.totals.sifted_bob


class AlarmAfter:
    """A monitor raising an alarm once ``bits`` key-basis bits were sifted."""

    def __init__(self, bits: int) -> None:
        self.bits, self.seen = bits, 0

    def check(self, stats: FrameStats, detectors: object) -> str | None:
        self.seen += int(np.sum(stats.sifted[0]))
        return "test alarm" if self.seen >= self.bits else None


def test_a_run_that_ends_badly_keeps_its_whole_blocks_and_drops_the_partial_one(
        tmp_path: Path) -> None:
    result = run(tmp_path, monitors=[AlarmAfter(int(1.5 * BLOCK))])
    s = result.summary()
    assert s["status"].startswith("aborted: AlarmAfter: test alarm")
    # the first block was whole before the alarm: distilled, kept; the rest is dropped
    assert len(result.keys) == 1
    assert not result.keys[0].alice.aborted
    assert BLOCK <= s["pa_input_bits"] < s["sifted_bits_z"]
    assert sorted(stored(tmp_path, "alice")) == sorted(stored(tmp_path, "bob")) == [
        block_id(result.run_id, 0)]
    assert len(list((tmp_path / "sifted").iterdir())) == 2  # block 0 only
    assert s["aborted"]  # the run as a whole did not complete


def _totals(pulses: list[list[int]]) -> RunTotals:
    t = RunTotals()
    for p in pulses:
        n = len(p)
        t.sifted_pulse.append(np.array(p, np.int64))
        t.sifted_basis.append(np.zeros(n, np.int8))
        t.sifted_intensity.append(np.zeros(n, np.int8))
        t.sifted_alice.append(np.arange(n, dtype=np.uint8) % 2)
        t.sifted_bob.append(np.arange(n, dtype=np.uint8) % 2)
    return t


def test_take_records_empties_the_segments_and_keeps_pulses_unique_in_order() -> None:
    first, second = _totals([[3, 9], [12]]), _totals([[0, 5]])
    alice, bob = take_records([first, second])
    assert alice.pulse.tolist() == [3, 9, 12, 13, 18]  # the second segment after the first
    assert bob.bits.tolist() == [0, 1, 0, 0, 1]
    assert alice.intensity is not None
    assert not first.sifted_pulse
    assert not second.sifted_bob
    empty, _ = take_records([first, second])
    assert empty.bits.size == 0


def test_a_key_only_one_party_stored_is_removed_and_older_keys_are_left_alone(
        tmp_path: Path) -> None:
    bits = np.ones(64, np.uint8)
    alice, bob = KeyStore(tmp_path / "alice"), KeyStore(tmp_path / "bob")
    for store in (alice, bob):
        store.save(bits, run_id="r1", eps_sec=1e-9, eps_cor=1e-15, key_id="r1-b0000")
        store.save(bits, run_id="old", eps_sec=1e-9, eps_cor=1e-15)  # timestamped id
    # killed between Alice's and Bob's write of block 1
    alice.save(bits, run_id="r1", eps_sec=1e-9, eps_cor=1e-15, key_id="r1-b0001")
    assert reconcile_key_stores(tmp_path) == ["r1-b0001"]
    for store in (alice, bob):  # block r1-b0000 and the older, timestamped key remain
        ids = sorted(r.key_id for r in store.list())
        assert len(ids) == 2
        assert ids[0].startswith("old-")
        assert ids[1] == "r1-b0000"
    assert reconcile_key_stores(tmp_path) == []


@pytest.mark.parametrize("bits", [0, -5])
def test_a_block_size_below_one_bit_is_refused(tmp_path: Path, bits: int) -> None:
    from qkdlab.experiments.bb84.key_blocks import KeyBlocks

    settings = bb84_settings(DEFAULT_MOCK_STATION, seed=1)
    with pytest.raises(ValueError, match="key_block_bits must be >= 1"):
        KeyBlocks(settings, tmp_path, "r", bits, True)
