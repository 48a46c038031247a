"""Load a station file: a QCoDeS station YAML plus a ``qkdlab:`` section.

The file is a plain QCoDeS station (``instruments: name: {type, address, init, ...}``)
with two additions, both removed before QCoDeS sees the file:

* a top-level ``qkdlab:`` mapping, for now ``mock_bench: {seed: N, ...bench overrides}``;
* addresses of the form ``mock://vendor/model?opt=value``: such an instrument is served
  by the mock bench, started in-process here, and the address is replaced by the
  mock's real transport address before the driver connects.

Every problem becomes one :class:`StationError` line naming the file, the line, the
instrument or key and what is wrong.  :func:`open_station` checks the whole file —
structure and value types, roles, driver imports, mock addresses and the safety limits
(:func:`qkdlab.safety.check_limits`) — before it starts a mock or connects anything, and
refuses an instrument that does not answer its identity query.
"""

from __future__ import annotations

import importlib
import io
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qcodes.instrument import Instrument
    from qcodes.station import Station

    from qkdlab.mock_instruments.launcher import MockLauncher

log = logging.getLogger(__name__)

# keys QCoDeS' station schema accepts in an instrument entry
INSTRUMENT_KEYS = frozenset(
    {"type", "driver", "address", "port", "enable_forced_reconnect", "init",
     "add_parameters", "parameters"}
)
QKDLAB_KEYS = frozenset({"mock_bench", "roles", "description", "bb84", "calibration"})
# roles that are not instrument names
ROLE_SETTINGS = frozenset({"detectors", "laser_settings", "marker_channel",
                           "attenuation_db"})
_SI_PREFIX = {"p": 1e-12, "n": 1e-9, "u": 1e-6, "µ": 1e-6, "μ": 1e-6, "m": 1e-3, "": 1.0,
              "k": 1e3, "M": 1e6, "G": 1e9}
_SI_UNITS = ("Hz", "A", "V", "W", "s", "m")
# a key's unit suffix -> (SI unit, size of the key's unit in it)
_KEY_UNITS = {"_hz": ("Hz", 1.0), "_ps": ("s", 1e-12), "_s": ("s", 1.0), "_km": ("m", 1e3),
              "_m": ("m", 1.0), "_a": ("A", 1.0), "_v": ("V", 1.0), "_w": ("W", 1.0)}


class StationError(Exception):
    """A station file that cannot be loaded or an instrument that cannot be reached."""


@dataclass
class StationFile:
    """A parsed station file, addresses not yet resolved."""

    path: Path
    instruments: dict[str, dict[str, Any]]
    qkdlab: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    key_lines: dict[tuple[str, ...], int] = field(default_factory=dict)
    """Line of every mapping key, by its path (``("qkdlab", "bb84", "p_z")``)."""

    def where(self, instrument: str | None = None) -> str:
        """``file:line`` of an instrument entry (or the file) for error messages."""
        line = self.lines.get(instrument or "", 0)
        return f"{self.path}:{line}" if line else str(self.path)

    def where_key(self, *keys: str) -> str:
        """``file:line`` of a key (``where_key("qkdlab", "bb84", "p_z")``), or of its
        closest enclosing key that has a line, or the file."""
        for n in range(len(keys), 0, -1):
            line = self.key_lines.get(tuple(keys[:n]), 0)
            if line:
                return f"{self.path}:{line}"
        return str(self.path)

    @property
    def mock_seed(self) -> int:
        return int(self.qkdlab.get("mock_bench", {}).get("seed", 0))

    def role_instruments(self) -> dict[str, list[str]]:
        """Instrument names each role of ``qkdlab: roles`` names (str or list of str)."""
        out: dict[str, list[str]] = {}
        for role, value in (self.qkdlab.get("roles") or {}).items():
            if role in ROLE_SETTINGS or value is None:
                continue
            out[role] = [value] if isinstance(value, str) else [str(v) for v in value]
        return out

    @property
    def bench_overrides(self) -> dict[str, Any]:
        bench = dict(self.qkdlab.get("mock_bench", {}))
        bench.pop("seed", None)
        return bench


def _plain(node: Any) -> Any:
    """ruamel's commented containers -> plain dicts and lists."""
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    for kind in (bool, int, float, str):  # ruamel's ScalarFloat etc. -> builtins
        if isinstance(node, kind):
            return kind(node)
    return node


def _line(mapping: Any, key: Any) -> int:
    """1-based line of ``key`` in a ruamel mapping (0 if unknown)."""
    try:
        return int(mapping.lc.key(key)[0]) + 1
    except (AttributeError, KeyError, TypeError):
        return 0


def _key_lines(node: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Line of every mapping key below ``node`` (list items by index), by key path."""
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = (*prefix, str(key))
            line = _line(node, key)
            if line:
                out[path] = line
            out.update(_key_lines(value, path))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            try:
                line = int(node.lc.item(i)[0]) + 1  # type: ignore[attr-defined]
            except (AttributeError, KeyError, TypeError, IndexError):
                line = 0
            path = (*prefix, str(i))
            if line:
                out[path] = line
            out.update(_key_lines(value, path))
    return out


def _kind(value: Any) -> str:
    """A YAML-ish name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def is_number(value: Any) -> bool:
    """An int or float from YAML (a boolean is not a number)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def unit_hint(value: Any, key: str = "") -> str:
    """Advice for a value given as a string with a unit (``"14 mA"``), else ``""``.

    Station files take plain numbers in SI units, or in the unit a key's name ends
    with (``window_ps``); the hint gives the number to write.
    """
    if not isinstance(value, str):
        return ""
    prefixes = "".join(_SI_PREFIX)
    match = re.fullmatch(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*"
                         rf"([{prefixes}]?)({'|'.join(_SI_UNITS)})\s*", value)
    if match is None:
        return ""
    number, prefix, unit = match.groups()
    si = float(number) * _SI_PREFIX[prefix]
    target_unit, size = unit, 1.0
    for suffix, (key_unit, key_size) in _KEY_UNITS.items():
        if key.lower().endswith(suffix):
            target_unit, size = key_unit, key_size
            break
    if target_unit != unit:
        return f" (and {unit} is not the unit of {key!r})"
    name = {"_ps": "ps", "_km": "km"}.get(key.lower()[-3:], target_unit)
    return (f"; write a plain number in {name}, without the unit: {value.strip()!r} is "
            f"{si / size:g}")


def read_station_file(path: str | Path) -> StationFile:
    """Parse and check the structure of a station file (no instrument is touched).

    Checks the keys and the types of their values; each problem is a
    :class:`StationError` naming the file, the line and the key.
    """
    import ruamel.yaml

    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else f"not UTF-8 text ({err.reason})"
        raise StationError(f"{path}: cannot read station file: {reason}") from err
    try:
        data: Any = ruamel.yaml.YAML(typ="rt").load(text)
    except ruamel.yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise StationError(f"{path}{at}: not valid YAML: {problem}") from err
    if not isinstance(data, Mapping):
        raise StationError(f"{path}: a station file is a mapping with an 'instruments' key")
    unknown_top = set(data) - {"instruments", "qkdlab"}
    if unknown_top:
        key = sorted(unknown_top, key=str)[0]
        raise StationError(f"{path}:{_line(data, key)}: unknown top-level key {key!r} "
                           "(expected 'instruments' and optionally 'qkdlab')")
    instruments: Any = data.get("instruments")
    if not isinstance(instruments, Mapping) or not instruments:
        at = f":{_line(data, 'instruments')}" if "instruments" in data else ""
        got = f", got {_kind(instruments)}" if "instruments" in data else ""
        raise StationError(f"{path}{at}: no instruments (expected 'instruments:' with "
                           f"entries{got})")
    lines: dict[str, int] = {}
    for name, entry in instruments.items():
        line = _line(instruments, name)
        lines[str(name)] = line
        where = f"{path}:{line}: instrument {name!r}"
        if not str(name).isidentifier():
            raise StationError(f"{where}: name must be a Python identifier")
        if not isinstance(entry, Mapping):
            raise StationError(f"{where}: entry must be a mapping with at least 'type', "
                               f"got {_kind(entry)}")
        unknown = set(entry) - INSTRUMENT_KEYS
        if unknown:
            key = sorted(unknown, key=str)[0]
            key_line = _line(entry, key)
            raise StationError(f"{path}:{key_line}: instrument {name!r}: unknown key {key!r} "
                               f"(allowed: {', '.join(sorted(INSTRUMENT_KEYS))})")
        if "type" not in entry:
            raise StationError(f"{where}: missing 'type' (the driver class, module.Class)")
        _check_entry_types(path, str(name), entry)
    section: Any = data.get("qkdlab")
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise StationError(f"{path}:{_line(data, 'qkdlab')}: 'qkdlab' must be a mapping, "
                           f"got {_kind(section)}")
    unknown_q = set(section) - QKDLAB_KEYS
    if unknown_q:
        key = sorted(unknown_q, key=str)[0]
        raise StationError(f"{path}:{_line(section, key)}: unknown key {key!r} in "
                           f"'qkdlab' (allowed: {', '.join(sorted(QKDLAB_KEYS))})")
    station = StationFile(path=path, instruments=_plain(instruments), qkdlab=_plain(section),
                          lines=lines, key_lines=_key_lines(data))
    _check_qkdlab_section(station)
    return station


# value types of an instrument entry's keys (QCoDeS' station schema)
_ENTRY_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "type": ((str,), "a string (package.module.Class)"),
    "driver": ((str,), "a string"),
    "address": ((str,), "a string (a VISA resource, a URL or a port)"),
    "port": ((int,), "an integer"),
    "enable_forced_reconnect": ((bool,), "true or false"),
    "init": ((Mapping,), "a mapping of constructor keywords"),
    "parameters": ((Mapping,), "a mapping of parameter names"),
    "add_parameters": ((Mapping,), "a mapping of parameter names"),
}


def _check_entry_types(path: Path, name: str, entry: Any) -> None:
    for key, (types, what) in _ENTRY_TYPES.items():
        if key not in entry or (entry[key] is None and key in ("init", "parameters")):
            continue
        value = entry[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise StationError(f"{path}:{_line(entry, key)}: instrument {name!r}: "
                               f"{key!r} must be {what}, got {_kind(value)} {value!r}")


# value types of the qkdlab section's keys
_SECTION_TYPES: dict[str, tuple[type, str]] = {
    "description": (str, "a string"),
    "mock_bench": (Mapping, "a mapping of bench settings"),
    "roles": (Mapping, "a mapping of role names"),
    "bb84": (Mapping, "a mapping of BB84 settings"),
    "calibration": (Mapping, "a mapping of calibration settings"),
}


def _check_qkdlab_section(station: StationFile) -> None:
    """Types of the ``qkdlab:`` section's values; roles' settings (names, numbers)."""
    section = station.qkdlab
    for key, (kind, what) in _SECTION_TYPES.items():
        value = section.get(key)
        if value is not None and not isinstance(value, kind):
            raise StationError(f"{station.where_key('qkdlab', key)}: 'qkdlab: {key}' must be "
                               f"{what}, got {_kind(value)}")
    seed = (section.get("mock_bench") or {}).get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise StationError(f"{station.where_key('qkdlab', 'mock_bench', 'seed')}: "
                           f"'qkdlab: mock_bench: seed' must be an integer >= 0, got {seed!r}")
    roles = section.get("roles") or {}
    for role, value in roles.items():
        where = station.where_key("qkdlab", "roles", role)
        if role == "laser_settings":
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise StationError(f"{where}: 'qkdlab: roles: laser_settings' must map laser "
                                   f"parameter names to numbers, got {_kind(value)}")
            for name, number in value.items():
                if not is_number(number):
                    raise StationError(
                        f"{station.where_key('qkdlab', 'roles', 'laser_settings', name)}: "
                        f"'qkdlab: roles: laser_settings: {name}' must be a number in SI "
                        f"units, got {_kind(number)} {number!r}{unit_hint(number, name)}")
        elif role == "detectors":
            if not isinstance(value, Mapping):
                raise StationError(f"{where}: 'qkdlab: roles: detectors' must map tagger "
                                   f"channels to [basis, bit], got {_kind(value)}")
            for channel, pair in value.items():
                ok = (isinstance(pair, list) and len(pair) == 2
                      and all(v in (0, 1) and not isinstance(v, bool) for v in pair))
                if not ok or not str(channel).lstrip("+-").isdigit():
                    raise StationError(
                        f"{station.where_key('qkdlab', 'roles', 'detectors', str(channel))}: "
                        f"'qkdlab: roles: detectors': channel {channel!r} must be an integer "
                        f"mapped to [basis, bit], each 0 or 1 (basis 0 = Z, 1 = X), "
                        f"got {pair!r}")
        elif role == "attenuation_db":
            if value is not None and not is_number(value):
                raise StationError(f"{where}: 'qkdlab: roles: attenuation_db' must be a "
                                   f"number (dB), got {_kind(value)} {value!r}"
                                   f"{unit_hint(value, 'attenuation_db')}")
        elif role == "marker_channel":
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise StationError(f"{where}: 'qkdlab: roles: marker_channel' must be a "
                                   f"tagger channel (an integer) or null, got {value!r}")
        elif value is not None and not (
                isinstance(value, str)
                or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise StationError(f"{where}: role {role!r} must name an instrument (or a list "
                               f"of instruments), got {_kind(value)} {value!r}")


def check_roles(station_file: StationFile) -> None:
    """Every role of ``qkdlab: roles`` names instruments of the file."""
    known = sorted(station_file.instruments)
    for role, names in station_file.role_instruments().items():
        for name in names:
            if name not in station_file.instruments:
                raise StationError(
                    f"{station_file.where_key('qkdlab', 'roles', role)}: role {role!r} names "
                    f"{name!r}, which is not an instrument of this station "
                    f"(instruments: {', '.join(known)})")


def check_driver_types(station_file: StationFile) -> None:
    """Import every instrument's driver class; a clear error for the first that fails."""
    for name, entry in station_file.instruments.items():
        import_driver(entry["type"], f"{station_file.where(name)}: instrument {name!r}")


def import_driver(type_path: str, where: str) -> type[Instrument]:
    """Import ``module.Class`` or raise a :class:`StationError` naming ``where``."""
    module_name, _, class_name = str(type_path).rpartition(".")
    if not module_name:
        raise StationError(f"{where}: type {type_path!r} must be 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise StationError(f"{where}: cannot import driver module {module_name!r}: {err}") from err
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise StationError(f"{where}: {module_name!r} has no driver class {class_name!r}")
    return cls


def check_mock_addresses(station_file: StationFile) -> None:
    """Parse every ``mock://`` address; a clear error for one naming no known mock."""
    from qkdlab.mock_instruments.launcher import MockAddress, MockAddressError, is_mock_address

    for name, entry in station_file.instruments.items():
        if is_mock_address(entry.get("address")):
            try:
                MockAddress.parse(str(entry["address"]))
            except MockAddressError as err:
                raise StationError(
                    f"{station_file.where(name)}: instrument {name!r}: {err}"
                ) from err


def resolve_mocks(station_file: StationFile, launcher: MockLauncher) -> dict[str, dict[str, Any]]:
    """Start a mock for every ``mock://`` address; instrument entries with real addresses."""
    from qkdlab.mock_instruments.launcher import MockAddressError, is_mock_address

    resolved: dict[str, dict[str, Any]] = {}
    for name, entry in station_file.instruments.items():
        entry = dict(entry)
        address = entry.get("address")
        if is_mock_address(address):
            try:
                entry["address"] = launcher.start(name, str(address))
            except MockAddressError as err:
                raise StationError(
                    f"{station_file.where(name)}: instrument {name!r}: {err}"
                ) from err
            init = dict(entry.get("init") or {})
            if entry["address"].startswith("TCPIP::"):
                init.setdefault("visalib", "@py")
            entry["init"] = init
            if name in launcher.driver_kwargs:  # an in-process fake library, no transport
                del entry["address"]
        resolved[name] = entry
    return resolved


def dump_station(instruments: Mapping[str, Any]) -> str:
    """A QCoDeS-valid station YAML for resolved instrument entries."""
    import ruamel.yaml

    stream = io.StringIO()
    yaml = ruamel.yaml.YAML(typ="safe")
    yaml.default_flow_style = False
    yaml.dump({"instruments": dict(instruments)}, stream)
    return stream.getvalue()


def has_mocks(station_file: StationFile) -> bool:
    """True if any instrument of the file is served by the mock bench."""
    from qkdlab.mock_instruments.launcher import is_mock_address

    return any(is_mock_address(e.get("address")) for e in station_file.instruments.values())


@dataclass
class LoadedStation:
    """A QCoDeS station with its instruments connected, and the mock bench if any."""

    station: Station
    file: StationFile
    launcher: MockLauncher | None

    @property
    def instruments(self) -> dict[str, Instrument]:
        return {name: self.station.components[name] for name in self.file.instruments  # type: ignore[misc]
                if name in self.station.components}

    def close(self) -> None:
        """Put every instrument in its safe state, close it, and stop the mocks."""
        for name, instrument in list(self.instruments.items()):
            safe = getattr(instrument, "safe_state", None)
            if callable(safe):
                try:
                    safe()
                except Exception:  # closing must go on for the others
                    log.exception("%s: safe_state failed while closing", name)
            instrument.close()
        if self.launcher is not None:
            self.launcher.stop()


_IDN_FAILED = "Error getting or interpreting *IDN?"
"""What QCoDeS logs (and otherwise ignores) when ``*IDN?`` fails while connecting."""


class _HeldWarnings(logging.Filter):
    """Holds back QCoDeS' instrument warnings while one instrument connects.

    If it does not answer ``*IDN?`` (which QCoDeS logs with a traceback, followed by a
    warning per parameter its snapshot could not read), :func:`connect_instrument`
    reports one line instead; otherwise :meth:`release` logs them as usual.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.idn_errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        self.held.append(record)
        if _IDN_FAILED in record.getMessage() and record.exc_info and record.exc_info[1]:
            self.idn_errors.append(record.exc_info[1])
        return False

    def release(self, logger: logging.Logger) -> None:
        for record in self.held:
            logger.handle(record)
        self.held.clear()


def _unanswered_idn(instrument: Any) -> bool:
    """True if the instrument's identity is QCoDeS' placeholder for a failed ``*IDN?``
    (vendor, serial and firmware None, model its own name)."""
    parameter = getattr(instrument, "parameters", {}).get("IDN")
    if parameter is None:
        return False
    try:
        idn = parameter.cache.get(get_if_invalid=False)
    except Exception:  # a cache that cannot be read says nothing about the link
        return False
    return (isinstance(idn, Mapping) and idn.get("vendor") is None
            and idn.get("serial") is None and idn.get("firmware") is None
            and idn.get("model") == getattr(instrument, "name", None))


def _reason(err: BaseException) -> str:
    """First line of an exception's message (its first argument if QCoDeS added context)."""
    first = err.args[0] if len(err.args) > 1 and isinstance(err.args[0], str) else str(err)
    line = str(first).splitlines()[0] if str(first) else ""
    return line or type(err).__name__


def _root_cause(err: BaseException) -> BaseException:
    """The error at the bottom of ``err``'s ``raise ... from`` chain (e.g. the refused
    connection under a driver's communication error)."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    return err


def _init_key_in(station_file: StationFile, name: str, reason: str) -> str | None:
    """The ``init:`` keyword of instrument ``name`` that an error message is about."""
    init = station_file.instruments[name].get("init") or {}
    match = re.search(r"keyword argument '(\w+)'", reason)
    if match and match.group(1) in init:
        return match.group(1)
    return next((key for key in init if re.search(rf"\b{re.escape(key)}\b", reason)), None)


def connect_instrument(station: Station, station_file: StationFile, name: str,
                       **driver_kwargs: Any) -> Instrument:
    """Load one instrument into ``station``; a :class:`StationError` naming it if it fails.

    Fails too if the instrument did not answer ``*IDN?`` while connecting (QCoDeS only
    logs that): a driver that sends nothing else on construction would otherwise
    "connect" to an address nobody listens on.
    """
    entry = station_file.instruments[name]
    where = f"{station_file.where(name)}: instrument {name!r}"
    address = entry.get("address", "?")
    import_driver(entry["type"], where)
    warnings = _HeldWarnings()
    qcodes_log = logging.getLogger("qcodes.instrument.instrument_base")
    qcodes_log.addFilter(warnings)
    try:
        instrument: Instrument = station.load_instrument(name, **driver_kwargs)
    except Exception as err:
        reason = _reason(err)
        key = _init_key_in(station_file, name, reason)
        if key is not None:
            where = (f"{station_file.where_key('instruments', name, 'init', key)}: "
                     f"instrument {name!r}")
            if isinstance(err, TypeError) and "unexpected keyword" in reason:
                reason = (f"{entry['type'].rpartition('.')[2]} takes no init keyword "
                          f"{key!r} ({reason})")
            else:
                reason = f"init: {key}: {reason}"
        raise StationError(f"{where} at {address!s}: cannot connect: {reason}") from err
    finally:
        qcodes_log.removeFilter(warnings)
    if _unanswered_idn(instrument):
        reason = (_reason(_root_cause(warnings.idn_errors[0])) if warnings.idn_errors
                  else "no identification")
        station.remove_component(name)
        instrument.close()
        raise StationError(f"{where} at {address!s}: cannot connect: no answer to '*IDN?' "
                           f"({reason})")
    warnings.release(qcodes_log)
    return instrument


def merge_overrides(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mapping ``base`` updated by ``extra`` (mappings merge, other values replace)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out


@contextmanager
def open_station(
    path: str | Path, *, seed: int | None = None, only: list[str] | None = None,
    bench_overrides: Mapping[str, Any] | None = None,
) -> Iterator[LoadedStation]:
    """Load, start mocks for, and connect every instrument of a station file.

    On exit (also on error) instruments go to their safe state and close, and the
    mocks stop.  ``seed`` overrides the mock bench seed of the file and
    ``bench_overrides`` its bench settings (both only for ``mock://`` instruments).

    Everything that can be checked without an instrument is checked first (file
    structure and types, roles, driver imports, mock addresses, safety limits): a bad
    file raises :class:`StationError` before any mock starts or any instrument is
    contacted.
    """
    from qcodes.station import Station

    from qkdlab.safety import assert_safe_limits

    station_file = read_station_file(path)
    check_roles(station_file)
    check_driver_types(station_file)
    check_mock_addresses(station_file)
    assert_safe_limits(station_file)
    if only is not None:
        unknown = sorted(set(only) - set(station_file.instruments))
        if unknown:
            raise StationError(f"{station_file.path}: no instrument named {unknown[0]!r}")
    launcher = None
    entries = station_file.instruments
    if bench_overrides and not has_mocks(station_file):
        raise StationError(f"{station_file.path}: bench settings apply to the mock bench "
                           "only, and this station has no mock:// instrument")
    if has_mocks(station_file):
        from qkdlab.mock_instruments.launcher import MockLauncher

        try:
            launcher = MockLauncher(
                seed=station_file.mock_seed if seed is None else seed,
                bench_overrides=merge_overrides(station_file.bench_overrides,
                                                bench_overrides or {}),
            )
        except (TypeError, ValueError) as err:
            raise StationError(f"{station_file.where_key('qkdlab', 'mock_bench')}: 'qkdlab: "
                               f"mock_bench' (or its overrides): {err}") from err
    loaded = None
    try:
        if launcher is not None:
            entries = resolve_mocks(station_file, launcher)
        station = Station()
        station.load_config(dump_station(entries))
        loaded = LoadedStation(station=station, file=station_file, launcher=launcher)
        for name in only or list(station_file.instruments):
            extra = launcher.driver_kwargs.get(name, {}) if launcher is not None else {}
            connect_instrument(station, station_file, name, **extra)
        yield loaded
    finally:
        if loaded is not None:
            loaded.close()
        elif launcher is not None:
            launcher.stop()
