"""BB84 acquisition end to end on the mock bench: physics, data on disk, clean stops."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qkdlab.cli import DEFAULT_MOCK_STATION, bb84_settings
from qkdlab.experiments.bb84.processing import BB84Settings, FrameStats
from qkdlab.experiments.bb84.rawtags import RawTagReader
from qkdlab.experiments.bb84.reprocess import reprocess
from qkdlab.experiments.bb84.run import BB84Result, run_bb84
from qkdlab.experiments.bb84.secure_key import block_id, load_record
from qkdlab.roles import bb84_roles
from qkdlab.station import LoadedStation, open_station

# light-load detectors for the closed-form comparison: no dead-time or afterpulse bias
IDEAL_DETECTORS = {"z_fraction": 0.5,
                   "detectors": {"efficiency": 0.2, "dark_count_cps": 200.0,
                                 "dead_time_s": 2e-9, "afterpulse_prob": 0.0}}


@contextmanager
def mock_bench(**overrides: Any) -> Iterator[LoadedStation]:
    with open_station(DEFAULT_MOCK_STATION, seed=11, bench_overrides=overrides) as loaded:
        yield loaded


def settings(**kw: Any) -> BB84Settings:
    return bb84_settings(DEFAULT_MOCK_STATION, seed=kw.pop("seed", 5), **kw)


def run(loaded: LoadedStation, tmp_path: Path, duration_s: float = 0.4,
        **kw: Any) -> BB84Result:
    return run_bb84(bb84_roles(loaded), settings(), duration_s=duration_s,
                    data_dir=tmp_path, progress=False, **kw)


def dataset_status(result: BB84Result) -> str:
    from qcodes.dataset import load_by_guid

    assert result.dataset_guid is not None
    return str(load_by_guid(result.dataset_guid).metadata["status"])


def test_run_produces_data_and_reprocesses_identically(tmp_path: Path) -> None:
    with mock_bench() as loaded:
        result = run(loaded, tmp_path)
        laser_on = loaded.launcher.bench.alice.laser_on  # type: ignore[union-attr]
    summary = result.summary()
    assert summary["status"] == "completed"
    assert not laser_on  # safe state at the end of a run
    assert dataset_status(result) == "completed"
    # 25 km, e_mis 1 % plus afterpulses and dark counts: QBER a little above 1 %
    assert 0.01 < summary["qber_z"] < 0.025
    assert 0.01 < summary["qber_x"] < 0.025
    assert summary["sync_drift_ppm"] == pytest.approx(12.5, abs=0.01)  # station's tagger
    assert summary["e1_upper"] >= 0.01  # never below the true single-photon error (e_mis)
    # the dataset holds one row per frame, the raw file every tag
    from qcodes.dataset import load_by_guid

    data = load_by_guid(result.dataset_guid).get_parameter_data("qber_z")["qber_z"]
    assert data["frame"].size == result.totals.frames
    reader = RawTagReader(summary["raw_tags"])
    assert reader.metadata["run_id"] == result.run_id
    again = reprocess(summary["raw_tags"])
    assert again.totals.pulses == result.totals.pulses
    np.testing.assert_array_equal(again.totals.sifted, result.totals.sifted)
    np.testing.assert_array_equal(again.totals.errors, result.totals.errors)
    # the run's sifted records left memory with its key blocks: they are in sifted/
    bob = [load_record(tmp_path / "sifted" / f"{block_id(result.run_id, i)}-bob.npz")
           for i in range(summary["key_blocks"])]
    z_bits = np.concatenate([r.bits[r.basis == 0] for r in bob])
    np.testing.assert_array_equal(again.totals.raw_key()[1], z_bits)


def binomial_sigma(p: float, n: float) -> float:
    return math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("distance_km", [0.0, 25.0, 50.0, 100.0])
def test_gains_and_qber_follow_the_closed_form(tmp_path: Path, distance_km: float) -> None:
    seen: list[tuple[float, float, float]] = []
    with mock_bench(channel={"length_km": distance_km}, bob=IDEAL_DETECTORS) as loaded:
        bench = loaded.launcher.bench  # type: ignore[union-attr]
        result = run(loaded, tmp_path, duration_s=0.4 if distance_km < 60 else 0.6,
                     on_frame=lambda stats: seen.append(bench.mean_photon_numbers()))
        cfg = bench.config()
    mus = seen[0]  # while the laser was on (a run ends with it off)
    assert len(set(seen)) == 1
    s = result.settings
    loss_db = (cfg.channel.loss_db_per_km * distance_km + cfg.channel.insertion_loss_db
               + cfg.bob.optics_loss_db)
    eta = 0.2 * 10 ** (-loss_db / 10)
    # dark counts of the four detectors inside the acceptance window
    y0 = 4 * 200.0 * s.acceptance_ps * 1e-12
    for k, prob in enumerate(s.intensity_probs):
        expected = 1 - (1 - y0) * math.exp(-mus[k] * eta)
        n_sent = result.totals.pulses * prob
        measured = result.totals.gain(k, s.intensity_probs)
        # 5 sigma of the binomial count, plus the spread of the per-class pulse count
        tol = 5 * (binomial_sigma(expected, n_sent) + expected * math.sqrt((1 - prob) / n_sent))
        assert measured == pytest.approx(expected, abs=tol), f"class {k}"
    # QBER of the signal class: misalignment, squashed multi-clicks, dark counts
    e_sig = squashed_qber(mus[0] * eta, 0.01, y0)
    n_sifted = result.totals.sifted[:, 0].sum()
    assert result.totals.qber_intensity(0) == pytest.approx(
        e_sig, abs=5 * binomial_sigma(e_sig, n_sifted))


def squashed_qber(m_total: float, e_mis: float, y0: float) -> float:
    """Sifted QBER of a coherent pulse (mean detected photons ``m_total``) on a passive
    50/50 basis splitter with squashing: multi-clicks get a random bit (and a random
    basis across arms).  Each arm sees m = m_total/2; arms and detectors are
    independent Poisson modes."""
    m = m_total / 2
    right, wrong = 1 - math.exp(-m * (1 - e_mis)), 1 - math.exp(-m * e_mis)
    silent_other = math.exp(-m)
    both_arms = (1 - math.exp(-m)) ** 2
    sifted = silent_other * (1 - math.exp(-m)) + 0.5 * both_arms + 0.5 * y0
    errors = (silent_other * ((1 - right) * wrong + 0.5 * right * wrong)
              + 0.25 * both_arms + 0.25 * y0)
    return errors / sifted


@pytest.mark.parametrize(("fraction", "expected"), [(1.0, 0.25), (0.5, 0.01 + 0.5 / 4)])
def test_intercept_resend_raises_qber_by_a_quarter(tmp_path: Path, fraction: float,
                                                   expected: float) -> None:
    with mock_bench(channel={"eve_fraction": fraction}, bob=IDEAL_DETECTORS) as loaded:
        result = run(loaded, tmp_path, duration_s=0.3)
    summary = result.summary()
    # e_mis (1 %) applies to the states Eve resends too: e = e_mis + p/4·(1 − 2 e_mis)
    e = 0.01 + fraction / 4 * (1 - 2 * 0.01)
    assert e == pytest.approx(expected, abs=0.006)
    for basis in ("qber_z", "qber_x"):
        n = result.totals.sifted.sum() / 2
        assert summary[basis] == pytest.approx(e, abs=5 * binomial_sigma(e, n) + 0.003)
    assert summary["aborted"]
    assert "abort threshold" in summary["abort_reason"]


def test_ctrl_c_closes_the_dataset_marked_and_switches_the_laser_off(tmp_path: Path) -> None:
    def interrupt(stats: FrameStats) -> None:
        if stats.frame == 1:
            raise KeyboardInterrupt

    with mock_bench() as loaded:
        with pytest.raises(KeyboardInterrupt):
            run(loaded, tmp_path, duration_s=2.0, on_frame=interrupt)
        assert not loaded.launcher.bench.alice.laser_on  # type: ignore[union-attr]
    from qcodes.dataset import load_by_run_spec

    dataset = load_by_run_spec(captured_run_id=1)
    assert dataset.metadata["status"] == "interrupted"
    assert dataset.get_parameter_data("qber_z")["qber_z"]["frame"].size >= 1
    raw = Path(dataset.metadata["raw_tags"])
    assert sum(1 for _ in RawTagReader(raw).blocks()) >= 1


def test_a_failing_run_is_marked_and_leaves_instruments_safe(tmp_path: Path) -> None:
    def explode(stats: FrameStats) -> None:
        raise RuntimeError("detector 3 stopped answering")

    with mock_bench() as loaded:
        with pytest.raises(RuntimeError, match="detector 3"):
            run(loaded, tmp_path, on_frame=explode)
        assert not loaded.launcher.bench.alice.laser_on  # type: ignore[union-attr]
    from qcodes.dataset import load_by_run_spec

    status = load_by_run_spec(captured_run_id=1).metadata["status"]
    assert status.startswith("failed: RuntimeError: detector 3 stopped answering")


def test_cli_json_is_the_only_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qkdlab.cli import main

    code = main(["run", "bb84", "--mock", "--duration", "0.4", "--distance-km", "10",
                 "--data-dir", str(tmp_path), "--json", "--seed", "3"])
    out = capsys.readouterr().out
    summary = json.loads(out)
    assert code == 0
    for key in ("pulses", "detections", "sifted_bits", "qber_z", "qber_x", "gain_signal",
                "gain_decoy", "gain_vacuum", "y1_lower", "e1_upper", "sync_period_ps",
                "sync_offset_ps", "sync_drift_ppm", "dataset", "raw_tags", "aborted",
                "abort_reason"):
        assert key in summary
    assert summary["pulses"] == pytest.approx(0.4 * 100e6, rel=0.01)


def test_bad_settings_are_refused_before_any_instrument_moves() -> None:
    with pytest.raises(ValueError, match="p_signal \\+ p_decoy must be < 1"):
        BB84Settings(p_signal=0.8, p_decoy=0.3)
    with pytest.raises(ValueError, match="mu_decoy"):
        BB84Settings(mu_signal=0.1, mu_decoy=0.5)


def test_demo_tours_the_bench_and_runs_bb84(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from qkdlab.cli import main

    code = main(["demo", "--seconds", "0.2", "--run-seconds", "0.4",
                 "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "IDQTimeController" in out  # identities
    assert "ch 4" in out  # live count rates
    assert ": completed" in out  # the BB84 run
    assert str(tmp_path) in out  # and where the data went


def test_a_second_run_on_the_same_bench_syncs_again(tmp_path: Path) -> None:
    # the transmitter keeps running between runs; each run restarts its pattern
    with mock_bench() as loaded:
        bench = loaded.launcher.bench  # type: ignore[union-attr]
        first = run(loaded, tmp_path)
        assert bench.alice.attenuation_db == 20.0  # the safe state: VOA at its maximum
        bench.acquire(0.5)
        second = run(loaded, tmp_path)
    assert first.status == second.status == "completed"
    # the second run sends the μ its settings claim: the VOA is set again at its start
    # (the gains agree within counting statistics; at 20 dB they were 8 dB lower)
    for k in range(2):
        g1, g2 = first.estimate.gains[k], second.estimate.gains[k]
        n = min(first.totals.detected[k], second.totals.detected[k])
        assert g2 == pytest.approx(g1, rel=5 / math.sqrt(n)), k


def test_a_long_enough_run_ends_with_identical_secure_keys(tmp_path: Path) -> None:
    # efficient BB84 (p_z 0.8), 4 s at 100 MHz: enough pulses for Lim et al.'s bounds
    with mock_bench() as loaded:
        result = run(loaded, tmp_path, duration_s=4.0)
    summary = result.summary()
    assert summary["status"] == "completed"
    assert not summary["aborted"], summary["abort_reason"]
    assert summary["keys_match"]
    assert summary["secure_key_bits"] > 0
    # the net key is the amplified key less the authentication key it repaid
    assert summary["secure_key_bits"] == summary["pa_output_bits"] - summary[
        "auth_key_used_bits"]
    assert 1.0 < summary["ec_efficiency"] < 1.1
    from qkdlab.protocol.keystore import KeyStore

    alice = KeyStore(tmp_path / "keys" / "alice")
    bob = KeyStore(tmp_path / "keys" / "bob")
    (a_rec,), (b_rec,) = alice.list(), bob.list()
    assert np.array_equal(alice.load(a_rec.key_id), bob.load(b_rec.key_id))
    assert (Path(summary["key_file"]).stat().st_mode & 0o777) == 0o600
    # the authentication key it used went back into the pool store for the next block
    assert sum(r.n_bits for r in KeyStore(tmp_path / "keys" / "auth_pool").list()) == \
        summary["auth_key_used_bits"]


def test_intercept_resend_yields_no_key(tmp_path: Path) -> None:
    with mock_bench(channel={"eve_fraction": 1.0}) as loaded:
        result = run(loaded, tmp_path, duration_s=0.4)
    summary = result.summary()
    assert summary["aborted"]
    assert summary["secure_key_bits"] == 0
    assert summary["key_file"] is None
    assert not (tmp_path / "keys" / "alice").exists() or not list(
        (tmp_path / "keys" / "alice").iterdir())


def test_run_records_the_calibration_it_used_and_refuses_when_stale(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qcodes.dataset import load_by_guid

    from qkdlab.cli import main

    # no calibration yet: a run that must refuse does, naming what is missing
    assert main(["run", "bb84", "--mock", "--calibration", "refuse", "--duration", "0.4",
                 "--data-dir", str(tmp_path), "--json"]) == 2
    assert "calibration missing" in capsys.readouterr().err
    # calibrate, then the run records the ids of the records it used
    assert main(["calibrate", "timing", "--mock", "--data-dir", str(tmp_path), "--json"]) == 0
    capsys.readouterr()
    assert main(["run", "bb84", "--mock", "--duration", "0.4", "--data-dir", str(tmp_path),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    meta = json.loads(load_by_guid(summary["dataset_guid"]).metadata["qkdlab_run"])
    assert "timing" in meta["calibration_ids"]
