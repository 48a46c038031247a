"""Offline re-processing of a run whose tagger link dropped mid-run (issue 9).

The run continues in a second stream segment (its own raw file, fresh sync, Alice's
pattern restarted with a derived seed).  ``reprocess`` / ``qkdlab reprocess`` of that
run must give the live run's results: every dataset figure of every frame, the totals,
and the very sifted bits its key block saved.  The fault is injected as in
``test_faults_midrun``: the tagger's link is dropped at frame 1 and refused for longer
than the driver's timeout, so the stream fails and the run retries.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ruamel.yaml

from qkdlab.cli import DEFAULT_MOCK_STATION, bb84_settings, main
from qkdlab.experiments.bb84.monitoring import FaultPolicy
from qkdlab.experiments.bb84.processing import FrameStats, RunTotals
from qkdlab.experiments.bb84.rawtags import RawTagFileError, RawTagReader, RawTagWriter
from qkdlab.experiments.bb84.reprocess import ReprocessError, reprocess
from qkdlab.experiments.bb84.run import FRAME_PARAMETERS, BB84Result, run_bb84
from qkdlab.experiments.bb84.secure_key import block_id, load_record
from qkdlab.roles import bb84_roles
from qkdlab.station import open_station
from qkdlab.tags import TagBlock

TAGGER_TIMEOUT_S = 1.5


def fast_station(tmp_path: Path) -> Path:
    """The packaged mock station, its tagger's timeout 1.5 s (default 5 s)."""
    yaml = ruamel.yaml.YAML(typ="rt")
    data: Any = yaml.load(DEFAULT_MOCK_STATION.read_text())
    data["instruments"]["tagger"].setdefault("init", {})["timeout"] = TAGGER_TIMEOUT_S
    path = tmp_path / "mock_fast.yaml"
    with path.open("w") as f:
        yaml.dump(data, f)
    return path


def run_with_a_dropped_tagger_link(data_dir: Path) -> BB84Result:
    with open_station(fast_station(data_dir), seed=11) as loaded:
        assert loaded.launcher is not None
        tagger = loaded.launcher.servers["tagger"].faults

        def drop_at_frame_1(stats: FrameStats) -> None:
            if stats.frame == 1:
                tagger.drop_connection(refuse_for_s=TAGGER_TIMEOUT_S + 0.5)

        return run_bb84(bb84_roles(loaded), bb84_settings(DEFAULT_MOCK_STATION, seed=5),
                        duration_s=0.8, data_dir=data_dir, progress=False,
                        distill_key=False, fault_policy=FaultPolicy(retry_wait_s=0.1),
                        on_frame=drop_at_frame_1)


def dataset_columns(result: BB84Result, names: list[str]) -> dict[str, np.ndarray]:
    """Every named per-frame parameter of the run's dataset, and the frame numbers.

    Read from the SQLite results table itself: QCoDeS' reader hands its converter
    SQLite's text form of each number, 15 significant digits, not the stored double.
    """
    with contextlib.closing(sqlite3.connect(result.database)) as conn:
        (table,) = conn.execute("SELECT result_table_name FROM runs WHERE guid = ?",
                                (result.dataset_guid,)).fetchone()
        out: dict[str, np.ndarray] = {}
        for name in names:
            rows = conn.execute(f'SELECT "frame", "{name}" FROM "{table}" '
                                f'WHERE "{name}" IS NOT NULL ORDER BY id').fetchall()
            frames = np.array([float(f) for f, _ in rows])
            out[name] = np.array([float(v) for _, v in rows])  # NaN is stored as 'nan'
            if "frame" in out:
                np.testing.assert_array_equal(frames, out["frame"], err_msg=name)
            out["frame"] = frames
    return out


def assert_same_totals(again: RunTotals, live: RunTotals) -> None:
    for name in ("pulses", "frames", "counts", "unassigned", "before_start", "lost_tags",
                 "overflow_frames"):
        assert getattr(again, name) == getattr(live, name), name
    for name in ("detected", "sifted", "errors"):
        np.testing.assert_array_equal(getattr(again, name), getattr(live, name),
                                      err_msg=name)


def cli_json(*args: str) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


def test_a_run_with_a_dropped_tagger_link_reprocesses_identically(tmp_path: Path) -> None:
    result = run_with_a_dropped_tagger_link(tmp_path)
    assert result.status == "completed"
    assert len(result.interruptions) == 1
    first, second = map(Path, result.raw_tag_files)
    assert second.name == f"bb84-{result.run_id}-s1.qkt"

    again = reprocess(first)
    # both segments, in order, each synchronised afresh and giving frames
    assert [(s.index, s.path) for s in again.segments] == [(0, first), (1, second)]
    assert all(s.frames >= 1 and s.damage is None for s in again.segments)
    assert again.damage is None
    assert again.blocks == sum(RawTagReader(p).scan().blocks for p in (first, second))

    # per frame: every figure the live run saved, frame by frame, bit for bit
    channels = sorted(int(ch) for ch in RawTagReader(first).metadata["detectors"])
    names = ["segment", *FRAME_PARAMETERS, *(f"rate_ch{ch}" for ch in channels)]
    assert set(again.frames) == {"frame", *names}
    live = dataset_columns(result, names)
    assert live["frame"].size == result.totals.frames
    np.testing.assert_array_equal(live["segment"], again.frames["segment"])
    assert set(live["segment"].tolist()) == {0.0, 1.0}
    for name in ("frame", *names):
        np.testing.assert_array_equal(again.frames[name], live[name], err_msg=name)

    # totals, estimate and the sifted bits the run's key block saved
    assert_same_totals(again.totals, result.totals)
    for name in ("gains", "qber_z", "qber_x", "key_rate_per_pulse", "aborted"):
        assert getattr(again.estimate, name) == getattr(result.estimate, name), name
    sifted = again.totals.sifted_arrays()
    stem = tmp_path / "sifted" / block_id(result.run_id, 0)
    alice, bob = load_record(f"{stem}-alice.npz"), load_record(f"{stem}-bob.npz")
    assert alice.bits.size > 1000
    np.testing.assert_array_equal(sifted["pulse"], alice.pulse)
    np.testing.assert_array_equal(sifted["basis"], alice.basis)
    np.testing.assert_array_equal(sifted["intensity"], alice.intensity)
    np.testing.assert_array_equal(sifted["alice"], alice.bits)
    np.testing.assert_array_equal(sifted["bob"], bob.bits)

    # alone, the second segment's file is that segment only
    alone = reprocess(second, whole_run=False)
    assert alone.totals.frames == again.segments[1].frames < result.totals.frames

    # qkdlab reprocess <any segment's file>: the whole run, the live run's figures
    summary = result.summary()
    cli = cli_json("reprocess", str(second), "--json")
    for key in ("run_id", "pulses", "detections", "sifted_bits", "qber_z", "qber_x",
                "gain_signal", "gain_decoy", "gain_vacuum", "y1_lower", "e1_upper"):
        assert cli[key] == summary[key], key
    assert cli["frames"] == result.totals.frames
    assert [(s["segment"], s["path"], s["frames"]) for s in cli["segments"]] == [
        (s.index, str(s.path), s.frames) for s in again.segments]

    # a damaged block in segment 0: an error naming that file; salvage keeps segment 1
    # (its own time origin and sync), frame for frame
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in (first, second):
        shutil.copy(path, copy / path.name)
    damaged = bytearray((copy / first.name).read_bytes())
    start = RawTagReader(first).data_offset
    damaged[start + 100] ^= 0x40  # inside the first block
    (copy / first.name).write_bytes(bytes(damaged))
    with pytest.raises(RawTagFileError, match=rf"{first.name}: at byte {start} \(block 1\): "
                                              "checksum mismatch"):
        reprocess(copy / second.name)
    salvaged = reprocess(copy / second.name, salvage=True)
    lost, kept = salvaged.segments
    assert lost.damage is not None
    assert salvaged.damage is lost.damage
    assert (lost.blocks, lost.frames) == (0, 0)
    assert (kept.damage, kept.frames) == (None, again.segments[1].frames)
    seg1 = again.frames["segment"] == 1
    for name in names:
        if name != "segment":
            np.testing.assert_array_equal(salvaged.frames[name], again.frames[name][seg1],
                                          err_msg=name)


def write_segment(path: Path, run_id: str, segment: int) -> None:
    meta = {"run_id": run_id, "segment": segment, "settings": {}, "detectors": {}}
    with RawTagWriter(path, meta) as writer:
        writer.write(TagBlock(channel=np.zeros(0, np.int16), time_ps=np.zeros(0, np.int64),
                              start_ps=0, stop_ps=1000))


def test_a_missing_or_foreign_segment_file_is_named(tmp_path: Path) -> None:
    write_segment(tmp_path / "bb84-abc.qkt", "abc", 0)
    write_segment(tmp_path / "bb84-abc-s2.qkt", "abc", 2)
    with pytest.raises(ReprocessError, match=r"run abc is missing the raw tag file of "
                                             r"segment\(s\) .*bb84-abc-s1\.qkt"):
        reprocess(tmp_path / "bb84-abc-s2.qkt")
    write_segment(tmp_path / "bb84-abc-s1.qkt", "xyz", 1)
    with pytest.raises(ReprocessError, match=r"bb84-abc-s1\.qkt: its header names segment 1 "
                                             r"of run 'xyz', not segment 1 of run abc"):
        reprocess(tmp_path / "bb84-abc.qkt")
    # a segment's file alone is read without looking for the others (here its header
    # lacks what processing needs)
    with pytest.raises(ReprocessError, match=r"bb84-abc-s2\.qkt: Alice's record cannot be "
                                             r"recomputed \(pattern algorithm None"):
        reprocess(tmp_path / "bb84-abc-s2.qkt", whole_run=False)
