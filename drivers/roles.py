"""Role interfaces: what experiments and calibration loops may ask of an instrument.

Experiments talk to roles, not vendors.  Each vendor driver satisfies one or more of
these ``typing.Protocol`` classes structurally (``isinstance`` works: they are
``runtime_checkable``).  Quantities are SI (W, A, V, Hz, s, dB); event times are
int64 ps.  Every role has ``safe_state()``: what a failed run calls on its way out
(laser off, detector bias ramped down, tagger stopped).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from qkdlab.tags import TagBlock


@runtime_checkable
class SafeStateCapable(Protocol):
    """Anything that can be put in a state where it cannot hurt people or hardware."""

    def safe_state(self) -> None:
        """Turn outputs off / ramp biases down; must not raise if already safe."""


@runtime_checkable
class Laser(SafeStateCapable, Protocol):
    """A laser source: on/off with interlock, drive current or power, wavelength."""

    def output_on(self) -> None:
        """Switch the emission on; refuse (raise) while an interlock is open."""

    def output_off(self) -> None:
        """Switch the emission off."""

    def is_on(self) -> bool:
        """True while the laser emits."""

    def interlock_closed(self) -> bool:
        """True when the interlock allows emission."""


@runtime_checkable
class SinglePhotonDetector(SafeStateCapable, Protocol):
    """A single-photon detector (one or more channels)."""

    def count_rates(self) -> list[float]:
        """Counts per second on each channel (cps), over the instrument's integration time."""

    def enable(self) -> None:
        """Bring the detector to its operating point (bias ramped up, gate on)."""

    def disable(self) -> None:
        """Ramp the bias down / switch detection off."""


@runtime_checkable
class TimeTagger(SafeStateCapable, Protocol):
    """A time-to-digital converter returning int64 ps tags per channel."""

    def set_trigger_level(self, channel: int, level_v: float) -> None:
        """Input discriminator level of ``channel`` (V)."""

    def set_input_delay(self, channel: int, delay_ps: int) -> None:
        """Delay added to ``channel``'s tags (ps)."""

    def set_dead_time(self, channel: int, dead_time_ps: int) -> None:
        """Minimum spacing between tags on ``channel`` (ps)."""

    def acquire(self, duration_s: float) -> TagBlock:
        """Tags of the next ``duration_s`` seconds as one block."""

    def stream(self, duration_s: float | None = None) -> Iterator[TagBlock]:
        """Consecutive blocks with bounded memory; overflow reported in each block."""


@runtime_checkable
class PatternSource(SafeStateCapable, Protocol):
    """An AWG or pattern generator driving Alice's modulators."""

    def load_pattern(self, levels_v: list[float], symbols: bytes, rate_hz: float) -> None:
        """Load a symbol sequence (indices into ``levels_v``) played at ``rate_hz``."""

    def run(self) -> None:
        """Start playing."""

    def stop(self) -> None:
        """Stop playing."""


@runtime_checkable
class BB84Transmitter(SafeStateCapable, Protocol):
    """Alice's pattern generator for key runs: a random BB84 pattern and its record."""

    def configure(self, *, seed: int, p_z: float, p_signal: float, p_decoy: float,
                  frame_pulses: int, rep_rate_hz: float | None = None) -> None:
        """Load a pattern: basis bias, intensity-class probabilities, frame length."""

    def record(self, pulse_index: npt.ArrayLike) -> tuple[
        npt.NDArray[np.int8], npt.NDArray[np.int8], npt.NDArray[np.int8]
    ]:
        """Alice's (basis, bit, intensity) of the given pulse indices."""

    def start(self) -> None:
        """Drive the modulators with the pattern."""

    def stop(self) -> None:
        """Stop driving the modulators."""


@runtime_checkable
class IntensityModulator(SafeStateCapable, Protocol):
    """Bias control of a Mach–Zehnder intensity modulator."""

    def set_bias(self, volts: float) -> None:
        """DC bias (V)."""

    def get_bias(self) -> float:
        """DC bias (V)."""


@runtime_checkable
class PolarizationController(SafeStateCapable, Protocol):
    """Sets a polarization transformation through a few actuator values."""

    def set_actuators(self, values: list[float]) -> None:
        """Actuator settings (V or degrees, as the model documents)."""

    def get_actuators(self) -> list[float]:
        """Current actuator settings."""


@runtime_checkable
class Attenuator(SafeStateCapable, Protocol):
    """A variable optical attenuator."""

    def set_attenuation_db(self, db: float) -> None:
        """Attenuation (dB)."""

    def get_attenuation_db(self) -> float:
        """Attenuation (dB)."""


@runtime_checkable
class PowerMeter(Protocol):
    """An optical power meter."""

    def read_power_w(self) -> float:
        """Optical power (W) at the configured wavelength."""
