"""Framing, the in-process and ZeroMQ channels, and a two-process run over ZeroMQ."""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdlab.protocol.channel import (
    MAGIC,
    ChannelClosedError,
    ChannelTimeoutError,
    FrameError,
    InProcessChannel,
    Message,
    ProtocolError,
    ZmqChannel,
    decode_frame,
    encode_frame,
    iter_frames,
)

DTYPES = [np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64,
          np.int64, np.float32, np.float64]


def frame_with_header(header: object, body: bytes = b"", raw: bytes | None = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<4sBIQ", MAGIC, 1, len(h), len(body)) + h + body


def test_round_trip_scalars_and_arrays() -> None:
    rng = np.random.default_rng(0)
    arrays = {f"a{i}": (rng.random((3, 2)) * 100).astype(dt) for i, dt in enumerate(DTYPES)}
    msg = Message("demo/kind", n=5, q=0.25, s="text ü", flag=True, none=None,
                  empty=np.zeros(0, np.uint8), scalar0d=np.array(7, np.int32),
                  big=np.arange(4, dtype=">u4"), **arrays)
    out = decode_frame(encode_frame(msg))
    assert out.kind == "demo/kind"
    assert out.get_int("n") == 5
    assert out.get_float("q") == 0.25
    assert out.get_str("s") == "text ü"
    assert out["flag"] is True
    assert out["none"] is None
    for name, arr in arrays.items():
        got = out.get_array(name, arr.dtype, ndim=2)
        assert np.array_equal(got, arr)
        assert got.flags.writeable
    assert np.array_equal(out["big"], np.arange(4))  # big-endian sent as little-endian
    assert out.get_array("scalar0d", ndim=0) == 7
    assert "a0:bool[3, 2]" in repr(out)
    assert "7" not in repr(out).replace("a7", "")


def test_typed_accessors_reject_wrong_types() -> None:
    msg = decode_frame(encode_frame(Message("k", n=1.5, a=np.zeros(3, np.uint8))))
    with pytest.raises(ProtocolError, match="must be an integer"):
        msg.get_int("n")
    with pytest.raises(ProtocolError, match="lacks field 'm'"):
        msg.get_int("m")
    with pytest.raises(ProtocolError, match="dtype uint32"):
        msg.get_array("a", np.uint32)
    with pytest.raises(ProtocolError, match="expected a 'other' message"):
        msg.expect("other")


def test_encode_rejects_unsendable_values() -> None:
    with pytest.raises(TypeError, match="cannot be sent"):
        encode_frame(Message("k", obj=object()))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot be sent"):
        encode_frame(Message("k", c=np.zeros(2, np.complex128)))
    with pytest.raises(ValueError, match="non-finite"):
        encode_frame(Message("k", x=float("nan")))


GOOD = encode_frame(Message("k", n=1, a=np.arange(3, dtype=np.uint16)))


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"QKD", "too short"),
        (b"XXXX" + GOOD[4:], "bad magic"),
        (GOOD[:4] + b"\x02" + GOOD[5:], "unsupported frame version"),
        (GOOD[:-1], "length prefix says"),
        (GOOD + b"\x00", "length prefix says"),
        (frame_with_header(None, raw=b"{not json"), "not valid UTF-8 JSON"),
        (frame_with_header(None, raw=b"\xff\xfe"), "not valid UTF-8 JSON"),
        (frame_with_header([1, 2]), "exactly kind, scalars and arrays"),
        (frame_with_header({"kind": "", "scalars": {}, "arrays": []}), "non-empty string"),
        (frame_with_header({"kind": "k", "scalars": {"x": [1]}, "arrays": []}),
         "unsupported type"),
        (frame_with_header(None, raw=b'{"kind":"k","scalars":{"x":NaN},"arrays":[]}'),
         "non-finite"),
        (frame_with_header({"kind": "k", "scalars": {}, "arrays": [["a", "<c16", [1]]]},
                           b"\x00" * 16), "unsupported dtype"),
        (frame_with_header({"kind": "k", "scalars": {}, "arrays": [["a", "|u1", [-1]]]}),
         "bad shape"),
        (frame_with_header({"kind": "k", "scalars": {}, "arrays": [["a", "|u1", [1] * 5]]},
                           b"\x00"), "bad shape"),
        (frame_with_header({"kind": "k", "scalars": {}, "arrays": [["a", "<u4", [4]]]},
                           b"\x00" * 8), "overruns the body"),
        (frame_with_header({"kind": "k", "scalars": {}, "arrays": [["a", "|u1", [2]]]},
                           b"\x00" * 3), "not described by the header"),
        (frame_with_header({"kind": "k", "scalars": {"a": 1}, "arrays": [["a", "|u1", [1]]]},
                           b"\x00"), "appears twice"),
        (frame_with_header({"kind": "k", "scalars": {}, "arrays": [["a", "|b1", [2]]]},
                           b"\x00\x02"), "values other than 0 and 1"),
        (frame_with_header({"kind": "k", "scalars": {}, "arrays": [["a", "|u1"]]}),
         "[name, dtype, shape]"),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(frame: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=__import__("re").escape(reason)):
        decode_frame(frame)


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        decode_frame(data)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=4),
       st.integers(0, len(GOOD)))
def test_fuzz_mutated_frames_decode_or_fail_cleanly(
    edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(GOOD)
    for pos, val in edits:
        data[pos] = val
    try:
        msg = decode_frame(bytes(data[: cut or None]))
    except FrameError:
        return
    assert isinstance(msg, Message)


def test_iter_frames_splits_a_stream() -> None:
    frames = [encode_frame(Message("k", i=i, a=np.arange(i, dtype=np.uint8))) for i in range(5)]
    stream = b"".join(frames)
    spans = list(iter_frames(stream + frames[0][:10]))  # trailing partial frame is left
    assert [stream[a:b] for a, b in spans] == frames
    with pytest.raises(FrameError, match="bad frame prefix"):
        list(iter_frames(b"garbage" * 5))


def test_in_process_pair_timeout_and_close() -> None:
    a, b = InProcessChannel.pair(timeout=0.05)
    a.send(Message("ping", i=1))
    assert b.recv().get_int("i") == 1
    t0 = time.monotonic()
    with pytest.raises(ChannelTimeoutError):
        b.recv()
    assert time.monotonic() - t0 < 1.0
    a.close()
    with pytest.raises(ChannelClosedError, match="peer closed"):
        b.recv()
    with pytest.raises(ChannelClosedError):
        a.send(Message("late"))


def test_zmq_loopback_between_threads_with_timeout() -> None:
    with ZmqChannel.bind("tcp://127.0.0.1:*", timeout=5.0) as server:
        assert server.address.startswith("tcp://127.0.0.1:")
        replies: list[int] = []

        def client() -> None:
            with ZmqChannel.connect(server.address, timeout=5.0) as c:
                for i in range(20):
                    c.send(Message("req", i=i, a=np.full(1000, i, np.uint16)))
                    replies.append(c.recv().get_int("i"))

        t = threading.Thread(target=client)
        t.start()
        for _ in range(20):
            msg = server.recv()
            assert np.all(msg["a"] == msg["i"])
            server.send(Message("rep", i=msg.get_int("i") * 2))
        t.join(10)
        assert replies == [2 * i for i in range(20)]
        with pytest.raises(ChannelTimeoutError):
            server.recv(timeout=0.05)


def test_zmq_reconnects_when_the_bound_end_restarts_on_the_same_address() -> None:
    first = ZmqChannel.bind("tcp://127.0.0.1:*", timeout=5.0)
    address = first.address
    client = ZmqChannel.connect(address, timeout=5.0)
    try:
        client.send(Message("one"))
        assert first.recv().kind == "one"
        first.close()
        second = None
        for _ in range(50):  # the port may take a moment to be free again
            try:
                second = ZmqChannel.bind(address, timeout=5.0)
                break
            except Exception:
                time.sleep(0.05)
        assert second is not None
        with second:
            client.send(Message("two"))
            assert second.recv(timeout=5.0).kind == "two"
            second.send(Message("three"))
            assert client.recv(timeout=5.0).kind == "three"
    finally:
        client.close()


PEER_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys
    import numpy as np
    from qkdlab.protocol.authentication import AuthSession, KeyPool
    from qkdlab.protocol.bits import binary_symmetric_channel, random_bits
    from qkdlab.protocol.cascade import CascadeAlice, CascadeBob
    from qkdlab.protocol.channel import AuthenticatedChannel, ZmqChannel
    from qkdlab.protocol.privacy_amplification import amplify_alice, amplify_bob
    from qkdlab.protocol.verification import verify_alice, verify_bob

    role, address = sys.argv[1], sys.argv[2]
    shared = np.random.default_rng(2024)            # the test's stand-in for the quantum part
    alice_key = random_bits(shared, 20000)
    bob_key = binary_symmetric_channel(alice_key, 0.03, shared)
    pool = KeyPool(random_bits(np.random.default_rng(99), 200000))
    own = np.random.default_rng(1 if role == "alice" else 2)
    raw = ZmqChannel.connect(address, timeout=20.0)
    peer = "bob" if role == "alice" else "alice"
    ch = AuthenticatedChannel(raw, AuthSession(pool), local_id=role, peer_id=peer)
    if role == "alice":
        CascadeAlice(alice_key, own).serve(ch)
        verify_alice(ch, alice_key, own)
        final = amplify_alice(ch, alice_key, 8000, own)
    else:
        result = CascadeBob(bob_key, 0.03).run(ch)[0]
        verify_bob(ch, result.key)
        final = amplify_bob(ch, result.key)
    ch.close()
    print(hashlib.sha256(np.packbits(final).tobytes()).hexdigest())
    """
)


def test_two_processes_agree_on_the_final_key() -> None:
    """Alice and Bob as separate processes over ZeroMQ (a relay binds, both connect)."""
    with ZmqChannel.bind("tcp://127.0.0.1:*", timeout=30.0) as a_side, \
            ZmqChannel.bind("tcp://127.0.0.1:*", timeout=30.0) as b_side:
        stop = threading.Event()

        def relay() -> None:  # a dumb forwarder: the peers authenticate end to end
            while not stop.is_set():
                for src, dst in ((a_side, b_side), (b_side, a_side)):
                    with contextlib.suppress(ChannelTimeoutError):
                        dst.send_frame(src.recv_frame(timeout=0.01))

        t = threading.Thread(target=relay, daemon=True)
        t.start()
        procs = [
            subprocess.Popen([sys.executable, "-c", PEER_SCRIPT, role, side.address],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for role, side in (("alice", a_side), ("bob", b_side))
        ]
        outs = [p.communicate(timeout=60) for p in procs]
        stop.set()
        t.join(5)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    digests = [out.strip() for out, _ in outs]
    assert digests[0] == digests[1]
    assert len(digests[0]) == len(hashlib.sha256().hexdigest())
