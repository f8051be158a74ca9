"""The precompute actor: loads the teacher (and its text encoders) once, then computes and writes whole
shards of anchors. Ray Data runs a pool of these; without Ray, one runs in the calling process."""

from __future__ import annotations

import time

import numpy as np
import torch

from workers.anchors import compute_anchors
from workers.config import RunConfig
from workers.configure import build
from workers.batches import AnchorBatch
from workers.schema import batch_to_table
from workers.store import ShardInfo, StoreSpec, filesystem, write_negative, write_shard
from workers.teacher import load_teacher


class AnchorWriter:
    """Callable on a batch of shard indices ({"shard": array}); returns one ShardInfo row per shard."""

    def __init__(self, config: RunConfig | dict, spec: StoreSpec, url: str):
        self.config = config if isinstance(config, RunConfig) else build(RunConfig, config)
        self.spec = spec
        self.fs, self.root = filesystem(self.config, url)
        use_gpu = torch.cuda.is_available() and self.config.trajectories.gpus_per_actor > 0
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.dtype = torch.bfloat16 if self.config.teacher.dtype == "bf16" else torch.float32
        self.adapter, self.teacher = load_teacher(self.config, self.device, self.dtype)
        write_negative(self.fs, self.root, self.adapter.negative_conditioning(1))

    def write(self, index: int) -> ShardInfo:
        prompt_ids, seeds = self.spec.shard_rows(index)
        size = self.config.trajectories.batch_size
        parts = []
        for start in range(0, len(seeds), size):
            ids = prompt_ids[start:start + size]
            parts.append(compute_anchors(self.config, self.adapter, self.teacher,
                                         [self.spec.prompts[i] for i in ids], ids, seeds[start:start + size],
                                         self.device))
        batch = AnchorBatch.cat(parts)
        table, _ = batch_to_table(batch, [self.spec.prompts[i] for i in prompt_ids])
        return write_shard(self.fs, self.root, index, table)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows: dict[str, list] = {k: [] for k in ("index", "name", "rows", "sha256", "bytes", "seconds")}
        for index in batch["shard"]:
            start = time.perf_counter()
            info = self.write(int(index))
            for k, v in info.to_json().items():
                rows[k].append(v)
            rows["seconds"].append(time.perf_counter() - start)
        return rows
