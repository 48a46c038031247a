"""FPGA pattern generator: exact commands, round trips, and a record that matches the light."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from qkdlab.drivers.fpga.pattern_generator import FPGAPatternGenerator, PatternGeneratorError
from qkdlab.drivers.roles import BB84Transmitter
from qkdlab.mock_instruments.bench import Bench, BenchConfig
from qkdlab.mock_instruments.fpga.pattern_generator import MockPatternGenerator, serve
from qkdlab.mock_instruments.server import ScpiServer
from qkdlab.patterns import ALGORITHM

IDN = "QKDLAB,FPGA-PG1,PG000001,1.0"


def test_construction_checks_the_algorithm(expected_protocol: Any) -> None:
    with expected_protocol(FPGAPatternGenerator, [("PATT:ALG?", ALGORITHM),
                                                  ("*IDN?", IDN)]) as pg:
        assert isinstance(pg, BB84Transmitter)


def test_unknown_algorithm_is_refused(expected_protocol: Any) -> None:
    with pytest.raises(PatternGeneratorError, match="could not be reproduced"), \
            expected_protocol(FPGAPatternGenerator, [("PATT:ALG?", "xorshift-v0")]):
        pass


def test_configure_sends_the_pattern_in_a_safe_order(expected_protocol: Any) -> None:
    script = [("PATT:ALG?", ALGORITHM), ("*IDN?", IDN),
              ("PATT:PROB:DEC 0", None), ("PATT:PROB:SIGN 0.5", None),
              ("PATT:PROB:DEC 0.3", None), ("PATT:PROB:ZBAS 0.8", None),
              ("PATT:SEED 12345", None), ("PATT:FRAM 65536", None),
              ("SOUR:FREQ 1000000000", None), ("*OPC?", "1"), ("SYST:ERR?", '+0,"No error"'),
              ("OUTP 1", None), ("*OPC?", "1")]
    with expected_protocol(FPGAPatternGenerator, script) as pg:
        pg.configure(seed=12345, p_z=0.8, p_signal=0.5, p_decoy=0.3, frame_pulses=65536,
                     rep_rate_hz=1e9)
        pg.start()
        pg.ask("*OPC?")


def test_invalid_pattern_is_rejected_before_anything_is_written(expected_protocol: Any) -> None:
    with expected_protocol(FPGAPatternGenerator, [("PATT:ALG?", ALGORITHM),
                                                  ("*IDN?", IDN)]) as pg:
        with pytest.raises(ValueError, match="p_signal \\+ p_decoy must be <= 1"):
            pg.configure(seed=1, p_z=0.5, p_signal=0.8, p_decoy=0.3, frame_pulses=10)
        with pytest.raises(ValueError, match="seed"):
            pg.configure(seed=-1, p_z=0.5, p_signal=0.5, p_decoy=0.3, frame_pulses=10)
        with pytest.raises(ValueError, match="rep_rate"):
            pg.configure(seed=1, p_z=0.5, p_signal=0.5, p_decoy=0.3, frame_pulses=10,
                         rep_rate_hz=1e10)


@pytest.fixture
def bench_and_driver() -> Iterator[tuple[Bench, FPGAPatternGenerator, MockPatternGenerator]]:
    bench = Bench(BenchConfig(), seed=3)
    server = serve("pg", bench, {})
    server.start()
    pg = FPGAPatternGenerator("pg", server.address, timeout=2)
    assert isinstance(server, ScpiServer)
    yield bench, pg, server.instrument  # type: ignore[misc]
    pg.close()
    server.stop()


def test_round_trips_reach_the_bench(
    bench_and_driver: tuple[Bench, FPGAPatternGenerator, MockPatternGenerator],
) -> None:
    bench, pg, _ = bench_and_driver
    pg.configure(seed=2**63 - 25, p_z=0.9, p_signal=0.6, p_decoy=0.25, frame_pulses=4096,
                 rep_rate_hz=250e6)
    assert pg.seed() == 2**63 - 25  # 64-bit seeds survive the wire exactly
    assert pg.p_z() == pytest.approx(0.9)
    assert pg.rep_rate() == pytest.approx(250e6)
    assert pg.frame_pulses() == 4096
    pattern = bench.alice.pattern
    assert (pattern.seed, pattern.p_z, pattern.frame_pulses) == (2**63 - 25, 0.9, 4096)
    assert pattern.p_vacuum == pytest.approx(0.15)
    assert bench.alice.rep_rate_hz == pytest.approx(250e6)


def test_record_is_the_pattern_the_bench_sends(
    bench_and_driver: tuple[Bench, FPGAPatternGenerator, MockPatternGenerator],
) -> None:
    bench, pg, _ = bench_and_driver
    pg.configure(seed=42, p_z=0.5, p_signal=0.7, p_decoy=0.2, frame_pulses=2**20)
    bench.acquire(0.001)  # warm-up: light reaches Bob after the fibre delay
    tags = bench.acquire(0.01)
    photons = tags.pulse_index[tags.origin == 0]
    assert photons.size > 100
    for ours, truth in zip(pg.record(photons), bench.alice_symbols(photons), strict=True):
        np.testing.assert_array_equal(ours, truth)
    # and the detections follow that pattern: Z-arm clicks agree with Alice's Z bits
    basis, bit, _ = pg.record(photons)
    det = tags.channel[tags.origin == 0] - 1  # channels 1..4 -> detectors 0..3
    z = (basis == 0) & (det < 2)
    assert np.mean(bit[z] == det[z]) > 0.95


def test_mock_refuses_signal_plus_decoy_above_one(
    bench_and_driver: tuple[Bench, FPGAPatternGenerator, MockPatternGenerator],
) -> None:
    _, pg, mock = bench_and_driver
    pg.write("PATT:PROB:SIGN 0.9")
    assert pg.ask("SYST:ERR?").startswith("-221")
    assert mock.p_signal == pytest.approx(0.7)


def test_starting_the_pattern_restarts_its_symbol_counter(
    bench_and_driver: tuple[Bench, FPGAPatternGenerator, MockPatternGenerator],
) -> None:
    bench, pg, _ = bench_and_driver
    pg.configure(seed=7, p_z=0.5, p_signal=0.7, p_decoy=0.2, frame_pulses=2**16)
    bench.acquire(0.003)  # the bench has been running: pulse indices are in the 10^5
    pg.start()
    pg.ask("*OPC?")
    start = bench.alice.pattern.start_index
    assert start > 0
    bench.acquire(0.002)  # light emitted before the start is still arriving
    tags = bench.acquire(0.01)
    photons = tags.pulse_index[(tags.origin == 0) & (tags.pulse_index >= start)]
    assert photons.size > 100
    # the firmware's record is indexed from its own start
    for ours, truth in zip(pg.record(photons - start), bench.alice_symbols(photons),
                           strict=True):
        np.testing.assert_array_equal(ours, truth)
    # frame markers follow the restarted counter: at pattern pulses 0, 2^16, 2^17, ...
    marker_t = tags.time_ps[tags.origin == 3] - bench.alice.marker_delay_ps
    frames = (marker_t - bench.emission_time_ps(np.array([start]))[0]) / (1e12 / 100e6) / 2**16
    assert marker_t.size > 0
    np.testing.assert_allclose(frames, np.round(frames), atol=1e-3)
