"""Reporting: the sweep's table, its pick in a sentence, its Pareto, curve and hyperparameter plots; the fidelity
table (markdown, per-seed CSV, verdict, plots, sample grids). Shared by `dpdmd sweep`, `dpdmd fidelity` and the
demo; matplotlib loads only when a picture is drawn."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from models.families import get_family
from orchestrator.results import (SEED_KEY, TEACHER, SweepResult, aggregate, gap_metrics, live_curves, metric_columns,
                                  is_ours, setting_name)
from orchestrator.spaces import PBT_KEYS, trial_name, trial_title
from workers.config import RunConfig



def sweep_table(result: SweepResult, family: str, tolerance: float = 0.0) -> str:
    """The trials that finished (their objectives, the Pareto front, the pick), then those stopped early and why."""
    (d_name, _), (q_name, _) = get_family(family).diversity, get_family(family).quality
    stopped = [f"- {trial_name(t['params'])}: {t['reason']}" for t in result.stopped]
    if not result.rows:
        return "No trial finished.\n\nStopped early:\n" + "\n".join(stopped)
    keys = sorted({k for r in result.rows for k in r["params"]})
    lines = ["| " + " | ".join([*keys, d_name, q_name, "pareto", "picked"]) + " |",
             "|" + "---|" * (len(keys) + 4)]
    for i, row in enumerate(result.rows):
        cells = [str(row["params"].get(k, "")) for k in keys]
        cells += [f"{row['eval_' + d_name]:.4g}", f"{row['eval_' + q_name]:.4g}",
                  "yes" if i in result.front else "", "<-" if i == result.picked else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", pick_sentence(result, family, tolerance)]
    return "\n".join(lines) + ("\n\nStopped early:\n" + "\n".join(stopped) if stopped else "")


def pick_sentence(result: SweepResult, family: str, tolerance: float) -> str:
    """Why the picked trial was picked, in one sentence: the rule and the numbers that decided it."""
    (d_name, d_sign), (q_name, q_sign) = get_family(family).diversity, get_family(family).quality
    rows, front = result.rows, result.front
    best = max(front, key=lambda i: rows[i]["quality"])
    picked = rows[result.picked]
    eligible = [i for i in front if rows[i]["quality"] >= rows[best]["quality"] - tolerance]
    d_word = "higher" if d_sign > 0 else "lower"
    q_word = "higher" if q_sign > 0 else "lower"
    others = [i for i in eligible if i != result.picked]
    values = ", ".join(f"{trial_title(rows[i]['params'])} {rows[i]['eval_' + d_name]:.4g}" for i in others)
    beaten = f" (the other eligible ones: {values})" if others else ""
    passed = [i for i in front if i not in eligible and rows[i]["diversity"] > picked["diversity"]]
    beaten += "".join(f"; {trial_title(rows[i]['params'])} has the better {d_name} ({rows[i]['eval_' + d_name]:.4g}) "
                      f"but its {q_name} ({rows[i]['eval_' + q_name]:.4g}) is outside the tolerance" for i in passed)
    return (f"Picked {trial_title(picked['params'])}: of the {len(front)} trials no other trial beats on both "
            f"{d_name} ({d_word} is better) and {q_name} ({q_word} is better), the {len(eligible)} whose {q_name} "
            f"is within sweep.quality_drop_from_best = {tolerance:g} of the best ({trial_title(rows[best]['params'])}, "
            f"{rows[best]['eval_' + q_name]:.4g}) are eligible, and it has the best {d_name} of them "
            f"({picked['eval_' + d_name]:.4g}){beaten}.")


def plot_pareto(result: SweepResult, family: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (d_name, _), (q_name, q_sign) = get_family(family).diversity, get_family(family).quality
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    xs = [r[f"eval_{d_name}"] for r in result.rows]
    ys = [r[f"eval_{q_name}"] for r in result.rows]
    ax.scatter(xs, ys, color="0.6", label="trials")
    front = result.front
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "o-", color="C0", label="Pareto front")
    ax.scatter([xs[result.picked]], [ys[result.picked]], s=160, facecolors="none", edgecolors="C3",
               linewidths=2, label="picked")
    for i, row in enumerate(result.rows):
        ax.annotate(", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(row["params"].items())),
                    (xs[i], ys[i]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if result.teacher_metrics:
        ax.scatter([result.teacher_metrics[d_name]], [result.teacher_metrics[q_name]], marker="*", s=160,
                   color="C2", label="teacher")
    ax.set_xlabel(f"{d_name} (diversity, higher is better)")
    ax.set_ylabel(f"{q_name} (quality, {'higher' if q_sign > 0 else 'lower'} is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep_curves(curves: dict[str, list[dict]], family: str, path: Path) -> Path | None:
    """Live diversity and quality against generator updates, one line per trial (None without any)."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (get_family(family).diversity, get_family(family).quality)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, records) in enumerate(sorted(curves.items())):
        steps = [r["generator_update"] for r in records]
        for ax, (metric, _) in zip(axes, metrics):
            ax.plot(steps, [r[f"live_{metric}"] for r in records], "o-", ms=3, color=f"C{i % 10}", label=name)
    for ax, (metric, sign) in zip(axes, metrics):
        ax.set_xlabel("generator update")
        ax.set_ylabel(f"{metric} ({'higher' if sign > 0 else 'lower'} is better)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hyperparameters(result: SweepResult, path: Path) -> Path | None:
    """PBT: each trial's lambda (and critic learning rate, if perturbed) against generator updates."""
    keys = [k for k in PBT_KEYS if any(k in h.columns for h in result.histories.values())]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for i, (name, history) in enumerate(sorted(result.histories.items())):
        rows = history.dropna(subset=[k for k in keys if k in history.columns] + ["generator_update"])
        for ax, key in zip(axes[0], keys):
            if key in rows.columns:
                ax.step(rows["generator_update"], rows[key], where="post", color=f"C{i % 10}", label=f"trial {name}")
    for ax, key in zip(axes[0], keys):
        ax.set_xlabel("generator update")
        ax.set_ylabel(key)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def verdict(result: dict, teacher: dict[str, float], family: str, default_weight: float,
            default_method: str = "dp-dmd") -> str:
    """One line computed from the numbers: how much of DMD's diversity gap to the teacher the recipe's DP-DMD
    setting recovers over the training seeds, and whether that is larger than the spread between seeds."""
    d_name, d_sign = get_family(family).diversity
    settings, dmd = result["settings"], result["dmd"]
    ours = next((s for s in settings if is_ours(s["params"], default_weight, default_method)), None)
    if dmd < 0 or ours is None or ours is settings[dmd]:
        return ""
    gap, spread = ours["gap_recovered"]
    seeds = sorted(set(ours["per_seed"]) & set(settings[dmd]["per_seed"]))
    better = sum(d_sign * ours["per_seed"][s][d_name] > d_sign * settings[dmd]["per_seed"][s][d_name] for s in seeds)
    shown = ", ".join(f"{c} {_cell(ours['mean'][c], ours['std'][c], 2)} (DMD {_cell(settings[dmd]['mean'][c], settings[dmd]['std'][c], 2)}, "
                      f"teacher {teacher[c]:.4g})" for c in metric_columns(family)[:2])
    line = (f"Verdict over {len(seeds)} training seeds: {ours['name']} recovered {gap:.2f} ± {spread:.2f} of DMD's "
            f"{d_name} gap to the teacher (0 = DMD, 1 = the teacher) and beat DMD on {d_name} in {better} of "
            f"{len(seeds)} seeds; {shown}. Larger than the seed spread (mean - std > 0): "
            f"{'yes' if gap - spread > 0 else 'no'}.")
    return line + "".join(_against(ours, s, family) for s in settings
                          if s["method"] in ("dmd-regression", "dmd-gan"))


def _against(ours: dict, remedy: dict, family: str) -> str:
    """DP-DMD against an earlier remedy on the family's diversity and quality: means ± std and the gap recovered."""
    (d_name, _), (q_name, _) = get_family(family).diversity, get_family(family).quality
    cells = "; ".join(f"{c} {_cell(ours['mean'][c], ours['std'][c], 2)} against {_cell(remedy['mean'][c], remedy['std'][c], 2)}"
                      for c in (d_name, q_name))
    return (f" Against {remedy['name']}: {cells}; gap recovered {_cell(*ours['gap_recovered'], 2)} against "
            f"{_cell(*remedy['gap_recovered'], 2)}.")


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


def plot_fidelity_curves(rows: list[dict], family, config: RunConfig, path: Path) -> Path | None:
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
        name = setting_name(params, config.loss.diversity_weight, config.loss.method)
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
    result = aggregate(rows, teacher, family, config.loss.diversity_weight, config.sweep.quality_drop_from_dmd,
                       config.loss.method)
    table = format_fidelity(result, teacher, family, cut and (config.generator.num_steps, cut))
    line = verdict(result, teacher, family, config.loss.diversity_weight, config.loss.method)
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


def write_sweep(result: SweepResult, config: RunConfig, parent) -> str:
    """The sweep's report in its directory and in the parent MLflow run (parent: its tracked run): sweep.md (the
    table, returned), sweep.json, the Pareto plot, the trials' curves, PBT's hyperparameters, the picked
    trial's objectives as metrics."""
    sweep, family, sweep_dir = config.sweep, config.teacher.family, result.sweep_dir
    table = sweep_table(result, family, sweep.quality_drop_from_best)
    (sweep_dir / "sweep.md").write_text(table + "\n")
    (sweep_dir / "sweep.json").write_text(json.dumps(
        {"rows": result.rows, "front": result.front, "picked": result.picked}, indent=1, default=str))
    parent.log_artifact(sweep_dir / "sweep.md")
    if result.rows:
        parent.log_artifact(plot_pareto(result, family, sweep_dir / "pareto.png"))
    for picture in (plot_sweep_curves(live_curves(sweep_dir), family, sweep_dir / "curves.png"),
                    plot_hyperparameters(result, sweep_dir / "pbt.png") if sweep.scheduler == "pbt" else None):
        if picture is not None:
            parent.log_artifact(picture)
    if result.rows:
        picked = result.rows[result.picked]
        parent.log_metrics({f"picked_{k}": v for k, v in picked.items() if k in ("diversity", "quality")
                            or k.startswith("eval_")})  # the objectives, not Tune's bookkeeping
    return table
