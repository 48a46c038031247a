"""SIGKILL of the acquiring process (issue 9, item 2): nothing half-written survives.

A child process runs BB84 on the mock station (or writes keys) and is killed outright
at a random point; the parent then checks what a crash must leave behind:

* the QCoDeS dataset opens, every frame in it is whole, its status still says
  ``running`` and :func:`~qkdlab.experiments.bb84.liveness.liveness` calls the run dead
  (its pid is gone); ``qkdlab runs`` marks it (:func:`mark_orphaned_runs`) and lists it
  as died;
* the raw tag file holds whole, checksummed blocks, at most a torn final one (detected
  and reported), and at least every block that became a frame;
* a run whose status is ``completed`` has whole sifted records (the status is written
  last); no key comes from a run that did not complete; every key file in a key store
  loads and holds exactly the bits that were saved (never half a key).

Kill times come from a seeded generator: reproducible, yet spread over the run.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qkdlab.experiments.bb84.liveness import PROCESS_KEY, liveness, mark_orphaned_runs
from qkdlab.experiments.bb84.rawtags import RawTagReader
from qkdlab.experiments.bb84.run import FRAME_PARAMETERS
from qkdlab.experiments.bb84.secure_key import block_id, load_record
from qkdlab.protocol.keystore import KeyStore

RUNS = """
import contextlib
import sys
from pathlib import Path

from qkdlab.cli import DEFAULT_MOCK_STATION, bb84_settings
from qkdlab.experiments.bb84.run import run_bb84
from qkdlab.roles import bb84_roles
from qkdlab.station import open_station

data, runs, duration = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
with contextlib.redirect_stdout(sys.stderr), open_station(DEFAULT_MOCK_STATION,
                                                          seed=11) as loaded:
    roles = bb84_roles(loaded)
    print("ready", file=sys.__stdout__, flush=True)
    for i in range(runs):
        run_bb84(roles, bb84_settings(DEFAULT_MOCK_STATION, seed=5 + i), duration_s=duration,
                 data_dir=data, progress=False)
"""

KEYS = """
import os
import sys
import time

import numpy as np
import pytest

from qkdlab.protocol.keystore import KeyStore

# a slow disk (test side only): small writes that take time, so that the kills fall
# inside key writes rather than between them
_write = os.write


def slow_write(fd, data):
    written = _write(fd, bytes(memoryview(data)[: 1 << 14]))
    time.sleep(0.002)
    return written


os.write = slow_write
store, start = KeyStore(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(start)
print("ready", flush=True)
for i in range(start, start + 10_000):
    n = int(rng.integers(1 << 20, 1 << 22))
    bits = np.random.default_rng(i).integers(0, 2, n, dtype=np.uint8)
    store.save(bits, run_id="kill", key_id=f"k{i:06d}", eps_sec=1e-10, eps_cor=1e-15)
    store.consume(int(rng.integers(0, n)))
"""


def spawn(tmp_path: Path, script: str, *args: object) -> subprocess.Popen[str]:
    path = tmp_path / "child.py"
    path.write_text(script)
    env = {**os.environ, "PYVISA_LIBRARY": "@py"}
    child = subprocess.Popen([sys.executable, str(path), *map(str, args)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready", "child failed to start"
    return child


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    try:
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        assert child.stdout is not None
        child.stdout.close()


def frames_written(database: Path) -> int:
    """Frames of the latest run in the database (read-only, while it is being written)."""
    if not database.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True,
                                                timeout=5)) as conn:
            row = conn.execute("SELECT result_table_name FROM runs "
                               "ORDER BY run_id DESC LIMIT 1").fetchone()
            if row is None:
                return 0
            (count,) = conn.execute(
                f'SELECT COUNT(*) FROM "{row[0]}" WHERE qber_z IS NOT NULL').fetchone()
            return int(count)
    except sqlite3.OperationalError:  # schema not created yet
        return 0


def runs_cli(data_dir: Path) -> dict[str, Any]:
    """``qkdlab runs --json`` on ``data_dir``: what it marked and lists."""
    from qkdlab.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["runs", "--data-dir", str(data_dir), "--json"]) == 0
    listed: dict[str, Any] = json.loads(out.getvalue())
    return listed


def datasets(database: Path) -> list[Any]:
    from qcodes.dataset import experiments
    from qcodes.dataset.sqlite.database import connect

    conn = connect(database)
    return [ds for exp in experiments(conn=conn) for ds in exp.data_sets()]


def check_dataset_frames(dataset: Any) -> int:
    """Every frame present holds every figure (frames whole or absent); their number."""
    frames = None
    for name in FRAME_PARAMETERS:
        got = np.asarray(dataset.get_parameter_data(name)[name]["frame"])
        if frames is None:
            frames = got
        np.testing.assert_array_equal(got, frames, err_msg=name)
    assert frames is not None
    np.testing.assert_array_equal(frames, np.arange(frames.size))
    return int(frames.size)


def check_raw_file(path: Path, frames: int) -> None:
    """Whole checksummed blocks in time order, at most a torn tail; >= one per frame."""
    reader = RawTagReader(path)
    scan = reader.scan()
    assert scan.damage is None or scan.damage.torn, scan.describe()
    blocks = list(reader.blocks(tolerate_torn_tail=True))
    assert len(blocks) == scan.blocks >= frames
    for a, b in itertools.pairwise(blocks):
        assert b.start_ps >= a.stop_ps


def check_key_store(path: Path) -> int:
    """Every key loads (checksum) and is the saved key's unconsumed tail; bits held."""
    store = KeyStore(path)  # opening removes stray temporaries of a killed writer
    assert not list(path.glob(".tmp-*"))
    total = 0
    for record in store.list():
        index = int(record.key_id[1:])
        saved = np.random.default_rng(index).integers(0, 2, record.n_bits, dtype=np.uint8)
        np.testing.assert_array_equal(store.load(record.key_id), saved[record.consumed_bits:])
        total += record.available_bits
    return total


def test_a_run_killed_mid_acquisition_leaves_readable_consistent_data(tmp_path: Path) -> None:
    database = tmp_path / "qkdlab.db"
    child = spawn(tmp_path, RUNS, tmp_path, 1, 60.0)
    try:
        deadline = time.monotonic() + 120
        while frames_written(database) < 3:
            assert child.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "no frames within 120 s"
            time.sleep(0.05)
        time.sleep(float(np.random.default_rng(9).uniform(0, 0.4)))
    finally:
        kill(child)

    (dataset,) = datasets(database)
    meta = dataset.metadata
    assert meta["status"] == "running"  # the end was never written
    assert json.loads(meta[PROCESS_KEY])["pid"] == child.pid
    state = liveness(meta)
    assert state.state == "dead"
    assert f"process {child.pid}" in state.reason
    frames = check_dataset_frames(dataset)
    assert frames >= 3
    check_raw_file(Path(meta["raw_tags"]), frames)
    assert not (tmp_path / "sifted").exists()  # no record, no key from a run that died
    assert not list(tmp_path.glob("keys/*/*.key"))
    # 'qkdlab runs' marks the orphan, once, and lists it as died
    listed = runs_cli(tmp_path)
    assert [m["dataset"] for m in listed["marked"]] == [dataset.run_id]
    (entry,) = listed["runs"]
    assert entry["status"].startswith(f"died: process {child.pid} on ")
    assert datasets(database)[0].metadata["status"] == entry["status"]
    assert mark_orphaned_runs(database) == []
    assert runs_cli(tmp_path)["marked"] == []


def test_runs_killed_at_random_points_leave_only_whole_results(tmp_path: Path) -> None:
    database = tmp_path / "qkdlab.db"
    rng = np.random.default_rng(2024)
    seen_dead = 0
    for _ in range(2):  # the second process carries on next to the first one's orphan
        child = spawn(tmp_path, RUNS, tmp_path, 1000, 0.4)
        try:
            time.sleep(float(rng.uniform(0.5, 4.0)))
        finally:
            kill(child)
        dead = check_runs(tmp_path)
        assert dead - seen_dead <= 1  # only the run the kill interrupted, if any
        assert len(mark_orphaned_runs(database)) == dead - seen_dead
        seen_dead = dead
    assert len(datasets(database)) >= 2


def check_runs(data_dir: Path) -> int:
    """Invariants of every run in ``data_dir`` after a kill; the number of dead runs."""
    dead = 0
    for dataset in datasets(data_dir / "qkdlab.db"):
        meta = dataset.metadata
        run = json.loads(meta["qkdlab_run"])
        state = liveness(meta)
        assert state.state in ("finished", "dead")
        frames = check_dataset_frames(dataset)
        segments = json.loads(meta.get("raw_tags_segments", "[]"))
        for segment in segments or [{"path": meta["raw_tags"], "frames": frames}]:
            check_raw_file(Path(segment["path"]), segment["frames"])
        records = [data_dir / "sifted" / f"{block_id(run['run_id'], 0)}-{side}.npz"
                   for side in ("alice", "bob")]
        if meta["status"] == "completed":  # written last: its files are whole
            alice, bob = (load_record(p) for p in records)
            assert alice.bits.size == bob.bits.size > 0
        else:
            assert meta["status"].startswith(("running", "died: "))
            dead += 1
    for side in ("alice", "bob"):  # runs this short never distil a key
        assert not list(data_dir.glob(f"keys/{side}/*.key"))
    return dead


def test_key_store_writes_killed_at_random_points_never_leave_half_a_key(
        tmp_path: Path) -> None:
    store = tmp_path / "keys"
    rng = np.random.default_rng(7)
    held = []
    for round_ in range(4):
        child = spawn(tmp_path, KEYS, store, 1000 * round_)
        try:
            time.sleep(float(rng.uniform(0.05, 0.6)))
        finally:
            kill(child)
        held.append(check_key_store(store))
    assert held[-1] > 0  # keys were written, and kills landed among the writes


def test_liveness_tells_finished_live_and_dead_runs_apart() -> None:
    import socket

    here = socket.gethostname()
    now = 1_000_000.0

    def meta(status: str, pid: int, host: str, beat: float | None) -> dict[str, str]:
        out = {"status": status,
               PROCESS_KEY: json.dumps({"pid": pid, "host": host, "started_unix": now - 50})}
        if beat is not None:
            out["heartbeat"] = str(beat)
        return out

    assert liveness(meta("completed", 1, here, None), now=now).state == "finished"
    assert liveness(meta("failed: tagger: x", 1, here, None), now=now).state == "finished"
    # this process is alive and beating
    assert liveness(meta("running", os.getpid(), here, now - 1), now=now).state == "running"
    # alive pid but silent for too long, and that process started after the run: the
    # pid was reused by a younger process
    stale = liveness(meta("running", os.getpid(), here, now - 500), now=now,
                     stale_after_s=120)
    assert stale.state == "dead"
    assert "no heartbeat for 500 s" in stale.reason
    # the run's own process is still there, only silent (a debugger, a long last block):
    # not dead, however old its heartbeat
    real_now = time.time()
    hung = {"status": "running", "heartbeat": str(real_now - 500), PROCESS_KEY: json.dumps(
        {"pid": os.getpid(), "host": here, "started_unix": real_now})}
    assert liveness(hung, now=real_now, stale_after_s=120).state == "running"
    # another host: only the heartbeat can tell
    assert liveness(meta("running", 1, "elsewhere", now - 5), now=now).state == "running"
    assert liveness(meta("running", 1, "elsewhere", now - 500), now=now).state == "dead"
    # no record at all
    assert liveness({"status": "running"}, now=now).state == "dead"
    with pytest.raises(ValueError, match="stale_after_s must be > 0 s"):
        liveness({"status": "running"}, stale_after_s=0)
