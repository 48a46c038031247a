"""On-disk store of final keys: one file per key, private, written atomically.

Layout: a directory (mode 0o700) with ``<key_id>.key`` files (mode 0o600), each::

    b"QKDK" | header length u32 LE | UTF-8 JSON header | packed key bits (MSB first)

The header holds the metadata (key id, run id, length in bits, ε_sec, ε_cor, creation
time, bits already consumed) and the SHA-256 of the packed bits, checked on load; only
the unconsumed bits stay in the file.
Writes go to a temporary file in the same directory, are fsync'ed, then renamed over the
target (and the directory fsync'ed), so a crash leaves either the old file or the new
one, never half a key; stray temporaries (``.tmp-*``) are ignored and cleaned on open.

Consumption is first-in first-out by key id: Alice's and Bob's stores hold the same ids,
so consuming the same number of bits yields the same bits on both sides (use ids that
sort in production order, e.g. ``f"{run_id}-{frame:06d}"``).  Nothing here logs or
prints key bits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qkdlab.protocol.authentication import KeyPool
from qkdlab.protocol.bits import Bits, as_bits

log = logging.getLogger(__name__)

MAGIC = b"QKDK"
_PREFIX = struct.Struct("<4sI")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SUFFIX = ".key"
_TMP = ".tmp-"


class KeyStoreError(Exception):
    """A key is missing, corrupt, or the request cannot be met."""


@dataclass(frozen=True)
class KeyRecord:
    """Metadata of one stored key (no key material)."""

    key_id: str
    run_id: str
    n_bits: int
    eps_sec: float
    eps_cor: float
    created: str
    consumed_bits: int = 0

    @property
    def available_bits(self) -> int:
        return self.n_bits - self.consumed_bits


class KeyStore:
    """Directory of keys; see the module docstring for format and guarantees."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        for stray in self.path.glob(f"{_TMP}*"):
            with contextlib.suppress(OSError):
                stray.unlink()

    def __repr__(self) -> str:
        return f"KeyStore({str(self.path)!r})"

    # -- writing ---------------------------------------------------------------------
    def save(
        self,
        key: Bits,
        *,
        run_id: str,
        eps_sec: float,
        eps_cor: float,
        key_id: str | None = None,
    ) -> KeyRecord:
        """Store a new key; refuse to overwrite an existing id."""
        bits = as_bits(key)
        if key_id is None:
            key_id = f"{run_id}-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%S%f')}"
        self._check_id(key_id)
        self._check_id(run_id)
        if self._file(key_id).exists():
            raise KeyStoreError(f"key {key_id!r} already exists")
        record = KeyRecord(
            key_id=key_id, run_id=run_id, n_bits=int(bits.size), eps_sec=float(eps_sec),
            eps_cor=float(eps_cor), created=dt.datetime.now(dt.UTC).isoformat(),
        )
        self._write(record, bits)
        log.info("stored key %s (%d bits, run %s)", key_id, bits.size, run_id)
        return record

    def _write(self, record: KeyRecord, bits: Bits) -> None:
        packed = np.packbits(bits).tobytes()
        header = json.dumps(
            {**asdict(record), "sha256": hashlib.sha256(packed).hexdigest()},
            separators=(",", ":"),
        ).encode()
        data = _PREFIX.pack(MAGIC, len(header)) + header + packed
        target = self._file(record.key_id)
        tmp = self.path / f"{_TMP}{record.key_id}-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        try:
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading ---------------------------------------------------------------------
    def file_of(self, key_id: str) -> Path:
        """Path of a stored key's file."""
        self._check_id(key_id)
        return self._file(key_id)

    def _file(self, key_id: str) -> Path:
        return self.path / f"{key_id}{_SUFFIX}"

    @staticmethod
    def _check_id(key_id: str) -> None:
        if not _ID.match(key_id):
            raise ValueError(
                f"ids must be 1-128 characters of A-Z a-z 0-9 . _ - (no path), got {key_id!r}"
            )

    def _read(self, key_id: str) -> tuple[KeyRecord, Bits]:
        self._check_id(key_id)
        try:
            data = self._file(key_id).read_bytes()
        except FileNotFoundError:
            raise KeyStoreError(f"no key {key_id!r}") from None
        if len(data) < _PREFIX.size:
            raise KeyStoreError(f"key file {key_id!r} is truncated")
        magic, header_len = _PREFIX.unpack_from(data)
        if magic != MAGIC or _PREFIX.size + header_len > len(data):
            raise KeyStoreError(f"key file {key_id!r} is not a key store file")
        try:
            header = json.loads(data[_PREFIX.size : _PREFIX.size + header_len])
            digest = header.pop("sha256")
            record = KeyRecord(**header)
        except (ValueError, TypeError, KeyError) as exc:
            raise KeyStoreError(f"key file {key_id!r} has a bad header: {exc}") from None
        packed = data[_PREFIX.size + header_len :]
        if hashlib.sha256(packed).hexdigest() != digest or len(packed) != (
            record.available_bits + 7
        ) // 8:
            raise KeyStoreError(f"key file {key_id!r} is corrupt (checksum or length)")
        return record, np.unpackbits(np.frombuffer(packed, np.uint8), count=record.available_bits)

    def metadata(self, key_id: str) -> KeyRecord:
        """Metadata of one key."""
        return self._read(key_id)[0]

    def load(self, key_id: str) -> Bits:
        """The key's bits not yet consumed."""
        return self._read(key_id)[1]

    def list(self) -> list[KeyRecord]:
        """All keys, in consumption order (by id)."""
        ids = sorted(p.name[: -len(_SUFFIX)] for p in self.path.glob(f"*{_SUFFIX}")
                     if not p.name.startswith(_TMP))
        return [self.metadata(i) for i in ids]

    @property
    def available_bits(self) -> int:
        """Unconsumed bits over all keys."""
        return sum(r.available_bits for r in self.list())

    # -- consuming -------------------------------------------------------------------
    def consume(self, n_bits: int, key_id: str | None = None) -> Bits:
        """Remove and return the next ``n_bits`` (FIFO over keys, or from ``key_id``).

        A key used up is deleted; a partly used one is rewritten atomically with its
        ``consumed_bits`` advanced.  Raises :class:`KeyStoreError` (consuming nothing)
        if fewer bits are available.
        """
        if n_bits < 0:
            raise ValueError("n_bits must be >= 0")
        records = [self.metadata(key_id)] if key_id is not None else self.list()
        if sum(r.available_bits for r in records) < n_bits:
            raise KeyStoreError(
                f"need {n_bits} bits, the store holds {sum(r.available_bits for r in records)}"
            )
        parts: list[Bits] = []
        need = n_bits
        for rec in records:
            if need == 0:
                break
            record, bits = self._read(rec.key_id)
            take = min(need, record.available_bits)
            parts.append(bits[:take].copy())
            need -= take
            if take == record.available_bits:
                self.delete(record.key_id)
            else:
                updated = KeyRecord(
                    **{**asdict(record), "consumed_bits": record.consumed_bits + take}
                )
                self._write(updated, bits[take:])
        log.info("consumed %d key bits", n_bits)
        return np.concatenate([*parts, np.zeros(0, np.uint8)])

    def delete(self, key_id: str) -> None:
        """Remove a key file (the OS may keep the old blocks: use an encrypted disk)."""
        self._check_id(key_id)
        try:
            self._file(key_id).unlink()
        except FileNotFoundError:
            raise KeyStoreError(f"no key {key_id!r}") from None
        self._sync_dir()

    def replenish_pool(self, pool: KeyPool, n_bits: int) -> None:
        """Move ``n_bits`` from the store (FIFO) into an authentication key pool."""
        pool.replenish(self.consume(n_bits))
