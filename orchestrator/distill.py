"""`dpdmd distill`: the driver. Checks the recipe against the teacher and the cluster, makes sure the
trajectory store holds every row the run needs, then fits a Ray TorchTrainer whose workers run
workers.train.train with DeepSpeed engines; or, with --no-ray, runs that function in this process.

    dpdmd distill --recipe toy2d distributed.num_workers=2 distributed.zero_stage=3
    dpdmd distill --resume outputs/runs/<time>-distill-toy2d          # continue a stopped run
    ray job submit --address http://HEAD:8265 --working-dir . -- dpdmd distill --recipe toy2d
"""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.runs import (Distilled, distill_here, distill_with_ray, evaluate_generator, finished, make_run_dir,
                               preflight, require_gpu, stop_cleanly, summary, tracked_run)
from workers.config import ConfigError, RunConfig
from workers.context import CHECKPOINTS, clock
from workers.tracking import tracking_uri


def check_cluster(config: RunConfig, resources: dict) -> None:
    """Refuse, before anything is reserved, a recipe the cluster cannot run."""
    dist = config.distributed
    cpus = dist.num_workers * dist.cpus_per_worker
    if cpus > resources.get("CPU", 0):
        raise ConfigError("distributed.cpus_per_worker",
                          f"{dist.num_workers} workers x {dist.cpus_per_worker} CPUs = {cpus:g} CPUs, but the "
                          f"cluster has {resources.get('CPU', 0):g}; lower distributed.num_workers or "
                          "distributed.cpus_per_worker (fractions such as 0.5 are allowed)")
    if dist.use_gpu and dist.num_workers > resources.get("GPU", 0):
        raise ConfigError("distributed.num_workers",
                          f"{dist.num_workers} GPU workers, but the cluster has {resources.get('GPU', 0):g} GPUs; "
                          "lower distributed.num_workers or set distributed.use_gpu=false")


def run_distill(config: RunConfig, run_dir: Path | None = None, parent_run_id: str | None = None,
                callbacks: list | None = None, quiet: bool = False, evaluate: bool = False) -> Distilled:
    """Check, precompute (or reuse) the store, fit the trainer, export the generator, and with evaluate=True
    evaluate it (samples and pictures into the run directory); all recorded in MLflow. run_dir: a new run
    directory by default; an existing one is continued from its last checkpoint."""
    import ray

    from orchestrator.cluster import as_a_job, ensure_ray
    from orchestrator.precompute import precompute

    start = time.time()
    preflight(config)
    ensure_ray()
    check_cluster(config, ray.cluster_resources())
    store, store_summary = precompute(config)
    if not quiet:
        print(store_summary)
    resuming = run_dir is not None and (Path(run_dir) / "config.yaml").is_file()
    run_dir = Path(run_dir).resolve() if resuming else make_run_dir(config, "distill", *_trial(run_dir))
    with tracked_run(config, run_dir, "distill", parent_run_id) as tracked:
        dist = config.distributed
        if not quiet:
            print(f"[distill] {'resuming ' if resuming else ''}{run_dir.name}: {dist.num_workers} workers, "
                  f"ZeRO-{dist.zero_stage}, {dist.precision}, {config.schedule.num_generator_updates} generator "
                  "updates")
        with stop_cleanly(run_dir, as_a_job(f"dpdmd distill --resume {run_dir}")):
            result = distill_with_ray(config, run_dir, store, tracked, callbacks)
        tracked.log_artifact(run_dir / "config.yaml")
        tracked.log_artifact(result.generator_dir, "generator")
        if evaluate:
            result.evaluation = evaluate_generator(config, result.generator_dir, run_dir, run_dir.name, tracked)
    if not quiet:
        print(summary(f"[distill] done in {clock(time.time() - start)}", {
            "run directory": run_dir, "generator": result.generator_dir, "checkpoints": run_dir / CHECKPOINTS,
            "MLflow run": f"{result.run_id} (mlflow ui --backend-store-uri {tracking_uri(config)})"}))
    return result


def _trial(run_dir: Path | None) -> tuple:
    """A run directory asked for but not there yet (a sweep trial's): make it there."""
    return () if run_dir is None else (Path(run_dir).parent, Path(run_dir).name)


def run_local(config: RunConfig, run_dir: Path | None = None) -> Path:
    """The same train function without Ray: one process, or one rank of `torchrun --nproc_per_node N -m
    orchestrator distill --no-ray ...`. Rank 0 fills the store; every rank then streams its own shards.
    Metrics go to <run dir>/metrics.jsonl (no MLflow); returns the run directory. run_dir: an earlier run
    to continue from its last checkpoint."""
    import torch
    import torch.distributed as torch_dist

    from orchestrator.precompute import precompute
    from workers.engines import init_distributed

    start = time.time()
    preflight(config)
    if config.distributed.use_gpu:
        require_gpu("distributed.use_gpu", torch.cuda.device_count())
    init_distributed(config.distributed.use_gpu)
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    shared = [None]
    if rank == 0:
        store, store_summary = precompute(config, use_ray=False, world_size=world)
        print(store_summary)
        shared = [str(Path(run_dir).resolve() if run_dir else make_run_dir(config, "distill"))]
    torch_dist.broadcast_object_list(shared, src=0)  # also waits for the store
    run_dir = Path(shared[0])
    if rank != 0:
        store, _ = precompute(config, use_ray=False, progress=False, world_size=world)
    if finished(run_dir, config):
        print(f"[distill] {run_dir} has finished already; its generator is {run_dir / 'generator'}")
        return run_dir
    with stop_cleanly(run_dir, f"dpdmd distill --no-ray --resume {run_dir}"):
        result = distill_here(config, run_dir, store)
    if rank == 0:
        print(summary(f"[distill] done in {clock(time.time() - start)}", {
            "run directory": run_dir, "generator": result.generator_dir, "checkpoints": run_dir / CHECKPOINTS,
            "metrics": run_dir / "metrics.jsonl"}))
    return run_dir
