"""Seeded physics model of the QKD optical bench (numpy + numba only).

Everything is deterministic given ``seed``: each random draw comes from its own
``numpy.random.Generator`` built from ``SeedSequence([seed, stream id])``, and Alice's
symbols are a pure function of (seed, pulse index) (:func:`symbols`).

Usage::

    bench = Bench(BenchConfig(), seed=1)
    bench.channel.length_km = 50.0          # settings: small mutable dataclasses
    bench.bob.detectors[0].dead_time_s = 20e-6
    tags = bench.acquire(0.01)              # BenchTags of the next 10 ms
    basis, bit, intensity = bench.alice_symbols(tags.pulse_index[tags.origin == 0])

Settings (mutable between acquisitions; an acquisition takes a validated frozen
snapshot, :meth:`Bench.config`, under ``bench.lock`` — hold ``with bench.lock:`` to
change several at once from another thread):

* ``bench.alice`` (:class:`AliceSettings`): ``laser_on``, ``rep_rate_hz``,
  ``wavelength_m``, ``laser_power_w``, ``fixed_attenuation_db``, ``attenuation_db``
  (VOA), ``v_pi_v``, ``extinction_ratio_db``, ``im_bias_v``, ``drive_v[k]`` (signal,
  decoy, vacuum), ``im_phase_rad``, ``im_drift_rad_per_s``,
  ``im_phase_diffusion_rad2_per_s``, ``prep_error_rad[s]``, ``pattern``
  (:class:`PatternConfig`), ``marker_delay_ps``;
* ``bench.channel`` (:class:`ChannelSettings`): ``length_km``, ``loss_db_per_km``,
  ``insertion_loss_db``, ``group_index``, ``pol_diffusion_rad2_per_s``, ``eve_fraction``;
* ``bench.bob`` (:class:`BobSettings`): ``optics_loss_db``, ``misalignment``,
  ``z_fraction``, ``single_basis``, ``pc_rotation`` (3×3 or 3 angles),
  ``detectors[d]`` (:class:`DetectorSettings`: ``enabled``, ``efficiency``,
  ``dark_count_cps``, ``dead_time_s``, ``afterpulse_prob``, ``afterpulse_tau_s``,
  ``jitter_ps``, and the bright-light figures ``avalanche_charge_c``,
  ``responsivity_a_per_w``, ``blinding_threshold_w``, ``trigger_always_j``,
  ``trigger_never_j``);
* ``bench.eve`` (:class:`EveSettings`): the detector-blinding eavesdropper
  (``blinding``, ``blinding_power_w``, ``efficiency``, ``loss_db``, ``p_z``,
  ``trigger_margin``, ``resend_probability``, ``avoid_double_clicks``; see
  :mod:`~qkdlab.mock_instruments.bench.blinding`);
* ``bench.tagger`` (:class:`TaggerSettings`): ``jitter_ps``, ``delay_ps[ch]``,
  ``detector_channels``, ``sync_channel``, ``max_rate_hz``, ``buffer_tags``.  The
  timebase error (``offset_ps``, ``ppm``) is fixed in :class:`TaggerConfig`.

Read-outs: :meth:`Bench.mean_photon_numbers`, :meth:`Bench.expected_click_rates`
(closed form, before dead time), :meth:`Bench.optical_power_at` (power-meter mock),
:meth:`Bench.channel_rotation` (fibre R(t), for a compensator),
:meth:`Bench.detector_bias_current_a` (a current monitor on each APD's bias line),
:meth:`Bench.blinding_plan` (Eve's faked states), and the ground truth
:meth:`Bench.emission_time_ps` / :meth:`Bench.propagation_delay_ps`.
:func:`config_from_mapping` builds a :class:`BenchConfig` from nested overrides.

Model notes (documented simplifications):

* Cost follows detections: per basis arm, candidate pulses are a Bernoulli process at
  the arm's largest click probability, thinned exactly (coherent states: independent
  Poisson photon numbers per detector).  No array ever has one element per pulse.
* Light in flight is not tracked: settings apply to every event simulated after the
  change; a change of ``length_km`` or ``rep_rate_hz`` discards the light in the fibre.
* Fibre rotation and modulator phase are piecewise constant on a 1 ms grid of emission
  time (``SimulationConfig.drift_step_s``).
* Detector and tagger jitter are Gaussians clipped at ±8σ; the jitter of a photon click
  that falls wholly inside a dead time is never drawn (it cannot change the result).
* The true time axis is quantised to 1 ps before the tagger (≪ any jitter).
* Pulse 0 leaves Alice at t = 0, so the first L·n_g/c of the first block holds dark
  counts and markers only; tags of events before t = 0 are not reported.
"""

from .config import (
    AliceConfig,
    BenchConfig,
    BobConfig,
    ChannelConfig,
    DetectorConfig,
    EveConfig,
    PatternConfig,
    SimulationConfig,
    TaggerConfig,
    config_from_mapping,
)
from .detection import ORIGIN_AFTERPULSE, ORIGIN_DARK, ORIGIN_MARKER, ORIGIN_PHOTON
from .model import (
    AliceSettings,
    Bench,
    BenchTags,
    BobSettings,
    ChannelSettings,
    DetectorSettings,
    EveSettings,
    TaggerSettings,
)
from .optics import rotation_from_angles
from .symbols import marker_pulse_indices, symbols

__all__ = [
    "ORIGIN_AFTERPULSE",
    "ORIGIN_DARK",
    "ORIGIN_MARKER",
    "ORIGIN_PHOTON",
    "AliceConfig",
    "AliceSettings",
    "Bench",
    "BenchConfig",
    "BenchTags",
    "BobConfig",
    "BobSettings",
    "ChannelConfig",
    "ChannelSettings",
    "DetectorConfig",
    "DetectorSettings",
    "EveConfig",
    "EveSettings",
    "PatternConfig",
    "SimulationConfig",
    "TaggerConfig",
    "TaggerSettings",
    "config_from_mapping",
    "marker_pulse_indices",
    "rotation_from_angles",
    "symbols",
]
