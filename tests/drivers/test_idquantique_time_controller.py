"""ID Quantique ID900/ID1000 Time Controller: exact wire messages, mock round trips, streams."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from qkdlab.drivers.idquantique.time_controller import (
    CLEANUP_PROBE_S,
    IDQTimeController,
    IDQTimeControllerCommunicationError,
    IDQTimeControllerError,
    apply_dead_time,
    decode_timestamps,
)
from qkdlab.drivers.roles import TimeTagger
from qkdlab.mock_instruments.bench import Bench
from qkdlab.mock_instruments.idquantique.time_controller import (
    TimeControllerServer,
    serve,
)
from qkdlab.tags import TagBlock

PS = 10**12

# ------------------------------------------------------------------ scripted peers

Step = tuple[str, str, Callable[[], None] | None]


class ScriptedZmqPeer(threading.Thread):
    """A ZeroMQ REP peer expecting exactly ``script`` (request, reply, action) in order."""

    def __init__(self, script: list[Step]) -> None:
        super().__init__(daemon=True)
        self.script = script
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.position = 0
        self.mismatch: str | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def run(self) -> None:
        try:
            for expected, reply, action in self.script:
                if not self.sock.poll(5000):
                    return
                got = self.sock.recv().decode()
                if got != expected:
                    self.mismatch = f"step {self.position}: expected {expected!r}, got {got!r}"
                    self.sock.send(b"SCPI_ERR_INVALID_CMD")
                    return
                self.position += 1
                self.sock.send(reply.encode())
                if action is not None:
                    action()
        finally:
            self.sock.close(linger=0)

    def check_complete(self) -> None:
        self.join(timeout=5)
        self.ctx.term()
        assert self.mismatch is None, self.mismatch
        assert self.position == len(self.script), (
            f"stopped after {self.position} of {len(self.script)}; next "
            f"{self.script[self.position][0] if self.position < len(self.script) else None!r}")


def _q(request: str, reply: str = "") -> Step:
    return (request, reply, None)


def test_exact_scpi_messages_of_parameters() -> None:
    peer = ScriptedZmqPeer([
        _q("*IDN?", "ID Quantique,ID1000,SN42,2.1"),  # connect_message
        _q("*IDN?", "ID Quantique,ID1000,SN42,2.1"),
        _q("INPU1:THRE 0.25V"),
        _q("INPU1:THRE?", "0.25V"),
        _q("INPU3:EDGE FALLING"),
        _q("INPU4:ENAB OFF"),
        _q("INPU2:COUP AC"),
        _q("DELA2:VALU 1500"),
        _q("DELA2:VALU?", "1500TB"),
        _q("STAR:DELA 20"),
        _q("STAR:THRE?", "-400mV"),
        _q("INPU1:HIRES:ERROR?", "0"),
        _q("DEVI:RES?", "HIRES"),
        _q("DEVI:RES:BWID?", "1"),
        _q("REC:STAGe?", "IDLE"),
        _q("DEVI:CONFI:LOAD INIT"),
        _q("INPU1:THRE 0.5V", "SCPI_ERR_PARAM_TYPE"),
    ])
    tc = IDQTimeController("tc", peer.endpoint, timeout=2)
    assert tc.get_idn() == {"vendor": "ID Quantique", "model": "ID1000", "serial": "SN42",
                            "firmware": "2.1"}
    tc.set_trigger_level(1, 0.25)
    assert tc.input1.threshold() == pytest.approx(0.25)
    tc.input3.edge("falling")
    tc.input4.enabled(False)
    tc.input2.coupling("AC")
    tc.set_input_delay(2, 1500)
    assert tc.input2.delay() == pytest.approx(1.5e-9)
    tc.start.delay(20e-12)
    assert tc.start.threshold() == pytest.approx(-0.4)
    assert tc.input1.hires_error() == 0
    assert tc.resolution() == "high_resolution"
    assert tc.time_bin() == pytest.approx(1e-12)
    assert tc.record_stage() == "IDLE"
    tc.reset()
    with pytest.raises(IDQTimeControllerError, match=r"tc.*INPU1:THRE 0\.5V.*SCPI_ERR_PARAM_TYPE"):
        tc.input1.threshold(0.5)
    tc.close()
    peer.check_complete()


def test_exact_messages_of_an_acquisition_and_binary_decoding() -> None:
    """The whole acquire() conversation with device and DLT, and Table-10 decoding."""
    ctx = zmq.Context()
    pair = ctx.socket(zmq.PAIR)
    pair.setsockopt(zmq.LINGER, 0)
    port = pair.bind_to_random_port("tcp://127.0.0.1")
    ticks = np.array([5, 17, 999_999_999], "<u8")
    ident = f"127.0.0.1:{port}"
    status = json.dumps({"acquisitions_count": 1, "errors": [], "inactivity": 0.1,
                         "timestamps_count": 3})
    dlt = ScriptedZmqPeer([
        _q(f"start-stream --address 127.0.0.1 --channel 1 --stream-port {port}",
           json.dumps({"id": ident})),
        *[_q(f"status --id {ident}", status)] * 4,
        _q(f"stop --id {ident}", json.dumps({"status": json.loads(status)})),
    ])
    scpi = ScriptedZmqPeer([
        _q("*IDN?", "ID Quantique,ID900,SN1,1.0"),
        _q("REC:TRIG:ARM:MODE MANUal"), _q("REC:ENABle ON"), _q("REC:STOP"), _q("REC:NUM 1"),
        _q("REC:DURation 1000000000"),
        _q("RAW1:STOP:LINK TSCO5"), _q("RAW1:REF:LINK NONE"), _q("RAW1:ERRORS:CLEAR"),
        _q("RAW1:SEND ON"),
        ("REC:PLAY", "", lambda: pair.send(ticks.tobytes())),
        _q("RAW1:ERRORS?", "0"), _q("RAW1:ERRORS?", "0"), _q("RAW1:SEND OFF"),
    ])
    tc = IDQTimeController("tc", scpi.endpoint, dlt_address=dlt.endpoint, timeout=2,
                           tag_channels=(1,), stream_ports=(port,))
    block = tc.acquire(1e-3)
    assert block.time_ps.tolist() == [5, 17, 999_999_999]
    assert block.channel.tolist() == [1, 1, 1]
    assert (block.start_ps, block.stop_ps, block.overflow, block.lost_tags) == (0, 10**9, False, 0)
    tc.close()
    scpi.check_complete()
    dlt.check_complete()
    pair.close(linger=0)
    ctx.term()


def test_decode_timestamps_formats() -> None:
    plain = np.array([1, 2, 3], "<u8").tobytes()
    ts, ref = decode_timestamps(plain)
    assert ts.tolist() == [1, 2, 3]
    assert ref is None
    pairs = np.array([(10, 0), (20, 1)], dtype=[("t", "<u8"), ("i", "<u8")]).tobytes()
    ts, ref = decode_timestamps(pairs, with_ref_index=True)
    assert ts.tolist() == [10, 20]
    assert ref is not None
    assert ref.tolist() == [0, 1]
    with pytest.raises(ValueError, match="whole number"):
        decode_timestamps(b"\x00" * 12)


# ------------------------------------------------------------------ through the mock


@pytest.fixture
def server() -> Iterator[TimeControllerServer]:
    srv = serve("tc", None, {"synthetic_rates_hz": "100,1e5,2e5,3e5,4e5", "seed": "3"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def tc(server: TimeControllerServer) -> IDQTimeController:
    return IDQTimeController("tc", server.address, timeout=2)


def test_role_and_identity(tc: IDQTimeController) -> None:
    assert isinstance(tc, TimeTagger)
    idn = tc.get_idn()
    assert (idn["vendor"], idn["model"], idn["serial"]) == ("ID Quantique", "ID1000", "MOCK0001")


def test_parameter_round_trips_with_units(tc: IDQTimeController,
                                          server: TimeControllerServer) -> None:
    dev = server.device
    for ch in (tc.start, *tc.inputs):
        n = ch.channel
        ch.threshold(-0.125)
        assert ch.threshold() == pytest.approx(-0.125)
        assert ch.threshold.unit == "V"
        assert dev.inputs[n].threshold_v == pytest.approx(-0.125)
        ch.edge("falling")
        assert ch.edge() == "falling"
        assert dev.inputs[n].edge == "FALLING"
        ch.enabled(False)
        assert ch.enabled() is False
        assert not dev.inputs[n].enabled
        ch.coupling("AC")
        assert ch.coupling() == "AC"
        ch.delay(3.000001e-6)
        assert ch.delay.unit == "s"
        assert ch.delay() == pytest.approx(3.000001e-6, abs=1e-13)
        assert dev.inputs[n].delay_ps == 3_000_001
        ch.dead_time(50e-9)
        assert ch.dead_time_ps == 50_000
        assert ch.dead_time.unit == "s"
        assert ch.hires_error() == 0
    tc.resolution("high_speed")
    assert tc.resolution() == "high_speed"
    assert tc.time_bin() == pytest.approx(100e-12)
    tc.resolution("high_resolution")
    assert tc.time_bin() == pytest.approx(1e-12)
    assert tc.record_stage() == "IDLE"
    tc.reset()
    assert dev.inputs[2].delay_ps == 0
    assert dev.inputs[2].enabled
    assert tc.input2.dead_time() == 0.0


@pytest.mark.parametrize(("call", "match"), [
    (lambda tc: tc.input1.threshold(2.5), "threshold"),
    (lambda tc: tc.start.threshold(-3), "threshold"),
    (lambda tc: tc.input2.delay(1.5), "delay"),
    (lambda tc: tc.input2.delay(-1e-12), "delay"),
    (lambda tc: tc.input3.edge("up"), "edge"),
    (lambda tc: tc.set_input_delay(5, 10), "channel 5"),
    (lambda tc: tc.set_dead_time(1, 10**10), "dead_time"),
    (lambda tc: tc.set_input_delay(1, 0.5), "integer"),
    (lambda tc: tc.acquire(120.0), "duration"),
])
def test_validators_raise_before_anything_is_written(
        tc: IDQTimeController, server: TimeControllerServer,
        call: Callable[[IDQTimeController], None], match: str) -> None:
    before = list(server.requests)
    state = (server.device.inputs[1].threshold_v, server.device.inputs[2].delay_ps)
    with pytest.raises(ValueError, match=match):
        call(tc)
    assert server.requests == before
    assert (server.device.inputs[1].threshold_v, server.device.inputs[2].delay_ps) == state


def test_constructor_rejects_bad_options(server: TimeControllerServer) -> None:
    with pytest.raises(ValueError, match="tcp://"):
        IDQTimeController("bad", "TCPIP::1.2.3.4::5555::SOCKET")
    with pytest.raises(ValueError, match="tag_channels"):
        IDQTimeController("bad", server.address, tag_channels=(1, 1))
    with pytest.raises(ValueError, match=r"0\.2 s"):
        IDQTimeController("bad", server.address, sub_acquisition_s=0.05)


def test_acquire_counts_equal_synthetic_truth(tc: IDQTimeController,
                                              server: TimeControllerServer) -> None:
    block = tc.acquire(0.05)
    truth = server.device.history[-1]
    assert block.counts() == {n: truth.sent[n] for n in (1, 2, 3, 4)}
    assert block.counts() == {1: 5000, 2: 10000, 3: 15000, 4: 20000}  # rates × 50 ms
    assert (block.start_ps, block.stop_ps, block.overflow, block.lost_tags) == (0, 5 * 10**10,
                                                                               False, 0)
    assert np.all(np.diff(block.time_ps) >= 0)


def test_acquire_equals_the_bench_tag_for_tag() -> None:
    """With a bench, every tag is the bench's (times relative to the record start)."""
    srv = serve("tc", Bench(seed=11), {})
    srv.start()
    try:
        tc = IDQTimeController("tc", srv.address, timeout=5, tag_channels=(0, 1, 2, 3))
        twin = Bench(seed=11)
        block = tc.acquire(0.02)
        ref = twin.acquire(0.02)
        for ch in (0, 1, 2, 3):
            expected = ref.select(ch) - ref.start_ps
            np.testing.assert_array_equal(block.select(ch), expected)
        assert len(block) > 1000
        assert not block.overflow
        # delay, threshold above the pulse amplitude, disabled input
        tc.set_input_delay(1, 1234)
        tc.set_trigger_level(2, 1.5)  # pulses are 1 V high
        tc.input3.enabled(False)
        block = tc.acquire(0.02)
        ref = twin.acquire(0.02)
        width = block.stop_ps
        shifted = ref.select(1) - ref.start_ps + 1234
        np.testing.assert_array_equal(block.select(1), shifted[shifted < width])
        assert block.select(2).size == 0
        assert block.select(3).size == 0
        np.testing.assert_array_equal(block.select(0), ref.select(0) - ref.start_ps)
    finally:
        srv.stop()


def test_stream_equals_the_bench_record_by_record() -> None:
    srv = serve("tc", Bench(seed=5), {})
    srv.start()
    try:
        tc = IDQTimeController("tc", srv.address, timeout=5, tag_channels=(1, 2, 3, 4))
        twin = Bench(seed=5)
        blocks = list(tc.stream(0.4))
        assert len(blocks) == 2
        width = round(tc.sub_acquisition_s * PS)
        period = width + round(tc.record_gap_s * PS)
        origin = None
        for k, block in enumerate(blocks):
            ref = twin.acquire(period / PS)
            origin = ref.start_ps if origin is None else origin
            assert (block.start_ps, block.stop_ps) == (k * period, k * period + width)
            for ch in (1, 2, 3, 4):
                t = ref.select(ch) - origin
                np.testing.assert_array_equal(block.select(ch),
                                              t[t < k * period + width])
            assert not block.overflow
    finally:
        srv.stop()


def test_stream_near_10m_tags_per_s_without_loss_and_bounded_memory() -> None:
    rate = 2.4e6  # × 4 inputs = 9.6 M timestamps/s, just below the link limit
    srv = serve("tc", None, {"synthetic_rates_hz": f"0,{rate},{rate},{rate},{rate}",
                             "synthetic_pattern": "periodic"})
    srv.start()
    try:
        tc = IDQTimeController("tc", srv.address, timeout=5)
        total = 0
        block_cap = int(4 * rate * tc.sub_acquisition_s) + 8
        for block in tc.stream(1.0):
            assert not block.overflow
            assert block.lost_tags == 0
            assert len(block) <= block_cap
            total += len(block)
        sent = sum(sum(h.sent.values()) for h in srv.device.history)
        offered = sum(sum(h.offered.values()) for h in srv.device.history)
        assert total == sent == offered > 9_500_000
        stats = tc.last_stream_stats
        assert stats.records == 5
        assert stats.peak_queue_blocks <= stats.queue_limit == tc.queue_blocks
        assert stats.peak_pending_messages <= stats.pending_limit
        assert stats.peak_block_tags <= block_cap
        assert stats.peak_message_bytes <= 8 * (rate * tc.sub_acquisition_s + 2)
    finally:
        srv.stop()


def test_overflow_above_the_link_rate_is_reported_never_silent() -> None:
    # link limited to 2 M timestamps/s with a 100 k buffer; 4 M/s offered
    srv = serve("tc", None, {"synthetic_rates_hz": "0,1e6,1e6,1e6,1e6",
                             "synthetic_pattern": "periodic", "max_rate_hz": "2e6",
                             "buffer_tags": "100000"})
    srv.start()
    try:
        tc = IDQTimeController("tc", srv.address, timeout=5)
        blocks = list(tc.stream(0.6))
        lost_truth = sum(sum(h.lost.values()) for h in srv.device.history)
        offered = sum(sum(h.offered.values()) for h in srv.device.history)
        assert lost_truth > 1_000_000
        assert sum(b.lost_tags for b in blocks) == lost_truth
        assert sum(len(b) for b in blocks) + lost_truth == offered
        flagged = [b for b in blocks if b.overflow]
        assert flagged
        assert all(b.overflow_intervals.shape[0] >= 1 for b in flagged)
        for b in blocks:
            if not b.overflow:
                assert b.lost_tags == 0
                assert b.overflow_intervals.shape == (0, 2)
            for begin, end in b.overflow_intervals:
                assert 0 <= begin < end <= blocks[-1].stop_ps
        # about 1.2 M per 0.2 s record delivered at most (2 M/s + buffer)
        assert all(len(b) <= 2e6 * 0.2 + 100_000 + 8 for b in blocks)
        status = tc.error_status()
        assert sum(status[f"RAW{n}"] for n in (1, 2, 3, 4)) == lost_truth
        with pytest.raises(IDQTimeControllerError, match="RAW"):
            tc.check_errors()
        tc.clear_errors()
        tc.check_errors()
    finally:
        srv.stop()


def test_endless_stream_stops_cleanly_and_safe_state(tc: IDQTimeController,
                                                     server: TimeControllerServer) -> None:
    gen = tc.stream()
    first = next(gen)
    assert len(first) > 0
    gen.close()
    assert server.device.run is None
    assert all(not raw.send for raw in server.device.raws.values())
    assert tc.dlt("list") == []
    tc.safe_state()  # idempotent, never raises
    assert tc.record_stage() == "IDLE"


def test_dead_time_through_the_driver(server: TimeControllerServer) -> None:
    tc = IDQTimeController("tc", server.address, timeout=2)
    tc.set_dead_time(4, 20_000_000)  # 20 µs on a 400 kHz Poisson input
    block = tc.acquire(0.05)
    spacing = np.diff(block.select(4))
    assert spacing.min() >= 20_000_000
    assert block.counts()[4] < 20000  # 400 k/s × 50 ms before the dead time
    assert block.counts()[3] == 15000  # other channels untouched


def test_apply_dead_time_matches_sequential_reference() -> None:
    rng = np.random.default_rng(1)
    t = np.sort(rng.integers(0, 10**9, 5000)).astype(np.int64)
    for dead, last in ((0, None), (50_000, None), (400_000, None), (400_000, 300_000)):
        keep, new_last = apply_dead_time(t, dead, last)
        ref, prev = [], last
        for x in t.tolist():
            if prev is None or x - prev >= dead:
                ref.append(x)
                prev = x
        assert t[keep].tolist() == ref
        assert new_last == (ref[-1] if ref else last)


def test_with_ref_index_stream_format(server: TimeControllerServer) -> None:
    tc = IDQTimeController("tc", server.address, timeout=2, with_ref_index=True)
    block = tc.acquire(0.01)
    assert block.counts() == {1: 1000, 2: 2000, 3: 3000, 4: 4000}


# ------------------------------------------------------------------ faults


def test_timeout_names_instrument_and_command(tc: IDQTimeController,
                                              server: TimeControllerServer) -> None:
    tc._link.timeout_s = 0.3
    server.faults.delay_replies(1.0)
    with pytest.raises(IDQTimeControllerCommunicationError, match=r"tc.*INPU1:THRE\?.*0\.3 s"):
        tc.input1.threshold()
    server.faults.clear()
    tc.input1.threshold(0.3)
    assert tc.input1.threshold() == pytest.approx(0.3)  # no stale reply mixed in


def test_garbage_names_instrument_and_command(tc: IDQTimeController,
                                              server: TimeControllerServer) -> None:
    server.faults.send_garbage(1)
    with pytest.raises(IDQTimeControllerCommunicationError, match=r"tc.*garbage.*INPU2:EDGE\?"):
        tc.input2.edge()
    assert tc.input2.edge() == "rising"


def test_silent_instrument_times_out(tc: IDQTimeController,
                                     server: TimeControllerServer) -> None:
    tc._link.timeout_s = 0.2
    server.faults.silence()
    with pytest.raises(IDQTimeControllerCommunicationError, match=r"tc.*\*IDN\?"):
        tc.get_idn()
    server.faults.silence(False)
    assert tc.get_idn()["model"] == "ID1000"


def test_reconnect_after_dropped_link(tc: IDQTimeController,
                                      server: TimeControllerServer) -> None:
    tc.input1.threshold(0.2)
    server.faults.drop_connection(refuse_for_s=0.3)
    tc._link.timeout_s = 1.5
    # the request waits in ZeroMQ's queue until the device listens again
    assert tc.input1.threshold() == pytest.approx(0.2)
    server.faults.drop_connection(refuse_for_s=0.0)
    tc.input1.threshold(0.4)
    assert server.device.inputs[1].threshold_v == pytest.approx(0.4)


def test_dlt_errors_name_instrument_and_command(tc: IDQTimeController) -> None:
    with pytest.raises(IDQTimeControllerError, match=r"tc.*stop --id nope.*unknown acquisition"):
        tc.dlt("stop --id nope")
    with pytest.raises(IDQTimeControllerError, match="unrecognised option"):
        tc.dlt("list --xyz")


def test_mock_rejects_unknown_commands_like_the_device(tc: IDQTimeController) -> None:
    with pytest.raises(IDQTimeControllerError, match="SCPI_ERR_INVALID_CMD"):
        tc.ask("BOGUS:CMD?")
    with pytest.raises(IDQTimeControllerError, match="SCPI_ERR_PARAM_TYPE"):
        tc.write("INPU1:EDGE SIDEWAYS")


def test_serve_options() -> None:
    with pytest.raises(ValueError, match="unknown"):
        serve("x", None, {"colour": "blue"})
    with pytest.raises(ValueError, match="5 comma"):
        serve("x", None, {"synthetic_rates_hz": "1,2"})
    srv: Any = serve("x", None, {"model": "ID900", "realtime": "0"})
    assert srv.device.idn.split(",")[1] == "ID900"
    assert not srv.device.realtime
    srv.stop()


def test_tagblocks_are_valid(tc: IDQTimeController) -> None:
    blocks = list(tc.stream(0.3))
    assert all(isinstance(b, TagBlock) for b in blocks)
    assert blocks[1].start_ps > blocks[0].stop_ps  # the ≥ 40 ns record gap is visible


class RequestLog:
    """Every SCPI request the driver puts on the wire: (command, timeout override, answered)."""

    def __init__(self, tc: IDQTimeController) -> None:
        self.sent: list[tuple[str, float | None, bool]] = []
        self._request = tc._link.request
        tc._link.request = self

    def __call__(self, message: str, timeout_s: float | None = None) -> bytes | None:
        reply = self._request(message, timeout_s)
        self.sent.append((message, timeout_s, reply is not None))
        return reply


SAFE_STATE_SCPI = ["REC:STOP", "RAW1:SEND OFF", "RAW2:SEND OFF", "RAW3:SEND OFF",
                   "RAW4:SEND OFF"]


def test_cleanup_after_a_lost_link_sends_one_short_probe_not_a_timeout_per_command(
        server: TimeControllerServer, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 9: with the link gone, abort and safe_state each cost one probe of
    CLEANUP_PROBE_S (not 5 timeouts), name every command not done, and a link that
    comes back is used again at once."""
    tc = IDQTimeController("tc", server.address, timeout=2, tag_channels=(1,))
    wire = RequestLog(tc)
    stream = tc.stream()
    next(stream)
    (ident,) = server.acquisitions  # the DataLinkTarget's one stream
    server.faults.drop_connection(refuse_for_s=600)  # refused until cleared
    wire.sent.clear()
    with pytest.raises(IDQTimeControllerCommunicationError, match=r"no reply .* within 2 s"):
        list(stream)
    # the stream's own query waited its full timeout; the abort then probed once, briefly
    (failed, *abort) = wire.sent
    assert failed[1:] == (None, False)
    assert abort == [("REC:STOP", CLEANUP_PROBE_S, False)]
    report = tc.last_cleanup
    assert report is not None
    assert report.what == "abort"
    assert list(report.not_done) == ["REC:STOP", "RAW1:SEND OFF"]
    assert report.not_done["RAW1:SEND OFF"] == ("not sent: the Time Controller gave no reply "
                                                "to 'REC:STOP'")
    assert report.done == [f"stop --id {ident}"]  # the DataLinkTarget (on the host) answered
    assert tc.dlt("list") == []

    wire.sent.clear()
    caplog.clear()
    tc.safe_state()  # never raises
    assert wire.sent == [("REC:STOP", CLEANUP_PROBE_S, False)]
    report = tc.last_cleanup
    assert report is not None
    assert (report.what, report.done, list(report.not_done)) == (
        "safe_state", [], SAFE_STATE_SCPI)
    assert "within 0.5 s" in report.not_done["REC:STOP"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("tc: safe_state incomplete: REC:STOP: ")
    for cmd in SAFE_STATE_SCPI:
        assert f"{cmd}: " in warning

    # the link is back: the probe is answered and the whole safe state is done
    server.faults.clear()
    wire.sent.clear()
    tc.safe_state()
    assert [cmd for cmd, _, _ in wire.sent] == SAFE_STATE_SCPI
    assert wire.sent[0][1] == CLEANUP_PROBE_S  # still a probe: the link had been silent
    assert all(timeout is None and answered for _, timeout, answered in wire.sent[1:])
    assert tc.last_cleanup is not None
    assert tc.last_cleanup.complete
    assert server.device.run is None
    assert all(not raw.send for raw in server.device.raws.values())
    assert len(tc.acquire(0.01)) > 0  # and the instrument works as before
    tc.close()


def test_a_garbled_reply_during_cleanup_proves_the_link_alive(
        tc: IDQTimeController, server: TimeControllerServer) -> None:
    wire = RequestLog(tc)
    server.faults.send_garbage(1)
    tc.safe_state()
    # every command was sent with the full timeout; only the garbled one is not done
    assert wire.sent == [(cmd, None, True) for cmd in SAFE_STATE_SCPI]
    report = tc.last_cleanup
    assert report is not None
    assert list(report.not_done) == ["REC:STOP"]
    assert "garbage reply" in report.not_done["REC:STOP"]
    assert report.done == SAFE_STATE_SCPI[1:]


def test_a_silent_device_costs_cleanup_one_timeout(
        tc: IDQTimeController, server: TimeControllerServer) -> None:
    """A link that is up but silent: the first cleanup command waits its timeout (the
    link was not known to be silent yet); the rest are not sent."""
    tc._link.timeout_s = 0.3
    wire = RequestLog(tc)
    server.faults.silence()
    tc.safe_state()
    assert wire.sent == [("REC:STOP", None, False)]
    report = tc.last_cleanup
    assert report is not None
    assert list(report.not_done) == SAFE_STATE_SCPI
    assert "within 0.3 s" in report.not_done["REC:STOP"]
    server.faults.silence(False)
    tc.safe_state()
    assert tc.last_cleanup is not None
    assert tc.last_cleanup.complete


def test_cleanup_of_a_closed_instrument_never_raises(server: TimeControllerServer) -> None:
    """A stream abandoned until after close (its abort runs when it is collected) and a
    late safe_state: no exception, and every command is named as not done."""
    tc = IDQTimeController("tc", server.address, timeout=2, tag_channels=(1,))
    stream = tc.stream()
    next(stream)
    tc.close()
    stream.close()  # the acquisition's abort, on the closed instrument
    aborted = tc.last_cleanup
    assert aborted is not None
    assert (aborted.what, aborted.done) == ("abort", [])
    assert list(aborted.not_done)[:2] == ["REC:STOP", "RAW1:SEND OFF"]
    tc.safe_state()
    assert tc.last_cleanup is not None
    assert list(tc.last_cleanup.not_done) == SAFE_STATE_SCPI
