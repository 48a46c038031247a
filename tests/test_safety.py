"""Safety limits of station files, checked against model ratings without connecting."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from qkdlab.drivers.idquantique.id120 import IDQID120
from qkdlab.drivers.keysight.awg33500b import output_peak_limit_v
from qkdlab.drivers.singlequantum.snspd import SingleQuantumSNSPD
from qkdlab.drivers.thorlabs.itc4001 import ITC4001_MAX_CURRENT_A, ThorlabsITC4001
from qkdlab.safety import MODELS, assert_safe_limits, check_limits, keep_safe_parameters
from qkdlab.station import StationError, read_station_file

REPO = Path(__file__).resolve().parents[1]
LAB_TEMPLATE = REPO / "examples" / "station_lab.yaml"

ID120 = "qkdlab.drivers.idquantique.id120.IDQID120"
ITC = "qkdlab.drivers.thorlabs.itc4001.ThorlabsITC4001"
SNSPD = "qkdlab.drivers.singlequantum.snspd.SingleQuantumSNSPD"
AWG = "qkdlab.drivers.keysight.awg33500b.Keysight33500BPattern"


def station(tmp_path: Path, body: str, name: str = "lab.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_detector_bias_above_the_rating_is_refused(tmp_path: Path) -> None:
    path = station(tmp_path, f"""\
        instruments:
          laser:
            type: {ITC}
            address: USB0::0x1313::0x804A::M1::INSTR
            init: {{current_limit_a: 0.05}}
          spad:
            type: {ID120}
            address: USB0::0x1DDC::0x0330::S1::INSTR
            init:
              bias_max_v: 300
        """)

    problems = check_limits(path)

    assert len(problems) == 1
    message = problems[0]
    assert message.startswith(f"{path}:6: instrument 'spad'")  # file, line, instrument
    assert "bias_max_v = 300 V" in message                       # the limit
    assert f"rating {IDQID120.BIAS_RATING_V:g} V" in message      # the rating
    with pytest.raises(StationError, match="bias_max_v = 300 V"):
        assert_safe_limits(path)


def test_limits_at_or_below_the_rating_pass(tmp_path: Path) -> None:
    path = station(tmp_path, f"""\
        instruments:
          spad:
            type: {ID120}
            address: USB0::0x1DDC::0x0330::S1::INSTR
            init: {{bias_max_v: {IDQID120.BIAS_RATING_V}}}
          laser:
            type: {ITC}
            address: USB0::0x1313::0x804A::M1::INSTR
            init: {{current_limit_a: {ITC4001_MAX_CURRENT_A}}}
        """)
    assert check_limits(path) == []


def test_the_lab_template_is_safe_and_lists_every_supported_model() -> None:
    assert check_limits(LAB_TEMPLATE) == []
    types = {entry["type"] for entry in read_station_file(LAB_TEMPLATE).instruments.values()}
    assert {model.driver for model in MODELS} <= types


def test_checking_never_connects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("check_limits must not connect")

    monkeypatch.setattr("qkdlab.station.connect_instrument", refuse)
    monkeypatch.setattr(ThorlabsITC4001, "__init__", refuse)
    path = station(tmp_path, f"""\
        instruments:
          laser:
            type: {ITC}
            address: TCPIP::192.0.2.1::5025::SOCKET
            init: {{current_limit_a: 2.0}}
        """)
    assert len(check_limits(path)) == 1


def test_ratings_are_the_drivers_own_constants(tmp_path: Path) -> None:
    path = station(tmp_path, f"""\
        instruments:
          laser:
            type: {ITC}
            address: USB0::0x1313::0x804A::M1::INSTR
            init: {{current_limit_a: {ITC4001_MAX_CURRENT_A * 1.01}}}
          snspd:
            type: {SNSPD}
            address: tcp://10.0.0.5:12000
            init: {{bias_max_a: [10.0e-6, {SingleQuantumSNSPD.BIAS_RATING_A * 1.01}]}}
          awg:
            type: {AWG}
            address: TCPIP::10.0.0.6::5025::SOCKET
            init: {{max_drive_v: {output_peak_limit_v(50.0) * 1.01}, load_ohm: 50}}
        """)
    problems = "\n".join(check_limits(path))
    assert f"rating {ITC4001_MAX_CURRENT_A:g} A" in problems
    assert f"rating {SingleQuantumSNSPD.BIAS_RATING_A:g} A" in problems
    assert f"rating {output_peak_limit_v(50.0):g} V" in problems
    assert len(problems.splitlines()) == 3


def test_awg_rating_follows_its_load(tmp_path: Path) -> None:
    path = station(tmp_path, f"""\
        instruments:
          awg:
            type: {AWG}
            address: TCPIP::10.0.0.6::5025::SOCKET
            init: {{max_drive_v: 8.0, load_ohm: .inf}}
        """)
    assert check_limits(path) == []  # into high impedance the 33500B reaches 10 V


def test_settings_above_a_limit_are_refused(tmp_path: Path) -> None:
    path = station(tmp_path, f"""\
        qkdlab:
          roles:
            laser: laser
            laser_settings: {{current: 0.08}}
        instruments:
          laser:
            type: {ITC}
            address: USB0::0x1313::0x804A::M1::INSTR
            init: {{current_limit_a: 0.05}}
            parameters:
              current_limit: {{initial_value: 0.06}}
          spad:
            type: {ID120}
            address: USB0::0x1DDC::0x0330::S1::INSTR
            init: {{bias_max_v: 200}}
            parameters:
              bias_voltage: {{initial_value: 210}}
        """)
    problems = check_limits(path)
    assert any("roles: laser_settings current = 0.08 A is above current_limit_a = 0.05 A" in p
               for p in problems), problems
    assert any("parameters current_limit = 0.06 A" in p for p in problems), problems
    assert any("parameters bias_voltage = 210 V is above bias_max_v = 200 V" in p
               for p in problems), problems
    assert len(problems) == 3


def test_hardware_must_state_its_limits_mocks_may_not(tmp_path: Path) -> None:
    path = station(tmp_path, f"""\
        instruments:
          spad:
            type: {ID120}
            address: USB0::0x1DDC::0x0330::S1::INSTR
          spad_twin:
            type: {ID120}
            address: mock://idquantique/id120
        """)
    problems = check_limits(path)
    assert len(problems) == 1
    assert "instrument 'spad' " in problems[0]
    assert "set 'init: bias_max_v'" in problems[0]


def test_not_a_number_and_not_positive_are_refused(tmp_path: Path) -> None:
    path = station(tmp_path, f"""\
        instruments:
          spad:
            type: {ID120}
            address: USB0::0x1DDC::0x0330::S1::INSTR
            init: {{bias_max_v: high}}
          laser:
            type: {ITC}
            address: USB0::0x1313::0x804A::M1::INSTR
            init: {{current_limit_a: 0}}
        """)
    problems = check_limits(path)
    assert any("bias_max_v = 'high' is not a number" in p for p in problems), problems
    assert any("current_limit_a = 0 A must be > 0" in p for p in problems), problems


def test_a_subclass_of_a_model_is_held_to_its_rating(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_bench_drivers.py").write_text(
        "from qkdlab.drivers.idquantique.id120 import IDQID120\n\n\n"
        "class MyID120(IDQID120):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = station(tmp_path, """\
        instruments:
          spad:
            type: my_bench_drivers.MyID120
            address: USB0::0x1DDC::0x0330::S1::INSTR
            init: {bias_max_v: 251}
        """)
    problems = check_limits(path)
    assert len(problems) == 1
    assert "above the model's rating 250 V" in problems[0]


def test_what_a_hil_restore_leaves_safe() -> None:
    class Unknown:
        pass

    assert keep_safe_parameters(ThorlabsITC4001) == frozenset({"output"})
    assert keep_safe_parameters(IDQID120) == frozenset({"bias_voltage", "running"})
    assert keep_safe_parameters(Unknown()) is None
