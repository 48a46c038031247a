"""QCoDeS driver for the ID Quantique ID900 / ID1000 Time Controller (time tagger).

Sources (facts only; no prose or code copied):

* *Time Controller Series User Manual*, ID Quantique SA, Geneva (pages found at
  manualshive.com, "swiss-quantum-time-controller-series", document 3560472; the
  version is not printed on those pages):

  - §6.2.1.4 (p. 42) "Safe delays": input delays up to 1 s at 1 ps precision; above
    4 µs the delay buffer may overflow at high rates;
  - §6.3.4 (pp. 47–48) "Timestamp Data": timestamps are ps since the last reference
    event (acquisition start when no reference), binary ``uint64``, optionally
    followed by a ``uint64`` reference index (Table 10); keep the total below
    10 M timestamps/s or the buffer overflows;
  - §8.2.1 (pp. 68–69): RECord (acquisition timer) generator, TSCO combiners, RAW
    block (``REF``/``STOP`` links, ``RAW:SEND``);
  - §9 (p. 77) SCPI syntax: case-insensitive long/short forms, ``#`` suffixes,
    ``?`` queries, units (``1V`` = ``1000mV``; time base TB = 1 ps);
  - §10 (pp. 90–91) DataLinkTarget (DLT) service: ZeroMQ on port 6060, JSON answers,
    ``{"error": {"description": ...}}`` on failure; ``start-stream --address
    --channel --stream-port [--with-ref-index] [--id]`` (exclusive-pair stream),
    ``stop --id`` / ``status --id`` (``acquisitions_count``, ``errors``,
    ``inactivity``, ``timestamps_count``), ``list``.

* ID Quantique's Python examples shipped with the Time Controller software
  ("Examples/Python": ``utils/common.py``, ``utils/acquisitions``,
  ``Timestamp_acquisition_stream``, ``sync_stream``, ``Inputs_status``): SCPI over
  ZeroMQ REQ on port 5555, command spellings used below, the record set-up
  (``REC:TRIG:ARM:MODE MANUal``, ``REC:ENABle ON``, ``REC:STOP``, ``REC:NUM``,
  ``REC:DURation`` / ``REC:PWID`` + ``REC:PPER``, ``REC:PLAY``, ``REC:STAGe?``),
  ``RAW#:REF:LINK NONE`` for absolute timestamps, ``RAW#:ERRORS:CLEAR`` /
  ``RAW#:ERRORS?``, ``RAW#:SEND ON/OFF``, sub-acquisitions ≥ 0.2 s separated by
  ≥ 40 ns, timestamps restarting at each sub-acquisition (record *k* starts at
  *k*·PPER), ``INPU#:HIRES:ERROR?``, ``DEVI:RES?``, ``DEVI:RES:BWID?``,
  ``DEVI:CONFI:LOAD``, ``DELA#:VALU`` replies in ``TB``; and replies containing
  ``SCPI_ERR_`` marking a rejected command (multi-device example).
* ``START:DELAY``, ``INPUT#:COUPLING``/``EDGE``/``THRESHOLD`` replies (``RISING``,
  ``0.5V``) as used by MSL's open-source ID900 driver (msl-equipment).

Command groups (exact strings sent):

====================================  ===========================  ==========
command                               source                       used by
====================================  ===========================  ==========
``*IDN?``                             IDQ examples                 get_idn
``INPU#:ENAB``/``THRE``/``EDGE``/``COUP``  manual §9, IDQ examples  channels
``STAR:ENAB``/``THRE``/``EDGE``/``COUP``   IDQ examples             start
``DELA#:VALU`` (TB)                   IDQ examples                 delay
``STAR:DELA`` (TB)                    MSL ID900 driver             start delay
``INPU#:HIRES:ERROR?``                IDQ Inputs_status example    errors
``RAW#:STOP:LINK``/``REF:LINK``       manual §8.2.1.8, examples    acquisition
``RAW#:SEND``/``ERRORS?``/``ERRORS:CLEAR``  IDQ examples           acquisition
``REC:*``                             manual §8.2.1, examples      acquisition
``DEVI:RES?``/``DEVI:RES:BWID?``      IDQ examples                 parameters
``DEVI:CONFI:LOAD INIT``              IDQ / MSL examples           reset
DLT ``start-stream``/``stop``/``status``  manual §10               acquisition
====================================  ===========================  ==========

Not documented anywhere found, hence the driver's own choices:

* **dead time**: no per-input dead-time command was found for the ID900/ID1000; the
  driver applies a non-paralysable dead time to each channel's tags itself
  (:func:`apply_dead_time`), carried across blocks of one acquisition;
* **threshold range**: ±2 V is assumed (not found in the manual pages);
* **what a record without timestamps produces** on the stream: this driver expects a
  0-byte message so that message *n* of every channel is record *n* (IDQ's example
  client stops on a 0-byte message; this driver counts records instead) and checks
  the count against the DLT's ``acquisitions_count`` at the end;
* **the unit of** ``RAW#:ERRORS?``: reported as ``TagBlock.lost_tags`` (the mock counts
  lost timestamps; on a real unit treat it as "at least this many error events");
* **cleanup after a lost link** (``safe_state``, an aborted acquisition): once a command
  gets no reply, the next ones on that link are not sent, and a link whose last request
  went unanswered is first probed with a short timeout (:data:`CLEANUP_PROBE_S`), so
  that a dead link costs one probe rather than a timeout per command; what was not done
  is logged and kept in ``last_cleanup``.

Addresses: ``tcp://<device-ip>:5555`` for the SCPI port; the DLT endpoint defaults to
``tcp://127.0.0.1:6060`` (it runs on the host) and may be given as ``dlt_address`` or
appended to the address as ``?dlt=tcp://host:port`` (how the mock launcher hands both
over in one station address).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import numpy.typing as npt
from qcodes import validators as vals
from qcodes.instrument import ChannelList, Instrument, InstrumentChannel
from qcodes.parameters import Parameter, create_on_off_val_mapping

from qkdlab.drivers.scpi_errors import harden_reply_parsers
from qkdlab.tags import CHANNEL_DTYPE, TIME_DTYPE, TagBlock

if TYPE_CHECKING:
    from qcodes.instrument import InstrumentBaseKWArgs
    from typing_extensions import Unpack

log = logging.getLogger(__name__)

PS_PER_S = 10**12
MAX_DELAY_S = 1.0  # manual §6.2.1.4
SAFE_DELAY_S = 4e-6  # manual §6.2.1.4: above this the delay buffer may overflow
THRESHOLD_LIMIT_V = 2.0  # assumed, see module docstring
MAX_DEAD_TIME_S = 1e-3
MAX_RATE_HZ = 10e6  # manual p. 48: keep the total below 10 M timestamps/s
MIN_SUB_ACQUISITION_S = 0.2  # IDQ sync_stream example
MIN_RECORD_GAP_S = 40e-9  # IDQ sync_stream example
DEFAULT_DLT_ADDRESS = "tcp://127.0.0.1:6060"
TIMESTAMP_DTYPE = np.dtype("<u8")
TIMESTAMP_REF_DTYPE = np.dtype([("timestamp", "<u8"), ("ref_index", "<u8")])
"""Binary formats of manual Table 10: ``<timestamp>`` or ``<timestamp><index>``, uint64."""

CLEANUP_PROBE_S = 0.5
"""Reply timeout (s) of a cleanup's first command on a link whose last request got no
reply: enough for a link that came back, short enough that a lost one costs little."""

U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]


class IDQTimeControllerError(Exception):
    """The Time Controller or its DataLinkTarget rejected a command or sent bad data."""


class IDQTimeControllerCommunicationError(IDQTimeControllerError):
    """No (valid) answer within the timeout: link down, device busy or wrong address."""


# ------------------------------------------------------------------ data helpers


def decode_timestamps(buffer: bytes, with_ref_index: bool = False) -> tuple[U64Array,
                                                                            U64Array | None]:
    """Timestamps (and reference indices) of one stream message (manual Table 10).

    Raises ValueError if the length is not a whole number of records.
    """
    dtype = TIMESTAMP_REF_DTYPE if with_ref_index else TIMESTAMP_DTYPE
    if len(buffer) % dtype.itemsize:
        raise ValueError(f"{len(buffer)} bytes is not a whole number of "
                         f"{dtype.itemsize}-byte timestamp records")
    if with_ref_index:
        records: npt.NDArray[np.void] = np.frombuffer(buffer, dtype=dtype)
        stamps: U64Array = records["timestamp"]
        index: U64Array = records["ref_index"]
        return stamps, index
    plain: U64Array = np.frombuffer(buffer, dtype=TIMESTAMP_DTYPE)
    return plain, None


def apply_dead_time(times_ps: I64Array, dead_ps: int,
                    last_kept_ps: int | None = None) -> tuple[npt.NDArray[np.bool_], int | None]:
    """Mask of the tags a non-paralysable dead time keeps, and the last kept time.

    A tag is kept if it comes ``dead_ps`` or more after the last kept one
    (``last_kept_ps`` carries the state across blocks).  Vectorised: tags whose gap to
    the previous tag is ≥ ``dead_ps`` are always kept; inside each run of closer tags
    the chain of kept tags is followed with ``searchsorted``, one step per round for
    all runs at once (rounds = the longest chain, not the number of tags).
    """
    n = times_ps.size
    if n == 0 or dead_ps <= 0:
        last = int(times_ps[-1]) if n else last_kept_ps
        return np.ones(n, bool), last
    kept = np.zeros(n, bool)
    valid = np.ones(n, bool)
    if last_kept_ps is not None:
        valid = times_ps >= last_kept_ps + dead_ps
    first = int(np.argmax(valid)) if valid.any() else n
    if first == n:
        return kept, last_kept_ps
    t = times_ps
    gaps_ok = np.empty(n, bool)
    gaps_ok[0] = True
    np.greater_equal(t[1:] - t[:-1], dead_ps, out=gaps_ok[1:])
    gaps_ok[:first] = False
    gaps_ok[first] = True
    frontier = np.flatnonzero(gaps_ok)
    kept[frontier] = True
    cur = frontier
    while cur.size:
        nxt = np.searchsorted(t, t[cur] + dead_ps, side="left")
        nxt = nxt[nxt < n]
        nxt = nxt[~kept[nxt]]
        kept[nxt] = True
        cur = nxt
    return kept, int(t[np.flatnonzero(kept)[-1]])


def merge_channels(times: Sequence[I64Array],
                   channels: Sequence[int]) -> tuple[I64Array, npt.NDArray[np.int16]]:
    """Merge per-channel time-sorted tags into one sorted block (ties keep channel order).

    A stable argsort of the concatenation; numpy's timsort exploits the sorted runs.
    """
    if not times:
        return np.zeros(0, TIME_DTYPE), np.zeros(0, CHANNEL_DTYPE)
    time_ps = np.concatenate(times)
    channel = np.concatenate([np.full(t.size, ch, CHANNEL_DTYPE)
                              for t, ch in zip(times, channels, strict=True)])
    if len(times) > 1:
        order = np.argsort(time_ps, kind="stable")
        time_ps, channel = time_ps[order], channel[order]
    return time_ps, channel


def _parse_time_base(reply: str) -> int:
    """Integer ps from ``1234TB`` / ``1234`` (time base unit TB = 1 ps, manual §9)."""
    text = reply.strip()
    if text.upper().endswith("TB"):
        text = text[:-2]
    return round(float(text))


def _parse_volts(reply: str) -> float:
    """Volts from ``0.5V`` / ``500mV`` / ``0.5``."""
    text = reply.strip()
    if text.lower().endswith("mv"):
        return float(text[:-2]) * 1e-3
    if text.upper().endswith("V"):
        text = text[:-1]
    return float(text)


def _free_port(host: str) -> int:
    """An unused TCP port on ``host`` (for a DLT stream on this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


# ------------------------------------------------------------------ ZeroMQ link


class _ReqLink:
    """A ZeroMQ REQ client with a timeout ("lazy pirate").

    A request whose connection drops while it waits for the reply is re-sent on a
    fresh socket (the device never saw it or its reply is lost); a request that simply
    gets no reply within the timeout resets the socket and returns None, so a late
    reply can never be taken for the answer to the next request.
    """

    max_resends = 3

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        import zmq  # heavy import kept out of module import

        self._zmq = zmq
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.unanswered: str | None = None
        """The last request that got no reply within its timeout; None once a reply
        (any reply) comes: a link whose last request is unanswered may be gone."""
        self._ctx = zmq.Context()
        self._sock: Any = None
        self._monitor: Any = None
        self.lock = threading.RLock()
        self._open()

    def _open(self) -> None:
        zmq = self._zmq
        self._sock = self._ctx.socket(zmq.REQ)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 50)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock.connect(self.endpoint)

    def _close_socket(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)
            self._sock = self._monitor = None

    def reset(self) -> None:
        """Drop the socket (and any request in flight) and connect a fresh one."""
        with self.lock:
            self._close_socket()
            self._open()

    def request(self, message: str, timeout_s: float | None = None) -> bytes | None:
        """Send ``message``; the reply bytes, or None after the timeout (socket reset)."""
        zmq = self._zmq
        from zmq.utils.monitor import recv_monitor_message

        wait = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait
        payload = message.encode("utf-8")
        resends = 0
        with self.lock:
            while self._monitor.poll(0):  # events of earlier drops are history
                recv_monitor_message(self._monitor)
            try:
                self._sock.send(payload, zmq.NOBLOCK)
            except zmq.ZMQError:
                self.reset()
                self.unanswered = message
                return None
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.reset()
                    self.unanswered = message
                    return None
                poller = zmq.Poller()
                poller.register(self._sock, zmq.POLLIN)
                poller.register(self._monitor, zmq.POLLIN)
                ready = dict(poller.poll(max(1, int(remaining * 1000))))
                if self._sock in ready:
                    reply: bytes = self._sock.recv()
                    self.unanswered = None
                    return reply
                if self._monitor in ready:
                    event = recv_monitor_message(self._monitor)
                    if event["event"] == zmq.EVENT_DISCONNECTED and resends < self.max_resends:
                        log.info("link to %s dropped while waiting; re-sending %r",
                                 self.endpoint, message)
                        resends += 1
                        self.reset()
                        self._sock.send(payload, zmq.NOBLOCK)

    def close(self) -> None:
        with self.lock:
            self._close_socket()
            self._ctx.term()


# ------------------------------------------------------------------ stream receiver


@dataclass
class StreamStats:
    """Memory figures of the last acquisition (for tests and benchmarks)."""

    records: int = 0
    tags: int = 0
    peak_queue_blocks: int = 0
    peak_pending_messages: int = 0
    peak_block_tags: int = 0
    peak_message_bytes: int = 0
    queue_limit: int = 0
    pending_limit: int = 0
    reported_lost_tags: int = 0


class _StreamReceiver(threading.Thread):
    """Receives the DLT's PAIR streams; hands whole records (one message per channel) on.

    Memory is bounded: at most ``queue_blocks`` records wait in the queue, at most
    ``pending_limit`` messages wait per channel for the other channels, and each socket
    holds at most ``hwm`` messages; beyond that the receiver stops reading and the
    DLT/device buffers fill — which the device reports as lost timestamps.
    """

    def __init__(self, endpoints: dict[int, str], queue_blocks: int, hwm: int,
                 stats: StreamStats) -> None:
        super().__init__(name="idq-tc-stream", daemon=True)
        import zmq

        self._zmq = zmq
        self.endpoints = endpoints
        self.hwm = hwm
        self.records: queue.Queue[dict[int, bytes]] = queue.Queue(maxsize=queue_blocks)
        self.pending_limit = max(2, queue_blocks)
        self.stats = stats
        stats.queue_limit = queue_blocks
        stats.pending_limit = self.pending_limit
        self._halt = threading.Event()
        self._ctx = zmq.Context()
        self._socks: dict[int, Any] = {}
        for raw, endpoint in endpoints.items():
            sock = self._ctx.socket(zmq.PAIR)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, hwm)
            sock.connect(endpoint)
            self._socks[raw] = sock
        self.error: BaseException | None = None

    def run(self) -> None:
        zmq = self._zmq
        pending: dict[int, deque[bytes]] = {raw: deque() for raw in self._socks}
        try:
            while not self._halt.is_set():
                poller = zmq.Poller()
                for raw, sock in self._socks.items():
                    if len(pending[raw]) < self.pending_limit:
                        poller.register(sock, zmq.POLLIN)
                ready = dict(poller.poll(50)) if poller.sockets else {}
                if not poller.sockets:
                    time.sleep(0.005)
                for raw, sock in self._socks.items():
                    if sock in ready:
                        msg = sock.recv(zmq.NOBLOCK)
                        pending[raw].append(msg)
                        self.stats.peak_message_bytes = max(self.stats.peak_message_bytes,
                                                            len(msg))
                self.stats.peak_pending_messages = max(
                    self.stats.peak_pending_messages, *(len(p) for p in pending.values()))
                while all(pending.values()) and not self._halt.is_set():
                    record = {raw: pending[raw].popleft() for raw in pending}
                    while not self._halt.is_set():
                        try:
                            self.records.put(record, timeout=0.05)
                            break
                        except queue.Full:
                            continue
                    self.stats.peak_queue_blocks = max(self.stats.peak_queue_blocks,
                                                       self.records.qsize())
        except Exception as err:  # surfaced to the consumer
            self.error = err
        finally:
            for sock in self._socks.values():
                sock.close(linger=0)
            self._ctx.term()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# ------------------------------------------------------------------ channels


class IDQTimeControllerInput(InstrumentChannel):
    """One discriminator input: START (channel 0) or INPUT 1–4.

    Parameters: ``enabled``, ``threshold`` (V), ``edge``, ``coupling``, ``delay`` (s,
    set in integer ps), ``dead_time`` (s, applied by the driver), ``hires_error``.
    """

    def __init__(self, parent: IDQTimeController, name: str, channel: int) -> None:
        super().__init__(parent, name)
        self.channel = channel
        block = "STAR" if channel == 0 else f"INPU{channel}"
        self.block = block
        # manual §9 / IDQ examples: ENAB, THRE (V), EDGE, COUP
        self.enabled: Parameter = self.add_parameter(
            "enabled", label=f"{block} enabled", get_cmd=f"{block}:ENAB?",
            set_cmd=f"{block}:ENAB {{}}", val_mapping=create_on_off_val_mapping("ON", "OFF"),
            docstring="Input on/off.")
        self.threshold: Parameter = self.add_parameter(
            "threshold", label=f"{block} threshold", unit="V", get_cmd=f"{block}:THRE?",
            set_cmd=f"{block}:THRE {{:.6g}}V", get_parser=_parse_volts,
            vals=vals.Numbers(-THRESHOLD_LIMIT_V, THRESHOLD_LIMIT_V),
            docstring="Discriminator threshold (V); a pulse below it gives no tag.")
        self.edge: Parameter = self.add_parameter(
            "edge", label=f"{block} edge", get_cmd=f"{block}:EDGE?", set_cmd=f"{block}:EDGE {{}}",
            val_mapping={"rising": "RISING", "falling": "FALLING"},
            docstring="Edge that triggers a tag.")
        self.coupling: Parameter = self.add_parameter(
            "coupling", label=f"{block} coupling", get_cmd=f"{block}:COUP?",
            set_cmd=f"{block}:COUP {{}}", val_mapping={"DC": "DC", "AC": "AC"},
            docstring="Input coupling.")
        # input delays: DELA# block (IDQ examples); START: STAR:DELA (MSL ID900 driver)
        delay_cmd = "STAR:DELA" if channel == 0 else f"DELA{channel}:VALU"
        self.delay: Parameter = self.add_parameter(
            "delay", label=f"{block} delay", unit="s", get_cmd=f"{delay_cmd}?",
            set_cmd=f"{delay_cmd} {{}}", set_parser=self._delay_to_ps,
            get_parser=lambda r: _parse_time_base(r) / PS_PER_S,
            vals=vals.Numbers(0.0, MAX_DELAY_S),
            docstring="Delay added to this input's tags (s; sent as integer ps, 1 ps "
                      "steps; up to 1 s, above 4 µs the delay buffer may overflow).")
        self.dead_time: Parameter = self.add_parameter(
            "dead_time", label=f"{block} dead time", unit="s", initial_value=0.0,
            get_cmd=None, set_cmd=None, vals=vals.Numbers(0.0, MAX_DEAD_TIME_S),
            docstring="Non-paralysable dead time applied by the driver to this channel's "
                      "tags (s; no device command exists for it).")
        self.hires_error: Parameter = self.add_parameter(
            "hires_error", label=f"{block} high-resolution error", get_cmd=f"{block}:HIRES:ERROR?",
            get_parser=int, set_cmd=False,
            docstring="High-resolution error code (0 = OK; IDQ Inputs_status example).")

    def _delay_to_ps(self, seconds: float) -> int:
        ps = round(seconds * PS_PER_S)
        if seconds > SAFE_DELAY_S:
            log.warning("%s: delay %.3g s above the 4 µs safe limit (manual §6.2.1.4)",
                        self.full_name, seconds)
        return ps

    @property
    def dead_time_ps(self) -> int:
        """Dead time (integer ps)."""
        return round(float(self.dead_time.cache.get()) * PS_PER_S)


# ------------------------------------------------------------------ instrument


@dataclass
class CleanupReport:
    """What one cleanup (``safe_state``, or ``abort`` of an interrupted acquisition) did.

    Attributes:
        what: ``"safe_state"`` or ``"abort"``.
        done: commands sent and answered, in order.
        not_done: command -> why not (no reply, rejected, or not sent because its link
            had just given no reply).
    """

    what: str
    done: list[str] = field(default_factory=list)
    not_done: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every command was done."""
        return not self.not_done

    def describe(self) -> str:
        """One line: every command not done and why."""
        return "; ".join(f"{cmd}: {why}" for cmd, why in self.not_done.items())


@dataclass
class _Acquisition:
    """Book-keeping of one running timestamp acquisition."""

    raws: dict[int, int]  # RAW block -> tag channel
    dlt_ids: dict[int, str] = field(default_factory=dict)
    raw_errors: dict[int, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)
    dead_state: dict[int, int | None] = field(default_factory=dict)
    width_ps: int = 0
    period_ps: int = 0
    records_floor: int = 0  # records the DLT had registered before the last error reading
    losses: list[tuple[int, int, int, int]] = field(default_factory=list)  # (block, n, a, b)


class IDQTimeController(Instrument):
    """ID Quantique ID900 / ID1000 Time Controller over ZeroMQ (SCPI + DataLinkTarget).

    Satisfies :class:`qkdlab.drivers.roles.TimeTagger`: tag channel 0 is the START
    input, 1–4 the inputs; ``TagBlock`` times are int64 ps since the acquisition start.

    Args:
        name: instrument name.
        address: ``tcp://<ip>:5555`` (optionally ``?dlt=tcp://host:port``).
        dlt_address: DataLinkTarget endpoint (default ``tcp://127.0.0.1:6060``).
        timeout: reply timeout of one SCPI/DLT request (s).
        tag_channels: inputs acquired by ``RAW1``… in order (≤ 4; 0 = START).
        sub_acquisition_s: record length of :meth:`stream` blocks (s, ≥ 0.2).
        record_gap_s: dead gap between two records (s, ≥ 40 ns).
        queue_blocks: records that may wait for the consumer (memory bound).
        socket_hwm: messages each stream socket may hold.
        max_block_tags: a block with more tags raises (memory bound).
        with_ref_index: ask the DLT for ``(timestamp, ref_index)`` records.
        stream_ports: DLT stream ports per RAW block (default: free local ports).
    """

    def __init__(
        self,
        name: str,
        address: str,
        *,
        dlt_address: str | None = None,
        timeout: float = 5.0,
        tag_channels: Sequence[int] = (1, 2, 3, 4),
        sub_acquisition_s: float = 0.2,
        record_gap_s: float = 400e-9,
        queue_blocks: int = 4,
        socket_hwm: int = 2,
        max_block_tags: int = 8_000_000,
        with_ref_index: bool = False,
        stream_ports: Sequence[int] | None = None,
        **kwargs: Unpack[InstrumentBaseKWArgs],
    ) -> None:
        super().__init__(name, **kwargs)
        parts = urlsplit(address)
        if parts.scheme != "tcp" or not parts.hostname or not parts.port:
            raise ValueError(f"{name}: address must look like tcp://<ip>:5555, got {address!r}")
        query = parse_qs(parts.query)
        self.address = f"tcp://{parts.hostname}:{parts.port}"
        self.device_host = parts.hostname
        self.dlt_endpoint = dlt_address or query.get("dlt", [DEFAULT_DLT_ADDRESS])[0]
        dlt_host = urlsplit(self.dlt_endpoint).hostname
        if not dlt_host:
            raise ValueError(f"{name}: bad DLT address {self.dlt_endpoint!r}")
        self.dlt_host = dlt_host
        channels = tuple(int(c) for c in tag_channels)
        if not 1 <= len(channels) <= 4 or len(set(channels)) != len(channels) or any(
                c not in range(5) for c in channels):
            raise ValueError(f"{name}: tag_channels must be 1–4 distinct inputs in 0..4, "
                             f"got {tag_channels!r}")
        if sub_acquisition_s < MIN_SUB_ACQUISITION_S:
            raise ValueError(f"{name}: sub_acquisition_s must be >= 0.2 s (IDQ), got "
                             f"{sub_acquisition_s}")
        if record_gap_s < MIN_RECORD_GAP_S:
            raise ValueError(f"{name}: record_gap_s must be >= 40 ns, got {record_gap_s}")
        if stream_ports is not None and len(stream_ports) != len(channels):
            raise ValueError(f"{name}: give one stream port per tag channel")
        self.tag_channels = channels
        self.sub_acquisition_s = sub_acquisition_s
        self.record_gap_s = record_gap_s
        self.queue_blocks = max(1, queue_blocks)
        self.socket_hwm = max(1, socket_hwm)
        self.max_block_tags = max_block_tags
        self.with_ref_index = with_ref_index
        self.stream_ports = tuple(stream_ports) if stream_ports is not None else None
        self.timeout_s = timeout
        self.last_stream_stats = StreamStats()
        self.last_cleanup: CleanupReport | None = None
        """What the latest :meth:`safe_state` or aborted acquisition did and did not do."""
        self._active: _Acquisition | None = None
        self._link = _ReqLink(self.address, timeout)
        self._dlt: _ReqLink | None = None

        self.resolution: Parameter = self.add_parameter(
            "resolution", label="resolution mode", get_cmd="DEVI:RES?",
            set_cmd="DEVI:RES {}", val_mapping={"high_resolution": "HIRES",
                                                "high_speed": "LOWRES"},
            docstring="HIRES (1 ps bins) or LOWRES (high-speed) mode; license dependent.")
        self.time_bin: Parameter = self.add_parameter(
            "time_bin", label="time bin", unit="s", get_cmd="DEVI:RES:BWID?", set_cmd=False,
            get_parser=lambda r: _parse_time_base(r) / PS_PER_S,
            docstring="Timestamp bin width of the current resolution mode (s).")
        self.record_stage: Parameter = self.add_parameter(
            "record_stage", label="record stage", get_cmd="REC:STAGe?", set_cmd=False,
            get_parser=lambda r: r.strip().upper(),
            docstring="Acquisition timer state (PLAYING while recording).")

        self.start = IDQTimeControllerInput(self, "start", 0)
        self.add_submodule("start", self.start)
        inputs = ChannelList(self, "inputs", IDQTimeControllerInput)
        for ch in (1, 2, 3, 4):
            inp = IDQTimeControllerInput(self, f"input{ch}", ch)
            inputs.append(inp)
            self.add_submodule(f"input{ch}", inp)
        self.inputs = inputs
        self.add_submodule("inputs", inputs.to_channel_tuple())
        harden_reply_parsers(self)  # garbage replies: a clear error, never NaN (scpi_errors)
        self.connect_message()

    # -- transport -----------------------------------------------------------------
    def _exchange(self, link: _ReqLink, cmd: str, what: str,
                  timeout_s: float | None = None) -> str:
        reply = link.request(cmd, timeout_s)
        if reply is None:
            wait = link.timeout_s if timeout_s is None else timeout_s
            raise IDQTimeControllerCommunicationError(
                f"{self.name}: no reply from the {what} at {link.endpoint} to {cmd!r} within "
                f"{wait:g} s (link reset; check cable, address and device state)")
        try:
            return reply.decode("utf-8")
        except UnicodeDecodeError as err:
            raise IDQTimeControllerCommunicationError(
                f"{self.name}: garbage reply from the {what} to {cmd!r}: {reply[:40]!r}") from err

    def ask_raw(self, cmd: str) -> str:
        """One SCPI request and its reply (raises on ``SCPI_ERR_`` replies)."""
        return self._scpi(cmd)

    def _scpi(self, cmd: str, timeout_s: float | None = None) -> str:
        """One SCPI request, its reply checked; ``timeout_s`` overrides the link's."""
        reply = self._exchange(self._link, cmd, "Time Controller", timeout_s).strip()
        if "SCPI_ERR_" in reply:
            raise IDQTimeControllerError(f"{self.name}: command {cmd!r} rejected: {reply}")
        if cmd.rstrip().endswith("?") and not reply:
            raise IDQTimeControllerCommunicationError(
                f"{self.name}: empty reply to query {cmd!r}")
        if any(ord(c) < 32 and c not in "\n\r\t" for c in reply):
            raise IDQTimeControllerCommunicationError(
                f"{self.name}: garbage reply to {cmd!r}: {reply[:40]!r}")
        return reply

    def write_raw(self, cmd: str) -> None:
        """A set command (the device still answers; the answer is checked for errors)."""
        self.ask_raw(cmd)

    def _dlt_link(self) -> _ReqLink:
        if self._dlt is None:
            self._dlt = _ReqLink(self.dlt_endpoint, self.timeout_s)
        return self._dlt

    def dlt(self, command: str, timeout_s: float | None = None) -> Any:
        """One DataLinkTarget command (manual §10); its JSON answer.

        ``timeout_s``: reply timeout of this request (default: the instrument's).
        """
        text = self._exchange(self._dlt_link(), command, "DataLinkTarget", timeout_s)
        try:
            answer = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as err:
            raise IDQTimeControllerCommunicationError(
                f"{self.name}: DataLinkTarget answered {command!r} with non-JSON "
                f"{text[:60]!r}") from err
        if isinstance(answer, dict) and "error" in answer:
            desc = (answer.get("error") or {}).get("description", "unknown error")
            raise IDQTimeControllerError(f"{self.name}: DataLinkTarget rejected {command!r}: "
                                         f"{desc}")
        return answer

    def reconnect(self) -> None:
        """Drop both ZeroMQ sockets (and requests in flight) and open new ones."""
        self._link.reset()
        if self._dlt is not None:
            self._dlt.reset()

    def close(self) -> None:
        """Close the sockets, then the instrument."""
        with contextlib.suppress(Exception):
            self._link.close()
        if self._dlt is not None:
            with contextlib.suppress(Exception):
                self._dlt.close()
        super().close()

    # -- identity, reset, errors ---------------------------------------------------
    def get_idn(self) -> dict[str, str | None]:
        """``*IDN?`` split into vendor, model, serial, firmware."""
        reply = self.ask("*IDN?")
        parts = [p.strip() for p in reply.split(",")]
        if len(parts) == 4:
            return dict(zip(("vendor", "model", "serial", "firmware"), parts, strict=True))
        return {"vendor": "ID Quantique", "model": reply, "serial": None, "firmware": None}

    def reset(self) -> None:
        """Load the INIT configuration (block links and delays of the factory set-up)."""
        self.write("DEVI:CONFI:LOAD INIT")
        for ch in (self.start, *self.inputs):
            ch.dead_time(0.0)

    def error_status(self) -> dict[str, int]:
        """Error counters: ``RAW1``–``RAW4`` (``RAW#:ERRORS?``) and inputs' HIRES codes."""
        status = {f"RAW{n}": int(self.ask(f"RAW{n}:ERRORS?")) for n in (1, 2, 3, 4)}
        for ch in (self.start, *self.inputs):
            status[ch.block] = int(ch.hires_error())
        return status

    def check_errors(self) -> None:
        """Raise :class:`IDQTimeControllerError` listing every non-zero error counter."""
        bad = {k: v for k, v in self.error_status().items() if v}
        if bad:
            raise IDQTimeControllerError(f"{self.name}: device reports errors {bad}")

    def clear_errors(self) -> None:
        """Clear the RAW error counters and the inputs' HIRES errors."""
        for n in (1, 2, 3, 4):
            self.write(f"RAW{n}:ERRORS:CLEAR")
        for ch in (self.start, *self.inputs):
            self.write(f"{ch.block}:HIRES:ERROR:CLEAR")

    # -- TimeTagger role -------------------------------------------------------------
    def input_channel(self, channel: int) -> IDQTimeControllerInput:
        """Channel 0 = START, 1–4 = inputs."""
        if channel == 0:
            return self.start
        if channel in (1, 2, 3, 4):
            ch: IDQTimeControllerInput = self.inputs[channel - 1]
            return ch
        raise ValueError(f"{self.name}: channel {channel} does not exist (0 = START, 1–4)")

    def set_trigger_level(self, channel: int, level_v: float) -> None:
        """Discriminator threshold of ``channel`` (V)."""
        self.input_channel(channel).threshold(level_v)

    def set_input_delay(self, channel: int, delay_ps: int) -> None:
        """Delay added to ``channel``'s tags (integer ps, 0–10¹²)."""
        if int(delay_ps) != delay_ps:
            raise ValueError(f"{self.name}: delay_ps must be an integer, got {delay_ps}")
        self.input_channel(channel).delay(int(delay_ps) / PS_PER_S)

    def set_dead_time(self, channel: int, dead_time_ps: int) -> None:
        """Minimum spacing of ``channel``'s tags (ps), applied by the driver."""
        self.input_channel(channel).dead_time(int(dead_time_ps) / PS_PER_S)

    def acquire(self, duration_s: float) -> TagBlock:
        """Tags of one record of ``duration_s`` (held in memory as one block)."""
        if not 1e-6 <= duration_s <= 60.0:
            raise ValueError(f"{self.name}: acquire duration {duration_s} s not in [1 µs, 60 s]")
        width = round(duration_s * PS_PER_S)
        blocks = list(self._acquisition(1, width, width))
        return blocks[0] if len(blocks) == 1 else TagBlock.concatenate(blocks)

    def stream(self, duration_s: float | None = None) -> Iterator[TagBlock]:
        """Blocks of ``sub_acquisition_s`` each (endless when ``duration_s`` is None).

        Block *k* covers ``[k·P, k·P + W)`` with W the record width and P = W + gap:
        tags in the ≥ 40 ns gap between records are not recorded by the device, so
        consecutive blocks do not touch.  Each block reports the timestamps the device
        counted lost (``RAW#:ERRORS?`` increase) since the previous block; a trailing
        empty block reports losses counted after the last record.
        """
        width = round(self.sub_acquisition_s * PS_PER_S)
        period = width + round(self.record_gap_s * PS_PER_S)
        records = None
        if duration_s is not None:
            if duration_s <= 0:
                raise ValueError(f"{self.name}: stream duration must be > 0, got {duration_s}")
            records = max(1, math.ceil(duration_s * PS_PER_S / period))
        return self._acquisition(records, width, period)

    def safe_state(self) -> None:
        """Stop recording and timestamp transfer; close open DLT acquisitions (never raises).

        After a lost link this costs one short probe, not a timeout per command (see
        :meth:`_cleanup`); what could not be done is logged and kept in
        :attr:`last_cleanup`.
        """
        steps: list[tuple[str, str]] = [("scpi", "REC:STOP"),
                                        *(("scpi", f"RAW{n}:SEND OFF") for n in (1, 2, 3, 4))]
        acq: _Acquisition | None = getattr(self, "_active", None)  # None once closed
        if acq is not None:
            steps += [("dlt", f"stop --id {ident}") for ident in acq.dlt_ids.values()]
            acq.dlt_ids.clear()
        self._cleanup("safe_state", steps)

    def _cleanup(self, what: str, steps: Sequence[tuple[str, str]]) -> CleanupReport:
        """Send cleanup ``steps`` (``("scpi" | "dlt", command)``) in order; never raises.

        A lost link must not cost a full timeout per command: once a step gets no reply,
        the remaining steps on the same link are not sent; and on a link whose last
        request already went unanswered the first step waits only
        :data:`CLEANUP_PROBE_S` (a link that came back answers it, and the cleanup goes
        on normally).  A rejected or garbled reply proves the link alive: the next steps
        are still sent.  Every step not done is named, with why, in the log and in the
        report (also kept as :attr:`last_cleanup`).
        """
        report = CleanupReport(what)
        silent: dict[str, str] = {}  # link -> the step of this cleanup that got no reply
        for kind, cmd in steps:
            label = "Time Controller" if kind == "scpi" else "DataLinkTarget"
            if kind in silent:
                report.not_done[cmd] = (f"not sent: the {label} gave no reply to "
                                        f"{silent[kind]!r}")
                continue
            link: _ReqLink | None = None
            try:  # (a closed instrument has no links left: an error like any other)
                link = self._link if kind == "scpi" else self._dlt_link()
                probe = (None if link.unanswered is None
                         else min(link.timeout_s, CLEANUP_PROBE_S))
                if kind == "scpi":
                    self._scpi(cmd, probe)
                else:
                    self.dlt(cmd, probe)
            except Exception as err:
                report.not_done[cmd] = f"{err}" or type(err).__name__
                if link is not None and link.unanswered == cmd:
                    silent[kind] = cmd
                continue
            report.done.append(cmd)
        if report.not_done:
            log.warning("%s: %s incomplete: %s", self.name, what, report.describe())
        self.last_cleanup = report
        return report

    # -- acquisition machinery -------------------------------------------------------
    def _raw_source(self, channel: int) -> str:
        """Block feeding a RAW block for input ``channel`` (TSCO5–8 carry DELA1–4)."""
        return "STAR" if channel == 0 else f"TSCO{channel + 4}"

    def _acquisition(self, records: int | None, width_ps: int,
                     period_ps: int) -> Iterator[TagBlock]:
        if self._active is not None:
            raise IDQTimeControllerError(f"{self.name}: an acquisition is already running")
        acq = _Acquisition({n: ch for n, ch in enumerate(self.tag_channels, start=1)},
                           width_ps=width_ps, period_ps=period_ps)
        stats = StreamStats()
        self.last_stream_stats = stats
        receiver: _StreamReceiver | None = None
        finished = False
        self._active = acq
        try:
            self.write("REC:TRIG:ARM:MODE MANUal")
            self.write("REC:ENABle ON")
            self.write("REC:STOP")
            if records == 1:
                self.write("REC:NUM 1")
                self.write(f"REC:DURation {width_ps}")
            else:
                self.write("REC:NUM INF" if records is None else f"REC:NUM {records}")
                self.write(f"REC:PWID {width_ps}")
                self.write(f"REC:PPER {period_ps}")
            endpoints: dict[int, str] = {}
            for idx, (raw, ch) in enumerate(acq.raws.items()):
                self.write(f"RAW{raw}:STOP:LINK {self._raw_source(ch)}")
                self.write(f"RAW{raw}:REF:LINK NONE")
                self.write(f"RAW{raw}:ERRORS:CLEAR")
                port = (self.stream_ports[idx] if self.stream_ports is not None
                        else _free_port(self.dlt_host))
                cmd = (f"start-stream --address {self.device_host} --channel {raw} "
                       f"--stream-port {port}")
                if self.with_ref_index:
                    cmd += " --with-ref-index"
                answer = self.dlt(cmd)
                acq.dlt_ids[raw] = str(answer["id"])
                endpoints[raw] = f"tcp://{self.dlt_host}:{port}"
                acq.raw_errors[raw] = 0
                acq.received[raw] = 0
                acq.dead_state[raw] = None
            receiver = _StreamReceiver(endpoints, self.queue_blocks, self.socket_hwm, stats)
            receiver.start()
            for raw in acq.raws:
                self.write(f"RAW{raw}:SEND ON")
            self.write("REC:PLAY")
            k = 0
            wait = period_ps / PS_PER_S + self.timeout_s + 1.0
            last_stop = 0
            while records is None or k < records:
                messages = self._next_record(receiver, k, wait)
                block = self._block(acq, k, messages, width_ps, period_ps)
                stats.records += 1
                stats.tags += len(block)
                stats.reported_lost_tags += block.lost_tags
                last_stop = block.stop_ps
                k += 1
                yield block
            trailing = self._finish(acq, k, last_stop)
            finished = True
            if trailing is not None:
                stats.reported_lost_tags += trailing.lost_tags
                yield trailing
        finally:
            self._active = None
            if receiver is not None:
                receiver.stop()
            if not finished:
                self._abort(acq)

    def _next_record(self, receiver: _StreamReceiver, k: int, wait_s: float) -> dict[int, bytes]:
        deadline = time.monotonic() + wait_s
        while True:
            if receiver.error is not None:
                raise IDQTimeControllerCommunicationError(
                    f"{self.name}: timestamp stream failed at record {k}: {receiver.error}")
            try:
                return receiver.records.get(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise IDQTimeControllerCommunicationError(
                        f"{self.name}: no timestamps of record {k} from the DataLinkTarget "
                        f"streams {sorted(receiver.endpoints.values())} within {wait_s:.1f} s"
                    ) from None

    def _block(self, acq: _Acquisition, k: int, messages: dict[int, bytes], width_ps: int,
               period_ps: int) -> TagBlock:
        """Decode one record, apply dead times, merge channels, attach overflow reports."""
        start = k * period_ps
        times: list[I64Array] = []
        chans: list[int] = []
        total = 0
        for raw, msg in messages.items():
            try:
                ticks, _ref = decode_timestamps(msg, self.with_ref_index)
            except ValueError as err:
                raise IDQTimeControllerError(
                    f"{self.name}: garbage on RAW{raw} stream, record {k}: {err}") from err
            total += int(ticks.size)
            if total > self.max_block_tags:
                raise IDQTimeControllerError(
                    f"{self.name}: record {k} holds more than max_block_tags="
                    f"{self.max_block_tags} tags")
            if ticks.size and int(ticks.max()) >= width_ps:
                raise IDQTimeControllerError(
                    f"{self.name}: RAW{raw} record {k} has a timestamp {int(ticks.max())} ps "
                    f"beyond the record width {width_ps} ps (corrupt stream)")
            acq.received[raw] += int(ticks.size)
            t = ticks.astype(np.int64)
            t += np.int64(start)
            ch = acq.raws[raw]
            dead = self.input_channel(ch).dead_time_ps
            if dead > 0:
                keep, acq.dead_state[raw] = apply_dead_time(t, dead, acq.dead_state[raw])
                t = t[keep]
            times.append(t)
            chans.append(ch)
        time_ps, channel = merge_channels(times, chans)
        self.last_stream_stats.peak_block_tags = max(self.last_stream_stats.peak_block_tags,
                                                     total)
        self._poll_losses(acq)
        lost, intervals = self._losses_for(acq, k)
        stop = start + width_ps
        return TagBlock(channel=channel.astype(CHANNEL_DTYPE, copy=False),
                        time_ps=time_ps.astype(TIME_DTYPE, copy=False), start_ps=start,
                        stop_ps=stop, overflow=lost > 0, lost_tags=lost,
                        overflow_intervals=intervals)

    def _records_registered(self, acq: _Acquisition) -> int:
        """Records the DLT has received so far (``status``: ``acquisitions_count``)."""
        if not acq.dlt_ids:
            return acq.records_floor
        ident = next(iter(acq.dlt_ids.values()))
        return int((self.dlt(f"status --id {ident}") or {}).get("acquisitions_count", 0))

    def _poll_losses(self, acq: _Acquisition) -> None:
        """Read ``RAW#:ERRORS?``; book new losses on the records they may belong to.

        The device does not say which record lost timestamps.  Reading the DLT's record
        count before (c0) and after (c1) the error counters bounds it: new losses lie in
        records ``[c0 of the previous reading, c1 − 1]``.  They are reported with the
        block of record ``c1 − 1`` (the latest candidate) and an interval covering
        every candidate record.
        """
        before = self._records_registered(acq)
        lost = 0
        for raw in acq.raws:
            count = int(self.ask(f"RAW{raw}:ERRORS?"))
            if count > acq.raw_errors[raw]:
                lost += count - acq.raw_errors[raw]
                log.error("%s: RAW%d reports %d lost timestamps", self.name, raw,
                          count - acq.raw_errors[raw])
            acq.raw_errors[raw] = count
        after = max(self._records_registered(acq), before)
        if lost:
            last = max(after - 1, 0)
            begin = acq.records_floor * acq.period_ps
            end = last * acq.period_ps + acq.width_ps
            acq.losses.append((last, lost, begin, end))
        acq.records_floor = before

    @staticmethod
    def _losses_for(acq: _Acquisition, k: int | None) -> tuple[int, I64Array]:
        """Losses booked on blocks up to ``k`` (all when None): count and intervals."""
        due = [x for x in acq.losses if k is None or x[0] <= k]
        acq.losses = [x for x in acq.losses if not (k is None or x[0] <= k)]
        if not due:
            return 0, np.zeros((0, 2), np.int64)
        intervals = np.array(sorted((a, b) for _, _, a, b in due), np.int64)
        keep = np.concatenate(([True], intervals[1:, 0] > intervals[:-1, 1]))
        ends = np.maximum.accumulate(intervals[:, 1])
        group_end = np.append(np.flatnonzero(keep)[1:] - 1, intervals.shape[0] - 1)
        merged = np.stack([intervals[keep, 0], ends[group_end]], axis=1)
        return sum(n for _, n, _, _ in due), merged.astype(np.int64)

    def _finish(self, acq: _Acquisition, records: int, last_stop: int) -> TagBlock | None:
        """Close a completed acquisition; a trailing block for losses not yet reported."""
        self._poll_losses(acq)
        unreported, intervals = self._losses_for(acq, None)
        problems: list[str] = []
        for raw, ident in list(acq.dlt_ids.items()):
            status = (self.dlt(f"stop --id {ident}") or {}).get("status", {})
            del acq.dlt_ids[raw]
            self.write(f"RAW{raw}:SEND OFF")
            errors = [e.get("description", str(e)) if isinstance(e, dict) else str(e)
                      for e in status.get("errors", [])]
            count = int(status.get("acquisitions_count", records))
            if count != records:
                problems.append(f"RAW{raw}: DLT registered {count} of {records} records")
            in_transit = int(status.get("timestamps_count", acq.received[raw])) - acq.received[raw]
            if in_transit > 0:
                problems.append(f"RAW{raw}: {in_transit} timestamps counted by the DLT but "
                                "never received")
                unreported += in_transit
            if errors:
                log.warning("%s: DLT errors on RAW%d: %s", self.name, raw, "; ".join(errors))
        if problems:
            log.error("%s: %s", self.name, "; ".join(problems))
            unreported = max(unreported, 1)
        if unreported == 0:
            return None
        if intervals.shape[0] == 0:
            intervals = np.array([[0, last_stop]], np.int64)
        return TagBlock(channel=np.zeros(0, CHANNEL_DTYPE), time_ps=np.zeros(0, TIME_DTYPE),
                        start_ps=last_stop, stop_ps=last_stop, overflow=True,
                        lost_tags=unreported, overflow_intervals=intervals)

    def _abort(self, acq: _Acquisition) -> None:
        """Stop an interrupted acquisition (consumer stopped, error); never raises."""
        steps = [("scpi", "REC:STOP"), *(("scpi", f"RAW{raw}:SEND OFF") for raw in acq.raws),
                 *(("dlt", f"stop --id {ident}") for ident in acq.dlt_ids.values())]
        acq.dlt_ids.clear()
        self._cleanup("abort", steps)
