"""OIF-ITLA laser: frames and BIP-4, exact bytes on the wire, the mock over socket://, faults."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdlab.drivers.oif.frames import (
    ChecksumError,
    NopError,
    NopStatus,
    Register,
    Request,
    Response,
    Status,
    StatusBit,
    bip4,
    checksum_ok,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    frequency_hz,
    from_u16,
    split_frequency,
    to_u16,
)
from qkdlab.drivers.oif.itla import (
    OIFITLA,
    OIFITLAChecksumError,
    OIFITLACommunicationError,
    OIFITLAError,
    OIFITLAExecutionError,
    OIFITLAPendingTimeoutError,
    OIFITLATimeoutError,
)
from qkdlab.drivers.roles import Laser
from qkdlab.mock_instruments.oif.itla import MockITLA, serve
from qkdlab.mock_instruments.server import Connection, SerialSocketServer, TcpServer

C = 299_792_458.0


def _nibble_parity(frame: bytes) -> int:
    """Independent oracle: XOR of all eight nibbles; 0 for a frame with a good BIP-4."""
    parity = 0
    for byte in frame:
        parity ^= (byte >> 4) ^ (byte & 0xF)
    return parity


# ---------------------------------------------------------------- 1. frames and BIP-4
# The MSA text available here has no worked checksum example; these frames are
# computed by hand (nibble XOR): e.g. ResEna write SENA: low nibble of byte 0 = 1
# (write), 0x32, 0x00, 0x08 → 1^3^2^0^0^0^8 = 8 → 0x81 0x32 0x00 0x08.
HAND_FRAMES = [
    # (register, data, write, expected bytes)
    (0x00, 0x0000, False, "00000000"),  # NOP read
    (0x32, 0x0008, True, "81320008"),  # ResEna ← SENA
    (0x31, 0x02BB, True, "113102bb"),  # PWR ← 6.99 dBm
    (0x04, 0x0000, False, "40040000"),  # SerNo read
    (0x50, 0x0000, False, "50500000"),  # OPSL read
    (0x35, 0x00C0, True, "b13500c0"),  # FCF1 ← 192 THz
]


@pytest.mark.parametrize(("register", "data", "write", "expected"), HAND_FRAMES)
def test_request_encoding_matches_hand_computed_frames(
    register: int, data: int, write: bool, expected: str
) -> None:
    frame = encode_request(register, data, write)
    assert frame.hex() == expected
    assert _nibble_parity(frame) == 0
    assert decode_request(frame) == Request(register, data, write)


def test_response_fields_and_hand_computed_checksums() -> None:
    # CP reply to the SENA write: status 3 in bits 25:24, checksum 0xA
    assert encode_response(0x32, 0x0008, Status.CP).hex() == "a3320008"
    # CE flag (bit 27), XE status
    assert encode_response(0x31, 0, comm_error=True).hex() == "a8310000"
    assert encode_response(0x35, 0, Status.XE).hex() == "71350000"
    response = decode_response(bytes.fromhex("c042fc18"))  # OOP = −10.00 dBm
    assert response == Response(0x42, 0xFC18, Status.OK, False)
    assert response.signed() == -1000
    # LstRsp sits in bit 27 of the host packet
    assert encode_request(0x31, last_response=True).hex() == "a8310000"


def test_nop_fields() -> None:
    nop = NopStatus.from_data(0x0319)
    assert (nop.pending, nop.ready, nop.error) == (0x03, True, NopError.CIE)


def test_frequency_and_signed_helpers() -> None:
    assert frequency_hz(193, 4125) == pytest.approx(193.4125e12)
    assert split_frequency(193.4125e12) == (193, 4125)
    assert split_frequency(193.99996e12) == (194, 0)  # rounds into the next THz
    assert to_u16(-100) == 0xFF9C
    assert from_u16(0xFF9C) == -100
    with pytest.raises(ValueError, match="signed 16-bit"):
        to_u16(40000)


requests = st.builds(
    Request,
    register=st.integers(0, 0xFF),
    data=st.integers(0, 0xFFFF),
    write=st.booleans(),
    last_response=st.booleans(),
)
responses = st.builds(
    Response,
    register=st.integers(0, 0xFF),
    data=st.integers(0, 0xFFFF),
    status=st.sampled_from(Status),
    comm_error=st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(requests)
def test_request_round_trip(req: Request) -> None:
    frame = req.encode()
    assert len(frame) == 4
    assert _nibble_parity(frame) == 0
    assert decode_request(frame) == req


@settings(max_examples=60, deadline=None)
@given(responses)
def test_response_round_trip(response: Response) -> None:
    assert decode_response(response.encode()) == response


@settings(max_examples=60, deadline=None)
@given(responses, st.integers(0, 31))
def test_every_single_bit_flip_is_caught(response: Response, bit: int) -> None:
    frame = bytearray(response.encode())
    frame[bit // 8] ^= 0x80 >> (bit % 8)
    assert not checksum_ok(bytes(frame))
    with pytest.raises(ChecksumError):
        decode_response(bytes(frame))


@settings(max_examples=60, deadline=None)
@given(requests, st.integers(0, 3), st.integers(0, 7), st.integers(1, 7))
def test_bip4_misses_two_flips_in_the_same_bit_lane(
    req: Request, lane: int, nibble: int, offset: int
) -> None:
    """The documented limit of BIP-4: flips in the same position of two nibbles cancel."""
    word = int.from_bytes(req.encode(), "big")
    other = (nibble + offset) % 8
    word ^= (1 << (4 * nibble + lane)) | (1 << (4 * other + lane))
    assert checksum_ok(word.to_bytes(4, "big"))


def test_bip4_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        bip4(b"\x00\x00\x00")


# ---------------------------------------------------------------- 2. exact bytes on the wire
class ScriptedSerialPeer(TcpServer):
    """Expects exactly ``script`` (hex request frames) and answers the listed hex replies."""

    def __init__(self, script: Sequence[tuple[str, str | None]]) -> None:
        super().__init__("scripted-itla")
        self.script = [
            (bytes.fromhex(req), bytes.fromhex(rep) if rep else None) for req, rep in script
        ]
        self.position = 0
        self.mismatch: str | None = None

    @property
    def address(self) -> str:
        return f"socket://{self.host}:{self.port}"

    def serve(self, conn: Connection) -> None:
        buffer = b""
        while self.mismatch is None:
            data = conn.recv()
            if data is None:
                return
            buffer += data
            while len(buffer) >= 4 and self.mismatch is None:
                frame, buffer = buffer[:4], buffer[4:]
                if self.position >= len(self.script):
                    self.mismatch = f"unexpected extra frame {frame.hex()}"
                    return
                expected, reply = self.script[self.position]
                if frame != expected:
                    self.mismatch = (
                        f"exchange {self.position}: expected {expected.hex()}, "
                        f"driver sent {frame.hex()}"
                    )
                    return
                self.position += 1
                if reply is not None:
                    conn.send(reply)

    def check_complete(self) -> None:
        if self.mismatch is not None:
            raise AssertionError(self.mismatch)
        if self.position != len(self.script):
            raise AssertionError(
                f"driver stopped after {self.position} of {len(self.script)} exchanges; "
                f"next expected {self.script[self.position][0].hex()}"
            )


# Construction: NOP (ready?), the limits, then get_idn's four AEA strings ("P", "M",
# "7", "1": two bytes with the NUL, one AEA-EAR read each).
INIT = [
    ("00000000", "10000010"),  # NOP → MRDY
    ("50500000", "a0500258"),  # OPSL → 600 (6.00 dBm)
    ("40510000", "30510546"),  # OPSH → 1350 (13.50 dBm)
    ("70520000", "305200bf"),  # LFL1 → 191 THz
    ("60530000", "40531388"),  # LFL2 → 5000 (500.0 GHz)
    ("10540000", "905400c4"),  # LFH1 → 196 THz
    ("00550000", "105509c4"),  # LFH2 → 2500 (250.0 GHz)
    ("20020000", "22020002"),  # MFGR → AEA, 2 bytes
    ("b00b0000", "e00b5000"),  # AEA-EAR → "P\0"
    ("30030000", "32030002"),  # Model → AEA, 2 bytes
    ("b00b0000", "200b4d00"),  # "M\0"
    ("40040000", "42040002"),  # SerNo → AEA, 2 bytes
    ("b00b0000", "f00b3700"),  # "7\0"
    ("60060000", "62060002"),  # Release → AEA, 2 bytes
    ("b00b0000", "900b3100"),  # "1\0"
]


@contextlib.contextmanager
def scripted(script: Sequence[tuple[str, str | None]], **kwargs: Any) -> Iterator[OIFITLA]:
    server = ScriptedSerialPeer([*INIT, *script])
    server.start()
    try:
        kwargs.setdefault("timeout", 0.5)
        laser = OIFITLA("las", server.address, **kwargs)
        try:
            yield laser
        finally:
            laser.close()
        server.check_complete()
    finally:
        server.stop()
        if server.mismatch is not None:
            raise AssertionError(server.mismatch)


def test_script_frames_have_valid_checksums() -> None:
    for request, reply in INIT:
        assert _nibble_parity(bytes.fromhex(request)) == 0
        assert _nibble_parity(bytes.fromhex(reply)) == 0


def test_construction_reads_ready_limits_and_identity() -> None:
    with scripted([]) as laser:
        assert laser.power_min_w == pytest.approx(10**0.6 * 1e-3)
        assert laser.power_max_w == pytest.approx(10**1.35 * 1e-3)
        assert laser.frequency_min_hz == pytest.approx(191.5e12)
        assert laser.frequency_max_hz == pytest.approx(196.25e12)


def test_get_idn_reads_the_four_strings() -> None:
    with scripted(INIT[7:]) as laser:
        assert laser.get_idn() == {"vendor": "P", "model": "M", "serial": "7", "firmware": "1"}


@pytest.mark.parametrize(
    ("name", "script", "value"),
    [
        ("power", [("20310000", "703103e8")], 10e-3),  # 10.00 dBm
        ("output_power", [("60420000", "c042fc18")], 1e-4),  # −10.00 dBm
        ("temperature", [("70430000", "90430db8")], 35.12),
        ("frequency", [("40400000", "904000c1"), ("50410000", "00410fa0")], 193.4e12),
        ("channel", [("30300000", "20300001")], 1),
        ("grid_spacing", [("70340000", "a034fe0c")], -50e9),  # signed
        ("output_enabled", [("10320000", "90320008")], True),
        ("status_fatal", [("20200000", "20200000")], 0),
    ],
)
def test_get_exact_bytes(name: str, script: list[tuple[str, str]], value: object) -> None:
    with scripted(script) as laser:
        got = getattr(laser, name)()
        assert got == pytest.approx(value) if isinstance(value, float) else got == value


def test_set_power_exact_bytes() -> None:
    # 5 mW = 6.99 dBm → 699 = 0x02BB
    with scripted([("113102bb", "003102bb"), ("20310000", "003102bb")]) as laser:
        laser.power(5e-3)
        assert laser.power() == pytest.approx(5e-3, rel=1e-3)


def test_signed_write_exact_bytes() -> None:
    with scripted([("6131ff9c", "7031ff9c")]) as laser:
        assert laser.write_register(Register.PWR, -100) == 0xFF9C


def test_output_on_waits_for_the_pending_flag_to_clear() -> None:
    script = [
        ("20200000", "20200000"),  # StatusF: no fatal alarm
        ("20310000", "703103e8"),  # PWR set point 10 dBm ≤ hard limit
        ("81320008", "a3320008"),  # ResEna ← SENA → CP
        ("00000000", "10000100"),  # NOP: pending flag bit 8
        ("00000000", "10000100"),  # still pending
        ("00000000", "10000010"),  # done, ready
    ]
    with scripted(script, poll_interval_s=0.01) as laser:
        laser.output_on()


def test_channel_change_reads_band_then_writes_and_waits() -> None:
    script = [
        ("60350000", "b03500c1"),  # FCF1 193
        ("50360000", "00360fa0"),  # FCF2 4000
        ("70340000", "d03401f4"),  # GRID 500 (50 GHz)
        ("11300003", "33300003"),  # Channel ← 3 → CP
        ("00000000", "10000010"),  # NOP: done
    ]
    with scripted(script) as laser:
        laser.channel(3)


def test_execution_error_reads_nop_and_names_the_register() -> None:
    script = [("b13500c0", "71350000"), ("00000000", "80000019")]  # XE, then NOP error CIE
    with scripted(script) as laser, pytest.raises(OIFITLAExecutionError) as info:
        laser.first_channel_frequency(192e12 + 0.5e8)  # FCF1 first: rejected
    assert "las" in str(info.value)
    assert "FCF1 (0x35)" in str(info.value)
    assert "CIE" in str(info.value)
    assert info.value.register == Register.FCF1
    assert info.value.error_code == NopError.CIE


def test_bad_checksum_is_recovered_with_the_lstrsp_bit() -> None:
    script = [
        ("20310000", "713103e8"),  # reply with a wrong checksum nibble
        ("a8310000", "703103e8"),  # LstRsp (bit 27) → the module resends its last reply
    ]
    with scripted(script) as laser:
        assert laser.power() == pytest.approx(10e-3)


def test_ce_flag_makes_the_driver_resend_the_same_packet() -> None:
    script = [
        ("20310000", "a8310000"),  # CE: the module saw a bad checksum on our packet
        ("20310000", "703103e8"),  # the same packet again
    ]
    with scripted(script) as laser:
        assert laser.power() == pytest.approx(10e-3)


# ---------------------------------------------------------------- 3. through the mock
SETTLE_S = 0.05


@pytest.fixture
def bench() -> SimpleNamespace:
    """The slice of the bench the ITLA mock drives (bench.alice.* under bench.lock)."""
    alice = SimpleNamespace(laser_power_w=1e-3, laser_on=True, wavelength_m=1550e-9)
    return SimpleNamespace(alice=alice, lock=threading.Lock())


@pytest.fixture
def server(bench: SimpleNamespace) -> Iterator[SerialSocketServer]:
    srv = serve("itla", bench, {"settle_s": str(SETTLE_S)})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def mock(server: SerialSocketServer) -> MockITLA:
    protocol = server.protocol
    assert isinstance(protocol, MockITLA)
    return protocol


@pytest.fixture
def laser(server: SerialSocketServer) -> OIFITLA:
    return OIFITLA("las", server.address, timeout=0.3, poll_interval_s=0.01)


def _writes(mock: MockITLA) -> list[bytes]:
    return [f for f in mock.frames_received if f[0] & 0x01]


def test_laser_role_and_identity(laser: OIFITLA) -> None:
    assert isinstance(laser, Laser)
    assert laser.get_idn() == {
        "vendor": "PURE PHOTONICS",
        "model": "PPCL550",
        "serial": "MOCK000001",
        "firmware": "MOCK 1.0.0",
    }
    assert laser.device_type() == "CW ITLA"
    assert laser.manufacturing_date() == "2024-01-15"


def test_odd_length_strings_through_aea() -> None:
    srv = serve("itla", None, {"serial": "SN-12345", "model": "ITLA-X"})
    with srv:
        laser = OIFITLA("las", srv.address, timeout=0.3)
        assert laser.read_string(Register.SER_NO) == "SN-12345"  # 9 bytes with NUL
        assert laser.read_string(Register.MODEL) == "ITLA-X"
        laser.close()


@pytest.mark.parametrize(
    ("name", "value", "attribute", "raw"),
    [
        ("power", 8e-3, "pwr", 903),  # 9.03 dBm
        ("power", 20e-3, "pwr", 1301),
        ("first_channel_frequency", 192.1234e12, "fcf2", 1234),
        ("grid_spacing", 100e9, "grid", 1000),
        ("grid_spacing", -25e9, "grid", 0xFF06),
        ("channel", 7, "channel", 7),
    ],
)
def test_set_get_round_trip_through_the_mock(
    laser: OIFITLA, mock: MockITLA, name: str, value: float, attribute: str, raw: int
) -> None:
    parameter = getattr(laser, name)
    parameter(value)
    assert getattr(mock, attribute) & 0xFFFF == raw
    assert parameter() == pytest.approx(value, rel=1e-3)


def test_read_only_parameters_with_units(laser: OIFITLA, mock: MockITLA) -> None:
    assert laser.frequency.unit == "Hz"
    assert laser.frequency() == pytest.approx(193.4e12)
    assert laser.wavelength.unit == "m"
    assert laser.wavelength() == pytest.approx(C / 193.4e12)
    assert laser.temperature.unit == "°C"
    assert laser.temperature() == pytest.approx(35.0)
    assert laser.output_power.unit == "W"
    assert laser.output_power() == pytest.approx(1e-7)  # −40 dBm floor while off
    for name in ("power", "grid_spacing", "first_channel_frequency"):
        assert getattr(laser, name).unit in ("W", "Hz")


def test_channel_frequency_follows_fcf_and_grid(laser: OIFITLA) -> None:
    laser.first_channel_frequency(192.0e12)
    laser.grid_spacing(100e9)
    laser.channel(11)
    assert laser.frequency() == pytest.approx(193.0e12)
    assert laser.wavelength() == pytest.approx(C / 193.0e12)


def test_power_validator_uses_the_device_limits(laser: OIFITLA, mock: MockITLA) -> None:
    writes = len(_writes(mock))
    with pytest.raises(ValueError, match="las_power"):
        laser.power(30e-3)  # above OPSH 13.5 dBm = 22.4 mW
    with pytest.raises(ValueError, match="las_power"):
        laser.power(1e-3)  # below OPSL 6 dBm = 4.0 mW
    assert len(_writes(mock)) == writes
    assert mock.pwr == 1000


def test_power_validator_uses_the_hard_limit(server: SerialSocketServer, mock: MockITLA) -> None:
    laser = OIFITLA("las", server.address, timeout=0.3, power_max_w=10e-3)
    assert laser.power_max_w == pytest.approx(10e-3)
    with pytest.raises(ValueError, match=r"las_power"):
        laser.power(12e-3)  # inside OPSH, above the hard limit
    assert mock.pwr == 1000
    laser.power(10e-3)
    assert mock.pwr == 1000


def test_rounding_never_crosses_the_hard_limit(server: SerialSocketServer, mock: MockITLA) -> None:
    limit = 1e-3 * 10**0.9006  # 9.006 dBm: 900.6 would round up to 901, past it
    laser = OIFITLA("las", server.address, timeout=0.3, power_max_w=limit)
    laser.power(limit)
    assert mock.pwr == 900
    laser.output_on()
    assert laser.output_power() <= limit


def test_hard_limit_below_opsl_is_refused(server: SerialSocketServer) -> None:
    with pytest.raises(ValueError, match="power_max_w"):
        OIFITLA("las", server.address, timeout=0.3, power_max_w=1e-3)


def test_frequency_validators_use_lfl_lfh(laser: OIFITLA, mock: MockITLA) -> None:
    writes = len(_writes(mock))
    with pytest.raises(ValueError, match="las_first_channel_frequency"):
        laser.first_channel_frequency(190e12)
    with pytest.raises(ValueError, match="outside the laser's band"):
        laser.channel(200)  # 193.4 THz + 199·50 GHz = 203.35 THz
    assert len(_writes(mock)) == writes
    assert mock.channel == 1


def test_output_on_waits_until_the_module_settled(
    laser: OIFITLA, mock: MockITLA, bench: SimpleNamespace
) -> None:
    assert not laser.is_on()
    assert not bench.alice.laser_on
    polls = mock.nop_reads
    start = time.monotonic()
    laser.output_on()
    assert time.monotonic() - start >= SETTLE_S
    assert mock.nop_reads - polls >= 2  # the pending flag was polled
    assert laser.is_on()
    assert mock.emitting
    # the bench laser now emits the set point at the tuned wavelength
    assert bench.alice.laser_on
    assert bench.alice.laser_power_w == pytest.approx(10e-3)
    assert bench.alice.wavelength_m == pytest.approx(C / 193.4e12)
    assert laser.output_power() == pytest.approx(10e-3)


def test_power_change_while_on_reaches_the_bench(laser: OIFITLA, bench: SimpleNamespace) -> None:
    laser.output_on(power_w=8e-3)
    assert bench.alice.laser_power_w == pytest.approx(8e-3, rel=1e-3)
    laser.power(16e-3)
    assert laser.output_power() == pytest.approx(16e-3, rel=1e-3)
    assert bench.alice.laser_power_w == pytest.approx(16e-3, rel=1e-3)


def test_channel_change_while_on_is_pending_then_retunes(
    laser: OIFITLA, mock: MockITLA, bench: SimpleNamespace
) -> None:
    laser.output_on()
    start = time.monotonic()
    laser.channel(5)
    assert time.monotonic() - start >= SETTLE_S
    assert laser.frequency() == pytest.approx(193.6e12)
    assert bench.alice.wavelength_m == pytest.approx(C / 193.6e12)


def test_pending_timeout_names_the_register(server: SerialSocketServer, mock: MockITLA) -> None:
    mock.settle_s = 5.0
    laser = OIFITLA("las", server.address, timeout=0.3, pending_timeout_s=0.2)
    with pytest.raises(OIFITLAPendingTimeoutError, match=r"las: ResEna \(0x32\) still pending"):
        laser.output_on()
    laser.output_off()  # ResEna is accepted while pending: the enable is aborted
    assert not mock.emitting


def test_output_on_refuses_a_set_point_above_the_hard_limit(
    server: SerialSocketServer, mock: MockITLA
) -> None:
    laser = OIFITLA("las", server.address, timeout=0.3, power_max_w=10e-3)
    mock.pwr = 1300  # 20 mW, set behind the driver's back
    with pytest.raises(OIFITLAError, match="exceeds the hard limit"):
        laser.output_on()
    assert not [f for f in _writes(mock) if f[1] == Register.RES_ENA]
    assert not mock.sena
    with pytest.raises(ValueError, match=r"between .* and 0.01 inclusive; Parameter: las.power"):
        laser.output_on(power_w=15e-3)


def test_device_rejections_raise_naming_register_and_error(laser: OIFITLA, mock: MockITLA) -> None:
    laser.output_on()
    with pytest.raises(OIFITLAExecutionError, match=r"GRID \(0x34\).*CIE") as info:
        laser.grid_spacing(100e9)
    assert "las" in str(info.value)
    assert mock.grid == 500
    with pytest.raises(OIFITLAExecutionError, match=r"OOP \(0x42\).*RNW"):
        laser.write_register(Register.OOP, 5)
    with pytest.raises(OIFITLAExecutionError, match=r"register 0x7F.*RNI") as info2:
        laser.read_register(0x7F)
    assert info2.value.error_code == NopError.RNI
    with pytest.raises(OIFITLAExecutionError, match=r"PWR \(0x31\).*RVE"):
        laser.write_register(Register.PWR, 2000)  # 20 dBm: past OPSH, validator bypassed
    assert mock.pwr == 1000


def test_aea_read_past_the_end_is_an_ere_error(laser: OIFITLA) -> None:
    with pytest.raises(OIFITLAExecutionError, match=r"AEA-EAR \(0x0B\).*ERE"):
        laser.read_register(Register.AEA_EAR)
    with pytest.raises(OIFITLAError, match="use read_string"):
        laser.read_register(Register.MFGR)


def test_output_off_and_safe_state(laser: OIFITLA, mock: MockITLA, bench: SimpleNamespace) -> None:
    laser.output_on()
    laser.safe_state()
    assert not laser.is_on()
    assert not bench.alice.laser_on
    assert bench.alice.laser_power_w == 0.0
    laser.safe_state()  # harmless when already off
    assert not mock.sena


def test_fatal_alarm_opens_the_interlock(
    laser: OIFITLA, mock: MockITLA, bench: SimpleNamespace
) -> None:
    laser.output_on()
    assert laser.interlock_closed()
    mock.trip_fatal("THERM")
    assert not laser.interlock_closed()
    assert not laser.is_on()  # shutdown on fatal
    assert not bench.alice.laser_on
    assert {"FATAL", "THERM", "THERML", "DIS"} <= set(laser.alarms()["fatal"])
    with pytest.raises(OIFITLAError, match="fatal alarm set"):
        laser.output_on()
    mock.clear_fatal()
    assert not laser.interlock_closed()  # the latch keeps FATAL up
    laser.clear_alarms()
    assert laser.interlock_closed()
    laser.output_on()
    assert bench.alice.laser_on
    assert not laser.status_fatal() & StatusBit.DIS


def test_reset_restores_power_up_settings(
    laser: OIFITLA, mock: MockITLA, bench: SimpleNamespace
) -> None:
    laser.power(20e-3)
    laser.output_on()
    laser.channel(9)
    laser.reset()
    assert not laser.is_on()
    assert not bench.alice.laser_on
    assert laser.power() == pytest.approx(10e-3)
    assert laser.channel() == 1
    assert "MRL" in laser.alarms()["fatal"]
    assert laser.nop().ready


def test_soft_reset_aborts_an_aea_transfer(laser: OIFITLA, mock: MockITLA) -> None:
    laser.power(8e-3)
    laser.output_on()
    laser._command(Register.SER_NO)  # start an AEA transfer
    laser.soft_reset()
    with pytest.raises(OIFITLAExecutionError, match="ERE"):
        laser.read_register(Register.AEA_EAR)
    assert laser.power() == pytest.approx(8e-3, rel=1e-3)
    assert laser.is_on()  # a soft reset keeps the output as it was


# ---------------------------------------------------------------- 4. faults
def test_reconnects_after_a_dropped_link(laser: OIFITLA, server: SerialSocketServer) -> None:
    laser.power(8e-3)
    server.faults.drop_connection(refuse_for_s=0.3)
    time.sleep(0.15)  # the mock has closed its side
    assert laser.power() == pytest.approx(8e-3, rel=1e-3)
    assert laser.reconnect_count == 1


def test_unreachable_after_a_drop_is_a_clear_error(
    laser: OIFITLA, server: SerialSocketServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(OIFITLA, "RECONNECT_TIMEOUT_S", 0.3)
    server.faults.drop_connection(refuse_for_s=2.0)
    time.sleep(0.15)
    with pytest.raises(OIFITLACommunicationError, match="las: could not reconnect"):
        laser.power()


def test_timeout_names_instrument_and_register(laser: OIFITLA, server: SerialSocketServer) -> None:
    server.faults.delay_replies(0.6)
    with pytest.raises(OIFITLATimeoutError, match=r"las: no reply to the read of PWR \(0x31\)"):
        laser.power()
    server.faults.clear()
    time.sleep(0.05)
    # the late reply went with the old link: the next answer is the right one
    assert laser.temperature() == pytest.approx(35.0)
    assert laser.power() == pytest.approx(10e-3)


def test_silent_module_times_out(laser: OIFITLA, server: SerialSocketServer) -> None:
    server.faults.silence()
    with pytest.raises(OIFITLATimeoutError, match=r"within 0\.3 s"):
        laser.channel()
    server.faults.clear()
    assert laser.channel() == 1


def test_one_garbage_reply_is_recovered(
    laser: OIFITLA, server: SerialSocketServer, mock: MockITLA
) -> None:
    server.faults.send_garbage(1)
    assert laser.power() == pytest.approx(10e-3)
    assert any(f[0] & 0x08 for f in mock.frames_received)  # asked with LstRsp


def test_persistent_garbage_is_a_clear_error(laser: OIFITLA, server: SerialSocketServer) -> None:
    server.faults.send_garbage(-1)
    with pytest.raises(OIFITLAChecksumError, match=r"las: no valid reply to the read of PWR"):
        laser.power()
    server.faults.clear()
    assert laser.power() == pytest.approx(10e-3)


def test_corrupted_packet_gets_ce_from_the_mock(mock: MockITLA) -> None:
    reply = mock.feed(bytes.fromhex("30310000"))  # PWR read with a wrong checksum
    assert decode_response(reply).comm_error
    assert "CEL" in [b.name for b in StatusBit if b & mock._status_f_value()]


def test_mock_resynchronises_after_a_partial_frame(mock: MockITLA) -> None:
    assert mock.feed(b"\x20\x31") == b""
    mock._last_byte_at -= 1.0  # the half frame is old
    reply = mock.feed(encode_request(Register.PWR))
    assert decode_response(reply) == Response(Register.PWR, 1000)


# ---------------------------------------------------------------- 5. mock factory
def test_serve_options_set_limits_and_strings() -> None:
    srv = serve("x", None, {"power_min_dbm": "3", "power_max_dbm": "12.5", "serial": "ABC"})
    protocol = srv.protocol
    assert isinstance(protocol, MockITLA)
    assert (protocol.opsl, protocol.opsh) == (300, 1250)
    assert protocol.strings[0x04] == "ABC"
    srv.stop()
    with pytest.raises(ValueError, match="unknown options"):
        serve("x", None, {"colour": "red"})


def test_power_conversion_is_consistent_with_dbm() -> None:
    for dbm in (6.0, 9.03, 13.5):
        watts = 1e-3 * 10 ** (dbm / 10)
        assert 10 * math.log10(watts / 1e-3) == pytest.approx(dbm)


# ---------------------------------------------------------------- 6. physics on the real bench
def test_laser_drives_the_bench_physics() -> None:
    from qkdlab.mock_instruments.bench import Bench, BenchConfig

    bench = Bench(BenchConfig(), seed=3)
    srv = serve("itla", bench, {"settle_s": "0.01"})
    with srv:
        laser = OIFITLA("las", srv.address, timeout=0.3, poll_interval_s=0.005)
        assert bench.optical_power_at("laser") == 0.0  # module powers up disabled
        assert bench.mean_photon_numbers()[0] == 0.0
        laser.output_on(power_w=10e-3)
        assert bench.optical_power_at("laser") == pytest.approx(10e-3, rel=1e-3)
        mu_10mw = bench.mean_photon_numbers()[0]
        assert bench.alice.wavelength_m == pytest.approx(C / 193.4e12)
        laser.power(5e-3)  # −3 dB at the laser: μ halves (photon number ∝ P·λ)
        assert bench.mean_photon_numbers()[0] == pytest.approx(mu_10mw / 2, rel=3e-3)
        laser.output_off()
        clicks_dark = bench.expected_click_rates()
        darks = [d.dark_count_cps if d.enabled else 0.0 for d in bench.bob.detectors]
        assert clicks_dark == pytest.approx(darks)
        laser.close()
