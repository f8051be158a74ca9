"""Running trials: a Ray Tune trial (distillation, then evaluation; in the trial's own process with one
training worker or under population-based training), its progress line and a stopped trial's record; without
Ray, trials as processes of their own (`--jobs`) or trained together (`--together`), the teacher's evaluation,
and a failed trial's log."""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from models.families import get_family
from orchestrator import recipe as recipes
from orchestrator.results import TEACHER, objectives
from orchestrator.spaces import PBT_KEYS, grid_points, trial_config, trial_name, trial_title
from workers.config import RunConfig
from workers.configure import to_dict

REPORT_FILE = "report.json"  # a trial's last report, beside its checkpoint

def run_trial(params: dict, base: dict, parent_run_id: str, sweep_dir: str) -> None:
    """Tune's trainable: distil with the trial's settings in the trial's own run directory (a restarted trial
    continues from its last checkpoint there), evaluate, report the objectives. Training reports reach Tune
    while the trial runs whenever something acts on them (reports_while_training). A trial of one training
    worker trains in the trial's own process; one of several starts a Ray Train run of its own."""
    from ray import tune

    from orchestrator.distill import run_distill

    config = trial_config(base, params, **{"tracking.run_name": trial_title(params)})
    if trains_in_trial(config):
        return _trial_in_process(config, params, parent_run_id, Path(sweep_dir))
    callbacks = []
    if reports_while_training(config):
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    result = run_distill(config, run_dir=Path(sweep_dir) / trial_name(params), parent_run_id=parent_run_id,
                         callbacks=callbacks, quiet=True, evaluate=True)
    tune.report(_final_report(config, result))


def reports_while_training(config: RunConfig) -> bool:
    """Whether a trial's training reports go to Tune as they come: only when something acts on them (ASHA,
    PBT, the collapse guard). Otherwise Tune would hold a search algorithm's objectives missing from them (an
    Optuna search refuses such a report) and record reports nobody reads."""
    return config.sweep.scheduler != "none" or bool(config.sweep.collapse_fraction)


def trains_in_trial(config: RunConfig) -> bool:
    """Whether a sweep's trial trains in its own process, holding the training worker's resources: with one
    training worker (a Ray Train run inside the trial would start two more processes, a controller and the
    worker, each importing torch and the model code again: about 15 CPU-seconds a trial on a 2-core machine),
    and always under PBT (Tune pauses and restarts its trials, and a Ray Train run started inside one would leave
    its resources behind when the trial is stopped)."""
    return config.sweep.scheduler == "pbt" or config.distributed.num_workers == 1


def _final_report(config: RunConfig, result) -> dict:
    """The trial's last report: the last training report's numbers (ASHA and PBT read them), the evaluation's,
    and the two objectives."""
    metrics = result.evaluation.metrics
    diversity, quality = objectives(config.teacher.family, metrics)
    training = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    return {**training, **{f"eval_{k}": v for k, v in metrics.items()}, "diversity": diversity, "quality": quality,
            "run_dir": str(result.run_dir), "mlflow_run_id": result.run_id}


def _trial_in_process(config: RunConfig, params: dict, parent_run_id: str, sweep_dir: Path) -> None:
    """A trial that trains in its own process (trains_in_trial): the single-run trainer over the sweep's store,
    checkpoints in the trial's run directory, its training reports also to Tune. A restarted trial continues from
    its run directory's last checkpoint.

    Under PBT each report goes to Tune with its checkpoint (both engines, optimizers, progress and RNG). When PBT
    hands a trial a better trial's perturbed settings, Tune restarts it with that trial's checkpoint: training
    continues from it under the new settings, in a run directory (and MLflow run) of its own, one per segment."""
    from ray import tune

    from orchestrator.precompute import precompute
    from orchestrator.runs import record_data

    pbt = config.sweep.scheduler == "pbt"
    start = tune.get_checkpoint() if pbt else None
    run_dir = _trial_run_dir(config, params, sweep_dir, pbt)
    store, _ = precompute(config, use_ray=False, progress=False)  # the sweep made it: this only opens it
    record_data(run_dir, store, config, 1)
    hyper = {k: v for k, v in params.items() if k in PBT_KEYS} if pbt else {}
    context = _trial_context(pbt, hyper, reports_while_training(config), start)
    result = _train_tracked(config, run_dir, store, context, parent_run_id)
    # Tune stops this process as soon as the last report is in. The run's garbage (what train() gave back to the
    # collector, DeepSpeed's reference cycles) is collected first: a full collection still running then was cut
    # by the stop's SIGTERM and printed a SystemExit traceback ("Exception ignored in ... WeakSet") on the console.
    gc.collect()
    tune.report({**_final_report(config, result), **hyper})


def _trial_run_dir(config: RunConfig, params: dict, sweep_dir: Path, pbt: bool) -> Path:
    """The run directory of a trial that trains in its own process: under PBT a new one per segment; otherwise the
    trial's own, made unless it is there already (a restarted trial, whose checkpoints are in it)."""
    from ray import tune

    from orchestrator.runs import make_run_dir

    if pbt:
        trial_id = tune.get_context().get_trial_id()
        segment = len(list(sweep_dir.glob(f"pbt-{trial_id}-*")))
        return make_run_dir(config, "distill", sweep_dir, f"pbt-{trial_id}-{segment}")
    run_dir = sweep_dir / trial_name(params)
    if not (run_dir / "config.yaml").is_file():  # else a restarted trial: its checkpoints are there
        run_dir = make_run_dir(config, "distill", sweep_dir, run_dir.name)
    return run_dir


def _trial_context(pbt: bool, hyper: dict, watched: bool, start) -> type:
    """The trainer's context class for a trial in its own process. hyper: the PBT settings each report carries;
    watched: whether reports go to Tune (reports_while_training); start: the checkpoint Tune handed over, or None."""
    from ray import tune

    from workers.context import LocalContext

    class TrialContext(LocalContext):
        """Checkpoints in the trial's run directory, each report also to Tune when a scheduler or the collapse
        guard reads them; under PBT the first checkpoint to resume from is the one Tune hands over."""

        last: dict = {}

        def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
            super().report(metrics, checkpoint_dir)
            self.last = metrics
            if checkpoint_dir is not None:  # the report goes along: a trial restarted at its end reads it
                (checkpoint_dir / REPORT_FILE).write_text(json.dumps(metrics))
            if watched:
                tune.report({**metrics, **hyper}, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir)
                            if pbt and checkpoint_dir is not None else None)

        def latest_checkpoint(self) -> Path | None:
            return super().latest_checkpoint() or (Path(start.to_directory()) if start else None)

    return TrialContext


def _train_tracked(config: RunConfig, run_dir: Path, store, context: type, parent_run_id: str):
    """Train in this process under the trial's MLflow run, export the generator of the last checkpoint into
    run_dir, log it and the config, and evaluate it; returns the trial's Distilled result with its evaluation."""
    from orchestrator.runs import GENERATOR_DIR, Distilled, evaluate_generator, live_evaluator, tracked_run
    from workers.live_eval import LiveEvaluation
    from workers.train import store_source, train

    with tracked_run(config, run_dir, "distill", parent_run_id) as tracked:
        mlflow = (tracked.uri, tracked.run_id)
        actor = live_evaluator(config, run_dir, mlflow)
        ctx = context(run_dir)
        progress = train(config, ctx, store_source(store), store.negative(), mlflow,
                         live=LiveEvaluation.ray_actor(actor) if actor is not None else None)
        last = ctx.latest_checkpoint()  # this segment's, or the one handed over when nothing was left to train
        generator_dir = run_dir / GENERATOR_DIR
        shutil.copytree(last / GENERATOR_DIR, generator_dir, dirs_exist_ok=True)
        metrics = ctx.last or json.loads((last / REPORT_FILE).read_text())
        tracked.log_artifact(run_dir / "config.yaml")
        tracked.log_artifact(generator_dir, "generator")
        result = Distilled(run_dir, generator_dir, {**metrics, "generator_update": progress.generator_updates,
                                                    "resumes": progress.resumes}, tracked.run_id)
        result.evaluation = evaluate_generator(config, generator_dir, run_dir, run_dir.name, tracked)
    return result


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


ERROR_LOG = "error.log"  # a failed trial's full traceback, in its run directory


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
    rows, todo = _finished_rows(points, trials_dir)
    groups = trial_groups(todo, together)
    print(f"[fidelity] {len(points)} trials, {len(rows)} already done, {len(todo)} to run, "
          + (f"{len(groups)} process(es) of up to {together} trials trained together, " if together > 1 else "")
          + f"{jobs} at a time")
    failures, unfinished = [], 0
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        pending = _submit_trials(pool, base, groups, jobs, runner, together, deadline)
        for future in futures.as_completed(pending):
            group = pending[future]
            outcomes = _outcomes(future, together, len(group))
            unfinished += _record_outcomes(group, outcomes, rows, failures, len(points))
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(points)} trials failed (the finished ones are kept; rerun the "
                           f"same command with --out {trials_dir.parent} to run only the rest; each failed trial's "
                           f"traceback is in its {ERROR_LOG}):\n  " + "\n  ".join(failures))
    if unfinished:
        print(f"[fidelity] {unfinished} of {len(points)} trials stopped at the time limit, checkpointed; rerun the "
              f"same command with --out {trials_dir.parent} to continue them")
        return None
    return rows


def trial_groups(todo: list[tuple[dict, Path]], together: int) -> list[list[tuple[dict, Path]]]:
    """Groups of up to `together` trials that can train as one computation: those whose settings differ only in
    what may differ per trial (workers/trials.py: seeds and loss weights; loss.method may not), in the grid's order."""
    from workers.trials import PER_TRIAL_KEYS

    kinds: dict[str, list[tuple[dict, Path]]] = {}
    for params, run_dir in todo:
        shared = {k: v for k, v in params.items() if k not in PER_TRIAL_KEYS}
        kinds.setdefault(json.dumps(shared, sort_keys=True, default=str), []).append((params, run_dir))
    return [trials[i:i + together] for trials in kinds.values() for i in range(0, len(trials), together)]


def _finished_rows(points: list[dict], trials_dir: Path) -> tuple[list[dict], list[tuple[dict, Path]]]:
    """The rows of the trials that finished already (their result.json), and (params, run directory) of the rest."""
    rows, todo = [], []
    for params in points:
        run_dir = trials_dir / trial_name(params)
        done = run_dir / "result.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
        else:
            todo.append((params, run_dir))
    return rows, todo


def _submit_trials(pool, base: dict, groups: list[list[tuple[dict, Path]]], jobs: int,
                   runner: Callable | None, together: int, deadline: float | None) -> dict:
    """Each group's process submitted to pool, the machine's cores shared among the jobs: with together > 1 one
    process per group (run_trial_group), else one per trial (run_local_trial). Maps each future to its trials."""
    threads = max(1, (os.cpu_count() or 1) // jobs)

    def config_of(params, run_dir):
        return to_dict(trial_config(base, params, **{"tracking.run_name": trial_title(params)}))
    if together > 1:
        return {pool.submit(runner or run_trial_group, [config_of(*t) for t in group],
                            [str(t[1]) for t in group], threads, deadline): group for group in groups}
    return {pool.submit(runner or run_local_trial, config_of(*group[0]), str(group[0][1]), threads): group
            for group in groups}


def _outcomes(future, together: int, size: int) -> list:
    """A finished process's outcome per trial: its metrics, error or None each, or for every trial of the
    process the exception that ended it."""
    try:
        results = future.result()
        return results if together > 1 else [results]
    except Exception as err:  # one failed process does not lose the others
        return [err] * size


def _record_outcomes(group: list[tuple[dict, Path]], outcomes: list, rows: list[dict], failures: list[str],
                     total: int) -> int:
    """Each trial's outcome: its row into result.json and rows, or its failure reported and added to failures;
    returns how many of the trials stopped unfinished (None)."""
    unfinished = 0
    for (params, run_dir), metrics in zip(group, outcomes):
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
        print(f"[fidelity] {len(rows)}/{total} done: {run_dir.name}")
    return unfinished


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
