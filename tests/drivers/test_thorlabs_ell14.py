"""Thorlabs ELL14 waveplate compensator: exact bytes, the mock bus over TCP, the bench physics."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from qkdlab.drivers.roles import PolarizationController
from qkdlab.drivers.thorlabs.ell14 import (
    ELL14CommunicationError,
    ELL14StatusError,
    ThorlabsELL14Compensator,
)
from qkdlab.mock_instruments.bench import Bench, optics
from qkdlab.mock_instruments.server import Connection, SerialSocketServer, TcpServer
from qkdlab.mock_instruments.thorlabs.ell14 import (
    PULSES_PER_REV,
    ELL14Bus,
    retarder_rotation,
    serve,
)


# -- 1. exact bytes on the wire (a scripted peer on the serial-over-TCP transport) --------
class ScriptedBytesServer(TcpServer):
    """Expects exactly the scripted host messages (no terminator) and sends the replies."""

    def __init__(self, script: Sequence[tuple[bytes, bytes]]) -> None:
        super().__init__("scripted-ell14")
        self.script = list(script)
        self.position = 0
        self.mismatch: str | None = None

    @property
    def address(self) -> str:
        return f"socket://{self.host}:{self.port}"

    def serve(self, conn: Connection) -> None:
        buffer = b""
        while self.mismatch is None:
            data = conn.recv()
            if data is None:
                return
            buffer += data
            while buffer and self.mismatch is None:
                if self.position >= len(self.script):
                    self.mismatch = f"unexpected extra bytes {buffer!r}"
                    return
                expected, reply = self.script[self.position]
                wrong = f"step {self.position}: expected {expected!r}, got {buffer!r}"
                if len(buffer) < len(expected):
                    if not expected.startswith(buffer):
                        self.mismatch = wrong
                    break
                if not buffer.startswith(expected):
                    self.mismatch = wrong
                    return
                buffer = buffer[len(expected) :]
                self.position += 1
                if reply:
                    conn.send(reply)

    def check_complete(self) -> None:
        deadline = time.monotonic() + 1.0
        while self.mismatch is None and self.position < len(self.script):
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        assert self.mismatch is None, self.mismatch
        assert self.position == len(self.script), f"stopped at step {self.position}"


def ident(address: str) -> tuple[bytes, bytes]:
    record = "0E" "11405170" "2023" "17" "0" "1" "0168" "00023000"  # ELL14, 143360 pulses/rev
    return f"{address}in".encode(), f"{address}IN{record}\r\n".encode()


@pytest.fixture
def scripted() -> Iterator[list[ScriptedBytesServer]]:
    servers: list[ScriptedBytesServer] = []
    yield servers
    for server in servers:
        server.stop()


def run_script(
    servers: list[ScriptedBytesServer], script: list[tuple[bytes, bytes]], **kwargs: object
) -> tuple[ThorlabsELL14Compensator, ScriptedBytesServer]:
    server = ScriptedBytesServer(script)
    server.start()
    servers.append(server)
    kwargs.setdefault("addresses", ("0",))
    kwargs.setdefault("waveplates", ("hwp",))
    pc = ThorlabsELL14Compensator("dut", server.address, timeout=1.0, **kwargs)
    return pc, server


def test_construction_reads_each_mount_identity(scripted: list[ScriptedBytesServer]) -> None:
    script = [ident("0"), ident("1"), ident("2")]
    pc, server = run_script(scripted, script, addresses=("0", "1", "2"),
                            waveplates=("qwp", "hwp", "qwp"))
    server.check_complete()
    assert isinstance(pc, PolarizationController)
    assert pc.get_idn() == {"vendor": "Thorlabs", "model": "ELL14 x3",
                            "serial": "11405170,11405170,11405170", "firmware": "17,17,17"}
    assert [m.pulses_per_rev for m in pc.mounts] == [143360] * 3


def test_exact_messages_for_every_parameter(scripted: list[ScriptedBytesServer]) -> None:
    script = [
        ident("0"),
        (b"0gp", b"0PO00008C00\r\n"),  # 35840 pulses = 90°
        (b"0gp", b"0PO00008C00\r\n"),  # the ramp starts from a fresh read
        (b"0ma0000A000", b"0PO0000A000\r\n"),  # 40960 pulses = 102.857°, one step from 90°
        (b"0gj", b"0GJ00002300\r\n"),
        (b"0sj00001C00", b"0GS00\r\n"),
        (b"0go", b"0HO00000000\r\n"),
        (b"0so00000E00", b"0GS00\r\n"),
        (b"0gv", b"0GV64\r\n"),
        (b"0sv32", b"0GS00\r\n"),
        (b"0gs", b"0GS00\r\n"),
        (b"0ho0", b"0PO00000000\r\n"),
        (b"0mrFFFFF200", b"0POFFFFF200\r\n"),
        (b"0fw", b"0PO00002300\r\n"),
        (b"0bw", b"0PO00000000\r\n"),
    ]
    pc, server = run_script(scripted, script, max_step_deg=20.0)
    mount = pc.mount0
    assert mount.angle() == pytest.approx(90.0)
    mount.angle(40960 * 360 / PULSES_PER_REV)  # 102.857…°: within one 20° step
    assert mount.jog_step() == pytest.approx(22.5)
    mount.jog_step(18.0)  # 7168 pulses
    assert mount.home_offset() == 0.0
    mount.home_offset(9.0)  # 3584 pulses
    assert mount.velocity() == 100
    mount.velocity(50)
    assert mount.status_code() == 0
    assert mount.home() == 0.0
    assert mount.move_relative(-9.0) == pytest.approx(351.0)  # read back in [0, 360)
    assert mount.jog_forward() == pytest.approx(22.5)
    assert mount.jog_backward() == 0.0
    server.check_complete()


def test_a_large_change_ramps_in_bounded_steps(scripted: list[ScriptedBytesServer]) -> None:
    pulses = [round(deg * PULSES_PER_REV / 360) for deg in (10.0, 20.0, 30.0)]
    script = [ident("0"), (b"0gp", b"0PO00000000\r\n")] + [
        (f"0ma{p:08X}".encode(), f"0PO{p:08X}\r\n".encode()) for p in pulses
    ]
    pc, server = run_script(scripted, script, max_step_deg=10.0)
    pc.mount0.angle(30.0)
    server.check_complete()
    assert pulses == [0x0F8E, 0x1F1C, 0x2EAB]


def test_status_error_names_mount_and_message(scripted: list[ScriptedBytesServer]) -> None:
    script = [ident("0"), (b"0sv32", b"0GS04\r\n")]
    pc, server = run_script(scripted, script)
    with pytest.raises(ELL14StatusError, match=r"dut: mount 0 answered '0sv32' with status 4 "
                       r"\(value out of range\)") as info:
        pc.mount0.velocity(50)
    assert (info.value.address, info.value.code) == ("0", 4)
    server.check_complete()


def test_moves_wait_out_busy_and_other_modules(scripted: list[ScriptedBytesServer]) -> None:
    script = [ident("0"), (b"0ho0", b"1GS00\r\n0GS09\r\n0PO00000000\r\n")]
    pc, server = run_script(scripted, script)
    assert pc.mount0.home() == 0.0
    server.check_complete()


# -- 2. through the mock bus over the serial-over-TCP transport -----------------------------
@dataclass
class Rig:
    pc: ThorlabsELL14Compensator
    bus: ELL14Bus
    server: SerialSocketServer


@pytest.fixture
def rig() -> Iterator[Rig]:
    server = serve("ell14", None, {})
    server.start()
    pc = ThorlabsELL14Compensator("dut", server.address, timeout=1.0, max_step_deg=30.0)
    bus = server.protocol
    assert isinstance(bus, ELL14Bus)
    try:
        yield Rig(pc, bus, server)
    finally:
        pc.close()
        server.stop()


def test_identity_and_snapshot(rig: Rig) -> None:
    idn = rig.pc.get_idn()
    assert idn["model"] == "ELL14 x3"
    assert idn["serial"] == "11405170,11405171,11405172"
    snap = rig.pc.snapshot(update=True)
    angle = snap["submodules"]["mount1"]["parameters"]["angle"]
    assert (angle["value"], angle["unit"]) == (0.0, "deg")
    assert snap["submodules"]["mount1"]["parameters"]["velocity"]["unit"] == "%"


@pytest.mark.parametrize(
    ("name", "value", "unit"),
    [("angle", 123.75, "deg"), ("jog_step", 5.0, "deg"), ("home_offset", 12.5, "deg"),
     ("velocity", 60, "%")],
)
def test_round_trips(rig: Rig, name: str, value: float, unit: str) -> None:
    parameter = rig.pc.mount2.parameters[name]
    assert parameter.unit == unit
    parameter.set(value)
    parameter.cache.invalidate()
    assert parameter.get() == pytest.approx(value, abs=360 / PULSES_PER_REV)
    state = rig.bus.mounts["2"]
    stored = {"angle": state.angle_deg, "jog_step": state.jog * 360 / PULSES_PER_REV,
              "home_offset": state.home_offset * 360 / PULSES_PER_REV,
              "velocity": state.velocity_pct}[name]
    assert stored == pytest.approx(value, abs=360 / PULSES_PER_REV)


def test_role_actuators_round_trip(rig: Rig) -> None:
    rig.pc.set_actuators([10.0, 200.5, 359.0])
    assert rig.pc.get_actuators() == pytest.approx([10.0, 200.5, 359.0], abs=0.003)
    assert rig.bus.angles_deg() == pytest.approx([10.0, 200.5, 359.0], abs=0.003)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda pc: pc.set_actuators([10.0, 400.0, 5.0]),
         r"400\.0 is invalid: must be between 0\.0 and 360\.0.*dut_mount1.angle"),
        (lambda pc: pc.set_actuators([10.0, -1.0, 5.0]), r"must be between 0\.0 and 360\.0"),
        (lambda pc: pc.set_actuators([10.0, 20.0]), r"dut: set_actuators needs 3 angles"),
        (lambda pc: pc.mount0.velocity(101), r"101 is invalid.*dut_mount0.velocity"),
        (lambda pc: pc.mount0.move_relative(45.0), r"exceeds the step bound of 30\.0 deg"),
    ],
)
def test_validators_raise_before_anything_is_written(rig: Rig, call: object, match: str) -> None:
    before = list(rig.bus.received)
    with pytest.raises(ValueError, match=match):
        call(rig.pc)  # type: ignore[operator]
    assert rig.bus.received == before
    assert rig.bus.angles_deg() == [0.0, 0.0, 0.0]


def test_hard_limits_are_configurable() -> None:
    server = serve("ell14", None, {"addresses": "3", "plates": "hwp"})
    server.start()
    try:
        pc = ThorlabsELL14Compensator("narrow", server.address, addresses=("3",),
                                      waveplates=("hwp",), angle_limits_deg=(0.0, 180.0))
        with pytest.raises(ValueError, match=r"between 0\.0 and 180\.0"):
            pc.set_actuators([190.0])
        pc.set_actuators([179.0])
        assert pc.get_actuators() == pytest.approx([179.0], abs=0.003)
        pc.close()
    finally:
        server.stop()


def test_moves_ramp_in_bounded_steps_from_the_true_angle(rig: Rig) -> None:
    mount, state = rig.pc.mount0, rig.bus.mounts["0"]
    mount.angle.inter_delay = 0.01
    start = time.perf_counter()
    mount.angle(100.0)
    elapsed = time.perf_counter() - start
    steps = np.diff([0.0] + [p * 360 / PULSES_PER_REV for p in state.moves])
    assert len(state.moves) == 4
    assert np.all(np.abs(steps) <= 30.0 + 360 / PULSES_PER_REV)  # bound ± one pulse
    assert state.angle_deg == pytest.approx(100.0, abs=0.003)
    assert elapsed >= 3 * 0.01
    state.position = round(50.0 * PULSES_PER_REV / 360)  # moved by hand: no jump from 100°
    state.moves.clear()
    mount.angle(40.0)
    assert [round(p * 360 / PULSES_PER_REV, 2) for p in state.moves] == [40.0]


def test_home_is_the_reset(rig: Rig) -> None:
    rig.pc.set_actuators([30.0, 60.0, 90.0])
    for mount in rig.pc.mounts:
        assert mount.home() == 0.0
    assert rig.bus.angles_deg() == [0.0, 0.0, 0.0]
    assert rig.pc.get_actuators() == [0.0, 0.0, 0.0]


def test_device_errors_are_reported(rig: Rig) -> None:
    with pytest.raises(ELL14StatusError, match=r"'1xx' with status 3 \(command error"):
        rig.pc.transact("1", "xx", "", ("PO",))
    assert rig.pc.mount1.status_code() == 3  # the last error, read and cleared
    assert rig.pc.mount1.status_code() == 0
    with pytest.raises(ELL14StatusError, match="value out of range"):
        rig.pc.transact("2", "sv", "FF", ("GS",))
    assert rig.bus.mounts["2"].velocity_pct == 100


def test_safe_state_moves_nothing(rig: Rig) -> None:
    rig.pc.set_actuators([12.0, 34.0, 56.0])
    moves = [len(m.moves) for m in rig.bus.mounts.values()]
    rig.pc.safe_state()
    rig.pc.safe_state()
    assert [len(m.moves) for m in rig.bus.mounts.values()] == moves
    assert rig.bus.angles_deg() == pytest.approx([12.0, 34.0, 56.0], abs=0.003)


def test_timeout_names_instrument_and_message(rig: Rig) -> None:
    rig.pc.timeout_s = 0.3
    rig.server.faults.delay_replies(0.5)
    with pytest.raises(ELL14CommunicationError, match=r"dut: no reply to '1gp' within 0\.3 s"):
        rig.pc.mount1.angle.get()
    rig.server.faults.clear()
    time.sleep(0.3)  # the late reply went to the dropped port, not to the next command
    rig.pc.mount1.angle(15.0)
    assert rig.pc.mount1.angle.get() == pytest.approx(15.0, abs=0.003)


def test_garbage_names_instrument_and_message(rig: Rig) -> None:
    rig.server.faults.send_garbage(1)
    with pytest.raises(ELL14CommunicationError, match=r"dut: unreadable reply .* to '0gv'"):
        rig.pc.mount0.velocity.get()
    assert rig.pc.mount0.velocity.get() == 100


def test_reconnect_after_a_dropped_link(rig: Rig) -> None:
    rig.pc.set_actuators([5.0, 6.0, 7.0])
    rig.server.faults.drop_connection(refuse_for_s=5.0)
    back = threading.Timer(0.3, rig.server.faults.clear)
    back.start()
    try:
        # the link is gone: the driver reconnects by itself and repeats the message
        assert rig.pc.get_actuators() == pytest.approx([5.0, 6.0, 7.0], abs=0.003)
    finally:
        back.join()
    assert rig.pc.reconnect_count >= 1


def test_reconnect_gives_up_with_a_clear_error(rig: Rig) -> None:
    rig.server.faults.drop_connection(refuse_for_s=5.0)
    with pytest.raises(ELL14CommunicationError, match="dut: could not reconnect"):
        rig.pc.reconnect(timeout_s=0.2)


def test_serve_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="colour"):
        serve("ell14", None, {"colour": "red"})
    with pytest.raises(ValueError, match="unknown waveplate"):
        serve("ell14", None, {"plates": "qwp,lens,qwp"})


# -- 3. physics: the plates set Bob's rotation, and can undo the fibre -------------------------
def test_mount_angles_set_the_bench_rotation() -> None:
    bench = Bench(seed=2)
    server = serve("ell14", bench, {"axis_offsets_deg": "0,5,0"})
    server.start()
    try:
        pc = ThorlabsELL14Compensator("pc", server.address)
        assert np.allclose(bench.bob.pc_rotation, retarder_rotation(0.0, np.pi / 2)
                           @ retarder_rotation(np.radians(5.0), np.pi)
                           @ retarder_rotation(0.0, np.pi / 2))
        pc.set_actuators([0.0, 40.0, 0.0])
        # HWP at 45° (axis S2) between two QWPs at 0° (axis S1): R = R1(π/2)·R2(π)·R1(π/2)
        expected = (optics.rotation_about_axis(0, np.pi / 2) @ optics.rotation_about_axis(1, np.pi)
                    @ optics.rotation_about_axis(0, np.pi / 2))
        assert np.allclose(bench.bob.pc_rotation, expected, atol=1e-4)
        # H: unchanged by the QWP on its axis, turned to D by the HWP at 22.5° (axis 45° on
        # the sphere), then to circular (S3) by the second QWP
        pc.set_actuators([0.0, 17.5, 0.0])  # 17.5° + 5° mounting offset = 22.5°
        h_out = bench.bob.pc_rotation @ np.array([1.0, 0.0, 0.0])
        assert np.allclose(h_out, [0.0, 0.0, 1.0], atol=1e-4)
        pc.close()
    finally:
        server.stop()


def closed_form_qber(
    bench: Bench, fibre: npt.NDArray[np.float64] | None = None
) -> tuple[float, float]:
    """(Z, X) QBER from the bench's optics: states through R_c·R_fibre, e_mis contrast."""
    fibre = bench.channel_rotation() if fibre is None else fibre
    total = bench.bob.pc_rotation @ fibre
    at_bob = optics.alice_states(tuple(bench.alice.prep_error_rad)) @ total.T
    p = optics.projection_probabilities(at_bob, optics.analyser_vectors(4, 0),
                                        bench.bob.misalignment)
    wrong = [1, 0, 3, 2]  # H→V detector, V→H, D→A, A→D
    err = np.array([p[s, wrong[s]] / (p[s, s] + p[s, wrong[s]]) for s in range(4)])
    return float(err[:2].mean()), float(err[2:].mean())


def measured_qber(bench: Bench, duration_s: float) -> tuple[float, int]:
    """Sifted QBER of photon clicks in an acquisition (ground truth symbols)."""
    tags = bench.acquire(duration_s)
    photon = tags.origin == 0
    detector = np.searchsorted(np.asarray(bench.tagger.detector_channels),
                               tags.channel[photon])
    basis, bit, _ = bench.alice_symbols(tags.pulse_index[photon])
    sifted = basis == detector // 2
    errors = bit[sifted] != (detector[sifted] % 2)
    return float(errors.mean()), int(sifted.sum())


def coordinate_search(pc: ThorlabsELL14Compensator, cost: object) -> list[float]:
    """Cyclic coarse scans (15° grid over a half turn), then a shrinking pattern search."""
    evaluate = cost  # callable: list[float] -> float, setting the actuators through pc
    angles = [0.0, 0.0, 0.0]
    best = evaluate(angles)  # type: ignore[operator]
    for _ in range(6):
        improved = False
        for k in range(3):
            for grid in np.arange(0.0, 180.0, 15.0):
                trial = list(angles)
                trial[k] = float(grid)
                value = evaluate(trial)  # type: ignore[operator]
                if value < best - 1e-12:
                    best, angles, improved = value, trial, True
        if not improved:
            break
    step = 7.5
    while step > 0.1:
        improved = False
        for k in range(3):
            for sign in (1.0, -1.0):
                trial = list(angles)
                trial[k] = (trial[k] + sign * step) % 180.0
                value = evaluate(trial)  # type: ignore[operator]
                if value < best - 1e-12:
                    best, angles, improved = value, trial, True
        if not improved:
            step /= 2
    return angles


def random_fibre(bench: Bench) -> npt.NDArray[np.float64]:
    """Let the fibre diffuse for 50 ms (laser off), then freeze it: a random rotation."""
    bench.channel.pol_diffusion_rad2_per_s = 100.0
    bench.alice.laser_on = False
    bench.acquire(0.05)
    fibre = bench.channel_rotation()
    bench.channel.pol_diffusion_rad2_per_s = 0.0
    bench.alice.laser_on = True
    return fibre


@pytest.mark.parametrize("seed", [3, 11])
def test_optimiser_on_the_actuators_undoes_a_random_fibre_rotation(seed: int) -> None:
    bench = Bench(seed=seed)
    fibre = random_fibre(bench)
    e_mis = bench.bob.misalignment
    server = serve("ell14", bench, {"axis_offsets_deg": "3,-7,11"})  # unknown mounting offsets
    server.start()
    try:
        pc = ThorlabsELL14Compensator("pc", server.address, max_step_deg=180.0)
        pc.set_actuators([0.0, 0.0, 0.0])
        before = closed_form_qber(bench)
        assert max(before) > 0.1  # the fibre scrambles at least one basis
        q_before, _ = measured_qber(bench, 0.01)

        def cost(angles: list[float]) -> float:
            pc.set_actuators(angles)
            return sum(closed_form_qber(bench, fibre))

        angles = coordinate_search(pc, cost)
        pc.set_actuators(angles)
        q_z, q_x = closed_form_qber(bench)
        assert q_z == pytest.approx(e_mis, abs=0.003)
        assert q_x == pytest.approx(e_mis, abs=0.003)
        # the plates really undo the fibre: R_c·R_fibre ≈ identity
        assert np.allclose(bench.bob.pc_rotation @ fibre, np.eye(3), atol=0.08)
        # and Bob's measured QBER (photon clicks of a 20 ms acquisition) follows
        q_after, n_sifted = measured_qber(bench, 0.02)
        assert n_sifted > 1000
        assert q_after == pytest.approx(e_mis, abs=0.01)
        assert q_before > q_after + 0.05
        pc.close()
    finally:
        server.stop()
