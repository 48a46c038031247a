"""QCoDeS driver for an FPGA BB84 pattern generator with a counter-based PRNG.

QKD transmitters drive their modulators from FPGA boards running each lab's own
firmware; there is no vendor command set to follow.  This module *defines* one — a
small SCPI set that a firmware implements so that qkdlab can run it — and drives it.
The pattern algorithm is :data:`qkdlab.patterns.ALGORITHM`: the symbol of pulse ``i``
is a pure function of (seed, i), so Alice's record is recomputed here at the detected
indices only (a pseudo-random pattern: keys from it are for tests and demonstrations).

=================================  ==============================================
Command                            Meaning
=================================  ==============================================
``*IDN?``, ``*RST``, ``SYST:ERR?``   IEEE 488.2 / SCPI basics
``SOURce:FREQuency <Hz>``          pulse repetition rate (Hz)
``PATTern:ALGorithm?``             the PRNG; must equal ``qkdlab.patterns.ALGORITHM``
``PATTern:SEED <n>``               64-bit pattern seed (0 … 2⁶³−1)
``PATTern:PROBability:ZBASis <p>``  probability of the Z basis
``PATTern:PROBability:SIGNal <p>``  probability of the signal intensity class
``PATTern:PROBability:DECoy <p>``   probability of the decoy class (vacuum: the rest)
``PATTern:FRAMe <n>``              pulses per frame; a marker leaves at each frame start
``OUTPut[:STATe] ON|OFF``          drive the modulators with the pattern (or hold)
=================================  ==============================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from qcodes import validators as vals
from qcodes.instrument import VisaInstrument, VisaInstrumentKWArgs
from qcodes.parameters import Parameter, create_on_off_val_mapping

from qkdlab.drivers.scpi_errors import (
    MalformedErrorReplyError,
    drain_error_queue,
    harden_reply_parsers,
)
from qkdlab.patterns import ALGORITHM, bb84_symbols

if TYPE_CHECKING:
    from typing_extensions import Unpack

I8Array = npt.NDArray[np.int8]


class PatternGeneratorError(RuntimeError):
    """The pattern generator cannot reproduce or accept the requested pattern."""


class FPGAPatternGenerator(VisaInstrument):
    """BB84 pattern generator; satisfies :class:`qkdlab.drivers.roles.BB84Transmitter`.

    Args:
        name: QCoDeS instrument name.
        address: VISA resource (``TCPIP::<host>::<port>::SOCKET`` for the firmware's
            socket server).
        max_rate_hz: the board's fastest pulse clock (Hz).
    """

    default_terminator = "\n"
    pattern_algorithm = ALGORITHM
    """Alice's record can be recomputed offline from the seed with this algorithm."""

    def __init__(self, name: str, address: str, *, max_rate_hz: float = 2.5e9,
                 **kwargs: Unpack[VisaInstrumentKWArgs]) -> None:
        super().__init__(name, address, **kwargs)
        algorithm = self.ask("PATT:ALG?").strip()
        if algorithm != ALGORITHM:
            raise PatternGeneratorError(
                f"{name}: firmware pattern algorithm {algorithm!r} is not {ALGORITHM!r}; "
                "Alice's record could not be reproduced"
            )
        self.rep_rate: Parameter = self.add_parameter(
            "rep_rate", label="Pulse repetition rate", unit="Hz",
            get_cmd="SOUR:FREQ?", get_parser=float, set_cmd="SOUR:FREQ {:.12g}",
            vals=vals.Numbers(1e3, max_rate_hz),
            docstring="Pulse clock of the pattern (Hz).")
        """Pulse repetition rate (Hz)."""
        self.seed: Parameter = self.add_parameter(
            "seed", label="Pattern seed", get_cmd="PATT:SEED?", get_parser=int,
            set_cmd="PATT:SEED {:d}", vals=vals.Ints(0, 2**63 - 1),
            docstring="Seed of the counter-based pattern PRNG.")
        """Pattern seed."""
        self.p_z: Parameter = self.add_parameter(
            "p_z", label="P(Z basis)", get_cmd="PATT:PROB:ZBAS?", get_parser=float,
            set_cmd="PATT:PROB:ZBAS {:.9g}", vals=vals.Numbers(0.0, 1.0))
        """Probability of the Z basis."""
        self.p_signal: Parameter = self.add_parameter(
            "p_signal", label="P(signal)", get_cmd="PATT:PROB:SIGN?", get_parser=float,
            set_cmd="PATT:PROB:SIGN {:.9g}", vals=vals.Numbers(0.0, 1.0))
        """Probability of the signal intensity class."""
        self.p_decoy: Parameter = self.add_parameter(
            "p_decoy", label="P(decoy)", get_cmd="PATT:PROB:DEC?", get_parser=float,
            set_cmd="PATT:PROB:DEC {:.9g}", vals=vals.Numbers(0.0, 1.0))
        """Probability of the decoy class (vacuum takes the rest)."""
        self.frame_pulses: Parameter = self.add_parameter(
            "frame_pulses", label="Pulses per frame", get_cmd="PATT:FRAM?", get_parser=int,
            set_cmd="PATT:FRAM {:d}", vals=vals.Ints(1, 2**40),
            docstring="A frame marker leaves at every multiple of this pulse index.")
        """Pulses per frame (marker period)."""
        self.output: Parameter = self.add_parameter(
            "output", label="Pattern output", get_cmd="OUTP?", set_cmd="OUTP {}",
            val_mapping=create_on_off_val_mapping(on_val="1", off_val="0"))
        """Whether the pattern drives the modulators."""
        harden_reply_parsers(self)  # garbage replies: a clear error, never NaN (scpi_errors)
        self.connect_message()

    # -- BB84Transmitter role ------------------------------------------------------------
    def configure(self, *, seed: int, p_z: float, p_signal: float, p_decoy: float,
                  frame_pulses: int, rep_rate_hz: float | None = None) -> None:
        """Load a pattern; probabilities are checked before anything is written."""
        if p_signal + p_decoy > 1.0 + 1e-12:
            raise ValueError(
                f"{self.name}: p_signal + p_decoy must be <= 1, got {p_signal} + {p_decoy}"
            )
        for parameter, value in ((self.p_z, p_z), (self.p_signal, p_signal),
                                 (self.p_decoy, p_decoy), (self.seed, seed),
                                 (self.frame_pulses, frame_pulses)):
            parameter.validate(value)
        if rep_rate_hz is not None:
            self.rep_rate.validate(rep_rate_hz)
        # lower the sum first so the instrument never sees signal + decoy > 1
        self.p_decoy(0.0)
        self.p_signal(p_signal)
        self.p_decoy(p_decoy)
        self.p_z(p_z)
        self.seed(seed)
        self.frame_pulses(frame_pulses)
        if rep_rate_hz is not None:
            self.rep_rate(rep_rate_hz)
        # the pattern must be in force before any light is counted: wait, then check
        self.ask("*OPC?")
        self.check_errors()

    def record(self, pulse_index: npt.ArrayLike) -> tuple[I8Array, I8Array, I8Array]:
        """Alice's ``(basis, bit, intensity)`` of the given pulses, from the loaded pattern.

        Uses the values last read or written (call :meth:`configure` or read the
        parameters after connecting to an instrument someone else configured).
        """
        seed = self.seed.get_latest()
        return bb84_symbols(int(seed), pulse_index, float(self.p_z.get_latest()),
                            float(self.p_signal.get_latest()), float(self.p_decoy.get_latest()))

    def start(self) -> None:
        """Drive the modulators with the pattern."""
        self.output("on")

    def stop(self) -> None:
        """Hold the modulators (no pattern)."""
        self.output("off")

    def safe_state(self) -> None:
        """Stop the pattern (the laser role switches the light itself)."""
        self.stop()

    def check_errors(self) -> None:
        """Raise if the instrument's error queue holds errors."""
        try:
            entries, _ = drain_error_queue(self.ask, "SYST:ERR?", 32)
        except MalformedErrorReplyError as err:
            raise PatternGeneratorError(f"{self.name}: {err}") from None
        errors = [f'{code:+d},"{message}"' for code, message in entries]
        if errors:
            raise PatternGeneratorError(f"{self.name}: instrument errors: {'; '.join(errors)}")
