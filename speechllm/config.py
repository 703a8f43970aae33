"""YAML configs mapped onto typed dataclasses.

A config file may start with ``base: <file>`` (relative to itself) and hold only the keys it changes;
command-line overrides (``"lr=1e-3 align.steps=600"``) apply last. Unknown keys and values of the wrong
type are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import shlex
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from speechllm.io_utils import InputError

T = TypeVar("T")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the annotated type: int -> float, a YAML string such as ``1e-3`` -> float, a mapping
    -> a nested config; anything else that does not fit is an error naming ``where``."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return from_dict(option, value, where)
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except ValueError:
                continue
        if option is Any:
            return value
        kind = typing.get_origin(option) or option  # dict[str, int] -> dict
        if isinstance(kind, type) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise InputError(f"{where}: expected {names}, got {value!r}")


def from_dict(cls: type[T], values: dict[str, Any], source: str = "<dict>") -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"{source}: unknown config key(s) {unknown} for {cls.__name__}; "
                         f"valid keys: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    typed = {key: _coerce(value, hints[key], f"{source}: {key}") for key, value in values.items()}
    try:
        return cls(**typed)
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise InputError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return data


def merge(base: dict[str, Any], changes: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``changes`` over ``base``, nested mappings merged key by key; a mapping over a value (or the
    reverse) is an error naming the key."""
    out = dict(base)
    for key, value in changes.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = merge(old, value, f"{where}{key}.")
        elif key in out and old is not None and value is not None and isinstance(value, dict) != isinstance(old, dict):
            raise InputError(f"{where}{key}: cannot set {value!r} over {old!r} (a block and a single value)")
        else:
            out[key] = value
    return out


def defaults(cls: type) -> dict[str, Any]:
    """The default value of every field of ``cls`` that has one, nested configs as mappings."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def load_config(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config with its ``base:`` chain resolved (the file's own keys win)."""
    path = Path(path).resolve()
    if path in seen:
        raise InputError(f"{path}: 'base:' chain loops back to itself")
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    return merge(load_config(path.parent / base, (*seen, path)), data)


def parse_overrides(text: str, source: str = "--train_args") -> dict[str, Any]:
    """``"lr=1e-3 align.steps=600"`` as a nested mapping; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in shlex.split(text or ""):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"{source}: expected key=value, got {item!r}")
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[last] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as e:
            raise InputError(f"{source}: {key}: {value!r} is not a YAML value ({e.problem})") from None
    return out


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every key whose value differs, nested keys dotted."""
    lines = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def load_yaml_dataclass(path: str | Path, cls: type[T], overrides: dict[str, Any] | None = None,
                        source: str | None = None) -> T:
    """A config file (``base:`` chain resolved) over the class's defaults, nested blocks merged key by
    key, then ``overrides`` (from the command line), as a typed ``cls``."""
    values = merge(merge(defaults(cls), load_config(path)), overrides or {})
    return from_dict(cls, values, source or str(path))


def record_config(path: Path, config: Any, check: bool) -> None:
    """Write a run's resolved config (a dataclass) to ``path``. With ``check`` (the run resumes), one
    recorded before that resolves differently is refused: a resumed run trains on what it started with."""
    resolved = dataclasses.asdict(config)
    if check and path.exists():
        hint = "resume with the recorded config, train into a new experiment dir (--tag), or force the new " \
               "config (--force_config true)"
        try:
            recorded = dataclasses.asdict(load_yaml_dataclass(path, type(config)))
        except InputError as e:
            raise InputError(f"{e}\n{path} is this experiment's recorded config: {hint}") from None
        changed = differences(recorded, resolved)
        if changed:
            raise InputError(f"{path} records another config for this experiment:\n  " + "\n  ".join(changed)
                             + f"\n{hint}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
