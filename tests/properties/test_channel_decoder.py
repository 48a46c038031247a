"""Property tests: the classical-channel frame decoder.

* every message the encoder accepts decodes to the same message (kind, scalars, array
  dtypes, shapes and values);
* arbitrary bytes, and any mutation of a valid frame (flipped, inserted or deleted
  bytes, truncation), decode to a message or raise :class:`FrameError` — nothing else;
* the stream splitter (:func:`iter_frames`) yields only in-bounds frames or raises
  :class:`FrameError`;
* over an :class:`AuthenticatedChannel`, *any* modification of a sent frame (its tag
  included) is refused with :class:`AuthenticationError`: no altered message is ever
  delivered, and the channel is unusable afterwards.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qkdlab.protocol.authentication import AuthenticationError, AuthSession, KeyPool
from qkdlab.protocol.bits import random_bits
from qkdlab.protocol.channel import (
    MAGIC,
    VERSION,
    AuthenticatedChannel,
    FrameError,
    InProcessChannel,
    Message,
    decode_frame,
    encode_frame,
    iter_frames,
)

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
AUTH_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow])

DTYPES = ["|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f4", "<f8"]
NAMES = st.text(min_size=1, max_size=64).filter(lambda n: n not in AuthenticatedChannel.RESERVED)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
ARRAYS = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0,
                                                         max_side=4)))


@st.composite
def messages(draw: st.DrawFn) -> Message:
    names = draw(st.lists(NAMES, unique=True, max_size=6))
    fields: dict[str, Any] = {name: draw(st.one_of(SCALARS, ARRAYS)) for name in names}
    return Message(draw(st.text(min_size=1, max_size=64)), **fields)


def assert_same(a: Message, b: Message) -> None:
    assert a.kind == b.kind
    assert set(a.fields) == set(b.fields)
    for name, value in b.fields.items():
        got = a.fields[name]
        if isinstance(value, np.ndarray):
            assert isinstance(got, np.ndarray)
            assert got.dtype == value.dtype.newbyteorder("=")
            assert got.shape == value.shape
            assert np.array_equal(got, value, equal_nan=value.dtype.kind == "f")
        else:
            assert type(got) is type(value)
            assert got == value or (isinstance(value, float) and math.isnan(value))


@SETTINGS
@given(messages())
def test_every_encodable_message_round_trips(msg: Message) -> None:
    assert_same(decode_frame(encode_frame(msg)), msg)


def decode_or_frame_error(frame: bytes) -> Message | FrameError:
    try:
        return decode_frame(frame)
    except FrameError as err:
        return err


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_frame_error(junk: bytes) -> None:
    outcome = decode_or_frame_error(junk)
    assert isinstance(outcome, Message | FrameError)
    if isinstance(outcome, FrameError):
        assert str(outcome)


@st.composite
def plausible_frames(draw: st.DrawFn) -> bytes:
    """A correct prefix around a header that is JSON-ish but arbitrary, and a body."""
    header = draw(st.one_of(
        st.binary(max_size=80),
        st.text(max_size=80).map(str.encode),
        st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                               st.text(max_size=8)),
                     lambda kids: st.one_of(st.lists(kids, max_size=4),
                                            st.dictionaries(st.text(max_size=8), kids,
                                                            max_size=4)),
                     max_leaves=12).map(lambda obj: _json(obj).encode()),
        st.builds(lambda kind, scalars, arrays: _json(
            {"kind": kind, "scalars": scalars, "arrays": arrays}).encode(),
            st.one_of(st.text(max_size=70), st.integers()),
            st.dictionaries(st.text(max_size=70), SCALARS | st.lists(st.integers()),
                            max_size=3),
            st.lists(st.lists(st.one_of(st.text(max_size=5), st.sampled_from(DTYPES),
                                        st.lists(st.integers(-3, 2**40), max_size=5),
                                        st.integers()), max_size=4), max_size=3)),
    ))
    body = draw(st.binary(max_size=64))
    prefix = MAGIC + bytes([VERSION]) + len(header).to_bytes(4, "little") \
        + len(body).to_bytes(8, "little")
    return prefix + header + body


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj)  # NaN and Infinity included: the decoder must refuse them


@SETTINGS
@given(plausible_frames())
def test_plausible_frames_decode_or_raise_frame_error(frame: bytes) -> None:
    outcome = decode_or_frame_error(frame)
    if isinstance(outcome, Message):  # then it re-encodes to the same message
        assert_same(decode_frame(encode_frame(outcome)), outcome)


MUTATIONS = st.sampled_from(["flip", "insert", "delete", "truncate", "append"])


def mutate(frame: bytes, kind: str, data: st.DataObject) -> bytes:
    """``frame`` changed; never empty (an in-process channel's close marker is b"")."""
    pos = data.draw(st.integers(1 if kind == "truncate" else 0, max(len(frame) - 1, 0)),
                    label="pos")
    if kind == "flip":
        out = bytearray(frame)
        out[pos] ^= data.draw(st.integers(1, 255), label="xor")
        return bytes(out)
    if kind == "insert":
        return frame[:pos] + data.draw(st.binary(min_size=1, max_size=4), label="ins") \
            + frame[pos:]
    if kind == "delete":
        return frame[:pos] + frame[pos + 1:]
    if kind == "truncate":
        return frame[:pos]
    return frame + data.draw(st.binary(min_size=1, max_size=4), label="tail")


@SETTINGS
@given(messages(), MUTATIONS, st.data())
def test_mutated_frames_decode_or_raise_frame_error(msg: Message, kind: str,
                                                    data: st.DataObject) -> None:
    outcome = decode_or_frame_error(mutate(encode_frame(msg), kind, data))
    if kind in ("insert", "delete", "truncate", "append"):  # the lengths no longer add up
        assert isinstance(outcome, FrameError)


@SETTINGS
@given(st.lists(messages(), max_size=4), st.binary(max_size=40))
def test_stream_splitter_finds_exactly_the_frames(msgs: list[Message], tail: bytes) -> None:
    frames = [encode_frame(m) for m in msgs]
    stream = b"".join(frames)
    spans = list(iter_frames(stream))
    assert [stream[a:b] for a, b in spans] == frames
    try:  # garbage after them: more spans only if in bounds, or a FrameError
        more = list(iter_frames(stream + tail))
    except FrameError:
        return
    assert more[: len(spans)] == spans
    assert all(0 <= a < b <= len(stream) + len(tail) for a, b in more)


# -- authenticated decode -----------------------------------------------------------------
def authenticated_pair() -> tuple[AuthenticatedChannel, AuthenticatedChannel]:
    bits = random_bits(np.random.default_rng(7), 20_000)
    a_raw, b_raw = Tamper.pair(timeout=1.0)
    alice = AuthenticatedChannel(a_raw, AuthSession(KeyPool(bits.copy())), local_id="alice",
                                 peer_id="bob")
    bob = AuthenticatedChannel(b_raw, AuthSession(KeyPool(bits.copy())), local_id="bob",
                               peer_id="alice")
    return alice, bob


class Tamper(InProcessChannel):
    """A raw end that modifies the next frame it sends (the channel in the middle)."""

    change: Any = None

    def send_frame(self, frame: bytes) -> None:
        if self.change is not None:
            frame, self.change = self.change(frame), None
        super().send_frame(frame)


@AUTH_SETTINGS
@given(messages(), MUTATIONS, st.data())
def test_authenticated_decode_rejects_any_modification(msg: Message, kind: str,
                                                       data: st.DataObject) -> None:
    alice, bob = authenticated_pair()
    # an honest message first: the session is in step, then the tampered one
    alice.send(Message("hello", n=1))
    assert bob.recv().kind == "hello"
    sent: list[tuple[bytes, bytes]] = []

    def change(frame: bytes) -> bytes:
        changed = mutate(frame, kind, data)
        sent.append((frame, changed))
        return changed

    alice.inner.change = change  # type: ignore[attr-defined]
    alice.send(msg)
    assert sent[0][1] != sent[0][0]
    with pytest.raises(AuthenticationError):
        bob.recv()
    with pytest.raises(AuthenticationError, match="unusable after authentication failure"):
        bob.recv()


@AUTH_SETTINGS
@given(messages())
def test_authenticated_round_trip(msg: Message) -> None:
    alice, bob = authenticated_pair()
    alice.send(msg)
    assert_same(bob.recv(), msg)
