"""A fast, closed-form polarization link for tracker tests: a drifting fibre, Bob's
quarter/half/quarter-wave compensator and frames of sifted counts, delivered to the
consumer as a streaming run delivers them — ``lag`` frames late.

Physics as on the mock bench (:mod:`qkdlab.mock_instruments.bench.optics` and the
ELL14 mock): the fibre is an isotropic SO(3) random walk (each rotation-vector
component N(0, 2·D·Δ) per drift step Δ), the compensator R_c = Q(θ3)·H(θ2)·Q(θ1) with
each plate a rotation by its retardance about the equatorial axis at 2θ, Alice's
encoder optionally turning about S3 at a steady rate, and basis b's QBER is
e0 + (1 − 2·e0)·(1 − R_bb)/2 for the total rotation R = R_c·R_fibre·R_encoder (e0: the
bench's floor at perfect alignment — optical misalignment, dark counts, afterpulses —
1.25 % on the mock).  The fibre's walk and a frame's counts (Poisson, then binomial)
come from two generators seeded by ``seed``, so a run is reproducible bit for bit and
the walk does not depend on how many frames were drawn.

Timing: frame j covers stream time ``[j·T, (j+1)·T)`` (T = ``frame_s``), taken with
whatever actuator settings held then (a frame during which the actuators moved mixes
both, weighted by time).  The consumer is handed frame j while the stream is already
``lag`` frames further, at ``(j + 1 + lag + phase)·T``: an actuator move it makes then
applies from that instant on, so the next ``lag`` frames it receives were (at least
partly) taken before the move.  ``lag=0, phase=0`` is a synchronous acquisition.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from qkdlab.calibration.polarization import PolarizationTracker, mean_qber
from qkdlab.experiments.bb84.processing import FrameStats
from qkdlab.mock_instruments.bench.optics import rotation_about_axis, rotations_from_vectors
from qkdlab.mock_instruments.thorlabs.ell14 import retarder_rotation

FloatArray = npt.NDArray[np.float64]
PS = 10**12
PLATES_RAD = (math.pi / 2, math.pi, math.pi / 2)  # quarter, half, quarter wave


def compensator(angles_deg: list[float] | FloatArray) -> FloatArray:
    """Poincaré rotation of the QWP/HWP/QWP stack (light crosses plate 1 first)."""
    out = np.eye(3)
    for angle, retardance in zip(angles_deg, PLATES_RAD, strict=True):
        out = retarder_rotation(math.radians(float(angle)), retardance) @ out
    return out


def misalignment_rad(r: FloatArray) -> float:
    """Rotation angle of ``r`` (rad): 0 when the link is aligned."""
    return math.acos(max(-1.0, min(1.0, (float(np.trace(r)) - 1.0) / 2.0)))


class Controller:
    """The PolarizationController role over the link: moves take effect at ``link.now_s``."""

    def __init__(self, link: PolarizationLink, angles: list[float]) -> None:
        self.link = link
        self.history: list[tuple[float, list[float]]] = [(-math.inf, list(angles))]
        self._since = [-math.inf]
        self.moves = 0

    def set_actuators(self, values: list[float]) -> None:
        self.moves += 1
        self.history.append((self.link.now_s, [float(v) for v in values]))
        self._since.append(self.link.now_s)

    def get_actuators(self) -> list[float]:
        return list(self.history[-1][1])

    def safe_state(self) -> None:
        """Nothing to make safe."""

    def settings_during(self, t0: float, t1: float) -> list[tuple[float, list[float]]]:
        """(weight, angles) of every setting that held during ``[t0, t1)``."""
        first = max(0, bisect.bisect_right(self._since, t0) - 1)
        out = []
        for k in range(first, len(self.history)):
            since, angles = self.history[k]
            if since >= t1:
                break
            until = self.history[k + 1][0] if k + 1 < len(self.history) else math.inf
            overlap = min(t1, until) - max(t0, since)
            if overlap > 0:
                out.append((overlap / (t1 - t0), angles))
        return out


class PolarizationLink:
    """Drifting fibre + compensator + frames, streamed with a lag (module docstring).

    Args:
        seed: seeds the fibre's walk and the counting noise.
        diffusion_rad2_per_s: fibre diffusion D (rad²/s).
        frame_s: frame length T (s).
        sifted_per_s: sifted bits per second (both bases).
        p_z: share of sifted bits in the Z basis.
        e0: QBER at perfect alignment.
        drift_step_s: the walk is piecewise constant over this step (s).
        start: initial fibre rotation (identity: the mock bench's start).
        angles: the compensator's initial plate angles (deg).
        turn_rad_per_s: Alice's encoder reference turning steadily about S3 (rad/s).
    """

    def __init__(self, seed: int, *, diffusion_rad2_per_s: float, frame_s: float = 0.2,
                 sifted_per_s: float = 7e5, p_z: float = 0.8, e0: float = 0.0125,
                 drift_step_s: float = 1.0, start: FloatArray | None = None,
                 angles: list[float] | None = None, turn_rad_per_s: float = 0.0) -> None:
        self.rng = np.random.default_rng([seed, 1])  # counting noise
        self._walk_rng = np.random.default_rng([seed, 0])  # the fibre's walk: its own stream
        self.diffusion = diffusion_rad2_per_s
        self.frame_s = frame_s
        self.sifted_per_s = sifted_per_s
        self.p_z = p_z
        self.e0 = e0
        self.drift_step_s = drift_step_s
        self.turn_rad_per_s = turn_rad_per_s
        self.now_s = 0.0
        self._fibre = [np.eye(3) if start is None else np.asarray(start, np.float64)]
        self.controller = Controller(self, [0.0, 0.0, 0.0] if angles is None else angles)
        self.frames = 0
        self.searched_frames = 0

    def fibre(self, t_s: float) -> FloatArray:
        """Fibre rotation at time ``t_s`` (the walk is extended as needed)."""
        step = int(t_s // self.drift_step_s)
        sigma = math.sqrt(2.0 * self.diffusion * self.drift_step_s)
        while len(self._fibre) <= step:
            n = step + 1 - len(self._fibre)
            incr = rotations_from_vectors(sigma * self._walk_rng.standard_normal((n, 3)))
            for r in incr:
                self._fibre.append(r @ self._fibre[-1])
        return self._fibre[step]

    def total(self, angles: list[float], t_s: float) -> FloatArray:
        """Bob's compensator · fibre · Alice's encoder turned about S3 by ``turn·t``."""
        turn = rotation_about_axis(2, self.turn_rad_per_s * t_s)
        return compensator(angles) @ self.fibre(t_s) @ turn

    def misalignment_now(self) -> float:
        """Misalignment (rad) of the present settings at the present time."""
        return misalignment_rad(self.total(self.controller.get_actuators(), self.now_s))

    def qber(self, angles: list[float], t_s: float) -> tuple[float, float]:
        """Expected Z and X QBERs with ``angles`` at ``t_s``."""
        r = self.total(angles, t_s)
        q_z, q_x = (self.e0 + (1 - 2 * self.e0) * (1 - float(r[b, b])) / 2 for b in (0, 1))
        return q_z, q_x

    def take_frame(self, index: int) -> FrameStats:
        """Frame ``index`` (stream time ``[index·T, (index+1)·T)``) with its counts."""
        t0, t1 = index * self.frame_s, (index + 1) * self.frame_s
        mid = 0.5 * (t0 + t1)
        q = np.zeros(2)
        for weight, angles in self.controller.settings_during(t0, t1):
            q += weight * np.array(self.qber(angles, mid))
        n_total = self.rng.poisson(self.sifted_per_s * self.frame_s)
        n_z = int(self.rng.binomial(n_total, self.p_z))
        sifted = [n_z, int(n_total - n_z)]
        errors = [int(self.rng.binomial(n, float(p))) for n, p in zip(sifted, q, strict=True)]
        self.frames += 1
        return FrameStats(frame=index, start_ps=round(t0 * PS), stop_ps=round(t1 * PS),
                          pulses=0, counts={}, detected=[0, 0, 0],
                          sifted=[[n, 0, 0] for n in sifted],
                          errors=[[e, 0, 0] for e in errors], unassigned=0, before_start=0,
                          overflow=False, lost_tags=0, sync_period_ps=1e4,
                          sync_origin_ps=0.0, sync_drift_ppm=0.0)

    def stream(self, frames: int, on_frame: Callable[[FrameStats], object], *, lag: int = 0,
               phase: float = 0.0) -> list[dict[str, float]]:
        """Hand ``frames`` frames to ``on_frame``, each ``lag`` (+ ``phase``) frames late.

        Returns one row per delivered frame: the QBER the frame measured (mean of Z and X)
        and the misalignment at the moment it was delivered.
        """
        if lag < 0 or not 0.0 <= phase < 1.0:
            raise ValueError(f"lag must be >= 0 and phase in [0, 1), got {lag}, {phase}")
        rows = []
        for j in range(frames):
            self.now_s = (j + 1 + lag + phase) * self.frame_s
            stats = self.take_frame(j)
            on_frame(stats)
            rows.append({"time_s": self.now_s, "qber": mean_qber(stats),
                         "misalignment_rad": self.misalignment_now()})
        return rows

    def monitor(self, steps: int, step_s: float,
                tracker: PolarizationTracker | None = None,
                max_track_frames: int = 30) -> list[float]:
        """:func:`~qkdlab.calibration.runtime.monitor_drift` on this link: after every
        ``step_s`` one frame (its QBER, before any correction, is returned), handed to
        ``tracker``; while that searches, frames keep coming (at most
        ``max_track_frames``).  Frames are synchronous: a move applies to the next one."""
        qbers = []
        t = 0.0
        for _ in range(steps):
            t += step_s
            index = round(t / self.frame_s)
            self.now_s = (index + 1) * self.frame_s
            stats = self.take_frame(index)
            qbers.append(mean_qber(stats))
            extra = 0
            if tracker is not None:
                tracker.on_frame(stats)
                while tracker.active and extra < max_track_frames:
                    index += 1
                    self.now_s = (index + 1) * self.frame_s
                    tracker.on_frame(self.take_frame(index))
                    extra += 1
            t = self.now_s
            self.searched_frames += extra
        return qbers
