"""Asymptotic decoy-state BB84: channel model, vacuum + weak decoy bounds, GLLP key rate.

References (equation numbers of the arXiv version quant-ph/0503005):
    X. Ma, B. Qi, Y. Zhao, H.-K. Lo, "Practical decoy state for quantum key
    distribution", Phys. Rev. A 72, 012326 (2005) — model Eqs. (2)-(9), vacuum + weak
    decoy bounds Eqs. (34) and (37).
    H.-K. Lo, X. Ma, K. Chen, Phys. Rev. Lett. 94, 230504 (2005).
    D. Gottesman, H.-K. Lo, N. Lütkenhaus, J. Preskill, QIC 4, 325 (2004) — the rate
    R >= q{-Q_mu f H2(E_mu) + Q_1 [1 - H2(e_1)]}.

Conventions: ``eta_bob`` is Bob's total detection efficiency (optics x detector);
``y0`` the background (dark count) yield per pulse; rates are per emitted pulse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qkdlab.protocol.bits import binary_entropy

E0 = 0.5  # error rate of background counts (random)


def transmittance(eta_bob: float, alpha_db_per_km: float, distance_km: float) -> float:
    """Overall transmittance η = η_Bob · 10^(−α·L/10) (Ma et al. Eq. 2)."""
    return eta_bob * 10.0 ** (-alpha_db_per_km * distance_km / 10.0)


def gain(mu: float, eta: float, y0: float) -> float:
    """Gain Q_μ = Y0 + 1 − e^(−ημ) (Eq. 7)."""
    return y0 + 1.0 - math.exp(-eta * mu)


def qber(mu: float, eta: float, y0: float, e_detector: float) -> float:
    """QBER E_μ = (e0·Y0 + e_detector·(1 − e^(−ημ))) / Q_μ (Eq. 8)."""
    q = gain(mu, eta, y0)
    return (E0 * y0 + e_detector * (1.0 - math.exp(-eta * mu))) / q


@dataclass(frozen=True)
class DecoyBounds:
    """Single-photon bounds from signal (μ), weak decoy (ν) and vacuum.

    Attributes:
        y0: background yield (from the vacuum decoy).
        y1_lower: lower bound of the single-photon yield Y1.
        q1_lower: lower bound of the single-photon gain in the signal, Y1·μ·e^(−μ).
        e1_upper: upper bound of the single-photon error rate e1 (≤ 0.5).
    """

    y0: float
    y1_lower: float
    q1_lower: float
    e1_upper: float

    @property
    def consistent(self) -> bool:
        """False when the measured gains allow no positive single-photon yield."""
        return self.y1_lower > 0.0 and 0.0 <= self.e1_upper <= 0.5


def vacuum_weak_decoy_bounds(
    mu: float, nu: float, q_mu: float, q_nu: float, e_nu: float, y0: float
) -> DecoyBounds:
    """Y1 lower bound (Eq. 34) and e1 upper bound (Eq. 37), vacuum + one weak decoy.

    Args:
        mu: signal mean photon number; nu: weak decoy mean photon number (ν < μ, μ+ν < 1
            for the bound to be tight as derived).
        q_mu, q_nu: measured gains of signal and decoy; e_nu: decoy QBER.
        y0: background yield, measured as the vacuum decoy's gain.
    """
    if not 0.0 < nu < mu:
        raise ValueError(f"decoy bounds need 0 < nu < mu, got mu={mu}, nu={nu}")
    y1 = (mu / (mu * nu - nu * nu)) * (
        q_nu * math.exp(nu) - q_mu * math.exp(mu) * nu * nu / (mu * mu)
        - (mu * mu - nu * nu) / (mu * mu) * y0
    )
    if y1 <= 0.0:
        return DecoyBounds(y0=y0, y1_lower=y1, q1_lower=0.0, e1_upper=0.5)
    e1 = (e_nu * q_nu * math.exp(nu) - E0 * y0) / (y1 * nu)
    return DecoyBounds(y0=y0, y1_lower=y1, q1_lower=y1 * mu * math.exp(-mu),
                       e1_upper=min(max(e1, 0.0), 0.5))


def three_intensity_decoy_bounds(
    mu: tuple[float, float, float],
    gains: tuple[float, float, float],
    error_gains: tuple[float, float],
) -> DecoyBounds:
    """Single-photon bounds from three intensities μ1 > μ2 > μ3 ≥ 0 (asymptotic).

    The asymptotic form of the bounds of Lim, Curty, Walenta, Xu, Zbinden, PRA 89,
    022307 (2014), Eqs. (2)-(4), with gains in place of counts: a "vacuum" class whose
    finite extinction leaves μ3 > 0 is handled exactly, and its measured errors replace
    the e0·Y0 = Y0/2 of an ideal vacuum.  With μ3 = 0 and half the vacuum counts in
    error this is Ma et al.'s Eqs. (34) and (37).

    Args:
        mu: (μ1, μ2, μ3) mean photon numbers, μ1 > μ2 + μ3, μ2 > μ3 ≥ 0.
        gains: (Q1, Q2, Q3) measured gains.
        error_gains: (E2·Q2, E3·Q3), the gains of erroneous sifted bits of the decoy and
            the weakest class.
    """
    m1, m2, m3 = mu
    q1, q2, q3 = gains
    eq2, eq3 = error_gains
    if not (m1 > m2 + m3 and m2 > m3 >= 0.0):
        raise ValueError(f"decoy bounds need mu1 > mu2 + mu3 and mu2 > mu3 >= 0, got {mu}")
    # Y0 >= (μ2·Q3·e^μ3 − μ3·Q2·e^μ2)/(μ2 − μ3)   (Lim Eq. 2, asymptotic)
    y0 = max((m2 * q3 * math.exp(m3) - m3 * q2 * math.exp(m2)) / (m2 - m3), 0.0)
    denom = m1 * (m2 - m3) - m2 * m2 + m3 * m3
    y1 = (m1 / denom) * (
        q2 * math.exp(m2) - q3 * math.exp(m3)
        - (m2 * m2 - m3 * m3) / (m1 * m1) * (q1 * math.exp(m1) - y0)
    )
    if y1 <= 0.0:
        return DecoyBounds(y0=y0, y1_lower=y1, q1_lower=0.0, e1_upper=0.5)
    # e1 <= (E2Q2·e^μ2 − E3Q3·e^μ3)/((μ2 − μ3)·Y1)   (Lim Eq. 4, asymptotic)
    e1 = (eq2 * math.exp(m2) - eq3 * math.exp(m3)) / ((m2 - m3) * y1)
    return DecoyBounds(y0=y0, y1_lower=y1, q1_lower=y1 * m1 * math.exp(-m1),
                       e1_upper=min(max(e1, 0.0), 0.5))


def gllp_rate(q: float, q_mu: float, e_mu: float, q1: float, e1: float, f_ec: float) -> float:
    """R = q·{−Q_μ·f·H2(E_μ) + Q1·[1 − H2(e1)]}, clipped at 0 (GLLP; Ma et al. Eq. 1)."""
    rate = q * (-q_mu * f_ec * binary_entropy(e_mu) + q1 * (1.0 - binary_entropy(e1)))
    return max(rate, 0.0)


def decoy_bb84_rate(
    eta_bob: float,
    y0: float,
    e_detector: float,
    alpha_db_per_km: float,
    distance_km: float,
    f_ec: float,
    mu: float,
    nu: float,
    q: float = 0.5,
) -> float:
    """Secure key rate per pulse of vacuum + weak decoy BB84 in the asymptotic limit.

    The gains and QBERs the channel model predicts are fed to the same bounds a
    measurement uses (:func:`vacuum_weak_decoy_bounds`), then to the GLLP rate.

    Args:
        eta_bob: Bob's detection efficiency (optics × detector), 0–1.
        y0: background yield per pulse (dark counts in the detection window).
        e_detector: optical misalignment error probability.
        alpha_db_per_km: fibre loss (dB/km); distance_km: fibre length (km).
        f_ec: error-correction inefficiency (≥ 1).
        mu, nu: signal and weak-decoy mean photon numbers.
        q: sifting factor (1/2 for standard BB84, → 1 for efficient BB84).
    """
    eta = transmittance(eta_bob, alpha_db_per_km, distance_km)
    q_mu, q_nu = gain(mu, eta, y0), gain(nu, eta, y0)
    e_mu, e_nu = qber(mu, eta, y0, e_detector), qber(nu, eta, y0, e_detector)
    bounds = vacuum_weak_decoy_bounds(mu, nu, q_mu, q_nu, e_nu, y0)
    if not bounds.consistent:
        return 0.0
    return gllp_rate(q, q_mu, e_mu, bounds.q1_lower, bounds.e1_upper, f_ec)


def ideal_decoy_bb84_rate(
    eta_bob: float,
    y0: float,
    e_detector: float,
    alpha_db_per_km: float,
    distance_km: float,
    f_ec: float,
    mu: float,
    q: float = 0.5,
) -> float:
    """The infinite-decoy limit: Y1 and e1 known exactly (Ma et al. Eqs. 5, 9)."""
    eta = transmittance(eta_bob, alpha_db_per_km, distance_km)
    y1 = y0 + eta - y0 * eta
    e1 = (E0 * y0 + e_detector * eta) / y1
    q1 = y1 * mu * math.exp(-mu)
    return gllp_rate(q, gain(mu, eta, y0), qber(mu, eta, y0, e_detector), q1, e1, f_ec)
