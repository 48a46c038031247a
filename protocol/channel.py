"""Classical channel between Alice and Bob: typed messages, framing, authentication.

Wire format of one frame (no pickle; every length checked on decode)::

    b"QKDF" | version u8 | header length u32 LE | body length u64 LE | header | body

The header is UTF-8 JSON ``{"kind": str, "scalars": {name: value}, "arrays": [[name,
dtype, shape], ...]}`` with scalar values of type int, float, str, bool or null; the body
is the arrays' raw little-endian bytes, concatenated in header order.

Implementations: :class:`InProcessChannel` (two queue-backed ends, optional idle hook for
single-thread use), :class:`ZmqChannel` (pyzmq DEALER sockets over TCP with timeouts;
the connecting end reconnects by itself) and :class:`AuthenticatedChannel`, which wraps any
channel and Wegman–Carter-tags every message with a sender id and sequence number inside
the authenticated data (tampering, replay, reflection, loss and reordering all raise
:class:`~qkdlab.protocol.authentication.AuthenticationError`).
"""

from __future__ import annotations

import json
import math
import queue
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

from qkdlab.protocol.authentication import AuthenticationError, AuthSession

Scalar = int | float | str | bool | None
FieldValue = Scalar | npt.NDArray[Any]

MAGIC = b"QKDF"
VERSION = 1
_PREFIX = struct.Struct("<4sBIQ")
MAX_HEADER_BYTES = 1 << 20
MAX_FRAME_BYTES = 1 << 34
MAX_ARRAY_DIMS = 4
_DTYPES = {
    np.dtype(t).str: np.dtype(t)
    for t in ("|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f4", "<f8")
}
_NAME_MAX = 64
_SCALAR_TYPES = (bool, int, float, str)
_NATIVE = {code: dt.newbyteorder("=") for code, dt in _DTYPES.items()}
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)


class ChannelError(Exception):
    """Base class of classical-channel failures."""


class FrameError(ChannelError, ValueError):
    """A received frame is malformed (bad magic, lengths, header or array layout)."""


class ChannelTimeoutError(ChannelError, TimeoutError):
    """No message arrived (or could be sent) within the timeout."""


class ChannelClosedError(ChannelError):
    """The channel or its peer was closed."""


class ProtocolError(ChannelError):
    """The peer sent a well-formed message that the protocol does not allow here."""


class Message:
    """A typed message: a ``kind`` plus named scalar and numpy-array fields.

    ``repr`` shows field names and array shapes only, never values (they may be key bits).
    """

    __slots__ = ("fields", "kind")

    def __init__(self, kind: str, /, **fields: FieldValue) -> None:
        self.kind = kind
        self.fields: dict[str, FieldValue] = fields

    def __repr__(self) -> str:
        parts = [
            f"{k}:{v.dtype}{list(v.shape)}" if isinstance(v, np.ndarray) else k
            for k, v in self.fields.items()
        ]
        return f"Message({self.kind!r}, {', '.join(parts)})"

    def __getitem__(self, name: str) -> FieldValue:
        return self.fields[name]

    def expect(self, kind: str) -> Self:
        """Return self if of ``kind``; raise :class:`ProtocolError` otherwise."""
        if self.kind != kind:
            raise ProtocolError(f"expected a {kind!r} message, got {self.kind!r}")
        return self

    def _get(self, name: str) -> FieldValue:
        try:
            return self.fields[name]
        except KeyError:
            raise ProtocolError(f"{self.kind!r} message lacks field {name!r}") from None

    def get_int(self, name: str) -> int:
        """Integer field ``name``."""
        v = self._get(name)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ProtocolError(f"field {name!r} of {self.kind!r} must be an integer")
        return v

    def get_float(self, name: str) -> float:
        """Real-number field ``name`` (an integer is accepted)."""
        v = self._get(name)
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise ProtocolError(f"field {name!r} of {self.kind!r} must be a number")
        return float(v)

    def get_str(self, name: str) -> str:
        """String field ``name``."""
        v = self._get(name)
        if not isinstance(v, str):
            raise ProtocolError(f"field {name!r} of {self.kind!r} must be a string")
        return v

    def get_array(
        self, name: str, dtype: npt.DTypeLike | None = None, ndim: int = 1
    ) -> npt.NDArray[Any]:
        """Array field ``name``, checked for dimension and (if given) dtype."""
        v = self._get(name)
        if not isinstance(v, np.ndarray) or v.ndim != ndim:
            raise ProtocolError(f"field {name!r} of {self.kind!r} must be a {ndim}-D array")
        if dtype is not None and v.dtype != np.dtype(dtype):
            raise ProtocolError(
                f"field {name!r} of {self.kind!r} must have dtype {np.dtype(dtype)}, got {v.dtype}"
            )
        return v


def encode_frame(msg: Message) -> bytes:
    """Serialise a message to one frame (see the module docstring for the layout)."""
    scalars: dict[str, Scalar] = {}
    arrays: list[list[object]] = []
    chunks: list[bytes] = []
    for name, value in msg.fields.items():
        if isinstance(value, np.ndarray):
            code = value.dtype.str
            dt = _DTYPES.get(code)
            if dt is None:
                dt = _DTYPES.get(value.dtype.newbyteorder("<").str)
                if dt is None:
                    raise TypeError(f"field {name!r}: dtype {value.dtype} cannot be sent")
                value = value.astype(dt)
            arrays.append([name, dt.str, list(value.shape)])
            chunks.append(value.tobytes())
        elif value is None or isinstance(value, _SCALAR_TYPES):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"field {name!r}: non-finite floats cannot be sent")
            scalars[name] = value
        else:
            raise TypeError(f"field {name!r}: {type(value).__name__} cannot be sent")
    header = _ENCODER.encode({"kind": msg.kind, "scalars": scalars, "arrays": arrays}).encode()
    body_len = sum(len(c) for c in chunks)
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(header), body_len), header, *chunks])


def _reject_constant(name: str) -> float:
    raise FrameError(f"header holds the non-finite number {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def decode_frame(frame: bytes | bytearray | memoryview) -> Message:
    """Parse one frame; raise :class:`FrameError` with the reason if it is malformed."""
    frame = bytes(frame)
    if len(frame) < _PREFIX.size:
        raise FrameError(f"frame too short: {len(frame)} bytes, the prefix alone is {_PREFIX.size}")
    magic, version, header_len, body_len = _PREFIX.unpack_from(frame)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} (this side speaks {VERSION})")
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    expected = _PREFIX.size + header_len + body_len
    if expected != len(frame):
        raise FrameError(f"length prefix says {expected} bytes, frame has {len(frame)}")
    raw_header = frame[_PREFIX.size : _PREFIX.size + header_len]
    try:
        header = _DECODER.decode(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FrameError(f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != {"kind", "scalars", "arrays"}:
        raise FrameError("header must be an object with exactly kind, scalars and arrays")
    kind, scalars, arrays = header["kind"], header["scalars"], header["arrays"]
    if not isinstance(kind, str) or not 0 < len(kind) <= _NAME_MAX:
        raise FrameError("message kind must be a non-empty string of at most 64 characters")
    if not isinstance(scalars, dict) or not isinstance(arrays, list):
        raise FrameError("scalars must be an object and arrays a list")
    fields: dict[str, FieldValue] = {}
    for name, value in scalars.items():
        _check_name(name)
        if value is not None and not isinstance(value, _SCALAR_TYPES):
            raise FrameError(f"scalar {name!r} has unsupported type {type(value).__name__}")
        fields[name] = value
    body = memoryview(frame)[expected - body_len :]
    offset = 0
    for entry in arrays:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise FrameError("each array entry must be [name, dtype, shape]")
        name, dtype_str, shape = entry
        _check_name(name)
        if name in fields:
            raise FrameError(f"field {name!r} appears twice")
        if not isinstance(dtype_str, str) or dtype_str not in _DTYPES:
            raise FrameError(f"array {name!r} has unsupported dtype {dtype_str!r}")
        if not isinstance(shape, list) or len(shape) > MAX_ARRAY_DIMS:
            raise FrameError(f"array {name!r} has a bad shape {shape!r}")
        count = 1
        for d in shape:
            if type(d) is not int or d < 0:
                raise FrameError(f"array {name!r} has a bad shape {shape!r}")
            count *= d
        dtype = _DTYPES[dtype_str]
        nbytes = count * dtype.itemsize
        if nbytes > body_len - offset:
            raise FrameError(f"array {name!r} ({nbytes} bytes) overruns the body")
        arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        if len(shape) != 1:
            arr = arr.reshape(shape)
        if dtype == np.bool_ and count and arr.view(np.uint8).max() > 1:
            raise FrameError(f"boolean array {name!r} holds values other than 0 and 1")
        fields[name] = arr.astype(_NATIVE[dtype_str], copy=True)
        offset += nbytes
    if offset != body_len:
        raise FrameError(f"body has {body_len - offset} bytes not described by the header")
    return Message(kind, **fields)


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= _NAME_MAX:
        raise FrameError("field names must be non-empty strings of at most 64 characters")


class ClassicalChannel(ABC):
    """One end of a bidirectional, ordered classical channel carrying :class:`Message` s.

    ``timeout`` (s) is the default for :meth:`recv`; ``None`` there means that default.
    """

    timeout: float = 30.0

    def send(self, msg: Message) -> None:
        """Send one message."""
        self.send_frame(encode_frame(msg))

    def recv(self, timeout: float | None = None) -> Message:
        """Receive the next message; raise :class:`ChannelTimeoutError` after ``timeout`` s."""
        return decode_frame(self.recv_frame(timeout))

    def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` and return the next message received."""
        self.send(msg)
        return self.recv(timeout)

    @abstractmethod
    def send_frame(self, frame: bytes) -> None:
        """Send one encoded frame."""

    @abstractmethod
    def recv_frame(self, timeout: float | None = None) -> bytes:
        """Receive one encoded frame."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_CLOSED = b""


class InProcessChannel(ClassicalChannel):
    """One end of an in-memory channel; make both ends with :meth:`pair`.

    ``idle_hook``: if set, :meth:`recv_frame` calls it while its queue is empty and the
    hook reports progress (returns True) before blocking; this lets one thread drive both
    protocol roles (e.g. the peer's ``step``), as over a zero-latency link.
    """

    def __init__(
        self, inbox: queue.SimpleQueue[bytes], outbox: queue.SimpleQueue[bytes],
        timeout: float = 30.0,
    ) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self.timeout = timeout
        self.idle_hook: Callable[[], bool] | None = None
        self._closed = False
        self.frames_sent = 0
        self.bytes_sent = 0

    @classmethod
    def pair(cls, timeout: float = 30.0) -> tuple[InProcessChannel, InProcessChannel]:
        """Two connected ends (conventionally Alice's, Bob's)."""
        a_to_b: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        b_to_a: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        return cls(b_to_a, a_to_b, timeout), cls(a_to_b, b_to_a, timeout)

    def send_frame(self, frame: bytes) -> None:
        if self._closed:
            raise ChannelClosedError("send on a closed channel")
        self.frames_sent += 1
        self.bytes_sent += len(frame)
        self._outbox.put(bytes(frame))

    def recv_frame(self, timeout: float | None = None) -> bytes:
        if self._closed:
            raise ChannelClosedError("recv on a closed channel")
        if self.idle_hook is not None:
            while self._inbox.empty() and self.idle_hook():
                pass
        wait = self.timeout if timeout is None else timeout
        try:
            frame = self._inbox.get(timeout=wait)
        except queue.Empty:
            raise ChannelTimeoutError(f"no message within {wait} s") from None
        if frame == _CLOSED:
            self._closed = True
            raise ChannelClosedError("the peer closed the channel")
        return frame

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._outbox.put(_CLOSED)


class ZmqChannel(ClassicalChannel):
    """Channel over ZeroMQ DEALER sockets (TCP); pyzmq is imported only here, lazily.

    One end binds (``ZmqChannel.bind("tcp://127.0.0.1:*")`` picks a free port; see
    :attr:`address`), the other connects.  ZeroMQ keeps the connecting end's queue and
    reconnects to the same address by itself when the binding end restarts; ZMTP heartbeats
    notice a dead peer.  Send and receive honour ``timeout`` (s).
    """

    def __init__(self, endpoint: str, *, bind: bool, timeout: float = 30.0) -> None:
        import zmq

        self.timeout = timeout
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
        self._sock.setsockopt(zmq.RECONNECT_IVL, 50)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        try:
            if bind:
                self._sock.bind(endpoint)
                endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            self._ctx.term()
            raise ChannelError(f"cannot {'bind' if bind else 'connect'} {endpoint}: {exc}") from exc
        self.address = endpoint
        self._closed = False

    @classmethod
    def bind(cls, endpoint: str = "tcp://127.0.0.1:*", timeout: float = 30.0) -> ZmqChannel:
        """Bind end (``*`` as port lets the OS choose one)."""
        return cls(endpoint, bind=True, timeout=timeout)

    @classmethod
    def connect(cls, endpoint: str, timeout: float = 30.0) -> ZmqChannel:
        """Connecting end; reconnects automatically if the peer restarts on the address."""
        return cls(endpoint, bind=False, timeout=timeout)

    def send_frame(self, frame: bytes) -> None:
        if self._closed:
            raise ChannelClosedError("send on a closed channel")
        try:
            self._sock.send(frame, 0, copy=True)
        except self._zmq.Again:
            raise ChannelTimeoutError(f"could not send within {self.timeout} s") from None

    def recv_frame(self, timeout: float | None = None) -> bytes:
        if self._closed:
            raise ChannelClosedError("recv on a closed channel")
        wait = self.timeout if timeout is None else timeout
        if not self._sock.poll(int(wait * 1000), self._zmq.POLLIN):
            raise ChannelTimeoutError(f"no message within {wait} s")
        return bytes(self._sock.recv(copy=True))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(0)
            self._ctx.term()


class AuthenticatedChannel(ClassicalChannel):
    """Wraps a channel; every message carries sender id, sequence number and a tag.

    The authenticated data is the whole encoded frame including the reserved fields
    ``_from``, ``_seq`` and ``_koff`` (the session's key-pool position).  A frame is
    ``frame || tag``.  On receive the frame is decoded (malformed → error), the sender
    must be the peer (reflection), the sequence number must be the next one expected
    (lower → replay, higher → loss or reordering), the pool position must match, and the
    tag must verify (altered or forged).  Any failure raises :class:`AuthenticationError`
    with that reason and closes this end for good: the run must abort.
    """

    RESERVED: ClassVar[tuple[str, ...]] = ("_from", "_seq", "_koff")

    def __init__(
        self, inner: ClassicalChannel, session: AuthSession, *, local_id: str, peer_id: str
    ) -> None:
        if local_id == peer_id:
            raise ValueError("local_id and peer_id must differ")
        self.inner = inner
        self.session = session
        self.local_id = local_id
        self.peer_id = peer_id
        self.timeout = inner.timeout
        self._send_dir = 0 if local_id < peer_id else 1
        self._next_send = 0
        self._next_recv = 0
        self._failure: str | None = None

    def __repr__(self) -> str:
        return f"AuthenticatedChannel({self.local_id!r} -> {self.peer_id!r})"

    @property
    def messages_sent(self) -> int:
        return self._next_send

    @property
    def messages_received(self) -> int:
        return self._next_recv

    def _fail(self, reason: str) -> AuthenticationError:
        self._failure = reason
        return AuthenticationError(reason)

    def _check_open(self) -> None:
        if self._failure is not None:
            raise AuthenticationError(
                f"channel unusable after authentication failure: {self._failure}"
            )

    def send(self, msg: Message) -> None:
        self._check_open()
        if any(name in msg.fields for name in self.RESERVED):
            raise ValueError(f"message fields may not use the reserved names {self.RESERVED}")
        seq = self._next_send
        fields: dict[str, FieldValue] = dict(msg.fields)
        fields.update(_from=self.local_id, _seq=seq, _koff=self.session.key_offset)
        frame = encode_frame(Message(msg.kind, **fields))
        tag = self.session.tag(frame, self._send_dir, seq)
        self._next_send += 1
        self.inner.send_frame(frame + tag)
        self.session.forget_before(self._next_send, self._next_recv)

    def recv(self, timeout: float | None = None) -> Message:
        self._check_open()
        raw = self.inner.recv_frame(timeout)
        tag_len = self.session.tag_bits // 8
        if len(raw) <= tag_len:
            raise self._fail(f"malformed frame: {len(raw)} bytes cannot hold a {tag_len}-byte tag")
        frame, tag = raw[:-tag_len], raw[-tag_len:]
        try:
            msg = decode_frame(frame)
        except FrameError as exc:
            raise self._fail(f"malformed frame (altered in transit?): {exc}") from None
        sender, seq, koff = (msg.fields.get(k) for k in self.RESERVED)
        if sender != self.peer_id:
            raise self._fail(
                f"message claims sender {sender!r}, expected {self.peer_id!r} "
                "(reflected or misrouted)"
            )
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise self._fail("message has no valid sequence number")
        if seq < self._next_recv:
            raise self._fail(
                f"replayed message: sequence number {seq} was already received "
                f"(expected {self._next_recv})"
            )
        if seq > self._next_recv:
            raise self._fail(
                f"message(s) lost or reordered: got sequence number {seq}, "
                f"expected {self._next_recv}"
            )
        if koff != self.session.key_offset:
            raise self._fail(
                f"key pools out of step: peer's session starts at pool bit {koff}, "
                f"ours at {self.session.key_offset}"
            )
        if not self.session.check(frame, tag, 1 - self._send_dir, seq):
            raise self._fail(
                f"tag mismatch on message {seq} ({msg.kind!r}): altered in transit or "
                f"not sent by {self.peer_id!r}"
            )
        self._next_recv += 1
        self.session.forget_before(self._next_send, self._next_recv)
        for name in self.RESERVED:
            del msg.fields[name]
        return msg

    def send_frame(self, frame: bytes) -> None:
        self.send(decode_frame(frame))

    def recv_frame(self, timeout: float | None = None) -> bytes:
        return encode_frame(self.recv(timeout))

    def close(self) -> None:
        self.inner.close()


def iter_frames(buffer: bytes | bytearray) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` of each complete frame in a byte stream (length-prefixed).

    Stops at the first incomplete frame; raises :class:`FrameError` on a bad prefix.
    For stream transports; ZeroMQ already delimits messages.
    """
    pos = 0
    while len(buffer) - pos >= _PREFIX.size:
        magic, version, header_len, body_len = _PREFIX.unpack_from(buffer, pos)
        if magic != MAGIC or version != VERSION or header_len > MAX_HEADER_BYTES:
            raise FrameError(f"bad frame prefix at byte {pos}")
        end = pos + _PREFIX.size + header_len + body_len
        if end > len(buffer):
            return
        yield pos, end
        pos = end


def serve(
    channel: ClassicalChannel,
    handler: Callable[[Message], Message | None],
    *,
    stop: Callable[[Message], bool] = lambda msg: False,
    timeout: float | None = None,
) -> None:
    """Answer requests: for each message call ``handler`` and send its reply (if any).

    Returns after replying to a message for which ``stop(msg)`` is true.
    """
    while True:
        msg = channel.recv(timeout)
        reply = handler(msg)
        if reply is not None:
            channel.send(reply)
        if stop(msg):
            return


__all__ = [
    "AuthenticatedChannel",
    "AuthenticationError",
    "ChannelClosedError",
    "ChannelError",
    "ChannelTimeoutError",
    "ClassicalChannel",
    "FrameError",
    "InProcessChannel",
    "Message",
    "ProtocolError",
    "ZmqChannel",
    "decode_frame",
    "encode_frame",
    "iter_frames",
    "serve",
]
