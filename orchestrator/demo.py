"""The main job on the embedded default: DMD against DP-DMD, end to end, on one machine.

    dpdmd demo                                   # toy2d: about 5 minutes on 2 CPU cores
    dpdmd demo schedule.num_generator_updates=300 evaluation.seeds_per_prompt=200   # a quick look

Stages: train (or reuse) the embedded teacher; evaluate it with its own 30-step guided sampler, and the
same teacher cut to 4 Euler steps (what distillation must beat); precompute the trajectory store with a
Ray actor pool; distil a 4-step generator with lambda = 0 (DMD) and with the recipe's lambda (DP-DMD) as
two concurrent Ray Tune trials on Ray Train + DeepSpeed; evaluate both on the same prompts and seeds;
log everything to MLflow (one parent run, a nested run per trial) and write a report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from models.families import family_module
from models.sampling import Sampler
from orchestrator import recipe as recipes
from orchestrator.sweep import gap_recovered, run_sweep
from workers.config import RunConfig, to_dict
from workers.evaluate import Evaluation, evaluate, format_table, save_samples, teacher_sampler
from workers.teacher import load_teacher, teacher_dir, train_teacher
from workers.tracking import tracking_uri


def run_demo(config: RunConfig) -> Path:
    start = time.time()
    run_dir = (Path(config.storage.output_dir) / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-demo-{config.name}").resolve()
    recipes.save(config, run_dir)
    family = family_module(config.teacher.family)

    if teacher_dir(config).is_dir():
        print(f"[demo 1/4] teacher: reusing {teacher_dir(config)}")
    else:
        print(f"[demo 1/4] teacher: training the embedded {config.teacher.family} teacher")
        train_teacher(config)
    adapter, net = load_teacher(config)

    t, n = config.teacher, config.generator.num_steps
    print(f"[demo 2/4] evaluating the teacher ({t.num_steps} and {n} steps) on "
          f"{config.evaluation.seeds_per_prompt} held-out seeds per prompt")
    cut = Sampler(adapter.sampling_sigmas(n, config.generator_shift, "teacher"), t.guidance_scale)
    results = {f"teacher {t.num_steps}-step": evaluate(config, adapter, net, teacher_sampler(config, adapter)),
               f"teacher {n}-step": evaluate(config, adapter, net, cut)}
    for name, result in results.items():
        save_samples(result, run_dir / f"samples-{name.replace(' ', '-')}.npz")

    weight = config.loss.diversity_weight
    print(f"[demo 3/4] distilling {n}-step generators: DMD (lambda = 0) and DP-DMD (lambda = {weight:g}, "
          f"K = {config.loss.anchor_step}), {config.schedule.num_generator_updates} generator updates each")
    teacher_metrics = results[f"teacher {t.num_steps}-step"].metrics
    sweep = run_sweep(config, to_dict(config), {"loss.diversity_weight": {"grid": [0.0, weight]}}, teacher_metrics,
                      sweep_dir=run_dir / "sweep")
    for row in sorted(sweep.rows, key=lambda r: r["params"]["loss.diversity_weight"]):
        label = "DMD" if row["params"]["loss.diversity_weight"] == 0 else f"DP-DMD (lambda={weight:g})"
        arrays = np.load(Path(row["run_dir"]) / "samples.npz")
        results[label] = Evaluation(list(arrays["prompt"]), list(arrays["seed"]), torch.from_numpy(arrays["sample"]),
                                    {k.removeprefix("eval_"): v for k, v in row.items() if k.startswith("eval_")})

    print("[demo 4/4] writing the report")
    table = _table(results, config)
    prompts = next(iter(results.values())).prompts
    picture = family.render({name: r.samples for name, r in results.items()}, prompts, run_dir / "samples.png")
    (run_dir / "metrics.json").write_text(json.dumps({k: r.metrics for k, r in results.items()}, indent=2))
    report = run_dir / "report.md"
    report.write_text(_report(config, table, picture, run_dir, time.time() - start))
    _log_to_parent(config, sweep.parent_run_id, results, report, picture)
    print(f"\n{table}\n")
    print(f"report:  {report}")
    print(f"MLflow:  mlflow ui --backend-store-uri {tracking_uri(config)}   (experiment '{config.tracking.experiment}')")
    print(f"done in {time.time() - start:.0f} s")
    return run_dir


def _table(results: dict, config: RunConfig) -> str:
    """The metrics table, plus the share of DMD's diversity gap to the teacher each model recovers."""
    d_name, _ = family_module(config.teacher.family).DIVERSITY
    rows = {name: dict(r.metrics) for name, r in results.items()}
    teacher = rows[f"teacher {config.teacher.num_steps}-step"][d_name]
    dmd = rows.get("DMD", {}).get(d_name)
    if dmd is not None:
        for metrics in rows.values():
            metrics[f"gap_recovered ({d_name})"] = gap_recovered(metrics[d_name], dmd, teacher)
    return format_table(rows)


def _report(config: RunConfig, table: str, picture: Path, run_dir: Path, seconds: float) -> str:
    (d_name, _), (q_name, _) = family_module(config.teacher.family).DIVERSITY, family_module(config.teacher.family).QUALITY
    return (f"# DP-DMD demo: {config.teacher.family}\n\n"
            f"Teacher {teacher_dir(config)} ({config.teacher.num_steps} steps, w = {config.teacher.guidance_scale:g}); "
            f"{config.generator.num_steps}-step generators after {config.schedule.num_generator_updates} generator "
            f"updates ({config.schedule.critic_updates_per_generator} critic updates each). Every model is "
            f"sampled on the same prompts and seeds ({config.evaluation.seeds_per_prompt} per prompt).\n\n"
            f"![samples]({picture.name})\n\n![pareto](sweep/pareto.png)\n\n{table}\n\n"
            f"Diversity: `{d_name}`; quality: `{q_name}`. `gap_recovered` is the share of DMD's diversity gap "
            f"to the {config.teacher.num_steps}-step teacher that a model recovers (0 = DMD, 1 = teacher).\n\n"
            f"Config: `config.yaml`. Took {seconds:.0f} s.\n")


def _log_to_parent(config: RunConfig, run_id: str, results: dict, report: Path, picture: Path) -> None:
    from mlflow.tracking import MlflowClient

    from workers.tracking import TrackedRun

    tracked = TrackedRun(MlflowClient(tracking_uri(config)), run_id, tracking_uri(config))
    for name, result in results.items():
        tracked.log_metrics(result.metrics, prefix=name.replace(" ", "_").replace("(", "").replace(")", "")
                            .replace("=", "") + "/")
    tracked.log_artifact(report)
    tracked.log_artifact(picture)
