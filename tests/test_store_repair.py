"""Verified trajectory stores (issue 13): a changed, truncated, missing or non-finite shard and a bad manifest
are refused with the file, the store and the one command that repairs them; that command (and a rebuilt
manifest) recomputes exactly the shards that fail verification."""

import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import TINY_DISTILL, TINY_STORE, TINY_TEACHER, tiny_config
from models.sampling import seeded_noise
from orchestrator import cli
from orchestrator.precompute import precompute
from workers.schema import encode_tensor
from workers.store import StoreError, open_store, table_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("repair")
    tiny_config(path)  # one tiny teacher for every store below
    return path


def _overrides(out: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY_TEACHER, *TINY_STORE, *TINY_DISTILL, f"storage.output_dir={out}",
            f"storage.trajectory_root={tmp_path / 'stores'}", *extra]


def _config(out, tmp_path, *extra):
    return tiny_config(out, f"storage.trajectory_root={tmp_path / 'stores'}", *extra)


def _store(out, tmp_path):
    return precompute(_config(out, tmp_path), use_ray=False, progress=False)[0]


def _change_in_place(path: str) -> None:
    """Overwrite 16 bytes of a shard's data (same size) where it still parses, with the same schema and other
    values, as the issue's user did."""
    data = Path(path).read_bytes()
    original = pq.read_table(pa.py_buffer(data))
    for offset in range(4, len(data) - 16):
        changed = data[:offset] + bytes(16) + data[offset + 16:]
        try:
            table = pq.read_table(pa.py_buffer(changed))
        except (OSError, pa.ArrowException):
            continue
        if changed != data and table.schema.equals(original.schema, check_metadata=True) and not table.equals(original):
            Path(path).write_bytes(changed)
            return
    raise AssertionError("no offset where the changed shard still parses")


def _plant(store, index: int, table: pa.Table) -> None:
    """Replace a shard with table and record its sha256 in the sidecar and the manifest, as a writer that
    checked nothing would: the bytes match their checksums, the rows are wrong."""
    data = table_bytes(table)
    shard = store.shards[index]
    shard.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    Path(store.shard_path(shard)).write_bytes(data)
    Path(store.root, "_shards", f"{shard['name']}.json").write_text(json.dumps(shard))
    Path(store.root, "manifest.json").write_text(json.dumps(store.manifest))


def _with_column(table: pa.Table, name: str, tensor: torch.Tensor) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), encode_tensor(tensor)[0])


def _named_command(message: str) -> list[str]:
    match = re.search(r"`(dpdmd [^`]+)`", message)
    assert match, message
    return shlex.split(match.group(1))[1:]


def _run_named_command(message: str) -> None:
    """The command an error names, in this process (--no-ray: the tests run no Ray cluster)."""
    assert cli.main([*_named_command(message), "--no-ray"]) == 0


def _assert_sound(store_root: str, num_shards: int = 4) -> None:
    """Every shard's bytes match the manifest and its sidecar, and every row is the one row_ids numbers."""
    store = open_store(*fsspec.core.url_to_fs(store_root))
    assert len(store.shards) == num_shards
    for i, shard in enumerate(store.shards):
        data = Path(store.shard_path(shard)).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        sidecar = json.loads(Path(store_root, "_shards", f"{shard['name']}.json").read_text())
        assert sidecar["sha256"] == shard["sha256"]
        table = pq.read_table(store.shard_path(shard))
        assert table.column("seed").to_pylist() == list(range(16 * i, 16 * (i + 1)))
    store.verify(checksums=True)
    batch = next(store.batches(64, max_epochs=1))
    torch.testing.assert_close(batch.eps, seeded_noise(batch.seeds.tolist(), (2,)), rtol=0, atol=0)
    assert torch.isfinite(batch.z).all()


def test_a_changed_shard_is_refused_at_its_first_read_and_the_named_command_repairs_it(out, tmp_path, capsys):
    overrides = _overrides(out, tmp_path, "schedule.num_generator_updates=8")  # the run reads every shard
    store = _store(out, tmp_path)
    before = [s["sha256"] for s in store.shards]
    _change_in_place(store.shard_path(store.shards[3]))
    open_store(store.fs, store.root)  # opening checks sizes only: hashing every shard on open is too slow

    assert cli.main(["distill", "--no-ray", "--recipe", "toy2d", *overrides]) == 2
    err = capsys.readouterr().err
    assert f"{store.root}/shard-00003.parquet" in err and "sha256" in err and "Traceback" not in err
    assert not list((out / "runs").glob("*/generator"))  # nothing trained on it, nothing exported
    # and how the run goes on once the store is repaired: its last checkpoint and the resume command
    run_dir = sorted((out / "runs").glob("*-distill-*"))[-1]
    assert "The run stopped; " in err and f"continue with: dpdmd distill --no-ray --resume {run_dir}" in err

    # exactly the command named, as a user runs it: a new process, the Ray actor pool
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *_named_command(err)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard-00003.parquet does not match its sha256" in proc.stdout and "1 new shards" in proc.stdout
    _assert_sound(store.root)
    assert [s["sha256"] for s in open_store(store.fs, store.root).shards] == before  # recomputed exactly


def test_each_shard_is_hashed_once_per_process(out, tmp_path, monkeypatch):
    store = _store(out, tmp_path)
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda data=b"": hashed.append(len(data)) or real(data))
    list(store.batches(16, max_epochs=3))
    prompts = store.prompt_batches(16)
    for _ in range(8):
        next(prompts)
    assert len(hashed) == len(store.shards)  # three epochs and the prompt stream: one hash per shard


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_truncated_or_missing_shard_is_named_and_the_named_command_repairs_it(out, tmp_path, damage):
    store = _store(out, tmp_path)
    victim = Path(store.shard_path(store.shards[1]))
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-100])
    else:
        victim.unlink()
    with pytest.raises(StoreError) as err:
        open_store(store.fs, store.root)
    assert f"{store.root}/shard-00001.parquet" in str(err.value) and damage in str(err.value)
    _run_named_command(str(err.value))
    _assert_sound(store.root)


def test_the_issue_recipe_delete_the_shard_and_rerun_precompute_now_works(out, tmp_path):
    store = _store(out, tmp_path)
    Path(store.shard_path(store.shards[1])).unlink()
    repaired, summary = precompute(_config(out, tmp_path), use_ray=False, progress=False)
    assert summary.shards_written == 1
    _assert_sound(repaired.root)


def test_non_finite_values_are_refused_at_first_read_and_recomputed(out, tmp_path):
    store = _store(out, tmp_path)
    t1, t2 = store.read_shard(store.shards[1]), store.read_shard(store.shards[2])
    z = torch.zeros(16, 2)
    z[5, 1] = float("nan")
    _plant(store, 1, _with_column(t1, "z", z))
    eps = seeded_noise(t2.column("seed").to_pylist(), (2,))
    eps[3, 0] = 3.4e38  # finite in float32, but its square is not: the issue's div.target at update 7
    _plant(store, 2, _with_column(t2, "eps", eps))

    store = open_store(store.fs, store.root)
    for index in (1, 2):
        with pytest.raises(StoreError, match=rf"{store.root}/shard-0000{index}.parquet .*non-finite") as err:
            store.read_shard(store.shards[index])
    _run_named_command(str(err.value))
    _assert_sound(store.root)


@pytest.mark.parametrize("manifest", [b"\x00garbage{", b"", b"[]", b'{"schema_version": 1}', b'{"schema_version": 2}',
                                      b'{"schema_version": 2, "columns": {}, "shards": [{"name": "x"}]}'])
def test_a_garbage_empty_or_partial_manifest_is_named_and_rebuilt(out, tmp_path, manifest):
    store = _store(out, tmp_path)
    path = Path(store.root, "manifest.json")
    path.write_bytes(manifest)
    with pytest.raises(StoreError, match=rf"{path}") as err:
        open_store(store.fs, store.root)
    assert "repair-store" in str(err.value)
    _run_named_command(str(err.value))
    _assert_sound(store.root)


def test_a_rebuilt_manifest_recomputes_the_shards_that_fail_verification(out, tmp_path):
    store = _store(out, tmp_path)
    tables = [store.read_shard(s) for s in store.shards]
    _change_in_place(store.shard_path(store.shards[3]))  # bytes no longer match the sidecar
    _plant(store, 2, tables[0])  # checksums agree, but they are shard 0's rows
    _plant(store, 1, _with_column(tables[1], "eps", seeded_noise(tables[1].column("seed").to_pylist(), (2,)) * 1.01))
    Path(store.root, "manifest.json").unlink()

    rebuilt, summary = precompute(_config(out, tmp_path), use_ray=False, progress=False)
    assert summary.shards_written == 3  # shard 0 kept, the three that fail recomputed, none accepted
    _assert_sound(rebuilt.root)


def test_a_teacher_that_produces_non_finite_anchors_is_refused_before_anything_is_written(out, tmp_path, monkeypatch):
    import workers.precompute as writer

    real = writer.compute_anchors

    def broken(*args, **kwargs):
        batch = real(*args, **kwargs)
        batch.z[0] = float("inf")
        return batch

    monkeypatch.setattr(writer, "compute_anchors", broken)
    with pytest.raises(StoreError, match="teacher.*non-finite"):
        _store(out, tmp_path)
    assert not list((tmp_path / "stores").glob("*/shard-*.parquet"))


def test_repair_store_says_what_it_lacks(tmp_path, capsys):
    assert cli.main(["repair-store", str(tmp_path / "nothing-here")]) == 2
    assert "no trajectory store at" in capsys.readouterr().err
    (tmp_path / "old-store").mkdir()  # a store written before stores kept their config
    assert cli.main(["repair-store", str(tmp_path / "old-store")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'old-store' / 'config.yaml'} does not exist" in err and "dpdmd precompute" in err
    assert "Traceback" not in err


def test_a_changed_shard_on_s3_names_the_endpoint_and_the_named_command_repairs_it(out, tmp_path, s3_server):
    import boto3

    endpoint = s3_server.endpoint
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="anchors")
    config = tiny_config(out, "storage.trajectory_root=s3://anchors/stores", f"storage.s3_endpoint_url={endpoint}")
    store, _ = precompute(config, use_ray=False, progress=False)
    path = store.shard_path(store.shards[2])
    data = store.fs.cat_file(path)
    store.fs.pipe_file(path, data[:-40] + bytes(16) + data[-24:])
    with pytest.raises(StoreError) as err:
        store.read_shard(store.shards[2])
    message = str(err.value)
    assert f"s3://{store.root}/shard-00002.parquet" in message and endpoint in message
    _run_named_command(message)
    repaired = open_store(store.fs, store.root)
    repaired.verify(checksums=True)
    assert repaired.shards[2]["sha256"] == store.shards[2]["sha256"]
