"""The main job on the embedded default: DMD against DP-DMD over several training seeds, end to end.

    dpdmd demo                                   # toy2d: a few minutes on 2 CPU cores
    dpdmd demo schedule.num_generator_updates=300 evaluation.seeds_per_prompt=200   # a quick look

It is `dpdmd fidelity` on a space of its own: train (or reuse) the embedded teacher; evaluate it with its
own guided sampler and cut to the generator's steps (what distillation must beat); precompute the
trajectory store with a Ray actor pool; distil a 4-step generator with lambda = 0 (DMD) and with the
recipe's lambda (DP-DMD) for each of DEMO_SEEDS training seeds, as Ray Tune trials on Ray Train +
DeepSpeed; evaluate every generator on the same held-out prompts and seeds; log everything to MLflow (one
parent run, a nested run per trial); write the report with the table (mean ± std over seeds), pictures and
a verdict computed from the numbers.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.fidelity import run_fidelity
from workers.config import RunConfig
from workers.configure import to_dict

DEMO_SEEDS = 3  # training seeds per model: a comparison is reported with its spread over seeds


def demo_space(config: RunConfig) -> dict[str, dict]:
    return {"loss.diversity_weight": {"grid": [0.0, config.loss.diversity_weight]},
            "seed": {"grid": list(range(DEMO_SEEDS))}}


def run_demo(config: RunConfig) -> Path:
    print(f"[demo] {config.teacher.family}: DMD (lambda = 0) against DP-DMD (lambda = {config.loss.diversity_weight:g}, "
          f"K = {config.loss.anchor_step}), {DEMO_SEEDS} training seeds each, "
          f"{config.schedule.num_generator_updates} generator updates per run")
    return run_fidelity(config, to_dict(config), use_ray=True, space=demo_space(config), kind="demo")
