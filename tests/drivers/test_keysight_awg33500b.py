"""Keysight 33500B pattern source: wire bytes (with the binary block), mock, sim, physics."""

from __future__ import annotations

import logging
import math
import socket
import struct
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import pytest

from qkdlab.drivers.keysight.awg33500b import (
    MODELS,
    Keysight33500BCommunicationError,
    Keysight33500BError,
    Keysight33500BPattern,
    check_arb_name,
    plan_pattern,
)
from qkdlab.drivers.roles import PatternSource
from qkdlab.mock_instruments.keysight.awg33500b import (
    BlockFramer,
    BlockScpiServer,
    MockKeysight33500B,
    serve,
)
from qkdlab.mock_instruments.server import Connection, TcpServer

IDN = "Keysight Technologies,33522B,MY53400123,A.03.00-3.15-2.00-58-00"
FAST = {"visalib": "@py", "device_clear": False}  # skip the IVI library search and clear
Protocol = Callable[..., AbstractContextManager[Any]]
CONSTRUCTION = [("*IDN?", IDN), ("*OPT?", "0"), ("*IDN?", IDN)]


def _sync(awg: Keysight33500BPattern) -> None:
    """A query after writes: the mock has executed everything sent before it."""
    awg.ask("*OPC?")


# ---------------------------------------------------------------- 1. bytes on the wire


def test_construction_sends_idn_opt_idn(expected_protocol: Protocol,
                                        caplog: pytest.LogCaptureFixture) -> None:
    # with the default device clear: on a SOCKET resource it puts nothing on the wire
    with caplog.at_level(logging.WARNING), \
            expected_protocol(Keysight33500BPattern, CONSTRUCTION, visalib="@py") as awg:
        assert awg.model == "33522B"
        assert awg.memory_points == 1_048_576
        assert awg.options == ()
    assert "does not match the detected model" not in caplog.text


def test_option_mem_selects_large_memory(expected_protocol: Protocol) -> None:
    script = [("*IDN?", IDN), ("*OPT?", '"MEM,IQP"'), ("*IDN?", IDN)]
    with expected_protocol(Keysight33500BPattern, script, **FAST) as awg:
        assert awg.options == ("MEM", "IQP")
        assert awg.memory_points == 16_777_216


def test_unsupported_model_is_refused(expected_protocol: Protocol) -> None:
    no_arb = "Keysight Technologies,33510B,MY1,A.03"
    with pytest.raises(Keysight33500BError, match=r"dut: model 33510B is not supported"), \
            expected_protocol(Keysight33500BPattern, [("*IDN?", no_arb)], **FAST):
        pass


GETS = [
    ("function_type", "SOURce1:FUNCtion?", "ARB", "ARB"),
    ("frequency", "SOURce1:FREQuency?", "+1.000000000000000E+06", 1e6),
    ("amplitude", "SOURce1:VOLTage?", "+4.000000000000000E+00", 4.0),
    ("offset", "SOURce1:VOLTage:OFFSet?", "+2.000000000000000E+00", 2.0),
    ("output", "OUTPut1?", "1", "ON"),
    ("load", "OUTPut1:LOAD?", "+9.900000000000000E+37", math.inf),
    ("arb_sample_rate", "SOURce1:FUNCtion:ARBitrary:SRATe?", "+1.000000000000000E+08", 1e8),
    ("arb_filter", "SOURce1:FUNCtion:ARBitrary:FILTer?", "STEP", "STEP"),
    ("arb_name", "SOURce1:FUNCtion:ARBitrary?", '"QKDPAT"', "QKDPAT"),
    ("free_points", "SOURce1:DATA:VOLatile:FREE?", "1048568", 1048568),
    ("voltage_limit_high", "SOURce1:VOLTage:LIMit:HIGH?", "+5.0E+00", 5.0),
    ("voltage_limit_enabled", "SOURce1:VOLTage:LIMit:STATe?", "1", True),
]


def test_get_exact_bytes(expected_protocol: Protocol) -> None:
    script = [*CONSTRUCTION, *((command, reply) for _, command, reply, _ in GETS)]
    with expected_protocol(Keysight33500BPattern, script, **FAST) as awg:
        for name, _, _, value in GETS:
            got = awg.ch1.parameters[name]()
            assert got == pytest.approx(value) if isinstance(value, float) else got == value


SETS = [
    ("load", math.inf, "OUTPut2:LOAD INF"),
    ("load", 75.0, "OUTPut2:LOAD 75"),
    ("arb_sample_rate", 1.25e8, "SOURce2:FUNCtion:ARBitrary:SRATe 125000000"),
    ("arb_filter", "OFF", "SOURce2:FUNCtion:ARBitrary:FILTer OFF"),
    ("voltage_limit_low", -2.5, "SOURce2:VOLTage:LIMit:LOW -2.5"),
    ("voltage_limit_enabled", False, "SOURce2:VOLTage:LIMit:STATe 0"),
]


def test_set_exact_bytes(expected_protocol: Protocol) -> None:
    script = [*CONSTRUCTION, *((command, None) for _, _, command in SETS), ("*OPC?", "1")]
    with expected_protocol(Keysight33500BPattern, script, **FAST) as awg:
        for name, value, _ in SETS:
            awg.ch2.parameters[name](value)
        _sync(awg)  # the scripted peer has read every write once it answered this


class RawScriptServer(TcpServer):
    """Expects exact byte strings in order (binary blocks included) and replies as listed."""

    def __init__(self, script: Sequence[tuple[bytes, bytes | None]]) -> None:
        super().__init__("raw-script")
        self.script = list(script)
        self.position = 0
        self.mismatch: str | None = None

    @property
    def address(self) -> str:
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    def serve(self, conn: Connection) -> None:
        buffer = b""
        while self.mismatch is None:
            data = conn.recv()
            if data is None:
                return
            buffer += data
            while self.position < len(self.script):
                expected, reply = self.script[self.position]
                if not expected.startswith(buffer[: len(expected)]):
                    self.mismatch = f"exchange {self.position}: expected {expected!r}, got " \
                                    f"{buffer[: len(expected)]!r}"
                    return
                if len(buffer) < len(expected):
                    break
                buffer = buffer[len(expected):]
                self.position += 1
                if reply is not None:
                    conn.send(reply + b"\n")
            if self.position == len(self.script) and buffer:
                self.mismatch = f"unexpected extra bytes {buffer!r}"

    def check_complete(self) -> None:
        assert self.mismatch is None, self.mismatch
        assert self.position == len(self.script), (
            f"stopped after {self.position} of {len(self.script)}: next "
            f"{self.script[self.position][0]!r}")


def _lines(*commands: str) -> list[tuple[bytes, bytes | None]]:
    return [(c.encode() + b"\n", None) for c in commands]


def test_load_pattern_exact_bytes_with_binary_block() -> None:
    # Levels chosen so that the block holds 0x0A bytes (code 10 = 00 0A): framing must
    # rely on the block length, never on the newline.
    levels = [-1.0, 10 / 32767, 1.0]
    symbols = bytes([0, 1, 2, 1, 0, 2, 1, 1])
    codes = [-32767, 10, 32767, 10, -32767, 32767, 10, 10]
    block = struct.pack(">8h", *codes)
    assert b"\n" in block
    script = [
        (b"*IDN?\n", IDN.encode()), (b"*OPT?\n", b"0"), (b"*IDN?\n", IDN.encode()),
        *_lines("OUTPut1 OFF", "SOURce1:VOLTage:LIMit:STATe OFF",
                "SOURce1:DATA:VOLatile:CLEar", "FORMat:BORDer NORMal"),
        (b"SOURce1:DATA:ARBitrary:DAC QKDPAT,#216" + block + b"\n", None),
        *_lines("SOURce1:FUNCtion:ARBitrary QKDPAT", "SOURce1:FUNCtion ARB",
                "SOURce1:FUNCtion:ARBitrary:FILTer STEP",
                "SOURce1:FUNCtion:ARBitrary:SRATe 1000000", "OUTPut1:LOAD 50",
                "SOURce1:VOLTage:UNIT VPP", "SOURce1:VOLTage:OFFSet 0", "SOURce1:VOLTage 2",
                "SOURce1:VOLTage:OFFSet 0", "SOURce1:VOLTage:LIMit:HIGH 5",
                "SOURce1:VOLTage:LIMit:LOW -5", "SOURce1:VOLTage:LIMit:STATe ON"),
        (b"SYSTem:ERRor?\n", b'+0,"No error"'),
        (b"OUTPut1 1\n", None),  # run()
        (b"OUTPut1?\n", b"1"),
        (b"OUTPut1 0\n", None),  # safe_state(): both outputs off, each read back
        (b"OUTPut1?\n", b"0"),
        (b"OUTPut2 0\n", None),
        (b"OUTPut2?\n", b"0"),
        (b"OUTPut2?\n", b"0"),
    ]
    server = RawScriptServer(script)
    server.start()
    try:
        awg = Keysight33500BPattern("dut", server.address, **FAST)
        awg.load_pattern(levels, symbols, 1e6)
        assert awg.pattern is not None
        assert awg.pattern.codes.tolist() == codes
        awg.run()
        awg.safe_state()
        assert awg.ch2.output() == "OFF"
        awg.close()
        server.check_complete()
    finally:
        server.stop()


# ---------------------------------------------------------------- 2. plan (pure checks)


def test_plan_maps_levels_to_codes_and_back() -> None:
    spec = MODELS["33522B"]
    plan = plan_pattern([0.0, 2.83, 4.0], bytes([0, 1, 2, 2, 1, 0, 0, 1]), 100e6,
                        spec=spec, max_points=spec.standard_points)
    assert (plan.amplitude_vpp, plan.offset_v) == (4.0, 2.0)
    assert plan.level_codes.tolist() == [-32767, 13598, 32767]
    assert np.allclose(plan.level_voltages(), [0.0, 2.83, 4.0], atol=4.0 / 65534)
    assert plan.sample_rate_hz == 100e6
    assert (plan.samples_per_symbol, plan.repeats, plan.n_points) == (1, 1, 8)


def test_plan_repeats_short_patterns_and_oversamples_with_normal_filter() -> None:
    spec = MODELS["33522B"]
    short = plan_pattern([0.0, 1.0], bytes([0, 1, 1]), 1e6, spec=spec, max_points=1000)
    assert (short.repeats, short.n_points) == (3, 9)
    assert short.codes.tolist() == [-32767, 32767, 32767] * 3
    normal = plan_pattern([0.0, 1.0], bytes([0, 1] * 4), 100e6, spec=spec, max_points=1000,
                          arb_filter="NORMAL")
    assert normal.samples_per_symbol == 2  # 2 × 100 MHz ≤ 250 MSa/s
    assert normal.sample_rate_hz == 200e6
    assert normal.codes.tolist()[:4] == [-32767, -32767, 32767, 32767]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels_v": [0.0, 1.0, 5.5]}, r"reach 5\.5 V; allowed \|V\| ≤ 5 V"),
        ({"levels_v": [0.0, 1.0, 4.5], "max_drive_v": 4.0}, r"max_drive_v 4 V"),
        ({"levels_v": [0.0, 1.0, 9.0], "load_ohm": math.inf, "max_drive_v": 8.0}, r"≤ 8 V"),
        ({"levels_v": [0.0, 1.0, math.nan]}, r"finite"),
        ({"symbols": bytes([0, 3])}, r"index levels_v \(0…2\), got 0…3"),
        ({"symbols": b""}, r"symbols is empty"),
        ({"rate_hz": 300e6}, r"3e\+08 Sa/s .* exceeds 2\.5e\+08 Sa/s \(filter STEP\)"),
        ({"rate_hz": 100e6, "arb_filter": "OFF"}, r"exceeds 6\.25e\+07 Sa/s \(filter OFF\)"),
        ({"rate_hz": 0.0}, r"rate_hz must be a positive number"),
        ({"samples_per_symbol": 0}, r"samples_per_symbol must be an integer ≥ 1"),
        ({"max_points": 7}, r"needs 9 points .* at most 7"),
        ({"arb_filter": "SMOOTH"}, r"arb_filter 'SMOOTH'"),
    ],
)
def test_plan_refuses(kwargs: dict[str, Any], message: str) -> None:
    spec = MODELS["33522B"]
    args: dict[str, Any] = {"levels_v": [0.0, 1.0, 2.0], "symbols": bytes([0, 1, 2] * 3),
                            "rate_hz": 1e6, "spec": spec, "max_points": 1_048_576}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        plan_pattern(**args)


def test_plan_off_filter_refused_where_limit_unknown() -> None:
    spec = MODELS["33622A"]
    with pytest.raises(ValueError, match=r"FILT OFF sample-rate limit .* not known"):
        plan_pattern([0.0, 1.0], bytes([0, 1] * 16), 1e6, spec=spec, max_points=10_000,
                     arb_filter="OFF")


@pytest.mark.parametrize("name", ["QKDPAT", "a", "Pattern_0001"])
def test_arb_names_accepted(name: str) -> None:
    assert check_arb_name(name) == name


@pytest.mark.parametrize("name", ["", "1PAT", "PATTERN_00001", "PAT-1", "PAT 1"])
def test_arb_names_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"1 to 12 characters"):
        check_arb_name(name)


# ---------------------------------------------------------------- 3. the block framer


def test_framer_block_with_newlines_split_at_every_byte() -> None:
    payload = bytes(range(256))
    stream = (b'SOUR1:DATA:ARB:DAC A,#3256' + payload + b'\nMMEM:STOR:DATA1 "INT:\\#1.arb"\n'
              b"*IDN?\r\n")
    framer = BlockFramer()
    messages: list[tuple[str, list[bytes]]] = []
    for i in range(len(stream)):
        messages += framer.feed(stream[i : i + 1])
    assert messages == [
        ("SOUR1:DATA:ARB:DAC A,\x000", [payload]),
        ('MMEM:STOR:DATA1 "INT:\\#1.arb"', []),  # '#' inside a string is text
        ("*IDN?", []),
    ]


def test_framer_non_block_hash_and_empty_block() -> None:
    framer = BlockFramer()
    assert framer.feed(b"SOUR1:VOLT #H1F\nDATA:ARB:DAC B,#10\n") == [
        ("SOUR1:VOLT #H1F", []),
        ("DATA:ARB:DAC B,\x000", [b""]),
    ]


# ---------------------------------------------------------------- 4. through the mock


@pytest.fixture
def bench() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        alice=types.SimpleNamespace(drive_v=(0.0, 2.83, 4.0)), lock=threading.Lock()
    )


@pytest.fixture
def server(bench: types.SimpleNamespace) -> Iterator[BlockScpiServer]:
    srv = serve("awg", bench, {})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def mock(server: BlockScpiServer) -> MockKeysight33500B:
    instrument = server.instrument
    assert isinstance(instrument, MockKeysight33500B)
    return instrument


@pytest.fixture
def awg(server: BlockScpiServer) -> Keysight33500BPattern:
    return Keysight33500BPattern("awg", server.address, timeout=1.0, **FAST)


RNG_SYMBOLS = bytes(np.random.default_rng(7).integers(0, 3, 4096).astype(np.uint8))
LEVELS = [0.0, 2.83, 4.0]


def test_identity_and_role(awg: Keysight33500BPattern) -> None:
    idn = awg.get_idn()
    assert (idn["vendor"], idn["model"]) == ("Keysight Technologies", "33522B")
    assert isinstance(awg, PatternSource)


BASE_ROUND_TRIPS = [
    ("function_type", "SQU", ""),
    ("frequency_mode", "CW", ""),
    ("frequency", 2.5e6, "Hz"),
    ("phase", 90.0, "deg"),
    ("amplitude_unit", "VPP", ""),
    ("amplitude", 1.5, ""),
    ("offset", -0.25, "V"),
    ("output", "ON", ""),
    ("ramp_symmetry", 25.0, "%"),
    ("pulse_width", 2e-6, "S"),
    ("trigger_source", "BUS", ""),
    ("trigger_slope", "NEG", ""),
    ("trigger_count", 12, ""),
    ("trigger_delay", 0.5, "s"),
    ("trigger_timer", 0.02, ""),
    ("output_polarity", "INV", ""),
    ("burst_state", "ON", ""),
    ("burst_mode", "Gated", ""),
    ("burst_ncycles", 5, ""),
    ("burst_phase", -90.0, "degrees"),
    ("burst_polarity", "INV", ""),
    ("burst_int_period", 0.25, "s"),
    ("load", 1000.0, "Ω"),
    ("arb_sample_rate", 12.5e6, "Hz"),
    ("arb_filter", "STEP", ""),
    ("voltage_limit_high", 3.0, "V"),
    ("voltage_limit_low", -3.0, "V"),
    ("voltage_limit_enabled", True, ""),
]


def test_parameter_round_trip_through_the_mock(awg: Keysight33500BPattern) -> None:
    for name, value, unit in BASE_ROUND_TRIPS:
        for channel in (awg.ch1, awg.ch2):
            parameter = channel.parameters[name]
            assert parameter.unit == unit, name
            parameter(value)
            got = parameter.get()
            assert got == pytest.approx(value) if isinstance(value, float) else got == value
    assert awg.read_errors() == []


def test_sync_channel_and_functions(awg: Keysight33500BPattern, mock: MockKeysight33500B) -> None:
    awg.sync.output("OFF")
    awg.sync.source(2)
    assert (awg.sync.output(), awg.sync.source()) == ("OFF", 2)
    awg.force_trigger()
    awg.sync_channel_phases()
    _sync(awg)
    assert mock.triggers == 1
    assert awg.read_errors() == []


def test_load_pattern_through_the_mock(awg: Keysight33500BPattern,
                                       mock: MockKeysight33500B) -> None:
    awg.load_pattern(LEVELS, RNG_SYMBOLS, 100e6)
    assert awg.catalog() == ["INT:\\BUILTIN\\EXP_RISE.ARB", "QKDPAT"]
    assert awg.ch1.arb_name() == "QKDPAT"
    assert awg.ch1.function_type() == "ARB"
    assert awg.ch1.arb_sample_rate() == pytest.approx(100e6)
    assert awg.ch1.arb_filter() == "STEP"
    assert (awg.ch1.amplitude(), awg.ch1.offset(), awg.ch1.load()) == (4.0, 2.0, 50.0)
    assert awg.ch1.voltage_limit_enabled() is True
    assert awg.ch1.free_points() == mock.memory_points - len(RNG_SYMBOLS)
    assert awg.ch1.output() == "OFF"
    assert mock.byte_order == "NORM"
    played = mock.waveform_v()  # every symbol at its level, within one DAC step
    expected = np.asarray(LEVELS)[np.frombuffer(RNG_SYMBOLS, np.uint8)]
    assert np.max(np.abs(played - expected)) < 4.0 / 65534
    # reloading replaces the pattern (the volatile memory is cleared first)
    awg.load_pattern([1.0, 3.0], bytes([0, 1] * 8), 10e6)
    assert awg.catalog() == ["INT:\\BUILTIN\\EXP_RISE.ARB", "QKDPAT"]
    assert mock.waveform_v().tolist() == [1.0, 3.0] * 8


def test_store_pattern(awg: Keysight33500BPattern, mock: MockKeysight33500B) -> None:
    awg.load_pattern(LEVELS, RNG_SYMBOLS[:64], 1e6)
    assert awg.store_pattern() == "INT:\\QKDPAT.arb"
    assert awg.pattern is not None
    assert mock.files["INT:\\QKDPAT.arb"].tolist() == awg.pattern.codes.tolist()
    with pytest.raises(ValueError, match=r"must end in \.arb"):
        awg.store_pattern("INT:\\x.txt")


def test_mock_honours_swapped_byte_order(server: BlockScpiServer,
                                         mock: MockKeysight33500B) -> None:
    with socket.create_connection((server.host, server.port), timeout=2) as sock:
        block = struct.pack("<4h", -32767, 10, 2570, 32767)  # 10 = 0x000A, 2570 = 0x0A0A
        sock.sendall(b"FORM:BORD SWAP\nDATA:ARB:DAC SW,#18" + block + b"\nSYST:ERR?\n")
        assert sock.recv(100) == b'-222,"Data out of range; 4 points, at least 8 needed"\n'
    # 4 points < the 8-point minimum: refused, and the framing stayed in step
    assert "SW" not in mock.channels[1].volatile
    with socket.create_connection((server.host, server.port), timeout=2) as sock:
        sock.sendall(b"DATA:ARB:DAC SW,#216" + block * 2 + b"\nDATA:VOL:CAT?\n")
        assert sock.recv(200) == b'"INT:\\BUILTIN\\EXP_RISE.ARB","SW"\n'
    assert mock.channels[1].volatile["SW"].tolist() == [-32767, 10, 2570, 32767] * 2


def test_validators_write_nothing(awg: Keysight33500BPattern, mock: MockKeysight33500B) -> None:
    awg.load_pattern(LEVELS, RNG_SYMBOLS[:16], 1e6)
    seen: list[str] = []
    original = mock.handle_message

    def spy(message: str) -> str | None:
        seen.append(message)
        return original(message)

    mock.handle_message = spy
    before = (dict(mock.channels[1].volatile), mock.channels[1].amplitude_vpp)
    with pytest.raises(ValueError, match=r"awg\.load_pattern: levels_v reach 5\.2 V"):
        awg.load_pattern([0.0, 1.0, 5.2], RNG_SYMBOLS, 1e6)
    with pytest.raises(ValueError, match=r"awg\.load_pattern: .*exceeds 2\.5e\+08 Sa/s"):
        awg.load_pattern(LEVELS, RNG_SYMBOLS, 251e6)
    with pytest.raises(ValueError, match=r"awg\.load_pattern: symbol values must index"):
        awg.load_pattern(LEVELS[:2], RNG_SYMBOLS, 1e6)
    with pytest.raises(ValueError, match=r"between -5\.0 and 5\.0.*awg_ch1_offset"):
        awg.ch1.offset(5.5)
    with pytest.raises(ValueError, match=r"awg_ch1_amplitude"):
        awg.ch1.amplitude(10.5)
    assert seen == []
    assert (dict(mock.channels[1].volatile), mock.channels[1].amplitude_vpp) == before
    awg.ch1.offset(0.5)  # the spy does see what gets through
    _sync(awg)
    assert seen == ["SOURce1:VOLTage:OFFSet 0.5", "*OPC?"]


def test_hard_limit_max_drive(server: BlockScpiServer, mock: MockKeysight33500B) -> None:
    awg = Keysight33500BPattern("awg", server.address, max_drive_v=3.0, **FAST)
    with pytest.raises(ValueError, match=r"allowed \|V\| ≤ 3 V"):
        awg.load_pattern([0.0, 3.5], bytes([0, 1] * 4), 1e6)
    awg.load_pattern([0.0, 3.0], bytes([0, 1] * 4), 1e6)
    assert (awg.ch1.voltage_limit_high(), awg.ch1.voltage_limit_low()) == (3.0, -3.0)
    # the instrument itself now refuses to leave ±3 V, whoever asks
    awg.write("SOURce1:VOLTage 6.5")
    assert awg.read_errors() == [(-221, "Settings conflict; outside the armed voltage limits")]
    assert mock.channels[1].amplitude_vpp == 3.0
    with pytest.raises(ValueError, match=r"awg2: max_drive_v=6\.0 V must be in \(0, 5\] V"):
        Keysight33500BPattern("awg2", server.address, max_drive_v=6.0, **FAST)


def test_amplitude_only_in_vpp_on_the_modulator_channel(awg: Keysight33500BPattern) -> None:
    awg.ch1.amplitude_unit("VRMS")
    with pytest.raises(ValueError, match=r"only set in VPP"):
        awg.ch1.amplitude(1.0)
    awg.ch2.amplitude_unit("VRMS")
    awg.ch2.amplitude(1.0)  # the other channel is the base driver's, unrestricted


def test_run_requires_a_pattern_and_reset_forgets_it(awg: Keysight33500BPattern,
                                                     mock: MockKeysight33500B) -> None:
    with pytest.raises(Keysight33500BError, match=r"awg\.run: no pattern loaded"):
        awg.run()
    awg.load_pattern(LEVELS, RNG_SYMBOLS[:32], 1e6)
    awg.run()
    assert awg.ch1.output() == "ON"
    awg.reset()
    assert awg.ch1.output() == "OFF"
    assert (awg.ch1.function_type(), awg.ch1.arb_name()) == ("SIN", "INT:\\BUILTIN\\EXP_RISE.ARB")
    with pytest.raises(Keysight33500BError, match=r"no pattern loaded"):
        awg.run()
    awg.safe_state()
    awg.safe_state()  # already safe: harmless
    assert not mock.channels[1].output
    assert not mock.channels[2].output


def test_instrument_errors_are_raised(server: BlockScpiServer) -> None:
    # the driver believes in option MEM, the instrument has 1 M points: upload refused
    awg = Keysight33500BPattern("awg", server.address, memory_points=2_000_000, **FAST)
    symbols = bytes(1_100_000)
    with pytest.raises(Keysight33500BError,
                       match=r"awg: instrument errors after load_pattern: -200,.*only 1048576"):
        awg.load_pattern([0.0, 1.0], symbols, 1e6)
    assert awg.pattern is None
    awg.write("SOURce1:BOGUS 1")
    with pytest.raises(Keysight33500BError, match=r"-113,.Undefined header"):
        awg.check_errors()
    assert awg.read_errors() == []


def test_reconnect_after_a_dropped_link(awg: Keysight33500BPattern,
                                        server: BlockScpiServer) -> None:
    awg.timeout(0.3)  # pyvisa-py sees a closed peer only as a read timeout
    awg.ch1.frequency(3e6)
    # writes are not acknowledged: a write still in the socket buffer when the link
    # drops is lost, as on a real cable, so wait until the mock has executed it
    assert awg.ask("*OPC?") == "1"
    server.faults.drop_connection(refuse_for_s=0.2)
    assert awg.ch1.frequency() == pytest.approx(3e6)  # reconnects and retries
    server.faults.drop_connection(refuse_for_s=0.1)
    awg.load_pattern(LEVELS, RNG_SYMBOLS[:64], 1e6)  # the upload survives a fresh link
    assert awg.catalog()[-1] == "QKDPAT"


def test_timeout_names_instrument_and_command(awg: Keysight33500BPattern,
                                              server: BlockScpiServer) -> None:
    awg.timeout(0.2)
    awg.reconnect_timeout_s = 0.3
    server.faults.delay_replies(0.6)
    with pytest.raises(Keysight33500BCommunicationError,
                       match=r"awg: no reply in time on 'SOURce1:FREQuency\?'"):
        awg.ch1.frequency()
    server.faults.clear()
    awg.ch1.frequency(4e6)
    assert awg.ch1.frequency() == pytest.approx(4e6)  # no late reply answers this


def test_garbage_reply_names_instrument_and_command(awg: Keysight33500BPattern,
                                                    server: BlockScpiServer) -> None:
    server.faults.send_garbage(1)
    with pytest.raises(Keysight33500BError, match=r"awg: garbled reply to 'OUTPut1:LOAD\?'"):
        awg.ch1.load()
    assert awg.ch1.load() == 50.0


def test_serve_options() -> None:
    srv = serve("awg", None, {"model": "33512b", "options": "MEM", "channel": "2",
                              "load_ohm": "inf"})
    instrument = srv.instrument
    assert isinstance(instrument, MockKeysight33500B)
    assert (instrument.model, instrument.memory_points, instrument.pattern_channel) == (
        "33512B", 16_777_216, 2)
    assert math.isinf(instrument.actual_load_ohm)
    srv.stop()
    with pytest.raises(ValueError, match=r"unknown 33500B mock option\(s\): colour"):
        serve("awg", None, {"colour": "red"})


def test_33512b_sample_rate_limit(bench: types.SimpleNamespace) -> None:
    srv = serve("awg", bench, {"model": "33512B"})
    srv.start()
    try:
        awg = Keysight33500BPattern("awg", srv.address, **FAST)
        assert awg.spec.max_sample_rate_hz == 160e6
        with pytest.raises(ValueError, match=r"exceeds 1\.6e\+08 Sa/s"):
            awg.load_pattern(LEVELS, RNG_SYMBOLS, 200e6)
        awg.load_pattern(LEVELS, RNG_SYMBOLS, 160e6)
        assert awg.ch1.arb_sample_rate() == pytest.approx(160e6)
    finally:
        srv.stop()


# ---------------------------------------------------------------- 5. physics: the bench


def test_bench_drive_follows_the_pattern(awg: Keysight33500BPattern, mock: MockKeysight33500B,
                                         bench: types.SimpleNamespace) -> None:
    awg.load_pattern([0.5, 2.5, 3.8], RNG_SYMBOLS, 100e6)
    _sync(awg)
    assert bench.alice.drive_v == (0.0, 2.83, 4.0)  # untouched until the output goes on
    awg.run()
    _sync(awg)
    assert bench.alice.drive_v == pytest.approx((0.5, 2.5, 3.8), abs=3.3 / 65534)
    awg.ch1.output_polarity("INV")  # mirrored about the offset: 2.15 ± ...
    _sync(awg)
    assert bench.alice.drive_v == pytest.approx((0.5, 1.8, 3.8), abs=3.3 / 65534)
    awg.ch1.output_polarity("NORM")
    awg.stop()
    _sync(awg)
    assert bench.alice.drive_v == (0.0, 0.0, 0.0)  # no drive: every pulse at full light
    assert len(mock.bench_pushes) == 4


def test_bench_two_levels_and_non_arb_function(awg: Keysight33500BPattern,
                                               bench: types.SimpleNamespace) -> None:
    awg.load_pattern([0.0, 4.0], bytes([0, 1] * 8), 100e6)
    awg.run()
    _sync(awg)
    assert bench.alice.drive_v == (0.0, 4.0, 4.0)  # two levels: decoy shares vacuum's
    awg.ch1.function_type("DC")
    _sync(awg)
    assert bench.alice.drive_v == (2.0, 2.0, 2.0)  # a DC level: the offset for all


def test_load_mismatch_halves_the_drive(bench: types.SimpleNamespace) -> None:
    # the driver is told "high Z", the modulator is really a 50 Ω load
    srv = serve("awg", bench, {"load_ohm": "50"})
    srv.start()
    try:
        awg = Keysight33500BPattern("awg", srv.address, load_ohm=math.inf, max_drive_v=8.0,
                                    **FAST)
        awg.load_pattern([0.0, 2.0, 8.0], RNG_SYMBOLS[:64], 1e6)
        awg.run()
        _sync(awg)
        assert awg.ch1.load() == math.inf
        assert bench.alice.drive_v == pytest.approx((0.0, 1.0, 4.0), abs=1e-3)
    finally:
        srv.stop()


# ---------------------------------------------------------------- 6. pyvisa-sim


def test_pyvisa_sim_model() -> None:
    awg = Keysight33500BPattern(
        "sim",
        "USB0::0x0957::0x2507::MY00000001::INSTR",
        pyvisa_sim_file="qkdlab.drivers.keysight.sim:awg33500b.yaml",
    )
    assert awg.get_idn()["model"] == "33522B"
    assert awg.memory_points == 1_048_576
    awg.ch1.frequency(2e6)
    assert awg.ch1.frequency() == pytest.approx(2e6)
    awg.ch2.load(math.inf)
    assert awg.ch2.load() == math.inf
    awg.ch1.arb_sample_rate(1e8)
    assert awg.ch1.arb_sample_rate() == pytest.approx(1e8)
    awg.ch1.output("ON")
    awg.safe_state()
    assert (awg.ch1.output(), awg.ch2.output()) == ("OFF", "OFF")
    assert awg.catalog() == ["INT:\\BUILTIN\\EXP_RISE.ARB"]
    awg.write("SOURce1:FREQuency 9e9")  # outside the sim's range: queued error
    assert awg.read_errors() == [(-100, "Command error")]


def test_a_pattern_after_an_unrecovered_failure_is_uploaded_once(
        awg: Keysight33500BPattern, server: BlockScpiServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    awg.timeout(0.3)
    awg.reconnect_timeout_s = 0.1
    server.faults.drop_connection(refuse_for_s=0.6)
    with pytest.raises(Keysight33500BCommunicationError, match="could not reconnect"):
        awg.ch1.frequency()  # the link stays down longer than the driver waits
    server.faults.clear()
    sends: list[int] = []
    real_send = awg._send_pattern

    def counted(*args: Any) -> None:
        sends.append(1)
        real_send(*args)

    monkeypatch.setattr(awg, "_send_pattern", counted)
    awg.reconnect_timeout_s = 3.0
    awg.load_pattern(LEVELS, RNG_SYMBOLS[:64], 1e6)
    # the new link was proven before the upload: not mistaken for a drop during it
    assert len(sends) == 1
    assert awg.catalog()[-1] == "QKDPAT"


def test_an_error_queue_read_across_a_reconnect_says_an_entry_may_be_lost(
        awg: Keysight33500BPattern, server: BlockScpiServer) -> None:
    awg.timeout(0.3)
    awg.write("SOURce1:BOGUS 1")  # queues -113, "Undefined header"
    assert awg.ask("*OPC?") == "1"
    server.faults.drop_connection(refuse_for_s=0.1)
    with pytest.raises(Keysight33500BCommunicationError,
                       match=r"error queue was read; an entry may have been lost"):
        awg.read_errors()
