"""`dpdmd fidelity`: the paper's comparison on an embedded domain, with its spread over training seeds.

The teacher, DMD (lambda = 0), DP-DMD at the recipe's lambda and K, and every other setting of the
search space, each distilled once per training seed (the space's `seed` grid) and evaluated on the same
held-out prompts and seeds. The table gives each setting's mean and standard deviation over seeds, and
the share of the teacher-DMD diversity gap it recovers; the setting the rule picks (the most diverse one
whose quality is at most sweep.quality_drop_from_dmd below DMD's) is marked.

    dpdmd fidelity --recipe shapes sweep.space=fidelity                      # Ray Tune trials on a cluster
    dpdmd fidelity --recipe shapes sweep.space=fidelity --no-ray --jobs 6 \\
        distributed.use_gpu=true trajectories.gpus_per_actor=1               # one GPU machine, no Ray
    dpdmd fidelity --recipe shapes sweep.space=fidelity --no-ray --together 12 --time-limit 9 \\
        distributed.use_gpu=true distributed.precision=fp32 trajectories.gpus_per_actor=1   # one batched process

Without Ray, trials run as separate processes (`--jobs` at a time) of the same train function that
Ray Train workers run, or (`--together N`) up to N trials per process as one batched computation of the
same steps (workers/trials.py); their metrics land in JSON instead of MLflow.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from models.families import get_family
from orchestrator import recipe as recipes
from orchestrator.sweep import grid_points, load_space, trial_config, trial_name, trial_title
from workers.config import ConfigError, RunConfig
from workers.configure import to_dict

SEED_KEY = "seed"
TEACHER = "teacher"
ERROR_LOG = "error.log"  # a failed trial's full traceback, in its run directory


# ----------------------------------------------------------------------------------------------------
# The table


def gap_metrics(name: str) -> list[str]:
    """The diversity metrics whose recovered share of DMD's gap to the teacher the table reports: the
    family's headline diversity first."""
    return list(get_family(name).gap_metrics)


def metric_columns(name: str) -> list[str]:
    """The columns a family's table shows: its diversity and quality metrics first."""
    return list(get_family(name).fidelity_columns)


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
    (div_seed - div_DMD_seed) / (div_teacher - mean div_DMD), pairing each seed with DMD's same seed. The
    denominator is DMD's mean gap, not each seed's own: a DMD seed that lands near the teacher would otherwise
    divide by almost nothing (seen on shapes: one seed's gap of 0.005 turned a gap of the means of 0.62 into
    0.08 +- 1.1). Over paired seeds the mean is the gap of the means, as the paper reports it.
    """
    (d_name, d_sign), (q_name, q_sign) = get_family(family).diversity, get_family(family).quality
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
                   "std": {c: _stdev([m[c] for m in per_seed.values()])
                           for c in columns}}
        settings.append(setting)
    settings.sort(key=lambda s: (s["params"].get("loss.diversity_weight", default_weight) != 0,
                                 json.dumps(s["params"], sort_keys=True)))
    dmd = next((i for i, s in enumerate(settings) if s["params"].get("loss.diversity_weight", default_weight) == 0),
               -1)
    for setting in settings:
        setting["gaps"] = {}
        for metric in gap_metrics(family):
            if dmd < 0:
                setting["gaps"][metric] = (math.nan, math.nan)
                continue
            dmd_seeds = settings[dmd]["per_seed"]
            gap = teacher[metric] - settings[dmd]["mean"][metric]
            gaps = [(m[metric] - dmd_seeds[s][metric]) / gap if gap else math.nan
                    for s, m in setting["per_seed"].items() if s in dmd_seeds]
            setting["gaps"][metric] = (statistics.fmean(gaps) if gaps else math.nan,
                                       _stdev(gaps))
        setting["gap_recovered"] = setting["gaps"][d_name]
    picked = -1
    if dmd >= 0:
        floor = q_sign * settings[dmd]["mean"][q_name] - tolerance
        eligible = [i for i, s in enumerate(settings) if i != dmd and q_sign * s["mean"][q_name] >= floor]
        picked = max(eligible, key=lambda i: d_sign * settings[i]["mean"][d_name], default=-1)
    return {"settings": settings, "dmd": dmd, "picked": picked}


def _stdev(values: list[float]) -> float:
    """The sample standard deviation; 0 for one value, NaN where a value is NaN (no adherent samples, say)."""
    if len(values) < 2:
        return 0.0
    return math.nan if any(math.isnan(v) for v in values) else statistics.stdev(values)


def _cell(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.4g} ± {std:.2g}" if seeds > 1 else f"{mean:.4g}"


def format_fidelity(result: dict, teacher: dict[str, float], family: str,
                    cut: tuple[int, dict[str, float]] | None = None) -> str:
    """The Markdown table: teacher first (and, given cut = (steps, metrics), the teacher cut to the generator's
    steps), then every setting with mean ± std over its training seeds."""
    columns, gaps = metric_columns(family), gap_metrics(family)
    lines = ["| model | seeds | " + " | ".join(columns) + "".join(f" | gap recovered ({g})" for g in gaps) + " |",
             "|---" * (len(columns) + len(gaps) + 2) + "|",
             "| teacher | - | " + " | ".join(f"{teacher[c]:.4g}" for c in columns) + " | 1" * len(gaps) + " |"]
    if cut is not None:
        steps, metrics = cut
        lines.append(f"| teacher, {steps} steps | - | " + " | ".join(f"{metrics[c]:.4g}" for c in columns)
                     + " | " * len(gaps) + " |")
    for i, s in enumerate(result["settings"]):
        name = s["name"] + (" **picked**" if i == result["picked"] else "")
        n = len(s["seeds"])
        cells = [_cell(s["mean"][c], s["std"][c], n) for c in columns] + [_cell(*s["gaps"][g], n) for g in gaps]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(result: dict, teacher: dict[str, float], family: str, default_weight: float) -> str:
    """One line computed from the numbers: how much of DMD's diversity gap to the teacher the recipe's DP-DMD
    setting recovers over the training seeds, and whether that is larger than the spread between seeds."""
    d_name, d_sign = get_family(family).diversity
    settings, dmd = result["settings"], result["dmd"]
    ours = next((s for s in settings if s["params"] == {"loss.diversity_weight": default_weight}), None)
    if dmd < 0 or ours is None or ours is settings[dmd]:
        return ""
    gap, spread = ours["gap_recovered"]
    seeds = sorted(set(ours["per_seed"]) & set(settings[dmd]["per_seed"]))
    better = sum(d_sign * ours["per_seed"][s][d_name] > d_sign * settings[dmd]["per_seed"][s][d_name] for s in seeds)
    shown = ", ".join(f"{c} {_cell(ours['mean'][c], ours['std'][c], 2)} (DMD {_cell(settings[dmd]['mean'][c], settings[dmd]['std'][c], 2)}, "
                      f"teacher {teacher[c]:.4g})" for c in metric_columns(family)[:2])
    return (f"Verdict over {len(seeds)} training seeds: {ours['name']} recovered {gap:.2f} ± {spread:.2f} of DMD's "
            f"{d_name} gap to the teacher (0 = DMD, 1 = the teacher) and beat DMD on {d_name} in {better} of "
            f"{len(seeds)} seeds; {shown}. Larger than the seed spread (mean - std > 0): "
            f"{'yes' if gap - spread > 0 else 'no'}.")


def per_seed_csv(result: dict, family: str, path: Path) -> Path:
    """Every setting's value of every metric for each training seed, one row per (setting, seed)."""
    import csv

    columns = metric_columns(family)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "seed", *columns])
        for s in result["settings"]:
            for seed, metrics in sorted(s["per_seed"].items()):
                writer.writerow([s["name"], seed, *(metrics[c] for c in columns)])
    return path


def plot_fidelity(result: dict, teacher: dict[str, float], family: str, path: Path) -> Path:
    """Diversity against quality: each setting's seeds as dots, its mean with a one-std cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (d_name, _), (q_name, _) = get_family(family).diversity, get_family(family).quality
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


def plot_curves(rows: list[dict], family, config: RunConfig, path: Path) -> Path | None:
    """fidelity_curve.png: each setting's diversity and quality against generator updates, from the trials'
    evaluations during training (evaluation.every; live_eval.jsonl), the mean over seeds; None without them."""
    from workers.live_eval import PREFIX, RESULTS

    (d_name, _), (q_name, _) = family.diversity, family.quality
    curves: dict[str, dict[int, list[dict]]] = {}
    for row in rows:
        found = Path(row.get("run_dir") or "") / RESULTS
        if not row.get("run_dir") or not found.is_file():
            continue
        params = {k: v for k, v in row["params"].items() if k != SEED_KEY}
        name = setting_name(params, config.loss.diversity_weight)
        for line in found.read_text().splitlines():
            record = json.loads(line)
            curves.setdefault(name, {}).setdefault(record["generator_update"], []).append(record)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for i, (name, by_step) in enumerate(sorted(curves.items())):
        steps = sorted(by_step)
        for ax, metric in zip(axes, (d_name, q_name)):
            values = [statistics.fmean(r[PREFIX + metric] for r in by_step[s]) for s in steps]
            ax.plot(steps, values, "o-", color=f"C{i % 10}", ms=3,
                    label=f"{name} ({len(by_step[steps[-1]])} seeds)")
    for ax, metric in zip(axes, (d_name, q_name)):
        ax.set_xlabel("generator updates")
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_fidelity(rows: list[dict], teacher: dict[str, float], config: RunConfig, out_dir: Path,
                   seconds: float | None = None, cut: dict[str, float] | None = None) -> tuple[str, Path]:
    """fidelity.md (the table and its verdict), fidelity.json (every number), fidelity_per_seed.csv,
    fidelity.png and fidelity_samples.png into out_dir. cut: the teacher's metrics at the generator's steps."""
    family = config.teacher.family
    result = aggregate(rows, teacher, family, config.loss.diversity_weight, config.sweep.quality_drop_from_dmd)
    table = format_fidelity(result, teacher, family, cut and (config.generator.num_steps, cut))
    line = verdict(result, teacher, family, config.loss.diversity_weight)
    table += f"\n\n{line}" if line else ""
    picture = plot_fidelity(result, teacher, family, out_dir / "fidelity.png")
    per_seed_csv(result, family, out_dir / "fidelity_per_seed.csv")
    (out_dir / "fidelity.json").write_text(json.dumps({"teacher": teacher, **result, "rows": rows}, indent=1,
                                                      default=str))
    grid = render_settings(result, config, out_dir)
    took = f" Took {seconds / 60:.1f} min." if seconds is not None else ""
    (out_dir / "fidelity.md").write_text(
        f"# Fidelity: {config.name}\n\n{table}\n\nMean ± standard deviation over training seeds; every model is "
        f"evaluated on the same {config.evaluation.seeds_per_prompt} held-out seeds per prompt. Gap recovered: "
        f"(diversity - DMD's same seed) / (teacher's - DMD's mean), mean ± std over seeds (its mean is the gap of the "
        f"means). Picked: the most "
        f"diverse setting whose mean {get_family(family).quality[0]} is at most {config.sweep.quality_drop_from_dmd:g} "
        f"worse than DMD's. Per-seed values: fidelity_per_seed.csv.{took}\n\n![fidelity]({picture.name})\n\n"
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
    return get_family(config.teacher.family).render(samples, prompts, out_dir / "fidelity_samples.png")


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
                 out_dir: Path | None = None, space: dict[str, dict] | None = None, kind: str = "fidelity",
                 together: int = 1, time_limit_s: float | None = None) -> Path:
    """Evaluate the teacher, run every (setting, seed) trial of space (default: sweep.space), write the table;
    returns its directory. out_dir: an earlier table's directory continues it (its finished trials are kept,
    stopped ones continue from their last checkpoints). With Ray the trials are Tune trials under one MLflow
    parent run, which also gets the table.

    Without Ray: together > 1 trains up to that many trials per process as one batched computation
    (workers/trials.py: fp32, not sd3); time_limit_s (with together > 1) makes trials still
    training at that many seconds after the start checkpoint and stop, and the command end without a table:
    the same command with --out continues."""
    from orchestrator.precompute import precompute
    from orchestrator.runs import make_run_dir, summary
    from workers.context import clock, device_for
    from workers.teacher import teacher_dir, train_teacher
    from workers.tracking import tracking_uri

    start, tag = time.time(), f"[{kind}]"
    space = space or load_space(config.sweep.space)
    check_space(space)
    if not config.teacher.path and not teacher_dir(config).is_dir():
        print(f"{tag} training the embedded {config.teacher.family} teacher")
        train_teacher(config, device=device_for(config.distributed.use_gpu))
    out_dir = Path(out_dir).resolve() if out_dir else make_run_dir(config, kind)
    recipes.save(config, out_dir)
    teacher, cut = evaluate_teacher(config, out_dir, tag)
    written: dict = {}

    def write(rows: list[dict], parent=None) -> None:
        written["table"], written["report"] = write_fidelity(rows, teacher, config, out_dir, time.time() - start, cut)
        if parent is not None:
            parent.log_metrics(teacher, prefix="teacher_")
            for name in ("fidelity.md", "fidelity.png", "fidelity_samples.png", "fidelity_per_seed.csv"):
                if (out_dir / name).is_file():
                    parent.log_artifact(out_dir / name)

    if use_ray:
        from orchestrator.sweep import run_sweep

        sweep_dir = out_dir / "sweep"
        result = run_sweep(config, base, space, teacher, sweep_dir, resume=(sweep_dir / "tune").is_dir(),
                           on_done=lambda parent, result: write(result.rows, parent), quiet=True)
        tracking = {"MLflow": f"parent run {result.parent_run_id} (mlflow ui --backend-store-uri "
                              f"{tracking_uri(config)})"}
    else:
        stores = set()
        for point in grid_points(space):  # every store exists before trials start
            store, store_summary = precompute(trial_config(base, point), use_ray=False, progress=False)
            if store.root not in stores:
                print(store_summary)
            stores.add(store.root)
        deadline = start + time_limit_s if time_limit_s else None
        rows = run_local_trials(base, space, out_dir / "trials", jobs, together=together, deadline=deadline)
        if rows is None:
            print(f"{tag} stopped at the time limit after {clock(time.time() - start)}: continue with the same "
                  f"command and --out {out_dir}")
            return out_dir
        write(rows)
        curve = plot_curves(rows, get_family(config.teacher.family), config, out_dir / "fidelity_curve.png")
        tracking = {"training curves": curve} if curve else {}
        if curve:
            with (out_dir / "fidelity.md").open("a") as f:
                f.write(f"\nDuring training (every {config.evaluation.every} generator updates, the same held-out "
                        f"prompts and seeds, mean over training seeds):\n\n![curves]({curve.name})\n")
    print(f"\n{written['table']}\n")
    print(summary(f"{tag} done in {clock(time.time() - start)}", {
        "run directory": out_dir, "report": written["report"], "pictures": out_dir / "fidelity_samples.png",
        "per-seed values": out_dir / "fidelity_per_seed.csv", **tracking}))
    return out_dir


def evaluate_teacher(config: RunConfig, out_dir: Path, tag: str = "[fidelity]") -> tuple[dict[str, float], dict[str, float]]:
    """The teacher's metrics with its own sampler, and cut to the generator's number of Euler steps (what a
    distilled generator has to beat); samples and pictures of the first into out_dir. A continued table reads
    them back from teacher_metrics.json."""
    from models.sampling import Sampler
    from workers.context import device_for
    from workers.evaluate import evaluate, save_samples, teacher_sampler
    from workers.teacher import load_teacher

    n = config.generator.num_steps
    saved = out_dir / "teacher_metrics.json"
    if saved.is_file() and (out_dir / "teacher_samples.npz").is_file():
        data = json.loads(saved.read_text())
        return data["teacher"], data[f"teacher_{n}_steps"]
    print(f"{tag} evaluating the teacher ({config.teacher.num_steps} steps, and cut to {n}) "
          f"on {config.evaluation.seeds_per_prompt} held-out seeds per prompt")
    device = device_for(config.distributed.use_gpu)
    adapter, net = load_teacher(config, device, vae=True)
    result = evaluate(config, adapter, net, teacher_sampler(config, adapter), device=device)
    cut = evaluate(config, adapter, net, Sampler(adapter.sampling_sigmas(n, config.generator_shift, "teacher"),
                                                 config.teacher.guidance_scale), device=device).metrics
    save_samples(result, out_dir / "teacher_samples.npz")
    get_family(config.teacher.family).render({TEACHER: result.samples}, result.prompts,
                                             out_dir / "teacher_samples.png")
    (out_dir / "teacher_metrics.json").write_text(json.dumps({"teacher": result.metrics, f"teacher_{n}_steps": cut},
                                                             indent=1))
    return result.metrics, cut


def run_local_trials(base: dict, space: dict[str, dict], trials_dir: Path, jobs: int,
                     runner: Callable[[dict, str, int], dict] | None = None, together: int = 1,
                     deadline: float | None = None) -> list[dict] | None:
    """Every grid point in a process of its own, jobs at a time, or with together > 1 in groups of up to
    `together` trials trained as one batched computation per process (workers/trials.py); a trial that
    already finished (its result.json exists) is not run again, and one that was stopped continues from its
    last checkpoint, so a rerun after a failure or a time limit picks up where it stopped.

    deadline (a time.time(), groups only): trials still training then checkpoint and stop; returns None when
    any trial is unfinished (run again to continue), else every trial's row."""
    import concurrent.futures as futures
    import multiprocessing

    points = grid_points(space)
    rows, todo = [], []
    for params in points:
        run_dir = trials_dir / trial_name(params)
        done = run_dir / "result.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
        else:
            todo.append((params, run_dir))
    groups = [todo[i:i + together] for i in range(0, len(todo), together)]
    print(f"[fidelity] {len(points)} trials, {len(rows)} already done, {len(todo)} to run, "
          + (f"{len(groups)} process(es) of up to {together} trials trained together, " if together > 1 else "")
          + f"{jobs} at a time")
    failures, unfinished = [], 0
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        threads = max(1, (os.cpu_count() or 1) // jobs)

        def config_of(params, run_dir):
            return to_dict(trial_config(base, params, **{"tracking.run_name": trial_title(params)}))
        if together > 1:
            pending = {pool.submit(runner or run_trial_group, [config_of(*t) for t in group],
                                   [str(t[1]) for t in group], threads, deadline): group for group in groups}
        else:
            pending = {pool.submit(runner or run_local_trial, config_of(*t), str(t[1]), threads): [t] for t in todo}
        for future in futures.as_completed(pending):
            group = pending[future]
            try:
                results = future.result()
                results = results if together > 1 else [results]
            except Exception as err:  # one failed process does not lose the others
                results = [err] * len(group)
            for (params, run_dir), metrics in zip(group, results):
                if metrics is None:
                    unfinished += 1
                    continue
                if isinstance(metrics, Exception):
                    failures.append(f"{run_dir.name}: {metrics!r}")
                    print(f"[fidelity] trial {run_dir.name} failed: {failure_summary(run_dir, metrics)}")
                    continue
                (run_dir / ERROR_LOG).unlink(missing_ok=True)  # an earlier attempt's
                row = {"params": params, **{f"eval_{k}": v for k, v in metrics.items()}, "run_dir": str(run_dir)}
                (run_dir / "result.json").write_text(json.dumps(row, indent=1))
                rows.append(row)
                print(f"[fidelity] {len(rows)}/{len(points)} done: {run_dir.name}")
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(points)} trials failed (the finished ones are kept; rerun the "
                           f"same command with --out {trials_dir.parent} to run only the rest; each failed trial's "
                           f"traceback is in its {ERROR_LOG}):\n  " + "\n  ".join(failures))
    if unfinished:
        print(f"[fidelity] {unfinished} of {len(points)} trials stopped at the time limit, checkpointed; rerun the "
              f"same command with --out {trials_dir.parent} to continue them")
        return None
    return rows


def record_failure(run_dir: Path | str, err: BaseException) -> Path:
    """A failed trial's full traceback into its run directory, ERROR_LOG. Written where the exception was caught
    where possible: one that crosses to another process loses its traceback, except for the text that
    concurrent.futures keeps as the __cause__ of an exception that ended a task, which is used then."""
    cause = err.__cause__
    if type(cause).__name__ == "_RemoteTraceback":  # the trial process's own traceback, as text
        text = str(cause).strip().strip('"').strip() + "\n"
    else:
        text = "".join(traceback.format_exception(err))
    path = Path(run_dir) / ERROR_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def failure_summary(run_dir: Path, err: BaseException, lines: int = 3) -> str:
    """One trial's failure as the console shows it: the exception, the last lines of its traceback (where it was
    raised) and the file with all of it (written here if the trial's process could not)."""
    log = Path(run_dir) / ERROR_LOG
    if not log.is_file():
        record_failure(run_dir, err)
    tail = [line for line in log.read_text().splitlines() if line.strip(" ^~")][-lines:]  # no caret lines
    return f"{err!r}\n    " + "\n    ".join(tail) + f"\n    full traceback: {log}"


def run_trial_group(config_dicts: list[dict], run_dirs: list[str], threads: int = 1,
                    deadline: float | None = None) -> list[dict | Exception | None]:
    """Trials trained together in this process (workers/trials.py), continuing from their last checkpoints,
    then each exported and evaluated; per trial its metrics, its error, or None when the deadline stopped it."""
    import torch

    from orchestrator.precompute import precompute
    from orchestrator.runs import evaluate_generator, record_data
    from workers.configure import build
    from workers.context import CHECKPOINTS
    from workers.train import GENERATOR_DIR
    from workers.trials import train_trials

    configs = [build(RunConfig, d) for d in config_dicts]
    dirs = [Path(d) for d in run_dirs]
    for config, run_dir in zip(configs, dirs):
        recipes.save(config, run_dir)
    torch.set_num_threads(threads)
    store, _ = precompute(configs[0], use_ray=False, progress=False)
    for config, run_dir in zip(configs, dirs):
        record_data(run_dir, store, config, 1)
    result = train_trials(configs, dirs, store, deadline=deadline)
    out: list[dict | Exception | None] = []
    for config, run_dir, error, finished in zip(configs, dirs, result.errors, result.finished):
        if error is not None or not finished:
            if error is not None:
                record_failure(run_dir, error)
            out.append(error)
            continue
        try:
            out.append(evaluate_generator(config, run_dir / GENERATOR_DIR, run_dir, run_dir.name).metrics)
        except Exception as err:  # noqa: BLE001  (reported as this trial's failure)
            record_failure(run_dir, err)
            out.append(err)
            continue
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)  # the exported generator is what is kept
    return out


def run_local_trial(config_dict: dict, run_dir: str, threads: int = 1) -> dict[str, float]:
    """One trial in this process: distil with the train function (continuing from the trial's last checkpoint
    if an earlier attempt left one), export, evaluate; returns its metrics."""
    import torch

    from orchestrator.precompute import precompute
    from orchestrator.runs import distill_here, evaluate_generator
    from workers.configure import build
    from workers.context import CHECKPOINTS

    config = build(RunConfig, config_dict)
    run_dir = Path(run_dir)
    recipes.save(config, run_dir)
    torch.set_num_threads(threads)
    try:
        store, _ = precompute(config, use_ray=False, progress=False)
        result = distill_here(config, run_dir, store, resume=True)
        evaluation = evaluate_generator(config, result.generator_dir, run_dir, run_dir.name)
    except Exception as err:
        record_failure(run_dir, err)
        raise
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)  # the exported generator is what is kept
    return evaluation.metrics
