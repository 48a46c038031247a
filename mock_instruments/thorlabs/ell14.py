"""Mock bus of Thorlabs Elliptec ELL14 rotation mounts holding waveplates (Bob's compensator).

Command set: *Elliptec Thorlabs — ELLx OEM/Bare modules protocol manual* ("ELLx Resonant
Piezo Motor Communication Protocol"), Issue 5 (Nov 2019 / Dec 2020 print): a multi-drop
bus at 9600 baud, 8N1; a host message is one address character (``0``…``F``), a
two-letter **lower-case** command and its data in upper-case ASCII hex, with no
terminator; a module answers with its address, an **upper-case** reply code and data,
ending in CR LF.  The manual's contents list names the messages used here
(``_DEVGET_INFORMATION "IN"``, ``_HOSTREQ_STATUS "gs"`` / ``_DEVGET_STATUS "GS"``,
``_HOSTREQ_HOME "ho"``, ``_HOSTREQ_MOVEABSOLUTE "ma"``, ``_HOSTREQ_MOVERELATIVE "mr"``,
``_HOST_GETPOSITION "gp"`` / ``_DEV_GETPOSITION "PO"``, ``_HOSTREQ_HOMEOFFSET "go"``,
``_HOSTSET_HOMEOFFSET "so"``, ``_HOSTREQ_JOGSTEPSIZE "gj"``, ``_HOSTSET_JOGSTEPSIZE
"sj"``, ``_HOST_FORWARD "fw"``, ``_HOST_BACKWARD "bw"``, ``_HOSTREQ_VELOCITY "gv"``,
``_HOSTSET_VELOCITY "sv"``).  The manual's body pages were not readable from this
workplace; field layouts and status codes below were taken from open-source drivers
written against it and from published module replies, and agree between them.

===================  =========================  =========================================
Host message         Reply                      Meaning
===================  =========================  =========================================
``Ain``              ``AIN`` + 30 chars         type (2 hex, ELL14 = ``0E``), serial (8),
                                                year (4), firmware (2), thread (1),
                                                hardware (1), travel (4 hex, 360),
                                                pulses per revolution (8 hex, 143360)
``Ags``              ``AGS`` + 2 hex            status code (table below)
``Agp``              ``APO`` + 8 hex            position (pulses, signed 32-bit)
``Ama`` + 8 hex      ``APO`` + 8 hex            move to an absolute position
``Amr`` + 8 hex      ``APO`` + 8 hex            move by a signed number of pulses
``Aho`` + 1 digit    ``APO`` + 8 hex            home (digit = direction, rotary mounts)
``Afw`` / ``Abw``    ``APO`` + 8 hex            move one jog step forward / backward
``Agj`` / ``Asj``…   ``AGJ`` + 8 hex / ``AGS``  jog step size (pulses)
``Ago`` / ``Aso``…   ``AHO`` + 8 hex / ``AGS``  home offset (pulses)
``Agv`` / ``Asv``…   ``AGV`` + 2 hex / ``AGS``  velocity (% of maximum, 2 hex)
``Aus``              ``AGS00``                  save user data
===================  =========================  =========================================

Status codes (``GS``): 0 OK, 1 communication time-out, 2 mechanical time-out, 3 command
error or not supported, 4 value out of range, 5 module isolated, 6 module out of
isolation, 7 initialising error, 8 thermal error, 9 busy, 10 sensor error, 11 motor
error, 12 out of range, 13 over current.

Choices the manual leaves to the hardware, made here and documented:

* A message for an address no module has is ignored (nothing answers on the bus).  A
  known address with an unknown command, or data that is not hex, answers ``GS03``; a
  velocity above 100 % answers ``GS04``.  Bytes before a valid address character (CR,
  LF, garbage) are skipped.
* Moves finish at once (no busy period); the ELL14 is a continuous rotation mount, so
  every position is taken modulo one revolution (143360 pulses) and ``PO`` reports
  0…143359.  The home offset is stored and reported only: position 0 is the mount's
  zero.
* One bus serves every connection (the modules keep their positions across a dropped
  link, as real ones do while powered).

Physics (Bob's polarization compensator):

* Each mount holds a waveplate of retardance δ_k (quarter-wave π/2 or half-wave π, mock
  option ``plates``) whose fast axis sits at the mount angle θ_k plus a fixed mounting
  offset (option ``axis_offsets_deg``).  On the Poincaré sphere the plate is a rotation
  by δ_k about the equatorial axis (cos 2θ, sin 2θ, 0), right-handed (the sense of
  :func:`~qkdlab.mock_instruments.bench.optics.rotation_about_axis`).
* Light crosses the plates in address order, so the controller's rotation is
  R_c = R_n ⋯ R_2·R_1.  With the default quarter-, half-, quarter-wave stack any SO(3)
  rotation is reachable (Simon & Mukunda, Phys. Lett. A 143, 165 (1990)), so the
  compensator can undo the fibre's R(t).
* :meth:`ELL14Bus._push_to_bench` (the only place that touches the bench) writes R_c
  into ``bench.bob.pc_rotation`` under ``bench.lock`` after every move.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from qkdlab.mock_instruments.server.raw import ByteProtocol, SerialSocketServer

log = logging.getLogger(__name__)

PULSES_PER_REV = 143_360
"""ELL14 encoder pulses per revolution (``IN`` reply, 0x00023000)."""
TRAVEL_DEG = 360
"""ELL14 travel reported by ``IN`` (degrees, 0x0168)."""
MOTOR_TYPE = 0x0E
"""Device type of an ELL14 in the ``IN`` reply."""
DEFAULT_JOG_PULSES = 0x0000_2300
"""Power-on jog step (pulses, 22.5°)."""
DEFAULT_VELOCITY_PCT = 100

STATUS_OK = 0
STATUS_COMMAND_ERROR = 3
STATUS_VALUE_OUT_OF_RANGE = 4

RETARDANCE_RAD = {"qwp": math.pi / 2, "hwp": math.pi}
"""Retardance of each waveplate kind (rad)."""

# data characters each host command carries (the bus has no terminator)
_DATA_LENGTH = {
    "in": 0, "gs": 0, "gp": 0, "gj": 0, "go": 0, "gv": 0, "fw": 0, "bw": 0, "us": 0,
    "ma": 8, "mr": 8, "sj": 8, "so": 8, "sv": 2, "ho": 1,
}  # fmt: skip
_HEX = set("0123456789ABCDEFabcdef")


def _hex32(value: int) -> str:
    """Signed 32-bit value as 8 upper-case hex digits (two's complement)."""
    return f"{value & 0xFFFF_FFFF:08X}"


def _from_hex32(text: str) -> int:
    """8 hex digits as a signed 32-bit value."""
    raw = int(text, 16)
    return raw - (1 << 32) if raw & 0x8000_0000 else raw


def retarder_rotation(axis_angle_rad: float, retardance_rad: float) -> npt.NDArray[np.float64]:
    """Poincaré-sphere rotation of a linear retarder (fast axis at ``axis_angle_rad``)."""
    two = 2.0 * axis_angle_rad
    n = np.array([math.cos(two), math.sin(two), 0.0])
    k = np.array([[0.0, -n[2], n[1]], [n[2], 0.0, -n[0]], [-n[1], n[0], 0.0]])
    out: npt.NDArray[np.float64] = (
        np.eye(3) + math.sin(retardance_rad) * k + (1.0 - math.cos(retardance_rad)) * (k @ k)
    )
    return out


@dataclass
class MountState:
    """One ELL14 on the bus (positions in pulses)."""

    address: str
    serial: str
    plate: str
    axis_offset_deg: float = 0.0
    position: int = 0
    jog: int = DEFAULT_JOG_PULSES
    home_offset: int = 0
    velocity_pct: int = DEFAULT_VELOCITY_PCT
    status: int = STATUS_OK
    moves: list[int] = field(default_factory=list)
    """Every position a move ended at (pulses), for tests."""

    @property
    def angle_deg(self) -> float:
        """Mount angle (degrees)."""
        return self.position * 360.0 / PULSES_PER_REV

    def rotation(self) -> npt.NDArray[np.float64]:
        """This plate's Poincaré-sphere rotation at the present angle."""
        axis = math.radians(self.angle_deg + self.axis_offset_deg)
        return retarder_rotation(axis, RETARDANCE_RAD[self.plate])


class ELL14Bus(ByteProtocol):
    """Several ELL14 mounts sharing one serial line (see the module docstring).

    Args:
        bench: optional shared bench model; every move updates ``bench.bob.pc_rotation``.
        addresses: bus address of each mount, in the order light crosses them.
        plates: ``"qwp"`` or ``"hwp"`` per mount.
        axis_offsets_deg: fast-axis angle of each plate at mount angle 0 (degrees).

    Attributes a test may read or change (under :attr:`lock`): :attr:`mounts` (address →
    :class:`MountState`), :attr:`received` (every host message, in order).
    """

    def __init__(
        self,
        bench: Any = None,
        *,
        addresses: Sequence[str] = ("0", "1", "2"),
        plates: Sequence[str] = ("qwp", "hwp", "qwp"),
        axis_offsets_deg: Sequence[float] | None = None,
    ) -> None:
        offsets = list(axis_offsets_deg) if axis_offsets_deg is not None else [0.0] * len(plates)
        if not len(addresses) == len(plates) == len(offsets):
            raise ValueError("addresses, plates and axis_offsets_deg need one entry per mount")
        for address in addresses:
            if len(address) != 1 or address.upper() not in "0123456789ABCDEF":
                raise ValueError(f"bus address {address!r} is not one of 0…F")
        if len({a.upper() for a in addresses}) != len(addresses):
            raise ValueError(f"duplicate bus addresses in {list(addresses)}")
        for plate in plates:
            if plate not in RETARDANCE_RAD:
                known = sorted(RETARDANCE_RAD)
                raise ValueError(f"unknown waveplate {plate!r}; choose from {known}")
        self.bench = bench
        self.lock = threading.RLock()
        self.mounts: dict[str, MountState] = {
            a.upper(): MountState(a.upper(), f"1140{5170 + i:04d}", p, float(o))
            for i, (a, p, o) in enumerate(zip(addresses, plates, offsets, strict=True))
        }
        self.order = [a.upper() for a in addresses]
        self.received: list[str] = []
        self._buffer = ""
        self._push_to_bench()

    # -- the byte stream --------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        """Consume bytes from the host; return the replies of every complete message."""
        replies: list[str] = []
        with self.lock:
            self._buffer += data.decode("ascii", errors="replace")
            while True:
                message = self._next_message()
                if message is None:
                    break
                reply = self._execute(message)
                if reply is not None:
                    replies.append(reply + "\r\n")
        return "".join(replies).encode("ascii")

    def _next_message(self) -> str | None:
        """Cut the next complete host message off the buffer (None: need more bytes)."""
        while self._buffer and self._buffer[0].upper() not in "0123456789ABCDEF":
            self._buffer = self._buffer[1:]  # CR/LF or noise between messages
        if len(self._buffer) < 3:
            return None
        command = self._buffer[1:3]
        length = _DATA_LENGTH.get(command, 0)
        if len(self._buffer) < 3 + length:
            return None
        message, self._buffer = self._buffer[: 3 + length], self._buffer[3 + length :]
        return message

    def _execute(self, message: str) -> str | None:
        self.received.append(message)
        address, command, data = message[0].upper(), message[1:3], message[3:]
        mount = self.mounts.get(address)
        if mount is None:
            return None  # nobody at that address
        if command not in _DATA_LENGTH or any(c not in _HEX for c in data):
            return self._status(mount, STATUS_COMMAND_ERROR)
        handler = getattr(self, f"_cmd_{command}")
        reply: str = handler(mount, data)
        return reply

    # -- commands ---------------------------------------------------------------------
    def _status(self, mount: MountState, code: int) -> str:
        mount.status = code
        return f"{mount.address}GS{code:02X}"

    def _position(self, mount: MountState) -> str:
        return f"{mount.address}PO{_hex32(mount.position)}"

    def _move_to(self, mount: MountState, pulses: int) -> str:
        mount.position = pulses % PULSES_PER_REV
        mount.moves.append(mount.position)
        mount.status = STATUS_OK
        self._push_to_bench()
        return self._position(mount)

    def _cmd_in(self, mount: MountState, _data: str) -> str:
        return (
            f"{mount.address}IN{MOTOR_TYPE:02X}{mount.serial}2023170"
            f"1{TRAVEL_DEG:04X}{PULSES_PER_REV:08X}"
        )

    def _cmd_gs(self, mount: MountState, _data: str) -> str:
        code, mount.status = mount.status, STATUS_OK
        return f"{mount.address}GS{code:02X}"

    def _cmd_gp(self, mount: MountState, _data: str) -> str:
        return self._position(mount)

    def _cmd_ma(self, mount: MountState, data: str) -> str:
        return self._move_to(mount, _from_hex32(data))

    def _cmd_mr(self, mount: MountState, data: str) -> str:
        return self._move_to(mount, mount.position + _from_hex32(data))

    def _cmd_ho(self, mount: MountState, _data: str) -> str:
        return self._move_to(mount, 0)

    def _cmd_fw(self, mount: MountState, _data: str) -> str:
        return self._move_to(mount, mount.position + mount.jog)

    def _cmd_bw(self, mount: MountState, _data: str) -> str:
        return self._move_to(mount, mount.position - mount.jog)

    def _cmd_gj(self, mount: MountState, _data: str) -> str:
        return f"{mount.address}GJ{_hex32(mount.jog)}"

    def _cmd_sj(self, mount: MountState, data: str) -> str:
        mount.jog = _from_hex32(data)
        return self._status(mount, STATUS_OK)

    def _cmd_go(self, mount: MountState, _data: str) -> str:
        return f"{mount.address}HO{_hex32(mount.home_offset)}"

    def _cmd_so(self, mount: MountState, data: str) -> str:
        mount.home_offset = _from_hex32(data)
        return self._status(mount, STATUS_OK)

    def _cmd_gv(self, mount: MountState, _data: str) -> str:
        return f"{mount.address}GV{mount.velocity_pct:02X}"

    def _cmd_sv(self, mount: MountState, data: str) -> str:
        value = int(data, 16)
        if value > 100:
            return self._status(mount, STATUS_VALUE_OUT_OF_RANGE)
        mount.velocity_pct = value
        return self._status(mount, STATUS_OK)

    def _cmd_us(self, mount: MountState, _data: str) -> str:
        return self._status(mount, STATUS_OK)

    # -- physics ----------------------------------------------------------------------
    def rotation(self) -> npt.NDArray[np.float64]:
        """Controller rotation R_c = R_n ⋯ R_1 (light crosses the mounts in address order)."""
        with self.lock:
            out = np.eye(3)
            for address in self.order:
                out = self.mounts[address].rotation() @ out
            return out

    def angles_deg(self) -> list[float]:
        """Mount angles in bus order (degrees)."""
        with self.lock:
            return [self.mounts[a].angle_deg for a in self.order]

    # -- the one place that touches the shared bench model ----------------------------
    def _push_to_bench(self) -> None:
        """Write R_c into ``bench.bob.pc_rotation`` (3×3), under ``bench.lock`` if it has one.

        A bench that refuses is logged, never raised into the serial session.
        """
        if self.bench is None:
            return
        rotation = self.rotation()
        lock = getattr(self.bench, "lock", None)
        try:
            with lock if lock is not None else contextlib.nullcontext():
                self.bench.bob.pc_rotation = rotation
        except Exception:
            log.exception("ELL14 mock: cannot write the compensator rotation into the bench")


def serve(
    name: str, bench: Any = None, options: Mapping[str, str] | None = None
) -> SerialSocketServer:
    """Factory for :mod:`qkdlab.mock_instruments.launcher`: an unstarted server.

    Options (``mock://thorlabs/ell14?addresses=0,1,2&plates=qwp,hwp,qwp&axis_offsets_deg=0,0,0``):
    bus addresses in the order light crosses the mounts, the waveplate in each, and each
    plate's fast-axis angle at mount angle 0 (degrees).
    """
    opts = dict(options or {})
    addresses = opts.pop("addresses", "0,1,2").split(",")
    plates = [p.strip().lower() for p in opts.pop("plates", "qwp,hwp,qwp").split(",")]
    offsets_text = opts.pop("axis_offsets_deg", None)
    offsets = (
        [float(x) for x in offsets_text.split(",")] if offsets_text is not None else None
    )
    if opts:
        raise ValueError(f"unknown ELL14 mock option(s): {', '.join(sorted(opts))}")
    bus = ELL14Bus(
        bench, addresses=[a.strip() for a in addresses], plates=plates, axis_offsets_deg=offsets
    )
    return SerialSocketServer(name, bus)
