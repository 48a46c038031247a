"""Optics of the bench: photon numbers, modulator, Poincaré-sphere states and rotations.

Polarization is handled as Stokes vectors on the Poincaré sphere: H = (1, 0, 0),
V = (−1, 0, 0), D = (0, 1, 0), A = (0, −1, 0); state index ``2·basis + bit``.  Fibre
and polarization controller act as rotations in SO(3); an analyser with Stokes vector
``a`` passes a photon in state ``s`` with probability ½·(1 + c·a·s), where the contrast
c = 1 − 2·e_mis carries Bob's optical misalignment error.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from .config import LIGHT_SPEED_M_S, PLANCK_J_S, AliceConfig, ChannelConfig

FloatArray = npt.NDArray[np.float64]

BB84_STOKES = np.array(
    [[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]
)  # H, V, D, A


def db_to_transmission(loss_db: float) -> float:
    """Power transmission of a ``loss_db`` (dB) loss."""
    return float(10.0 ** (-loss_db / 10.0))


def photon_energy_j(wavelength_m: float) -> float:
    """Photon energy h·c/λ (J)."""
    return PLANCK_J_S * LIGHT_SPEED_M_S / wavelength_m


def photons_per_pulse(power_w: float, wavelength_m: float, rep_rate_hz: float) -> float:
    """Mean photon number per pulse n = P·λ/(h·c·f_rep) of a pulsed laser."""
    return power_w / (photon_energy_j(wavelength_m) * rep_rate_hz)


def modulator_visibility(extinction_ratio_db: float) -> float:
    """Visibility v of a Mach–Zehnder modulator from (1 − v)/(1 + v) = 10^(−ER/10)."""
    r = db_to_transmission(extinction_ratio_db)
    return (1.0 - r) / (1.0 + r)


def modulator_transmission(
    voltage_v: npt.ArrayLike, v_pi_v: float, visibility: float, phase_rad: npt.ArrayLike
) -> FloatArray:
    """Mach–Zehnder transmission T(V) = ½·[1 + v·cos(π·V/Vπ + φ)]."""
    v = np.asarray(voltage_v, dtype=np.float64)
    phase = np.asarray(phase_rad, dtype=np.float64)
    out: FloatArray = 0.5 * (1.0 + visibility * np.cos(np.pi * v / v_pi_v + phase))
    return out


def mu_into_modulator(alice: AliceConfig) -> float:
    """Mean photon number per pulse entering the modulator (laser × attenuators)."""
    if not alice.laser_on:
        return 0.0
    n = photons_per_pulse(alice.laser_power_w, alice.wavelength_m, alice.rep_rate_hz)
    return n * db_to_transmission(alice.fixed_attenuation_db + alice.attenuation_db)


def class_transmissions(alice: AliceConfig, phase_rad: npt.ArrayLike) -> FloatArray:
    """Modulator transmission per intensity class; shape ``phase.shape + (3,)``."""
    phase = np.asarray(phase_rad, dtype=np.float64)[..., None]
    volts = alice.im_bias_v + np.asarray(alice.drive_v, dtype=np.float64)
    vis = modulator_visibility(alice.extinction_ratio_db)
    return modulator_transmission(volts, alice.v_pi_v, vis, phase)


def mean_photon_numbers(alice: AliceConfig, phase_rad: npt.ArrayLike) -> FloatArray:
    """μ_k = μ_in·T(V_b + V_k) for k = signal, decoy, vacuum (shape ``phase + (3,)``)."""
    return mu_into_modulator(alice) * class_transmissions(alice, phase_rad)


def max_mean_photon_number(alice: AliceConfig) -> float:
    """Upper bound of μ over classes and any modulator phase: μ_in·(1 + v)/2."""
    vis = modulator_visibility(alice.extinction_ratio_db)
    return mu_into_modulator(alice) * 0.5 * (1.0 + vis)


def channel_transmission(channel: ChannelConfig) -> float:
    """Fibre transmission 10^(−(α·L + IL)/10)."""
    loss_db = channel.loss_db_per_km * channel.length_km + channel.insertion_loss_db
    return db_to_transmission(loss_db)


def propagation_delay_ps(channel: ChannelConfig) -> float:
    """Fibre group delay L·n_g/c (ps)."""
    return channel.length_km * 1e3 * channel.group_index / LIGHT_SPEED_M_S * 1e12


def rotation_about_axis(axis: int, angle_rad: float) -> FloatArray:
    """Rotation matrix by ``angle_rad`` about Stokes axis S1, S2 or S3 (``axis`` 0, 1, 2)."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def rotation_from_angles(a1_rad: float, a2_rad: float, a3_rad: float) -> FloatArray:
    """Controller rotation R = R_S3(a3)·R_S2(a2)·R_S1(a1) (three fibre paddles)."""
    r1 = rotation_about_axis(0, a1_rad)
    r2 = rotation_about_axis(1, a2_rad)
    r3 = rotation_about_axis(2, a3_rad)
    return r3 @ r2 @ r1


def rotations_from_vectors(w: FloatArray) -> FloatArray:
    """Rodrigues: rotation matrices ``exp([w]×)`` of rotation vectors ``w`` (shape (n, 3))."""
    theta = np.linalg.norm(w, axis=1)
    safe = np.where(theta > 0, theta, 1.0)
    k = w / safe[:, None]
    kx = np.zeros((w.shape[0], 3, 3))
    kx[:, 0, 1], kx[:, 0, 2] = -k[:, 2], k[:, 1]
    kx[:, 1, 0], kx[:, 1, 2] = k[:, 2], -k[:, 0]
    kx[:, 2, 0], kx[:, 2, 1] = -k[:, 1], k[:, 0]
    s = np.sin(theta)[:, None, None]
    c = (1.0 - np.cos(theta))[:, None, None]
    out: FloatArray = np.eye(3)[None] + s * kx + c * (kx @ kx)
    return out


def is_rotation(m: FloatArray, tol: float = 1e-9) -> bool:
    """True if ``m`` is a 3×3 proper rotation (orthogonal, det +1)."""
    return bool(
        m.shape == (3, 3)
        and np.allclose(m @ m.T, np.eye(3), atol=tol)
        and abs(np.linalg.det(m) - 1.0) < tol
    )


def alice_states(prep_error_rad: tuple[float, ...]) -> FloatArray:
    """Prepared Stokes vectors H, V, D, A, each rotated about S3 by its preparation error."""
    out = np.empty((4, 3))
    for s in range(4):
        out[s] = rotation_about_axis(2, prep_error_rad[s]) @ BB84_STOKES[s]
    return out


def analyser_vectors(n_detectors: int, single_basis: int) -> FloatArray:
    """Analyser Stokes vector of each detector (4: H, V, D, A; 2: the two of one basis)."""
    if n_detectors == 4:
        return BB84_STOKES.copy()
    return BB84_STOKES[2 * single_basis : 2 * single_basis + 2].copy()


def projection_probabilities(
    states: FloatArray, analysers: FloatArray, misalignment: float
) -> FloatArray:
    """P(analyser d passes state s) = ½·(1 + (1 − 2·e_mis)·a_d·s); shape states + (n_det,)."""
    contrast = 1.0 - 2.0 * misalignment
    return 0.5 * (1.0 + contrast * (states @ analysers.T))


class DriftProcess:
    """Piecewise-constant drifts on a coarse step grid: fibre rotation R_j and modulator φ_j.

    Step ``j`` covers emission times ``[j·Δ, (j+1)·Δ)``.  R_{j+1} = exp([w_j]×)·R_j with
    each component of w_j ~ N(0, 2·D·Δ) (isotropic rotational diffusion, D in rad²/s);
    the modulator's random-walk part W_{j+1} = W_j + N(0, 2·D_φ·Δ).  Steps are drawn in
    order from their own generators, so the walk does not depend on how time is chunked.
    Only steps at or after the last pruned index are kept.
    """

    def __init__(self, rng_rotation: np.random.Generator, rng_phase: np.random.Generator,
                 step_s: float) -> None:
        self._rng_rot = rng_rotation
        self._rng_phase = rng_phase
        self.step_s = step_s
        self._base = 0  # step index of row 0 of the caches
        self._rot = np.eye(3)[None].copy()  # (n, 3, 3) rotations for steps base…base+n−1
        self._walk = np.zeros(1)  # (n,) modulator random-walk phase

    @property
    def last_step(self) -> int:
        """Largest step index generated so far."""
        return self._base + int(self._rot.shape[0]) - 1

    def extend_to(self, step: int, pol_diffusion: float, phase_diffusion: float) -> None:
        """Generate steps up to ``step`` (inclusive) with the current diffusion coefficients."""
        n_new = step - self.last_step
        if n_new <= 0:
            return
        rots = self._new_rotations(n_new, pol_diffusion)
        walk = self._new_walk(n_new, phase_diffusion)
        self._rot = np.concatenate([self._rot, rots])
        self._walk = np.concatenate([self._walk, walk])

    def _new_rotations(self, n_new: int, diffusion: float) -> FloatArray:
        """Next ``n_new`` cumulative rotations (constant when ``diffusion`` is 0)."""
        last = self._rot[-1]
        if diffusion <= 0.0:
            return np.broadcast_to(last, (n_new, 3, 3)).copy()
        sigma = math.sqrt(2.0 * diffusion * self.step_s)
        incr = rotations_from_vectors(sigma * self._rng_rot.standard_normal((n_new, 3)))
        out = np.empty((n_new, 3, 3))
        acc = last
        for j in range(n_new):  # one matrix product per 1 ms step, not per event
            acc = incr[j] @ acc
            out[j] = acc
        return out

    def _new_walk(self, n_new: int, diffusion: float) -> FloatArray:
        """Next ``n_new`` random-walk phases (constant when ``diffusion`` is 0)."""
        last = float(self._walk[-1])
        if diffusion <= 0.0:
            return np.full(n_new, last)
        sigma = math.sqrt(2.0 * diffusion * self.step_s)
        return last + np.cumsum(sigma * self._rng_phase.standard_normal(n_new))

    def prune_below(self, step: int) -> None:
        """Forget steps before ``step`` (never the last one)."""
        drop = min(step - self._base, self._rot.shape[0] - 1)
        if drop > 0:
            self._rot = self._rot[drop:].copy()
            self._walk = self._walk[drop:].copy()
            self._base += drop

    def rotations(self, first: int, last: int) -> FloatArray:
        """Fibre rotations of steps ``first…last`` (inclusive); shape (n, 3, 3)."""
        self._check_range(first, last)
        return self._rot[first - self._base : last - self._base + 1]

    def walk_phases(self, first: int, last: int) -> FloatArray:
        """Modulator random-walk phase of steps ``first…last`` (rad)."""
        self._check_range(first, last)
        return self._walk[first - self._base : last - self._base + 1]

    def _check_range(self, first: int, last: int) -> None:
        """Fail loudly if a step outside the cache is asked for."""
        if first < self._base or last > self.last_step:
            raise IndexError(
                f"drift steps {first}…{last} outside the cache {self._base}…{self.last_step}"
            )
