"""`dpdmd precompute`: teacher anchors and prompt embeddings for every (prompt, seed) into a Parquet store,
computed by a pool of Ray actors (Ray Data map_batches with AnchorWriter), each loading the teacher once.
`dpdmd repair-store`: the same for the shards of an existing store that fail verification.

    dpdmd precompute --recipe toy2d trajectories.num_actors=2
    dpdmd repair-store outputs/trajectories/toy2d-0123456789abcdef     # the command a damaged store names
"""

from __future__ import annotations

import posixpath
import sys
import time
from dataclasses import asdict, dataclass, replace

import pyarrow.parquet as pq
import yaml
from tqdm.auto import tqdm

from orchestrator import recipe as recipes
from orchestrator.runs import require_gpu
from workers.context import clock
from workers.config import ConfigError, RunConfig
from workers.evaluate import training_prompts
from workers.precompute import AnchorWriter
from workers.store import (CONFIG, MANIFEST, NEGATIVE, ShardInfo, Store, StoreError, StoreSpec, filesystem, location,
                           open_store, read_config, read_manifest, shard_name, store_spec, store_url, verified_shards,
                           write_config, write_manifest)
from workers.teacher import require_teacher, teacher_dir


@dataclass
class PrecomputeSummary:
    url: str
    reused: bool
    rows: int
    shards_written: int
    bytes_written: int
    seconds: float
    shards_verified: int = 0  # read whole and checked (a rebuilt manifest, a repair)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        if self.reused:
            return f"trajectory store {self.url}: already complete ({self.rows} rows), nothing to do"
        return (f"trajectory store {self.url}: {self.rows} rows in {self.shards_written} new shards, "
                f"{self.bytes_written / 2**20:.1f} MiB written in {self.seconds:.1f} s ({self.rows_per_s:.0f} rows/s)"
                + (f"; {self.shards_verified} shards read whole and verified" if self.shards_verified else ""))


def precompute(config: RunConfig, use_ray: bool = True, progress: bool = True,
               world_size: int | None = None, plan: bool = True) -> tuple[Store, PrecomputeSummary]:
    """Fill the store for config (or find it big enough) and return it opened.

    The store holds every anchor row a run of world_size ranks (default distributed.num_workers) consumes,
    so that no generator update sees a row twice; an existing store of the same settings that is too small
    is extended, its shards kept. A damaged store (see fill_store) is repaired on the way. A teacher that is
    not where the config says, or not a pipeline of its family, is refused before the store is touched (LPIPS's
    weights are the trainers' to need: a store may be filled on another machine)."""
    require_teacher(config)
    spec = store_spec(config, training_prompts(config), teacher_dir(config), world_size)
    return fill_store(config, spec, use_ray, progress, plan=plan)


def repair_store(url: str, overrides: list[str], use_ray: bool = True,
                 progress: bool = True) -> tuple[Store, PrecomputeSummary]:
    """`dpdmd repair-store URL [key=value ...]`: verify every shard of the store at url in full and recompute
    the ones that fail, with the config the store keeps (config.yaml) plus overrides, where the store is now."""
    fs, root = filesystem(recipes.resolve(None, overrides), url)  # overrides may name an S3 endpoint
    if not fs.exists(root):
        raise StoreError(f"no trajectory store at {url}: give the path or URL a store error names")
    text = read_config(fs, root)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        raise StoreError(f"{location(fs, posixpath.join(root, CONFIG))} is not a config: delete it and run "
                         "`dpdmd precompute` with the recipe and overrides that created the store")
    parent = posixpath.dirname(url.rstrip("/"))
    config = recipes.resolve_mapping(data, [*overrides, f"storage.trajectory_root={parent}"])
    spec = store_spec(config, training_prompts(config), teacher_dir(config))
    if spec.key != posixpath.basename(url.rstrip("/")):
        raise StoreError(f"the config in {location(fs, posixpath.join(root, CONFIG))} now gives the store {spec.key}, "
                         f"not {posixpath.basename(url.rstrip('/'))}: the teacher's weights or the prompts changed "
                         "since the store was written, or an override changes the rows, so they cannot be "
                         "recomputed; run `dpdmd precompute` with the current settings (it writes a new store)")
    return fill_store(config, spec, use_ray, progress, repair=True)


def fill_store(config: RunConfig, spec: StoreSpec, use_ray: bool = True, progress: bool = True,
               repair: bool = False, plan: bool = True) -> tuple[Store, PrecomputeSummary]:
    """Write the shards of spec that the store lacks, then its manifest. progress: a progress bar; plan: before
    any shard is computed, what will be (rows, shards, where), and after the first, its size and time.

    Shards a sound manifest lists are kept as they are (each is checked at its first read). Every other
    shard found is read whole and verified (verified_shards: sha256 against its sidecar, its rows against
    their identity, finite values) and recomputed when it fails: so a rebuilt manifest never accepts a
    changed shard. repair verifies every shard; a store whose manifest is damaged or lists missing or
    truncated shards is repaired the same way, keeping its size."""
    start = time.time()
    url = store_url(config, spec)
    fs, root = filesystem(config, url)
    store, repair = _open_listed(fs, root, url, repair)
    complete = store is not None and len(store.shards) >= spec.num_shards
    if config.trajectories.gpus_per_actor > 0 and not complete:  # before anything is written
        require_gpu("trajectories.gpus_per_actor", available_gpus(use_ray),
                    "the Ray cluster" if use_ray else "this machine")
    if use_ray and not complete:
        check_actor_fits(config)
    write_config(fs, root, recipes.dump(config))
    listed: dict[int, ShardInfo] = {}
    if complete:
        return store, PrecomputeSummary(url, True, store.num_rows, 0, 0, time.time() - start)
    if store is not None:
        print(f"trajectory store {url}: {store.num_rows} rows, the run needs {spec.num_rows}; extending it")
        listed = {s["index"]: ShardInfo(**s) for s in store.shards}
    spec, done, verified = _verify_found(fs, root, spec, listed, progress, repair)
    todo = [i for i in range(spec.num_shards) if i not in done]
    if repair and not todo and not _readable(fs, posixpath.join(root, NEGATIVE)):
        AnchorWriter(config, spec, url)  # it writes the negative conditioning as it starts
    writers = min(config.trajectories.num_actors, len(todo)) if use_ray else 1
    if todo and plan:
        _print_plan(config, spec, url, todo, writers)
    written = _write_shards(config, spec, url, todo, done, use_ray, progress, plan, writers)
    write_manifest(fs, root, spec, done)
    store = open_store(fs, root)
    return store, PrecomputeSummary(url, False, store.num_rows, len(todo), written, time.time() - start, verified)


def _open_listed(fs, root: str, url: str, repair: bool) -> tuple[Store | None, bool]:
    """The store as its manifest lists it, unless repairing or it has none; a manifest that fails its checks
    turns the fill into a repair. Returns the store (or None) and whether to repair."""
    if repair or not fs.exists(posixpath.join(root, MANIFEST)):
        return None, repair
    try:
        return open_store(fs, root), repair
    except StoreError as err:
        print(f"{err}\n[precompute] verifying every shard of {url} and recomputing the ones that fail")
        return None, True


def _verify_found(fs, root: str, spec: StoreSpec, listed: dict[int, ShardInfo], progress: bool,
                  repair: bool) -> tuple[StoreSpec, dict[int, ShardInfo], int]:
    """Read whole and verify every shard found that the manifest does not list, and name the ones that fail (they
    are recomputed). Returns spec (for a repair, grown to keep every shard the store had), the sound shards
    with the listed ones, and how many shards were verified."""
    done, problems = verified_shards(fs, root, spec, skip=listed, progress=progress)
    verified = len(done) + len(problems)
    done.update(listed)
    if repair:  # a repair keeps every shard the store had
        spec = replace(spec, num_shards=max(spec.num_shards, _listed_count(fs, root), *(i + 1 for i in problems),
                                            *(i + 1 for i in done)))
    for index, problem in sorted(problems.items()):
        if index < spec.num_shards:
            print(f"[precompute] {location(fs, posixpath.join(root, shard_name(index)))} {problem}: recomputing it")
    return spec, done, verified


def _print_plan(config: RunConfig, spec: StoreSpec, url: str, todo: list[int], writers: int) -> None:
    """What the precompute will compute, where and by how many writers, before the first shard."""
    print(f"[precompute] plan: {len(todo) * spec.rows_per_shard:,} rows to compute, {len(todo)} shards of "
          f"{spec.rows_per_shard} ({spec.num_shards - len(todo)} of {spec.num_shards} there already), into {url}, "
          f"by {writers} writer{'s' * (writers > 1)}"
          f"{' on the GPU' if config.trajectories.gpus_per_actor > 0 else ' on CPUs'}; "
          "its size and time follow from the first shard", flush=True)


def _write_shards(config: RunConfig, spec: StoreSpec, url: str, todo: list[int], done: dict[int, ShardInfo],
                  use_ray: bool, progress: bool, plan: bool, writers: int) -> int:
    """Compute the shards in todo, adding each to done as it lands, under a progress bar (whole lines when the
    console is a log file); with plan, the first shard's size and time and an estimate for the rest. Returns the
    bytes written."""
    tty = sys.stderr.isatty()
    bar = tqdm(total=spec.num_rows, initial=sum(s.rows for i, s in done.items() if i < spec.num_shards), unit="row",
               desc="precompute anchors", disable=not progress, file=sys.stderr if tty else LogLines(sys.stderr),
               mininterval=0.1 if tty else 30)
    written, writing = 0, time.time()
    for count, info in enumerate(_run_writers(config, spec, url, todo, use_ray), start=1):
        done[info["index"]] = _shard_info(info)
        written += info["bytes"]
        if plan and count == 1 and len(todo) > 1:
            seconds, rest = time.time() - writing, len(todo) - 1
            print(f"[precompute] first shard: {info['rows']} rows, {_size(info['bytes'])} in {seconds:.0f} s "
                  f"(loading the teacher included); the other {rest} shards: about "
                  f"{_size(info['bytes'] * rest)} and at most {clock(seconds * rest / writers)} more", flush=True)
        bar.update(info["rows"])
    bar.close()
    return written


def _size(n: float) -> str:
    """Bytes for people: 512 B, 37.2 KiB, 1.3 MiB, 14.70 GiB."""
    for unit, scale, digits in (("GiB", 2**30, 2), ("MiB", 2**20, 1), ("KiB", 2**10, 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} B"


class LogLines:
    """A progress bar's output as whole lines, for a console that is a log file, not a terminal: each refresh is
    one line (tqdm redraws its line with carriage returns, which a file keeps as one ever-growing line)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def check_actor_fits(config: RunConfig) -> None:
    """Refuse an actor larger than the whole Ray cluster: Ray Data would wait for it for ever, printing "No
    available node types can fulfill resource request" over and over."""
    import ray

    from orchestrator.cluster import ensure_ray

    ensure_ray()
    traj, resources = config.trajectories, ray.cluster_resources()
    for key, wants, kind in (("cpus_per_actor", traj.cpus_per_actor, "CPU"),
                             ("gpus_per_actor", traj.gpus_per_actor, "GPU")):
        if wants > resources.get(kind, 0):
            raise ConfigError(f"trajectories.{key}", f"one precompute actor asks for {wants:g} {kind}s, but the Ray "
                                                     f"cluster has {resources.get(kind, 0):g}; lower "
                                                     f"trajectories.{key} (fractions such as 0.5 are allowed)")


def available_gpus(use_ray: bool) -> float:
    """GPUs the precompute's writers could use: the Ray cluster's, or this machine's."""
    if use_ray:
        import ray

        from orchestrator.cluster import ensure_ray

        ensure_ray()
        return ray.cluster_resources().get("GPU", 0)
    import torch

    return torch.cuda.device_count()


def _listed_count(fs, root: str) -> int:
    """How many shards the manifest lists, when it can still be read."""
    try:
        return len(read_manifest(fs, root)["shards"])
    except (StoreError, FileNotFoundError):
        return 0


def _readable(fs, path: str) -> bool:
    try:
        pq.read_table(path, filesystem=fs)
        return True
    except (OSError, ValueError):
        return False


def _shard_info(row: dict) -> ShardInfo:
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
