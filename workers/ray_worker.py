"""The Ray Train side of the train function: a WorkerContext over ray.train, and train_fn_per_worker."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import ray.train

from workers.context import WorkerContext


class RayTrainContext(WorkerContext):
    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_dir.name if checkpoint_dir else None)
        if checkpoint_dir is not None:  # report copied it into the run's storage: the staging copy can go
            shutil.rmtree(checkpoint_dir.parent, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint else None

    def checkpoint_staging_dir(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"dpdmd-rank{self.rank}-")) / name
        path.mkdir()
        return path


def train_fn_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the same train() as a single process, each rank streaming its own
    shards of the trajectory store (local disk or S3) straight from Parquet. loop_config["quiet"]: this
    worker process's root logger at WARNING, so that Ray Train's per-report INFO lines (logged under the
    file path of its module, outside its own logger) stay in the log files; the loop's progress lines are
    printed, not logged, and still appear."""
    # Imported here, not at the top: Ray Train's controller unpickles this function and needs none of it
    from workers.config import RunConfig
    from workers.configure import build
    from workers.live_eval import LiveEvaluation
    from workers.train import store_source, train

    if loop_config.get("quiet"):
        logging.getLogger().setLevel(logging.WARNING)
    config = build(RunConfig, loop_config["config"])
    store, ctx, actor = loop_config["store"], RayTrainContext(), loop_config.get("live")
    live = LiveEvaluation.ray_actor(actor) if actor is not None and ctx.rank == 0 else None
    train(config, ctx, store_source(store), store.negative(), loop_config.get("mlflow_run"), live=live)
