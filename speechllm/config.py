"""YAML configs mapped onto dataclasses; unknown keys are errors that name the file and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from speechllm.io_utils import InputError

T = TypeVar("T")


def from_dict(cls: type[T], values: dict[str, Any], source: str = "<dict>") -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"{source}: unknown config key(s) {unknown} for {cls.__name__}; "
                         f"valid keys: {sorted(names)}")
    try:
        return cls(**values)
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


def load_yaml_dataclass(path: str | Path, cls: type[T], overrides: dict[str, Any] | None = None) -> T:
    data = load_yaml(path)
    data.update(overrides or {})
    return from_dict(cls, data, str(path))
