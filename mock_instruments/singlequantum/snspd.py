"""Mock twin of a Single Quantum SNSPD system as its WebSQ server presents it.

Protocol (what ``qcodes_contrib_drivers.drivers.SingleQuantum.SingleQuantum`` sends and
expects; the same wire format as Single Quantum's own ``WebSQ.py`` example library,
MIT, (c) 2020 Single Quantum B. V.; no other public description of the protocol was
found):

* **control port** (12000 on the instrument): the client writes bare JSON objects, with
  no delimiter between them (``{"command": ...}{"request": ...}``); the server answers
  with *frames*, each one or more JSON objects back to back, ended by ``\\x17`` (ETB).
  Every server object is ``{"label": <name>, "value": <v>}``.  In the reply to
  ``{"request": "labelProps", "value": "None"}`` each ``value`` is a dict holding the
  label's properties (``"value"`` plus, here, ``"unit"``/``"min"``/``"max"``); in every
  other message (replies to ``{"request": <label>}``, broadcasts after a command)
  ``value`` is the bare value.  Settings are answered by nothing: the new value is
  broadcast to every connected client.  A label containing ``Error`` carries a
  problem report (the client logs it).
* **counts port** (12345 on the instrument): the server streams one ASCII line per
  measurement period, ``<time ms>,<counts ch1>,...,<counts chN>\\n``.

Commands served (``value`` units as on the wire):

=====================================================  ====================================
message                                                effect
=====================================================  ====================================
``{"request": "labelProps", "value": "None"}``         every label with its properties
``{"request": <label>}``                               that label (``BiasVoltage``,
                                                       ``StartAutoIV``, ...)
``{"command": "SetAllBiasCurrents", ...}``             bias current per channel (µA)
``{"command": "SetAllTriggerLevels", ...}``            counter trigger level per channel (mV)
``{"command": "SetMeasurementPeriod", ...}``           counter period (ms, integer, >= 10)
``{"command": "DetectorEnable", ...}``                 bias current source on / off
``{"command": "DarkCountsAutoIV", ...}``               dark-count targets (counts/s)
``{"command": "AutoCaliBiasCurrents", ...}``           search the bias giving those targets
=====================================================  ====================================

Labels: ``NumberOfDetectors``, ``BiasCurrent`` (µA), ``TriggerLevel`` (mV),
``InptMeasurementPeriod`` (ms), ``DetectorEnable``, ``BiasVoltage`` (mV),
``StartAutoIV`` (True while the calibration runs), ``DarkCountsAutoIV``,
``BiasCurrentAutoIV``.  Ranges are the mock's own choice except the bias
(±90.9 µA, the IV-scan range quoted in ``WebSQ.py``) and the 10 ms minimum period
(also quoted there).  An out-of-range or malformed command changes nothing and
answers ``{"label": "Error", "value": "<what was wrong>"}`` to the sender.

Detector physics (documented model; figures from PHYSICS.md: > 92 % efficiency,
< 130 Hz dark counts, tens of ns recovery, ≈ 0 afterpulsing, ≈ 15 ps jitter)::

    x    = I / I_sw                                     bias as a fraction of switching
    η(I) = η_max / (1 + exp(-(x - 0.70) / 0.05))        sigmoid to the plateau η_max
    DCR  = 100 cps * exp((x - 0.90) / 0.03) + 10 cps * η(I) / η_max
    A    = 20 mV/µA * I                                  pulse height at the counter
    R    = (η Φ + DCR) [if A > trigger] + 1e6 cps [if trigger < 5 mV: noise]
    R_m  = R / (1 + R τ),  τ = 50 ns                    recovery (non-paralysable)
    N    ~ Poisson(R_m T)                               one counts line, T = period

Latching: with the source on and ``I >= I_sw`` (or a click rate above
``latch_rate_cps``, a bright flash) the nanowire stays resistive: no counts at all and a
bias voltage of ``I (R_line + R_hotspot)`` instead of ``I R_line``.  It recovers only
when the bias is lowered to ``<= 0.25 I_sw`` or the source switched off.  With a bench
(``qkdlab.mock_instruments.bench.Bench``) each channel ``c`` is bench detector
``first_detector + c``: η, DCR, τ = 50 ns, afterpulsing 0, jitter 15 ps and
``enabled = source on and not latched and I > 0`` are written there and ``η Φ + DCR``
is ``bench.expected_click_rates()`` (see :meth:`MockSNSPD._bench_rates`, the only
place that touches the bench).  The trigger level acts on the counter only.

Without ``row_interval_s`` the counts lines come in real time, one per period; with it
they come every ``row_interval_s`` seconds, each still holding the counts of one full
period (fast tests).  The automatic bias calibration takes ``auto_iv_s`` and then sets
the bias at once (the real instrument sweeps it).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qkdlab.mock_instruments.server.faults import GARBAGE_REPLY, FaultInjector
from qkdlab.mock_instruments.server.tcp import Connection, TcpServer

Messages = list[dict[str, Any]]

ETB = b"\x17"
"""End of a control-port frame."""
LABEL_PROPS_REQUEST = "labelProps"

# -- physics constants (module docstring) -------------------------------------------------
ETA_MAX = 0.95
"""Plateau detection efficiency."""
ETA_HALF_FRACTION = 0.70
ETA_WIDTH_FRACTION = 0.05
DARK_REF_CPS = 100.0
"""Intrinsic dark counts at ``DARK_REF_FRACTION`` of the switching current (counts/s)."""
DARK_REF_FRACTION = 0.90
DARK_SLOPE_FRACTION = 0.03
BACKGROUND_CPS = 10.0
"""Stray light / blackbody counts at full efficiency (counts/s)."""
RETRAP_FRACTION = 0.25
"""A latched wire recovers once the bias is at or below this fraction of I_sw."""
RECOVERY_S = 50e-9
JITTER_PS = 15.0
PULSE_MV_PER_UA = 20.0
NOISE_MV = 5.0
NOISE_CPS = 1e6
R_LINE_OHM = 50.0
R_HOTSPOT_OHM = 10_000.0
DEFAULT_SWITCHING_UA = 20.0
DEFAULT_LATCH_RATE_CPS = 2e7

# -- wire ranges -------------------------------------------------------------------------
BIAS_RANGE_UA = (-90.9, 90.9)
TRIGGER_RANGE_MV = (-1000.0, 1000.0)
PERIOD_RANGE_MS = (10, 60_000)
DEFAULT_PERIOD_MS = 100
DEFAULT_TRIGGER_MV = 50.0
DEFAULT_AUTO_IV_S = 0.2


def efficiency(bias_ua: float, switching_ua: float) -> float:
    """Detection efficiency η at bias ``bias_ua`` (0 without bias)."""
    if bias_ua <= 0.0:
        return 0.0
    x = bias_ua / switching_ua
    return ETA_MAX / (1.0 + math.exp(-(x - ETA_HALF_FRACTION) / ETA_WIDTH_FRACTION))


def dark_count_cps(bias_ua: float, switching_ua: float) -> float:
    """Dark-count rate (counts/s) at bias ``bias_ua``: steep near the switching current."""
    if bias_ua <= 0.0:
        return 0.0
    x = bias_ua / switching_ua
    intrinsic = DARK_REF_CPS * math.exp((x - DARK_REF_FRACTION) / DARK_SLOPE_FRACTION)
    return intrinsic + BACKGROUND_CPS * efficiency(bias_ua, switching_ua) / ETA_MAX


def bias_for_dark_counts(target_cps: float, switching_ua: float) -> float:
    """Bias (µA, within [0, 0.98 I_sw]) whose dark-count rate is ``target_cps`` (bisection)."""
    lo, hi = 0.0, 0.98 * switching_ua
    if dark_count_cps(hi, switching_ua) <= target_cps:
        return hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if dark_count_cps(mid, switching_ua) < target_cps:
            lo = mid
        else:
            hi = mid
    return round(lo, 3)


def split_json_objects(buffer: bytes) -> tuple[list[bytes], bytes, list[bytes]]:
    """Cut complete top-level JSON objects off a byte stream with no delimiters.

    Returns ``(objects, rest, junk)``: each complete ``{...}`` (braces inside strings
    ignored), the incomplete tail to keep, and any bytes found outside an object.
    """
    objects: list[bytes] = []
    junk: list[bytes] = []
    i = 0
    while i < len(buffer):
        start = buffer.find(b"{", i)
        if start < 0:
            junk.append(buffer[i:])
            return objects, b"", junk
        if start > i:
            junk.append(buffer[i:start])
        depth, in_string, escaped = 0, False, False
        end = -1
        for j in range(start, len(buffer)):
            ch = buffer[j]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == 0x5C:  # backslash
                    escaped = True
                elif ch == 0x22:  # quote
                    in_string = False
            elif ch == 0x22:
                in_string = True
            elif ch == 0x7B:
                depth += 1
            elif ch == 0x7D:
                depth -= 1
                if depth == 0:
                    end = j + 1
                    break
        if end < 0:
            return objects, buffer[start:], junk
        objects.append(buffer[start:end])
        i = end
    return objects, b"", junk


def _frame(messages: Sequence[Mapping[str, Any]]) -> bytes:
    """One control-port frame: the objects back to back, then ETB."""
    return "".join(json.dumps(m) for m in messages).encode("utf-8") + ETB


class CommandError(Exception):
    """A command the mock refuses; its text goes back as an ``Error`` label."""


class MockSNSPD:
    """State and physics of one multi-channel SNSPD system.

    Args:
        bench: optional shared bench model (see the module docstring).
        channels: number of channels; default the bench's detector count (from
            ``first_detector`` on), else 4.
        first_detector: bench detector of channel 1.
        switching_ua: switching current per channel (µA), one value for all or a list.
        photon_rate_cps: photons/s reaching each channel when there is no bench.
        seed: seed of the Poisson generator of the counts lines.
        latch_rate_cps: click rate (counts/s, before recovery) that latches the wire.
        auto_iv_s: duration of the automatic bias calibration (s).
    """

    def __init__(
        self,
        bench: Any = None,
        *,
        channels: int | None = None,
        first_detector: int = 0,
        switching_ua: float | Sequence[float] = DEFAULT_SWITCHING_UA,
        photon_rate_cps: float | Sequence[float] = 0.0,
        seed: int | None = 0,
        latch_rate_cps: float = DEFAULT_LATCH_RATE_CPS,
        auto_iv_s: float = DEFAULT_AUTO_IV_S,
    ) -> None:
        self.bench = bench
        self.first_detector = first_detector
        if channels is None:
            channels = len(bench.bob.detectors) - first_detector if bench is not None else 4
        if channels < 1:
            raise ValueError(f"an SNSPD system needs at least one channel, got {channels}")
        if bench is not None and first_detector + channels > len(bench.bob.detectors):
            raise ValueError(
                f"channels {first_detector}..{first_detector + channels - 1} exceed the "
                f"bench's {len(bench.bob.detectors)} detectors"
            )
        self.n = channels
        self.switching_ua = _per_channel(switching_ua, channels, "switching_ua")
        self.photon_rate_cps = _per_channel(photon_rate_cps, channels, "photon_rate_cps")
        self.latch_rate_cps = latch_rate_cps
        self.auto_iv_s = auto_iv_s
        self.rng = np.random.default_rng(seed)
        self.lock = threading.RLock()
        self.received: list[dict[str, Any]] = []
        """Every message received (parsed), in order."""
        self.bias_history: list[list[float]] = []
        """Every bias array (µA) applied by ``SetAllBiasCurrents``, in order."""
        self.reset()

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on state (the mock's choice): source off, bias 0, trigger 50 mV, 100 ms."""
        with self.lock:
            self.bias_ua = [0.0] * self.n
            self.trigger_mv = [DEFAULT_TRIGGER_MV] * self.n
            self.period_ms = DEFAULT_PERIOD_MS
            self.enabled = False
            self.latched = [False] * self.n
            self.dark_targets_cps = [100.0] * self.n
            self.auto_iv_result_ua = [0.0] * self.n
            self._auto_iv_until: float | None = None
            self.elapsed_ms = 0.0
            self._bench_rates()

    def latch(self, channel: int) -> None:
        """Latch ``channel`` (0-based) now, as a bright flash would (if it is biased)."""
        with self.lock:
            if self.enabled and self.bias_ua[channel] > 0.0:
                self.latched[channel] = True
                self._bench_rates()

    def labels(self) -> dict[str, dict[str, Any]]:
        """Every label with its properties (the ``labelProps`` reply)."""
        with self.lock:
            self._advance_auto_iv()
            return {
                "NumberOfDetectors": {"value": self.n},
                "BiasCurrent": {"value": list(self.bias_ua), "unit": "uA",
                                "min": BIAS_RANGE_UA[0], "max": BIAS_RANGE_UA[1]},
                "TriggerLevel": {"value": list(self.trigger_mv), "unit": "mV",
                                 "min": TRIGGER_RANGE_MV[0], "max": TRIGGER_RANGE_MV[1]},
                "InptMeasurementPeriod": {"value": self.period_ms, "unit": "ms",
                                          "min": PERIOD_RANGE_MS[0], "max": PERIOD_RANGE_MS[1]},
                "DetectorEnable": {"value": self.enabled},
                "BiasVoltage": {"value": self.bias_voltage_mv(), "unit": "mV"},
                "StartAutoIV": {"value": self._auto_iv_until is not None},
                "DarkCountsAutoIV": {"value": list(self.dark_targets_cps), "unit": "Hz"},
                "BiasCurrentAutoIV": {"value": list(self.auto_iv_result_ua), "unit": "uA"},
            }

    # -- physics -----------------------------------------------------------------------------
    def efficiency(self, channel: int) -> float:
        """η of ``channel`` while it detects (0 when off or latched)."""
        if not self.enabled or self.latched[channel]:
            return 0.0
        return efficiency(self.bias_ua[channel], self.switching_ua[channel])

    def dark_count_cps(self, channel: int) -> float:
        """Dark counts/s of ``channel`` while it detects (0 when off or latched)."""
        if not self.enabled or self.latched[channel]:
            return 0.0
        return dark_count_cps(self.bias_ua[channel], self.switching_ua[channel])

    def detecting(self, channel: int) -> bool:
        """True while ``channel`` is biased, on and not latched."""
        return self.enabled and not self.latched[channel] and self.bias_ua[channel] > 0.0

    def bias_voltage_mv(self) -> list[float]:
        """Voltage across each channel (mV): I R_line, or I (R_line + R_hotspot) latched."""
        out = []
        for c in range(self.n):
            if not self.enabled:
                out.append(0.0)
                continue
            ohms = R_LINE_OHM + (R_HOTSPOT_OHM if self.latched[c] else 0.0)
            out.append(round(self.bias_ua[c] * ohms * 1e-3, 4))
        return out

    def true_rates_cps(self) -> list[float]:
        """Clicks/s per channel before recovery, as the counter sees them."""
        with self.lock:
            detector = self._bench_rates()
            if detector is None:
                detector = [
                    self.efficiency(c) * self.photon_rate_cps[c] + self.dark_count_cps(c)
                    if self.detecting(c) else 0.0
                    for c in range(self.n)
                ]
            rates = []
            for c in range(self.n):
                pulse_mv = PULSE_MV_PER_UA * self.bias_ua[c]
                rate = detector[c] if (self.detecting(c) and pulse_mv > self.trigger_mv[c]) else 0.0
                if self.trigger_mv[c] < NOISE_MV:
                    rate += NOISE_CPS
                rates.append(rate)
            return rates

    def measured_rates_cps(self) -> list[float]:
        """Expected counted rate per channel, R / (1 + R τ)."""
        return [r / (1.0 + r * RECOVERY_S) for r in self.true_rates_cps()]

    def counts_line(self) -> bytes:
        """The next counts line: ``<t ms>,<N1>,...`` with N ~ Poisson(R_m T)."""
        with self.lock:
            self._advance_auto_iv()
            self._check_bright_latch()
            period_s = self.period_ms * 1e-3
            counts = [int(self.rng.poisson(r * period_s)) for r in self.measured_rates_cps()]
            self.elapsed_ms += self.period_ms
            fields = [f"{self.elapsed_ms:.1f}", *(str(k) for k in counts)]
            return (",".join(fields) + "\n").encode("ascii")

    def _check_bright_latch(self) -> None:
        for c, rate in enumerate(self.true_rates_cps()):
            if self.detecting(c) and rate > self.latch_rate_cps:
                self.latched[c] = True
        self._bench_rates()

    def _update_latch(self) -> None:
        """Latch channels biased at or above I_sw; release those lowered enough or off."""
        for c in range(self.n):
            if self.enabled and self.bias_ua[c] >= self.switching_ua[c]:
                self.latched[c] = True
            elif self.latched[c] and (
                not self.enabled or self.bias_ua[c] <= RETRAP_FRACTION * self.switching_ua[c]
            ):
                self.latched[c] = False

    def _bench_rates(self) -> list[float] | None:
        """The single point of contact with the bench: push the detectors, read the rates.

        Returns None without a bench.  Writes ``bench.bob.detectors[first_detector + c]``
        (``enabled``, ``efficiency``, ``dark_count_cps``, ``dead_time_s``,
        ``afterpulse_prob``, ``jitter_ps``) under ``bench.lock`` and returns
        ``bench.expected_click_rates()`` of those detectors (clicks/s with dark counts,
        before dead time).
        """
        if self.bench is None:
            return None
        with self.bench.lock:
            for c in range(self.n):
                det = self.bench.bob.detectors[self.first_detector + c]
                on = self.detecting(c)
                det.enabled = on
                det.efficiency = efficiency(self.bias_ua[c], self.switching_ua[c]) if on else 0.0
                det.dark_count_cps = (
                    dark_count_cps(self.bias_ua[c], self.switching_ua[c]) if on else 0.0
                )
                det.dead_time_s = RECOVERY_S
                det.afterpulse_prob = 0.0
                det.jitter_ps = JITTER_PS
            rates = self.bench.expected_click_rates()
            first = self.first_detector
            return [float(r) for r in rates[first:first + self.n]]

    # -- automatic bias calibration ----------------------------------------------------------
    def _advance_auto_iv(self) -> None:
        if self._auto_iv_until is None or time.monotonic() < self._auto_iv_until:
            return
        self._auto_iv_until = None
        result = [
            bias_for_dark_counts(t, s)
            for t, s in zip(self.dark_targets_cps, self.switching_ua, strict=True)
        ]
        self.auto_iv_result_ua = result
        self._apply_bias(result)

    # -- messages ----------------------------------------------------------------------------
    def handle(self, message: Mapping[str, Any]) -> tuple[Messages, Messages]:
        """Handle one client message; returns ``(reply, broadcast)`` message lists."""
        with self.lock:
            self.received.append(dict(message))
            try:
                return self._dispatch(message)
            except CommandError as err:
                return [{"label": "Error", "value": str(err)}], []

    def _dispatch(self, message: Mapping[str, Any]) -> tuple[Messages, Messages]:
        if "request" in message:
            request = message["request"]
            labels = self.labels()
            if request == LABEL_PROPS_REQUEST:
                return [{"label": k, "value": v} for k, v in labels.items()], []
            if isinstance(request, str) and request in labels:
                return [{"label": request, "value": labels[request]["value"]}], []
            raise CommandError(f"unknown request {request!r}")
        command = message.get("command")
        handlers: dict[str, Callable[[Any], list[str]]] = {
            "SetAllBiasCurrents": self._set_bias,
            "SetAllTriggerLevels": self._set_trigger,
            "SetMeasurementPeriod": self._set_period,
            "DetectorEnable": self._set_enable,
            "DarkCountsAutoIV": self._set_dark_targets,
            "AutoCaliBiasCurrents": self._start_auto_iv,
        }
        if command not in handlers:
            raise CommandError(f"unknown command {command!r} in {json.dumps(message)}")
        if "value" not in message:
            raise CommandError(f"{command}: missing 'value'")
        changed = handlers[command](message["value"])
        labels = self.labels()
        return [], [{"label": k, "value": labels[k]["value"]} for k in changed]

    def _numbers(self, command: str, value: Any, limits: tuple[float, float]) -> list[float]:
        if not isinstance(value, list) or len(value) != self.n:
            raise CommandError(f"{command}: expected a list of {self.n} numbers, got {value!r}")
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise CommandError(f"{command}: {v!r} is not a number")
            if not limits[0] <= v <= limits[1]:
                raise CommandError(f"{command}: {v} outside [{limits[0]}, {limits[1]}]")
            out.append(float(v))
        return out

    def _apply_bias(self, bias_ua: list[float]) -> None:
        self.bias_ua = list(bias_ua)
        self.bias_history.append(list(bias_ua))
        self._update_latch()
        self._bench_rates()

    def _set_bias(self, value: Any) -> list[str]:
        self._apply_bias(self._numbers("SetAllBiasCurrents", value, BIAS_RANGE_UA))
        return ["BiasCurrent", "BiasVoltage"]

    def _set_trigger(self, value: Any) -> list[str]:
        self.trigger_mv = self._numbers("SetAllTriggerLevels", value, TRIGGER_RANGE_MV)
        return ["TriggerLevel"]

    def _set_period(self, value: Any) -> list[str]:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise CommandError(f"SetMeasurementPeriod: {value!r} is not a whole number of ms")
        lo, hi = PERIOD_RANGE_MS
        if not lo <= value <= hi:
            raise CommandError(f"SetMeasurementPeriod: {value} ms outside [{lo}, {hi}] ms")
        self.period_ms = int(value)
        return ["InptMeasurementPeriod"]

    def _set_enable(self, value: Any) -> list[str]:
        if not isinstance(value, bool):
            raise CommandError(f"DetectorEnable: {value!r} is not true/false")
        self.enabled = value
        self._update_latch()
        self._bench_rates()
        return ["DetectorEnable", "BiasVoltage"]

    def _set_dark_targets(self, value: Any) -> list[str]:
        targets = self._numbers("DarkCountsAutoIV", value, (0.0, 1e7))
        if min(targets) <= 0:
            raise CommandError("DarkCountsAutoIV: targets must be > 0 counts/s")
        self.dark_targets_cps = targets
        return ["DarkCountsAutoIV"]

    def _start_auto_iv(self, value: Any) -> list[str]:
        if value is not True:
            raise CommandError(f"AutoCaliBiasCurrents: expected true, got {value!r}")
        if not self.enabled:
            raise CommandError("AutoCaliBiasCurrents: the detectors are not enabled")
        self._auto_iv_until = time.monotonic() + self.auto_iv_s
        return ["StartAutoIV"]


def _per_channel(value: float | Sequence[float], n: int, what: str) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{what}: expected {n} values, got {len(values)}")
    return values


class _LinkedFaults(FaultInjector):
    """Faults of the counts port: its own reply faults, plus every drop of the control port.

    A pulled cable (``server.faults.drop_connection``) takes both ports down; delayed,
    garbage or muted lines are injected separately (``server.counts.faults``).
    """

    def __init__(self, control: FaultInjector) -> None:
        super().__init__()
        self._control = control

    @property
    def drop_generation(self) -> int:
        return self._drop_generation + self._control.drop_generation

    def refusing(self) -> bool:
        return super().refusing() or self._control.refusing()


class _Client:
    """One control connection with a send lock (replies and broadcasts share it)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()


class SNSPDServer(TcpServer):
    """Control port of a :class:`MockSNSPD`, owning the counts port beside it.

    ``address`` is ``tcp://127.0.0.1:<control>?counts_port=<counts>``.  ``faults``
    is the control port's fault injector, and dropping the link there closes both
    ports; ``counts.faults`` delays, garbles or mutes the counts lines.

    Args:
        name: server name (logs, threads).
        instrument: the mock instrument.
        row_interval_s: seconds between counts lines (None: one per measurement period).
    """

    def __init__(
        self, name: str, instrument: MockSNSPD, *, row_interval_s: float | None = None
    ) -> None:
        super().__init__(name)
        self.instrument = instrument
        self.row_interval_s = row_interval_s
        self.counts = _CountsServer(f"{name}-counts", self)
        self.counts.faults = _LinkedFaults(self.faults)
        self._clients: list[_Client] = []
        self._clients_lock = threading.Lock()

    @property
    def address(self) -> str:
        """``tcp://host:<control port>?counts_port=<counts port>``."""
        return f"tcp://{self.host}:{self.port}?counts_port={self.counts.port}"

    def start(self) -> SNSPDServer:
        super().start()
        self.counts.start()
        return self

    def stop(self) -> None:
        self.counts.stop()
        super().stop()

    def serve(self, conn: Connection) -> None:
        client = _Client(conn)
        with self._clients_lock:
            self._clients.append(client)
        try:
            self._serve_client(client)
        finally:
            with self._clients_lock:
                self._clients.remove(client)

    def _serve_client(self, client: _Client) -> None:
        buffer = b""
        while True:
            data = client.conn.recv()
            if data is None:
                return
            buffer += data
            objects, buffer, junk = split_json_objects(buffer)
            for chunk in junk:
                if chunk.strip():
                    text = chunk.decode("utf-8", errors="replace")
                    error = {"label": "Error", "value": f"not JSON: {text!r}"}
                    if not self._reply(client, [error]):
                        return
            for raw in objects:
                try:
                    message = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as err:
                    reply: Messages = [{"label": "Error", "value": f"bad JSON: {err}"}]
                    broadcast: Messages = []
                else:
                    reply, broadcast = self.instrument.handle(message)
                if reply and not self._reply(client, reply):
                    return
                if broadcast:
                    self._broadcast(broadcast)

    def _reply(self, client: _Client, messages: Messages) -> bool:
        """Send one frame to ``client`` through the fault injector; False if the link is gone."""
        delay, garbage, mute = self.faults.take_reply_fault()
        if mute:
            return True
        if delay:
            time.sleep(delay)
        payload = GARBAGE_REPLY + ETB if garbage else _frame(messages)
        with client.lock:
            return client.conn.send(payload)

    def _broadcast(self, messages: Messages) -> None:
        with self._clients_lock:
            clients = list(self._clients)
        for client in clients:
            self._reply(client, messages)

    def row_interval(self) -> float:
        """Seconds between two counts lines now."""
        if self.row_interval_s is not None:
            return self.row_interval_s
        return self.instrument.period_ms * 1e-3


class _CountsServer(TcpServer):
    """Counts port: streams :meth:`MockSNSPD.counts_line` to every connected client."""

    def __init__(self, name: str, owner: SNSPDServer) -> None:
        super().__init__(name)
        self.owner = owner

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def serve(self, conn: Connection) -> None:
        while True:
            line = self.owner.instrument.counts_line()
            delay, garbage, mute = self.faults.take_reply_fault()
            if delay:
                time.sleep(delay)
            if not mute and not conn.send(GARBAGE_REPLY + b"\n" if garbage else line):
                return
            deadline = time.monotonic() + self.owner.row_interval()
            while True:  # wait for the next line; notice a closed link meanwhile
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if left < 0.05:
                    time.sleep(left)
                    break
                if conn.recv() is None:
                    return


def serve(name: str, bench: Any = None, options: Mapping[str, str] | None = None) -> SNSPDServer:
    """Factory for :mod:`qkdlab.mock_instruments.launcher`: an unstarted server.

    ``options`` (``mock://singlequantum/snspd?channels=4&switching_ua=20``):
    ``channels``, ``first_detector``, ``switching_ua`` (one value or comma list),
    ``photon_rate_cps`` (no bench; one value or comma list), ``seed``,
    ``row_interval_s``, ``latch_rate_cps``, ``auto_iv_s``.
    """
    opts = dict(options or {})
    known = ("channels", "first_detector", "switching_ua", "photon_rate_cps", "seed",
             "row_interval_s", "latch_rate_cps", "auto_iv_s")
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(f"unknown SNSPD mock option(s): {', '.join(unknown)}")

    def floats(key: str, default: float) -> float | list[float]:
        if key not in opts:
            return default
        parts = [float(p) for p in opts[key].split(",")]
        return parts[0] if len(parts) == 1 else parts

    kwargs: dict[str, Any] = {
        "switching_ua": floats("switching_ua", DEFAULT_SWITCHING_UA),
        "photon_rate_cps": floats("photon_rate_cps", 0.0),
        "latch_rate_cps": float(opts.get("latch_rate_cps", DEFAULT_LATCH_RATE_CPS)),
        "auto_iv_s": float(opts.get("auto_iv_s", DEFAULT_AUTO_IV_S)),
        "first_detector": int(opts.get("first_detector", 0)),
        "seed": int(opts["seed"]) if "seed" in opts else getattr(bench, "seed", 0),
    }
    if "channels" in opts:
        kwargs["channels"] = int(opts["channels"])
    instrument = MockSNSPD(bench, **kwargs)
    interval = float(opts["row_interval_s"]) if "row_interval_s" in opts else None
    return SNSPDServer(name, instrument, row_interval_s=interval)

