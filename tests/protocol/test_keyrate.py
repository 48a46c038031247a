"""Asymptotic decoy-state rate against Ma, Qi, Zhao, Lo, PRA 72, 012326 (2005)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qkdlab.protocol.keyrate import (
    decoy_bb84_rate,
    gain,
    ideal_decoy_bb84_rate,
    qber,
    transmittance,
    vacuum_weak_decoy_bounds,
)

# GYS experiment parameters as used by Ma et al. (Table I): alpha 0.21 dB/km,
# e_detector 3.3 %, Y0 1.7e-6, eta_Bob 4.5 %, f 1.22
GYS = {"eta_bob": 0.045, "y0": 1.7e-6, "e_detector": 0.033, "alpha_db_per_km": 0.21,
       "f_ec": 1.22}


def max_distance(rate_fn, **kwargs: float) -> float:  # type: ignore[no-untyped-def]
    lo, hi = 0.0, 400.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate_fn(distance_km=mid, **GYS, **kwargs) > 0 else (lo, mid)
    return lo


def test_gys_optimal_mu_and_maximum_distance() -> None:
    # Ma et al. report an optimal mu of about 0.48 and a maximal distance of ~142 km
    # for GYS parameters in the infinite-decoy limit.
    mus = np.linspace(0.1, 1.0, 91)
    rates = [ideal_decoy_bb84_rate(distance_km=50, mu=m, **GYS) for m in mus]
    assert mus[int(np.argmax(rates))] == pytest.approx(0.48, abs=0.02)
    assert max_distance(ideal_decoy_bb84_rate, mu=0.48) == pytest.approx(142.0, abs=1.0)


def test_vacuum_weak_decoy_approaches_infinite_decoy_as_nu_shrinks() -> None:
    ideal = ideal_decoy_bb84_rate(distance_km=40, mu=0.48, **GYS)
    rates = [decoy_bb84_rate(distance_km=40, mu=0.48, nu=nu, **GYS) for nu in (0.2, 0.1, 0.01)]
    assert rates[0] < rates[1] < rates[2] <= ideal
    assert rates[2] == pytest.approx(ideal, rel=0.02)
    # and the bound costs only a couple of km of reach with a practical decoy
    assert max_distance(decoy_bb84_rate, mu=0.48, nu=0.05) > 139.0


def test_rate_falls_with_distance_and_misalignment() -> None:
    rates = [decoy_bb84_rate(distance_km=d, mu=0.5, nu=0.1, **GYS) for d in (0, 25, 50, 100)]
    assert all(a > b for a, b in itertools.pairwise(rates))
    noisy = {**GYS, "e_detector": 0.12}
    assert decoy_bb84_rate(distance_km=10, mu=0.5, nu=0.1, **noisy) == 0.0


def test_bounds_from_exact_model_bracket_the_truth() -> None:
    mu, nu = 0.5, 0.1
    eta = transmittance(0.1, 0.2, 25)
    y0 = 1e-5
    bounds = vacuum_weak_decoy_bounds(mu, nu, gain(mu, eta, y0), gain(nu, eta, y0),
                                      qber(nu, eta, y0, 0.01), y0)
    y1_true = y0 + eta - y0 * eta
    e1_true = (0.5 * y0 + 0.01 * eta) / y1_true
    assert bounds.consistent
    assert 0.9 * y1_true < bounds.y1_lower <= y1_true
    assert e1_true <= bounds.e1_upper < 1.3 * e1_true


def test_inconsistent_gains_are_flagged() -> None:
    # a decoy gain far below what the signal gain implies is no single-photon yield
    bounds = vacuum_weak_decoy_bounds(0.5, 0.1, q_mu=1e-2, q_nu=1e-5, e_nu=0.01, y0=1e-6)
    assert not bounds.consistent
    with pytest.raises(ValueError, match="0 < nu < mu"):
        vacuum_weak_decoy_bounds(0.1, 0.5, 1e-3, 1e-3, 0.01, 1e-6)


def test_three_intensity_bounds_reduce_to_ma_for_a_true_vacuum() -> None:
    from qkdlab.protocol.keyrate import three_intensity_decoy_bounds

    mu, nu, y0, ed = 0.5, 0.1, 1e-5, 0.01
    eta = transmittance(0.1, 0.2, 25)
    q_mu, q_nu = gain(mu, eta, y0), gain(nu, eta, y0)
    e_nu = qber(nu, eta, y0, ed)
    ma = vacuum_weak_decoy_bounds(mu, nu, q_mu, q_nu, e_nu, y0)
    lim = three_intensity_decoy_bounds((mu, nu, 0.0), (q_mu, q_nu, y0), (e_nu * q_nu, 0.5 * y0))
    assert lim.y1_lower == pytest.approx(ma.y1_lower, rel=1e-12)
    assert lim.e1_upper == pytest.approx(ma.e1_upper, rel=1e-12)


def test_three_intensity_bounds_stay_valid_with_a_leaky_vacuum() -> None:
    """A 'vacuum' with mu3 > 0 (finite extinction) must still bound Y1 and e1 from the
    right side; treating it as a true vacuum would under-estimate e1 (insecure)."""
    from qkdlab.protocol.keyrate import three_intensity_decoy_bounds

    mu, nu, mu3, y0, ed = 0.5, 0.1, 0.002, 1e-6, 0.01
    eta = transmittance(0.1, 0.2, 25)
    q = tuple(gain(m, eta, y0) for m in (mu, nu, mu3))
    eq = tuple(qber(m, eta, y0, ed) * gain(m, eta, y0) for m in (nu, mu3))
    y1_true = y0 + eta - y0 * eta
    e1_true = (0.5 * y0 + ed * eta) / y1_true
    right = three_intensity_decoy_bounds((mu, nu, mu3), q, eq)  # type: ignore[arg-type]
    assert right.y1_lower <= y1_true
    assert right.e1_upper >= e1_true
    naive = vacuum_weak_decoy_bounds(mu, nu, q[0], q[1], eq[0] / q[1], q[2])
    assert naive.e1_upper < e1_true  # the flaw the general bound avoids
