"""Resolve a station file's ``qkdlab: roles:`` section to the instruments that fill them.

Experiments take roles, never station files; this module (in the root package, which
may see everything) is where a loaded station becomes role objects.
"""

from __future__ import annotations

from typing import Any

from qkdlab.station import LoadedStation, StationError


def instrument_for(loaded: LoadedStation, role: str, *, required: bool = True) -> Any:
    """The instrument named for ``role`` in the station file (None if optional and absent)."""
    roles = loaded.file.qkdlab.get("roles", {})
    name = roles.get(role)
    if name is None:
        if required:
            raise StationError(f"{loaded.file.path}: no instrument for role {role!r} "
                               f"(add 'qkdlab: roles: {role}: <instrument>')")
        return None
    instruments = loaded.instruments
    if name not in instruments:
        raise StationError(f"{loaded.file.path}: role {role!r} names {name!r}, "
                           f"which is not a loaded instrument")
    return instruments[name]


def instruments_for(loaded: LoadedStation, role: str) -> list[Any]:
    """The instruments a role names: one name or a list of names (empty if absent)."""
    roles = loaded.file.qkdlab.get("roles", {})
    value = roles.get(role)
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StationError(f"{loaded.file.path}: 'qkdlab: roles: {role}' must be an "
                           f"instrument name or a list of names, got {value!r}")
    instruments = loaded.instruments
    missing = [n for n in names if n not in instruments]
    if missing:
        raise StationError(f"{loaded.file.path}: role {role!r} names {missing[0]!r}, "
                           "which is not a loaded instrument")
    return [instruments[n] for n in names]


def bb84_roles(loaded: LoadedStation) -> Any:
    """A :class:`~qkdlab.experiments.bb84.run.BB84Roles` from the station's roles.

    Detector units (role ``spd``: one name or a list) are enabled at run start, polled
    once per frame and ramped down by the safe state.
    """
    from qkdlab.drivers.roles import (
        Attenuator,
        BB84Transmitter,
        Laser,
        SafeStateCapable,
        SinglePhotonDetector,
        TimeTagger,
    )
    from qkdlab.experiments.bb84.run import BB84Roles
    from qkdlab.experiments.bb84.sync import DetectorMap

    roles = loaded.file.qkdlab.get("roles", {})
    transmitter = instrument_for(loaded, "transmitter")
    tagger = instrument_for(loaded, "tagger")
    laser = instrument_for(loaded, "laser", required=False)
    for obj, kind, role in ((transmitter, BB84Transmitter, "transmitter"),
                            (tagger, TimeTagger, "tagger"), (laser, Laser, "laser")):
        if obj is not None and not isinstance(obj, kind):
            raise StationError(f"{loaded.file.path}: {obj.name!r} ({type(obj).__name__}) "
                               f"cannot serve as {role}: it is not a {kind.__name__}")
    raw_map = roles.get("detectors")
    if not isinstance(raw_map, dict) or not raw_map:
        raise StationError(f"{loaded.file.path}: 'qkdlab: roles: detectors' must map tagger "
                           "channels to [basis, bit]")
    try:
        channels = {int(ch): (int(v[0]), int(v[1])) for ch, v in raw_map.items()}
    except (TypeError, ValueError, IndexError) as err:
        raise StationError(f"{loaded.file.path}: bad detector map {raw_map!r}: {err}") from err
    for ch, (basis, bit) in channels.items():
        if basis not in (0, 1) or bit not in (0, 1):
            raise StationError(f"{loaded.file.path}: channel {ch}: basis and bit must be 0 "
                               f"or 1, got {[basis, bit]}")
    spds = instruments_for(loaded, "spd")
    for obj in spds:
        if not isinstance(obj, SinglePhotonDetector):
            raise StationError(f"{loaded.file.path}: {obj.name!r} ({type(obj).__name__}) "
                               "cannot serve as spd: it is not a SinglePhotonDetector")
    used = {id(x) for x in (transmitter, tagger, laser, *spds)}
    others = [i for i in loaded.instruments.values()
              if id(i) not in used and isinstance(i, SafeStateCapable)]
    marker = roles.get("marker_channel")
    laser_settings = roles.get("laser_settings") or {}
    if not isinstance(laser_settings, dict) or not all(
            isinstance(v, int | float) for v in laser_settings.values()):
        raise StationError(f"{loaded.file.path}: 'qkdlab: roles: laser_settings' must map "
                           "laser parameter names to numbers")
    attenuator = instrument_for(loaded, "attenuator", required=False)
    if attenuator is not None and not isinstance(attenuator, Attenuator):
        raise StationError(f"{loaded.file.path}: {attenuator.name!r} "
                           f"({type(attenuator).__name__}) cannot serve as attenuator: it is "
                           "not an Attenuator")
    attenuation = roles.get("attenuation_db")
    if loaded.launcher is not None:
        # a mock scenario that sets the bench's VOA (bench overrides) means that setting
        voa = (loaded.launcher.bench_overrides.get("alice") or {}).get("attenuation_db")
        if voa is not None:
            attenuation = voa
    if attenuation is not None and (isinstance(attenuation, bool) or
                                    not isinstance(attenuation, int | float)):
        raise StationError(f"{loaded.file.path}: 'qkdlab: roles: attenuation_db' must be a "
                           f"number (dB), got {attenuation!r}")
    if attenuation is not None and attenuator is None:
        raise StationError(f"{loaded.file.path}: 'qkdlab: roles: attenuation_db' needs an "
                           "'attenuator' role")
    return BB84Roles(transmitter=transmitter, tagger=tagger, laser=laser,
                     attenuator=attenuator,
                     attenuation_db=None if attenuation is None else float(attenuation),
                     detectors=DetectorMap(channels),
                     marker_channel=None if marker is None else int(marker), others=others,
                     detector_units={obj.name: obj for obj in spds},
                     laser_settings={str(k): float(v) for k, v in laser_settings.items()},
                     # instruments the station file launched as mocks: a simulation
                     seeded_secrets=loaded.launcher is not None)
