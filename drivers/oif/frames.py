"""OIF-ITLA serial frames: pure encode/decode and the BIP-4 checksum (no I/O).

Source: *Integrable Tunable Laser Assembly Multi Source Agreement*, OIF-ITLA-MSA-01.3
(Optical Internetworking Forum, 13 July 2015; 01.2 of 26 June 2008 has the same
frame), found as public transcripts of the OIF document.  Sections used here:

* §6.5.2 *Communication Error Detection*: the module checks the checksum of every
  in-bound (host → module) packet and answers an inconsistent one with an
  unprocessed response whose **CE** flag is set; the host checks every out-bound
  packet and, on a bad checksum, may ask for the last response again by setting the
  **LstRsp** bit of its next packet.
* §8.2 (checksum, referenced from §6.5.2) and the register summary, Table 9.2-1.

Every packet is 4 bytes, most significant byte first::

    bits           31:28     27      26:25      24      23:16     15:0
    host → module  checksum  LstRsp  0 0        R/W     register  data
    module → host  checksum  CE      0  status(25:24)   register  data

Status (module → host, bits 25:24): ``00`` OK, ``01`` XE execution error (read NOP
for the reason), ``10`` AEA (automatic extended addressing: the data field is a byte
count, read the bytes from AEA-EAR 0x0B), ``11`` CP command pending.

**BIP-4** (bit-interleaved parity over nibbles): XOR the low nibble of byte 0 with
bytes 1–3 (BIP-8), then XOR the two nibbles of that result.  Equivalently, with the
checksum in place the XOR of all eight nibbles of a good frame is zero.  That parity
catches every single-bit error and every error pattern that flips an odd number of
bits in the same position of different nibbles; two flips in the same bit lane
cancel and are not caught (a property of BIP-4, not of this code).

The register addresses, units and signedness below are those of Table 9.2-1; the NOP
error codes and the status-register bit names are those of the MSA's NOP,
StatusF/StatusW and ResEna register descriptions, cross-checked against two
independent open-source ITLA implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

FRAME_BYTES = 4
"""Every packet, either direction, is four bytes."""


class Status(IntEnum):
    """Module → host status field (bits 25:24)."""

    OK = 0
    XE = 1
    AEA = 2
    CP = 3


class Register(IntEnum):
    """Register addresses of OIF-ITLA-MSA-01.3 Table 9.2-1 used by driver and mock."""

    NOP = 0x00  # pending flags, MRDY, error field of the last command
    DEV_TYP = 0x01  # AEA string: device type
    MFGR = 0x02  # AEA string: manufacturer
    MODEL = 0x03  # AEA string: model
    SER_NO = 0x04  # AEA string: serial number
    MFG_DATE = 0x05  # AEA string: manufacturing date
    RELEASE = 0x06  # AEA string: firmware release
    REL_BACK = 0x07  # AEA string: firmware backwards compatibility
    GEN_CFG = 0x08  # general module configuration
    AEA_EAC = 0x09  # AEA extended address configuration
    AEA_EA = 0x0A  # AEA extended address
    AEA_EAR = 0x0B  # AEA data: two bytes of the pending AEA transfer per read
    IO_CAP = 0x0D  # physical interface (baud rate) configuration
    LST_RESP = 0x13  # last response
    STATUS_F = 0x20  # fatal status (latched bits cleared by writing 1)
    STATUS_W = 0x21  # warning status
    CHANNEL = 0x30  # channel number; a write tunes (pending)
    PWR = 0x31  # optical power set point, dBm·100, signed
    RES_ENA = 0x32  # reset / enable: MR, SR, SENA
    MCB = 0x33  # module configuration behaviour
    GRID = 0x34  # channel grid spacing, GHz·10, signed
    FCF1 = 0x35  # first channel frequency, THz part
    FCF2 = 0x36  # first channel frequency, GHz·10 part
    LF1 = 0x40  # laser frequency now, THz part
    LF2 = 0x41  # laser frequency now, GHz·10 part
    OOP = 0x42  # optical output power, dBm·100, signed
    CTEMP = 0x43  # current (laser) temperature, °C·100, signed
    OPSL = 0x50  # lowest power set point, dBm·100, signed
    OPSH = 0x51  # highest power set point, dBm·100, signed
    LFL1 = 0x52  # lowest frequency, THz part
    LFL2 = 0x53  # lowest frequency, GHz·10 part
    LFH1 = 0x54  # highest frequency, THz part
    LFH2 = 0x55  # highest frequency, GHz·10 part
    LGRID = 0x56  # smallest grid spacing, GHz·10


STRING_REGISTERS = frozenset(
    {
        Register.DEV_TYP,
        Register.MFGR,
        Register.MODEL,
        Register.SER_NO,
        Register.MFG_DATE,
        Register.RELEASE,
        Register.REL_BACK,
    }
)
"""Registers whose read answers AEA with a byte count (null-terminated strings)."""

SIGNED_REGISTERS = frozenset(
    {Register.PWR, Register.GRID, Register.OOP, Register.CTEMP, Register.OPSL, Register.OPSH}
)
"""Registers whose 16-bit data is two's complement (Table 9.2-1)."""


MSA_NAMES: dict[int, str] = {
    Register.NOP: "NOP",
    Register.DEV_TYP: "DevTyp",
    Register.MFGR: "MFGR",
    Register.MODEL: "Model",
    Register.SER_NO: "SerNo",
    Register.MFG_DATE: "MFGDate",
    Register.RELEASE: "Release",
    Register.REL_BACK: "RelBack",
    Register.GEN_CFG: "GenCfg",
    Register.AEA_EAC: "AEA-EAC",
    Register.AEA_EA: "AEA-EA",
    Register.AEA_EAR: "AEA-EAR",
    Register.IO_CAP: "IOCap",
    Register.LST_RESP: "LstResp",
    Register.STATUS_F: "StatusF",
    Register.STATUS_W: "StatusW",
    Register.CHANNEL: "Channel",
    Register.PWR: "PWR",
    Register.RES_ENA: "ResEna",
    Register.MCB: "MCB",
    Register.GRID: "GRID",
    Register.FCF1: "FCF1",
    Register.FCF2: "FCF2",
    Register.LF1: "LF1",
    Register.LF2: "LF2",
    Register.OOP: "OOP",
    Register.CTEMP: "CTemp",
    Register.OPSL: "OPSL",
    Register.OPSH: "OPSH",
    Register.LFL1: "LFL1",
    Register.LFL2: "LFL2",
    Register.LFH1: "LFH1",
    Register.LFH2: "LFH2",
    Register.LGRID: "LGrid",
}
"""The MSA's own spelling of each register name (Table 9.2-1)."""


def register_name(register: int) -> str:
    """``'PWR (0x31)'`` for a known register, ``'register 0x7F'`` otherwise."""
    name = MSA_NAMES.get(register)
    return f"{name} (0x{register:02X})" if name else f"register 0x{register:02X}"


class NopError(IntEnum):
    """Error field of NOP (bits 3:0): why the last command got XE."""

    OK = 0x0  # no error
    RNI = 0x1  # register not implemented
    RNW = 0x2  # register not writable
    RVE = 0x3  # register value range error
    CIP = 0x4  # command ignored due to a pending operation
    CII = 0x5  # command ignored while the module initialises
    ERE = 0x6  # extended address range error (e.g. read past the end of an AEA string)
    ERO = 0x7  # extended address is read-only
    EXF = 0x8  # execution general failure
    CIE = 0x9  # command ignored while the optical output is enabled
    IVC = 0xA  # invalid configuration, command ignored
    VSE = 0xF  # vendor-specific error


NOP_ERROR_TEXT: dict[int, str] = {
    NopError.OK: "no error",
    NopError.RNI: "register not implemented",
    NopError.RNW: "register not writable",
    NopError.RVE: "register value range error",
    NopError.CIP: "command ignored due to a pending operation",
    NopError.CII: "command ignored while the module initialises",
    NopError.ERE: "extended address range error",
    NopError.ERO: "extended address is read-only",
    NopError.EXF: "execution general failure",
    NopError.CIE: "command ignored while the optical output is enabled",
    NopError.IVC: "invalid configuration, command ignored",
    NopError.VSE: "vendor-specific error",
}


def nop_error_text(code: int) -> str:
    """``'RVE: register value range error'`` for an NOP error code."""
    try:
        return f"{NopError(code).name}: {NOP_ERROR_TEXT[code]}"
    except (ValueError, KeyError):
        return f"0x{code:X}: reserved error code"


NOP_PENDING_MASK = 0xFF00
"""NOP bits 15:8: one flag per operation still pending (0 when all are done)."""
NOP_MRDY = 0x0010
"""NOP bit 4: module ready (set once initialisation after power-up/reset is over)."""
NOP_ERROR_MASK = 0x000F
"""NOP bits 3:0: error field, see :class:`NopError`."""


@dataclass(frozen=True)
class NopStatus:
    """The fields of one NOP read."""

    pending: int  # bits 15:8, 0 when nothing is pending
    ready: bool  # MRDY
    error: int  # NOP error code of the last command

    @classmethod
    def from_data(cls, data: int) -> NopStatus:
        return cls(
            pending=(data & NOP_PENDING_MASK) >> 8,
            ready=bool(data & NOP_MRDY),
            error=data & NOP_ERROR_MASK,
        )


class ResEna(IntFlag):
    """ResEna (0x32) bits: module reset, soft reset, software enable of the output."""

    MR = 0x0001  # module reset: reboots the module (traffic interrupting)
    SR = 0x0002  # soft reset: aborts transfers in progress (AEA, download)
    SENA = 0x0008  # software enable: optical output on


class StatusBit(IntFlag):
    """StatusF (0x20) bits; StatusW (0x21) has the warning twins at the same positions.

    Bits 0–7 are latched (cleared by writing 1 to them), bits 8–11 are the present
    condition, bits 12–15 summaries.
    """

    PWRL = 0x0001  # power fault latched
    THERML = 0x0002  # thermal fault latched
    FREQL = 0x0004  # frequency fault latched
    VSFL = 0x0008  # vendor-specific fault latched
    CRL = 0x0010  # communication reset latched
    MRL = 0x0020  # module restart latched
    CEL = 0x0040  # communication (checksum) error latched
    XEL = 0x0080  # execution error latched
    PWR = 0x0100  # power fault present
    THERM = 0x0200  # thermal fault present
    FREQ = 0x0400  # frequency fault present
    VSF = 0x0800  # vendor-specific fault present
    DIS = 0x1000  # output disabled by the module (e.g. shutdown on fatal)
    FATAL = 0x2000  # a FATAL condition is asserted
    ALM = 0x4000  # an alarm condition is asserted
    SRQ = 0x8000  # service request asserted


LATCHED_BITS = 0x00FF
"""Status bits a host write of 1 clears."""
FATAL_CONDITION_BITS = StatusBit.PWR | StatusBit.THERM | StatusBit.FREQ | StatusBit.VSF
"""StatusF bits meaning a fatal condition is present now."""


class FrameError(ValueError):
    """Four bytes that are not a valid ITLA frame."""


class ChecksumError(FrameError):
    """A frame whose BIP-4 checksum does not match its content."""


@dataclass(frozen=True)
class Request:
    """A host → module packet."""

    register: int
    data: int = 0
    write: bool = False
    last_response: bool = False  # LstRsp: resend the previous response instead

    def encode(self) -> bytes:
        return encode_request(self.register, self.data, self.write, self.last_response)


@dataclass(frozen=True)
class Response:
    """A module → host packet."""

    register: int
    data: int
    status: Status = Status.OK
    comm_error: bool = False  # CE: the module saw a bad checksum on our packet

    def encode(self) -> bytes:
        return encode_response(self.register, self.data, self.status, self.comm_error)

    def signed(self) -> int:
        """The data field read as a two's-complement int16."""
        return from_u16(self.data)


def bip4(frame: bytes) -> int:
    """BIP-4 checksum of a 4-byte frame; the top nibble of byte 0 is ignored."""
    if len(frame) != FRAME_BYTES:
        raise FrameError(f"an ITLA frame has 4 bytes, got {len(frame)}: {frame.hex()}")
    bip8 = (frame[0] & 0x0F) ^ frame[1] ^ frame[2] ^ frame[3]
    return ((bip8 >> 4) ^ bip8) & 0x0F


def checksum_ok(frame: bytes) -> bool:
    """True when the top nibble of byte 0 holds the frame's BIP-4."""
    return bip4(frame) == frame[0] >> 4


def _with_checksum(byte0: int, register: int, data: int) -> bytes:
    body = bytes((byte0 & 0x0F, register, (data >> 8) & 0xFF, data & 0xFF))
    return bytes((bip4(body) << 4 | body[0],)) + body[1:]


def _check_fields(register: int, data: int) -> None:
    if not 0 <= register <= 0xFF:
        raise FrameError(f"register 0x{register:X} does not fit 8 bits")
    if not 0 <= data <= 0xFFFF:
        raise FrameError(f"data {data} does not fit 16 unsigned bits (use to_u16)")


def encode_request(
    register: int, data: int = 0, write: bool = False, last_response: bool = False
) -> bytes:
    """The 4 bytes a host sends: read (``write=False``) or write ``data`` (uint16)."""
    _check_fields(register, data)
    byte0 = (0x08 if last_response else 0) | (0x01 if write else 0)
    return _with_checksum(byte0, register, data)


def decode_request(frame: bytes) -> Request:
    """Parse a host → module frame; :class:`ChecksumError` when BIP-4 fails."""
    if not checksum_ok(frame):
        raise ChecksumError(f"bad checksum in request {frame.hex()}")
    if frame[0] & 0x06:
        raise FrameError(f"reserved bits 26:25 set in request {frame.hex()}")
    return Request(
        register=frame[1],
        data=frame[2] << 8 | frame[3],
        write=bool(frame[0] & 0x01),
        last_response=bool(frame[0] & 0x08),
    )


def encode_response(
    register: int, data: int, status: Status | int = Status.OK, comm_error: bool = False
) -> bytes:
    """The 4 bytes a module sends back."""
    _check_fields(register, data)
    byte0 = (0x08 if comm_error else 0) | (int(status) & 0x03)
    return _with_checksum(byte0, register, data)


def decode_response(frame: bytes) -> Response:
    """Parse a module → host frame; :class:`ChecksumError` when BIP-4 fails."""
    if not checksum_ok(frame):
        raise ChecksumError(f"bad checksum in response {frame.hex()}")
    if frame[0] & 0x04:
        raise FrameError(f"reserved bit 26 set in response {frame.hex()}")
    return Response(
        register=frame[1],
        data=frame[2] << 8 | frame[3],
        status=Status(frame[0] & 0x03),
        comm_error=bool(frame[0] & 0x08),
    )


def to_u16(value: int) -> int:
    """A signed int16 as the 16-bit data field (two's complement)."""
    if not -0x8000 <= value <= 0x7FFF:
        raise FrameError(f"{value} does not fit a signed 16-bit register")
    return value & 0xFFFF


def from_u16(data: int) -> int:
    """A 16-bit data field read as two's complement."""
    return data - 0x10000 if data & 0x8000 else data


# -- units of Table 9.2-1 ------------------------------------------------------------
THZ_HZ = 1e12
"""FCF1/LF1/LFL1/LFH1 unit."""
GHZ10_HZ = 1e8
"""FCF2/LF2/LFL2/LFH2/GRID/LGrid unit: 0.1 GHz."""


def frequency_hz(thz: int, ghz10: int) -> float:
    """Frequency (Hz) from a THz register and a GHz·10 register."""
    return thz * THZ_HZ + ghz10 * GHZ10_HZ


def split_frequency(hz: float) -> tuple[int, int]:
    """(THz, GHz·10) register values of ``hz``, rounded to the 0.1 GHz resolution."""
    steps = round(hz / GHZ10_HZ)  # whole 0.1 GHz steps
    thz, ghz10 = divmod(steps, 10_000)
    return int(thz), int(ghz10)
