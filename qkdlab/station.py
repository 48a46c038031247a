"""Load a station file: a QCoDeS station YAML plus a ``qkdlab:`` section.

The file is a plain QCoDeS station (``instruments: name: {type, address, init, ...}``)
with two additions, both removed before QCoDeS sees the file:

* a top-level ``qkdlab:`` mapping, for now ``mock_bench: {seed: N, ...bench overrides}``;
* addresses of the form ``mock://vendor/model?opt=value``: such an instrument is served
  by the mock bench, started in-process here, and the address is replaced by the
  mock's real transport address before the driver connects.

Every problem becomes one :class:`StationError` line naming the file, the line, the
instrument and what is wrong.
"""

from __future__ import annotations

import importlib
import io
import logging
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


class StationError(Exception):
    """A station file that cannot be loaded or an instrument that cannot be reached."""


@dataclass
class StationFile:
    """A parsed station file, addresses not yet resolved."""

    path: Path
    instruments: dict[str, dict[str, Any]]
    qkdlab: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)

    def where(self, instrument: str | None = None) -> str:
        """``file:line`` of an instrument entry (or the file) for error messages."""
        line = self.lines.get(instrument or "", 0)
        return f"{self.path}:{line}" if line else str(self.path)

    @property
    def mock_seed(self) -> int:
        return int(self.qkdlab.get("mock_bench", {}).get("seed", 0))

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


def read_station_file(path: str | Path) -> StationFile:
    """Parse and check the structure of a station file (no instrument is touched)."""
    import ruamel.yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise StationError(f"{path}: cannot read station file: {err.strerror}") from err
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
        key = sorted(unknown_top)[0]
        raise StationError(f"{path}:{_line(data, key)}: unknown top-level key {key!r} "
                           "(expected 'instruments' and optionally 'qkdlab')")
    instruments: Any = data.get("instruments")
    if not isinstance(instruments, Mapping) or not instruments:
        raise StationError(f"{path}: no instruments (expected 'instruments:' with entries)")
    lines: dict[str, int] = {}
    for name, entry in instruments.items():
        line = _line(instruments, name)
        lines[str(name)] = line
        where = f"{path}:{line}: instrument {name!r}"
        if not str(name).isidentifier():
            raise StationError(f"{where}: name must be a Python identifier")
        if not isinstance(entry, Mapping):
            raise StationError(f"{where}: entry must be a mapping with at least 'type'")
        unknown = set(entry) - INSTRUMENT_KEYS
        if unknown:
            key = sorted(unknown)[0]
            key_line = _line(entry, key)
            raise StationError(f"{path}:{key_line}: instrument {name!r}: unknown key {key!r} "
                               f"(allowed: {', '.join(sorted(INSTRUMENT_KEYS))})")
        if "type" not in entry:
            raise StationError(f"{where}: missing 'type' (the driver class, module.Class)")
    section: Any = data.get("qkdlab") or {}
    if not isinstance(section, Mapping):
        raise StationError(f"{path}: 'qkdlab' must be a mapping")
    unknown_q = set(section) - QKDLAB_KEYS
    if unknown_q:
        key = sorted(unknown_q)[0]
        raise StationError(f"{path}:{_line(section, key)}: unknown key {key!r} in "
                           f"'qkdlab' (allowed: {', '.join(sorted(QKDLAB_KEYS))})")
    return StationFile(path=path, instruments=_plain(instruments), qkdlab=_plain(section),
                       lines=lines)


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


def connect_instrument(station: Station, station_file: StationFile, name: str,
                       **driver_kwargs: Any) -> Instrument:
    """Load one instrument into ``station``; a :class:`StationError` naming it if it fails."""
    entry = station_file.instruments[name]
    where = f"{station_file.where(name)}: instrument {name!r}"
    import_driver(entry["type"], where)
    try:
        instrument: Instrument = station.load_instrument(name, **driver_kwargs)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StationError(
            f"{where} at {entry.get('address', '?')!s}: cannot connect: {reason}"
        ) from err
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
    """
    from qcodes.station import Station

    station_file = read_station_file(path)
    check_driver_types(station_file)
    check_mock_addresses(station_file)
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
        except ValueError as err:
            raise StationError(f"{station_file.path}: mock bench settings: {err}") from err
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
