"""Single Quantum SNSPD system: a safe, SI adapter on the QCoDeS contrib driver.

Sources
-------
* **[SQ-contrib]** ``qcodes_contrib_drivers`` 0.24.1,
  ``qcodes_contrib_drivers/drivers/SingleQuantum/SingleQuantum.py`` (class
  ``WebSQControlqcode`` with ``CommunicationHandler``, ``SQTalk``, ``SQCounts``; MIT,
  (c) 2020 Single Quantum B. V.).  This module *uses* it: the instrument below is a
  ``WebSQControlqcode`` and every message on the wire is built by its code.
* **[SQ-WebSQ]** Single Quantum's ``WebSQ.py`` example library ("Python control class
  for the SNSPD atlas driver", MIT, (c) 2020 Single Quantum B. V. and Andreas Fognini),
  the same protocol with docstrings: the ``DetectorEnable`` label, the 10 ms minimum
  measurement period, the ±90.9 µA bias range of its IV scan.  No Single Quantum user
  manual with the remote protocol is public; both files are the manufacturer's own
  code, but verify each range on your system before trusting it.

Wire format ([SQ-contrib] ``SQTalk``/``SQCounts``; served by
``qkdlab.mock_instruments.singlequantum.snspd``): a control port (12000) where the
client writes bare JSON objects and the server answers ``\\x17``-terminated frames of
``{"label": ..., "value": ...}`` objects, and a counts port (12345) streaming one
``<t ms>,<counts ch1>,...`` line per measurement period.  Settings are not
acknowledged: this adapter reads every setting back.  A *read* sends the
``labelProps`` request and waits for its reply (each label's entry replaced by a new
properties dict), never accepting a broadcast of an earlier command, which the contrib
code applies in place; every earlier command has been handled by then.

===============================================  ======================  =========================
message (built by [SQ-contrib])                  source                  here (unit)
===============================================  ======================  =========================
``{"request": "labelProps", "value": "None"}``   ``SQTalk.get_label``    every read (above)
``{"command": "SetAllBiasCurrents", ...}`` µA    ``set_bias_current``    ``chN.bias_current``,
                                                                         ``bias_current`` (A)
``{"command": "SetAllTriggerLevels", ...}`` mV   ``set_trigger_level``   ``chN.trigger_level`` (V)
``{"command": "SetMeasurementPeriod", ...}`` ms  ``set_measurement_``    ``measurement_period``
                                                 ``periode``             (s)
``{"command": "DetectorEnable", ...}``           ``enable_detectors``    ``enable``, ``disable``
``{"request": "BiasVoltage"}`` mV, then a read   ``get_bias_voltage``    ``chN.bias_voltage`` (V)
``{"command": "DarkCountsAutoIV", ...}``         ``set_dark_counts_``    ``auto_calibrate_bias``
                                                 ``auto_iv``
``{"command": "AutoCaliBiasCurrents", ...}``     ``auto_cali_bias_``     ``auto_calibrate_bias``
                                                 ``currents``
``{"request": "StartAutoIV"}``, then a read      ``auto_cali_finished``  ``auto_calibrate_bias``
counts line ``t,c1,...,cN``                      ``SQCounts.run``        ``count_rates`` (cps),
                                                                         ``counters``
===============================================  ======================  =========================

What is broken in [SQ-contrib] 0.24.1, and the fix here (nothing else is changed)
-------------------------------------------------------------------------------------
1. The counts port is hard-coded to 12345 in ``__init__``: ``counts_port`` here.
2. ``detectors``: reading it *sends* ``DetectorEnable true`` (a snapshot switches the
   bias on) and setting it sends nothing.  Replaced: reading reads ``DetectorEnable``,
   setting calls :meth:`SingleQuantumSNSPD.enable` / :meth:`~SingleQuantumSNSPD.disable`.
3. No ``close()``: both sockets and reader threads outlive the instrument.
4. ``SQTalk.run`` spins at 100 % CPU once the peer closes (and never ends after
   ``close()``); frames arriving together can be dropped or parsed twice.
   ``SQCounts.run`` dies with ``ValueError`` when its link closes, keeps only the first
   line of each read, and ``get_n`` waits forever.  Each reader thread gets a stand-in
   for its socket (:class:`_StreamGuard`) that hands it exactly one frame / line per
   ``recv``, drops (and reports) undecodable ones, parks the thread while the link is
   down and lets it end on close.  Counts are collected with a deadline.
5. Label reads return a cache that may be stale, or wait 10 s: every read here asks
   the instrument and waits at most ``timeout``.
6. ``bias_current`` takes any list, unvalidated, and jumps to it: here the bias is
   validated against a hard per-channel maximum (``bias_max_a``) before anything is
   sent and only ever changed by ramps.
7. Units µA / mV / ms become A / V / s; the trigger level becomes readable.

Safety
------
* The bias is only changed by ramps of at most ``chN.bias_current.step`` A per write,
  ``inter_delay`` s apart, starting from a fresh reading; the whole array is sent each
  time, so other channels never move.  ``bias_max_a`` (per channel, at most the
  ±90.9 µA range of [SQ-WebSQ]) is a hard ceiling checked before anything is sent.
  Switching the bias source on (``DetectorEnable``) is done with the bias at 0.
* Latching (an over-biased or flashed nanowire stays resistive and stops counting):
  :meth:`SingleQuantumSNSPD.count_rates` flags a channel that counted nothing while
  biased above ``latch_bias_fraction`` of its maximum and whose bias voltage shows a
  resistance above ``latch_resistance_ohm``; it ramps that channel to 0, waits
  ``unlatch_wait_s``, ramps it back once and, if it latches again, leaves it at 0 A
  and raises :class:`SNSPDLatchError`.
* :meth:`SingleQuantumSNSPD.safe_state` ramps every channel to 0 A and switches the
  bias source off, and reads both back.
* Link loss: a lost link (or a read that times out) closes both links, reopens them
  and retries the operation once; every setting is absolute, so a retry is safe.

Open points (not in the sources, so not guessed)
------------------------------------------------
* Trigger-level range (±1 V here), maximum measurement period (60 s here) and the
  bias-voltage level of a latched channel (``latch_resistance_ohm``, 1 kΩ here) are
  this adapter's assumptions; check them on the system.
* The IV scan, temperature history and IV/IC history requests of [SQ-WebSQ] are not
  sent by [SQ-contrib] and are not wrapped.  No serial number or firmware version is
  published by the protocol, so :meth:`~SingleQuantumSNSPD.get_idn` reports none.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import numpy as np
import numpy.typing as npt
from qcodes import validators as vals
from qcodes.instrument import ChannelList, InstrumentBaseKWArgs, InstrumentChannel
from qcodes.parameters import Parameter
from qcodes.parameters.permissive_range import permissive_range
from qcodes_contrib_drivers.drivers.SingleQuantum.SingleQuantum import (
    SQCounts,
    SQTalk,
    WebSQControlqcode,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

ETB = b"\x17"
LABEL_PROPS = json.dumps({"request": "labelProps", "value": "None"})
"""The label request exactly as [SQ-contrib] ``SQTalk`` sends it."""
_LABELS = ("NumberOfDetectors", "BiasCurrent", "TriggerLevel", "InptMeasurementPeriod",
           "DetectorEnable", "BiasVoltage")
"""Labels of the ``labelProps`` reply that this driver reads."""
_POLL_S = 0.05
_PENDING = object()


class SNSPDError(Exception):
    """The SNSPD system refused something, or answered what the driver cannot parse."""


class SNSPDCommunicationError(SNSPDError):
    """No answer in time, or the link was lost and could not be restored."""


class SNSPDLatchError(SNSPDError):
    """A channel latched and did not recover; its bias was left at 0 A."""


class _LinkLostError(Exception):
    """Internal: the link is gone (reconnect and retry)."""


class _NoReplyError(Exception):
    """Internal: nothing came back in time (reconnect and retry)."""


def _json_frame_ok(frame: bytes) -> bool:
    """True if a control frame (without ETB) is UTF-8 JSON objects back to back."""
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError:
        return False
    decoder = json.JSONDecoder()
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        try:
            obj, i = decoder.raw_decode(text, i)
        except ValueError:
            return False
        if not isinstance(obj, dict):
            return False
    return True


def _counts_line_ok(line: bytes) -> bool:
    """True if a counts line (without newline) is comma-separated numbers."""
    try:
        fields = line.decode("ascii").split(",")
        for f in fields:
            float(f)
    except (UnicodeDecodeError, ValueError):
        return False
    return True


class _StreamGuard:
    """Stands in for the socket of one [SQ-contrib] reader thread (``SQTalk``/``SQCounts``).

    The thread calls ``recv`` in a loop and ``send`` to write; this object gives it
    exactly one complete frame (``delimiter``-terminated) per ``recv``, never spins,
    records undecodable frames instead of passing them on, notes when the link is
    lost (``lost``), parks the thread until :meth:`close`, and then hands it
    ``stop_frame`` (which the contrib code parses harmlessly) so that its loop ends.
    """

    def __init__(
        self,
        sock: socket.socket,
        delimiter: bytes,
        stop_frame: bytes,
        valid: Callable[[bytes], bool],
    ) -> None:
        self._sock = sock
        self._delimiter = delimiter
        self._stop_frame = stop_frame
        self._valid = valid
        self._buffer = b""
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self.lost: str | None = None
        """Why the link is gone (None while it is up)."""
        self.garbage_count = 0
        """Number of undecodable frames received (and dropped)."""
        self.last_garbage = b""
        self.entered = threading.Event()
        """Set once the reader thread called :meth:`recv` (it no longer reads the socket)."""
        sock.settimeout(_POLL_S)

    def recv(self, _bufsize: int) -> bytes:
        self.entered.set()
        while True:
            if self._stop.is_set():
                time.sleep(0.01)  # contrib's close() sets `shutdown` just after close()
                return self._stop_frame
            end = self._buffer.find(self._delimiter)
            if end >= 0:
                frame = self._buffer[: end + len(self._delimiter)]
                self._buffer = self._buffer[end + len(self._delimiter) :]
                if self._valid(frame[: -len(self._delimiter)]):
                    return frame
                self.last_garbage = frame
                self.garbage_count += 1
                continue
            if self.lost is not None:
                self._stop.wait(_POLL_S)
                continue
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as err:
                self.lost = f"link error ({err})"
                continue
            if not data:
                self.lost = "link closed by the instrument"
                continue
            self._buffer += data

    def send(self, data: bytes) -> int:
        if self._stop.is_set():
            raise ConnectionError("link closed")
        if self.lost is not None:
            raise ConnectionError(self.lost)
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as err:
                self.lost = f"link error ({err})"
                raise
        return len(data)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class _RampedBias(Parameter):
    """A ramped parameter whose ramp starts from a fresh reading and ends verified.

    QCoDeS' ramp starts from the cache; here the start is one read of the instrument,
    never the cache.  The target is remembered so that the setter can read the value
    back after the last step.
    """

    ramp_target: float | None = None

    def get_ramp_values(self, value: Any, step: Any = None) -> Sequence[Any]:
        self.ramp_target = float(value)
        if step is None:
            return [value]
        start = self.get()
        return [*permissive_range(start, value, step)[1:], value]


class SNSPDChannel(InstrumentChannel):
    """One detector channel: bias (ramped, hard maximum), trigger level, readbacks."""

    def __init__(
        self,
        parent: SingleQuantumSNSPD,
        name: str,
        index: int,
        bias_max_a: float,
        **kwargs: Unpack[InstrumentBaseKWArgs],
    ) -> None:
        super().__init__(parent, name, **kwargs)
        self.index = index
        """0-based position of this channel in the instrument's arrays."""
        self.bias_max_a = bias_max_a

        # [SQ-contrib] set_bias_current / get_bias_current: "BiasCurrent", µA, all channels
        self.bias_current: _RampedBias = self.add_parameter(
            "bias_current",
            parameter_class=_RampedBias,
            label=f"Bias current ch{index + 1}",
            unit="A",
            get_cmd=lambda: parent._read_bias_a()[index],
            set_cmd=self._set_bias,
            vals=vals.Numbers(0.0, bias_max_a),
            step=parent.BIAS_RAMP_STEP_A,
            inter_delay=parent.BIAS_RAMP_DELAY_S,
            docstring=(
                "Bias current of this nanowire (A); instrument unit µA. Always ramped: at "
                "most `step` A per write, `inter_delay` s apart, from a fresh reading; "
                "the final value is read back. Hard maximum `bias_max_a`."
            ),
        )
        """Bias current of this nanowire (A), ramped; hard maximum ``bias_max_a``."""

        # [SQ-contrib] set_trigger_level: "SetAllTriggerLevels", label "TriggerLevel", mV
        low, high = parent.TRIGGER_RANGE_V
        self.trigger_level: Parameter = self.add_parameter(
            "trigger_level",
            label=f"Trigger level ch{index + 1}",
            unit="V",
            get_cmd=lambda: parent._read_list("TriggerLevel", "trigger_level")[index] * 1e-3,
            set_cmd=lambda volts: parent._set_trigger_levels({index: volts}),
            vals=vals.Numbers(low, high),
            docstring="Counter trigger level of this channel (V); instrument unit mV.",
        )
        """Counter trigger level (V)."""

        # [SQ-contrib] get_bias_voltage: {"request": "BiasVoltage"}, mV
        self.bias_voltage: Parameter = self.add_parameter(
            "bias_voltage",
            label=f"Bias voltage ch{index + 1}",
            unit="V",
            get_cmd=lambda: parent._read_bias_voltage_v()[index],
            docstring="Voltage across the biased nanowire (V); jumps when it latches.",
        )
        """Voltage across the biased nanowire (V)."""

        self.count_rate: Parameter = self.add_parameter(
            "count_rate",
            label=f"Count rate ch{index + 1}",
            unit="cps",
            get_cmd=lambda: parent.count_rates()[index],
            snapshot_exclude=True,  # a measurement, not a setting
            docstring="Counts per second over one measurement period (latch-checked).",
        )
        """Counts per second over one measurement period (cps)."""

    def _set_bias(self, value_a: float) -> None:
        parent: SingleQuantumSNSPD = self.parent  # type: ignore[assignment]
        parent._write_bias({self.index: value_a})
        if self.bias_current.ramp_target is not None and value_a == self.bias_current.ramp_target:
            parent._verify_bias({self.index: value_a})


class SingleQuantumSNSPD(WebSQControlqcode):
    """Single Quantum multi-channel SNSPD system, through [SQ-contrib]'s ``WebSQControlqcode``.

    Satisfies :class:`qkdlab.drivers.roles.SinglePhotonDetector`.

    Args:
        name: QCoDeS instrument name.
        address: host name or IP of the WebSQ server, or
            ``tcp://host:<control port>[?counts_port=<port>]`` (the mock's address).
        port: control port (default 12000; a port in ``address`` wins).
        bias_max_a: hard maximum bias (A), one value for every channel or one per
            channel; at most :attr:`BIAS_RATING_A`.  Put it below the switching current.
        counts_port: counts port (default 12345; ``?counts_port=`` in ``address`` wins).
        timeout: seconds to wait for any answer (the ``timeout`` parameter).
        **kwargs: forwarded to :class:`~qcodes.instrument.Instrument`.
    """

    DEFAULT_CONTROL_PORT: ClassVar[int] = 12000
    DEFAULT_COUNTS_PORT: ClassVar[int] = 12345
    BIAS_RATING_A: ClassVar[float] = 90.9e-6
    """Bias range limit: the ±90.9 µA of the IV scan in [SQ-WebSQ]."""
    BIAS_RAMP_STEP_A: ClassVar[float] = 0.5e-6
    """Default largest bias change per write (A)."""
    BIAS_RAMP_DELAY_S: ClassVar[float] = 0.05
    """Default wait between bias writes (s): 10 µA/s with the default step."""
    BIAS_TOLERANCE_A: ClassVar[float] = 2e-9
    """Read-back tolerance of the bias (A); the wire carries µA with 3 decimals."""
    TRIGGER_RANGE_V: ClassVar[tuple[float, float]] = (-1.0, 1.0)
    """Trigger-level range accepted (V); an assumption, see the module's open points."""
    PERIOD_RANGE_S: ClassVar[tuple[float, float]] = (0.010, 60.0)
    """Measurement period range (s): 10 ms minimum from [SQ-WebSQ]; the maximum is ours."""
    RECONNECT_TIMEOUT_S: ClassVar[float] = 3.0

    def __init__(
        self,
        name: str,
        address: str,
        port: int | None = None,
        *,
        bias_max_a: float | Sequence[float],
        counts_port: int | None = None,
        timeout: float = 5.0,
        **kwargs: Unpack[InstrumentBaseKWArgs],
    ) -> None:
        host, control, counts = self._parse_address(name, address, port, counts_port)
        self._host, self._control_port, self._counts_port = host, control, counts
        self._talk_guard: _StreamGuard | None = None
        self._counts_guard: _StreamGuard | None = None
        self._errors: list[str] = []
        self._errors_lock = threading.Lock()
        self._check_bias_max(name, bias_max_a, None)  # before any byte is sent
        self._n = self._probe(name, host, control, counts, timeout)
        self.bias_max_a = self._check_bias_max(name, bias_max_a, self._n)
        """Hard maximum bias per channel (A)."""
        super().__init__(name, host, control, **kwargs)
        try:
            self._setup(timeout)
        except BaseException:
            self._stop_threads()
            raise

    # the contrib driver assigns 12345 here in __init__; the port given to us wins
    @property
    def COUNTS_PORT(self) -> int:  # noqa: N802 - the contrib driver's attribute name
        """The counts port in use."""
        return self._counts_port

    @COUNTS_PORT.setter
    def COUNTS_PORT(self, _value: int) -> None:  # noqa: N802
        """Ignored: [SQ-contrib] hard-codes 12345 (see the module docstring, fix 1)."""

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def _parse_address(
        cls, name: str, address: str, port: int | None, counts_port: int | None
    ) -> tuple[str, int, int]:
        control = port if port is not None else cls.DEFAULT_CONTROL_PORT
        counts = counts_port if counts_port is not None else cls.DEFAULT_COUNTS_PORT
        if "://" not in address:
            return address, control, counts
        parts = urlsplit(address)
        if parts.scheme != "tcp" or not parts.hostname:
            raise ValueError(
                f"{name}: address must be a host or tcp://host:port[?counts_port=N], "
                f"got {address!r}"
            )
        query = parse_qs(parts.query)
        if "counts_port" in query:
            counts = int(query["counts_port"][0])
        return parts.hostname, parts.port or control, counts

    @classmethod
    def _check_bias_max(
        cls, name: str, bias_max_a: float | Sequence[float], n: int | None
    ) -> list[float]:
        """Per-channel hard maxima (A); ``n`` None checks the values only."""
        if isinstance(bias_max_a, int | float):
            values = [float(bias_max_a)] * (n or 1)
        else:
            values = [float(v) for v in bias_max_a]
        if n is not None and len(values) != n:
            raise ValueError(
                f"{name}: bias_max_a has {len(values)} values; the system has {n} channels"
            )
        for v in values:
            if not 0 < v <= cls.BIAS_RATING_A:
                raise ValueError(
                    f"{name}: bias_max_a={v} A must be in (0, {cls.BIAS_RATING_A}] A"
                )
        return values

    @staticmethod
    def _probe(name: str, host: str, control: int, counts: int, timeout: float) -> int:
        """Ask for ``NumberOfDetectors`` on a probe link before the contrib threads start.

        [SQ-contrib]'s constructor would wait 10 s on a silent server and leave its
        threads running on failure; this fails within ``timeout`` and leaves nothing.
        """
        try:
            with socket.create_connection((host, control), timeout=timeout) as sock:
                sock.sendall(LABEL_PROPS.encode("utf-8"))
                buffer = b""
                deadline = time.monotonic() + timeout
                while ETB not in buffer:
                    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("closed by the instrument")
                    buffer += data
            with socket.create_connection((host, counts), timeout=timeout):
                pass
        except TimeoutError as err:
            raise SNSPDCommunicationError(
                f"{name}: no reply to {LABEL_PROPS} from {host}:{control} within {timeout} s"
            ) from err
        except OSError as err:
            raise SNSPDCommunicationError(
                f"{name}: cannot reach the WebSQ server at {host}:{control} "
                f"(counts port {counts}): {err}"
            ) from err
        frame = buffer.split(ETB, 1)[0]
        decoder = json.JSONDecoder()
        text = frame.decode("utf-8", errors="replace")
        i = 0
        while i < len(text):
            try:
                obj, i = decoder.raw_decode(text, i)
            except ValueError:
                break
            if isinstance(obj, dict) and obj.get("label") == "NumberOfDetectors":
                value = obj.get("value")
                number = value.get("value") if isinstance(value, dict) else value
                if isinstance(number, int) and number > 0:
                    return number
        raise SNSPDError(f"{name}: no NumberOfDetectors in the reply to {LABEL_PROPS}: {frame!r}")

    def _setup(self, timeout: float) -> None:
        """Everything after [SQ-contrib]'s constructor: guards, parameters, channels."""
        self.timeout: Parameter = self.add_parameter(
            "timeout",
            label="Reply timeout",
            unit="s",
            initial_value=timeout,
            get_cmd=None,
            set_cmd=None,
            vals=vals.Numbers(0.01, 120.0),
            docstring="How long any read waits for the instrument (s).",
        )
        """How long any read waits for the instrument (s)."""

        self._install_guards(self.comm.talk, self.comm.cnts)
        # Until a reader calls recv() on its guard it may still be in a recv() on the
        # bare socket (SQTalk: up to 0.1 s; SQCounts: until the next counts line).  One
        # request wakes SQTalk (and checks that every label this driver reads exists).
        try:
            self._request_once(_LABELS, "construction")
        except (_LinkLostError, _NoReplyError) as err:
            raise SNSPDCommunicationError(
                f"{self.full_name}: {err} to {LABEL_PROPS} after connecting"
            ) from None
        for guard in (self._talk_guard, self._counts_guard):
            assert guard is not None
            if not guard.entered.wait(timeout):
                self.log.warning("a reader thread has not reached its guard yet")
        self.reconnect_timeout_s = self.RECONNECT_TIMEOUT_S
        """How long (s) a lost link is retried before :class:`SNSPDCommunicationError`."""
        self.operating_bias_a: list[float] | None = None
        """Bias per channel (A) that :meth:`enable` ramps to; remembered by :meth:`disable`."""
        self.latch_bias_fraction = 0.5
        """A channel is checked for latching above this fraction of its ``bias_max_a``."""
        self.latch_resistance_ohm: float | None = 1000.0
        """Bias voltage / current above this (Ω) confirms a latch (None: counts alone)."""
        self.unlatch_wait_s = 0.1
        """Time at 0 A before re-ramping a latched channel (s)."""
        self._bias_ua: list[float] = [0.0] * self._n
        self._source_on = False
        self._period_s = 0.1

        for broken in ("bias_current", "trigger_level", "bias_voltage", "detectors",
                       "counters", "measurement_periode"):
            self.remove_parameter(broken)

        channels = ChannelList(self, "channels", SNSPDChannel)
        for i in range(self._n):
            channel = SNSPDChannel(self, f"ch{i + 1}", i, self.bias_max_a[i])
            channels.append(channel)
            self.add_submodule(f"ch{i + 1}", channel)
        self.channels = self.add_submodule("channels", channels.to_channel_tuple())
        """The detector channels ``ch1``...``chN``."""

        self.bias_current: Parameter = self.add_parameter(
            "bias_current",
            label="Bias currents",
            unit="A",
            get_cmd=self._read_bias_a,
            set_cmd=lambda values: self._ramp(dict(enumerate(values))),
            vals=_PerChannel(self._n, [vals.Numbers(0.0, m) for m in self.bias_max_a]),
            docstring="Bias current of every channel (A), ramped together; see chN.bias_current.",
        )
        """Bias current of every channel (A, list), ramped together."""
        low, high = self.TRIGGER_RANGE_V
        self.trigger_level: Parameter = self.add_parameter(
            "trigger_level",
            label="Trigger levels",
            unit="V",
            get_cmd=lambda: [mv * 1e-3 for mv in self._read_list("TriggerLevel", "trigger_level")],
            set_cmd=lambda values: self._set_trigger_levels(dict(enumerate(values))),
            vals=_PerChannel(self._n, [vals.Numbers(low, high)] * self._n),
            docstring="Counter trigger level of every channel (V, list); instrument unit mV.",
        )
        """Counter trigger level of every channel (V, list)."""
        self.bias_voltage: Parameter = self.add_parameter(
            "bias_voltage",
            label="Bias voltages",
            unit="V",
            get_cmd=self._read_bias_voltage_v,
            docstring="Voltage across each biased nanowire (V, list); instrument unit mV.",
        )
        """Voltage across each biased nanowire (V, list)."""
        p_low, p_high = self.PERIOD_RANGE_S
        # [SQ-contrib] set/get_measurement_periode: "InptMeasurementPeriod", integer ms
        self.measurement_period: Parameter = self.add_parameter(
            "measurement_period",
            label="Measurement period",
            unit="s",
            get_cmd=lambda: self._read_label("InptMeasurementPeriod", "measurement_period") * 1e-3,
            set_cmd=self._set_period,
            vals=vals.Numbers(p_low, p_high),
            docstring="Counter integration time of one counts line (s); sent as integer ms.",
        )
        """Counter integration time of one counts line (s)."""
        self.detectors: Parameter = self.add_parameter(
            "detectors",
            label="Bias source on",
            get_cmd=lambda: bool(self._read_label("DetectorEnable", "detectors")),
            set_cmd=lambda on: self.enable() if on else self.disable(),
            vals=vals.Bool(),
            docstring="Bias current source on (True) or off; setting it calls enable()/disable().",
        )
        """Bias current source on/off; setting calls :meth:`enable` / :meth:`disable`."""
        self.counters: Parameter = self.add_parameter(
            "counters",
            label="Counts",
            get_cmd=self._acquire_counters,
            snapshot_exclude=True,
            docstring="The next `npts` counts lines: array (channels + 1, npts), row 0 the "
            "time stamps (ms), as [SQ-contrib]'s `counters`, with a deadline.",
        )
        """The next ``npts`` counts lines, shape (channels + 1, npts); row 0 is time (ms)."""
        self.timing.snapshot_exclude = True
        for i in range(self._n):
            self.parameters[f"channel{i + 1}"].snapshot_exclude = True

    # -- identity -------------------------------------------------------------------------------
    def get_idn(self) -> dict[str, str | None]:
        """Vendor and model; the protocol publishes no serial number or firmware version."""
        n = getattr(self, "_n", None)
        return {
            "vendor": "Single Quantum",
            "model": f"SNSPD system, {n} channels (WebSQ)",
            "serial": None,
            "firmware": None,
        }

    # -- role: SinglePhotonDetector -------------------------------------------------------------
    def count_rates(self) -> list[float]:
        """Counts per second of each channel over one measurement period (cps).

        A channel that latched (see the module docstring) is ramped down and up once;
        if it latches again it is left at 0 A and :class:`SNSPDLatchError` is raised.
        """
        rates = self._measure_rates()
        latched = self._confirmed_latches(rates)
        if latched:
            self._recover(latched)
            rates = self._measure_rates()
        return rates

    def _measure_rates(self) -> list[float]:
        """One counts line after a fresh read of the state it depends on (cps)."""
        state = self._request(["BiasCurrent", "DetectorEnable", "InptMeasurementPeriod"],
                              "count_rates()")
        self._bias_ua = [float(v) for v in state["BiasCurrent"]]
        self._source_on = bool(state["DetectorEnable"])
        self._period_s = float(state["InptMeasurementPeriod"]) * 1e-3
        rows = self._read_rows(1, "count_rates()", self._period_s)
        return [c / self._period_s for c in rows[0][1:]]

    def enable(self) -> None:
        """Bias source on with the bias at 0, then ramp to :attr:`operating_bias_a`.

        With no operating bias remembered, the bias settings as they are are the
        target.  Switching the source on is done at 0 A, so no channel jumps.
        """
        targets = self.operating_bias_a
        if targets is None:
            targets = self._read_bias_a()
        if not self._read_label("DetectorEnable", "enable()"):
            self._ramp(dict.fromkeys(range(self._n), 0.0))
            self._set_source(True)
        self._ramp(dict(enumerate(targets)))

    def disable(self) -> None:
        """Remember the bias as the operating point, ramp it to 0 A, switch the source off."""
        bias = self._read_bias_a()
        if any(b > self.BIAS_TOLERANCE_A for b in bias):
            self.operating_bias_a = bias
        self._ramp(dict.fromkeys(range(self._n), 0.0))
        self._set_source(False)

    def safe_state(self) -> None:
        """Every channel ramped to 0 A and the bias source off; harmless when already so."""
        self.disable()

    # -- latching -------------------------------------------------------------------------------
    def latched_channels(self) -> list[int]:
        """Indices of channels whose bias voltage shows a resistive (latched) nanowire.

        A channel counts as latched when V / I > :attr:`latch_resistance_ohm` with the
        source on and I > 0.  Empty when ``latch_resistance_ohm`` is None.
        """
        if self.latch_resistance_ohm is None:
            return []
        voltages = self._read_bias_voltage_v()
        bias = self._read_bias_a()
        return [
            i for i in range(self._n)
            if bias[i] > self.BIAS_TOLERANCE_A
            and voltages[i] / bias[i] > self.latch_resistance_ohm
        ]

    def _confirmed_latches(self, rates: list[float]) -> list[int]:
        """Channels with no counts at high bias (last measurement), confirmed by voltage."""
        if not self._source_on:
            return []
        bias = [ua * 1e-6 for ua in self._bias_ua]
        suspects = [
            i for i in range(self._n)
            if rates[i] * self._period_s < 0.5
            and bias[i] >= self.latch_bias_fraction * self.bias_max_a[i]
        ]
        if not suspects or self.latch_resistance_ohm is None:
            return suspects
        confirmed = set(self.latched_channels())
        return [i for i in suspects if i in confirmed]

    def _recover(self, channels: list[int]) -> None:
        names = ", ".join(f"ch{i + 1}" for i in channels)
        targets = {i: self._bias_ua[i] * 1e-6 for i in channels}
        self.log.warning(f"{names} latched at {[targets[i] for i in channels]} A; re-ramping")
        self._ramp(dict.fromkeys(channels, 0.0))
        time.sleep(self.unlatch_wait_s)
        self._ramp(targets)
        still = [i for i in self._confirmed_latches(self._measure_rates()) if i in targets]
        if still:
            self._ramp(dict.fromkeys(still, 0.0))
            again = ", ".join(f"ch{i + 1} at {targets[i] * 1e6:.3f} µA" for i in still)
            raise SNSPDLatchError(
                f"{self.full_name}: {again} latched again after ramping down and up; "
                "bias left at 0 A. Lower the bias below the switching current."
            )

    # -- automatic bias calibration -------------------------------------------------------------
    def auto_calibrate_bias(
        self, dark_counts_cps: Sequence[float], timeout_s: float = 60.0
    ) -> list[float]:
        """Let the instrument find, per channel, the bias giving ``dark_counts_cps``.

        Keep the detectors dark.  The instrument moves the bias itself (no ramp of
        ours); afterwards any channel above ``bias_max_a`` is ramped down to it and
        :class:`SNSPDError` raised.  Returns the bias per channel (A).
        """
        targets = [float(v) for v in dark_counts_cps]
        if len(targets) != self._n or min(targets) <= 0:
            raise ValueError(
                f"{self.full_name}: dark_counts_cps needs {self._n} values > 0, got {targets}"
            )
        if not self._read_label("DetectorEnable", "auto_calibrate_bias"):
            raise SNSPDError(f"{self.full_name}: enable() the detectors before calibrating")
        self._command(lambda: self.comm.set_dark_counts_auto_iv(targets), "DarkCountsAutoIV")
        self._command(self.comm.auto_cali_bias_currents, "AutoCaliBiasCurrents")
        request = json.dumps({"request": "StartAutoIV"})  # as [SQ-contrib] auto_cali_finished
        deadline = time.monotonic() + timeout_s
        time.sleep(_POLL_S)
        while self._request(["StartAutoIV"], "auto calibration status", request)["StartAutoIV"]:
            if time.monotonic() > deadline:
                raise SNSPDCommunicationError(
                    f"{self.full_name}: automatic bias calibration still running after "
                    f"{timeout_s} s"
                )
            time.sleep(_POLL_S)
        self._raise_server_errors("AutoCaliBiasCurrents")
        bias = self._read_bias_a()
        over = {i: m for i, (b, m) in enumerate(zip(bias, self.bias_max_a, strict=True)) if b > m}
        if over:
            self._ramp({i: self.bias_max_a[i] for i in over})
            raise SNSPDError(
                f"{self.full_name}: the calibration set "
                + ", ".join(f"ch{i + 1} to {bias[i]:.3e} A" for i in over)
                + " above bias_max_a; ramped down to bias_max_a"
            )
        return bias

    # -- errors reported by the instrument ------------------------------------------------------
    def _on_server_error(self, message: Any) -> None:
        """[SQ-contrib] ``error_callback``: a label containing ``Error`` arrived."""
        text = str(message)
        self.log.warning(f"instrument reports: {text}")
        with self._errors_lock:
            self._errors.append(text)

    def check_errors(self) -> None:
        """Raise :class:`SNSPDError` with every error the instrument reported since the last call.

        A fresh read first makes sure every earlier command has been handled.
        """
        self._request(["NumberOfDetectors"], "check_errors()")
        self._raise_server_errors("earlier commands")

    def _raise_server_errors(self, what: str) -> None:
        with self._errors_lock:
            errors, self._errors = self._errors, []
        if errors:
            raise SNSPDError(f"{self.full_name}: the instrument reported after {what}: "
                             + "; ".join(errors))

    # -- bias -----------------------------------------------------------------------------------
    def _read_bias_a(self) -> list[float]:
        """Fresh bias of every channel (A)."""
        values = self._read_list("BiasCurrent", "bias_current")
        self._bias_ua = list(values)
        return [v * 1e-6 for v in values]

    def _bias_step_a(self, index: int) -> float:
        """Largest bias change per write of channel ``index`` (A); a ramp is mandatory."""
        step = self.channels[index].bias_current.step
        if step is None or not step > 0:
            raise SNSPDError(
                f"{self.full_name}: ch{index + 1}.bias_current.step is {step!r}; the bias is "
                "only changed by ramps, so it must be a positive number of A"
            )
        return float(step)

    def _write_bias(self, changes: dict[int, float]) -> None:
        """One ``SetAllBiasCurrents`` with ``changes`` (A) applied to the last known array.

        Refuses (before sending) any change larger than the channel's ramp step: the
        last line of defence of "bias only by ramps".
        """
        values = list(self._bias_ua)
        for i, amps in changes.items():
            values[i] = round(amps * 1e6, 3)
            jump_a = abs(values[i] - self._bias_ua[i]) * 1e-6
            if jump_a > self._bias_step_a(i) + self.BIAS_TOLERANCE_A:
                raise SNSPDError(
                    f"{self.full_name}: refusing a bias jump of {jump_a:.3e} A on ch{i + 1} "
                    f"(step {self._bias_step_a(i):.3e} A)"
                )
        self._command(lambda: self.comm.set_bias_current(values), f"SetAllBiasCurrents {values}")
        self._bias_ua = values

    def _ramp(self, targets: dict[int, float]) -> None:
        """Ramp the given channels (A) together in bounded steps; others stay put."""
        for i, amps in targets.items():
            self.channels[i].bias_current.validate(amps)
        step = min(self._bias_step_a(i) for i in range(self._n))
        start = self._read_bias_a()
        delay = max(float(ch.bias_current.inter_delay) for ch in self.channels)
        span = max((abs(a - start[i]) for i, a in targets.items()), default=0.0)
        if span > self.BIAS_TOLERANCE_A:
            n = max(1, math.ceil(span / step - 1e-9))
            for k in range(1, n + 1):
                if k > 1:
                    time.sleep(delay)
                self._write_bias({i: start[i] + (a - start[i]) * k / n for i, a in targets.items()})
        self._verify_bias(targets)

    def _verify_bias(self, targets: dict[int, float]) -> None:
        """Read the bias back; resend a last step lost in transit; raise otherwise."""
        for attempt in (0, 1):
            actual = self._read_bias_a()
            self._raise_server_errors(f"setting the bias to {targets}")
            off = {i: a for i, a in targets.items() if abs(actual[i] - a) > self.BIAS_TOLERANCE_A}
            if not off:
                return
            if attempt or any(abs(actual[i] - a) > self._bias_step_a(i) + self.BIAS_TOLERANCE_A
                              for i, a in off.items()):
                raise SNSPDError(
                    f"{self.full_name}: bias read back "
                    + ", ".join(f"ch{i + 1} {actual[i]:.4e} A (set {a:.4e} A)"
                                for i, a in off.items())
                )
            self._write_bias(off)

    def _set_source(self, on: bool) -> None:
        """``DetectorEnable`` via [SQ-contrib], read back (resent once if lost)."""
        for _attempt in range(2):
            self._command(lambda: self.comm.enable_detectors(on), f"DetectorEnable {on}")
            if bool(self._read_label("DetectorEnable", f"DetectorEnable {on}")) is on:
                self._raise_server_errors(f"DetectorEnable {on}")
                return
        self._raise_server_errors(f"DetectorEnable {on}")
        raise SNSPDError(f"{self.full_name}: DetectorEnable still not {on} after sending it twice")

    # -- other settings -------------------------------------------------------------------------
    def _set_trigger_levels(self, changes: dict[int, float]) -> None:
        values = self._read_list("TriggerLevel", "trigger_level")
        for i, volts in changes.items():
            values[i] = round(volts * 1e3, 3)
        self._set_verified("TriggerLevel", values, lambda: self.comm.set_trigger_level(values),
                           f"SetAllTriggerLevels {values}")

    def _set_period(self, seconds: float) -> None:
        ms = round(seconds * 1e3)
        self._set_verified("InptMeasurementPeriod", ms,
                           lambda: self.comm.set_measurement_periode(ms),
                           f"SetMeasurementPeriod {ms}")

    def _set_verified(self, label: str, value: Any, send: Callable[[], None], what: str) -> None:
        for _attempt in range(2):
            self._command(send, what)
            got = self._read_label(label, what)
            self._raise_server_errors(what)
            if got == value:
                return
        raise SNSPDError(f"{self.full_name}: {label} reads {got!r} after {what}")

    # -- reads ----------------------------------------------------------------------------------
    def _read_label(self, label: str, what: str) -> Any:
        return self._request([label], what)[label]

    def _read_list(self, label: str, what: str) -> list[float]:
        value = self._read_label(label, what)
        if not isinstance(value, list) or len(value) != self._n:
            raise SNSPDError(f"{self.full_name}: {label} is {value!r}, expected {self._n} numbers")
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            raise SNSPDError(f"{self.full_name}: {label} is {value!r}, not numbers") from None

    def _read_bias_voltage_v(self) -> list[float]:
        request = json.dumps({"request": "BiasVoltage"})  # as [SQ-contrib] get_bias_voltage
        value = self._request(["BiasVoltage"], "bias_voltage", request)["BiasVoltage"]
        if not isinstance(value, list) or len(value) != self._n:
            raise SNSPDError(f"{self.full_name}: BiasVoltage is {value!r}")
        return [float(v) * 1e-3 for v in value]

    def _acquire_counters(self) -> npt.NDArray[np.float64]:
        period_s = float(self._read_label("InptMeasurementPeriod", "counters")) * 1e-3
        rows = self._read_rows(int(self.npts()), "counters", period_s)
        return np.array(rows, dtype=np.float64).T

    # -- link handling --------------------------------------------------------------------------
    def _request(
        self, labels: Sequence[str], what: str, before: str | None = None
    ) -> dict[str, Any]:
        """Fresh values of ``labels``: ``before`` (if given), then a ``labelProps`` request.

        Waits for the ``labelProps`` reply itself (each label's entry replaced by a new
        properties dict), never for a broadcast of an earlier command, which would only
        update the entry in place.  Retries once over a new link.
        """
        sent = LABEL_PROPS if before is None else f"{before} + {LABEL_PROPS}"
        for attempt in range(2):
            try:
                self._ensure_link(what)
                return self._request_once(labels, what, before)
            except (_LinkLostError, _NoReplyError) as err:
                if attempt:
                    raise SNSPDCommunicationError(
                        f"{self.full_name}: {err} to {sent} ({what}), "
                        f"timeout {self.timeout()} s, again after reconnecting"
                    ) from None
                self._reconnect_after(err, f"{sent} ({what})")
        raise AssertionError("unreachable")

    def _request_once(
        self, labels: Sequence[str], what: str, before: str | None = None
    ) -> dict[str, Any]:
        talk = self.comm.talk
        guard = self._talk_guard
        assert guard is not None
        markers = {label: {"value": _PENDING} for label in labels}
        with talk.lock:
            previous = {label: talk.labelProps.get(label) for label in labels}
            talk.labelProps.update(markers)
        garbage = guard.garbage_count
        deadline = time.monotonic() + float(self.timeout.cache.get())
        sent = LABEL_PROPS if before is None else f"{before} + {LABEL_PROPS}"
        try:
            try:
                if before is not None:
                    talk.send(before)
                talk.send(LABEL_PROPS)
            except OSError as err:
                raise _LinkLostError(f"link lost ({err})") from None
            while True:
                with talk.lock:
                    entries = {label: talk.labelProps.get(label) for label in labels}
                if all(e is not None and e is not markers[k] for k, e in entries.items()):
                    return {k: e["value"] for k, e in entries.items() if e is not None}
                if guard.garbage_count != garbage:
                    raise SNSPDError(
                        f"{self.full_name}: garbled reply to {sent} ({what}): "
                        f"{guard.last_garbage!r}"
                    )
                if guard.lost is not None:
                    raise _LinkLostError(guard.lost)
                if time.monotonic() > deadline:
                    raise _NoReplyError("no reply in time")
                time.sleep(0.001)
        finally:
            with talk.lock:
                for label in labels:
                    marker = markers[label]
                    if talk.labelProps.get(label) is not marker:
                        continue
                    old = previous[label]
                    if old is None:
                        talk.labelProps.pop(label, None)
                        continue
                    if marker["value"] is not _PENDING:  # a broadcast arrived meanwhile
                        old["value"] = marker["value"]
                    talk.labelProps[label] = old

    def _read_rows(self, n: int, what: str, period_s: float) -> list[list[float]]:
        """The next ``n`` complete counts lines (one more is skipped: it may straddle a change).

        Waits up to ``(n + 1)`` periods of ``period_s`` plus ``timeout``.
        """
        for attempt in range(2):
            try:
                self._ensure_link(what)
                return self._read_rows_once(n, what, period_s)
            except (_LinkLostError, _NoReplyError) as err:
                if attempt:
                    raise SNSPDCommunicationError(
                        f"{self.full_name}: {err} on the counts port {self._counts_port} "
                        f"({what}), again after reconnecting"
                    ) from None
                self._reconnect_after(err, f"counts ({what})")
        raise AssertionError("unreachable")

    def _read_rows_once(self, n: int, what: str, period_s: float) -> list[list[float]]:
        cnts = self.comm.cnts
        guard = self._counts_guard
        assert guard is not None
        need = n + 1
        cnts.CNTS_BUFFER = max(int(cnts.CNTS_BUFFER), need + 10)
        deadline = time.monotonic() + need * period_s + float(self.timeout.cache.get())
        garbage = guard.garbage_count
        with cnts.lock:
            n0 = cnts.n
        while True:
            with cnts.lock:
                have = cnts.n - n0
                if have >= need:
                    rows = [list(r) for r in cnts.cnts[len(cnts.cnts) - have:][1:need]]
                    break
            if guard.garbage_count != garbage:
                raise SNSPDError(
                    f"{self.full_name}: garbled counts line ({what}): {guard.last_garbage!r}"
                )
            if guard.lost is not None:
                raise _LinkLostError(guard.lost)
            if time.monotonic() > deadline:
                raise _NoReplyError("no counts line in time")
            time.sleep(0.002)
        for row in rows:
            if len(row) != self._n + 1 or not all(math.isfinite(v) for v in row):
                raise SNSPDError(
                    f"{self.full_name}: counts line {row} ({what}) does not hold a time "
                    f"and {self._n} counts"
                )
        return rows

    def _command(self, send: Callable[[], None], what: str) -> None:
        """Send one command through [SQ-contrib]; on a lost link reconnect once and resend."""
        for attempt in range(2):
            try:
                self._ensure_link(what)
                send()
                return
            except (OSError, _LinkLostError) as err:
                if attempt:
                    raise SNSPDCommunicationError(
                        f"{self.full_name}: link lost sending {what}: {err}"
                    ) from None
                self._reconnect_after(err, what)

    def _ensure_link(self, what: str) -> None:
        """Raise :class:`_LinkLostError` (so the caller reconnects) if a reader saw the link go."""
        for guard in (self._talk_guard, self._counts_guard):
            if guard is not None and guard.lost is not None:
                raise _LinkLostError(guard.lost)

    def _reconnect_after(self, err: Exception, what: str) -> None:
        self.log.warning(f"{err} on {what}; reconnecting")
        try:
            self.reconnect()
        except SNSPDCommunicationError as again:
            raise SNSPDCommunicationError(
                f"{self.full_name}: {err} on {what} (timeout {self.timeout()} s); {again}"
            ) from None

    def reconnect(self, timeout_s: float | None = None) -> None:
        """Close both links and reopen them until the instrument answers again.

        Retries for up to ``timeout_s`` (default :attr:`reconnect_timeout_s`) seconds;
        new [SQ-contrib] ``SQTalk``/``SQCounts`` threads replace the old ones.  Raises
        :class:`SNSPDCommunicationError` if the instrument cannot be reached.
        """
        timeout_s = self.reconnect_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            self._stop_threads()
            try:
                # probe first: the contrib constructors leak their socket when refused
                self._probe(self.full_name, self._host, self._control_port, self._counts_port,
                            float(self.timeout.cache.get()))
                self._open_links()
                # wait for every label this driver reads, not only the first of the frame
                number = self._request_once(_LABELS, "reconnect")
                if number["NumberOfDetectors"] != self._n:
                    raise SNSPDError(f"{self.full_name}: the instrument now reports "
                                     f"{number['NumberOfDetectors']} channels, was {self._n}")
                return
            except (OSError, SNSPDCommunicationError, _LinkLostError, _NoReplyError) as err:
                if time.monotonic() >= deadline:
                    self._stop_threads()
                    raise SNSPDCommunicationError(
                        f"{self.full_name}: could not re-establish the links to "
                        f"{self._host}:{self._control_port} (counts {self._counts_port}) "
                        f"within {timeout_s} s ({err})"
                    ) from err
                time.sleep(_POLL_S)

    def _open_links(self) -> None:
        """New [SQ-contrib] reader threads on new sockets, guarded before they start."""
        talk = SQTalk(TCP_IP_ADR=self._host, TCP_IP_PORT=self._control_port,
                      error_callback=self._on_server_error)
        try:
            cnts = SQCounts(TCP_IP_ADR=self._host, TCP_IP_PORT=self._counts_port)
        except OSError:
            talk.close()
            raise
        talk.daemon = True
        cnts.daemon = True
        self._install_guards(talk, cnts)
        self.comm.talk, self.comm.cnts = talk, cnts
        talk.start()
        cnts.start()

    def _install_guards(self, talk: Any, cnts: Any) -> None:
        self._talk_guard = _StreamGuard(talk.socket, ETB, ETB, _json_frame_ok)
        talk.socket = self._talk_guard
        talk.error_callback = self._on_server_error
        self._counts_guard = _StreamGuard(cnts.socket, b"\n", b"nan\n", _counts_line_ok)
        cnts.socket = self._counts_guard

    def _stop_threads(self) -> None:
        """Close both [SQ-contrib] links and wait for their reader threads to end."""
        comm = getattr(self, "comm", None)
        if comm is None:
            return
        for reader in (comm.talk, comm.cnts):
            with contextlib.suppress(Exception):
                reader.close()
        for reader in (comm.talk, comm.cnts):
            if reader.is_alive() and reader is not threading.current_thread():
                reader.join(timeout=1.0)

    def close(self) -> None:
        """Close both links (ending the contrib reader threads), then the instrument."""
        self._stop_threads()
        super().close()


class _PerChannel(vals.Validator[Sequence[float]]):
    """A list with one value per channel, each checked by its own validator."""

    def __init__(self, n: int, each: Sequence[vals.Validator[Any]]) -> None:
        self._n = n
        self._each = list(each)
        self._valid_values = ([0.0] * n,)

    def validate(self, value: Sequence[float], context: str = "") -> None:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise TypeError(f"{value!r} is not a list of {self._n} numbers; {context}")
        if len(value) != self._n:
            raise ValueError(f"{list(value)!r} must hold {self._n} values (one per channel); "
                             f"{context}")
        for i, (v, check) in enumerate(zip(value, self._each, strict=True)):
            check.validate(v, f"ch{i + 1} of {context}")

    def __repr__(self) -> str:
        return f"<{self._n} values: {self._each[0]!r}...>"
