"""The bench model against closed forms.

Tolerances are 5σ of the counting statistics of each measurement (Poisson for counts,
binomial for fractions), computed from the expected values — never tuned to pass.
Counts of a dead-time-limited or Bernoulli process have a variance below the Poisson
one, so the Poisson 5σ is conservative there.
"""

from __future__ import annotations

import itertools
import math
import threading
import tracemalloc
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from qkdlab.mock_instruments.bench import (
    ORIGIN_AFTERPULSE,
    ORIGIN_DARK,
    ORIGIN_PHOTON,
    Bench,
    BenchTags,
    config_from_mapping,
)
from qkdlab.mock_instruments.bench.config import LIGHT_SPEED_M_S, PLANCK_J_S
from qkdlab.mock_instruments.bench.optics import DriftProcess

IntArray = npt.NDArray[np.int64]


# ---------------------------------------------------------------- helpers


def make_bench(seed: int = 1, **sections: Any) -> Bench:
    """A bench from nested overrides, e.g. ``make_bench(channel={"length_km": 50})``."""
    return Bench(config_from_mapping(sections), seed=seed)


def quiet(**extra: Any) -> dict[str, Any]:
    """Detector overrides without dead time or afterpulses (no saturation)."""
    return {"dead_time_s": 0.0, "afterpulse_prob": 0.0, **extra}


def warm_up(bench: Bench) -> None:
    """Let the first pulses cross the fibre, so later windows see a steady state."""
    bench.acquire(bench.propagation_delay_ps() * 1e-12 + 20e-6)


def poisson_5sigma(expected: float) -> float:
    """5σ of a Poisson count with mean ``expected``."""
    return 5.0 * math.sqrt(expected)


def binomial_5sigma(p: float, n: int) -> float:
    """5σ of a fraction with probability ``p`` estimated from ``n`` trials."""
    return 5.0 * math.sqrt(p * (1.0 - p) / n)


def assign_pulses(bench: Bench, tags: BenchTags, window_ps: float) -> tuple[IntArray, IntArray]:
    """(pulse, detector) of detector tags within ±window/2 of a pulse's expected arrival.

    A perfectly synchronised receiver: ground-truth fibre and channel delays, timebase
    offset 0 and ppm 0; dark counts inside the window are kept.
    """
    det_channels = list(bench.tagger.detector_channels)
    on_det = np.isin(tags.channel, det_channels)
    lookup = {c: d for d, c in enumerate(det_channels)}
    det = np.array([lookup[int(c)] for c in tags.channel[on_det]], dtype=np.int64)
    delays = np.array([tags.channel_delays_ps[c] for c in det_channels], dtype=np.float64)
    period = 1e12 / bench.alice.rep_rate_hz
    arrival = tags.time_ps[on_det] - delays[det] - bench.propagation_delay_ps()
    pulse = np.rint(arrival / period).astype(np.int64)
    keep = (np.abs(arrival - pulse * period) < window_ps / 2) & (pulse >= 0)
    return pulse[keep], det[keep]


def sifted_errors(
    bench: Bench, pulse: IntArray, det: IntArray, intensity: int | None = None
) -> tuple[float, int]:
    """(errors, sifted pulses), 4 detectors: a double click in one arm counts ½ error.

    Detector d measures basis d // 2 and reads bit d % 2; only pulses whose Alice basis
    matches the arm (and of class ``intensity`` when given) count.
    """
    basis, bit, klass = bench.alice_symbols(pulse)
    keep = basis == det // 2
    if intensity is not None:
        keep &= klass == intensity
    key = pulse[keep] * 2 + det[keep] // 2
    order = np.argsort(key, kind="stable")
    key, d, b = key[order], det[keep][order], bit[keep][order]
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    assert counts.max(initial=0) <= 2
    single = counts == 1
    wrong = np.count_nonzero(single & (d[first] % 2 != b[first]))
    return float(wrong) + 0.5 * float(np.count_nonzero(~single)), int(uniq.size)


def qber_of(bench: Bench, tags: BenchTags, window_ps: float = 1000.0,
            intensity: int | None = None) -> tuple[float, int]:
    """Measured QBER on sifted bits and the number of sifted pulses."""
    errors, n = sifted_errors(bench, *assign_pulses(bench, tags, window_ps), intensity)
    return errors / n, n


def arm_mean(bench: Bench, mu: float, efficiency: float = 0.1) -> float:
    """Mean photon number reaching one arm's detectors (×η): μ·T·η_bob·½·η_d."""
    ch, bob = bench.channel, bench.bob
    loss_db = ch.loss_db_per_km * ch.length_km + ch.insertion_loss_db + bob.optics_loss_db
    return mu * 10 ** (-loss_db / 10) * 0.5 * efficiency


# ---------------------------------------------------------------- Alice


def test_default_working_point() -> None:
    """μ = 0.5 / 0.1 / vacuum limited by the 25 dB extinction: 0.5·10^(−2.5)."""
    bench = Bench()
    mu = bench.mean_photon_numbers()
    assert mu[0] == pytest.approx(0.5, rel=1e-12)
    assert mu[1] == pytest.approx(0.1, rel=1e-12)
    assert mu[2] == pytest.approx(0.5 * 10**-2.5, rel=1e-12)


def test_photon_number_follows_power_and_attenuation() -> None:
    """μ_in = P·λ/(h·c·f)·10^(−A/10); μ_k = μ_in·½·[1 + v·cos(π(V_b + V_k)/Vπ + φ)]."""
    bench = Bench()
    a = bench.alice
    a.laser_power_w, a.attenuation_db, a.im_bias_v, a.im_phase_rad = 2e-3, 13.0, 0.3, 0.2
    n = 2e-3 * a.wavelength_m / (PLANCK_J_S * LIGHT_SPEED_M_S * a.rep_rate_hz)
    mu_in = n * 10 ** (-(a.fixed_attenuation_db + 13.0) / 10)
    r = 10 ** (-a.extinction_ratio_db / 10)
    vis = (1 - r) / (1 + r)
    expected = [mu_in * 0.5 * (1 + vis * math.cos(math.pi * (0.3 + v) / a.v_pi_v + 0.2))
                for v in a.drive_v]
    np.testing.assert_allclose(bench.mean_photon_numbers(), expected, rtol=1e-12)
    a.laser_on = False
    assert bench.mean_photon_numbers() == (0.0, 0.0, 0.0)


def test_modulator_phase_drift() -> None:
    """φ(t) = φ0 + rate·t on the 1 ms drift grid: μ_signal follows T(φ(t))."""
    bench = make_bench(alice={"im_drift_rad_per_s": 2.0})
    bench.acquire(0.1005)
    mu_in = 0.5 * (1 + 10**-2.5)  # default μ into the modulator
    vis = (1 - 10**-2.5) / (1 + 10**-2.5)
    expected = mu_in * 0.5 * (1 + vis * math.cos(2.0 * 0.100))  # step of t = 100.5 ms
    assert bench.mean_photon_numbers()[0] == pytest.approx(expected, rel=1e-12)
    assert bench.modulator_phase_rad() == pytest.approx(2.0 * 0.100, rel=1e-12)


def test_optical_power_points() -> None:
    """Power meter readings: laser, after attenuators, after modulator, Bob's input."""
    bench = Bench()
    a = bench.alice
    photon_j = PLANCK_J_S * LIGHT_SPEED_M_S / a.wavelength_m
    mu = np.array(bench.mean_photon_numbers())
    probs = np.array(a.pattern.intensity_probs)
    after_mod = float(probs @ mu) * photon_j * a.rep_rate_hz
    assert bench.optical_power_at("laser") == pytest.approx(1e-3)
    assert bench.optical_power_at("after_attenuator") == pytest.approx(
        1e-3 * 10 ** (-(a.fixed_attenuation_db + a.attenuation_db) / 10))
    assert bench.optical_power_at("after_modulator") == pytest.approx(after_mod, rel=1e-12)
    assert bench.optical_power_at("bob_input") == pytest.approx(after_mod * 10**-0.5, rel=1e-12)
    with pytest.raises(ValueError, match="unknown power point"):
        bench.optical_power_at("eve")


# ---------------------------------------------------------------- click rates


@pytest.mark.parametrize(
    ("length_km", "efficiency", "voa_db"), [(25.0, 0.1, None), (50.0, 0.25, None), (5.0, 0.1, 16.0)]
)
def test_click_rates_closed_form_and_measured(
    length_km: float, efficiency: float, voa_db: float | None
) -> None:
    """Rate_d = f·Σ P(state, class)·(1 − e^(−m_d)) + dark; measured within 5σ Poisson."""
    bench = make_bench(channel={"length_km": length_km},
                       bob={"detectors": quiet(efficiency=efficiency, dark_count_cps=500.0)})
    if voa_db is not None:
        bench.alice.attenuation_db = voa_db
    mu = np.array(bench.mean_photon_numbers())
    probs = np.array(bench.alice.pattern.intensity_probs)
    m = np.array([arm_mean(bench, x, efficiency) for x in mu])
    e = bench.bob.misalignment
    # H detector: Z states give (1 − e)·m or e·m (bit 0 / 1), X states ½·m (p_z = ½)
    p_h = 0.5 * (0.5 * (-np.expm1(-(1 - e) * m)) + 0.5 * (-np.expm1(-e * m))) \
        + 0.5 * (-np.expm1(-0.5 * m))
    expected = bench.alice.rep_rate_hz * float(probs @ p_h) + 500.0
    np.testing.assert_allclose(bench.expected_click_rates(), expected, rtol=1e-12)
    warm_up(bench)
    duration = 0.1
    tags = bench.acquire(duration)
    for ch in bench.tagger.detector_channels:
        n = tags.counts([ch])[ch]
        assert abs(n - expected * duration) < poisson_5sigma(expected * duration)


def test_laser_off_leaves_dark_counts_only() -> None:
    """Laser off: only dark counts (and markers), at the dark rate within 5σ."""
    bench = make_bench(bob={"detectors": quiet(dark_count_cps=20_000.0)})
    bench.alice.laser_on = False
    tags = bench.acquire(0.1)
    assert set(np.unique(tags.origin)) <= {ORIGIN_DARK, 3}
    for ch in bench.tagger.detector_channels:
        assert abs(tags.counts([ch])[ch] - 2000) < poisson_5sigma(2000)
    np.testing.assert_allclose(bench.expected_click_rates(), 20_000.0)


def test_disabled_detector_is_silent() -> None:
    """A detector with its bias off never clicks."""
    bench = Bench()
    bench.bob.detectors[2].enabled = False
    tags = bench.acquire(0.01)
    assert tags.counts([3])[3] == 0
    assert bench.expected_click_rates()[2] == 0.0


def test_two_detector_single_basis() -> None:
    """2 detectors analysing X, no splitter: each sees μ·T·η_b·η_d·P_d."""
    det = quiet(dark_count_cps=0.0)
    bench = make_bench(bob={"detectors": [det, det], "single_basis": 1})
    mu = np.array(bench.mean_photon_numbers())
    probs = np.array(bench.alice.pattern.intensity_probs)
    m = 2 * np.array([arm_mean(bench, x) for x in mu])  # the whole light, no ½ split
    e = bench.bob.misalignment
    p_d = 0.5 * (0.5 * (-np.expm1(-(1 - e) * m)) + 0.5 * (-np.expm1(-e * m))) \
        + 0.5 * (-np.expm1(-0.5 * m))
    expected = bench.alice.rep_rate_hz * float(probs @ p_d)
    np.testing.assert_allclose(bench.expected_click_rates(), [expected, expected], rtol=1e-12)
    warm_up(bench)
    tags = bench.acquire(0.05)
    assert set(np.unique(tags.channel)) <= {0, 1, 2}
    for ch in (1, 2):
        assert abs(tags.counts([ch])[ch] - 0.05 * expected) < poisson_5sigma(0.05 * expected)


# ---------------------------------------------------------------- dead time, afterpulses


def test_dead_time_saturation_with_dark_counts() -> None:
    """Non-paralysable dead time on a Poisson input: R_obs = R/(1 + R·τ)."""
    rate, tau = 200_000.0, 5e-6  # R·τ = 1: half the clicks are lost
    bench = make_bench(bob={"detectors": {"dark_count_cps": rate, "dead_time_s": tau,
                                          "afterpulse_prob": 0.0}})
    bench.alice.laser_on = False
    duration = 0.5
    tags = bench.acquire(duration)
    expected = rate / (1 + rate * tau) * duration
    for ch in bench.tagger.detector_channels:
        assert abs(tags.counts([ch])[ch] - expected) < poisson_5sigma(expected)


def test_dead_time_saturation_with_photons() -> None:
    """Same law for photon clicks at 100 MHz (per-pulse probability ≪ 1, so ≈ Poisson)."""
    tau = 5e-6
    bench = make_bench(channel={"length_km": 0.0},
                       bob={"detectors": {"dead_time_s": tau, "afterpulse_prob": 0.0}})
    rate = float(bench.expected_click_rates()[0])
    assert rate * tau > 1.0  # well into saturation
    warm_up(bench)
    duration = 0.2
    tags = bench.acquire(duration)
    expected = rate / (1 + rate * tau) * duration
    for ch in bench.tagger.detector_channels:
        assert abs(tags.counts([ch])[ch] - expected) < poisson_5sigma(expected)


def test_interarrival_dead_time_hole_and_afterpulse_excess() -> None:
    """Intervals never shorter than τ; the excess just after τ gives back p_ap.

    With Poisson input R, an accepted click spawns an afterpulse at τ + Exp(τ_ap) with
    probability p, so Δ − τ ~ (1 − p)·Exp(R) + p·min(Exp(R), Exp(1/τ_ap)) and
    F(x) = P(Δ − τ < x) = 1 − e^(−Rx) + p·(e^(−Rx) − e^(−(R + 1/τ_ap)x)).
    """
    rate, tau, p_ap, tau_ap = 20_000.0, 10e-6, 0.1, 1e-6
    bench = make_bench(bob={"detectors": {"dark_count_cps": rate, "dead_time_s": tau,
                                          "afterpulse_prob": p_ap, "afterpulse_tau_s": tau_ap}},
                       tagger={"jitter_ps": 0.0})
    bench.alice.laser_on = False
    tags = bench.acquire(1.0)
    times = tags.select(1)
    gaps = np.diff(times) * 1e-12 - tau
    assert gaps.min() >= 0.0  # the dead-time hole
    assert np.count_nonzero(gaps < 1e-6) > 0.05 * gaps.size  # afterpulses pile up at τ⁺
    x0 = 5e-6
    frac = np.count_nonzero(gaps < x0) / gaps.size
    poisson_part = -math.expm1(-rate * x0)
    excess = math.exp(-rate * x0) - math.exp(-(rate + 1 / tau_ap) * x0)
    p_hat = (frac - poisson_part) / excess
    f_expected = poisson_part + p_ap * excess
    assert abs(p_hat - p_ap) < binomial_5sigma(f_expected, gaps.size) / excess
    # ground truth: accepted afterpulses are the spawned ones that beat the next dark count
    ap_frac = np.count_nonzero(tags.origin[tags.channel == 1] == ORIGIN_AFTERPULSE) / times.size
    ap_expected = p_ap * (1 / tau_ap) / (rate + 1 / tau_ap)
    assert abs(ap_frac - ap_expected) < binomial_5sigma(ap_expected, times.size)


# ---------------------------------------------------------------- QBER


def test_qber_from_misalignment_and_dark_counts() -> None:
    """Signal-class QBER e = (e0·Y0 + e_mis·(1 − e^(−ημ)))/Q, Q = Y0 + 1 − e^(−ημ).

    Y0 = 2·dark·w (two detectors per arm, coincidence window w), e0 = ½; double clicks
    count ½ error (random assignment), which is what the formula assumes.
    """
    dark, window = 100_000.0, 1000.0
    bench = make_bench(channel={"length_km": 50.0},
                       bob={"detectors": quiet(dark_count_cps=dark, jitter_ps=50.0)})
    warm_up(bench)
    tags = bench.acquire(0.5)
    qber, n = qber_of(bench, tags, window, intensity=0)
    eta_mu = arm_mean(bench, 0.5)
    y0 = 2 * dark * window * 1e-12
    gain = y0 + -math.expm1(-eta_mu)
    expected = (0.5 * y0 + bench.bob.misalignment * -math.expm1(-eta_mu)) / gain
    assert expected > 0.05  # dark counts matter here
    assert abs(qber - expected) < binomial_5sigma(expected, n)


def test_qber_misalignment_only() -> None:
    """Without dark counts the QBER of every class is e_mis."""
    bench = make_bench(bob={"detectors": quiet(dark_count_cps=0.0)})
    warm_up(bench)
    tags = bench.acquire(0.1)
    qber, n = qber_of(bench, tags)
    assert abs(qber - 0.01) < binomial_5sigma(0.01, n)


@pytest.mark.parametrize(("fraction", "misalignment"), [(1.0, 0.0), (0.5, 0.01)])
def test_intercept_resend(fraction: float, misalignment: float) -> None:
    """Intercept-resend on a fraction p: e = e_mis + p·(¼ − e_mis/2); gains unchanged."""
    bench = make_bench(bob={"detectors": quiet(dark_count_cps=0.0),
                            "misalignment": misalignment})
    rates_before = bench.expected_click_rates()
    bench.channel.eve_fraction = fraction
    np.testing.assert_allclose(bench.expected_click_rates(), rates_before, rtol=1e-12)
    warm_up(bench)
    tags = bench.acquire(0.05)
    qber, n = qber_of(bench, tags)
    expected = misalignment + fraction * (0.25 - misalignment / 2)
    assert abs(qber - expected) < binomial_5sigma(expected, n)


def test_state_preparation_error() -> None:
    """States rotated by ε about S3: QBER = ½·(1 − cos ε) = sin²(ε/2) (no other error)."""
    eps = 0.5
    bench = make_bench(alice={"prep_error_rad": [eps] * 4},
                       bob={"detectors": quiet(dark_count_cps=0.0), "misalignment": 0.0})
    warm_up(bench)
    tags = bench.acquire(0.05)
    qber, n = qber_of(bench, tags)
    expected = math.sin(eps / 2) ** 2
    assert abs(qber - expected) < binomial_5sigma(expected, n)


def test_settings_change_from_another_thread() -> None:
    """Setters racing an acquisition neither fail nor tear a snapshot."""
    bench = Bench()
    stop = threading.Event()

    def twiddle() -> None:
        k = 0
        while not stop.is_set():
            with bench.lock:
                bench.alice.attenuation_db = 11.0 + (k % 3)
                bench.bob.detectors[k % 4].efficiency = 0.1 + 0.01 * (k % 5)
            k += 1

    worker = threading.Thread(target=twiddle)
    worker.start()
    try:
        blocks = [bench.acquire(0.002) for _ in range(20)]
    finally:
        stop.set()
        worker.join()
    for a, b in itertools.pairwise(blocks):
        assert b.start_ps == a.stop_ps


# ---------------------------------------------------------------- polarization drift


def test_rotation_random_walk_statistics() -> None:
    """Isotropic diffusion on SO(3): E[R(t)] = e^(−2Dt)·I, so E[tr R] = 3·e^(−2Dt)."""
    diffusion, steps, paths = 2.0, 200, 300
    traces = []
    for k in range(paths):
        walk = DriftProcess(np.random.default_rng(k), np.random.default_rng(10_000 + k), 1e-3)
        walk.extend_to(steps, diffusion, 0.0)
        traces.append(np.trace(walk.rotations(steps, steps)[0]))
    t = steps * 1e-3
    expected = 3 * math.exp(-2 * diffusion * t)
    # tr R ∈ [−1, 3]: std ≤ 2, so 5σ of the mean ≤ 10/√paths
    assert abs(np.mean(traces) - expected) < 10 / math.sqrt(paths)


def test_polarization_controller_undoes_the_channel_rotation() -> None:
    """Setting R_c = R(t)ᵀ restores the closed-form rates and the QBER of e_mis."""
    det = quiet(dark_count_cps=0.0)
    reference = make_bench(bob={"detectors": det}).expected_click_rates()
    bench = make_bench(channel={"pol_diffusion_rad2_per_s": 0.5}, bob={"detectors": det})
    bench.alice.laser_on = False  # let the fibre drift for 2 s without simulating photons
    bench.acquire(2.0)
    bench.alice.laser_on = True
    rot = bench.channel_rotation()
    assert np.trace(rot) < 2.9  # it has drifted
    bench.bob.pc_rotation = rot.T
    np.testing.assert_allclose(bench.expected_click_rates(), reference, rtol=1e-9)
    warm_up(bench)
    tags = bench.acquire(0.005)
    qber, n = qber_of(bench, tags)
    # within 5 ms the walk turns by ≈ √(2·D·t·3) ≈ 0.12 rad: QBER rises by ≲ θ²/4 ≈ 0.4 %
    assert abs(qber - 0.01) < binomial_5sigma(0.01, n) + 0.004


def test_pc_rotation_accepts_angles_and_rejects_non_rotations() -> None:
    """Three paddle angles or a 3×3 rotation; anything else raises."""
    bench = Bench()
    bench.bob.pc_rotation = [0.0, 0.0, math.pi / 2]  # quarter turn about S3: H → D
    np.testing.assert_allclose(bench.bob.pc_rotation @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    with pytest.raises(ValueError, match="rotation"):
        bench.bob.pc_rotation = np.diag([1.0, 1.0, -1.0])


# ---------------------------------------------------------------- timing


def test_tag_jitter_fwhm() -> None:
    """Photon tags folded on their true arrival: FWHM = 2.355·√(σ_det² + σ_tagger²)."""
    sig_det, sig_tag = 60.0, 25.0
    bench = make_bench(channel={"length_km": 0.0},
                       bob={"detectors": quiet(jitter_ps=sig_det, dark_count_cps=0.0)},
                       tagger={"jitter_ps": sig_tag, "delay_ps": {1: 1234, 3: -777}})
    warm_up(bench)
    tags = bench.acquire(0.02)
    photon = tags.origin == ORIGIN_PHOTON
    delays = np.array([tags.channel_delays_ps[int(c)] for c in tags.channel[photon]])
    resid = (tags.time_ps[photon] - delays
             - bench.emission_time_ps(tags.pulse_index[photon]) - bench.propagation_delay_ps())
    n = resid.size
    sigma = math.hypot(sig_det, sig_tag)
    # std: relative error 1/√(2n); quantisation adds 2·(1/12) ps² (negligible)
    assert abs(resid.std() / sigma - 1) < 5 / math.sqrt(2 * n)
    assert abs(resid.mean()) < 5 * sigma / math.sqrt(n)
    counts, edges = np.histogram(resid, bins=np.arange(-400.5, 401.5, 4.0))
    smooth = np.convolve(counts, np.ones(5) / 5, mode="same")
    half = smooth.max() / 2
    above = np.flatnonzero(smooth >= half)
    centers = 0.5 * (edges[1:] + edges[:-1])
    fwhm = centers[above[-1]] - centers[above[0]]
    # ±1 bin (4 ps) at each edge from binning, plus the peak-height noise (≈ 1 %)
    assert abs(fwhm - 2.3548 * sigma) < 8.0 + 0.02 * 2.3548 * sigma


def test_tagger_clock_error_shows_in_marker_fit() -> None:
    """Marker tags vs marker true time: slope 1 + ppm·1e-6, intercept (offset)·(1+ppm) + delay."""
    ppm, offset, sync_delay = 37.5, 123_456_789, 5_000
    bench = make_bench(alice={"pattern": {"frame_pulses": 2**14}},
                       tagger={"ppm": ppm, "offset_ps": offset, "delay_ps": {0: sync_delay}})
    tags = bench.acquire(0.2)
    marks = tags.select(0)
    frame_index = np.arange(marks.size)
    true_t = bench.emission_time_ps(frame_index * 2**14) + bench.alice.marker_delay_ps
    slope, intercept = np.polyfit(true_t - true_t[0], marks - marks[0], 1)
    assert (slope - 1) * 1e6 == pytest.approx(ppm, abs=1e-3)
    k = 1 + ppm * 1e-6
    first = (true_t[0] + offset) * k + sync_delay
    # 9 ps RMS tagger jitter: the fitted intercept is good to 5·9/√n ps
    assert abs(marks[0] + intercept - first) < 5 * 9 / math.sqrt(marks.size) + 1
    assert tags.start_ps == round(offset * k)
    assert tags.timebase_ppm == ppm
    assert tags.timebase_offset_ps == offset


# ---------------------------------------------------------------- tagger rate limit


def _dark_bench(seed: int, dark: float, max_rate: float) -> Bench:
    """Four dark-counting detectors (no dead time) into a tagger of limited rate."""
    bench = make_bench(seed, bob={"detectors": quiet(dark_count_cps=dark)},
                       tagger={"max_rate_hz": max_rate, "buffer_tags": 2_000})
    bench.alice.laser_on = False
    return bench


def test_overflow_above_max_rate_is_reported() -> None:
    """4 × 100 kcps into a 200 ktags/s tagger: about half lost, all of it accounted for."""
    limited = _dark_bench(3, 100_000.0, 200_000.0).acquire(0.2)
    full = _dark_bench(3, 100_000.0, 1e12).acquire(0.2)
    assert full.lost_tags == 0
    assert limited.overflow
    assert limited.lost_tags > 0
    assert len(limited) + limited.lost_tags == len(full)
    assert np.isin(limited.time_ps, full.time_ps).all()
    lost_times = np.setdiff1d(full.time_ps, limited.time_ps)
    iv = limited.overflow_intervals
    assert iv.shape[1] == 2
    assert (iv[:, 0] >= limited.start_ps).all()
    assert (iv[:, 1] <= limited.stop_ps).all()
    inside = ((lost_times[:, None] >= iv[None, :, 0]) & (lost_times[:, None] < iv[None, :, 1]))
    assert inside.any(axis=1).all()
    # leaky bucket: delivered = drained (≤ rate·T, = rate·T once saturated) + buffer fill
    assert 200_000 * 0.2 <= len(limited) <= 200_000 * 0.2 + 2_000


def test_no_loss_below_max_rate() -> None:
    """Below the sustained rate nothing is lost and the tags equal the unlimited run."""
    limited = _dark_bench(3, 10_000.0, 200_000.0).acquire(0.2)
    full = _dark_bench(3, 10_000.0, 1e12).acquire(0.2)
    assert limited.lost_tags == 0
    assert not limited.overflow
    assert limited.overflow_intervals.shape == (0, 2)
    np.testing.assert_array_equal(limited.time_ps, full.time_ps)
    np.testing.assert_array_equal(limited.channel, full.channel)


# ---------------------------------------------------------------- determinism, windows


def _run(seed: int) -> list[BenchTags]:
    bench = Bench(seed=seed)
    bench.channel.pol_diffusion_rad2_per_s = 1.0
    return [bench.acquire(0.01), bench.acquire_pulses(500_000), bench.acquire(0.003)]


def test_same_seed_same_tags_different_seed_different() -> None:
    """Bit-for-bit reproducible for a seed and a call sequence; seeds differ."""
    a, b, c = _run(5), _run(5), _run(6)
    for x, y in zip(a, b, strict=True):
        for name in ("time_ps", "channel", "pulse_index", "origin"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
    assert any(x.time_ps.size != z.time_ps.size or not np.array_equal(x.time_ps, z.time_ps)
               for x, z in zip(a, c, strict=True))


def test_blocks_are_contiguous_sorted_and_bounded() -> None:
    """Each block is sorted, inside [start, stop), and starts where the previous stopped."""
    blocks = _run(9)
    assert blocks[0].start_ps == 0
    for prev, nxt in itertools.pairwise(blocks):
        assert nxt.start_ps == prev.stop_ps
    assert blocks[1].stop_ps - blocks[1].start_ps == 500_000 * 10_000
    for blk in blocks:
        assert blk.time_ps.dtype == np.int64
        assert blk.channel.dtype == np.int16
        assert (np.diff(blk.time_ps) >= 0).all()
        if len(blk):
            assert blk.time_ps[0] >= blk.start_ps
            assert blk.time_ps[-1] < blk.stop_ps


def test_chunking_does_not_change_the_statistics() -> None:
    """Tiny processing chunks and one acquisition agree on the counts within 5σ."""
    small = make_bench(simulation={"chunk_candidates": 1024}).acquire(0.02)
    big = make_bench(seed=2).acquire(0.02)
    n_small, n_big = len(small), len(big)
    assert abs(n_small - n_big) < 5 * math.sqrt(n_small + n_big)


def test_invalid_settings_are_rejected_at_acquire() -> None:
    """A setting out of range raises ValueError when the next snapshot is taken."""
    bench = Bench()
    bench.bob.detectors[0].efficiency = 1.5
    with pytest.raises(ValueError, match="efficiency"):
        bench.acquire(0.001)
    bench.bob.detectors[0].efficiency = 0.1
    bench.tagger.delay_ps[2] = 10**9
    with pytest.raises(ValueError, match="delay"):
        bench.acquire(0.001)


# ---------------------------------------------------------------- cost follows detections


def test_cost_scales_with_detections_not_pulses() -> None:
    """10¹⁰ pulses over 100 km without any pulse-sized array (an int8 one would be 10 GB)."""
    bench = make_bench(channel={"length_km": 100.0}, bob={"detectors": quiet()})
    rates = bench.expected_click_rates()
    n_pulses = 10**10
    tracemalloc.start()
    try:
        tags = bench.acquire_pulses(n_pulses)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5e9
    photon = tags.pulse_index[tags.origin == ORIGIN_PHOTON]
    assert photon.max() < n_pulses
    duration = n_pulses / bench.alice.rep_rate_hz
    for d, ch in enumerate(bench.tagger.detector_channels):
        # the first L·n_g/c = 0.49 ms carry no photons (negligible against 100 s, 5σ ≈ 0.4 %)
        expected = rates[d] * (duration - bench.propagation_delay_ps() * 1e-12)
        assert abs(tags.counts([ch])[ch] - expected) < poisson_5sigma(expected)
