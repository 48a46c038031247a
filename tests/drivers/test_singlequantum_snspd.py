"""Single Quantum SNSPD adapter: bytes on the wire, the mock over TCP, latching, physics."""

from __future__ import annotations

import itertools
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from qkdlab.drivers.roles import SinglePhotonDetector
from qkdlab.drivers.singlequantum.snspd import (
    LABEL_PROPS,
    SingleQuantumSNSPD,
    SNSPDCommunicationError,
    SNSPDError,
    SNSPDLatchError,
)
from qkdlab.mock_instruments.bench import Bench, BenchConfig
from qkdlab.mock_instruments.server import Connection, TcpServer
from qkdlab.mock_instruments.singlequantum import snspd as mock_module
from qkdlab.mock_instruments.singlequantum.snspd import (
    MockSNSPD,
    SNSPDServer,
    dark_count_cps,
    efficiency,
    split_json_objects,
)

UA = 1e-6


def _set_bias_cmd(values_ua: list[float]) -> bytes:
    """``SetAllBiasCurrents`` exactly as the contrib driver's json.dumps writes it."""
    return json.dumps(
        {"command": "SetAllBiasCurrents", "label": "BiasCurrent", "value": values_ua}
    ).encode()


LP = LABEL_PROPS.encode()


# ---------------------------------------------------------------- 1. bytes on the wire


class ScriptedWebSQ(TcpServer):
    """A scripted WebSQ peer: records every JSON object received, answers from a label table.

    ``labelProps`` and ``{"request": <label>}`` are answered from :attr:`labels`; a
    command stores its value in the table and answers nothing (no broadcast), so
    the driver's read-backs see it.  The counts port streams :attr:`line` every 10 ms.
    """

    def __init__(self, labels: dict[str, Any], line: bytes) -> None:
        super().__init__("scripted-websq")
        self.labels = labels
        self.line = line
        self.received: list[bytes] = []
        self.lock = threading.Lock()
        self.counts = _ScriptedCounts(self)

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}?counts_port={self.counts.port}"

    def start(self) -> ScriptedWebSQ:
        super().start()
        self.counts.start()
        return self

    def stop(self) -> None:
        self.counts.stop()
        super().stop()

    def take(self) -> list[bytes]:
        """Messages received so far (cleared)."""
        time.sleep(0.05)  # writes are not acknowledged: let the last ones arrive
        with self.lock:
            out, self.received = self.received, []
        return out

    def serve(self, conn: Connection) -> None:
        buffer = b""
        while True:
            data = conn.recv()
            if data is None:
                return
            objects, buffer, _junk = split_json_objects(buffer + data)
            for raw in objects:
                with self.lock:
                    self.received.append(raw)
                reply = self._answer(json.loads(raw))
                if reply is not None:
                    conn.send(reply + b"\x17")

    def _answer(self, message: dict[str, Any]) -> bytes | None:
        if message.get("request") == "labelProps":
            return b"".join(
                json.dumps({"label": k, "value": {"value": v}}).encode()
                for k, v in self.labels.items()
            )
        if "request" in message:
            label = message["request"]
            return json.dumps({"label": label, "value": self.labels[label]}).encode()
        self.labels[message["label"]] = message["value"]
        return None


class _ScriptedCounts(TcpServer):
    def __init__(self, owner: ScriptedWebSQ) -> None:
        super().__init__("scripted-counts")
        self.owner = owner

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def serve(self, conn: Connection) -> None:
        while conn.send(self.owner.line):
            if conn.recv() is None:  # ~50 ms poll
                return


def _labels(**overrides: Any) -> dict[str, Any]:
    labels: dict[str, Any] = {
        "NumberOfDetectors": 2,
        "BiasCurrent": [0.0, 0.0],
        "TriggerLevel": [50.0, 50.0],
        "InptMeasurementPeriod": 200,
        "DetectorEnable": False,
        "BiasVoltage": [0.0, 0.0],
    }
    labels.update(overrides)
    return labels


@pytest.fixture
def peer() -> Iterator[ScriptedWebSQ]:
    server = ScriptedWebSQ(_labels(), b"400.0,30,50\n").start()
    yield server
    server.stop()


@pytest.fixture
def wired(peer: ScriptedWebSQ) -> Iterator[SingleQuantumSNSPD]:
    det = SingleQuantumSNSPD("dut", peer.address, bias_max_a=[18 * UA, 12 * UA], timeout=1.0)
    for ch in det.channels:
        ch.bias_current.step = 1 * UA
        ch.bias_current.inter_delay = 0.0
    yield det
    det.close()


def test_construction_sends_only_label_requests(peer: ScriptedWebSQ) -> None:
    det = SingleQuantumSNSPD("dut", peer.address, bias_max_a=18 * UA, timeout=1.0)
    sent = peer.take()
    # the probe link's request, then the contrib reader's (it may repeat it while waiting)
    assert len(sent) >= 2
    assert set(sent) == {b'{"request": "labelProps", "value": "None"}'}
    assert det.bias_max_a == [18 * UA, 18 * UA]
    assert len(det.channels) == 2
    det.close()


def test_channel_bias_ramp_exact_bytes(peer: ScriptedWebSQ, wired: SingleQuantumSNSPD) -> None:
    peer.take()
    wired.ch1.bias_current(2.5 * UA)
    assert peer.take() == [
        LP,  # the ramp starts from a fresh reading
        _set_bias_cmd([1.0, 0.0]),
        _set_bias_cmd([2.0, 0.0]),
        _set_bias_cmd([2.5, 0.0]),
        LP,  # and ends with a read-back
    ]
    assert wired.ch1.bias_current() == pytest.approx(2.5 * UA)


def test_settings_exact_bytes(peer: ScriptedWebSQ, wired: SingleQuantumSNSPD) -> None:
    peer.take()
    wired.ch2.trigger_level(0.12)
    assert peer.take() == [
        LP,
        b'{"command": "SetAllTriggerLevels", "label": "TriggerLevel", "value": [50.0, 120.0]}',
        LP,
    ]
    wired.measurement_period(0.25)
    assert peer.take() == [
        b'{"command": "SetMeasurementPeriod", "label": "InptMeasurementPeriod", "value": 250}',
        LP,
    ]
    assert wired.bias_voltage() == [0.0, 0.0]
    assert peer.take() == [b'{"request": "BiasVoltage"}', LP]


def test_disable_and_enable_exact_bytes(peer: ScriptedWebSQ, wired: SingleQuantumSNSPD) -> None:
    peer.labels.update(BiasCurrent=[2.0, 1.0], DetectorEnable=True)
    peer.take()
    wired.disable()
    off = b'{"command": "DetectorEnable", "label": "DetectorEnable", "value": false}'
    assert peer.take() == [
        LP,  # remember the operating point
        LP,  # ramp start
        _set_bias_cmd([1.0, 0.5]),
        _set_bias_cmd([0.0, 0.0]),
        LP,  # read back
        off,
        LP,  # read back
    ]
    wired.enable()
    on = b'{"command": "DetectorEnable", "label": "DetectorEnable", "value": true}'
    assert peer.take() == [
        LP,  # source state
        LP, LP,  # ramp to 0 (already there): start and read-back, nothing written
        on,  # the source goes on at 0 A
        LP,
        LP,
        _set_bias_cmd([1.0, 0.5]),
        _set_bias_cmd([2.0, 1.0]),
        LP,
    ]
    assert wired.operating_bias_a == [pytest.approx(2 * UA), pytest.approx(1 * UA)]


def test_count_rates_exact_bytes(peer: ScriptedWebSQ, wired: SingleQuantumSNSPD) -> None:
    peer.take()
    assert wired.count_rates() == [150.0, 250.0]  # 30 and 50 counts in 200 ms
    assert peer.take() == [LP]  # state read; the source is off, so no latch check
    wired.npts(3)
    counters = wired.counters()
    assert counters.shape == (3, 3)
    np.testing.assert_array_equal(counters[:, 0], [400.0, 30.0, 50.0])
    np.testing.assert_array_equal(wired.channel2(), [50.0, 50.0, 50.0])


def test_validators_send_nothing(peer: ScriptedWebSQ, wired: SingleQuantumSNSPD) -> None:
    peer.take()
    with pytest.raises(ValueError, match=r"between 0\.0 and 1\.2e-05.*dut_ch2_bias_current"):
        wired.ch2.bias_current(13 * UA)
    with pytest.raises(ValueError, match=r"ch2 of .*dut_bias_current"):
        wired.bias_current([1 * UA, 12.5 * UA])
    with pytest.raises(ValueError, match=r"2 values.*dut_bias_current"):
        wired.bias_current([1 * UA])
    with pytest.raises(ValueError, match=r"dut_ch1_trigger_level"):
        wired.ch1.trigger_level(1.5)
    with pytest.raises(ValueError, match=r"dut_measurement_period"):
        wired.measurement_period(0.005)
    assert peer.take() == []


def test_bias_max_is_checked_before_connecting() -> None:
    with pytest.raises(ValueError, match=r"dut: bias_max_a=9\.5e-05 A must be in \(0, 9\.09e-05\]"):
        SingleQuantumSNSPD("dut", "tcp://127.0.0.1:9", bias_max_a=9.5e-5)


def test_bias_max_needs_one_value_per_channel(peer: ScriptedWebSQ) -> None:
    with pytest.raises(ValueError, match=r"dut: bias_max_a has 3 values; the system has 2"):
        SingleQuantumSNSPD("dut", peer.address, bias_max_a=[1 * UA] * 3)


def test_unreachable_server_fails_fast_naming_instrument() -> None:
    server = ScriptedWebSQ(_labels(), b"0,0,0\n")  # listening, never started: no reply
    start = time.perf_counter()
    with pytest.raises(SNSPDCommunicationError, match=r"dut: no reply to .*labelProps"):
        SingleQuantumSNSPD("dut", server.address, bias_max_a=10 * UA, timeout=0.2)
    assert time.perf_counter() - start < 2.0
    server.stop()


# ---------------------------------------------------------------- 2. through the mock


@pytest.fixture
def mock() -> MockSNSPD:
    return MockSNSPD(photon_rate_cps=2e4, seed=1234)


@pytest.fixture
def server(mock: MockSNSPD) -> Iterator[SNSPDServer]:
    srv = SNSPDServer("snspd", mock, row_interval_s=0.01)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def det(server: SNSPDServer) -> Iterator[SingleQuantumSNSPD]:
    instrument = SingleQuantumSNSPD("dut", server.address, bias_max_a=18 * UA, timeout=1.0)
    for ch in instrument.channels:
        ch.bias_current.step = 2 * UA
        ch.bias_current.inter_delay = 0.0
    yield instrument
    instrument.close()


def test_identity_role_and_channels(det: SingleQuantumSNSPD) -> None:
    idn = det.get_idn()
    assert idn["vendor"] == "Single Quantum"
    assert "4 channels" in str(idn["model"])
    assert isinstance(det, SinglePhotonDetector)
    assert det.number_of_detectors() == 4
    assert [ch.short_name for ch in det.channels] == ["ch1", "ch2", "ch3", "ch4"]


def test_snapshot_reads_without_side_effects(det: SingleQuantumSNSPD, mock: MockSNSPD) -> None:
    received = len(mock.received)
    snap = det.snapshot(update=True)
    assert snap["parameters"]["detectors"]["value"] is False
    assert snap["submodules"]["ch2"]["parameters"]["bias_current"]["unit"] == "A"
    assert "counters" not in snap["parameters"]
    assert all("command" not in m for m in mock.received[received:])  # reads only
    assert mock.enabled is False


@pytest.mark.parametrize(
    ("name", "value", "unit"),
    [
        ("measurement_period", 0.35, "s"),
        ("trigger_level", [0.02, 0.03, 0.04, 0.25], "V"),
        ("bias_current", [3 * UA, 5 * UA, 7 * UA, 9 * UA], "A"),
    ],
)
def test_round_trip_with_units(det: SingleQuantumSNSPD, name: str, value: Any, unit: str) -> None:
    parameter = getattr(det, name)
    assert parameter.unit == unit
    parameter(value)
    assert parameter() == pytest.approx(value)


def test_channel_round_trips_and_mock_state(det: SingleQuantumSNSPD, mock: MockSNSPD) -> None:
    det.ch3.bias_current(11.5 * UA)
    assert det.ch3.bias_current.unit == "A"
    assert det.ch3.bias_current() == pytest.approx(11.5 * UA)
    assert mock.bias_ua == [0.0, 0.0, 11.5, 0.0]
    det.ch4.trigger_level(0.075)
    assert det.ch4.trigger_level.unit == "V"
    assert mock.trigger_mv[3] == 75.0
    det.measurement_period(0.02)
    assert mock.period_ms == 20
    det.enable()
    assert det.detectors() is True
    assert det.ch3.bias_voltage.unit == "V"
    assert det.ch3.bias_voltage() == pytest.approx(11.5e-6 * mock_module.R_LINE_OHM)
    assert det.ch3.count_rate.unit == "cps"
    assert det.ch3.count_rate() > 0


def test_validators_leave_the_mock_untouched(det: SingleQuantumSNSPD, mock: MockSNSPD) -> None:
    det.ch1.bias_current(4 * UA)
    before = (len(mock.received), list(mock.bias_ua), list(mock.trigger_mv), mock.period_ms)
    with pytest.raises(ValueError, match=r"between 0\.0 and 1\.8e-05.*dut_ch1_bias_current"):
        det.ch1.bias_current(18.5 * UA)
    with pytest.raises(ValueError, match=r"dut_bias_current"):
        det.bias_current([1 * UA, 2 * UA, 3 * UA, -1 * UA])
    with pytest.raises(ValueError, match=r"dut_ch2_trigger_level"):
        det.ch2.trigger_level(-2.0)
    with pytest.raises(ValueError, match=r"dut_measurement_period"):
        det.measurement_period(120.0)
    after = (len(mock.received), list(mock.bias_ua), list(mock.trigger_mv), mock.period_ms)
    assert after == before


def test_ramp_takes_bounded_steps_below_the_maximum(
    det: SingleQuantumSNSPD, mock: MockSNSPD
) -> None:
    det.ch2.bias_current.step = 0.75 * UA
    det.ch2.bias_current(17.9 * UA)
    path = [[0.0] * 4, *mock.bias_history]
    ch2 = [p[1] for p in path]
    steps = [abs(b - a) for a, b in itertools.pairwise(ch2)]
    assert len(steps) == math.ceil(17.9 / 0.75)
    assert max(steps) <= 0.75 + 1e-9
    assert max(ch2) <= 18.0
    assert ch2[-1] == pytest.approx(17.9)
    assert all(p[0] == p[2] == p[3] == 0.0 for p in path)  # other channels never moved


def test_bulk_ramp_moves_channels_together(det: SingleQuantumSNSPD, mock: MockSNSPD) -> None:
    det.bias_current([8 * UA, 4 * UA, 0.0, 6 * UA])
    assert len(mock.bias_history) == 4  # the largest change (8 µA) in 2 µA steps
    for a, b in itertools.pairwise([[0.0] * 4, *mock.bias_history]):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 2.0 + 1e-9
    assert mock.bias_ua == [8.0, 4.0, 0.0, 6.0]


def test_a_ramp_step_is_mandatory(det: SingleQuantumSNSPD, mock: MockSNSPD) -> None:
    det.ch3.bias_current.step = None
    received = len(mock.received)
    with pytest.raises(SNSPDError, match=r"dut: ch3.bias_current.step is None"):
        det.ch3.bias_current(10 * UA)
    with pytest.raises(SNSPDError, match=r"dut: ch3.bias_current.step is None"):
        det.safe_state()
    assert [m for m in mock.received[received:] if "command" in m] == []
    assert mock.bias_ua == [0.0] * 4


def test_ramp_respects_inter_delay(det: SingleQuantumSNSPD, mock: MockSNSPD) -> None:
    det.ch1.bias_current.inter_delay = 0.03
    start = time.perf_counter()
    det.ch1.bias_current(10 * UA)
    assert time.perf_counter() - start >= 4 * 0.03
    assert len(mock.bias_history) == 5


def test_safe_state_ramps_down_and_switches_off(det: SingleQuantumSNSPD, mock: MockSNSPD) -> None:
    det.enable()
    det.bias_current([16 * UA, 15 * UA, 14 * UA, 13 * UA])
    mock.bias_history.clear()
    det.safe_state()
    down = [[16.0, 15.0, 14.0, 13.0], *mock.bias_history]
    for a, b in itertools.pairwise(down):
        assert all(y <= x for x, y in zip(a, b, strict=True))
        assert max(x - y for x, y in zip(a, b, strict=True)) <= 2.0 + 1e-9
    assert mock.bias_ua == [0.0] * 4
    assert mock.enabled is False
    det.safe_state()  # already safe: harmless
    assert det.detectors() is False
    det.enable()  # back to the remembered operating point
    assert mock.enabled is True
    assert mock.bias_ua == [16.0, 15.0, 14.0, 13.0]


def test_source_switches_on_only_at_zero_bias(det: SingleQuantumSNSPD, mock: MockSNSPD) -> None:
    det.bias_current([10 * UA] * 4)  # set while the source is off: no current flows
    mock.bias_history.clear()
    det.detectors(True)  # same as enable()
    on_at = next(i for i, m in enumerate(mock.received) if m.get("command") == "DetectorEnable")
    biases = [m["value"] for m in mock.received[:on_at] if m.get("command") == "SetAllBiasCurrents"]
    assert biases[-1] == [0.0] * 4
    assert mock.bias_ua == [10.0] * 4
    assert all(max(b) <= 10.0 for b in mock.bias_history)


def test_instrument_errors_are_raised(det: SingleQuantumSNSPD, mock: MockSNSPD) -> None:
    det.check_errors()  # nothing reported yet
    det.comm.set_bias_current([1.0])  # bypassing the adapter: wrong length
    with pytest.raises(SNSPDError, match=r"dut: the instrument reported .*SetAllBiasCurrents: "
                                         r"expected a list of 4 numbers"):
        det.check_errors()
    assert mock.bias_ua == [0.0] * 4
    det.check_errors()  # reported once


def test_mock_answers_junk_and_bad_commands_with_error_labels(server: SNSPDServer,
                                                              mock: MockSNSPD) -> None:
    with socket.create_connection((server.host, server.port), timeout=1.0) as sock:
        sock.sendall(b'hello{"command": "SetMeasurementPeriod", "value": 5}'
                     b'{"command": "Explode", "value": 1}')
        buffer = b""
        while buffer.count(b"\x17") < 3:
            buffer += sock.recv(4096)
    frames = [json.loads(f) for f in buffer.split(b"\x17")[:3]]
    assert frames[0] == {"label": "Error", "value": "not JSON: 'hello'"}
    assert frames[1]["value"] == "SetMeasurementPeriod: 5 ms outside [10, 60000] ms"
    assert frames[2]["value"].startswith("unknown command 'Explode'")
    assert mock.period_ms == 100


def test_close_ends_the_contrib_threads(server: SNSPDServer) -> None:
    det = SingleQuantumSNSPD("dut", server.address, bias_max_a=18 * UA)
    readers = [det.comm.talk, det.comm.cnts]
    assert all(r.is_alive() for r in readers)
    det.close()
    assert not any(r.is_alive() for r in readers)


def test_reconnect_after_a_dropped_link(
    det: SingleQuantumSNSPD, server: SNSPDServer, mock: MockSNSPD
) -> None:
    det.ch1.trigger_level(0.125)
    server.faults.drop_connection(refuse_for_s=0.3)
    time.sleep(0.1)
    assert det.ch1.trigger_level() == pytest.approx(0.125)  # reconnects, retries
    det.enable()
    det.bias_current([12 * UA] * 4)
    assert mock.bias_ua == [12.0] * 4
    assert min(det.count_rates()) > 0
    server.faults.drop_connection(refuse_for_s=0.2)
    det.safe_state()  # recovers the link, and reads the safe state back
    assert (mock.bias_ua, mock.enabled) == ([0.0] * 4, False)


def test_timeout_names_instrument_and_command(det: SingleQuantumSNSPD, server: SNSPDServer) -> None:
    det.timeout(0.15)
    det.reconnect_timeout_s = 0.2
    server.faults.delay_replies(0.3)
    with pytest.raises(SNSPDCommunicationError,
                       match=r"dut: no reply in time on .*labelProps.*measurement_period"):
        det.measurement_period()
    server.faults.clear()
    time.sleep(0.35)  # replies delayed into the dead links are gone with them
    det.measurement_period(0.3)
    assert det.measurement_period() == pytest.approx(0.3)


def test_garbage_reply_names_instrument_and_command(
    det: SingleQuantumSNSPD, server: SNSPDServer
) -> None:
    server.faults.send_garbage(1)
    with pytest.raises(SNSPDError, match=r"dut: garbled reply to .*labelProps.*trigger_level"):
        det.ch1.trigger_level()
    assert det.ch1.trigger_level() == pytest.approx(0.05)


def test_counts_faults_name_instrument_and_port(
    det: SingleQuantumSNSPD, server: SNSPDServer
) -> None:
    det.timeout(0.2)
    det.reconnect_timeout_s = 0.5
    det.measurement_period(0.01)
    server.counts.faults.send_garbage(-1)
    with pytest.raises(SNSPDError, match=r"dut: garbled counts line \(count_rates\(\)\)"):
        det.count_rates()
    server.counts.faults.clear()
    server.counts.faults.silence()
    port = server.counts.port
    with pytest.raises(SNSPDCommunicationError,
                       match=rf"dut: no counts line in time on the counts port {port}"):
        det.count_rates()
    server.counts.faults.clear()
    assert len(det.count_rates()) == 4


def test_serve_factory_options() -> None:
    srv = mock_module.serve("snspd", None, {"channels": "2", "switching_ua": "15,16",
                                            "row_interval_s": "0.01", "seed": "3"})
    assert srv.instrument.n == 2
    assert srv.instrument.switching_ua == [15.0, 16.0]
    assert srv.address.startswith("tcp://127.0.0.1:")
    assert f"?counts_port={srv.counts.port}" in srv.address
    srv.stop()
    with pytest.raises(ValueError, match=r"unknown SNSPD mock option\(s\): colour"):
        mock_module.serve("snspd", None, {"colour": "blue"})


def test_launcher_address_reaches_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkdlab.mock_instruments import launcher

    monkeypatch.setitem(launcher.MOCKS, "singlequantum/snspd",
                        "qkdlab.mock_instruments.singlequantum.snspd:serve")
    with launcher.MockLauncher(seed=3) as mocks:
        address = mocks.start("snspd", "mock://singlequantum/snspd?row_interval_s=0.01")
        det = SingleQuantumSNSPD("snspd", address, bias_max_a=18 * UA)
        for ch in det.channels:
            ch.bias_current.inter_delay = 0.0
            ch.bias_current.step = 6 * UA
        det.enable()
        det.bias_current([18 * UA] * 4)
        assert all(d.efficiency > 0.92 for d in mocks.bench.bob.detectors)
        assert min(det.count_rates()) > 0
        det.safe_state()
        assert not any(d.enabled for d in mocks.bench.bob.detectors)
        det.close()


# ---------------------------------------------------------------- 3. latching


def test_over_bias_latches_and_raises_leaving_zero(
    server: SNSPDServer, mock: MockSNSPD
) -> None:
    # a hard maximum deliberately above the 20 µA switching current
    det = SingleQuantumSNSPD("dut", server.address, bias_max_a=25 * UA)
    for ch in det.channels:
        ch.bias_current.step = 2.5 * UA
        ch.bias_current.inter_delay = 0.0
    det.enable()
    det.bias_current([21 * UA, 15 * UA, 15 * UA, 15 * UA])
    assert mock.latched == [True, False, False, False]
    assert det.latched_channels() == [0]
    assert det.ch1.bias_voltage() > 100 * det.ch2.bias_voltage()
    with pytest.raises(SNSPDLatchError,
                       match=r"dut: ch1 at 21\.000 µA latched again .* bias left at 0 A"):
        det.count_rates()
    assert mock.bias_ua == [0.0, 15.0, 15.0, 15.0]
    assert mock.latched == [False] * 4
    ch1 = [b[0] for b in mock.bias_history]
    assert max(abs(b - a) for a, b in itertools.pairwise(ch1)) <= 2.5 + 1e-9
    rates = det.count_rates()
    assert rates[0] == 0.0
    assert min(rates[1:]) > 0


def test_transient_latch_is_recovered(det: SingleQuantumSNSPD, mock: MockSNSPD) -> None:
    det.enable()
    det.bias_current([16 * UA] * 4)
    mock.latch(1)  # a bright flash
    assert det.latched_channels() == [1]
    mock.bias_history.clear()
    rates = det.count_rates()
    assert min(rates) > 1e4  # every channel counts again
    ch2 = [b[1] for b in mock.bias_history]
    assert min(ch2) == 0.0
    assert ch2[-1] == 16.0
    assert mock.latched == [False] * 4


def test_dark_channel_at_high_bias_is_not_mistaken_for_a_latch(server: SNSPDServer,
                                                                mock: MockSNSPD) -> None:
    det = SingleQuantumSNSPD("dut", server.address, bias_max_a=18 * UA)
    for ch in det.channels:
        ch.bias_current.step = 5 * UA
        ch.bias_current.inter_delay = 0.0
    mock.photon_rate_cps = [0.0] * 4
    det.measurement_period(0.01)  # ~0.1 dark counts per period at 12 µA
    det.enable()
    det.bias_current([12 * UA] * 4)
    mock.bias_history.clear()
    for _ in range(5):
        det.count_rates()
    assert mock.bias_history == []  # zero counts, but no latch voltage: left alone


# ---------------------------------------------------------------- 4. physics


def _within_poisson(measured_cps: float, expected_cps: float, window_s: float) -> bool:
    sigma = math.sqrt(max(expected_cps * window_s, 1.0)) / window_s
    return abs(measured_cps - expected_cps) <= 5.0 * sigma


def _model_rate(bias_ua: float, photons_cps: float, switching_ua: float = 20.0) -> float:
    """The documented model recomputed here: (η Φ + DCR) / (1 + R τ)."""
    x = bias_ua / switching_ua
    eta = 0.95 / (1.0 + math.exp(-(x - 0.70) / 0.05))
    dark = 100.0 * math.exp((x - 0.90) / 0.03) + 10.0 * eta / 0.95
    rate = eta * photons_cps + dark
    return rate / (1.0 + rate * 50e-9)


def test_efficiency_and_dark_counts_follow_the_bias(det: SingleQuantumSNSPD,
                                                    mock: MockSNSPD) -> None:
    det.measurement_period(1.0)
    det.enable()
    rates = []
    for bias in (10.0, 14.0, 17.0, 18.0):
        det.bias_current([bias * UA] * 4)
        measured = det.count_rates()
        expected = _model_rate(bias, 2e4)
        assert all(_within_poisson(m, expected, 1.0) for m in measured), (bias, measured)
        rates.append(measured[0])
    assert rates == sorted(rates)
    assert efficiency(18.0, 20.0) > 0.92  # the plateau near switching (PHYSICS.md)
    assert dark_count_cps(18.0, 20.0) < 130.0
    assert dark_count_cps(19.6, 20.0) > 10 * dark_count_cps(18.0, 20.0)  # steep rise
    det.disable()
    assert det.count_rates() == [0.0] * 4


def test_dark_counts_rise_steeply_near_switching(server: SNSPDServer, mock: MockSNSPD) -> None:
    det = SingleQuantumSNSPD("dut", server.address, bias_max_a=19.8 * UA)
    for ch in det.channels:
        ch.bias_current.step = 5 * UA
        ch.bias_current.inter_delay = 0.0
    mock.photon_rate_cps = [0.0] * 4
    det.measurement_period(2.0)
    det.enable()
    measured = []
    for bias in (16.0, 18.0, 19.5):
        det.bias_current([bias * UA] * 4)
        rates = det.count_rates()
        expected = _model_rate(bias, 0.0)
        assert all(_within_poisson(r, expected, 2.0) for r in rates), (bias, rates, expected)
        measured.append(sum(rates) / 4)
    assert measured[1] > 5 * measured[0]  # 12 → 110 cps over 2 µA
    assert measured[2] > 5 * measured[1]  # 110 → 1230 cps over the last 1.5 µA


@pytest.fixture
def bench_det() -> Iterator[tuple[SingleQuantumSNSPD, MockSNSPD, Bench]]:
    bench = Bench(BenchConfig(), seed=7)
    bench.alice.attenuation_db += 10.0  # μ_signal 0.5 → 0.05: ~1e5 clicks/s per detector
    mock = MockSNSPD(bench, seed=99)
    srv = SNSPDServer("snspd-bench", mock, row_interval_s=0.01)
    srv.start()
    det = SingleQuantumSNSPD("bench_dut", srv.address, timeout=1.0,
                             bias_max_a=[25 * UA, 25 * UA, 25 * UA, 19 * UA])
    for ch in det.channels:
        ch.bias_current.step = 5 * UA
        ch.bias_current.inter_delay = 0.0
    yield det, mock, bench
    det.close()
    srv.stop()


def test_bench_rates_follow_expected_click_rates(
    bench_det: tuple[SingleQuantumSNSPD, MockSNSPD, Bench],
) -> None:
    det, _mock, bench = bench_det
    assert not any(d.enabled for d in bench.bob.detectors)  # power-on: source off
    det.measurement_period(1.0)
    det.enable()
    det.bias_current([18 * UA] * 4)
    for d in bench.bob.detectors:
        assert d.enabled
        assert d.efficiency == pytest.approx(efficiency(18.0, 20.0))
        assert d.efficiency > 0.92
        assert d.dark_count_cps == pytest.approx(dark_count_cps(18.0, 20.0))
        assert (d.dead_time_s, d.afterpulse_prob, d.jitter_ps) == (50e-9, 0.0, 15.0)
    true_rates = [float(r) for r in bench.expected_click_rates()]
    assert min(true_rates) > 1e4
    measured = det.count_rates()
    for m, r in zip(measured, true_rates, strict=True):
        assert _within_poisson(m, r / (1 + r * 50e-9), 1.0), (m, r)
    tags = bench.acquire(0.02)
    per_channel = tags.counts(list(bench.tagger.detector_channels))
    for ch, r in zip(bench.tagger.detector_channels, true_rates, strict=True):
        assert _within_poisson(per_channel[ch] / 0.02, r, 0.02), (ch, per_channel[ch], r)


def test_latched_channel_is_disabled_on_the_bench(
    bench_det: tuple[SingleQuantumSNSPD, MockSNSPD, Bench],
) -> None:
    det, mock, bench = bench_det
    det.enable()
    det.bias_current([18 * UA, 18 * UA, 22 * UA, 18 * UA])
    assert mock.latched == [False, False, True, False]
    assert [d.enabled for d in bench.bob.detectors] == [True, True, False, True]
    assert float(bench.expected_click_rates()[2]) == 0.0
    tags = bench.acquire(0.02)
    assert tags.counts([bench.tagger.detector_channels[2]]) == {
        bench.tagger.detector_channels[2]: 0
    }
    with pytest.raises(SNSPDLatchError, match=r"ch3"):
        det.count_rates()
    assert bench.bob.detectors[2].enabled is False  # left at 0 A
    assert mock.bias_ua[2] == 0.0


def test_auto_calibration_and_its_ceiling(
    bench_det: tuple[SingleQuantumSNSPD, MockSNSPD, Bench],
) -> None:
    det, mock, _bench = bench_det
    det.enable()
    found = det.auto_calibrate_bias([100.0, 200.0, 300.0, 400.0])
    for amps, target in zip(found, (100.0, 200.0, 300.0, 400.0), strict=True):
        assert dark_count_cps(amps / UA, 20.0) == pytest.approx(target, rel=2e-3)
    assert found == sorted(found)
    assert found[3] < 19 * UA
    # 5000 cps is only reached above ch4's 19 µA maximum: ramped back down to it
    with pytest.raises(SNSPDError, match=r"bench_dut: the calibration set ch4 to 1\.960e-05 A "
                                         r"above bias_max_a"):
        det.auto_calibrate_bias([100.0, 100.0, 100.0, 5000.0])
    assert mock.bias_ua[3] == pytest.approx(19.0)
