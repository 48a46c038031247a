"""Instrument faults in the middle of a BB84 run on the mock bench (issue 9, item 1).

Faults are injected through the mock servers' ``faults`` (FaultInjector) from the
run's ``on_frame`` hook, so they strike while tags stream.  The station is the packaged
mock station with shorter link timeouts (a derived copy), so that a dead link is
noticed in a second rather than five.  Every test ends with a run on the same station
that must complete: a fault never leaves the bench unusable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ruamel.yaml

from qkdlab.cli import DEFAULT_MOCK_STATION, bb84_settings
from qkdlab.experiments.bb84.monitoring import (
    FaultPolicy,
    InstrumentFaultError,
    describe,
    is_link_error,
    poll_detector,
)
from qkdlab.experiments.bb84.processing import FrameStats
from qkdlab.experiments.bb84.rawtags import RawTagReader
from qkdlab.experiments.bb84.reprocess import reprocess
from qkdlab.experiments.bb84.run import BB84Result, run_bb84
from qkdlab.experiments.bb84.secure_key import block_id, load_record
from qkdlab.roles import bb84_roles
from qkdlab.station import LoadedStation, open_station

SPADS = ("spad1", "spad2", "spad3", "spad4")
TAGGER_TIMEOUT_S = 1.5
SPAD_TIMEOUT_S = 0.5


def fast_station(tmp_path: Path) -> Path:
    """The mock station with short timeouts: tagger 1.5 s, SPADs 0.5 s (default 5 s)."""
    yaml = ruamel.yaml.YAML(typ="rt")
    data: Any = yaml.load(DEFAULT_MOCK_STATION.read_text())
    instruments = data["instruments"]
    instruments["tagger"].setdefault("init", {})["timeout"] = TAGGER_TIMEOUT_S
    for name in SPADS:
        instruments[name].setdefault("init", {})["timeout"] = SPAD_TIMEOUT_S
    path = tmp_path / "mock_fast.yaml"
    with path.open("w") as f:
        yaml.dump(data, f)
    return path


@contextmanager
def bench(tmp_path: Path) -> Iterator[LoadedStation]:
    with open_station(fast_station(tmp_path), seed=11) as loaded:
        for name in SPADS:  # the driver's reconnect-and-retry waits this long, not 3 s
            loaded.instruments[name].reconnect_timeout_s = SPAD_TIMEOUT_S  # type: ignore[attr-defined]
        yield loaded


def run(loaded: LoadedStation, data_dir: Path, duration_s: float = 0.4,
        **kw: Any) -> BB84Result:
    kw.setdefault("distill_key", False)
    return run_bb84(bb84_roles(loaded), bb84_settings(DEFAULT_MOCK_STATION, seed=5),
                    duration_s=duration_s, data_dir=data_dir, progress=False, **kw)


def at_frame(n: int, action: Callable[[], None]) -> Callable[[FrameStats], None]:
    def hook(stats: FrameStats) -> None:
        if stats.frame == n:
            action()
    return hook


def faults(loaded: LoadedStation, name: str) -> Any:
    assert loaded.launcher is not None
    return loaded.launcher.servers[name].faults


def dataset(result: BB84Result) -> Any:
    """The run's dataset, read from its own database file."""
    from qcodes.dataset import load_by_guid
    from qcodes.dataset.sqlite.database import connect

    assert result.dataset_guid is not None
    return load_by_guid(result.dataset_guid, conn=connect(result.database))


def metadata(result: BB84Result) -> Mapping[str, Any]:
    return dict(dataset(result).metadata)


def frames_on_disk(result: BB84Result, parameter: str = "qber_z") -> np.ndarray:
    data = dataset(result).get_parameter_data(parameter)
    return np.asarray(data[parameter]["frame"])


def values_on_disk(result: BB84Result, parameter: str) -> np.ndarray:
    data = dataset(result).get_parameter_data(parameter)
    return np.asarray(data[parameter][parameter])


def assert_safe(loaded: LoadedStation, *, unreachable: tuple[str, ...] = ()) -> None:
    """Light off; every reachable SPAD at 0 V with its regulation stopped, not detecting."""
    assert loaded.launcher is not None
    bench_model = loaded.launcher.bench
    assert not bench_model.alice.laser_on
    for i, name in enumerate(SPADS):
        spad = loaded.launcher.servers[name].instrument
        if name in unreachable:
            continue
        assert spad.bias_v == 0.0, name
        assert not spad.running, name
        assert not bench_model.bob.detectors[i].enabled, name


def assert_no_key_material(data_dir: Path) -> None:
    """No sifted record and no key left by the run."""
    assert not (data_dir / "sifted").exists() or not list((data_dir / "sifted").iterdir())
    for side in ("alice", "bob"):
        store = data_dir / "keys" / side
        assert not store.exists() or not list(store.iterdir())


def assert_next_run_works(loaded: LoadedStation, data_dir: Path) -> BB84Result:
    for name in loaded.launcher.servers:  # type: ignore[union-attr]
        faults(loaded, name).clear()
    result = run(loaded, data_dir / "next")
    assert result.status == "completed", result.status
    assert result.summary()["qber_z"] < 0.03  # synchronised and sifted as usual
    return result


def test_a_dropped_tagger_link_is_retried_in_a_new_segment(tmp_path: Path) -> None:
    with bench(tmp_path) as loaded:
        # refused longer than the tagger's timeout: the stream itself fails
        result = run(loaded, tmp_path, duration_s=0.8,
                     fault_policy=FaultPolicy(retry_wait_s=0.1),
                     on_frame=at_frame(1, lambda: faults(loaded, "tagger").drop_connection(
                         refuse_for_s=TAGGER_TIMEOUT_S + 0.5)))
        assert_safe(loaded)
        assert_next_run_works(loaded, tmp_path)
    summary = result.summary()
    assert result.status == "completed"
    (gap,) = result.interruptions
    assert gap["error"].startswith("tagger: no reply")
    assert gap["gap_wall_s"] > 0
    assert summary["tagger_gap_s"] == gap["gap_wall_s"]
    assert metadata(result)["status"] == "completed"
    assert json.loads(metadata(result)["tagger_interruptions"]) == result.interruptions
    # the remaining tagger time was acquired after the gap: 0.8 s of pulses in all
    assert result.totals.pulses == pytest.approx(0.8 * 100e6, rel=0.01)
    # two raw files, each replayable alone: its header holds its own pattern seed
    first, second = summary["raw_tags_segments"]
    seeds = [RawTagReader(p).metadata["settings"]["seed"] for p in (first, second)]
    assert seeds[0] == 5
    assert seeds[1] != 5
    again = [reprocess(p, whole_run=False).totals for p in (first, second)]
    np.testing.assert_array_equal(again[0].sifted + again[1].sifted, result.totals.sifted)
    np.testing.assert_array_equal(again[0].errors + again[1].errors, result.totals.errors)
    # the new segment was synchronised afresh: its frames have the usual QBER
    assert again[0].frames >= 1
    assert again[1].frames >= 1
    assert again[1].qber(0) < 0.03
    assert again[1].qber(1) < 0.03
    # frames keep one numbering across segments; pulse indices stay unique and ordered
    np.testing.assert_array_equal(frames_on_disk(result), np.arange(result.totals.frames))
    segment = values_on_disk(result, "segment")
    assert set(segment.tolist()) == {0, 1}
    assert np.all(np.diff(segment) >= 0)
    # (the sifted records left memory with the run's key block: they are in sifted/)
    pulses = load_record(tmp_path / "sifted" / f"{block_id(result.run_id, 0)}-alice.npz").pulse
    assert pulses.size > 1000
    assert np.all(np.diff(pulses) > 0)


def test_tagger_garbage_exhausts_the_retries_and_fails_the_run_cleanly(tmp_path: Path) -> None:
    with bench(tmp_path) as loaded:
        result = run(loaded, tmp_path, duration_s=0.8, fault_policy=FaultPolicy(
            tagger_retries=1, retry_wait_s=0.1), on_frame=at_frame(1, lambda: faults(
                loaded, "tagger").send_garbage(-1)))
        assert_safe(loaded)
        assert_next_run_works(loaded, tmp_path)
    assert result.status.startswith("failed: tagger: garbage reply")
    assert "(gave up after 1 retry)" in result.status
    assert len(result.interruptions) == 1
    meta = metadata(result)
    assert meta["status"] == result.status
    # every frame completed before the fault is on disk, whole
    frames = frames_on_disk(result)
    assert frames.size == result.totals.frames >= 2
    for parameter in ("gain_signal", "sifted_bits", "rate_ch1", "spad1_count_rate_cps"):
        np.testing.assert_array_equal(frames_on_disk(result, parameter), frames)
    assert json.loads(meta["qkdlab_result"])["frames"] == frames.size
    assert_no_key_material(tmp_path)
    assert result.summary()["secure_key_bits"] == 0
    assert result.key is None


def test_a_silent_or_slow_detector_or_a_garbling_transmitter_stops_the_run(
        tmp_path: Path) -> None:
    with bench(tmp_path) as loaded:
        silent = run(loaded, tmp_path / "silent", on_frame=at_frame(
            1, lambda: faults(loaded, "spad3").silence()))
        # the unit that stopped answering cannot be ramped down: recorded, not raised
        assert_safe(loaded, unreachable=("spad3",))
        faults(loaded, "spad3").clear()
        slow = run(loaded, tmp_path / "slow", on_frame=at_frame(
            1, lambda: faults(loaded, "spad2").delay_replies(2 * SPAD_TIMEOUT_S)))
        assert_safe(loaded, unreachable=("spad2",))
        faults(loaded, "spad2").clear()
        garbled = run(loaded, tmp_path / "garbled", on_frame=at_frame(
            1, lambda: faults(loaded, "pattern").send_garbage(1)))
        assert_safe(loaded)
        assert_next_run_works(loaded, tmp_path)
    assert silent.status.startswith("failed: spad3: no reply in time")
    assert "; safe state incomplete: spad3: " in silent.status
    assert slow.status.startswith("failed: spad2: no reply in time")
    assert "; safe state incomplete: spad2: " in slow.status
    assert garbled.status == ("failed: pattern: garbled reply b'\\x15#?\\xfe\\xff garbage "
                              "\\x00\\x07' (ordinal not in range(128))")
    for result, where in ((silent, "silent"), (slow, "slow"), (garbled, "garbled")):
        assert metadata(result)["status"] == result.status
        assert frames_on_disk(result).size == result.totals.frames >= 2
        assert_no_key_material(tmp_path / where)


class Recorder:
    """A monitor that keeps what it was shown and raises an alarm at one frame."""

    def __init__(self, alarm_at: int) -> None:
        self.alarm_at = alarm_at
        self.seen: list[tuple[FrameStats, dict[str, dict[str, float]]]] = []

    def check(self, stats: FrameStats, detectors: Mapping[str, Mapping[str, float]]
              ) -> str | None:
        self.seen.append((stats, {k: dict(v) for k, v in detectors.items()}))
        return "count rates look blinded" if stats.frame == self.alarm_at else None


def test_a_monitor_alarm_aborts_the_run_with_the_detector_readings_it_saw(
        tmp_path: Path) -> None:
    monitor = Recorder(alarm_at=1)
    with bench(tmp_path) as loaded:
        result = run(loaded, tmp_path, duration_s=0.8, distill_key=True, monitors=[monitor])
        assert_safe(loaded)
        assert_next_run_works(loaded, tmp_path)
    assert result.status == "aborted: Recorder: count rates look blinded"
    assert metadata(result)["status"] == result.status
    assert [s.frame for s, _ in monitor.seen] == [0, 1]  # stopped at once, of 4 frames
    assert frames_on_disk(result).size == 2
    assert_no_key_material(tmp_path)
    for stats, readings in monitor.seen:
        assert set(readings) == set(SPADS)
        for i, name in enumerate(SPADS):
            r = readings[name]
            assert r["bias_v"] == pytest.approx(185.0)
            assert r["temperature_c"] == -30.0
            # the unit's own counter sees the clicks the tagger tags: they differ by the
            # afterpulses (~1 %, not in the counter's closed form) and counting noise
            # (< 1 % at 150-450 kcps over 0.2 s frames and a 1 s counter gate)
            tagged = stats.rate_cps(i + 1)
            assert r["count_rate_cps"] == pytest.approx(tagged, rel=0.05), name


def test_bad_policy_and_monitors_are_refused_naming_the_parameter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tagger_retries must be an integer in \[0, 100\]"):
        FaultPolicy(tagger_retries=-1)
    with pytest.raises(ValueError, match=r"retry_wait_s must lie in \[0, 600\] s"):
        FaultPolicy(retry_wait_s=float("nan"))
    with pytest.raises(TypeError, match=r"monitors: .* has no check"):
        run_bb84(None, bb84_settings(DEFAULT_MOCK_STATION), duration_s=1.0,
                 data_dir=tmp_path, monitors=[object()])
    assert not (tmp_path / "qkdlab.db").exists()  # refused before anything was written


def test_link_errors_are_told_from_instrument_errors() -> None:
    from qkdlab.drivers.idquantique.id120 import IDQID120CommunicationError, IDQID120Error
    from qkdlab.drivers.idquantique.time_controller import (
        IDQTimeControllerCommunicationError,
        IDQTimeControllerError,
    )

    assert is_link_error(IDQTimeControllerCommunicationError("no reply"))
    assert is_link_error(IDQID120CommunicationError("no reply"))
    assert is_link_error(ConnectionResetError())
    assert is_link_error(TimeoutError())
    assert not is_link_error(IDQTimeControllerError("command rejected"))
    assert not is_link_error(IDQID120Error("bias error"))
    assert not is_link_error(ValueError("bad value"))
    # QCoDeS appends where it happened; the fault names the instrument once
    err = IDQID120CommunicationError("spad1: no reply", "asking 'X?' to <spad1>")
    assert str(InstrumentFaultError("spad1", describe(err))) == "spad1: no reply"


def test_detector_readings_are_si_scalars_whatever_the_unit() -> None:
    class Unit:
        """Two channels, a scalar temperature, per-channel bias currents (an SNSPD-like)."""

        def __init__(self) -> None:
            self.parameters = {"temperature": lambda: -30.5,
                               "bias_current": lambda: [9e-6, 11e-6]}

        def count_rates(self) -> list[float]:
            return [1000.0, 250.0]

    readings = poll_detector(Unit())
    # the count rate sums the channels; a per-channel list is no single reading
    assert readings == {"count_rate_cps": 1250.0, "temperature_c": -30.5}
