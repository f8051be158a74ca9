"""Evaluation with the paper's protocol: held-out prompts x R seeds, the same pairs for every model compared."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.adapter import LoadOptions, TeacherAdapter
from models.families import get_family
from models.sampling import Sampler, grid_pairs, sample
from workers.config import ConfigError, RunConfig, teacher_location
from workers.configure import read_prompts


def training_prompts(config: RunConfig) -> list[str]:
    """trajectories.prompts, else the family's built-in ones (pretrained families have none; the paper trains on
    DiffusionDB prompts)."""
    return config_prompts(config, "trajectories.prompts", config.trajectories.prompts)


def eval_prompts(config: RunConfig) -> list[str]:
    """evaluation.prompts, else the family's built-in ones (pretrained families have none; the paper evaluates on
    the Pick-a-Pic test prompts)."""
    return config_prompts(config, "evaluation.prompts", config.evaluation.prompts)


def config_prompts(config: RunConfig, key: str, path: str) -> list[str]:
    """The prompts of the file at path (the value of key), or the family's built-in ones when path is empty."""
    if path:
        return read_prompts(path, key)
    if teacher_location(config.teacher.path) == "builtin":  # a tiny pipeline knows only its own few words
        from models.tiny_pipelines import built_in_prompts

        return built_in_prompts(evaluation=key.startswith("evaluation"))
    found = get_family(config.teacher.family)
    if not found.prompts:
        raise ConfigError(key, f"the {found.name} family has no built-in prompts: set {key} to a text file with one "
                               "prompt a line")
    return list(found.prompts)


def eval_seeds(config: RunConfig) -> list[int]:
    ev = config.evaluation
    return list(range(ev.seed_offset, ev.seed_offset + ev.seeds_per_prompt))


def teacher_sampler(config: RunConfig, adapter: TeacherAdapter) -> Sampler:
    """The teacher's own multi-step guided ODE sampler."""
    t = config.teacher
    return Sampler(adapter.sampling_sigmas(t.num_steps, t.shift, "teacher"), t.guidance_scale, "teacher")


def generator_sampler(config: RunConfig, adapter: TeacherAdapter) -> Sampler:
    """The generator's few-step sampler: no CFG."""
    g = config.generator
    return Sampler(adapter.sampling_sigmas(g.num_steps, config.generator_shift, "generator"), None, "generator")


GENERATOR_META = "dpdmd_generator.json"


def load_generator(path: str | Path, device: torch.device | str = "cpu", family: str | None = None):
    """(adapter, net, sampler) of an exported generator: its family's format plus the few-step sampler
    it was trained for (the exported sigmas). family: the recipe's teacher family, which must match."""
    import json

    meta_path = Path(path) / GENERATOR_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not an exported generator (no {GENERATOR_META}); give the "
                                "generator/ directory that `dpdmd distill` writes into its run directory")
    meta = json.loads(meta_path.read_text())
    if family is not None and meta["family"] != family:
        raise ConfigError("--generator", f"{path} was distilled from a {meta['family']} teacher, but the recipe's "
                                         f"teacher.family is {family}; {_recipe_of(Path(path), meta['family'])}")
    options = LoadOptions(text_encoders=True, vae=True, resolution=meta.get("resolution", 0))
    adapter, net = get_family(meta["family"]).load_teacher(path, options)
    net.eval().requires_grad_(False).to(device)
    adapter.to(device)
    sigmas = (torch.tensor(meta["sigmas"], dtype=torch.float32) if "sigmas" in meta
              else adapter.sampling_sigmas(meta["num_steps"], meta["shift"], "generator"))
    return adapter, net, Sampler(sigmas, meta["guidance_scale"], "generator")


def _recipe_of(generator: Path, family: str) -> str:
    """How to name the recipe a generator was trained with: its run directory's config.yaml (a run's generator/
    or a checkpoint's step-N/generator/ lies under it), else any recipe of its teacher's family."""
    for run_dir in list(generator.resolve().parents)[:3]:
        if (run_dir / "config.yaml").is_file():
            return f"give the recipe it was trained with: --recipe {run_dir / 'config.yaml'}"
    return f"give a recipe whose teacher.family is {family} (`dpdmd config --recipe NAME` shows a recipe's)"


@dataclass
class Evaluation:
    prompts: list[str]  # one entry per sample, prompt-major
    seeds: list[int]
    samples: torch.Tensor  # (len(prompts), ...): what adapter.decode makes of the samples (images for latent families)
    metrics: dict[str, float]


def evaluate(config: RunConfig, adapter: TeacherAdapter, net: nn.Module, sampler: Sampler,
             prompts: list[str] | None = None, seeds: list[int] | None = None, device="cpu") -> Evaluation:
    """Sample every (prompt, seed) pair with sampler (net already on device) and score the samples with the
    family's metrics."""
    prompts, seeds = grid_pairs(prompts or eval_prompts(config), seeds or eval_seeds(config))
    samples = adapter.decode(sample(adapter, net, prompts, seeds, sampler, batch_size=config.evaluation.batch_size,
                                    device=device))
    # The real-data reference draw is the same for every model and training seed compared.
    metrics = get_family(config.teacher.family).evaluate_samples(samples, prompts, 0)
    metrics.update(paper_metrics(config, samples, prompts))
    return Evaluation(prompts, seeds, samples, metrics)


def paper_metrics(config: RunConfig, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """DINO / CLIP diversity, PickScore and ImageReward for those whose weights evaluation.*_path gives."""
    from models.metrics.image import external_metrics

    ev = config.evaluation
    return external_metrics(images, prompts, ev.dino_path, ev.clip_path, ev.pickscore_path, ev.imagereward_path)


def save_samples(evaluation: Evaluation, path: Path) -> Path:
    """The raw arrays: prompt, seed and sample of every pair, in one .npz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, prompt=np.array(evaluation.prompts), seed=np.array(evaluation.seeds),
                        sample=evaluation.samples.numpy())
    return path


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table, one row per model, one column per metric."""
    columns = list(dict.fromkeys(k for metrics in rows.values() for k in metrics))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.4g}" if c in metrics else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
