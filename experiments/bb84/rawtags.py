"""Raw time-tag files: every TagBlock of a run, on disk at full rate, in bounded memory.

Layout (little-endian)::

    file   := header block*
    header := b"QKDTAGS1" u32:json_len json(utf-8, run metadata)
    block  := b"BLK1" u32:n i64:start_ps i64:stop_ps u8:overflow u64:lost u32:k
              i64[2k]:overflow_intervals i16[n]:channel i64[n]:time_ps u32:crc32

The CRC covers a block from its ``n`` field to its last time stamp, so a corrupted or
truncated block is detected and reported with its byte offset; blocks before it stay
readable.  Writing appends one block per TagBlock and flushes it: a crash leaves
whole blocks plus at most one truncated tail, which the reader reports.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from qkdlab.tags import TagBlock

MAGIC = b"QKDTAGS1"
BLOCK_MAGIC = b"BLK1"
_BLOCK_HEAD = struct.Struct("<IqqBQI")
_CRC = struct.Struct("<I")
MAX_JSON = 1 << 20
MAX_TAGS_PER_BLOCK = 1 << 28


class RawTagFileError(ValueError):
    """A raw tag file that is not one, or is corrupted or truncated at some offset."""


class RawTagWriter:
    """Appends TagBlocks to a raw tag file; use as a context manager."""

    def __init__(self, path: str | Path, metadata: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(self.path, "xb")  # noqa: SIM115 (closed in close())
        header = json.dumps(metadata, sort_keys=True).encode()
        self._file.write(MAGIC + struct.pack("<I", len(header)) + header)
        self._file.flush()
        self.blocks = 0
        self.tags = 0

    def write(self, block: TagBlock) -> None:
        """Append one block and flush it to the operating system."""
        intervals = np.ascontiguousarray(block.overflow_intervals, dtype="<i8").reshape(-1, 2)
        body = b"".join((
            _BLOCK_HEAD.pack(len(block), block.start_ps, block.stop_ps, int(block.overflow),
                             block.lost_tags, intervals.shape[0]),
            intervals.tobytes(),
            np.ascontiguousarray(block.channel, dtype="<i2").tobytes(),
            np.ascontiguousarray(block.time_ps, dtype="<i8").tobytes(),
        ))
        self._file.write(BLOCK_MAGIC + body + _CRC.pack(zlib.crc32(body)))
        self._file.flush()
        self.blocks += 1
        self.tags += len(block)

    def close(self) -> None:
        """Flush to disk and close (idempotent)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> RawTagWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RawTagReader:
    """Reads a raw tag file block by block (one block in memory at a time)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise RawTagFileError(f"{self.path}: not a qkdlab raw tag file (bad magic)")
            raw_len = f.read(4)
            if len(raw_len) < 4:
                raise RawTagFileError(f"{self.path}: truncated header")
            (length,) = struct.unpack("<I", raw_len)
            if length > MAX_JSON:
                raise RawTagFileError(f"{self.path}: header length {length} is implausible")
            text = f.read(length)
            if len(text) < length:
                raise RawTagFileError(f"{self.path}: truncated header")
            try:
                self.metadata: dict[str, Any] = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RawTagFileError(f"{self.path}: corrupted header: {err}") from err
            self._data_offset = f.tell()

    def blocks(self) -> Iterator[TagBlock]:
        """Every block in order; raises :class:`RawTagFileError` at the first bad one."""
        with open(self.path, "rb") as f:
            f.seek(self._data_offset)
            while True:
                offset = f.tell()
                magic = f.read(len(BLOCK_MAGIC))
                if not magic:
                    return
                if magic != BLOCK_MAGIC:
                    raise RawTagFileError(f"{self.path}: corrupted block at byte {offset}")
                yield self._read_block(f, offset)

    def _read_block(self, f: BinaryIO, offset: int) -> TagBlock:
        head = f.read(_BLOCK_HEAD.size)
        if len(head) < _BLOCK_HEAD.size:
            raise RawTagFileError(f"{self.path}: truncated block at byte {offset}")
        n, start, stop, overflow, lost, k = _BLOCK_HEAD.unpack(head)
        if n > MAX_TAGS_PER_BLOCK or k > MAX_TAGS_PER_BLOCK or stop < start:
            raise RawTagFileError(f"{self.path}: corrupted block header at byte {offset}")
        size = 16 * k + 2 * n + 8 * n
        payload = f.read(size)
        crc = f.read(_CRC.size)
        if len(payload) < size or len(crc) < _CRC.size:
            raise RawTagFileError(f"{self.path}: truncated block at byte {offset}")
        if zlib.crc32(head + payload) != _CRC.unpack(crc)[0]:
            raise RawTagFileError(f"{self.path}: checksum mismatch in block at byte {offset}")
        intervals = np.frombuffer(payload, "<i8", 2 * k).reshape(k, 2).astype(np.int64)
        channel = np.frombuffer(payload, "<i2", n, 16 * k).astype(np.int16)
        time_ps = np.frombuffer(payload, "<i8", n, 16 * k + 2 * n).astype(np.int64)
        return TagBlock(channel=channel, time_ps=time_ps, start_ps=start, stop_ps=stop,
                        overflow=bool(overflow), lost_tags=lost, overflow_intervals=intervals)
