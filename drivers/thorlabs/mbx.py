"""QCoDeS driver for the Thorlabs MBX modulator bias controller with integrated VOA.

Reference: *Remote Control User Guide for the MX / MBX / TLX1 / TLX2 Series*, Thorlabs
document TTN116413-D04, Rev. E (May 5, 2022), chapter 2 "Supported Commands" (firmware
V1.9.4 and later).  The MBX row of the guide's compatibility table lists the
Mach–Zehnder bias (2.4), system (2.5) and VOA (2.6) commands; the MX10B/MX40B
transmitters take the same commands.  Only documented commands are sent, in their
full upper-case long form (the guide accepts the short form or every character).

Sections 2.1 (return codes), 2.6 (VOA) and the chapter-2 preamble (syntax,
terminators) were read in the guide itself.  The pages of sections 2.4 and 2.5 were not
reachable from this workplace; their headers, ranges and scalings below were taken
from two independent open-source drivers written from the same guide (PyMeasure's
``thorlabsmbxseries`` with its protocol tests, and a pyserial MX10B class) and agree
between them.  Check them against 2.4/2.5 of the printed guide.

==========================================  ======================================  =======
Driver member                               Command(s) sent                         Guide
==========================================  ======================================  =======
``IDN`` / ``get_idn()``                     ``SYSTEM:MODEL?``, ``SYSTEM:SERIAL?``,  2.5
                                            ``SYSTEM:FIRMWARE?``
``restart()``                               ``SYSTEM:RESTART``                      2.5
``bias_mode``                               ``MZM:MODE? / MZM:MODE: <0…9>``         2.4
``bias_setpoint`` (V, ramped)               ``MZM:HOLD:VOLTAGE? / : <mV>``          2.4
``bias_voltage`` (V)                        ``MZM:VOLTAGE?``                        2.4
``bias_power_ratio``                        ``MZM:HOLD:RATIO? / : <ratio×100>``     2.4
``bias_locked``                             ``MZM:SETPOINT?``                       2.4
``bias_calibrating``                        ``MZM:CALIBRATING?``                    2.4
``recalibrate_bias()``                      ``MZM:RESET``                           2.4
``dither_amplitude`` (V peak-to-peak)       ``MZM:DITHER:AMPLITUDE? / : <mVpp>``    2.4
``dither_frequency`` (Hz)                   ``MZM:DITHER:FREQUENCY? / : <Hz>``      2.4
``mzm_output_power`` (W)                    ``MZM:TAP:MW?``                         2.4
``attenuation`` (dB)                        ``VOA:ATTEN? / VOA:ATTEN: <dB>``        2.6
``attenuation_measured`` (dB)               ``VOA:MEASURED?``                       2.6
``attenuation_error`` (dB)                  ``VOA:ERROR?``                          2.6
``voa_mode``                                ``VOA:MODE? / VOA:MODE: <0|1>``         2.6
``voa_enabled``                             ``VOA:POWER? / VOA:POWER: <0|1>``       2.6
``voa_settled``                             ``VOA:SETPOINT?``                       2.6
``voa_power_setpoint`` (W)                  ``VOA:OUTPUT:MW? / : <mW>``             2.6
``voa_output_power`` (W)                    ``VOA:TAP:MW?``                         2.6
==========================================  ======================================  =======

Units: the instrument speaks mV (bias setpoint), mVpp (dither) and mW (powers); the
driver converts to V and W with get/set parsers.  ``bias_power_ratio`` is the
dimensionless input-to-output power ratio (2.5…100) of the power-ratio modes.

Bias modes (``bias_mode``): ``off`` (0), ``auto_peak`` (1), ``auto_null`` (2),
``auto_quad_pos`` / ``auto_quad_neg`` (3/4, quadrature on the positive / negative
slope), ``hold_quad_pos`` / ``hold_quad_neg`` (5/6), ``manual`` (7, the bias is
``bias_setpoint``), ``auto_power_pos`` / ``auto_power_neg`` (8/9, lock to
``bias_power_ratio``).  The guide has no dither on/off command: the dither belongs to
the automatic modes; its amplitude and frequency are settable.

Wire format (guide chapter 2, 2.1): commands end in CR (the guide accepts CR, LF or
both; replies end in LF).  A setting is ``HEADER: value`` and the instrument answers
``1``; every line gets one reply.  A rejected line answers ``Err: <reason>`` (2.1);
there is no error queue, so the driver raises :class:`MBXInstrumentError` at once,
naming the command and the reply, and keeps the reply in :attr:`ThorlabsMBX.last_error`.

Transport: over the USB virtual COM port or RS-232 use an ``ASRL<n>::INSTR`` resource;
the driver sets 115 200 baud, 8 data bits, no parity, 1 stop bit (the settings both
open-source drivers use).  A serial-to-Ethernet bridge or the mock works as
``TCPIP::<host>::<port>::SOCKET``.

Roles and safety
----------------
* :class:`~qkdlab.drivers.roles.IntensityModulator`: :meth:`ThorlabsMBX.set_bias`
  switches the bias loop to manual — first holding the present bias so nothing jumps —
  and ramps ``bias_setpoint`` (``step`` V, ``inter_delay`` s apart, starting from a
  fresh read); :meth:`ThorlabsMBX.get_bias` reads the applied bias.  Values outside
  ±10 V raise before anything is written.
* :class:`~qkdlab.drivers.roles.Attenuator`: :meth:`ThorlabsMBX.set_attenuation_db`
  (1…20 dB) also puts the VOA in constant-attenuation mode and powers it;
  :meth:`ThorlabsMBX.get_attenuation_db` returns the setpoint (the measured value is
  ``attenuation_measured``).
* :meth:`ThorlabsMBX.safe_state` sets the **maximum attenuation**, 20 dB, in
  constant-attenuation mode with the VOA powered (a VOA powered *off* has its least
  loss, guide 2.6).  The bias loop is left as it is: a bias within ±10 V cannot harm
  the modulator, and dropping a lock would change the light level unpredictably.

Communication faults
--------------------
The link is :class:`~qkdlab.drivers.visa_link.ReconnectingVisaLink`'s, **without the
automatic retry** (``RETRY_ONCE = False``): a reply timeout, a lost link or an
unreadable reply raises :class:`MBXCommunicationError` naming the instrument and the
command, and nothing is ever resent.  A retry is not safe here:

* ``MZM:RESET`` (restart the bias calibration) is an action: a resend repeats it.
* A link drops when the controller reboots or is power-cycled; it comes back with its
  power-on settings.  Resending the next ``MZM:HOLD:VOLTAGE`` step of a bias ramp would
  jump the bias from the power-on value to that step, skipping the ramp, and
  :meth:`ThorlabsMBX.set_bias` would hold a "present bias" read before the drop.

A ramp stops at the step that failed; the next :meth:`ThorlabsMBX.set_bias` ramps
from a fresh read.  The next command after a failure first reopens the link once
(serial line settings restored and the port flushed; ``SYSTEM:SERIAL?`` read up to the
instrument's serial number, so a late reply — which a serial port does not drop on
reopening — never answers it) and raises if the instrument is not back;
:meth:`ThorlabsMBX.reconnect` waits for it (up to ``reconnect_timeout_s``, or
``attempts``/``wait_s``).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, ClassVar

from qcodes import validators as vals
from qcodes.instrument import VisaInstrument
from qcodes.parameters import Parameter

from qkdlab.drivers.scpi_errors import harden_reply_parsers
from qkdlab.drivers.visa_link import ReconnectingVisaLink

if TYPE_CHECKING:
    from collections.abc import Sequence, Sized
    from typing import Unpack

    from qcodes.instrument import VisaInstrumentKWArgs
    from qcodes.utils.types import NumberType

BIAS_LIMIT_V = 10.0
"""Bias range of the controller, ±V (``MZM:HOLD:VOLTAGE`` ±10000 mV, guide 2.4)."""
ATTENUATION_RANGE_DB = (1.0, 20.0)
"""VOA attenuation setpoint range (dB, guide 2.6)."""
MAX_ATTENUATION_DB = ATTENUATION_RANGE_DB[1]
"""What :meth:`ThorlabsMBX.safe_state` sets (dB)."""
BAUD_RATE = 115_200
"""Serial speed (baud) on ``ASRL`` resources."""

BIAS_MODES: dict[str, int] = {
    "off": 0,
    "auto_peak": 1,
    "auto_null": 2,
    "auto_quad_pos": 3,
    "auto_quad_neg": 4,
    "hold_quad_pos": 5,
    "hold_quad_neg": 6,
    "manual": 7,
    "auto_power_pos": 8,
    "auto_power_neg": 9,
}
"""``bias_mode`` names and the ``MZM:MODE`` numbers they stand for (guide 2.4)."""

VOA_MODES: dict[str, int] = {"attenuation": 0, "power": 1}
"""``voa_mode`` names: constant attenuation (0) or constant output power (1), guide 2.6."""


class MBXError(Exception):
    """Base class of the errors this driver raises."""


class MBXInstrumentError(MBXError):
    """The instrument rejected a command with an ``Err: ...`` reply (guide 2.1).

    Attributes:
        command: the line sent.
        reply: the instrument's reply, e.g. ``"Err: Data out of range"``.
    """

    def __init__(self, message: str, command: str, reply: str) -> None:
        super().__init__(message)
        self.command = command
        self.reply = reply


class MBXCommunicationError(MBXError):
    """No reply in time, an unreadable or unexpected reply, or a broken link."""


class _FreshRampParameter(Parameter):
    """A stepped parameter whose ramp starts from the instrument's actual value.

    QCoDeS starts a ramp from the cached value; after a front-panel change (or a change
    of bias mode) that would jump.  Reading first makes every ramp start where the
    instrument really is.
    """

    def get_ramp_values(
        self, value: NumberType | Sized, step: NumberType | None = None
    ) -> Sequence[NumberType | Sized]:
        if step is not None:
            self.get()
        return super().get_ramp_values(value, step)


class ThorlabsMBX(ReconnectingVisaLink, VisaInstrument):
    """Thorlabs MBX modulator bias controller + variable optical attenuator.

    Satisfies :class:`qkdlab.drivers.roles.IntensityModulator` and
    :class:`qkdlab.drivers.roles.Attenuator`.  See the module docstring for the command
    table, units and safety behaviour.

    Args:
        name: QCoDeS instrument name.
        address: VISA resource, ``ASRL<n>::INSTR`` (USB virtual COM port / RS-232) or
            ``TCPIP::<host>::<port>::SOCKET``.
        bias_step_v: ramp step of ``bias_setpoint`` (V, > 0).
        bias_step_delay_s: time between ramp steps (s, ≥ 0).
        write_terminator: end of each command line (CR; the guide also takes LF).
        **kwargs: forwarded to :class:`qcodes.instrument.VisaInstrument` (``timeout``,
            ``visalib``, ``pyvisa_sim_file``, ...); ``terminator`` sets the *read*
            terminator (LF).
    """

    default_terminator = "\n"
    default_timeout = 2.0
    error_cls: ClassVar[type[Exception]] = MBXCommunicationError
    communication_error_cls: ClassVar[type[Exception]] = MBXCommunicationError
    RETRY_ONCE: ClassVar[bool] = False
    """Never resend a failed command (module docstring, "Communication faults")."""
    LINK_PROBE: ClassVar[str] = "SYSTEM:SERIAL?"
    """The MBX has no ``*IDN?``; a reopened link must return the serial number."""

    def __init__(
        self,
        name: str,
        address: str,
        *,
        bias_step_v: float = 0.5,
        bias_step_delay_s: float = 0.02,
        write_terminator: str = "\r",
        **kwargs: Unpack[VisaInstrumentKWArgs],
    ) -> None:
        if not bias_step_v > 0.0 or bias_step_delay_s < 0.0:
            raise ValueError("bias_step_v must be > 0 V and bias_step_delay_s >= 0 s")
        self._write_terminator = write_terminator
        self._serial: str | None = None
        self.last_error: str | None = None
        """The last ``Err: ...`` reply of the instrument (None if none yet)."""
        self.init_link(address, dict(kwargs))
        super().__init__(name, address, **kwargs)
        self._configure_port()

        # -- Mach-Zehnder bias control (guide 2.4) --------------------------------------
        self.bias_mode: Parameter = self.add_parameter(
            "bias_mode",
            label="Bias control mode",
            get_cmd=lambda: self._ask_int("MZM:MODE?"),
            set_cmd=lambda raw: self.write(f"MZM:MODE: {raw}"),
            val_mapping=BIAS_MODES,
            docstring=(
                "Bias loop mode (MZM:MODE, guide 2.4): " + ", ".join(BIAS_MODES) + ". "
                "Entering an automatic mode starts a calibration (see bias_calibrating)."
            ),
        )
        """Bias loop mode (one of :data:`BIAS_MODES`)."""

        self.bias_setpoint: Parameter = self.add_parameter(
            "bias_setpoint",
            parameter_class=_FreshRampParameter,
            label="Manual bias setpoint",
            unit="V",
            get_cmd=lambda: self._ask_int("MZM:HOLD:VOLTAGE?") / 1000.0,
            set_cmd=lambda volts: self.write(f"MZM:HOLD:VOLTAGE: {round(volts * 1000.0):d}"),
            vals=vals.Numbers(-BIAS_LIMIT_V, BIAS_LIMIT_V),
            step=bias_step_v,
            inter_delay=bias_step_delay_s,
            docstring=(
                "Bias applied in manual mode (MZM:HOLD:VOLTAGE, integer mV, guide 2.4); "
                "validated against ±10 V before anything is written; ramps in `step` V "
                "steps `inter_delay` s apart from a fresh read of the setpoint."
            ),
        )
        """Manual-mode bias setpoint (V), ramped, 1 mV resolution."""

        self.bias_voltage: Parameter = self.add_parameter(
            "bias_voltage",
            label="Applied bias",
            unit="V",
            get_cmd=lambda: self._ask_float("MZM:VOLTAGE?"),
            set_cmd=False,
            docstring="Bias voltage the controller applies now, in any mode (MZM:VOLTAGE?).",
        )
        """Applied modulator bias (V)."""

        self.bias_power_ratio: Parameter = self.add_parameter(
            "bias_power_ratio",
            label="Input/output power ratio setpoint",
            unit="",
            get_cmd=lambda: self._ask_int("MZM:HOLD:RATIO?") / 100.0,
            set_cmd=lambda ratio: self.write(f"MZM:HOLD:RATIO: {round(ratio * 100.0):d}"),
            vals=vals.Numbers(2.5, 100.0),
            docstring=(
                "P_in/P_out the auto_power_pos/neg modes hold (MZM:HOLD:RATIO, sent as "
                "ratio×100, 250…10000, guide 2.4); dimensionless, 0.01 resolution."
            ),
        )
        """Power-ratio setpoint of the ``auto_power_*`` modes (dimensionless)."""

        self.bias_locked: Parameter = self.add_parameter(
            "bias_locked",
            label="Bias at setpoint",
            get_cmd=lambda: self._ask_bool("MZM:SETPOINT?"),
            set_cmd=False,
            docstring="True when the bias loop is stable at its setpoint (MZM:SETPOINT?).",
        )
        """True when the bias loop is at its setpoint."""

        self.bias_calibrating: Parameter = self.add_parameter(
            "bias_calibrating",
            label="Bias calibration running",
            get_cmd=lambda: self._ask_bool("MZM:CALIBRATING?"),
            set_cmd=False,
            docstring="True while the bias controller calibrates (MZM:CALIBRATING?).",
        )
        """True while a bias calibration runs."""

        self.dither_amplitude: Parameter = self.add_parameter(
            "dither_amplitude",
            label="Dither amplitude (peak-to-peak)",
            unit="V",
            get_cmd=lambda: self._ask_int("MZM:DITHER:AMPLITUDE?") / 1000.0,
            set_cmd=lambda v: self.write(f"MZM:DITHER:AMPLITUDE: {round(v * 1000.0):d}"),
            vals=vals.Numbers(0.020, 2.000),
            docstring=(
                "Peak-to-peak dither of the automatic modes (MZM:DITHER:AMPLITUDE, "
                "integer mVpp 20…2000, guide 2.4)."
            ),
        )
        """Dither amplitude (V peak-to-peak)."""

        self.dither_frequency: Parameter = self.add_parameter(
            "dither_frequency",
            label="Dither frequency",
            unit="Hz",
            get_cmd=lambda: float(self._ask_int("MZM:DITHER:FREQUENCY?")),
            set_cmd=lambda hz: self.write(f"MZM:DITHER:FREQUENCY: {round(hz):d}"),
            vals=vals.Numbers(1000.0, 10_000.0),
            docstring="Dither frequency (MZM:DITHER:FREQUENCY, integer Hz 1000…10000, 2.4).",
        )
        """Dither frequency (Hz)."""

        self.mzm_output_power: Parameter = self.add_parameter(
            "mzm_output_power",
            label="Power after the modulator",
            unit="W",
            get_cmd=lambda: self._ask_float("MZM:TAP:MW?") * 1e-3,
            set_cmd=False,
            docstring="Optical power at the tap after the modulator (MZM:TAP:MW?, in mW).",
        )
        """Optical power after the modulator (W)."""

        # -- variable optical attenuator (guide 2.6) -------------------------------------
        self.attenuation: Parameter = self.add_parameter(
            "attenuation",
            label="VOA attenuation setpoint",
            unit="dB",
            get_cmd=lambda: self._ask_float("VOA:ATTEN?"),
            set_cmd=lambda db: self.write(f"VOA:ATTEN: {db:.2f}"),
            vals=vals.Numbers(*ATTENUATION_RANGE_DB),
            docstring=(
                "Attenuation setpoint of constant-attenuation mode (VOA:ATTEN, "
                "1.0…20.0 dB, guide 2.6); cached by the VOA while in power mode."
            ),
        )
        """VOA attenuation setpoint (dB)."""

        self.attenuation_measured: Parameter = self.add_parameter(
            "attenuation_measured",
            label="VOA attenuation (measured)",
            unit="dB",
            get_cmd=lambda: self._ask_float("VOA:MEASURED?"),
            set_cmd=False,
            docstring=(
                "Attenuation the VOA provides, from the taps before and after it "
                "(VOA:MEASURED?, guide 2.6); needs light at the input."
            ),
        )
        """Measured VOA attenuation (dB)."""

        self.attenuation_error: Parameter = self.add_parameter(
            "attenuation_error",
            label="VOA attenuation error",
            unit="dB",
            get_cmd=lambda: self._ask_float("VOA:ERROR?"),
            set_cmd=False,
            docstring="Provided minus set attenuation (VOA:ERROR?, guide 2.6).",
        )
        """Measured minus set attenuation (dB)."""

        self.voa_mode: Parameter = self.add_parameter(
            "voa_mode",
            label="VOA mode",
            get_cmd=lambda: self._ask_int("VOA:MODE?"),
            set_cmd=lambda raw: self.write(f"VOA:MODE: {raw}"),
            val_mapping=VOA_MODES,
            docstring="'attenuation' (constant attenuation) or 'power' (constant output), 2.6.",
        )
        """VOA mode: ``"attenuation"`` or ``"power"``."""

        self.voa_enabled: Parameter = self.add_parameter(
            "voa_enabled",
            label="VOA powered",
            get_cmd=lambda: self._ask_bool("VOA:POWER?"),
            set_cmd=lambda on: self.write(f"VOA:POWER: {1 if on else 0}"),
            vals=vals.Bool(),
            docstring=(
                "VOA loop on/off (VOA:POWER, guide 2.6). Off sets the VOA bias to 0 V, "
                "which gives the LEAST attenuation (its insertion loss)."
            ),
        )
        """VOA powered (its control loop engaged)."""

        self.voa_settled: Parameter = self.add_parameter(
            "voa_settled",
            label="VOA at setpoint",
            get_cmd=lambda: self._ask_bool("VOA:SETPOINT?"),
            set_cmd=False,
            docstring="True when the VOA is within 0.1 dB of its setpoint (VOA:SETPOINT?, 2.6).",
        )
        """True within 0.1 dB of the VOA setpoint."""

        self.voa_power_setpoint: Parameter = self.add_parameter(
            "voa_power_setpoint",
            label="VOA output power setpoint",
            unit="W",
            get_cmd=lambda: self._ask_float("VOA:OUTPUT:MW?") * 1e-3,
            set_cmd=lambda watts: self.write(f"VOA:OUTPUT:MW: {watts * 1e3:.3f}"),
            vals=vals.Numbers(1e-5, 0.1),
            docstring=(
                "Output power held in constant-power mode (VOA:OUTPUT:MW, 0.01…100 mW, "
                "guide 2.6); cached while in attenuation mode."
            ),
        )
        """Output power setpoint of constant-power mode (W)."""

        self.voa_output_power: Parameter = self.add_parameter(
            "voa_output_power",
            label="Power after the VOA",
            unit="W",
            get_cmd=lambda: self._ask_float("VOA:TAP:MW?") * 1e-3,
            set_cmd=False,
            docstring="Optical power at the tap after the VOA (VOA:TAP:MW?, in mW).",
        )
        """Optical power after the VOA (W)."""

        harden_reply_parsers(self)  # garbage replies: a clear error, never NaN (scpi_errors)
        self.connect_message()

    # -- identity (guide 2.5) -------------------------------------------------------------
    def get_idn(self) -> dict[str, str | None]:
        """Vendor, model, serial number and firmware from the ``SYSTEM:*`` queries.

        The MBX has no ``*IDN?``; this asks ``SYSTEM:MODEL?``, ``SYSTEM:SERIAL?`` and
        ``SYSTEM:FIRMWARE?``.
        """
        model = self.ask("SYSTEM:MODEL?")
        serial = self.ask("SYSTEM:SERIAL?")
        firmware = self.ask("SYSTEM:FIRMWARE?")
        self._serial = serial
        return {"vendor": "Thorlabs", "model": model, "serial": serial, "firmware": firmware}

    # -- IntensityModulator role ------------------------------------------------------------
    def set_bias(self, volts: float) -> None:
        """Hold the modulator bias at ``volts`` (V, ±10): manual mode, ramped.

        Validates first (nothing is written for a bad value).  If the loop is not in
        manual mode, the present bias becomes the manual setpoint before switching, so
        the bias does not jump; then ``bias_setpoint`` ramps to ``volts``.
        """
        self.bias_setpoint.validate(volts)
        if self.bias_mode() != "manual":
            present = min(BIAS_LIMIT_V, max(-BIAS_LIMIT_V, self.bias_voltage()))
            held_mv = round(present * 1000.0)
            self.write(f"MZM:HOLD:VOLTAGE: {held_mv:d}")  # no ramp: the bias is there already
            self.bias_setpoint.cache.set(held_mv / 1000.0)
            self.bias_mode("manual")
        self.bias_setpoint.set(volts)

    def get_bias(self) -> float:
        """Bias the controller applies now (V), in any mode."""
        return float(self.bias_voltage())

    def lock_bias(self, mode: str) -> None:
        """Start an automatic bias mode, e.g. ``"auto_peak"`` (a name from :data:`BIAS_MODES`).

        Follow with :meth:`wait_for_bias_lock` before relying on the bias.
        """
        self.bias_mode(mode)

    def recalibrate_bias(self) -> None:
        """Restart the bias calibration of the present automatic mode (``MZM:RESET``)."""
        self.write("MZM:RESET")

    def wait_for_bias_lock(self, timeout_s: float = 30.0, poll_s: float = 0.1) -> None:
        """Block until the calibration has ended and the bias is at its setpoint.

        Raises :class:`MBXError` after ``timeout_s`` seconds.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.bias_calibrating() and self.bias_locked():
                return
            if time.monotonic() >= deadline:
                raise MBXError(
                    f"{self.name}: bias not locked after {timeout_s:g} s "
                    f"(mode {self.bias_mode.cache.get(get_if_invalid=False)!r})"
                )
            time.sleep(poll_s)

    # -- Attenuator role ----------------------------------------------------------------------
    def set_attenuation_db(self, db: float) -> None:
        """Attenuate by ``db`` (1…20 dB): setpoint, constant-attenuation mode, VOA on.

        Validates first (nothing is written for a bad value).
        """
        self.attenuation.validate(db)
        self.attenuation.set(db)
        if self.voa_mode() != "attenuation":
            self.voa_mode("attenuation")
        if not self.voa_enabled():
            self.voa_enabled(True)

    def get_attenuation_db(self) -> float:
        """The VOA attenuation setpoint (dB); see ``attenuation_measured`` for the actual."""
        return float(self.attenuation())

    # -- safety -------------------------------------------------------------------------------
    def safe_state(self) -> None:
        """Maximum attenuation: 20 dB, constant-attenuation mode, VOA powered.

        The setpoint is written first (the VOA caches it in power mode), then the mode,
        then the VOA is powered — never passing through a lower attenuation than needed.
        The bias loop is left as it is (module docstring).  Idempotent.
        """
        self.attenuation.set(MAX_ATTENUATION_DB)
        self.voa_mode("attenuation")
        self.voa_enabled(True)

    # -- restart and link recovery ----------------------------------------------------------
    def restart(self, wait_s: float = 2.0, attempts: int = 20, retry_s: float = 0.5) -> None:
        """Reboot the instrument (``SYSTEM:RESTART``, guide 2.5) and reconnect.

        The instrument reboots to its power-on settings; no reply is awaited.  After
        ``wait_s`` the link is reopened (:meth:`reconnect` with ``attempts`` attempts
        ``retry_s`` apart) and every cached value is invalidated.
        """
        import pyvisa.errors

        self.visa_log.debug("Writing: SYSTEM:RESTART")
        try:
            self.visa_handle.write("SYSTEM:RESTART")
        except (pyvisa.errors.Error, OSError) as err:
            raise MBXCommunicationError(
                f"{self.name}: could not send 'SYSTEM:RESTART': {err}"
            ) from err
        time.sleep(wait_s)
        self.reconnect(attempts=attempts, wait_s=retry_s)
        self._invalidate_caches()

    def _on_reopen(self) -> None:
        """Line settings on the new link; a serial port is flushed (ReconnectingVisaLink hook).

        No VISA clear on sockets: pyvisa-py's ``clear()`` spins forever on a socket the
        peer has closed, and a new socket holds nothing stale.
        """
        import pyvisa.resources

        self._configure_port()
        if isinstance(self.visa_handle, pyvisa.resources.SerialInstrument):
            self.device_clear()

    def _link_answers(self, reply: str) -> bool:
        """The probe's reply is this instrument's serial number (ReconnectingVisaLink hook)."""
        reply = reply.strip()
        return bool(reply) and not reply.startswith("Err:") and self._serial in (None, reply)

    def _configure_port(self) -> None:
        """Write terminator, and the serial line settings on ``ASRL`` resources."""
        import pyvisa.constants
        import pyvisa.resources

        handle = self.visa_handle
        handle.write_termination = self._write_terminator
        if isinstance(handle, pyvisa.resources.SerialInstrument) and self.visabackend != "sim":
            handle.baud_rate = BAUD_RATE
            handle.data_bits = 8
            handle.parity = pyvisa.constants.Parity.none
            handle.stop_bits = pyvisa.constants.StopBits.one

    def _invalidate_caches(self) -> None:
        for parameter in self.parameters.values():
            if parameter.gettable and parameter.name not in ("IDN", "timeout"):
                parameter.cache.invalidate()

    # -- transport: every line gets exactly one reply -------------------------------------------
    def write_raw(self, cmd: str) -> None:
        """Send a setting or action; the instrument must answer ``1``."""
        reply = self.ask_raw(cmd)
        if reply != "1":
            raise MBXCommunicationError(
                f"{self.name}: unexpected reply {reply!r} to {cmd!r} (expected '1')"
            )

    def ask_raw(self, cmd: str) -> str:
        """Send a line; its reply with the terminator stripped (``Err: ...`` raises)."""
        reply = super().ask_raw(cmd).strip()
        if reply.startswith("Err:"):
            self.last_error = reply
            raise MBXInstrumentError(f"{self.name} rejected {cmd!r}: {reply}", cmd, reply)
        return reply

    def _ask_float(self, cmd: str) -> float:
        reply = self.ask(cmd)
        try:
            value = float(reply)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise MBXCommunicationError(f"{self.name}: reply {reply!r} to {cmd!r} is not a number")
        return value

    def _ask_int(self, cmd: str) -> int:
        reply = self.ask(cmd)
        try:
            return int(reply)
        except ValueError:
            raise MBXCommunicationError(
                f"{self.name}: reply {reply!r} to {cmd!r} is not an integer"
            ) from None

    def _ask_bool(self, cmd: str) -> bool:
        reply = self.ask(cmd)
        if reply == "1":
            return True
        if reply == "0":
            return False
        raise MBXCommunicationError(f"{self.name}: reply {reply!r} to {cmd!r} is not 0 or 1")
