"""QCoDeS driver for the ID Quantique ID120 visible single-photon detector (Si SPAD).

Source of the command set
-------------------------
No ID Quantique manual for the ID120 (nor for the ID100, ID230 or ID Qube) with a
remote command set could be found in any public material reachable from here.  The
only public description of the ID120's remote interface that could be found is the
open-source Instrumental driver ``instrumental/drivers/spad/id120.py`` (mabuchilab
Instrumental, class ``ID120``, "Driver for IDQuantique ID120 SPAD Module"), which
lists the ID120's commands with their units, ranges and resolutions.  That file is
cited below as **[Instr-ID120]**; "range" entries quote its ``limits=[min, max,
step]`` in instrument units.  It is a third-party driver, not ID Quantique's
manual: verify each command against the ID120 user guide before connecting real
hardware (see "Open points" below).

Wire format (all from [Instr-ID120]): ASCII over USB-TMC (VID 0x1DDC, PID 0x0330),
replies terminated by ``\\n``; SCPI-like ``HEADER?`` queries and ``HEADER value``
settings; every quantity is an *integer in a small unit* (µV, µs, ms, m°C), booleans
are ``TRUE``/``FALSE``.  This driver converts everything to SI at the parameter
boundary (``get_parser``/``set_parser``):

===============================  ======================  =================================
command                          instrument unit         driver parameter (unit)
===============================  ======================  =================================
``BIAS:VOLTAGE``                 µV, 0…250 V, 80 mV      ``bias_voltage`` (V), ramped
``BIAS:ERROR_STATUS?``           ``TRUE``/``FALSE``      ``bias_error`` / ``check_errors()``
``THRESHOLD:VOLTAGE``            µV, 0…1.047 V, 0.5 mV   ``threshold`` (V)
``DEADTIME:TIME``                µs, 40…10⁶, step 40     ``dead_time`` (s)
``COUNTERS:INTEGRATION_TIME``    ms, 200…100000, 200     ``integration_time`` (s)
``COUNTERS:DETECTION_FREQ?``     Hz                      ``count_rate`` (cps)
``COUNTERS:DETECTION_COUNT?``    counts                  ``counts`` (counts per window)
``REG:TEMP_SET_POINT``           m°C, −50…−10 °C, 1 °C   ``temperature_setpoint`` (°C)
``REG:MEASURED_TEMP?``           m°C                     ``temperature`` (°C)
``REG:RUN``                      ``TRUE``/``FALSE``      ``running`` (bool)
``REG:STATE?``                   free text               ``state`` (str)
``OUTPUT<n>:POLARITY``           ``POSITIVE|NEGATIVE``   ``outputs[n-1].polarity``
``*IDN?``                        IEEE 488.2              ``get_idn()``
===============================  ======================  =================================

Temperatures are in degrees Celsius (the instrument's unit is m°C).

Safety
------
* The bias is only ever changed through a QCoDeS ramp: ``bias_voltage.step`` (V per
  step, default :attr:`IDQID120.BIAS_RAMP_STEP_V`) and ``bias_voltage.inter_delay``
  (s between steps, default :attr:`IDQID120.BIAS_RAMP_DELAY_S`).  The ramp starts
  from a fresh ``BIAS:VOLTAGE?`` reading, never from a possibly stale cache, and
  every intermediate step is validated.
* ``bias_max_v`` is a hard ceiling (default: the 250 V top of the instrument's
  ``BIAS:VOLTAGE`` range, [Instr-ID120]); the validator rejects a larger target
  before anything is written, with a message naming the parameter and the range.
* :meth:`IDQID120.safe_state` ramps the bias to 0 V and stops the regulation, then
  reads both back (repeating once, then raising, if they were not reached).
* Link loss: a query that gets no reply reopens the link (until the instrument
  answers ``*IDN?`` again, up to ``reconnect_timeout_s``) and is retried once.  Over
  TCP a *write* sent into a link the peer has just closed can be lost without any
  error (the socket only fails on the next send); :meth:`IDQID120.enable` and
  :meth:`IDQID120.disable` therefore verify their end state by reading it back.

Open points (not in the source, so not guessed)
-----------------------------------------------
* No error queue (``SYST:ERR?``) and no ``*RST`` are documented for the ID120:
  :meth:`IDQID120.check_errors` reads the documented ``BIAS:ERROR_STATUS?`` flag
  instead, and there is no ``reset()``.
* ``DEADTIME:TIME`` is given in µs with a 40…10⁶ range; 40 µs minimum is long for a
  Si SPAD, so the unit should be checked on hardware (it is the single constant
  :attr:`IDQID120.DEAD_TIME_UNIT_S`).
* ``*:CAPABILITY?`` and ``INFO:*?`` queries exist but their reply formats are not
  described, so they are not wrapped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from qcodes import validators as vals
from qcodes.instrument import (
    ChannelList,
    InstrumentBaseKWArgs,
    InstrumentChannel,
    VisaInstrument,
    VisaInstrumentKWArgs,
)
from qcodes.parameters import Parameter
from qcodes.parameters.permissive_range import permissive_range

from qkdlab.drivers.scpi_errors import harden_reply_parsers, parse_number
from qkdlab.drivers.visa_link import ReconnectingVisaLink

if TYPE_CHECKING:
    from typing_extensions import Unpack



class IDQID120Error(Exception):
    """An ID120 reported a fault, or answered something the driver cannot parse."""


class IDQID120CommunicationError(IDQID120Error):
    """The ID120 did not answer in time, or the link was lost and could not be restored."""


def _micro(value: float) -> int:
    """SI value -> integer micro-units (µV, µs) as the instrument expects."""
    return round(value * 1e6)


def _milli(value: float) -> int:
    """SI value -> integer milli-units (ms, m°C) as the instrument expects."""
    return round(value * 1e3)


def _parse_bool(reply: str) -> bool:
    word = reply.strip().upper()
    if word in ("TRUE", "1", "ON"):
        return True
    if word in ("FALSE", "0", "OFF"):
        return False
    raise ValueError(f"{reply!r} is not TRUE/FALSE")


class _RampedBiasParameter(Parameter):
    """A parameter whose ramp always starts from a fresh reading of the instrument.

    QCoDeS' default ramp starts from the cached value; after a front-panel change, a
    reconnect or another client, the cache can be wrong, and the first step would then
    be a jump.  Here the start is one query, never the cache.
    """

    def get_ramp_values(self, value: Any, step: Any = None) -> Sequence[Any]:
        if step is None:
            return [value]
        start = self.get()
        return [*permissive_range(start, value, step)[1:], value]


class IDQID120Output(InstrumentChannel):
    """One of the two pulse outputs of the ID120 (``OUTPUT1``, ``OUTPUT2``).

    [Instr-ID120] ``set_outputs``/``get_outputs``: ``OUTPUT<n>:POLARITY
    POSITIVE|NEGATIVE``.
    """

    def __init__(
        self,
        parent: IDQID120,
        name: str,
        output: int,
        **kwargs: Unpack[InstrumentBaseKWArgs],
    ) -> None:
        super().__init__(parent, name, **kwargs)
        self.output = output
        self.polarity: Parameter = self.add_parameter(
            "polarity",
            label=f"Output {output} polarity",
            get_cmd=f"OUTPUT{output}:POLARITY?",
            set_cmd=f"OUTPUT{output}:POLARITY {{}}",
            val_mapping={"positive": "POSITIVE", "negative": "NEGATIVE"},
            docstring="Polarity of the detection pulses on this output.",
        )
        """Polarity of the detection pulses on this output ('positive' / 'negative')."""


class IDQID120(ReconnectingVisaLink, VisaInstrument):
    """ID Quantique ID120 free-running Si single-photon detector.

    Satisfies :class:`qkdlab.drivers.roles.SinglePhotonDetector` (one channel).

    Args:
        name: QCoDeS instrument name.
        address: VISA resource name (``USB0::0x1DDC::0x0330::<serial>::INSTR`` on
            hardware, ``TCPIP::127.0.0.1::<port>::SOCKET`` for the mock).
        bias_max_v: hard ceiling of the bias (V); default and upper limit
            :attr:`BIAS_RATING_V`.  Set it to the breakdown voltage plus the excess
            bias the diode's test sheet allows.
        **kwargs: forwarded to :class:`~qcodes.instrument.VisaInstrument`
            (``timeout``, ``visalib``, ``pyvisa_sim_file``...).
    """

    default_terminator = "\n"  # [Instr-ID120]: read_termination = "\n"
    default_timeout = 5.0

    BIAS_RATING_V: ClassVar[float] = 250.0
    """Top of the ``BIAS:VOLTAGE`` range, 250 000 000 µV ([Instr-ID120])."""
    BIAS_RESOLUTION_V: ClassVar[float] = 0.08
    """Bias setting resolution, 80 000 µV ([Instr-ID120]); the read-back tolerance."""
    BIAS_RAMP_STEP_V: ClassVar[float] = 2.0
    """Default largest bias change per ramp step (V)."""
    BIAS_RAMP_DELAY_S: ClassVar[float] = 0.1
    """Default wait between bias ramp steps (s): 20 V/s with the default step."""
    DEAD_TIME_UNIT_S: ClassVar[float] = 1e-6
    """Unit of ``DEADTIME:TIME`` (µs per [Instr-ID120]; see the module's open points)."""
    RECONNECT_TIMEOUT_S: ClassVar[float] = 3.0
    error_cls: ClassVar[type[Exception]] = IDQID120Error
    communication_error_cls: ClassVar[type[Exception]] = IDQID120CommunicationError
    """Default of :attr:`reconnect_timeout_s` (s)."""

    def __init__(
        self,
        name: str,
        address: str,
        *,
        bias_max_v: float | None = None,
        **kwargs: Unpack[VisaInstrumentKWArgs],
    ) -> None:
        if bias_max_v is None:
            bias_max_v = self.BIAS_RATING_V
        if not 0 < bias_max_v <= self.BIAS_RATING_V:
            raise ValueError(
                f"{name}: bias_max_v={bias_max_v} V must be in (0, {self.BIAS_RATING_V}] V"
            )
        self.init_link(address, dict(kwargs))
        super().__init__(name, address, **kwargs)
        self.bias_max_v = float(bias_max_v)
        self.operating_bias_v: float | None = None
        """Bias (V) that :meth:`enable` ramps to; remembered by :meth:`disable`."""

        # -- bias: [Instr-ID120] BIAS:VOLTAGE, µV, limits [0, 250000000, 80000] ----------
        self.bias_voltage: Parameter = self.add_parameter(
            "bias_voltage",
            label="Bias voltage",
            unit="V",
            get_cmd=lambda: self._ask_number("BIAS:VOLTAGE?"),
            get_parser=lambda microvolts: float(microvolts) / 1e6,
            set_cmd="BIAS:VOLTAGE {}",
            set_parser=_micro,
            vals=vals.Numbers(0.0, self.bias_max_v),
            step=self.BIAS_RAMP_STEP_V,
            inter_delay=self.BIAS_RAMP_DELAY_S,
            parameter_class=_RampedBiasParameter,
            docstring=(
                "Reverse bias of the SPAD (V); instrument unit µV, 80 mV resolution. "
                "Always ramped: at most `step` V per write, `inter_delay` s apart, "
                "starting from a fresh reading. Hard maximum `bias_max_v`."
            ),
        )
        """Reverse bias of the SPAD (V), ramped; hard maximum ``bias_max_v``."""

        # [Instr-ID120] BIAS:ERROR_STATUS, TRUE/FALSE, read-only
        self.bias_error: Parameter = self.add_parameter(
            "bias_error",
            label="Bias error status",
            get_cmd=lambda: self._ask_bool("BIAS:ERROR_STATUS?"),
            docstring="True while the instrument flags a bias supply error.",
        )
        """True while the instrument flags a bias supply error."""

        # -- discriminator: [Instr-ID120] THRESHOLD:VOLTAGE, µV, limits [0, 1047000, 500]
        self.threshold: Parameter = self.add_parameter(
            "threshold",
            label="Discriminator threshold",
            unit="V",
            get_cmd=lambda: self._ask_number("THRESHOLD:VOLTAGE?"),
            get_parser=lambda microvolts: float(microvolts) / 1e6,
            set_cmd="THRESHOLD:VOLTAGE {}",
            set_parser=_micro,
            vals=vals.Numbers(0.0, 1.047),
            docstring="Discriminator threshold (V); instrument unit µV, 0.5 mV resolution.",
        )
        """Discriminator threshold (V)."""

        # -- dead time: [Instr-ID120] DEADTIME:TIME, µs, limits [40, 1000000, 40] -------
        per_s = round(1 / self.DEAD_TIME_UNIT_S)  # instrument units per second
        self.dead_time: Parameter = self.add_parameter(
            "dead_time",
            label="Dead time",
            unit="s",
            get_cmd=lambda: self._ask_number("DEADTIME:TIME?"),
            get_parser=lambda raw: float(raw) / per_s,
            set_cmd="DEADTIME:TIME {}",
            set_parser=lambda seconds: round(seconds * per_s),
            vals=vals.Numbers(40 / per_s, 1_000_000 / per_s),
            docstring=(
                "Hold-off after each detection (s). The instrument takes an integer in "
                "DEAD_TIME_UNIT_S (µs), in steps of 40; get_parser/set_parser convert."
            ),
        )
        """Hold-off after each detection (s); converted from the instrument's µs."""

        # -- counter: [Instr-ID120] COUNTERS:INTEGRATION_TIME, ms, limits [200, 100000, 200]
        self.integration_time: Parameter = self.add_parameter(
            "integration_time",
            label="Counter integration time",
            unit="s",
            get_cmd=lambda: self._ask_number("COUNTERS:INTEGRATION_TIME?"),
            get_parser=lambda millis: float(millis) / 1e3,
            set_cmd="COUNTERS:INTEGRATION_TIME {}",
            set_parser=_milli,
            vals=vals.Numbers(0.2, 100.0),
            docstring="Counter gate (s); instrument unit ms, in steps of 200 ms.",
        )
        """Counter gate (s)."""

        # [Instr-ID120] COUNTERS:DETECTION_FREQ (Hz), COUNTERS:DETECTION_COUNT (counts)
        self.count_rate: Parameter = self.add_parameter(
            "count_rate",
            label="Count rate",
            unit="cps",
            get_cmd=lambda: self._ask_number("COUNTERS:DETECTION_FREQ?"),
            get_parser=float,
            docstring=(
                "Detections per second over the last integration window, as the "
                "instrument reports it (already normalised, no dead-time correction)."
            ),
        )
        """Detections per second over the last integration window (cps)."""
        self.counts: Parameter = self.add_parameter(
            "counts",
            label="Counts",
            unit="counts",
            get_cmd=lambda: self._ask_number("COUNTERS:DETECTION_COUNT?"),
            get_parser=lambda raw: round(float(raw)),
            docstring="Detections in the last integration window (divide by "
            "integration_time for cps).",
        )
        """Detections in the last integration window."""

        # -- temperature: [Instr-ID120] REG:TEMP_SET_POINT (m°C, [-50000, -10000, 1000]),
        #    REG:MEASURED_TEMP (m°C, read-only)
        self.temperature_setpoint: Parameter = self.add_parameter(
            "temperature_setpoint",
            label="SPAD temperature setpoint",
            unit="°C",
            get_cmd=lambda: self._ask_number("REG:TEMP_SET_POINT?"),
            get_parser=lambda millideg: float(millideg) / 1e3,
            set_cmd="REG:TEMP_SET_POINT {}",
            set_parser=_milli,
            vals=vals.Numbers(-50.0, -10.0),
            docstring="Regulation setpoint of the SPAD (°C); instrument unit m°C, 1 °C steps.",
        )
        """Regulation setpoint of the SPAD (°C)."""
        self.temperature: Parameter = self.add_parameter(
            "temperature",
            label="SPAD temperature",
            unit="°C",
            get_cmd=lambda: self._ask_number("REG:MEASURED_TEMP?"),
            get_parser=lambda millideg: float(millideg) / 1e3,
            docstring="Measured SPAD temperature (°C); instrument unit m°C.",
        )
        """Measured SPAD temperature (°C)."""

        # -- run state: [Instr-ID120] REG:RUN (TRUE/FALSE), REG:STATE (text, read-only) ---
        self.running: Parameter = self.add_parameter(
            "running",
            label="Regulation running",
            get_cmd=lambda: self._ask_bool("REG:RUN?"),
            set_cmd="REG:RUN {}",
            set_parser=lambda on: "TRUE" if on else "FALSE",
            vals=vals.Bool(),
            docstring="Cooling/bias regulation on (True) or off. Prefer enable()/disable(), "
            "which order it with the bias ramp.",
        )
        """Cooling/bias regulation on (True) or off."""
        self.state: Parameter = self.add_parameter(
            "state",
            label="Regulation state",
            get_cmd="REG:STATE?",
            get_parser=str.strip,
            docstring="The instrument's own state text (not interpreted).",
        )
        """The instrument's own state text (not interpreted)."""

        # -- outputs: [Instr-ID120] OUTPUT1/OUTPUT2 -----------------------------------------
        outputs = ChannelList(self, "outputs", IDQID120Output)
        for n in (1, 2):
            channel = IDQID120Output(self, f"output{n}", n)
            outputs.append(channel)
            self.add_submodule(f"output{n}", channel)
        self.outputs = self.add_submodule("outputs", outputs.to_channel_tuple())
        """The two pulse outputs."""

        harden_reply_parsers(self)  # garbage replies: a clear error, never NaN (scpi_errors)
        self.connect_message()

    # -- role: SinglePhotonDetector ---------------------------------------------------------
    def count_rates(self) -> list[float]:
        """Counts per second on the single channel, over the integration time (cps)."""
        return [float(self.count_rate())]

    def enable(self) -> None:
        """Start the regulation, then ramp the bias up to :attr:`operating_bias_v`.

        With no operating bias known (never disabled, never set) the bias is left
        where it is.  The end state is read back; the sequence is repeated once if it
        was not reached (a write lost with a dropped link), then
        :class:`IDQID120Error` is raised.
        """
        target = self.operating_bias_v
        for _attempt in range(2):
            self.running(True)
            if target is not None:
                self.bias_voltage(target)
            if self._state_reached(running=True, bias_v=target):
                return
        raise IDQID120Error(f"{self.full_name}: operating point not reached after enable()")

    def disable(self) -> None:
        """Remember the bias as the operating point, ramp it to 0 V, stop the regulation.

        The end state is read back and the sequence repeated once if needed, then
        :class:`IDQID120Error` is raised.
        """
        bias = self.bias_voltage()
        if bias > self.BIAS_RESOLUTION_V:
            self.operating_bias_v = bias
        for _attempt in range(2):
            self.bias_voltage(0.0)
            self.running(False)
            if self._state_reached(running=False, bias_v=0.0):
                return
        raise IDQID120Error(f"{self.full_name}: safe state (0 V, stopped) not reached")

    def safe_state(self) -> None:
        """Bias ramped to 0 V and regulation stopped; harmless when already there."""
        self.disable()

    def _state_reached(self, *, running: bool, bias_v: float | None) -> bool:
        bias_ok = bias_v is None or abs(self.bias_voltage() - bias_v) <= self.BIAS_RESOLUTION_V
        return bias_ok and self.running() is running

    def check_errors(self) -> None:
        """Raise :class:`IDQID120Error` if the instrument flags a bias error.

        The ID120 documents no SCPI error queue; ``BIAS:ERROR_STATUS?`` is its
        documented fault flag ([Instr-ID120]).
        """
        if self.bias_error():
            raise IDQID120Error(
                f"{self.full_name}: the instrument reports a bias error "
                "(BIAS:ERROR_STATUS? returned TRUE)"
            )

    # -- link handling ----------------------------------------------------------------------
    # -- reply parsing ----------------------------------------------------------------------
    def _ask_number(self, cmd: str) -> float:
        reply = self.ask(cmd)
        try:
            return parse_number(reply)
        except ValueError:
            raise IDQID120Error(
                f"{self.full_name}: reply {reply!r} to {cmd!r} is not a number"
            ) from None

    def _ask_bool(self, cmd: str) -> bool:
        reply = self.ask(cmd)
        try:
            return _parse_bool(reply)
        except ValueError:
            raise IDQID120Error(
                f"{self.full_name}: reply {reply!r} to {cmd!r} is not TRUE/FALSE"
            ) from None
