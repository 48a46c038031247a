"""Safety limits of a station file, checked without touching any instrument.

Every driver that can hurt a person or a device takes a hard limit in its constructor
(the station file's ``init:``): the laser-diode current limit, a detector's bias
maximum, an AWG's largest drive.  The driver refuses values above that limit, but
the limit itself can only be checked against what the *model* can do.  This module
holds the table of model ratings — read from the drivers' own constants, never
restated — and :func:`check_limits`, which refuses a station whose limits exceed them::

    from qkdlab.safety import check_limits

    problems = check_limits("lab.yaml")   # no connection: works without hardware
    for line in problems:
        print(line)                        # "lab.yaml:42: instrument 'spd': ..."

What is checked, per instrument whose driver is (a subclass of) a model in
:data:`MODELS`:

* each limit in ``init:`` is a positive number (one per channel where the model takes a
  list) and at most the model's rating;
* a limit the driver would otherwise default to the model's full range must be stated
  for real hardware (``mock://`` instruments may rely on the defaults);
* settings bounded by a limit — ``parameters: <name>: initial_value`` of the instrument
  and, for the instrument filling the ``laser`` role, ``qkdlab: roles: laser_settings`` —
  lie within it.

The same table tells the HIL test mode (:mod:`qkdlab.testing.hil`) which parameters
``safe_state()`` owns for good: after a light test they stay where the safe state put
them (laser output off, detector bias at 0) instead of being restored.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdlab.station import StationError, StationFile, read_station_file

Rating = Callable[[Mapping[str, Any]], float | None]
"""Model rating of one limit, given the instrument's ``init:`` keywords (None: no fixed one)."""


def _constant(module: str, attribute: str) -> Rating:
    """A rating read from a driver constant (``attribute`` may be ``Class.NAME``)."""

    def rating(_init: Mapping[str, Any]) -> float:
        value: Any = importlib.import_module(module)
        for part in attribute.split("."):
            value = getattr(value, part)
        return float(value)

    return rating


def _awg_peak_limit(init: Mapping[str, Any]) -> float:
    """The 33500B's largest |V| at its load (``load_ohm``, default 50 Ω)."""
    from qkdlab.drivers.keysight.awg33500b import output_peak_limit_v

    return float(output_peak_limit_v(float(init.get("load_ohm", 50.0))))


def _no_rating(_init: Mapping[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class LimitSpec:
    """One hard limit a driver takes in its constructor.

    Attributes:
        key: the constructor keyword (the station file's ``init:`` key).
        what: what it limits, for messages.
        unit: SI unit of the value.
        rating: the model's rating (from the driver's constants); None: no fixed rating.
        rating_source: where the rating comes from (documentation).
        required: must be stated for real hardware: the driver's default is the
            model's full range, not what the connected device (laser diode, SPAD,
            modulator input) tolerates.
        per_channel: the value may be a list, one per channel.
        bounds: settings this limit bounds: parameter names (their ``initial_value``)
            and, for a laser, ``roles: laser_settings`` keys.
    """

    key: str
    what: str
    unit: str
    rating: Rating
    rating_source: str
    required: bool = False
    per_channel: bool = False
    bounds: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelRatings:
    """The safety facts of one driver class."""

    driver: str
    """Fully qualified driver class (as in the station file's ``type:``)."""
    model: str
    limits: tuple[LimitSpec, ...] = ()
    keep_safe: frozenset[str] = field(default_factory=frozenset)
    """Parameters (short names, on the instrument or its channels) that a HIL restore
    leaves as ``safe_state()`` set them: outputs that emit, biases that arm a detector."""


_ITC = "qkdlab.drivers.thorlabs.itc4001"
_ID120 = "qkdlab.drivers.idquantique.id120"
_SNSPD = "qkdlab.drivers.singlequantum.snspd"

MODELS: tuple[ModelRatings, ...] = (
    ModelRatings(
        f"{_ITC}.ThorlabsITC4001", "Thorlabs ITC4001 laser-diode controller",
        (LimitSpec("current_limit_a", "laser-diode current limit", "A",
                   _constant(_ITC, "ITC4001_MAX_CURRENT_A"), f"{_ITC}.ITC4001_MAX_CURRENT_A",
                   required=True, bounds=("current", "current_limit")),),
        keep_safe=frozenset({"output"}),
    ),
    ModelRatings(
        "qkdlab.drivers.oif.itla.OIFITLA", "OIF-ITLA tunable laser",
        # the module's own maximum (OPSH) is read at connection; the driver takes the lower
        (LimitSpec("power_max_w", "optical power maximum", "W", _no_rating,
                   "the module's OPSH register, read at connection", bounds=("power",)),),
        keep_safe=frozenset({"output_enabled"}),
    ),
    ModelRatings(
        f"{_ID120}.IDQID120", "ID Quantique ID120 Si SPAD",
        (LimitSpec("bias_max_v", "detector bias maximum", "V",
                   _constant(_ID120, "IDQID120.BIAS_RATING_V"),
                   f"{_ID120}.IDQID120.BIAS_RATING_V", required=True,
                   bounds=("bias_voltage",)),),
        keep_safe=frozenset({"bias_voltage", "running"}),
    ),
    ModelRatings(
        f"{_SNSPD}.SingleQuantumSNSPD", "Single Quantum SNSPD system",
        (LimitSpec("bias_max_a", "detector bias maximum", "A",
                   _constant(_SNSPD, "SingleQuantumSNSPD.BIAS_RATING_A"),
                   f"{_SNSPD}.SingleQuantumSNSPD.BIAS_RATING_A", required=True,
                   per_channel=True),),
        keep_safe=frozenset({"bias_current", "detectors"}),
    ),
    ModelRatings(
        "qkdlab.drivers.keysight.awg33500b.Keysight33500BPattern",
        "Keysight 33500B/33600A waveform generator",
        (LimitSpec("max_drive_v", "AWG maximum drive at the load", "V", _awg_peak_limit,
                   "qkdlab.drivers.keysight.awg33500b.output_peak_limit_v(load_ohm)",
                   required=True),),
        keep_safe=frozenset({"output"}),
    ),
    ModelRatings("qkdlab.drivers.fpga.pattern_generator.FPGAPatternGenerator",
                 "FPGA BB84 pattern generator", keep_safe=frozenset({"output"})),
    # no limit in the constructor: the driver refuses bias beyond the controller's
    # fixed ±BIAS_LIMIT_V and attenuation outside ATTENUATION_RANGE_DB itself
    ModelRatings("qkdlab.drivers.thorlabs.mbx.ThorlabsMBX", "Thorlabs MBX bias controller + VOA"),
    ModelRatings("qkdlab.drivers.thorlabs.ell14.ThorlabsELL14Compensator",
                 "Thorlabs ELL14 polarization compensator"),
    ModelRatings("qkdlab.drivers.thorlabs.pm100d.ThorlabsPM100D", "Thorlabs PM100D power meter"),
    ModelRatings("qkdlab.drivers.idquantique.time_controller.IDQTimeController",
                 "ID Quantique ID900/ID1000 time controller"),
    ModelRatings("qkdlab.drivers.swabian.timetagger.SwabianTimeTagger",
                 "Swabian Time Tagger"),
    ModelRatings("qkdlab.drivers.picoquant.harp.PicoQuantHarp", "PicoQuant HydraHarp/MultiHarp"),
)
"""Every supported model; the ones with limits or outputs carry them."""

_BY_DRIVER = {m.driver: m for m in MODELS}


def model_for(driver_type: str) -> ModelRatings | None:
    """The ratings of a driver class (``module.Class``), also for subclasses of a model.

    Imports the driver module to follow subclasses; a driver that cannot be imported is
    matched by its name alone (the station loader reports the import problem).
    """
    if driver_type in _BY_DRIVER:
        return _BY_DRIVER[driver_type]
    module_name, _, class_name = driver_type.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return None
    for base in getattr(cls, "__mro__", ()):
        found = _BY_DRIVER.get(f"{base.__module__}.{base.__qualname__}")
        if found is not None:
            return found
    return None


def keep_safe_parameters(instrument: object) -> frozenset[str] | None:
    """Parameters ``safe_state()`` owns on ``instrument``'s model (an instrument or its
    class; None: a model not in :data:`MODELS`)."""
    cls = instrument if isinstance(instrument, type) else type(instrument)
    model = model_for(f"{cls.__module__}.{cls.__qualname__}")
    return None if model is None else model.keep_safe


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _fmt(value: float, unit: str) -> str:
    return f"{value:g} {unit}"


def _initial_values(entry: Mapping[str, Any]) -> dict[str, Any]:
    """``parameters: name: {initial_value: x}`` of an instrument entry."""
    out: dict[str, Any] = {}
    parameters = entry.get("parameters") or {}
    if isinstance(parameters, Mapping):
        for name, spec in parameters.items():
            if isinstance(spec, Mapping) and "initial_value" in spec:
                out[str(name)] = spec["initial_value"]
    return out


def _check_instrument(station: StationFile, name: str, entry: Mapping[str, Any],
                      model: ModelRatings, laser_settings: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    where = f"{station.where(name)}: instrument {name!r} ({model.model})"
    init = entry.get("init") or {}
    if not isinstance(init, Mapping):
        return [f"{where}: 'init' must be a mapping of constructor keywords"]
    is_mock = str(entry.get("address", "")).startswith("mock://")
    for spec in model.limits:
        rating = spec.rating(init)
        rated = "" if rating is None else f" (the model's rating: {_fmt(rating, spec.unit)})"
        if spec.key not in init:
            if spec.required and not is_mock:
                problems.append(
                    f"{where}: no {spec.what}: set 'init: {spec.key}' to what the connected "
                    f"device tolerates{rated}; the driver's default is the model's full range")
            continue
        raw = init[spec.key]
        values = list(raw) if spec.per_channel and isinstance(raw, Sequence) \
            and not isinstance(raw, str) else [raw]
        numbers = [_number(v) for v in values]
        if not values or any(v is None for v in numbers):
            problems.append(f"{where}: {spec.key} = {raw!r} is not a number "
                            f"({spec.what}, in {spec.unit})")
            continue
        for value in (v for v in numbers if v is not None):
            if not value > 0 or math.isinf(value):
                problems.append(f"{where}: {spec.key} = {_fmt(value, spec.unit)} must be "
                                f"> 0 and finite ({spec.what})")
            elif rating is not None and value > rating * (1 + 1e-9):
                problems.append(
                    f"{where}: {spec.key} = {_fmt(value, spec.unit)} is above the model's "
                    f"rating {_fmt(rating, spec.unit)} ({spec.what}; rating from "
                    f"{spec.rating_source})")
        limit = min((v for v in numbers if v is not None), default=math.inf)
        bounded = {**{k: ("parameters", v) for k, v in _initial_values(entry).items()},
                   **{k: ("roles: laser_settings", v) for k, v in laser_settings.items()}}
        for setting in spec.bounds:
            if setting not in bounded:
                continue
            source, value = bounded[setting]
            number = _number(value)
            if number is not None and number > limit * (1 + 1e-9):
                problems.append(
                    f"{where}: {source} {setting} = {_fmt(number, spec.unit)} is above "
                    f"{spec.key} = {_fmt(limit, spec.unit)} ({spec.what})")
    return problems


def check_limits(station_file: str | Path | StationFile) -> list[str]:
    """Problems with the safety limits of a station file; empty when all is safe.

    Reads the file only (no instrument is contacted, no mock started).  Each problem is
    one line naming the file and line, the instrument, the limit and the rating.
    A file that cannot be read at all raises :class:`~qkdlab.station.StationError`.
    """
    station = station_file if isinstance(station_file, StationFile) \
        else read_station_file(station_file)
    roles = station.qkdlab.get("roles")
    if not isinstance(roles, Mapping):
        roles = {}
    laser_name = roles.get("laser")
    laser_settings = roles.get("laser_settings")
    if not isinstance(laser_settings, Mapping):
        laser_settings = {}
    problems: list[str] = []
    for name, entry in station.instruments.items():
        model = model_for(str(entry.get("type", "")))
        if model is None:
            continue
        try:
            problems += _check_instrument(station, name, entry, model,
                                          laser_settings if name == laser_name else {})
        except (ImportError, AttributeError, TypeError, ValueError) as err:
            problems.append(f"{station.where(name)}: instrument {name!r}: cannot check its "
                            f"limits: {type(err).__name__}: {err}")
    return problems


def assert_safe_limits(station_file: str | Path | StationFile) -> None:
    """Raise :class:`~qkdlab.station.StationError` listing every unsafe limit."""
    problems = check_limits(station_file)
    if problems:
        raise StationError("unsafe limits in the station file:\n  " + "\n  ".join(problems))
