"""Mock twin of the ID Quantique ID900 / ID1000 Time Controller and its DataLinkTarget.

Transports, as on the real set-up (``qkdlab.drivers.idquantique.time_controller`` has
the manual references):

* **SCPI control** — the device answers every request of a ZeroMQ REQ client on its
  port (5555 on a real unit; here an OS-chosen port on 127.0.0.1).  Set commands get an
  empty reply, queries their value (``ON``/``OFF``, ``0.5V``, ``1234TB``...), and a
  rejected command the token ``SCPI_ERR_INVALID_CMD`` (unknown header) or
  ``SCPI_ERR_PARAM_TYPE`` (bad argument).  Served with a ROUTER socket, which speaks
  the REQ wire protocol and may stay silent (fault injection).
* **DataLinkTarget (DLT)** — the host-side timestamp receiver, JSON commands over
  ZeroMQ REQ/REP (port 6060 on a real host; OS-chosen here): ``start-stream``,
  ``stop``, ``list``, ``status``; failures answer ``{"error": {"description": ...}}``.
* **Timestamp stream** — per DLT acquisition an exclusive-pair (PAIR) socket bound on
  the requested ``--stream-port``; one message per record (sub-acquisition) per
  channel: little-endian ``uint64`` timestamps in ps from the record start (``RAW#``
  reference unlinked), or ``(timestamp, ref_index)`` ``uint64`` pairs with
  ``--with-ref-index`` (the index is 0: no reference is modelled).  A record without
  timestamps is sent as a 0-byte message so that message *n* is always record *n*.

Device model (the mock's own choices where the manual is silent, marked *mock*):

* inputs 0 (START) and 1–4 each have enable, threshold (V), edge, coupling and a delay
  (``DELAy1``–``4`` for inputs 1–4, ``STARt:DELAy`` for START; 0–1 s, integer ps).  A
  detector pulse of ``pulse_amplitude_v`` (*mock*: positive pulses, baseline 0 V)
  gives a tag only if the input is enabled and ``0 < threshold < amplitude``; the
  edge and coupling are stored but do not change the tag times;
* ``RAW1``–``RAW4`` take the stream of the block their ``STOP`` is linked to:
  ``STAR`` (input 0), ``TSCO5``–``8`` or ``DELA1``–``4`` or ``INPU1``–``4`` (inputs 1–4);
* ``RECord``: ``NUMber`` records (``INF`` for endless) of ``PWIDth`` ps every
  ``PPERiod`` ps (``DURation`` = ``PWIDth``; a single record needs no period).  Records
  complete in wall-clock time after ``PLAY`` (``realtime``), tags falling in the gap
  between two records are not recorded;
* sustained link rate: a leaky bucket of ``buffer_tags`` drained at ``max_rate_hz``
  (default 10 M timestamps/s, PHYSICS.md / manual p. 48), evaluated on
  ``bucket_bin_ps`` bins over the transmitted streams.  Timestamps that find the
  buffer full are lost: ``RAW#:ERRORS?`` counts them (*mock*: the counter counts lost
  timestamps) and the DLT ``status`` lists an error.  Tags the bench itself reports
  lost are added the same way.  A DLT that holds more than ``dlt_buffer_tags``
  undelivered timestamps (client too slow) drops the oldest records' payloads and
  reports that too.

The bench is touched in one method, :meth:`MockTimeController._bench_window`; input
``c`` of the Time Controller is bench tagger channel ``c`` (sync/START = 0).  Without
a bench, a synthetic source gives each input an exact number of tags per window
(``synthetic_rates_hz``), uniformly random or periodic.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import re
import shlex
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq

from qkdlab.mock_instruments.server import FaultInjector, ScpiError, ScpiInstrument
from qkdlab.mock_instruments.server.faults import GARBAGE_REPLY
from qkdlab.mock_instruments.server.scpi import (
    DATA_OUT_OF_RANGE,
    ILLEGAL_PARAMETER,
    MISSING_PARAMETER,
    UNDEFINED_HEADER,
)

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
I16Array = npt.NDArray[np.int16]

PS_PER_S = 10**12
MAX_DELAY_PS = PS_PER_S  # manual §6.2.1.4: delays up to 1 s at 1 ps
THRESHOLD_LIMIT_V = 2.0  # *mock*: ±2 V accepted (range not found in the manual pages)
MIN_RECORD_GAP_PS = 40_000  # IDQ example: ≥ 40 ns between sub-acquisitions
INPUTS = (0, 1, 2, 3, 4)  # 0 = START
RAW_BLOCKS = (1, 2, 3, 4)
ERR_INVALID_CMD = "SCPI_ERR_INVALID_CMD"
ERR_PARAM_TYPE = "SCPI_ERR_PARAM_TYPE"
TIMESTAMP_DTYPE = np.dtype("<u8")
TIMESTAMP_REF_DTYPE = np.dtype([("timestamp", "<u8"), ("ref_index", "<u8")])
_POLL_MS = 10


# ------------------------------------------------------------------ argument parsing


def _arg(args: list[str], header: str) -> str:
    if not args or not args[0].strip():
        raise ScpiError(MISSING_PARAMETER, header)
    return args[0].strip()


def parse_time_base(text: str, name: str = "value") -> int:
    """Integer ps from ``1234``, ``1234TB``, ``3000 GTB``, ``1e6`` (TB = 1 ps, manual §9)."""
    match = re.fullmatch(
        r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([kKMGT]?)(?:TB)?\s*",
        text.upper().replace("KTB", "kTB"),
    )
    if match is None:
        raise ScpiError(ILLEGAL_PARAMETER, f"{name}: {text!r} is not a time-base value")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2).upper()]
    return round(float(match.group(1)) * scale)


def parse_volts(text: str, name: str = "value") -> float:
    """Volts from ``0.5``, ``0.5V``, ``500mV`` (manual §9: ``1`` = ``1V`` = ``1000mV``)."""
    match = re.fullmatch(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(mV|V)?\s*", text,
                         re.IGNORECASE)
    if match is None:
        raise ScpiError(ILLEGAL_PARAMETER, f"{name}: {text!r} is not a voltage")
    value = float(match.group(1))
    if (match.group(2) or "").lower() == "mv":
        value *= 1e-3
    return value


def _on_off(text: str, name: str) -> bool:
    word = text.strip().upper()
    if word in ("ON", "1"):
        return True
    if word in ("OFF", "0"):
        return False
    raise ScpiError(ILLEGAL_PARAMETER, f"{name}: {text!r} is not ON/OFF")


def _choice(text: str, name: str, choices: dict[str, str]) -> str:
    word = text.strip().upper()
    for key, value in choices.items():
        if word in (key, value):
            return value
    raise ScpiError(ILLEGAL_PARAMETER, f"{name}: {text!r} not in {sorted(set(choices.values()))}")


def link_source(link: str) -> int | None:
    """Input (0 = START, 1–4) feeding a block linked to ``link``; None when unlinked."""
    word = link.strip().upper()
    if word.startswith("STAR"):
        return 0
    match = re.fullmatch(r"(INPU(?:T)?|DELA(?:Y)?|TSCO)(\d+)", word)
    if match is None:
        return None
    n = int(match.group(2))
    if match.group(1) == "TSCO":
        n -= 4  # TSCO5–8 forward DELA1–4 (IDQ configuration examples)
    return n if 1 <= n <= 4 else None


# ------------------------------------------------------------------ device state


@dataclass
class InputState:
    """Discriminator settings of one input (mock power-on values)."""

    enabled: bool = True
    threshold_v: float = 0.5
    edge: str = "RISING"
    coupling: str = "DC"
    delay_ps: int = 0
    hires_error: int = 0


@dataclass
class RawState:
    """One RAW (timestamp) block."""

    stop_link: str
    ref_link: str = "NONE"
    send: bool = False
    errors: int = 0


@dataclass
class RecordSettings:
    """The RECord generator (acquisition timer)."""

    enabled: bool = False
    arm_mode: str = "MANUAL"
    number: int | None = 1  # None = INF
    pwid_ps: int = PS_PER_S
    pper_ps: int = PS_PER_S + MIN_RECORD_GAP_PS


@dataclass
class RecordTruth:
    """What the mock did with one record (test and benchmark ground truth)."""

    index: int
    offered: dict[int, int]  # RAW block -> timestamps offered to the link
    sent: dict[int, int]  # RAW block -> timestamps put in the message
    lost: dict[int, int]  # RAW block -> timestamps lost (buffer full)
    source_counts: dict[int, int]  # input -> tags the bench/source produced in the window


@dataclass
class _Window:
    """Tags of one source window, times relative to the acquisition origin (ps)."""

    channel: I16Array
    time_ps: IntArray
    start_ps: int
    stop_ps: int
    lost_tags: int = 0


@dataclass
class _Run:
    """A playing RECord sequence."""

    number: int | None
    pwid_ps: int
    pper_ps: int
    t0_wall: float
    origin_ps: int | None = None  # source time of device time 0
    front_ps: int = 0  # source simulated up to this device time
    next_index: int = 0
    pending: dict[int, IntArray] = field(default_factory=dict)
    level: float = 0.0
    drained_ps: int = 0


class MockTimeController(ScpiInstrument):
    """SCPI command table, record generator and link model of one Time Controller.

    Args:
        bench: shared bench model (``acquire(duration_s)``), or None for the synthetic source.
        model: ``ID1000`` or ``ID900`` (``*IDN?``).
        serial: serial number for ``*IDN?``.
        seed: seed of the synthetic source.
        synthetic_rates_hz: tags/s of inputs 0–4 without a bench.
        synthetic_pattern: ``random`` (uniform, sorted) or ``periodic``.
        pulse_amplitude_v: amplitude of the pulses reaching every input (V).
        max_rate_hz: sustained timestamp rate of the link (timestamps/s, all RAW blocks).
        buffer_tags: device buffer in front of the link (timestamps).
        bucket_bin_ps: bin of the leaky-bucket evaluation (ps).
        realtime: records complete in wall-clock time (else as fast as the client drains).
    """

    def __init__(
        self,
        bench: Any = None,
        *,
        model: str = "ID1000",
        serial: str = "MOCK0001",
        seed: int = 0,
        synthetic_rates_hz: tuple[float, ...] = (0.0, 1e5, 1e5, 1e5, 1e5),
        synthetic_pattern: str = "random",
        pulse_amplitude_v: float = 1.0,
        max_rate_hz: float = 10e6,
        buffer_tags: int = 2**21,
        bucket_bin_ps: int = 100_000_000,
        realtime: bool = True,
    ) -> None:
        super().__init__()
        if len(synthetic_rates_hz) != len(INPUTS):
            raise ValueError("synthetic_rates_hz needs 5 rates (START, inputs 1–4)")
        if synthetic_pattern not in ("random", "periodic"):
            raise ValueError(f"synthetic_pattern must be random or periodic, not "
                             f"{synthetic_pattern!r}")
        self.bench = bench
        self.idn = f"ID Quantique,{model},{serial},mock-1.0"
        self.rng = np.random.default_rng(seed)
        self.synthetic_rates_hz = tuple(float(r) for r in synthetic_rates_hz)
        self.synthetic_pattern = synthetic_pattern
        self.pulse_amplitude_v = pulse_amplitude_v
        self.max_rate_hz = max_rate_hz
        self.buffer_tags = buffer_tags
        self.bucket_bin_ps = bucket_bin_ps
        self.realtime = realtime
        self.history: deque[RecordTruth] = deque(maxlen=4096)
        self.run: _Run | None = None
        self.resolution = "HIRES"
        self.configuration = "INIT"
        self._synthetic_ps = 0
        self.reset()
        self._register()

    # -- state ---------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on / ``DEVIce:CONFIguration:LOAD INIT`` state (mock values)."""
        self.inputs = {i: InputState() for i in INPUTS}
        self.delay_links = {n: (f"INPU{n}" if n <= 4 else "NONE") for n in range(1, 9)}
        self.extra_delays = {n: 0 for n in range(5, 9)}
        self.raws = {n: RawState(stop_link=f"TSCO{n + 4}") for n in RAW_BLOCKS}
        self.record = RecordSettings()
        self.run = None

    @property
    def stage(self) -> str:
        """``RECord:STAGe?``: PLAYING while records are due, else IDLE."""
        return "PLAYING" if self.run is not None else "IDLE"

    # -- command table ---------------------------------------------------------------
    def _register(self) -> None:
        add = self.add_command
        for prefix, sel in (("INPUt<n>", lambda s: s[0]), ("STARt", lambda s: 0)):
            add(f"{prefix}:ENABle", query=self._q(sel, lambda st: "ON" if st.enabled else "OFF"),
                write=self._w(sel, self._set_enable))
            add(f"{prefix}:THREshold", query=self._q(sel, lambda st: f"{st.threshold_v:g}V"),
                write=self._w(sel, self._set_threshold))
            add(f"{prefix}:EDGE", query=self._q(sel, lambda st: st.edge),
                write=self._w(sel, self._set_edge))
            add(f"{prefix}:COUPling", query=self._q(sel, lambda st: st.coupling),
                write=self._w(sel, self._set_coupling))
            add(f"{prefix}:HIREs:ERROr", query=self._q(sel, lambda st: str(st.hires_error)))
            add(f"{prefix}:HIREs:ERROr:CLEar", write=self._w(sel, self._clear_hires))
        add("STARt:DELAy", query=lambda a, s: f"{self.inputs[0].delay_ps}TB",
            write=lambda a, s: self._set_delay(0, _arg(a, "STARt:DELAy")))
        add("DELAy<n>:VALUe", query=lambda a, s: f"{self._delay_value(s[0])}TB",
            write=lambda a, s: self._set_delay_block(s[0], _arg(a, "DELAy:VALUe")))
        add("DELAy<n>:LINK", query=lambda a, s: self.delay_links[self._delay_block(s[0])],
            write=lambda a, s: self.delay_links.__setitem__(
                self._delay_block(s[0]), _arg(a, "DELAy:LINK").upper()))
        add("RAW<n>:STOP:LINK", query=lambda a, s: self._raw(s[0]).stop_link,
            write=lambda a, s: setattr(self._raw(s[0]), "stop_link",
                                       _arg(a, "RAW:STOP:LINK").upper()))
        add("RAW<n>:REF:LINK", query=lambda a, s: self._raw(s[0]).ref_link,
            write=lambda a, s: setattr(self._raw(s[0]), "ref_link",
                                       _arg(a, "RAW:REF:LINK").upper()))
        add("RAW<n>:SEND", query=lambda a, s: "ON" if self._raw(s[0]).send else "OFF",
            write=lambda a, s: setattr(self._raw(s[0]), "send",
                                       _on_off(_arg(a, "RAW:SEND"), "RAW:SEND")))
        add("RAW<n>:ERRORs", query=lambda a, s: str(self._raw(s[0]).errors))
        add("RAW<n>:ERRORs:CLEar", write=lambda a, s: setattr(self._raw(s[0]), "errors", 0))
        add("RECord:TRIGger:ARM:MODE", query=lambda a, s: self.record.arm_mode,
            write=lambda a, s: setattr(self.record, "arm_mode", _choice(
                _arg(a, "RECord:TRIGger:ARM:MODE"), "RECord:TRIGger:ARM:MODE",
                {"MANU": "MANUAL", "AUTO": "AUTO"})))
        add("RECord:ENABle", query=lambda a, s: "ON" if self.record.enabled else "OFF",
            write=lambda a, s: setattr(self.record, "enabled",
                                       _on_off(_arg(a, "RECord:ENABle"), "RECord:ENABle")))
        add("RECord:NUMber", query=lambda a, s: "INF" if self.record.number is None
            else str(self.record.number), write=lambda a, s: self._set_number(a))
        add("RECord:DURation", query=lambda a, s: f"{self.record.pwid_ps}TB",
            write=lambda a, s: self._set_width(a, "RECord:DURation"))
        add("RECord:PWIDth", query=lambda a, s: f"{self.record.pwid_ps}TB",
            write=lambda a, s: self._set_width(a, "RECord:PWIDth"))
        add("RECord:PPERiod", query=lambda a, s: f"{self.record.pper_ps}TB",
            write=lambda a, s: self._set_period(a))
        add("RECord:PLAY", write=lambda a, s: self._play())
        add("RECord:STOP", write=lambda a, s: self._stop())
        add("RECord:STAGe", query=lambda a, s: self.stage)
        add("DEVIce:CONFIguration:LOAD", write=lambda a, s: self._load(a))
        add("DEVIce:RESolution", query=lambda a, s: self.resolution,
            write=lambda a, s: setattr(self, "resolution", _choice(
                _arg(a, "DEVIce:RESolution"), "DEVIce:RESolution",
                {"HIRES": "HIRES", "LOWRES": "LOWRES"})))
        add("DEVIce:RESolution:BWIDth",
            query=lambda a, s: "1" if self.resolution == "HIRES" else "100")

    def _q(self, sel: Any, fmt: Any) -> Any:
        return lambda a, s: fmt(self.inputs[self._input(sel(s))])

    def _w(self, sel: Any, setter: Any) -> Any:
        return lambda a, s: setter(self._input(sel(s)), a)

    @staticmethod
    def _input(n: int) -> int:
        if n not in INPUTS:
            raise ScpiError(UNDEFINED_HEADER, f"input {n} does not exist")
        return n

    def _raw(self, n: int) -> RawState:
        if n not in self.raws:
            raise ScpiError(UNDEFINED_HEADER, f"RAW{n} does not exist")
        return self.raws[n]

    @staticmethod
    def _delay_block(n: int) -> int:
        if not 1 <= n <= 8:
            raise ScpiError(UNDEFINED_HEADER, f"DELAy{n} does not exist")
        return n

    def _delay_value(self, n: int) -> int:
        n = self._delay_block(n)
        return self.inputs[n].delay_ps if n <= 4 else self.extra_delays[n]

    def _set_enable(self, i: int, args: list[str]) -> None:
        self.inputs[i].enabled = _on_off(_arg(args, "ENABle"), "ENABle")

    def _set_threshold(self, i: int, args: list[str]) -> None:
        value = parse_volts(_arg(args, "THREshold"), "THREshold")
        if not -THRESHOLD_LIMIT_V <= value <= THRESHOLD_LIMIT_V:
            raise ScpiError(DATA_OUT_OF_RANGE, f"THREshold {value} V")
        self.inputs[i].threshold_v = value

    def _set_edge(self, i: int, args: list[str]) -> None:
        self.inputs[i].edge = _choice(_arg(args, "EDGE"), "EDGE",
                                      {"RIS": "RISING", "FALL": "FALLING"})

    def _set_coupling(self, i: int, args: list[str]) -> None:
        self.inputs[i].coupling = _choice(_arg(args, "COUPling"), "COUPling",
                                          {"AC": "AC", "DC": "DC"})

    def _clear_hires(self, i: int, _args: list[str]) -> None:
        self.inputs[i].hires_error = 0

    def _set_delay(self, i: int, text: str) -> None:
        value = parse_time_base(text, "DELAy")
        if not 0 <= value <= MAX_DELAY_PS:
            raise ScpiError(DATA_OUT_OF_RANGE, f"delay {value} TB not in [0, {MAX_DELAY_PS}]")
        self.inputs[i].delay_ps = value

    def _set_delay_block(self, n: int, text: str) -> None:
        n = self._delay_block(n)
        if n <= 4:
            self._set_delay(n, text)
            return
        value = parse_time_base(text, "DELAy")
        if not 0 <= value <= MAX_DELAY_PS:
            raise ScpiError(DATA_OUT_OF_RANGE, f"delay {value} TB")
        self.extra_delays[n] = value

    def _set_number(self, args: list[str]) -> None:
        text = _arg(args, "RECord:NUMber").upper()
        if text in ("INF", "INFINITY"):
            self.record.number = None
            return
        value = parse_time_base(text, "RECord:NUMber")
        if value < 1:
            raise ScpiError(DATA_OUT_OF_RANGE, f"RECord:NUMber {value}")
        self.record.number = value

    def _set_width(self, args: list[str], name: str) -> None:
        value = parse_time_base(_arg(args, name), name)
        if value < 1:
            raise ScpiError(DATA_OUT_OF_RANGE, f"{name} {value} TB")
        self.record.pwid_ps = value

    def _set_period(self, args: list[str]) -> None:
        value = parse_time_base(_arg(args, "RECord:PPERiod"), "RECord:PPERiod")
        if value < 1:
            raise ScpiError(DATA_OUT_OF_RANGE, f"RECord:PPERiod {value} TB")
        self.record.pper_ps = value

    def _load(self, args: list[str]) -> None:
        name = _choice(_arg(args, "DEVIce:CONFIguration:LOAD"), "DEVIce:CONFIguration:LOAD",
                       {"INIT": "INIT", "HISTO": "HISTO", "COUNT": "COUNT", "BLANK": "BLANK"})
        self.configuration = name
        if name == "INIT":
            self.reset()

    def _play(self) -> None:
        if not self.record.enabled:
            raise ScpiError(ILLEGAL_PARAMETER, "RECord is not enabled (RECord:ENABle ON)")
        if self.run is not None:
            return
        rec = self.record
        single = rec.number == 1
        pper = rec.pwid_ps if single else max(rec.pper_ps, rec.pwid_ps)
        self.run = _Run(rec.number, rec.pwid_ps, pper, time.monotonic())

    def _stop(self) -> None:
        self.run = None

    # -- program messages ----------------------------------------------------------
    def handle(self, message: str) -> str:
        """Execute one request (``;``-separated units); replies joined by newlines.

        A rejected unit answers ``SCPI_ERR_INVALID_CMD`` / ``SCPI_ERR_PARAM_TYPE`` in
        place of its reply and the rest of the message is not executed.
        """
        replies: list[str] = []
        path: list[str] = []
        with self.lock:
            for raw_unit in re.split(r';(?=(?:[^"]*"[^"]*")*[^"]*$)', message):
                unit = raw_unit.strip()
                if not unit:
                    continue
                header, _, arg_text = unit.partition(" ")
                if header.startswith(":"):
                    header = header[1:]
                elif not header.startswith("*") and path:
                    header = ":".join([*path, header])
                if not header.startswith("*"):
                    path = header.rstrip("?").split(":")[:-1]
                try:
                    reply = self._execute(header, arg_text)
                except ScpiError as err:
                    log.debug("mock time controller rejects %r: %s", unit, err)
                    replies.append(ERR_INVALID_CMD if err.code == UNDEFINED_HEADER[0]
                                   else ERR_PARAM_TYPE)
                    break
                if reply is not None:
                    replies.append(reply)
        return "\n".join(replies)

    # -- records -------------------------------------------------------------------
    def due(self, now: float, backlog: int) -> bool:
        """True when the next record of the playing sequence is complete."""
        run = self.run
        if run is None:
            return False
        if not self.realtime:
            return backlog == 0
        end_ps = run.next_index * run.pper_ps + run.pwid_ps
        return now >= run.t0_wall + end_ps / PS_PER_S

    def next_due_in(self, now: float) -> float | None:
        """Seconds until the next record completes (None when idle)."""
        run = self.run
        if run is None:
            return None
        if not self.realtime:
            return 0.0
        end_ps = run.next_index * run.pper_ps + run.pwid_ps
        return max(0.0, run.t0_wall + end_ps / PS_PER_S - now)

    def produce_record(self, active: dict[int, bool]) -> tuple[int, dict[int, npt.NDArray[Any]],
                                                               RecordTruth] | None:
        """Complete the next record: per RAW block (open at the DLT) its timestamps.

        ``active[n]`` tells whether RAW ``n`` has an open DLT acquisition; a RAW block
        transmits only with ``SEND ON`` and an open acquisition.
        """
        with self.lock:
            run = self.run
            if run is None:
                return None
        # the heavy part runs without the lock so that SCPI requests stay responsive
        k = run.next_index
        begin = k * run.pper_ps
        end = begin + run.pwid_ps
        source_counts = self._advance(run, begin + run.pper_ps if run.number != 1 else end)
        per_input: dict[int, IntArray] = {}
        for i in INPUTS:
            pend = run.pending.get(i, np.zeros(0, np.int64))
            lo = int(np.searchsorted(pend, begin, side="left"))
            hi = int(np.searchsorted(pend, end, side="left"))
            nxt = int(np.searchsorted(pend, begin + run.pper_ps, side="left"))
            per_input[i] = pend[lo:hi]
            run.pending[i] = pend[nxt:]
        streams: dict[int, IntArray] = {}
        for n, raw in self.raws.items():
            src = link_source(raw.stop_link)
            if not (raw.send and active.get(n, False)):
                continue
            streams[n] = per_input[src] if src is not None else np.zeros(0, np.int64)
        offered = {n: int(t.size) for n, t in streams.items()}
        kept, lost = self._rate_limit(run, streams, begin, end)
        for n, extra in self._bench_lost_share(kept).items():
            lost[n] = lost.get(n, 0) + extra
        payloads = {n: (t - begin).astype(np.uint64) for n, t in kept.items()}
        truth = RecordTruth(k, offered, {n: int(t.size) for n, t in kept.items()}, lost,
                            source_counts)
        with self.lock:
            if self.run is not run:  # stopped while this record was being made
                return None
            for n, count in lost.items():
                self.raws[n].errors += count
            run.next_index += 1
            if run.number is not None and run.next_index >= run.number:
                self.run = None
            self.history.append(truth)
        return k, payloads, truth

    def _advance(self, run: _Run, device_end_ps: int) -> dict[int, int]:
        """Pull source windows until device time ``device_end_ps``; filtered, delayed tags."""
        counts = dict.fromkeys(INPUTS, 0)
        self._pending_bench_lost = 0
        while run.front_ps < device_end_ps:
            window = self._bench_window(device_end_ps - run.front_ps)
            if run.origin_ps is None:
                run.origin_ps = window.start_ps
            run.front_ps = window.stop_ps - run.origin_ps
            self._pending_bench_lost += window.lost_tags
            rel = window.time_ps - run.origin_ps
            for i in INPUTS:
                sel = rel[window.channel == i]
                counts[i] += int(sel.size)
                st = self.inputs[i]
                if not (st.enabled and 0.0 < st.threshold_v < self.pulse_amplitude_v):
                    continue
                if sel.size == 0:
                    continue
                shifted = sel + np.int64(st.delay_ps)
                old = run.pending.get(i)
                if old is None or old.size == 0:
                    run.pending[i] = shifted
                else:
                    both = np.concatenate((old, shifted))
                    if old[-1] > shifted[0]:  # the delay changed during the run
                        both.sort(kind="stable")
                    run.pending[i] = both
        return counts

    def _bench_window(self, duration_ps: int) -> _Window:
        """The ONE place the bench is touched: tags of the next ``duration_ps`` ps.

        Bench tagger channel ``c`` is Time Controller input ``c`` (0 = START/sync).
        """
        if self.bench is not None:
            tags = self.bench.acquire(duration_ps / PS_PER_S)
            return _Window(np.asarray(tags.channel, np.int16), np.asarray(tags.time_ps, np.int64),
                           int(tags.start_ps), int(tags.stop_ps), int(tags.lost_tags))
        return self._synthetic_window(duration_ps)

    def _synthetic_window(self, duration_ps: int) -> _Window:
        """Exact tag counts per input: ``floor(r·t1) − floor(r·t0)`` tags in ``[t0, t1)``."""
        t0 = self._synthetic_ps
        t1 = t0 + duration_ps
        chans: list[I16Array] = []
        times: list[IntArray] = []
        for i, rate in enumerate(self.synthetic_rates_hz):
            if rate <= 0:
                continue
            n = math.floor(rate * t1 / PS_PER_S) - math.floor(rate * t0 / PS_PER_S)
            if n <= 0:
                continue
            if self.synthetic_pattern == "periodic":
                first = math.floor(rate * t0 / PS_PER_S) + 1
                idx = np.arange(first, first + n, dtype=np.float64)
                t = np.floor(idx * (PS_PER_S / rate)).astype(np.int64) - 1 + i
                np.clip(t, t0, t1 - 1, out=t)
            else:  # sorted uniform times: normalised cumulative exponential gaps, O(n)
                gaps = self.rng.standard_exponential(n + 1)
                pos = np.cumsum(gaps)
                pos *= duration_ps / pos[-1]
                t = pos[:n].astype(np.int64)
                t += np.int64(t0)
            times.append(t)
            chans.append(np.full(n, i, np.int16))
        self._synthetic_ps = t1
        if not times:
            return _Window(np.zeros(0, np.int16), np.zeros(0, np.int64), t0, t1)
        return _Window(np.concatenate(chans), np.concatenate(times), t0, t1)

    def _rate_limit(self, run: _Run, streams: dict[int, IntArray], begin: int,
                    end: int) -> tuple[dict[int, IntArray], dict[int, int]]:
        """Leaky bucket over the transmitted streams; returns kept tags and lost per RAW."""
        lost = dict.fromkeys(streams, 0)
        total = sum(int(t.size) for t in streams.values())
        binw = self.bucket_bin_ps
        first_bin = begin // binw
        n_bins = (max(end, begin + 1) - 1) // binw - first_bin + 1
        counts = np.zeros(n_bins, np.int64)
        for t in streams.values():
            if t.size:
                counts += np.bincount(t // binw - first_bin, minlength=n_bins)
        rate = self.max_rate_hz / PS_PER_S
        cap = float(self.buffer_tags)
        lost_bins = np.zeros(n_bins, np.int64)
        level, drained = run.level, max(run.drained_ps, begin)
        for j in np.flatnonzero(counts):
            c = int(counts[j])
            b0 = (first_bin + int(j)) * binw
            if b0 > drained:
                level = max(0.0, level - rate * (b0 - drained))
                drained = b0
            excess = level + c - cap
            if excess > 0:
                lost_bins[j] = min(c, math.ceil(excess))
            level = min(cap, level + c - int(lost_bins[j]))
            level = max(0.0, level - rate * (b0 + binw - drained))
            drained = b0 + binw
        if end > drained:
            level = max(0.0, level - rate * (end - drained))
            drained = end
        run.level, run.drained_ps = level, drained
        if total == 0 or not lost_bins.any():
            return dict(streams), lost
        # Tags that found the buffer full are the last arrivals of each lossy bin; the
        # loss of a bin is shared over the streams by their counts in it (largest
        # remainder) and each stream loses its last tags of that bin.
        raws = list(streams)
        lossy = np.flatnonzero(lost_bins)
        edges = (first_bin + np.arange(n_bins + 1, dtype=np.int64)) * binw
        per_stream = np.zeros((len(raws), lossy.size), np.int64)
        bounds: list[IntArray] = []
        for k, n in enumerate(raws):
            b = np.searchsorted(streams[n], edges, side="left")
            bounds.append(b)
            per_stream[k] = (b[lossy + 1] - b[lossy])
        exact = per_stream * (lost_bins[lossy] / np.maximum(counts[lossy], 1))
        share = np.floor(exact).astype(np.int64)
        short = lost_bins[lossy] - share.sum(axis=0)
        rank = np.argsort(np.argsort(-(exact - share), axis=0, kind="stable"), axis=0)
        share += rank < short
        kept: dict[int, IntArray] = {}
        for k, n in enumerate(raws):
            t = streams[n]
            ends = bounds[k][lossy + 1]
            marks = np.zeros(t.size + 1, np.int64)
            np.add.at(marks, ends - share[k], 1)
            np.add.at(marks, ends, -1)
            drop = np.cumsum(marks[:-1]) > 0
            kept[n] = t[~drop]
            lost[n] = int(np.count_nonzero(drop))
        return kept, lost

    def _bench_lost_share(self, kept: dict[int, IntArray]) -> dict[int, int]:
        """Split tags the bench reports lost over the transmitted RAW blocks (by count)."""
        lost = getattr(self, "_pending_bench_lost", 0)
        self._pending_bench_lost = 0
        if lost <= 0 or not kept:
            return {}
        sizes = np.array([max(1, t.size) for t in kept.values()], np.float64)
        share = np.floor(lost * sizes / sizes.sum()).astype(np.int64)
        share[int(np.argmax(sizes))] += lost - int(share.sum())
        return {n: int(s) for n, s in zip(kept, share, strict=True) if s}


# ------------------------------------------------------------------ DataLinkTarget


@dataclass
class DltAcquisition:
    """One open DLT acquisition (a RAW channel streamed to a PAIR socket)."""

    ident: str
    channel: int
    port: int
    with_ref_index: bool
    socket: Any
    outbox: deque[tuple[int, bytes]] = field(default_factory=deque)  # (tags, payload)
    acquisitions_count: int = 0
    timestamps_count: int = 0
    errors: list[str] = field(default_factory=list)
    last_rx: float = field(default_factory=time.monotonic)

    def status(self) -> dict[str, Any]:
        """The documented status object."""
        return {
            "acquisitions_count": self.acquisitions_count,
            "errors": [{"description": e} for e in self.errors],
            "inactivity": round(time.monotonic() - self.last_rx, 6),
            "timestamps_count": self.timestamps_count,
        }


# ------------------------------------------------------------------ server


class TimeControllerServer:
    """ZeroMQ server of the mock: SCPI (ROUTER ≙ REP), DLT (ROUTER) and PAIR streams.

    Same interface as :class:`~qkdlab.mock_instruments.server.TcpServer`: ``start()``,
    ``stop()``, ``address``, ``faults``.  One thread owns every socket.  ``address`` is
    ``tcp://127.0.0.1:<scpi>?dlt=tcp://127.0.0.1:<dlt>`` so a single station address
    carries both endpoints; :attr:`scpi_address` and :attr:`dlt_address` give them apart.
    """

    def __init__(self, name: str, device: MockTimeController, *, host: str = "127.0.0.1",
                 dlt_buffer_tags: int = 2**24, stream_hwm: int = 4) -> None:
        self.name = name
        self.device = device
        self.host = host
        self.faults = FaultInjector()
        self.dlt_buffer_tags = dlt_buffer_tags
        self.stream_hwm = stream_hwm
        self.running = False
        self._ctx = zmq.Context()
        self._scpi = self._ctx.socket(zmq.ROUTER)
        self._scpi.setsockopt(zmq.LINGER, 0)
        self.scpi_port = self._scpi.bind_to_random_port(f"tcp://{host}")
        self._dlt = self._ctx.socket(zmq.ROUTER)
        self._dlt.setsockopt(zmq.LINGER, 0)
        self.dlt_port = self._dlt.bind_to_random_port(f"tcp://{host}")
        self.acquisitions: dict[str, DltAcquisition] = {}
        self._delayed: list[tuple[float, list[bytes]]] = []
        self._generation = self.faults.drop_generation
        self._scpi_down_until: float | None = None
        self._thread: threading.Thread | None = None
        self._producer: threading.Thread | None = None
        self._produced: queue.Queue[tuple[int, dict[int, npt.NDArray[Any]], RecordTruth]] = (
            queue.Queue())
        self._open_channels: frozenset[int] = frozenset()
        self._backlog_count = 0
        self.requests: list[str] = []  # SCPI requests received (bounded, for tests)

    # -- interface -----------------------------------------------------------------
    @property
    def scpi_address(self) -> str:
        """ZeroMQ endpoint of the SCPI port."""
        return f"tcp://{self.host}:{self.scpi_port}"

    @property
    def dlt_address(self) -> str:
        """ZeroMQ endpoint of the DataLinkTarget service."""
        return f"tcp://{self.host}:{self.dlt_port}"

    @property
    def address(self) -> str:
        """The address a driver opens: SCPI endpoint plus ``?dlt=`` endpoint."""
        return f"{self.scpi_address}?dlt={self.dlt_address}"

    def start(self) -> TimeControllerServer:
        """Serve in a daemon thread; returns self."""
        self.running = True
        self._thread = threading.Thread(target=self._loop, name=f"mock-{self.name}", daemon=True)
        self._thread.start()
        self._producer = threading.Thread(target=self._produce_loop,
                                          name=f"mock-{self.name}-records", daemon=True)
        self._producer.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every socket (idempotent)."""
        self.running = False
        for thread in (self._producer, self._thread):
            if thread is not None:
                thread.join(timeout=5)
        self._thread = self._producer = None
        for acq in self.acquisitions.values():
            acq.socket.close(linger=0)
        self.acquisitions.clear()
        self._scpi.close(linger=0)
        self._dlt.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> TimeControllerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while self.running:
                self._step()
        except Exception:  # a mock must never take the test process down
            log.exception("mock %s: server loop failed", self.name)

    def _step(self) -> None:
        now = time.monotonic()
        self._apply_drop(now)
        poller = zmq.Poller()
        if self._scpi_down_until is None:
            poller.register(self._scpi, zmq.POLLIN)
        poller.register(self._dlt, zmq.POLLIN)
        wait = _POLL_MS / 1000
        if self._delayed:
            wait = min(wait, max(0.0, min(d for d, _ in self._delayed) - now))
        if any(a.outbox for a in self.acquisitions.values()):
            wait = min(wait, 0.001)
        events = dict(poller.poll(int(wait * 1000)))
        if self._scpi in events:
            self._serve_scpi()
        if self._dlt in events:
            self._serve_dlt()
        self._send_delayed(time.monotonic())
        self._take_records(time.monotonic())
        self._flush()
        self._open_channels = frozenset(a.channel for a in self.acquisitions.values())
        self._backlog_count = self._backlog() + self._produced.qsize()

    def _produce_loop(self) -> None:
        """Complete records when due (own thread: making a record takes time)."""
        try:
            while self.running:
                now = time.monotonic()
                if not self.device.due(now, self._backlog_count):
                    due_in = self.device.next_due_in(now)
                    time.sleep(0.005 if due_in is None else min(0.005, max(due_in, 0.0005)))
                    continue
                open_now = self._open_channels
                result = self.device.produce_record({n: n in open_now for n in RAW_BLOCKS})
                if result is not None:
                    self._produced.put(result)
                    self._backlog_count += 1
        except Exception:  # a mock must never take the test process down
            log.exception("mock %s: record producer failed", self.name)

    def _apply_drop(self, now: float) -> None:
        if self.faults.drop_generation != self._generation:
            self._generation = self.faults.drop_generation
            self._scpi.close(linger=0)
            self._delayed.clear()
            self._scpi_down_until = now
        if self._scpi_down_until is not None and not self.faults.refusing():
            sock = self._ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.bind(self.scpi_address)
            except zmq.ZMQError:  # the old listener is still closing; retry next step
                sock.close(linger=0)
                return
            self._scpi = sock
            self._scpi_down_until = None

    def _serve_scpi(self) -> None:
        while True:
            try:
                frames = self._scpi.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 3:
                continue
            envelope, body = frames[:-1], frames[-1]
            message = body.decode("utf-8", errors="replace")
            if len(self.requests) < 100_000:
                self.requests.append(message)
            reply = self.device.handle(message).encode("utf-8")
            delay, garbage, mute = self.faults.take_reply_fault()
            if mute:
                continue
            payload = GARBAGE_REPLY if garbage else reply
            if delay > 0:
                self._delayed.append((time.monotonic() + delay, [*envelope, payload]))
            else:
                self._scpi.send_multipart([*envelope, payload])

    def _send_delayed(self, now: float) -> None:
        ready = [m for due, m in self._delayed if due <= now]
        self._delayed = [(due, m) for due, m in self._delayed if due > now]
        if self._scpi_down_until is not None:
            return
        for frames in ready:
            with contextlib.suppress(zmq.ZMQError):
                self._scpi.send_multipart(frames)

    def _serve_dlt(self) -> None:
        while True:
            try:
                frames = self._dlt.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 3:
                continue
            answer = self._dlt_command(frames[-1].decode("utf-8", errors="replace"))
            self._dlt.send_multipart([*frames[:-1], json.dumps(answer).encode("utf-8")])

    def _dlt_command(self, text: str) -> Any:
        try:
            words = shlex.split(text)
        except ValueError as err:
            return _dlt_error(str(err))
        if not words:
            return _dlt_error("empty command")
        cmd, opts = words[0], _dlt_options(words[1:])
        if isinstance(opts, str):
            return _dlt_error(opts)
        if cmd == "start-stream":
            return self._start_stream(opts)
        if cmd == "start-save":
            return _dlt_error("start-save is not implemented by the mock DataLinkTarget")
        if cmd == "list":
            return list(self.acquisitions)
        if cmd in ("stop", "status"):
            acq = self.acquisitions.get(str(opts.get("id", "")))
            if acq is None:
                return _dlt_error(f"unknown acquisition id {opts.get('id')!r}")
            if cmd == "status":
                return acq.status()
            self._flush(final=acq)
            del self.acquisitions[acq.ident]
            acq.socket.close(linger=0)
            return {"status": acq.status()}
        return _dlt_error(f"unrecognised command '{cmd}'")

    def _start_stream(self, opts: dict[str, str | bool]) -> Any:
        try:
            channel = int(str(opts["channel"]))
            port = int(str(opts["stream-port"]))
            str(opts["address"])
        except (KeyError, ValueError) as err:
            return _dlt_error(f"start-stream needs --address, --channel and --stream-port ({err})")
        if channel not in RAW_BLOCKS:
            return _dlt_error(f"channel {channel} not in 1-4")
        ident = str(opts.get("id") or f"{self.host}:{port}")
        if ident in self.acquisitions:
            return _dlt_error(f"acquisition {ident} already open")
        sock = self._ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.stream_hwm)
        try:
            sock.bind(f"tcp://{self.host}:{port}")
        except zmq.ZMQError as err:
            sock.close(linger=0)
            return _dlt_error(f"cannot listen on port {port}: {err}")
        self.acquisitions[ident] = DltAcquisition(ident, channel, port,
                                                  bool(opts.get("with-ref-index")), sock)
        return {"id": ident}

    # -- data path -----------------------------------------------------------------
    def _backlog(self) -> int:
        return sum(len(a.outbox) for a in self.acquisitions.values())

    def _take_records(self, now: float) -> None:
        while True:
            try:
                _k, payloads, truth = self._produced.get_nowait()
            except queue.Empty:
                return
            self._route(now, payloads, truth)

    def _route(self, now: float, payloads: dict[int, npt.NDArray[Any]],
               truth: RecordTruth) -> None:
        by_channel = {a.channel: a for a in self.acquisitions.values()}
        for n, ticks in payloads.items():
            acq = by_channel.get(n)
            if acq is None:  # the DLT acquisition closed meanwhile: nobody receives it
                continue
            if acq.with_ref_index:
                rec = np.zeros(ticks.size, dtype=TIMESTAMP_REF_DTYPE)
                rec["timestamp"] = ticks
                body = rec.tobytes()
            else:
                body = ticks.astype(TIMESTAMP_DTYPE, copy=False).tobytes()
            acq.outbox.append((int(ticks.size), body))
            acq.acquisitions_count += 1
            acq.timestamps_count += int(ticks.size)
            acq.last_rx = now
            if truth.lost.get(n):
                acq.errors.append(f"{truth.lost[n]} timestamps lost on RAW{n} "
                                  f"(record {truth.index}: buffer overflow)")
        self._enforce_dlt_buffer()

    def _enforce_dlt_buffer(self) -> None:
        """Drop the oldest undelivered payloads beyond ``dlt_buffer_tags``."""
        queued = sum(n for a in self.acquisitions.values() for n, _ in a.outbox)
        for acq in self.acquisitions.values():
            if queued <= self.dlt_buffer_tags:
                return
            for j, (n, _body) in enumerate(acq.outbox):
                if n == 0:
                    continue
                acq.outbox[j] = (0, b"")
                queued -= n
                acq.timestamps_count -= n
                self.device.raws[acq.channel].errors += n
                acq.errors.append(f"{n} timestamps lost on RAW{acq.channel}: client too slow")
                if queued <= self.dlt_buffer_tags:
                    return

    def _flush(self, final: DltAcquisition | None = None) -> None:
        targets = [final] if final is not None else list(self.acquisitions.values())
        deadline = time.monotonic() + (1.0 if final is not None else 0.0)
        for acq in targets:
            while acq.outbox:
                try:
                    acq.socket.send(acq.outbox[0][1], zmq.NOBLOCK)
                except zmq.Again:
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.001)
                    continue
                acq.outbox.popleft()


def _dlt_error(description: str) -> dict[str, dict[str, str]]:
    return {"error": {"description": description}}


def _dlt_options(words: list[str]) -> dict[str, str | bool] | str:
    """``--key value`` / ``--flag`` pairs; an error text for anything else."""
    opts: dict[str, str | bool] = {}
    i = 0
    known_flags = {"with-ref-index"}
    known = {"id", "address", "channel", "stream-port", "filename", "format"}
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            return f"unexpected argument '{word}'"
        key = word[2:]
        if key in known_flags:
            opts[key] = True
            i += 1
        elif key in known and i + 1 < len(words):
            opts[key] = words[i + 1]
            i += 2
        else:
            return f"unrecognised option '{word}'"
    return opts


def _floats(text: str, n: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != n:
        raise ValueError(f"{name} needs {n} comma-separated values, got {text!r}")
    return values


def serve(name: str, bench: Any = None,
          options: Mapping[str, str] | None = None) -> TimeControllerServer:
    """Factory for :mod:`qkdlab.mock_instruments.launcher`: an unstarted server.

    Options (``mock://idquantique/id1000?key=value``): ``model`` (ID1000/ID900),
    ``serial``, ``seed``, ``synthetic_rates_hz`` (5 comma-separated rates, START and
    inputs 1–4; used without a bench or with ``source=synthetic``),
    ``synthetic_pattern`` (random/periodic), ``pulse_amplitude_v``, ``max_rate_hz``,
    ``buffer_tags``, ``bucket_bin_ps``, ``realtime`` (1/0), ``dlt_buffer_tags``.
    """
    opts = dict(options or {})
    kwargs: dict[str, Any] = {}
    converters: dict[str, Any] = {
        "model": str, "serial": str, "seed": int, "synthetic_pattern": str,
        "pulse_amplitude_v": float, "max_rate_hz": float, "buffer_tags": int,
        "bucket_bin_ps": int,
    }
    for key, conv in converters.items():
        if key in opts:
            kwargs[key] = conv(opts.pop(key))
    if "synthetic_rates_hz" in opts:
        kwargs["synthetic_rates_hz"] = _floats(opts.pop("synthetic_rates_hz"), 5,
                                               "synthetic_rates_hz")
    if "realtime" in opts:
        kwargs["realtime"] = opts.pop("realtime").strip().lower() in ("1", "true", "yes", "on")
    source = opts.pop("source", "bench")
    if source not in ("bench", "synthetic"):
        raise ValueError(f"source must be bench or synthetic, not {source!r}")
    server_kwargs: dict[str, Any] = {}
    if "dlt_buffer_tags" in opts:
        server_kwargs["dlt_buffer_tags"] = int(opts.pop("dlt_buffer_tags"))
    if opts:
        raise ValueError(f"unknown Time Controller mock option(s): {', '.join(sorted(opts))}")
    device = MockTimeController(None if source == "synthetic" else bench, **kwargs)
    return TimeControllerServer(name, device, **server_kwargs)
