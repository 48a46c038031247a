"""PicoQuant HydraHarp / MultiHarp: the mock writes T2 PTU files, the vendor's snAPI replays them.

Needs ``snapi`` (PicoQuant's library, native code for Linux x86_64 / Windows) and
``ptufile`` (an independent PTU reader); skipped with the reason when missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("snAPI.Main", reason="PicoQuant snAPI (pip install snapi) not usable here")
ptufile = pytest.importorskip("ptufile", reason="ptufile (independent PTU reader) missing")

from qkdlab.drivers.picoquant.harp import (  # noqa: E402
    HH_FIXED_DEAD_TIME_PS,
    PicoQuantHarp,
    PicoQuantHarpCommunicationError,
    PicoQuantHarpError,
    T2DecodeState,
    apply_dead_time,
    decode_t2_records,
)
from qkdlab.drivers.roles import TimeTagger  # noqa: E402
from qkdlab.mock_instruments.bench import Bench, BenchConfig  # noqa: E402
from qkdlab.mock_instruments.picoquant.ptu import (  # noqa: E402
    MAX_OVERFLOW_COUNT,
    REC_HYDRAHARP2_T2,
    REC_MULTIHARP_T2,
    T2_WRAP,
    PtuWriteResult,
    encode_t2,
    serve,
    write_ptu,
    write_ptu_tags,
)
from qkdlab.tags import TagBlock  # noqa: E402

PS = 10**12


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory: pytest.TempPathFactory) -> PtuWriteResult:
    """50 ms of the default bench (≈ 1 M tags/s, far below the limits) as a HydraHarp file."""
    path = tmp_path_factory.mktemp("pq") / "bench.ptu"
    return write_ptu(Bench(BenchConfig(), seed=1), path, 0.05, keep_truth=True)


@pytest.fixture
def harp(bench_file: PtuWriteResult) -> Iterator[PicoQuantHarp]:
    inst = PicoQuantHarp("hh", bench_file.address, block_duration_s=0.01)
    yield inst
    inst.close()


def _read_raw(path: Path) -> tuple[np.ndarray, float, int]:
    with ptufile.PtuFile(path) as ptu:
        rectype = int(ptu.tags["TTResultFormat_TTTRRecType"])
        return ptu.read_records(), ptu.global_resolution, rectype


# ------------------------------------------------------------------ the file format


def test_encode_t2_overflow_records_round_trip() -> None:
    """Compressed overflows (count in the timetag) incl. a gap beyond one record's count."""
    ticks = np.array([0, 5, T2_WRAP - 1, T2_WRAP, 7 * T2_WRAP + 3,
                      (MAX_OVERFLOW_COUNT + 9) * T2_WRAP + 11], np.int64)
    codes = np.array([-1, 0, 1, 2, 0, 3], np.int64)  # −1 = sync
    records, done = encode_t2(ticks, codes, 0, upto_overflow=(MAX_OVERFLOW_COUNT + 12))
    assert done == MAX_OVERFLOW_COUNT + 12
    special = (records >> 31) == 1
    ovf = special & (((records >> 25) & 63) == 63)
    # one record per gap, two for the gap longer than MAX_OVERFLOW_COUNT, one trailing
    assert int(ovf.sum()) == 1 + 1 + 2 + 1
    t, ch = decode_t2_records(records, 1, T2DecodeState())
    assert t.tolist() == ticks.tolist()
    assert ch.tolist() == [0, 1, 2, 3, 1, 4]


def test_writer_round_trips_through_ptufile(bench_file: PtuWriteResult) -> None:
    """ptufile (independent reader): record type, count, times; our decoder: channels."""
    raw, res, rectype = _read_raw(bench_file.path)
    assert rectype == REC_HYDRAHARP2_T2
    assert res == 1e-12
    assert raw.size == bench_file.records
    with ptufile.PtuFile(bench_file.path) as ptu:
        decoded = ptu.decode_records()
        assert ptu.stop_reason == ptufile.PtuStopReason.TIME_OVER
    events = decoded["channel"] >= 0
    np.testing.assert_array_equal(decoded["time"][events].astype(np.int64),
                                  bench_file.truth_time_ps)
    t, ch = decode_t2_records(raw, 1, T2DecodeState())
    np.testing.assert_array_equal(t, bench_file.truth_time_ps)
    np.testing.assert_array_equal(ch, bench_file.truth_channel)
    assert {0, 1, 2, 3, 4} <= set(np.unique(ch).tolist())  # sync (frame markers) + 4 SPDs


def test_multiharp_file_quantised_to_5_ps(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    t = np.sort(rng.integers(0, 10**9, 5000))
    ch = rng.integers(0, 9, 5000).astype(np.int16)
    res = write_ptu_tags(tmp_path / "mh.ptu", [(t, ch)], 0.001, "multiharp150",
                         keep_truth=True, dead_time_ps=0)
    raw, gres, rectype = _read_raw(res.path)
    assert rectype == REC_MULTIHARP_T2
    assert gres == 5e-12
    times, chans = decode_t2_records(raw, 5, T2DecodeState())
    np.testing.assert_array_equal(times, (t // 5) * 5)
    np.testing.assert_array_equal(chans, ch)
    with PicoQuantHarp("mh", res.address) as mh:
        block = mh.acquire(0.001)
        assert mh.resolution() == pytest.approx(5e-12)
        assert not mh.is_hydraharp
    np.testing.assert_array_equal(block.time_ps, (t // 5) * 5)


# ------------------------------------------------------------------ driver via snAPI


def test_driver_matches_bench_ground_truth(harp: PicoQuantHarp,
                                           bench_file: PtuWriteResult) -> None:
    """Below the limits nothing is lost: snAPI's replay = the bench's own tags."""
    assert isinstance(harp, TimeTagger)
    assert bench_file.lost == 0
    assert not bench_file.dead_time_dropped
    assert bench_file.written == bench_file.offered
    blocks = list(harp.stream(0.05))
    assert [b.start_ps for b in blocks] == [k * 10**10 for k in range(5)]
    assert all(not b.overflow and b.lost_tags == 0 for b in blocks)
    got = TagBlock.concatenate(blocks)
    twin_bench = Bench(BenchConfig(), seed=1)  # the same bench, read directly
    twin = TagBlock.concatenate([TagBlock(**twin_bench.acquire(0.01).tag_block_fields())
                                 for _ in range(5)])
    np.testing.assert_array_equal(got.time_ps, twin.time_ps - twin.start_ps)
    np.testing.assert_array_equal(got.channel, twin.channel)
    assert got.counts() == bench_file.offered
    assert harp.last_stream_stats.overflow_records > 0  # overflows seen, not loss


def test_acquire_continues_the_replay_and_refuses_past_the_end(
        harp: PicoQuantHarp, bench_file: PtuWriteResult) -> None:
    first = harp.acquire(0.02)
    second = harp.acquire(0.02)
    assert (first.start_ps, first.stop_ps, second.stop_ps) == (0, 2 * 10**10, 4 * 10**10)
    joined = TagBlock.concatenate([first, second])
    n = int(np.searchsorted(bench_file.truth_time_ps, 4 * 10**10))
    np.testing.assert_array_equal(joined.time_ps, bench_file.truth_time_ps[:n])
    with pytest.raises(PicoQuantHarpError, match=r"hh: the file holds 0\.05 s"):
        harp.acquire(0.02)
    harp.reset()  # rewinds
    np.testing.assert_array_equal(harp.acquire(0.02).time_ps, first.time_ps)


@pytest.fixture(scope="module")
def overload_file(tmp_path_factory: pytest.TempPathFactory) -> PtuWriteResult:
    """≈ 66 M/s per detector: the 80 ns TDC dead time caps each input at ≈ 11 M/s, and
    the 44 M/s total beats the 40 M/s USB rate; a 4000-record FiFo overruns in ≈ 1 ms."""
    bench = Bench(BenchConfig(), seed=3)
    bench.channel.length_km = 0.0
    bench.alice.attenuation_db = 0.0
    bench.alice.laser_power_w *= 40
    for det in bench.bob.detectors:
        det.dead_time_s = 2e-9
        det.afterpulse_prob = 0.0
    path = tmp_path_factory.mktemp("pq") / "overload.ptu"
    return write_ptu(bench, path, 0.004, fifo_records=4000, keep_truth=True, chunk_s=0.001)


def test_above_the_limits_loss_is_reported(overload_file: PtuWriteResult) -> None:
    res = overload_file
    assert res.overrun_ps is not None
    assert res.lost > 0
    for ch in (1, 2, 3, 4):  # per-channel cap of the HydraHarp TDC (12.5 Mcps)
        assert res.dead_time_dropped[ch] > 0
        assert res.written[ch] / 0.004 <= 12.5e6
    with PicoQuantHarp("hh", res.address, block_duration_s=0.0005) as hh:
        blocks = list(hh.stream(0.004))
    got = TagBlock.concatenate(blocks)
    np.testing.assert_array_equal(got.time_ps, res.truth_time_ps)  # nothing else missing
    flagged = [b for b in blocks if b.overflow]
    assert flagged
    assert all(b.lost_tags == 0 for b in flagged)
    iv = np.concatenate([b.overflow_intervals for b in blocks])
    assert iv[0, 0] <= res.overrun_ps
    assert iv[-1, 1] == 4 * 10**9
    lost = res.truth_lost_time_ps
    assert lost is not None
    assert lost.size == res.lost
    inside = np.zeros(lost.size, bool)
    for a, b in iv:
        inside |= (lost >= a) & (lost < b)
    assert inside.all()  # every lost tag lies in a reported interval
    assert all(not b.overflow for b in blocks if b.stop_ps <= iv[0, 0])
    with ptufile.PtuFile(res.path) as ptu:
        assert ptu.stop_reason == ptufile.PtuStopReason.FIFO_OVERRUN
        assert ptu.measurement_warnings & ptufile.PtuMeasurementWarnings.EVENTS_DROPPED


def test_stream_memory_is_bounded(tmp_path: Path) -> None:
    """12 M records: snAPI blocks stay within ``block_records``, the driver holds little."""
    rng = np.random.default_rng(9)
    chunk = 10**10

    def source() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for k in range(30):  # 0.3 s at 40 M/s, 8 inputs of 5 M/s (gaps ≥ 80 ns)
            per = [np.cumsum(80_000 + rng.exponential(120_000, 60_000).astype(np.int64))
                   for _ in range(8)]
            t = np.concatenate([p[p < chunk] for p in per]) + k * chunk
            c = np.concatenate([np.full((p < chunk).sum(), i + 1, np.int16)
                                for i, p in enumerate(per)])
            order = np.argsort(t, kind="stable")
            yield t[order], c[order]

    res = write_ptu_tags(tmp_path / "big.ptu", source(), 0.3)
    total = sum(res.written.values())
    assert total > 10_000_000
    assert res.lost == 0
    with PicoQuantHarp("hh", res.address, block_duration_s=0.01,
                       block_records=4 * 2**20) as hh:
        n = 0
        for block in hh.stream(0.3):
            assert len(block) < 0.6e6  # one 10 ms block at 40 M/s
            n += len(block)
        stats = hh.last_stream_stats
    assert n == total
    assert stats.peak_snapi_block <= 4 * 2**20
    assert stats.peak_pending_tags <= 4 * 2**20 + 0.6e6


# ------------------------------------------------------------------ parameters


def test_parameters_round_trip_and_reach_snapi(harp: PicoQuantHarp) -> None:
    cfg = harp._sn.deviceConfig
    harp.set_trigger_level(2, 0.25)
    harp.input2.zero_cross(0.02)
    assert harp.input2.level() == 0.25
    assert harp.input2.level.unit == "V"
    assert cfg["ChansCfg"][1]["DiscrLvl"] == 250
    assert cfg["ChansCfg"][1]["ZeroXLvl"] == 20
    harp.set_input_delay(1, 1234)
    assert harp.input1.offset() == pytest.approx(1.234e-9)
    assert cfg["ChansCfg"][0]["ChanOffs"] == 1234
    harp.sync.offset(-5e-12)
    assert cfg["SyncChannelOffset"] == -5
    harp.sync_divider(4)
    assert cfg["SyncDiv"] == 4
    assert harp.sync_divider() == 4
    harp.input3.enabled(False)
    assert cfg["ChansCfg"][2]["ChanEna"] == 0
    harp.set_dead_time(4, 200_000)
    assert harp.input4.dead_time() == pytest.approx(200e-9)
    assert harp.resolution() == 1e-12
    assert harp.resolution.unit == "s"
    rates = harp.count_rates()
    assert len(rates) == 9
    assert rates[1] == pytest.approx(3489 / 0.05, rel=0.02)


@pytest.mark.parametrize(("action", "match"), [
    (lambda h: h.set_trigger_level(1, 1.5), "level"),  # HH400 CFD: 0…1 V
    (lambda h: h.input1.zero_cross(0.05), "zero_cross"),
    (lambda h: h.set_input_delay(1, 100_000), "offset"),  # ±99 999 ps
    (lambda h: h.sync_divider(3), "sync_divider"),
    (lambda h: h.set_dead_time(1, -1), "dead_time"),
    (lambda h: h.set_trigger_level(9, 0.1), "channel 9 does not exist"),
    (lambda h: h.set_input_delay(1, 1.5), "integer"),
])
def test_validators_raise_before_snapi(harp: PicoQuantHarp, action: object, match: str) -> None:
    before = repr(harp._sn.deviceConfig)
    with pytest.raises((ValueError, TypeError), match=match):
        action(harp)  # type: ignore[operator]
    assert repr(harp._sn.deviceConfig) == before  # snAPI (which accepts anything) untouched


def test_file_device_applies_offsets_enables_and_dead_time(
        harp: PicoQuantHarp, bench_file: PtuWriteResult) -> None:
    harp.set_input_delay(1, 5000)
    harp.input3.enabled(False)
    harp.set_dead_time(2, 1_000_000_000)  # 1 ms: keeps few tags
    got = harp.acquire(0.05)
    t, c = bench_file.truth_time_ps, bench_file.truth_channel
    np.testing.assert_array_equal(got.select(1), t[c == 1] + 5000)
    assert got.select(3).size == 0
    keep, _ = apply_dead_time(t[c == 2], 1_000_000_000, None)
    np.testing.assert_array_equal(got.select(2), t[c == 2][keep])
    np.testing.assert_array_equal(got.select(4), t[c == 4])
    assert np.all(np.diff(got.time_ps) >= 0)
    assert HH_FIXED_DEAD_TIME_PS == 80_000


# ------------------------------------------------------------------ identity, errors


def test_identity_reset_and_safe_state(harp: PicoQuantHarp) -> None:
    idn = harp.get_idn()
    assert idn["vendor"] == "PicoQuant"
    assert idn["model"] == "HydraHarp 400"
    assert idn["serial"] == "1000001@bench.ptu"
    harp.set_input_delay(1, 10)
    harp.reset()
    assert harp.input1.offset() == 0.0
    assert harp._sn.deviceConfig["ChansCfg"][0]["ChanOffs"] == 0
    harp.safe_state()
    harp.safe_state()  # idempotent


def test_missing_or_garbage_file_names_the_instrument(tmp_path: Path) -> None:
    with pytest.raises(PicoQuantHarpCommunicationError, match="hh: no PTU file"):
        PicoQuantHarp("hh", (tmp_path / "nope.ptu").as_uri())
    junk = tmp_path / "junk.ptu"
    junk.write_bytes(b"not a PTU file" * 10)
    with pytest.raises(PicoQuantHarpError, match=r"hh: .*(cannot open|not a T2)"):
        PicoQuantHarp("hh", junk.as_uri())
    with pytest.raises(ValueError, match="block_records"):
        PicoQuantHarp("hh", junk.as_uri(), block_records=1000)


def test_only_one_instance_holds_snapi(harp: PicoQuantHarp,
                                       bench_file: PtuWriteResult) -> None:
    with pytest.raises(PicoQuantHarpError, match="another PicoQuantHarp holds snAPI"):
        PicoQuantHarp("hh2", bench_file.address)


def test_truncated_file_reports_host_side_loss(tmp_path: Path) -> None:
    """A file shorter than its header says (interrupted copy): the shortfall is reported."""
    srv = serve("cut", Bench(BenchConfig(), seed=2),
                {"duration": "0.02", "dir": str(tmp_path)})
    srv.start()
    assert srv.result is not None
    srv.truncate_file(4 * 1000)
    with PicoQuantHarp("cut", srv.address) as hh:
        blocks = list(hh.stream())
    reported = sum(b.lost_tags for b in blocks)
    assert any(b.overflow for b in blocks)
    assert reported == 1000
    assert sum(len(b) for b in blocks) < sum(srv.result.written.values())
    path = srv.path
    srv.stop()
    assert not path.exists()


def test_launcher_shim_records_the_bench(tmp_path: Path) -> None:
    srv = serve("hh", Bench(BenchConfig(), seed=5), {"duration": "0.01"})
    srv.start()
    assert srv.address.startswith("file://")
    assert srv.result is not None
    with PicoQuantHarp("hh", srv.address) as hh:
        assert hh.acquire(0.01).counts() == srv.result.written
    folder = srv.path.parent
    srv.stop()
    assert not folder.exists()
    with pytest.raises(ValueError, match="unknown PicoQuant mock option"):
        serve("x", None, {"bogus": "1"})
    with pytest.raises(ValueError, match="needs the bench"):
        serve("x", None, {}).start()
