"""HIL tolerances: what "sane" means on a given bench, read from ``STATION.hil.yaml``.

Real hardware is judged against the bench's own figures — its dark counts, its power
meter's offset, the QBER its link reaches — so no tolerance lives in code.  They sit
in a YAML file next to the station file (``lab.yaml`` → ``lab.hil.yaml``; another
file with ``--hil-tolerances``), every section and key optional: a HIL test whose
tolerance is missing is skipped and says which key to add.  Unknown sections or keys
and values of the wrong kind are refused with the file and line::

    tagger:
      acquire_s: 0.5               # length of the short acquisition (s)
      dark_rate_cps: [10, 5000]    # per detector channel, light off (cps)
      duration_rel_tol: 0.01       # |block length / asked length - 1|
    spd:
      dark_rate_cps: [0, 5000]     # count rate of each channel as left by the operator
      enabled_rate_cps: [10, 5000] # after enable(), light off (light test)
    power_meter:
      dark_power_w: [-1.0e-9, 1.0e-6]   # reading with the light off (W)
      light_power_w: [1.0e-12, 1.0e-3]  # reading with the laser at test_settings (W)
    laser:
      test_settings: {current: 0.012}   # the low operating point of the on/off test
      current_tol_a: 5.0e-4        # |measured current - setpoint| (A), if the model measures it
    modulator:
      bias_step_v: 0.5             # the bias is moved by this much and back (V)
      bias_tol_v: 0.05             # read-back tolerance (V)
    polarization:
      step: 2.0                    # each actuator moved by this much and back (its unit)
      tol: 0.1                     # read-back tolerance (its unit)
    bb84:
      duration_s: 1.0              # length of the short run (s)
      qber_max: 0.05               # both bases
      detections_min: 1000
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ToleranceError(ValueError):
    """A tolerances file that cannot be used; the message names the file and line."""


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x: Any) -> str | None:
    return None if _is_number(x) and x > 0 else "must be a number > 0"


def _fraction(x: Any) -> str | None:
    return None if _is_number(x) and 0 <= x <= 1 else "must be a number in [0, 1]"


def _count(x: Any) -> str | None:
    return None if _is_number(x) and x >= 0 else "must be a number >= 0"


def _range(x: Any) -> str | None:
    if (isinstance(x, list) and len(x) == 2 and all(_is_number(v) for v in x)
            and x[0] <= x[1]):
        return None
    return "must be [low, high], two numbers with low <= high"


def _settings(x: Any) -> str | None:
    if isinstance(x, Mapping) and x and all(isinstance(k, str) and _is_number(v)
                                            for k, v in x.items()):
        return None
    return "must map parameter names to numbers, e.g. {current: 0.012}"


Check = Callable[[Any], str | None]

SCHEMA: dict[str, dict[str, Check]] = {
    "tagger": {"acquire_s": _positive, "dark_rate_cps": _range, "duration_rel_tol": _fraction},
    "spd": {"dark_rate_cps": _range, "enabled_rate_cps": _range},
    "power_meter": {"dark_power_w": _range, "light_power_w": _range},
    "laser": {"test_settings": _settings, "current_tol_a": _positive},
    "modulator": {"bias_step_v": _positive, "bias_tol_v": _positive},
    "polarization": {"step": _positive, "tol": _positive},
    "bb84": {"duration_s": _positive, "qber_max": _fraction, "detections_min": _count},
}
"""Section -> key -> check (None when the value is acceptable, else what is wrong)."""


def _line(mapping: Any, key: Any) -> int:
    try:
        return int(mapping.lc.key(key)[0]) + 1
    except (AttributeError, KeyError, TypeError):
        return 0


def _plain(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    for kind in (bool, int, float, str):
        if isinstance(node, kind):
            return kind(node)
    return node


@dataclass(frozen=True)
class Tolerances:
    """Validated tolerances of one bench."""

    path: Path
    values: dict[str, dict[str, Any]] = field(default_factory=dict)

    def find(self, section: str, key: str) -> Any:
        """The value, or None if the file does not give it."""
        if key not in SCHEMA.get(section, {}):
            raise KeyError(f"{section}.{key} is not a known HIL tolerance")
        return self.values.get(section, {}).get(key)

    def missing(self, section: str, key: str) -> str:
        """The message of a test skipped for want of ``section.key``."""
        return f"no HIL tolerance '{section}: {key}' in {self.path}; add it to run this test"


def sibling_path(station: str | Path) -> Path:
    """``lab.yaml`` -> ``lab.hil.yaml`` (same folder)."""
    station = Path(station)
    return station.with_name(f"{station.stem}.hil.yaml")


def load_tolerances(path: str | Path) -> Tolerances:
    """Read and check a tolerances file; :class:`ToleranceError` names file and line."""
    import ruamel.yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ToleranceError(f"{path}: cannot read HIL tolerances: {err.strerror}") from err
    try:
        data: Any = ruamel.yaml.YAML(typ="rt").load(text)
    except ruamel.yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ToleranceError(f"{path}{at}: not valid YAML: {getattr(err, 'problem', err)}") \
            from err
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ToleranceError(f"{path}: HIL tolerances are a mapping of sections "
                             f"({', '.join(SCHEMA)})")
    values: dict[str, dict[str, Any]] = {}
    for section, body in data.items():
        where = f"{path}:{_line(data, section)}"
        if section not in SCHEMA:
            raise ToleranceError(f"{where}: unknown section {section!r} "
                                 f"(known: {', '.join(SCHEMA)})")
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise ToleranceError(f"{where}: section {section!r} must be a mapping")
        checks = SCHEMA[str(section)]
        for key, raw in body.items():
            at = f"{path}:{_line(body, key)}"
            if key not in checks:
                raise ToleranceError(f"{at}: unknown key {key!r} in {section!r} "
                                     f"(known: {', '.join(checks)})")
            value = _plain(raw)
            problem = checks[str(key)](value)
            if problem:
                raise ToleranceError(f"{at}: {section}.{key} = {value!r} {problem}")
            values.setdefault(str(section), {})[str(key)] = value
    return Tolerances(path=path, values=values)
