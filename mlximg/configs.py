"""Config dataclasses checked field by field against their annotations, so that a bad config.json or a bad
setting is an error naming the file and the field, not a ZeroDivisionError or a TypeError modules later.

A config dataclass calls `check_fields(self)` in `__post_init__` (minimums go in a field's metadata, see
`at_least`) and adds its own checks of how fields relate; `from_dict` builds one from JSON.
"""

import math
import types
import typing
from dataclasses import MISSING, field, fields

MAX_INT = 2**31 - 1  # larger sizes and counts overflow MLX's shapes long before they are meaningful


def at_least(minimum, default=MISSING):
    """A dataclass field whose value (or, for a tuple, each element) must be >= `minimum`."""
    return field(default=default, metadata={"min": minimum})


def _optional(kind) -> tuple[bool, object]:
    """(whether None is allowed, the type without None) of an annotation such as `float | None`."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        others = [k for k in typing.get_args(kind) if k is not type(None)]
        return len(others) < len(typing.get_args(kind)), others[0] if len(others) == 1 else typing.Any
    return False, kind


_NOUNS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a finite number", "finite numbers"),
          str: ("a string", "strings")}


def _describe(kind, minimum) -> str:
    bound = f" >= {minimum}" if minimum is not None else ""
    if kind in _NOUNS:
        return _NOUNS[kind][0] + bound
    element = next((a for a in typing.get_args(kind) if a is not Ellipsis), None)
    return f"a list of {_NOUNS[element][1]}{bound}" if element in _NOUNS else "a list"


def checked(kind, value, name: str, minimum=None):
    """`value` checked against the annotation `kind` (bool, int, float, str, tuple[...], optional forms) and
    normalised (ints to floats, lists to tuples); a ValueError names `name` otherwise."""
    allows_none, kind = _optional(kind)
    if value is None and allows_none:
        return None
    origin = typing.get_origin(kind) or kind
    error = ValueError(f"{name} must be {_describe(kind, minimum)}, got {value!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise error
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise error
        if not math.isfinite(value) or abs(value) > MAX_INT or (minimum is not None and value < minimum):
            raise error
        return float(value) if kind is float else value
    if kind is str:
        if not isinstance(value, str):
            raise error
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise error
        args = [a for a in typing.get_args(kind) if a is not Ellipsis]
        if len(typing.get_args(kind)) > 1 and Ellipsis not in typing.get_args(kind) and len(value) != len(args):
            raise ValueError(f"{name} must have {len(args)} entries, got {value!r}")
        element = args[0] if args else typing.Any
        return tuple(v if element is typing.Any else checked(element, v, f"{name} entries", minimum) for v in value)
    return value


def check_fields(config, prefix: str = "") -> None:
    """Check and normalise every field of the dataclass instance `config` in place (see `checked`)."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = checked(hints[f.name], getattr(config, f.name), f"{prefix}{f.name}", f.metadata.get("min"))
        object.__setattr__(config, f.name, value)


def from_dict(cls, values, source: str | None = None, *, strict: bool = False):
    """`cls` from a JSON object. Keys `cls` does not know are ignored (checkpoint configs carry _class_name and
    more) unless `strict`; a null stands for the default where the field takes no None. Errors start with
    `source` (a file, or the settings' name) unless they name it already."""
    if not isinstance(values, dict):
        raise ValueError(f"{source or 'config'}: expected a JSON object, got {type(values).__name__} {values!r:.60}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if strict and unknown:
        raise ValueError(f"unknown {source} settings {unknown}; known: {sorted(known)}")
    given = {k: v for k, v in values.items() if k in known and (v is not None or _optional(hints[k])[0])}
    try:
        return cls(**given)
    except ValueError as error:
        if source is None or str(error).startswith(source):
            raise
        raise ValueError(f"{source}: {error}") from error
