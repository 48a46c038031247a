"""Detector blinding on the bench (Lydersen et al., Nat. Photon. 4, 686 (2010)).

Against the published physics: blinded detectors lose dark counts and afterpulses,
click only where Eve's faked state points (Bob's basis and bit are Eve's), so the
QBER stays at zero; the bias current and the light at Bob's entrance give it away.
Tolerances are 5σ of the counting statistics, from the expected values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from qkdlab.mock_instruments.bench import (
    ORIGIN_AFTERPULSE,
    ORIGIN_DARK,
    ORIGIN_MARKER,
    ORIGIN_PHOTON,
    Bench,
    BenchTags,
    config_from_mapping,
)
from qkdlab.mock_instruments.bench.blinding import eve_states
from qkdlab.mock_instruments.bench.symbols import state_and_intensity
from qkdlab.mock_instruments.idquantique.id120 import MockID120

IntArray = npt.NDArray[np.int64]

# busy detectors: many dark counts and afterpulses, so their absence is unmistakable
NOISY = {"efficiency": 0.2, "dark_count_cps": 20_000.0, "dead_time_s": 1e-6,
         "afterpulse_prob": 0.05}


def make_bench(seed: int = 1, blinding: bool = True, **sections: Any) -> Bench:
    eve = {"blinding": blinding, **sections.pop("eve", {})}
    bob = {"detectors": NOISY, **sections.pop("bob", {})}
    return Bench(config_from_mapping({"bob": bob, "eve": eve, **sections}), seed=seed)


def acquire(bench: Bench, seconds: float) -> BenchTags:
    """Tags after the first pulses have crossed the fibre."""
    bench.acquire(bench.propagation_delay_ps() * 1e-12 + 20e-6)
    return bench.acquire(seconds)


def photon_clicks(bench: Bench, tags: BenchTags) -> tuple[IntArray, IntArray]:
    """(pulse, detector) of the clicks caused by light, from the ground truth."""
    photon = tags.origin == ORIGIN_PHOTON
    lookup = {c: d for d, c in enumerate(bench.tagger.detector_channels)}
    det = np.array([lookup[int(c)] for c in tags.channel[photon]], dtype=np.int64)
    return tags.pulse_index[photon], det


def alice_states(bench: Bench, pulse: IntArray) -> npt.NDArray[np.int8]:
    pattern = bench.alice.pattern
    state, _ = state_and_intensity(bench.pattern_seed(pattern), pulse, pattern)
    return state


def qber_4det(bench: Bench, pulse: IntArray, det: IntArray) -> tuple[float, int]:
    """Sifted QBER of single clicks (4 detectors: detector d measures state d)."""
    uniq, counts = np.unique(pulse, return_counts=True)
    single = np.isin(pulse, uniq[counts == 1])
    state = alice_states(bench, pulse[single])
    d = det[single]
    sifted = d // 2 == state // 2
    return float(np.mean(d[sifted] != state[sifted])), int(sifted.sum())


@pytest.mark.parametrize("z_fraction", [0.5, 0.8])
def test_blinded_detectors_click_only_on_eves_faked_states(z_fraction: float) -> None:
    honest = make_bench(blinding=False, bob={"z_fraction": z_fraction})
    tags = acquire(honest, 0.05)
    assert np.count_nonzero(tags.origin == ORIGIN_DARK) > 1000  # the control sees noise
    assert np.count_nonzero(tags.origin == ORIGIN_AFTERPULSE) > 1000
    qber_honest, _ = qber_4det(honest, *photon_clicks(honest, tags))

    bench = make_bench(bob={"z_fraction": z_fraction})
    tags = acquire(bench, 0.05)
    # linear mode: no dark counts, no afterpulses
    assert set(np.unique(tags.origin).tolist()) <= {ORIGIN_PHOTON, ORIGIN_MARKER}
    pulse, det = photon_clicks(bench, tags)
    assert pulse.size > 10_000
    plan = bench.blinding_plan()
    assert plan is not None
    faked = eve_states(bench.seed, pulse, alice_states(bench, pulse), plan.p_z)
    # Bob's detector is the one measuring Eve's state: his basis and bit are hers
    np.testing.assert_array_equal(det, faked)
    # ...and no pulse makes two detectors click (Eve avoids double clicks)
    assert np.unique(pulse).size == pulse.size
    # in Alice's basis Eve read Alice's bit: sifting leaves no error at all, below the
    # honest link's misalignment errors
    qber, n = qber_4det(bench, pulse, det)
    assert n > 3000
    assert qber == 0.0
    assert qber_honest > 0.005
    # Eve measures in Z as often as Bob's splitter sends light there (mimicry)
    assert plan.p_z == z_fraction
    rates = bench.expected_click_rates()
    assert rates[:2].sum() / rates.sum() == pytest.approx(z_fraction, rel=1e-12)


def test_click_rates_follow_eves_receiver_and_mimic_the_honest_gain() -> None:
    fixed = make_bench(eve={"resend_probability": 1.0, "efficiency": 0.3, "loss_db": 3.0},
                       bob={"detectors": {**NOISY, "dead_time_s": 0.0}})
    mu = fixed.mean_photon_numbers()
    per_pulse = [-math.expm1(-m * 0.3 * 10 ** -0.3) for m in mu]
    probs = fixed.alice.pattern.intensity_probs
    expected_rate = fixed.alice.rep_rate_hz * float(np.dot(probs, per_pulse))
    np.testing.assert_allclose(fixed.expected_click_rates().sum(), expected_rate, rtol=1e-9)
    seconds = 0.02
    pulse, _ = photon_clicks(fixed, acquire(fixed, seconds))
    n_expected = expected_rate * seconds
    assert abs(pulse.size - n_expected) < 5 * math.sqrt(n_expected)

    # mimicry: Bob's signal-class gain as without Eve (no dark counts in the comparison)
    honest = make_bench(blinding=False, bob={"detectors": {**NOISY, "dark_count_cps": 0.0}})
    blinded = make_bench(bob={"detectors": {**NOISY, "dark_count_cps": 0.0}})
    plan = blinded.blinding_plan()
    assert plan is not None
    honest_rate = honest.expected_click_rates().sum()
    # the honest rate counts multi-click pulses once per click: ≤ 1 % more at μη ≈ 0.025
    assert blinded.expected_click_rates().sum() == pytest.approx(honest_rate, rel=0.01)


def test_bias_current_and_light_at_bobs_entrance_reveal_blinding() -> None:
    honest = make_bench(blinding=False)
    i_honest = honest.detector_bias_current_a()
    rates = honest.expected_click_rates()
    counted = rates / (1 + rates * 1e-6)
    np.testing.assert_allclose(i_honest, 1e-12 * counted * 1.05, rtol=1e-12)  # Q·R_m·(1+p_ap)
    assert i_honest.max() < 1e-12 / 1e-6  # never above one avalanche per dead time

    bench = make_bench(eve={"blinding_power_w": 2e-3})
    current = bench.detector_bias_current_a()
    # a monitor photodiode at Bob's entrance: ~pW of Alice's light, ~mW of Eve's (her CW
    # plus her faked states)
    entrance = bench.optical_power_at("bob_input")
    assert honest.optical_power_at("bob_input") < 1e-9
    # each faked state: the target gets 1.2 × its always-click energy, which scales with
    # its CW power (P_cw/P_blind = 200 × 1 pJ); it passes ½·(1 + c) of the entrance energy
    # beyond the optics and the arm, as does its CW, so those cancel: E = 1.2·200 pJ/(1 + c)
    trigger_j = 1.2 * 1e-12 * (2e-3 / 10e-6) / (2 - 2 * 0.01)
    resent_per_s = bench.expected_click_rates().sum()  # one click per faked state
    assert entrance == pytest.approx(2e-3 + resent_per_s * trigger_j, rel=1e-9)
    # linear mode: 0.9 A/W × the light at the diode (−1 dB optics, ½ arm, and on average
    # ½ through its analyser: Eve's CW is circular, her faked states equally often each bit)
    np.testing.assert_allclose(current, 0.9 * entrance * 10 ** -0.1 * 0.25, rtol=1e-9)
    assert current.min() > 100 * i_honest.max()


def test_blinding_holds_with_alices_laser_off() -> None:
    # no light from Alice: honest detectors still count darks, blinded ones nothing
    bench = make_bench(alice={"laser_on": False})
    tags = acquire(bench, 0.02)
    assert tags.counts(list(bench.tagger.detector_channels)) == {1: 0, 2: 0, 3: 0, 4: 0}
    np.testing.assert_array_equal(bench.expected_click_rates(), 0.0)
    assert bench.detector_bias_current_a().min() > 1e-4  # the CW light still flows


def test_careless_trigger_makes_double_clicks_and_errors() -> None:
    # triggers 3x the always-click energy: the other arm's detectors (half of 3x) click too
    bench = make_bench(eve={"trigger_margin": 3.0, "avoid_double_clicks": False},
                       bob={"detectors": {**NOISY, "dead_time_s": 0.0}})
    pulse, _ = photon_clicks(bench, acquire(bench, 0.02))
    _, counts = np.unique(pulse, return_counts=True)
    assert np.all(counts == 3)  # target + both detectors of the other arm
    # an Eve who avoids double clicks sends nothing she cannot fake cleanly: silence
    careful = make_bench(eve={"trigger_margin": 3.0})
    np.testing.assert_array_equal(careful.expected_click_rates(), 0.0)
    assert careful.detector_bias_current_a().min() > 1e-4  # still blinded


def test_partial_blinding_is_refused_with_the_power_needed() -> None:
    with pytest.raises(ValueError, match=r"eve.blinding_power_w = 1e-06 W .* >= 5.04e-05 W"):
        make_bench(eve={"blinding_power_w": 1e-6})
    bench = make_bench()
    bench.eve.blinding_power_w = 1e-6  # a setting is checked when the bench next uses it
    with pytest.raises(ValueError, match=r"eve\.blinding_power_w"):
        bench.acquire(1e-3)


def test_switched_off_detectors_stay_readable_under_blinding() -> None:
    # a safe state switches the detectors off while Eve still shines: read-outs work
    bench = make_bench()
    for det in bench.bob.detectors:
        det.enabled = False
    np.testing.assert_array_equal(bench.expected_click_rates(), 0.0)
    tags = acquire(bench, 0.01)
    assert tags.counts(list(bench.tagger.detector_channels)) == {1: 0, 2: 0, 3: 0, 4: 0}


def test_two_detector_receiver_gets_eves_bit_in_its_basis() -> None:
    bench = make_bench(bob={"detectors": [NOISY, NOISY], "single_basis": 1})
    pulse, det = photon_clicks(bench, acquire(bench, 0.02))
    plan = bench.blinding_plan()
    assert plan is not None
    assert plan.p_z == 0.0  # Eve measures in X, the only basis Bob sees
    faked = eve_states(bench.seed, pulse, alice_states(bench, pulse), plan.p_z)
    np.testing.assert_array_equal(det, faked - 2)


def test_eve_settings_do_not_act_while_she_does_not_blind() -> None:
    plain = Bench(config_from_mapping({}), seed=4).acquire(0.005)
    idle = Bench(config_from_mapping({"eve": {"blinding_power_w": 5e-3, "efficiency": 1.0}}),
                 seed=4).acquire(0.005)
    np.testing.assert_array_equal(plain.time_ps, idle.time_ps)
    np.testing.assert_array_equal(plain.channel, idle.channel)


def test_eve_config_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown bench parameter"):
        config_from_mapping({"eve": {"blind": True}})
    with pytest.raises(ValueError, match=r"eve\.efficiency"):
        config_from_mapping({"eve": {"efficiency": 1.5}})
    with pytest.raises(ValueError, match="trigger_never_j <= trigger_always_j"):
        config_from_mapping({"bob": {"detectors": {"trigger_never_j": 2e-12}}})


def test_id120_mock_reports_the_blinded_detector() -> None:
    bench = make_bench(blinding=False, alice={"laser_on": False})
    spad = MockID120(bench, 0, seed=3, bench_physics=True)
    spad.start_at(185.0)
    dark = spad.measured_rate_cps()
    assert dark == pytest.approx(20_000 / (1 + 20_000 * 1e-6))  # dark counts only
    honest_current = spad.bias_current_a()
    assert honest_current == pytest.approx(1e-12 * dark * 1.05)
    bench.eve.blinding = True
    assert spad.measured_rate_cps() == 0.0  # no dark counts in linear mode
    assert spad.bias_current_a() > 1000 * honest_current
