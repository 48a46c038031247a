"""End-to-end simulated BB84: secure key bits per second, and the finite-key model table.

1. One run through the real path — the mock station (``qkdlab/stations/mock.yaml`` with
   bench overrides) → :func:`~qkdlab.experiments.bb84.run.run_bb84` (acquisition, qubit
   sync, sifting, estimation) → the distilled key (Cascade, verification, Lim et al.
   finite key, Toeplitz PA, authentication paid back).  Scenario: 80 MHz source,
   μ = 0.1 signal, 1 km of fibre, e_mis = 1.5 % (QBER ≈ 1.5 %), ``DURATION_S`` of
   acquisition.  Figures:

   * secure key rate (bits per second of acquisition), baseline: the finite-key model
     (:func:`~qkdlab.protocol.finite_key.expected_statistics_passive` for the bench's
     parameters, the same pulse count and the run's disclosed λ_EC) — ratio ≈ 1 means
     the run yields what the model says it should;
   * secure bits per wall-clock second of the whole simulated run (acquisition +
     post-processing, one process), baseline: the acquisition-time rate — the ratio is
     the real-time factor (≥ 1: the software keeps up with the 80 MHz source);
   * wall and CPU time of the acquisition (until the last frame is processed) and of
     post-processing (distillation), baseline: the simulated acquisition time; secure
     bits per CPU second as well, since wall time on a shared machine is noisy.

2. The finite-key rate per pulse from the model vs block size and distance (station's
   standard scheme μ = 0.5/0.1/vacuum), baseline: its own asymptotic limit (N → ∞);
   and that limit against p_signal × the asymptotic GLLP rate of
   :func:`~qkdlab.protocol.keyrate.decoy_bb84_rate` (which counts every pulse as a
   signal pulse).

Wall times are noisy on a shared machine; ``QKDLAB_E2E_DURATION_S`` overrides the
acquisition time.  Run this file to print the tables.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

from qkdlab.cli import DEFAULT_MOCK_STATION
from qkdlab.experiments.bb84.run import BB84Result, run_bb84
from qkdlab.mock_instruments.bench import config_from_mapping
from qkdlab.mock_instruments.bench.config import BenchConfig
from qkdlab.mock_instruments.bench.optics import mean_photon_numbers
from qkdlab.protocol.finite_key import (
    expected_ec_leakage,
    expected_statistics_passive,
    secure_key_length,
)
from qkdlab.protocol.keyrate import decoy_bb84_rate
from qkdlab.roles import bb84_roles
from qkdlab.station import open_station
from qkdlab.testing import scenarios
from qkdlab.testing.scenarios import LENGTH_KM, MISALIGNMENT, P_Z, REP_RATE_HZ

Row = dict[str, Any]

DURATION_S = float(os.environ.get("QKDLAB_E2E_DURATION_S", "4.0"))


def end_to_end(duration_s: float = DURATION_S, seed: int = 5) -> dict[str, Any]:
    """One mock run of the scenario; its figures, wall times and the model's prediction."""
    over = scenarios.bench_overrides()
    cfg = config_from_mapping(over)
    mus = tuple(float(x) for x in mean_photon_numbers(cfg.alice, 0.0))
    settings = scenarios.settings(DEFAULT_MOCK_STATION, seed)
    marks: list[tuple[float, float]] = []  # (wall, CPU) after each frame
    live: list[BenchConfig] = []

    def on_frame(_: object) -> None:
        marks.append((time.perf_counter(), time.process_time()))
        if not live:
            live.append(bench.config())  # the bench as it ran, light on

    t_open = time.perf_counter()
    with tempfile.TemporaryDirectory() as data_dir, \
            open_station(DEFAULT_MOCK_STATION, seed=11, bench_overrides=over) as loaded:
        bench = loaded.launcher.bench  # type: ignore[union-attr]
        t_start, c_start = time.perf_counter(), time.process_time()
        result = run_bb84(bb84_roles(loaded), settings, duration_s=duration_s,
                          data_dir=data_dir, progress=False, on_frame=on_frame)
        t_end, c_end = time.perf_counter(), time.process_time()
    ran = tuple(float(x) for x in mean_photon_numbers(live[0].alice, live[0].alice.im_phase_rad))
    if live[0].alice.rep_rate_hz != REP_RATE_HZ or not all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip(ran, mus, strict=True)):
        raise RuntimeError(f"the bench ran at mu = {ran}, not the scenario's {mus}")
    fig = _figures(result, live[0], settings.acceptance_ps)
    fig.update(setup_s=t_start - t_open, acquisition_s=marks[-1][0] - t_start,
               post_s=t_end - marks[-1][0], acquisition_cpu_s=marks[-1][1] - c_start,
               post_cpu_s=c_end - marks[-1][1])
    return fig


def _figures(result: BB84Result, cfg: BenchConfig, acceptance_ps: float) -> dict[str, Any]:
    s = result.summary()
    if result.key is None:
        raise RuntimeError(f"run ended without post-processing: {s['abort_reason']}")
    finite = result.key.alice.finite
    if finite is None:
        raise RuntimeError(f"no finite-key result: {s['abort_reason']}")
    p = scenarios.model_of(cfg, result.totals.pulses, acceptance_ps)
    model = secure_key_length(p.stats(), p.mus, p.probabilities, finite.lambda_ec)
    return {"summary": s, "finite": finite, "model": model, "params": p,
            "duration_s": result.duration_s, "det": cfg.bob.detectors[0]}


def scenario_text(fig: dict[str, Any]) -> str:
    s, p, det = fig["summary"], fig["params"], fig["det"]
    mus = ", ".join(f"{m:.4g}" for m in p.mus)
    probs = ", ".join(f"{x:g}" for x in p.probabilities)
    lines = [
        "end-to-end BB84 on the mock station (ID1000 tagger, qubit-based sync)",
        f"  source            {REP_RATE_HZ / 1e6:g} MHz, mu (signal, decoy, vacuum) = {mus}, "
        f"p = {probs}, p_Z = {p.p_key:g}",
        f"  channel           {LENGTH_KM:g} km x 0.2 dB/km, Bob optics 1 dB, e_mis "
        f"{p.misalignment:.1%}, eta total {p.eta:.4f}",
        f"  detectors         4 x eff {det.efficiency:.0%}, dark {det.dark_count_cps:g} cps "
        f"({p.dark:.2g} per window), dead time {det.dead_time_s * 1e9:g} ns, "
        f"afterpulse {det.afterpulse_prob:g}",
        f"  duration          {fig['duration_s']:.3f} s ({s['pulses']:,} pulses), "
        f"{s['detections']:,} detections",
        f"  QBER measured     Z {s['qber_z']:.3%}, X {s['qber_x']:.3%}",
        f"  sifted bits       {s['sifted_bits']:,} (key basis {s['sifted_bits_z']:,})",
        f"  EC                f = {s['ec_efficiency']:.3f}, {s['ec_disclosed_bits']:,} bits "
        "disclosed",
        f"  secure bits       {s['pa_output_bits']:,} after PA, {s['secure_key_bits']:,} net of "
        f"{s['auth_key_used_bits']:,} authentication bits (model: {fig['model'].length:,})",
        f"  wall time         acquisition {fig['acquisition_s']:.2f} s, post-processing "
        f"{fig['post_s']:.2f} s (station set-up {fig['setup_s']:.2f} s, not counted)",
        f"  CPU time          acquisition {fig['acquisition_cpu_s']:.2f} s, post-processing "
        f"{fig['post_cpu_s']:.2f} s (all threads of this process, mocks included)",
    ]
    if s["aborted"]:
        lines.append(f"  ABORTED: {s['abort_reason']}")
    return "\n".join(lines)


def end_to_end_rows(fig: dict[str, Any]) -> list[Row]:
    s, dur = fig["summary"], fig["duration_s"]
    wall = fig["acquisition_s"] + fig["post_s"]
    net = s["secure_key_bits"]
    model_bps = (fig["model"].length - s["auth_key_used_bits"]) / dur
    rate = net / dur
    tag = f"80MHz mu0.1 {LENGTH_KM:g}km"
    return [
        {"name": f"e2e secure key rate, {tag}", "value": rate, "unit": "bit/s",
         "baseline": model_bps, "ratio": rate / model_bps if model_bps else None,
         "note": "net key (after paying back the authentication key) per second of "
                 "acquisition; baseline: finite-key model length (same pulses, bench "
                 "parameters, the run's lambda_EC) less the same authentication key"},
        {"name": f"e2e secure bits per wall-clock s, {tag}", "value": net / wall,
         "unit": "bit/s", "baseline": rate, "ratio": net / wall / rate if rate else None,
         "note": "acquisition + post-processing wall time; baseline: the acquisition-time "
                 "rate (ratio = real-time factor)"},
        {"name": f"e2e secure bits per CPU s, {tag}",
         "value": net / (fig["acquisition_cpu_s"] + fig["post_cpu_s"]), "unit": "bit/s",
         "baseline": rate,
         "ratio": net / (fig["acquisition_cpu_s"] + fig["post_cpu_s"]) / rate if rate else None,
         "note": "as above with process CPU time (mocks, driver, processing, both parties), "
                 "less sensitive to other load on the machine"},
        {"name": "e2e wall time, acquisition", "value": fig["acquisition_s"], "unit": "s",
         "baseline": dur, "ratio": fig["acquisition_s"] / dur,
         "note": "mock bench + tagger driver + sync + sifting; baseline: simulated time"},
        {"name": "e2e wall time, post-processing", "value": fig["post_s"], "unit": "s",
         "baseline": dur, "ratio": fig["post_s"] / dur,
         "note": "Cascade, verification, finite key, PA, key stores"},
        {"name": "e2e CPU time, acquisition", "value": fig["acquisition_cpu_s"], "unit": "s",
         "baseline": dur, "ratio": fig["acquisition_cpu_s"] / dur},
        {"name": "e2e CPU time, post-processing", "value": fig["post_cpu_s"], "unit": "s",
         "baseline": dur, "ratio": fig["post_cpu_s"] / dur},
        {"name": "e2e QBER (Z, key basis)", "value": s["qber_z"], "unit": ""},
        {"name": "e2e sifted key-basis bits", "value": float(s["sifted_bits_z"]), "unit": "bits"},
        {"name": "e2e secure bits after PA", "value": float(s["pa_output_bits"]),
         "unit": "bits", "baseline": float(fig["model"].length),
         "ratio": s["pa_output_bits"] / fig["model"].length if fig["model"].length else None},
    ]


# ---- finite-key rate vs block size and distance (model only) ----------------------

TABLE_MUS = (0.5, 0.1, 0.5 * 10**-2.5)  # station scheme; vacuum class at 25 dB extinction
TABLE_PROBS = (0.7, 0.2, 0.1)
TABLE_F_EC = 1.1
TABLE_DARK = 200.0 * 4e-9  # 200 cps in a 4 ns window (100 MHz, 40 % of the period)
TABLE_ETA_BOB = 0.2 * 10**-0.1  # detector 20 %, Bob's optics 1 dB
BLOCKS = (1e9, 1e10, 1e11, 1e12)
DISTANCES_KM = (1.0, 25.0, 50.0, 100.0)


def _model_rate(pulses: float, distance_km: float, asymptotic: bool) -> float:
    eta = TABLE_ETA_BOB * 10 ** (-0.2 * distance_km / 10)
    stats = expected_statistics_passive(pulses, TABLE_MUS, TABLE_PROBS, transmittance=eta,
                                        p_key=P_Z, key_fraction=P_Z, dark_count=TABLE_DARK,
                                        misalignment=MISALIGNMENT)
    length = secure_key_length(stats, TABLE_MUS, TABLE_PROBS,
                               expected_ec_leakage(stats, TABLE_F_EC),
                               asymptotic=asymptotic)
    if asymptotic:  # the floor and the length-0 rule aside, the N -> inf rate per pulse
        return max(length.raw_length, 0.0) / pulses if math.isfinite(length.raw_length) else 0.0
    return length.length / pulses


def finite_key_rows() -> list[Row]:
    rows: list[Row] = []
    for km in DISTANCES_KM:
        limit = _model_rate(1e15, km, asymptotic=True)
        for n in BLOCKS:
            r = _model_rate(n, km, asymptotic=False)
            rows.append({"name": f"finite-key rate N={n:.0e} pulses, {km:g} km", "value": r,
                         "unit": "bit/pulse", "baseline": limit,
                         "ratio": r / limit if limit else None,
                         "note": "Lim et al. 2014, model counts; baseline: N -> inf"})
        # GLLP counts every pulse as a signal; Lim's key takes the signal class at its
        # probability (plus a little from the decoy class)
        gllp = TABLE_PROBS[0] * decoy_bb84_rate(TABLE_ETA_BOB, 2 * TABLE_DARK, MISALIGNMENT,
                                                0.2, km, TABLE_F_EC, TABLE_MUS[0],
                                                TABLE_MUS[1], q=P_Z**2)
        rows.append({"name": f"asymptotic rate (Lim bounds), {km:g} km", "value": limit,
                     "unit": "bit/pulse", "baseline": gllp,
                     "ratio": limit / gllp if gllp else None,
                     "note": "baseline: p_signal x decoy_bb84_rate (GLLP, vacuum + weak "
                             "decoy, active 2-detector model, signal pulses only)"})
    return rows


def finite_key_text(rows: list[Row]) -> str:
    head = "finite-key rate (bit/pulse) from the model; mu 0.5/0.1/vac, p_Z 0.8, f 1.1"
    lines = [head, f"  {'km':>5} " + " ".join(f"{f'N={n:.0e}':>10}" for n in BLOCKS)
             + f" {'N->inf':>10} {'p_s*GLLP':>10}"]
    per_km = len(BLOCKS) + 1
    for i, km in enumerate(DISTANCES_KM):
        chunk = rows[i * per_km:(i + 1) * per_km]
        vals = [r["value"] for r in chunk[:-1]]
        lines.append(f"  {km:>5g} " + " ".join(f"{v:>10.3g}" for v in vals)
                     + f" {chunk[-1]['value']:>10.3g} {chunk[-1]['baseline']:>10.3g}")
    return "\n".join(lines)


def run() -> list[Row]:
    fig = end_to_end()
    print(scenario_text(fig), flush=True)
    table = finite_key_rows()
    print(finite_key_text(table), flush=True)
    return end_to_end_rows(fig) + table


if __name__ == "__main__":
    for row in run():
        ratio = row.get("ratio")
        print(f"{row['name']:<48} {row['value']:>12.4g} {row['unit']:<10}"
              + (f" ratio {ratio:.3g}" if ratio is not None else ""))
