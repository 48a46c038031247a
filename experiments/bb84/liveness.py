"""Tell a live BB84 run from one whose process died, and mark the dead ones.

A run writes ``status: running`` when it starts and its final status when it ends
(``completed``, ``stopped``, ``failed: ...``...).  A process killed outright
(SIGKILL, power cut) never writes the end: its dataset keeps every frame flushed so
far but still says ``running``.  To tell the two apart a run also records
:data:`PROCESS_KEY` (pid, host, start time) and refreshes :data:`HEARTBEAT_KEY` (Unix
time, s) at least every :data:`HEARTBEAT_PERIOD_S` while frames come in.  A reader
(:func:`liveness`) calls a ``running`` run *dead* when

* it was started on this host and its pid no longer exists, or
* its heartbeat is older than ``stale_after_s`` (any host; the only test possible for
  a run on another machine), unless it was started on this host and its process is
  provably still there: the pid exists and that process started before the run did
  (Linux ``/proc``; a pid reused by a younger process does not count).  A run that
  merely stalls (a debugger, a long block at the end) is never marked dead under it.

:func:`mark_orphaned_runs` writes ``died: ...`` into the status of every dead run of a
database, so that later readers need not repeat the test; ``qkdlab run bb84`` does so
for its data folder before it starts, and ``qkdlab runs`` before it lists the runs
(:func:`list_runs`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROCESS_KEY = "qkdlab_process"
"""Dataset metadata: JSON ``{"pid", "host", "started_unix"}`` of the acquiring process."""
HEARTBEAT_KEY = "heartbeat"
"""Dataset metadata: Unix time (s) of the run's latest sign of life."""
HEARTBEAT_PERIOD_S = 1.0
"""A running acquisition refreshes its heartbeat at least this often while frames arrive."""
STALE_AFTER_S = 120.0
"""Default age (s) beyond which a heartbeat proves nothing: frames are 0.2–1 s apart,
and sync (which emits no frame) takes a few seconds at most."""


def process_record() -> dict[str, Any]:
    """What identifies the current process (stored under :data:`PROCESS_KEY`)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started_unix": time.time()}


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists on this host (whoever owns it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def process_start_unix(pid: int) -> float | None:
    """Unix time (s) at which process ``pid`` of this host started; ``None`` where it
    cannot be told (no such process, no Linux ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    try:
        ticks = int(fields[19])  # field 22 of proc(5): starttime, clock ticks since boot
    except (IndexError, ValueError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def same_process_alive(pid: int, started_unix: float) -> bool:
    """True if ``pid`` exists here and is the process that started at ``started_unix``
    (it started no later: ``btime`` has a 1 s resolution, hence the slack)."""
    if not pid_alive(pid):
        return False
    start = process_start_unix(pid)
    return start is not None and math.isfinite(started_unix) and start <= started_unix + 2.0


@dataclass(frozen=True)
class Liveness:
    """What a reader can say about a run.

    Attributes:
        state: ``finished`` (a final status was written), ``running`` (its process
            shows signs of life), or ``dead`` (status ``running`` but the process is
            gone or silent).
        status: the status as stored.
        reason: why ``dead`` (empty otherwise).
    """

    state: str
    status: str
    reason: str = ""


def liveness(metadata: Mapping[str, Any], *, now: float | None = None,
             stale_after_s: float = STALE_AFTER_S) -> Liveness:
    """Whether the run whose dataset metadata is ``metadata`` is finished, running or dead."""
    if not stale_after_s > 0:
        raise ValueError(f"stale_after_s must be > 0 s, got {stale_after_s}")
    status = str(metadata.get("status", ""))
    if status != "running":
        return Liveness("finished", status)
    now = time.time() if now is None else now
    try:
        process = json.loads(str(metadata.get(PROCESS_KEY, "{}")))
    except json.JSONDecodeError:
        process = {}
    started = _float(process.get("started_unix"))
    beat = _float(metadata.get(HEARTBEAT_KEY))
    last = beat if math.isfinite(beat) else started
    pid, host = process.get("pid"), process.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid):
        return Liveness("dead", status, f"process {pid} on {host} is gone "
                        f"(last heartbeat {_iso(last)})")
    if (isinstance(pid, int) and host == socket.gethostname()
            and same_process_alive(pid, started)):
        return Liveness("running", status)  # maybe stalled, but its process is there
    if not math.isfinite(last):
        return Liveness("dead", status, "no process record and no heartbeat")
    if now - last > stale_after_s:
        return Liveness("dead", status, f"no heartbeat for {now - last:.0f} s (process "
                        f"{pid} on {host}, last heartbeat {_iso(last)})")
    return Liveness("running", status)


def mark_orphaned_runs(database: str | Path, *, stale_after_s: float = STALE_AFTER_S,
                       now: float | None = None) -> list[tuple[int, str]]:
    """Set ``status: died: <reason>`` on every dead run of ``database``; (run id, reason).

    Datasets of other experiments, and runs that are finished or alive, are left alone.
    """
    marked: list[tuple[int, str]] = []
    with _datasets(database) as datasets:
        for _, dataset in datasets:
            state = liveness(dataset.metadata, now=now, stale_after_s=stale_after_s)
            if state.state == "dead":
                dataset.add_metadata("status", f"died: {state.reason}")
                marked.append((dataset.run_id, state.reason))
    return marked


@dataclass(frozen=True)
class RunEntry:
    """One dataset of a database, as ``qkdlab runs`` lists it.

    Attributes:
        dataset: the QCoDeS run id (``#n``).
        experiment: the QCoDeS experiment (``bb84``, ``calibration``...).
        run_id: the qkdlab run id (None for datasets that are no BB84 run).
        started: start time, local, ``YYYY-MM-DD HH:MM:SS`` (QCoDeS' run timestamp).
        state: :func:`liveness` of its metadata (``finished``, ``running``, ``dead``).
        status: the stored status (empty for datasets that have none).
        heartbeat_age_s: seconds since the last heartbeat (None: none recorded).
    """

    dataset: int
    experiment: str
    run_id: str | None
    started: str
    state: str
    status: str
    heartbeat_age_s: float | None = None


def list_runs(database: str | Path, *, stale_after_s: float = STALE_AFTER_S,
              now: float | None = None) -> list[RunEntry]:
    """Every dataset of ``database`` in run order, with its status and liveness (read only)."""
    now = time.time() if now is None else now
    entries = []
    with _datasets(database) as datasets:
        for experiment, dataset in datasets:
            meta = dataset.metadata
            try:
                record = json.loads(str(meta.get("qkdlab_run", "{}")))
            except json.JSONDecodeError:
                record = {}
            run_id = record.get("run_id") if isinstance(record, dict) else None
            beat = _float(meta.get(HEARTBEAT_KEY))
            state = liveness(meta, now=now, stale_after_s=stale_after_s)
            entries.append(RunEntry(
                dataset=dataset.run_id, experiment=experiment,
                run_id=run_id if isinstance(run_id, str) else None,
                started=dataset.run_timestamp() or "", state=state.state, status=state.status,
                heartbeat_age_s=now - beat if math.isfinite(beat) else None))
    return sorted(entries, key=lambda e: e.dataset)


@contextlib.contextmanager
def _datasets(database: str | Path) -> Iterator[list[tuple[str, Any]]]:
    """``(experiment name, dataset)`` of every dataset of a QCoDeS database file, the
    connection open while the context lasts."""
    from qcodes.dataset import experiments
    from qcodes.dataset.sqlite.database import connect

    path = Path(database)
    if not path.is_file():
        raise FileNotFoundError(f"no QCoDeS database at {path}")
    conn = connect(path)
    try:
        yield [(experiment.name, dataset) for experiment in experiments(conn=conn)
               for dataset in experiment.data_sets()]
    finally:
        conn.close()


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _iso(unix: float) -> str:
    if not math.isfinite(unix):
        return "never"
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat(timespec="seconds")
