"""Detector blinding on the bench (Lydersen et al., Nat. Photon. 4, 686 (2010)).

Bright CW light from Eve holds Bob's APDs below breakdown: they leave Geiger mode,
single photons no longer click, and there are no dark counts and no afterpulses.  A
blinded APD is a classical linear detector behind a discriminator: it clicks on a
bright pulse whose energy at the diode exceeds its always-click energy and never below
its never-click energy (linear in between).  The photocurrent of the CW light through
the bias network lowers the voltage across the diode and so its linear-mode gain: the
model takes both energies proportional to the CW power at the diode,
``trigger_always_j``·P_d/``blinding_threshold_w`` (likewise ``trigger_never_j``).
Eve intercepts every pulse at Alice's output,
measures it in her basis and resends her result as such a faked state; Bob's detector
measuring that state receives ``trigger_margin`` × its always-click energy.  In the
matched arm the other bit's detector gets only the misalignment leak; each detector of
the other arm gets half of that arm's share.  Since thresholds scale with each arm's
share of the CW light, the arm split cancels: with ``trigger_margin``·
``trigger_always_j`` < 2·``trigger_never_j`` (the published condition for error-free
faked states, always/never ratio below 2) the other arm stays silent, for any
passive splitting ratio.  Bob's detected basis is therefore Eve's: sifting keeps
exactly the pulses where Eve measured in Alice's basis, where Eve's bit is Alice's.

Model choices (documented simplifications):

* Eve's CW light is circularly polarised: every analyser passes half of its arm's share,
  ``P_d = P_cw·T_bob·q_arm·½``.  Every detector must be blinded (``P_d ≥
  blinding_threshold_w``): partial blinding is not modelled, and a
  :class:`~qkdlab.mock_instruments.bench.config.BenchConfig` asking for it is refused.
* With ``avoid_double_clicks``, when no basis can be faked with a single click (e.g.
  Bob's detectors are switched off) Eve resends nothing.
* Eve's faked states arrive aligned with Bob's analysers (she sits at his entrance and
  knows his receiver); Bob's own misalignment still applies.  Eve's receiver is ideal
  apart from ``loss_db`` and ``efficiency``: she clicks with probability
  ``1 − exp(−μ_k·T_E·η_E)``, reads Alice's bit in the matched basis and a random bit
  otherwise (no dark counts, no multi-photon squashing).
* Whether Eve clicks and resends is drawn per pulse (Bernoulli, exact thinning);
  her basis and random bit are a pure function of (seed, pulse index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qkdlab.patterns import ONE, hash_words

from . import optics
from .config import BenchConfig, EveConfig
from .detection import draw_candidates

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
I8Array = npt.NDArray[np.int8]
BoolArray = npt.NDArray[np.bool_]

SALT_BLINDING = 0x5EED_0003  # Eve's basis and random bit (counter stream of the bench seed)


@dataclass(frozen=True)
class BlindingPlan:
    """What Eve sends and how Bob's blinded detectors answer (current settings).

    Attributes:
        cw_w: CW power at each diode (W), shape (n_det,).
        coupling: energy at diode d per joule of Eve's pulse in state s at Bob's
            entrance, shape (4 states, n_det).
        trigger_j: Eve's pulse energy at Bob's entrance per state (J; 0: not sent).
        click: click probability of each detector per Eve state, shape (4, n_det).
        state_prob: probability of each resent state (H, V, D, A).
        p_z: probability that Eve measures (and resends) in Z.
        resend: probability that Eve resends a pulse, per drift step and class,
            shape (steps, 3).
    """

    cw_w: FloatArray
    coupling: FloatArray
    trigger_j: FloatArray
    click: FloatArray
    state_prob: FloatArray
    p_z: float
    resend: FloatArray

    @property
    def deterministic(self) -> bool:
        """True when every click probability is 0 or 1 (no draw needed)."""
        return bool(np.all((self.click == 0.0) | (self.click == 1.0)))

    def click_rates(self, class_probs: tuple[float, float, float], rep_rate_hz: float,
                    step: int = 0) -> FloatArray:
        """Closed-form clicks/s of each detector (no dark counts, before dead time)."""
        per_pulse = float(np.dot(class_probs, self.resend[min(step, len(self.resend) - 1)]))
        rates: FloatArray = rep_rate_hz * per_pulse * (self.state_prob @ self.click)
        return rates

    def mean_trigger_power_w(self, class_probs: tuple[float, float, float],
                             rep_rate_hz: float, step: int = 0) -> tuple[float, FloatArray]:
        """Mean power of Eve's faked states at Bob's entrance and at each diode (W)."""
        per_pulse = float(np.dot(class_probs, self.resend[min(step, len(self.resend) - 1)]))
        energy = self.state_prob * self.trigger_j  # (4,) J per resent pulse, by state
        at_diode: FloatArray = rep_rate_hz * per_pulse * (energy @ self.coupling)
        return rep_rate_hz * per_pulse * float(energy.sum()), at_diode


def _arm_shares(cfg: BenchConfig) -> FloatArray:
    """Share of Bob's light reaching each detector's analyser (splitter arm)."""
    z = cfg.bob.z_fraction
    if len(cfg.bob.detectors) == 4:
        return np.array([z, z, 1.0 - z, 1.0 - z])
    return np.ones(2)


def _targets(cfg: BenchConfig) -> list[int | None]:
    """For each state H, V, D, A: the detector that measures it (None if none does)."""
    if len(cfg.bob.detectors) == 4:
        return [0, 1, 2, 3]
    b = cfg.bob.single_basis
    return [s - 2 * b if s // 2 == b else None for s in range(4)]


def _ramp(energy: FloatArray, never: FloatArray, always: FloatArray) -> FloatArray:
    """Click probability of a blinded detector: 0 below ``never``, 1 above ``always``."""
    span = np.maximum(always - never, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(span > 0, (energy - never) / np.where(span > 0, span, 1.0),
                     np.where(energy >= always, 1.0, 0.0))
    out: FloatArray = np.clip(p, 0.0, 1.0)
    return out


def blinding_plan(cfg: BenchConfig, mu_steps: FloatArray, honest_means: FloatArray
                  ) -> BlindingPlan:
    """Eve's faked states and Bob's answers.

    Args:
        cfg: the bench snapshot (``cfg.eve.blinding`` set).
        mu_steps: μ per drift step and class, shape (steps, 3).
        honest_means: mean photons (×η) reaching each detector without Eve, shape
            (steps, 4 states, 3 classes, n_det): Eve mimics the honest signal gain.

    The configuration guarantees every detector is blinded (``BenchConfig`` refuses
    partial blinding).
    """
    eve, bob = cfg.eve, cfg.bob
    n_det = len(bob.detectors)
    enabled = np.array([d.enabled for d in bob.detectors])
    t_bob = optics.db_to_transmission(bob.optics_loss_db)
    share = _arm_shares(cfg)
    cw = eve.blinding_power_w * t_bob * share * 0.5
    need = np.array([d.blinding_threshold_w for d in bob.detectors])
    analysers = optics.analyser_vectors(n_det, bob.single_basis)
    proj = optics.projection_probabilities(optics.BB84_STOKES, analysers, bob.misalignment)
    coupling: FloatArray = t_bob * share[None, :] * proj * enabled[None, :]  # (4, n_det)
    scale = cw / need  # thresholds rise with the CW power at the diode
    always = np.array([d.trigger_always_j for d in bob.detectors]) * scale
    never = np.array([d.trigger_never_j for d in bob.detectors]) * scale
    trigger = np.zeros(4)
    for s, target in enumerate(_targets(cfg)):
        if target is not None and coupling[s, target] > 0:
            trigger[s] = eve.trigger_margin * always[target] / coupling[s, target]
    click = _ramp(trigger[:, None] * coupling, never[None, :], always[None, :])
    click[trigger == 0.0] = 0.0
    p_z = _eve_p_z(cfg, click)
    resend = _resend_probability(eve, mu_steps, honest_means)
    if p_z is None:  # nothing Eve could fake without double clicks: she resends nothing
        p_z, resend = 1.0, np.zeros_like(resend)
    state_prob = np.array([p_z, p_z, 1.0 - p_z, 1.0 - p_z]) * 0.5
    return BlindingPlan(cw_w=cw, coupling=coupling, trigger_j=trigger, click=click,
                        state_prob=state_prob, p_z=p_z, resend=resend)


def _eve_p_z(cfg: BenchConfig, click: FloatArray) -> float | None:
    """Eve's Z probability: asked for (or Bob's arm ratio), restricted to clean bases
    (None: no basis is clean while ``avoid_double_clicks`` is set)."""
    eve, bob = cfg.eve, cfg.bob
    if eve.p_z is not None:
        p_z = eve.p_z
    elif len(bob.detectors) == 4:
        p_z = bob.z_fraction
    else:
        p_z = 1.0 if bob.single_basis == 0 else 0.0
    if not eve.avoid_double_clicks:
        return p_z
    clean = []
    for basis in (0, 1):
        rows = click[2 * basis: 2 * basis + 2]
        clean.append(bool(np.all(rows.sum(axis=1) == 1.0) and np.all(rows.max(axis=1) == 1.0)))
    if not any(clean):
        return None
    if not clean[0]:
        return 0.0
    if not clean[1]:
        return 1.0
    return p_z


def _resend_probability(eve: EveConfig, mu_steps: FloatArray, honest_means: FloatArray
                        ) -> FloatArray:
    """P(Eve clicks and resends) per drift step and class, shape (steps, 3).

    Eve clicks with 1 − exp(−μ_k·T_E·η_E).  With ``resend_probability`` None she
    resends each click with r = min(1, G_B/p_E) for the signal class, where G_B is
    Bob's honest signal gain (any click, no dark counts, averaged over Alice's states).
    """
    t_eve = optics.db_to_transmission(eve.loss_db)
    p_eve: FloatArray = -np.expm1(-mu_steps * t_eve * eve.efficiency)  # (steps, 3)
    if eve.resend_probability is not None:
        out: FloatArray = p_eve * eve.resend_probability
        return out
    # honest: P(any click | state, signal) averaged over the 4 states (uniform bits)
    any_click = -np.expm1(-honest_means[:, :, 0, :].sum(axis=-1))  # (steps, 4)
    return p_eve * _mimic_ratio(any_click, p_eve[:, 0])[:, None]


def _mimic_ratio(any_click: FloatArray, p_eve_signal: FloatArray) -> FloatArray:
    """r per step: Bob's honest signal gain over Eve's signal click probability (≤ 1).

    The four states are weighted equally: a passive receiver's total click probability
    does not depend on the polarization, so Alice's basis bias does not enter.
    """
    gain = any_click.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(p_eve_signal > 0, gain / np.where(p_eve_signal > 0, p_eve_signal, 1.0),
                     0.0)
    out: FloatArray = np.minimum(r, 1.0)
    return out


def eve_states(seed: int, pulse_index: IntArray, alice_state: I8Array, p_z: float) -> I8Array:
    """State index (H, V, D, A = 0…3) Eve resends for each pulse she detected.

    Her basis is Z when bits 31…1 of her word fall below ``p_z``·2³¹; in Alice's basis
    she reads Alice's bit, in the other the random bit 0 of the word.
    """
    h = hash_words(seed, SALT_BLINDING, pulse_index)
    mid = (h & np.uint64(0xFFFFFFFF)) >> ONE
    eve_x = (mid >= np.uint64(min(round(p_z * 2.0**31), 2**31))).view(np.int8)
    if p_z >= 1.0:
        eve_x = np.zeros_like(eve_x)
    alice_basis = alice_state // 2
    random_bit = (h & ONE).astype(np.int8)
    bit = np.where(eve_x == alice_basis, alice_state % 2, random_bit).astype(np.int8)
    return (2 * eve_x + bit).astype(np.int8)


def draw_resent(rng: np.random.Generator, first: int, stop: int, resend: FloatArray
                ) -> IntArray:
    """Candidate pulses in ``[first, stop)`` at the largest resend probability.

    The caller thins them per class and step with :func:`thin_resent`.
    """
    return draw_candidates(rng, first, stop, float(resend.max()) if resend.size else 0.0)


def thin_resent(rng: np.random.Generator, resend: FloatArray, step: npt.NDArray[np.intp],
                klass: I8Array) -> BoolArray:
    """Exact thinning of the candidates: keep with P(resend | step, class)/p_max."""
    p_max = float(resend.max())
    u = rng.random(step.size)
    keep: BoolArray = u * p_max < resend[step, klass]
    return keep


def bob_clicks(rng: np.random.Generator, plan: BlindingPlan, state: I8Array) -> BoolArray:
    """Which detectors click on each faked state, shape (n, n_det)."""
    prob = plan.click[state.astype(np.intp)]
    if plan.deterministic:
        out: BoolArray = prob == 1.0
        return out
    hit: BoolArray = rng.random(prob.shape) < prob
    return hit


def bias_current_a(cfg: BenchConfig, plan: BlindingPlan | None, measured_cps: FloatArray,
                   trigger_at_diode_w: FloatArray | None = None) -> FloatArray:
    """Mean current through each APD (A): avalanches in Geiger mode, photocurrent when blind.

    Geiger mode: Q_av·R_m·(1 + p_ap), R_m the counted rate (after dead time), p_ap the
    afterpulse probability.  Blinded: responsivity × (CW + mean trigger power at the
    diode), the photodiode at unity gain below breakdown.
    """
    dets = cfg.bob.detectors
    if plan is None:
        geiger = np.array([d.avalanche_charge_c * (1.0 + d.afterpulse_prob) if d.enabled
                           else 0.0 for d in dets])
        out: FloatArray = geiger * measured_cps
        return out
    light = plan.cw_w + (0.0 if trigger_at_diode_w is None else trigger_at_diode_w)
    resp = np.array([d.responsivity_a_per_w for d in dets])
    blind: FloatArray = resp * light
    return blind


def counted_rate(rates_cps: FloatArray, dead_times_s: FloatArray) -> FloatArray:
    """Non-paralysable dead time: R_m = R/(1 + R·τ)."""
    out: FloatArray = rates_cps / (1.0 + rates_cps * dead_times_s)
    return out
