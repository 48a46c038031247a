"""The live stream never blocks its publisher; subscribers count what they lose."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qkdlab.experiments.live import (
    LivePublisher,
    LiveSession,
    LiveSubscriber,
    RunControl,
    RunControlClient,
    encode,
)


def frame(i: int, payload: int = 0) -> dict[str, Any]:
    return {"frame": i, "rate_ch1": 1e5 + i, "qber_z": 0.01, "pad": "x" * payload}


def publish_in_thread(publisher: LivePublisher, n: int, payload: int) -> threading.Thread:
    thread = threading.Thread(target=lambda: [publisher.publish(frame(i, payload))
                                              for i in range(n)], daemon=True)
    thread.start()
    return thread


def receive_until(sub: LiveSubscriber, predicate: Any, timeout_s: float = 10.0
                  ) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not predicate(got):
        got += sub.poll(0.05)
    return got


def connected_pair(hwm: int = 100, rcvhwm: int = 1000) -> tuple[LivePublisher, LiveSubscriber]:
    """A publisher and a subscriber that already receives (past the slow-joiner gap)."""
    pub = LivePublisher(hwm=hwm)
    sub = LiveSubscriber(pub.address, hwm=rcvhwm)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        pub.error("hello", origin="test")
        if sub.poll(0.05):
            break
    else:  # pragma: no cover
        pytest.fail("subscriber never connected")
    while sub.poll(0.05):  # drain the hellos
        pass
    return pub, sub


def test_publisher_without_subscribers_never_blocks() -> None:
    n = 20_000
    with LivePublisher(hwm=10) as pub:
        thread = publish_in_thread(pub, n, payload=2000)
        thread.join(timeout=60)  # generous: a blocking send would hang forever
        assert not thread.is_alive()
        assert pub.seq == n  # every frame was attempted, none waited for a reader
        assert pub.sent + pub.dropped == n


def test_slow_subscriber_only_loses_frames_and_counts_the_gaps() -> None:
    n = 2000
    pub, sub = connected_pair(hwm=10, rcvhwm=10)
    first_seq, received_before = pub.seq, sub.received
    with pub, sub:
        # the subscriber reads nothing while the publisher sends 2000 frames of ~20 kB
        thread = publish_in_thread(pub, n, payload=20_000)
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert pub.seq == first_seq + n
        got: list[dict[str, Any]] = []
        end = time.monotonic() + 30
        while not any(m["type"] == "error" for m in got) and time.monotonic() < end:
            pub.error("end marker", origin="test")  # (dropped too while the queue is full)
            got += sub.poll(0.05)
        got += sub.poll(0.2)
    frames = [m for m in got if m["type"] == "frame"]
    seqs = [m["seq"] for m in got]
    assert seqs == sorted(seqs)
    assert 0 < len(frames) < n  # queues are bounded: most frames were dropped
    # every gap is counted: what arrived plus what was missed spans the whole stream
    assert sub.received - received_before == len(got)
    assert sub.dropped == (seqs[-1] - seqs[0] + 1) - len(got)
    for m in frames:  # what arrives is intact
        i = m["seq"] - first_seq
        assert m["frame"] == i
        assert m["rate_ch1"] == 1e5 + i
        assert len(m["pad"]) == 20_000


def test_a_reading_subscriber_gets_every_message_in_order() -> None:
    pub, sub = connected_pair(hwm=1000)
    with pub, sub:
        for i in range(200):
            pub.publish(frame(i))
        got = receive_until(sub, lambda g: len(g) >= 200)
    assert [m["frame"] for m in got] == list(range(200))
    assert sub.dropped == 0
    assert {m["source"] for m in got} == {pub.source}
    assert all(m["type"] == "frame" and isinstance(m["time_unix_s"], float) for m in got)


def test_messages_are_strict_json_with_non_finite_floats_as_null() -> None:
    import numpy as np

    data = json.loads(encode({"a": math.nan, "b": [1.0, math.inf], "c": np.float64(2.5),
                              "d": np.arange(3), "e": (np.int64(4),)}))
    assert data == {"a": None, "b": [1.0, None], "c": 2.5, "d": [0, 1, 2], "e": [4]}
    with pytest.raises(TypeError, match="set"):
        encode({"x": {1, 2}})


def test_bad_messages_are_refused() -> None:
    with LivePublisher() as pub:
        with pytest.raises(ValueError, match="unknown live-stream message type"):
            pub.send("tags", {})
        with pytest.raises(ValueError, match="envelope"):
            pub.publish({"seq": 3})
        with pytest.raises(ValueError, match="run event"):
            pub.run_event("begin", "running")


def test_state_messages_are_replayed_for_late_subscribers() -> None:
    pub = LivePublisher(state_every_s=0.0)
    with pub:
        pub.instruments([{"name": "laser", "connected": True, "errors": [], "interlock": "ok"}])
        with LiveSubscriber(pub.address, types=["instruments"]) as late:
            got: list[dict[str, Any]] = []
            end = time.monotonic() + 10
            while not got and time.monotonic() < end:
                pub.publish(frame(0))  # replays ride on frames
                got = late.poll(0.05)
    assert got[0]["replay"] is True
    assert got[0]["instruments"] == [{"name": "laser", "connected": True, "errors": [],
                                      "interlock": "ok"}]


def test_run_control_stop_reaches_the_run_and_is_acknowledged() -> None:
    pub, sub = connected_pair()
    with pub, sub:
        control = RunControl(publisher=pub)
        client = RunControlClient(control.address)
        try:
            assert not control.stop_requested()
            assert client.stop("operator pressed Stop")
            end = time.monotonic() + 10
            while not control.stop_requested() and time.monotonic() < end:
                time.sleep(0.01)
            assert control.stop_requested()
            assert control.stop_requested()  # latched
            assert control.stop_reason == "operator pressed Stop"
            got = receive_until(sub, lambda g: any(m["type"] == "run" for m in g))
        finally:
            client.close()
            control.close()
    ack = next(m for m in got if m["type"] == "run")
    assert (ack["event"], ack["status"], ack["reason"]) == ("status", "stop requested",
                                                            "operator pressed Stop")


def test_a_stop_sent_before_the_run_binds_is_delivered() -> None:
    address = free_address()
    client = RunControlClient(address)
    try:
        client.stop()
        control = RunControl(address)
        try:
            end = time.monotonic() + 10
            while not control.stop_requested() and time.monotonic() < end:
                time.sleep(0.01)
            assert control.stop_requested()
        finally:
            control.close()
    finally:
        client.close()


def failing_session(address: str, sub: LiveSubscriber) -> str:
    """A run that announces itself, then fails; its control address."""
    with LiveSession(address, "tcp://127.0.0.1:*") as live:
        assert live.publish is not None
        assert live.stop_requested is not None
        assert live.publisher is not None
        assert live.control is not None
        end = time.monotonic() + 10
        while time.monotonic() < end:  # wait until the subscriber is connected
            live.publisher.error("hello", origin="test")
            if sub.poll(0.05):
                break
        live.run_started(station="mock.yaml", duration_s=2.0)
        control_address = live.control.address
        raise RuntimeError(f"tagger gone ({control_address})")


def free_address() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_live_session_announces_start_end_and_failures() -> None:
    address = free_address()  # the session binds it; the subscriber is there first
    with LiveSubscriber(address) as sub:
        with pytest.raises(RuntimeError, match="tagger gone") as failure:
            failing_session(address, sub)
        got = receive_until(sub, lambda g: any(m.get("event") == "end" for m in g))
    control_address = str(failure.value).split("(")[1].rstrip(")")
    start = next(m for m in got if m.get("event") == "start")
    assert start["info"] == {"station": "mock.yaml", "duration_s": 2.0}
    assert start["control"] == control_address
    errors = [m for m in got if m["type"] == "error" and m["origin"] == "run"]
    assert errors[0]["message"] == f"failed: RuntimeError: {failure.value}"
    assert errors[0]["fatal"] is True
    end_msg = next(m for m in got if m.get("event") == "end")
    assert end_msg["status"] == f"failed: RuntimeError: {failure.value}"


def test_live_session_without_addresses_is_inert() -> None:
    with LiveSession(None, None) as live:
        assert live.publish is None
        assert live.stop_requested is None
        live.run_started(x=1)
        live.run_ended({"status": "completed"})


def test_a_cli_run_publishes_instrument_status_for_the_gui(tmp_path: Path) -> None:
    import socket

    from qkdlab.cli import main
    from qkdlab.experiments.live import LiveSubscriber

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    sub = LiveSubscriber(address)
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(main(
        ["run", "bb84", "--mock", "--duration", "0.4", "--data-dir", str(tmp_path),
         "--publish", address, "--json"])))
    runner.start()
    seen: list[dict[str, object]] = []
    while runner.is_alive() or not seen:
        seen += sub.poll(0.2)
        if not runner.is_alive():
            seen += sub.poll(0.5)
            break
    runner.join()
    sub.close()
    assert codes == [0]
    status = [m for m in seen if m["type"] == "instruments"]
    assert status, [m["type"] for m in seen]
    by_name = {i["name"]: i for i in status[0]["instruments"]}  # type: ignore[index]
    assert {"laser", "pattern", "tagger"} <= set(by_name)
    assert by_name["laser"]["interlock"] == "ok"
    assert any(m["type"] == "frame" for m in seen)
