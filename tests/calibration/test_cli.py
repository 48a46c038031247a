"""``qkdlab calibrate``: a node on the mock bench, its record and dataset, the status."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from qkdlab import calibrate_cmd


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="qkdlab")
    calibrate_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = int(args.func(args))
    return code, capsys.readouterr().out


def test_calibrate_timing_on_the_mock_then_status(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["calibrate", "status", "--data-dir", str(tmp_path), "--json"], capsys)
    assert code == 0
    assert {r["state"] for r in json.loads(out)["status"]} == {"missing"}
    code, out = run(["calibrate", "timing", "--mock", "--json", "--seed", "3",
                     "--data-dir", str(tmp_path)], capsys)
    result = json.loads(out)  # stdout holds the JSON object only
    assert code == 0, result
    assert result["states"] == {"timing": "good"}
    assert [a["action"] for a in result["actions"]] == ["calibrated"]
    rows = {r["node"]: r for r in result["status"]}
    assert rows["timing"]["state"] == "valid"
    assert rows["bias"]["state"] == "missing"
    assert (tmp_path / "calibration.jsonl").exists()
    assert (tmp_path / "qkdlab.db").exists()
    # the dataset holds the residual histograms and the record's figures
    from qcodes.dataset import initialise_or_create_database_at, load_by_guid

    from qkdlab.calibration.store import CalibrationStore

    record = CalibrationStore(tmp_path / "calibration.jsonl").latest("timing")
    assert record is not None
    assert record.dataset_guid is not None
    initialise_or_create_database_at(tmp_path / "qkdlab.db")
    ds = load_by_guid(record.dataset_guid)
    assert "counts_ch1" in ds.get_parameter_data()
    assert json.loads(ds.metadata["qkdlab_calibration"])["input_delay_ps"]
    code, out = run(["calibrate", "status", "--data-dir", str(tmp_path)], capsys)
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("timing"))
    assert "valid" in line
    assert record.id in line
    assert "window=" in line


def test_calibrate_needs_a_station(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qkdlab.station import StationError

    with pytest.raises(StationError, match="--mock or --station"):
        run(["calibrate", "bias", "--data-dir", str(tmp_path)], capsys)
