"""Mock Thorlabs PM100D optical power meter console with a photodiode sensor (SCPI socket).

Command set: *PM100D Handheld Optical Power and Energy Meter Console — Operation Manual*
(Thorlabs), chapter 6.4 "PM100D SCPI Commands": 6.4.1 (SCPI syntax: short/long forms,
``;`` and ``;:`` chaining, MIN/MAX, ``<new line>`` terminator, the ``[SENSe:]`` tree of
CORRection:COLLect:ZERO, BEAMdiameter, WAVelength), 6.4.2.2 (command reference:
``*IDN?`` format ``THORLABS,MMM,SSS,X.X.X``, ``*OPC``, ``*RST``, ``*TST?``) and the
``SYSTem:SENSor:IDN?`` fields.  The pages of the SENSe, MEASure, CONFigure and STATus
subsystems were not reachable from this workplace; those headers follow the PM100
command tree as transcribed in the open-source ``ThorlabsPM100`` package (generated
from the same manual) and the PM400 manual's statement that its SCPI set is shared by
the PM100A/D/USB.  Modelled: everything ``qcodes_contrib_drivers``' ``Thorlab_PM100D``
(0.24.x) sends at construction and for its parameters, plus the adapter
:class:`qkdlab.drivers.thorlabs.pm100d.ThorlabsPM100D`.

======================================================  ==================================
Header (long form; upper case = short form)             Notes
======================================================  ==================================
``*IDN?``, ``*RST``, ``*CLS``, ``*OPC?``,               6.4.2.2 (built into ScpiInstrument)
``SYSTem:ERRor[:NEXT]?``
``SYSTem:SENSor:IDN?``                                  name, serial, cal., type, subtype,
                                                        flags
``[SENSe:]AVERage[:COUNt]`` 1…10000                     samples averaged per reading
``[SENSe:]CORRection[:LOSS[:INPut[:MAGNitude]]]`` dB    user attenuation −60…60 dB
``[SENSe:]CORRection:WAVelength`` nm                    sensor range 800…1700 nm
``[SENSe:]CORRection:BEAMdiameter`` mm                  0.001…9.5 mm
``[SENSe:]CORRection:COLLect:ZERO[:INITiate]``,         zero adjustment
``:ABORt``, ``:STATe?``, ``:MAGNitude?`` (W)
``[SENSe:]POWer[:DC]:RANGe[:UPPer]`` W, ``:AUTO``       power range / auto-ranging
``[SENSe:]CURRent[:DC]:RANGe[:UPPer]`` A, ``:AUTO``     photocurrent range
``CONFigure[:SCALar]:POWer`` / ``:CURRent[:DC]`` /      measurement configuration
``:FREQuency``
``INITiate[:IMMediate]``, ``ABORt``, ``FETCh?``,        one reading of the configured
``READ?``                                               quantity
``MEASure[:SCALar]:POWer`` / ``:CURRent[:DC]`` /        query: measure and return; command
``:FREQuency`` (query or command)                       form: measure, result via FETCh?
``STATus:OPERation[:EVENt]?``, ``:CONDition?``,         operation status register
``:PTRansition``, ``:NTRansition``, ``:ENABle``
======================================================  ==================================

Choices the manual leaves to the hardware, made here and documented:

* A header sent without its required value (e.g. a bare ``AVER``) queues ``-109,
  "Missing parameter"``; values outside a setting's range queue ``-222``.
* ``FETCh?`` before any measurement queues ``-230,"Data corrupt or stale"`` and gives no
  reply.  ``MEASure:<quantity>`` without ``?`` performs the measurement (the PM100
  command tree lists MEASure as an event), the result is then read by ``FETCh?``.
* Operation status: bit 9 (512, "measurement data ready") is set in the condition
  register while a fetched-able reading exists; a 0→1 transition latches it in the event
  register when the positive transition filter has bit 9 (``STAT:OPER:PTR 512``).  The
  event register is cleared when read.
* ``*RST`` restores the defaults below (averaging 1, 1550 nm, 0 dB, 9.5 mm, auto-range on,
  range 1 mW, power configuration, zero offset 0) and discards the last reading.

Physics:

* The true power is ``bench.optical_power_at(point)`` with ``point`` from the mock option
  ``?point=`` (``laser`` default, ``after_attenuator``, ``after_modulator``, ``modulator_tap``,
  ``bob_input``); without a bench, :attr:`MockPM100D.input_power_w`.  The sensor's
  spectral responsivity is ignored: the reading is the true power at any configured
  wavelength (as if the calibration curve were exact).
* Reading = (P + dark offset − zero offset)·10^(loss/10) + noise, clipped at the range's
  full scale (over-range).  Noise: Gaussian, σ = (range/10⁴ + 0.001·P)/√N for N averaged
  samples, from a seeded generator (``?seed=``, default 0).  The sensor's dark offset is
  :data:`DARK_OFFSET_W`; a zero adjustment stores it as the zero offset.
* Auto-range picks the smallest decade range 10 nW…10 mW (:data:`POWER_RANGES_W`) that
  holds the signal with 5 % headroom; a manual range is rounded up to the next decade.
* Photocurrent ``MEAS:CURR?`` = responsivity × P with the flat
  :data:`RESPONSIVITY_A_PER_W`; ``MEAS:FREQ?`` returns 0 Hz (the bench's pulse trains are
  far above the console's bandwidth: it sees their average).

The bench is read in :meth:`MockPM100D._true_power_w` only (under ``bench.lock``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from qkdlab.mock_instruments.server.scpi import (
    DATA_OUT_OF_RANGE,
    ILLEGAL_PARAMETER,
    MISSING_PARAMETER,
    ScpiError,
    ScpiInstrument,
    ScpiServer,
    parse_bool,
    parse_number,
)

log = logging.getLogger(__name__)

IDN = "THORLABS,PM100D,P0012345,2.4.0"
SENSOR_IDN = 'S122C,12345678,"18-Jan-2022",1,18,289'
"""``SYST:SENS:IDN?``: an S122C InGaAs photodiode sensor (power sensor, wavelength and
response settable, temperature sensor)."""

POINTS = ("laser", "after_attenuator", "after_modulator", "modulator_tap", "bob_input")
POWER_RANGES_W = tuple(10.0**k for k in range(-8, -1))
"""Full-scale power ranges (W): 10 nW … 10 mW."""
CURRENT_RANGES_A = POWER_RANGES_W
RESPONSIVITY_A_PER_W = 1.0
"""Flat photodiode responsivity used for ``MEAS:CURR?`` (A/W)."""
DARK_OFFSET_W = 2e-10
"""Sensor dark reading before a zero adjustment (W)."""
AUTO_RANGE_HEADROOM = 1.05
"""Auto-range keeps the signal below full scale / 1.05."""
RANGE_NOISE_FRACTION = 1e-4
RELATIVE_NOISE = 1e-3
STATUS_DATA_READY = 512
"""Operation status bit 9: measurement data ready."""
STALE_DATA = (-230, "Data corrupt or stale")

DEFAULTS: dict[str, Any] = {
    "averaging": 1,
    "wavelength_nm": 1550.0,
    "loss_db": 0.0,
    "beam_mm": 9.5,
    "auto_range": True,
    "power_range_w": 1e-3,
    "current_range_a": 1e-3,
    "quantity": "POW",
}


class MockPM100D(ScpiInstrument):
    """SCPI twin of a PM100D (see the module docstring for its command table).

    Args:
        bench: optional shared bench model, read at ``point``.
        point: where on the bench the sensor sits (see :data:`POINTS`).
        seed: seed of the reading noise.

    Attributes a test may read or change (under :attr:`lock`): :attr:`input_power_w`
    (used without a bench), every setting below, :attr:`zero_offset_w`.
    """

    idn = IDN

    def __init__(self, bench: Any = None, *, point: str = "laser", seed: int = 0) -> None:
        if point not in POINTS:
            raise ValueError(f"unknown power point {point!r}; choose from {POINTS}")
        super().__init__()
        self.bench = bench
        self.point = point
        self.rng = np.random.default_rng(seed)
        self.input_power_w = 0.0
        self.averaging: int = DEFAULTS["averaging"]
        self.wavelength_nm: float = DEFAULTS["wavelength_nm"]
        self.loss_db: float = DEFAULTS["loss_db"]
        self.beam_mm: float = DEFAULTS["beam_mm"]
        self.auto_range: bool = DEFAULTS["auto_range"]
        self.power_range_w: float = DEFAULTS["power_range_w"]
        self.quantity: str = DEFAULTS["quantity"]
        self.zero_offset_w = 0.0
        self.zero_state = 0
        self.ptr = 0
        self.ntr = 0
        self.enable = 0
        self._event = 0
        self._condition = 0
        self.last_reading: float | None = None
        self.readings = 0
        """Number of readings taken (for tests)."""
        self.reset()
        self._register()

    # -- command table -------------------------------------------------------------------
    def _register(self) -> None:
        self.add_value(
            "[SENSe:]AVERage[:COUNt]", lambda: self.averaging, self._set_averaging,
            limits=(1, 10000), default=DEFAULTS["averaging"], fmt="{:d}",
        )  # fmt: skip
        self.add_value(
            "[SENSe:]CORRection:WAVelength", lambda: self.wavelength_nm, self._set_wavelength,
            limits=(800.0, 1700.0), default=DEFAULTS["wavelength_nm"],
        )  # fmt: skip
        self.add_value(
            "[SENSe:]CORRection:BEAMdiameter", lambda: self.beam_mm, self._set_beam,
            limits=(0.001, 9.5), default=DEFAULTS["beam_mm"],
        )  # fmt: skip
        self.add_value(
            "[SENSe:]CORRection[:LOSS[:INPut[:MAGNitude]]]", lambda: self.loss_db,
            self._set_loss, limits=(-60.0, 60.0), default=DEFAULTS["loss_db"],
        )  # fmt: skip
        self.add_command("[SENSe:]CORRection:COLLect:ZERO[:INITiate]", write=self._zero)
        self.add_command("[SENSe:]CORRection:COLLect:ZERO:ABORt", write=lambda a, s: None)
        self.add_command(
            "[SENSe:]CORRection:COLLect:ZERO:STATe", query=lambda a, s: str(self.zero_state)
        )
        self.add_command(
            "[SENSe:]CORRection:COLLect:ZERO:MAGNitude",
            query=lambda a, s: f"{self.zero_offset_w:.6E}",
        )
        self.add_value(
            "[SENSe:]POWer[:DC]:RANGe[:UPPer]", self._power_range, self._set_power_range,
            limits=(POWER_RANGES_W[0], POWER_RANGES_W[-1]), default=DEFAULTS["power_range_w"],
        )  # fmt: skip
        self.add_command(
            "[SENSe:]POWer[:DC]:RANGe:AUTO",
            query=lambda a, s: "1" if self.auto_range else "0", write=self._write_auto,
        )  # fmt: skip
        self.add_value(
            "[SENSe:]CURRent[:DC]:RANGe[:UPPer]", lambda: self._power_range(),
            self._set_power_range, limits=(CURRENT_RANGES_A[0], CURRENT_RANGES_A[-1]),
            default=DEFAULTS["current_range_a"],
        )  # fmt: skip
        self.add_command(
            "[SENSe:]CURRent[:DC]:RANGe:AUTO",
            query=lambda a, s: "1" if self.auto_range else "0", write=self._write_auto,
        )  # fmt: skip
        for word, quantity in (("POWer", "POW"), ("CURRent[:DC]", "CURR"),
                               ("FREQuency", "FREQ")):  # fmt: skip
            self.add_command(
                f"CONFigure[:SCALar]:{word}", write=lambda a, s, q=quantity: self._configure(q)
            )
            self.add_command(
                f"MEASure[:SCALar]:{word}",
                query=lambda a, s, q=quantity: self._measure_query(q),
                write=lambda a, s, q=quantity: self._measure(q),
            )
        self.add_command("INITiate[:IMMediate]", write=lambda a, s: self._measure(self.quantity))
        self.add_command("ABORt", write=lambda a, s: None)
        self.add_command("FETCh", query=self._fetch)
        self.add_command("READ", query=lambda a, s: self._measure_query(self.quantity))
        self.add_command("SYSTem:SENSor:IDN", query=lambda a, s: SENSOR_IDN)
        self.add_command("STATus:OPERation[:EVENt]", query=lambda a, s: str(self._read_event()))
        self.add_command(
            "STATus:OPERation:CONDition", query=lambda a, s: str(self._condition)
        )
        for name in ("PTRansition", "NTRansition", "ENABle"):
            self.add_command(
                f"STATus:OPERation:{name}",
                query=lambda a, s, n=name: str(self._register_value(n)),
                write=lambda a, s, n=name: self._set_register(n, a),
            )

    # -- settings ------------------------------------------------------------------------
    def _set_averaging(self, value: float) -> None:
        self.averaging = round(value)

    def _set_wavelength(self, value: float) -> None:
        self.wavelength_nm = value

    def _set_beam(self, value: float) -> None:
        self.beam_mm = value

    def _set_loss(self, value: float) -> None:
        self.loss_db = value

    def _power_range(self) -> float:
        return self.power_range_w

    def _set_power_range(self, value: float) -> None:
        self.power_range_w = next(r for r in POWER_RANGES_W if r >= value * (1 - 1e-9))
        self.auto_range = False

    def _write_auto(self, args: list[str], _s: tuple[int, ...]) -> None:
        if not args:
            raise ScpiError(MISSING_PARAMETER, "POWer:RANGe:AUTO")
        self.auto_range = parse_bool(args[0], "POWer:RANGe:AUTO")

    def _zero(self, _a: list[str], _s: tuple[int, ...]) -> None:
        """Zero adjustment: store the dark reading (the input taken as covered)."""
        self.zero_offset_w = DARK_OFFSET_W
        self.zero_state = 0  # finishes at once

    def _configure(self, quantity: str) -> None:
        self.quantity = quantity
        self._set_data_ready(False)

    def _register_value(self, name: str) -> int:
        return {"PTRansition": self.ptr, "NTRansition": self.ntr, "ENABle": self.enable}[name]

    def _set_register(self, name: str, args: list[str]) -> None:
        if not args:
            raise ScpiError(MISSING_PARAMETER, f"STATus:OPERation:{name}")
        value = parse_number(args[0], f"STATus:OPERation:{name}")
        if value != int(value) or not 0 <= value <= 32767:
            raise ScpiError(DATA_OUT_OF_RANGE, f"STATus:OPERation:{name} {args[0]}")
        if name == "PTRansition":
            self.ptr = int(value)
        elif name == "NTRansition":
            self.ntr = int(value)
        else:
            self.enable = int(value)

    # -- status register ---------------------------------------------------------------------
    def _set_data_ready(self, ready: bool) -> None:
        before = self._condition & STATUS_DATA_READY
        self._condition = (self._condition | STATUS_DATA_READY) if ready else (
            self._condition & ~STATUS_DATA_READY
        )
        after = self._condition & STATUS_DATA_READY
        if not before and after:
            self._event |= after & self.ptr
        elif before and not after:
            self._event |= before & self.ntr

    def _read_event(self) -> int:
        value, self._event = self._event, 0
        return value

    # -- measurements -----------------------------------------------------------------------
    def _measure(self, quantity: str) -> None:
        self.quantity = quantity
        self.last_reading = self.reading(quantity)
        self.readings += 1
        self._set_data_ready(True)

    def _measure_query(self, quantity: str) -> str:
        self._measure(quantity)
        return self._fetch([], ())

    def _fetch(self, args: list[str], _s: tuple[int, ...]) -> str:
        if args:
            raise ScpiError(ILLEGAL_PARAMETER, f"FETCh? {args[0]}")
        if self.last_reading is None:
            raise ScpiError(STALE_DATA)
        return f"{self.last_reading:.6E}"

    def reading(self, quantity: str = "POW") -> float:
        """One reading of ``quantity`` (W, A or Hz) with range, noise and corrections."""
        with self.lock:
            if quantity == "FREQ":
                return 0.0
            true = self._true_power_w()
            power = (true + DARK_OFFSET_W - self.zero_offset_w) * 10.0 ** (self.loss_db / 10.0)
            if self.auto_range:  # decided on the signal, with headroom for the noise
                self.power_range_w = next(
                    (r for r in POWER_RANGES_W if r >= AUTO_RANGE_HEADROOM * abs(power)),
                    POWER_RANGES_W[-1],
                )
            full_scale = self.power_range_w
            sigma = (RANGE_NOISE_FRACTION * full_scale + RELATIVE_NOISE * abs(power))
            sigma /= math.sqrt(self.averaging)
            value = float(power + sigma * self.rng.standard_normal())
            value = min(value, full_scale)  # over-range: the ADC saturates
            return value * RESPONSIVITY_A_PER_W if quantity == "CURR" else value

    def reset(self) -> None:
        """``*RST``: every modelled setting to its default; the last reading is discarded."""
        with self.lock:
            self.averaging = DEFAULTS["averaging"]
            self.wavelength_nm = DEFAULTS["wavelength_nm"]
            self.loss_db = DEFAULTS["loss_db"]
            self.beam_mm = DEFAULTS["beam_mm"]
            self.auto_range = DEFAULTS["auto_range"]
            self.power_range_w = DEFAULTS["power_range_w"]
            self.quantity = DEFAULTS["quantity"]
            self.zero_offset_w = 0.0
            self.last_reading = None
            self._set_data_ready(False)

    # -- the one place that reads the shared bench model -----------------------------------
    def _true_power_w(self) -> float:
        """Optical power at the sensor (W): ``bench.optical_power_at(point)`` or
        :attr:`input_power_w` without a bench; a bench that fails is logged and reads 0."""
        if self.bench is None:
            return self.input_power_w
        lock = getattr(self.bench, "lock", None)
        try:
            with lock if lock is not None else contextlib.nullcontext():
                return float(self.bench.optical_power_at(self.point))
        except Exception:
            log.exception("PM100D mock: cannot read the optical power from the bench")
            return 0.0


def serve(name: str, bench: Any = None, options: Mapping[str, str] | None = None) -> ScpiServer:
    """Factory for :mod:`qkdlab.mock_instruments.launcher`: an unstarted server.

    Options (``mock://thorlabs/pm100d?point=after_attenuator&seed=3``): the bench point
    the sensor reads and the seed of the reading noise.
    """
    opts = dict(options or {})
    point = opts.pop("point", "laser")
    seed = int(opts.pop("seed", "0"))
    if opts:
        raise ValueError(f"unknown PM100D mock option(s): {', '.join(sorted(opts))}")
    return ScpiServer(name, MockPM100D(bench, point=point, seed=seed))
