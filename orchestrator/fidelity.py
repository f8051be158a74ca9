"""`dpdmd fidelity`: the paper's comparison on an embedded domain, with its spread over training seeds.

The teacher, DMD (lambda = 0), DP-DMD at the recipe's lambda and K, and every other setting of the
search space, each distilled once per training seed (the space's `seed` grid) and evaluated on the same
held-out prompts and seeds. The table gives each setting's mean and standard deviation over seeds, and
the share of the teacher-DMD diversity gap it recovers; the setting the rule picks (the most diverse one
whose quality stays within sweep.quality_tolerance of DMD's) is marked.

    dpdmd fidelity --recipe shapes sweep.space=fidelity                      # Ray Tune trials on a cluster
    dpdmd fidelity --recipe shapes sweep.space=fidelity --no-ray --jobs 6 \\
        distributed.use_gpu=true trajectories.gpus_per_actor=1               # one GPU machine, no Ray

Without Ray, trials run as separate processes (`--jobs` at a time) of the same train function that
Ray Train workers run, and their metrics land in JSON instead of MLflow.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from models.families import family_module
from orchestrator import recipe as recipes
from orchestrator.sweep import gap_recovered, grid_points, load_space, trial_config, trial_name
from workers.config import ConfigError, RunConfig, to_dict

SEED_KEY = "seed"
TEACHER = "teacher"


# ----------------------------------------------------------------------------------------------------
# The table


def metric_columns(family: str) -> list[str]:
    """The columns a family's table shows: its diversity and quality metrics first."""
    module = family_module(family)
    return list(getattr(module, "FIDELITY_COLUMNS", (module.DIVERSITY[0], module.QUALITY[0])))


def setting_name(params: dict, default_weight: float) -> str:
    """DMD, DP-DMD (default), or the setting's non-default values."""
    weight = params.get("loss.diversity_weight", default_weight)
    others = {k: v for k, v in sorted(params.items()) if k != "loss.diversity_weight"}
    label = "DMD" if weight == 0 else "DP-DMD"
    shown = [f"lambda={weight:g}"] if weight != 0 else []
    shown += [f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
              for k, v in others.items()]
    return f"{label} ({', '.join(shown)})" if shown else label


def aggregate(rows: list[dict], teacher: dict[str, float], family: str, default_weight: float,
              tolerance: float) -> dict:
    """Group trial rows (params incl. seed, eval_<metric> values) into settings with mean/std over seeds.

    Returns {"settings": [...], "picked": index or -1, "dmd": index}: each setting has name, params (seed
    removed), seeds, mean and std per metric, and gap_recovered: mean and std over seeds of
    (div_seed - div_DMD_seed) / (div_teacher - div_DMD_seed), pairing each seed with DMD's same seed.
    """
    d_name, d_sign = family_module(family).DIVERSITY
    q_name, q_sign = family_module(family).QUALITY
    columns = metric_columns(family)
    groups: dict[str, dict] = {}
    for row in rows:
        params = {k: v for k, v in row["params"].items() if k != SEED_KEY}
        key = json.dumps(params, sort_keys=True)
        group = groups.setdefault(key, {"params": params, "per_seed": {}, "run_dirs": {}})
        seed = row["params"].get(SEED_KEY, 0)
        group["per_seed"][seed] = {c: row[f"eval_{c}"] for c in columns}
        group["run_dirs"][seed] = row.get("run_dir")
    settings = []
    for group in groups.values():
        per_seed = group["per_seed"]
        setting = {"name": setting_name(group["params"], default_weight), "params": group["params"],
                   "seeds": sorted(per_seed), "per_seed": per_seed, "run_dirs": group["run_dirs"],
                   "mean": {c: statistics.fmean(m[c] for m in per_seed.values()) for c in columns},
                   "std": {c: statistics.stdev([m[c] for m in per_seed.values()]) if len(per_seed) > 1 else 0.0
                           for c in columns}}
        settings.append(setting)
    settings.sort(key=lambda s: (s["params"].get("loss.diversity_weight", default_weight) != 0,
                                 json.dumps(s["params"], sort_keys=True)))
    dmd = next((i for i, s in enumerate(settings) if s["params"].get("loss.diversity_weight", default_weight) == 0),
               -1)
    for setting in settings:
        if dmd < 0:
            setting["gap_recovered"] = (math.nan, math.nan)
            continue
        dmd_seeds = settings[dmd]["per_seed"]
        gaps = [gap_recovered(m[d_name], dmd_seeds[s][d_name], teacher[d_name])
                for s, m in setting["per_seed"].items() if s in dmd_seeds]
        setting["gap_recovered"] = (statistics.fmean(gaps) if gaps else math.nan,
                                    statistics.stdev(gaps) if len(gaps) > 1 else 0.0)
    picked = -1
    if dmd >= 0:
        floor = q_sign * settings[dmd]["mean"][q_name] - tolerance
        eligible = [i for i, s in enumerate(settings) if i != dmd and q_sign * s["mean"][q_name] >= floor]
        picked = max(eligible, key=lambda i: d_sign * settings[i]["mean"][d_name], default=-1)
    return {"settings": settings, "dmd": dmd, "picked": picked}


def _cell(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.4g} ± {std:.2g}" if seeds > 1 else f"{mean:.4g}"


def format_fidelity(result: dict, teacher: dict[str, float], family: str) -> str:
    """The Markdown table: teacher first, then every setting with mean ± std over its training seeds."""
    columns = metric_columns(family)
    d_name = family_module(family).DIVERSITY[0]
    lines = ["| model | seeds | " + " | ".join(columns) + f" | gap recovered ({d_name}) |",
             "|---" * (len(columns) + 3) + "|",
             f"| teacher | - | " + " | ".join(f"{teacher[c]:.4g}" for c in columns) + " | 1 |"]
    for i, s in enumerate(result["settings"]):
        name = s["name"] + (" **picked**" if i == result["picked"] else "")
        gap, gap_std = s["gap_recovered"]
        cells = [_cell(s["mean"][c], s["std"][c], len(s["seeds"])) for c in columns]
        lines.append(f"| {name} | {len(s['seeds'])} | " + " | ".join(cells) + f" | {_cell(gap, gap_std, len(s['seeds']))} |")
    return "\n".join(lines)


def plot_fidelity(result: dict, teacher: dict[str, float], family: str, path: Path) -> Path:
    """Diversity against quality: each setting's seeds as dots, its mean with a one-std cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (d_name, _), (q_name, _) = family_module(family).DIVERSITY, family_module(family).QUALITY
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    for i, s in enumerate(result["settings"]):
        colour = f"C{i % 10}"
        xs = [m[d_name] for m in s["per_seed"].values()]
        ys = [m[q_name] for m in s["per_seed"].values()]
        ax.scatter(xs, ys, color=colour, alpha=0.35, s=18)
        ax.errorbar(s["mean"][d_name], s["mean"][q_name], xerr=s["std"][d_name], yerr=s["std"][q_name],
                    fmt="o", color=colour, capsize=3, label=s["name"] + (" (picked)" if i == result["picked"] else ""))
    ax.scatter([teacher[d_name]], [teacher[q_name]], marker="*", s=180, color="k", label="teacher")
    ax.set_xlabel(f"{d_name} (diversity)")
    ax.set_ylabel(f"{q_name} (quality)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_fidelity(rows: list[dict], teacher: dict[str, float], config: RunConfig, out_dir: Path,
                   seconds: float | None = None) -> tuple[str, Path]:
    """fidelity.md (the table), fidelity.json (every number) and fidelity.png into out_dir."""
    family = config.teacher.family
    result = aggregate(rows, teacher, family, config.loss.diversity_weight, config.sweep.quality_tolerance)
    table = format_fidelity(result, teacher, family)
    picture = plot_fidelity(result, teacher, family, out_dir / "fidelity.png")
    (out_dir / "fidelity.json").write_text(json.dumps({"teacher": teacher, **result, "rows": rows}, indent=1,
                                                      default=str))
    grid = render_settings(result, config, out_dir)
    took = f" Took {seconds / 60:.1f} min." if seconds is not None else ""
    (out_dir / "fidelity.md").write_text(
        f"# Fidelity: {config.name}\n\n{table}\n\nMean ± standard deviation over training seeds; every model is "
        f"evaluated on the same {config.evaluation.seeds_per_prompt} held-out seeds per prompt. Gap recovered: "
        f"(diversity - DMD's) / (teacher's - DMD's), each seed paired with DMD's same seed. Picked: the most "
        f"diverse setting whose mean {family_module(family).QUALITY[0]} is within {config.sweep.quality_tolerance:g} "
        f"of DMD's.{took}\n\n![fidelity]({picture.name})\n\n"
        + (f"Samples (first training seed of each setting; one row per prompt, one column per held-out seed):\n\n"
           f"![samples]({grid.name})\n" if grid else ""))
    return table, out_dir / "fidelity.md"


def render_settings(result: dict, config: RunConfig, out_dir: Path) -> Path | None:
    """fidelity_samples.png: the teacher and each setting's first seed side by side, same prompts and seeds."""
    import numpy as np
    import torch

    teacher_file = out_dir / "teacher_samples.npz"
    if not teacher_file.is_file():
        return None
    arrays = np.load(teacher_file)
    samples, prompts = {TEACHER: torch.from_numpy(arrays["sample"])}, list(arrays["prompt"])
    for setting in result["settings"]:
        run_dir = setting.get("run_dirs", {}).get(setting["seeds"][0])
        if run_dir and (Path(run_dir) / "samples.npz").is_file():
            samples[setting["name"]] = torch.from_numpy(np.load(Path(run_dir) / "samples.npz")["sample"])
    return family_module(config.teacher.family).render(samples, prompts, out_dir / "fidelity_samples.png")


# ----------------------------------------------------------------------------------------------------
# Running it


def check_space(space: dict[str, dict]) -> None:
    if SEED_KEY not in space or next(iter(space[SEED_KEY])) != "grid" or len(next(iter(space[SEED_KEY].values()))) < 2:
        raise ConfigError("sweep.space", "a fidelity space needs `seed: {grid: [0, 1, 2]}` (training seeds, at "
                                         "least 2) so that each setting is reported with its spread")
    if any(next(iter(spec)) not in ("grid", "choice") for spec in space.values()):
        raise ConfigError("sweep.space", "a fidelity space takes grid values only (each setting runs once per seed)")
    weights = next(iter(space.get("loss.diversity_weight", {"grid": []}).values()))
    if 0 not in weights and 0.0 not in weights:
        raise ConfigError("sweep.space", "a fidelity space needs lambda = 0 (DMD) in its loss.diversity_weight grid: "
                                         "the gap recovered is measured from DMD")


def run_fidelity(config: RunConfig, base: dict, use_ray: bool = True, jobs: int = 1,
                 out_dir: Path | None = None) -> Path:
    """Evaluate the teacher, run every (setting, seed) trial, write the table; returns its directory."""
    from orchestrator.precompute import precompute

    start = time.time()
    space = load_space(config.sweep.space)
    check_space(space)
    out_dir = (out_dir or Path(config.storage.output_dir) / "runs"
               / f"{time.strftime('%Y%m%d-%H%M%S')}-fidelity-{config.name}").resolve()
    recipes.save(config, out_dir)
    from workers.teacher import teacher_dir, train_teacher

    if not config.teacher.path and not teacher_dir(config).is_dir():
        print(f"[fidelity] training the embedded {config.teacher.family} teacher")
        train_teacher(config, device=_device(config))
    teacher = evaluate_teacher(config, out_dir)
    print(f"[fidelity] teacher: {json.dumps({k: round(v, 4) for k, v in teacher.items()})}")
    if use_ray:
        from orchestrator.sweep import run_sweep

        rows = run_sweep(config, base, space, teacher, sweep_dir=out_dir / "sweep").rows
    else:
        for point in grid_points(space):  # every store exists before trials start
            print(precompute(trial_config(base, point), use_ray=False, progress=False)[1])
        rows = run_local_trials(base, space, out_dir / "trials", jobs)
    table, report = write_fidelity(rows, teacher, config, out_dir, time.time() - start)
    print(f"\n{table}\n\nreport: {report}")
    return out_dir


def evaluate_teacher(config: RunConfig, out_dir: Path) -> dict[str, float]:
    from workers.evaluate import evaluate, save_samples, teacher_sampler
    from workers.teacher import load_teacher

    device = _device(config)
    adapter, net = load_teacher(config, device, vae=True)
    result = evaluate(config, adapter, net, teacher_sampler(config, adapter), device=device)
    save_samples(result, out_dir / "teacher_samples.npz")
    family_module(config.teacher.family).render({TEACHER: result.samples}, result.prompts,
                                                out_dir / "teacher_samples.png")
    (out_dir / "teacher_metrics.json").write_text(json.dumps(result.metrics, indent=1))
    return result.metrics


def _device(config: RunConfig):
    import torch

    return torch.device("cuda") if config.distributed.use_gpu and torch.cuda.is_available() else torch.device("cpu")


def run_local_trials(base: dict, space: dict[str, dict], trials_dir: Path, jobs: int,
                     runner: Callable[[dict, str, int], dict] | None = None) -> list[dict]:
    """Every grid point as a separate process, jobs at a time; a trial that already finished (its
    result.json exists) is not run again, so a rerun after a failure picks up where it stopped."""
    import concurrent.futures as futures
    import multiprocessing

    runner = runner or run_local_trial
    points = grid_points(space)
    rows, todo = [], []
    for params in points:
        run_dir = trials_dir / trial_name(params)
        done = run_dir / "result.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
        else:
            todo.append((params, run_dir))
    print(f"[fidelity] {len(points)} trials, {len(rows)} already done, {len(todo)} to run, {jobs} at a time")
    failures = []
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        pending = {pool.submit(runner, to_dict(trial_config(base, params, **{"tracking.run_name": run_dir.name})),
                               str(run_dir), threads): (params, run_dir)
                   for params, run_dir in todo}
        for future in futures.as_completed(pending):
            params, run_dir = pending[future]
            try:
                metrics = future.result()
            except Exception as err:  # one failed trial does not lose the others
                failures.append(f"{run_dir.name}: {err!r}")
                print(f"[fidelity] trial {run_dir.name} failed: {err!r}")
                continue
            row = {"params": params, **{f"eval_{k}": v for k, v in metrics.items()}, "run_dir": str(run_dir)}
            (run_dir / "result.json").write_text(json.dumps(row, indent=1))
            rows.append(row)
            print(f"[fidelity] {len(rows)}/{len(points)} done: {run_dir.name}")
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(points)} trials failed (the finished ones are kept; rerun the "
                           f"same command with --out {trials_dir.parent} to run only the rest):\n  "
                           + "\n  ".join(failures))
    return rows


def run_local_trial(config_dict: dict, run_dir: str, threads: int = 1) -> dict[str, float]:
    """One trial in this process: distil with the train function, export, evaluate; returns its metrics."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from orchestrator.precompute import precompute
    from workers.config import build
    from workers.context import LocalContext
    from workers.evaluate import evaluate, load_generator, save_samples
    from workers.train import GENERATOR_DIR, store_source, train

    config = build(RunConfig, config_dict)
    run_dir = Path(run_dir)
    recipes.save(config, run_dir)
    torch.set_num_threads(threads)
    store, _ = precompute(config, use_ray=False, progress=False)
    progress = train(config, LocalContext(run_dir, resume=True), store_source(store), store.negative())
    final = run_dir / "checkpoints" / f"step-{progress.generator_updates:07d}" / GENERATOR_DIR
    shutil.copytree(final, run_dir / GENERATOR_DIR, dirs_exist_ok=True)
    device = _device(config)
    adapter, net, sampler = load_generator(run_dir / GENERATOR_DIR, device)
    evaluation = evaluate(config, adapter, net, sampler, device=device)
    save_samples(evaluation, run_dir / "samples.npz")
    family_module(config.teacher.family).render({run_dir.name: evaluation.samples}, evaluation.prompts,
                                                run_dir / "samples.png")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the exported generator is what is kept
    return evaluation.metrics
