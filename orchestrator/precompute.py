"""`dpdmd precompute`: teacher anchors and prompt embeddings for every (prompt, seed) into a Parquet store,
computed by a pool of Ray actors (Ray Data map_batches with AnchorWriter), each loading the teacher once.

    dpdmd precompute --recipe toy2d trajectories.num_actors=2
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from workers.config import RunConfig
from workers.evaluate import training_prompts
from workers.precompute import AnchorWriter
from workers.store import Store, filesystem, finished_shards, open_store, store_spec, store_url, write_manifest
from workers.teacher import teacher_dir


@dataclass
class PrecomputeSummary:
    url: str
    reused: bool
    rows: int
    shards_written: int
    bytes_written: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        if self.reused:
            return f"trajectory store {self.url}: already complete ({self.rows} rows), nothing to do"
        return (f"trajectory store {self.url}: {self.rows} rows in {self.shards_written} new shards, "
                f"{self.bytes_written / 2**20:.1f} MiB written in {self.seconds:.1f} s "
                f"({self.rows_per_s:.0f} rows/s)")


def precompute(config: RunConfig, use_ray: bool = True, progress: bool = True,
               world_size: int | None = None) -> tuple[Store, PrecomputeSummary]:
    """Fill the store for config (or find it big enough) and return it opened and verified.

    The store holds every anchor row a run of world_size ranks (default distributed.num_workers) consumes,
    so that no generator update sees a row twice; an existing store of the same settings that is too small
    is extended, its shards kept."""
    start = time.time()
    spec = store_spec(config, training_prompts(config), teacher_dir(config), world_size)
    url = store_url(config, spec)
    fs, root = filesystem(config, url)
    if fs.exists(f"{root}/manifest.json"):
        store = open_store(fs, root)
        if len(store.shards) >= spec.num_shards:
            return store, PrecomputeSummary(url, True, store.num_rows, 0, 0, time.time() - start)
        print(f"trajectory store {url}: {store.num_rows} rows, the run needs {spec.num_rows}; extending it")

    done = finished_shards(fs, root)
    todo = [i for i in range(spec.num_shards) if i not in done]
    bar = tqdm(total=spec.num_rows, initial=sum(s.rows for i, s in done.items() if i < spec.num_shards), unit="row",
               desc="precompute anchors", disable=not progress)
    written = 0
    for info in _run_writers(config, spec, url, todo, use_ray):
        done[info["index"]] = _shard_info(info)
        written += info["bytes"]
        bar.update(info["rows"])
    bar.close()
    write_manifest(fs, root, spec, done)
    store = open_store(fs, root)
    return store, PrecomputeSummary(url, False, store.num_rows, len(todo), written, time.time() - start)


def _shard_info(row: dict):
    from workers.store import ShardInfo

    return ShardInfo(**{k: row[k] for k in ("index", "name", "rows", "sha256", "bytes")})


def _run_writers(config: RunConfig, spec, url: str, todo: list[int], use_ray: bool):
    if not todo:
        return
    if not use_ray:
        writer = AnchorWriter(config, spec, url)
        for index in todo:
            yield writer.write(index).to_json()
        return
    import ray

    from orchestrator.cluster import ensure_ray

    ensure_ray()
    traj = config.trajectories
    ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
    # Ray Data restarts a killed actor and retries its task by default (max_restarts = -1)
    ds = ds.map_batches(AnchorWriter, fn_constructor_args=(asdict(config), spec, url), batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=min(traj.num_actors, len(todo))),
                        num_cpus=traj.cpus_per_actor, num_gpus=traj.gpus_per_actor or None)
    yield from ds.iter_rows()
