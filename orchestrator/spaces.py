"""Search spaces: the YAML files of tune_spaces/ (or a path), their grid points, a trial's name and title, and
its config (the run's config with the trial's values set). Shared by `dpdmd sweep`, `dpdmd fidelity` and the
demo."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import yaml

import tune_spaces
from workers.config import ConfigError, RunConfig
from workers.configure import build, config_keys, set_dotted

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
        for value in values if kind in ("grid", "choice") else []:
            build(RunConfig, set_dotted({}, key, value))  # each value must resolve on its own
    return space


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
