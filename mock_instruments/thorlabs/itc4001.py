"""Mock Thorlabs ITC4001 laser-diode + TEC controller, served as a SCPI socket.

The command set follows the *Thorlabs Series 4000 LDC40xx / TED4015 / ITC40xx SCPI
Programmers' Reference Manual* (version 3.1, 27.11.2012; chapter numbering checked
against the table of contents, IEEE-488.2 sections also against version 3.3, 08 Apr
2015).  Only what :class:`qkdlab.drivers.thorlabs.itc4001.ThorlabsITC4001` sends is
modelled; every header accepts its documented long and short forms.

=============================================================  ===================
Header (long form)                                             Manual section
=============================================================  ===================
``*IDN?``, ``*RST``, ``*CLS`` (built into ScpiInstrument)      3.1.1, 3.1.2, 3.1.9
``SYSTem:ERRor[:NEXT]?`` (built in)                            3.2.2
``MEASure[:SCALar]:CURRent<n>[:DC]?`` n=1 LD, n=2 PD           3.3.6
``MEASure[:SCALar]:VOLTage1[:DC]?`` (LD forward voltage)       3.3.6
``MEASure[:SCALar]:POWer2?`` (optical power via the PD)        3.3.6
``MEASure[:SCALar]:TEMPerature?``                              3.3.6
``OUTPut<n>[:STATe]`` n=1 LD output, n=2 TEC output            3.4.1 / TEC output
``OUTPut[1]:PROTection:INTLock:TRIPped?``                      3.4.7
``OUTPut[1]:PROTection:KEYLock:TRIPped?``                      3.4.7
``SOURce[1]:FUNCtion:MODE {CURRent|POWer}``                    3.7.1
``SOURce[1]:CURRent:LIMit[:AMPLitude]``                        3.7.2
``SOURce[1]:CURRent[:LEVel][:IMMediate][:AMPLitude]``          3.7.3
``SOURce[1]:POWer[:LEVel][:IMMediate][:AMPLitude]``            3.7.4
``SOURce2:TEMPerature[:SPOint]``                               TEC source chapter
=============================================================  ===================

Numeric settings take ``MIN``/``MAX``/``DEF`` and queue ``-222,"Data out of range"``
outside their limits (manual 2.3).  ``*RST`` switches both outputs off (3.1.2) and,
as a documented *mock* choice, restores the ``DEF`` value of every setting modelled.

Behaviour the manual leaves to the hardware, chosen here and documented:

* The LD current limit clamps the drive current (it does not reject the setpoint).
* ``OUTPut ON`` while the interlock is open or the key switch is off queues
  ``-200,"Execution error"`` and leaves the output off; opening the interlock (or
  turning the key) while the laser emits switches the LD output off.
* The TEC holds the temperature at its setpoint while on and relaxes to ambient
  (25 °C) while off, instantly.

Physics (threshold and slope overridable per instance, or per ``mock://`` option):

* optical power ``P = η·(I − I_th)`` above threshold, 0 below, with slope efficiency
  ``η`` = :data:`SLOPE_EFFICIENCY_W_PER_A` and threshold ``I_th`` =
  :data:`THRESHOLD_CURRENT_A`; in constant-power mode the drive current is
  ``I_th + P_set/η``, clamped to the LD current limit (with the defaults, 10 mA and
  0.25 W/A, 14 mA gives the bench's default 1 mW);
* forward voltage ``V = V_F0 + R_s·I`` while the output is on;
* monitor photodiode current ``I_PD = R_mon·P``; ``MEAS:POW2?`` returns ``P``
  (a calibrated responsivity is assumed).

When a ``bench`` is given, the emitted power and the on/off state are written into
it by :meth:`MockITC4001._push_to_bench` (the only place that touches the bench).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from qkdlab.mock_instruments.server.scpi import (
    EXECUTION_ERROR,
    ILLEGAL_PARAMETER,
    MISSING_PARAMETER,
    UNDEFINED_HEADER,
    ScpiError,
    ScpiInstrument,
    ScpiServer,
    parse_bool,
)

log = logging.getLogger(__name__)

# -- laser-diode constants of the mock (a 1550 nm DFB in a butterfly package) -------
THRESHOLD_CURRENT_A = 0.010
"""Lasing threshold I_th (A)."""
SLOPE_EFFICIENCY_W_PER_A = 0.25
"""Slope efficiency η above threshold (W/A): 10 mW at 50 mA."""
FORWARD_VOLTAGE_V = 0.9
"""Diode turn-on voltage V_F0 (V)."""
SERIES_RESISTANCE_OHM = 5.0
"""Series resistance R_s (Ω)."""
MONITOR_RESPONSIVITY_A_PER_W = 0.05
"""Monitor photodiode current per emitted watt R_mon (A/W)."""
AMBIENT_TEMPERATURE_C = 25.0
"""Temperature of the laser mount with the TEC off (°C)."""

# -- setting ranges and *RST defaults -------------------------------------------------
CURRENT_RANGE_A = (0.0, 1.0)  # ITC4001: 1 A laser-diode source
CURRENT_LIMIT_RANGE_A = (0.0, 1.0)
POWER_RANGE_W = (0.0, 0.25)
TEMPERATURE_RANGE_C = (5.0, 45.0)  # mock's TEC window; the real one depends on the sensor
DEFAULTS: dict[str, Any] = {
    "current_setpoint_a": 0.0,
    "current_limit_a": 0.1,
    "power_setpoint_w": 0.0,
    "temperature_setpoint_c": 25.0,
    "mode": "CURR",
}

IDN = "THORLABS,ITC4001,M00000001,1.5.0/1.0.0/1.2.0"


class MockITC4001(ScpiInstrument):
    """SCPI twin of a Thorlabs ITC4001 (see the module docstring for its command table).

    Args:
        bench: optional shared bench model; the emitted power goes into it.
        threshold_a: lasing threshold (A).
        slope_w_per_a: slope efficiency (W/A).

    Attributes a test may read or change (all thread-safe under :attr:`lock`):
        interlock_open: the LD interlock loop is open (set it to trip the laser).
        keylock_off: the front-panel key switch is off.
        current_setpoints: every LD current setpoint received, in order (A).
    """

    idn = IDN

    def __init__(
        self,
        bench: Any = None,
        *,
        threshold_a: float = THRESHOLD_CURRENT_A,
        slope_w_per_a: float = SLOPE_EFFICIENCY_W_PER_A,
    ) -> None:
        super().__init__()
        self.bench = bench
        self.threshold_a = threshold_a
        self.slope_w_per_a = slope_w_per_a
        self.current_setpoints: list[float] = []
        self._interlock_open = False
        self._keylock_off = False
        self.ld_on = False
        self.tec_on = False
        self.current_setpoint_a: float = DEFAULTS["current_setpoint_a"]
        self.current_limit_a: float = DEFAULTS["current_limit_a"]
        self.power_setpoint_w: float = DEFAULTS["power_setpoint_w"]
        self.temperature_setpoint_c: float = DEFAULTS["temperature_setpoint_c"]
        self.mode: str = DEFAULTS["mode"]
        self._register()
        self._push_to_bench()

    # -- command table -------------------------------------------------------------
    def _register(self) -> None:
        # 3.7.3 LD current setpoint
        self.add_value(
            "SOURce[1]:CURRent[:LEVel][:IMMediate][:AMPLitude]",
            lambda: self.current_setpoint_a,
            self._set_current_setpoint,
            limits=CURRENT_RANGE_A,
            default=DEFAULTS["current_setpoint_a"],
        )
        # 3.7.2 LD current limit
        self.add_value(
            "SOURce[1]:CURRent:LIMit[:AMPLitude]",
            lambda: self.current_limit_a,
            self._set_current_limit,
            limits=CURRENT_LIMIT_RANGE_A,
            default=DEFAULTS["current_limit_a"],
        )
        # 3.7.4 LD optical power setpoint (constant-power mode)
        self.add_value(
            "SOURce[1]:POWer[:LEVel][:IMMediate][:AMPLitude]",
            lambda: self.power_setpoint_w,
            self._set_power_setpoint,
            limits=POWER_RANGE_W,
            default=DEFAULTS["power_setpoint_w"],
        )
        # TEC source: temperature setpoint in the default unit °C
        self.add_value(
            "SOURce2:TEMPerature[:SPOint]",
            lambda: self.temperature_setpoint_c,
            self._set_temperature_setpoint,
            limits=TEMPERATURE_RANGE_C,
            default=DEFAULTS["temperature_setpoint_c"],
        )
        # 3.7.1 LD source function
        self.add_command(
            "SOURce[1]:FUNCtion:MODE", query=lambda a, s: self.mode, write=self._write_mode
        )
        # 3.4.1 LD output state; OUTPut2 is the TEC output
        self.add_command("OUTPut<n>[:STATe]", query=self._query_output, write=self._write_output)
        # 3.4.7 protection queries
        self.add_command(
            "OUTPut[1]:PROTection:INTLock:TRIPped",
            query=lambda a, s: "1" if self._interlock_open else "0",
        )
        self.add_command(
            "OUTPut[1]:PROTection:KEYLock:TRIPped",
            query=lambda a, s: "1" if self._keylock_off else "0",
        )
        # 3.3.6 simple measurements
        self.add_command("MEASure[:SCALar]:CURRent<n>[:DC]", query=self._measure_current)
        self.add_command("MEASure[:SCALar]:VOLTage<n>[:DC]", query=self._measure_voltage)
        self.add_command("MEASure[:SCALar]:POWer<n>", query=self._measure_power)
        self.add_command(
            "MEASure[:SCALar]:TEMPerature", query=lambda a, s: f"{self.temperature_c():.6E}"
        )

    # -- setters -------------------------------------------------------------------
    def _set_current_setpoint(self, value: float) -> None:
        self.current_setpoint_a = value
        self.current_setpoints.append(value)
        self._push_to_bench()

    def _set_current_limit(self, value: float) -> None:
        self.current_limit_a = value
        self._push_to_bench()

    def _set_power_setpoint(self, value: float) -> None:
        self.power_setpoint_w = value
        self._push_to_bench()

    def _set_temperature_setpoint(self, value: float) -> None:
        self.temperature_setpoint_c = value

    def _write_mode(self, args: list[str], _s: tuple[int, ...]) -> None:
        if not args:
            raise ScpiError(MISSING_PARAMETER, "SOURce:FUNCtion:MODE")
        word = args[0].strip().upper()
        if word in ("CURR", "CURRENT"):
            self.mode = "CURR"
        elif word in ("POW", "POWER"):
            self.mode = "POW"
        else:
            raise ScpiError(ILLEGAL_PARAMETER, f"SOURce:FUNCtion:MODE {args[0]}")
        self._push_to_bench()

    def _query_output(self, _a: list[str], suffix: tuple[int, ...]) -> str:
        channel = suffix[0]
        if channel == 1:
            return "1" if self.ld_on else "0"
        if channel == 2:
            return "1" if self.tec_on else "0"
        raise ScpiError(UNDEFINED_HEADER, f"OUTPut{channel}")

    def _write_output(self, args: list[str], suffix: tuple[int, ...]) -> None:
        if not args:
            raise ScpiError(MISSING_PARAMETER, "OUTPut:STATe")
        state = parse_bool(args[0], "OUTPut:STATe")
        channel = suffix[0]
        if channel == 2:
            self.tec_on = state
            return
        if channel != 1:
            raise ScpiError(UNDEFINED_HEADER, f"OUTPut{channel}")
        if state and self._interlock_open:
            raise ScpiError(EXECUTION_ERROR, "LD interlock open")
        if state and self._keylock_off:
            raise ScpiError(EXECUTION_ERROR, "key switch off")
        self.ld_on = state
        self._push_to_bench()

    # -- measurements --------------------------------------------------------------
    def _measure_current(self, _a: list[str], suffix: tuple[int, ...]) -> str:
        if suffix[0] == 1:
            return f"{self.drive_current_a():.6E}"
        if suffix[0] == 2:
            return f"{MONITOR_RESPONSIVITY_A_PER_W * self.optical_power_w():.6E}"
        raise ScpiError(UNDEFINED_HEADER, f"MEASure:CURRent{suffix[0]}")

    def _measure_voltage(self, _a: list[str], suffix: tuple[int, ...]) -> str:
        if suffix[0] != 1:
            raise ScpiError(UNDEFINED_HEADER, f"MEASure:VOLTage{suffix[0]}")
        current = self.drive_current_a()
        volts = FORWARD_VOLTAGE_V + SERIES_RESISTANCE_OHM * current if self.ld_on else 0.0
        return f"{volts:.6E}"

    def _measure_power(self, _a: list[str], suffix: tuple[int, ...]) -> str:
        if suffix[0] != 2:
            raise ScpiError(UNDEFINED_HEADER, f"MEASure:POWer{suffix[0]}")
        return f"{self.optical_power_w():.6E}"

    # -- physics -------------------------------------------------------------------
    def drive_current_a(self) -> float:
        """Current through the laser diode (A): 0 while the output is off."""
        with self.lock:
            if not self.ld_on:
                return 0.0
            if self.mode == "POW":
                wanted = self.threshold_a + self.power_setpoint_w / self.slope_w_per_a
            else:
                wanted = self.current_setpoint_a
            return min(wanted, self.current_limit_a)

    def optical_power_w(self) -> float:
        """Average emitted optical power (W): ``η·(I − I_th)`` above threshold."""
        return self.slope_w_per_a * max(0.0, self.drive_current_a() - self.threshold_a)

    def temperature_c(self) -> float:
        """Laser mount temperature (°C)."""
        with self.lock:
            return self.temperature_setpoint_c if self.tec_on else AMBIENT_TEMPERATURE_C

    # -- interlock, key switch, reset ------------------------------------------------
    @property
    def interlock_open(self) -> bool:
        """True while the LD interlock loop is open; opening it switches the LD off."""
        return self._interlock_open

    @interlock_open.setter
    def interlock_open(self, value: bool) -> None:
        with self.lock:
            self._interlock_open = value
            if value:
                self.ld_on = False
            self._push_to_bench()

    @property
    def keylock_off(self) -> bool:
        """True while the key switch is off; turning it off switches the LD off."""
        return self._keylock_off

    @keylock_off.setter
    def keylock_off(self, value: bool) -> None:
        with self.lock:
            self._keylock_off = value
            if value:
                self.ld_on = False
            self._push_to_bench()

    def reset(self) -> None:
        """``*RST``: outputs off (manual 3.1.2) and every modelled setting to ``DEF``."""
        with self.lock:
            self.ld_on = False
            self.tec_on = False
            self.current_setpoint_a = DEFAULTS["current_setpoint_a"]
            self.current_limit_a = DEFAULTS["current_limit_a"]
            self.power_setpoint_w = DEFAULTS["power_setpoint_w"]
            self.temperature_setpoint_c = DEFAULTS["temperature_setpoint_c"]
            self.mode = DEFAULTS["mode"]
            self._push_to_bench()

    # -- the one place that touches the shared bench model --------------------------
    def _push_to_bench(self) -> None:
        """Write the emitted power (W) and the LD output state into ``bench.alice``.

        Expects ``bench.alice.laser_power_w`` and ``bench.alice.laser_on`` to be
        assignable and, if the bench has one, takes ``bench.lock`` while writing.  A
        bench that refuses is logged, never raised into the SCPI session.
        """
        if self.bench is None:
            return
        power = self.optical_power_w()
        lock = getattr(self.bench, "lock", None)
        try:
            with lock if lock is not None else contextlib.nullcontext():
                self.bench.alice.laser_power_w = power
                self.bench.alice.laser_on = self.ld_on
        except Exception:
            log.exception("ITC4001 mock: cannot write the laser state into the bench")


def serve(name: str, bench: Any = None, options: Mapping[str, str] | None = None) -> ScpiServer:
    """Factory for :mod:`qkdlab.mock_instruments.launcher`: an unstarted server.

    ``options`` (from ``mock://thorlabs/itc4001?threshold_a=0.012&slope_w_per_a=0.3``)
    override the laser constants.
    """
    opts = dict(options or {})
    kwargs: dict[str, float] = {}
    for key in ("threshold_a", "slope_w_per_a"):
        if key in opts:
            kwargs[key] = float(opts.pop(key))
    if opts:
        raise ValueError(f"unknown ITC4001 mock option(s): {', '.join(sorted(opts))}")
    return ScpiServer(name, MockITC4001(bench, **kwargs))
