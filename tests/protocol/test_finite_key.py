"""Finite-key length of Lim et al., PRA 89, 022307 (2014): formulas, trends and limits."""

from __future__ import annotations

import itertools
import math

import pytest

from qkdlab.protocol.bits import binary_entropy
from qkdlab.protocol.finite_key import (
    DecoyStatistics,
    expected_statistics,
    gamma,
    photon_number_probability,
    secure_key_length,
)

# Intensities and probabilities close to Lim et al.'s optimised values at tens of km
# (signal ≈ 0.5, weak decoy ≈ 0.1, vacuum; key basis chosen with high probability).
MU = (0.5, 0.1, 0.0)
PROBS = (0.7, 0.2, 0.1)
P_X = 0.85
F_EC = 1.16  # error-correction inefficiency used in the paper's simulations


def channel(pulses: float, km: float = 50.0, misalignment: float = 0.005) -> DecoyStatistics:
    eta = 0.1 * 10 ** (-0.2 * km / 10)  # Bob 10 %, 0.2 dB/km (the paper's Fig. 1 model)
    return expected_statistics(pulses, MU, PROBS, transmittance=eta, p_x=P_X,
                               misalignment=misalignment)


def rate(pulses: float, km: float = 50.0, misalignment: float = 0.005,
         asymptotic: bool = False) -> float:
    st = channel(pulses, km, misalignment)
    lam = F_EC * sum(st.n_x) * binary_entropy(st.qber_x)
    return secure_key_length(st, MU, PROBS, lam, asymptotic=asymptotic).length / pulses


def test_gamma_matches_a_hand_evaluation() -> None:
    a, b, c, d = 1e-9, 0.02, 1e5, 1e6
    inner = (c + d) / (c * d * (1 - b) * b) * (21 / a) ** 2
    expected = math.sqrt((c + d) * (1 - b) * b / (c * d * math.log(2)) * math.log2(inner))
    assert gamma(a, b, c, d) == pytest.approx(expected, rel=1e-12)
    assert 0.0 < gamma(a, b, c, d) < 0.02  # small next to the observed 2 %


def test_photon_number_probabilities() -> None:
    taus = [photon_number_probability(k, MU, PROBS) for k in range(30)]
    assert sum(taus) == pytest.approx(sum(PROBS))
    assert taus[0] == pytest.approx(0.7 * math.exp(-0.5) + 0.2 * math.exp(-0.1) + 0.1)


def test_bounds_hand_checked_on_one_block() -> None:
    st = channel(1e11)
    res = secure_key_length(st, MU, PROBS, lambda_ec=1e6)
    tau0, tau1 = res.tau0, res.tau1
    dev = math.sqrt(sum(st.n_x) / 2 * math.log(21 / 1e-9))
    n_minus = [math.exp(m) / p * (n - dev) for n, m, p in zip(st.n_x, MU, PROBS, strict=True)]
    n_plus = [math.exp(m) / p * (n + dev) for n, m, p in zip(st.n_x, MU, PROBS, strict=True)]
    s0 = max(0.0, tau0 * (0.1 * n_minus[2] - 0.0 * n_plus[1]) / 0.1)  # floored at 0
    s1 = tau1 * 0.5 * (n_minus[1] - n_plus[2] - 0.01 / 0.25 * (n_plus[0] - s0 / tau0)) / (
        0.5 * 0.1 - 0.01
    )
    assert res.s_x0 == pytest.approx(s0)
    assert res.s_x1 == pytest.approx(s1)
    assert res.phi_x == pytest.approx(res.phase_error_estimate + res.gamma)
    expected = s0 + s1 * (1 - binary_entropy(res.phi_x)) - 1e6 - 6 * math.log2(21e9) - math.log2(
        2e15
    )
    assert res.length == math.floor(expected)
    assert res.reason is None
    assert res.secure


def test_rate_grows_with_block_size_toward_the_asymptotic_rate() -> None:
    sizes = [1e9, 1e10, 1e11, 1e12, 1e13, 1e14]
    rates = [rate(n) for n in sizes]
    asym = rate(1e14, asymptotic=True)
    assert all(b > a for a, b in itertools.pairwise(rates))
    assert rates[-1] < asym
    assert rates[-1] > 0.97 * asym  # within 3 % at N = 10^14 pulses
    assert rates[2] < 0.95 * asym  # clearly finite-size limited at 10^11


def test_no_key_below_a_minimum_block_size() -> None:
    st = channel(1e8)
    res = secure_key_length(st, MU, PROBS, F_EC * sum(st.n_x) * binary_entropy(st.qber_x))
    assert res.length == 0
    assert res.reason is not None
    assert rate(1e8) == 0.0
    assert rate(1e11) > 0.0


def test_length_decreases_with_qber() -> None:
    lengths = [rate(1e11, misalignment=e) for e in (0.005, 0.01, 0.02, 0.03, 0.05)]
    assert all(b < a for a, b in itertools.pairwise(lengths))
    assert rate(1e11, misalignment=0.12) == 0.0


def test_length_decreases_with_distance() -> None:
    rates = [rate(1e11, km) for km in (10, 30, 50, 70)]
    assert all(b < a for a, b in itertools.pairwise(rates))


def test_sanity_limits() -> None:
    st = channel(1e11)
    base = secure_key_length(st, MU, PROBS, 1e6)
    # the leak is subtracted bit for bit
    assert secure_key_length(st, MU, PROBS, 1e6 + 1000).length in (base.length - 1000,
                                                                   base.length - 1001)
    # stricter security parameters cost key
    assert secure_key_length(st, MU, PROBS, 1e6, eps_sec=1e-15).length < base.length
    assert secure_key_length(st, MU, PROBS, 1e6, eps_cor=1e-30).length < base.length
    # never more than the key-basis detections
    assert base.length < sum(st.n_x)
    # λ_EC larger than everything: no key, with a reason
    huge = secure_key_length(st, MU, PROBS, 1e12)
    assert huge.length == 0
    assert "<= 0" in (huge.reason or "")


def test_inconsistent_inputs_give_zero_with_a_reason() -> None:
    st = channel(1e11)
    bad = secure_key_length(st, (0.5, 0.1, 0.1), PROBS, 0)  # μ2 = μ3: no decoy estimate
    assert bad.length == 0
    assert "violate" in (bad.reason or "")
    bad = secure_key_length(st, (0.15, 0.1, 0.06), PROBS, 0)  # μ1 < μ2 + μ3
    assert bad.length == 0
    assert "violate" in (bad.reason or "")
    noisy = DecoyStatistics(st.n_x, st.n_z, tuple(0.55 * n for n in st.n_z))  # type: ignore[arg-type]
    res = secure_key_length(noisy, MU, PROBS, 0)
    assert res.length == 0
    assert "1/2" in (res.reason or "")
    with pytest.raises(ValueError, match="more Z errors"):
        DecoyStatistics((1, 1, 1), (1, 1, 1), (2, 0, 0))
    with pytest.raises(ValueError, match="probabilities"):
        secure_key_length(st, MU, (0.7, 0.7, 0.1), 0)


def test_zero_test_basis_errors_is_handled_conservatively() -> None:
    st = channel(1e11)
    clean = DecoyStatistics(st.n_x, st.n_z, (0.0, 0.0, 0.0), st.m_x)
    res = secure_key_length(clean, MU, PROBS, 1e6)
    assert res.secure
    assert res.gamma > 0
