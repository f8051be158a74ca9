"""Recipes: dataclass defaults <- a YAML recipe <- dotted key=value overrides, resolved into a RunConfig.

A recipe is a built-in name (orchestrator/recipes/NAME.yaml) or a path to a YAML file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from workers.config import ConfigError, RunConfig, teacher_location
from workers.configure import build, check_prompt_files, set_dotted, to_dict

RECIPE_DIR = Path(__file__).parent / "recipes"


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(recipe: str | Path | None) -> dict[str, Any]:
    """The recipe's nested mapping; None means no recipe (defaults only)."""
    if recipe is None:
        return {}
    path = Path(recipe)
    if not path.suffix and not path.exists():
        path = RECIPE_DIR / f"{recipe}.yaml"
    if not path.is_file():
        raise ConfigError("recipe", f"no recipe file {str(recipe)!r}; give a YAML path or one of the built-in "
                                    f"recipes: {', '.join(builtin_recipes())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("recipe", f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("recipe", f"{path} must hold a mapping of sections (teacher:, loss:, ...), "
                                    f"not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'loss.diversity_weight=0.1' -> (['loss', 'diversity_weight'], 0.1); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(key or text, f"override {text!r} must look like section.key=value, "
                                       "e.g. loss.diversity_weight=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of data with each dotted override set; intermediate sections are created as needed."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(data, ".".join(path), value)
    return data


# Local paths that workers, actors and Tune trials (which run in other working directories) must find.
PATH_KEYS = (("storage", "output_dir"), ("storage", "trajectory_root"), ("storage", "teacher_cache"), ("teacher", "path"),
             ("trajectories", "prompts"), ("evaluation", "prompts"), ("evaluation", "dino_path"),
             ("evaluation", "clip_path"), ("evaluation", "pickscore_path"), ("evaluation", "imagereward_path"),
             ("loss", "lpips_weights"))


def resolve(recipe: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The validated RunConfig for a recipe plus overrides, local paths made absolute (URLs such as
    s3://... are kept), its prompt files read. Raises ConfigError naming the bad key."""
    config = resolve_mapping(load_recipe(recipe), overrides)
    check_prompt_files(config)  # here, so that every command refuses a bad one before it starts
    return config


def resolve_mapping(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """resolve() for a recipe already read, such as the config.yaml a trajectory store keeps."""
    config = build(RunConfig, apply_overrides(data, overrides or []))
    for section, key in PATH_KEYS:
        value = getattr(getattr(config, section), key)
        if (section, key) == ("teacher", "path") and value and teacher_location(value) in ("hub", "builtin"):
            continue
        if value and "://" not in value:
            setattr(getattr(config, section), key, str(Path(value).expanduser().absolute()))
    return config


def dump(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save(config: RunConfig, directory: str | Path) -> Path:
    """Write the resolved config as config.yaml in directory; the same file resolves back to config."""
    path = Path(directory) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump(config))
    return path
