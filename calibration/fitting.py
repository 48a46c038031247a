"""Fits used by the calibration loops (numpy only, vectorised).

* :func:`fit_transfer` — Mach–Zehnder transfer P(V) = a + b·cos(π·V/Vπ + φ);
* :func:`fit_peak` — Gaussian timing peak on a flat background (EM, unbinned);
* :func:`fit_interarrival` — dead time, afterpulse probability and primary click rate
  from the gaps between consecutive clicks of one detector (maximum likelihood);
* :func:`primary_rate` — primary (photon + dark) click rate from a measured tag rate,
  correcting dead time and afterpulses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qkdlab.calibration.optimise import NelderMead, minimise, numeric_hessian
from qkdlab.calibration.records import CalibrationError

FloatArray = npt.NDArray[np.float64]
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


# -- modulator transfer curve --------------------------------------------------------------
@dataclass(frozen=True)
class TransferFit:
    """P(V) = offset + amplitude·cos(π·V/v_pi + phase); 1σ errors from the residuals."""

    offset: float
    amplitude: float
    v_pi: float
    phase: float
    errors: tuple[float, float, float, float]  # offset, amplitude, v_pi, phase
    residual_rms: float

    def __call__(self, v: npt.ArrayLike) -> FloatArray:
        x = np.asarray(v, dtype=np.float64)
        out: FloatArray = self.offset + self.amplitude * np.cos(np.pi * x / self.v_pi
                                                                + self.phase)
        return out

    @property
    def extinction_ratio_db(self) -> float:
        """10·log10(P_max/P_min) (dB); inf when the minimum is at or below zero."""
        lo = self.offset - self.amplitude
        return math.inf if lo <= 0 else 10 * math.log10((self.offset + self.amplitude) / lo)


def _linear_transfer(v: FloatArray, p: FloatArray, v_pi: float
                     ) -> tuple[float, FloatArray]:
    """Least squares of p on [1, cos kv, sin kv] for one Vπ: (SSE, coefficients)."""
    k = np.pi / v_pi
    design = np.column_stack([np.ones_like(v), np.cos(k * v), np.sin(k * v)])
    coef, *_ = np.linalg.lstsq(design, p, rcond=None)
    resid = p - design @ coef
    return float(resid @ resid), coef


def fit_transfer(v: npt.ArrayLike, p: npt.ArrayLike,
                 v_pi_range: tuple[float, float] = (1.0, 20.0)) -> TransferFit:
    """Fit the cos² transfer curve of an intensity modulator to a bias scan.

    Vπ is searched on a fine logarithmic grid (linear least squares for the other
    parameters at each trial), refined by golden section, and the 1σ errors come from
    the Gauss–Newton covariance at the optimum.  The scan must cover at least about
    one Vπ for Vπ to be determined.
    """
    v = np.asarray(v, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if v.size < 6:
        raise CalibrationError(f"transfer fit needs at least 6 points, got {v.size}")
    lo, hi = v_pi_range
    grid = np.geomspace(lo, hi, 600)
    sse = np.array([_linear_transfer(v, p, g)[0] for g in grid])
    i = int(np.argmin(sse))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    golden = (math.sqrt(5) - 1) / 2
    c, d = b - golden * (b - a), a + golden * (b - a)
    fc, fd = _linear_transfer(v, p, c)[0], _linear_transfer(v, p, d)[0]
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - golden * (b - a)
            fc = _linear_transfer(v, p, c)[0]
        else:
            a, c, fc = c, d, fd
            d = a + golden * (b - a)
            fd = _linear_transfer(v, p, d)[0]
    v_pi = 0.5 * (a + b)
    sse_min, (off, cc, ss) = _linear_transfer(v, p, v_pi)
    amp = math.hypot(cc, ss)
    phase = math.atan2(-ss, cc)
    # Gauss–Newton covariance of (offset, amplitude, v_pi, phase)
    x = np.pi * v / v_pi + phase
    jac = np.column_stack([np.ones_like(v), np.cos(x),
                           amp * np.sin(x) * np.pi * v / v_pi**2, -amp * np.sin(x)])
    dof = max(v.size - 4, 1)
    sigma2 = sse_min / dof
    try:
        cov = sigma2 * np.linalg.inv(jac.T @ jac)
        errs = tuple(float(math.sqrt(max(cov[j, j], 0.0))) for j in range(4))
    except np.linalg.LinAlgError:
        errs = (math.inf,) * 4
    return TransferFit(float(off), float(amp), float(v_pi), _wrap(phase),
                       (errs[0], errs[1], errs[2], errs[3]), math.sqrt(sse_min / v.size))


def _wrap(phase: float) -> float:
    """Phase wrapped to (−π, π]."""
    return float(math.pi - (math.pi - phase) % (2 * math.pi))


# -- timing peak -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PeakFit:
    """Gaussian peak (centre, σ) on a flat background over a window of width ``span``."""

    centre: float
    sigma: float
    signal_fraction: float
    centre_error: float
    sigma_error: float
    n: int

    @property
    def fwhm(self) -> float:
        return FWHM_PER_SIGMA * self.sigma

    @property
    def fwhm_error(self) -> float:
        return FWHM_PER_SIGMA * self.sigma_error


def fit_peak(x: npt.ArrayLike, span: float, iterations: int = 200) -> PeakFit:
    """Unbinned EM fit of w·N(μ, σ) + (1 − w)·U(−span/2, span/2) to samples ``x``."""
    r = np.asarray(x, dtype=np.float64)
    if r.size < 50:
        raise CalibrationError(f"timing peak fit needs at least 50 detections, got {r.size}")
    mu = float(np.median(r))
    sigma = 1.4826 * float(np.median(np.abs(r - mu))) or span / 20
    w = 0.9
    flat = 1.0 / span
    for _ in range(iterations):
        g = w * np.exp(-0.5 * ((r - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        resp = g / (g + (1 - w) * flat)
        s = float(resp.sum())
        if s <= 1:
            raise CalibrationError("timing peak fit found no peak above the background")
        mu_new = float(resp @ r / s)
        sigma_new = math.sqrt(float(resp @ (r - mu_new) ** 2 / s))
        w = s / r.size
        done = abs(mu_new - mu) < 1e-6 * sigma and abs(sigma_new - sigma) < 1e-6 * sigma
        mu, sigma = mu_new, sigma_new
        if done:
            break
    n_sig = w * r.size
    return PeakFit(mu, sigma, w, sigma / math.sqrt(n_sig), sigma / math.sqrt(2 * n_sig),
                   int(r.size))


# -- inter-arrival times ----------------------------------------------------------------------
@dataclass(frozen=True)
class InterarrivalFit:
    """Detector model fitted to the gaps between consecutive clicks (s, Hz).

    After a click at 0 the detector is dead until τ; afterwards the next click is the
    first of the primary Poisson process (rate r) and, with probability p, an afterpulse
    at τ + Exp(τ_ap):  f(s) = r·e^{−rs}(1 − p + p·e^{−s/τ_ap}) + (p/τ_ap)·e^{−s(r + 1/τ_ap)},
    s = gap − τ ≥ 0.
    """

    dead_time_s: float
    dead_time_error_s: float
    primary_rate_hz: float
    primary_rate_error_hz: float
    afterpulse_prob: float
    afterpulse_prob_error: float
    afterpulse_tau_s: float
    afterpulse_tau_error_s: float
    gaps: int


def _interarrival_nll(params: FloatArray, s: FloatArray) -> float:
    r, p, tau = params
    if r <= 0 or not 0 <= p < 1 or tau <= 0:
        return math.inf
    e = np.exp(-s / tau)
    dens = r * (1 - p + p * e) + (p / tau) * e
    return float(r * s.sum() - np.log(dens).sum())


def fit_interarrival(gaps_s: npt.ArrayLike, tau_ap_guess_s: float = 2e-6) -> InterarrivalFit:
    """Maximum-likelihood fit of :class:`InterarrivalFit` to click gaps (s).

    The dead time is the smallest gap (its error: the mean spacing of gaps at the edge,
    1/(N·f(0)), plus nothing for the ps-scale tagger jitter).  Errors of r, p and τ_ap
    come from the inverse Hessian of the negative log-likelihood.
    """
    g = np.sort(np.asarray(gaps_s, dtype=np.float64))
    if g.size < 1000:
        raise CalibrationError(f"inter-arrival fit needs >= 1000 gaps, got {g.size}")
    dead = float(g[0])
    s = g - dead
    r0 = 1.0 / float(s.mean())
    x0 = np.array([math.log(r0), math.log(0.02 / 0.98), math.log(tau_ap_guess_s)])

    def nll_t(t: FloatArray) -> float:
        p = 1.0 / (1.0 + math.exp(-t[1]))
        return _interarrival_nll(np.array([math.exp(t[0]), p, math.exp(t[2])]), s)

    opt = NelderMead(x0, step=np.array([0.2, 1.0, 0.5]), lower=x0 - np.array([3, 12, 6]),
                     upper=x0 + np.array([3, 12, 6]), xtol=1e-6, ftol=1e-7, max_evals=1500)
    best = minimise(nll_t, opt).x
    r, p, tau = math.exp(best[0]), 1.0 / (1.0 + math.exp(-best[1])), math.exp(best[2])
    nat = np.array([r, p, tau])
    steps = np.array([r * 1e-3, max(p * 1e-2, 1e-5), tau * 1e-2])
    hess = numeric_hessian(lambda q: _interarrival_nll(q, s), nat, steps)
    try:
        cov = np.linalg.inv(hess)
        errs = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        errs = np.full(3, math.inf)
    edge = r * (1 - p) + r * p + p / tau
    return InterarrivalFit(dead, 1.0 / (g.size * edge), r, float(errs[0]), p, float(errs[1]),
                           tau, float(errs[2]), int(g.size))


def primary_rate(measured_hz: float, dead_time_s: float, afterpulse_prob: float = 0.0,
                 afterpulse_tau_s: float = 1e-6) -> float:
    """Primary click rate r (Hz) behind a measured tag rate R, inverting the renewal mean
    1/R = τ + (1 − p)/r + p/(r + 1/τ_ap) (non-paralysable dead time τ, afterpulses p).
    """
    if measured_hz <= 0:
        return 0.0
    cycle = 1.0 / measured_hz - dead_time_s
    if cycle <= afterpulse_prob * afterpulse_tau_s:
        raise CalibrationError(f"tag rate {measured_hz:.4g} Hz is at or above the dead-time "
                               f"limit of τ = {dead_time_s:.3g} s")

    def mean_wait(r: float) -> float:
        return (1 - afterpulse_prob) / r + afterpulse_prob / (r + 1 / afterpulse_tau_s)

    lo, hi = 1e-9, 1e15
    for _ in range(200):  # bisection on log scale: mean_wait is decreasing in r
        mid = math.sqrt(lo * hi)
        if mean_wait(mid) > cycle:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return math.sqrt(lo * hi)


def gaps_by_channel(time_ps: npt.NDArray[np.int64], channel: npt.NDArray[np.int16],
                    channels: list[int]) -> dict[int, FloatArray]:
    """Gaps (s) between consecutive tags of each channel."""
    out = {}
    for ch in channels:
        t = time_ps[channel == ch]
        out[ch] = np.diff(t).astype(np.float64) * 1e-12
    return out
