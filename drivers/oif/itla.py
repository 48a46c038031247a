"""QCoDeS driver for OIF-ITLA tunable lasers (Pure Photonics PPCL, NeoPhotonics/Lumentum ITLA...).

Source of the command set
-------------------------
*Integrable Tunable Laser Assembly Multi Source Agreement*, **OIF-ITLA-MSA-01.3**
(Optical Internetworking Forum, 13 July 2015; the frame and the registers used here
are unchanged from OIF-ITLA-MSA-01.2, 26 June 2008), read as public transcripts of
the OIF document; cited below as [MSA].  Register addresses, units and signedness
are those of its register summary, [MSA] Table 9.2-1; the frame format and BIP-4
checksum are in :mod:`qkdlab.drivers.oif.frames` (with [MSA] §6.5.2 and §8.2).  The
vendor manuals (Pure Photonics, NeoPhotonics) add vendor registers (0x80 and up:
low-noise mode, clean sweep...) that are not wrapped here.

==========================  ======  ====================  ==================================
register                    addr    MSA unit              driver (SI unit)
==========================  ======  ====================  ==================================
NOP                         0x00    flags                 ``nop()``, pending / ready polling
DevTyp, MFGR, Model,        0x01–   AEA string            ``get_idn()``, ``device_type``,
SerNo, MFGDate, Release     0x06                          ``manufacturing_date``
AEA-EAR                     0x0B    2 bytes per read      ``read_string()``
StatusF / StatusW           0x20/1  bit field             ``status_fatal`` / ``status_warning``,
                                                          ``alarms()``, ``clear_alarms()``
Channel                     0x30    channel number        ``channel`` (waits while pending)
PWR                         0x31    dBm·100 (signed)      ``power`` (W)
ResEna                      0x32    MR / SR / SENA        ``output_on/off()``, ``reset()``,
                                                          ``soft_reset()``, ``is_on()``
GRID                        0x34    GHz·10 (signed)       ``grid_spacing`` (Hz)
FCF1 / FCF2                 0x35/6  THz / GHz·10          ``first_channel_frequency`` (Hz)
LF1 / LF2                   0x40/1  THz / GHz·10          ``frequency`` (Hz), ``wavelength`` (m)
OOP                         0x42    dBm·100 (signed)      ``output_power`` (W)
CTemp                       0x43    °C·100 (signed)       ``temperature`` (°C)
OPSL / OPSH                 0x50/1  dBm·100 (signed)      ``power_min_w`` / ``power_max_device_w``
LFL1/2, LFH1/2              0x52–5  THz / GHz·10          ``frequency_min_hz`` / ``_max_hz``
==========================  ======  ====================  ==================================

Powers are converted between dBm·100 and W (``P = 1 mW · 10^(dBm/10)``), frequencies
between (THz, 0.1 GHz) register pairs and Hz; the set-point resolution is 0.01 dB
and 0.1 GHz.

Protocol handling
-----------------
* **XE** (execution error): the driver reads NOP and raises
  :class:`OIFITLAExecutionError` naming the instrument, the register, the value and
  the NOP error code (RVE, CIE, CIP...).
* **CP** (command pending, after output enable or a channel change): the driver
  polls NOP every ``poll_interval_s`` until the pending flags (NOP bits 15:8) clear,
  for at most ``pending_timeout_s`` (then :class:`OIFITLAPendingTimeoutError`).
* **AEA** (strings): the reply's data is a byte count; the bytes are read two at a
  time from AEA-EAR (0x0B) and cut at the first NUL.
* **Checksum**: a reply that fails BIP-4 (or does not echo the register) is asked
  for again with the LstRsp bit, which makes the module resend its last response
  without executing anything twice; a reply with **CE** (the module saw a bad
  checksum on our packet) makes the driver resend the packet.  After
  :attr:`OIFITLA.MAX_RETRIES` retries :class:`OIFITLAChecksumError` is raised.
* **No reply** within ``timeout``: the port is reopened (a late reply must not be
  read as the answer to the next command) and :class:`OIFITLATimeoutError` raised.
* **Lost link** (pyserial error): the port is reopened, retried for
  :attr:`OIFITLA.RECONNECT_TIMEOUT_S`, and the command sent once more.

Safety
------
* ``power`` accepts only [OPSL, min(OPSH, ``power_max_w``)], both limits read from
  the module at connection; ``power_max_w`` is the caller's hard ceiling.  Channel
  and first-channel frequency are checked against [LFL, LFH] before anything is
  written.
* :meth:`OIFITLA.output_on` refuses while a fatal alarm is set and when the power
  set point on the module exceeds the hard ceiling (e.g. set by another program).
* :meth:`OIFITLA.safe_state` clears SENA (output disabled).

Interlock
---------
An ITLA has no interlock input.  :meth:`OIFITLA.interlock_closed` returns True only
when StatusF (0x20) shows neither FATAL (bit 13) nor a present fatal condition
(FPWR, FTHERM, FFREQ, FVSF, bits 11:8): the module's own protection then allows
emission.  After a fatal event the latched bits keep FATAL up until
:meth:`OIFITLA.clear_alarms`.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from typing import TYPE_CHECKING, ClassVar

import serial
from qcodes import validators as vals
from qcodes.instrument import Instrument, InstrumentBaseKWArgs
from qcodes.parameters import Parameter

from qkdlab.drivers.oif.frames import (
    FATAL_CONDITION_BITS,
    FRAME_BYTES,
    LATCHED_BITS,
    STRING_REGISTERS,
    FrameError,
    NopStatus,
    Register,
    Request,
    ResEna,
    Response,
    Status,
    StatusBit,
    decode_response,
    frequency_hz,
    from_u16,
    nop_error_text,
    register_name,
    split_frequency,
    to_u16,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

SPEED_OF_LIGHT_M_S = 299_792_458.0
MAX_AEA_BYTES = 512
"""Longest AEA string accepted (bytes); a larger count means a corrupted reply."""


class OIFITLAError(Exception):
    """The laser refused a command, or the driver refused to send one."""


class OIFITLAExecutionError(OIFITLAError):
    """The module answered XE; :attr:`error_code` is the NOP error field."""

    def __init__(self, message: str, register: int, error_code: int) -> None:
        super().__init__(message)
        self.register = register
        self.error_code = error_code


class OIFITLAPendingTimeoutError(OIFITLAError):
    """A pending operation (enable, tuning, reboot) did not finish in time."""


class OIFITLACommunicationError(OIFITLAError):
    """No reply in time, a lost link that could not be restored, or corrupt replies."""


class OIFITLATimeoutError(OIFITLACommunicationError):
    """The module did not answer within the serial timeout."""


class OIFITLAChecksumError(OIFITLACommunicationError):
    """Replies kept failing the BIP-4 checksum (or the module kept flagging CE)."""


class _NoReplyError(Exception):
    """Fewer than 4 bytes arrived within the timeout."""


class _LinkLostError(Exception):
    """pyserial reported the port or socket gone."""


def _dbm100_to_w(dbm100: int) -> float:
    return 1e-3 * 10 ** (dbm100 / 1000)


def _w_to_dbm100(watts: float) -> int:
    return round(1000 * math.log10(watts / 1e-3))


class OIFITLA(Instrument):
    """An OIF-ITLA tunable laser on an RS-232 port (or a ``socket://`` bridge).

    Satisfies :class:`qkdlab.drivers.roles.Laser`.

    Args:
        name: QCoDeS instrument name.
        address: pyserial port or URL: ``/dev/ttyUSB0``, ``COM3``,
            ``socket://127.0.0.1:PORT`` (the mock, or a serial-to-Ethernet bridge).
        baudrate: serial speed (bit/s); the MSA's default is 9600.
        timeout: how long to wait for each 4-byte reply (s).
        power_max_w: hard ceiling of the optical power (W); default the module's OPSH.
        pending_timeout_s: longest wait for a pending operation (s); enabling a real
            ITLA takes tens of seconds.
        poll_interval_s: NOP polling interval while an operation is pending (s).
        **kwargs: forwarded to :class:`~qcodes.instrument.Instrument`.
    """

    MAX_RETRIES: ClassVar[int] = 2
    """Retries (LstRsp or resend) after a corrupt reply or a CE flag."""
    RECONNECT_TIMEOUT_S: ClassVar[float] = 3.0
    """How long a lost link is retried before :class:`OIFITLACommunicationError`."""

    def __init__(
        self,
        name: str,
        address: str,
        *,
        baudrate: int = 9600,
        timeout: float = 1.0,
        power_max_w: float | None = None,
        pending_timeout_s: float = 60.0,
        poll_interval_s: float = 0.05,
        **kwargs: Unpack[InstrumentBaseKWArgs],
    ) -> None:
        super().__init__(name, **kwargs)
        self.address = address
        self.baudrate = baudrate
        self.timeout_s = float(timeout)
        self.pending_timeout_s = float(pending_timeout_s)
        self.poll_interval_s = float(poll_interval_s)
        self.reconnect_count = 0
        """Times the link was restored after being lost."""
        self._lock = threading.RLock()
        self._port: serial.SerialBase | None = None
        try:
            self._open_port()
            self.wait_until_ready()
            self._read_limits(power_max_w)
        except BaseException:
            self._close_port()
            raise

        # -- PWR 0x31, dBm·100 signed (Table 9.2-1) ---------------------------------------
        self.power: Parameter = self.add_parameter(
            "power",
            label="Optical power set point",
            unit="W",
            get_cmd=lambda: self.read_register(Register.PWR, signed=True),
            get_parser=_dbm100_to_w,
            set_cmd=lambda dbm100: self.write_register(Register.PWR, dbm100),
            set_parser=self._power_to_dbm100,
            vals=vals.Numbers(self.power_min_w, self.power_max_w),
            docstring=(
                "Optical power set point (W). The module takes dBm·100 (0.01 dB steps, "
                "rounded, never above power_max_w); allowed: [OPSL, min(OPSH, "
                "power_max_w)], read from the module."
            ),
        )
        """Optical power set point (W), within [OPSL, min(OPSH, power_max_w)]."""

        # -- OOP 0x42, dBm·100 signed ------------------------------------------------------
        self.output_power: Parameter = self.add_parameter(
            "output_power",
            label="Optical output power",
            unit="W",
            get_cmd=lambda: self.read_register(Register.OOP, signed=True),
            get_parser=_dbm100_to_w,
            docstring="Optical output power the module measures (W); instrument unit dBm·100.",
        )
        """Optical output power the module measures (W)."""

        # -- Channel 0x30; FCF1/FCF2 0x35/0x36; GRID 0x34 ---------------------------------
        self.channel: Parameter = self.add_parameter(
            "channel",
            label="Channel",
            unit="",
            get_cmd=lambda: self.read_register(Register.CHANNEL),
            set_cmd=self._set_channel,
            vals=vals.Ints(1, 0xFFFF),
            docstring=(
                "Channel number; frequency = first_channel_frequency + (channel − 1)·"
                "grid_spacing, checked against [LFL, LFH] before writing. Setting it "
                "with the output on retunes: the driver waits until NOP shows no pending "
                "operation."
            ),
        )
        """Channel number (1…65535); setting it waits for the tuning to finish."""
        self.first_channel_frequency: Parameter = self.add_parameter(
            "first_channel_frequency",
            label="First channel frequency",
            unit="Hz",
            get_cmd=lambda: self._read_frequency(Register.FCF1, Register.FCF2),
            set_cmd=self._set_first_channel_frequency,
            vals=vals.Numbers(self.frequency_min_hz, self.frequency_max_hz),
            docstring=(
                "Frequency of channel 1 (Hz), FCF1 (THz) + FCF2 (0.1 GHz), resolution "
                "0.1 GHz. Modules refuse it (CIE) while the output is on."
            ),
        )
        """Frequency of channel 1 (Hz); only settable with the output off."""
        self.grid_spacing: Parameter = self.add_parameter(
            "grid_spacing",
            label="Channel grid spacing",
            unit="Hz",
            get_cmd=lambda: self.read_register(Register.GRID, signed=True),
            get_parser=lambda ghz10: ghz10 * 1e8,
            set_cmd=lambda ghz10: self.write_register(Register.GRID, ghz10),
            set_parser=lambda hz: round(hz / 1e8),
            vals=vals.Numbers(-3276.8e9, 3276.7e9),
            docstring=(
                "Channel spacing (Hz), signed, instrument unit 0.1 GHz. Modules refuse "
                "it (CIE) while the output is on."
            ),
        )
        """Channel spacing (Hz); only settable with the output off."""

        # -- LF1/LF2 0x40/0x41, CTemp 0x43 -------------------------------------------------
        self.frequency: Parameter = self.add_parameter(
            "frequency",
            label="Laser frequency",
            unit="Hz",
            get_cmd=lambda: self._read_frequency(Register.LF1, Register.LF2),
            docstring="Frequency the laser is tuned to (Hz), LF1 (THz) + LF2 (0.1 GHz).",
        )
        """Frequency the laser is tuned to (Hz)."""
        self.wavelength: Parameter = self.add_parameter(
            "wavelength",
            label="Laser wavelength",
            unit="m",
            get_cmd=lambda: SPEED_OF_LIGHT_M_S / self.frequency.get(),
            docstring="Vacuum wavelength c / frequency (m).",
        )
        """Vacuum wavelength of the tuned frequency (m)."""
        self.temperature: Parameter = self.add_parameter(
            "temperature",
            label="Laser temperature",
            unit="°C",
            get_cmd=lambda: self.read_register(Register.CTEMP, signed=True),
            get_parser=lambda centi: centi / 100,
            docstring="Temperature the module regulates (°C); instrument unit °C·100.",
        )
        """Temperature the module regulates (°C)."""

        # -- ResEna 0x32, StatusF/StatusW 0x20/0x21 ---------------------------------------
        self.output_enabled: Parameter = self.add_parameter(
            "output_enabled",
            label="Output enabled (SENA)",
            get_cmd=lambda: bool(self.read_register(Register.RES_ENA) & ResEna.SENA),
            docstring="SENA bit of ResEna. Switch with output_on() / output_off().",
        )
        """SENA bit of ResEna (read-only; use output_on/off)."""
        self.status_fatal: Parameter = self.add_parameter(
            "status_fatal",
            label="Fatal status (StatusF)",
            get_cmd=lambda: self.read_register(Register.STATUS_F),
            docstring="StatusF register as an int; decode with alarms().",
        )
        """StatusF register (bit field, see :class:`~qkdlab.drivers.oif.frames.StatusBit`)."""
        self.status_warning: Parameter = self.add_parameter(
            "status_warning",
            label="Warning status (StatusW)",
            get_cmd=lambda: self.read_register(Register.STATUS_W),
            docstring="StatusW register as an int; decode with alarms().",
        )
        """StatusW register (bit field, warning twins of StatusF)."""

        # -- AEA strings -------------------------------------------------------------------
        self.device_type: Parameter = self.add_parameter(
            "device_type",
            label="Device type",
            get_cmd=lambda: self.read_string(Register.DEV_TYP),
            docstring="DevTyp (0x01) string, e.g. 'CW ITLA'.",
        )
        """DevTyp (0x01) string."""
        self.manufacturing_date: Parameter = self.add_parameter(
            "manufacturing_date",
            label="Manufacturing date",
            get_cmd=lambda: self.read_string(Register.MFG_DATE),
            docstring="MFGDate (0x05) string, vendor format.",
        )
        """MFGDate (0x05) string."""

        self.connect_message()

    # -- connection-time limits ------------------------------------------------------------
    def _read_limits(self, power_max_w: float | None) -> None:
        self.power_min_w = _dbm100_to_w(self.read_register(Register.OPSL, signed=True))
        """Lowest power set point the module accepts, OPSL (W)."""
        self.power_max_device_w = _dbm100_to_w(self.read_register(Register.OPSH, signed=True))
        """Highest power set point the module accepts, OPSH (W)."""
        self.frequency_min_hz = self._read_frequency(Register.LFL1, Register.LFL2)
        """Lowest frequency of the module, LFL1/LFL2 (Hz)."""
        self.frequency_max_hz = self._read_frequency(Register.LFH1, Register.LFH2)
        """Highest frequency of the module, LFH1/LFH2 (Hz)."""
        ceiling = self.power_max_device_w if power_max_w is None else float(power_max_w)
        if not ceiling >= self.power_min_w:
            raise ValueError(
                f"{self.full_name}: power_max_w={ceiling} W is below the module's lowest "
                f"power set point {self.power_min_w:.4g} W (OPSL)"
            )
        self.power_max_w = min(ceiling, self.power_max_device_w)
        """Hard ceiling of the power set point (W): min(OPSH, power_max_w)."""

    def _power_to_dbm100(self, watts: float) -> int:
        """dBm·100 nearest to ``watts``, one step lower if rounding crossed the ceiling."""
        dbm100 = _w_to_dbm100(watts)
        if _dbm100_to_w(dbm100) > self.power_max_w:
            dbm100 -= 1
        return dbm100

    # -- role: Laser ---------------------------------------------------------------------
    def output_on(self, power_w: float | None = None) -> None:
        """Enable the optical output (SENA) and wait until the module has settled.

        ``power_w`` (W), if given, is validated and set first.  Refuses (raises
        :class:`OIFITLAError`, nothing written) while a fatal alarm is set or when the
        module's power set point exceeds :attr:`power_max_w`.
        """
        if power_w is not None:
            self.power.validate(power_w)
        if not self.interlock_closed():
            raise OIFITLAError(
                f"{self.full_name}: output_on refused: fatal alarm set "
                f"(StatusF=0x{self.status_fatal.get():04X}: {', '.join(self.alarms()['fatal'])})"
            )
        if power_w is not None:
            self.power.set(power_w)
        setpoint = self.power.get()
        if setpoint > self.power_max_w * (1 + 1e-9):
            raise OIFITLAError(
                f"{self.full_name}: output_on refused: power set point {setpoint:.4g} W "
                f"exceeds the hard limit power_max_w={self.power_max_w:.4g} W"
            )
        self.write_register(Register.RES_ENA, int(ResEna.SENA))

    def output_off(self) -> None:
        """Disable the optical output (ResEna = 0: SENA cleared, no reset)."""
        self.write_register(Register.RES_ENA, 0)

    def is_on(self) -> bool:
        """True while SENA is set (the output is enabled)."""
        return bool(self.output_enabled.get())

    def interlock_closed(self) -> bool:
        """True when StatusF shows no FATAL and no present fatal condition.

        An ITLA has no interlock pin; its fatal alarms are the closest equivalent.
        """
        status = self.status_fatal.get()
        return not status & (StatusBit.FATAL | FATAL_CONDITION_BITS)

    def safe_state(self) -> None:
        """Output disabled (SENA = 0); harmless when already off."""
        self.output_off()

    # -- module control ------------------------------------------------------------------
    def reset(self) -> None:
        """Module reset (ResEna MR): the module reboots to its power-up settings.

        Waits until NOP reports the module ready (MRDY) again.  The output is off
        afterwards.
        """
        with self._lock:
            try:
                self._transact(Request(Register.RES_ENA, int(ResEna.MR), write=True))
            except OIFITLACommunicationError:
                self.log.info("no valid reply to the module reset (it may reboot at once)")
            self.wait_until_ready()

    def soft_reset(self) -> None:
        """Soft reset (ResEna SR): aborts transfers in progress (AEA), keeps settings.

        SENA is written back as it was, so the output stays as it is.
        """
        with self._lock:
            sena = self.read_register(Register.RES_ENA) & ResEna.SENA
            self.write_register(Register.RES_ENA, int(ResEna.SR | sena))

    def nop(self) -> NopStatus:
        """Read NOP: pending flags, module ready, error code of the last command."""
        with self._lock:
            return NopStatus.from_data(self._transact(Request(Register.NOP)).data)

    def wait_until_ready(self, timeout_s: float | None = None) -> None:
        """Poll NOP until MRDY is set and nothing is pending (s; default pending_timeout_s)."""
        timeout_s = self.pending_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.nop()
            if status.ready and not status.pending:
                return
            if time.monotonic() >= deadline:
                raise OIFITLAPendingTimeoutError(
                    f"{self.full_name}: module not ready after {timeout_s} s "
                    f"(NOP MRDY={int(status.ready)}, pending flags 0x{status.pending:02X})"
                )
            time.sleep(self.poll_interval_s)

    def alarms(self) -> dict[str, list[str]]:
        """Names of the StatusF and StatusW bits that are set, e.g. ``{'fatal': ['FATAL']}``."""
        names = {"fatal": self.status_fatal.get(), "warning": self.status_warning.get()}
        return {
            kind: [bit.name for bit in StatusBit if bit.name and value & bit]
            for kind, value in names.items()
        }

    def clear_alarms(self) -> None:
        """Clear the latched bits (7:0) of StatusF and StatusW (write 1 to clear)."""
        self.write_register(Register.STATUS_F, LATCHED_BITS)
        self.write_register(Register.STATUS_W, LATCHED_BITS)

    def get_idn(self) -> dict[str, str | None]:
        """Vendor (MFGR), model (Model), serial (SerNo) and firmware (Release) strings."""
        return {
            "vendor": self.read_string(Register.MFGR),
            "model": self.read_string(Register.MODEL),
            "serial": self.read_string(Register.SER_NO),
            "firmware": self.read_string(Register.RELEASE),
        }

    # -- register access -----------------------------------------------------------------
    def read_register(self, register: int, signed: bool = False) -> int:
        """Read one 16-bit register (two's complement when ``signed``)."""
        if register in STRING_REGISTERS:
            raise OIFITLAError(
                f"{self.full_name}: {register_name(register)} is a string; use read_string()"
            )
        response = self._command(register)
        if response.status is Status.AEA:
            raise OIFITLAError(
                f"{self.full_name}: read of {register_name(register)} answered AEA "
                f"({response.data} bytes) where a value was expected"
            )
        return from_u16(response.data) if signed else response.data

    def write_register(self, register: int, value: int) -> int:
        """Write ``value`` (int16 or uint16) and wait for a pending operation; returns the echo."""
        data = to_u16(value) if value < 0 else value
        return self._command(register, data, write=True).data

    def read_string(self, register: int) -> str:
        """Read an AEA string register (DevTyp, MFGR, Model, SerNo, MFGDate, Release...)."""
        with self._lock:
            response = self._command(register)
            if response.status is not Status.AEA:
                raise OIFITLAError(
                    f"{self.full_name}: read of {register_name(register)} answered "
                    f"{response.status.name}, not AEA: not a string register"
                )
            count = response.data
            if count > MAX_AEA_BYTES:
                raise OIFITLAError(
                    f"{self.full_name}: {register_name(register)} announced {count} AEA "
                    f"bytes (more than {MAX_AEA_BYTES}): corrupt reply"
                )
            raw = bytearray()
            for _ in range((count + 1) // 2):
                raw += self._command(Register.AEA_EAR).data.to_bytes(2, "big")
        text = bytes(raw[:count]).split(b"\x00", 1)[0]
        return text.decode("ascii", errors="replace").strip()

    # -- parameter helpers ---------------------------------------------------------------
    def _read_frequency(self, thz_register: Register, ghz10_register: Register) -> float:
        with self._lock:
            return frequency_hz(
                self.read_register(thz_register), self.read_register(ghz10_register)
            )

    def _set_first_channel_frequency(self, hz: float) -> None:
        thz, ghz10 = split_frequency(hz)
        with self._lock:
            self.write_register(Register.FCF1, thz)
            self.write_register(Register.FCF2, ghz10)

    def _set_channel(self, channel: int) -> None:
        with self._lock:
            first = self.first_channel_frequency.get()
            grid = self.grid_spacing.get()
            target = first + (channel - 1) * grid
            if not self.frequency_min_hz <= target <= self.frequency_max_hz:
                raise ValueError(
                    f"{self.channel.full_name}: channel {channel} is at "
                    f"{target / 1e12:.4f} THz (first channel {first / 1e12:.4f} THz, grid "
                    f"{grid / 1e9:.1f} GHz), outside the laser's band "
                    f"[{self.frequency_min_hz / 1e12:.4f}, {self.frequency_max_hz / 1e12:.4f}]"
                    " THz; nothing written"
                )
            self.write_register(Register.CHANNEL, channel)

    # -- protocol: status handling -------------------------------------------------------
    def _command(self, register: int, data: int = 0, write: bool = False) -> Response:
        """One command with XE → NOP error and CP → pending wait handled."""
        with self._lock:
            response = self._transact(Request(register, data, write))
            if response.status is Status.XE:
                self._raise_execution_error(register, data, write)
            if response.status is Status.CP:
                self._wait_pending(register)
            return response

    def _raise_execution_error(self, register: int, data: int, write: bool) -> None:
        code = NopStatus.from_data(self._transact(Request(Register.NOP)).data).error
        what = f"write of 0x{data:04X} to" if write else "read of"
        raise OIFITLAExecutionError(
            f"{self.full_name}: {what} {register_name(register)} rejected by the module "
            f"(XE, NOP error {nop_error_text(code)})",
            register=register,
            error_code=code,
        )

    def _wait_pending(self, register: int) -> None:
        deadline = time.monotonic() + self.pending_timeout_s
        while True:
            response = self._transact(Request(Register.NOP))
            status = NopStatus.from_data(response.data)
            if response.status is not Status.CP and not status.pending:
                if status.error:
                    raise OIFITLAExecutionError(
                        f"{self.full_name}: pending operation of {register_name(register)} "
                        f"ended with NOP error {nop_error_text(status.error)}",
                        register=register,
                        error_code=status.error,
                    )
                return
            if time.monotonic() >= deadline:
                raise OIFITLAPendingTimeoutError(
                    f"{self.full_name}: {register_name(register)} still pending after "
                    f"{self.pending_timeout_s} s (NOP pending flags 0x{status.pending:02X})"
                )
            time.sleep(self.poll_interval_s)

    # -- protocol: link ------------------------------------------------------------------
    def _transact(self, request: Request) -> Response:
        """One exchange; a timeout reopens the port, a lost link is restored and retried."""
        what = f"{'write' if request.write else 'read'} of {register_name(request.register)}"
        with self._lock:
            try:
                return self._exchange(request)
            except _NoReplyError:
                self._reopen_quietly()
                raise OIFITLATimeoutError(
                    f"{self.full_name}: no reply to the {what} within {self.timeout_s} s"
                ) from None
            except _LinkLostError as err:
                self.log.warning(f"link lost on the {what} ({err}); reconnecting")
                first_error: Exception = err
            self.reconnect()
            try:
                return self._exchange(request)
            except (_NoReplyError, _LinkLostError) as err:
                raise OIFITLACommunicationError(
                    f"{self.full_name}: the {what} failed again after reconnecting: {err}"
                ) from first_error

    def _exchange(self, request: Request) -> Response:
        """Send ``request`` and return the module's valid reply (checksum, CE retries)."""
        port = self._port
        if port is None:
            raise _LinkLostError("port closed")
        frame = request.encode()
        last_response = Request(request.register, request.data, request.write, True).encode()
        problem = ""
        for attempt in range(self.MAX_RETRIES + 1):
            self._send(port, frame if attempt == 0 or problem == "CE" else last_response)
            raw = self._receive(port)
            try:
                response = decode_response(raw)
            except FrameError as err:
                problem = f"{err}"
                continue
            if response.comm_error:
                problem = "CE"
                continue
            if response.register != request.register:
                problem = (
                    f"reply {raw.hex()} echoes register 0x{response.register:02X}, "
                    f"not 0x{request.register:02X}"
                )
                continue
            return response
        self._discard_input(port)
        reason = (
            "the module kept flagging a communication error (CE) on our packet"
            if problem == "CE"
            else f"last: {problem}"
        )
        raise OIFITLAChecksumError(
            f"{self.full_name}: no valid reply to the "
            f"{'write' if request.write else 'read'} of {register_name(request.register)} "
            f"after {self.MAX_RETRIES + 1} tries ({reason})"
        )

    @staticmethod
    def _send(port: serial.SerialBase, frame: bytes) -> None:
        try:
            port.reset_input_buffer()
            port.write(frame)
        except (serial.SerialException, OSError) as err:
            raise _LinkLostError(str(err)) from err

    @staticmethod
    def _receive(port: serial.SerialBase) -> bytes:
        try:
            raw = bytes(port.read(FRAME_BYTES))
        except (serial.SerialException, OSError) as err:
            raise _LinkLostError(str(err)) from err
        if len(raw) < FRAME_BYTES:
            raise _NoReplyError(raw.hex())
        return raw

    @staticmethod
    def _discard_input(port: serial.SerialBase) -> None:
        with contextlib.suppress(serial.SerialException, OSError):
            port.reset_input_buffer()

    def _open_port(self) -> None:
        self._port = serial.serial_for_url(
            self.address, baudrate=self.baudrate, timeout=self.timeout_s, write_timeout=None
        )

    def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is None:
            return
        sock = getattr(port, "_socket", None)
        if isinstance(sock, socket.socket):
            # pyserial 3.5's socket:// close() skips socket.close() when shutdown()
            # fails (peer already gone), leaking the socket, and then sleeps 0.3 s.
            # Close the socket here and mark the port closed.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            port._socket = None
            port.is_open = False
            return
        try:
            port.close()
        except (serial.SerialException, OSError) as err:
            self.log.debug(f"closing the port: {err}")

    def _reopen_quietly(self) -> None:
        """Drop the port (and any late reply in flight) and open it again."""
        self._close_port()
        try:
            self._open_port()
        except (serial.SerialException, OSError) as err:
            self.log.warning(f"could not reopen {self.address} after a timeout: {err}")

    def reconnect(self, timeout_s: float | None = None) -> None:
        """Reopen the port and check the module answers NOP, retrying until ``timeout_s`` (s).

        Raises :class:`OIFITLACommunicationError` if the module cannot be reached.
        """
        timeout_s = self.RECONNECT_TIMEOUT_S if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        with self._lock:
            while True:
                self._close_port()
                try:
                    self._open_port()
                    self._exchange(Request(Register.NOP))
                except (
                    serial.SerialException,
                    OSError,
                    _NoReplyError,
                    _LinkLostError,
                    OIFITLAChecksumError,
                ) as err:
                    last_error = err
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.05)
                    continue
                self.reconnect_count += 1
                return
        self._close_port()
        raise OIFITLACommunicationError(
            f"{self.full_name}: could not reconnect to {self.address} within {timeout_s} s"
        ) from last_error

    def close(self) -> None:
        """Close the serial port and remove the instrument (the output is left as is)."""
        with self._lock:
            self._close_port()
        super().close()
