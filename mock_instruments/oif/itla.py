"""Mock OIF-ITLA tunable laser (Integrable Tunable Laser Assembly), served as a serial port.

Speaks the 4-byte register protocol of the *Integrable Tunable Laser Assembly Multi
Source Agreement* OIF-ITLA-MSA-01.3 (OIF, 13 July 2015): BIP-4 checksum in the top
nibble, LstRsp / CE flags, status OK / XE / AEA / CP, registers of Table 9.2-1.  The
driver side lives in ``qkdlab.drivers.oif``; this module re-implements the frame
format on purpose (mocks never import drivers), so the two implementations check
each other in the tests.

=============================  ====  ===============================================
Register                       Addr  Mock behaviour
=============================  ====  ===============================================
NOP                            0x00  pending flags 15:8, MRDY bit 4, error 3:0
DevTyp/MFGR/Model/SerNo/       0x01  AEA: reply status AEA + byte count (NUL
MFGDate/Release/RelBack        -07   included); the bytes come from AEA-EAR
GenCfg                         0x08  stored, no effect
AEA-EAR                        0x0B  next two bytes of the AEA string; past the end
                                     XE with NOP error ERE
StatusF / StatusW              0x20  latched bits 7:0 cleared by writing 1 (no
                               0x21  warning condition is modelled: StatusW stays 0)
Channel                        0x30  retunes; CP + pending while the output is on
PWR                            0x31  dBm·100 in [OPSL, OPSH], else XE RVE
ResEna                         0x32  MR reboot (MRDY low for ``settle_s``), SR abort
                                     AEA, SENA on → CP + pending ``settle_s``
GRID, FCF1, FCF2               0x34  XE CIE while the output is on; FCF1 in
                               -36   [LFL1, LFH1] THz, FCF2 < 10000, else XE RVE
LF1 / LF2                      0x40  tuned frequency (THz, GHz·10)
OOP                            0x42  emitted power, dBm·100 (floor while off)
CTemp                          0x43  laser temperature °C·100
OPSL/OPSH, LFL1/2, LFH1/2,     0x50  capabilities (read-only)
LGrid                          -56
=============================  ====  ===============================================

Writes to read-only registers answer XE / RNW; unknown registers XE / RNI.

Mock choices where the MSA leaves behaviour to the vendor (documented, tested):

* The output-enable operation and a channel change with the output on are pending
  for ``settle_s`` (default :data:`DEFAULT_SETTLE_S`): the write answers CP, NOP
  shows pending flag :data:`PENDING_ENABLE` (bit 8) or :data:`PENDING_TUNE` (bit 9)
  with status OK, and other writes except ResEna, StatusF and StatusW answer
  XE / CIP until it is over.
  A channel written with the output off takes effect at once.
* A channel whose frequency ``FCF + (channel − 1)·GRID`` falls outside
  [LFL, LFH] answers XE / RVE.
* After MR the module reinitialises for ``settle_s``: MRDY is 0 and every command
  except NOP answers XE / CII; all settings return to their power-up values.
* :meth:`MockITLA.trip_fatal` sets a present + latched fatal condition; the output
  shuts down (shutdown-on-fatal; StatusF DIS stays set until SENA is set again) and
  SENA cannot be set again (XE / EXF) until the condition is gone and the host
  cleared the latched bits.  FATAL (bit 13) is the OR
  of the present fatal conditions (bits 11:8) and their latches (bits 3:0).
* While the output is off OOP reads :data:`OOP_OFF_DBM100` (−40.00 dBm).
* Bytes of a partial frame older than :data:`INTERFRAME_GAP_S` are dropped, so a link
  broken mid-frame does not misalign the next one (the MSA module resynchronises on
  Module Select; a socket has no such line).

The emitted power, on/off state and wavelength go into the bench through
:meth:`MockITLA._push_to_bench`, the only place that touches it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qkdlab.mock_instruments.server.raw import ByteProtocol, SerialSocketServer

SPEED_OF_LIGHT_M_S = 299_792_458.0

# -- protocol constants (OIF-ITLA-MSA-01.3) ------------------------------------------
OK, XE, AEA, CP = 0, 1, 2, 3  # status field, bits 25:24 of a response
RNI, RNW, RVE, CIP, CII, ERE, EXF, CIE = 0x1, 0x2, 0x3, 0x4, 0x5, 0x6, 0x8, 0x9  # NOP errors
MRDY = 0x0010
PENDING_ENABLE = 0x01
"""NOP pending flag (bit 8 of NOP) of the output-enable operation (mock choice)."""
PENDING_TUNE = 0x02
"""NOP pending flag (bit 9 of NOP) of a channel change with the output on (mock choice)."""
SR_BIT, MR_BIT, SENA_BIT = 0x0002, 0x0001, 0x0008

# StatusF bits
FATAL_PRESENT = {"PWR": 0x0100, "THERM": 0x0200, "FREQ": 0x0400, "VSF": 0x0800}
FATAL_LATCH = {"PWR": 0x0001, "THERM": 0x0002, "FREQ": 0x0004, "VSF": 0x0008}
CEL, XEL, MRL = 0x0040, 0x0080, 0x0020
DIS, FATAL = 0x1000, 0x2000

STRING_REGISTERS = range(0x01, 0x08)
READ_ONLY = {0x40, 0x41, 0x42, 0x43, 0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56}

# -- mock defaults: a C-band ITLA (Pure Photonics PPCL-class figures) -----------------
DEFAULT_SETTLE_S = 0.05
"""How long output enable, a channel change and a reboot stay pending (s)."""
INTERFRAME_GAP_S = 0.5
"""A partial frame older than this is discarded (s)."""
OOP_OFF_DBM100 = -4000
"""OOP reading with the output off (dBm·100)."""
DEFAULTS: dict[str, int] = {
    "pwr": 1000,  # 10.00 dBm set point at power-up
    "opsl": 600,  # 6.00 dBm lowest set point
    "opsh": 1350,  # 13.50 dBm highest set point
    "lfl1": 191,  # 191.5000 THz lowest frequency
    "lfl2": 5000,
    "lfh1": 196,  # 196.2500 THz highest frequency
    "lfh2": 2500,
    "fcf1": 193,  # 193.4000 THz first channel (≈ 1550.1 nm)
    "fcf2": 4000,
    "grid": 500,  # 50.0 GHz grid
    "lgrid": 10,  # 1.0 GHz smallest grid
    "channel": 1,
    "ctemp": 3500,  # 35.00 °C laser temperature
}
STRINGS: dict[int, str] = {
    0x01: "CW ITLA",
    0x02: "PURE PHOTONICS",
    0x03: "PPCL550",
    0x04: "MOCK000001",
    0x05: "2024-01-15",
    0x06: "MOCK 1.0.0",
    0x07: "1.0.0",
}


def _checksum(b0: int, b1: int, b2: int, b3: int) -> int:
    """XOR of the seven nibbles below the checksum nibble (BIP-4)."""
    word = (b0 & 0x0F) << 24 | b1 << 16 | b2 << 8 | b3
    parity = 0
    for shift in range(0, 28, 4):
        parity ^= (word >> shift) & 0xF
    return parity


def _response(register: int, data: int, status: int = OK, ce: bool = False) -> bytes:
    data &= 0xFFFF
    b0 = (0x08 if ce else 0) | status
    b2, b3 = data >> 8, data & 0xFF
    return bytes((_checksum(b0, register, b2, b3) << 4 | b0, register, b2, b3))


def _signed(data: int) -> int:
    return data - 0x10000 if data & 0x8000 else data


class _RejectedError(Exception):
    """A command answered XE with NOP error ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class _Pending:
    flag: int
    done_at: float


class MockITLA(ByteProtocol):
    """Register-level twin of an OIF-ITLA laser (see the module docstring).

    Args:
        bench: optional shared bench model; emitted power, on/off and wavelength go in.
        settle_s: duration of the pending operations and of a reboot (s).
        strings: overrides of the AEA strings by register (0x01–0x07).
        **registers: overrides of :data:`DEFAULTS` (register units: dBm·100, THz,
            GHz·10, °C·100).

    Attributes a test may read (under :attr:`lock`):
        frames_received: every valid request frame, in order (bytes).
        nop_reads: how many NOP reads were answered.
    """

    def __init__(
        self,
        bench: Any = None,
        *,
        settle_s: float = DEFAULT_SETTLE_S,
        strings: Mapping[int, str] | None = None,
        **registers: int,
    ) -> None:
        unknown = set(registers) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown ITLA mock settings {sorted(unknown)}")
        self.bench = bench
        self.settle_s = settle_s
        self.lock = threading.RLock()
        self.power_up = {**DEFAULTS, **registers}
        self.strings = {**STRINGS, **(strings or {})}
        self.frames_received: list[bytes] = []
        self.nop_reads = 0
        self._buffer = b""
        self._last_byte_at = 0.0
        self._last_response = _response(0, MRDY)
        self._status_w = 0
        self._fatal_present = 0
        self._power_on_reset(initialising=False)

    # -- state ------------------------------------------------------------------------
    def _power_on_reset(self, initialising: bool) -> None:
        regs = self.power_up
        self.pwr = regs["pwr"]
        self.opsl, self.opsh = regs["opsl"], regs["opsh"]
        self.lfl = (regs["lfl1"], regs["lfl2"])
        self.lfh = (regs["lfh1"], regs["lfh2"])
        self.fcf1, self.fcf2 = regs["fcf1"], regs["fcf2"]
        self.grid = regs["grid"]
        self.lgrid = regs["lgrid"]
        self.channel = regs["channel"]
        self.ctemp = regs["ctemp"]
        self.gen_cfg = 0
        self.sena = False
        self.tuned_ghz10 = self._channel_ghz10(self.channel)
        self._pending: list[_Pending] = []
        self._aea = b""
        self._error = 0
        self._status_f = MRL  # the module restarted
        self._shut_down = False
        self._ready_at = time.monotonic() + self.settle_s if initialising else 0.0
        self._push_to_bench()

    def _channel_ghz10(self, channel: int) -> int:
        """Frequency of ``channel`` in 0.1 GHz steps: FCF + (channel − 1)·GRID."""
        return self.fcf1 * 10_000 + self.fcf2 + (channel - 1) * _signed(self.grid)

    def _in_band(self, ghz10: int) -> bool:
        low = self.lfl[0] * 10_000 + self.lfl[1]
        high = self.lfh[0] * 10_000 + self.lfh[1]
        return low <= ghz10 <= high

    def _advance(self) -> None:
        """Finish the pending operations whose time has come."""
        now = time.monotonic()
        finished = [p for p in self._pending if p.done_at <= now]
        if not finished:
            return
        self._pending = [p for p in self._pending if p.done_at > now]
        for op in finished:
            if op.flag == PENDING_ENABLE:
                self.sena = True
            self.tuned_ghz10 = self._channel_ghz10(self.channel)
        self._push_to_bench()

    @property
    def emitting(self) -> bool:
        """True while light leaves the module (enabled, settled, no fatal shutdown)."""
        with self.lock:
            self._advance()
            return self.sena and not any(p.flag == PENDING_ENABLE for p in self._pending)

    def emitted_power_w(self) -> float:
        """Optical output power (W); 0 while off."""
        return 1e-3 * 10 ** (self.pwr / 1000) if self.emitting else 0.0

    def frequency_hz(self) -> float:
        """Frequency the laser is tuned to (Hz)."""
        with self.lock:
            self._advance()
            return self.tuned_ghz10 * 1e8

    def _status_f_value(self) -> int:
        value = self._status_f | self._fatal_present
        if self._fatal_present or (self._status_f & sum(FATAL_LATCH.values())):
            value |= FATAL
        if self._shut_down:
            value |= DIS
        return value

    # -- test hooks -------------------------------------------------------------------
    def trip_fatal(self, kind: str = "THERM") -> None:
        """Assert a fatal condition (``PWR``, ``THERM``, ``FREQ``, ``VSF``); output shuts down."""
        with self.lock:
            self._fatal_present |= FATAL_PRESENT[kind]
            self._status_f |= FATAL_LATCH[kind]
            self._shut_down = self._shut_down or self.sena
            self.sena = False
            self._pending = [p for p in self._pending if p.flag != PENDING_ENABLE]
            self._push_to_bench()

    def clear_fatal(self) -> None:
        """The fatal condition is gone (its latch stays until the host clears it)."""
        with self.lock:
            self._fatal_present = 0

    # -- bytes in, bytes out ------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        with self.lock:
            now = time.monotonic()
            if self._buffer and now - self._last_byte_at > INTERFRAME_GAP_S:
                self._buffer = b""
            self._last_byte_at = now
            self._buffer += data
            out = bytearray()
            while len(self._buffer) >= 4:
                frame, self._buffer = self._buffer[:4], self._buffer[4:]
                out += self._frame(frame)
            return bytes(out)

    def _frame(self, frame: bytes) -> bytes:
        b0, register, b2, b3 = frame
        if _checksum(b0, register, b2, b3) != b0 >> 4 or b0 & 0x06:
            # §6.5.2: unprocessed response with CE set
            self._status_f |= CEL
            return _response(register, 0, OK, ce=True)
        self.frames_received.append(bytes(frame))
        if b0 & 0x08:  # LstRsp: resend the previous response, execute nothing
            return self._last_response
        write, data = bool(b0 & 0x01), b2 << 8 | b3
        self._advance()
        try:
            value, status = self._execute(register, write, data)
            if register != 0x00:
                self._error = 0
        except _RejectedError as reject:
            self._error = reject.code
            self._status_f |= XEL
            value, status = 0, XE
        self._last_response = _response(register, value, status)
        return self._last_response

    # -- registers ----------------------------------------------------------------------
    def _execute(self, register: int, write: bool, data: int) -> tuple[int, int]:
        if register == 0x00:
            if not write:
                self.nop_reads += 1
            return self._nop(), OK
        if time.monotonic() < self._ready_at:
            raise _RejectedError(CII)
        if register == 0x32:
            return self._res_ena(write, data)
        if write and self._pending and register not in (0x20, 0x21):
            raise _RejectedError(CIP)
        if register in STRING_REGISTERS:
            if write:
                raise _RejectedError(RNW)
            self._aea = self.strings.get(register, "").encode("ascii") + b"\x00"
            return len(self._aea), AEA
        if register == 0x0B:
            if write:
                raise _RejectedError(RNW)
            if not self._aea:
                raise _RejectedError(ERE)
            chunk, self._aea = self._aea[:2].ljust(2, b"\x00"), self._aea[2:]
            return chunk[0] << 8 | chunk[1], OK
        if write and register in READ_ONLY:
            raise _RejectedError(RNW)
        return self._dispatch(register, write, data)

    def _dispatch(self, register: int, write: bool, data: int) -> tuple[int, int]:
        if register == 0x08:
            if write:
                self.gen_cfg = data
            return self.gen_cfg, OK
        if register in (0x20, 0x21):
            return self._status(register, write, data)
        if register == 0x30:
            return self._channel(write, data)
        if register == 0x31:
            return self._power(write, data)
        if register in (0x34, 0x35, 0x36):
            return self._tuning_setting(register, write, data)
        if register in READ_ONLY:
            return self._monitor(register) & 0xFFFF, OK
        raise _RejectedError(RNI)

    def _nop(self) -> int:
        flags = 0
        for op in self._pending:
            flags |= op.flag
        ready = 0 if time.monotonic() < self._ready_at else MRDY
        return flags << 8 | ready | self._error

    def _res_ena(self, write: bool, data: int) -> tuple[int, int]:
        if not write:
            return SENA_BIT if self.sena else 0, OK
        if data & MR_BIT:
            self._power_on_reset(initialising=True)
            return data, OK
        if data & SR_BIT:
            self._aea = b""
        if data & SENA_BIT:
            if self.sena:
                return data, OK
            if self._fatal_present or self._status_f & sum(FATAL_LATCH.values()):
                raise _RejectedError(EXF)
            if any(p.flag == PENDING_ENABLE for p in self._pending):
                return data, CP
            self._shut_down = False
            self._pending.append(_Pending(PENDING_ENABLE, time.monotonic() + self.settle_s))
            return data, CP
        self.sena = False
        self._pending = [p for p in self._pending if p.flag != PENDING_ENABLE]
        self._push_to_bench()
        return data, OK

    def _status(self, register: int, write: bool, data: int) -> tuple[int, int]:
        if register == 0x20:
            if write:
                self._status_f &= ~(data & 0x00FF)
            return self._status_f_value(), OK
        if write:
            self._status_w &= ~(data & 0x00FF)
        return self._status_w, OK

    def _channel(self, write: bool, data: int) -> tuple[int, int]:
        if not write:
            return self.channel, OK
        if data < 1 or not self._in_band(self._channel_ghz10(data)):
            raise _RejectedError(RVE)
        self.channel = data
        if self.sena:
            self._pending.append(_Pending(PENDING_TUNE, time.monotonic() + self.settle_s))
            return data, CP
        self.tuned_ghz10 = self._channel_ghz10(data)
        self._push_to_bench()
        return data, OK

    def _power(self, write: bool, data: int) -> tuple[int, int]:
        if write:
            value = _signed(data)
            if not self.opsl <= value <= self.opsh:
                raise _RejectedError(RVE)
            self.pwr = value
            self._push_to_bench()
        return self.pwr & 0xFFFF, OK

    def _tuning_setting(self, register: int, write: bool, data: int) -> tuple[int, int]:
        names = {0x34: "grid", 0x35: "fcf1", 0x36: "fcf2"}
        name = names[register]
        if write:
            if self.sena or self._pending:
                raise _RejectedError(CIE)
            if register == 0x35 and not self.lfl[0] <= data <= self.lfh[0]:
                raise _RejectedError(RVE)
            if register == 0x36 and data > 9999:
                raise _RejectedError(RVE)
            setattr(self, name, data)
            self.tuned_ghz10 = self._channel_ghz10(self.channel)
            self._push_to_bench()
        return int(getattr(self, name)) & 0xFFFF, OK

    def _monitor(self, register: int) -> int:
        if register in (0x40, 0x41):
            thz, ghz10 = divmod(self.tuned_ghz10, 10_000)
            return thz if register == 0x40 else ghz10
        if register == 0x42:
            return self.pwr if self.emitting else OOP_OFF_DBM100
        values = {
            0x43: self.ctemp,
            0x50: self.opsl,
            0x51: self.opsh,
            0x52: self.lfl[0],
            0x53: self.lfl[1],
            0x54: self.lfh[0],
            0x55: self.lfh[1],
            0x56: self.lgrid,
        }
        return values[register]

    # -- the one place that touches the shared bench model ------------------------------
    def _push_to_bench(self) -> None:
        """Write emitted power (W), on/off and wavelength (m) into ``bench.alice``.

        Expects ``bench.alice.laser_power_w`` and ``bench.alice.laser_on``; sets
        ``bench.alice.wavelength_m`` when the bench has it; takes ``bench.lock`` if
        there is one.
        """
        if self.bench is None:
            return
        on = self.sena and not any(p.flag == PENDING_ENABLE for p in self._pending)
        power = 1e-3 * 10 ** (self.pwr / 1000) if on else 0.0
        alice = self.bench.alice
        lock = getattr(self.bench, "lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            alice.laser_power_w = power
            alice.laser_on = on
            if hasattr(alice, "wavelength_m") and self.tuned_ghz10 > 0:
                alice.wavelength_m = SPEED_OF_LIGHT_M_S / (self.tuned_ghz10 * 1e8)


def serve(
    name: str, bench: Any = None, options: Mapping[str, str] | None = None
) -> SerialSocketServer:
    """An unstarted ``socket://`` server for ``mock://oif/itla[?options]``.

    Options: ``settle_s`` (s), ``power_min_dbm`` / ``power_max_dbm`` (OPSL/OPSH, dBm),
    ``serial`` (SerNo string), ``model`` (Model string).
    """
    options = dict(options or {})
    registers: dict[str, int] = {}
    strings: dict[int, str] = {}
    settle_s = float(options.pop("settle_s", DEFAULT_SETTLE_S))
    if "power_min_dbm" in options:
        registers["opsl"] = round(float(options.pop("power_min_dbm")) * 100)
    if "power_max_dbm" in options:
        registers["opsh"] = round(float(options.pop("power_max_dbm")) * 100)
    if "serial" in options:
        strings[0x04] = options.pop("serial")
    if "model" in options:
        strings[0x03] = options.pop("model")
    if options:
        raise ValueError(f"unknown options for mock oif/itla: {sorted(options)}")
    if not math.isfinite(settle_s) or settle_s < 0:
        raise ValueError(f"settle_s must be >= 0, got {settle_s}")
    mock = MockITLA(bench, settle_s=settle_s, strings=strings, **registers)
    return SerialSocketServer(name, mock)
