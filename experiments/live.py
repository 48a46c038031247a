"""The live stream of a run (ZeroMQ PUB/SUB) and its run-control channel (PUSH/PULL).

Publishing never blocks the acquisition: the PUB socket has a small send high-water
mark and every send is ``NOBLOCK``; a slow or absent subscriber loses messages, and
the per-publisher sequence numbers let it count what it lost.  Raw tags never go on
this stream: a message is one small JSON object (a frame's is about 2 kB).

Wire format: a two-part ZeroMQ message ``[type, json]``; the first part lets a
subscriber filter by type.  Every JSON object carries an envelope:

* ``type``: ``"frame" | "run" | "error" | "calibration" | "instruments"``;
* ``seq``: int, +1 for every message the publisher attempts (gaps are drops);
* ``source``: str, the publisher's id (sequence numbers restart with a new source);
* ``time_unix_s``: float, wall clock at publish (s since the Unix epoch);
* ``replay``: true on a periodic repeat of the latest run/calibration/instruments
  message (for late or lossy subscribers; absent otherwise).

Bodies (non-finite floats are sent as ``null``):

* ``frame``: the fields of :func:`qkdlab.experiments.bb84.run.frame_message` (``frame``,
  ``pulses``, ``rate_total`` and ``rate_ch<N>`` in Hz, ``gain_*``, ``qber_z``,
  ``qber_x``, ``qber_by_intensity`` [signal, decoy, vacuum], ``sifted_bits``,
  ``duration_s`` (s), ``histogram`` [detector][100 bins], ``histogram_range_ps``,
  ``window_ps``, ``channels``, ``sync_*``...), optionally ``secure_key_rate_bps``
  (bit/s, a run's running secure-key estimate when it makes one).
* ``run``: ``event`` (``"start" | "status" | "end"``), ``status`` (str: "running",
  "stop requested", "completed", "stopped", "interrupted", "failed: ..."), ``run_id``
  (str or null), ``control`` (the run-control address or null); ``start`` adds the run's
  ``info`` (settings, duration, station...); ``end`` adds ``summary``
  (:meth:`BB84Result.summary`: the GUI shows its ``secure_key_rate_bps`` when the run
  distilled a key, else its asymptotic ``key_rate_bps``).
* ``error``: ``message`` (str), ``origin`` (str), ``fatal`` (bool).
* ``calibration``: ``records``: list of ``{"name", "value", "unit", "id",
  "timestamp_unix_s", "max_age_s", "ok"}`` (a record older than ``max_age_s`` is
  stale; ``ok`` false: the calibration failed).
* ``instruments``: ``instruments``: list of ``{"name", "connected": bool,
  "errors": [str], "interlock": "ok" | "tripped" | null}`` (null: no interlock).

Run control: the run binds a PULL socket (:class:`RunControl`) and polls
``stop_requested()`` after every block; a GUI connects a PUSH socket
(:class:`RunControlClient`) and sends ``{"command": "stop"}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

MESSAGE_TYPES = ("frame", "run", "error", "calibration", "instruments")
ENVELOPE_KEYS = frozenset({"type", "seq", "source", "time_unix_s", "replay"})
STATE_TYPES = ("run", "calibration", "instruments")
DEFAULT_SNDHWM = 100
"""Messages queued per subscriber before the publisher drops (about 20 s of frames)."""
DEFAULT_RCVHWM = 1000
ANY_LOCAL_PORT = "tcp://127.0.0.1:*"

Message = dict[str, Any]


def _json_safe(value: Any) -> Any:
    """Plain JSON types; non-finite floats become None, numpy values plain numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(type(v) is int for v in value):
            return list(value)
        return [_json_safe(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return _json_safe(tolist())
    raise TypeError(f"cannot put a {type(value).__name__} on the live stream")


def encode(message: Message) -> bytes:
    """One message as strict JSON bytes (UTF-8)."""
    return json.dumps(_json_safe(message), separators=(",", ":"),
                      allow_nan=False).encode()


class LivePublisher:
    """ZeroMQ PUB socket of a run's live stream; ``publish`` never blocks.

    Args:
        address: where to bind, e.g. ``tcp://127.0.0.1:5555``; ``tcp://127.0.0.1:*``
            (the default) lets the OS pick a port (read it back from ``address``).
        hwm: messages queued per subscriber before new ones are dropped.
        state_every_s: repeat the latest run/calibration/instruments message at most
            this often (s), piggy-backed on frames, so late subscribers see the state.
        context: a ``zmq.Context`` (default: the process-wide instance).

    Thread-safe: the run thread may publish frames while another publishes errors.
    """

    def __init__(self, address: str = ANY_LOCAL_PORT, *, hwm: int = DEFAULT_SNDHWM,
                 state_every_s: float = 2.0, context: Any = None) -> None:
        import zmq

        self._zmq = zmq
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(address)
        except zmq.ZMQError as err:
            self._socket.close()
            raise OSError(f"live stream: cannot bind {address}: {err}") from err
        self.address: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.source = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.state_every_s = state_every_s
        self.seq = 0
        """Messages attempted so far (the next message's ``seq``)."""
        self.sent = 0
        self.dropped = 0
        """Sends refused locally (a PUB socket at its HWM drops silently: see ``seq``)."""
        self._lock = threading.Lock()
        self._state: dict[str, Message] = {}
        self._last_replay = time.monotonic()
        self._closed = False

    def send(self, type_: str, body: Mapping[str, Any], *, replay: bool = False) -> bool:
        """Publish one message of ``type_``; False if it was dropped (never blocks)."""
        if type_ not in MESSAGE_TYPES:
            raise ValueError(f"unknown live-stream message type {type_!r} "
                             f"(one of {', '.join(MESSAGE_TYPES)})")
        clash = ENVELOPE_KEYS.intersection(body)
        if clash:
            raise ValueError(f"message body may not set envelope key(s) {sorted(clash)}")
        with self._lock:
            if self._closed:
                return False
            message = {"type": type_, "seq": self.seq, "source": self.source,
                       "time_unix_s": time.time(), **body}
            if replay:
                message["replay"] = True
            self.seq += 1
            try:
                self._socket.send_multipart([type_.encode(), encode(message)],
                                            flags=self._zmq.NOBLOCK)
            except self._zmq.Again:
                self.dropped += 1
                return False
            self.sent += 1
            if type_ in STATE_TYPES and not replay:
                self._state[type_] = dict(body)
            return True

    def publish(self, frame: Mapping[str, Any]) -> None:
        """Publish one frame message (the ``publish`` callback of ``run_bb84``)."""
        self.send("frame", frame)
        now = time.monotonic()
        if self._state and now - self._last_replay >= self.state_every_s:
            self._last_replay = now
            for type_, body in list(self._state.items()):
                self.send(type_, body, replay=True)

    def run_event(self, event: str, status: str, **fields: Any) -> bool:
        """A ``run`` message: ``event`` is "start", "status" or "end"."""
        if event not in ("start", "status", "end"):
            raise ValueError(f"run event must be start, status or end, got {event!r}")
        return self.send("run", {"event": event, "status": status, **fields})

    def error(self, message: str, *, origin: str = "run", fatal: bool = False) -> bool:
        """An ``error`` message, shown by the GUI in its window."""
        return self.send("error", {"message": message, "origin": origin, "fatal": fatal})

    def calibration(self, records: Iterable[Mapping[str, Any]]) -> bool:
        """The calibration status: records with name, value, unit, id, timestamp, max age."""
        return self.send("calibration", {"records": [dict(r) for r in records]})

    def instruments(self, instruments: Iterable[Mapping[str, Any]]) -> bool:
        """Instrument status: name, connected, errors (list of str), interlock."""
        return self.send("instruments", {"instruments": [dict(i) for i in instruments]})

    def close(self, linger_s: float = 0.5) -> None:
        """Close the socket, giving queued messages up to ``linger_s`` (s) to leave."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._socket.close(linger=round(linger_s * 1000))

    def __enter__(self) -> LivePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LiveSubscriber:
    """ZeroMQ SUB socket on one or more live streams; counts drops from sequence gaps.

    Args:
        address: address(es) to connect to (more with :meth:`connect`).
        types: message types to receive (default: all).
        hwm: messages queued before the oldest arriving ones are dropped.
    """

    def __init__(self, address: str | Iterable[str] | None = None, *,
                 types: Iterable[str] | None = None, hwm: int = DEFAULT_RCVHWM,
                 context: Any = None) -> None:
        import zmq

        self._zmq = zmq
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        for t in (types if types is not None else [""]):
            if t and t not in MESSAGE_TYPES:
                self._socket.close()
                raise ValueError(f"unknown live-stream message type {t!r}")
            self._socket.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.addresses: list[str] = []
        self.received = 0
        self.dropped = 0
        """Messages missing between ones received (sequence gaps, summed over sources)."""
        self.undecodable = 0
        self._last_seq: dict[str, int] = {}
        if isinstance(address, str):
            self.connect(address)
        elif address is not None:
            for a in address:
                self.connect(a)

    def connect(self, address: str) -> None:
        """Also receive the stream published at ``address`` (may not be bound yet)."""
        self._socket.connect(address)
        self.addresses.append(address)

    def disconnect(self, address: str) -> None:
        """Stop receiving the stream at ``address``."""
        if address in self.addresses:
            self._socket.disconnect(address)
            self.addresses.remove(address)

    def recv(self, timeout_s: float = 0.0) -> Message | None:
        """The next message, waiting up to ``timeout_s`` (s); None if none came."""
        got = self.poll(timeout_s, max_messages=1)
        return got[0] if got else None

    def poll(self, timeout_s: float = 0.0, max_messages: int = 1000) -> list[Message]:
        """Messages waiting now (up to ``max_messages``), waiting up to ``timeout_s``
        (s) for the first one."""
        out: list[Message] = []
        if timeout_s > 0 and not self._socket.poll(round(timeout_s * 1000)):
            return out
        while len(out) < max_messages:
            try:
                parts = self._socket.recv_multipart(flags=self._zmq.NOBLOCK)
            except self._zmq.Again:
                break
            message = self._decode(parts)
            if message is not None:
                out.append(message)
        return out

    def _decode(self, parts: list[bytes]) -> Message | None:
        try:
            message = json.loads(parts[-1])
            seq, source = int(message["seq"]), str(message["source"])
        except (ValueError, KeyError, TypeError):
            self.undecodable += 1
            log.warning("live stream: undecodable message dropped")
            return None
        last = self._last_seq.get(source)
        if last is not None and seq > last + 1:
            self.dropped += seq - last - 1
        self._last_seq[source] = seq
        self.received += 1
        return message if isinstance(message, dict) else None

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> LiveSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunControl:
    """Run side of run control: binds a PULL socket; ``stop_requested()`` never blocks.

    Args:
        address: where to bind (``tcp://127.0.0.1:*``: a port chosen by the OS).
        publisher: if given, a received stop is acknowledged on the live stream
            (a ``run`` status message "stop requested").
    """

    def __init__(self, address: str = ANY_LOCAL_PORT, *,
                 publisher: LivePublisher | None = None, context: Any = None) -> None:
        import zmq

        self._zmq = zmq
        self._socket = (context or zmq.Context.instance()).socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(address)
        except zmq.ZMQError as err:
            self._socket.close()
            raise OSError(f"run control: cannot bind {address}: {err}") from err
        self.address: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.publisher = publisher
        self.stop_reason: str | None = None
        self._stop = False

    def stop_requested(self) -> bool:
        """True once a stop command arrived (then stays True); reads pending commands."""
        while not self._stop:
            try:
                raw = self._socket.recv(flags=self._zmq.NOBLOCK)
            except self._zmq.Again:
                break
            except self._zmq.ZMQError:  # closed under us: nothing more will come
                break
            try:
                command = json.loads(raw)
                name = str(command.get("command"))
            except (ValueError, AttributeError):
                log.warning("run control: undecodable command ignored")
                continue
            if name == "stop":
                self._stop = True
                self.stop_reason = str(command.get("reason") or "stop requested")
                log.info("run control: %s", self.stop_reason)
                if self.publisher is not None:
                    self.publisher.run_event("status", "stop requested",
                                             reason=self.stop_reason)
            else:
                log.warning("run control: unknown command %r ignored", name)
        return self._stop

    def close(self) -> None:
        self._socket.close(linger=0)


class RunControlClient:
    """GUI side of run control: a PUSH socket connected to a run's :class:`RunControl`.

    ``stop()`` queues the command and returns at once; ZeroMQ delivers it as soon as
    the run's socket is reachable (also if the run binds only later).
    """

    def __init__(self, address: str, *, context: Any = None) -> None:
        import zmq

        self._zmq = zmq
        self.address = address
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, 10)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(address)

    def stop(self, reason: str = "stop requested from the GUI") -> bool:
        """Ask the run to stop cleanly; False if the command could not be queued."""
        try:
            self._socket.send(json.dumps({"command": "stop", "reason": reason}).encode(),
                              flags=self._zmq.NOBLOCK)
        except self._zmq.Again:
            return False
        return True

    def close(self, linger_s: float = 0.0) -> None:
        self._socket.close(linger=round(linger_s * 1000))


class LiveSession:
    """The live stream and run control of one run, as the CLI needs them.

    Either address may be None (no stream, or no control).  Used as a context manager
    it publishes a ``run`` end message and an ``error`` if the block raises, then closes
    both sockets::

        with LiveSession(args.publish, args.control) as live:
            live.run_started(station=str(station), duration_s=duration)
            result = run_bb84(..., publish=live.publish,
                              stop_requested=live.stop_requested)
            live.run_ended(result.summary())
    """

    def __init__(self, publish_address: str | None = None,
                 control_address: str | None = None) -> None:
        self.publisher = LivePublisher(publish_address) if publish_address else None
        try:
            self.control = (RunControl(control_address, publisher=self.publisher)
                            if control_address else None)
        except OSError:
            if self.publisher is not None:
                self.publisher.close(0)
            raise
        self.ended = False

    @property
    def publish(self) -> Callable[[dict[str, Any]], None] | None:
        """``run_bb84(publish=...)``: None without a stream."""
        return self.publisher.publish if self.publisher is not None else None

    @property
    def stop_requested(self) -> Callable[[], bool] | None:
        """``run_bb84(stop_requested=...)``: None without run control."""
        return self.control.stop_requested if self.control is not None else None

    def run_started(self, **info: Any) -> None:
        """Announce the run (settings, station, duration... go in ``info``)."""
        if self.publisher is not None:
            self.publisher.run_event("start", "running", run_id=info.pop("run_id", None),
                                     control=self.control.address if self.control else None,
                                     info=info)

    def run_ended(self, summary: Mapping[str, Any]) -> None:
        """Announce the end with the run's summary (its ``status`` is the run's)."""
        self.ended = True
        if self.publisher is not None:
            self.publisher.run_event("end", str(summary.get("status", "completed")),
                                     run_id=summary.get("run_id"), summary=dict(summary))

    def error(self, message: str, *, fatal: bool = False) -> None:
        if self.publisher is not None:
            self.publisher.error(message, fatal=fatal)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.publisher is not None:
            self.publisher.close()

    def __enter__(self) -> LiveSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc is not None and not self.ended and self.publisher is not None:
                if isinstance(exc, KeyboardInterrupt):
                    status = "interrupted"
                else:
                    status = f"failed: {type(exc).__name__}: {exc}"
                    self.publisher.error(status, fatal=True)
                self.publisher.run_event("end", status, run_id=None)
        finally:
            self.close()
