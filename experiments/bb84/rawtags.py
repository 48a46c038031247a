"""Raw time-tag files: every TagBlock of a run, on disk at full rate, in bounded memory.

Layout (little-endian), format version 2::

    file   := header block*
    header := b"QKDTAGS2" u32:json_len json(utf-8, run metadata) u32:crc32
    block  := b"BLK1" u32:n i64:start_ps i64:stop_ps u8:overflow u64:lost u32:k
              i64[2k]:overflow_intervals i16[n]:channel i64[n]:time_ps u32:crc32

The header's CRC covers ``json_len`` and the metadata, so a flipped byte there is an
error, never silently different run metadata.  A block's CRC covers it from its ``n``
field to its last time stamp, so a corrupted or truncated block is detected and
reported with its byte offset; blocks before it stay readable.  Writing appends one
block per TagBlock and flushes it: a crash leaves whole blocks plus at most one
truncated tail, which the reader reports (and skips with
``RawTagReader(path).blocks(tolerate_torn_tail=True)``; ``scan()`` counts what is intact).

Versions: the last byte of the file marker is the format version.  The writer writes
version 2; the reader reads version 2 and version 1 (``b"QKDTAGS1"``: the same without
the header CRC, written before the header had one; their
:attr:`RawTagReader.header_checked` is False), and refuses any other version with an
error naming it (a file from a newer qkdlab).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from qkdlab.tags import TagBlock

MAGIC_STEM = b"QKDTAGS"
"""The file marker without its last byte, the format version (an ASCII digit)."""
FORMAT_VERSION = 2
MAGIC = MAGIC_STEM + b"2"
"""File marker of the format written (version 2: header CRC)."""
MAGIC_V1 = MAGIC_STEM + b"1"
"""File marker of version 1 (no header CRC): still read."""
READABLE_VERSIONS = (1, 2)
BLOCK_MAGIC = b"BLK1"
_BLOCK_HEAD = struct.Struct("<IqqBQI")
_CRC = struct.Struct("<I")
MAX_JSON = 1 << 20
MAX_TAGS_PER_BLOCK = 1 << 28


class RawTagFileError(ValueError):
    """A raw tag file that is not one, or is corrupted or truncated at some offset.

    The message names the file, the byte offset and the problem; for a damaged block
    it also says how much of the file before it is intact.

    Attributes:
        path: the file.
        offset: byte offset of the damaged header field or block.
        problem: what is wrong there.
        blocks_before: whole, checksum-verified blocks before ``offset`` (0 for a
            header problem).
        tags_before: time tags in those blocks.
        torn: True if the damage is a torn final block (the file ends inside it, or a
            zero-filled tail follows the last whole block): what a crash while
            writing leaves.  See :meth:`RawTagReader.blocks`.
    """

    def __init__(self, path: Path, offset: int, problem: str, *, block: int | None = None,
                 tags_before: int = 0, torn: bool = False) -> None:
        self.path = path
        self.offset = offset
        self.problem = problem
        self.block = block
        """1-based number of the damaged block (None: the header)."""
        self.blocks_before = 0 if block is None else block - 1
        self.tags_before = tags_before
        self.torn = torn
        where = f"byte {offset}" if block is None else f"byte {offset} (block {block})"
        text = f"{path}: at {where}: {problem}"
        if block is not None:
            text += (f"; the {self.blocks_before} block(s) before it ({tags_before:,} tags, "
                     f"bytes 0-{offset}) are intact")
        super().__init__(text)


class RawTagWriter:
    """Appends TagBlocks to a raw tag file; use as a context manager."""

    def __init__(self, path: str | Path, metadata: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(self.path, "xb")  # noqa: SIM115 (closed in close())
        text = json.dumps(metadata, sort_keys=True).encode()
        header = struct.pack("<I", len(text)) + text
        self._file.write(MAGIC + header + _CRC.pack(zlib.crc32(header)))
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


@dataclass(frozen=True)
class TagFileScan:
    """What :meth:`RawTagReader.scan` found: the intact prefix of a raw tag file.

    Attributes:
        path: the file.
        size_bytes: its size when scanned.
        blocks: whole, checksum-verified blocks from the start of the file.
        tags: time tags in them.
        intact_bytes: bytes ``0 .. intact_bytes`` hold the header and those blocks.
        damage: the first damaged block (None: the whole file is intact).
    """

    path: Path
    size_bytes: int
    blocks: int
    tags: int
    intact_bytes: int
    damage: RawTagFileError | None = None

    @property
    def complete(self) -> bool:
        """True when every byte of the file belongs to an intact block."""
        return self.damage is None

    def describe(self) -> str:
        """One line: how much is readable and, if any, where the damage is."""
        text = (f"{self.blocks} block(s), {self.tags:,} tags readable "
                f"(bytes 0-{self.intact_bytes} of {self.size_bytes})")
        if self.damage is not None:
            kind = "torn final block" if self.damage.torn else "damage"
            text += f"; {kind} at byte {self.damage.offset}: {self.damage.problem}"
        return text


_HEAD = len(BLOCK_MAGIC) + _BLOCK_HEAD.size
"""Bytes of a block before its arrays: marker and fixed-size fields."""
_CHUNK = 1 << 20


class RawTagReader:
    """Reads a raw tag file block by block (one block in memory at a time).

    The header is read and checked (its CRC too, from format version 2 on) on
    construction.  Every block is checked (marker, plausible sizes, CRC) before its
    data is returned, so damaged data never comes back as tags: a damaged block raises
    :class:`RawTagFileError` naming the file, the byte offset and how much before it is
    intact.  Reading never writes the file.

    After a crash the file ends in a *torn* final block (or a zero-filled tail); the
    intact blocks before it stay readable::

        reader = RawTagReader(path)
        for block in reader.blocks(tolerate_torn_tail=True):
            ...                     # every whole block; stops quietly at a torn tail
        reader.damage               # the torn tail (RawTagFileError), or None

        reader.scan()               # counts only: TagFileScan(blocks, tags, damage...)
        reader.salvage()            # the intact prefix whatever the damage (see there)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.damage: RawTagFileError | None = None
        """Damage met by the last :meth:`blocks` (tolerated torn tail) or :meth:`salvage`."""
        self.version = FORMAT_VERSION
        """Format version of the file (1: written before the header had a CRC)."""
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.metadata: dict[str, Any] = self._read_header(f, size)
            self.data_offset = f.tell()
            """Byte offset of the first block."""

    @property
    def header_checked(self) -> bool:
        """True if the header's CRC was verified (False for a version 1 file)."""
        return self.version >= 2

    def _header_error(self, offset: int, problem: str) -> RawTagFileError:
        return RawTagFileError(self.path, offset, problem)

    def _read_header(self, f: BinaryIO, size: int) -> dict[str, Any]:
        if size == 0:
            raise self._header_error(0, "empty file (0 bytes), not a qkdlab raw tag file")
        magic = f.read(len(MAGIC))
        if magic[: len(MAGIC_STEM)] != MAGIC_STEM or len(magic) < len(MAGIC):
            if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
                raise self._header_error(
                    len(magic), f"truncated header: the file ends inside the "
                    f"{len(MAGIC)}-byte file marker {MAGIC!r}")
            raise self._header_error(
                0, f"not a qkdlab raw tag file: it starts with {magic!r}, not {MAGIC!r}")
        version = magic[len(MAGIC_STEM):]
        if not version.isdigit() or int(version) not in READABLE_VERSIONS:
            raise self._header_error(
                len(MAGIC_STEM), f"unknown raw tag file format version {version!r} (file "
                f"marker {magic!r}; this version of qkdlab reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}: {MAGIC_V1!r}, {MAGIC!r})")
        self.version = int(version)
        raw_len = f.read(4)
        if len(raw_len) < 4:
            raise self._header_error(
                len(MAGIC) + len(raw_len),
                "truncated header: the file ends inside the 4-byte metadata length")
        (length,) = struct.unpack("<I", raw_len)
        start = len(MAGIC) + 4
        if length > MAX_JSON:
            raise self._header_error(
                len(MAGIC), f"corrupted header: metadata length {length} bytes is "
                f"implausible (at most {MAX_JSON})")
        text = f.read(length)
        if len(text) < length:
            raise self._header_error(
                start + len(text), f"truncated header: the file ends {len(text)} bytes "
                f"into the {length}-byte run metadata")
        stored: int | None = None
        if self.version >= 2:
            raw_crc = f.read(_CRC.size)
            if len(raw_crc) < _CRC.size:
                raise self._header_error(
                    start + length + len(raw_crc), "truncated header: the file ends inside "
                    f"the {_CRC.size}-byte header checksum")
            (stored,) = _CRC.unpack(raw_crc)
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self._header_error(
                start + err.start, "corrupted header: run metadata is not UTF-8") from None
        try:
            metadata = json.loads(decoded)
        except (json.JSONDecodeError, RecursionError) as err:
            at = start + len(decoded[: getattr(err, "pos", 0)].encode())
            reason = getattr(err, "msg", "nested too deeply")
            raise self._header_error(
                at, f"corrupted header: run metadata is not valid JSON ({reason})") from None
        if not isinstance(metadata, dict):
            raise self._header_error(
                start, f"corrupted header: run metadata is a JSON "
                f"{type(metadata).__name__}, not an object")
        if stored is not None:
            computed = zlib.crc32(text, zlib.crc32(raw_len))
            if computed != stored:
                raise self._header_error(
                    len(MAGIC), f"corrupted header: checksum mismatch over the metadata "
                    f"length and the {length}-byte run metadata (stored 0x{stored:08x}, "
                    f"computed 0x{computed:08x})")
        return metadata

    # -- blocks -------------------------------------------------------------------------
    def blocks(self, *, tolerate_torn_tail: bool = False) -> Iterator[TagBlock]:
        """Every block in order; raises :class:`RawTagFileError` at the first bad one.

        With ``tolerate_torn_tail`` a torn final block (the file ends inside it, or
        only zero bytes follow the last whole block: what a crash while writing
        leaves) ends the iteration quietly and is kept in :attr:`damage`; damage with
        more of the file after it still raises.
        """
        self.damage = None
        for block, _ in self._walk(decode=True, tolerate_torn_tail=tolerate_torn_tail):
            assert block is not None
            yield block

    def salvage(self) -> Iterator[TagBlock]:
        """Every intact block up to the first damage of any kind, kept in :attr:`damage`.

        For recovering what a damaged file still holds: the blocks after a damaged one
        are not returned (their place in time cannot be trusted).
        """
        self.damage = None
        try:
            for block, _ in self._walk(decode=True, tolerate_torn_tail=True):
                assert block is not None
                yield block
        except RawTagFileError as err:
            self.damage = err

    def scan(self) -> TagFileScan:
        """Check every block (CRC included) without keeping them; never raises for a
        damaged block: the result says how much is intact and where the damage is."""
        blocks = tags = 0
        end = self.data_offset
        damage: RawTagFileError | None = None
        try:
            for _, (n, block_end) in self._walk(decode=False, tolerate_torn_tail=False):
                blocks += 1
                tags += n
                end = block_end
        except RawTagFileError as err:
            damage = err
        return TagFileScan(path=self.path, size_bytes=self.path.stat().st_size,
                           blocks=blocks, tags=tags, intact_bytes=end, damage=damage)

    def _walk(self, *, decode: bool, tolerate_torn_tail: bool
              ) -> Iterator[tuple[TagBlock | None, tuple[int, int]]]:
        """``(block or None, (tags, end offset))`` per intact block; raises at damage."""
        blocks = tags = 0
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = self.data_offset
            f.seek(offset)
            while offset < size:
                try:
                    block, n, end = self._read_block(f, offset, size, decode)
                except _BlockDamageError as damage:
                    err = RawTagFileError(self.path, offset, damage.problem,
                                          block=blocks + 1, tags_before=tags, torn=damage.torn)
                    if damage.torn and tolerate_torn_tail:
                        self.damage = err
                        return
                    raise err from None
                blocks += 1
                tags += n
                offset = end
                yield block, (n, end)

    def _read_block(self, f: BinaryIO, offset: int, size: int, decode: bool
                    ) -> tuple[TagBlock | None, int, int]:
        """One block at ``offset``: ``(block or None, tags, end offset)``."""
        remaining = size - offset
        head = f.read(_HEAD)
        magic = head[: len(BLOCK_MAGIC)]
        if magic != BLOCK_MAGIC:
            if len(magic) < len(BLOCK_MAGIC) and BLOCK_MAGIC.startswith(magic):
                raise _BlockDamageError("truncated: the file ends inside its marker", torn=True)
            f.seek(offset)
            if _all_zero(f):
                raise _BlockDamageError(f"zero-filled tail of {remaining} bytes instead of a "
                                   "block (written data that never reached the disk)",
                                   torn=True)
            raise _BlockDamageError(f"corrupted: marker {magic!r} instead of {BLOCK_MAGIC!r}")
        if len(head) < _HEAD:
            raise _BlockDamageError(f"truncated: the file ends {len(head)} bytes into its "
                               f"{_HEAD}-byte head", torn=True)
        fields = head[len(BLOCK_MAGIC):]
        n, start, stop, overflow, lost, k = _BLOCK_HEAD.unpack(fields)
        if n > MAX_TAGS_PER_BLOCK or k > MAX_TAGS_PER_BLOCK or stop < start or overflow > 1:
            raise _BlockDamageError(f"corrupted head (tags {n}, overflow intervals {k}, "
                               f"start {start} ps, stop {stop} ps, overflow flag {overflow})")
        payload_size = 16 * k + 2 * n + 8 * n
        total = _HEAD + payload_size + _CRC.size
        if total > remaining:
            raise _BlockDamageError(f"truncated: {remaining} of its {total} bytes are in the file",
                               torn=True)
        payload = f.read(payload_size)
        (stored,) = _CRC.unpack(f.read(_CRC.size))
        computed = zlib.crc32(payload, zlib.crc32(fields))
        if computed != stored:
            raise _BlockDamageError(f"checksum mismatch (stored 0x{stored:08x}, computed "
                               f"0x{computed:08x})")
        if not decode:
            return None, n, offset + total
        intervals = np.frombuffer(payload, "<i8", 2 * k).reshape(k, 2).astype(np.int64)
        channel = np.frombuffer(payload, "<i2", n, 16 * k).astype(np.int16)
        time_ps = np.frombuffer(payload, "<i8", n, 16 * k + 2 * n).astype(np.int64)
        block = TagBlock(channel=channel, time_ps=time_ps, start_ps=start, stop_ps=stop,
                         overflow=bool(overflow), lost_tags=lost,
                         overflow_intervals=intervals)
        return block, n, offset + total


class _BlockDamageError(Exception):
    """Internal: what is wrong with one block (the reader adds file and offset)."""

    def __init__(self, problem: str, *, torn: bool = False) -> None:
        super().__init__(problem)
        self.problem = problem
        self.torn = torn


def _all_zero(f: BinaryIO) -> bool:
    """True if every byte from the current position to the end of ``f`` is zero."""
    while chunk := f.read(_CHUNK):
        if chunk.count(0) != len(chunk):
            return False
    return True
