"""Mock Thorlabs MBX modulator bias controller with integrated VOA (MX / MBX command set).

Command set: *Remote Control User Guide for the MX / MBX / TLX1 / TLX2 Series*,
Thorlabs TTN116413-D04, Rev. E (May 5, 2022), chapter 2, for firmware V1.9.4 and later.
Only the parts an MBX has are modelled (its row of the compatibility table in chapter 2:
no RF amplifier, no laser): those headers answer ``Err: Feature not present``.

=========================================================  ===========================
Header (upper case = short form)                           Guide section
=========================================================  ===========================
``MZM:MODE[?]`` 0 off, 1 peak, 2 null, 3/4 quad ±, 5/6     2.4 (Mach–Zehnder bias)
hold quad ±, 7 manual, 8/9 power ratio ±
``MZM:HOLD:VOLTage[?]`` manual bias, integer mV ±10000     2.4
``MZM:HOLD:RATio[?]`` P_in/P_out × 100, integer 250…10000  2.4
``MZM:VOLTage?`` applied bias (V)                          2.4
``MZM:Dither:AMPLitude[?]`` mVpp 20…2000                   2.4
``MZM:Dither:FREQuency[?]`` Hz 1000…10000                  2.4
``MZM:SETpoint?``, ``MZM:CALibrating?``, ``MZM:RESET``     2.4
``MZM:TAP:MW?``, ``MZM:TAP:DBM?`` power after the MZM      2.4
``SYStem:MODEL?``, ``SERial?``, ``FIRMware?``,             2.5 (system)
``HARDware?``, ``BOOTloader?``, ``SYStem:RESTART``
``VOA:ATTen[?]`` dB 1.0…20.0                               2.6 (VOA)
``VOA:MODE[?]`` 0 constant attenuation, 1 constant power   2.6
``VOA:POWer[?]`` 0 off (VOA bias 0 V = least loss), 1 on   2.6
``VOA:OUTput:MW[?]`` 0.01…100 mW, ``VOA:OUTput:DBM[?]``    2.6
``VOA:ERRor?``, ``VOA:MEASured?``, ``VOA:SETpoint?``       2.6
``VOA:TAP:MW?``, ``VOA:TAP:DBM?`` power after the VOA      2.6
=========================================================  ===========================

Wire format (guide 2 and 2.1): a line ends in CR, LF, CR LF or LF CR; a setting is
``HEADER: value`` (the colon before the value is part of the syntax) and answers
``1``; a query answers its value; every reply ends in LF; a rejected line answers one
of the guide's ``Err: ...`` strings (2.1) — there is no error queue.

Choices the guide leaves open, made here and documented:

* Error strings: a malformed number ``Err: Data type error``; a number outside its
  range ``Err: Data out of range``; an unknown mode or a missing value ``Err:
  Parameter error``; an unknown header ``Err: Undefined header``.
* ``SYStem:RESTART`` gives no reply, restores the power-on state below and drops the
  link for :data:`RESTART_TIME_S` (the instrument reboots).
* Bias loop: entering an automatic mode, or ``MZM:RESET``, calibrates for
  ``lock_time_s`` (``MZM:CALibrating?`` = 1, bias held); then the peak / null /
  quadrature / power-ratio modes keep the bias on their point of the transfer curve,
  following the modulator phase φ(t) (see *Physics*); the *hold quad* modes find
  quadrature once and then hold that voltage without tracking.  Off = 0 V; manual =
  ``MZM:HOLD:VOLTage``.  The bias is limited to ±10 V; the tracking solution nearest
  the present bias is taken and folded back into range by 2·Vπ.  Dither amplitude and
  frequency are stored and reported; the mock's lock does not depend on them.
* ``MZM:SETpoint?`` is 1 in manual mode, and in an automatic mode once calibrated and
  within 0.05 rad of its target phase (a power ratio beyond the extinction ratio is
  never reached); 0 when off or calibrating.  ``VOA:SETpoint?`` is 1 within 0.1 dB.
* Power-on state: VOA on, constant attenuation, setpoint = the bench's VOA value
  (clamped to 1…20 dB), so starting the mock leaves the bench as it was; bias manual
  at the bench's bias; dither 200 mVpp at 5 kHz; power ratio 10.00.

Physics:

* Modulator: T(V) = ½·[1 + v·cos(π·V/Vπ + φ)], v from the extinction ratio, as in
  :mod:`qkdlab.mock_instruments.bench.optics`.  Peak: π·V/Vπ + φ ≡ 0; null: π;
  quadrature with positive slope (dT/dV > 0): −π/2, negative: +π/2; power ratio R:
  T = 1/R on the chosen slope.
* VOA: off → its insertion loss :data:`VOA_INSERTION_LOSS_DB` (the least attenuation);
  constant attenuation → the setpoint; constant power → the attenuation that gives the
  requested output, clamped to 1…20 dB.
* Taps: the MBX is taken to sit right after the laser (the bench's fixed attenuators
  follow it; all losses multiply, so the bench's μ is the same): ``MZM:TAP`` reads
  P_laser·T(V_bias) (DC transfer, no RF drive), ``VOA:TAP`` that times the VOA loss.

Bench coupling (every access is in :meth:`MockMBX._bench_inputs` and
:meth:`MockMBX._push_to_bench`): reads ``bench.alice.v_pi_v``,
``extinction_ratio_db``, ``laser_power_w``, ``laser_on``, ``im_phase_rad``,
``im_drift_rad_per_s`` and ``bench.now_s``; writes ``bench.alice.attenuation_db`` and
``bench.alice.im_bias_v`` under ``bench.lock``.  φ(t) is taken as ``im_phase_rad +
im_drift_rad_per_s·now_s`` — the bench keeps the random-walk part of φ private; if the
bench offers ``modulator_phase_rad()`` that is used instead.  The lock is re-evaluated
on every command and every :data:`TRACK_PERIOD_S` by the server, so within one
``bench.acquire(d)`` the bias is constant (a lock bandwidth of ~1/d).  Without a bench,
φ(t) = ``phase_rad + drift_rad_per_s·t`` on the mock's own clock, Vπ = 4 V, ER = 25 dB.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qkdlab.mock_instruments.bench.optics import (
    modulator_transmission,
    modulator_visibility,
)
from qkdlab.mock_instruments.server.faults import GARBAGE_REPLY
from qkdlab.mock_instruments.server.scpi import compile_header
from qkdlab.mock_instruments.server.tcp import Connection, TcpServer

# -- identity reported by the mock (SYStem:* queries) ----------------------------------
MODEL = "MBX"
SERIAL = "M00000001"
FIRMWARE = "1.9.6"
HARDWARE = "A"
BOOTLOADER = "1.0.0"

# -- ranges from the guide ---------------------------------------------------------------
BIAS_RANGE_MV = (-10_000, 10_000)  # MZM:HOLD:VOLTage (2.4)
RATIO_RANGE = (250, 10_000)  # MZM:HOLD:RATio, P_in/P_out × 100 (2.4)
DITHER_AMPLITUDE_RANGE_MVPP = (20, 2000)  # MZM:Dither:AMPLitude (2.4)
DITHER_FREQUENCY_RANGE_HZ = (1000, 10_000)  # MZM:Dither:FREQuency (2.4)
ATTENUATION_RANGE_DB = (1.0, 20.0)  # VOA:ATTen (2.6)
OUTPUT_RANGE_MW = (0.01, 100.0)  # VOA:OUTput:MW (2.6)
OUTPUT_RANGE_DBM = (-20.0, 20.0)  # VOA:OUTput:DBM = 10·log10 of the mW range

# -- mock constants ----------------------------------------------------------------------
VOA_INSERTION_LOSS_DB = 1.0
"""Loss of the VOA when powered off (dB): its least attenuation."""
BIAS_LIMIT_V = 10.0
"""Bias output range ±V."""
LOCK_TOLERANCE_RAD = 0.05
"""Phase error below which ``MZM:SETpoint?`` reports 1 (rad)."""
VOA_TOLERANCE_DB = 0.1
"""``VOA:SETpoint?`` tolerance (dB, guide 2.6)."""
RESTART_TIME_S = 0.2
"""Link down after ``SYStem:RESTART`` (s)."""
TRACK_PERIOD_S = 0.01
"""How often the server re-evaluates the bias loop (s)."""
COMMAND_LOG_LIMIT = 100_000
"""``MockMBX.commands`` keeps at most this many lines (the oldest half is dropped)."""
DEFAULT_LOCK_TIME_S = 0.2
"""Calibration time of the automatic bias modes (s)."""
STANDALONE_V_PI_V = 4.0
STANDALONE_EXTINCTION_DB = 25.0
STANDALONE_LASER_W = 1e-3

MODE_OFF, MODE_PEAK, MODE_NULL, MODE_QUAD_POS, MODE_QUAD_NEG = 0, 1, 2, 3, 4
MODE_HOLD_QUAD_POS, MODE_HOLD_QUAD_NEG, MODE_MANUAL, MODE_POWER_POS, MODE_POWER_NEG = (
    5,
    6,
    7,
    8,
    9,
)
TRACKING_MODES = {
    MODE_PEAK,
    MODE_NULL,
    MODE_QUAD_POS,
    MODE_QUAD_NEG,
    MODE_POWER_POS,
    MODE_POWER_NEG,
}
HOLD_MODES = {MODE_HOLD_QUAD_POS, MODE_HOLD_QUAD_NEG}

ERR_DATA_TYPE = "Err: Data type error"
ERR_RANGE = "Err: Data out of range"
ERR_PARAMETER = "Err: Parameter error"
ERR_UNDEFINED = "Err: Undefined header"
ERR_FEATURE = "Err: Feature not present"


class MBXReplyError(Exception):
    """A command handler's rejection; its text is the reply (``Err: ...``)."""


def _wrap_pi(x: float) -> float:
    """``x`` folded into (−π, π]."""
    return math.pi - (math.pi - x) % (2.0 * math.pi)


def _parse_int(text: str | None, lo: int, hi: int) -> int:
    if text is None or not text.strip():
        raise MBXReplyError(ERR_PARAMETER)
    if re.fullmatch(r"\s*[-+]?\d+\s*", text) is None:
        raise MBXReplyError(ERR_DATA_TYPE)
    value = int(text)
    if not lo <= value <= hi:
        raise MBXReplyError(ERR_RANGE)
    return value


def _parse_float(text: str | None, lo: float, hi: float) -> float:
    if text is None or not text.strip():
        raise MBXReplyError(ERR_PARAMETER)
    try:
        value = float(text)
    except ValueError:
        raise MBXReplyError(ERR_DATA_TYPE) from None
    if not math.isfinite(value):
        raise MBXReplyError(ERR_DATA_TYPE)
    if not lo <= value <= hi:
        raise MBXReplyError(ERR_RANGE)
    return value


def _mw_to_dbm(mw: float) -> float:
    return 10.0 * math.log10(max(mw, 1e-12))


@dataclass
class _Command:
    regex: re.Pattern[str]
    query: Callable[[], str] | None
    write: Callable[[str | None], None] | None


@dataclass
class _BenchInputs:
    phase_rad: float
    v_pi_v: float
    extinction_db: float
    laser_w: float


class MockMBX:
    """State, command table and physics of one MBX (see the module docstring).

    Args:
        bench: optional shared bench model (``qkdlab.mock_instruments.bench.Bench``).
        phase_rad: without a bench, the modulator phase φ at start (rad).
        drift_rad_per_s: without a bench, the linear drift of φ (rad/s).
        laser_w: without a bench, the optical power into the MBX (W).
        lock_time_s: calibration time of the automatic bias modes (s).
        clock: the instrument's time source (s); tests pass a fake one.

    Attributes a test may read (under :attr:`lock`): ``mode``, ``hold_mv``,
    ``bias_v``, ``voa_on``, ``voa_mode``, ``attenuation_setpoint_db``,
    ``commands`` (the lines received, in order, last :data:`COMMAND_LOG_LIMIT`).
    """

    def __init__(
        self,
        bench: Any = None,
        *,
        phase_rad: float = 0.0,
        drift_rad_per_s: float = 0.0,
        laser_w: float = STANDALONE_LASER_W,
        lock_time_s: float = DEFAULT_LOCK_TIME_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bench = bench
        self.phase_rad = phase_rad
        self.drift_rad_per_s = drift_rad_per_s
        self.laser_w = laser_w
        self.lock_time_s = lock_time_s
        self.clock = clock
        self.lock = threading.RLock()
        self.commands: list[str] = []
        self._t0 = clock()
        self._commands: list[_Command] = []
        self._register()
        self.power_on()

    # -- power-on state ---------------------------------------------------------------
    def power_on(self) -> None:
        """Restore the power-on state (module docstring), taking the bench's values."""
        with self.lock:
            bench_att, bench_bias = self._bench_settings()
            lo, hi = ATTENUATION_RANGE_DB
            self.voa_on = True
            self.voa_mode = 0
            self.attenuation_setpoint_db = min(max(bench_att, lo), hi)
            self.output_setpoint_mw = 1.0
            self.mode = MODE_MANUAL
            self.hold_mv = round(min(max(bench_bias, -BIAS_LIMIT_V), BIAS_LIMIT_V) * 1e3)
            self.bias_v = self.hold_mv / 1e3
            self.ratio = 1000
            self.dither_mvpp = 200
            self.dither_hz = 5000
            self._calibrated_at = self.clock()
            self._held_target: float | None = None
            self._update()

    # -- command table ------------------------------------------------------------------
    def _add(
        self,
        pattern: str,
        query: Callable[[], str] | None = None,
        write: Callable[[str | None], None] | None = None,
    ) -> None:
        self._commands.append(_Command(compile_header(pattern), query, write))

    def _register(self) -> None:
        # 2.4 Mach-Zehnder modulator bias control
        self._add("MZM:MODE", lambda: str(self.mode), self._write_mode)
        self._add("MZM:HOLD:VOLTage", lambda: str(self.hold_mv), self._write_hold)
        self._add("MZM:HOLD:RATio", lambda: str(self.ratio), self._write_ratio)
        self._add("MZM:VOLTage", lambda: f"{self.bias_v:.3f}")
        self._add(
            "MZM:Dither:AMPLitude",
            lambda: str(self.dither_mvpp),
            lambda t: setattr(self, "dither_mvpp", _parse_int(t, *DITHER_AMPLITUDE_RANGE_MVPP)),
        )
        self._add(
            "MZM:Dither:FREQuency",
            lambda: str(self.dither_hz),
            lambda t: setattr(self, "dither_hz", _parse_int(t, *DITHER_FREQUENCY_RANGE_HZ)),
        )
        self._add("MZM:SETpoint", lambda: "1" if self._bias_at_setpoint() else "0")
        self._add("MZM:CALibrating", lambda: "1" if self._calibrating() else "0")
        self._add("MZM:RESET", write=self._write_reset)
        self._add("MZM:TAP:MW", lambda: f"{self.mzm_output_w() * 1e3:.6f}")
        self._add("MZM:TAP:DBM", lambda: f"{_mw_to_dbm(self.mzm_output_w() * 1e3):.2f}")
        # 2.5 system
        self._add("SYStem:MODEL", lambda: MODEL)
        self._add("SYStem:SERial", lambda: SERIAL)
        self._add("SYStem:FIRMware", lambda: FIRMWARE)
        self._add("SYStem:HARDware", lambda: HARDWARE)
        self._add("SYStem:BOOTloader", lambda: BOOTLOADER)
        # 2.6 variable optical attenuator
        self._add("VOA:ATTen", lambda: f"{self.attenuation_setpoint_db:.2f}", self._write_att)
        self._add("VOA:MODE", lambda: str(self.voa_mode), self._write_voa_mode)
        self._add("VOA:POWer", lambda: "1" if self.voa_on else "0", self._write_voa_power)
        self._add("VOA:OUTput:MW", lambda: f"{self.output_setpoint_mw:.3f}", self._write_out_mw)
        self._add(
            "VOA:OUTput:DBM",
            lambda: f"{_mw_to_dbm(self.output_setpoint_mw):.2f}",
            self._write_out_dbm,
        )
        self._add("VOA:ERRor", lambda: f"{self.voa_attenuation_error_db():.2f}")
        self._add("VOA:MEASured", lambda: f"{self.voa_attenuation_db():.2f}")
        self._add("VOA:SETpoint", lambda: "1" if self._voa_at_setpoint() else "0")
        self._add("VOA:TAP:MW", lambda: f"{self.voa_output_w() * 1e3:.6f}")
        self._add("VOA:TAP:DBM", lambda: f"{_mw_to_dbm(self.voa_output_w() * 1e3):.2f}")

    # -- one line in, one reply out -------------------------------------------------------
    def handle_line(self, line: str) -> str | None:
        """Execute one command line; the reply (without terminator), None for a restart."""
        text = line.strip()
        with self.lock:
            self.commands.append(text)
            if len(self.commands) > COMMAND_LOG_LIMIT:
                del self.commands[: COMMAND_LOG_LIMIT // 2]
            try:
                reply = self._execute(text)
            except MBXReplyError as err:
                reply = str(err)
            self._update()
            return reply

    def _execute(self, text: str) -> str | None:
        upper = text.upper()
        if re.fullmatch(r"SYS(?:TEM)?:RESTART", upper):
            self.power_on()
            return None
        if upper.startswith(("AMP:", "LAS:", "LASER:")):
            raise MBXReplyError(ERR_FEATURE)
        if text.endswith("?"):
            header = text[:-1].strip()
            for command in self._commands:
                if command.query is not None and command.regex.fullmatch(header):
                    self._update()
                    return command.query()
            raise MBXReplyError(ERR_UNDEFINED)
        for command in self._commands:
            match = re.fullmatch(
                f"(?:{command.regex.pattern})(?::\\s*(.*))?", text, flags=re.IGNORECASE
            )
            if match is not None and command.write is not None:
                command.write(match.group(1))
                return "1"
        raise MBXReplyError(ERR_UNDEFINED)

    # -- writers ------------------------------------------------------------------------
    def _write_mode(self, text: str | None) -> None:
        if text is None or not text.strip():
            raise MBXReplyError(ERR_PARAMETER)
        if re.fullmatch(r"\s*\d+\s*", text) is None:
            raise MBXReplyError(ERR_DATA_TYPE)
        mode = int(text)
        if not 0 <= mode <= 9:
            raise MBXReplyError(ERR_PARAMETER)
        if mode != self.mode and (mode in TRACKING_MODES or mode in HOLD_MODES):
            self._start_calibration()
        self.mode = mode

    def _write_hold(self, text: str | None) -> None:
        self.hold_mv = _parse_int(text, *BIAS_RANGE_MV)

    def _write_ratio(self, text: str | None) -> None:
        self.ratio = _parse_int(text, *RATIO_RANGE)

    def _write_reset(self, text: str | None) -> None:
        if text:
            raise MBXReplyError(ERR_PARAMETER)
        self._start_calibration()

    def _write_att(self, text: str | None) -> None:
        self.attenuation_setpoint_db = round(_parse_float(text, *ATTENUATION_RANGE_DB), 2)

    def _write_voa_mode(self, text: str | None) -> None:
        if text is None or text.strip() not in ("0", "1"):
            raise MBXReplyError(ERR_PARAMETER)
        self.voa_mode = int(text)

    def _write_voa_power(self, text: str | None) -> None:
        if text is None or text.strip() not in ("0", "1"):
            raise MBXReplyError(ERR_PARAMETER)
        self.voa_on = text.strip() == "1"

    def _write_out_mw(self, text: str | None) -> None:
        self.output_setpoint_mw = _parse_float(text, *OUTPUT_RANGE_MW)

    def _write_out_dbm(self, text: str | None) -> None:
        self.output_setpoint_mw = 10.0 ** (_parse_float(text, *OUTPUT_RANGE_DBM) / 10.0)

    # -- bias loop ----------------------------------------------------------------------
    def _start_calibration(self) -> None:
        self._calibrated_at = self.clock() + self.lock_time_s
        self._held_target = None

    def _calibrating(self) -> bool:
        return (self.mode in TRACKING_MODES or self.mode in HOLD_MODES) and (
            self.clock() < self._calibrated_at
        )

    def _target_phase(self, visibility: float) -> tuple[float, bool]:
        """Target of π·V/Vπ + φ for the present mode (rad), and whether it is reachable."""
        if self.mode == MODE_PEAK:
            return 0.0, True
        if self.mode == MODE_NULL:
            return math.pi, True
        if self.mode in (MODE_QUAD_POS, MODE_HOLD_QUAD_POS):
            return -math.pi / 2.0, True
        if self.mode in (MODE_QUAD_NEG, MODE_HOLD_QUAD_NEG):
            return math.pi / 2.0, True
        # power ratio R = P_in/P_out: T = 1/R = ½·(1 + v·cos x)
        cos_x = (2.0 * 100.0 / self.ratio - 1.0) / visibility
        reachable = -1.0 <= cos_x <= 1.0
        x = math.acos(min(1.0, max(-1.0, cos_x)))
        return (-x if self.mode == MODE_POWER_POS else x), reachable

    def _solve_bias(self, target: float, phase: float, v_pi: float) -> float:
        """Bias nearest the present one with π·V/Vπ + φ ≡ target, folded into ±10 V."""
        period = 2.0 * v_pi
        base = (target - phase) * v_pi / math.pi
        volts = base + period * round((self.bias_v - base) / period)
        while volts > BIAS_LIMIT_V:
            volts -= period
        while volts < -BIAS_LIMIT_V:
            volts += period
        return max(-BIAS_LIMIT_V, min(BIAS_LIMIT_V, volts))

    def _update(self) -> None:
        """Re-evaluate the bias loop and push the optics into the bench."""
        with self.lock:
            inputs = self._bench_inputs()
            if self.mode == MODE_OFF:
                self.bias_v = 0.0
            elif self.mode == MODE_MANUAL:
                self.bias_v = self.hold_mv / 1e3
            elif not self._calibrating():
                vis = modulator_visibility(inputs.extinction_db)
                target, _ = self._target_phase(vis)
                if self.mode in HOLD_MODES:
                    if self._held_target is None:
                        self._held_target = self._solve_bias(
                            target, inputs.phase_rad, inputs.v_pi_v
                        )
                    self.bias_v = self._held_target
                else:
                    self.bias_v = self._solve_bias(target, inputs.phase_rad, inputs.v_pi_v)
            self._push_to_bench()

    def tick(self) -> None:
        """Periodic loop update (called by the server every :data:`TRACK_PERIOD_S`)."""
        self._update()

    def _bias_at_setpoint(self) -> bool:
        if self.mode == MODE_MANUAL:
            return True
        if self.mode == MODE_OFF or self._calibrating():
            return False
        inputs = self._bench_inputs()
        target, reachable = self._target_phase(modulator_visibility(inputs.extinction_db))
        error = _wrap_pi(math.pi * self.bias_v / inputs.v_pi_v + inputs.phase_rad - target)
        return reachable and abs(error) < LOCK_TOLERANCE_RAD

    # -- optics -------------------------------------------------------------------------
    def mzm_transmission(self) -> float:
        """DC transmission of the modulator at the present bias."""
        inputs = self._bench_inputs()
        vis = modulator_visibility(inputs.extinction_db)
        return float(modulator_transmission(self.bias_v, inputs.v_pi_v, vis, inputs.phase_rad))

    def mzm_output_w(self) -> float:
        """Power after the modulator (W), ``MZM:TAP``."""
        return self._bench_inputs().laser_w * self.mzm_transmission()

    def voa_attenuation_db(self) -> float:
        """Attenuation the VOA provides now (dB)."""
        lo, hi = ATTENUATION_RANGE_DB
        if not self.voa_on:
            return VOA_INSERTION_LOSS_DB
        if self.voa_mode == 0:
            return self.attenuation_setpoint_db
        p_in_mw = self.mzm_output_w() * 1e3
        if p_in_mw <= 0.0:
            return hi
        return min(hi, max(lo, 10.0 * math.log10(p_in_mw / self.output_setpoint_mw)))

    def voa_attenuation_error_db(self) -> float:
        """Provided minus set attenuation (dB), ``VOA:ERRor?``."""
        return self.voa_attenuation_db() - self.attenuation_setpoint_db

    def voa_output_w(self) -> float:
        """Power after the VOA (W), ``VOA:TAP``."""
        return self.mzm_output_w() * 10.0 ** (-self.voa_attenuation_db() / 10.0)

    def _voa_at_setpoint(self) -> bool:
        if not self.voa_on:
            return False
        if self.voa_mode == 0:
            return abs(self.voa_attenuation_db() - self.attenuation_setpoint_db) <= VOA_TOLERANCE_DB
        out_mw = self.voa_output_w() * 1e3
        return out_mw > 0 and abs(10.0 * math.log10(out_mw / self.output_setpoint_mw)) <= (
            VOA_TOLERANCE_DB
        )

    # -- the only places that touch the shared bench model ---------------------------------
    def _bench_settings(self) -> tuple[float, float]:
        """The bench's VOA attenuation (dB) and bias (V) at power-on (10 dB, 0 V without)."""
        if self.bench is None:
            return 10.0, 0.0
        alice = self.bench.alice
        return float(alice.attenuation_db), float(alice.im_bias_v)

    def _bench_inputs(self) -> _BenchInputs:
        """Modulator phase φ now (rad), Vπ (V), extinction ratio (dB), laser power (W)."""
        if self.bench is None:
            elapsed = self.clock() - self._t0
            return _BenchInputs(
                phase_rad=self.phase_rad + self.drift_rad_per_s * elapsed,
                v_pi_v=STANDALONE_V_PI_V,
                extinction_db=STANDALONE_EXTINCTION_DB,
                laser_w=self.laser_w,
            )
        bench = self.bench
        alice = bench.alice
        phase_fn = getattr(bench, "modulator_phase_rad", None)
        if callable(phase_fn):
            phase = float(phase_fn())
        else:
            phase = float(alice.im_phase_rad) + float(alice.im_drift_rad_per_s) * float(bench.now_s)
        return _BenchInputs(
            phase_rad=phase,
            v_pi_v=float(alice.v_pi_v),
            extinction_db=float(alice.extinction_ratio_db),
            laser_w=float(alice.laser_power_w) if alice.laser_on else 0.0,
        )

    def _push_to_bench(self) -> None:
        """Write the VOA attenuation (dB) and the modulator bias (V) into ``bench.alice``."""
        if self.bench is None:
            return
        attenuation = self.voa_attenuation_db()
        lock = getattr(self.bench, "lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            self.bench.alice.attenuation_db = attenuation
            self.bench.alice.im_bias_v = self.bias_v


class MBXServer(TcpServer):
    """Serves a :class:`MockMBX` on a TCP socket (pyvisa ``TCPIP::...::SOCKET``).

    Lines end in CR, LF or both; replies end in LF (guide chapter 2).  A thread calls
    :meth:`MockMBX.tick` every :data:`TRACK_PERIOD_S` while the server runs, so the
    bias loop follows the modulator phase even when nobody asks.
    """

    def __init__(self, name: str, instrument: MockMBX) -> None:
        super().__init__(name)
        self.instrument = instrument
        self._tracker: threading.Thread | None = None

    @property
    def address(self) -> str:
        """The pyvisa resource name of this server."""
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    def start(self) -> MBXServer:
        super().start()
        self._tracker = threading.Thread(
            target=self._track, name=f"mock-{self.name}-bias-loop", daemon=True
        )
        self._tracker.start()
        return self

    def stop(self) -> None:
        super().stop()
        if self._tracker is not None:
            self._tracker.join(timeout=2)

    def _track(self) -> None:
        while self.running:
            self.instrument.tick()
            time.sleep(TRACK_PERIOD_S)

    def serve(self, conn: Connection) -> None:
        buffer = b""
        while True:
            data = conn.recv()
            if data is None:
                return
            buffer += data
            while True:
                match = re.search(rb"[\r\n]", buffer)
                if match is None:
                    break
                raw, buffer = buffer[: match.start()], buffer[match.end() :]
                if not raw.strip():
                    continue
                reply = self.instrument.handle_line(raw.decode("ascii", errors="replace"))
                if reply is None:  # SYStem:RESTART: the instrument reboots
                    self.faults.drop_connection(refuse_for_s=RESTART_TIME_S)
                    return
                if not self._send_reply(conn, reply):
                    return

    def _send_reply(self, conn: Connection, reply: str) -> bool:
        delay, garbage, mute = self.faults.take_reply_fault()
        if mute:
            return True
        if delay:
            time.sleep(delay)
        payload = GARBAGE_REPLY if garbage else reply.encode("ascii")
        return conn.send(payload + b"\n")


def serve(name: str, bench: Any = None, options: Mapping[str, str] | None = None) -> MBXServer:
    """Factory for :mod:`qkdlab.mock_instruments.launcher`: an unstarted server.

    ``options`` (``mock://thorlabs/mbx?lock_time_s=0.1``): ``lock_time_s``, and without
    a bench ``phase_rad``, ``drift_rad_per_s``, ``laser_w``.
    """
    opts = dict(options or {})
    known = ("lock_time_s", "phase_rad", "drift_rad_per_s", "laser_w")
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(f"unknown MBX mock option(s): {', '.join(unknown)}")
    values = {key: float(opts[key]) for key in known if key in opts}
    instrument = MockMBX(
        bench,
        lock_time_s=values.get("lock_time_s", DEFAULT_LOCK_TIME_S),
        phase_rad=values.get("phase_rad", 0.0),
        drift_rad_per_s=values.get("drift_rad_per_s", 0.0),
        laser_w=values.get("laser_w", STANDALONE_LASER_W),
    )
    return MBXServer(name, instrument)
