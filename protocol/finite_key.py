"""Finite-key secure length of decoy-state BB84 with two decoys (one may be vacuum).

C. C. W. Lim, M. Curty, N. Walenta, F. Xu, H. Zbinden, "Concise security bounds for
practical decoy-state quantum key distribution", Phys. Rev. A 89, 022307 (2014),
arXiv:1311.7129.  Notation as there: the key comes from the X basis, the Z basis
estimates the phase error; intensities μ1 > μ2 + μ3, μ2 > μ3 ≥ 0 are sent with
probabilities p_k.  (In qkdlab's frame ``basis`` 0 = Z, 1 = X; pass the counts of the
key basis as ``n_x``.)  All counts are over the whole block (pulses where Alice and Bob
used the same basis and Bob detected).

* Photon-number probabilities τ_n = Σ_k p_k e^(−k) k^n / n!.
* Hoeffding: n^±_{X,k} = (e^k / p_k)(n_{X,k} ± √(n_X/2 · ln(21/ε_sec))), same for Z and
  for the error counts m with m_Z in the root (Eq. 2 context).
* Vacuum events:  s_{X,0} ≥ τ0 (μ2 n^-_{X,μ3} − μ3 n^+_{X,μ2}) / (μ2 − μ3)      (Eq. 2).
* Single photons: s_{X,1} ≥ τ1 μ1 [n^-_{X,μ2} − n^+_{X,μ3}
  − (μ2² − μ3²)/μ1² (n^+_{X,μ1} − s_{X,0}/τ0)] / (μ1(μ2 − μ3) − μ2² + μ3²)       (Eq. 3).
* Single-photon errors in Z: v_{Z,1} ≤ τ1 (m^+_{Z,μ2} − m^-_{Z,μ3}) / (μ2 − μ3)   (Eq. 4).
* Phase error: φ_X ≤ v_{Z,1}/s_{Z,1} + γ(ε_sec, v_{Z,1}/s_{Z,1}, s_{Z,1}, s_{X,1}) with
  γ(a, b, c, d) = √[(c+d)(1−b)b/(c d ln 2) · log2((c+d)/(c d (1−b) b) · 21²/a²)]  (Eq. 5).
* Length: ℓ = ⌊s_{X,0} + s_{X,1} − s_{X,1} h(φ_X) − λ_EC − 6 log2(21/ε_sec)
  − log2(2/ε_cor)⌋ (Eq. 1), ε_sec-secret and ε_cor-correct.

λ_EC is what error correction actually disclosed (Cascade's count), plus any
verification hash bits beyond log2(2/ε_cor).  The ``asymptotic`` variant drops every
finite-size term (Hoeffding deviations, γ and the ε terms): the N → ∞ limit the finite
rate tends to.  Negative bounds give length 0 with the reason.

Model side: :func:`expected_statistics` (Lim et al.'s active two-detector channel),
:func:`expected_statistics_passive` (qkdlab's bench: passive basis splitter, four
detectors, squashing), :func:`expected_ec_leakage` (λ_EC for an efficiency f) and
:func:`secure_key_length_samples` (the spread of ℓ and every bound under counting
statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qkdlab.protocol.bits import binary_entropy

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class DecoyStatistics:
    """Observed counts per intensity (μ1, μ2, μ3) of one block.

    ``n_x``/``n_z``: detections with matching bases in X (key) / Z (test); ``m_z``: bit
    errors among the Z ones; ``m_x``: errors among the X ones (only reported).
    """

    n_x: Triple
    n_z: Triple
    m_z: Triple
    m_x: Triple = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        for name in ("n_x", "n_z", "m_z", "m_x"):
            v = getattr(self, name)
            if len(v) != 3 or any(x < 0 or not math.isfinite(x) for x in v):
                raise ValueError(f"{name} must be three finite counts >= 0, got {v}")
        if any(m > n for m, n in zip(self.m_z, self.n_z, strict=True)):
            raise ValueError("more Z errors than Z detections")

    @property
    def qber_x(self) -> float:
        """Observed error rate of the key basis (0 if unknown)."""
        total = sum(self.n_x)
        return sum(self.m_x) / total if total else 0.0

    @property
    def qber_z(self) -> float:
        """Observed error rate of the test basis."""
        total = sum(self.n_z)
        return sum(self.m_z) / total if total else 0.0


@dataclass(frozen=True)
class FiniteKeyResult:
    """Every intermediate bound of Lim et al. (2014) and the secure length ``length``."""

    length: int
    reason: str | None
    tau0: float
    tau1: float
    n_x_minus: Triple
    n_x_plus: Triple
    n_z_minus: Triple
    n_z_plus: Triple
    m_z_minus: Triple
    m_z_plus: Triple
    s_x0: float
    s_x1: float
    s_z0: float
    s_z1: float
    v_z1: float
    phase_error_estimate: float
    gamma: float
    phi_x: float
    lambda_ec: float
    secrecy_cost: float
    correctness_cost: float
    raw_length: float

    @property
    def secure(self) -> bool:
        """True if a key of positive length may be extracted."""
        return self.length > 0


def photon_number_probability(n: int, intensities: Triple, probabilities: Triple) -> float:
    """τ_n = Σ_k p_k e^(−μ_k) μ_k^n / n! (probability that Alice sends n photons)."""
    return sum(
        p * math.exp(-mu) * mu**n / math.factorial(n)
        for mu, p in zip(intensities, probabilities, strict=True)
    )


def gamma(a: float, b: float, c: float, d: float) -> float:
    """γ(a, b, c, d) of Lim et al. (2014), Eq. 5 (finite-size phase-error correction)."""
    if not (0 < b < 1 and c > 0 and d > 0 and a > 0):
        raise ValueError("gamma needs a, c, d > 0 and 0 < b < 1")
    inner = (c + d) / (c * d * (1 - b) * b) * (21.0 / a) ** 2
    return math.sqrt((c + d) * (1 - b) * b / (c * d * math.log(2)) * math.log2(inner))


def _hoeffding(counts: Triple, total: float, intensities: Triple, probabilities: Triple,
               eps_sec: float, asymptotic: bool) -> tuple[Triple, Triple]:
    dev = 0.0 if asymptotic else math.sqrt(total / 2.0 * math.log(21.0 / eps_sec))
    minus = tuple(
        math.exp(mu) / p * (n - dev) for n, mu, p in zip(counts, intensities, probabilities,
                                                         strict=True)
    )
    plus = tuple(
        math.exp(mu) / p * (n + dev) for n, mu, p in zip(counts, intensities, probabilities,
                                                         strict=True)
    )
    return minus, plus  # type: ignore[return-value]


def _vacuum(minus: Triple, plus: Triple, mu: Triple, tau0: float) -> float:
    """s_0 ≥ τ0 (μ2 n^-_{μ3} − μ3 n^+_{μ2}) / (μ2 − μ3), floored at 0 (Eq. 2)."""
    return max(0.0, tau0 * (mu[1] * minus[2] - mu[2] * plus[1]) / (mu[1] - mu[2]))


def _single(minus: Triple, plus: Triple, mu: Triple, tau0: float, tau1: float,
            s0: float) -> float:
    """s_1 lower bound (Eq. 3)."""
    mu1, mu2, mu3 = mu
    num = tau1 * mu1 * (
        minus[1] - plus[2] - (mu2**2 - mu3**2) / mu1**2 * (plus[0] - s0 / tau0)
    )
    return num / (mu1 * (mu2 - mu3) - mu2**2 + mu3**2)


def secure_key_length(
    stats: DecoyStatistics,
    intensities: Triple,
    probabilities: Triple,
    lambda_ec: float,
    eps_sec: float = 1e-9,
    eps_cor: float = 1e-15,
    *,
    asymptotic: bool = False,
) -> FiniteKeyResult:
    """Secure key length ℓ (bits) of one block, Lim et al. (2014) Eqs. 1–5.

    Args:
        stats: observed counts per basis and intensity.
        intensities: mean photon numbers (μ1, μ2, μ3), μ1 > μ2 + μ3, μ2 > μ3 ≥ 0.
        probabilities: (p_μ1, p_μ2, p_μ3), each in (0, 1].
        lambda_ec: bits disclosed by error correction (and verification excess).
        eps_sec: secrecy parameter ε_sec; eps_cor: correctness parameter ε_cor.
        asymptotic: drop every finite-size term (N → ∞ limit; for comparison).

    Returns:
        The result with all bounds; ``length`` is 0 with a ``reason`` when no key can be
        extracted or the inputs make the bounds meaningless.
    """
    mu = tuple(float(x) for x in intensities)
    probs = tuple(float(x) for x in probabilities)
    if len(mu) != 3 or len(probs) != 3:
        raise ValueError("need three intensities and three probabilities")
    if not all(0 < p <= 1 for p in probs) or sum(probs) > 1 + 1e-9:
        raise ValueError(f"probabilities must be in (0, 1] and sum to at most 1, got {probs}")
    if not 0 < eps_sec < 1 or not 0 < eps_cor < 1:
        raise ValueError("eps_sec and eps_cor must be in (0, 1)")
    if lambda_ec < 0:
        raise ValueError("lambda_ec must be >= 0")
    mu3t: Triple = (mu[0], mu[1], mu[2])
    pt: Triple = (probs[0], probs[1], probs[2])
    tau0 = photon_number_probability(0, mu3t, pt)
    tau1 = photon_number_probability(1, mu3t, pt)
    n_xm, n_xp = _hoeffding(stats.n_x, sum(stats.n_x), mu3t, pt, eps_sec, asymptotic)
    n_zm, n_zp = _hoeffding(stats.n_z, sum(stats.n_z), mu3t, pt, eps_sec, asymptotic)
    m_zm, m_zp = _hoeffding(stats.m_z, sum(stats.m_z), mu3t, pt, eps_sec, asymptotic)
    secrecy = 0.0 if asymptotic else 6.0 * math.log2(21.0 / eps_sec)
    correctness = 0.0 if asymptotic else math.log2(2.0 / eps_cor)
    base = {
        "tau0": tau0, "tau1": tau1, "n_x_minus": n_xm, "n_x_plus": n_xp,
        "n_z_minus": n_zm, "n_z_plus": n_zp, "m_z_minus": m_zm, "m_z_plus": m_zp,
        "lambda_ec": float(lambda_ec), "secrecy_cost": secrecy, "correctness_cost": correctness,
    }
    nan = math.nan

    def fail(reason: str, **vals: float) -> FiniteKeyResult:
        fields = {"s_x0": nan, "s_x1": nan, "s_z0": nan, "s_z1": nan, "v_z1": nan,
                  "phase_error_estimate": nan, "gamma": nan, "phi_x": nan, "raw_length": nan}
        fields.update(vals)
        return FiniteKeyResult(length=0, reason=reason, **base, **fields)  # type: ignore[arg-type]

    if not (mu[1] > mu[2] >= 0 and mu[0] > mu[1] + mu[2]):
        return fail(f"intensities {mu} violate μ1 > μ2 + μ3, μ2 > μ3 ≥ 0 (Lim et al. Eq. 3)")
    s_x0 = _vacuum(n_xm, n_xp, mu3t, tau0)
    s_x1 = _single(n_xm, n_xp, mu3t, tau0, tau1, s_x0)
    s_z0 = _vacuum(n_zm, n_zp, mu3t, tau0)
    s_z1 = _single(n_zm, n_zp, mu3t, tau0, tau1, s_z0)
    v_z1 = tau1 * (m_zp[1] - m_zm[2]) / (mu[1] - mu[2])
    vals = {"s_x0": s_x0, "s_x1": s_x1, "s_z0": s_z0, "s_z1": s_z1, "v_z1": v_z1}
    if s_x1 <= 0:
        return fail("single-photon lower bound s_X,1 <= 0: too few key-basis detections", **vals)
    if s_z1 <= 0:
        return fail("single-photon lower bound s_Z,1 <= 0: too few test-basis detections",
                    **vals)
    ratio = max(v_z1, 0.0) / s_z1
    if ratio >= 0.5:
        return fail(f"single-photon phase error bound {ratio:.3f} >= 1/2", **vals,
                    phase_error_estimate=ratio)
    if asymptotic:
        gam = 0.0
    else:
        # v_Z,1 <= 0 (no error seen) is evaluated as one error: γ grows with b here, so
        # this is conservative where Eq. 5 itself degenerates.
        b = max(ratio, 1.0 / s_z1)
        gam = gamma(eps_sec, min(b, 0.5), s_z1, s_x1) if b < 1 else math.inf
    phi = ratio + gam
    vals.update(phase_error_estimate=ratio, gamma=gam, phi_x=phi)
    if phi >= 0.5:
        return fail(f"phase error bound φ_X = {phi:.3f} >= 1/2: no secrecy left", **vals)
    raw = s_x0 + s_x1 * (1.0 - binary_entropy(phi)) - lambda_ec - secrecy - correctness
    vals["raw_length"] = raw
    if raw <= 0:
        return fail(f"secure length {raw:.1f} <= 0 (finite-size and leakage terms dominate)",
                    **vals)
    return FiniteKeyResult(length=math.floor(raw), reason=None, **base, **vals)  # type: ignore[arg-type]


def expected_statistics(
    pulses: float,
    intensities: Triple,
    probabilities: Triple,
    *,
    transmittance: float,
    p_x: float = 0.5,
    dark_count: float = 6e-7,
    misalignment: float = 0.005,
) -> DecoyStatistics:
    """Expected counts of the standard channel model used by Lim et al. (2014), Fig. 1.

    Detection probability D_k = 1 − (1 − 2 p_dc) e^(−η μ_k) (two detectors, dark-count
    probability p_dc each), error probability per pulse p_dc + e_mis (1 − e^(−η μ_k));
    X chosen with probability p_x by both (key), Z with 1 − p_x.  η is the total
    transmittance including Bob's detection efficiency.
    """
    p_z = 1.0 - p_x
    d = [1 - (1 - 2 * dark_count) * math.exp(-transmittance * mu) for mu in intensities]
    e = [dark_count + misalignment * (1 - math.exp(-transmittance * mu)) for mu in intensities]
    n_x = tuple(pulses * p * p_x**2 * dk for p, dk in zip(probabilities, d, strict=True))
    n_z = tuple(pulses * p * p_z**2 * dk for p, dk in zip(probabilities, d, strict=True))
    m_z = tuple(pulses * p * p_z**2 * ek for p, ek in zip(probabilities, e, strict=True))
    m_x = tuple(pulses * p * p_x**2 * ek for p, ek in zip(probabilities, e, strict=True))
    return DecoyStatistics(n_x, n_z, m_z, m_x)  # type: ignore[arg-type]


def _squashed_arm_counts(m_match: float, m_other: float, dark_count: float,
                         misalignment: float) -> tuple[float, float]:
    """Sifted and erroneous detections per pulse when Alice's basis is analysed by the
    arm receiving ``m_match`` detected photons (mean) and the other arm ``m_other``.

    Two detectors per arm, independent Poisson photon numbers, dark-count probability
    ``dark_count`` each.  Squashing: two clicks in one arm give a random bit, clicks in
    both arms a random basis and bit (as :mod:`qkdlab.protocol.sifting` does).
    """
    live = 1.0 - dark_count
    right = 1.0 - live * math.exp(-m_match * (1.0 - misalignment))
    wrong = 1.0 - live * math.exp(-m_match * misalignment)
    arm = 1.0 - live**2 * math.exp(-m_match)
    other = 1.0 - live**2 * math.exp(-m_other)
    sifted = arm * (1.0 - other) + 0.5 * arm * other
    errors = (1.0 - other) * (wrong * (1.0 - right) + 0.5 * right * wrong) + 0.25 * arm * other
    return sifted, errors


def expected_statistics_passive(
    pulses: float,
    intensities: Triple,
    probabilities: Triple,
    *,
    transmittance: float,
    p_key: float,
    key_fraction: float,
    dark_count: float,
    misalignment: float,
) -> DecoyStatistics:
    """Expected counts of a passive-basis receiver with four detectors (qkdlab's bench).

    Alice sends the key basis with probability ``p_key``; Bob's beam splitter sends a
    share ``key_fraction`` of the light to his key-basis arm and the rest to the test
    arm, each arm a polarizing splitter and two detectors.  A pulse of class k brings
    η μ_k detected photons (Poisson); in the arm of Alice's basis a share
    ``misalignment`` of them reaches the wrong detector.  Dark counts: probability
    ``dark_count`` per detector and detection window.  Multi-clicks are squashed (see
    :func:`_squashed_arm_counts`).  Counts are over ``pulses`` emitted pulses; the key
    basis goes in ``n_x``/``m_x`` as in :func:`secure_key_length`.

    Args:
        pulses: pulses Alice sent (> 0).
        intensities: (μ1, μ2, μ3) mean photon numbers (≥ 0).
        probabilities: class probabilities, each in [0, 1].
        transmittance: η, channel × Bob's optics × detector efficiency, in [0, 1].
        p_key: Alice's key-basis probability, in [0, 1].
        key_fraction: share of Bob's light sent to his key-basis arm, in [0, 1].
        dark_count: dark-count probability per detector per window, in [0, 1).
        misalignment: optical error probability e_mis, in [0, 0.5].
    """
    checks = [
        (pulses > 0, f"pulses must be > 0, got {pulses}"),
        (all(mu >= 0 for mu in intensities) and len(intensities) == 3,
         f"intensities must be three mean photon numbers >= 0, got {intensities}"),
        (all(0 <= p <= 1 for p in probabilities) and len(probabilities) == 3,
         f"probabilities must be three values in [0, 1], got {probabilities}"),
        (0 <= transmittance <= 1, f"transmittance must lie in [0, 1], got {transmittance}"),
        (0 <= p_key <= 1, f"p_key must lie in [0, 1], got {p_key}"),
        (0 <= key_fraction <= 1, f"key_fraction must lie in [0, 1], got {key_fraction}"),
        (0 <= dark_count < 1, f"dark_count must lie in [0, 1), got {dark_count}"),
        (0 <= misalignment <= 0.5, f"misalignment must lie in [0, 0.5], got {misalignment}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    n_x, m_x, n_z, m_z = [], [], [], []
    for mu, p in zip(intensities, probabilities, strict=True):
        m = transmittance * mu
        s_key, e_key = _squashed_arm_counts(m * key_fraction, m * (1 - key_fraction),
                                            dark_count, misalignment)
        s_test, e_test = _squashed_arm_counts(m * (1 - key_fraction), m * key_fraction,
                                              dark_count, misalignment)
        n_x.append(pulses * p * p_key * s_key)
        m_x.append(pulses * p * p_key * e_key)
        n_z.append(pulses * p * (1 - p_key) * s_test)
        m_z.append(pulses * p * (1 - p_key) * e_test)
    return DecoyStatistics(tuple(n_x), tuple(n_z), tuple(m_z), tuple(m_x))  # type: ignore[arg-type]


def expected_ec_leakage(stats: DecoyStatistics, f_ec: float) -> float:
    """λ_EC = f · n_X · h(E_X): bits an error correction of efficiency ``f_ec`` (≥ 1)
    discloses on the key basis of ``stats`` (its ``m_x`` gives E_X)."""
    if not f_ec >= 1:
        raise ValueError(f"f_ec must be >= 1, got {f_ec}")
    n = sum(stats.n_x)
    return f_ec * n * binary_entropy(min(stats.qber_x, 0.5)) if n else 0.0


def secure_key_length_samples(
    expected: DecoyStatistics,
    intensities: Triple,
    probabilities: Triple,
    lambda_ec: float,
    rng: np.random.Generator,
    samples: int = 1000,
    eps_sec: float = 1e-9,
    eps_cor: float = 1e-15,
    *,
    asymptotic: bool = False,
) -> list[FiniteKeyResult]:
    """:func:`secure_key_length` of ``samples`` blocks whose counts fluctuate about
    ``expected`` by counting statistics: every detection count Poisson, every error
    count binomial among its detections (the spread a run's bounds should show).
    ``lambda_ec`` is held fixed; ``asymptotic`` as in :func:`secure_key_length`."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    n_x = rng.poisson(np.asarray(expected.n_x), size=(samples, 3))
    n_z = rng.poisson(np.asarray(expected.n_z), size=(samples, 3))

    def ratio(m: Triple, n: Triple) -> npt.NDArray[np.float64]:
        return np.array([mi / ni if ni > 0 else 0.0 for mi, ni in zip(m, n, strict=True)])

    m_x = rng.binomial(n_x, ratio(expected.m_x, expected.n_x))
    m_z = rng.binomial(n_z, ratio(expected.m_z, expected.n_z))
    out = []
    for i in range(samples):
        stats = DecoyStatistics(
            n_x=tuple(float(v) for v in n_x[i]), n_z=tuple(float(v) for v in n_z[i]),  # type: ignore[arg-type]
            m_z=tuple(float(v) for v in m_z[i]), m_x=tuple(float(v) for v in m_x[i]))  # type: ignore[arg-type]
        out.append(secure_key_length(stats, intensities, probabilities, lambda_ec,
                                     eps_sec, eps_cor, asymptotic=asymptotic))
    return out
