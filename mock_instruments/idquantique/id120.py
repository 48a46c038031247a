"""Mock twin of the ID Quantique ID120 visible single-photon detector.

Serves the ID120 command set as described by the open-source Instrumental driver
``instrumental/drivers/spad/id120.py`` (the only public description found; see
``qkdlab.drivers.idquantique.id120`` for the citation and the command table).  All
values travel as integers in the instrument's units (µV, µs, ms, m°C) and booleans
as ``TRUE``/``FALSE``; a value outside the documented range queues
``-222,"Data out of range"`` and changes nothing.

Detector physics (a simple, documented, monotone model; not ID Quantique data)::

    V_ex = max(0, V_bias - breakdown_v)                    excess bias (V)
    η    = efficiency_max * (1 - exp(-V_ex / excess_scale_v))   detection efficiency
    DCR  = dark_cps_ref * (V_ex / excess_ref_v) * 2**((T - T_ref) / 7 °C)
    R    = η * Φ + DCR                                      true click rate (cps)
    R_m  = R / (1 + R τ)                                    non-paralysable dead time τ
    N    ~ Poisson(R_m * T_int)                             one counter window

With the regulation stopped (``REG:RUN FALSE``) the detector does not count.  Φ,
the photon rate reaching the detector, is :attr:`MockID120.photon_rate_cps` when no
bench is attached.  With a bench (``qkdlab.mock_instruments.bench.Bench``), η, DCR,
τ and "enabled" are written to ``bench.bob.detectors[detector_index]`` and R is the
bench's closed form ``expected_click_rates()[detector_index]`` (pulsed source,
P(click) = 1 - exp(-m) per pulse, plus dark counts, before dead time); see
:meth:`MockID120._bench_rate`, the only place the bench is touched.  The bench
models 1550 nm light, where a real Si SPAD such as the ID120 is blind: the mapping
from bias to η here ignores wavelength (set ``efficiency_max`` on the instance to
model that).  The mock does not wait for the integration
time: each counter query draws a fresh window from the seeded generator.

*Bench physics* (``bench_physics=True``, address option ``physics=bench``): the bench's
own detector settings (efficiency, dark counts, dead time — a station's ``mock_bench:
bob: detectors``) stay in force and the ID120 only gates the detector: it detects
(``bench.bob.detectors[i].enabled``) while the regulation runs and the bias is above
breakdown.  R is the bench's rate and τ the bench detector's dead time; the ID120's
own dead-time, threshold and temperature settings are stored and reported but do not
act.  This is how a station models its SPADs' control (bias, regulation, counter)
without replacing the bench's detector model.

Bias current: the ID120 documents no current read-back ([Instr-ID120] lists none), so
a photocurrent monitor is a separate instrument in series with the bias line (a
picoammeter, or the bias supply's own current monitor).  :meth:`MockID120.bias_current_a`
is what such a monitor reads; it is a Python read-out for tests and bench studies,
deliberately not a SCPI command.  With a bench it is
``bench.detector_bias_current_a()[detector_index]`` (avalanche charge per counted click
in Geiger mode; the linear-mode photocurrent of Eve's light when she blinds the
detector, Lydersen et al., Nat. Photon. 4, 686 (2010)); without one,
:attr:`MockID120.avalanche_charge_c` × the counted rate.  Under blinding the counters
report the clicks Eve's faked states cause, without dark counts.

``*RST`` (built into the framework; not documented for the ID120) restores the
mock's power-on state, which is the mock's own choice since the ID120's defaults
are not published: bias 0 V, threshold 50 mV, dead time 40 µs, 1 s integration,
setpoint -30 °C, regulation stopped, both outputs POSITIVE.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from qkdlab.mock_instruments.server import (
    DATA_OUT_OF_RANGE,
    ILLEGAL_PARAMETER,
    ScpiError,
    ScpiInstrument,
    ScpiServer,
    parse_number,
)
from qkdlab.mock_instruments.server.scpi import MISSING_PARAMETER, Handler

AMBIENT_C = 25.0
"""Temperature (°C) the SPAD drifts to while the regulation is stopped."""


class MockID120(ScpiInstrument):
    """Command table and physics of one ID120.

    Args:
        bench: optional shared bench model; detector settings are pushed to
            ``bench.bob.detectors[detector_index]`` and the incident rate read back.
        detector_index: which of the bench's detectors this ID120 is.
        seed: seed of the Poisson generator for the counter windows.
        serial: serial number reported by ``*IDN?``.
        bench_physics: keep the bench's detector settings and only gate the detector
            (see "Bench physics" in the module docstring).
    """

    # Physics constants of the model (see module docstring).
    breakdown_v = 180.0
    efficiency_max = 0.8
    excess_scale_v = 10.0
    dark_cps_ref = 100.0
    excess_ref_v = 20.0
    temperature_ref_c = -30.0
    avalanche_charge_c = 1e-12
    """Charge of one avalanche (C) without a bench (model's choice, ~pC)."""

    def __init__(
        self,
        bench: Any = None,
        detector_index: int = 0,
        *,
        seed: int | None = 0,
        serial: str = "MOCK0001",
        bench_physics: bool = False,
    ) -> None:
        super().__init__()
        self.idn = f"ID Quantique,ID120,{serial},mock-1.0"
        self.bench = bench
        self.detector_index = detector_index
        self.bench_physics = bench_physics
        self.rng = np.random.default_rng(seed)
        self.photon_rate_cps = 0.0
        """Photons per second reaching the detector when no bench is attached."""
        self.bias_fault = False
        """Set by a test to make ``BIAS:ERROR_STATUS?`` answer TRUE."""
        self.bias_setpoints_v: list[float] = []
        """Every bias setpoint received (V), in order: the ramp as the wire saw it."""
        self.reset()

        # [Instr-ID120] limits, in instrument units.
        self._add_setting("BIAS:VOLTAGE", "bias_uv", (0, 250_000_000), self._set_bias)
        self._add_setting("THRESHOLD:VOLTAGE", "threshold_uv", (0, 1_047_000))
        self._add_setting("DEADTIME:TIME", "dead_time_us", (40, 1_000_000))
        self._add_setting("COUNTERS:INTEGRATION_TIME", "integration_ms", (200, 100_000))
        self._add_setting("REG:TEMP_SET_POINT", "setpoint_mc", (-50_000, -10_000))
        self._add_literal("BIAS:ERROR_STATUS", query=lambda a, s: _bool(self.bias_fault))
        self._add_literal("REG:MEASURED_TEMP", query=lambda a, s: f"{self._temperature_mc()}")
        self._add_literal("REG:RUN", query=lambda a, s: _bool(self.running), write=self._set_run)
        self._add_literal("REG:STATE", query=lambda a, s: self._state())
        self._add_literal("COUNTERS:DETECTION_COUNT", query=lambda a, s: f"{self._window()}")
        self._add_literal("COUNTERS:DETECTION_FREQ", query=lambda a, s: self._frequency())
        for n in (1, 2):
            self._add_literal(
                f"OUTPUT{n}:POLARITY",
                query=lambda a, s, n=n: self.polarity[n],
                write=lambda a, s, n=n: self._set_polarity(n, a),
            )

    # -- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on state (the mock's choice; see the module docstring)."""
        with self.lock:
            self.bias_uv = 0
            self.threshold_uv = 50_000
            self.dead_time_us = 40
            self.integration_ms = 1_000
            self.setpoint_mc = -30_000
            self.running = False
            self.polarity = {1: "POSITIVE", 2: "POSITIVE"}

    @property
    def bias_v(self) -> float:
        return self.bias_uv * 1e-6

    @property
    def dead_time_s(self) -> float:
        return self.dead_time_us * 1e-6

    @property
    def integration_s(self) -> float:
        return self.integration_ms * 1e-3

    @property
    def temperature_c(self) -> float:
        """Instant regulation: at the setpoint while running, ambient otherwise."""
        return self.setpoint_mc * 1e-3 if self.running else AMBIENT_C

    # -- physics ----------------------------------------------------------------------------
    def excess_bias_v(self) -> float:
        return max(0.0, self.bias_v - self.breakdown_v)

    def bias_efficiency(self) -> float:
        """Detection efficiency the bias gives while detecting (regulation running)."""
        return self.efficiency_max * (1.0 - math.exp(-self.excess_bias_v() / self.excess_scale_v))

    def bias_dark_count_cps(self) -> float:
        """Dark-count rate the bias and temperature give while detecting."""
        thermal = 2.0 ** ((self.temperature_c - self.temperature_ref_c) / 7.0)
        return self.dark_cps_ref * (self.excess_bias_v() / self.excess_ref_v) * thermal

    def efficiency(self) -> float:
        """Detection efficiency now (0 while the regulation is stopped)."""
        return self.bias_efficiency() if self.running else 0.0

    def dark_count_cps(self) -> float:
        """Dark-count rate now (0 while the regulation is stopped)."""
        return self.bias_dark_count_cps() if self.running else 0.0

    def detecting(self) -> bool:
        """True while the SPAD can click: regulation running and bias above breakdown."""
        return self.running and self.excess_bias_v() > 0.0

    def true_click_rate_cps(self) -> float:
        """Clicks per second before dead time: η Φ + DCR (or the bench's value)."""
        return self._rate_and_dead_time()[0]

    def measured_rate_cps(self) -> float:
        """Expected counted rate after the non-paralysable dead time, R / (1 + R τ)."""
        rate, dead_time_s = self._rate_and_dead_time()
        return rate / (1.0 + rate * dead_time_s)

    def bias_current_a(self) -> float:
        """Mean current through the SPAD (A), as a current monitor on its bias line reads it.

        Not an ID120 command (see the module docstring): the bench's
        ``detector_bias_current_a()`` for this detector, or without a bench
        :attr:`avalanche_charge_c` × :meth:`measured_rate_cps`.
        """
        if self.bench is None:
            return self.avalanche_charge_c * self.measured_rate_cps()
        self._bench_rate()  # push the current settings first
        with self.bench.lock:
            return float(self.bench.detector_bias_current_a()[self.detector_index])

    def _rate_and_dead_time(self) -> tuple[float, float]:
        """R (cps, before dead time) and the τ (s) that acts on it."""
        bench = self._bench_rate()
        if bench is not None:
            return bench
        rate = self.efficiency() * self.photon_rate_cps + self.dark_count_cps()
        return rate, self.dead_time_s

    def _bench_rate(self) -> tuple[float, float] | None:
        """The single point of contact with the bench: push settings, read the rate.

        Returns None without a bench.  Writes ``bench.bob.detectors[i].{efficiency,
        dark_count_cps, dead_time_s, enabled}`` (with bench physics: ``enabled`` only)
        under ``bench.lock`` and returns ``bench.expected_click_rates()[i]`` (clicks/s
        with dark counts, before dead time) and the dead time (s) that
        :meth:`measured_rate_cps` then applies.
        """
        if self.bench is None:
            return None
        with self.bench.lock:
            detector = self.bench.bob.detectors[self.detector_index]
            if self.bench_physics:
                detector.enabled = self.detecting()
            else:
                detector.efficiency = self.bias_efficiency()
                detector.dark_count_cps = self.bias_dark_count_cps()
                detector.dead_time_s = self.dead_time_s
                detector.enabled = self.running
            rate = float(self.bench.expected_click_rates()[self.detector_index])
            return rate, float(detector.dead_time_s)

    def start_at(self, bias_v: float) -> None:
        """Power on at an operating point: regulation running, bias ``bias_v`` (V)."""
        with self.lock:
            self.bias_uv = round(bias_v * 1e6)
            self.running = True
        self._bench_rate()

    def _window(self) -> int:
        """Counts of one integration window: Poisson(R_m * T_int)."""
        return int(self.rng.poisson(self.measured_rate_cps() * self.integration_s))

    def _frequency(self) -> str:
        return f"{self._window() / self.integration_s:.0f}"

    def _temperature_mc(self) -> int:
        return round(self.temperature_c * 1e3)

    def _state(self) -> str:
        return "RUNNING" if self.running else "STOPPED"

    # -- setters ----------------------------------------------------------------------------
    def _set_bias(self, microvolts: int) -> None:
        self.bias_uv = microvolts
        self.bias_setpoints_v.append(microvolts * 1e-6)
        self._bench_rate()

    def _set_run(self, args: list[str], _s: tuple[int, ...]) -> None:
        self.running = _parse_bool_arg(args, "REG:RUN")
        self._bench_rate()

    def _set_polarity(self, n: int, args: list[str]) -> None:
        if not args:
            raise ScpiError(MISSING_PARAMETER, f"OUTPUT{n}:POLARITY")
        word = args[0].strip().upper()
        if word not in ("POSITIVE", "NEGATIVE"):
            raise ScpiError(ILLEGAL_PARAMETER, f"OUTPUT{n}:POLARITY {args[0]}")
        self.polarity[n] = word

    # -- command registration ---------------------------------------------------------------
    def _add_literal(
        self, header: str, *, query: Handler | None = None, write: Handler | None = None
    ) -> None:
        """Register a header that has a single (all upper-case) form."""
        self.add_command(header, query=query, write=write)

    def _add_setting(
        self,
        header: str,
        attribute: str,
        limits: tuple[int, int],
        setter: Callable[[int], None] | None = None,
    ) -> None:
        """An integer setting in instrument units with range checking (-222)."""
        lo, hi = limits

        def query(_a: list[str], _s: tuple[int, ...]) -> str:
            return f"{getattr(self, attribute)}"

        def write(args: list[str], _s: tuple[int, ...]) -> None:
            if not args:
                raise ScpiError(MISSING_PARAMETER, header)
            value = round(parse_number(args[0], header))
            if not lo <= value <= hi:
                raise ScpiError(DATA_OUT_OF_RANGE, f"{header} {value} not in [{lo}, {hi}]")
            if setter is None:
                setattr(self, attribute, value)
                self._bench_rate()
            else:
                setter(value)

        self._add_literal(header, query=query, write=write)


def _bool(value: bool) -> str:
    return "TRUE" if value else "FALSE"


def _parse_bool_arg(args: list[str], header: str) -> bool:
    if not args:
        raise ScpiError(MISSING_PARAMETER, header)
    word = args[0].strip().upper()
    if word == "TRUE":
        return True
    if word == "FALSE":
        return False
    raise ScpiError(ILLEGAL_PARAMETER, f"{header} {args[0]} (TRUE/FALSE)")


def serve(name: str, bench: Any = None, options: Mapping[str, str] | None = None) -> ScpiServer:
    """Factory for :mod:`qkdlab.mock_instruments.launcher`: an unstarted server.

    Options (``mock://idquantique/id120?detector=0&physics=bench&operating_bias_v=185``):

    * ``detector``: index of the bench detector this ID120 is (bench tagger channel
      ``detector_channels[detector]``); without it the mock is not bound to the bench
      and counts ``photon_rate_cps`` (0) plus its dark counts;
    * ``physics``: ``model`` (default: the ID120 model sets the bench detector's
      efficiency, dark counts and dead time) or ``bench`` (the bench's detector
      settings stay; the ID120 only switches the detector on and off);
    * ``operating_bias_v``: power on at this bias (V) with the regulation running, the
      detector already at its operating point (default: the mock's power-on state,
      0 V and stopped, which switches a bound detector off);
    * ``seed`` (default: the bench seed plus the detector index), ``serial``.
    """
    opts = dict(options or {})
    try:
        detector = int(opts.pop("detector")) if "detector" in opts else None
        physics = opts.pop("physics", "model")
        bias = float(opts.pop("operating_bias_v")) if "operating_bias_v" in opts else None
        default_seed = int(getattr(bench, "seed", 0)) + (detector or 0)
        seed = int(opts.pop("seed", default_seed))
    except ValueError as err:
        raise ValueError(f"ID120 mock option: {err}") from err
    serial = opts.pop("serial", f"MOCK{(detector or 0) + 1:04d}")
    if opts:
        raise ValueError(f"unknown ID120 mock option(s): {', '.join(sorted(opts))} "
                         "(known: detector, physics, operating_bias_v, seed, serial)")
    if physics not in ("model", "bench"):
        raise ValueError(f"ID120 mock option physics must be model or bench, not {physics!r}")
    if detector is not None:
        if bench is None:
            raise ValueError("ID120 mock option detector needs the mock bench")
        count = len(bench.bob.detectors)
        if not 0 <= detector < count:
            raise ValueError(f"ID120 mock option detector={detector} not in [0, {count - 1}]")
    if bias is not None and not 0.0 <= bias <= 250.0:
        raise ValueError(f"ID120 mock option operating_bias_v={bias} V not in [0, 250] V")
    mock = MockID120(bench if detector is not None else None, detector or 0, seed=seed,
                     serial=serial, bench_physics=physics == "bench")
    if bias is not None:
        mock.start_at(bias)
    else:
        mock._bench_rate()  # a bound detector follows the ID120's power-on state
    return ScpiServer(name, mock)
