"""The Ray Train side of the train function: a WorkerContext over ray.train, and train_fn_per_worker."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import ray.train

from workers.config import RunConfig, build
from workers.context import WorkerContext
from workers.distill import AnchorBatch
from workers.schema import TensorSpec, table_to_batch
from workers.train import train

DATASET = "anchors"


class RayTrainContext(WorkerContext):
    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_dir.name if checkpoint_dir else None)

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint else None

    def checkpoint_staging_dir(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"dpdmd-rank{self.rank}-")) / name
        path.mkdir()
        return path


def dataset_source(columns: dict[str, dict]):
    """This worker's shard of the Ray Dataset of anchors, epoch after epoch, decoded to tensors."""
    specs = {name: TensorSpec.from_json(s) for name, s in columns.items()}

    def source(config: RunConfig, ctx: WorkerContext, start_row: int) -> Iterator[AnchorBatch]:
        shard = ray.train.get_dataset_shard(DATASET)
        batch_size, skipped = config.distributed.batch_size_per_worker, 0
        while True:
            for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True,
                                            local_shuffle_buffer_size=4 * batch_size,
                                            local_shuffle_seed=config.seed + ctx.rank):
                if skipped < start_row:  # the data position of a resumed run
                    skipped += batch_size
                    continue
                yield table_to_batch(table, specs)
    return source


def train_fn_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the same train() as a single process, fed by the Ray Dataset."""
    config = build(RunConfig, loop_config["config"])
    train(config, RayTrainContext(), dataset_source(loop_config["columns"]), loop_config["negative"],
          loop_config.get("mlflow_run"))
