"""Property tests: the raw tag file reader returns exactly what was written, or nothing.

Random valid files round-trip exactly.  A truncated file (any length) reads back the
whole blocks before the cut and reports the torn tail at that block's byte offset; a
corrupted file (bytes flipped anywhere in the blocks) reads back the blocks before the
damage, identical, and reports the damaged block's offset: never a block with wrong data.
Reading never changes the file.

The header carries a CRC (format version 2): flipped bytes anywhere in it (a burst of
up to 4 bytes, which CRC-32 always detects) are an error, never other run metadata.
Version 1 files (no header CRC) still round-trip; a flipped header byte there can only
change the metadata, never the blocks.  Unknown format versions are refused by name.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdlab.experiments.bb84.rawtags import (
    MAGIC,
    MAGIC_STEM,
    MAGIC_V1,
    RawTagFileError,
    RawTagReader,
    RawTagWriter,
)
from qkdlab.tags import TagBlock

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

I64 = st.integers(-(2**62), 2**62)


@st.composite
def tag_blocks(draw: st.DrawFn) -> TagBlock:
    start = draw(I64)
    length = draw(st.integers(0, 10**9))
    n = draw(st.integers(0, 40))
    times = np.sort(np.array(draw(st.lists(st.integers(start, start + max(length - 1, 0)),
                                          min_size=n, max_size=n)), dtype=np.int64))
    if length == 0:
        times = times[:0]
    channel = np.array(draw(st.lists(st.integers(-(2**15), 2**15 - 1), min_size=times.size,
                                     max_size=times.size)), dtype=np.int16)
    k = draw(st.integers(0, 3))
    intervals = np.array(draw(st.lists(st.tuples(I64, I64), min_size=k, max_size=k)),
                         dtype=np.int64).reshape(k, 2)
    return TagBlock(channel=channel, time_ps=times, start_ps=start, stop_ps=start + length,
                    overflow=k > 0, lost_tags=draw(st.integers(0, 2**63 - 1)),
                    overflow_intervals=intervals)


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
METADATA = st.dictionaries(st.text(max_size=10), st.one_of(
    JSON_SCALARS, st.lists(JSON_SCALARS, max_size=3)), max_size=5)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def write(path: Path, metadata: dict[str, Any], blocks: list[TagBlock]) -> list[int]:
    """Write a raw file; the byte offset of every block and the file's end (from the
    layout: a block is a 4-byte marker, a 33-byte head, its arrays and a 4-byte CRC)."""
    path.unlink(missing_ok=True)
    with RawTagWriter(path, metadata) as writer:
        for block in blocks:
            writer.write(block)
    offsets = [RawTagReader(path).data_offset]
    for block in blocks:
        offsets.append(offsets[-1] + 4 + 33 + 16 * len(block.overflow_intervals)
                       + 10 * len(block) + 4)
    assert offsets[-1] == path.stat().st_size
    return offsets


def same(a: TagBlock, b: TagBlock) -> bool:
    return (a.start_ps == b.start_ps and a.stop_ps == b.stop_ps and a.overflow == b.overflow
            and a.lost_tags == b.lost_tags and a.channel.dtype == b.channel.dtype
            and a.time_ps.dtype == b.time_ps.dtype
            and np.array_equal(a.channel, b.channel) and np.array_equal(a.time_ps, b.time_ps)
            and np.array_equal(a.overflow_intervals, b.overflow_intervals))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@SETTINGS
@given(METADATA, st.lists(tag_blocks(), max_size=5))
def test_valid_files_round_trip_exactly(workdir: Path, metadata: dict[str, Any],
                                        blocks: list[TagBlock]) -> None:
    path = workdir / "ok.qkt"
    offsets = write(path, metadata, blocks)
    reader = RawTagReader(path)
    assert reader.metadata == json.loads(json.dumps(metadata, sort_keys=True))
    got = list(reader.blocks())
    assert len(got) == len(blocks)
    assert all(same(a, b) for a, b in zip(got, blocks, strict=True))
    scan = reader.scan()
    assert (scan.blocks, scan.tags, scan.intact_bytes, scan.damage) == (
        len(blocks), sum(len(b) for b in blocks), offsets[-1], None)
    assert scan.complete
    assert [same(a, b) for a, b in zip(reader.salvage(), blocks, strict=True)] == \
        [True] * len(blocks)
    assert reader.damage is None


@SETTINGS
@given(st.lists(tag_blocks(), min_size=1, max_size=4), st.data())
def test_truncation_keeps_whole_blocks_and_reports_the_torn_one(
        workdir: Path, blocks: list[TagBlock], data: st.DataObject) -> None:
    path = workdir / "cut.qkt"
    offsets = write(path, {"run_id": "cut"}, blocks)
    full = path.read_bytes()
    cut = data.draw(st.integers(0, len(full) - 1), label="cut")
    path.write_bytes(full[:cut])
    before = digest(path)
    if cut < offsets[0]:  # inside the header: no block can be trusted to be where it seems
        with pytest.raises(RawTagFileError, match=r"at byte \d+: (empty file|truncated header)"):
            RawTagReader(path)
        assert digest(path) == before
        return
    whole = sum(1 for end in offsets[1:] if end <= cut)
    reader = RawTagReader(path)
    got = list(reader.blocks(tolerate_torn_tail=True))
    assert len(got) == whole
    assert all(same(a, b) for a, b in zip(got, blocks, strict=False))
    at_boundary = cut in offsets
    if at_boundary:  # a shorter file, nothing torn
        assert reader.damage is None
    else:
        assert reader.damage is not None
        assert reader.damage.torn
        assert reader.damage.offset == offsets[whole]
        assert reader.damage.blocks_before == whole
        with pytest.raises(RawTagFileError, match=rf"at byte {offsets[whole]} \(block "
                                                  rf"{whole + 1}\): truncated") as caught:
            list(RawTagReader(path).blocks())
        assert caught.value.tags_before == sum(len(b) for b in blocks[:whole])
    assert digest(path) == before


@SETTINGS
@given(st.lists(tag_blocks(), min_size=1, max_size=4), st.data())
def test_corrupted_block_is_detected_and_earlier_blocks_survive(
        workdir: Path, blocks: list[TagBlock], data: st.DataObject) -> None:
    path = workdir / "bad.qkt"
    offsets = write(path, {"run_id": "bad"}, blocks)
    raw = bytearray(path.read_bytes())
    positions = data.draw(st.lists(st.integers(offsets[0], len(raw) - 1), min_size=1,
                                   max_size=4, unique=True), label="positions")
    for pos in positions:
        raw[pos] ^= data.draw(st.integers(1, 255), label=f"xor@{pos}")
    path.write_bytes(bytes(raw))
    before = digest(path)
    first = min(positions)
    hit = max(i for i in range(len(blocks)) if offsets[i] <= first)  # first damaged block
    reader = RawTagReader(path)
    got: list[TagBlock] = []
    with pytest.raises(RawTagFileError, match=rf"at byte {offsets[hit]} \(block {hit + 1}\)"
                       ) as caught:
        got.extend(reader.blocks())
    assert len(got) == hit
    assert all(same(a, b) for a, b in zip(got, blocks, strict=False))
    assert caught.value.blocks_before == hit
    salvaged = list(reader.salvage())
    assert len(salvaged) == hit
    assert all(same(a, b) for a, b in zip(salvaged, blocks, strict=False))
    assert reader.damage is not None
    assert reader.damage.offset == offsets[hit]
    scan = reader.scan()
    assert (scan.blocks, scan.intact_bytes) == (hit, offsets[hit])
    assert digest(path) == before


@SETTINGS
@given(st.lists(tag_blocks(), max_size=3), st.integers(1, 4096))
def test_zero_filled_tail_after_a_crash_is_a_torn_tail(
        workdir: Path, blocks: list[TagBlock], zeros: int) -> None:
    path = workdir / "zeros.qkt"
    offsets = write(path, {}, blocks)
    with open(path, "ab") as f:
        f.write(bytes(zeros))
    reader = RawTagReader(path)
    assert len(list(reader.blocks(tolerate_torn_tail=True))) == len(blocks)
    assert reader.damage is not None
    assert reader.damage.torn
    assert reader.damage.offset == offsets[-1]
    with pytest.raises(RawTagFileError, match="zero-filled tail"):
        list(reader.blocks())


@SETTINGS
@given(METADATA, st.lists(tag_blocks(), min_size=1, max_size=3), st.data())
def test_flipped_header_bytes_are_always_an_error(
        workdir: Path, metadata: dict[str, Any], blocks: list[TagBlock],
        data: st.DataObject) -> None:
    """A burst of 1-4 flipped bytes anywhere in the header (marker, length, metadata,
    CRC): the file is refused, naming it; its run metadata is never read different."""
    path = workdir / "header.qkt"
    offsets = write(path, metadata, blocks)
    original = RawTagReader(path).metadata
    raw = bytearray(path.read_bytes())
    start = data.draw(st.integers(0, offsets[0] - 1), label="start")
    width = data.draw(st.integers(1, min(4, offsets[0] - start)), label="width")
    for pos in range(start, start + width):
        raw[pos] ^= data.draw(st.integers(1, 255), label=f"xor@{pos}")
    path.write_bytes(bytes(raw))
    before = digest(path)
    outcome: RawTagFileError | RawTagReader
    try:
        outcome = RawTagReader(path)
    except RawTagFileError as err:
        outcome = err
    if isinstance(outcome, RawTagFileError):
        assert str(path) in str(outcome)
        assert outcome.block is None  # a header error (a longer length may point past it)
        assert outcome.offset <= len(raw)
        assert digest(path) == before
        return
    reader = outcome
    # read at all only if the version byte became b"1" (no header CRC): the metadata is
    # then the original, and the old CRC where a block should start is refused
    assert (reader.version, raw[len(MAGIC_STEM)]) == (1, ord("1"))
    assert reader.metadata == original
    with pytest.raises(RawTagFileError, match=rf"at byte {offsets[0] - 4} \(block 1\)"):
        list(reader.blocks())
    assert digest(path) == before


def test_a_version_byte_flipped_to_1_is_caught_at_the_first_block(workdir: Path) -> None:
    """The one header flip the header CRC cannot see (version 2 read as version 1): the
    metadata is then the original, and the CRC where version 1 expects a block is not
    one."""
    path = workdir / "v2as1.qkt"
    blocks = [TagBlock(channel=np.array([1, 2], np.int16), time_ps=np.array([5, 9]),
                       start_ps=0, stop_ps=10)]
    offsets = write(path, {"run_id": "x", "segment": 0}, blocks)
    raw = bytearray(path.read_bytes())
    raw[len(MAGIC_STEM)] = ord("1")
    path.write_bytes(bytes(raw))
    reader = RawTagReader(path)
    assert (reader.version, reader.metadata) == (1, {"run_id": "x", "segment": 0})
    with pytest.raises(RawTagFileError, match=rf"at byte {offsets[0] - 4} \(block 1\): "
                                              "corrupted: marker"):
        list(reader.blocks())


def as_version_1(path: Path) -> bytes:
    """A version-2 file's bytes as version 1 wrote them: no header CRC."""
    raw = path.read_bytes()
    start = RawTagReader(path).data_offset
    return MAGIC_V1 + raw[len(MAGIC): start - 4] + raw[start:]


@SETTINGS
@given(METADATA, st.lists(tag_blocks(), max_size=4))
def test_version_1_files_still_round_trip_exactly(
        workdir: Path, metadata: dict[str, Any], blocks: list[TagBlock]) -> None:
    path = workdir / "v1.qkt"
    write(path, metadata, blocks)
    path.write_bytes(as_version_1(path))
    reader = RawTagReader(path)
    assert (reader.version, reader.header_checked) == (1, False)
    assert reader.metadata == json.loads(json.dumps(metadata, sort_keys=True))
    got = list(reader.blocks())
    assert len(got) == len(blocks)
    assert all(same(a, b) for a, b in zip(got, blocks, strict=True))
    assert reader.scan().complete


@SETTINGS
@given(METADATA, st.lists(tag_blocks(), min_size=1, max_size=3), st.data())
def test_version_1_header_corruption_never_corrupts_blocks(
        workdir: Path, metadata: dict[str, Any], blocks: list[TagBlock],
        data: st.DataObject) -> None:
    """Version 1 has no header CRC: a flipped byte there is an error or (inside the JSON
    text, still valid JSON) other metadata; the blocks are never misread."""
    path = workdir / "header1.qkt"
    write(path, metadata, blocks)
    raw = bytearray(as_version_1(path))
    header_end = raw.index(b"BLK1", len(MAGIC_V1) + 4)
    pos = data.draw(st.integers(0, header_end - 1), label="pos")
    raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
    path.write_bytes(bytes(raw))
    outcome: RawTagFileError | list[TagBlock]
    try:
        outcome = list(RawTagReader(path).blocks())
    except RawTagFileError as err:
        outcome = err
    if isinstance(outcome, RawTagFileError):
        assert str(path) in str(outcome)
        return
    got = outcome
    assert pos >= len(MAGIC) + 4  # marker and length damage is always caught
    assert len(got) == len(blocks)
    assert all(same(a, b) for a, b in zip(got, blocks, strict=True))


@SETTINGS
@given(st.integers(0, 255).filter(lambda b: b not in b"12"), st.binary(max_size=64))
def test_unknown_format_versions_are_refused_by_name(workdir: Path, version: int,
                                                     rest: bytes) -> None:
    path = workdir / "future.qkt"
    path.write_bytes(MAGIC_STEM + bytes([version]) + rest)
    with pytest.raises(RawTagFileError, match=rf"at byte 7: unknown raw tag file format "
                       rf"version {_re_bytes(bytes([version]))} .*reads versions 1, 2"):
        RawTagReader(path)


def _re_bytes(value: bytes) -> str:
    import re

    return re.escape(repr(value))


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_raw_tag_file_errors(workdir: Path, junk: bytes) -> None:
    path = workdir / "junk.qkt"
    for content in (junk, MAGIC + junk, MAGIC_V1 + junk, _header({"a": 1}) + junk,
                    _header({"a": 1}, crc=True) + junk):
        path.write_bytes(content)
        error: RawTagFileError | None = None
        try:
            list(RawTagReader(path).blocks())
        except RawTagFileError as err:
            error = err
        if error is not None:
            assert str(path) in str(error)
            assert error.offset <= len(content)
        else:  # only a header with nothing after it is a valid (empty) file
            assert content in (_header({"a": 1}), _header({"a": 1}, crc=True))


def _header(metadata: dict[str, Any], *, crc: bool = False) -> bytes:
    """A version 1 header (``crc``: version 2, with its CRC), written by hand."""
    text = json.dumps(metadata).encode()
    body = len(text).to_bytes(4, "little") + text
    if not crc:
        return MAGIC_V1 + body
    return MAGIC + body + zlib.crc32(body).to_bytes(4, "little")
