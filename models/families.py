"""The registry of teacher families: a name in teacher.family -> the module that implements it.

Modules are imported only when a family is used, so that naming a family costs nothing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES: dict[str, str] = {
    "toy2d": "models.toy2d",
    "shapes": "models.shapes",
}


def family_module(name: str) -> ModuleType:
    """The module of a family; it provides build_adapter(teacher_dir) and the family's defaults."""
    if name not in FAMILIES:
        raise KeyError(f"unknown teacher family {name!r}; choose one of {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
