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

import time
from collections.abc import Callable
from pathlib import Path

from models.families import get_family
from orchestrator import recipe as recipes
from orchestrator.reports import plot_fidelity_curves, write_fidelity
from orchestrator.results import SEED_KEY, setting_method
from orchestrator.spaces import grid_points, load_space, trial_config
from orchestrator.trial_runs import evaluate_teacher, run_local_trials
from workers.config import ConfigError, RunConfig


def check_space(space: dict[str, dict], default_weight: float = 0.05, default_method: str = "dp-dmd") -> None:
    if SEED_KEY not in space or next(iter(space[SEED_KEY])) != "grid" or len(next(iter(space[SEED_KEY].values()))) < 2:
        raise ConfigError("sweep.space", "a fidelity space needs `seed: {grid: [0, 1, 2]}` (training seeds, at "
                                         "least 2) so that each setting is reported with its spread; the built-in "
                                         "ones have it: add sweep.space=fidelity (DMD and DP-DMD) or "
                                         "sweep.space=methods (with the two baselines)")
    if any(next(iter(spec)) not in ("grid", "choice") for spec in space.values()):
        raise ConfigError("sweep.space", "a fidelity space takes grid values only (each setting runs once per seed)")
    if not any(setting_method(p, default_weight, default_method) == "dmd" for p in grid_points(space)):
        raise ConfigError("sweep.space", "a fidelity space needs DMD (dp-dmd at lambda = 0 in its "
                                         "loss.diversity_weight grid, or dmd in its loss.method grid): the gap "
                                         "recovered is measured from DMD")


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
    from orchestrator.runs import make_run_dir, require_lpips
    from workers.context import clock

    start, tag = time.time(), f"[{kind}]"
    space = space or load_space(config.sweep.space)
    check_space(space, config.loss.diversity_weight, config.loss.method)
    for point in grid_points(space):  # before a run directory exists
        require_lpips(trial_config(base, point))
    _require_gpus(config, use_ray)
    _ensure_teacher(config, tag)
    out_dir = Path(out_dir).resolve() if out_dir else make_run_dir(config, kind)
    recipes.save(config, out_dir)
    teacher, cut = evaluate_teacher(config, out_dir, tag)
    written: dict = {}

    def write(rows: list[dict], parent=None) -> None:
        written["table"], written["report"] = write_fidelity(rows, teacher, config, out_dir, time.time() - start, cut)
        if parent is not None:
            _log_to_parent(parent, teacher, out_dir)

    if use_ray:
        tracking = _run_on_ray(config, base, space, teacher, out_dir, write, kind)
    else:
        _precompute_stores(base, space)
        deadline = start + time_limit_s if time_limit_s else None
        rows = run_local_trials(base, space, out_dir / "trials", jobs, together=together, deadline=deadline)
        if rows is None:
            print(f"{tag} stopped at the time limit after {clock(time.time() - start)}: continue with the same "
                  f"command and --out {out_dir}")
            return out_dir
        write(rows)
        tracking = _training_curves(rows, config, out_dir)
    _print_done(tag, start, out_dir, written, tracking)
    return out_dir


def _require_gpus(config: RunConfig, use_ray: bool) -> None:
    """A recipe that asks for GPUs is refused where there are none, before the teacher is evaluated or a run
    directory exists (the trials' own check came after both, and on a CPU the teacher's evaluation ran first)."""
    from orchestrator.precompute import available_gpus
    from orchestrator.runs import require_gpu

    for key, wants in (("distributed.use_gpu", config.distributed.use_gpu),
                       ("trajectories.gpus_per_actor", config.trajectories.gpus_per_actor > 0)):
        if wants:
            require_gpu(key, available_gpus(use_ray), "the Ray cluster" if use_ray else "this machine")
            return


def _ensure_teacher(config: RunConfig, tag: str) -> None:
    """Train the embedded family's teacher when the recipe names no teacher and none has been trained yet."""
    from workers.context import device_for
    from workers.teacher import teacher_dir, train_teacher

    if not config.teacher.path and not teacher_dir(config).is_dir():
        print(f"{tag} training the embedded {config.teacher.family} teacher")
        train_teacher(config, device=device_for(config.distributed.use_gpu))


def _log_to_parent(parent, teacher: dict[str, float], out_dir: Path) -> None:
    """The teacher's metrics and the table's files, those that were written, into the sweep's MLflow parent run."""
    parent.log_metrics(teacher, prefix="teacher_")
    for name in ("fidelity.md", "fidelity.png", "fidelity_samples.png", "fidelity_per_seed.csv"):
        if (out_dir / name).is_file():
            parent.log_artifact(out_dir / name)


def _run_on_ray(config: RunConfig, base: dict, space: dict[str, dict], teacher: dict[str, float], out_dir: Path,
                write: Callable, kind: str) -> dict:
    """The trials as a Ray Tune sweep in out_dir/sweep (continued when its Tune state is there), the table written
    when it is done; returns where its tracking is, for the summary."""
    from orchestrator.sweep import run_sweep
    from workers.tracking import tracking_uri

    sweep_dir = out_dir / "sweep"
    again = "dpdmd demo (a new run)" if kind == "demo" else f"the same command with --out {out_dir}"
    result = run_sweep(config, base, space, teacher, sweep_dir, resume=(sweep_dir / "tune").is_dir(),
                       on_done=lambda parent, result: write(result.rows, parent), quiet=True, continue_with=again)
    return {"MLflow": f"parent run {result.parent_run_id} (mlflow ui --backend-store-uri {tracking_uri(config)})"}


def _precompute_stores(base: dict, space: dict[str, dict]) -> None:
    """Every store the space's trials read, written before any trial starts; each store's summary printed once."""
    from orchestrator.precompute import precompute

    stores = set()
    for point in grid_points(space):
        store, store_summary = precompute(trial_config(base, point), use_ray=False, progress=False)
        if store.root not in stores:
            print(store_summary)
        stores.add(store.root)


def _training_curves(rows: list[dict], config: RunConfig, out_dir: Path) -> dict:
    """fidelity_curve.png from the trials' evaluations during training, linked from fidelity.md; returns where it
    is for the summary (empty without such evaluations)."""
    curve = plot_fidelity_curves(rows, get_family(config.teacher.family), config, out_dir / "fidelity_curve.png")
    if curve:
        with (out_dir / "fidelity.md").open("a") as f:
            f.write(f"\nDuring training (every {config.evaluation.every} generator updates, the same held-out "
                    f"prompts and seeds, mean over training seeds):\n\n![curves]({curve.name})\n")
    return {"training curves": curve} if curve else {}


def _print_done(tag: str, start: float, out_dir: Path, written: dict, tracking: dict) -> None:
    """The table, then where the run's report, pictures, per-seed values and tracking are."""
    from orchestrator.runs import summary
    from workers.context import clock

    print(f"\n{written['table']}\n")
    print(summary(f"{tag} done in {clock(time.time() - start)}", {
        "run directory": out_dir, "report": written["report"], "pictures": out_dir / "fidelity_samples.png",
        "per-seed values": out_dir / "fidelity_per_seed.csv", **tracking}))
