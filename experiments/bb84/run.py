"""A decoy-state BB84 acquisition run as a QCoDeS Measurement.

Alice's pattern generator and laser are configured and started, Bob's tagger streams
TagBlocks; every block goes to the raw tag file (linked from the dataset metadata)
and through the :class:`~qkdlab.experiments.bb84.processing.FrameProcessor`, whose
per-frame results are added to the dataset as they come, each frame flushed to disk at
once.  Bob's detector units (if the station names them) are enabled at the start and
polled once per frame, with the laser and the transmitter's error queue; security
monitors (:class:`~qkdlab.experiments.bb84.monitoring.FrameMonitor`) see every frame.
Faults follow :class:`~qkdlab.experiments.bb84.monitoring.FaultPolicy` (the table is in
that module): a link error on the tagger stream is retried in a new segment
(:mod:`~qkdlab.experiments.bb84.segments`), anything else stops the run.  However the
run ends — finished, stopped, aborted, interrupted with Ctrl-C or failed — the dataset
is closed with its ``status`` in the metadata (``running`` while it runs, with a pid and
heartbeat: :mod:`~qkdlab.experiments.bb84.liveness`), every instrument is put in its
safe state, and only a completed run's sifted bits are saved and distilled into key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qkdlab.drivers.roles import (
    Attenuator,
    BB84Transmitter,
    Laser,
    SafeStateCapable,
    SinglePhotonDetector,
    TimeTagger,
)
from qkdlab.experiments.bb84.key_blocks import DEFAULT_BLOCK_BITS, KeyBlocks
from qkdlab.experiments.bb84.liveness import (
    HEARTBEAT_KEY,
    HEARTBEAT_PERIOD_S,
    PROCESS_KEY,
    process_record,
)
from qkdlab.experiments.bb84.monitoring import (
    FaultPolicy,
    FrameMonitor,
    InstrumentFaultError,
    MonitorAlarmError,
    describe,
    poll_detector,
    reading_units,
)
from qkdlab.experiments.bb84.processing import (
    BB84Settings,
    Estimate,
    FrameProcessor,
    FrameStats,
    RunTotals,
    estimate,
)
from qkdlab.experiments.bb84.rawtags import RawTagWriter
from qkdlab.experiments.bb84.secure_key import Distilled
from qkdlab.experiments.bb84.segments import Segment, merge_totals, raw_path, settings_for
from qkdlab.experiments.bb84.sync import DetectorMap, SyncError

log = logging.getLogger(__name__)

Publisher = Callable[[dict[str, Any]], None]


@dataclass
class BB84Roles:
    """The instruments a BB84 run uses, by role (never by vendor)."""

    transmitter: BB84Transmitter
    tagger: TimeTagger
    detectors: DetectorMap
    laser: Laser | None = None
    marker_channel: int | None = None
    others: Sequence[SafeStateCapable] = field(default_factory=list)
    laser_settings: dict[str, float] = field(default_factory=dict)
    """Laser parameters to set (through the driver's validators and ramps) before the
    light goes on, e.g. ``{"current": 0.014}``: a safe state ramps them down."""
    detector_units: Mapping[str, SinglePhotonDetector] = field(default_factory=dict)
    """Bob's detector instruments by name: enabled at run start, polled once per frame,
    ramped down by the safe state (the station's ``spd`` role)."""
    attenuator: Attenuator | None = None
    """Alice's variable attenuator: its safe state is its highest attenuation, so every
    run sets :attr:`attenuation_db` again before the light goes on."""
    attenuation_db: float | None = None
    """The attenuation at which the settings' μ values hold (dB): the ``mu``
    calibration record's, else the station's ``roles: attenuation_db``."""
    seeded_secrets: bool = False
    """A simulated bench (mock instruments launched by the station): Alice's
    post-processing randomness comes from the run seed and a fresh bench's first
    authentication key is derived from it, so a seeded run is reproducible bit for bit.
    Otherwise (real hardware) the randomness comes from the OS and the authentication
    key must be pre-shared (:mod:`~qkdlab.experiments.bb84.secure_key`)."""

    def safe_state(self) -> list[str]:
        """Every instrument to its safe state; the failures (never raises).

        Light off first, then the detectors' bias down, then the rest.
        """
        failures = []
        for instrument in [self.laser, *self.detector_units.values(), self.transmitter,
                           self.tagger, *self.others]:
            if instrument is None:
                continue
            try:
                instrument.safe_state()
            except Exception as err:  # go on with the others: light off matters most
                name = _name(instrument)
                log.exception("%s: safe_state failed", name)
                failures.append(str(InstrumentFaultError(name, describe(err))))
        return failures


@dataclass
class BB84Result:
    """What a run produced: figures, where the data went, and how it ended."""

    run_id: str
    status: str
    settings: BB84Settings
    totals: RunTotals
    estimate: Estimate
    dataset_id: int | None
    dataset_guid: str | None
    database: str
    raw_tags: str
    sync: dict[str, float]
    wall_time_s: float
    key: Distilled | None = None
    """The last key block's outcome (the only one unless the run was cut into blocks)."""
    duration_s: float = 0.0
    keys: list[Distilled] = field(default_factory=list)
    """Every key block's outcome, in order."""
    raw_tag_files: list[str] = field(default_factory=list)
    """Raw tag file of every segment, in order (one unless the tagger stream was retried)."""
    interruptions: list[dict[str, Any]] = field(default_factory=list)
    """Tagger stream failures that were retried: error, time acquired before, gap."""

    def summary(self) -> dict[str, Any]:
        """The figures of the run (the ``--json`` output)."""
        est, tot = self.estimate, self.totals
        bounds = est.bounds
        return {
            "run_id": self.run_id,
            "status": self.status,
            "pulses": int(tot.pulses),
            "detections": int(tot.detected.sum()),
            "sifted_bits": int(tot.sifted.sum()),
            "sifted_bits_z": int(tot.sifted[0].sum()),
            "qber_z": _num(est.qber_z),
            "qber_x": _num(est.qber_x),
            "gain_signal": _num(est.gains[0]),
            "gain_decoy": _num(est.gains[1]),
            "gain_vacuum": _num(est.gains[2]),
            "y1_lower": _num(bounds.y1_lower) if bounds else None,
            "e1_upper": _num(bounds.e1_upper) if bounds else None,
            "key_rate_per_pulse": _num(est.key_rate_per_pulse),
            "key_rate_bps": _num(est.key_rate_per_pulse * self.settings.rep_rate_hz),
            "sync_period_ps": _num(self.sync.get("period_ps", math.nan)),
            "sync_offset_ps": _num(self.sync.get("origin_ps", math.nan)),
            "sync_drift_ppm": _num(self.sync.get("drift_ppm", math.nan)),
            "unassigned": int(tot.unassigned),
            "lost_tags": int(tot.lost_tags),
            "dataset": self.dataset_id,
            "dataset_guid": self.dataset_guid,
            "database": self.database,
            "raw_tags": self.raw_tags,
            "raw_tags_segments": self.raw_tag_files or [self.raw_tags],
            "tagger_retries": len(self.interruptions),
            "tagger_gap_s": round(sum(i.get("gap_wall_s", 0.0) for i in self.interruptions),
                                  3),
            **self._key_summary(),
            "wall_time_s": round(self.wall_time_s, 3),
        }

    def _key_summary(self) -> dict[str, Any]:
        est = self.estimate
        reason = est.abort_reason if self.status == "completed" else self.status
        aborted = est.aborted or self.status != "completed"
        out: dict[str, Any] = {"secure_key_bits": 0, "secure_key_rate_bps": 0.0,
                               "ec_efficiency": None, "ec_disclosed_bits": 0,
                               "pa_input_bits": 0, "pa_output_bits": 0,
                               "auth_key_used_bits": 0, "key_file": None}
        blocks = self.keys or ([self.key] if self.key is not None else [])
        if blocks:
            bobs = [b.bob.summary() for b in blocks]
            for k in ("secure_key_bits", "ec_disclosed_bits", "pa_input_bits",
                      "pa_output_bits", "auth_key_used_bits"):
                out[k] = int(sum(b[k] or 0 for b in bobs))
            # f over the run: disclosed bits over the sum of each block's n·h(QBER)
            ideal = sum(b["ec_disclosed_bits"] / b["ec_efficiency"] for b in bobs
                        if b["ec_efficiency"])
            out["ec_efficiency"] = out["ec_disclosed_bits"] / ideal if ideal else None
            out["secure_key_rate_bps"] = (out["secure_key_bits"] / self.duration_s
                                          if self.duration_s > 0 else 0.0)
            last = blocks[-1]
            out["key_file"] = last.alice_key_file
            out["bob_key_file"] = last.bob_key_file
            out["key_files"] = [b.alice_key_file for b in blocks if b.alice_key_file]
            out["key_blocks"] = len(blocks)
            out["key_blocks_aborted"] = sum(b.alice.aborted for b in blocks)
            out["key_block_abort_reasons"] = sorted({b.alice.reason for b in blocks
                                                     if b.alice.aborted and b.alice.reason})
            out["keys_match"] = all(b.keys_match for b in blocks if not b.alice.aborted)
            out["auth_pool"] = last.pool_source
            # the run yields no key only when every block aborted (a short last block
            # may fail the finite-key terms while the whole blocks before it gave key)
            if not aborted and all(b.alice.aborted for b in blocks):
                aborted, reason = True, last.alice.reason
        out.update({"aborted": aborted, "abort_reason": reason if aborted else None})
        return out


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


FRAME_PARAMETERS: dict[str, tuple[str, str]] = {
    # name: (label, unit)
    "pulses": ("Pulses sent", ""),
    "rate_total": ("Detector tag rate, all channels", "Hz"),
    "gain_signal": ("Gain, signal", ""),
    "gain_decoy": ("Gain, decoy", ""),
    "gain_vacuum": ("Gain, vacuum", ""),
    "qber_z": ("QBER, Z basis", ""),
    "qber_x": ("QBER, X basis", ""),
    "sifted_bits": ("Sifted bits", ""),
    "unassigned": ("Detections outside the window", ""),
    "lost_tags": ("Tags lost by the tagger", ""),
    "sync_period_ps": ("Pulse period on the tagger clock", "ps"),
    "sync_offset_ps": ("Tagger time of pulse 0", "ps"),
    "sync_drift_ppm": ("Tagger frequency error", "ppm"),
}


def frame_message(stats: FrameStats, settings: BB84Settings,
                  detectors: DetectorMap) -> dict[str, Any]:
    """The live-stream message of one frame: the dataset row plus histograms and counts."""
    return {
        "frame": stats.frame,
        **frame_values(stats, settings, detectors),
        "qber_by_intensity": [
            _num(sum(stats.errors[b][k] for b in (0, 1))
                 / max(1, sum(stats.sifted[b][k] for b in (0, 1))))
            for k in range(3)],
        "duration_s": stats.duration_s,
        "histogram": stats.histogram,
        "histogram_range_ps": [-stats.sync_period_ps / 2, stats.sync_period_ps / 2],
        "window_ps": settings.acceptance_ps,
        "channels": detectors.channel_list,
    }


def frame_values(stats: FrameStats, settings: BB84Settings,
                 detectors: DetectorMap) -> dict[str, float]:
    """The dataset row of one frame (and the live-stream message body)."""
    probs = settings.intensity_probs
    row: dict[str, float] = {
        "pulses": float(stats.pulses),
        "rate_total": sum(stats.rate_cps(ch) for ch in detectors.channel_list),
        "gain_signal": stats.gain(0, probs),
        "gain_decoy": stats.gain(1, probs),
        "gain_vacuum": stats.gain(2, probs),
        "qber_z": stats.qber(0),
        "qber_x": stats.qber(1),
        "sifted_bits": float(np.sum(stats.sifted)),
        "unassigned": float(stats.unassigned),
        "lost_tags": float(stats.lost_tags),
        "sync_period_ps": stats.sync_period_ps,
        "sync_offset_ps": stats.sync_origin_ps,
        "sync_drift_ppm": stats.sync_drift_ppm,
    }
    for ch in detectors.channel_list:
        row[f"rate_ch{ch}"] = stats.rate_cps(ch)
    return row


def _progress(total_s: float, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=round(total_s, 3), unit="s", desc="BB84", disable=not enabled,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]")


MIN_REMAINING_S = 1e-6
"""Less tagger time than this left after a retried segment: the run is done (s)."""


def run_bb84(
    roles: BB84Roles,
    settings: BB84Settings,
    *,
    duration_s: float,
    data_dir: str | Path,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    publish: Publisher | None = None,
    on_frame: Callable[[FrameStats], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    distill_key: bool = True,
    monitors: Sequence[FrameMonitor] = (),
    fault_policy: FaultPolicy | None = None,
    key_block_bits: int | None = DEFAULT_BLOCK_BITS,
) -> BB84Result:
    """Run decoy-state BB84 for ``duration_s`` seconds of tagger time.

    A run that an instrument fault or a monitor's alarm stops returns normally, its
    ``status`` saying why (``failed: <instrument>: <what>``, ``aborted: <reason>``);
    Ctrl-C and errors of the code itself (e.g. of ``on_frame``) are re-raised after the
    dataset is marked and the instruments are safe.

    Args:
        roles: transmitter, tagger, detector map (+ laser, detector units and others
            for safe state).
        settings: what Alice sends and how tags are processed.
        duration_s: acquisition time (s).
        data_dir: holds the QCoDeS database (``qkdlab.db``) and ``raw/`` tag files.
        metadata: extra run metadata (station, calibration ids...).
        progress: show a progress bar on stderr.
        publish: called with a small dict per frame (the live stream); must not block.
        on_frame: called with each frame's results (e.g. to inject faults in tests).
        stop_requested: polled after every block; True ends the run early but cleanly
            (status ``stopped``), e.g. a Stop button in the GUI.
        distill_key: post-process a completed, non-aborted run into a secure key
            (keys in ``data_dir/keys/alice`` and ``.../bob``).
        monitors: checks called after every frame with its stats and the detector
            readings; the first alarm aborts the run (no key).
        fault_policy: which faults are retried (default :class:`FaultPolicy()`).
        key_block_bits: sifted key-basis bits per key block, distilled while the run
            goes on so memory stays flat (:mod:`~qkdlab.experiments.bb84.key_blocks`);
            ``None``: the whole run is one block.
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0 s, got {duration_s}")
    for monitor in monitors:
        if not isinstance(monitor, FrameMonitor):
            raise TypeError(f"monitors: {monitor!r} has no check(stats, detectors) method")
    from qcodes.dataset import (
        Measurement,
        initialise_or_create_database_at,
        load_or_create_experiment,
    )

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    database = data_dir / "qkdlab.db"
    initialise_or_create_database_at(database)
    experiment = load_or_create_experiment("bb84", sample_name="qkd-link")
    run_id = uuid.uuid4().hex[:12]
    record_meta = {"run_id": run_id, "settings": asdict(settings), "duration_s": duration_s,
                   "detectors": {str(k): v for k, v in roles.detectors.channels.items()},
                   "marker_channel": roles.marker_channel,
                   "detector_units": list(roles.detector_units),
                   # set when Alice's record is a pure function of the seed (offline replay)
                   "pattern_algorithm": getattr(roles.transmitter, "pattern_algorithm", None),
                   "seeded_secrets": roles.seeded_secrets,
                   **(metadata or {})}
    run = _Acquisition(roles, settings, data_dir, run_id, record_meta,
                       FaultPolicy() if fault_policy is None else fault_policy,
                       tuple(monitors), publish, on_frame,
                       KeyBlocks(settings, data_dir, run_id, key_block_bits, distill_key,
                                 seeded_secrets=roles.seeded_secrets))
    meas = Measurement(exp=experiment, name="bb84")
    run.register(meas)

    status = "running"
    started = time.perf_counter()
    dataset_id: int | None = None
    guid: str | None = None
    keys: list[Distilled] = []
    safe_done = False
    try:
        with meas.run() as saver:
            dataset = saver.dataset
            dataset_id, guid = dataset.run_id, dataset.guid
            run.saver = saver
            try:
                run.begin()
                run.start_instruments()
                stopped = run.acquire(duration_s, progress, stop_requested)
                status = "stopped" if stopped else "completed"
            except KeyboardInterrupt:
                status = "interrupted"
                raise
            except SyncError as err:
                status = f"failed: timing synchronisation: {err}"
            except InstrumentFaultError as err:
                status = f"failed: {err}"
            except MonitorAlarmError as err:
                status = f"aborted: {err}"
            except Exception as err:
                status = f"failed: {type(err).__name__}: {err}"
                raise
            finally:
                run.close_raw()
                failures = roles.safe_state()
                safe_done = True
                if failures:
                    status += f"; safe state incomplete: {'; '.join(failures)}"
                totals = run.totals()
                est = estimate(totals, settings)
                try:
                    # the last, partial key block: distilled if the run completed, else
                    # dropped; whole blocks cut during the run are kept either way.  Each
                    # block's sifted records are in sifted/ (for 'qkdlab alice'/'bob').
                    run.beat()
                    keys = run.keys.finish(run.segment_totals(),
                                           status == "completed" and not est.aborted)
                    if keys:
                        dataset.add_metadata("qkdlab_key", json.dumps(
                            [{"block": i, "alice": k.alice.summary(), "bob": k.bob.summary(),
                              "key_file": k.alice_key_file, "auth_pool": k.pool_source}
                             for i, k in enumerate(keys)]))
                except Exception as err:
                    status = f"failed: post-processing: {type(err).__name__}: {err}"
                    raise
                finally:
                    # the status goes last: "completed" means every file it names is whole
                    run.finish(status, est)
    finally:
        if not safe_done:  # the dataset could not even be opened
            roles.safe_state()
    totals = run.totals()
    sol = run.solution()
    sync = ({"period_ps": sol.period_ps, "origin_ps": sol.origin_ps, "drift_ppm": sol.drift_ppm}
            if sol is not None else {})
    return BB84Result(run_id=run_id, status=status, settings=settings,
                      totals=totals, estimate=estimate(totals, settings),
                      dataset_id=dataset_id, dataset_guid=guid, database=str(database),
                      raw_tags=str(raw_path(data_dir, run_id, 0)), sync=sync,
                      wall_time_s=time.perf_counter() - started,
                      key=keys[-1] if keys else None, keys=keys,
                      duration_s=totals.pulses / settings.rep_rate_hz,
                      raw_tag_files=[str(seg.raw.path) for seg in run.segments],
                      interruptions=list(run.interruptions))


class _Acquisition:
    """The state of one run between its start and its end: segments, dataset, readings."""

    def __init__(self, roles: BB84Roles, settings: BB84Settings, data_dir: Path, run_id: str,
                 record_meta: dict[str, Any], policy: FaultPolicy,
                 monitors: tuple[FrameMonitor, ...], publish: Publisher | None,
                 on_frame: Callable[[FrameStats], None] | None, keys: KeyBlocks) -> None:
        self.roles = roles
        self.settings = settings
        self.data_dir = data_dir
        self.run_id = run_id
        self.record_meta = record_meta
        self.policy = policy
        self.monitors = monitors
        self.publish = publish
        self.on_frame = on_frame
        self.keys = keys
        self.segments: list[Segment] = []
        self.interruptions: list[dict[str, Any]] = []
        self.readings: dict[str, dict[str, float]] = {}
        """Latest readings of each detector unit (what monitors see)."""
        self.frames = 0
        self.saver: Any = None
        self._last_beat = -math.inf
        self._failing = False  # a fatal fault: save what is done, touch no instrument
        self._gap_started: float | None = None

    # -- dataset ---------------------------------------------------------------------
    def register(self, meas: Any) -> None:
        """Declare the dataset's parameters: frame figures, rates, detector readings."""
        meas.register_custom_parameter("frame", label="Frame", unit="")
        for name, (label, unit) in FRAME_PARAMETERS.items():
            meas.register_custom_parameter(name, label=label, unit=unit, setpoints=("frame",))
        for ch in self.roles.detectors.channel_list:
            meas.register_custom_parameter(f"rate_ch{ch}", label=f"Tag rate, channel {ch}",
                                           unit="Hz", setpoints=("frame",))
        meas.register_custom_parameter("segment", label="Tagger stream segment", unit="",
                                       setpoints=("frame",))
        for unit_name, unit in self.roles.detector_units.items():
            for key, si in _reading_keys(unit).items():
                meas.register_custom_parameter(f"{unit_name}_{key}",
                                               label=f"{unit_name} {key}", unit=si,
                                               setpoints=("frame",))
        # frames are flushed one by one (_frame); this only bounds the readings rows
        meas.write_period = 1.0

    def begin(self) -> None:
        """Metadata of a starting run (status ``running``, process, heartbeat); segment 0."""
        dataset = self.saver.dataset
        dataset.add_metadata("qkdlab_run", json.dumps(self.record_meta, sort_keys=True))
        dataset.add_metadata("raw_tags", str(raw_path(self.data_dir, self.run_id, 0)))
        dataset.add_metadata("status", "running")
        dataset.add_metadata(PROCESS_KEY, json.dumps(process_record()))
        self._heartbeat(force=True)
        self.segments.append(self._open_segment(0))

    def finish(self, status: str, est: Estimate) -> None:
        """The end of the run in the metadata (status last: it marks the run finished)."""
        dataset = self.saver.dataset
        blocks = sum(seg.blocks for seg in self.segments)
        dataset.add_metadata("raw_tags_blocks", str(blocks))
        dataset.add_metadata("raw_tags_segments", json.dumps(
            [{"path": str(seg.raw.path), "blocks": seg.blocks, "frames": seg.frames}
             for seg in self.segments]))
        dataset.add_metadata("tagger_interruptions", json.dumps(self.interruptions))
        dataset.add_metadata("qkdlab_result", json.dumps(_result_meta(est, self.totals())))
        self._heartbeat(force=True)
        dataset.add_metadata("status", status)

    def beat(self) -> None:
        """Refresh the heartbeat now (before a long step that emits no frame)."""
        self._heartbeat(force=True)

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_beat >= HEARTBEAT_PERIOD_S:
            self.saver.dataset.add_metadata(HEARTBEAT_KEY, f"{time.time():.3f}")
            self._last_beat = now

    # -- instruments -----------------------------------------------------------------
    def start_instruments(self) -> None:
        """Detectors to their operating point, then Alice's light and pattern."""
        start_bob(self.roles)
        start_alice(self.roles, self.segments[0].settings)

    def close_raw(self) -> None:
        for seg in self.segments:
            seg.raw.close()

    # -- acquisition -----------------------------------------------------------------
    def acquire(self, duration_s: float, progress: bool,
                stop_requested: Callable[[], bool] | None) -> bool:
        """Stream, write and process until ``duration_s`` of tags; True if stopped early."""
        acquired_ps = 0
        with _progress(duration_s, progress) as bar:
            while True:
                remaining = duration_s - acquired_ps * 1e-12
                if remaining < MIN_REMAINING_S:
                    return False
                failure: Exception | None = None
                # closed however the loop ends (a fault or an alarm raised from a frame
                # included): the tagger's stream stops now, not when it is collected
                with contextlib.closing(_blocks(self.roles.tagger, remaining)) as blocks:
                    while True:
                        try:
                            block = next(blocks)
                        except StopIteration:
                            break
                        except Exception as err:  # the tagger stream failed: policy decides
                            failure = err
                            break
                        self._block(block)
                        acquired_ps += block.duration_ps
                        bar.update(round(block.duration_ps * 1e-12, 3))
                        if stop_requested is not None and stop_requested():
                            blocks.close()  # ends the tagger's stream cleanly
                            self._flush_segment()
                            return True
                if failure is None:
                    self._flush_segment()
                    return False
                self._retry_or_raise(failure, acquired_ps * 1e-12)

    def _block(self, block: Any) -> None:
        seg = self.segments[-1]
        seg.raw.write(block)
        seg.blocks += 1
        if self._gap_started is not None:  # the first block after a retried failure
            self.interruptions[-1]["gap_wall_s"] = round(time.monotonic() - self._gap_started,
                                                         3)
            self._gap_started = None
        for stats in seg.processor.feed(block):
            self._frame(seg, stats)

    def _flush_segment(self, tolerant: bool = False) -> None:
        """Process what the current segment buffered; SyncError ignored if ``tolerant``."""
        seg = self.segments[-1]
        try:
            frames = seg.processor.flush()
        except SyncError:
            if not tolerant:
                raise
            log.warning("segment %d: %d blocks never synchronised", seg.index,
                        seg.unprocessed_blocks)
            return
        for stats in frames:
            self._frame(seg, stats)

    def _retry_or_raise(self, err: Exception, acquired_s: float) -> None:
        """A failed tagger stream: a new segment if the policy allows, else a fault."""
        name = _name(self.roles.tagger)
        retries = len(self.interruptions)
        if not self.policy.transient(err) or retries >= self.policy.tagger_retries:
            given_up = (f" (gave up after {retries} retr{'y' if retries == 1 else 'ies'})"
                        if self.policy.transient(err) and retries else "")
            self._failing = True
            self._flush_segment(tolerant=True)
            raise InstrumentFaultError(name, f"{describe(err)}{given_up}") from err
        log.warning("%s: stream failed after %.3f s (%s); retry %d of %d in a new segment",
                    name, acquired_s, describe(err), retries + 1, self.policy.tagger_retries)
        self._gap_started = time.monotonic()
        self._flush_segment(tolerant=True)
        old = self.segments[-1]
        old.raw.close()
        time.sleep(self.policy.retry_wait_s)
        reconnect = getattr(self.roles.tagger, "reconnect", None)
        if callable(reconnect):
            try:
                reconnect()
            except Exception as again:  # the next stream start reports it, counted
                log.warning("%s: reconnect failed: %s", name, describe(again))
        seg = self._open_segment(old.index + 1)
        self.segments.append(seg)
        self.interruptions.append({
            "segment": seg.index, "error": str(InstrumentFaultError(name, describe(err))),
            "acquired_before_s": round(acquired_s, 6), "frames_before": self.frames,
            "unprocessed_blocks": old.unprocessed_blocks, "raw_tags": str(seg.raw.path)})
        # Alice's pattern restarts at pulse 0 with this segment's seed (the laser stays
        # on): the new stream is synchronised afresh, nothing is bridged across the gap
        start_alice(self.roles, seg.settings)

    def _open_segment(self, index: int) -> Segment:
        settings = settings_for(self.settings, index)
        meta = {**self.record_meta, "settings": asdict(settings), "segment": index}
        processor = FrameProcessor(settings, self.roles.detectors,
                                   self.roles.transmitter.record, self.roles.marker_channel)
        return Segment(index, settings, processor,
                       RawTagWriter(raw_path(self.data_dir, self.run_id, index), meta))

    # -- per frame -------------------------------------------------------------------
    def _frame(self, seg: Segment, stats: FrameStats) -> None:
        """Save one frame (flushed to disk), then poll, check and monitor."""
        seg.frames += 1
        stats = dataclasses.replace(stats, frame=self.frames)
        self.frames += 1
        row = frame_values(stats, self.settings, self.roles.detectors)
        self.saver.add_result(("frame", stats.frame), ("segment", seg.index), *row.items())
        self.saver.flush_data_to_database()
        if self.publish is not None:
            try:
                self.publish(frame_message(stats, self.settings, self.roles.detectors))
            except Exception:  # a broken listener never stops the acquisition
                log.exception("live-stream publish failed")
        if self.on_frame is not None:
            self.on_frame(stats)
        if self._failing:
            return
        self._poll(stats.frame)
        self._check_health()
        self._heartbeat()
        for monitor in self.monitors:
            reason = monitor.check(stats, self.readings)
            if reason is not None:
                raise MonitorAlarmError(f"{type(monitor).__name__}: {reason}")
        # a frame that passed every check counts towards the next key block
        self.keys.on_frame(stats, self.segment_totals())

    def _poll(self, frame: int) -> None:
        """Read every detector unit once; the readings go to the dataset and the monitors."""
        values: list[tuple[str, float]] = []
        for name, unit in self.roles.detector_units.items():
            try:
                readings = poll_detector(unit)
            except Exception as err:
                raise InstrumentFaultError(name, describe(err)) from err
            self.readings[name] = readings
            values.extend((f"{name}_{key}", value) for key, value in readings.items())
        if values:
            self.saver.add_result(("frame", frame), *values)

    def _check_health(self) -> None:
        """The light is still on and the transmitter's error queue is empty."""
        laser = self.roles.laser
        if laser is not None:
            with _fault(_name(laser)):
                on = laser.is_on()
            if not on:
                raise InstrumentFaultError(_name(laser), "emission stopped during the run "
                                      "(interlock opened or output switched off)")
        check = getattr(self.roles.transmitter, "check_errors", None)
        if callable(check):
            with _fault(_name(self.roles.transmitter)):
                check()

    # -- results ---------------------------------------------------------------------
    def totals(self) -> RunTotals:
        return merge_totals(self.segment_totals())

    def segment_totals(self) -> list[RunTotals]:
        return [seg.processor.totals for seg in self.segments]

    def solution(self) -> Any:
        solved = [seg.processor.solution for seg in self.segments
                  if seg.processor.solution is not None]
        return solved[-1] if solved else None


def _reading_keys(unit: Any) -> dict[str, str]:
    """Reading keys a detector unit gives (as :func:`poll_detector`) and their units."""
    from qkdlab.experiments.bb84.monitoring import DETECTOR_READINGS

    parameters = getattr(unit, "parameters", {})
    keys = {"count_rate_cps": 0.0, **{key: 0.0 for par, key, _ in DETECTOR_READINGS
                                      if par in parameters}}
    return reading_units(keys)


def _name(instrument: Any) -> str:
    return str(getattr(instrument, "name", type(instrument).__name__))


@contextlib.contextmanager
def _fault(name: str) -> Iterator[None]:
    """Errors of the instrument ``name`` become :class:`InstrumentFaultError` naming it."""
    try:
        yield
    except InstrumentFaultError:
        raise
    except Exception as err:
        raise InstrumentFaultError(name, describe(err)) from err


def _result_meta(est: Estimate, tot: RunTotals) -> dict[str, Any]:
    return {"qber_z": _num(est.qber_z), "qber_x": _num(est.qber_x),
            "gains": [_num(g) for g in est.gains], "aborted": est.aborted,
            "abort_reason": est.abort_reason, "pulses": int(tot.pulses),
            "sifted": tot.sifted.tolist(), "errors": tot.errors.tolist(),
            "detected": tot.detected.tolist(), "frames": tot.frames}


def start_bob(roles: BB84Roles) -> None:
    """Every detector unit to its operating point (bias ramped up, regulation on)."""
    for name, unit in roles.detector_units.items():
        with _fault(name):
            unit.enable()


def start_alice(roles: BB84Roles, settings: BB84Settings) -> None:
    """Restart Alice's pattern with ``settings`` and switch the light on at its operating point.

    An instrument's error is raised as :class:`InstrumentFaultError` naming it.
    """
    transmitter = _name(roles.transmitter)
    # stop first: the pattern's symbol counter restarts at 0 when it starts, which keeps
    # the pulse offset the sync must find small however long the transmitter ran before
    with _fault(transmitter):
        roles.transmitter.stop()
        roles.transmitter.configure(seed=settings.seed, p_z=settings.p_z,
                                    p_signal=settings.p_signal, p_decoy=settings.p_decoy,
                                    frame_pulses=settings.frame_pulses,
                                    rep_rate_hz=settings.rep_rate_hz)
    if roles.attenuator is not None and roles.attenuation_db is not None:
        # the μ values of the settings hold at this attenuation only (a safe state left
        # the attenuator at its highest setting)
        with _fault(_name(roles.attenuator)):
            roles.attenuator.set_attenuation_db(roles.attenuation_db)
    if roles.laser is not None:
        parameters = getattr(roles.laser, "parameters", {})
        for name in roles.laser_settings:
            if name not in parameters:
                raise ValueError(f"laser has no parameter {name!r} (laser_settings)")
        with _fault(_name(roles.laser)):
            for name, value in roles.laser_settings.items():
                parameters[name](value)
            if not roles.laser.is_on():
                roles.laser.output_on()
    with _fault(transmitter):
        roles.transmitter.start()


def _blocks(tagger: TimeTagger, duration_s: float) -> Generator[Any, None, None]:
    stream = tagger.stream(duration_s)
    try:
        yield from stream
    finally:
        close = getattr(stream, "close", None)
        if callable(close):
            close()
