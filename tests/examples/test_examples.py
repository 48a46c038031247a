"""The example scripts, run as a physicist runs them (``python examples/X.py --mock``),
each checked through the dataset it says it wrote."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qkdlab.cli import DEFAULT_MOCK_STATION, bb84_settings
from qkdlab.station import read_station_file

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = ["live_count_rates.py", "cross_correlation.py", "deadtime_afterpulsing.py",
           "bias_scan.py", "bb84_short.py"]
MOCK_BENCH = read_station_file(DEFAULT_MOCK_STATION).qkdlab["mock_bench"]


def run_example(script: str, tmp_path: Path, *args: str) -> tuple[str, Path, int]:
    """Run a script on the mock bench; (stdout, database, dataset id) from its last line."""
    data = tmp_path / "data"
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--mock",
                           "--data-dir", str(data), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"^data: dataset #(\d+).* in (\S+?\.db)", done.stdout, re.MULTILINE)
    assert found, f"{script} did not say where its data went:\n{done.stdout}"
    database = Path(found.group(2))
    assert database == data / "qkdlab.db"
    return done.stdout, database, int(found.group(1))


@contextmanager
def dataset(database: Path, run_id: int) -> Iterator[Any]:
    from qcodes.dataset import load_by_id
    from qcodes.dataset.sqlite.database import connect

    conn = connect(str(database))
    try:
        yield load_by_id(run_id, conn=conn)
    finally:
        conn.close()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_example_takes_the_common_options(script: str) -> None:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--mock", "--station", "--duration", "--data-dir"):
        assert option in done.stdout, f"{script} has no {option}"


def test_live_count_rates(tmp_path: Path) -> None:
    _, db, run_id = run_example("live_count_rates.py", tmp_path, "--duration", "0.6", "--light")
    with dataset(db, run_id) as ds:
        data = ds.get_parameter_data()
    rates = {ch: float(np.mean(data[f"rate_ch{ch}"][f"rate_ch{ch}"])) for ch in (1, 2, 3, 4)}
    assert len(data["rate_ch1"]["time"]) >= 2  # one row per tagger block
    assert all(r > 0 for r in rates.values()), rates
    # the two detectors of one basis see the same light
    for a, b in ((1, 2), (3, 4)):
        assert 0.5 < rates[a] / rates[b] < 2, rates


def test_cross_correlation_shows_the_pulse_comb(tmp_path: Path) -> None:
    _, db, run_id = run_example("cross_correlation.py", tmp_path, "--duration", "0.6",
                                "--light", "--range-ns", "100", "--bin-ps", "100")
    with dataset(db, run_id) as ds:
        data = ds.get_parameter_data("counts")["counts"]
    delay, counts = data["delay"].ravel(), data["counts"].ravel()
    assert counts.sum() > 1000
    assert np.all(counts >= 0)
    assert delay[0] > 0
    assert delay[-1] < 100e-9
    spectrum = np.abs(np.fft.rfft(counts - counts.mean()))
    freqs = np.fft.rfftfreq(len(counts), d=float(delay[1] - delay[0]))
    period = 1 / freqs[int(np.argmax(spectrum[1:])) + 1]
    pulse_period = 1 / bb84_settings(DEFAULT_MOCK_STATION).rep_rate_hz
    assert period == pytest.approx(pulse_period, rel=0.02)


def test_deadtime_hole_and_afterpulsing(tmp_path: Path) -> None:
    _, db, run_id = run_example("deadtime_afterpulsing.py", tmp_path, "--duration", "0.6",
                                "--light")
    with dataset(db, run_id) as ds:
        data = ds.get_parameter_data("counts")["counts"]
        fit = json.loads(ds.metadata["fit"])
    gap, counts = data["gap"].ravel(), data["counts"].ravel()
    dead_time = MOCK_BENCH["bob"]["detectors"]["dead_time_s"]
    assert counts[gap < 0.95 * dead_time].sum() == 0  # the hole
    assert counts[(gap > dead_time) & (gap < 1.2 * dead_time)].sum() > 0
    assert fit["dead_time_s"] == pytest.approx(dead_time, rel=0.02)
    assert 0.005 < fit["afterpulse_probability"] < 0.05  # the bench's detectors: 2 %
    assert 0.5e-6 < fit["afterpulse_tau_s"] < 5e-6      # 2 µs
    assert fit["rate_hz"] > 0


def test_bias_scan_with_counts_finds_v_pi(tmp_path: Path) -> None:
    _, db, run_id = run_example("bias_scan.py", tmp_path, "--signal", "counts", "--points", "9",
                                "--duration", "0.2")
    with dataset(db, run_id) as ds:
        data = ds.get_parameter_data("count_rate")["count_rate"]
        fit = json.loads(ds.metadata["fit"])
    bias, rate = data["bias"], data["count_rate"]
    assert list(bias) == pytest.approx(list(np.linspace(-8, 8, 9)))
    assert np.all(rate > 0)
    assert rate.max() / rate.min() > 1.5
    assert fit["v_pi_v"] == pytest.approx(4.0, rel=0.1)  # the bench's modulator


def test_bias_scan_records_power_when_the_station_has_a_meter(tmp_path: Path) -> None:
    _, db, run_id = run_example("bias_scan.py", tmp_path, "--points", "3")
    with dataset(db, run_id) as ds:
        assert "power" in ds.parameters.split(",")
        power = ds.get_parameter_data("power")["power"]["power"]
    assert len(power) == 3
    assert np.all(np.isfinite(power))


def test_bb84_short(tmp_path: Path) -> None:
    out, db, run_id = run_example("bb84_short.py", tmp_path, "--duration", "0.6")
    with dataset(db, run_id) as ds:
        assert ds.metadata["status"] == "completed"
        qber = ds.get_parameter_data("qber_z", "qber_x")
        raw = Path(ds.metadata["raw_tags"])
    for name in ("qber_z", "qber_x"):
        values = qber[name][name]
        assert len(values) >= 1
        assert np.all(values < 0.05), values
    assert raw.is_file()
    assert raw.stat().st_size > 0
    assert re.search(r"QBER Z / X\s+\d", out)
