"""Frozen parameter sets of the bench model, SI units in every name.

Each field carries its unit in its name (``_hz``, ``_s``, ``_db``, ``_w``, ``_m``,
``_ps``, ``_v``, ``_rad``, ``_cps``) and a comment with the default's source (see
``shared/PHYSICS.md``).  These dataclasses are immutable snapshots: the mutable
settings of a running :class:`~qkdlab.mock_instruments.bench.model.Bench` are turned
into one of these at the start of every acquisition, and ``__post_init__`` validates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

PLANCK_J_S = 6.62607015e-34  # Planck constant h (J·s, exact SI)
LIGHT_SPEED_M_S = 299_792_458.0  # speed of light in vacuum c (m/s, exact SI)

# ---- default working point: μ_signal = 0.5, μ_decoy = 0.1 at bias 0, φ = 0 -------------
_DEFAULT_REP_RATE_HZ = 100e6  # 100 MHz pulse clock (practice spans 50 MHz–2.5 GHz)
_DEFAULT_WAVELENGTH_M = 1550e-9  # C band
_DEFAULT_POWER_W = 1e-3  # 1 mW average power of the pulsed (gain-switched) laser
_DEFAULT_FIXED_ATT_DB = 70.0  # fixed attenuators in Alice's box
_DEFAULT_V_PI_V = 4.0  # LiNbO₃ Mach–Zehnder half-wave voltage
_DEFAULT_ER_DB = 25.0  # extinction ratio (PHYSICS.md: 20–30 dB)
_TARGET_MU_SIGNAL = 0.5  # Ma, Qi, Zhao, Lo (2005): μ ≈ 0.5
_TARGET_MU_DECOY = 0.1  # Ma, Qi, Zhao, Lo (2005): ν ≈ 0.1


def _extinction_ratio(er_db: float) -> float:
    """Power ratio T_min/T_max of a modulator with extinction ``er_db`` (dB)."""
    return float(10.0 ** (-er_db / 10.0))


def _default_voa_db() -> float:
    """VOA setting (dB) that puts μ_signal at 0.5 at the default working point.

    Laser: n = P·λ/(h·c·f) = 7.80e7 photons/pulse at 1 mW, 1550 nm, 100 MHz.  The
    modulator passes T_max = 1/(1 + r) (r = 10^(−ER/10)) at drive 0, so the light entering
    it must hold μ_in = 0.5·(1 + r) = 0.50158 photons/pulse: 81.92 dB in total, i.e. the
    VOA at 11.92 dB behind the 70 dB fixed attenuator.
    """
    n_laser = _DEFAULT_POWER_W * _DEFAULT_WAVELENGTH_M / (
        PLANCK_J_S * LIGHT_SPEED_M_S * _DEFAULT_REP_RATE_HZ
    )
    mu_in = _TARGET_MU_SIGNAL * (1.0 + _extinction_ratio(_DEFAULT_ER_DB))
    return 10.0 * math.log10(n_laser / mu_in) - _DEFAULT_FIXED_ATT_DB


def _default_decoy_drive_v() -> float:
    """Drive (V) for which T(V)/T_max = μ_decoy/μ_signal at bias 0, φ = 0 (≈ 2.83 V)."""
    r = _extinction_ratio(_DEFAULT_ER_DB)
    ratio = _TARGET_MU_DECOY / _TARGET_MU_SIGNAL
    cos_x = (2.0 * ratio - (1.0 + r)) / (1.0 - r)
    return math.acos(cos_x) * _DEFAULT_V_PI_V / math.pi


DEFAULT_VOA_DB = _default_voa_db()
DEFAULT_DRIVE_V = (0.0, _default_decoy_drive_v(), _DEFAULT_V_PI_V)


def _check(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``."""
    if not ok:
        raise ValueError(message)


def _check_probability(name: str, value: float) -> None:
    """Check ``0 <= value <= 1``."""
    _check(0.0 <= value <= 1.0, f"{name} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class PatternConfig:
    """Alice's random pattern: basis bias, intensity-class probabilities, frame length."""

    p_z: float = 0.5  # probability of the Z basis (standard BB84; efficient BB84 biases it)
    p_signal: float = 0.7  # probability of the signal class (μ ≈ 0.5)
    p_decoy: float = 0.2  # probability of the weak decoy class (ν ≈ 0.1)
    p_vacuum: float = 0.1  # probability of the vacuum class
    frame_pulses: int = 2**20  # pulses per frame; a marker is sent at every frame start
    seed: int | None = None  # the pattern generator's seed; None: the bench seed
    start_index: int = 0  # bench pulse index where the pattern (re)started: its symbol 0

    def __post_init__(self) -> None:
        for name in ("p_z", "p_signal", "p_decoy", "p_vacuum"):
            _check_probability(name, getattr(self, name))
        total = self.p_signal + self.p_decoy + self.p_vacuum
        _check(abs(total - 1.0) < 1e-9, f"intensity probabilities must sum to 1, got {total}")
        _check(self.frame_pulses >= 1, f"frame_pulses must be >= 1, got {self.frame_pulses}")

    @property
    def intensity_probs(self) -> tuple[float, float, float]:
        """(signal, decoy, vacuum) probabilities."""
        return (self.p_signal, self.p_decoy, self.p_vacuum)


@dataclass(frozen=True)
class AliceConfig:
    """Transmitter: pulsed laser → attenuators → intensity modulator → polarization encoder."""

    laser_on: bool = True  # laser emission (interlock / enable)
    rep_rate_hz: float = _DEFAULT_REP_RATE_HZ  # pulse repetition rate f_rep (Hz)
    wavelength_m: float = _DEFAULT_WAVELENGTH_M  # laser wavelength λ (m)
    laser_power_w: float = _DEFAULT_POWER_W  # average optical power at the laser output (W)
    fixed_attenuation_db: float = _DEFAULT_FIXED_ATT_DB  # fixed attenuators (dB)
    attenuation_db: float = DEFAULT_VOA_DB  # variable optical attenuator, VOA (dB); ≈ 11.92
    v_pi_v: float = _DEFAULT_V_PI_V  # modulator half-wave voltage Vπ (V)
    extinction_ratio_db: float = _DEFAULT_ER_DB  # modulator extinction ratio ER (dB)
    im_bias_v: float = 0.0  # modulator DC bias V_b (V)
    drive_v: tuple[float, float, float] = DEFAULT_DRIVE_V  # AWG drive per class (V): 0, 2.83, Vπ
    im_phase_rad: float = 0.0  # modulator phase φ at t = 0 (rad)
    im_drift_rad_per_s: float = 0.0  # linear drift of φ (rad/s; LiNbO₃ DC drift)
    im_phase_diffusion_rad2_per_s: float = 0.0  # random-walk diffusion of φ (rad²/s)
    prep_error_rad: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # H,V,D,A about S3
    pattern: PatternConfig = field(default_factory=PatternConfig)  # the AWG's random pattern
    marker_delay_ps: int = 50_000  # frame-marker cable delay to the tagger (ps; ~10 m coax)

    def __post_init__(self) -> None:
        _check(self.rep_rate_hz > 0, f"rep_rate_hz must be > 0, got {self.rep_rate_hz}")
        _check(self.wavelength_m > 0, f"wavelength_m must be > 0, got {self.wavelength_m}")
        _check(self.laser_power_w >= 0, f"laser_power_w must be >= 0, got {self.laser_power_w}")
        _check(self.v_pi_v > 0, f"v_pi_v must be > 0, got {self.v_pi_v}")
        _check(self.extinction_ratio_db > 0, "extinction_ratio_db must be > 0")
        _check(len(self.drive_v) == 3, "drive_v needs 3 voltages (signal, decoy, vacuum)")
        _check(len(self.prep_error_rad) == 4, "prep_error_rad needs 4 angles (H, V, D, A)")
        _check(self.im_phase_diffusion_rad2_per_s >= 0, "im_phase_diffusion must be >= 0")
        _check(self.marker_delay_ps >= 0, "marker_delay_ps must be >= 0")


@dataclass(frozen=True)
class ChannelConfig:
    """Fibre link from Alice to Bob, with an optional intercept-resend eavesdropper."""

    length_km: float = 25.0  # fibre length L (km)
    loss_db_per_km: float = 0.2  # attenuation α of SMF-28 at 1550 nm (dB/km; PHYSICS.md)
    insertion_loss_db: float = 0.0  # connectors and splices (dB)
    group_index: float = 1.468  # group index n_g of SMF-28 at 1550 nm
    pol_diffusion_rad2_per_s: float = 0.0  # SO(3) random-walk diffusion D of the fibre (rad²/s)
    eve_fraction: float = 0.0  # fraction p of pulses intercepted and resent by Eve

    def __post_init__(self) -> None:
        _check(self.length_km >= 0, f"length_km must be >= 0, got {self.length_km}")
        _check(self.loss_db_per_km >= 0, "loss_db_per_km must be >= 0")
        _check(self.insertion_loss_db >= 0, "insertion_loss_db must be >= 0")
        _check(self.group_index >= 1, f"group_index must be >= 1, got {self.group_index}")
        _check(self.pol_diffusion_rad2_per_s >= 0, "pol_diffusion_rad2_per_s must be >= 0")
        _check_probability("eve_fraction", self.eve_fraction)


@dataclass(frozen=True)
class EveConfig:
    """Detector-blinding eavesdropper (Lydersen et al., Nat. Photon. 4, 686 (2010)).

    With ``blinding`` on, Eve intercepts every pulse at Alice's output (her own receiver:
    ``loss_db``, ``efficiency``, basis Z with probability ``p_z``), shines CW light of
    ``blinding_power_w`` into Bob's receiver, which holds his APDs below breakdown
    (linear mode: single photons no longer click), and resends each of her results as a
    bright faked state timed like Alice's pulse.  A blinded detector clicks on a pulse
    energy above its ``trigger_always_j``, never below ``trigger_never_j`` (linear in
    between; both scale with the CW power at the diode over ``blinding_threshold_w``).
    Eve scales the trigger of each state so that the detector measuring it receives
    ``trigger_margin`` × its always-click energy; she knows Bob's receiver.
    ``resend_probability`` (given her click) sets Bob's click rate; ``None`` mimics
    the honest signal-class gain.  ``avoid_double_clicks``: she measures and resends
    only in bases whose faked states make exactly one of Bob's detectors click.  While
    blinding, ``channel.eve_fraction`` is ignored (Eve intercepts everything).
    """

    blinding: bool = False  # Eve blinds Bob's detectors and resends faked states
    blinding_power_w: float = 1e-3  # CW power at Bob's entrance (W; ≈ 1 mW, PHYSICS.md)
    efficiency: float = 0.5  # Eve's detection efficiency η_E (model's choice)
    loss_db: float = 0.0  # loss from Alice's output to Eve's receiver (dB)
    p_z: float | None = None  # Eve's Z-basis probability; None: Bob's arm ratio
    trigger_margin: float = 1.2  # trigger energy over the target's always-click energy
    resend_probability: float | None = None  # per Eve click; None: mimic Bob's honest gain
    avoid_double_clicks: bool = True  # resend only bases with clean (single-click) fakes

    def __post_init__(self) -> None:
        _check(self.blinding_power_w >= 0, "blinding_power_w must be >= 0 W")
        _check_probability("eve.efficiency", self.efficiency)
        _check(self.loss_db >= 0, f"eve.loss_db must be >= 0 dB, got {self.loss_db}")
        if self.p_z is not None:
            _check_probability("eve.p_z", self.p_z)
        _check(self.trigger_margin > 0, "eve.trigger_margin must be > 0")
        if self.resend_probability is not None:
            _check_probability("eve.resend_probability", self.resend_probability)


@dataclass(frozen=True)
class DetectorConfig:
    """One free-running InGaAs single-photon detector (PHYSICS.md, Korzh APL 2014)."""

    enabled: bool = True  # bias on; a disabled detector never clicks
    efficiency: float = 0.10  # detection efficiency η_d (10 %, free-running InGaAs)
    dark_count_cps: float = 100.0  # dark-count rate (counts/s; 1 cps at −110 °C … kHz warm)
    dead_time_s: float = 10e-6  # non-paralysable dead time τ (s; Korzh: 20 µs at −110 °C)
    afterpulse_prob: float = 0.02  # afterpulse probability per click (2.2 % in Korzh 2014)
    afterpulse_tau_s: float = 2e-6  # afterpulse delay time constant τ_ap (s; 1.1–2.4 µs)
    jitter_ps: float = 100.0  # timing jitter σ, RMS (ps; ≈ 240 ps FWHM, arXiv 2106.05599)
    # -- bias current and linear mode (bright light; Lydersen et al., Nat. Photon. 4, 686, 2010)
    avalanche_charge_c: float = 1e-12  # charge of one avalanche (C; ~pC, model's choice)
    responsivity_a_per_w: float = 0.9  # photocurrent per W below breakdown (A/W; InGaAs, 1550 nm)
    blinding_threshold_w: float = 10e-6  # CW power at the diode that blinds it (W; model's choice)
    trigger_always_j: float = 1e-12  # blinded at the threshold: energy that always clicks (J)
    trigger_never_j: float = 0.7e-12  # blinded at the threshold: energy that never clicks (J)

    def __post_init__(self) -> None:
        _check_probability("efficiency", self.efficiency)
        _check(self.dark_count_cps >= 0, "dark_count_cps must be >= 0")
        _check(self.dead_time_s >= 0, f"dead_time_s must be >= 0, got {self.dead_time_s}")
        _check_probability("afterpulse_prob", self.afterpulse_prob)
        _check(self.afterpulse_tau_s > 0, "afterpulse_tau_s must be > 0")
        _check(self.jitter_ps >= 0, f"jitter_ps must be >= 0, got {self.jitter_ps}")
        _check(self.avalanche_charge_c >= 0, "avalanche_charge_c must be >= 0 C")
        _check(self.responsivity_a_per_w >= 0, "responsivity_a_per_w must be >= 0 A/W")
        _check(self.blinding_threshold_w > 0, "blinding_threshold_w must be > 0 W")
        _check(0 < self.trigger_never_j <= self.trigger_always_j,
               f"need 0 < trigger_never_j <= trigger_always_j, got {self.trigger_never_j} J, "
               f"{self.trigger_always_j} J")


def _four_detectors() -> tuple[DetectorConfig, ...]:
    """Four identical default detectors (H, V, D, A)."""
    return (DetectorConfig(),) * 4


IDENTITY_ROTATION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class BobConfig:
    """Receiver: polarization controller, basis splitter, analysers and detectors.

    With 4 detectors a passive splitter sends ``z_fraction`` of the light to the Z arm
    (det 0 = H/bit 0, det 1 = V/bit 1) and the rest to the X arm (det 2 = D/bit 0,
    det 3 = A/bit 1).  With 2 detectors there is no splitter: both detectors analyse
    ``single_basis`` (0 = Z, 1 = X), as in a calibration or single-basis set-up.
    """

    optics_loss_db: float = 1.0  # insertion loss of Bob's optics (dB; PC + BS + PBS, assumed)
    misalignment: float = 0.01  # optical misalignment error e_mis (contrast 1 − 2·e_mis)
    z_fraction: float = 0.5  # passive basis splitter ratio towards the Z arm (50/50)
    single_basis: int = 0  # basis analysed when only 2 detectors are fitted (0 = Z, 1 = X)
    pc_rotation: tuple[float, ...] = IDENTITY_ROTATION  # controller rotation R_c, row-major 3×3
    detectors: tuple[DetectorConfig, ...] = field(default_factory=_four_detectors)

    def __post_init__(self) -> None:
        _check(self.optics_loss_db >= 0, "optics_loss_db must be >= 0")
        _check(0.0 <= self.misalignment <= 0.5, "misalignment must lie in [0, 0.5]")
        _check_probability("z_fraction", self.z_fraction)
        _check(self.single_basis in (0, 1), "single_basis must be 0 (Z) or 1 (X)")
        _check(len(self.pc_rotation) == 9, "pc_rotation must hold 9 numbers (3×3, row-major)")
        _check(len(self.detectors) in (2, 4), "Bob has 2 or 4 detectors")


@dataclass(frozen=True)
class TaggerConfig:
    """Time tagger: timebase error, channel map and delays, jitter, sustained-rate limit.

    Tag of an event at true time t (ps): ``round((t + offset_ps)·(1 + ppm·1e-6))``
    ``+ delay_ps[ch] + round(N(0, jitter_ps))``.  Offset and ppm are the tagger's clock
    error (ground truth a sync algorithm must find); they are fixed for a bench's life.
    """

    offset_ps: int = 0  # timebase offset against true time (ps)
    ppm: float = 0.0  # timebase frequency error (ppm; free crystals ±10…±100)
    jitter_ps: float = 9.0  # tagger RMS jitter (ps; Time Tagger Ultra Performance: 9 ps)
    detector_channels: tuple[int, ...] = (1, 2, 3, 4)  # tagger channel of each detector
    sync_channel: int = 0  # channel of Alice's frame marker
    delay_ps: tuple[tuple[int, int], ...] = ()  # (channel, input delay in ps) pairs; default 0
    max_rate_hz: float = 10e6  # sustained tag rate to the PC (tags/s; ID900, TT20 ≈ 9–10 M)
    buffer_tags: int = 2**21  # on-board buffer (tags; HydraHarp FIFO 2 M records)
    bucket_bin_ps: int = 100_000_000  # coarse bin of the leaky-bucket model (ps; 100 µs)
    max_abs_delay_ps: int = 2_000_000  # |input delay| allowed (ps); sets the look-ahead
    max_jitter_ps: float = 1_000.0  # largest settable tagger jitter (ps); sets the look-ahead

    def __post_init__(self) -> None:
        _check(abs(self.ppm) <= 1000.0, f"|ppm| must be <= 1000, got {self.ppm}")
        _check(0 <= self.jitter_ps <= self.max_jitter_ps, "jitter_ps must be in [0, max]")
        _check(self.sync_channel not in self.detector_channels, "sync channel taken")
        _check(len(set(self.detector_channels)) == len(self.detector_channels), "dup channels")
        for ch, delay in self.delay_ps:
            _check(abs(delay) <= self.max_abs_delay_ps, f"delay of channel {ch} out of range")
        _check(self.max_rate_hz > 0, "max_rate_hz must be > 0")
        _check(self.buffer_tags >= 1, "buffer_tags must be >= 1")
        _check(self.bucket_bin_ps >= 1, "bucket_bin_ps must be >= 1")

    def delay_of(self, channel: int) -> int:
        """Input delay (ps) of ``channel``; 0 when not set."""
        return dict(self.delay_ps).get(channel, 0)


@dataclass(frozen=True)
class SimulationConfig:
    """Numerical knobs of the model (not physics)."""

    drift_step_s: float = 1e-3  # coarse step of polarization / modulator-phase drifts (s)
    chunk_candidates: int = 2**20  # expected candidate events per processing chunk (memory)
    max_detector_jitter_ps: float = 2_000.0  # largest settable detector jitter (ps)

    def __post_init__(self) -> None:
        _check(self.drift_step_s > 0, "drift_step_s must be > 0")
        _check(self.chunk_candidates >= 1024, "chunk_candidates must be >= 1024")
        _check(self.max_detector_jitter_ps >= 0, "max_detector_jitter_ps must be >= 0")


@dataclass(frozen=True)
class BenchConfig:
    """The whole bench: Alice, channel, Bob, tagger and numerical knobs."""

    alice: AliceConfig = field(default_factory=AliceConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    bob: BobConfig = field(default_factory=BobConfig)
    tagger: TaggerConfig = field(default_factory=TaggerConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    eve: EveConfig = field(default_factory=EveConfig)

    def __post_init__(self) -> None:
        n_det = len(self.bob.detectors)
        _check(
            len(self.tagger.detector_channels) >= n_det,
            f"tagger maps {len(self.tagger.detector_channels)} channels for {n_det} detectors",
        )
        for det in self.bob.detectors:
            _check(
                det.jitter_ps <= self.simulation.max_detector_jitter_ps,
                "detector jitter_ps above simulation.max_detector_jitter_ps",
            )
        if self.eve.blinding:
            self._check_blinding()

    def _check_blinding(self) -> None:
        """Every detector must be blinded: CW at the diode P·T_bob·q_arm·½ ≥ its threshold."""
        bob = self.bob
        t_bob = 10.0 ** (-bob.optics_loss_db / 10.0)
        z = bob.z_fraction
        shares = (z, z, 1.0 - z, 1.0 - z) if len(bob.detectors) == 4 else (1.0, 1.0)
        short = [d for d, (det, q) in enumerate(zip(bob.detectors, shares, strict=True))
                 if self.eve.blinding_power_w * t_bob * q * 0.5 < det.blinding_threshold_w]
        if short:
            least = max(bob.detectors[d].blinding_threshold_w / (t_bob * shares[d] * 0.5)
                        if shares[d] > 0 else math.inf for d in short)
            raise ValueError(
                f"eve.blinding_power_w = {self.eve.blinding_power_w:g} W leaves detector(s) "
                f"{short} in Geiger mode (partial blinding is not modelled): it must be "
                f">= {least:.3g} W at Bob's entrance")


_SECTIONS: dict[str, type] = {
    "alice": AliceConfig,
    "channel": ChannelConfig,
    "bob": BobConfig,
    "tagger": TaggerConfig,
    "simulation": SimulationConfig,
    "eve": EveConfig,
}


def _frozen_value(value: object) -> object:
    """Lists (e.g. from YAML) become tuples, recursively; mappings become pair tuples."""
    if isinstance(value, Mapping):
        return tuple((k, _frozen_value(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return tuple(_frozen_value(v) for v in value)
    return value


def _override(cfg: Any, updates: Mapping[str, Any], where: str) -> Any:
    """``dataclasses.replace`` of ``cfg`` with ``updates`` (unknown keys raise ValueError)."""
    names = {f.name for f in fields(cfg)}
    unknown = sorted(set(updates) - names)
    if unknown:
        raise ValueError(f"unknown bench parameter(s) in {where}: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for key, value in updates.items():
        current = getattr(cfg, key)
        if key == "pattern":
            values[key] = _override(current, value, f"{where}.pattern")
        elif key == "detectors":
            values[key] = _override_detectors(current, value, f"{where}.detectors")
        else:
            values[key] = _frozen_value(value)
    return replace(cfg, **values)


def _override_detectors(
    current: tuple[DetectorConfig, ...], value: Any, where: str
) -> tuple[DetectorConfig, ...]:
    """A mapping changes every detector; a list of mappings gives each its own changes."""
    if isinstance(value, Mapping):
        return tuple(_override(d, value, where) for d in current)
    items = list(value)
    base = current[0] if current else DetectorConfig()
    return tuple(
        _override(current[i] if i < len(current) else base, item, f"{where}[{i}]")
        for i, item in enumerate(items)
    )


def config_from_mapping(mapping: Mapping[str, Any]) -> BenchConfig:
    """A :class:`BenchConfig` from nested overrides, e.g. ``{"channel": {"length_km": 50}}``.

    Sections: ``alice`` (with ``pattern``), ``channel``, ``bob`` (``detectors``: one
    mapping for all or a list, one per detector), ``tagger``, ``simulation``, ``eve``
    (detector blinding, e.g. ``{"eve": {"blinding": True}}``).  Lists
    become tuples; ``tagger.delay_ps`` may be a ``{channel: ps}`` mapping.
    """
    unknown = sorted(set(mapping) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"unknown bench section(s): {', '.join(unknown)}")
    sections = {
        name: _override(getattr(BenchConfig(), name), mapping.get(name, {}), name)
        for name in _SECTIONS
    }
    return BenchConfig(**sections)
