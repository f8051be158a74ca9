"""The trajectory store: Parquet shards of teacher anchors under a local path or s3://bucket/prefix.

Content-addressed: the store's directory is named by a hash of everything its rows depend on (teacher
weights and settings, K, prompt set, seeds), so equal settings share one store and any change gets a new
one. Shards appear atomically; the manifest, written last, lists every shard with its row count and
sha256, and readers read only what a complete manifest lists.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.adapter import Conditioning
from models.families import family_module
from workers.config import RunConfig
from workers.batches import AnchorBatch, PromptBatch
from workers.schema import COND_PREFIX, SCHEMA_VERSION, TensorSpec, decode_tensor, table_to_batch

MANIFEST = "manifest.json"
NEGATIVE = "negative.parquet"
SIDECARS = "_shards"


class StoreError(RuntimeError):
    """A store that is missing, incomplete, or does not match its manifest."""


# ----------------------------------------------------------------------------------------------------
# Where a store lives and what it holds


def filesystem(config: RunConfig, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem for url; S3 credentials come from the standard AWS chain, never the config."""
    options = {}
    if url.startswith("s3://") and config.storage.s3_endpoint_url:
        options["client_kwargs"] = {"endpoint_url": config.storage.s3_endpoint_url}
    return fsspec.core.url_to_fs(url, **options)


def trajectory_root(config: RunConfig) -> str:
    return config.storage.trajectory_root or str(Path(config.storage.output_dir) / "trajectories")


def weights_digest(teacher_dir: Path) -> str:
    """sha256 over the teacher's weight and config files, in sorted order."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(teacher_dir).rglob("*")
                   if p.is_file() and p.suffix in {".safetensors", ".json", ".bin"} and p.name != "training_log.json")
    if not files:
        raise StoreError(f"no weight files under {teacher_dir}")
    for path in files:
        digest.update(str(path.relative_to(teacher_dir)).encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoreSpec:
    """Everything the rows depend on, and how many whole shards a run needs. Row r holds prompt r mod P and
    seed seed_offset + r, so a store of N shards is the first N shards of any larger one: a run that needs
    more rows extends the store, keeping the shards it has."""

    fingerprint: dict
    prompts: list[str]
    seed_offset: int
    rows_per_shard: int
    num_shards: int

    @property
    def key(self) -> str:
        text = json.dumps(self.fingerprint, sort_keys=True)
        return f"{self.fingerprint['family']}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    @property
    def num_rows(self) -> int:
        return self.num_shards * self.rows_per_shard

    def shard_rows(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_ids, seeds) of shard index, as workers.anchors.row_ids numbers the rows."""
        from workers.anchors import row_ids

        rows = torch.arange(index * self.rows_per_shard, (index + 1) * self.rows_per_shard)
        return row_ids(rows, len(self.prompts), self.seed_offset)


def anchor_rows_per_rank(config: RunConfig) -> int:
    """Anchor rows one rank's generator updates consume over the whole run: each generator update takes a
    batch of new rows (critic updates take none); trajectories.max_reuse > 1 lets a run go over the rows
    that many times, so it needs that many times fewer."""
    rows = config.schedule.num_generator_updates * config.distributed.batch_size_per_worker
    return -(-rows // config.trajectories.max_reuse)


def shards_needed(config: RunConfig, num_prompts: int, world_size: int | None = None) -> int:
    """Whole shards a run of world_size ranks needs (each rank reads shards rank::world_size), and at least
    trajectories.seeds_per_prompt rows per prompt when that is set."""
    world_size = world_size or config.distributed.num_workers
    per_shard = config.trajectories.rows_per_shard
    for_run = world_size * -(-anchor_rows_per_rank(config) // per_shard)
    asked = -(-num_prompts * config.trajectories.seeds_per_prompt // per_shard)
    return max(for_run, asked, world_size)


def store_spec(config: RunConfig, prompts: list[str], teacher_dir: Path, world_size: int | None = None) -> StoreSpec:
    t, traj = config.teacher, config.trajectories
    fingerprint = {
        "schema_version": SCHEMA_VERSION,
        "family": t.family,
        "model": t.path or Path(teacher_dir).name,
        "weights_sha256": weights_digest(teacher_dir),
        "guidance_scale": t.guidance_scale,
        "anchor_step": config.loss.anchor_step,
        "scheduler": getattr(family_module(t.family), "ANCHOR_SCHEDULER", "FlowMatchEulerDiscreteScheduler"),
        "num_steps": t.num_steps,
        "shift": t.shift,
        "dtype": t.dtype,
        **({"resolution": t.resolution} if t.resolution else {}),
        "prompt_set_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "num_prompts": len(prompts),
        "seed_offset": traj.seed_offset,
        "rows_per_shard": traj.rows_per_shard,
    }
    return StoreSpec(fingerprint, prompts, traj.seed_offset, traj.rows_per_shard,
                     shards_needed(config, len(prompts), world_size))


def store_url(config: RunConfig, spec: StoreSpec) -> str:
    return posixpath.join(trajectory_root(config).rstrip("/"), spec.key)


# ----------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class ShardInfo:
    index: int
    name: str
    rows: int
    sha256: str
    bytes: int

    def to_json(self) -> dict:
        return self.__dict__.copy()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _put_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Local: write a temp file and rename it. Object stores: one PUT, which is atomic by itself."""
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_shard(fs: fsspec.AbstractFileSystem, root: str, index: int, table: pa.Table) -> ShardInfo:
    """Write one shard, then its sidecar (rows, sha256): a shard without a sidecar is not counted done."""
    data = table_bytes(table)
    info = ShardInfo(index, shard_name(index), table.num_rows, hashlib.sha256(data).hexdigest(), len(data))
    _put_atomically(fs, posixpath.join(root, info.name), data)
    _put_atomically(fs, posixpath.join(root, SIDECARS, f"{info.name}.json"), json.dumps(info.to_json()).encode())
    return info


def finished_shards(fs: fsspec.AbstractFileSystem, root: str) -> dict[int, ShardInfo]:
    """Shards already written (a re-run skips them): sidecar present and the file's size matching it."""
    done: dict[int, ShardInfo] = {}
    sidecar_dir = posixpath.join(root, SIDECARS)
    if not fs.exists(sidecar_dir):
        return done
    sizes = {posixpath.basename(p): fs.size(p) for p in fs.glob(posixpath.join(root, "shard-*.parquet"))}
    for path in fs.glob(posixpath.join(sidecar_dir, "*.json")):
        info = ShardInfo(**json.loads(fs.cat_file(path)))
        if sizes.get(info.name) == info.bytes:
            done[info.index] = info
    return done


def write_negative(fs: fsspec.AbstractFileSystem, root: str, negative: Conditioning) -> None:
    """The empty-prompt conditioning CFG is taken against, once per store (one row)."""
    from workers.schema import encode_tensor

    fields, arrays = [], []
    for name, tensor in negative.tensors.items():
        array, spec = encode_tensor(tensor)
        fields.append(pa.field(name, array.type, metadata={"tensor": json.dumps(spec.to_json())}))
        arrays.append(array)
    _put_atomically(fs, posixpath.join(root, NEGATIVE), table_bytes(pa.Table.from_arrays(arrays, schema=pa.schema(fields))))


def column_specs(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, TensorSpec]:
    """The tensor columns of a Parquet file, from their field metadata."""
    schema = pq.read_schema(path, filesystem=fs)
    return {f.name: TensorSpec.from_json(json.loads(f.metadata[b"tensor"]))
            for f in schema if f.metadata and b"tensor" in f.metadata}


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, spec: StoreSpec, shards: dict[int, ShardInfo]) -> dict:
    """The manifest of shards 0 .. spec.num_shards - 1: written last, in one piece."""
    count = spec.num_shards
    shards = {i: info for i, info in shards.items() if i < count}
    if sorted(shards) != list(range(count)):
        missing = sorted(set(range(count)) - set(shards))
        raise StoreError(f"cannot finish the store at {root}: shards {missing} are missing")
    rows = sum(s.rows for s in shards.values())
    if rows != spec.num_rows:
        raise StoreError(f"the store at {root} holds {rows} rows, expected {spec.num_rows}")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": spec.fingerprint,
        "prompts": spec.prompts,
        "seed_range": [spec.seed_offset, spec.seed_offset + rows],
        "num_rows": rows,
        "rows_per_shard": spec.rows_per_shard,
        "columns": {n: s.to_json() for n, s in column_specs(fs, posixpath.join(root, shards[0].name)).items()},
        "negative_columns": {n: s.to_json() for n, s in column_specs(fs, posixpath.join(root, NEGATIVE)).items()},
        "shards": [shards[i].to_json() for i in range(count)],
        "bytes": sum(s.bytes for s in shards.values()),
    }
    _put_atomically(fs, posixpath.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


# ----------------------------------------------------------------------------------------------------
# Reading


class Store:
    """A complete store, opened through its manifest."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, manifest: dict):
        self.fs, self.root, self.manifest = fs, root, manifest
        self.columns = {n: TensorSpec.from_json(s) for n, s in manifest["columns"].items()}

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def num_rows(self) -> int:
        return self.manifest["num_rows"]

    def shard_path(self, shard: dict) -> str:
        return posixpath.join(self.root, shard["name"])

    def verify(self, checksums: bool = False) -> None:
        """Every shard the manifest lists exists with its size (and, with checksums, its sha256)."""
        for shard in self.shards:
            path = self.shard_path(shard)
            if not self.fs.exists(path):
                raise StoreError(f"shard {shard['name']} is missing from the store at {self.root}; "
                                 "re-run `dpdmd precompute` with the same settings to rewrite it")
            if self.fs.size(path) != shard["bytes"] or (
                    checksums and hashlib.sha256(self.fs.cat_file(path)).hexdigest() != shard["sha256"]):
                raise StoreError(f"shard {shard['name']} in the store at {self.root} does not match its manifest "
                                 "(corrupt or overwritten); delete it and re-run `dpdmd precompute`")

    def read_shard(self, shard: dict, columns: list[str] | None = None) -> pa.Table:
        try:
            table = pq.read_table(self.shard_path(shard), filesystem=self.fs, columns=columns)
        except (OSError, pa.ArrowException) as err:
            raise StoreError(f"shard {shard['name']} in the store at {self.root} cannot be read ({err}); "
                             "delete it and re-run `dpdmd precompute`") from None
        if table.num_rows != shard["rows"]:
            raise StoreError(f"shard {shard['name']} holds {table.num_rows} rows, the manifest says {shard['rows']}")
        return table

    def negative(self) -> Conditioning:
        table = pq.read_table(posixpath.join(self.root, NEGATIVE), filesystem=self.fs)
        return Conditioning({n: decode_tensor(table.column(n), TensorSpec.from_json(s))
                             for n, s in self.manifest["negative_columns"].items()})

    def rank_shards(self, rank: int, world_size: int) -> list[dict]:
        """The shards rank reads: rank::world_size (a store of fewer shards than ranks: one each, shared)."""
        return self.shards[rank::world_size] or self.shards[rank % len(self.shards)::len(self.shards)]

    def rank_rows(self, rank: int, world_size: int) -> int:
        return sum(s["rows"] for s in self.rank_shards(rank, world_size))

    def check_capacity(self, config: RunConfig, rank: int, world_size: int) -> None:
        """Refuse, before training, a store from which this rank's generator updates would reuse anchor rows
        more often than trajectories.max_reuse allows."""
        needed = anchor_rows_per_rank(config)
        have = self.rank_rows(rank, world_size)
        if have < needed:
            per_run = config.schedule.num_generator_updates * config.distributed.batch_size_per_worker
            raise StoreError(
                f"the trajectory store at {self.root} holds {have} anchor rows for rank {rank} of {world_size}, "
                f"but {config.schedule.num_generator_updates} generator updates x "
                f"{config.distributed.batch_size_per_worker} rows need {per_run}"
                + (f" ({needed} at trajectories.max_reuse={config.trajectories.max_reuse})"
                   if config.trajectories.max_reuse > 1 else "")
                + "; run `dpdmd precompute` with the run's recipe and overrides (it extends the store), or raise "
                  "trajectories.max_reuse to train on fewer rows more than once")

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1, start_row: int = 0, seed: int = 0,
                max_epochs: int | None = None) -> Iterator[AnchorBatch]:
        """This rank's anchor rows: its shards in a seeded order, shuffled within each shard; start_row rows
        are skipped (the data position of a resumed run). After max_epochs passes over the rank's rows the
        stream ends (None: endless)."""
        for table in self._tables(batch_size, rank, world_size, start_row, seed, None, max_epochs):
            yield table_to_batch(table, self.columns)

    def prompt_batches(self, batch_size: int, rank: int = 0, world_size: int = 1, start_row: int = 0,
                       seed: int = 0) -> Iterator[PromptBatch]:
        """Endless prompt conditioning for critic updates, from the same shards but only their prompt
        columns, in an order of its own: no anchor row is consumed."""
        cond = {n: s for n, s in self.columns.items() if n.startswith(COND_PREFIX)}
        for table in self._tables(batch_size, rank, world_size, start_row, seed + 1_000_003,
                                  ["prompt_id", *cond], None):
            yield PromptBatch(Conditioning({n.removeprefix(COND_PREFIX): decode_tensor(table.column(n), s)
                                            for n, s in cond.items()}),
                              torch.from_numpy(table.column("prompt_id").to_numpy()))

    def _tables(self, batch_size: int, rank: int, world_size: int, start_row: int, seed: int,
                columns: list[str] | None, max_epochs: int | None) -> Iterator[pa.Table]:
        shards = self.rank_shards(rank, world_size)
        pending: list[pa.Table] = []
        held = skipped = 0
        epoch = 0
        while max_epochs is None or epoch < max_epochs:
            order = torch.randperm(len(shards), generator=torch.Generator().manual_seed(seed + epoch))
            for i in order.tolist():
                table = self.read_shard(shards[i], columns)
                perm = torch.randperm(table.num_rows, generator=torch.Generator().manual_seed(seed + epoch * 7 + i))
                table = table.take(pa.array(perm.numpy()))
                if skipped < start_row:
                    drop = min(start_row - skipped, table.num_rows)
                    table, skipped = table.slice(drop), skipped + drop
                pending.append(table)
                held += table.num_rows
                while held >= batch_size:
                    merged = pa.concat_tables(pending)
                    yield merged.slice(0, batch_size)
                    rest = merged.slice(batch_size)
                    pending, held = [rest], rest.num_rows
            epoch += 1


def open_store(fs: fsspec.AbstractFileSystem, root: str, verify: bool = True) -> Store:
    """Open a complete store; an incomplete or corrupt one raises StoreError naming what to do."""
    path = posixpath.join(root, MANIFEST)
    if not fs.exists(path):
        raise StoreError(f"no complete trajectory store at {root}: run `dpdmd precompute` with the same "
                         "recipe and overrides first")
    manifest = json.loads(fs.cat_file(path))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"the store at {root} has schema version {manifest.get('schema_version')}, this code "
                         f"reads version {SCHEMA_VERSION}; re-run `dpdmd precompute`")
    store = Store(fs, root, manifest)
    if verify:
        store.verify()
    return store
