"""Measurement primitives shared by the loops: light, power, tags, BB84 frames, datasets.

Everything goes through roles.  A BB84 *frame* here is one short acquisition right
after a pattern restart, synchronised (qubit-based; a previous solution's period and
channel delays are reused when given) and processed by the experiment's
:class:`~qkdlab.experiments.bb84.processing.FrameProcessor` — the same numbers a run
produces.

The pulse offset is found by :func:`resolve_offset_any_rotation`, which correlates the
detections of each basis with Alice's bits of *both* bases and adds the squared
correlations: unlike the run's search (same-basis, signed), it locks on whatever
polarization rotation the channel applies — a misaligned or swapped-basis link
included — which is what a polarization calibration starts from.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from qkdlab.calibration.config import CalibrationConfig, CalibrationRoles, Pattern
from qkdlab.calibration.records import CalibrationError, CalibrationRecord, Quantity
from qkdlab.calibration.store import CalibrationStore
from qkdlab.experiments.bb84.processing import BB84Settings, FrameProcessor, FrameStats
from qkdlab.experiments.bb84.sync import (
    SymbolFn,
    SyncError,
    SyncSolution,
    assign,
    channel_phases,
    estimate_period_from_detections,
    refine,
    resolve_channel_shifts,
)
from qkdlab.tags import TagBlock

FloatArray = npt.NDArray[np.float64]


@dataclass
class CalibrationContext:
    """Roles, bench knowledge, record store and randomness of one calibration session.

    Attributes:
        roles: the instruments.
        config: bench knowledge and loop settings.
        store: where records go (its clock stamps them).
        rng: every random choice of a loop (restarts of the optimiser) draws from it.
        save_datasets: write a QCoDeS dataset per measurement (into the database QCoDeS
            is configured for).
    """

    roles: CalibrationRoles
    config: CalibrationConfig
    store: CalibrationStore
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    save_datasets: bool = True
    _pattern: Pattern | None = None
    _offset_hint: int | None = None

    def now(self) -> float:
        return self.store.clock()

    def make_record(self, node: str, quantities: dict[str, Quantity],
                    settings: Mapping[str, Any], dataset: tuple[int | None, str | None],
                    *, good: bool = True, note: str = "") -> CalibrationRecord:
        """A record stamped now, valid for the node's validity time."""
        now = self.now()
        return CalibrationRecord(node=node, quantities=quantities, created_s=now,
                                 valid_until_s=now + self.config.validity(node),
                                 settings=dict(settings), dataset_id=dataset[0],
                                 dataset_guid=dataset[1], good=good, note=note)

    def latest_good(self, node: str) -> CalibrationRecord | None:
        """Latest good record of ``node`` (stale or not), for loops that build on it."""
        record = self.store.latest(node)
        return record if record is not None and record.good else None

    # -- light ------------------------------------------------------------------------------
    def light(self, on: bool) -> None:
        """Laser on (operating point from ``laser_settings`` first) or off."""
        laser = self.roles.laser
        if laser is None:
            if not on:
                raise CalibrationError("no laser role: cannot switch the light off")
            return
        if on:
            parameters = getattr(laser, "parameters", {})
            for name, value in self.roles.laser_settings.items():
                if name not in parameters:
                    raise CalibrationError(f"laser has no parameter {name!r} (laser_settings)")
                parameters[name](value)
            if not laser.is_on():
                laser.output_on()
        elif laser.is_on():
            laser.output_off()

    def operating_attenuation_db(self) -> float | None:
        """Alice's attenuation at the operating point (dB): the latest good ``mu``
        record's, else the station's (``roles: attenuation_db``), else unknown."""
        mu = self.latest_good("mu")
        if mu is not None and "attenuation_db" in mu.settings:
            return float(mu.settings["attenuation_db"])
        return self.roles.attenuation_db

    def operating_point(self) -> None:
        """Bob's detector units and Alice's attenuator to their operating points, as a
        loop expects to find them (a run's safe state left the bias ramped down and the
        attenuator at its highest setting).  Idempotent: what is there is only read."""
        for unit in self.roles.detector_units.values():
            unit.enable()
        attenuator, target = self.roles.attenuator, self.operating_attenuation_db()
        if (attenuator is not None and target is not None
                and abs(attenuator.get_attenuation_db() - target) > 0.005):
            attenuator.set_attenuation_db(target)

    def use_pattern(self, pattern: Pattern) -> None:
        """Load ``pattern`` into the transmitter (only if it changed) and restart it."""
        tx = self.roles.transmitter
        tx.stop()
        if pattern != self._pattern:
            tx.configure(seed=pattern.seed, p_z=pattern.p_z, p_signal=pattern.p_signal,
                         p_decoy=pattern.p_decoy, frame_pulses=pattern.frame_pulses,
                         rep_rate_hz=self.config.rep_rate_hz)
            self._pattern = pattern
        tx.start()

    def restart_pattern(self) -> None:
        """Restart the loaded pattern (its counter back to 0: a small sync offset)."""
        if self._pattern is None:
            raise CalibrationError("restart_pattern before any pattern was loaded")
        self.roles.transmitter.stop()
        self.roles.transmitter.start()

    def signal_transmission(self) -> tuple[float, float]:
        """Modulator transmission of the signal class between the power meter and Alice's
        output, with its 1σ error: 1 when the meter is after the modulator, else
        T_max = 1/(1 + 10^(−ER/10)) from the bias record (the bias at its working point).
        """
        if not self.config.meter_before_modulator:
            return 1.0, 0.0
        bias = self.latest_good("bias")
        if bias is None:
            raise CalibrationError("the power meter sits before the modulator: the photon "
                                   "flux needs a bias calibration (extinction ratio) first")
        er = bias.value("extinction_ratio_db")
        r = 10 ** (-er / 10)
        t = 1 / (1 + r)
        err = r * math.log(10) / 10 * t**2 * bias.uncertainty("extinction_ratio_db")
        return t, err if math.isfinite(err) else r

    # -- power -----------------------------------------------------------------------------
    def read_power(self, n: int = 3) -> tuple[float, float]:
        """Mean optical power (W) of ``n`` readings and its standard error."""
        meter = self.roles.power_meter
        if meter is None:
            raise CalibrationError("no power_meter role in the station")
        values = np.array([meter.read_power_w() for _ in range(n)])
        err = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        return float(values.mean()), err

    def power_above_background(self, n: int = 3) -> tuple[float, float, float]:
        """(P, σ_P, background) in W: light on minus light off (dark offset of the meter)."""
        self.light(False)
        bg, bg_err = self.read_power(n)
        self.light(True)
        p, p_err = self.read_power(n)
        return p - bg, math.hypot(p_err, bg_err), bg

    # -- tags ------------------------------------------------------------------------------
    def acquire(self, duration_s: float) -> TagBlock:
        """One block of ``duration_s`` s (overflow is an error: rates would be wrong)."""
        block = self.roles.tagger.acquire(duration_s)
        if block.overflow:
            raise CalibrationError(f"tagger lost {block.lost_tags} tags in a {duration_s} s "
                                   "acquisition: count rates would be wrong")
        return block

    def rates(self, block: TagBlock) -> dict[int, float]:
        """Tag rate (Hz) of each detector channel in ``block``."""
        duration = block.duration_ps * 1e-12
        counts = block.counts(self.roles.detectors.channel_list)
        return {c: n / duration for c, n in counts.items()}

    def bb84_settings(self, window_ps: float | None = None) -> BB84Settings:
        """Processing settings for calibration frames (the run's pattern, qubit sync)."""
        p = self.config.pattern
        timing = self.latest_good("timing")
        if window_ps is None:
            window_ps = timing.value("window_ps") if timing is not None \
                else self.config.window_ps
        return BB84Settings(rep_rate_hz=self.config.rep_rate_hz, p_z=p.p_z,
                            p_signal=p.p_signal, p_decoy=p.p_decoy,
                            frame_pulses=p.frame_pulses, use_sync_channel=False,
                            window_ps=window_ps, seed=p.seed, sync_detections=1)

    def frame(self, duration_s: float, settings: BB84Settings,
              known: SyncSolution | None = None) -> tuple[FrameStats, SyncSolution, TagBlock]:
        """Restart the pattern, acquire, synchronise and process one frame."""
        self.restart_pattern()
        block = self.acquire(duration_s)
        sol = None
        if known is not None and self._offset_hint is not None:
            # a restart lands about where the last one did: search near it first
            hint = (self._offset_hint - 4096, self._offset_hint + 4096)
            try:
                sol = sync_block(block, self.roles, settings, hint, known)
            except CalibrationError:
                sol = None
        if sol is None:
            sol = sync_block(block, self.roles, settings, self.config.sync_offset_search, known)
        self._offset_hint = pulse_offset(block, sol, self.roles)
        processor = FrameProcessor(settings, self.roles.detectors,
                                   self.roles.transmitter.record, None)
        processor.solution = sol
        stats = processor.feed(block)
        if not stats:
            raise CalibrationError("frame processing produced no frame")
        return stats[0], sol, block

    # -- datasets ---------------------------------------------------------------------------
    def save(self, name: str, setpoint: tuple[str, str, Sequence[float]],
             columns: Mapping[str, tuple[str, Sequence[float]]],
             metadata: Mapping[str, Any]) -> tuple[int | None, str | None]:
        """Write one QCoDeS dataset ``calibration/<name>``; its (run id, guid)."""
        if not self.save_datasets:
            return None, None
        return save_dataset(name, setpoint, columns, metadata)


def resolve_offset_any_rotation(pulse_number: npt.NDArray[np.int64],
                                basis: npt.NDArray[np.int8], bit: npt.NDArray[np.int8],
                                symbols: SymbolFn, search: tuple[int, int],
                                min_sigma: float = 20.0) -> tuple[int, float]:
    """Integer K with pulse_index = pulse_number + K, for any polarization rotation.

    For each detector basis b and Alice basis a the FFT cross-correlation c_ab(K) of
    the detections (±1 for the bit the detector reads) with Alice's ±1 bits in basis a
    (0 for vacuum) peaks at the true K with amplitude ∝ R_ba, the channel's rotation;
    the score Σ c_ab² peaks whatever R is.  The score's noise is χ²-like (4 degrees of
    freedom), hence the high ``min_sigma`` (robust σ units): ≈ SNR 8.5 per correlation.
    """
    lo_k, hi_k = search
    n0 = int(pulse_number.min())
    span = int(pulse_number.max()) - n0 + 1
    n_lags = hi_k - lo_k + 1
    size = 1 << int(np.ceil(np.log2(span + n_lags)))
    idx = (pulse_number - n0).astype(np.int64)
    alice_idx = n0 + lo_k + np.arange(span + n_lags - 1, dtype=np.int64)
    a_basis, a_bit, a_int = symbols(alice_idx)[:3]
    sign = ((1 - 2 * a_bit.astype(np.float32)) * (a_int != 2)).astype(np.float32)
    refs = []
    for a in (0, 1):
        ref = np.zeros(size, dtype=np.float32)
        ref[: alice_idx.size] = sign * (a_basis == a)
        refs.append(np.fft.rfft(ref))
    score = np.zeros(n_lags)
    for b in (0, 1):
        sel = basis == b
        if not sel.any():
            continue
        det = np.zeros(size, dtype=np.float32)
        np.add.at(det, idx[sel], (1.0 - 2.0 * bit[sel]).astype(np.float32))
        det_f = np.conj(np.fft.rfft(det))
        for ref_f in refs:
            score += np.fft.irfft(det_f * ref_f, size)[:n_lags] ** 2
    best = int(np.argmax(score))
    noise = np.delete(score, slice(max(best - 2, 0), best + 3))
    med = float(np.median(noise))
    sigma = 1.4826 * float(np.median(np.abs(noise - med))) if noise.size else 0.0
    significance = (score[best] - med) / sigma if sigma > 0 else np.inf
    if significance < min_sigma:
        raise SyncError(f"no pulse offset found in [{lo_k}, {hi_k}]: best peak "
                        f"{significance:.1f} σ (< {min_sigma} σ)")
    return lo_k + best, float(significance)


def pulse_offset(block: TagBlock, sol: SyncSolution, roles: CalibrationRoles) -> int:
    """Pulse index of the first detection's local pulse count 0 (the sync's K)."""
    mask = np.isin(block.channel, roles.detectors.channel_list)
    t0 = int(block.time_ps[mask][0])
    return round((t0 - sol.origin_ps) / sol.period_ps)


def sync_block(block: TagBlock, roles: CalibrationRoles, settings: BB84Settings,
               offset_search: tuple[int, int], known: SyncSolution | None = None,
               correlation_tags: int = 3000) -> SyncSolution:
    """Sync solution of one block (any polarization rotation); reuses ``known``'s
    period and channel delays when given (they do not change with polarization).
    Channel delays may differ by more than half a period (up to the settings'
    ``max_skew_periods``): :func:`~qkdlab.experiments.bb84.sync.resolve_channel_shifts`."""
    detectors = roles.detectors
    channels = detectors.channel_list
    mask = np.isin(block.channel, channels)
    t, c = block.time_ps[mask], block.channel[mask]
    if t.size < 500:
        raise CalibrationError(f"only {t.size} detections in {block.duration_ps * 1e-12:g} s: "
                               "is the light on and reaching Bob?")
    ref = channels[0]
    t_ref = int(t[0])
    try:
        if known is None:
            period = estimate_period_from_detections(t, c, settings.period_ps, settings.max_ppm)
            phases = channel_phases(t, c, period, t_ref, channels)
            delays = {ch: float((phases[ch] - phases[ref] + period / 2) % period - period / 2)
                      for ch in channels}
            origin_local = t_ref + phases[ref]
        else:
            period, delays = known.period_ps, dict(known.channel_delay_ps)
            origin_local = t_ref + channel_phases(t, c, period, t_ref, [ref])[ref]
        head = slice(0, min(correlation_tags, t.size))
        delay_arr = np.zeros(int(max(detectors.channels)) + 1)
        lut_basis = np.zeros(delay_arr.size, dtype=np.int8)
        lut_bit = np.zeros(delay_arr.size, dtype=np.int8)
        for ch, d in delays.items():
            delay_arr[ch] = d
        for ch, (b, v) in detectors.channels.items():
            lut_basis[ch], lut_bit[ch] = b, v
        n_local = np.rint((t[head] - origin_local - delay_arr[c[head]]) / period).astype(np.int64)
        k, sigma = resolve_offset_any_rotation(n_local, lut_basis[c[head]], lut_bit[c[head]],
                                               roles.transmitter.record, offset_search)
        origin = origin_local - k * period
        if known is None:
            # the phases give each delay modulo one period: the whole periods of each
            # channel against Alice's pattern (else a detector with more than half a
            # period of extra cable reads the neighbouring pulse), then the reference
            # channel's pulse 0 is the origin again
            shifts = resolve_channel_shifts(t, c, detectors, roles.transmitter.record,
                                            origin, period, delays, settings.max_skew_periods)
            delays = {ch: d - shifts[ch][0] * period for ch, d in delays.items()}
            origin += delays[ref]
            delays = {ch: d - delays[ref] for ch, d in delays.items()}
        sol = SyncSolution(period_ps=period, origin_ps=origin, channel_delay_ps=delays,
                           nominal_period_ps=settings.period_ps, peak_sigma=sigma)
        for _ in range(1 if known is not None else 2):
            sol = refine(sol, assign(t, c, sol, detectors, settings.acceptance_ps), detectors)
        return sol
    except SyncError as err:
        raise CalibrationError(f"timing synchronisation failed: {err}") from err


def save_dataset(name: str, setpoint: tuple[str, str, Sequence[float]],
                 columns: Mapping[str, tuple[str, Sequence[float]]],
                 metadata: Mapping[str, Any]) -> tuple[int, str]:
    """A QCoDeS dataset in experiment ``calibration``: one setpoint, several columns."""
    from qcodes.dataset import Measurement, load_or_create_experiment

    experiment = load_or_create_experiment("calibration", sample_name="qkd-link")
    meas = Measurement(exp=experiment, name=name)
    sp_name, sp_unit, sp_values = setpoint
    meas.register_custom_parameter(sp_name, unit=sp_unit)
    for col, (unit, _) in columns.items():
        meas.register_custom_parameter(col, unit=unit, setpoints=(sp_name,))
    xs = np.asarray(sp_values, dtype=np.float64)
    cols = {k: np.asarray(v, dtype=np.float64) for k, (_, v) in columns.items()}
    with meas.run() as saver:
        for i in range(xs.size):
            saver.add_result((sp_name, xs[i]), *((k, v[i]) for k, v in cols.items()))
        dataset = saver.dataset
        dataset.add_metadata("qkdlab_calibration", json.dumps(dict(metadata), sort_keys=True,
                                                              default=str))
        dataset.add_metadata("created_unix_s", time.time())
    return int(dataset.run_id), str(dataset.guid)
