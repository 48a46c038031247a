"""ID Quantique ID120 driver: bytes on the wire, the mock over TCP, pyvisa-sim, physics."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

from qkdlab.drivers.idquantique.id120 import (
    IDQID120,
    IDQID120CommunicationError,
    IDQID120Error,
)
from qkdlab.drivers.roles import SinglePhotonDetector
from qkdlab.mock_instruments.bench import Bench, BenchConfig
from qkdlab.mock_instruments.idquantique.id120 import MockID120
from qkdlab.mock_instruments.server import ScpiServer

IDN = "ID Quantique,ID120,1007,2.1"
Protocol = Callable[..., AbstractContextManager[Any]]


# pyvisa-py directly (no search for an IVI library), no 0.1 s device clear: the
# construction test keeps the defaults.
FAST = {"visalib": "@py", "device_clear": False}


def _sync(det: IDQID120) -> None:
    """Writes are not acknowledged: one query makes sure the mock has handled them."""
    det.state()


# ---------------------------------------------------------------- 1. bytes on the wire


def test_construction_sends_only_idn(expected_protocol: Protocol) -> None:
    with expected_protocol(IDQID120, [("*IDN?", IDN)], visalib="@py") as det:
        assert det.bias_max_v == IDQID120.BIAS_RATING_V


@pytest.mark.parametrize(
    ("name", "command", "reply", "value"),
    [
        ("bias_voltage", "BIAS:VOLTAGE?", "182400000", 182.4),
        ("threshold", "THRESHOLD:VOLTAGE?", "50000", 0.05),
        ("dead_time", "DEADTIME:TIME?", "80", 80e-6),
        ("integration_time", "COUNTERS:INTEGRATION_TIME?", "1200", 1.2),
        ("count_rate", "COUNTERS:DETECTION_FREQ?", "12345", 12345.0),
        ("counts", "COUNTERS:DETECTION_COUNT?", "2469", 2469),
        ("temperature_setpoint", "REG:TEMP_SET_POINT?", "-40000", -40.0),
        ("temperature", "REG:MEASURED_TEMP?", "-39875", -39.875),
        ("running", "REG:RUN?", "TRUE", True),
        ("state", "REG:STATE?", "RUNNING", "RUNNING"),
        ("bias_error", "BIAS:ERROR_STATUS?", "FALSE", False),
    ],
)
def test_get_exact_bytes(
    expected_protocol: Protocol, name: str, command: str, reply: str, value: object
) -> None:
    with expected_protocol(IDQID120, [("*IDN?", IDN), (command, reply)], **FAST) as det:
        got = getattr(det, name)()
    expected = pytest.approx(value) if isinstance(value, float) else value
    assert got == expected
    assert type(got) is type(value)


@pytest.mark.parametrize(
    ("name", "value", "command", "reply"),
    [
        ("threshold", 0.1225, "THRESHOLD:VOLTAGE 122500", "122500"),
        ("dead_time", 120e-6, "DEADTIME:TIME 120", "120"),
        ("integration_time", 0.4, "COUNTERS:INTEGRATION_TIME 400", "400"),
        ("temperature_setpoint", -45.0, "REG:TEMP_SET_POINT -45000", "-45000"),
        ("running", True, "REG:RUN TRUE", "TRUE"),
        ("running", False, "REG:RUN FALSE", "FALSE"),
    ],
)
def test_set_exact_bytes(
    expected_protocol: Protocol, name: str, value: object, command: str, reply: str
) -> None:
    # Each script ends on a query: the scripted peer is only known to have read a
    # trailing write once it has answered something after it.
    query = command.split(" ")[0] + "?"
    script = [("*IDN?", IDN), (command, None), (query, reply)]
    with expected_protocol(IDQID120, script, **FAST) as det:
        parameter = getattr(det, name)
        parameter(value)
        assert parameter() == pytest.approx(value)


def test_output_polarity_exact_bytes(expected_protocol: Protocol) -> None:
    script = [
        ("*IDN?", IDN),
        ("OUTPUT2:POLARITY NEGATIVE", None),
        ("OUTPUT1:POLARITY?", "POSITIVE"),
    ]
    with expected_protocol(IDQID120, script, **FAST) as det:
        det.outputs[1].polarity("negative")
        assert det.output1.polarity() == "positive"


def test_bias_ramp_lists_every_step(expected_protocol: Protocol) -> None:
    script = [
        ("*IDN?", IDN),
        ("BIAS:VOLTAGE?", "100000000"),  # the ramp starts from a fresh reading
        ("BIAS:VOLTAGE 102000000", None),
        ("BIAS:VOLTAGE 104000000", None),
        ("BIAS:VOLTAGE 105000000", None),
        ("BIAS:VOLTAGE?", "105000000"),
    ]
    with expected_protocol(IDQID120, script, **FAST) as det:
        det.bias_voltage.inter_delay = 0
        assert det.bias_voltage.step == 2.0
        det.bias_voltage(105.0)
        assert det.bias_voltage() == pytest.approx(105.0)


def test_disable_then_enable_exact_bytes(expected_protocol: Protocol) -> None:
    script = [
        ("*IDN?", IDN),
        ("BIAS:VOLTAGE?", "4000000"),  # disable(): remember the operating bias
        ("BIAS:VOLTAGE?", "4000000"),  # ramp start
        ("BIAS:VOLTAGE 2000000", None),
        ("BIAS:VOLTAGE 0", None),
        ("REG:RUN FALSE", None),
        ("BIAS:VOLTAGE?", "0"),  # end state read back
        ("REG:RUN?", "FALSE"),
        ("REG:RUN TRUE", None),  # enable(): regulation first, then the ramp up
        ("BIAS:VOLTAGE?", "0"),
        ("BIAS:VOLTAGE 2000000", None),
        ("BIAS:VOLTAGE 4000000", None),
        ("BIAS:VOLTAGE?", "4000000"),
        ("REG:RUN?", "TRUE"),
    ]
    with expected_protocol(IDQID120, script, **FAST) as det:
        det.bias_voltage.inter_delay = 0
        det.disable()
        assert det.operating_bias_v == pytest.approx(4.0)
        det.enable()


def test_error_flag_raises_naming_instrument(expected_protocol: Protocol) -> None:
    script = [("*IDN?", IDN), ("BIAS:ERROR_STATUS?", "FALSE"), ("BIAS:ERROR_STATUS?", "TRUE")]
    with expected_protocol(IDQID120, script, **FAST) as det:
        det.check_errors()
        with pytest.raises(IDQID120Error, match=r"dut: .*BIAS:ERROR_STATUS"):
            det.check_errors()


def test_validators_write_nothing(expected_protocol: Protocol) -> None:
    with expected_protocol(IDQID120, [("*IDN?", IDN)], bias_max_v=200.0, **FAST) as det:
        with pytest.raises(ValueError, match=r"200.*dut_bias_voltage"):
            det.bias_voltage(200.5)
        with pytest.raises(ValueError, match=r"dut_threshold"):
            det.threshold(1.5)
        with pytest.raises(ValueError, match=r"dut_integration_time"):
            det.integration_time(0.1)


def test_unparsable_reply_names_command(expected_protocol: Protocol) -> None:
    script = [("*IDN?", IDN), ("THRESHOLD:VOLTAGE?", "n/a")]
    with (
        expected_protocol(IDQID120, script, **FAST) as det,
        pytest.raises(IDQID120Error, match=r"dut: reply 'n/a' to 'THRESHOLD:VOLTAGE\?'"),
    ):
        det.threshold()


def test_bias_max_above_rating_is_refused() -> None:
    with pytest.raises(ValueError, match=r"bias_max_v=300"):
        IDQID120("dut", "TCPIP::127.0.0.1::1::SOCKET", bias_max_v=300.0)


# ---------------------------------------------------------------- 2. through the mock


@pytest.fixture
def mock() -> MockID120:
    return MockID120(seed=1234)


@pytest.fixture
def server(mock: MockID120) -> Iterator[ScpiServer]:
    srv = ScpiServer("id120", mock)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def det(server: ScpiServer) -> IDQID120:
    instrument = IDQID120("dut", server.address, timeout=1.0, bias_max_v=220.0, **FAST)
    instrument.bias_voltage.step = 10.0
    instrument.bias_voltage.inter_delay = 0.0
    return instrument


def test_identity_and_role(det: IDQID120) -> None:
    idn = det.get_idn()
    assert (idn["vendor"], idn["model"]) == ("ID Quantique", "ID120")
    assert isinstance(det, SinglePhotonDetector)


@pytest.mark.parametrize(
    ("name", "value", "unit"),
    [
        ("threshold", 0.2345, "V"),
        ("dead_time", 200e-6, "s"),
        ("integration_time", 2.4, "s"),
        ("temperature_setpoint", -42.0, "°C"),
        ("running", True, ""),
    ],
)
def test_round_trip_with_units(det: IDQID120, name: str, value: object, unit: str) -> None:
    parameter = getattr(det, name)
    assert parameter.unit == unit
    parameter(value)
    assert parameter.get() == pytest.approx(value)


def test_bias_round_trip_and_readbacks(det: IDQID120, mock: MockID120) -> None:
    assert det.bias_voltage.unit == "V"
    det.bias_voltage(35.0)
    assert det.bias_voltage() == pytest.approx(35.0)
    assert mock.bias_v == pytest.approx(35.0)
    det.running(True)
    det.temperature_setpoint(-35.0)
    assert det.temperature() == pytest.approx(-35.0)
    assert det.temperature.unit == "°C"
    assert det.state() == "RUNNING"
    det.output2.polarity("negative")
    _sync(det)
    assert mock.polarity[2] == "NEGATIVE"
    assert det.outputs[1].polarity() == "negative"


def test_validators_leave_the_mock_untouched(det: IDQID120, mock: MockID120) -> None:
    det.bias_voltage(20.0)
    _sync(det)
    before = (list(mock.bias_setpoints_v), mock.threshold_uv, mock.dead_time_us)
    with pytest.raises(ValueError, match=r"between 0\.0 and 220\.0.*dut_bias_voltage"):
        det.bias_voltage(230.0)
    with pytest.raises(ValueError, match=r"dut_threshold"):
        det.threshold(-0.1)
    with pytest.raises(ValueError, match=r"dut_dead_time"):
        det.dead_time(10e-6)
    assert (mock.bias_setpoints_v, mock.threshold_uv, mock.dead_time_us) == before


def test_ramp_takes_bounded_steps_below_the_maximum(det: IDQID120, mock: MockID120) -> None:
    det.bias_voltage.step = 7.5
    det.bias_voltage(200.0)
    _sync(det)
    path = [0.0, *mock.bias_setpoints_v]
    steps = [abs(b - a) for a, b in itertools.pairwise(path)]
    assert len(steps) == math.ceil(200.0 / 7.5)
    assert max(steps) <= 7.5 + 1e-6
    assert max(path) <= det.bias_max_v
    assert path[-1] == pytest.approx(200.0)


def test_ramp_respects_inter_delay(det: IDQID120, mock: MockID120) -> None:
    det.bias_voltage.inter_delay = 0.02
    start = time.perf_counter()
    det.bias_voltage(50.0)
    assert time.perf_counter() - start >= 4 * 0.02
    _sync(det)
    assert len(mock.bias_setpoints_v) == 5


def test_safe_state_ramps_down_and_stops(det: IDQID120, mock: MockID120) -> None:
    det.enable()
    det.bias_voltage(190.0)
    _sync(det)
    mock.bias_setpoints_v.clear()
    det.safe_state()
    down = mock.bias_setpoints_v
    assert down[-1] == 0.0
    assert all(b < a for a, b in itertools.pairwise(down))
    assert max(a - b for a, b in itertools.pairwise([190.0, *down])) <= 10.0 + 1e-6
    assert mock.running is False
    det.safe_state()  # already safe: harmless
    det.enable()
    assert mock.running is True
    assert mock.bias_v == pytest.approx(190.0)


def test_error_queue_after_bad_commands(det: IDQID120, mock: MockID120) -> None:
    det.write("BIAS:VOLTAGES 5")
    _sync(det)
    assert mock.pop_error().startswith('-113,"Undefined header')
    det.write("BIAS:VOLTAGE 300000000")  # bypassing the driver's validator
    _sync(det)
    assert mock.pop_error().startswith('-222,"Data out of range')
    assert mock.bias_v == 0.0
    det.write("REG:RUN MAYBE")
    _sync(det)
    assert mock.pop_error().startswith("-224")
    mock.bias_fault = True
    with pytest.raises(IDQID120Error, match=r"dut: .*bias error"):
        det.check_errors()


def test_reconnect_after_a_dropped_link(det: IDQID120, server: ScpiServer, mock: MockID120) -> None:
    det.timeout(0.25)
    det.threshold(0.125)
    _sync(det)  # a write still in flight when the link drops is lost, as on a real cable
    server.faults.drop_connection(refuse_for_s=0.3)
    assert det.threshold() == pytest.approx(0.125)  # times out, reconnects, retries
    det.enable()
    det.bias_voltage(195.0)
    _sync(det)
    assert mock.bias_v == pytest.approx(195.0)
    server.faults.drop_connection(refuse_for_s=0.2)
    det.safe_state()  # recovers the link, and reads the safe state back
    assert (mock.bias_v, mock.running) == (0.0, False)


def test_timeout_names_instrument_and_command(det: IDQID120, server: ScpiServer) -> None:
    det.timeout(0.15)
    det.reconnect_timeout_s = 0.2
    server.faults.delay_replies(0.4)
    with pytest.raises(IDQID120CommunicationError, match=r"dut: no reply in time on 'REG:RUN\?'"):
        det.running()
    server.faults.clear()
    det.threshold(0.075)
    assert det.threshold() == pytest.approx(0.075)  # no late reply answers this query


def test_garbage_reply_names_instrument_and_command(det: IDQID120, server: ScpiServer) -> None:
    server.faults.send_garbage(1)
    with pytest.raises(IDQID120Error, match=r"dut: garbled reply to 'DEADTIME:TIME\?'"):
        det.dead_time()
    assert det.dead_time() == pytest.approx(40e-6)


# ---------------------------------------------------------------- 3. pyvisa-sim


def test_pyvisa_sim_model() -> None:
    det = IDQID120(
        "sim",
        "USB0::0x1DDC::0x0330::SIM0001::INSTR",
        pyvisa_sim_file="qkdlab.drivers.idquantique.sim:id120.yaml",
    )
    det.bias_voltage.step = 50.0
    det.bias_voltage.inter_delay = 0.0
    assert det.get_idn()["model"] == "ID120"
    det.bias_voltage(120.0)
    assert det.bias_voltage() == pytest.approx(120.0)
    det.threshold(0.3)
    assert det.threshold() == pytest.approx(0.3)
    det.dead_time(1e-3)
    assert det.dead_time() == pytest.approx(1e-3)
    det.enable()
    assert det.running() is True
    assert det.count_rates() == [1250.0]
    det.safe_state()
    assert det.bias_voltage() == 0.0
    assert det.running() is False


# ---------------------------------------------------------------- 4. physics through the mock


def _model_rate(bias_v: float, photons_cps: float, dead_time_s: float, temp_c: float) -> float:
    """The mock's documented model, recomputed independently: R / (1 + R τ)."""
    excess = max(0.0, bias_v - 180.0)
    efficiency = 0.8 * (1.0 - math.exp(-excess / 10.0))
    dark = 100.0 * (excess / 20.0) * 2.0 ** ((temp_c + 30.0) / 7.0)
    rate = efficiency * photons_cps + dark
    return rate / (1.0 + rate * dead_time_s)


def _within_poisson(measured_cps: float, expected_cps: float, window_s: float) -> bool:
    sigma = math.sqrt(max(expected_cps * window_s, 1.0)) / window_s
    return abs(measured_cps - expected_cps) <= 5.0 * sigma


def test_count_rate_rises_with_bias(det: IDQID120, mock: MockID120) -> None:
    mock.photon_rate_cps = 2e4
    det.integration_time(2.0)
    det.enable()
    rates = []
    for bias in (182.0, 186.0, 192.0, 205.0):
        det.bias_voltage(bias)
        measured = det.count_rates()[0]
        expected = _model_rate(bias, 2e4, 40e-6, -30.0)
        assert _within_poisson(measured, expected, 2.0), (bias, measured, expected)
        rates.append(measured)
    assert rates == sorted(rates)
    det.disable()
    assert det.count_rates() == [0.0]


def test_count_rate_saturates_with_dead_time(det: IDQID120, mock: MockID120) -> None:
    mock.photon_rate_cps = 2e6
    det.integration_time(1.0)
    det.enable()
    det.bias_voltage(200.0)
    for dead_time in (40e-6, 400e-6, 4e-3):
        det.dead_time(dead_time)
        measured = det.count_rate()
        expected = _model_rate(200.0, 2e6, dead_time, -30.0)
        assert expected < 1.0 / dead_time
        assert _within_poisson(measured, expected, 1.0), (dead_time, measured, expected)
        counts = det.counts()
        assert _within_poisson(counts / det.integration_time(), expected, 1.0)


@pytest.fixture
def bench_det() -> Iterator[tuple[IDQID120, Bench]]:
    bench = Bench(BenchConfig(), seed=7)
    bench.alice.attenuation_db += 20.0  # μ_signal 0.5 → 0.005: tens of kcps at full η
    mock = MockID120(bench, detector_index=0, seed=99)
    srv = ScpiServer("id120-bench", mock)
    srv.start()
    det = IDQID120("bench_dut", srv.address, timeout=1.0, **FAST)
    det.bias_voltage.step = 10.0
    det.bias_voltage.inter_delay = 0.0
    yield det, bench
    det.close()
    srv.stop()


def test_bench_rate_rises_with_bias(bench_det: tuple[IDQID120, Bench]) -> None:
    det, bench = bench_det
    det.integration_time(1.0)
    det.enable()
    rates = []
    for bias in (183.0, 188.0, 195.0, 210.0):
        det.bias_voltage(bias)
        measured = det.count_rates()[0]
        detector = bench.bob.detectors[0]
        assert detector.enabled
        assert detector.efficiency == pytest.approx(0.8 * (1 - math.exp(-(bias - 180.0) / 10)))
        true_rate = float(bench.expected_click_rates()[0])
        expected = true_rate / (1.0 + true_rate * 40e-6)
        assert _within_poisson(measured, expected, 1.0), (bias, measured, expected)
        rates.append(measured)
    assert rates == sorted(rates)
    det.disable()
    assert bench.bob.detectors[0].enabled is False
    assert det.count_rates() == [0.0]


def test_bench_rate_saturates_with_dead_time(bench_det: tuple[IDQID120, Bench]) -> None:
    det, bench = bench_det
    det.integration_time(1.0)
    det.enable()
    det.bias_voltage(210.0)
    _sync(det)
    true_rate = float(bench.expected_click_rates()[0])
    assert true_rate > 1e4
    for dead_time in (40e-6, 200e-6, 1e-3):
        det.dead_time(dead_time)
        measured = det.count_rate()
        assert bench.bob.detectors[0].dead_time_s == pytest.approx(dead_time)
        expected = true_rate / (1.0 + true_rate * dead_time)
        assert _within_poisson(measured, expected, 1.0), (dead_time, measured, expected)
