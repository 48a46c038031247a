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
  a run on another machine, and the guard against a reused pid).

:func:`mark_orphaned_runs` writes ``died: ...`` into the status of every dead run of a
database, so that later readers need not repeat the test.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import socket
import time
from collections.abc import Mapping
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
    from qcodes.dataset import experiments
    from qcodes.dataset.sqlite.database import connect

    path = Path(database)
    if not path.is_file():
        raise FileNotFoundError(f"no QCoDeS database at {path}")
    marked: list[tuple[int, str]] = []
    conn = connect(path)
    try:
        for experiment in experiments(conn=conn):
            for dataset in experiment.data_sets():
                state = liveness(dataset.metadata, now=now, stale_after_s=stale_after_s)
                if state.state == "dead":
                    dataset.add_metadata("status", f"died: {state.reason}")
                    marked.append((dataset.run_id, state.reason))
    finally:
        conn.close()
    return marked


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _iso(unix: float) -> str:
    if not math.isfinite(unix):
        return "never"
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat(timespec="seconds")
