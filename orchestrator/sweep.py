"""`dpdmd sweep`: Ray Tune over dotted config keys. One trial = distillation, then evaluation on the
held-out prompts and seeds. Trials share trajectory stores, run as concurrently as the cluster allows,
and nest their MLflow runs under one parent; the sweep ends with the Pareto front of diversity against
quality (plot and table) and the trade-off picked by sweep.quality_drop_from_best.

    dpdmd sweep --recipe toy2d sweep.space=default
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from models.families import get_family
from orchestrator.reports import write_sweep
from orchestrator.results import SweepResult, pareto_front, pick, trial_histories
from orchestrator.spaces import PBT_KEYS, grid_points, load_space, trial_config, trial_name, tune_param_space
from orchestrator.trial_runs import _record_stop, _teacher_metrics, run_trial, trains_in_trial, trial_progress
from workers.config import ConfigError, RunConfig


def run_sweep(config: RunConfig, base: dict, space: dict[str, dict] | None = None,
              teacher_metrics: dict | None = None, sweep_dir: Path | None = None, resume: bool = False,
              on_done: Callable | None = None, quiet: bool = False, continue_with: str | None = None) -> SweepResult:
    """Run every trial of the space (default: sweep.space) on the cluster; base is the recipe-plus-overrides
    mapping that trials start from. sweep_dir: where the sweep's trials, Tune state and report go (a new run
    directory by default); resume=True continues the sweep in sweep_dir: finished trials are kept, unfinished
    ones continue from their last checkpoints. on_done(parent, result) runs while the parent MLflow run is
    still open (to log a report into it); quiet: no table on the console; continue_with: the command that continues
    a stopped sweep, as its caller's user runs it (default: `dpdmd sweep --resume SWEEP_DIR`)."""
    import time

    from orchestrator.cluster import as_a_job, ensure_ray
    from orchestrator.runs import make_run_dir, preflight, stop_cleanly, summary, tracked_run
    from workers.context import clock
    from workers.tracking import tracking_uri

    start = time.time()
    space = space or load_space(config.sweep.space)
    # the scheduler's and the searcher's refusals (a grid under optuna, PBT with nothing to perturb) before the
    # stores, a run directory or an MLflow run exist
    tune_scheduler(config, space)
    search_algorithm(config, space)
    preflight(config)
    ensure_ray()
    precompute_stores(base, space)
    if not resume:
        sweep_dir = make_run_dir(config, "sweep", *((sweep_dir.parent, sweep_dir.name) if sweep_dir else ()))
    with tracked_run(config, sweep_dir, "sweep") as parent, \
            stop_cleanly(sweep_dir, continue_with or as_a_job(f"dpdmd sweep --resume {sweep_dir}")):
        tuner, progress, guard = build_tuner(config, base, space, sweep_dir, parent.run_id, resume, teacher_metrics)
        print(f"[sweep] {progress.total} trials in {sweep_dir}")
        # Tune's own Ctrl-C handler ends fit() as if the sweep were done: the unfinished trials came back as
        # "stopped early", the report was written and the command exited 0. Without it, Ctrl-C reaches
        # stop_cleanly as in every other command (Tune's experiment state is saved as the trials report).
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        grid = tuner.fit()
        result = collect(grid, guard, config, sweep_dir, parent.run_id, teacher_metrics)
        table = write_sweep(result, config, parent)
        if on_done is not None:
            on_done(parent, result)
    if not quiet:  # the table, then what was made and where, as every command closes
        made = {"sweep directory": sweep_dir, "report": sweep_dir / "sweep.md"}
        made.update({what: sweep_dir / name for what, name in (("Pareto plot", "pareto.png"), ("curves", "curves.png"),
                                                               ("PBT", "pbt.png")) if (sweep_dir / name).is_file()})
        made["MLflow"] = f"parent run {result.parent_run_id} (mlflow ui --backend-store-uri {tracking_uri(config)})"
        print(f"{table}\n\n" + summary(f"[sweep] done in {clock(time.time() - start)}", made))
    return result


def precompute_stores(base: dict, space: dict[str, dict]) -> None:
    """Every store the space's trials read, before they start (so that none races another to write one)."""
    from orchestrator.precompute import precompute
    from orchestrator.runs import require_lpips

    for point in grid_points(space):  # every trial's checks before the first store is written
        require_lpips(trial_config(base, point))
    stores = set()
    for point in grid_points(space):
        store, summary = precompute(trial_config(base, point), progress=False)
        if store.root not in stores:
            print(summary)
        stores.add(store.root)


def build_tuner(config: RunConfig, base: dict, space: dict[str, dict], sweep_dir: Path, parent_run_id: str,
                resume: bool, teacher_metrics: dict | None):
    """The Tune experiment (restored from sweep_dir when resuming), its progress callback and its collapse guard
    (None without sweep.collapse_fraction)."""
    import ray
    from ray import tune

    from orchestrator.cluster import trials_that_fit

    sweep, dist = config.sweep, config.distributed
    in_process = trains_in_trial(config)  # then the trial holds the training worker's resources too
    resources = ({"CPU": sweep.trial_cpus + dist.cpus_per_worker, "GPU": int(dist.use_gpu)}
                 if in_process else {"CPU": sweep.trial_cpus})
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, parent_run_id=parent_run_id, sweep_dir=str(sweep_dir)), resources)
    progress = trial_progress(len(grid_points(space)) * sweep.num_samples)
    guard = None
    if sweep.collapse_fraction:
        metric = collapse_metric(config.teacher.family)
        teacher = teacher_metrics if teacher_metrics and metric in teacher_metrics else _teacher_metrics(config)
        guard = collapse_guard(metric, sweep.collapse_fraction * teacher[metric], sweep.collapse_patience)
    if resume:
        return (tune.Tuner.restore(str(sweep_dir / "tune"), trainable, resume_unfinished=True, resume_errored=True),
                progress, guard)
    concurrency = sweep.max_concurrent_trials or trials_that_fit(
        ray.cluster_resources(), sweep.trial_cpus + config.evaluation.cpus,
        dist.num_workers * dist.cpus_per_worker, dist.num_workers if dist.use_gpu else 0)
    keep = tune.CheckpointConfig(num_to_keep=None if sweep.scheduler == "pbt" else 2)
    tuner = tune.Tuner(
        trainable, param_space=tune_param_space(space),
        tune_config=tune.TuneConfig(num_samples=sweep.num_samples, scheduler=tune_scheduler(config, space),
                                    search_alg=search_algorithm(config, space), max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=0, callbacks=[progress],
                                  stop=guard, checkpoint_config=keep,
                                  # a trial that trains in its own process is restarted by Tune (a Ray Train run
                                  # restarts its workers itself), from the last checkpoint in its run directory
                                  failure_config=tune.FailureConfig(max_failures=dist.max_failures if in_process
                                                                    else 0)))
    return tuner, progress, guard


def collect(grid, guard, config: RunConfig, sweep_dir: Path, parent_run_id: str,
            teacher_metrics: dict | None) -> SweepResult:
    """The finished trials' rows, the stopped ones with their reasons, the Pareto front and the pick."""
    sweep = config.sweep
    result = SweepResult(sweep_dir, parent_run_id=parent_run_id, teacher_metrics=teacher_metrics or {})
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
        result.rows.append({"params": dict(trial.config.items()), **trial.metrics})
    result.histories = trial_histories(grid)
    if not result.rows and not result.stopped:
        raise RuntimeError(f"every trial of the sweep failed; see {sweep_dir / 'tune'}")
    if result.rows:
        points = [(r["diversity"], r["quality"]) for r in result.rows]
        result.front, result.picked = pareto_front(points), pick(points, sweep.quality_drop_from_best)
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


