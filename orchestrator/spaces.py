"""Search spaces: the YAML files of tune_spaces/ (or a path), their grid points, a trial's name and title, and
its config (the run's config with the trial's values set). Shared by `dpdmd sweep`, `dpdmd fidelity` and the
demo."""

from __future__ import annotations

import copy
import itertools
import typing
from pathlib import Path
from typing import Any

import yaml

import tune_spaces
from workers.config import ConfigError, RunConfig
from workers.configure import NUMBER, build, config_keys, set_dotted, type_name

PBT_KEYS = ("loss.diversity_weight", "critic.optim.lr")  # what population-based training perturbs

SPACE_DIR = Path(tune_spaces.__file__).resolve().parent


KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


def load_space(name: str) -> dict[str, dict]:
    """A search space: {dotted key: {kind: values}}, every key a real config field, every listed value valid."""
    path = Path(name) if Path(name).suffix else SPACE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))
        raise ConfigError("sweep.space", f"no search space {name!r}; give a YAML path or one of {known}")
    space = yaml.safe_load(path.read_text()) or {}
    keys = set(config_keys())
    for key, spec in space.items():
        if key not in keys:
            raise ConfigError(key, f"in search space {path.name}: not a config key (e.g. loss.diversity_weight)")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(key, f"in search space {path.name}: give one of {list(KINDS)}, e.g. {{grid: [0, 0.05]}}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values or (kind not in ("grid", "choice") and len(values) != 2):
            raise ConfigError(key, f"in search space {path.name}: {kind} needs "
                                   + ("a non-empty list" if kind in ("grid", "choice") else "[low, high]"))
        if kind not in ("grid", "choice"):
            spec[kind] = _range(key, kind, values, path.name)  # Tune draws from these
            # a range's low end and, for randint, the last whole number it draws (Tune's high is left out; a
            # continuous range's high end is never drawn either, and a key may be open there: 0 <= x < 1)
            values = [spec[kind][0]] + ([spec[kind][1] - 1] if kind == "randint" else [])
        for value in values:
            build(RunConfig, set_dotted({}, key, value))  # each value must resolve on its own
    return space


def _range(key: str, kind: str, values: list, where: str) -> list:
    """A range's [low, high] as the numbers Tune draws between, or the error that names the key and the file
    (Tune's own named neither, and came after the sweep's run directory existed): ends that are not numbers in
    order, loguniform from 0, fractions for a key of whole numbers (which failed every trial) or whole numbers
    (randint) for a key of fractions. YAML's 1e-5 (no dot) is a string: read as the number it is."""
    values = [float(v) if isinstance(v, str) and NUMBER.fullmatch(v.strip()) else v for v in values]
    low, high = values
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or not low < high:
        raise ConfigError(key, f"in search space {where}: {kind} needs [low, high] with low < high, got {values}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(key, f"in search space {where}: loguniform needs low > 0 (it draws the logarithm), got "
                               f"{values}; use uniform to include 0")
    field = _field_type(key)
    whole = field is int
    if kind == "randint":
        if not (whole and all(isinstance(v, int) for v in values)):
            raise ConfigError(key, f"in search space {where}: randint draws whole numbers between two whole numbers; "
                                   f"{key} takes {type_name(field)}, got {values}")
        return values
    if whole:
        raise ConfigError(key, f"in search space {where}: {kind} draws fractions, and {key} takes whole numbers; use "
                               "randint (or a grid)")
    return [float(low), float(high)]


def _field_type(key: str) -> Any:
    """The annotation of a dotted config key's field, e.g. int for loss.anchor_step."""
    cls: Any = RunConfig
    for part in key.split("."):
        cls = typing.get_type_hints(cls)[part]
    return cls


def tune_param_space(space: dict[str, dict]) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def grid_points(space: dict[str, dict]) -> list[dict]:
    """Every combination of the grid and choice values (to precompute the stores trials will share)."""
    fixed = {k: next(iter(s.values())) for k, s in space.items() if next(iter(s)) in ("grid", "choice")}
    return [dict(zip(fixed, combo)) for combo in itertools.product(*fixed.values())] if fixed else [{}]


def trial_name(params: dict) -> str:
    """A trial's directory from its parameters, e.g. diversity_weight=0.05-seed=1 (six significant digits:
    trials an optimizer samples must not share one)."""
    return "-".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in sorted(params.items())) or "trial"


# the paper's symbols for the settings a sweep varies most
SYMBOLS = {"loss.diversity_weight": "lambda", "loss.anchor_step": "K"}


def trial_title(params: dict) -> str:
    """A trial's MLflow run name: its settings with short numbers, the paper's symbols first, e.g.
    `lambda=0.05 K=5 seed=1` (a sampled 0.0512345678 reads 0.0512)."""
    order = sorted(params, key=lambda k: (k not in SYMBOLS, list(SYMBOLS).index(k) if k in SYMBOLS else 0, k))
    return " ".join(f"{SYMBOLS.get(k, k.split('.')[-1])}={params[k]:.3g}" if isinstance(params[k], float)
                    else f"{SYMBOLS.get(k, k.split('.')[-1])}={params[k]}" for k in order) or "trial"


def trial_config(base: dict, params: dict, **extra: Any) -> RunConfig:
    data = copy.deepcopy(base)
    for key, value in {**params, **extra}.items():
        set_dotted(data, key, value)
    return build(RunConfig, data)
