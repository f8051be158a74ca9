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
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import tune_spaces
from models.families import get_family
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
    """A trial's directory from its parameters, e.g. diversity_weight=0.05-seed=1 (six significant digits:
    trials an optimizer samples must not share one)."""
    return "-".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in sorted(params.items())) or "trial"


# the paper's symbols for the settings a sweep varies most
SYMBOLS = {"loss.diversity_weight": "lambda", "loss.anchor_step": "K"}


def trial_title(params: dict) -> str:
    """A trial's MLflow run name: its settings with short numbers, the paper's symbols first, e.g.
    `lambda=0.05 K=5 seed=1` (a sampled 0.0512345678 reads 0.0512)."""
    order = sorted(params, key=lambda k: (k not in SYMBOLS, list(SYMBOLS).index(k) if k in SYMBOLS else 0, k))
    return " ".join(f"{SYMBOLS.get(k, k.split('.')[-1])}={params[k]:.3g}" if isinstance(params[k], float)
                    else f"{SYMBOLS.get(k, k.split('.')[-1])}={params[k]}" for k in order) or "trial"


def trial_config(base: dict, params: dict, **extra: Any) -> RunConfig:
    data = copy.deepcopy(base)
    for key, value in {**params, **extra}.items():
        set_dotted(data, key, value)
    return build(RunConfig, data)


# ----------------------------------------------------------------------------------------------------
# Objectives and the Pareto front


def objectives(family: str, metrics: dict[str, float]) -> tuple[float, float]:
    """(diversity, quality), each signed so that higher is better."""
    found = get_family(family)
    (d, d_sign), (q, q_sign) = found.diversity, found.quality
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


# ----------------------------------------------------------------------------------------------------
# Trials


def run_trial(params: dict, base: dict, parent_run_id: str, sweep_dir: str) -> None:
    """Tune's trainable: distil with the trial's settings in the trial's own run directory (a restarted trial
    continues from its last checkpoint there), evaluate, report the objectives. Training reports reach Tune
    while the trial runs whenever something acts on them (ASHA, PBT, the collapse guard)."""
    from ray import tune

    from orchestrator.distill import run_distill

    name = trial_name(params)
    config = trial_config(base, params, **{"tracking.run_name": trial_title(params)})
    sweep = config.sweep
    if sweep.scheduler == "pbt":
        return _pbt_trial(config, params, parent_run_id, Path(sweep_dir))
    callbacks = []
    if sweep.scheduler != "none" or sweep.collapse_fraction:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    result = run_distill(config, run_dir=Path(sweep_dir) / name, parent_run_id=parent_run_id, callbacks=callbacks,
                         quiet=True, evaluate=True)
    tune.report(_final_report(config, result))


def _final_report(config: RunConfig, result) -> dict:
    """The trial's last report: the last training report's numbers (ASHA and PBT read them), the evaluation's,
    and the two objectives."""
    metrics = result.evaluation.metrics
    diversity, quality = objectives(config.teacher.family, metrics)
    training = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    return {**training, **{f"eval_{k}": v for k, v in metrics.items()}, "diversity": diversity, "quality": quality,
            "run_dir": str(result.run_dir), "mlflow_run_id": result.run_id}


def _pbt_trial(config: RunConfig, params: dict, parent_run_id: str, sweep_dir: Path) -> None:
    """A PBT trial trains in the trial's own process (one training process: Tune pauses and restarts trials,
    and a Ray Train run started inside a trial would leave its resources behind when the trial is stopped).
    Each training report goes to Tune with its checkpoint (both engines, optimizers, progress and RNG). When
    PBT hands a trial a better trial's perturbed settings, Tune restarts it with that trial's checkpoint:
    training continues from it under the new settings, in a run directory (and MLflow run) of its own, one per
    segment."""
    from ray import tune

    from orchestrator.precompute import precompute
    from orchestrator.runs import (GENERATOR_DIR, Distilled, evaluate_generator, live_evaluator, make_run_dir,
                                   tracked_run)
    from workers.context import LocalContext
    from workers.live_eval import LiveEvaluation
    from workers.train import store_source, train

    trial_id = tune.get_context().get_trial_id()
    segment = len(list(sweep_dir.glob(f"pbt-{trial_id}-*")))
    run_dir = make_run_dir(config, "distill", sweep_dir, f"pbt-{trial_id}-{segment}")
    start = tune.get_checkpoint()
    store, _ = precompute(config, use_ray=False, progress=False)  # the sweep made it: this only opens it
    hyper = {k: v for k, v in params.items() if k in PBT_KEYS}

    class TrialContext(LocalContext):
        """Checkpoints in the segment's run directory, each report also to Tune; the first checkpoint to
        resume from is the one Tune hands over."""

        last: dict = {}

        def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
            super().report(metrics, checkpoint_dir)
            self.last = metrics
            if checkpoint_dir is not None:  # the report goes along: a segment handed the last checkpoint reads it
                (checkpoint_dir / REPORT_FILE).write_text(json.dumps(metrics))
            tune.report({**metrics, **hyper},
                        checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

        def latest_checkpoint(self) -> Path | None:
            return super().latest_checkpoint() or (Path(start.to_directory()) if start else None)

    with tracked_run(config, run_dir, "distill", parent_run_id) as tracked:
        mlflow = (tracked.uri, tracked.run_id)
        actor = live_evaluator(config, run_dir, mlflow)
        ctx = TrialContext(run_dir)
        progress = train(config, ctx, store_source(store), store.negative(), mlflow,
                         live=LiveEvaluation.ray_actor(actor) if actor is not None else None)
        last = ctx.latest_checkpoint()  # this segment's, or the one handed over when nothing was left to train
        generator_dir = run_dir / GENERATOR_DIR
        shutil.copytree(last / GENERATOR_DIR, generator_dir, dirs_exist_ok=True)
        metrics = ctx.last or json.loads((last / REPORT_FILE).read_text())
        result = Distilled(run_dir, generator_dir, {**metrics, "generator_update": progress.generator_updates,
                                                    "resumes": progress.resumes}, tracked.run_id)
        result.evaluation = evaluate_generator(config, generator_dir, run_dir, run_dir.name, tracked)
    tune.report({**_final_report(config, result), **hyper})


PBT_KEYS = ("loss.diversity_weight", "critic.optim.lr")
REPORT_FILE = "report.json"


@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict] = field(default_factory=list)  # one per trial: params, metrics, objectives
    front: list[int] = field(default_factory=list)
    picked: int = -1
    teacher_metrics: dict = field(default_factory=dict)
    parent_run_id: str = ""
    stopped: list[dict] = field(default_factory=list)  # trials a scheduler or the collapse guard ended, with why
    histories: dict = field(default_factory=dict)  # Tune's trial id -> its reports over time (a DataFrame)


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

    from orchestrator.cluster import as_a_job, ensure_ray, trials_that_fit
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
            stop_cleanly(sweep_dir, as_a_job(f"dpdmd sweep --resume {sweep_dir}")):
        dist = config.distributed
        # a PBT trial trains in its own process (see _pbt_trial): it holds the training worker's resources too
        resources = ({"CPU": sweep.trial_cpus + dist.cpus_per_worker, "GPU": int(dist.use_gpu)}
                     if sweep.scheduler == "pbt" else {"CPU": sweep.trial_cpus})
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, parent_run_id=parent.run_id, sweep_dir=str(sweep_dir)),
            resources)
        progress = trial_progress(len(grid_points(space)) * sweep.num_samples)
        guard = None
        if sweep.collapse_fraction:
            metric = collapse_metric(config.teacher.family)
            teacher = teacher_metrics if teacher_metrics and metric in teacher_metrics else _teacher_metrics(config)
            guard = collapse_guard(metric, sweep.collapse_fraction * teacher[metric], sweep.collapse_patience)
        if resume:
            tuner = tune.Tuner.restore(str(sweep_dir / "tune"), trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            concurrency = sweep.max_concurrent_trials or trials_that_fit(
                ray.cluster_resources(), sweep.trial_cpus + config.evaluation.cpus,
                dist.num_workers * dist.cpus_per_worker, dist.num_workers if dist.use_gpu else 0)
            tuner = tune.Tuner(
                trainable, param_space=tune_param_space(space),
                tune_config=tune.TuneConfig(num_samples=sweep.num_samples, scheduler=tune_scheduler(config, space),
                                            search_alg=search_algorithm(config, space),
                                            max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=0, callbacks=[progress],
                                          stop=guard, checkpoint_config=tune.CheckpointConfig(num_to_keep=None if sweep.scheduler == "pbt" else 2)),
            )
        print(f"[sweep] {progress.total} trials in {sweep_dir}")
        grid = tuner.fit()
        result = SweepResult(sweep_dir, parent_run_id=parent.run_id, teacher_metrics=teacher_metrics or {})
        for trial in grid:
            if trial.error:
                print(f"[sweep] a trial failed: {trial.error}")
                continue
            if "diversity" not in (trial.metrics or {}):
                trial_id = (trial.metrics or {}).get("trial_id")
                reason = guard.reasons.get(trial_id) if guard else None
                reason = reason or (f"stopped early by the {sweep.scheduler} scheduler at generator update "
                                    f"{(trial.metrics or {}).get('generator_update')}")
                print(f"[sweep] {trial_name(dict(trial.config))}: {reason}")
                result.stopped.append({"params": dict(trial.config), "reason": reason, **(trial.metrics or {})})
                _record_stop(config, sweep_dir / trial_name(dict(trial.config)), reason)
                continue
            params = {k: v for k, v in trial.config.items()}
            result.rows.append({"params": params, **trial.metrics})
        result.histories = trial_histories(grid)
        if not result.rows and not result.stopped:
            raise RuntimeError(f"every trial of the sweep failed; see {sweep_dir / 'tune'}")
        if result.rows:
            points = [(r["diversity"], r["quality"]) for r in result.rows]
            result.front, result.picked = pareto_front(points), pick(points, sweep.quality_drop_from_best)
        table = sweep_table(result, config.teacher.family, sweep.quality_drop_from_best)
        (sweep_dir / "sweep.md").write_text(table + "\n")
        (sweep_dir / "sweep.json").write_text(json.dumps(
            {"rows": result.rows, "front": result.front, "picked": result.picked}, indent=1, default=str))
        parent.log_artifact(sweep_dir / "sweep.md")
        if result.rows:
            parent.log_artifact(plot_pareto(result, config.teacher.family, sweep_dir / "pareto.png"))
        for picture in (plot_curves(live_curves(sweep_dir), config.teacher.family, sweep_dir / "curves.png"),
                        plot_hyperparameters(result, sweep_dir / "pbt.png") if sweep.scheduler == "pbt" else None):
            if picture is not None:
                parent.log_artifact(picture)
        if result.rows:
            picked = result.rows[result.picked]
            parent.log_metrics({f"picked_{k}": v for k, v in picked.items() if k in ("diversity", "quality")
                                or k.startswith("eval_")})  # the objectives, not Tune's bookkeeping
        if on_done is not None:
            on_done(parent, result)
    if not quiet:
        print(table)
    return result


# ----------------------------------------------------------------------------------------------------
# What acts on trials while they run


def tune_scheduler(config: RunConfig, space: dict[str, dict]):
    """ASHA (stops trials early on sweep.metric), PBT (perturbs lambda and the critic's learning rate of the
    space, continuing from the better trial's checkpoint), or None."""
    sweep, schedule = config.sweep, config.schedule
    if sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # stop_last_trials=False: a trial that reaches the last update goes on to its evaluation
        return ASHAScheduler(metric=sweep.metric, mode=sweep.mode, time_attr="generator_update",
                             max_t=schedule.num_generator_updates,
                             grace_period=max(1, schedule.num_generator_updates // 4), stop_last_trials=False)
    if sweep.scheduler == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        mutations = {key: values if kind in ("grid", "choice") else tune_param_space({key: space[key]})[key]
                     for key in PBT_KEYS if key in space for kind, values in space[key].items()}
        if not mutations:
            raise ConfigError("sweep.scheduler", f"pbt perturbs {' or '.join(PBT_KEYS)}: put at least one of them "
                                                 "in the search space (e.g. loss.diversity_weight: {uniform: [0, 1]})")
        interval = sweep.pbt_interval or schedule.checkpoint_every
        if not interval or (schedule.checkpoint_every and interval % schedule.checkpoint_every):
            raise ConfigError("sweep.pbt_interval", f"PBT continues from checkpoints: give a multiple of "
                                                    f"schedule.checkpoint_every ({schedule.checkpoint_every}), which "
                                                    "must be > 0")
        # synch: trials wait for each other at every interval. Each trial starts its own Ray Train run, and
        # those starts are staggered: asynchronously a fast trial can finish before a slow one reports once.
        return PopulationBasedTraining(time_attr="generator_update", metric=sweep.metric, mode=sweep.mode,
                                       perturbation_interval=interval, hyperparam_mutations=mutations, synch=True)
    return None


def search_algorithm(config: RunConfig, space: dict[str, dict]):
    """Optuna's multi-objective search on (diversity, quality), both maximised as `objectives` signs them, or
    None (Tune's own grid and random draws)."""
    if config.sweep.search != "optuna":
        return None
    grids = [k for k, spec in space.items() if next(iter(spec)) == "grid"]
    if grids:
        raise ConfigError("sweep.search", f"optuna draws every trial itself: give {', '.join(grids)} as choice / "
                                          "uniform / loguniform / randint instead of grid (and sweep.num_samples "
                                          "trials)")
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=["diversity", "quality"], mode=["max", "max"])


def collapse_metric(family: str) -> str:
    """The diversity metric a collapse guard compares with the teacher's: higher is better."""
    return get_family(family).collapse


def collapse_guard(metric: str, floor: float, patience: int):
    """A Tune stopper: a trial whose live `metric` is below floor in `patience` evaluations in a row is stopped,
    its reason kept in .reasons (trial id -> text)."""
    from ray.tune.stopper import Stopper

    class CollapseGuard(Stopper):
        def __init__(self):
            self.reasons: dict[str, str] = {}
            self._strikes: dict[str, int] = {}
            self._seen: dict[str, int] = {}

        def __call__(self, trial_id: str, result: dict) -> bool:
            value, step = result.get(f"live_{metric}"), result.get("live_generator_update")
            if value is None or value != value or self._seen.get(trial_id) == step:  # each evaluation counts once
                return trial_id in self.reasons
            self._seen[trial_id] = step
            self._strikes[trial_id] = self._strikes.get(trial_id, 0) + 1 if value < floor else 0
            if self._strikes[trial_id] >= patience and trial_id not in self.reasons:
                self.reasons[trial_id] = (f"collapse guard: live {metric} below {floor:.4g} ({value:.4g} at generator "
                                          f"update {step}) in {patience} evaluations in a row")
            return trial_id in self.reasons

        def stop_all(self) -> bool:
            return False

    return CollapseGuard()


def _teacher_metrics(config: RunConfig) -> dict[str, float]:
    """The teacher's metrics on the held-out set, for a guard that needs them when no table provides them."""
    from workers.evaluate import evaluate, teacher_sampler
    from workers.teacher import load_teacher

    adapter, net = load_teacher(config, vae=True)
    return evaluate(config, adapter, net, teacher_sampler(config, adapter)).metrics


def _record_stop(config: RunConfig, run_dir: Path, reason: str) -> None:
    """A stopped trial's MLflow run: KILLED, with the reason as the tag dpdmd.stop_reason."""
    record = run_dir / "mlflow.json"
    if not record.is_file():
        return
    from mlflow.tracking import MlflowClient

    from workers.tracking import STOP_REASON, tracking_uri

    client = MlflowClient(tracking_uri(config))
    run_id = json.loads(record.read_text())["run_id"]
    client.set_tag(run_id, STOP_REASON, reason)
    client.set_terminated(run_id, "KILLED")


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


def live_curves(run_dir: Path) -> dict[str, list[dict]]:
    """Every live evaluation under run_dir, by trial directory: [{"generator_update": ..., "live_*": ...}]."""
    curves = {}
    for path in sorted(Path(run_dir).glob("**/live_eval.jsonl")):
        curves[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return curves


def plot_curves(curves: dict[str, list[dict]], family: str, path: Path) -> Path | None:
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


def trial_histories(trials) -> dict:
    """Each trial's reports over time, by Tune's trial id: under PBT a trial's config (and so its name) is the
    last one PBT gave it, and two trials that end on the same config would share a name."""
    return {(t.metrics or {}).get("trial_id", str(i)): t.metrics_dataframe for i, t in enumerate(trials)
            if t.metrics_dataframe is not None}


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
