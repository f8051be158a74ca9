"""`dpdmd distill`: the driver. Checks the recipe against the cluster, makes sure the trajectory store is
complete, then fits a Ray TorchTrainer whose workers run workers.train.train with DeepSpeed engines.

    dpdmd distill --recipe toy2d distributed.num_workers=2 distributed.zero_stage=3
    ray job submit --address http://HEAD:8265 --working-dir . -- dpdmd distill --recipe toy2d
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator import recipe as recipes
from orchestrator.cluster import ensure_ray
from orchestrator.precompute import precompute
from workers.config import ConfigError, RunConfig
from workers.store import StoreError
from workers.tracking import mlflow_run
from workers.train import GENERATOR_DIR


@dataclass
class DistillResult:
    run_dir: Path
    generator_dir: Path
    metrics: dict
    run_id: str = ""  # the MLflow run


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
    if dist.precision == "bf16" and not dist.use_gpu and dist.zero_stage == 0:
        raise ConfigError("distributed.precision", "bf16 without ZeRO (stage 0) is not supported by DeepSpeed on "
                                                   "CPU; use distributed.zero_stage=1..3 or precision=fp32")


def run_distill(config: RunConfig, run_dir: Path | None = None, parent_run_id: str | None = None,
                callbacks: list | None = None) -> DistillResult:
    """Precompute (or reuse) the store, fit the trainer, export the generator; all recorded in MLflow."""
    run_dir = run_dir or Path(config.storage.output_dir) / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-distill-{config.name}"
    recipes.save(config, run_dir)
    with mlflow_run(config, config.tracking.run_name or run_dir.name, "distill", parent_run_id) as tracked:
        result = _fit(config, run_dir, tracked, callbacks or [])
        tracked.log_artifact(run_dir / "config.yaml")
        tracked.log_artifact(result.generator_dir, "generator")
        result.run_id = tracked.run_id
    return result


def _fit(config: RunConfig, run_dir: Path, tracked, callbacks: list) -> DistillResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.ray_worker import train_fn_per_worker

    ensure_ray()
    check_cluster(config, ray.cluster_resources())
    store, summary = precompute(config)
    print(summary)

    dist = config.distributed
    storage = (Path(config.storage.output_dir) / "ray_results").resolve()
    print(f"[distill] {dist.num_workers} workers, ZeRO-{dist.zero_stage}, {dist.precision}; "
          f"checkpoints under {storage / run_dir.name}; metrics in MLflow run {tracked.run_id} at {tracked.uri}")
    # Each rank streams its own shards straight from Parquet (store.batches). A Ray Dataset with
    # streaming_split made the small-model loop many times slower here (a coordinator round trip per
    # batch) and its read tasks can starve when training holds the CPUs.
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": asdict(config), "store": store, "mlflow_run": (tracked.uri, tracked.run_id)},
        scaling_config=ScalingConfig(num_workers=dist.num_workers, use_gpu=dist.use_gpu,
                                     resources_per_worker={"CPU": dist.cpus_per_worker}),
        run_config=RayRunConfig(name=run_dir.name, storage_path=str(storage), callbacks=callbacks,
                                checkpoint_config=CheckpointConfig(num_to_keep=2),
                                failure_config=FailureConfig(max_failures=dist.max_failures)),
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        # A damaged trajectory store is the user's to repair: its error (file, store, command) goes to the
        # caller as it is, not inside the workers' tracebacks. Ray Train v2 keeps each rank's exception in
        # worker_failures; older versions (pyproject allows ray >= 2.40) do not have it.
        damage = [e for e in getattr(err, "worker_failures", {}).values() if isinstance(e, StoreError)]
        if damage:
            raise damage[0] from None
        raise
    generator_dir = run_dir / GENERATOR_DIR
    with result.checkpoint.as_directory() as checkpoint:
        shutil.copytree(Path(checkpoint) / GENERATOR_DIR, generator_dir, dirs_exist_ok=True)
    print(f"[distill] generator exported to {generator_dir}")
    return DistillResult(run_dir, generator_dir, dict(result.metrics or {}))


def run_local(config: RunConfig) -> Path:
    """The same train function without Ray: one process, or one rank of `torchrun --nproc_per_node N -m
    orchestrator distill --no-ray ...`. Rank 0 fills the store; every rank then streams its own shards.
    Metrics go to <run dir>/metrics.jsonl (no MLflow); returns the run directory."""
    import torch.distributed as torch_dist

    from workers.context import LocalContext
    from workers.engines import init_distributed
    from workers.train import store_source, train

    init_distributed(config.distributed.use_gpu)
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    shared = [None]
    if rank == 0:
        store, summary = precompute(config, use_ray=False, world_size=world)
        print(summary)
        run_dir = Path(config.storage.output_dir) / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-distill-{config.name}"
        recipes.save(config, run_dir)
        shared = [str(run_dir)]
    torch_dist.broadcast_object_list(shared, src=0)  # also waits for the store
    run_dir = Path(shared[0])
    if rank != 0:
        store, _ = precompute(config, use_ray=False, progress=False, world_size=world)
    progress = train(config, LocalContext(run_dir, resume=False), store_source(store), store.negative())
    if rank == 0:
        final = run_dir / "checkpoints" / f"step-{progress.generator_updates:07d}" / GENERATOR_DIR
        shutil.copytree(final, run_dir / GENERATOR_DIR, dirs_exist_ok=True)
        print(f"[distill] generator exported to {run_dir / GENERATOR_DIR}")
    return run_dir
