"""The run toolkit every command goes through: a run directory, checks before anything is reserved, one
distil-export(-evaluate) path with or without Ray, resume, and a clean stop on Ctrl-C.

A run directory holds everything of one run: config.yaml (the resolved config; `--resume` reads it back),
checkpoints/step-NNNNNNN/ (both engines, optimizers, progress, RNG: Ray Train's storage or the local
context's), generator/ (the exported generator), mlflow.json (the MLflow run it logs into), and for
evaluated runs samples.npz and samples.png.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchestrator import recipe as recipes
from workers.config import ConfigError, RunConfig
from workers.context import CHECKPOINTS, checkpoint_name, device_for
from workers.train import GENERATOR_DIR

MLFLOW_FILE = "mlflow.json"


# ----------------------------------------------------------------------------------------------------
# Run directories


def make_run_dir(config: RunConfig, kind: str, parent: Path | None = None, name: str | None = None) -> Path:
    """A new run directory with the resolved config.yaml in it: <output_dir>/runs/<time>-<kind>-<name>
    (with -2, -3, ... if that exists), or parent/name for a trial of a sweep. Absolute."""
    if parent is not None:
        run_dir = Path(parent) / (name or kind)
    else:
        stem = Path(config.storage.output_dir) / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{config.name}"
        run_dir, n = stem, 1
        while run_dir.exists():
            n += 1
            run_dir = stem.with_name(f"{stem.name}-{n}")
    run_dir = run_dir.resolve()
    recipes.save(config, run_dir)
    return run_dir


def resume_config(run_dir: Path, overrides: list[str], command: str = "distill",
                  recipe: str | None = None) -> RunConfig:
    """The config of an earlier run directory of `dpdmd <command>`, to continue it exactly as it was started
    (recipe: a --recipe given beside --resume, refused)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError("--resume", f"{run_dir} is not a run directory (no config.yaml); give the directory "
                                      f"`dpdmd {command}` printed, e.g. outputs/runs/<time>-{command}-<name>")
    if overrides or recipe:
        given = " ".join([*([f"--recipe {recipe}"] if recipe else []), *overrides])
        raise ConfigError("--resume", f"a resumed run keeps the settings it started with (its config.yaml); drop "
                                      f"{given}, or start a new run with them")
    kind = run_kind(run_dir)
    if kind != command and (command == "sweep" or kind is not None):
        again = {"sweep": f"`dpdmd sweep --resume {run_dir}`", "distill": f"`dpdmd distill --resume {run_dir}`",
                 "fidelity": f"the `dpdmd fidelity` command that made it, with --out {run_dir}",
                 "demo": "`dpdmd demo` (a new run: the demo does not continue)"}
        raise ConfigError("--resume", f"{run_dir} is a {kind} directory; continue it with {again[kind]}" if kind else
                          f"{run_dir} holds no Tune state (tune/): a sweep stopped before its trials started has "
                          f"nothing to continue; start it again (its config.yaml holds the settings)")
    return recipes.resolve(run_dir / "config.yaml")


def run_kind(run_dir: Path) -> str | None:
    """Which command's directory run_dir is, from what it holds: a sweep's Tune state (tune/), a fidelity table's
    trials (trials/ or sweep/; the demo's, by its name), a run's checkpoints; None when it holds none of them yet."""
    run_dir = Path(run_dir)
    if (run_dir / "tune").is_dir():
        return "sweep"
    if (run_dir / "trials").is_dir() or (run_dir / "sweep").is_dir():
        return "demo" if "-demo-" in run_dir.name else "fidelity"
    if (run_dir / CHECKPOINTS).is_dir():
        return "distill"
    return None


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (one with its progress.json), or None."""
    found = [p.parent for p in (Path(run_dir) / CHECKPOINTS).glob("step-*/progress.json")]
    return max(found, default=None)


def finished(run_dir: Path, config: RunConfig) -> bool:
    return (Path(run_dir) / GENERATOR_DIR).is_dir() and (
        Path(run_dir) / CHECKPOINTS / checkpoint_name(config.schedule.num_generator_updates)).is_dir()


@contextmanager
def stop_cleanly(run_dir: Path, resume_command: str):
    """Ctrl-C (or SIGTERM, which Ray's driver turns into an exit) ends the command with one line: where the last
    checkpoint is and how to continue. A trajectory store found damaged mid-run (its error names the shard and
    the repair command) says the same."""
    from workers.store import StoreError

    def where() -> str:
        last = last_checkpoint(run_dir)
        if last:
            return f"the last checkpoint is {last}"
        # a sweep's: its trials' own (each continues from its last one)
        trials = {p.parents[2].name for p in Path(run_dir).glob(f"*/{CHECKPOINTS}/step-*/progress.json")}
        if trials:
            return f"the checkpoints of {len(trials)} of its trials are kept ({run_dir}/<trial>/{CHECKPOINTS})"
        return "no checkpoint was written yet"

    try:
        yield
    except KeyboardInterrupt:
        print(f"\ndpdmd: stopped; {where()}. Continue with: {resume_command}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except SystemExit as stop:
        if stop.code != signal.SIGTERM:
            raise
        # Ray's driver turns SIGTERM (`ray job stop`, a scheduler's preemption) into sys.exit(15); its native
        # handler (abseil's failure handler) has also armed a 3-second SIGALRM that aborts the process, which a
        # slower teardown (Ray's own shutdown on a busy machine, MLflow's last writes) outlives. No Ray setting
        # turns it off, so the alarm is cancelled here, where the exit is known to be an orderly one.
        if hasattr(signal, "alarm"):
            signal.alarm(0)
        print(f"\ndpdmd: terminated; {where()}. Continue with: {resume_command}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM) from None
    except StoreError as err:
        raise StoreError(f"{err}\nThe run stopped; {where()}. Once the store is repaired, continue with: "
                         f"{resume_command}") from None


# ----------------------------------------------------------------------------------------------------
# Before anything is reserved


CPU_OVERRIDES = "distributed.use_gpu=false trajectories.gpus_per_actor=0"


def require_gpu(key: str, gpus: float, where: str = "this machine") -> None:
    """Refuse a recipe whose key asks for GPUs where there are none (gpus: how many there are), naming the
    overrides that run it on CPUs: a real teacher's store and training take days there."""
    if gpus <= 0:
        raise ConfigError(key, f"the recipe asks for a GPU and {where} has none; to run on CPUs anyway (a real "
                               f"teacher takes days there, the embedded ones minutes), add {CPU_OVERRIDES}")


def preflight(config: RunConfig) -> None:
    """Every check that needs no cluster, before a run directory, an MLflow run or a worker exists: the
    teacher is where the config says, and the regression baseline on a latent family finds LPIPS's weights."""
    from workers.teacher import require_teacher

    require_lpips(config)
    require_teacher(config)


def require_lpips(config: RunConfig) -> None:
    """The regression baseline on a latent family measures LPIPS: its weight files must be here (the error names
    them and loss.lpips_weights) before a store's teacher samples are computed."""
    from models.families import get_family
    from models.perceptual import lpips_files

    if config.loss.method == "dmd-regression" and get_family(config.teacher.family).trainer is None:
        lpips_files(config.loss.perceptual)


# ----------------------------------------------------------------------------------------------------
# MLflow


def run_title(run_dir: Path) -> str:
    """A run's MLflow name: <command>-<recipe>-<time> from its directory's <time>-<command>-<recipe>, so that
    runs sort and read by what they are in MLflow's list (a sweep's trial directory is named by its settings)."""
    name = Path(run_dir).name
    found = re.fullmatch(r"(\d{8}-\d{6})-(.+)", name)
    return f"{found[2]}-{found[1]}" if found else name


def tracked_run(config: RunConfig, run_dir: Path, kind: str, parent_run_id: str | None = None):
    """The run directory's MLflow run: a new one, or, when the directory already has one (a resumed run),
    that one again."""
    from workers.tracking import mlflow_run

    record = Path(run_dir) / MLFLOW_FILE
    existing = json.loads(record.read_text())["run_id"] if record.is_file() else None
    return mlflow_run(config, config.tracking.run_name or run_title(run_dir), kind, parent_run_id, existing,
                      on_open=lambda tracked: record.write_text(json.dumps({"uri": tracked.uri,
                                                                            "run_id": tracked.run_id})))


# ----------------------------------------------------------------------------------------------------
# Distil, export, evaluate


@dataclass
class Distilled:
    run_dir: Path
    generator_dir: Path
    metrics: dict = field(default_factory=dict)  # the last training report
    run_id: str = ""  # the MLflow run, if any
    evaluation: object = None  # workers.evaluate.Evaluation, when the run was evaluated


def distill_with_ray(config: RunConfig, run_dir: Path, store, tracked=None, callbacks: list | None = None) -> Distilled:
    """Ray Train workers run workers.train.train over the store; checkpoints land in run_dir/checkpoints
    (so that the same run directory resumes, and no other run's checkpoints are ever picked up)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig, TrainingFailedError
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.cluster import VERBOSE
    from workers.ray_worker import train_fn_per_worker
    from workers.store import StoreError

    dist = config.distributed
    record_data(run_dir, store, config, dist.num_workers)
    mlflow = (tracked.uri, tracked.run_id) if tracked else None
    # Each rank streams its own shards straight from Parquet (store.batches). A Ray Dataset with
    # streaming_split made the small-model loop many times slower here (a coordinator round trip per
    # batch) and its read tasks can starve when training holds the CPUs.
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": asdict(config), "store": store, "quiet": not VERBOSE, "mlflow_run": mlflow,
                           "live": live_evaluator(config, run_dir, mlflow)},
        scaling_config=ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                                     resources_per_worker={"CPU": dist.cpus_per_worker}),
        run_config=RayRunConfig(name=CHECKPOINTS, storage_path=str(run_dir), callbacks=callbacks or [],
                                checkpoint_config=CheckpointConfig(num_to_keep=2),
                                failure_config=FailureConfig(max_failures=dist.max_failures),
                                logging_config=LoggingConfig(log_level="INFO" if VERBOSE else "WARNING"),
                                # CPU workers: DeepSpeed's CPU accelerator without its "no GPU found" note
                                worker_runtime_env=None if dist.use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}}),
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
    )
    try:
        result = trainer.fit()
    except SystemExit:  # Ray Train's own Ctrl-C handler aborts the run and then exits: a stop all the same
        raise KeyboardInterrupt from None
    except TrainingFailedError as err:
        # A damaged trajectory store is the user's to repair: its error (file, store, command) goes to the
        # caller as it is, not inside the workers' tracebacks (Ray Train keeps each rank's exception).
        # So is a bad setting that only a worker could find (ConfigError: the exit code 2 and its one line).
        theirs = [e for e in getattr(err, "worker_failures", {}).values() if isinstance(e, (StoreError, ConfigError))]
        if theirs:
            raise theirs[0] from None
        raise
    if result.error:
        raise result.error
    last = result.checkpoint and Path(result.checkpoint.path).name
    if last != checkpoint_name(config.schedule.num_generator_updates):
        raise KeyboardInterrupt  # Ray Train aborted the run on Ctrl-C before its last update
    generator_dir = run_dir / GENERATOR_DIR
    with result.checkpoint.as_directory() as checkpoint:
        shutil.copytree(Path(checkpoint) / GENERATOR_DIR, generator_dir, dirs_exist_ok=True)
    return Distilled(run_dir, generator_dir, dict(result.metrics or {}), tracked.run_id if tracked else "")


def live_evaluator(config: RunConfig, run_dir: Path, mlflow_run: tuple[str, str] | None):
    """The Ray actor that scores generator snapshots beside training (evaluation.every > 0), or None."""
    if not config.evaluation.every:
        return None
    import ray

    from workers.live_eval import Evaluator

    ev = config.evaluation
    device = "cuda" if ev.gpus else "cpu"
    return ray.remote(num_cpus=ev.cpus, num_gpus=ev.gpus or None)(Evaluator).remote(
        asdict(config), str(run_dir), mlflow_run, device)


DATA_RECORD = "data.json"


def record_data(run_dir: Path, store, config: RunConfig, world_size: int) -> None:
    """Which rows the run reads: the store, its key, how many of its shards (Store.for_run) and on how many ranks,
    into run_dir/DATA_RECORD. With the config and its seed, that is all a rerun needs to read the same rows."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / DATA_RECORD).write_text(json.dumps(store.identity(config, world_size), indent=1) + "\n")


def distill_here(config: RunConfig, run_dir: Path, store, resume: bool = True) -> Distilled:
    """The same train function in this process (or as one rank under torchrun); metrics go to
    run_dir/metrics.jsonl, and with evaluation.every > 0 live evaluations to run_dir/live_eval.jsonl (from
    a background process). resume: continue from run_dir's last checkpoint if it has one."""
    from workers.context import LocalContext
    from workers.live_eval import LiveEvaluation
    from workers.train import store_source, train

    ctx = LocalContext(run_dir, resume=resume)
    if ctx.rank == 0:
        record_data(run_dir, store, config, ctx.world_size)
    live = LiveEvaluation.in_process(config, run_dir) if config.evaluation.every and ctx.rank == 0 else None
    progress = train(config, ctx, store_source(store), store.negative(), live=live)
    generator_dir = run_dir / GENERATOR_DIR
    if ctx.rank == 0:
        final = run_dir / CHECKPOINTS / checkpoint_name(progress.generator_updates) / GENERATOR_DIR
        shutil.copytree(final, generator_dir, dirs_exist_ok=True)
    return Distilled(run_dir, generator_dir, {"generator_update": progress.generator_updates,
                                              "resumes": progress.resumes})


def evaluate_generator(config: RunConfig, generator_dir: Path, run_dir: Path, label: str, tracked=None):
    """The generator on the held-out prompts and seeds: samples.npz and samples.png into run_dir, the
    metrics (and the picture) into the MLflow run when there is one. Returns the Evaluation."""
    from models.families import get_family
    from workers.evaluate import evaluate, load_generator, save_samples

    device = device_for(config.distributed.use_gpu)
    adapter, net, sampler = load_generator(generator_dir, device)
    evaluation = evaluate(config, adapter, net, sampler, device=device)
    save_samples(evaluation, run_dir / "samples.npz")
    picture = get_family(config.teacher.family).render({label: evaluation.samples}, evaluation.prompts,
                                                          run_dir / "samples.png")
    if tracked is not None:
        tracked.log_metrics(evaluation.metrics, prefix="eval_")
        tracked.log_artifact(picture)
    return evaluation


def summary(title: str, lines: dict[str, str | Path]) -> str:
    """The closing lines of a command: what it made and where."""
    width = max(map(len, lines)) + 1
    return "\n".join([title, *(f"  {k + ':':<{width}} {v}" for k, v in lines.items())])
