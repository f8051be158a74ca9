"""`dpdmd sweep`: Ray Tune over dotted config keys. One trial = distillation, then evaluation on the
held-out prompts and seeds. Trials share trajectory stores, run as concurrently as the cluster allows,
and nest their MLflow runs under one parent; the sweep ends with the Pareto front of diversity against
quality (plot and table) and the trade-off picked by sweep.quality_drop_from_best.

    dpdmd sweep --recipe toy2d sweep.space=default
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import tune_spaces
from models.families import family_module
from workers.config import ConfigError, RunConfig
from workers.configure import build, config_keys, set_dotted

SPACE_DIR = Path(tune_spaces.__file__).resolve().parent
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


# ----------------------------------------------------------------------------------------------------
# Search spaces


def load_space(name: str) -> dict[str, dict]:
    """A search space: {dotted key: {kind: values}}, every key a real config field, every listed value valid."""
    path = Path(name) if Path(name).suffix else SPACE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))
        raise ConfigError("sweep.space", f"no search space {name!r}; give a YAML path or one of {known}")
    space = yaml.safe_load(path.read_text()) or {}
    keys = set(config_keys())
    for key, spec in space.items():
        if key not in keys:
            raise ConfigError(key, f"in search space {path.name}: not a config key (e.g. loss.diversity_weight)")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(key, f"in search space {path.name}: give one of {list(KINDS)}, e.g. {{grid: [0, 0.05]}}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values or (kind not in ("grid", "choice") and len(values) != 2):
            raise ConfigError(key, f"in search space {path.name}: {kind} needs "
                                   + ("a non-empty list" if kind in ("grid", "choice") else "[low, high]"))
        for value in values if kind in ("grid", "choice") else []:
            build(RunConfig, set_dotted({}, key, value))  # each value must resolve on its own
    return space


def tune_param_space(space: dict[str, dict]) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def grid_points(space: dict[str, dict]) -> list[dict]:
    """Every combination of the grid and choice values (to precompute the stores trials will share)."""
    fixed = {k: next(iter(s.values())) for k, s in space.items() if next(iter(s)) in ("grid", "choice")}
    return [dict(zip(fixed, combo)) for combo in itertools.product(*fixed.values())] if fixed else [{}]


def trial_name(params: dict) -> str:
    """A trial's directory and run name from its parameters, e.g. diversity_weight=0.05-seed=1."""
    return "-".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in sorted(params.items())) or "trial"


def trial_config(base: dict, params: dict, **extra: Any) -> RunConfig:
    data = copy.deepcopy(base)
    for key, value in {**params, **extra}.items():
        set_dotted(data, key, value)
    return build(RunConfig, data)


# ----------------------------------------------------------------------------------------------------
# Objectives and the Pareto front


def objectives(family: str, metrics: dict[str, float]) -> tuple[float, float]:
    """(diversity, quality), each signed so that higher is better."""
    module = family_module(family)
    (d, d_sign), (q, q_sign) = module.DIVERSITY, module.QUALITY
    return d_sign * metrics[d], q_sign * metrics[q]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both objectives (both maximised), by diversity."""
    front = [i for i, (d, q) in enumerate(points)
             if not any(d2 >= d and q2 >= q and (d2, q2) != (d, q) for d2, q2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def pick(points: list[tuple[float, float]], tolerance: float) -> int:
    """The most diverse Pareto point whose quality is within tolerance of the best quality."""
    front = pareto_front(points)
    best_quality = max(points[i][1] for i in front)
    eligible = [i for i in front if points[i][1] >= best_quality - tolerance]
    return max(eligible, key=lambda i: points[i][0])


def gap_recovered(value: float, dmd: float, teacher: float) -> float:
    """The fraction of DMD's diversity gap to the teacher a method recovers: 0 = DMD, 1 = teacher."""
    return (value - dmd) / (teacher - dmd) if teacher != dmd else float("nan")


# ----------------------------------------------------------------------------------------------------
# Trials


def run_trial(params: dict, base: dict, parent_run_id: str, sweep_dir: str) -> None:
    """Tune's trainable: distil with the trial's settings in the trial's own run directory (a restarted trial
    continues from its last checkpoint there), evaluate, report the objectives."""
    from ray import tune

    from orchestrator.distill import run_distill

    name = trial_name(params)
    config = trial_config(base, params, **{"tracking.run_name": name})
    callbacks = []
    if config.sweep.scheduler == "asha":
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    result = run_distill(config, run_dir=Path(sweep_dir) / name, parent_run_id=parent_run_id, callbacks=callbacks,
                         quiet=True, evaluate=True)
    metrics = result.evaluation.metrics
    diversity, quality = objectives(config.teacher.family, metrics)
    training = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}  # the last training report:
    tune.report({**training, **{f"eval_{k}": v for k, v in metrics.items()}, "diversity": diversity,  # ASHA reads it
                 "quality": quality, "run_dir": str(result.run_dir), "mlflow_run_id": result.run_id})


@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict] = field(default_factory=list)  # one per trial: params, metrics, objectives
    front: list[int] = field(default_factory=list)
    picked: int = -1
    teacher_metrics: dict = field(default_factory=dict)
    parent_run_id: str = ""
    stopped: list[dict] = field(default_factory=list)  # trials the early-stopping scheduler ended


def run_sweep(config: RunConfig, base: dict, space: dict[str, dict] | None = None,
              teacher_metrics: dict | None = None, sweep_dir: Path | None = None, resume: bool = False,
              on_done: Callable | None = None, quiet: bool = False) -> SweepResult:
    """Run every trial of the space (default: sweep.space) on the cluster; base is the recipe-plus-overrides
    mapping that trials start from. sweep_dir: where the sweep's trials, Tune state and report go (a new run
    directory by default); resume=True continues the sweep in sweep_dir: finished trials are kept, unfinished
    ones continue from their last checkpoints. on_done(parent, result) runs while the parent MLflow run is
    still open (to log a report into it); quiet: no table on the console."""
    import ray
    from ray import tune

    from orchestrator.cluster import ensure_ray, quiet_tune, trials_that_fit
    from orchestrator.precompute import precompute
    from orchestrator.runs import make_run_dir, preflight, stop_cleanly, tracked_run

    space = space or load_space(config.sweep.space)
    preflight(config)
    ensure_ray()
    stores = set()
    for point in grid_points(space):  # shared stores exist before trials start, so none races to write one
        store, summary = precompute(trial_config(base, point), progress=False)
        if store.root not in stores:
            print(summary)
        stores.add(store.root)
    if not resume:
        sweep_dir = make_run_dir(config, "sweep", *((sweep_dir.parent, sweep_dir.name) if sweep_dir else ()))

    sweep = config.sweep
    with tracked_run(config, sweep_dir, "sweep") as parent, \
            stop_cleanly(sweep_dir, f"dpdmd sweep --resume {sweep_dir}"):
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, parent_run_id=parent.run_id, sweep_dir=str(sweep_dir)),
            {"CPU": sweep.trial_cpus})
        progress = trial_progress(len(grid_points(space)) * sweep.num_samples)
        if resume:
            tuner = tune.Tuner.restore(str(sweep_dir / "tune"), trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            scheduler = None
            if sweep.scheduler == "asha":
                from ray.tune.schedulers import ASHAScheduler

                # stop_last_trials=False: a trial that reaches the last update goes on to its evaluation
                scheduler = ASHAScheduler(metric=sweep.metric, mode="min", time_attr="generator_update",
                                          max_t=config.schedule.num_generator_updates, grace_period=max(
                                              1, config.schedule.num_generator_updates // 4), stop_last_trials=False)
            dist = config.distributed
            concurrency = sweep.max_concurrent_trials or trials_that_fit(
                ray.cluster_resources(), sweep.trial_cpus, dist.num_workers * dist.cpus_per_worker,
                dist.num_workers if dist.use_gpu else 0)
            tuner = tune.Tuner(
                trainable, param_space=tune_param_space(space),
                tune_config=tune.TuneConfig(num_samples=sweep.num_samples, scheduler=scheduler,
                                            max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=0, callbacks=[progress]),
            )
        print(f"[sweep] {progress.total} trials in {sweep_dir}")
        with quiet_tune():
            grid = tuner.fit()
        result = SweepResult(sweep_dir, parent_run_id=parent.run_id, teacher_metrics=teacher_metrics or {})
        for trial in grid:
            if trial.error:
                print(f"[sweep] a trial failed: {trial.error}")
                continue
            if "diversity" not in (trial.metrics or {}):
                print(f"[sweep] {trial.config} stopped early by the scheduler at generator update "
                      f"{(trial.metrics or {}).get('generator_update')}")
                result.stopped.append({"params": dict(trial.config), **(trial.metrics or {})})
                continue
            params = {k: v for k, v in trial.config.items()}
            result.rows.append({"params": params, **trial.metrics})
        if not result.rows:
            raise RuntimeError(f"every trial of the sweep failed; see {sweep_dir / 'tune'}")
        points = [(r["diversity"], r["quality"]) for r in result.rows]
        result.front, result.picked = pareto_front(points), pick(points, sweep.quality_drop_from_best)
        table = sweep_table(result, config.teacher.family)
        (sweep_dir / "sweep.md").write_text(table + "\n")
        (sweep_dir / "sweep.json").write_text(json.dumps(
            {"rows": result.rows, "front": result.front, "picked": result.picked}, indent=1, default=str))
        plot = plot_pareto(result, config.teacher.family, sweep_dir / "pareto.png")
        parent.log_artifact(sweep_dir / "sweep.md")
        parent.log_artifact(plot)
        picked = result.rows[result.picked]
        parent.log_metrics({f"picked_{k}": v for k, v in picked.items() if k in ("diversity", "quality")
                            or k.startswith("eval_")})  # the objectives, not Tune's bookkeeping
        if on_done is not None:
            on_done(parent, result)
    if not quiet:
        print(table)
    return result


def trial_progress(total: int):
    """A Tune callback that prints one line per finished trial, with the time since the start and an estimate
    of the time left."""
    from ray.tune import Callback

    from workers.context import clock

    class TrialProgress(Callback):
        def __init__(self):
            self.total, self.done, self.start = total, 0, time.time()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "failed")

        def _line(self, trial, what: str) -> None:
            self.done += 1
            elapsed = time.time() - self.start
            print(f"[sweep] trial {trial_name(dict(trial.config))} {what} ({self.done}/{self.total}), "
                  f"{clock(elapsed)} elapsed, about {clock(elapsed / self.done * (self.total - self.done))} left",
                  flush=True)

    return TrialProgress()


def sweep_table(result: SweepResult, family: str) -> str:
    (d_name, _), (q_name, _) = family_module(family).DIVERSITY, family_module(family).QUALITY
    keys = sorted({k for r in result.rows for k in r["params"]})
    lines = ["| " + " | ".join([*keys, d_name, q_name, "pareto", "picked"]) + " |",
             "|" + "---|" * (len(keys) + 4)]
    for i, row in enumerate(result.rows):
        cells = [str(row["params"].get(k, "")) for k in keys]
        cells += [f"{row['eval_' + d_name]:.4g}", f"{row['eval_' + q_name]:.4g}",
                  "yes" if i in result.front else "", "<-" if i == result.picked else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_pareto(result: SweepResult, family: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (d_name, _), (q_name, q_sign) = family_module(family).DIVERSITY, family_module(family).QUALITY
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
