"""Swabian Time Tagger driver, tested through a FAITHFUL FAKE of the vendor library.

Swabian's real library (``swabian-timetagger``, ``from Swabian import TimeTagger``)
cannot run without a device: its virtual tagger needs a licence fetched from connected
hardware.  These tests therefore drive :class:`SwabianTimeTagger` through
``qkdlab.mock_instruments.swabian.fake_timetagger``, which reproduces the API subset
the driver uses on top of the bench physics model.  When the real wheel is installed,
the first tests check that the fake's names, signatures and constants match it and
that the driver reports the real library's "no device" error clearly.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from qkdlab.drivers.roles import TimeTagger
from qkdlab.drivers.swabian.timetagger import (
    SwabianTimeTagger,
    SwabianTimeTaggerError,
)
from qkdlab.mock_instruments.bench import Bench, config_from_mapping
from qkdlab.mock_instruments.swabian import fake_timetagger as fake
from qkdlab.tags import TagBlock

PS = 10**12
SYNC = 5  # tagger input of the bench's sync channel 0 (first input no detector uses)
DETECTORS = (1, 2, 3, 4)


def make_bench(rep_hz: float = 100e6, frame_pulses: int = 12, seed: int = 1,
               **extra: Any) -> Bench:
    """Bench with markers every ``frame_pulses`` pulses (sync rate rep/frame)."""
    sections: dict[str, Any] = {"alice": {"rep_rate_hz": rep_hz,
                                          "pattern": {"frame_pulses": frame_pulses}}}
    sections.update(extra)
    return Bench(config_from_mapping(sections), seed=seed)


@pytest.fixture
def lib() -> fake.FakeSwabianLibrary:
    return fake.FakeSwabianLibrary()


def open_tagger(lib: fake.FakeSwabianLibrary, bench: Bench, model: str = "Time Tagger Ultra",
                name: str = "tt", device: dict[str, Any] | None = None,
                **kwargs: Any) -> tuple[SwabianTimeTagger, fake.FakeDevice]:
    dev = lib.attach(bench, model=model, **(device or {}))
    kwargs.setdefault("poll_interval_s", 0.0)
    return SwabianTimeTagger(name, library=lib, **kwargs), dev


def non_paralysable(times: np.ndarray, dead_ps: int) -> np.ndarray:
    kept: list[int] = []
    for t in times.tolist():
        if not kept or t - kept[-1] >= dead_ps:
            kept.append(t)
    return np.array(kept, np.int64)


# ------------------------------------------------------------------ the real library


def test_fake_matches_the_real_library_api() -> None:
    real = pytest.importorskip("Swabian.TimeTagger")
    for name in ("createTimeTagger", "createTimeTaggerVirtual", "freeTimeTagger",
                 "getVersion", "scanTimeTagger", "TimeTagStream", "TimeTagStreamBuffer",
                 "Countrate", "Correlation"):
        assert hasattr(real, name), name
        assert hasattr(fake, name) or hasattr(fake.FakeSwabianLibrary, name), name
    assert fake.CHANNEL_UNUSED == real.CHANNEL_UNUSED
    assert {k: int(v) for k, v in real.TagType.__members__.items()} == {
        k: int(v) for k, v in fake.TagType.__members__.items()}
    tagger_methods = ("getSerial", "getModel", "getPsPerClock", "reset", "setTriggerLevel",
                      "getTriggerLevel", "getTriggerLevelRange", "setInputDelay",
                      "getInputDelay", "setDeadtime", "getDeadtime", "getDeadtimeRange",
                      "setHardwareBufferSize", "getHardwareBufferSize", "getOverflows",
                      "clearOverflows")
    for m in tagger_methods:
        assert hasattr(real.TimeTagger, m), m
        assert hasattr(fake.FakeTimeTagger, m), m
    for m in ("start", "startFor", "stop", "clear", "abort", "isRunning",
              "waitUntilFinished", "getCaptureDuration"):
        for cls in ("TimeTagStream", "Countrate", "Correlation"):
            assert hasattr(getattr(real, cls), m), (cls, m)
            assert hasattr(getattr(fake, cls), m), (cls, m)
    for m in ("getData", "getCounts"):
        assert hasattr(real.TimeTagStream, m)
        assert hasattr(fake.TimeTagStream, m)
    for m in ("getData", "getCountsTotal"):
        assert hasattr(real.Countrate, m)
        assert hasattr(fake.Countrate, m)
    for m in ("getData", "getIndex"):
        assert hasattr(real.Correlation, m)
        assert hasattr(fake.Correlation, m)
    for m in ("getTimestamps", "getChannels", "getEventTypes", "getMissedEvents"):
        assert callable(getattr(real.TimeTagStreamBuffer, m))
        assert callable(getattr(fake.TimeTagStreamBuffer, m))
    for prop in ("size", "hasOverflows", "tStart", "tGetData"):  # properties in both
        assert isinstance(getattr(real.TimeTagStreamBuffer, prop), property), prop
        assert isinstance(getattr(fake.TimeTagStreamBuffer, prop), property), prop

    def names(f: Any) -> list[str]:
        return [p for p in inspect.signature(f).parameters if p != "self"]

    pairs = [(real.TimeTagger.setDeadtime, fake.FakeTimeTagger.setDeadtime),
             (real.TimeTagger.setTriggerLevel, fake.FakeTimeTagger.setTriggerLevel),
             (real.TimeTagger.setInputDelay, fake.FakeTimeTagger.setInputDelay),
             (real.TimeTagStream.__init__, fake.TimeTagStream.__init__),
             (real.Countrate.__init__, fake.Countrate.__init__),
             (real.IteratorBase.startFor, fake.TimeTagStream.startFor),
             (real.IteratorBase.waitUntilFinished, fake.TimeTagStream.waitUntilFinished)]
    for real_f, fake_f in pairs:
        assert names(real_f) == names(fake_f), real_f.__qualname__


def test_real_library_without_a_device_gives_a_clear_error() -> None:
    pytest.importorskip("Swabian.TimeTagger")
    with pytest.raises(SwabianTimeTaggerError, match=r"tt: createTimeTagger.*failed"):
        SwabianTimeTagger("tt", library="Swabian.TimeTagger")
    with pytest.raises(SwabianTimeTaggerError, match=r"tt: createTimeTagger"):
        SwabianTimeTagger("tt")  # default: imports Swabian.TimeTagger; name was released


def test_missing_library_module_is_reported() -> None:
    with pytest.raises(SwabianTimeTaggerError, match="no_such_timetagger_lib"):
        SwabianTimeTagger("tt", library="no_such_timetagger_lib")


# ------------------------------------------------------------------ identity, parameters


def test_identity_role_and_parameters(lib: fake.FakeSwabianLibrary) -> None:
    tt, dev = open_tagger(lib, make_bench(), model="Time Tagger Ultra", serial="")
    assert isinstance(tt, TimeTagger)
    idn = tt.get_idn()
    assert idn == {"vendor": "Swabian Instruments", "model": "Time Tagger Ultra",
                   "serial": dev.serial, "firmware": f"library {fake.FAKE_VERSION}"}
    assert tt.model() == "Time Tagger Ultra"
    assert tt.serial_number() == dev.serial
    assert [inp.channel for inp in tt.inputs] == list(range(1, 9))
    assert tt.ch3.trigger_level.unit == "V"
    assert tt.ch3.input_delay.unit == "s"
    assert tt.ch3.dead_time.unit == "s"
    assert dev.in_use


def test_trigger_level_round_trip_reads_back_the_dac(lib: fake.FakeSwabianLibrary) -> None:
    tt, _ = open_tagger(lib, make_bench())
    step = 5.0 / (2**fake.DAC_BITS - 1)  # Ultra: −2.5…2.5 V
    tt.ch2.trigger_level(0.3)
    got = tt.ch2.trigger_level.get()
    assert got == tt.tagger.getTriggerLevel(2)
    assert abs(got - 0.3) <= step / 2
    assert got != 0.3
    tt.set_trigger_level(4, -1.25)
    assert tt.ch4.trigger_level() == pytest.approx(-1.25, abs=step)


def test_input_delay_round_trip_in_seconds_and_integer_ps(
        lib: fake.FakeSwabianLibrary) -> None:
    tt, _ = open_tagger(lib, make_bench())
    tt.ch1.input_delay(1.234567e-6)
    assert tt.tagger.getInputDelay(1) == 1_234_567
    assert tt.ch1.input_delay.get() == pytest.approx(1.234567e-6, abs=1e-18)
    tt.set_input_delay(2, -2_500_001)
    assert tt.tagger.getInputDelay(2) == -2_500_001
    assert tt.ch2.input_delay() == pytest.approx(-2.500001e-6, abs=1e-18)
    with pytest.raises(ValueError, match="integer"):
        tt.set_input_delay(2, 1.5)


def test_dead_time_reports_the_value_the_device_applied(
        lib: fake.FakeSwabianLibrary) -> None:
    tt20, _ = open_tagger(lib, make_bench(), model="Time Tagger 20", name="tt20")
    tt20.ch1.dead_time(10e-9)  # TT20 rounds to its 6 ns clock
    assert tt20.ch1.dead_time.get() == pytest.approx(12e-9)
    tt20.set_dead_time(2, 20_000)
    assert tt20.ch2.dead_time.cache.get() == pytest.approx(18e-9)
    ultra, _ = open_tagger(lib, make_bench(), model="Time Tagger Ultra", name="ultra")
    ultra.ch1.dead_time(10e-9)  # arbitrary above 2 ns on the Ultra
    assert ultra.ch1.dead_time() == pytest.approx(10e-9)
    assert ultra.tagger.getDeadtime(1) == 10_000


@pytest.mark.parametrize(
    ("model", "param", "value", "range_text"),
    [("Time Tagger Ultra", "trigger_level", 3.0, "-2.5"),
     ("Time Tagger 20", "trigger_level", -0.1, "0.0"),
     ("Time Tagger X", "trigger_level", 1.2, "1.0"),
     ("Time Tagger Ultra", "dead_time", 1e-9, "2e-09"),
     ("Time Tagger 20", "dead_time", 400e-6, "0.000393"),
     ("Time Tagger Ultra", "input_delay", 2e-3, "0.001")])
def test_validators_raise_before_the_library_is_called(
        lib: fake.FakeSwabianLibrary, model: str, param: str, value: float,
        range_text: str) -> None:
    tt, _ = open_tagger(lib, make_bench(), model=model)
    before = (tt.tagger.getTriggerLevel(3), tt.tagger.getDeadtime(3),
              tt.tagger.getInputDelay(3))
    with pytest.raises(ValueError, match=rf"(?s){range_text}.*tt_ch3_{param}"):
        getattr(tt.ch3, param)(value)
    assert (tt.tagger.getTriggerLevel(3), tt.tagger.getDeadtime(3),
            tt.tagger.getInputDelay(3)) == before


def test_argument_validation(lib: fake.FakeSwabianLibrary) -> None:
    tt, _ = open_tagger(lib, make_bench(), channels=(1, 2, 5))
    with pytest.raises(ValueError, match="channel 9"):
        tt.set_trigger_level(9, 0.5)
    with pytest.raises(ValueError, match="duration"):
        tt.acquire(0.0)
    with pytest.raises(ValueError, match="duration"):
        tt.stream(-1.0)
    with pytest.raises(ValueError, match="binwidth"):
        tt.correlation(1, 5, 0, 100, 0.01)
    with pytest.raises(ValueError, match="channel 3"):
        tt.count_rates([3])
    with pytest.raises(ValueError, match="channels"):
        SwabianTimeTagger("bad", library=lib, channels=(1, 1))


def test_reset_restores_start_up_settings(lib: fake.FakeSwabianLibrary) -> None:
    tt, _ = open_tagger(lib, make_bench())
    tt.ch1.trigger_level(1.5)
    tt.ch1.input_delay(1e-6)
    tt.reset()
    assert not tt.ch1.trigger_level.cache.valid
    assert tt.ch1.trigger_level() == pytest.approx(0.5, abs=1e-3)
    assert tt.ch1.input_delay() == 0.0
    assert tt.ch1.dead_time() == pytest.approx(2e-9)


# ------------------------------------------------------------------ acquisition


def test_acquire_equals_the_bench_ground_truth(lib: fake.FakeSwabianLibrary) -> None:
    bench = make_bench()
    tt, dev = open_tagger(lib, bench)
    block = tt.acquire(0.1)
    assert isinstance(block, TagBlock)
    assert block.duration_ps == PS // 10
    assert not block.overflow
    assert block.lost_tags == 0
    assert block.overflow_intervals.shape == (0, 2)
    truth_t, truth_c = dev.truth(block.start_ps, block.stop_ps)
    assert np.array_equal(block.time_ps, truth_t)
    assert np.array_equal(block.channel, truth_c.astype(np.int16))
    assert tt.last_stream_stats.lost_tags == 0
    # physics: markers every 12 pulses at 100 MHz; detectors dead-time limited
    n_sync = block.counts([SYNC])[SYNC]
    assert abs(n_sync - 0.1 * 100e6 / 12) <= 1
    expected = bench.expected_click_rates()
    dead = bench.bob.detectors[0].dead_time_s
    for d, ch in enumerate(DETECTORS):
        rate = block.counts([ch])[ch] / 0.1
        assert rate == pytest.approx(expected[d] / (1 + expected[d] * dead), rel=0.08)


def test_delays_shift_each_channel_exactly(lib: fake.FakeSwabianLibrary) -> None:
    tt, dev = open_tagger(lib, make_bench())
    tt.set_input_delay(2, 3_000_000)  # beyond the Ultra's ±2 µs hardware range
    tt.set_input_delay(3, -1_500_000)
    block = tt.acquire(0.05)
    assert bool(np.all(np.diff(block.time_ps) >= 0))
    t, c = dev.truth(block.start_ps - 3_000_000, block.stop_ps + 1_500_000)
    for ch, delay in ((1, 0), (2, 3_000_000), (3, -1_500_000), (SYNC, 0)):
        shifted = t[c == ch] + delay
        want = shifted[(shifted >= block.start_ps) & (shifted < block.stop_ps)]
        assert np.array_equal(block.select(ch), want), ch


def test_dead_time_is_non_paralysable_per_input(lib: fake.FakeSwabianLibrary) -> None:
    tt, dev = open_tagger(lib, make_bench())
    tt.set_dead_time(1, 50_000_000)  # 50 µs > the detector's own 10 µs
    block = tt.acquire(0.1)
    truth_t, truth_c = dev.truth(-(2**62), block.stop_ps)
    raw = truth_t[truth_c == 1]
    want = non_paralysable(raw, 50_000_000)
    got = block.select(1)
    assert np.array_equal(got, want[want >= block.start_ps])
    assert np.diff(got).min() >= 50_000_000
    assert got.size < raw.size  # the dead time removed tags
    assert dev.ledger.dead_time_suppressed[1] == raw.size - want.size
    other_t, other_c = dev.truth(block.start_ps, block.stop_ps)
    assert np.array_equal(block.select(2), other_t[other_c == 2])  # untouched


def test_trigger_level_above_the_pulse_gives_no_tags(lib: fake.FakeSwabianLibrary) -> None:
    tt, dev = open_tagger(lib, make_bench(), device={"pulse_amplitude_v": 1.0})
    tt.set_trigger_level(1, 1.2)
    tt.set_trigger_level(2, -0.2)  # below the 0 V baseline: the input never crosses it
    block = tt.acquire(0.05)
    t, c = dev.truth(block.start_ps, block.stop_ps)
    assert block.counts([1, 2]) == {1: 0, 2: 0}
    assert np.count_nonzero(c == 1) > 1000
    assert dev.ledger.trigger_suppressed[1] == np.count_nonzero(c == 1)
    assert np.array_equal(block.select(3), t[c == 3])
    tt.set_trigger_level(1, 0.9)
    assert len(tt.acquire(0.01).select(1)) > 0


@pytest.mark.parametrize(("frame_pulses", "lossy"), [(12, False), (10, True)])
def test_overflow_is_reported_above_the_sustained_rate(
        lib: fake.FakeSwabianLibrary, frame_pulses: int, lossy: bool) -> None:
    # TT20: ~9 M tags/s sustained; a 32 k-tag device buffer so that it fills quickly.
    # 100 MHz / 12 = 8.3 M/s (+0.3 M/s detectors) stays below, 100 MHz / 10 goes above.
    tt, dev = open_tagger(lib, make_bench(frame_pulses=frame_pulses),
                          model="Time Tagger 20", device={"buffer_tags": 2**15})
    block = tt.acquire(0.05)
    t, _ = dev.truth(block.start_ps, block.stop_ps)
    assert len(block) + block.lost_tags == t.size  # every tag delivered or counted
    assert block.lost_tags == dev.ledger.total("missed")
    if not lossy:
        assert not block.overflow
        assert block.lost_tags == 0
        return
    assert block.overflow
    assert block.lost_tags > 20_000
    iv = block.overflow_intervals
    assert iv.shape[0] >= 2
    assert bool(np.all(iv[:, 0] < iv[:, 1]))
    assert iv.min() >= block.start_ps
    assert iv.max() <= block.stop_ps
    inside = np.zeros(len(block), bool)
    for b, e in iv.tolist():
        inside |= (block.time_ps >= b) & (block.time_ps < e)
    assert not inside.any()  # overflow mode drops all timing inside the intervals
    # the link drains 9 M tags/s all along; what is delivered beyond sits in the buffer
    assert 9e6 * 0.05 <= len(block) <= 9e6 * 0.05 + 2**15
    assert tt.last_stream_stats.overflow_blocks >= 2


def test_missed_event_counts_arrive_as_uint16_chunks(lib: fake.FakeSwabianLibrary) -> None:
    # a slow 1 M tags/s link: each overflow interval misses far more than 65535 tags
    tt, dev = open_tagger(lib, make_bench(frame_pulses=6), model="Time Tagger 20",
                          device={"buffer_tags": 2**15, "max_rate_hz": 1e6})
    stream = fake.TimeTagStream(tt.tagger, 2**21, [SYNC])
    stream.startFor(20 * 10**9)
    stream.waitUntilFinished()
    buf = stream.getData()
    kinds = buf.getEventTypes()
    missed = buf.getMissedEvents()[kinds == fake.TagType.MissedEvents]
    assert missed.max() == fake.MAX_MISSED_PER_TAG
    assert missed.size > 1
    assert int(missed.sum()) == dev.ledger.missed[SYNC]
    assert buf.hasOverflows


def test_stream_memory_is_bounded_by_the_buffer(lib: fake.FakeSwabianLibrary) -> None:
    n_max = 2**18  # one 20 ms poll at ~8.6 M tags/s holds ~172 k events
    tt, dev = open_tagger(lib, make_bench(), stream_buffer_events=n_max)
    blocks: list[TagBlock] = []
    fake_streams: list[Any] = []
    for block in tt.stream(0.2):
        fake_streams.extend(tt._active)
        assert len(block) <= n_max
        blocks.append(block)
    assert len(blocks) == 10
    for a, b in itertools.pairwise(blocks):
        assert b.start_ps == a.stop_ps
    stats = tt.last_stream_stats
    assert 0 < stats.peak_buffer_events <= n_max
    assert stats.n_max_events == n_max
    assert stats.buffer_full_blocks == 0
    assert stats.overflow_blocks == 0
    assert max(s.peak_size for s in fake_streams) <= n_max
    whole = TagBlock.concatenate(blocks)
    t, _ = dev.truth(whole.start_ps, whole.stop_ps)
    assert np.array_equal(whole.time_ps, t)
    assert not tt._active  # the TimeTagStream was stopped and released


def test_a_full_stream_buffer_is_reported_not_silent(lib: fake.FakeSwabianLibrary) -> None:
    n_max = 4096
    tt, dev = open_tagger(lib, make_bench(), stream_buffer_events=n_max)
    blocks = list(tt.stream(0.06))
    assert blocks
    assert all(len(b) == n_max for b in blocks)
    assert all(b.overflow and b.overflow_intervals.shape[0] == 1 for b in blocks)
    for b in blocks:  # everything after the last tag of the buffer is suspect
        assert b.overflow_intervals[0, 0] == b.time_ps[-1] + 1
        assert b.overflow_intervals[0, 1] == b.stop_ps
    assert tt.last_stream_stats.buffer_full_blocks == len(blocks)
    assert dev.ledger.total("sent") > len(blocks) * n_max


def test_endless_stream_stops_on_safe_state_and_on_close(
        lib: fake.FakeSwabianLibrary) -> None:
    tt, _ = open_tagger(lib, make_bench())
    gen: Iterator[TagBlock] = tt.stream()
    first = [next(gen) for _ in range(3)]
    assert [b.duration_ps for b in first] == [20 * 10**9] * 3
    meas = tt._active[0]
    assert meas.isRunning()
    tt.safe_state()
    rest = list(gen)  # the stream ends after at most one more poll
    assert len(rest) <= 1
    assert not meas.isRunning()
    gen2 = tt.stream()
    next(gen2)
    meas2 = tt._active[0]
    gen2.close()  # GeneratorExit: the measurement is stopped, no longer tracked
    assert not meas2.isRunning()
    assert not tt._active


def test_error_event_marks_the_block(lib: fake.FakeSwabianLibrary) -> None:
    tt, dev = open_tagger(lib, make_bench())
    dev.inject_error()
    block = tt.acquire(0.04)
    assert block.overflow
    assert block.lost_tags == 0
    assert tt.last_stream_stats.error_tags == 1
    assert block.overflow_intervals.tolist() == [[block.start_ps, block.start_ps
                                                  + 20 * 10**9]]


# ------------------------------------------------------------------ rates, correlation


def test_count_rates_follow_the_bench_physics(lib: fake.FakeSwabianLibrary) -> None:
    bench = make_bench()
    tt, _ = open_tagger(lib, bench, channels=(1, 2, 3, 4, 5), count_integration_s=0.1)
    rates = tt.count_rates()
    assert rates[4] == pytest.approx(100e6 / 12, abs=20)  # sync: exact up to ±1 count
    expected = bench.expected_click_rates()
    dead = bench.bob.detectors[0].dead_time_s
    for d in range(4):
        assert rates[d] == pytest.approx(expected[d] / (1 + expected[d] * dead), rel=0.08)


def test_count_rates_stay_right_in_overflow(lib: fake.FakeSwabianLibrary) -> None:
    tt, dev = open_tagger(lib, make_bench(frame_pulses=6), model="Time Tagger 20",
                          device={"buffer_tags": 2**15}, count_integration_s=0.02)
    rates = tt.count_rates([SYNC])
    assert dev.ledger.total("missed") > 0  # the link did overflow
    assert rates[0] == pytest.approx(100e6 / 6, abs=100)


def test_correlation_shows_the_pulse_period_comb(lib: fake.FakeSwabianLibrary) -> None:
    # markers every 10 pulses at 100 MHz: a detector–sync correlation is a comb with the
    # 10 ns pulse period, at the phase (fibre delay − marker cable delay) mod 10 ns
    bench = make_bench(frame_pulses=10, bob={"detectors": {"dead_time_s": 1e-6}})
    tt, _ = open_tagger(lib, bench)
    period_ps = 10_000
    binwidth = 100
    res = tt.correlation(1, SYNC, binwidth, 2000, 0.05)
    assert res.duration_ps == 5 * 10**10
    assert res.delay_ps.size == res.counts.size == 2000
    assert int(np.diff(res.delay_ps).min()) == binwidth
    centre = res.delay_ps + binwidth // 2
    phase = (centre % period_ps) // binwidth  # 100 phase bins per pulse period
    folded = np.bincount(phase, weights=res.counts, minlength=100)
    peak = int(np.argmax(folded))
    want = (bench.propagation_delay_ps() - bench.alice.marker_delay_ps) % period_ps
    assert abs((peak * binwidth + binwidth / 2) - want) <= 2 * binwidth
    assert folded[peak] > 0.3 * folded.sum()  # σ ≈ 100 ps jitter: most pairs in the peak
    spectrum = np.abs(np.fft.rfft(res.counts - res.counts.mean()))
    span_ps = 2000 * binwidth
    assert int(np.argmax(spectrum[1:])) + 1 == span_ps // period_ps  # comb frequency


# ------------------------------------------------------------------ device lifecycle


def test_unplug_gives_a_clear_error_and_reconnect_restores_settings(
        lib: fake.FakeSwabianLibrary) -> None:
    tt, dev = open_tagger(lib, make_bench())
    tt.ch1.trigger_level(0.7)
    tt.ch2.input_delay(1e-9)
    tt.ch3.dead_time(5e-9)
    gen = tt.stream(1.0)
    next(gen)
    dev.unplug()  # in the middle of a stream
    with pytest.raises(SwabianTimeTaggerError,
                       match=r"tt: TimeTagStream.getData\(\) failed after 1 blocks.*USB"):
        next(gen)
    assert not tt._active
    with pytest.raises(SwabianTimeTaggerError, match=r"tt: .*disconnected"):
        tt.acquire(0.01)
    with pytest.raises(SwabianTimeTaggerError, match=r"tt: getTriggerLevel\(1\).*USB"):
        tt.tagger and tt.call("getTriggerLevel", 1)
    dev.replug()
    tt.reconnect()
    assert tt.tagger.getTriggerLevel(1) == pytest.approx(0.7, abs=2e-3)
    assert tt.tagger.getInputDelay(2) == 1000
    assert tt.tagger.getDeadtime(3) == 5000
    assert len(tt.acquire(0.01)) > 0


def test_device_in_use_unknown_serial_and_close(lib: fake.FakeSwabianLibrary) -> None:
    tt, dev = open_tagger(lib, make_bench())
    with pytest.raises(SwabianTimeTaggerError, match=r"second: createTimeTagger.*in use"):
        SwabianTimeTagger("second", library=lib)
    with pytest.raises(SwabianTimeTaggerError, match="'NOPE'"):
        SwabianTimeTagger("third", "NOPE", library=lib)
    tt.close()
    assert not dev.in_use
    tt.safe_state()  # after close: must not raise
    again = SwabianTimeTagger("second", dev.serial, library=lib)
    assert again.serial_number() == dev.serial


def test_module_level_fake_library_and_virtual_tagger() -> None:
    fake.detach_all()
    try:
        fake._default._licensed = False  # no device seen yet: no licence
        with pytest.raises(RuntimeError, match="license"):
            fake.createTimeTaggerVirtual()
        dev = fake.attach(make_bench(), model="Time Tagger X")
        tt = SwabianTimeTagger("ttx", library=fake, channels=(1, 5))
        assert tt.get_idn()["model"] == "Time Tagger X"
        assert tt.ch1.trigger_level.vals is not None
        assert len(tt.acquire(0.01).select(SYNC)) > 0
        virtual = fake.createTimeTaggerVirtual()
        assert virtual.getModel() == "Time Tagger Virtual"
        assert virtual.getTriggerLevel(18) == pytest.approx(0.5, abs=1e-3)
        fake.freeTimeTagger(virtual)
        tt.close()
        assert not dev.in_use
    finally:
        fake.detach_all()


def test_a_measurement_that_never_finishes_times_out_clearly(
        lib: fake.FakeSwabianLibrary, monkeypatch: pytest.MonkeyPatch) -> None:
    tt, _ = open_tagger(lib, make_bench(), count_integration_s=0.01)
    monkeypatch.setattr(fake.Countrate, "waitUntilFinished",
                        lambda self, timeout=-1: False)
    with pytest.raises(SwabianTimeTaggerError,
                       match=r"tt: Countrate did not finish within 10010 ms"):
        tt.count_rates()
    assert not tt._active


def test_an_inconsistent_stream_buffer_is_rejected(
        lib: fake.FakeSwabianLibrary, monkeypatch: pytest.MonkeyPatch) -> None:
    tt, _ = open_tagger(lib, make_bench())
    real_channels = fake.TimeTagStreamBuffer.getChannels
    monkeypatch.setattr(fake.TimeTagStreamBuffer, "getChannels",
                        lambda self: real_channels(self)[:-1])
    with pytest.raises(SwabianTimeTaggerError, match=r"tt: inconsistent stream buffer"):
        tt.acquire(0.01)
    assert not tt._active
