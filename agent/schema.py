"""Strict loading of untrusted JSON/TOML data into frozen dataclasses.

Model cards ride inside signed metadata, configs come from disk and messages from the network:
all of it is untrusted. This module turns a parsed mapping into typed, frozen dataclasses and
rejects anything unexpected with one line that names the key path, the value and what was
expected. Unknown keys are errors (wire messages opt out, see :func:`load`). Sizes are bounded
through field metadata.

It imports nothing from the project, so every layer (supply chain, protocol, runtime, pipeline)
may use it.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None``,
``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[str, X]`` and nested dataclasses.

Field metadata keys (all optional), set with :func:`field_meta`:
    ``doc``      one-line description, shown in documentation and errors
    ``min``/``max``  inclusive numeric bounds
    ``max_len``  upper bound on the length of a string, tuple or mapping
    ``min_len``  lower bound on the length of a string, tuple or mapping
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

__all__ = ["SchemaError", "dump", "field_meta", "load"]

T = TypeVar("T")

_MAX_STR_DEFAULT = 4096
_MAX_ITEMS_DEFAULT = 4096


class SchemaError(ValueError):
    """Data does not match its schema; the message names the key path and what was expected."""


def field_meta(
    doc: str,
    *,
    min: float | None = None,
    max: float | None = None,
    max_len: int | None = None,
    min_len: int | None = None,
) -> dict[str, Any]:
    """Build the ``metadata`` mapping of a dataclass field."""
    meta: dict[str, Any] = {"doc": doc}
    if min is not None:
        meta["min"] = min
    if max is not None:
        meta["max"] = max
    if max_len is not None:
        meta["max_len"] = max_len
    if min_len is not None:
        meta["min_len"] = min_len
    return meta


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return f"an object of {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"an object ({getattr(tp, '__name__', tp)})"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _check_len(path: str, value: Any, meta: Mapping[str, Any], default_max: int) -> None:
    max_len = meta.get("max_len", default_max)
    if len(value) > max_len:
        raise SchemaError(f"{path}: expected at most {max_len} items/characters, got {len(value)}")
    min_len = meta.get("min_len")
    if min_len is not None and len(value) < min_len:
        raise SchemaError(f"{path}: expected at least {min_len} items/characters, got {len(value)}")


def _convert(path: str, tp: Any, value: Any, meta: Mapping[str, Any], lax: bool = False) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or isinstance(value, bool) != any(
            isinstance(c, bool) for c in choices
        ):
            raise SchemaError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        tagged = _tagged_members(args)
        if tagged is not None:
            return _convert_tagged(path, tagged, value, lax)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(path, arg, value, meta, lax)
            except SchemaError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise SchemaError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SchemaError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            _check_len(path, value, meta, _MAX_ITEMS_DEFAULT)
            item_meta = {k: v for k, v in meta.items() if k in ("min", "max")}
            return tuple(
                _convert(f"{path}[{i}]", args[0], v, item_meta, lax) for i, v in enumerate(value)
            )
        if len(value) != len(args):
            raise SchemaError(f"{path}: expected {_type_name(tp)}, got {len(value)} items")
        item_meta = {k: v for k, v in meta.items() if k in ("min", "max")}
        return tuple(
            _convert(f"{path}[{i}]", a, v, item_meta, lax)
            for i, (a, v) in enumerate(zip(args, value, strict=False))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise SchemaError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
        _check_len(path, value, meta, _MAX_ITEMS_DEFAULT)
        _key_tp, val_tp = get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SchemaError(f"{path}: expected string keys, got {_show(k)}")
            if len(k) > _MAX_STR_DEFAULT:
                raise SchemaError(f"{path}: key longer than {_MAX_STR_DEFAULT} characters")
            out[k] = _convert(f"{path}.{k}", val_tp, v, {}, lax)
        return out
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _load_dataclass(path, tp, value, lax)
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{path}: expected a boolean, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{path}: expected an integer, got {_show(value)}")
        _check_range(path, value, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{path}: expected a number, got {_show(value)}")
        if not math.isfinite(value):
            raise SchemaError(f"{path}: expected a finite number, got {_show(value)}")
        _check_range(path, value, meta)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(f"{path}: expected a string, got {_show(value)}")
        _check_len(path, value, meta, _MAX_STR_DEFAULT)
        return value
    raise TypeError(f"{path}: unsupported schema type {tp!r}")  # a bug in the schema, not the data


def _tagged_members(args: tuple[Any, ...]) -> dict[str, type] | None:
    """Map each ``kind`` tag to its dataclass, if every non-null member is tagged so."""
    members = [a for a in args if a is not type(None)]
    tags: dict[str, type] = {}
    for member in members:
        if not (dataclasses.is_dataclass(member) and isinstance(member, type)):
            return None
        kind = _hints(member).get("kind")
        if kind is None or get_origin(kind) is not Literal or len(get_args(kind)) != 1:
            return None
        tags[get_args(kind)[0]] = member
    return tags


def _convert_tagged(path: str, tagged: dict[str, type], value: Any, lax: bool = False) -> Any:
    if not isinstance(value, Mapping):
        raise SchemaError(f"{path}: expected an object with a 'kind' key, got {_show(value)}")
    kind = value.get("kind")
    member = tagged.get(kind) if isinstance(kind, str) else None
    if member is None:
        choices = ", ".join(repr(k) for k in tagged)
        raise SchemaError(f"{path}.kind: expected one of {choices}, got {_show(kind)}")
    return _load_dataclass(path, member, value, lax)


def _check_range(path: str, value: float, meta: Mapping[str, Any]) -> None:
    low = meta.get("min")
    high = meta.get("max")
    if low is not None and value < low:
        raise SchemaError(f"{path}: expected a value >= {low}, got {_show(value)}")
    if high is not None and value > high:
        raise SchemaError(f"{path}: expected a value <= {high}, got {_show(value)}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        module = typing.cast(Any, __import__(cls.__module__, fromlist=["_"]))
        hints = get_type_hints(cls, globalns=vars(module))
        _HINTS[cls] = hints
    return hints


def _load_dataclass(path: str, cls: type[T], value: Any, lax: bool = False) -> T:
    if not isinstance(value, Mapping):
        raise SchemaError(f"{path}: expected {_type_name(cls)}, got {_show(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(value) - set(fields))
    if unknown and not lax:
        allowed = ", ".join(sorted(fields))
        raise SchemaError(f"{path}: unknown key {unknown[0]!r} (allowed: {allowed})")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaError(f"{sub}: required key is missing ({_type_name(hints[name])})")
            continue
        kwargs[name] = _convert(sub, hints[name], value[name], f.metadata, lax)
    try:
        return cls(**kwargs)
    except SchemaError:
        raise
    except (TypeError, ValueError) as exc:  # __post_init__ cross-field checks
        raise SchemaError(f"{path or cls.__name__}: {exc}") from exc


def load(cls: type[T], data: Any, *, path: str = "", ignore_unknown: bool = False) -> T:
    """Validate ``data`` (parsed JSON/TOML) against dataclass ``cls`` and build it.

    ``ignore_unknown`` drops keys the schema does not define, at every nesting level, instead of
    rejecting them: wire messages use it so newer senders can add fields (forward compatibility).
    Known keys are still checked as strictly. Configs and model cards keep the default (reject).

    Raises:
        SchemaError: with the key path, the offending value and what was expected.
    """
    return _load_dataclass(path, cls, data, ignore_unknown)


def dump(obj: Any) -> Any:
    """Turn a schema dataclass back into plain JSON-compatible data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: dump(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [dump(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dump(v) for k, v in obj.items()}
    return obj
