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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
