"""Recipes: YAML files validated into typed dataclasses before anything runs.

A recipe is a mapping whose keys are the fields of a stage's recipe dataclass (ours, or TRL's
config dataclass for the `training` section of trainer stages). Validation walks the YAML and
the dataclass together, so an unknown or mistyped key fails in one line that names the file,
the dotted key and the nearest valid name:

    recipes/tiny/sft.yaml: training.learnig_rate: unknown key (did you mean 'learning_rate'?)

`--set a.b=value` overrides parse `value` as YAML (numbers, booleans, lists) before validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class RecipeError(ValueError):
    """A recipe problem, phrased as one line: `file: key: what is wrong`."""


def _type_name(tp: Any) -> str:
    """A type as a recipe author writes it: `str | DataSource`, `list[str]` (no module paths)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if isinstance(origin, type) and args:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _fail(where: str, key: str, message: str) -> RecipeError:
    """`where: key: message`, leaving out an empty where or key (a dataclass's own check knows no file)."""
    return RecipeError(": ".join(part for part in (where, key, message) if part))


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _takes_shape_of(tp: Any, value: Any) -> bool:
    """Whether `tp` takes values of `value`'s container shape: a mapping for a dataclass, a list for a list type."""
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp)
    return isinstance(value, list) and typing.get_origin(tp) in (list, tuple, set)


def _check(value: Any, tp: Any, where: str, key: str) -> Any:
    """Return `value` converted to `tp` (ints to floats, mappings to dataclasses), or raise."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: dict[Any, RecipeError] = {}
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(value, arg, where, key)
            except RecipeError as e:
                errors[arg] = e
        # A mapping meant for a dataclass, or a list meant for the one list type: that member's
        # own error (e.g. an unknown nested key) says more.
        shaped = [a for a in errors if _takes_shape_of(a, value)]
        if len(shaped) == 1:
            raise errors[shaped[0]]
        raise _fail(where, key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _fail(where, key, f"must be one of {list(typing.get_args(tp))}, got {value!r}")
    if origin in (list, tuple, set):
        if not isinstance(value, list):
            raise _fail(where, key, f"expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_check(v, item_tp, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _fail(where, key, f"expected a mapping, got {type(value).__name__} {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {k: _check(v, val_tp, where, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(where, key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, where, prefix=f"{key}.")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if value in allowed or isinstance(value, tp):
            return value
        raise _fail(where, key, f"must be one of {allowed}, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 3e-3 as a string
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _fail(where, key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def check_keys(cls: type, data: dict, where: str, prefix: str = "") -> dict[str, Any]:
    """Validate `data` against dataclass `cls` without constructing it; returns converted values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    out = {}
    for k, v in data.items():
        if k not in names:
            raise _fail(where, f"{prefix}{k}", f"unknown key{_suggest(k, names)}")
        out[k] = _check(v, hints[k], where, f"{prefix}{k}")
    return out


def check_choices(key: str, chosen: list[str], known: Iterable[str], what: str, allow_empty: bool = False) -> None:
    """A list key that picks from `known` (operations, detail levels, constraint kinds): for a recipe's
    `__post_init__`, a ValueError naming the key when the list is empty, names an unknown one or repeats one."""
    known = list(known)
    if not chosen and not allow_empty:
        raise ValueError(f"{key}: must list at least one of {', '.join(known)}")
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise ValueError(f"{key}: unknown {what} {unknown[0]!r} (known: {', '.join(known)})")
    repeated = [c for i, c in enumerate(chosen) if c in chosen[:i]]
    if repeated:
        raise ValueError(f"{key}: {what} {repeated[0]!r} is listed twice")


def build(cls: type, data: dict, where: str, prefix: str = "") -> Any:
    """Construct dataclass `cls` from a mapping, validating every key and value."""
    values = check_keys(cls, data, where, prefix)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.name not in values
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise _fail(where, f"{prefix}{missing[0]}", "required key is missing")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        message = str(e).splitlines()[0]
        name, sep, reason = message.partition(": ")
        if sep and name in {f.name for f in dataclasses.fields(cls)}:  # a check in __post_init__ naming its field
            raise _fail(where, f"{prefix}{name}", reason) from None
        raise _fail(where, prefix.rstrip("."), message) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], parsed YAML value)."""
    if "=" not in text:
        raise RecipeError(f"--set {text}: expected key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise RecipeError(f"--set {text}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key.sub=value` overrides; a number after a list's key is its index (`generators.0.n=4`)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"--set {text}: {'.'.join(path[:depth])} has {len(node)} items; "
                                      f"{part!r} is not one of their indices")
                part = int(part)
            elif not last and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            if last:
                node[part] = value
            else:
                node = node[part]
    return data


def read_yaml(path: str | os.PathLike, what: str = "recipe") -> dict:
    """A YAML file's mapping (an empty file is an empty one); any problem raises RecipeError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: {what} file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError(f"{path}: {line}invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} file must be a mapping of keys to values")
    return data


def load_file(cls: type, path: str | os.PathLike, what: str) -> Any:
    """A YAML file that a recipe names (a constitution, ontology refinements) as dataclass `cls`, checked the way
    recipes are: every problem is one line naming the file and the key."""
    return build(cls, read_yaml(path, what), str(path))


def to_plain(obj: Any) -> Any:
    """Dataclasses and enums to plain YAML-able values (for saving the resolved recipe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_plain(obj), sort_keys=False, allow_unicode=True)
