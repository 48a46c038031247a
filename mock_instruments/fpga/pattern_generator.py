"""Mock of the FPGA pattern generator (command set in ``qkdlab.drivers.fpga``).

Settings go straight to the bench: rate → ``alice.rep_rate_hz``; seed, probabilities
and frame length → ``alice.pattern``.  ``OUTP ON`` restarts the pattern: its symbol 0
is the next pulse the bench emits (``pattern.start_index``), and frame markers count
from there, as on firmware whose counter resets when the pattern starts.  The bench
draws Alice's symbols with the same algorithm (:mod:`qkdlab.patterns`), so the
driver's record matches the light.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from qkdlab.mock_instruments.server import (
    DATA_OUT_OF_RANGE,
    SETTINGS_CONFLICT,
    ScpiError,
    ScpiInstrument,
    ScpiServer,
    parse_bool,
)
from qkdlab.patterns import ALGORITHM


class MockPatternGenerator(ScpiInstrument):
    """Pattern generator twin; ``bench`` (optional) receives every setting."""

    def __init__(self, bench: Any | None = None, serial: str = "PG000001") -> None:
        super().__init__()
        self.idn = f"QKDLAB,FPGA-PG1,{serial},1.0"
        self.bench = bench
        self.rate_hz = 100e6
        self.seed = 0
        self.p_z, self.p_signal, self.p_decoy = 0.5, 0.7, 0.2
        self.frame_pulses = 2**20
        self.output = False
        if bench is not None:
            with bench.lock:
                pattern = bench.alice.pattern
                self.rate_hz = float(bench.alice.rep_rate_hz)
                self.seed = int(bench.seed if pattern.seed is None else pattern.seed)
                self.p_z, self.p_signal = float(pattern.p_z), float(pattern.p_signal)
                self.p_decoy = float(pattern.p_decoy)
                self.frame_pulses = int(pattern.frame_pulses)
        self.add_command("PATTern:ALGorithm", query=lambda a, s: ALGORITHM)
        self.add_value("SOURce:FREQuency", lambda: self.rate_hz, self._set("rate_hz"),
                       limits=(1e3, 2.5e9), fmt="{:.12g}")
        self.add_command("PATTern:SEED", query=lambda a, s: str(self.seed),
                         write=lambda a, s: self._set_seed(a))
        self.add_value("PATTern:PROBability:ZBASis", lambda: self.p_z, self._set("p_z"),
                       limits=(0.0, 1.0), fmt="{:.9g}")
        self.add_value("PATTern:PROBability:SIGNal", lambda: self.p_signal,
                       self._set_class("p_signal"), limits=(0.0, 1.0), fmt="{:.9g}")
        self.add_value("PATTern:PROBability:DECoy", lambda: self.p_decoy,
                       self._set_class("p_decoy"), limits=(0.0, 1.0), fmt="{:.9g}")
        self.add_value("PATTern:FRAMe", lambda: self.frame_pulses,
                       self._set("frame_pulses", int), limits=(1, 2**40), fmt="{:.0f}")
        self.add_command("OUTPut[:STATe]", query=lambda a, s: "1" if self.output else "0",
                         write=lambda a, s: self._set_output(a))

    def _set(self, attr: str, kind: type = float) -> Any:
        def setter(value: float) -> None:
            setattr(self, attr, kind(value))
            self._push_to_bench()
        return setter

    def _set_class(self, attr: str) -> Any:
        def setter(value: float) -> None:
            other = self.p_decoy if attr == "p_signal" else self.p_signal
            if value + other > 1.0 + 1e-12:
                raise ScpiError(SETTINGS_CONFLICT, f"signal + decoy = {value + other} > 1")
            setattr(self, attr, float(value))
            self._push_to_bench()
        return setter

    def _set_seed(self, args: list[str]) -> None:
        """Seeds are 64-bit integers: parsed exactly, never through a float."""
        try:
            value = int(args[0])
        except (IndexError, ValueError):
            raise ScpiError(DATA_OUT_OF_RANGE, f"PATTern:SEED needs an integer: {args}") from None
        if not 0 <= value < 2**63:
            raise ScpiError(DATA_OUT_OF_RANGE, f"PATTern:SEED {value} not in [0, 2^63)")
        self.seed = value
        self._push_to_bench()

    def _set_output(self, args: list[str]) -> None:
        if not args:
            raise ScpiError(DATA_OUT_OF_RANGE, "OUTPut needs ON or OFF")
        on = parse_bool(args[0], "OUTPut")
        if on and not self.output and self.bench is not None:
            # the firmware's symbol counter restarts at 0 with the pattern
            with self.bench.lock:
                self.bench.alice.pattern = dataclasses.replace(
                    self.bench.alice.pattern, start_index=self.bench.next_pulse_index())
        self.output = on

    def reset(self) -> None:
        self.output = False

    def _push_to_bench(self) -> None:
        if self.bench is None:
            return
        with self.bench.lock:
            self.bench.alice.rep_rate_hz = self.rate_hz
            self.bench.alice.pattern = dataclasses.replace(
                self.bench.alice.pattern, seed=self.seed, p_z=self.p_z,
                p_signal=self.p_signal, p_decoy=self.p_decoy,
                p_vacuum=max(0.0, 1.0 - self.p_signal - self.p_decoy),
                frame_pulses=self.frame_pulses)


def serve(name: str, bench: object | None, options: Mapping[str, str]) -> ScpiServer:
    """Launcher factory: an unstarted server for ``mock://fpga/pattern_generator``."""
    return ScpiServer(name, MockPatternGenerator(bench, serial=options.get("serial", "PG000001")))
