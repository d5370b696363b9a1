"""Config validation shared by every config dataclass: types first, then ranges; one error each.

`ConfigError` names the key, the value and what is expected; `RunConfig.from_dict` prefixes the
file and section. Types come from the dataclass annotations (int, float, bool, str, X | None):
bools are not ints, 8.0 is not an int, ints are accepted for floats, floats must be finite.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration value of the wrong type, out of range, or inconsistent with another one.
    The message names the key (and, when read from a file, the file and section) and what is expected."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    _check(value in options, f"{name}={value!r} is not one of {', '.join(options)}; pick one of those")


def _positive(name: str, value: int | float) -> None:
    _check(value > 0, f"{name}={value} must be > 0")


def _at_least(name: str, value: int | float | None, lo: int | float) -> None:
    _check(value is None or value >= lo, f"{name}={value} must be >= {lo}")


_HINTS: dict[type, dict[str, Any]] = {}


def _typed(name: str, value: Any, hint: Any) -> Any:
    """value checked against a field annotation (int, float, bool, str, X | None): bools are not ints,
    ints are not floats' impostors (8.0 is refused for an int), floats are finite."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        _check(math.isfinite(value), f"{name}={value} must be a finite number")
        return float(value)
    elif isinstance(value, str) and str in allowed:
        return value
    names = " or ".join("None" if t is type(None) else f"{'an' if t is int else 'a'} {t.__name__}" for t in allowed)
    raise ConfigError(f"{name}={value!r} must be {names}, not {type(value).__name__}")


def _check_types(obj: Any, skip: tuple[str, ...] = ()) -> None:
    """Type-check (and normalise int -> float) every field of a config dataclass, before any range check."""
    cls = type(obj)
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    for f in dataclasses.fields(obj):
        if f.name not in skip:
            setattr(obj, f.name, _typed(f.name, getattr(obj, f.name), _HINTS[cls][f.name]))


def _section(d: dict[str, Any], key: str, source: str, *, required: bool, where: str | None = None) -> dict[str, Any]:
    where = where or key
    if key not in d or d[key] is None:
        _check(not required, f"{source}: missing [{where}] section")
        return {}
    _check(isinstance(d[key], dict), f"{source}: [{where}] is a {type(d[key]).__name__} {d[key]!r:.60}, expected a table")
    return dict(d[key])


def _build(cls: type, kw: dict[str, Any], source: str, section: str) -> Any:
    """cls(**kw), its errors prefixed with the file and section ('train.lr=...')."""
    prefix = f"{source}: " + (f"[{section}] " if section else "")
    try:
        return cls(**kw)
    except TypeError as e:  # a missing required field
        missing = re.findall(r"'(\w+)'", str(e))
        raise ConfigError(f"{prefix}missing required key(s) {missing or str(e)}") from None
    except ConfigError as e:
        if str(e).startswith(source):
            raise
        raise ConfigError(prefix + str(e)) from None


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _known_keys(d: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(d) - known, key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
