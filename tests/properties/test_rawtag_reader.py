"""Property tests: the raw tag file reader returns exactly what was written, or nothing.

Random valid files round-trip exactly.  A truncated file (any length) reads back the
whole blocks before the cut and reports the torn tail at that block's byte offset; a
corrupted file (bytes flipped anywhere in the blocks) reads back the blocks before the
damage, identical, and reports the damaged block's offset: never a block with wrong data.
Reading never changes the file.

One limit of the file format, not of the reader: the header's JSON metadata has no
checksum, so a flipped byte inside it that still leaves valid JSON changes the metadata
silently (:func:`test_header_corruption_never_corrupts_blocks` covers what is checked).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdlab.experiments.bb84.rawtags import (
    MAGIC,
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
def test_header_corruption_never_corrupts_blocks(
        workdir: Path, metadata: dict[str, Any], blocks: list[TagBlock],
        data: st.DataObject) -> None:
    """A flipped byte in the header: an error, or (inside the JSON text, still valid
    JSON) other metadata; the blocks are never misread."""
    path = workdir / "header.qkt"
    offsets = write(path, metadata, blocks)
    raw = bytearray(path.read_bytes())
    pos = data.draw(st.integers(0, offsets[0] - 1), label="pos")
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
    assert pos >= len(MAGIC) + 4  # magic and length damage is always caught
    assert len(got) == len(blocks)
    assert all(same(a, b) for a, b in zip(got, blocks, strict=True))


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_raw_tag_file_errors(workdir: Path, junk: bytes) -> None:
    path = workdir / "junk.qkt"
    for content in (junk, MAGIC + junk, _header({"a": 1}) + junk):
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
            assert content == _header({"a": 1})


def _header(metadata: dict[str, Any]) -> bytes:
    text = json.dumps(metadata).encode()
    return MAGIC + len(text).to_bytes(4, "little") + text
