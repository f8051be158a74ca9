"""The registry of teacher families: a name in teacher.family -> the module that implements it.

Modules are imported only when a family is used, so that naming a family costs nothing. Each provides
load_teacher(path, LoadOptions) -> (adapter, net), save_teacher(adapter, net, path), training_prompts(),
eval_prompts(), evaluate_samples(images, prompts, seed), render(...), DIVERSITY and QUALITY; embedded
families also new_teacher(width, seed) and training_batch(batch_size, generator).
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES: dict[str, str] = {
    "toy2d": "models.toy2d",
    "shapes": "models.shapes",
    "sd3": "models.sd3",
    "sdxl": "models.sdxl",
}

# Pretrained families: the diffusers pipeline class each loads. They have no embedded teacher, so
# teacher.path is required.
FAMILY_PIPELINES: dict[str, str] = {
    "sd3": "StableDiffusion3Pipeline",
    "sdxl": "StableDiffusionXLPipeline",
}


def family_module(name: str) -> ModuleType:
    """The module of a family; it provides load_teacher(path, options) and the family's defaults."""
    if name not in FAMILIES:
        raise KeyError(f"unknown teacher family {name!r}; choose one of {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
