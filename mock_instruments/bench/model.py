"""The :class:`Bench`: Alice, fibre, Bob and the time tagger tied into one seeded model.

Time bookkeeping (all int64 ps):

* true time t: pulse ``i`` leaves Alice at ``e(i) = t0 + (i − i0)/f_rep`` (pulse 0 at
  t = 0) and reaches Bob at ``e(i) + L·n_g/c``; detector events, dark counts and
  markers live on this axis;
* tagger time: the tagger's clock, ``round((t + offset)·(1 + ppm·1e-6))`` plus the
  channel's delay and jitter.

``acquire(d)`` returns the tags whose tagger time lies in ``[f(now), f(now + d))`` and
advances ``now`` by d.  Internally the model simulates true time a little ahead
(the tagger look-ahead, a few µs) and carries what lies beyond the block — detector
events still to be dead-time scanned, pending afterpulses, tags not yet final — so
consecutive acquisitions join seamlessly.

Settings apply to every event simulated after the change; light already in the fibre
is not tracked (a change of ``length_km`` or ``rep_rate_hz`` discards it).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from . import blinding, optics
from .config import (
    AliceConfig,
    BenchConfig,
    BobConfig,
    ChannelConfig,
    DetectorConfig,
    EveConfig,
    PatternConfig,
    TaggerConfig,
)
from .detection import (
    NO_PULSE,
    ORIGIN_DARK,
    ORIGIN_MARKER,
    ArmTable,
    DeadTime,
    DetectorState,
    Events,
    PhotonStream,
    arm_table,
    dark_count_times,
    draw_candidates,
    scan_window,
    thin_candidates,
)
from .symbols import eve_resend_state, marker_pulse_indices, state_and_intensity, symbols
from .tagger import (
    BucketState,
    TagBatch,
    apply_rate_limit,
    final_tag_limit_ps,
    lookahead_ps,
    merge_intervals,
    tag_events,
    timebase_scalar_ps,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
I8Array = npt.NDArray[np.int8]

PS_PER_S = 10**12
POWER_POINTS = ("laser", "after_attenuator", "after_modulator", "modulator_tap", "bob_input")

# independent random streams: SeedSequence([seed, stream id])
_STREAM_ARM = 100  # + arm: candidate gaps and thinning uniforms
_STREAM_JITTER = 200  # + detector: detector jitter
_STREAM_DARK = 300  # + detector: dark counts
_STREAM_DEAD = 400  # + detector: afterpulse draws
_STREAM_TAGGER = 500  # tagger jitter
_STREAM_POL = 600  # polarization random walk
_STREAM_PHASE = 601  # modulator phase random walk
_STREAM_EVE = 700  # blinding Eve: her clicks and resends, soft-threshold clicks at Bob


def _stream(seed: int, stream_id: int) -> np.random.Generator:
    """Generator of one independent stream of ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream_id]))


# ------------------------------------------------------------------ mutable settings


@dataclass
class AliceSettings:
    """Alice's settings (mutable); fields and units as :class:`AliceConfig`."""

    laser_on: bool
    rep_rate_hz: float
    wavelength_m: float
    laser_power_w: float
    fixed_attenuation_db: float
    attenuation_db: float
    v_pi_v: float
    extinction_ratio_db: float
    im_bias_v: float
    drive_v: list[float]
    im_phase_rad: float
    im_drift_rad_per_s: float
    im_phase_diffusion_rad2_per_s: float
    prep_error_rad: list[float]
    pattern: PatternConfig
    marker_delay_ps: int

    @classmethod
    def from_config(cls, cfg: AliceConfig) -> AliceSettings:
        """Settings initialised from a frozen config."""
        values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
        values["drive_v"] = list(cfg.drive_v)
        values["prep_error_rad"] = list(cfg.prep_error_rad)
        return cls(**values)

    def to_config(self) -> AliceConfig:
        """Validated frozen snapshot."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["drive_v"] = tuple(float(v) for v in self.drive_v)
        values["prep_error_rad"] = tuple(float(v) for v in self.prep_error_rad)
        return AliceConfig(**values)


@dataclass
class ChannelSettings:
    """Fibre settings (mutable); fields and units as :class:`ChannelConfig`."""

    length_km: float
    loss_db_per_km: float
    insertion_loss_db: float
    group_index: float
    pol_diffusion_rad2_per_s: float
    eve_fraction: float

    @classmethod
    def from_config(cls, cfg: ChannelConfig) -> ChannelSettings:
        """Settings initialised from a frozen config."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})

    def to_config(self) -> ChannelConfig:
        """Validated frozen snapshot."""
        return ChannelConfig(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass
class EveSettings:
    """Blinding eavesdropper's settings (mutable); fields and units as :class:`EveConfig`."""

    blinding: bool
    blinding_power_w: float
    efficiency: float
    loss_db: float
    p_z: float | None
    trigger_margin: float
    resend_probability: float | None
    avoid_double_clicks: bool

    @classmethod
    def from_config(cls, cfg: EveConfig) -> EveSettings:
        """Settings initialised from a frozen config."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})

    def to_config(self) -> EveConfig:
        """Validated frozen snapshot."""
        return EveConfig(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass
class DetectorSettings:
    """One detector's settings (mutable); fields and units as :class:`DetectorConfig`."""

    enabled: bool
    efficiency: float
    dark_count_cps: float
    dead_time_s: float
    afterpulse_prob: float
    afterpulse_tau_s: float
    jitter_ps: float
    avalanche_charge_c: float
    responsivity_a_per_w: float
    blinding_threshold_w: float
    trigger_always_j: float
    trigger_never_j: float

    @classmethod
    def from_config(cls, cfg: DetectorConfig) -> DetectorSettings:
        """Settings initialised from a frozen config."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})

    def to_config(self) -> DetectorConfig:
        """Validated frozen snapshot."""
        return DetectorConfig(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass
class BobSettings:
    """Bob's settings (mutable).  ``pc_rotation`` accepts a 3×3 rotation or 3 paddle angles."""

    optics_loss_db: float
    misalignment: float
    z_fraction: float
    single_basis: int
    detectors: list[DetectorSettings]
    _pc: FloatArray = field(default_factory=lambda: np.eye(3), repr=False)

    @classmethod
    def from_config(cls, cfg: BobConfig) -> BobSettings:
        """Settings initialised from a frozen config."""
        out = cls(
            optics_loss_db=cfg.optics_loss_db,
            misalignment=cfg.misalignment,
            z_fraction=cfg.z_fraction,
            single_basis=cfg.single_basis,
            detectors=[DetectorSettings.from_config(d) for d in cfg.detectors],
        )
        out.pc_rotation = np.asarray(cfg.pc_rotation, dtype=np.float64).reshape(3, 3)
        return out

    @property
    def pc_rotation(self) -> FloatArray:
        """Polarization-controller rotation R_c on the Poincaré sphere (3×3, a copy)."""
        return self._pc.copy()

    @pc_rotation.setter
    def pc_rotation(self, value: npt.ArrayLike) -> None:
        """Set R_c from a 3×3 rotation matrix or 3 angles (rad) R_S3(a3)·R_S2(a2)·R_S1(a1)."""
        arr = np.asarray(value, dtype=np.float64)
        if arr.shape == (3,):
            arr = optics.rotation_from_angles(float(arr[0]), float(arr[1]), float(arr[2]))
        if not optics.is_rotation(arr, tol=1e-6):
            raise ValueError("pc_rotation must be a 3×3 rotation matrix or 3 angles (rad)")
        self._pc = arr.copy()

    def to_config(self) -> BobConfig:
        """Validated frozen snapshot."""
        return BobConfig(
            optics_loss_db=self.optics_loss_db,
            misalignment=self.misalignment,
            z_fraction=self.z_fraction,
            single_basis=self.single_basis,
            pc_rotation=tuple(float(x) for x in self._pc.ravel()),
            detectors=tuple(d.to_config() for d in self.detectors),
        )


@dataclass
class TaggerSettings:
    """Tagger settings (mutable).  Timebase offset/ppm and look-ahead limits stay in config."""

    jitter_ps: float
    delay_ps: dict[int, int]
    detector_channels: list[int]
    sync_channel: int
    max_rate_hz: float
    buffer_tags: int

    @classmethod
    def from_config(cls, cfg: TaggerConfig) -> TaggerSettings:
        """Settings initialised from a frozen config."""
        return cls(
            jitter_ps=cfg.jitter_ps,
            delay_ps=dict(cfg.delay_ps),
            detector_channels=list(cfg.detector_channels),
            sync_channel=cfg.sync_channel,
            max_rate_hz=cfg.max_rate_hz,
            buffer_tags=cfg.buffer_tags,
        )

    def to_config(self, base: TaggerConfig) -> TaggerConfig:
        """Validated frozen snapshot (fixed fields from ``base``)."""
        return replace(
            base,
            jitter_ps=float(self.jitter_ps),
            delay_ps=tuple(sorted((int(c), int(d)) for c, d in self.delay_ps.items())),
            detector_channels=tuple(int(c) for c in self.detector_channels),
            sync_channel=int(self.sync_channel),
            max_rate_hz=float(self.max_rate_hz),
            buffer_tags=int(self.buffer_tags),
        )


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class BenchTags:
    """Tags of one acquisition plus ground truth (field-compatible with ``qkdlab.tags.TagBlock``).

    ``origin``: 0 photon, 1 dark count, 2 afterpulse, 3 frame marker; ``pulse_index`` is
    the emitting pulse of a photon tag, −1 otherwise.  ``timebase_offset_ps``,
    ``timebase_ppm`` and ``channel_delays_ps`` record the tagger's true clock error and
    input delays.
    """

    channel: npt.NDArray[np.int16]
    time_ps: IntArray
    start_ps: int
    stop_ps: int
    overflow: bool
    lost_tags: int
    overflow_intervals: IntArray
    pulse_index: IntArray
    origin: I8Array
    timebase_offset_ps: int
    timebase_ppm: float
    channel_delays_ps: dict[int, int]

    def __len__(self) -> int:
        return int(self.time_ps.size)

    def select(self, channel: int) -> IntArray:
        """Times (ps) of the tags on one channel."""
        out: IntArray = self.time_ps[self.channel == channel]
        return out

    def counts(self, channels: list[int] | None = None) -> dict[int, int]:
        """Number of tags per channel."""
        if channels is None:
            uniq, n = np.unique(self.channel, return_counts=True)
            return {int(c): int(k) for c, k in zip(uniq, n, strict=True)}
        return {c: int(np.count_nonzero(self.channel == c)) for c in channels}

    def tag_block_fields(self) -> dict[str, object]:
        """Keyword arguments for ``qkdlab.tags.TagBlock(**...)`` (no ground truth)."""
        return {
            "channel": self.channel, "time_ps": self.time_ps, "start_ps": self.start_ps,
            "stop_ps": self.stop_ps, "overflow": self.overflow, "lost_tags": self.lost_tags,
            "overflow_intervals": self.overflow_intervals,
        }


# ------------------------------------------------------------------ pulse grid


@dataclass(frozen=True)
class PulseGrid:
    """Exact emission times: e(i) = t0 + (i − i0)·10¹²/f (ps, rational)."""

    i0: int
    t0_ps: int
    rate_hz: Fraction

    @property
    def period(self) -> Fraction:
        """Pulse period (ps, exact)."""
        return Fraction(PS_PER_S) / self.rate_hz

    def emission(self, i: int) -> Fraction:
        """Emission time of pulse ``i`` (ps, exact)."""
        return self.t0_ps + (i - self.i0) * self.period

    def first_at_or_after(self, t_ps: Fraction) -> int:
        """Smallest pulse index of this grid emitted at or after ``t_ps``."""
        k = math.ceil((t_ps - self.t0_ps) / self.period)
        return self.i0 + max(0, k)


def _split_time(t: Fraction) -> tuple[int, float]:
    """Integer ps part (floor) and the fractional remainder of an exact time."""
    whole = math.floor(t)
    return whole, float(t - whole)


# ------------------------------------------------------------------ the bench


class Bench:
    """Seeded physics model of the QKD bench.  See the package docstring for the settings."""

    def __init__(self, config: BenchConfig | None = None, seed: int = 0) -> None:
        cfg = BenchConfig() if config is None else config
        self.seed = int(seed)
        self.lock = threading.RLock()
        self._base = cfg
        self.alice = AliceSettings.from_config(cfg.alice)
        self.channel = ChannelSettings.from_config(cfg.channel)
        self.bob = BobSettings.from_config(cfg.bob)
        self.tagger = TaggerSettings.from_config(cfg.tagger)
        self.eve = EveSettings.from_config(cfg.eve)
        n_det = len(cfg.bob.detectors)
        self._rng_arm = [_stream(seed, _STREAM_ARM + a) for a in range(2)]
        self._rng_jitter = [_stream(seed, _STREAM_JITTER + d) for d in range(n_det)]
        self._rng_dark = [_stream(seed, _STREAM_DARK + d) for d in range(n_det)]
        self._rng_dead = [_stream(seed, _STREAM_DEAD + d) for d in range(n_det)]
        self._rng_tagger = _stream(seed, _STREAM_TAGGER)
        self._rng_eve = _stream(seed, _STREAM_EVE)
        self._drift = optics.DriftProcess(
            _stream(seed, _STREAM_POL), _stream(seed, _STREAM_PHASE), cfg.simulation.drift_step_s
        )
        self._detectors = [DetectorState() for _ in range(n_det)]
        self._tag_carry = TagBatch.empty()
        self._bucket = BucketState()
        self._grid = PulseGrid(0, 0, Fraction(cfg.alice.rep_rate_hz))
        self._now_ps = 0
        self._front_ps = -lookahead_ps(cfg.tagger)
        self._next_pulse = 0

    # ---------------------------------------------------------------- snapshots

    def config(self) -> BenchConfig:
        """Validated frozen snapshot of the current settings (raises ValueError if invalid)."""
        with self.lock:
            if len(self.bob.detectors) != len(self._base.bob.detectors):
                raise ValueError("the number of detectors is fixed by the BenchConfig")
            return BenchConfig(
                alice=self.alice.to_config(),
                channel=self.channel.to_config(),
                bob=self.bob.to_config(),
                tagger=self.tagger.to_config(self._base.tagger),
                simulation=self._base.simulation,
                eve=self.eve.to_config(),
            )

    @property
    def now_s(self) -> float:
        """Simulated time since start (s)."""
        return self._now_ps / PS_PER_S

    @property
    def now_ps(self) -> int:
        """Simulated time since start (ps)."""
        return self._now_ps

    # ---------------------------------------------------------------- closed forms

    def mean_photon_numbers(self) -> tuple[float, float, float]:
        """μ (signal, decoy, vacuum) leaving Alice now."""
        with self.lock:
            cfg = self.config()
            step = self._step_of(cfg, Fraction(self._now_ps))
            mu = self._mu_steps(cfg, step, step)[0]
            return float(mu[0]), float(mu[1]), float(mu[2])

    def modulator_phase_rad(self) -> float:
        """Modulator phase φ now: φ0 + drift·t + random walk (rad, on the drift grid)."""
        with self.lock:
            cfg = self.config()
            step = self._step_of(cfg, Fraction(self._now_ps))
            return float(self._phase_steps(cfg, step, step)[0])

    def channel_rotation(self) -> FloatArray:
        """Fibre rotation R(t) on the Poincaré sphere at the current time (3×3 copy)."""
        with self.lock:
            cfg = self.config()
            step = self._step_of(cfg, Fraction(self._now_ps))
            self._extend_drift(cfg, step)
            rot: FloatArray = self._drift.rotations(step, step)[0].copy()
            return rot

    def expected_click_rates(self) -> FloatArray:
        """Closed-form click rate per detector now (counts/s; with dark counts, no dead time).

        Under blinding: the faked-state clicks Eve causes, and no dark counts.
        """
        with self.lock:
            cfg = self.config()
            step = self._step_of(cfg, Fraction(self._now_ps))
            if cfg.eve.blinding:
                plan = self._blinding_plan(cfg, step, step)
                return plan.click_rates(cfg.alice.pattern.intensity_probs,
                                        cfg.alice.rep_rate_hz)
            means = self._detector_means(cfg, step, step)[0]  # (4 states, 3 classes, n_det)
            p_click = -np.expm1(-means)
            weights = _state_class_weights(cfg)  # (4 Alice states, 3 classes)
            bob_given_alice = _eve_transfer(cfg.channel.eve_fraction)  # (4 Alice, 4 Bob)
            per_pulse = np.einsum("ak,ab,bkd->d", weights, bob_given_alice, p_click)
            darks = np.array(
                [d.dark_count_cps if d.enabled else 0.0 for d in cfg.bob.detectors]
            )
            rates: FloatArray = per_pulse * cfg.alice.rep_rate_hz + darks
            return rates

    def optical_power_at(self, point: str) -> float:
        """Average optical power (W) at ``laser``, ``after_attenuator``, ``after_modulator``,
        ``modulator_tap`` or ``bob_input``.

        ``modulator_tap`` is a monitor tap right after the modulator, ahead of the fixed
        output attenuation (which only scales the light, so where it sits does not change
        Alice's output): µW of light whose level follows the bias, what a bias lock can
        read while the tagger streams.  ``after_modulator`` is Alice's output itself.
        """
        if point not in POWER_POINTS:
            raise ValueError(f"unknown power point {point!r}; choose from {POWER_POINTS}")
        with self.lock:
            cfg = self.config()
            a = cfg.alice
            power = a.laser_power_w if a.laser_on else 0.0
            if point == "laser":
                return power
            if point == "modulator_tap":
                power *= optics.db_to_transmission(a.attenuation_db)
            else:
                power *= optics.db_to_transmission(a.fixed_attenuation_db + a.attenuation_db)
            if point == "after_attenuator":
                return power
            step = self._step_of(cfg, Fraction(self._now_ps))
            t_k = optics.class_transmissions(a, self._phase_steps(cfg, step, step))[0]
            power *= float(np.dot(a.pattern.intensity_probs, t_k))
            if point in ("after_modulator", "modulator_tap"):
                return power
            if cfg.eve.blinding:  # Eve takes Alice's light; Bob gets her CW and faked states
                plan = self._blinding_plan(cfg, step, step)
                triggers, _ = plan.mean_trigger_power_w(a.pattern.intensity_probs,
                                                        a.rep_rate_hz)
                return cfg.eve.blinding_power_w + triggers
            return power * optics.channel_transmission(cfg.channel)

    def blinding_plan(self) -> blinding.BlindingPlan | None:
        """Eve's faked states and Bob's answers now (None while she does not blind)."""
        with self.lock:
            cfg = self.config()
            if not cfg.eve.blinding:
                return None
            step = self._step_of(cfg, Fraction(self._now_ps))
            return self._blinding_plan(cfg, step, step)

    def detector_bias_current_a(self) -> FloatArray:
        """Mean current through each detector's APD now (A): what a current monitor in
        series with its bias supply reads.

        Geiger mode: one avalanche charge per counted click (closed-form rate after the
        non-paralysable dead time, plus afterpulses).  Blinded: the linear-mode
        photocurrent of Eve's CW light and faked states (responsivity × power).
        """
        with self.lock:
            cfg = self.config()
            dead = np.array([d.dead_time_s for d in cfg.bob.detectors])
            counted = blinding.counted_rate(self.expected_click_rates(), dead)
            if not cfg.eve.blinding:
                return blinding.bias_current_a(cfg, None, counted)
            step = self._step_of(cfg, Fraction(self._now_ps))
            plan = self._blinding_plan(cfg, step, step)
            _, at_diode = plan.mean_trigger_power_w(cfg.alice.pattern.intensity_probs,
                                                    cfg.alice.rep_rate_hz)
            return blinding.bias_current_a(cfg, plan, counted, at_diode)

    def _blinding_plan(self, cfg: BenchConfig, j0: int, j1: int) -> blinding.BlindingPlan:
        """Eve's plan for drift steps ``j0…j1`` (``cfg.eve.blinding`` set)."""
        return blinding.blinding_plan(cfg, self._mu_steps(cfg, j0, j1),
                                      self._detector_means(cfg, j0, j1))

    def next_pulse_index(self) -> int:
        """First pulse not yet simulated: a setting changed now applies from this pulse on.

        The simulation has drawn every photon arriving before its front (a little ahead
        of :attr:`now_ps`, for jitter and delays): pulses emitted before the front minus
        the fibre delay already went out with the old settings.
        """
        with self.lock:
            front = max(self.now_ps, self._front_ps)
            return self._grid.first_at_or_after(Fraction(front) - Fraction(
                self.propagation_delay_ps()))

    def pattern_seed(self, pattern: PatternConfig) -> int:
        """Seed of Alice's pattern generator (the bench seed unless the pattern sets one)."""
        return self.seed if pattern.seed is None else int(pattern.seed)

    def alice_symbols(self, pulse_index: npt.ArrayLike) -> tuple[I8Array, I8Array, I8Array]:
        """Alice's (basis, bit, intensity) of the given pulses (current pattern settings)."""
        return symbols(self.pattern_seed(self.alice.pattern), pulse_index, self.alice.pattern)

    def emission_time_ps(self, pulse_index: npt.ArrayLike) -> FloatArray:
        """True emission time (ps) of pulses on the current pulse grid (ground truth)."""
        idx = np.asarray(pulse_index, dtype=np.int64)
        whole, frac = _split_time(self._grid.emission(self._grid.i0))
        rel = (idx - self._grid.i0).astype(np.float64) * float(self._grid.period)
        return rel + (whole + frac)

    def propagation_delay_ps(self) -> float:
        """Fibre delay L·n_g/c (ps) with the current settings."""
        return optics.propagation_delay_ps(self.channel.to_config())

    # ---------------------------------------------------------------- acquisition

    def acquire(self, duration_s: float) -> BenchTags:
        """Tags of the next ``duration_s`` seconds (tagger time ``[f(now), f(now + d))``)."""
        if duration_s < 0:
            raise ValueError(f"duration_s must be >= 0, got {duration_s}")
        with self.lock:
            return self._acquire_until(self._now_ps + round(duration_s * PS_PER_S))

    def acquire_pulses(self, n_pulses: int) -> BenchTags:
        """Tags of the next ``n_pulses`` pulse periods."""
        if n_pulses < 0:
            raise ValueError(f"n_pulses must be >= 0, got {n_pulses}")
        with self.lock:
            rate = Fraction(self.config().alice.rep_rate_hz)
            return self._acquire_until(self._now_ps + round(n_pulses * PS_PER_S / rate))

    def _acquire_until(self, stop_true_ps: int) -> BenchTags:
        """Simulate up to ``stop_true_ps`` (+ look-ahead) and return the finished block."""
        cfg = self.config()
        tcfg = cfg.tagger
        self._reanchor_grid(cfg)
        start_tag = timebase_scalar_ps(self._now_ps, tcfg.offset_ps, tcfg.ppm)
        stop_tag = timebase_scalar_ps(stop_true_ps, tcfg.offset_ps, tcfg.ppm)
        target = stop_true_ps + lookahead_ps(tcfg)
        kept: list[TagBatch] = []
        intervals: list[IntArray] = []
        lost = 0
        while self._front_ps < target:
            s0 = self._front_ps
            s1 = min(target, s0 + self._chunk_ps(cfg))
            fresh = self._simulate_window(cfg, s0, s1)
            self._front_ps = s1
            limit = min(final_tag_limit_ps(s1, tcfg), stop_tag)
            emit = self._finalise_tags(fresh, limit, start_tag)
            batch, n_lost, iv = apply_rate_limit(emit, tcfg, self._bucket)
            kept.append(batch)
            intervals.append(iv)
            lost += n_lost
        self._now_ps = stop_true_ps
        return self._block(cfg, TagBatch.concatenate(kept), (start_tag, stop_tag), lost,
                           intervals)

    def _finalise_tags(self, fresh: TagBatch, limit: int, start_tag: int) -> TagBatch:
        """Merge new tags into the carry; return the sorted tags below ``limit``."""
        pool = TagBatch.concatenate([self._tag_carry, fresh]).sorted()
        k = int(np.searchsorted(pool.time_ps, limit, side="left"))
        self._tag_carry = pool.take(slice(k, None))
        emit = pool.take(slice(0, k))
        first = int(np.searchsorted(emit.time_ps, start_tag, side="left"))
        return emit.take(slice(first, None))  # only the very first block has tags before t=0

    def _block(self, cfg: BenchConfig, tags: TagBatch, window: tuple[int, int], lost: int,
               intervals: list[IntArray]) -> BenchTags:
        """Package one acquisition."""
        start, stop = window
        merged = merge_intervals(np.concatenate([np.zeros((0, 2), np.int64), *intervals]),
                                 start, stop)
        channels = (*cfg.tagger.detector_channels, cfg.tagger.sync_channel)
        return BenchTags(
            channel=tags.channel, time_ps=tags.time_ps, start_ps=start, stop_ps=stop,
            overflow=lost > 0, lost_tags=lost, overflow_intervals=merged,
            pulse_index=tags.pulse_index, origin=tags.origin,
            timebase_offset_ps=cfg.tagger.offset_ps, timebase_ppm=cfg.tagger.ppm,
            channel_delays_ps={c: cfg.tagger.delay_of(c) for c in channels},
        )

    # ---------------------------------------------------------------- one window

    def _simulate_window(self, cfg: BenchConfig, s0: int, s1: int) -> TagBatch:
        """Detector and marker tags of true time ``[s0, s1)`` (unsorted across channels)."""
        photons = self._photon_clicks(cfg, s0, s1)
        batches = []
        for d, det in enumerate(cfg.bob.detectors):
            accepted = self._detector_window(d, det, photons[d], (s0, s1), cfg.eve.blinding)
            ch = cfg.tagger.detector_channels[d]
            batches.append(tag_events(self._rng_tagger, accepted, ch, cfg.tagger))
        markers = self._markers(cfg, s0, s1)
        batches.append(tag_events(self._rng_tagger, markers, cfg.tagger.sync_channel, cfg.tagger))
        return TagBatch.concatenate(batches)

    def _detector_window(self, d: int, det: DetectorConfig, photons: PhotonStream,
                         window: tuple[int, int], blinded: bool = False) -> Events:
        """Accepted clicks of detector ``d`` in ``window``: photons + darks → dead time.

        A blinded detector (linear mode) has neither dark counts nor afterpulses; its
        clicks (Eve's faked states) keep the electronics' dead time.
        """
        s0, s1 = window
        state = self._detectors[d]
        if not det.enabled:
            state.switch_off()
            return Events.empty()
        if blinded:
            state.n_pending = 0
            darks = Events.empty()
            dead = DeadTime(round(det.dead_time_s * PS_PER_S), 0.0,
                            det.afterpulse_tau_s * PS_PER_S)
        else:
            dark_t = dark_count_times(self._rng_dark[d], det.dark_count_cps, s0, s1)
            darks = Events(dark_t, np.full(dark_t.size, ORIGIN_DARK, np.int8),
                           np.full(dark_t.size, NO_PULSE, np.int64))
            dead = DeadTime(round(det.dead_time_s * PS_PER_S), det.afterpulse_prob,
                            det.afterpulse_tau_s * PS_PER_S)
        rngs = (self._rng_jitter[d], self._rng_dead[d])
        return scan_window(rngs, photons, darks, state, window, dead)

    def _markers(self, cfg: BenchConfig, s0: int, s1: int) -> Events:
        """Frame markers reaching the tagger in true time ``[s0, s1)``."""
        delay = cfg.alice.marker_delay_ps
        first = self._grid.first_at_or_after(Fraction(s0 - delay))
        stop = self._grid.first_at_or_after(Fraction(s1 - delay))
        idx = marker_pulse_indices(first, stop, cfg.alice.pattern.frame_pulses,
                                   cfg.alice.pattern.start_index)
        if idx.size == 0:
            return Events.empty()
        whole, frac = _split_time(self._grid.emission(int(idx[0])) + delay)
        rel = (idx - idx[0]).astype(np.float64) * float(self._grid.period) + frac
        t = np.rint(rel).astype(np.int64) + whole
        return Events(t, np.full(t.size, ORIGIN_MARKER, np.int8),
                      np.full(t.size, NO_PULSE, np.int64))

    # ---------------------------------------------------------------- photons

    def _photon_clicks(self, cfg: BenchConfig, s0: int, s1: int) -> list[PhotonStream]:
        """Photon clicks (before dead time) per detector from pulses arriving in the window."""
        n_det = len(cfg.bob.detectors)
        clicks = [PhotonStream.empty() for _ in range(n_det)]
        delay = Fraction(optics.propagation_delay_ps(cfg.channel))
        look = self._detector_lookahead(cfg)
        p0 = max(self._next_pulse, self._grid.first_at_or_after(s0 + look - delay))
        p1 = max(p0, self._grid.first_at_or_after(s1 + look - delay))
        self._next_pulse = p1
        if p1 == p0 or optics.mu_into_modulator(cfg.alice) <= 0.0:
            return clicks
        e0 = self._grid.emission(p0)
        j0 = self._step_of(cfg, e0)
        j1 = self._step_of(cfg, self._grid.emission(p1 - 1))
        base_rel = float(e0 + delay - s0)
        step_frac = float((e0 - j0 * self._step_ps(cfg)) / self._step_ps(cfg))
        if cfg.eve.blinding:
            clicks = self._faked_clicks(cfg, (p0, p1), (j0, j1), base_rel, step_frac)
            self._drift.prune_below(min(j0, self._step_of(cfg, Fraction(self._now_ps))))
            return clicks
        tables, n_steps = self._arm_tables(cfg, j0, j1)
        period = float(self._grid.period)
        for a, table in enumerate(tables):
            cand = draw_candidates(self._rng_arm[a], p0, p1, table.p_max)
            if cand.size == 0:
                continue
            index = self._table_index(cfg, cand, p0, step_frac, n_steps)
            click_a, click_b = thin_candidates(self._rng_arm[a], table, index)
            for det, mask in ((table.det_a, click_a), (table.det_b, click_b)):
                sigma = cfg.bob.detectors[det].jitter_ps
                clicks[det] = PhotonStream(cand, mask, p0, base_rel, period, sigma)
        self._drift.prune_below(min(j0, self._step_of(cfg, Fraction(self._now_ps))))
        return clicks

    def _table_index(self, cfg: BenchConfig, cand: IntArray, p0: int, step_frac: float,
                     n_steps: int) -> npt.NDArray[np.intp]:
        """Flat table index ``(step·4 + Bob's state)·3 + class`` of each candidate."""
        state, klass = state_and_intensity(self.pattern_seed(cfg.alice.pattern), cand,
                                           cfg.alice.pattern)
        bob_state = eve_resend_state(self.seed, cand, state, cfg.channel.eve_fraction)
        index = bob_state.astype(np.intp)
        index *= 3
        index += klass
        if n_steps > 1:
            index += 12 * self._candidate_steps(cfg, cand, p0, step_frac, n_steps)
        return index

    def _candidate_steps(self, cfg: BenchConfig, cand: IntArray, p0: int, step_frac: float,
                         n_steps: int) -> npt.NDArray[np.intp]:
        """Drift step (0…n_steps−1, relative to the window's first) of each candidate."""
        period_steps = float(self._grid.period) / self._step_ps(cfg)
        step = (cand - p0).astype(np.float64)
        step *= period_steps
        step += step_frac
        out: npt.NDArray[np.intp] = np.clip(step.astype(np.intp), 0, n_steps - 1)
        return out

    def _faked_clicks(self, cfg: BenchConfig, pulses: tuple[int, int], steps: tuple[int, int],
                      base_rel: float, step_frac: float) -> list[PhotonStream]:
        """Clicks of blinded detectors on Eve's faked states for pulses ``[p0, p1)``.

        Eve detects and resends pulse i with probability ``resend[step, class]``
        (candidates at the largest, thinned exactly); she resends the state of her
        result (:func:`blinding.eve_states`) and each detector clicks per the plan.
        """
        p0, p1 = pulses
        plan = self._blinding_plan(cfg, *steps)
        resend = plan.resend
        if resend.shape[0] > 1 and _all_equal(resend):
            resend = resend[:1]
        n_det = len(cfg.bob.detectors)
        period = float(self._grid.period)
        cand = blinding.draw_resent(self._rng_eve, p0, p1, resend)
        if cand.size == 0:
            return [PhotonStream.empty() for _ in range(n_det)]
        seed = self.pattern_seed(cfg.alice.pattern)
        state, klass = state_and_intensity(seed, cand, cfg.alice.pattern)
        n_steps = resend.shape[0]
        step = (self._candidate_steps(cfg, cand, p0, step_frac, n_steps) if n_steps > 1
                else np.zeros(cand.size, np.intp))
        keep = blinding.thin_resent(self._rng_eve, resend, step, klass)
        cand, state = cand[keep], state[keep]
        faked = blinding.eve_states(self.seed, cand, state, plan.p_z)
        hit = blinding.bob_clicks(self._rng_eve, plan, faked)
        return [PhotonStream(cand, np.ascontiguousarray(hit[:, d]).view(np.uint8), p0, base_rel,
                             period, cfg.bob.detectors[d].jitter_ps) for d in range(n_det)]

    # ---------------------------------------------------------------- tables

    def _arm_tables(self, cfg: BenchConfig, j0: int, j1: int) -> tuple[list[ArmTable], int]:
        """Click-probability tables of each basis arm for drift steps ``j0…j1``.

        Returns the tables and their number of steps (1 when nothing drifts).
        """
        means = self._detector_means(cfg, j0, j1)  # (steps, 4, 3, n_det)
        if j1 > j0 and _all_equal(means):
            means = means[:1]
        arms = [(0, 1), (2, 3)] if len(cfg.bob.detectors) == 4 else [(0, 1)]
        tables = [arm_table(a, b, means[..., a], means[..., b]) for a, b in arms]
        return tables, int(means.shape[0])

    def _detector_means(self, cfg: BenchConfig, j0: int, j1: int) -> FloatArray:
        """Mean photon number reaching each detector (×η), shape (steps, 4 states, 3, n_det)."""
        mu = self._mu_steps(cfg, j0, j1)  # (steps, 3)
        self._extend_drift(cfg, j1)
        rot = cfg.bob.pc_rotation
        pc = np.asarray(rot, dtype=np.float64).reshape(3, 3)
        eff_rot = pc[None] @ self._drift.rotations(j0, j1)  # (steps, 3, 3)
        states = optics.alice_states(cfg.alice.prep_error_rad)  # (4, 3)
        at_bob = np.einsum("nij,sj->nsi", eff_rot, states)
        n_det = len(cfg.bob.detectors)
        analysers = optics.analyser_vectors(n_det, cfg.bob.single_basis)
        proj = optics.projection_probabilities(at_bob, analysers, cfg.bob.misalignment)
        scale = _detector_scale(cfg)  # (n_det,)
        return mu[:, None, :, None] * proj[:, :, None, :] * scale[None, None, None, :]

    def _mu_steps(self, cfg: BenchConfig, j0: int, j1: int) -> FloatArray:
        """μ per class for drift steps ``j0…j1``; shape (steps, 3)."""
        return optics.mean_photon_numbers(cfg.alice, self._phase_steps(cfg, j0, j1))

    def _phase_steps(self, cfg: BenchConfig, j0: int, j1: int) -> FloatArray:
        """Modulator phase φ_j = φ0 + drift·t_j + W_j for steps ``j0…j1`` (rad)."""
        self._extend_drift(cfg, j1)
        t_j = np.arange(j0, j1 + 1) * cfg.simulation.drift_step_s
        a = cfg.alice
        return a.im_phase_rad + a.im_drift_rad_per_s * t_j + self._drift.walk_phases(j0, j1)

    def _extend_drift(self, cfg: BenchConfig, step: int) -> None:
        """Generate drift steps up to ``step`` with the current diffusion coefficients."""
        self._drift.extend_to(step, cfg.channel.pol_diffusion_rad2_per_s,
                              cfg.alice.im_phase_diffusion_rad2_per_s)

    # ---------------------------------------------------------------- helpers

    def _reanchor_grid(self, cfg: BenchConfig) -> None:
        """Start a new pulse grid at the simulation front when the repetition rate changed."""
        rate = Fraction(cfg.alice.rep_rate_hz)
        if rate != self._grid.rate_hz:
            self._grid = PulseGrid(self._next_pulse, max(self._front_ps, 0), rate)

    @staticmethod
    def _step_ps(cfg: BenchConfig) -> int:
        """Drift step (ps)."""
        return max(1, round(cfg.simulation.drift_step_s * PS_PER_S))

    def _step_of(self, cfg: BenchConfig, t_ps: Fraction) -> int:
        """Drift step index of true time ``t_ps`` (never negative)."""
        return max(0, math.floor(t_ps / self._step_ps(cfg)))

    @staticmethod
    def _detector_lookahead(cfg: BenchConfig) -> int:
        """Pulses are simulated this far (ps) ahead of the window: covers ±8σ of jitter."""
        return math.ceil(8.0 * cfg.simulation.max_detector_jitter_ps) + 2

    def _chunk_ps(self, cfg: BenchConfig) -> int:
        """Window length (ps) holding about ``chunk_candidates`` expected events."""
        mu_max = optics.max_mean_photon_number(cfg.alice)
        scale = _detector_scale(cfg)
        photon = cfg.alice.rep_rate_hz * -math.expm1(-mu_max * float(scale.sum()))
        dark = sum(d.dark_count_cps for d in cfg.bob.detectors if d.enabled)
        rate = photon + dark + cfg.alice.rep_rate_hz / cfg.alice.pattern.frame_pulses + 1.0
        chunk = cfg.simulation.chunk_candidates / rate * PS_PER_S
        return int(min(max(chunk, 1e6), 1e13))


def _detector_scale(cfg: BenchConfig) -> FloatArray:
    """Per detector: T_channel·η_bob·(arm fraction)·η_d (0 when the detector is off)."""
    base = optics.channel_transmission(cfg.channel)
    base *= optics.db_to_transmission(cfg.bob.optics_loss_db)
    n_det = len(cfg.bob.detectors)
    z = cfg.bob.z_fraction
    arm = np.array([z, z, 1.0 - z, 1.0 - z]) if n_det == 4 else np.ones(2)
    eff = np.array([d.efficiency if d.enabled else 0.0 for d in cfg.bob.detectors])
    scale: FloatArray = base * arm * eff
    return scale


def _state_class_weights(cfg: BenchConfig) -> FloatArray:
    """P(Alice's state, class): basis p_z / 1 − p_z, bits ½, classes from the pattern."""
    pat = cfg.alice.pattern
    p_state = np.array([pat.p_z, pat.p_z, 1.0 - pat.p_z, 1.0 - pat.p_z]) * 0.5
    weights: FloatArray = p_state[:, None] * np.asarray(pat.intensity_probs)[None, :]
    return weights


def _eve_transfer(fraction: float) -> FloatArray:
    """P(Bob receives state b | Alice sent a) under intercept-resend on ``fraction``."""
    resend = np.zeros((4, 4))
    for a in range(4):
        resend[a, a] += 0.5  # Eve guesses Alice's basis: resends Alice's state
        other = 2 * (1 - a // 2)
        resend[a, other] += 0.25  # wrong basis: random result in the other basis
        resend[a, other + 1] += 0.25
    return (1.0 - fraction) * np.eye(4) + fraction * resend


def _all_equal(a: FloatArray) -> bool:
    """True if every step of ``a`` (axis 0) equals the first."""
    return bool(np.all(a == a[:1]))
