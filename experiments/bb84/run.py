"""A decoy-state BB84 acquisition run as a QCoDeS Measurement.

Alice's pattern generator and laser are configured and started, Bob's tagger streams
TagBlocks; every block goes to the raw tag file (linked from the dataset metadata)
and through the :class:`~qkdlab.experiments.bb84.processing.FrameProcessor`, whose
per-frame results are added to the dataset as they come.  However the run ends —
finished, aborted, interrupted with Ctrl-C or failed — the dataset is closed with its
``status`` in the metadata and every instrument is put in its safe state.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qkdlab.drivers.roles import BB84Transmitter, Laser, SafeStateCapable, TimeTagger
from qkdlab.experiments.bb84.processing import (
    BB84Settings,
    Estimate,
    FrameProcessor,
    FrameStats,
    RunTotals,
    estimate,
)
from qkdlab.experiments.bb84.rawtags import RawTagWriter
from qkdlab.experiments.bb84.secure_key import Distilled, distill, save_records
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

    def safe_state(self) -> list[str]:
        """Every instrument to its safe state; the failures (never raises)."""
        failures = []
        for instrument in [self.laser, self.transmitter, self.tagger, *self.others]:
            if instrument is None:
                continue
            try:
                instrument.safe_state()
            except Exception as err:  # go on with the others: light off matters most
                name = getattr(instrument, "name", type(instrument).__name__)
                log.exception("%s: safe_state failed", name)
                failures.append(f"{name}: {err}")
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
    duration_s: float = 0.0

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
        if self.key is not None:
            bob = self.key.bob.summary()
            out.update({k: bob[k] for k in ("secure_key_bits", "ec_efficiency",
                                            "ec_disclosed_bits", "pa_input_bits",
                                            "pa_output_bits", "auth_key_used_bits")})
            out["secure_key_rate_bps"] = (bob["secure_key_bits"] / self.duration_s
                                          if self.duration_s > 0 else 0.0)
            out["key_file"] = self.key.alice_key_file
            out["bob_key_file"] = self.key.bob_key_file
            out["keys_match"] = self.key.keys_match
            out["auth_pool"] = self.key.pool_source
            if not aborted and self.key.alice.aborted:
                aborted, reason = True, self.key.alice.reason
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
) -> BB84Result:
    """Run decoy-state BB84 for ``duration_s`` seconds of tagger time.

    Args:
        roles: transmitter, tagger, detector map (+ laser and others for safe state).
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
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0 s, got {duration_s}")
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
    raw_path = data_dir / "raw" / f"bb84-{run_id}.qkt"
    record_meta = {"run_id": run_id, "settings": asdict(settings), "duration_s": duration_s,
                   "detectors": {str(k): v for k, v in roles.detectors.channels.items()},
                   "marker_channel": roles.marker_channel,
                   # set when Alice's record is a pure function of the seed (offline replay)
                   "pattern_algorithm": getattr(roles.transmitter, "pattern_algorithm", None),
                   **(metadata or {})}

    meas = Measurement(exp=experiment, name="bb84")
    meas.register_custom_parameter("frame", label="Frame", unit="")
    for name, (label, unit) in FRAME_PARAMETERS.items():
        meas.register_custom_parameter(name, label=label, unit=unit, setpoints=("frame",))
    for ch in roles.detectors.channel_list:
        meas.register_custom_parameter(f"rate_ch{ch}", label=f"Tag rate, channel {ch}",
                                       unit="Hz", setpoints=("frame",))

    processor = FrameProcessor(settings, roles.detectors, roles.transmitter.record,
                               roles.marker_channel)
    status = "running"
    started = time.perf_counter()
    dataset_id: int | None = None
    guid: str | None = None
    key: Distilled | None = None
    try:
        with meas.run() as saver, RawTagWriter(raw_path, record_meta) as raw:
            dataset = saver.dataset
            dataset_id, guid = dataset.run_id, dataset.guid
            dataset.add_metadata("qkdlab_run", json.dumps(record_meta, sort_keys=True))
            dataset.add_metadata("raw_tags", str(raw_path))
            dataset.add_metadata("status", status)
            try:
                start_alice(roles, settings)
                with _progress(duration_s, progress) as bar:
                    stopped = False
                    blocks = _blocks(roles.tagger, duration_s)
                    for block in blocks:
                        raw.write(block)
                        bar.update(round(block.duration_ps * 1e-12, 3))
                        for stats in processor.feed(block):
                            _save_frame(saver, stats, settings, roles, publish, on_frame)
                        if stop_requested is not None and stop_requested():
                            stopped = True
                            blocks.close()  # ends the tagger's stream cleanly
                            break
                    for stats in processor.flush():
                        _save_frame(saver, stats, settings, roles, publish, on_frame)
                status = "stopped" if stopped else "completed"
            except KeyboardInterrupt:
                status = "interrupted"
                raise
            except SyncError as err:
                status = f"failed: timing synchronisation: {err}"
            except Exception as err:
                status = f"failed: {type(err).__name__}: {err}"
                raise
            finally:
                failures = roles.safe_state()
                if failures:
                    status += f"; safe state incomplete: {'; '.join(failures)}"
                dataset.add_metadata("status", status)
                dataset.add_metadata("raw_tags_blocks", str(raw.blocks))
                est = estimate(processor.totals, settings)
                dataset.add_metadata("qkdlab_result", json.dumps(_result_meta(est, processor)))
                if status == "completed" and not est.aborted:
                    # each party's sifted record, for post-processing in two processes
                    save_records(processor.totals, data_dir / "sifted", run_id)
                if distill_key and status == "completed" and not est.aborted:
                    key = distill(processor.totals, settings, data_dir / "keys", run_id)
                    dataset.add_metadata("qkdlab_key", json.dumps(
                        {"alice": key.alice.summary(), "bob": key.bob.summary(),
                         "key_file": key.alice_key_file, "auth_pool": key.pool_source}))
    finally:
        roles.safe_state()
    sol = processor.solution
    sync = ({"period_ps": sol.period_ps, "origin_ps": sol.origin_ps, "drift_ppm": sol.drift_ppm}
            if sol is not None else {})
    return BB84Result(run_id=run_id, status=status, settings=settings,
                      totals=processor.totals, estimate=estimate(processor.totals, settings),
                      dataset_id=dataset_id, dataset_guid=guid, database=str(database),
                      raw_tags=str(raw_path), sync=sync,
                      wall_time_s=time.perf_counter() - started, key=key,
                      duration_s=processor.totals.pulses / settings.rep_rate_hz)


def _result_meta(est: Estimate, processor: FrameProcessor) -> dict[str, Any]:
    tot = processor.totals
    return {"qber_z": _num(est.qber_z), "qber_x": _num(est.qber_x),
            "gains": [_num(g) for g in est.gains], "aborted": est.aborted,
            "abort_reason": est.abort_reason, "pulses": int(tot.pulses),
            "sifted": tot.sifted.tolist(), "errors": tot.errors.tolist(),
            "detected": tot.detected.tolist(), "frames": tot.frames}


def start_alice(roles: BB84Roles, settings: BB84Settings) -> None:
    """Restart Alice's pattern with ``settings`` and switch the light on at its operating point."""
    # stop first: the pattern's symbol counter restarts at 0 when it starts, which keeps
    # the pulse offset the sync must find small however long the transmitter ran before
    roles.transmitter.stop()
    roles.transmitter.configure(seed=settings.seed, p_z=settings.p_z,
                                p_signal=settings.p_signal, p_decoy=settings.p_decoy,
                                frame_pulses=settings.frame_pulses,
                                rep_rate_hz=settings.rep_rate_hz)
    if roles.laser is not None:
        parameters = getattr(roles.laser, "parameters", {})
        for name, value in roles.laser_settings.items():
            if name not in parameters:
                raise ValueError(f"laser has no parameter {name!r} (laser_settings)")
            parameters[name](value)
        if not roles.laser.is_on():
            roles.laser.output_on()
    roles.transmitter.start()


def _blocks(tagger: TimeTagger, duration_s: float) -> Generator[Any, None, None]:
    stream = tagger.stream(duration_s)
    try:
        yield from stream
    finally:
        close = getattr(stream, "close", None)
        if callable(close):
            close()


def _save_frame(saver: Any, stats: FrameStats, settings: BB84Settings, roles: BB84Roles,
                publish: Publisher | None, on_frame: Callable[[FrameStats], None] | None
                ) -> None:
    row = frame_values(stats, settings, roles.detectors)
    saver.add_result(("frame", stats.frame), *row.items())
    if publish is not None:
        try:
            publish(frame_message(stats, settings, roles.detectors))
        except Exception:  # a broken listener never stops the acquisition
            log.exception("live-stream publish failed")
    if on_frame is not None:
        on_frame(stats)
