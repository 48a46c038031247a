"""A mock run's secure key agrees with the finite-key model (Lim et al. 2014) for the
same parameters.

One run of the end-to-end benchmark's scenario (80 MHz, μ = 0.1/0.05/vacuum, 1 km,
e_mis 1.5 %, fast detectors) for 1.5 s goes the real path: mock station → ``run_bb84`` →
distilled key.  The model side takes the bench's parameters (intensities, class and
basis probabilities, transmittance with detector efficiency, dark counts in the
acceptance window, misalignment) and the run's disclosed λ_EC:

* counts per basis and intensity against
  :func:`~qkdlab.protocol.finite_key.expected_statistics_passive`, within 5 σ (Poisson);
* every bound (s_X,1, s_Z,1, v_Z,1, φ_X) and the length ℓ against their spread under
  counting statistics (:func:`~qkdlab.protocol.finite_key.secure_key_length_samples`),
  within 5 σ;
* the decoy bounds against the bench's true single-photon figures (independent of the
  bound formulas): valid, and tight in the asymptotic limit.

Notation as in ``protocol/finite_key.py``: Lim's X is qkdlab's key basis Z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qkdlab.cli import DEFAULT_MOCK_STATION
from qkdlab.experiments.bb84.run import BB84Result, run_bb84
from qkdlab.mock_instruments.bench import config_from_mapping
from qkdlab.mock_instruments.bench.config import BenchConfig
from qkdlab.mock_instruments.bench.optics import mean_photon_numbers
from qkdlab.protocol.bits import binary_entropy
from qkdlab.protocol.finite_key import (
    DecoyStatistics,
    FiniteKeyResult,
    expected_ec_leakage,
    expected_statistics,
    expected_statistics_passive,
    secure_key_length,
    secure_key_length_samples,
)
from qkdlab.roles import bb84_roles
from qkdlab.station import open_station
from qkdlab.testing import scenarios
from qkdlab.testing.scenarios import Model, model_of

SIGMAS = 5.0
DURATION_S = 1.5  # long enough for a finite key well clear of the finite-size cliff


@dataclass
class Run:
    result: BB84Result
    finite: FiniteKeyResult
    observed: DecoyStatistics
    model: Model


def mock_run(data_dir: Path, bench_seed: int = 13, seed: int = 21) -> Run:
    """One run of the scenario through the real path, and the model of its bench."""
    over = scenarios.bench_overrides()
    mus = mean_photon_numbers(config_from_mapping(over).alice, 0.0)
    settings = scenarios.settings(DEFAULT_MOCK_STATION, seed)
    seen: list[BenchConfig] = []
    with open_station(DEFAULT_MOCK_STATION, seed=bench_seed, bench_overrides=over) as loaded:
        bench = loaded.launcher.bench  # type: ignore[union-attr]
        # every run sets the VOA to the attenuation at which the settings' μ hold: on a
        # mock station whose bench overrides set it, that one (not the station's)
        result = run_bb84(bb84_roles(loaded), settings, duration_s=DURATION_S,
                          data_dir=data_dir, progress=False,
                          on_frame=lambda _: seen.append(bench.config()))
    cfg = seen[0]  # while the light was on
    assert cfg.alice.laser_on
    assert len({c.alice for c in seen}) == 1
    # the bench sent the μ the settings (and so the post-processing) claim
    sent = mean_photon_numbers(cfg.alice, cfg.alice.im_phase_rad)
    assert sent.tolist() == pytest.approx(list(mus), rel=1e-9)
    assert result.key is not None, result.summary()
    assert result.key.alice.finite is not None, result.summary()
    tot = result.totals
    observed = DecoyStatistics(
        n_x=tuple(float(x) for x in tot.sifted[0]),
        n_z=tuple(float(x) for x in tot.sifted[1]),
        m_z=tuple(float(x) for x in tot.errors[1]),
        m_x=tuple(float(x) for x in tot.errors[0]))
    return Run(result, result.key.alice.finite, observed,
               model_of(cfg, tot.pulses, settings.acceptance_ps))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return mock_run(tmp_path_factory.mktemp("e2e"))


def test_run_ends_with_a_key_from_the_counts_it_measured(run: Run) -> None:
    s = run.result.summary()
    assert s["status"] == "completed"
    assert not s["aborted"], s["abort_reason"]
    assert run.result.key is not None
    assert run.result.key.keys_match
    assert 0.012 < s["qber_z"] < 0.02  # e_mis 1.5 % plus dark counts and double clicks
    # the post-processing's length is Lim et al.'s for the run's own sifted counts
    again = secure_key_length(run.observed, run.model.mus, run.model.probabilities,
                              run.finite.lambda_ec)
    assert again.length == run.finite.length == s["pa_output_bits"] > 0


def _z(observed: float, expected: float) -> float:
    return (observed - expected) / math.sqrt(max(expected, 1.0))


def test_counts_per_basis_and_intensity_follow_the_model(run: Run) -> None:
    exp = run.model.stats()
    obs = run.observed
    for name in ("n_x", "n_z", "m_z", "m_x"):
        for k in range(3):
            z = _z(getattr(obs, name)[k], getattr(exp, name)[k])
            assert abs(z) < SIGMAS, (f"{name}[{k}]: observed {getattr(obs, name)[k]:.0f}, "
                                     f"model {getattr(exp, name)[k]:.1f} ({z:+.1f} sigma)")
    # a transmittance off by 5 % (0.2 dB) would be seen in the signal counts
    wrong = run.model.stats(eta_scale=0.95)
    assert abs(_z(obs.n_x[0], wrong.n_x[0])) > 3 * SIGMAS


QUANTITIES = ("s_x1", "s_z1", "v_z1", "phi_x", "length")


def test_bounds_and_secure_length_agree_with_the_model(run: Run) -> None:
    samples = secure_key_length_samples(run.model.stats(), run.model.mus,
                                        run.model.probabilities, run.finite.lambda_ec,
                                        np.random.default_rng(3), samples=600)
    for name in QUANTITIES:
        values = np.array([float(getattr(r, name)) for r in samples])
        mean, sigma = float(values.mean()), float(values.std(ddof=1))
        got = float(getattr(run.finite, name))
        assert abs(got - mean) < SIGMAS * sigma, (
            f"{name}: run {got:.6g}, model {mean:.6g} ± {sigma:.3g}")
        if name == "length":
            assert all(r.length > 0 for r in samples)
            # the window excludes the length a single-photon bound off by a factor of
            # 2 would give (a wrong transmittance shows first in the counts)
            f = run.finite
            halved = f.raw_length - f.s_x1 / 2 * (1 - binary_entropy(f.phi_x))
            assert abs(got - halved) > SIGMAS * sigma
        if name == "s_x1":
            assert SIGMAS * sigma < 0.05 * mean


def _true_single_photon(model: Model) -> dict[str, float]:
    """The bench's own single-photon figures over the run (first order in the dark-count
    probability d ≈ 10⁻⁶): detections of one-photon pulses per basis and test errors."""
    probs_1 = sum(p * mu * math.exp(-mu) for p, mu in zip(model.probabilities, model.mus,
                                                          strict=True))
    n1 = model.pulses * probs_1
    kf, e, d, pk = model.key_fraction, model.misalignment, model.dark, model.p_key
    key = n1 * pk * (model.eta * kf + 2 * d)
    test = n1 * (1 - pk) * (model.eta * (1 - kf) + 2 * d)
    errors = n1 * (1 - pk) * (model.eta * (1 - kf) * e + d)
    return {"s_x1": key, "s_z1": test, "v_z1": errors, "e1": errors / test}


def test_decoy_bounds_bracket_the_true_single_photon_figures(run: Run) -> None:
    truth = _true_single_photon(run.model)
    f = run.finite
    # the finite-key bounds hold (they fail with probability ~ε_sec)
    assert f.s_x1 <= truth["s_x1"]
    assert f.s_z1 <= truth["s_z1"]
    assert f.v_z1 >= truth["v_z1"]
    assert f.phi_x >= truth["e1"]
    # and in the asymptotic limit the three intensities pin them down: the model's
    # counts give the true single-photon detections within 1 %, the run's counts too
    # within counting statistics (a factor 2 in Eq. 3 or 4 would be far outside)
    model_asym = secure_key_length(run.model.stats(), run.model.mus, run.model.probabilities,
                                   run.finite.lambda_ec, asymptotic=True)
    run_asym = secure_key_length(run.observed, run.model.mus, run.model.probabilities,
                                 run.finite.lambda_ec, asymptotic=True)
    samples = secure_key_length_samples(run.model.stats(), run.model.mus,
                                        run.model.probabilities, run.finite.lambda_ec,
                                        np.random.default_rng(4), samples=400,
                                        asymptotic=True)
    for name in ("s_x1", "s_z1"):
        assert getattr(model_asym, name) == pytest.approx(truth[name], rel=0.01)
        sigma = float(np.std([getattr(r, name) for r in samples], ddof=1))
        assert abs(getattr(run_asym, name) - truth[name]) < SIGMAS * sigma + 0.01 * truth[name]
    # v_Z,1 from the decoy and vacuum classes only: the bound exceeds the truth by the
    # multi-photon errors it cannot exclude, within 20 % here
    assert truth["v_z1"] <= model_asym.v_z1 < 1.2 * truth["v_z1"]


# ---- the model helpers themselves ---------------------------------------------------


def test_passive_model_matches_the_active_one_in_the_linear_regime() -> None:
    mus, probs = (1e-4, 5e-5, 1e-6), (0.5, 0.3, 0.2)
    passive = expected_statistics_passive(1e14, mus, probs, transmittance=0.01, p_key=0.7,
                                          key_fraction=0.7, dark_count=0.0,
                                          misalignment=0.02)
    active = expected_statistics(1e14, mus, probs, transmittance=0.01, p_x=0.7,
                                 dark_count=0.0, misalignment=0.02)
    for name in ("n_x", "n_z", "m_z", "m_x"):
        # passive p·κ·ημ vs active p²·ημ: equal at κ = p up to the passive receiver's
        # cross-basis double clicks, O(ημ/e_mis) ~ 1e-5 here
        assert getattr(passive, name) == pytest.approx(getattr(active, name), rel=3e-5)
    # dark counts: a passive receiver's test arm sees both of its detectors' dark
    # counts whatever its share of the light
    dark = expected_statistics_passive(1e9, (0.0, 0.0, 0.0), probs, transmittance=0.1,
                                       p_key=0.7, key_fraction=0.9, dark_count=1e-6,
                                       misalignment=0.0)
    assert dark.n_z[0] == pytest.approx(1e9 * 0.5 * 0.3 * 2e-6, rel=1e-5)
    assert dark.qber_z == pytest.approx(0.5, rel=1e-5)


def test_expected_ec_leakage_is_f_n_h() -> None:
    stats = DecoyStatistics(n_x=(900.0, 100.0, 0.0), n_z=(10.0, 10.0, 10.0),
                            m_z=(0.0, 0.0, 0.0), m_x=(20.0, 5.0, 0.0))
    h = -(0.025 * math.log2(0.025) + 0.975 * math.log2(0.975))
    assert expected_ec_leakage(stats, 1.1) == pytest.approx(1.1 * 1000 * h)
    with pytest.raises(ValueError, match="f_ec must be >= 1"):
        expected_ec_leakage(stats, 0.9)


@pytest.mark.parametrize(("kwarg", "value", "message"), [
    ("transmittance", 1.5, "transmittance must lie in"),
    ("p_key", -0.1, "p_key must lie in"),
    ("key_fraction", 2.0, "key_fraction must lie in"),
    ("dark_count", 1.0, "dark_count must lie in"),
    ("misalignment", 0.6, "misalignment must lie in"),
])
def test_passive_model_names_a_bad_parameter(kwarg: str, value: float, message: str) -> None:
    kwargs: dict[str, float] = {"transmittance": 0.1, "p_key": 0.5, "key_fraction": 0.5,
                                "dark_count": 1e-6, "misalignment": 0.01}
    kwargs[kwarg] = value
    with pytest.raises(ValueError, match=message):
        expected_statistics_passive(1e6, (0.5, 0.1, 0.0), (0.7, 0.2, 0.1), **kwargs)


def test_length_samples_spread_about_the_expected_length() -> None:
    mus, probs = (0.5, 0.1, 0.0), (0.7, 0.2, 0.1)
    stats = expected_statistics_passive(1e10, mus, probs, transmittance=0.05, p_key=0.8,
                                        key_fraction=0.8, dark_count=1e-6,
                                        misalignment=0.01)
    lam = expected_ec_leakage(stats, 1.1)
    centre = secure_key_length(stats, mus, probs, lam).length
    a = secure_key_length_samples(stats, mus, probs, lam, np.random.default_rng(1), 200)
    b = secure_key_length_samples(stats, mus, probs, lam, np.random.default_rng(1), 200)
    lengths = np.array([r.length for r in a])
    assert np.array_equal(lengths, [r.length for r in b])  # seeded: reproducible
    assert 0 < lengths.std() < 0.05 * centre
    spread = 5 * lengths.std() / math.sqrt(lengths.size)
    assert abs(lengths.mean() - centre) < spread + 0.002 * centre
