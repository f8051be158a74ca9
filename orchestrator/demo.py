"""The main job on the embedded default: what the pipeline can do today, end to end, on one CPU machine.

    dpdmd demo                      # toy2d, about a minute on 2 cores
    dpdmd demo --recipe toy2d teacher.train.steps=300

It trains (or reuses) the embedded teacher, evaluates it with its own 30-step guided sampler and, as the
baseline distillation must beat, the same teacher cut to the generator's 4 Euler steps, then writes a
report with the pictures and the metrics table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from models.families import family_module
from models.flow import sampling_sigmas
from models.sampling import Sampler
from orchestrator import recipe as recipes
from workers.config import RunConfig
from workers.evaluate import evaluate, format_table, save_samples, teacher_sampler
from workers.teacher import load_teacher, teacher_dir, train_teacher


def run_demo(config: RunConfig) -> Path:
    start = time.time()
    run_dir = Path(config.storage.output_dir) / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-demo-{config.name}"
    recipes.save(config, run_dir)
    family = family_module(config.teacher.family)

    if config.teacher.path or teacher_dir(config).is_dir():
        print(f"[1/3] teacher: reusing {teacher_dir(config)}")
    else:
        print(f"[1/3] teacher: training the embedded {config.teacher.family} teacher")
        train_teacher(config)
    adapter, net = load_teacher(config)

    n, t = config.generator.num_steps, config.teacher
    samplers = {
        f"teacher {t.num_steps}-step w={t.guidance_scale:g}": teacher_sampler(config),
        f"teacher {n}-step w={t.guidance_scale:g}": Sampler(sampling_sigmas(n, config.generator_shift),
                                                           t.guidance_scale),
    }
    print(f"[2/3] evaluating {len(samplers)} samplers on "
          f"{config.evaluation.seeds_per_prompt} held-out seeds per prompt")
    results = {}
    for name, sampler in samplers.items():
        results[name] = evaluate(config, adapter, net, sampler)
        save_samples(results[name], run_dir / f"samples-{name.split()[1]}.npz")

    print("[3/3] writing the report")
    prompts = next(iter(results.values())).prompts
    picture = family.render({name: r.samples for name, r in results.items()}, prompts, run_dir / "samples.png")
    table = format_table({name: r.metrics for name, r in results.items()})
    (run_dir / "metrics.json").write_text(json.dumps({k: r.metrics for k, r in results.items()}, indent=2))
    (run_dir / "report.md").write_text(
        f"# {config.name}: embedded {config.teacher.family} demo\n\n"
        f"Teacher: {teacher_dir(config)}\n\n![samples]({picture.name})\n\n{table}\n")
    print(f"\n{table}\n\nreport: {run_dir / 'report.md'}  ({time.time() - start:.0f} s)")
    return run_dir
