"""The trajectory store: Parquet shards of teacher anchors under a local path or s3://bucket/prefix.

Content-addressed: the store's directory is named by a hash of everything its rows depend on (teacher
weights and settings, K, prompt set, seeds), so equal settings share one store and any change gets a new
one. Shards appear atomically; the manifest, written last, lists every shard with its row count and
sha256, and readers read only what a complete manifest lists. Each shard is checked against its sha256
the first time a process reads it; `dpdmd repair-store URL` recomputes the shards that fail.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.adapter import Conditioning
from models.families import get_family
from models.sampling import seeded_noise
from workers.config import RunConfig
from workers.batches import AnchorBatch, PromptBatch
from workers.schema import (COND_PREFIX, SCHEMA_VERSION, TensorSpec, decode_tensor, table_to_batch, tensor_specs,
                            unsafe_columns)

MANIFEST = "manifest.json"
NEGATIVE = "negative.parquet"
CONFIG = "config.yaml"  # the resolved config that created the store, so that a repair needs the store alone
SIDECARS = "_shards"

# (shard URL, sha256) of every shard this process has hashed and checked: later epochs, the prompt stream
# and other Store objects over the same store read it without hashing it again.
_VERIFIED: set[tuple[str, str, str]] = set()


class StoreError(RuntimeError):
    """A store that is missing, incomplete, or does not match its manifest."""


class ShardDamage(ValueError):
    """What is wrong with one shard (the caller names the file and the fix)."""


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


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def location(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path inside a store as users write it: a local path, or s3://bucket/key."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def repair_command(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """The one command that repairs the store at root. An S3-compatible store also names its endpoint,
    which the config kept in the store cannot give before the store is reached."""
    endpoint = fs.storage_options.get("client_kwargs", {}).get("endpoint_url")
    return f"dpdmd repair-store {location(fs, root)}" + (f" storage.s3_endpoint_url={endpoint}" if endpoint else "")


def damaged(fs: fsspec.AbstractFileSystem, root: str, problem: str) -> StoreError:
    """problem names the file; the error adds the store and the command that repairs it."""
    return StoreError(f"{problem}: the trajectory store {location(fs, root)} is damaged; repair it with "
                      f"`{repair_command(fs, root)}` (it recomputes only the shards that fail verification)")


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
        "scheduler": get_family(t.family).anchor_scheduler,
        "num_steps": t.num_steps,
        "shift": t.shift,
        "dtype": t.dtype,
        **({"resolution": t.resolution} if t.resolution else {}),
        **({"teacher_samples": True} if config.loss.teacher_samples else {}),  # the baselines' x_teacher column
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
    if _is_local(fs):
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
    """Write one shard, then its sidecar (rows, sha256): a shard without a sidecar is not counted done.
    Non-finite anchors are refused here, where the teacher that made them is the cause, not at a read."""
    bad = unsafe_columns(table)
    if bad:
        raise StoreError(f"the teacher produced non-finite or overflowing values (|x| > 1e18) in {bad} for "
                         f"{location(fs, posixpath.join(root, shard_name(index)))}; nothing was written. Check "
                         "the teacher's weights, or run it in teacher.dtype=fp32")
    data = table_bytes(table)
    info = ShardInfo(index, shard_name(index), table.num_rows, hashlib.sha256(data).hexdigest(), len(data))
    _put_atomically(fs, posixpath.join(root, info.name), data)
    _put_atomically(fs, posixpath.join(root, SIDECARS, f"{info.name}.json"), json.dumps(info.to_json()).encode())
    return info


def checked_table(data: bytes, sha256: str, rows: int) -> pa.Table:
    """A shard's table parsed from bytes already read, after checking them against their sha256; its row
    count and float values (finite, within MAX_ABS) are checked too. Raises ShardDamage."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ShardDamage("does not match its sha256 (changed or overwritten since it was written)")
    try:
        table = pq.read_table(pa.py_buffer(data))
    except (OSError, pa.ArrowException) as err:
        raise ShardDamage(f"cannot be parsed ({err})") from None
    if table.num_rows != rows:
        raise ShardDamage(f"holds {table.num_rows} rows, not {rows}")
    bad = unsafe_columns(table)
    if bad:
        raise ShardDamage(f"holds non-finite or overflowing values (|x| > 1e18) in {bad}")
    return table


def check_identity(table: pa.Table, spec: StoreSpec, index: int) -> None:
    """The rows are the ones shard index holds by construction: prompt ids and seeds as row_ids numbers
    them, their prompts' texts, and eps the seeded noise of each seed. Raises ShardDamage."""
    try:
        batch = table_to_batch(table, tensor_specs(table.schema))
    except (ValueError, KeyError) as err:
        raise ShardDamage(f"lacks columns this schema needs ({err})") from None
    prompt_ids, seeds = spec.shard_rows(index)
    if not (torch.equal(batch.prompt_ids, prompt_ids) and torch.equal(batch.seeds, seeds)
            and table.column("prompt").to_pylist() == [spec.prompts[i] for i in prompt_ids.tolist()]):
        raise ShardDamage("holds other rows than its own (prompt_id, seed or prompt differ from its position)")
    if not torch.equal(batch.eps, seeded_noise(seeds.tolist(), tuple(batch.eps.shape[1:]))):
        raise ShardDamage("holds eps other than the seeded noise of its rows' seeds")


def shard_index(name: str) -> int | None:
    match = re.fullmatch(r"shard-(\d+)\.parquet", name)
    return int(match.group(1)) if match else None


def verified_shards(fs: fsspec.AbstractFileSystem, root: str, spec: StoreSpec, skip=(),
                    progress: bool = False) -> tuple[dict[int, ShardInfo], dict[int, str]]:
    """The shards already written whose contents check out, read in full: bytes against their sidecar's
    sha256, rows against the identity their position gives them, values finite. Returns (good, problems):
    problems maps each other shard found (file or sidecar) to what is wrong with it. skip: indices not read."""
    from tqdm.auto import tqdm

    names = {posixpath.basename(p) for p in fs.glob(posixpath.join(root, "shard-*.parquet"))}
    names |= {posixpath.basename(p).removesuffix(".json")
              for p in fs.glob(posixpath.join(root, SIDECARS, "shard-*.parquet.json"))}
    indices = sorted(i for i in map(shard_index, names) if i is not None and i not in skip)
    good: dict[int, ShardInfo] = {}
    problems: dict[int, str] = {}
    for index in tqdm(indices, desc="verify shards", unit="shard", disable=not (progress and indices)):
        try:
            good[index] = _verify_written(fs, root, spec, index)
        except ShardDamage as err:
            problems[index] = str(err)
    return good, problems


def _verify_written(fs: fsspec.AbstractFileSystem, root: str, spec: StoreSpec, index: int) -> ShardInfo:
    name = shard_name(index)
    try:
        info = ShardInfo(**json.loads(fs.cat_file(posixpath.join(root, SIDECARS, f"{name}.json"))))
    except FileNotFoundError:
        raise ShardDamage("has no sidecar (its write was cut short)") from None
    except (ValueError, TypeError) as err:
        raise ShardDamage(f"has an unreadable sidecar ({err})") from None
    if (info.index, info.name) != (index, name):
        raise ShardDamage(f"has the sidecar of {info.name}")
    try:
        data = fs.cat_file(posixpath.join(root, name))
    except FileNotFoundError:
        raise ShardDamage("is missing") from None
    check_identity(checked_table(data, info.sha256, spec.rows_per_shard), spec, index)
    return info


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
    return tensor_specs(pq.read_schema(path, filesystem=fs))


def write_config(fs: fsspec.AbstractFileSystem, root: str, text: str) -> None:
    """Keep the config that creates a store next to its manifest (once: any config that gives this store
    recomputes the same rows), so that `dpdmd repair-store` works from the store alone."""
    path = posixpath.join(root, CONFIG)
    if not fs.exists(path):
        _put_atomically(fs, path, text.encode())


def read_config(fs: fsspec.AbstractFileSystem, root: str) -> str:
    try:
        return fs.cat_file(posixpath.join(root, CONFIG)).decode()
    except FileNotFoundError:
        raise StoreError(f"{location(fs, posixpath.join(root, CONFIG))} does not exist, so the settings that "
                         f"created the store at {location(fs, root)} are unknown (a store written before stores kept "
                         "them): run `dpdmd precompute` with the recipe and overrides that created it, which records "
                         "them there, then this command again") from None


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

    def for_run(self, config: RunConfig, world_size: int) -> Store:
        """The store as a run of config on world_size ranks reads it: its first shards_needed shards, whatever
        other runs have added since (a store grows by whole shards at its end, and shard i holds the same rows in
        any store of the same key). The rows a run reads, and their order, so follow from its config, seed and
        world size alone."""
        needed = shards_needed(config, len(self.manifest["prompts"]), world_size)
        if needed >= len(self.shards):
            return self
        return Store(self.fs, self.root, {**self.manifest, "shards": self.shards[:needed],
                                          "num_rows": sum(s["rows"] for s in self.shards[:needed])})

    def identity(self, config: RunConfig, world_size: int) -> dict:
        """What a run records about the rows it reads: the store, its key, and the shards and rows it reads."""
        view = self.for_run(config, world_size)
        return {"store": self.root, "key": posixpath.basename(self.root.rstrip("/")),
                "shards": len(view.shards), "rows": view.num_rows, "world_size": world_size,
                "rule": "the store's first `shards` shards; rank r reads shards r, r + world_size, ... in an order "
                        "seeded by the config's seed"}

    @property
    def num_rows(self) -> int:
        return self.manifest["num_rows"]

    def shard_path(self, shard: dict) -> str:
        return posixpath.join(self.root, shard["name"])

    def verify(self, checksums: bool = False) -> None:
        """Every shard the manifest lists exists with its size: cheap, so done on every open. With checksums,
        every shard is also read whole and checked as at its first read, which hashes the whole store."""
        for shard in self.shards:
            path = self.shard_path(shard)
            if not self.fs.exists(path):
                raise damaged(self.fs, self.root, f"{location(self.fs, path)} is missing")
            if (size := self.fs.size(path)) != shard["bytes"]:
                raise damaged(self.fs, self.root, f"{location(self.fs, path)} holds {size} bytes, its manifest "
                                                  f"says {shard['bytes']} (truncated or overwritten)")
        for shard in self.shards if checksums else ():
            self.check_shard(shard)

    def check_shard(self, shard: dict) -> pa.Table:
        """Read a shard whole and check it against the manifest (sha256, rows, finite values), then record it
        as verified in this process. The check adds about 2 s per GB on one core (BENCHMARKS.md), so it runs
        once per shard and process, on the bytes the first read fetches anyway, never on open."""
        path = self.shard_path(shard)
        try:
            table = checked_table(self.fs.cat_file(path), shard["sha256"], shard["rows"])
        except FileNotFoundError:
            raise damaged(self.fs, self.root, f"{location(self.fs, path)} is missing") from None
        except ShardDamage as err:
            raise damaged(self.fs, self.root, f"{location(self.fs, path)} {err}") from None
        _VERIFIED.add(self._verified_key(shard))
        return table

    def _verified_key(self, shard: dict) -> tuple[str, str, str]:
        """What a check vouches for: this file, of this filesystem (an S3 endpoint too), with this checksum."""
        options = json.dumps(self.fs.storage_options, sort_keys=True, default=str)
        return options, location(self.fs, self.shard_path(shard)), shard["sha256"]

    def read_shard(self, shard: dict, columns: list[str] | None = None) -> pa.Table:
        """A shard's rows (only columns, when given); its first read in this process checks it (check_shard)."""
        path = self.shard_path(shard)
        if self._verified_key(shard) not in _VERIFIED:
            table = self.check_shard(shard)
            return table if columns is None else table.select(columns)
        try:
            table = pq.read_table(path, filesystem=self.fs, columns=columns)
        except (OSError, pa.ArrowException) as err:  # changed after its first read
            raise damaged(self.fs, self.root, f"{location(self.fs, path)} cannot be read ({err})") from None
        if table.num_rows != shard["rows"]:
            raise damaged(self.fs, self.root, f"{location(self.fs, path)} holds {table.num_rows} rows, its "
                                              f"manifest says {shard['rows']}")
        return table

    def negative(self) -> Conditioning:
        path = posixpath.join(self.root, NEGATIVE)
        try:
            table = pq.read_table(path, filesystem=self.fs)
            return Conditioning({n: decode_tensor(table.column(n), TensorSpec.from_json(s))
                                 for n, s in self.manifest["negative_columns"].items()})
        except (OSError, KeyError, pa.ArrowException) as err:
            raise damaged(self.fs, self.root, f"{location(self.fs, path)} cannot be read ({err})") from None

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
                       seed: int = 0, with_samples: bool = False) -> Iterator[PromptBatch]:
        """Endless prompt conditioning for critic updates, from the same shards but only their prompt
        columns, in an order of its own: no anchor row is consumed. with_samples: the rows' teacher samples too
        (the dmd-gan critic's real data)."""
        cond = {n: s for n, s in self.columns.items() if n.startswith(COND_PREFIX)}
        real = ["x_teacher"] if with_samples else []
        for table in self._tables(batch_size, rank, world_size, start_row, seed + 1_000_003,
                                  ["prompt_id", *cond, *real], None):
            yield PromptBatch(Conditioning({n.removeprefix(COND_PREFIX): decode_tensor(table.column(n), s)
                                            for n, s in cond.items()}),
                              torch.from_numpy(table.column("prompt_id").to_numpy()),
                              decode_tensor(table.column("x_teacher"), self.columns["x_teacher"]) if real else None)

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


# The manifest's keys and their types; a manifest without them was cut short or edited.
_MANIFEST_KEYS = {"fingerprint": dict, "prompts": list, "num_rows": int, "rows_per_shard": int, "columns": dict,
                  "negative_columns": dict, "shards": list}


def read_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict:
    """The manifest, checked for what readers need; a garbage, empty or partial one raises StoreError."""
    path = posixpath.join(root, MANIFEST)
    url = location(fs, path)
    try:
        manifest = json.loads(fs.cat_file(path))
    except ValueError as err:  # not JSON, or not text
        raise damaged(fs, root, f"{url} is not a manifest ({err})") from None
    if not isinstance(manifest, dict):
        raise damaged(fs, root, f"{url} is not a manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise damaged(fs, root, f"{url} has schema version {manifest.get('schema_version')}, this code reads "
                                f"version {SCHEMA_VERSION}")
    missing = [k for k, kind in _MANIFEST_KEYS.items() if not isinstance(manifest.get(k), kind)]
    fields = set(ShardInfo.__dataclass_fields__)
    if not missing and not all(isinstance(s, dict) and fields <= s.keys() and s["index"] == i
                               for i, s in enumerate(manifest["shards"])):
        missing = ["shards"]
    if missing or not manifest["shards"]:
        raise damaged(fs, root, f"{url} lacks {missing or ['shards']} or holds them malformed (cut short or edited)")
    return manifest


def open_store(fs: fsspec.AbstractFileSystem, root: str, verify: bool = True) -> Store:
    """Open a complete store; an incomplete or damaged one raises StoreError naming the file and the fix.
    verify checks that every shard exists with its size; contents are checked at each shard's first read."""
    if not fs.exists(posixpath.join(root, MANIFEST)):
        if fs.exists(posixpath.join(root, CONFIG)):
            raise damaged(fs, root, f"{location(fs, posixpath.join(root, MANIFEST))} is missing (a precompute was "
                                    "cut short, or it was deleted)")
        raise StoreError(f"no complete trajectory store at {location(fs, root)}: run `dpdmd precompute` with the "
                         "same recipe and overrides first")
    store = Store(fs, root, read_manifest(fs, root))
    if verify:
        store.verify()
    return store
