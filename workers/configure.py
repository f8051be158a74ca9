"""Building configs from plain data: nested dicts (YAML recipes, dotted overrides, Tune points) into the typed
dataclasses of workers/config.py, checked field by field; and the dotted-key helpers everything else uses."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from workers.config import ConfigError, RunConfig

NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly coerce: int -> float) a plain value against a field's annotation."""
    if isinstance(value, float) and not math.isfinite(value):  # YAML's .inf and .nan; no field takes them
        raise _not_finite(key, value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except NotFinite:  # a number, of the wrong size: that is what to say
                raise
            except ConfigError:
                pass
        raise ConfigError(key, f"expected {' or '.join(type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > 1e308:  # float() of it overflows
                raise _not_finite(key, value)
            return float(value)
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise _not_finite(key, value)  # YAML 1.1 reads nan and inf (no dot) as strings
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            number = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
            if not math.isfinite(number):  # 1e999
                raise _not_finite(key, value)
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (bool, str):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")
    raise ConfigError(key, f"expected {type_name(tp)}, got {value!r} ({type(value).__name__})")


class NotFinite(ConfigError):
    """A float field given inf, nan or a number too large for a float."""


def _not_finite(key: str, value: Any) -> NotFinite:
    return NotFinite(key, f"expected a finite number, got {value!r}: give a number such as 0.5 or 1e-4")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def build(cls: type, data: Mapping[str, Any] | None, prefix: str = ""):
    """Build dataclass cls from a nested mapping; missing keys take defaults, unknown keys are errors."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"did you mean {_join(prefix, close[0])!r}? " if close else ""
        raise ConfigError(_join(prefix, str(key)),
                          f"unknown key; {hint}valid keys here: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], _join(prefix, name)
        kwargs[name] = build(tp, value, key) if dataclasses.is_dataclass(tp) else _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # __post_init__ names keys relative to its own section
        raise ConfigError(_join(prefix, err.key), err.message) from None


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config class, e.g. 'loss.diversity_weight'."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        key = _join(prefix, name)
        keys.extend(config_keys(tp, key) if dataclasses.is_dataclass(tp) else [key])
    return keys


def set_dotted(data: dict, key: str, value: Any) -> dict:
    """data with data[a][b][c] = value for key 'a.b.c', sections created as needed; a value in the way is an
    error naming it."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is a value, not a section; cannot set {key}")
    node[parts[-1]] = value
    return data


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'loss': {'anchor_step': 5}} -> {'loss.anchor_step': 5}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


MAX_PROMPT_CHARS = 2000  # far beyond any text encoder's context (CLIP: 77 tokens, T5: 256-512)


def read_prompts(path: str, key: str = "prompts") -> list[str]:
    """Prompts from a UTF-8 text file, one a line; blank lines and lines starting with # are skipped. A file that
    cannot be one (missing, not UTF-8, no prompts, a line too long to be one prompt) is a ConfigError naming key,
    the file, the line and the fix."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(key, f"prompt file {path} does not exist: give a text file with one prompt a line")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(key, f"prompt file {path} is not UTF-8 text (line {line} holds the byte "
                               f"{data[err.start:err.start + 1]!r}): save it as UTF-8") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if len(line) > MAX_PROMPT_CHARS:
            raise ConfigError(key, f"prompt file {path}, line {number}: {len(line)} characters, more than one prompt "
                                   f"can be ({MAX_PROMPT_CHARS}): the file takes one prompt a line, as plain text")
        if line and not line.startswith("#"):
            prompts.append(line)
    if not prompts:
        raise ConfigError(key, f"prompt file {path} holds no prompts: write one prompt a line (lines starting with # "
                               "are comments)")
    return prompts


def check_prompt_files(config: RunConfig) -> None:
    """Read every prompt file the config names, so that a bad one is refused before any work starts."""
    for key, path in (("trajectories.prompts", config.trajectories.prompts),
                      ("evaluation.prompts", config.evaluation.prompts)):
        if path:
            read_prompts(path, key)
