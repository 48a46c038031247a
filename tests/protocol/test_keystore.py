"""Key store: permissions, atomic writes, FIFO consumption, integrity."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from qkdlab.protocol import keystore as ks
from qkdlab.protocol.authentication import KeyPool
from qkdlab.protocol.keystore import KeyStore, KeyStoreError


def key(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n, dtype=np.uint8)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> object:
    old = os.umask(0)  # the most permissive umask: the store must not rely on it
    yield
    os.umask(old)


def test_directory_and_files_are_private(tmp_path: Path, open_umask: object) -> None:
    store = KeyStore(tmp_path / "keys")
    assert mode(store.path) == 0o700
    store.save(key(1, 1000), run_id="run1", eps_sec=1e-9, eps_cor=1e-15, key_id="run1-000")
    files = list(store.path.iterdir())
    assert [f.name for f in files] == ["run1-000.key"]
    assert mode(files[0]) == 0o600
    # an existing directory with loose permissions is tightened
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    KeyStore(loose)
    assert mode(loose) == 0o700


def test_save_load_list_and_metadata(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    k1, k2 = key(1, 1001), key(2, 64)
    r1 = store.save(k1, run_id="runA", eps_sec=1e-9, eps_cor=1e-15, key_id="runA-000001")
    store.save(k2, run_id="runA", eps_sec=1e-10, eps_cor=1e-12, key_id="runA-000002")
    assert np.array_equal(store.load("runA-000001"), k1)
    assert np.array_equal(store.load("runA-000002"), k2)
    assert [r.key_id for r in store.list()] == ["runA-000001", "runA-000002"]
    meta = store.metadata("runA-000002")
    assert (meta.n_bits, meta.eps_sec, meta.eps_cor, meta.run_id) == (64, 1e-10, 1e-12, "runA")
    assert r1.created.endswith("+00:00")
    # packed on disk: 1001 bits -> 126 bytes after the header
    size = (tmp_path / "runA-000001.key").stat().st_size
    assert 126 < size < 126 + 400
    with pytest.raises(KeyStoreError, match="already exists"):
        store.save(k1, run_id="runA", eps_sec=1e-9, eps_cor=1e-15, key_id="runA-000001")
    assert store.save(k1, run_id="runB", eps_sec=1e-9, eps_cor=1e-15).key_id.startswith("runB-")


def test_consume_is_fifo_and_forgets_used_bits(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    k1, k2 = key(3, 300), key(4, 500)
    store.save(k1, run_id="r", eps_sec=1e-9, eps_cor=1e-15, key_id="r-1")
    store.save(k2, run_id="r", eps_sec=1e-9, eps_cor=1e-15, key_id="r-2")
    assert store.available_bits == 800
    assert np.array_equal(store.consume(100), k1[:100])
    assert store.metadata("r-1").consumed_bits == 100
    assert np.array_equal(store.load("r-1"), k1[100:])
    got = store.consume(400)  # the rest of r-1, then 200 bits of r-2
    assert np.array_equal(got, np.concatenate([k1[100:], k2[:200]]))
    assert [r.key_id for r in store.list()] == ["r-2"]
    with pytest.raises(KeyStoreError, match="need 1000 bits"):
        store.consume(1000)
    assert store.available_bits == 300  # a refused request consumes nothing
    pool = KeyPool()
    store.replenish_pool(pool, 300)
    assert pool.available == 300
    assert np.array_equal(pool.take(300), k2[200:])
    assert store.list() == []


def test_crash_during_write_leaves_no_partial_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KeyStore(tmp_path)

    def crash(*args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(ks.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        store.save(key(5, 100), run_id="r", eps_sec=1e-9, eps_cor=1e-15, key_id="r-1")
    assert list(tmp_path.iterdir()) == []  # neither the key nor a temporary file


def test_crash_while_consuming_keeps_the_old_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KeyStore(tmp_path)
    k = key(6, 1000)
    store.save(k, run_id="r", eps_sec=1e-9, eps_cor=1e-15, key_id="r-1")
    before = (tmp_path / "r-1.key").read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ks.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        store.consume(10)
    monkeypatch.undo()
    assert (tmp_path / "r-1.key").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r-1.key"]
    assert np.array_equal(store.load("r-1"), k)


def test_stray_temporary_files_are_ignored_and_cleaned(tmp_path: Path) -> None:
    (tmp_path / ".tmp-r-1-123").write_bytes(b"half a key")
    store = KeyStore(tmp_path)
    assert store.list() == []
    assert list(tmp_path.iterdir()) == []


def test_corruption_is_detected(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.save(key(7, 256), run_id="r", eps_sec=1e-9, eps_cor=1e-15, key_id="r-1")
    path = tmp_path / "r-1.key"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(KeyStoreError, match="corrupt"):
        store.load("r-1")
    path.write_bytes(b"QK")
    with pytest.raises(KeyStoreError, match="truncated"):
        store.load("r-1")


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "", ".hidden", "x" * 200])
def test_ids_cannot_escape_the_directory(tmp_path: Path, bad: str) -> None:
    store = KeyStore(tmp_path)
    with pytest.raises(ValueError, match="ids must be"):
        store.save(key(8, 8), run_id="r", eps_sec=1e-9, eps_cor=1e-15, key_id=bad)


def test_key_bits_never_reach_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = KeyStore(tmp_path)
    k = np.ones(64, np.uint8)
    store.save(k, run_id="r", eps_sec=1e-9, eps_cor=1e-15, key_id="r-1")
    store.consume(64)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "r-1" in text
    assert "1111" not in text
    assert "255" not in text
    assert "ff" not in text.lower()
    assert "1" not in repr(store).replace(str(tmp_path), "")
