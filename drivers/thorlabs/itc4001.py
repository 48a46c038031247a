"""QCoDeS driver for the Thorlabs ITC4001 laser-diode + TEC controller (SCPI over USBTMC).

Reference: *Thorlabs Series 4000 — LDC40xx, TED4015, ITC40xx — SCPI Programmers'
Reference Manual*, version 3.1 (27.11.2012); the IEEE-488.2 sections (3.1.x) and the
status registers (3.14) were also checked against version 3.3 (08 Apr 2015).  Section
numbers below are that manual's.  Only documented commands are used; the driver sends
short forms, the instrument also takes the long forms.

=====================================  ==========================================  =======
Driver member                          Command(s) sent                             Manual
=====================================  ==========================================  =======
``IDN`` / ``get_idn()``                ``*IDN?``                                   3.1.1
``reset()``                            ``*RST``                                    3.1.2
``error_queue()``, ``check_errors()``  ``SYST:ERR?`` until ``+0,"No error"``       3.2.2
``measured_current``                   ``MEAS:CURR1?`` (LD current, A)             3.3.6
``measured_voltage``                   ``MEAS:VOLT1?`` (LD voltage, V)             3.3.6
``pd_current``                         ``MEAS:CURR2?`` (monitor PD current, A)     3.3.6
``measured_power``                     ``MEAS:POW2?`` (power via the PD, W)        3.3.6
``temperature``                        ``MEAS:TEMP?`` (°C)                         3.3.6
``output``, ``output_on/off()``        ``OUTP?``, ``OUTP ON``, ``OUTP OFF``        3.4.1
``interlock_tripped``                  ``OUTP:PROT:INTL:TRIP?``                    3.4.7
``keylock_tripped``                    ``OUTP:PROT:KEYL:TRIP?``                    3.4.7
``mode``                               ``SOUR:FUNC:MODE? / CURR / POW``            3.7.1
``current_limit``                      ``SOUR:CURR:LIM? / <A>``                    3.7.2
``current``                            ``SOUR:CURR? / <A>``                        3.7.3
``power_setpoint``                     ``SOUR:POW? / <W>``                         3.7.4
``tec_output``                         ``OUTP2? / ON / OFF``                       TEC [1]_
``temperature_setpoint``               ``SOUR2:TEMP? / <°C>``                      TEC [1]_
=====================================  ==========================================  =======

.. [1] TEC output and TEC source chapters, after 3.9; their section numbers were not
   checked against a copy of the manual.

Temperatures are in the instrument's default temperature unit, °C (the unit is a
user setting, ``UNIT:TEMP``; this driver assumes it is left at Celsius).

Safety
------
* ``current_limit_a`` (constructor) is the laser's rating, a hard limit enforced on
  the driver side: :attr:`ThorlabsITC4001.current` and
  :attr:`ThorlabsITC4001.current_limit` are validated against ``[0, current_limit_a]``
  *before* anything is written, and the error names the parameter and the range.
* Current changes ramp: ``current`` has ``step`` (A) and ``inter_delay`` (s), so a
  change of ΔI takes ``ceil(ΔI/step)`` writes ``inter_delay`` apart.  Each ramp starts
  from a fresh read of the setpoint (``SOUR:CURR?``), never from a stale cache.
  Change the rate with ``laser.current.step = ...`` / ``laser.current.inter_delay``.
* :meth:`ThorlabsITC4001.output_on` asks the interlock and the key switch, then the
  device's own LD current limit, and refuses (raises) unless the interlock is closed,
  the key is on and the device limit is at or below ``current_limit_a``.
* :meth:`ThorlabsITC4001.safe_state` ramps the current setpoint to 0 and switches
  the LD output off (the TEC is left as it is).

Communication faults
--------------------
The link is :class:`~qkdlab.drivers.visa_link.ReconnectingVisaLink`'s, **without the
automatic retry** (``RETRY_ONCE = False``): a reply timeout, a lost link or an
unreadable reply raises :class:`ITC4001CommunicationError` naming the instrument and
the command, and nothing is ever resent.  A retry is not safe here:

* Writes are not acknowledged.  A write into a link the peer has just closed vanishes
  without an error; only a later command fails.  In a current ramp the failing
  ``SOUR:CURR`` step can lie several steps beyond the last one applied, so resending it
  on a new link would jump the current by the lost steps: the ramp would be skipped.
* A link drops when the instrument is power-cycled or unplugged; meanwhile its setpoint
  and output may have changed (power-on defaults, the front panel).  Resending a
  setpoint or ``OUTP ON`` would re-apply a stale state, the latter after interlock and
  limit checks made on the instrument as it was before.
* ``SYST:ERR?`` removes the entry it reports: a resent query loses the lost reply's error.

A ramp stops at the step that failed (the error leaves QCoDeS' ramp), and the next
``current`` change ramps from a fresh read of the setpoint the instrument really holds.
The next command after a failure first reopens the link once (new VISA session, device
clear, ``*IDN?`` read up to the ``THORLABS`` reply, so a late reply never answers it)
and raises if the instrument is not back; :meth:`ThorlabsITC4001.reconnect` waits for
it (up to ``reconnect_timeout_s``, or ``attempts``/``wait_s``)::

    try:
        laser.current(0.05)
    except ITC4001CommunicationError:
        laser.reconnect()
        laser.current(0.05)  # ramps from the setpoint the instrument holds now
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from qcodes import validators as vals
from qcodes.instrument import VisaInstrument
from qcodes.parameters import Parameter

from qkdlab.drivers.scpi_errors import (
    MalformedErrorReplyError,
    drain_error_queue,
    harden_reply_parsers,
    parse_number,
)
from qkdlab.drivers.visa_link import ReconnectingVisaLink

if TYPE_CHECKING:
    from collections.abc import Sequence, Sized
    from typing import Unpack

    from qcodes.instrument import VisaInstrumentKWArgs
    from qcodes.utils.types import NumberType

ITC4001_MAX_CURRENT_A = 1.0
"""The ITC4001's laser-diode current range (A)."""


class ITC4001Error(Exception):
    """Base class of the errors this driver raises."""


class ITC4001InterlockError(ITC4001Error):
    """Emission refused: the interlock is open or the key switch is off."""


class ITC4001SafetyError(ITC4001Error):
    """Emission refused: the device's current limit exceeds the driver's hard limit."""


class ITC4001InstrumentError(ITC4001Error):
    """The instrument's error queue held errors (``SYST:ERR?``)."""

    def __init__(self, message: str, errors: Sequence[tuple[int, str]]) -> None:
        super().__init__(message)
        self.errors = list(errors)


class ITC4001CommunicationError(ITC4001Error):
    """No reply in time, an unreadable reply, or a broken link."""


def _format_number(value: float) -> str:
    """A value as sent to the instrument (<NRf>, six significant digits)."""
    return f"{value:.6g}"


class _FreshRampParameter(Parameter):
    """A stepped parameter whose ramp starts from the instrument's actual value.

    QCoDeS starts a ramp from the cached value; after a front-panel change that would
    jump.  Reading first makes every ramp start where the instrument really is.
    """

    def get_ramp_values(
        self, value: NumberType | Sized, step: NumberType | None = None
    ) -> Sequence[NumberType | Sized]:
        if step is not None:
            self.get()
        return super().get_ramp_values(value, step)


class ThorlabsITC4001(ReconnectingVisaLink, VisaInstrument):
    """Thorlabs ITC4001 laser-diode current and TEC controller.

    Satisfies :class:`qkdlab.drivers.roles.Laser`.

    Args:
        name: QCoDeS instrument name.
        address: VISA resource name (``USB0::0x1313::0x804A::<serial>::INSTR``).
        current_limit_a: hard limit for the LD current (A), the laser's rating; no
            setpoint or device limit above it is ever written (0 < value ≤ 1 A).
        current_step_a: ramp step of :attr:`current` (A).
        current_step_delay_s: time between ramp steps (s).
        **kwargs: forwarded to :class:`qcodes.instrument.VisaInstrument` (``timeout``,
            ``visalib``, ``pyvisa_sim_file``, ...).
    """

    default_terminator = "\n"
    error_cls: ClassVar[type[Exception]] = ITC4001CommunicationError
    communication_error_cls: ClassVar[type[Exception]] = ITC4001CommunicationError
    RETRY_ONCE: ClassVar[bool] = False
    """Never resend a failed command (module docstring, "Communication faults")."""

    def __init__(
        self,
        name: str,
        address: str,
        *,
        current_limit_a: float = 0.1,
        current_step_a: float = 0.005,
        current_step_delay_s: float = 0.05,
        **kwargs: Unpack[VisaInstrumentKWArgs],
    ) -> None:
        if not 0.0 < current_limit_a <= ITC4001_MAX_CURRENT_A:
            raise ValueError(
                f"current_limit_a must be in (0, {ITC4001_MAX_CURRENT_A}] A, "
                f"got {current_limit_a!r}"
            )
        if current_step_a <= 0.0 or current_step_delay_s < 0.0:
            raise ValueError("current_step_a must be > 0 and current_step_delay_s >= 0")
        self.current_limit_a = float(current_limit_a)
        self.init_link(address, dict(kwargs))
        super().__init__(name, address, **kwargs)

        # -- LD source (3.7) ---------------------------------------------------------
        self.current: Parameter = self.add_parameter(
            "current",
            parameter_class=_FreshRampParameter,
            label="LD current setpoint",
            unit="A",
            get_cmd=lambda: self._ask_number("SOUR:CURR?"),
            set_cmd=lambda value: self.write(f"SOUR:CURR {_format_number(value)}"),
            vals=vals.Numbers(0.0, self.current_limit_a),
            step=current_step_a,
            inter_delay=current_step_delay_s,
            docstring=(
                "Laser-diode current setpoint (manual 3.7.3), constant-current mode. "
                "Validated against [0, current_limit_a] before anything is written; "
                "changes ramp in steps of `step` A, `inter_delay` s apart, starting "
                "from a fresh read of the setpoint."
            ),
        )
        """LD current setpoint (A), ramped."""

        self.current_limit: Parameter = self.add_parameter(
            "current_limit",
            label="LD current limit",
            unit="A",
            get_cmd=lambda: self._ask_number("SOUR:CURR:LIM?"),
            set_cmd=lambda value: self.write(f"SOUR:CURR:LIM {_format_number(value)}"),
            vals=vals.Numbers(0.0, self.current_limit_a),
            docstring=(
                "The instrument's own LD current limit (manual 3.7.2); it clamps the "
                "drive current in both modes. Never set above the driver's hard limit."
            ),
        )
        """Device-side LD current limit (A)."""

        self.power_setpoint: Parameter = self.add_parameter(
            "power_setpoint",
            label="LD optical power setpoint",
            unit="W",
            get_cmd=lambda: self._ask_number("SOUR:POW?"),
            set_cmd=lambda value: self.write(f"SOUR:POW {_format_number(value)}"),
            vals=vals.Numbers(min_value=0.0),
            docstring=(
                "Optical power setpoint for constant-power mode (manual 3.7.4), "
                "regulated on the monitor photodiode; the drive current stays within "
                "`current_limit`."
            ),
        )
        """Optical power setpoint (W) of constant-power mode."""

        self.mode: Parameter = self.add_parameter(
            "mode",
            label="LD operating mode",
            get_cmd=self._get_mode,
            set_cmd=self._set_mode,
            vals=vals.Enum("current", "power"),
            docstring=(
                "'current' = constant current (CURR), 'power' = constant power (POW); "
                "SOUR:FUNC:MODE, manual 3.7.1."
            ),
        )
        """Operating mode: ``"current"`` or ``"power"``."""

        # -- LD output (3.4) -----------------------------------------------------------
        self.output: Parameter = self.add_parameter(
            "output",
            label="LD output",
            get_cmd=lambda: self._ask_bool("OUTP?"),
            set_cmd=self._set_output,
            vals=vals.Bool(),
            docstring=(
                "LD output state (manual 3.4.1). Setting True goes through "
                "output_on() and its interlock and current-limit checks."
            ),
        )
        """LD output on/off."""

        self.interlock_tripped: Parameter = self.add_parameter(
            "interlock_tripped",
            label="LD interlock tripped",
            get_cmd=lambda: self._ask_bool("OUTP:PROT:INTL:TRIP?"),
            set_cmd=False,
            docstring="True while the LD interlock loop is open (manual 3.4.7).",
        )
        """True while the interlock loop is open."""

        self.keylock_tripped: Parameter = self.add_parameter(
            "keylock_tripped",
            label="Key switch protection tripped",
            get_cmd=lambda: self._ask_bool("OUTP:PROT:KEYL:TRIP?"),
            set_cmd=False,
            docstring="True while the front-panel key switch is off (manual 3.4.7).",
        )
        """True while the key switch is off."""

        # -- measurements (3.3.6) ------------------------------------------------------
        self.measured_current: Parameter = self.add_parameter(
            "measured_current",
            label="LD current",
            unit="A",
            get_cmd=lambda: self._ask_number("MEAS:CURR1?"),
            set_cmd=False,
            docstring="Measured laser-diode current (MEAS:CURR1?, manual 3.3.6).",
        )
        """Measured LD current (A)."""

        self.measured_voltage: Parameter = self.add_parameter(
            "measured_voltage",
            label="LD voltage",
            unit="V",
            get_cmd=lambda: self._ask_number("MEAS:VOLT1?"),
            set_cmd=False,
            docstring="Measured laser-diode voltage (MEAS:VOLT1?, manual 3.3.6).",
        )
        """Measured LD voltage (V)."""

        self.pd_current: Parameter = self.add_parameter(
            "pd_current",
            label="Monitor photodiode current",
            unit="A",
            get_cmd=lambda: self._ask_number("MEAS:CURR2?"),
            set_cmd=False,
            docstring="Measured monitor photodiode current (MEAS:CURR2?, manual 3.3.6).",
        )
        """Measured monitor-photodiode current (A)."""

        self.measured_power: Parameter = self.add_parameter(
            "measured_power",
            label="Optical power",
            unit="W",
            get_cmd=lambda: self._ask_number("MEAS:POW2?"),
            set_cmd=False,
            docstring=(
                "Optical power measured with the monitor photodiode (MEAS:POW2?, "
                "manual 3.3.6); needs the photodiode responsivity set on the instrument."
            ),
        )
        """Optical power from the monitor photodiode (W)."""

        # -- TEC output (OUTP2) and TEC source (SOUR2) chapters [1] ---------------------
        self.tec_output: Parameter = self.add_parameter(
            "tec_output",
            label="TEC output",
            get_cmd=lambda: self._ask_bool("OUTP2?"),
            set_cmd=lambda on: self.write("OUTP2 ON" if on else "OUTP2 OFF"),
            vals=vals.Bool(),
            docstring="TEC output state (OUTP2).",
        )
        """TEC output on/off."""

        self.temperature_setpoint: Parameter = self.add_parameter(
            "temperature_setpoint",
            label="TEC temperature setpoint",
            unit="°C",
            get_cmd=lambda: self._ask_number("SOUR2:TEMP?"),
            set_cmd=lambda value: self.write(f"SOUR2:TEMP {_format_number(value)}"),
            vals=vals.Numbers(-50.0, 150.0),
            docstring=(
                "TEC temperature setpoint (SOUR2:TEMP) in the default unit °C. The "
                "validator is a broad sanity range; the instrument enforces its own, "
                "sensor-dependent limits (error -222, see check_errors())."
            ),
        )
        """TEC temperature setpoint (°C)."""

        self.temperature: Parameter = self.add_parameter(
            "temperature",
            label="Temperature",
            unit="°C",
            get_cmd=lambda: self._ask_number("MEAS:TEMP?"),
            set_cmd=False,
            docstring="Measured temperature of the laser mount (MEAS:TEMP?, manual 3.3.6).",
        )
        """Measured temperature (°C)."""

        harden_reply_parsers(self)  # garbage replies: a clear error, never NaN (scpi_errors)
        self.connect_message()

    # -- Laser role ------------------------------------------------------------------
    def output_on(self) -> None:
        """Switch the LD output on after the safety checks; raise if one fails.

        Queries, in order: the interlock, the key switch and the device's LD current
        limit; only then sends ``OUTP ON``, and reads the state back (``OUTP?``): when
        this returns, the instrument has executed every command before it and reports
        the output on (writes are not acknowledged: without the read-back, a power
        reading right after could see the laser still off).
        """
        if self.interlock_tripped():
            raise ITC4001InterlockError(
                f"{self.name}: refusing to switch the laser on: the LD interlock is open "
                "(OUTP:PROT:INTL:TRIP? returned 1); close the interlock loop first"
            )
        if self.keylock_tripped():
            raise ITC4001InterlockError(
                f"{self.name}: refusing to switch the laser on: the key switch is off "
                "(OUTP:PROT:KEYL:TRIP? returned 1)"
            )
        device_limit = self.current_limit()
        if device_limit > self.current_limit_a * (1 + 1e-9):
            raise ITC4001SafetyError(
                f"{self.name}: refusing to switch the laser on: the instrument's LD "
                f"current limit is {device_limit:g} A, above the driver's hard limit "
                f"current_limit_a = {self.current_limit_a:g} A; lower current_limit first"
            )
        self.write("OUTP ON")
        if not self.output.get():  # the read-back also refreshes the cache
            raise ITC4001InterlockError(
                f"{self.name}: the LD output did not switch on (OUTP? reads 0 after "
                "OUTP ON): interlock or key switch opened meanwhile, or the instrument "
                "refused it (see error_queue())")

    def output_off(self) -> None:
        """Switch the LD output off (``OUTP OFF``)."""
        self.write("OUTP OFF")
        self.output.cache.set(False)

    def is_on(self) -> bool:
        """True while the LD output is on (``OUTP?``)."""
        return bool(self.output())

    def interlock_closed(self) -> bool:
        """True when emission is allowed: interlock closed and key switch on."""
        return not self.interlock_tripped() and not self.keylock_tripped()

    def safe_state(self) -> None:
        """Ramp the current setpoint to 0 A, then switch the LD output off."""
        self.current.set(0.0)
        self.output_off()

    # -- error queue (3.2.2) and reset (3.1.2) ----------------------------------------
    def error_queue(self, max_reads: int = 32) -> list[tuple[int, str]]:
        """Read and empty the error queue: ``[(code, message), ...]``, oldest first."""
        try:
            errors, emptied = drain_error_queue(self.ask, "SYST:ERR?", max_reads)
        except MalformedErrorReplyError as err:
            raise ITC4001CommunicationError(
                f"{self.name}: reply {err.reply!r} to 'SYST:ERR?' is not '<code>,\"<message>\"'"
            ) from None
        if not emptied:
            raise ITC4001InstrumentError(
                f"{self.name}: error queue not empty after {max_reads} reads", errors
            )
        return errors

    def check_errors(self) -> None:
        """Raise :class:`ITC4001InstrumentError` if the instrument queued any error."""
        errors = self.error_queue()
        if errors:
            listed = "; ".join(f'{code},"{message}"' for code, message in errors)
            raise ITC4001InstrumentError(f"{self.name} reported error(s): {listed}", errors)

    def reset(self) -> None:
        """``*RST`` (manual 3.1.2): outputs off, settings to defaults; caches cleared."""
        self.write("*RST")
        for parameter in self.parameters.values():
            if parameter.gettable and parameter.name not in ("IDN", "timeout"):
                parameter.cache.invalidate()

    # -- link recovery (ReconnectingVisaLink hooks) ----------------------------------
    def _on_reopen(self) -> None:
        """A device clear on every new link (drops a pending reply over USBTMC)."""
        self.device_clear()

    def _link_answers(self, reply: str) -> bool:
        """The probe (``*IDN?``) is answered by a Thorlabs instrument."""
        return reply.upper().startswith("THORLABS")

    # -- transport ---------------------------------------------------------------------
    def device_clear(self) -> None:
        """Clear the VISA buffers (done on connect and on every reopened link).

        On a raw TCP socket through pyvisa-py (how the mock is reached) only the local
        read buffer is discarded: pyvisa-py's socket ``clear()`` spins forever on a
        connection the peer has closed.  A late reply on a socket is dropped with the
        old connection anyway; over USBTMC the clear empties the device's output queue.
        """
        if self.visabackend == "py" and str(self.visa_handle.resource_name).upper().endswith(
            "::SOCKET"
        ):
            from pyvisa.constants import BufferOperation

            self.visa_handle.flush(BufferOperation.discard_read_buffer_no_io)
            return
        super().device_clear()

    def _ask_number(self, cmd: str) -> float:
        reply = self.ask(cmd)
        try:
            return parse_number(reply)
        except ValueError:
            raise ITC4001CommunicationError(
                f"{self.name}: reply {reply!r} to {cmd!r} is not a number"
            ) from None

    def _ask_bool(self, cmd: str) -> bool:
        reply = self.ask(cmd).strip().upper()
        if reply in ("1", "ON"):
            return True
        if reply in ("0", "OFF"):
            return False
        raise ITC4001CommunicationError(
            f"{self.name}: reply {reply!r} to {cmd!r} is not a boolean (0/1)"
        )

    def _get_mode(self) -> str:
        reply = self.ask("SOUR:FUNC:MODE?").strip().upper()
        if reply.startswith("CURR"):
            return "current"
        if reply.startswith("POW"):
            return "power"
        raise ITC4001CommunicationError(
            f"{self.name}: reply {reply!r} to 'SOUR:FUNC:MODE?' is neither CURR nor POW"
        )

    def _set_mode(self, mode: str) -> None:
        self.write("SOUR:FUNC:MODE CURR" if mode == "current" else "SOUR:FUNC:MODE POW")

    def _set_output(self, on: bool) -> None:
        if on:
            self.output_on()
        else:
            self.output_off()
