"""Runs whose process died are marked where a physicist looks (issue 9, item 2).

``qkdlab runs`` lists a data folder's runs with their status, after marking every run
left ``running`` by a process that died (``died: <reason>``); ``qkdlab run bb84`` marks
them before it starts.  The orphans here are datasets written as a run writes them,
whose process record names a process that has exited (or whose heartbeat is old); a
real SIGKILL is in ``test_process_death``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qkdlab.cli import main
from qkdlab.experiments.bb84.liveness import HEARTBEAT_KEY, PROCESS_KEY


def gone_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


def add_run(data_dir: Path, *, status: str | None, pid: int | None = None,
            host: str | None = None, heartbeat: float | None = None,
            experiment: str = "bb84", run_id: str | None = None) -> int:
    """A dataset in ``data_dir/qkdlab.db`` with a run's metadata; its QCoDeS run id."""
    from qcodes.dataset import (
        Measurement,
        initialise_or_create_database_at,
        load_or_create_experiment,
    )

    initialise_or_create_database_at(data_dir / "qkdlab.db")
    meas = Measurement(exp=load_or_create_experiment(experiment, sample_name="qkd-link"),
                       name=experiment)
    meas.register_custom_parameter("frame")
    with meas.run() as saver:
        dataset = saver.dataset
        if run_id is not None:
            dataset.add_metadata("qkdlab_run", json.dumps({"run_id": run_id}))
        if status is not None:
            dataset.add_metadata("status", status)
        if pid is not None:
            dataset.add_metadata(PROCESS_KEY, json.dumps(
                {"pid": pid, "host": host or socket.gethostname(),
                 "started_unix": time.time() - 60}))
        if heartbeat is not None:
            dataset.add_metadata(HEARTBEAT_KEY, f"{heartbeat:.3f}")
        saver.add_result(("frame", 0))
        return int(dataset.run_id)


def status_of(data_dir: Path, dataset: int) -> str:
    from qcodes.dataset import load_by_run_spec
    from qcodes.dataset.sqlite.database import connect

    conn = connect(data_dir / "qkdlab.db")
    try:
        return str(load_by_run_spec(captured_run_id=dataset, conn=conn).metadata["status"])
    finally:
        conn.close()


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what came before (QCoDeS' notes of the datasets written)
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def runs_json(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str
              ) -> dict[str, Any]:
    code, out, _ = cli(capsys, "runs", "--data-dir", str(data_dir), "--json", *args)
    assert code == 0
    listed: dict[str, Any] = json.loads(out)
    return listed


def test_qkdlab_runs_lists_every_run_and_marks_the_dead_ones_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = socket.gethostname()
    now = time.time()
    dead = gone_pid()
    done = add_run(tmp_path, status="completed", pid=dead, heartbeat=now - 900,
                   run_id="aaa")
    killed = add_run(tmp_path, status="running", pid=dead, heartbeat=now, run_id="bbb")
    alive = add_run(tmp_path, status="running", pid=os.getpid(), heartbeat=now,
                    run_id="ccc")
    silent = add_run(tmp_path, status="running", pid=1, host="elsewhere",
                     heartbeat=now - 500, run_id="ddd")
    calibration = add_run(tmp_path, status=None, experiment="calibration")

    # silent for 500 s: dead only if 500 s is too long (the default is 120 s)
    patient = runs_json(capsys, tmp_path, "--stale-after", "1000")
    assert [m["dataset"] for m in patient["marked"]] == [killed]
    assert re.fullmatch(rf"process {dead} on {re.escape(host)} is gone \(last heartbeat "
                        r"\d{4}-\d\d-\d\dT[\d:]+\+00:00\)", patient["marked"][0]["reason"])
    listed = runs_json(capsys, tmp_path)
    assert [m["dataset"] for m in listed["marked"]] == [silent]
    assert listed["marked"][0]["reason"].startswith("no heartbeat for 500 s (process 1 on "
                                                    "elsewhere")
    by_id = {run["dataset"]: run for run in listed["runs"]}
    assert list(by_id) == [done, killed, alive, silent, calibration]
    assert (by_id[done]["state"], by_id[done]["status"]) == ("finished", "completed")
    assert by_id[killed]["status"] == f"died: {patient['marked'][0]['reason']}"
    assert by_id[silent]["status"].startswith("died: no heartbeat for 500 s")
    assert (by_id[alive]["state"], by_id[alive]["status"]) == ("running", "running")
    assert (by_id[calibration]["experiment"], by_id[calibration]["run_id"],
            by_id[calibration]["status"]) == ("calibration", None, "")
    assert [by_id[d]["run_id"] for d in (done, killed, alive, silent)] == [
        "aaa", "bbb", "ccc", "ddd"]
    # the marks are in the database, for every later reader
    assert status_of(tmp_path, killed) == by_id[killed]["status"]
    assert status_of(tmp_path, silent) == by_id[silent]["status"]
    assert status_of(tmp_path, alive) == "running"
    assert status_of(tmp_path, done) == "completed"

    # once marked, a run is never marked again; the table says what each run is
    code, out, err = cli(capsys, "runs", "--data-dir", str(tmp_path))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"5 run(s) in {tmp_path / 'qkdlab.db'}"
    rows = {int(line.split()[0]): line for line in lines[2:]}
    assert re.search(r" bbb +\d{4}-\d\d-\d\d [\d:]+ +died: process \d+ on ", rows[killed])
    assert re.search(r" ccc .* running \(heartbeat \d+ s ago\)$", rows[alive])
    assert re.search(r" calibration +- .* -$", rows[calibration])
    assert rows[done].endswith(" completed")


def test_qkdlab_runs_refuses_a_folder_without_runs_and_bad_options(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "runs", "--data-dir", str(tmp_path))
    assert code == 2
    assert err == (f"qkdlab: error: no runs in {tmp_path}: {tmp_path / 'qkdlab.db'} does not "
                   "exist (give the data folder of your runs with --data-dir)\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["runs", "--stale-after", "0"])
    assert exit_.value.code == 2
    assert "argument --stale-after: --stale-after must be > 0 and finite, got 0" in \
        capsys.readouterr().err


def test_qkdlab_run_bb84_marks_the_orphans_of_its_data_folder_first(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = gone_pid()
    orphan = add_run(tmp_path, status="running", pid=dead, heartbeat=time.time(),
                     run_id="orphan")
    code, out, err = cli(capsys, "run", "bb84", "--mock", "--duration", "0.2", "--seed", "3",
                         "--data-dir", str(tmp_path), "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["status"] == "completed"
    assert re.search(rf"qkdlab: run #{orphan} in {re.escape(str(tmp_path / 'qkdlab.db'))} "
                     rf"never ended \(process {dead} on .* is gone \(last heartbeat .*\)\): "
                     r"marked 'died'\n", err), err
    assert status_of(tmp_path, orphan).startswith(f"died: process {dead} on ")
    assert status_of(tmp_path, summary["dataset"]) == "completed"  # the new run: untouched
    listed = runs_json(capsys, tmp_path)
    assert listed["marked"] == []
    assert [(r["dataset"], r["state"]) for r in listed["runs"]] == [
        (orphan, "finished"), (summary["dataset"], "finished")]
