"""QCoDeS driver for a polarization compensator of Thorlabs Elliptec ELL14 waveplate mounts.

Bob's polarization controller: three ELL14 motorised rotation mounts on one Elliptec
bus (one serial port, addresses ``0``…``F``) holding a quarter-, a half- and a
quarter-wave plate.  The three mount angles (degrees) are the actuators of the
:class:`~qkdlab.drivers.roles.PolarizationController` role.

Reference: *Elliptec Thorlabs — ELLx OEM/Bare modules protocol manual* ("ELLx Resonant
Piezo Motor Communication Protocol"), Issue 5 (Nov 2019; Dec 2020 print), read as
public transcripts; cited as [ELLx].  Its introduction fixes the link (9600 baud,
8 data bits, 1 stop bit, no parity, no handshake; multi-drop, default address ``0``;
lower-case host commands, upper-case replies, data in ASCII hex; replies end CR LF) and
its contents list names the messages below.  The body pages were not reachable from
this workplace: field layouts, hex widths and status codes were taken from open-source
drivers written against [ELLx] and from published ELL14 replies, which agree (e.g.
``2IN0E1140051720231701016800023000``: type 0x0E, 360° travel, 143360 pulses/rev).
Check them against [ELLx] before relying on an edge case.

==============================  ================================  ===========================
Driver member                   Message (A = address)             [ELLx] message
==============================  ================================  ===========================
``get_idn()``, ``mounts[k].``   ``Ain`` → ``AIN…``                _DEVGET_INFORMATION "IN"
``info()``
``mounts[k].status_code``       ``Ags`` → ``AGS<2 hex>``          _HOSTREQ_STATUS "gs",
                                                                  _DEVGET_STATUS "GS"
``mounts[k].angle`` (deg)       ``Agp`` / ``Ama<8 hex>`` → ``APO``  _HOST_GETPOSITION "gp",
                                                                  _HOSTREQ_MOVEABSOLUTE "ma"
``mounts[k].move_relative()``   ``Amr<8 hex>`` → ``APO``          _HOSTREQ_MOVERELATIVE "mr"
``mounts[k].home()``            ``Aho0`` → ``APO``                _HOSTREQ_HOME "ho"
``mounts[k].jog_step`` (deg)    ``Agj`` / ``Asj<8 hex>``          _HOSTREQ/_HOSTSET_JOGSTEPSIZE
``mounts[k].jog_forward()`` …   ``Afw`` / ``Abw`` → ``APO``       _HOST_FORWARD/_BACKWARD
``mounts[k].home_offset`` (deg) ``Ago`` / ``Aso<8 hex>``          _HOSTREQ/_HOSTSET_HOMEOFFSET
``mounts[k].velocity`` (%)      ``Agv`` / ``Asv<2 hex>``          _HOSTREQ/_HOSTSET_VELOCITY
==============================  ================================  ===========================

Units: the modules count encoder pulses (signed 32-bit, 8 hex digits); the driver
converts with the pulses per revolution each mount reports in ``IN`` (ELL14: 143360 per
360°), so angles are in degrees, rounded to one pulse (≈ 0.0025°).

Safety and limits
-----------------
* Angles are validated against ``angle_limits_deg`` (default 0…360°, the mount's one
  revolution) *before* anything is written; :meth:`ThorlabsELL14Compensator.set_actuators`
  checks every value first, so a bad list moves nothing.
* Moves are bounded: each ``angle`` parameter has ``step`` (``max_step_deg``, default
  10°) and ``inter_delay`` (``step_delay_s``), so a large change goes in steps that
  keep the state of polarization continuous for a running tracking loop.  Each ramp
  starts from a fresh ``gp`` read, never from a stale cache.
* :meth:`ThorlabsELL14Compensator.safe_state` moves nothing: waveplates are passive, a
  jump would spoil a running key exchange, and the mounts hold their angles unpowered.
  It only checks that every mount answers.

Errors
------
A ``GS`` reply with a non-zero code to a command raises :class:`ELL14StatusError`
naming the instrument, mount, message and code.  No reply within ``timeout`` raises
:class:`ELL14CommunicationError` naming the instrument and message; the port is then
reopened so that a late reply is never taken for the next answer.  An unreadable reply
raises :class:`ELL14CommunicationError` too.  A lost link (pyserial error) is restored
by :meth:`ThorlabsELL14Compensator.reconnect`, tried once automatically before the
message is sent again.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import serial
from qcodes import validators as vals
from qcodes.instrument import ChannelList, Instrument, InstrumentBaseKWArgs, InstrumentChannel
from qcodes.parameters import Parameter

if TYPE_CHECKING:
    from collections.abc import Sized
    from typing import Unpack

    from qcodes.utils.types import NumberType

BAUD_RATE = 9600
"""[ELLx] introduction: 9600 baud, 8N1, no handshake."""

STATUS_TEXT = {
    0: "OK, no error",
    1: "communication time out",
    2: "mechanical time out",
    3: "command error or not supported",
    4: "value out of range",
    5: "module isolated",
    6: "module out of isolation",
    7: "initialising error",
    8: "thermal error",
    9: "busy",
    10: "sensor error",
    11: "motor error",
    12: "out of range",
    13: "over current error",
}
"""``GS`` status codes ([ELLx] _DEVGET_STATUS)."""
STATUS_BUSY = 9

WAVEPLATES = ("qwp", "hwp")
"""Waveplate kinds a mount may hold (quarter-, half-wave)."""


class ELL14Error(Exception):
    """Base class of the errors this driver raises."""


class ELL14StatusError(ELL14Error):
    """A mount answered a command with a non-zero ``GS`` status code."""

    def __init__(self, message: str, address: str, code: int) -> None:
        super().__init__(message)
        self.address = address
        self.code = code


class ELL14CommunicationError(ELL14Error):
    """No reply in time, an unreadable reply, or a link that could not be restored."""


class _NoReplyError(Exception):
    """No complete reply line within the timeout."""


class _LinkLostError(Exception):
    """pyserial reported the port or socket gone."""


class _GarbageError(Exception):
    """Bytes that cannot belong to an Elliptec reply (ASCII letters, digits, CR LF)."""


_REPLY_BYTES = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n")


def _hex32(value: int) -> str:
    """Signed 32-bit value as 8 upper-case hex digits (two's complement)."""
    return f"{value & 0xFFFF_FFFF:08X}"


def _from_hex32(text: str) -> int:
    raw = int(text, 16)
    return raw - (1 << 32) if raw & 0x8000_0000 else raw


class _FreshRampParameter(Parameter):
    """A stepped parameter whose ramp starts from the mount's actual angle (a fresh read)."""

    def get_ramp_values(
        self, value: NumberType | Sized, step: NumberType | None = None
    ) -> Sequence[NumberType | Sized]:
        if step is not None:
            self.get()
        return super().get_ramp_values(value, step)


class ELL14Mount(InstrumentChannel):
    """One ELL14 rotation mount on the bus, holding one waveplate.

    Args:
        parent: the compensator (owns the serial port).
        name: channel name.
        address: bus address ``0``…``F``.
        waveplate: ``"qwp"`` or ``"hwp"`` (documentation and snapshot only).
        angle_limits_deg: allowed angle range (degrees).
        max_step_deg: largest single move of :attr:`angle` (degrees).
        step_delay_s: pause between the steps of a ramp (s).
    """

    def __init__(
        self,
        parent: ThorlabsELL14Compensator,
        name: str,
        address: str,
        waveplate: str,
        *,
        angle_limits_deg: tuple[float, float],
        max_step_deg: float,
        step_delay_s: float,
    ) -> None:
        super().__init__(parent, name)
        self.address = address
        self.waveplate = waveplate
        self._bus = parent
        info = self.info()
        self.serial_number: str = info["serial"]
        self.firmware: str = info["firmware"]
        self.pulses_per_rev: int = int(info["pulses_per_rev"])
        if self.pulses_per_rev <= 0:
            raise ELL14CommunicationError(
                f"{self.full_name}: mount {address} reports {self.pulses_per_rev} pulses/rev"
            )
        lo, hi = angle_limits_deg

        self.angle: Parameter = self.add_parameter(
            "angle",
            parameter_class=_FreshRampParameter,
            label=f"Mount {address} angle ({waveplate.upper()})",
            unit="deg",
            get_cmd=lambda: self._wrapped_deg(self._position("gp")),
            set_cmd=lambda deg: self._position("ma", _hex32(self._deg_to_pulses(deg))),
            vals=vals.Numbers(lo, hi),
            step=max_step_deg,
            inter_delay=step_delay_s,
            docstring=(
                "Fast-axis angle of the waveplate (deg, read back in [0, 360)): 'gp' / "
                "'ma' ([ELLx]), converted with the mount's pulses per revolution. "
                "Validated against angle_limits_deg before anything is written; changes "
                "go in steps of `step` deg, `inter_delay` s apart, from a fresh read."
            ),
        )
        """Mount angle (deg), bounded and ramped."""

        self.jog_step: Parameter = self.add_parameter(
            "jog_step",
            label=f"Mount {address} jog step",
            unit="deg",
            get_cmd=lambda: self._pulses_to_deg(self._query_hex32("gj", "GJ")),
            set_cmd=lambda deg: self._command("sj", _hex32(self._deg_to_pulses(deg))),
            vals=vals.Numbers(0.0, 360.0),
            docstring="Step of jog_forward()/jog_backward() (deg): 'gj' / 'sj' ([ELLx]).",
        )
        """Jog step size (deg)."""

        self.home_offset: Parameter = self.add_parameter(
            "home_offset",
            label=f"Mount {address} home offset",
            unit="deg",
            get_cmd=lambda: self._pulses_to_deg(self._query_hex32("go", "HO")),
            set_cmd=lambda deg: self._command("so", _hex32(self._deg_to_pulses(deg))),
            vals=vals.Numbers(0.0, 360.0),
            docstring="Offset of the home position (deg): 'go' / 'so' ([ELLx]).",
        )
        """Home offset (deg)."""

        self.velocity: Parameter = self.add_parameter(
            "velocity",
            label=f"Mount {address} velocity",
            unit="%",
            get_cmd=lambda: int(self._bus.transact(self.address, "gv", "", ("GV",))[1], 16),
            set_cmd=lambda pct: self._command("sv", f"{int(pct):02X}"),
            vals=vals.Ints(0, 100),
            docstring="Motor velocity, percent of the maximum: 'gv' / 'sv' ([ELLx]).",
        )
        """Velocity (% of maximum)."""

        self.status_code: Parameter = self.add_parameter(
            "status_code",
            label=f"Mount {address} status",
            unit="",
            get_cmd=lambda: int(
                self._bus.transact(self.address, "gs", "", ("GS",), check_status=False)[1], 16
            ),
            set_cmd=False,
            docstring="Last status code ('gs' → GS, [ELLx]); 0 = OK. See STATUS_TEXT.",
        )
        """Status code (0 = OK)."""

    # -- actions ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Decoded ``IN`` reply: type, serial, year, firmware, travel, pulses_per_rev."""
        code, data = self._bus.transact(self.address, "in", "", ("IN",))
        if len(data) < 30:
            raise ELL14CommunicationError(
                f"{self.full_name}: reply {self.address}{code}{data} to '{self.address}in' "
                "is too short for an IN record"
            )
        try:
            return {
                "type": int(data[0:2], 16),
                "serial": data[2:10],
                "year": data[10:14],
                "firmware": data[14:16],
                "thread": data[16],
                "hardware": data[17],
                "travel": int(data[18:22], 16),
                "pulses_per_rev": int(data[22:30], 16),
            }
        except ValueError:
            raise ELL14CommunicationError(
                f"{self.full_name}: unreadable IN record {data!r} from mount {self.address}"
            ) from None

    def home(self) -> float:
        """Home the mount (``ho0``, clockwise); returns the new angle (deg)."""
        return self._moved(self._position("ho", "0"))

    def move_relative(self, delta_deg: float) -> float:
        """Move by ``delta_deg`` (deg, ``mr``); returns the new angle (deg).

        Bounded like :attr:`angle`: ``|delta_deg|`` must not exceed ``angle.step``.
        """
        step = self.angle.step
        if step is not None and abs(delta_deg) > float(step):
            raise ValueError(
                f"{self.full_name}: relative move of {delta_deg} deg exceeds the step "
                f"bound of {step} deg; use angle.set() for larger changes"
            )
        return self._moved(self._position("mr", _hex32(self._deg_to_pulses(delta_deg))))

    def jog_forward(self) -> float:
        """Move one jog step forward (``fw``); returns the new angle (deg)."""
        return self._moved(self._position("fw"))

    def jog_backward(self) -> float:
        """Move one jog step backward (``bw``); returns the new angle (deg)."""
        return self._moved(self._position("bw"))

    # -- helpers -----------------------------------------------------------------------
    def _moved(self, pulses: int) -> float:
        """Angle after a move, in [0, 360) deg; the cached angle is invalidated."""
        self.angle.cache.invalidate()
        return self._wrapped_deg(pulses)

    def _wrapped_deg(self, pulses: int) -> float:
        """Mount angle in [0, 360) deg (the ELL14 turns continuously)."""
        return self._pulses_to_deg(pulses) % 360.0

    def _pulses_to_deg(self, pulses: int) -> float:
        return pulses * 360.0 / self.pulses_per_rev

    def _deg_to_pulses(self, deg: float) -> int:
        return round(deg * self.pulses_per_rev / 360.0)

    def _position(self, command: str, data: str = "") -> int:
        """Send a move or ``gp``; the ``PO`` position (pulses)."""
        return _from_hex32(self._bus.transact(self.address, command, data, ("PO",))[1])

    def _query_hex32(self, command: str, reply: str) -> int:
        return _from_hex32(self._bus.transact(self.address, command, "", (reply,))[1])

    def _command(self, command: str, data: str) -> None:
        """A setting acknowledged by ``GS00`` (non-zero codes raise in transact)."""
        self._bus.transact(self.address, command, data, ("GS",))


class ThorlabsELL14Compensator(Instrument):
    """Polarization compensator: ELL14 mounts with waveplates on one Elliptec bus.

    Satisfies :class:`qkdlab.drivers.roles.PolarizationController`: the actuators are the
    mount angles (deg), in the order light crosses the plates.

    Args:
        name: QCoDeS instrument name.
        address: pyserial port or URL (``/dev/ttyUSB0``, ``COM4``, ``socket://host:port``
            for the mock or a serial-to-Ethernet bridge).
        addresses: bus address of each mount, in the order light crosses them.
        waveplates: ``"qwp"``/``"hwp"`` per mount (default quarter, half, quarter).
        angle_limits_deg: hard limits of every angle (deg).
        max_step_deg: largest single move (deg); larger changes ramp.
        step_delay_s: pause between ramp steps (s).
        timeout: wait for one reply line (s).
        move_timeout: wait for a move to finish (s); a full ELL14 turn takes ~2 s.
        **kwargs: forwarded to :class:`~qcodes.instrument.Instrument`.
    """

    RECONNECT_TIMEOUT_S: ClassVar[float] = 3.0
    """How long a lost link is retried before :class:`ELL14CommunicationError`."""

    def __init__(
        self,
        name: str,
        address: str,
        *,
        addresses: Sequence[str] = ("0", "1", "2"),
        waveplates: Sequence[str] = ("qwp", "hwp", "qwp"),
        angle_limits_deg: tuple[float, float] = (0.0, 360.0),
        max_step_deg: float = 10.0,
        step_delay_s: float = 0.0,
        timeout: float = 1.0,
        move_timeout: float = 5.0,
        **kwargs: Unpack[InstrumentBaseKWArgs],
    ) -> None:
        if len(addresses) != len(waveplates) or not addresses:
            raise ValueError("addresses and waveplates need one entry per mount (at least one)")
        norm = [a.upper() for a in addresses]
        if any(len(a) != 1 or a not in "0123456789ABCDEF" for a in norm):
            raise ValueError(f"bus addresses must be single characters 0…F, got {list(addresses)}")
        if len(set(norm)) != len(norm):
            raise ValueError(f"duplicate bus addresses in {list(addresses)}")
        if any(w not in WAVEPLATES for w in waveplates):
            raise ValueError(f"waveplates must be among {WAVEPLATES}, got {list(waveplates)}")
        lo, hi = angle_limits_deg
        if not -360.0 <= lo < hi <= 720.0:
            raise ValueError(f"angle_limits_deg must satisfy -360 <= lo < hi <= 720, got {lo, hi}")
        if max_step_deg <= 0 or step_delay_s < 0:
            raise ValueError("max_step_deg must be > 0 and step_delay_s >= 0")
        super().__init__(name, **kwargs)
        self.address = address
        self.timeout_s = float(timeout)
        self.move_timeout_s = float(move_timeout)
        self.reconnect_count = 0
        """Times the link was restored after being lost."""
        self._lock = threading.RLock()
        self._port: serial.SerialBase | None = None
        mounts = ChannelList(self, "mounts", ELL14Mount)
        try:
            self._open_port()
            for k, (bus_address, plate) in enumerate(zip(norm, waveplates, strict=True)):
                mount = ELL14Mount(
                    self, f"mount{k}", bus_address, plate,
                    angle_limits_deg=(float(lo), float(hi)),
                    max_step_deg=float(max_step_deg), step_delay_s=float(step_delay_s),
                )  # fmt: skip
                mounts.append(mount)
                self.add_submodule(f"mount{k}", mount)
        except BaseException:
            self._close_port()
            raise
        self.mounts = self.add_submodule("mounts", mounts.to_channel_tuple())
        """The mounts, in the order light crosses them."""
        self.connect_message()

    # -- PolarizationController role ----------------------------------------------------
    def set_actuators(self, values: list[float]) -> None:
        """Mount angles (deg), one per mount; all validated before any mount moves.

        A mount whose cached angle already equals its target (within half a pulse) is
        not addressed; every other one moves through :attr:`ELL14Mount.angle` (bounded
        steps from a fresh read).
        """
        if len(values) != len(self.mounts):
            raise ValueError(
                f"{self.name}: set_actuators needs {len(self.mounts)} angles (deg), "
                f"got {len(values)}"
            )
        for mount, value in zip(self.mounts, values, strict=True):
            mount.angle.validate(value)
        for mount, value in zip(self.mounts, values, strict=True):
            cache = mount.angle.cache
            half_pulse = 180.0 / mount.pulses_per_rev
            known = cache.get(get_if_invalid=False) if cache.valid else None
            if known is not None and abs(float(known) - value) < half_pulse:
                continue  # already there: a loop that changes one actuator costs one move
            mount.angle.set(value)

    def get_actuators(self) -> list[float]:
        """Mount angles (deg), read from the mounts."""
        return [float(mount.angle.get()) for mount in self.mounts]

    def safe_state(self) -> None:
        """Leave the plates where they are (nothing to make safe); check every mount answers."""
        for mount in self.mounts:
            mount.status_code.get()

    def get_idn(self) -> dict[str, str | None]:
        """Vendor, model, serial numbers and firmware of the mounts (from ``IN``)."""
        mounts: Sequence[Any] = getattr(self, "mounts", ())
        return {
            "vendor": "Thorlabs",
            "model": "ELL14" + (f" x{len(mounts)}" if len(mounts) > 1 else ""),
            "serial": ",".join(m.serial_number for m in mounts) or None,
            "firmware": ",".join(m.firmware for m in mounts) or None,
        }

    # -- the bus --------------------------------------------------------------------------
    def transact(
        self,
        address: str,
        command: str,
        data: str,
        expect: tuple[str, ...],
        *,
        check_status: bool = True,
    ) -> tuple[str, str]:
        """Send ``<address><command><data>``; return (reply code, reply data).

        Waits for a reply from ``address`` whose code is in ``expect``; a ``GS`` reply
        with a non-zero code raises :class:`ELL14StatusError` unless ``check_status`` is
        False (``GS09``, busy, is waited out while a move runs).  Timeouts and unreadable
        replies raise :class:`ELL14CommunicationError`; a lost link is restored once and
        retried.
        """
        message = f"{address}{command}{data}"
        with self._lock:
            try:
                return self._exchange(message, address, expect, check_status)
            except _NoReplyError as err:
                self._reopen_quietly()
                raise ELL14CommunicationError(
                    f"{self.name}: no reply to {message!r} within {err} s (mount "
                    f"{address} absent, busy or switched off?)"
                ) from None
            except _GarbageError as err:
                self._reopen_quietly()
                raise ELL14CommunicationError(
                    f"{self.name}: unreadable reply {err} to {message!r}"
                ) from None
            except _LinkLostError as err:
                self.log.warning(f"link lost on {message!r} ({err}); reconnecting")
                first: Exception = err
            self.reconnect()
            try:
                return self._exchange(message, address, expect, check_status)
            except (_NoReplyError, _LinkLostError) as err:
                raise ELL14CommunicationError(
                    f"{self.name}: {message!r} failed again after reconnecting: {err}"
                ) from first

    def _exchange(
        self, message: str, address: str, expect: tuple[str, ...], check_status: bool = True
    ) -> tuple[str, str]:
        port = self._port
        if port is None:
            raise _LinkLostError("port closed")
        moving = message[1:3] in ("ma", "mr", "ho", "fw", "bw")
        wait_s = self.move_timeout_s if moving else self.timeout_s
        try:
            port.reset_input_buffer()
            port.write(message.encode("ascii"))
        except (serial.SerialException, OSError) as err:
            raise _LinkLostError(str(err)) from err
        deadline = time.monotonic() + wait_s
        while True:
            line = self._read_line(port, deadline, wait_s)
            try:
                text = line.decode("ascii").strip()
                reply_address, code, data = text[0].upper(), text[1:3], text[3:]
                if not code.isalpha() or not code.isupper():
                    raise ValueError(code)
            except (UnicodeDecodeError, IndexError, ValueError):
                self._discard_input(port)
                raise ELL14CommunicationError(
                    f"{self.name}: unreadable reply {line!r} to {message!r}"
                ) from None
            if reply_address != address:
                continue  # another module's message on the shared bus
            if code == "GS":
                status = self._status_of(data, line, message)
                if status == STATUS_BUSY and moving and "GS" not in expect:
                    continue
                if status != 0 and check_status:
                    text_code = STATUS_TEXT.get(status, "unknown status")
                    raise ELL14StatusError(
                        f"{self.name}: mount {address} answered {message!r} with status "
                        f"{status} ({text_code})",
                        address,
                        status,
                    )
            if code in expect:
                return code, data
            if code == "GS":
                continue  # GS00 before the awaited reply
            self._discard_input(port)
            raise ELL14CommunicationError(
                f"{self.name}: unexpected reply {text!r} to {message!r} (wanted {expect})"
            )

    def _status_of(self, data: str, line: bytes, message: str) -> int:
        try:
            return int(data, 16)
        except ValueError:
            raise ELL14CommunicationError(
                f"{self.name}: unreadable status {line!r} in reply to {message!r}"
            ) from None

    @staticmethod
    def _read_line(port: serial.SerialBase, deadline: float, wait_s: float) -> bytes:
        """One CR LF terminated line before ``deadline``."""
        buffer = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _NoReplyError(f"{wait_s:g}")
            port.timeout = min(remaining, 0.1)
            try:
                chunk = bytes(port.read(1))
                if chunk and chunk != b"\n":
                    chunk += bytes(port.read_until(b"\n", max(1, port.in_waiting)))
            except (serial.SerialException, OSError) as err:
                raise _LinkLostError(str(err)) from err
            buffer += chunk
            if not set(buffer) <= _REPLY_BYTES:
                raise _GarbageError(repr(buffer))
            if buffer.endswith(b"\n"):
                return buffer

    @staticmethod
    def _discard_input(port: serial.SerialBase) -> None:
        with contextlib.suppress(serial.SerialException, OSError):
            port.reset_input_buffer()

    # -- link ------------------------------------------------------------------------------
    def reconnect(self, timeout_s: float | None = None) -> None:
        """Reopen the port and check the first mount answers ``gs``, retrying until
        ``timeout_s`` (s); raises :class:`ELL14CommunicationError` if it does not."""
        timeout_s = self.RECONNECT_TIMEOUT_S if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        first = self.mounts[0].address if getattr(self, "mounts", None) else "0"
        last: Exception | None = None
        with self._lock:
            while True:
                self._close_port()
                try:
                    self._open_port()
                    self._exchange(f"{first}gs", first, ("GS",))
                except (serial.SerialException, OSError, _NoReplyError, _LinkLostError,
                        ELL14Error) as err:  # fmt: skip
                    last = err
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.05)
                    continue
                self.reconnect_count += 1
                self.log.info(f"reconnected to {self.address}")
                return
        self._close_port()
        raise ELL14CommunicationError(
            f"{self.name}: could not reconnect to {self.address} within {timeout_s} s"
        ) from last

    def _open_port(self) -> None:
        self._port = serial.serial_for_url(
            self.address, baudrate=BAUD_RATE, bytesize=8, parity="N", stopbits=1,
            timeout=self.timeout_s, write_timeout=None,
        )  # fmt: skip

    def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is None:
            return
        sock = getattr(port, "_socket", None)
        if isinstance(sock, socket.socket):
            # pyserial 3.5's socket:// close() leaks the socket when shutdown() fails
            # (peer gone) and then sleeps 0.3 s: close the socket here instead.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            port._socket = None
            port.is_open = False
            return
        with contextlib.suppress(serial.SerialException, OSError):
            port.close()

    def _reopen_quietly(self) -> None:
        """Drop the port (and any late reply in flight) and open it again."""
        self._close_port()
        try:
            self._open_port()
        except (serial.SerialException, OSError) as err:
            self.log.warning(f"could not reopen {self.address} after a timeout: {err}")

    def close(self) -> None:
        """Close the serial port and remove the instrument (the plates stay where they are)."""
        with self._lock:
            self._close_port()
        super().close()
