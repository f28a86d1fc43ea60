"""Configs are dataclasses; a TOML file and `--set a.b=c` overrides fill them in.

Unknown keys and wrong types are errors that list what is valid. The resolved config (every
default filled in) is written back to the run dir as `config.toml`, so a run can be repeated.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from tinylm.errors import UserError
from tinylm.files import atomic_write_text

T = TypeVar("T")

PRESET_DIR = Path(__file__).parent / "configs"


def preset_path(name_or_path: str) -> Path:
    """A config file path, or the name of a shipped preset (`shakespeare-char`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{path.stem}.toml"
    if preset.is_file() and path.parent in (Path("."), Path("configs")):
        return preset
    names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
    raise UserError(f"config {name_or_path!r} not found; give a TOML file or a preset: {names}")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e}); fix the file") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['train.steps=100', 'model.depth=4'] -> {'train': {'steps': 100}, 'model': {'depth': 4}}."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # bare words are strings: --set data.corpus=tinystories
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_value(name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                return _check_value(name, option, value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{name} must be a list, got {value!r}")
        return [_check_value(name, typing.get_args(hint)[0], v) for v in value]
    if origin is dict:  # keys may come as strings (JSON objects): "17" -> 17 for dict[int, ...]
        if not isinstance(value, dict):
            raise UserError(f"{name} must be a table, got {value!r}")
        key_type, value_type = typing.get_args(hint)
        out = {}
        for k, v in value.items():
            if key_type is int and isinstance(k, str) and k.lstrip("-").isdigit():
                k = int(k)
            out[_check_value(f"{name} key", key_type, k)] = _check_value(f"{name}[{k}]",
                                                                         value_type, v)
        return out
    if isinstance(hint, type) and not isinstance(value, hint) or (
        hint is int and isinstance(value, bool)
    ):
        raise UserError(f"{name} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Make dataclass `cls` from a nested dict; unknown keys and wrong types are UserErrors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        valid = ", ".join(prefix + k for k in fields)
        raise UserError(f"unknown config key {prefix + unknown[0]!r}; valid keys here: {valid}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"{prefix + key} must be a table of keys, got {value!r}")
            kwargs[key] = build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_value(prefix + key, hint, value)
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ validation
        raise UserError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def load(cls: type[T], path: str | None = None, overrides: list[str] | None = None) -> T:
    data = read_toml(preset_path(path)) if path else {}
    return build(cls, merge(data, parse_overrides(overrides or [])))


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}


def save(cfg: Any, path: Path) -> None:
    atomic_write_text(path, tomli_w.dumps(_drop_none(to_dict(cfg))))


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
