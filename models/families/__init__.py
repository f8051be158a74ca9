"""The registry of teacher families: a name in teacher.family -> the Family its module defines.

A Family says in one typed object what a family has: how its teacher loads and saves, its built-in prompts, its
metrics and the columns of its tables, and either a trainer (embedded families, trained here) or the diffusers
pipeline class it loads (pretrained families). Its adapter (models.adapter) hides the rest. Modules are imported
only when a family is used, so that naming a family costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.adapter import LoadOptions, TeacherAdapter

MODULES: dict[str, str] = {
    "toy2d": "models.families.toy2d",
    "shapes": "models.families.shapes",
    "sd3": "models.families.sd3",
    "sdxl": "models.families.sdxl",
}
NAMES = tuple(MODULES)

SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"  # teachers and evaluators in the repository

Objective = tuple[str, int]
"""A metric and its direction: +1 if higher is better, -1 if lower is."""


@dataclass(frozen=True)
class TeacherTrainer:
    """What `dpdmd train-teacher` needs of an embedded family: a fresh (adapter, net) for (width, seed), and
    batches of data x0 (B, ...) with their prompts for (batch_size, generator)."""

    new_teacher: Callable[[int, int], tuple[TeacherAdapter, nn.Module]]
    training_batch: Callable[[int, torch.Generator], tuple[torch.Tensor, list[str]]]


@dataclass(frozen=True)
class Family:
    """One teacher family. Exactly one of trainer (embedded: trained here) and pipeline_class (pretrained: the
    diffusers pipeline that teacher.path holds) is set."""

    name: str
    load_teacher: Callable[[Path, LoadOptions], tuple[TeacherAdapter, nn.Module]]
    save_teacher: Callable[[TeacherAdapter, nn.Module, Path], None]
    # Metrics of decoded samples (B, ...) for prompt-major prompts; seed draws the real-data reference.
    evaluate_samples: Callable[[torch.Tensor, list[str], int], dict[str, float]]
    # One picture of several models' samples (name -> (B, ...)) for the same prompt-major prompts.
    render: Callable[[dict[str, torch.Tensor], list[str], Path], Path]
    diversity: Objective  # the sweep's two objectives
    quality: Objective
    fidelity_columns: tuple[str, ...] = ()  # the fidelity table's metric columns; () = diversity, quality
    gap_metrics: tuple[str, ...] = ()  # metrics with a gap-recovered column; () = diversity
    # Built-in prompts for training and evaluation (a closed domain: evaluation holds out seeds, not prompts);
    # () = none: trajectories.prompts and evaluation.prompts must name prompt files.
    prompts: tuple[str, ...] = ()
    trainer: TeacherTrainer | None = None
    shipped_teacher: Path | None = None  # a teacher trained with the family's recipe, in the repository
    pipeline_class: str | None = None
    anchor_scheduler: str = "FlowMatchEulerDiscreteScheduler"  # the teacher ODE the anchors follow (store key)
    # The live diversity metric (higher is better) a sweep's collapse guard compares with the teacher's; None = the
    # diversity objective when higher is better, and no guard otherwise.
    collapse: str | None = None

    def __post_init__(self):
        if (self.trainer is None) == (self.pipeline_class is None):
            raise ValueError(f"family {self.name}: give a trainer (embedded) or a pipeline_class (pretrained), "
                             "exactly one")
        if not self.fidelity_columns:
            object.__setattr__(self, "fidelity_columns", (self.diversity[0], self.quality[0]))
        if not self.gap_metrics:
            object.__setattr__(self, "gap_metrics", (self.diversity[0],))
        if self.collapse is None and self.diversity[1] > 0:
            object.__setattr__(self, "collapse", self.diversity[0])


def get_family(name: str) -> Family:
    """The Family registered under name."""
    if name not in MODULES:
        raise KeyError(f"unknown teacher family {name!r}; choose one of {sorted(MODULES)}")
    found = importlib.import_module(MODULES[name]).FAMILY
    if not isinstance(found, Family) or found.name != name:
        raise TypeError(f"{MODULES[name]}.FAMILY must be the Family named {name!r}")
    return found
