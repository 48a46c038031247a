"""Secrets of the post-processing on real hardware: Alice's randomness from the OS, the
first authentication key pre-shared (``qkdlab auth-pool add``); on a simulated bench
both from the run seed, so a seeded run is reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qkdlab.cli import DEFAULT_MOCK_STATION, main
from qkdlab.experiments.bb84.processing import BB84Settings
from qkdlab.experiments.bb84.secure_key import POOL_BITS, distill_block
from qkdlab.protocol.keystore import KeyStore
from qkdlab.roles import bb84_roles
from qkdlab.station import open_station
from qkdlab.testing.records import sifted_records

# large enough that the key always repays its authentication (at 400 000 records
# about one block in twelve did not, with fresh randomness)
RECORDS = sifted_records(1_500_000, 0.02, 4)
SETTINGS = BB84Settings(mu_signal=0.5, mu_decoy=0.1, mu_vacuum=0.0, p_signal=0.7,
                        p_decoy=0.2, seed=11)


def preshare(data_dir: Path, n_bytes: int = 2 * POOL_BITS // 8, seed: int = 9) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = data_dir / "preshared.bin"
    secret.write_bytes(np.random.default_rng(seed).bytes(n_bytes))
    assert main(["auth-pool", "add", str(secret), "--data-dir", str(data_dir)]) == 0


def stored(data_dir: Path, side: str) -> list[np.ndarray]:
    store = KeyStore(data_dir / "keys" / side)
    return [store.load(r.key_id) for r in store.list()]


def test_real_hardware_without_a_preshared_key_gives_no_key(tmp_path: Path) -> None:
    done = distill_block(*RECORDS, SETTINGS, tmp_path / "keys", "run1", 0)
    for outcome in (done.alice, done.bob):
        assert outcome.aborted
        assert outcome.reason is not None
        assert "no pre-shared authentication key" in outcome.reason
        assert "qkdlab auth-pool add" in outcome.reason
        assert outcome.secure_key_bits == 0
    assert not done.keys_match
    assert stored(tmp_path, "alice") == stored(tmp_path, "bob") == []


def test_real_hardware_draws_fresh_randomness_for_every_block(tmp_path: Path) -> None:
    keys = []
    for attempt in ("a", "b"):  # the same records, the same pre-shared key
        data_dir = tmp_path / attempt
        preshare(data_dir)
        done = distill_block(*RECORDS, SETTINGS, data_dir / "keys", "run1", 0)
        assert not done.alice.aborted, done.alice.reason
        assert done.keys_match
        assert done.pool_source == "auth-pool store"
        (alice,), (bob,) = stored(data_dir, "alice"), stored(data_dir, "bob")
        np.testing.assert_array_equal(alice, bob)
        keys.append(alice)
    # Alice's test-bit choice and hash seeds came from the OS: another key
    assert keys[0].size != keys[1].size or np.mean(keys[0] != keys[1]) > 0.4


def test_a_simulated_bench_is_reproducible(tmp_path: Path) -> None:
    keys = []
    for attempt in ("a", "b"):
        data_dir = tmp_path / attempt
        done = distill_block(*RECORDS, SETTINGS, data_dir / "keys", "run1", 0,
                             seeded_secrets=True)
        assert done.keys_match
        assert done.pool_source == "bootstrap (mock, not secret)"
        keys.append(stored(data_dir, "alice")[0])
    np.testing.assert_array_equal(keys[0], keys[1])


def test_only_a_station_of_launched_mocks_counts_as_simulated() -> None:
    with open_station(DEFAULT_MOCK_STATION, seed=1) as loaded:
        assert bb84_roles(loaded).seeded_secrets


def test_auth_pool_cli_adds_shows_and_refuses_a_short_secret(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["auth-pool", "show", "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["available_bits"] == 0
    short = tmp_path / "short.bin"
    short.write_bytes(bytes(POOL_BITS // 8 - 1))
    assert main(["auth-pool", "add", str(short), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"give at least {POOL_BITS // 8} bytes" in err
    preshare(tmp_path, n_bytes=3 * POOL_BITS // 8)
    out = capsys.readouterr().out
    assert f"added {3 * POOL_BITS} bits" in out
    assert main(["auth-pool", "show", "--data-dir", str(tmp_path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["available_bits"], shown["blocks"]) == (3 * POOL_BITS, 3)
    # a block draws its pool from the store and pays back what it used
    done = distill_block(*RECORDS, SETTINGS, tmp_path / "keys", "run1", 0)
    assert done.keys_match
    assert main(["auth-pool", "show", "--data-dir", str(tmp_path), "--json"]) == 0
    after = json.loads(capsys.readouterr().out)["available_bits"]
    assert after == 2 * POOL_BITS + done.alice.auth_key_used_bits
