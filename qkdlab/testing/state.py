"""Snapshot an instrument's settings, put it in its safe state, and restore the settings.

A light test changes real hardware: a laser current, a detector bias, a waveplate.
:func:`guarded` wraps it: every gettable *and* settable parameter of the involved
instruments (their channels included) is read before; afterwards — also when the test
failed — every instrument goes to ``safe_state()`` and then each setting that differs
from its snapshot is set back through the driver (validated, ramped).

What a restore never undoes is the safe state itself: the parameters
:func:`qkdlab.safety.keep_safe_parameters` lists for the model (laser output, detector
bias) stay where ``safe_state()`` left them.  For a model not in that table every
parameter that ``safe_state()`` changed stays as it left it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SKIPPED_PARAMETERS = frozenset({"IDN", "timeout"})
"""Not instrument state: the identity and the VISA/socket timeout."""


@dataclass(frozen=True)
class Setting:
    """One parameter and its value at snapshot time."""

    path: str
    """``instrument.channel.parameter`` (for messages)."""
    parameter: Any
    value: Any


class RestoreError(RuntimeError):
    """Some settings could not be restored, or an instrument refused its safe state."""


def _submodules(node: Any) -> Iterator[tuple[str, Any]]:
    """Channels and channel lists below ``node``, each once, as (relative path, module)."""
    seen: set[int] = set()

    def walk(prefix: str, module: Any) -> Iterator[tuple[str, Any]]:
        for name, sub in getattr(module, "submodules", {}).items():
            members = list(sub) if hasattr(sub, "__iter__") and not hasattr(
                sub, "parameters") else [sub]
            for member in members:
                if id(member) in seen:
                    continue
                seen.add(id(member))
                short = getattr(member, "short_name", name)
                path = f"{prefix}{short}"
                yield path, member
                yield from walk(f"{path}.", member)

    yield from walk("", node)


def settable_parameters(instrument: Any) -> Iterator[tuple[str, Any]]:
    """``(path, parameter)`` of every gettable and settable parameter, channels included."""
    modules: list[tuple[str, Any]] = [("", instrument), *_submodules(instrument)]
    for prefix, module in modules:
        for name, parameter in getattr(module, "parameters", {}).items():
            if name in SKIPPED_PARAMETERS:
                continue
            if getattr(parameter, "gettable", False) and getattr(parameter, "settable", False):
                path = f"{instrument.name}.{prefix + '.' if prefix else ''}{name}"
                yield path, parameter


def snapshot_settings(instrument: Any) -> list[Setting]:
    """Fresh readings of every settable parameter (unreadable ones are logged, skipped)."""
    settings = []
    for path, parameter in settable_parameters(instrument):
        try:
            settings.append(Setting(path, parameter, parameter.get()))
        except Exception as err:  # a parameter this device does not answer: not restored
            log.warning("%s: cannot read for the snapshot (%s); it will not be restored",
                        path, err)
    return settings


def same_value(a: Any, b: Any) -> bool:
    """Equal, with floats compared to 1e-6 relative (instruments round what they store)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, Sequence) and isinstance(b, Sequence) and not isinstance(a, str) \
            and not isinstance(b, str):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:
        return False


def safe_state(instrument: Any) -> str | None:
    """``instrument.safe_state()`` if it has one; the failure as text (never raises)."""
    call = getattr(instrument, "safe_state", None)
    if not callable(call):
        return None
    try:
        call()
    except Exception as err:
        log.exception("%s: safe_state failed", getattr(instrument, "name", instrument))
        return f"{getattr(instrument, 'name', instrument)}: safe_state failed: {err}"
    return None


def restore_settings(settings: Iterable[Setting], keep: Iterable[str]) -> list[str]:
    """Set back every setting that changed, except parameters named in ``keep``.

    ``keep`` holds short parameter names (on the instrument or any channel).  Returns
    the failures as text (never raises), after trying every setting.
    """
    keep = frozenset(keep)
    failures = []
    for setting in settings:
        if setting.parameter.short_name in keep:
            continue
        try:
            now = setting.parameter.get()
            if same_value(now, setting.value):
                continue
            setting.parameter.set(setting.value)
            log.info("%s restored: %r -> %r", setting.path, now, setting.value)
        except Exception as err:
            failures.append(f"{setting.path}: cannot restore {setting.value!r}: {err}")
    return failures


@contextmanager
def guarded(instruments: Sequence[Any]) -> Iterator[None]:
    """Snapshot ``instruments``; afterwards, even if the body raised, put each in its
    safe state and restore its settings.  Raises :class:`RestoreError` on failures."""
    from qkdlab.safety import keep_safe_parameters

    snapshots = [(inst, snapshot_settings(inst)) for inst in instruments]
    try:
        yield
    finally:
        failures: list[str] = []
        keep: dict[int, frozenset[str]] = {}
        for inst, _ in snapshots:
            known = keep_safe_parameters(inst)
            if known is None:  # unknown model: whatever safe_state changes stays changed
                before = {id(s.parameter): s for s in snapshot_settings(inst)}
                error = safe_state(inst)
                after = snapshot_settings(inst)
                known = frozenset(
                    s.parameter.short_name for s in after
                    if id(s.parameter) in before
                    and not same_value(before[id(s.parameter)].value, s.value))
            else:
                error = safe_state(inst)
            if error:
                failures.append(error)
            keep[id(inst)] = known
        for inst, settings in snapshots:
            failures += restore_settings(settings, keep[id(inst)])
        if failures:
            raise RestoreError("after the light test: " + "; ".join(failures))
