"""pytest plugin: hardware-in-the-loop (HIL) runs against the instruments of a station file.

Options::

    pytest tests/hil --hil lab.yaml                    # read-only, low-risk checks
    pytest tests/hil --hil lab.yaml --hil-allow-light  # also lasers on, biases up, optics moved
    --hil-tolerances FILE   tolerances (default: lab.hil.yaml next to lab.yaml)
    --hil-data-dir DIR      where HIL runs keep their datasets (default: pytest's tmp dir)

Without ``--hil`` nothing changes: every HIL test (a test using the ``hil_station``
fixture, directly or through ``hil_role``/``hil_instrument``...) is skipped and the
rest of the suite runs against the mocks as always.

Markers (HIL tests only):

* ``@pytest.mark.needs_roles("laser", "tagger", ...)`` — skipped, naming what is
  missing, unless the station's ``qkdlab: roles:`` names each role (and the named
  instruments exist);
* ``@pytest.mark.needs_instruments("tagger", "ThorlabsPM100D", ...)`` — instrument
  names, or driver class names, the station must have;
* ``@pytest.mark.light`` — the test makes light, raises a detector bias or moves optics:
  skipped without ``--hil-allow-light``.  Around it every instrument of the station is
  snapshotted (a BB84 run, say, touches them all); afterwards, also when it fails, they
  go to their safe state and the snapshotted settings are set back, except what the
  safe state owns (laser output, detector bias: see :mod:`qkdlab.testing.state`).

Before anything connects, the station's limits must pass
:func:`qkdlab.safety.check_limits`, the file must name no ``mock://`` address (serve
mocks out of process: :mod:`qkdlab.testing.mocklab`) and the tolerances file must
validate (:mod:`qkdlab.testing.tolerances`).  The station is connected once per
session and closed at the end *without* a safe state: the read-only tests change
nothing and every light test is undone, so the bench is left as found (with emission
off after any light test).  At the end a table lists, per instrument, its model (from
``get_idn()``) and its tests passed / failed / skipped.

Registration: the ``pytest11`` entry point ``qkdlab.testing.hil`` (pyproject), or
``-p qkdlab.testing.hil`` on the command line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from qkdlab.station import LoadedStation, StationError, StationFile, read_station_file
from qkdlab.testing.tolerances import (
    ToleranceError,
    Tolerances,
    load_tolerances,
    sibling_path,
)

log = logging.getLogger(__name__)

PLUGIN_NAME = "qkdlab.testing.hil"
NO_STATION = "no-hil-station"
"""The one parameter of per-instrument tests when there is no ``--hil`` station."""
STATION_ROW = "(no instrument)"
MOCKS_REFUSED = ("HIL runs against real addresses, not mock:// ones; serve the mock bench "
                 "out of process instead: python -m qkdlab.testing.mocklab --write-station "
                 "lab.yaml")

MARKERS = (
    "needs_roles(*roles): HIL test needing these 'qkdlab: roles:' in the station file",
    "needs_instruments(*names): HIL test needing these instruments (names or driver classes)",
    "light: HIL test that makes light, raises a detector bias or moves optics "
    "(runs only with --hil-allow-light)",
    "hil: a hardware-in-the-loop test (skipped without --hil)",
)


def role_instrument_names(station: StationFile, role: str) -> list[str] | None:
    """Instrument names a role names (str or list of str); None if absent or not a role
    naming instruments (``detectors`` maps channels, ``laser_settings`` values...)."""
    roles = station.qkdlab.get("roles") or {}
    value = roles.get(role) if isinstance(roles, Mapping) else None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _driver_class_name(entry: Mapping[str, Any]) -> str:
    return str(entry.get("type", "")).rpartition(".")[2]


@dataclass
class HILSession:
    """Everything a HIL run knows: station, tolerances, options, and what happened."""

    station_path: Path
    station: StationFile
    tolerances: Tolerances
    allow_light: bool
    data_dir: Path | None
    loaded: LoadedStation | None = None
    identities: dict[str, str] = field(default_factory=dict)
    item_instruments: dict[str, list[str]] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)

    # -- what a test needs ----------------------------------------------------------------
    def missing_roles(self, roles: tuple[str, ...]) -> list[str]:
        section = self.station.qkdlab.get("roles") or {}
        missing = []
        for role in roles:
            if role not in section or section.get(role) is None:
                missing.append(f"no role {role!r} (add 'qkdlab: roles: {role}: ...')")
                continue
            names = role_instrument_names(self.station, role) or []
            absent = [n for n in names if n not in self.station.instruments]
            if absent:
                missing.append(f"role {role!r} names {absent[0]!r}, not an instrument")
        return missing

    def match_instruments(self, wanted: str) -> list[str]:
        """Instruments called ``wanted`` or whose driver class is ``wanted``."""
        if wanted in self.station.instruments:
            return [wanted]
        return [name for name, entry in self.station.instruments.items()
                if _driver_class_name(entry) == wanted]

    def instruments_of(self, item: pytest.Item) -> list[str]:
        """The instruments a test involves: its parameter, its roles, its instruments."""
        names: list[str] = []
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "hil_instrument_name" in callspec.params:
            names.append(str(callspec.params["hil_instrument_name"]))
        for mark in item.iter_markers("needs_roles"):
            for role in mark.args:
                names += role_instrument_names(self.station, str(role)) or []
        for mark in item.iter_markers("needs_instruments"):
            for wanted in mark.args:
                names += self.match_instruments(str(wanted))
        return [n for n in dict.fromkeys(names) if n in self.station.instruments]

    # -- the end-of-run table -----------------------------------------------------------------
    def table(self) -> list[str]:
        counts: dict[str, dict[str, int]] = {}
        for nodeid, outcome in self.outcomes.items():
            for name in self.item_instruments.get(nodeid) or [STATION_ROW]:
                row = counts.setdefault(name, {"passed": 0, "failed": 0, "skipped": 0})
                row[outcome] += 1
        names = [*self.station.instruments, *([STATION_ROW] if STATION_ROW in counts else [])]
        models = {n: self.identities.get(n, "(not connected)") for n in names}
        models[STATION_ROW] = ""
        width_n = max(len("instrument"), *(len(n) for n in names))
        width_m = max(len("model"), *(len(m) for m in models.values()))
        lines = [f"{'instrument':<{width_n}}  {'model':<{width_m}}  passed  failed  skipped"]
        for name in names:
            row = counts.get(name, {"passed": 0, "failed": 0, "skipped": 0})
            lines.append(f"{name:<{width_n}}  {models[name]:<{width_m}}  {row['passed']:>6}  "
                         f"{row['failed']:>6}  {row['skipped']:>7}")
        return lines


_SESSION = pytest.StashKey[HILSession]()


def hil_session_of(config: pytest.Config) -> HILSession | None:
    """The HIL session of a pytest run (None without ``--hil``)."""
    return config.stash.get(_SESSION, None)


def _identity(instrument: Any) -> str:
    try:
        idn = instrument.get_idn()
    except Exception as err:
        return f"(get_idn failed: {type(err).__name__})"
    parts = [str(idn.get(k)) for k in ("vendor", "model") if idn.get(k)]
    serial = idn.get("serial")
    text = " ".join(parts) if parts else "(identity not reported)"
    return f"{text} #{serial}" if serial else text


# -- hooks --------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qkdlab-hil", "qkdlab hardware-in-the-loop")
    group.addoption("--hil", metavar="STATION.yaml", default=None,
                    help="run the HIL tests against the instruments of this station file")
    group.addoption("--hil-allow-light", action="store_true", default=False,
                    help="also run HIL tests that enable a laser output, raise a detector "
                         "bias or move optics")
    group.addoption("--hil-tolerances", metavar="FILE", default=None,
                    help="HIL tolerances (default: STATION.hil.yaml next to the station)")
    group.addoption("--hil-data-dir", metavar="DIR", default=None,
                    help="where HIL runs keep their datasets (default: pytest's tmp dir)")


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    station_arg = config.getoption("hil", default=None)
    if not station_arg or hil_session_of(config) is not None:
        return
    from qkdlab.safety import check_limits
    from qkdlab.station import has_mocks

    station_path = Path(station_arg).resolve()
    try:
        station = read_station_file(station_path)
        problems = check_limits(station)
    except StationError as err:
        raise pytest.UsageError(f"--hil: {err}") from err
    if has_mocks(station):
        raise pytest.UsageError(f"--hil: {station_path}: {MOCKS_REFUSED}")
    if problems:
        raise pytest.UsageError("--hil: refusing a station with unsafe limits:\n  "
                                + "\n  ".join(problems))
    tol_arg = config.getoption("hil_tolerances", default=None)
    tol_path = Path(tol_arg) if tol_arg else sibling_path(station_path)
    if not tol_arg and not tol_path.exists():
        raise pytest.UsageError(
            f"--hil: no HIL tolerances for {station_path.name}: write {tol_path} (see "
            "examples/station_lab.hil.yaml) or pass --hil-tolerances FILE")
    try:
        tolerances = load_tolerances(tol_path)
    except ToleranceError as err:
        raise pytest.UsageError(f"--hil: {err}") from err
    data_dir = config.getoption("hil_data_dir", default=None)
    session = HILSession(station_path=station_path, station=station, tolerances=tolerances,
                         allow_light=bool(config.getoption("hil_allow_light", default=False)),
                         data_dir=Path(data_dir) if data_dir else None)
    config.stash[_SESSION] = session
    config.pluginmanager.register(_Reporter(session), f"{PLUGIN_NAME}.reporter")


def _is_hil_item(item: pytest.Item) -> bool:
    return "hil_station" in getattr(item, "fixturenames", ()) \
        or item.get_closest_marker("hil") is not None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hil_instrument_name" not in metafunc.fixturenames:
        return
    session = hil_session_of(metafunc.config)
    names = list(session.station.instruments) if session is not None else [NO_STATION]
    metafunc.parametrize("hil_instrument_name", names, ids=names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    session = hil_session_of(config)
    for item in items:
        if not _is_hil_item(item):
            continue
        if session is None:
            item.add_marker(pytest.mark.skip(reason="HIL test: run with --hil STATION.yaml"))
            continue
        session.item_instruments[item.nodeid] = session.instruments_of(item)
        reasons: list[str] = []
        for mark in item.iter_markers("needs_roles"):
            reasons += session.missing_roles(tuple(str(r) for r in mark.args))
        for mark in item.iter_markers("needs_instruments"):
            reasons += [f"no instrument {str(w)!r} (by name or driver class)"
                        for w in mark.args if not session.match_instruments(str(w))]
        if reasons:
            item.add_marker(pytest.mark.skip(
                reason=f"{session.station_path.name}: {'; '.join(reasons)}"))
        elif item.get_closest_marker("light") is not None and not session.allow_light:
            item.add_marker(pytest.mark.skip(
                reason="light test (laser on, detector bias up or optics moved): "
                       "run with --hil-allow-light"))


class _Reporter:
    """Per-test outcomes and the end-of-run table (registered only with ``--hil``)."""

    RANK: ClassVar[dict[str, int]] = {"passed": 0, "skipped": 1, "failed": 2}

    def __init__(self, session: HILSession) -> None:
        self.session = session

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid not in self.session.item_instruments:
            return
        if report.when != "call" and report.passed:
            return
        outcome = "failed" if report.failed else "skipped" if report.skipped else "passed"
        old = self.session.outcomes.get(report.nodeid, "passed")
        if report.nodeid not in self.session.outcomes or self.RANK[outcome] > self.RANK[old]:
            self.session.outcomes[report.nodeid] = outcome

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        s = self.session
        title = f"qkdlab HIL: {s.station_path}" + ("" if s.allow_light else " (no light tests)")
        terminalreporter.write_sep("=", title)
        if not s.item_instruments:
            terminalreporter.write_line("no HIL test collected (see tests/hil)")
            return
        for line in s.table():
            terminalreporter.write_line(line)


# -- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def hil_session(request: pytest.FixtureRequest) -> HILSession:
    """The HIL run's station file, tolerances and options (skips without ``--hil``)."""
    session = hil_session_of(request.config)
    if session is None:
        pytest.skip("HIL test: run with --hil STATION.yaml")
    return session


def connect_as_found(station_file: StationFile) -> LoadedStation:
    """Connect every instrument of a station file and change nothing else.

    Unlike :func:`qkdlab.station.open_station` this starts no mock and, paired with
    :func:`disconnect_as_found`, puts nothing in its safe state on the way out: a HIL
    run leaves the bench as it found it.  ``mock://`` addresses are refused (serve the
    mocks out of process: ``python -m qkdlab.testing.mocklab``).
    """
    from qcodes.station import Station

    from qkdlab.station import check_driver_types, connect_instrument, dump_station, has_mocks

    if has_mocks(station_file):
        raise StationError(f"{station_file.path}: {MOCKS_REFUSED}")
    check_driver_types(station_file)
    station = Station()
    station.load_config(dump_station(station_file.instruments))
    loaded = LoadedStation(station=station, file=station_file, launcher=None)
    try:
        for name in station_file.instruments:
            connect_instrument(station, station_file, name)
    except BaseException:
        disconnect_as_found(loaded)
        raise
    return loaded


def disconnect_as_found(loaded: LoadedStation) -> None:
    """Close every connection of ``loaded`` without touching the instruments' state."""
    for name, instrument in loaded.instruments.items():
        try:
            instrument.close()
        except Exception:  # the others must still be closed
            log.exception("%s: close failed", name)


@pytest.fixture(scope="session")
def hil_station(hil_session: HILSession) -> Iterator[LoadedStation]:
    """The station of ``--hil``, connected once for the session and closed at the end
    *without* a safe state: read-only tests change nothing and every light test is
    followed by the safe state of light sources and detectors plus the restore of all
    other settings, so the bench is left as found (emission off).  Identities are read
    for the summary table."""
    try:
        loaded = connect_as_found(hil_session.station)
    except StationError as err:
        pytest.fail(f"--hil: {err}", pytrace=False)
    hil_session.loaded = loaded
    try:
        for name, instrument in loaded.instruments.items():
            hil_session.identities[name] = _identity(instrument)
        yield loaded
    finally:
        hil_session.loaded = None
        disconnect_as_found(loaded)


@pytest.fixture(scope="session")
def hil_tolerances(hil_session: HILSession) -> Tolerances:
    """The bench's tolerances (``Tolerances.find``; skip with ``Tolerances.missing``)."""
    return hil_session.tolerances


@pytest.fixture
def hil_tolerance(hil_tolerances: Tolerances) -> Callable[[str, str], Any]:
    """``hil_tolerance("tagger", "dark_rate_cps")``: the value, or skip naming the key."""
    def get(section: str, key: str) -> Any:
        value = hil_tolerances.find(section, key)
        if value is None:
            pytest.skip(hil_tolerances.missing(section, key))
        return value
    return get


@pytest.fixture
def hil_roles(hil_station: LoadedStation, hil_session: HILSession
              ) -> Callable[[str], list[Any]]:
    """``hil_roles("spd")``: every instrument a role names (a role may list several)."""
    def get(role: str) -> list[Any]:
        names = role_instrument_names(hil_session.station, role)
        if not names:
            pytest.skip(f"{hil_session.station_path.name}: no instrument for role {role!r}")
        return [hil_station.instruments[n] for n in names]
    return get


@pytest.fixture
def hil_role(hil_roles: Callable[[str], list[Any]]) -> Callable[[str], Any]:
    """``hil_role("laser")``: the (first) instrument filling a role."""
    return lambda role: hil_roles(role)[0]


@pytest.fixture
def hil_instrument(hil_station: LoadedStation, hil_instrument_name: str) -> Any:
    """Each instrument of the station in turn (tests taking it run once per instrument)."""
    return hil_station.instruments[hil_instrument_name]


@pytest.fixture
def hil_data_dir(hil_session: HILSession, tmp_path: Path) -> Path:
    """Where a HIL test writes datasets: ``--hil-data-dir`` or a fresh tmp folder."""
    if hil_session.data_dir is None:
        return tmp_path
    hil_session.data_dir.mkdir(parents=True, exist_ok=True)
    return hil_session.data_dir


@pytest.fixture(autouse=True)
def _hil_light_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Around a HIL light test: snapshot, then safe state and restore (even on failure)."""
    item = request.node
    if item.get_closest_marker("light") is None or not isinstance(item, pytest.Item) \
            or not _is_hil_item(item):
        yield
        return
    from qkdlab.testing.state import guarded

    loaded: LoadedStation = request.getfixturevalue("hil_station")
    # every instrument, not only the test's own: a BB84 run puts them all in safe state
    with guarded(list(loaded.instruments.values())):
        yield
