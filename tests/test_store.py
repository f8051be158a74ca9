"""The trajectory store: exact rows, anchors equal to an independent rollout, reuse, new stores on new
settings, corruption named, killed runs completed without duplicates; local and S3 (moto)."""

import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from helpers import TINY_DISTILL, TINY_STORE, TINY_TEACHER, tiny_config
from models.flow import ode_rollout, sampling_sigmas
from orchestrator.precompute import precompute
from workers.store import StoreError, open_store
from workers.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
# A precompute whose writer dies like a killed actor after its second shard: the shard in flight is lost, the
# written ones stay.
KILLED_AFTER_TWO_SHARDS = """
import os, pathlib, sys
sys.path.insert(0, "tests")
from helpers import tiny_config
from orchestrator.precompute import precompute
from workers.precompute import AnchorWriter

write, written = AnchorWriter.write, []


def write_then_die(self, index):
    info = write(self, index)
    written.append(index)
    if len(written) == 2:
        os._exit(17)
    return info


AnchorWriter.write = write_then_die
precompute(tiny_config(pathlib.Path(sys.argv[1])), use_ray=False, progress=False)
"""


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    tiny_config(path)
    return path


def test_rows_ids_and_manifest(out):
    config = tiny_config(out)
    store, summary = precompute(config, use_ray=False, progress=False)
    assert not summary.reused and summary.rows == 64 and summary.shards_written == 4
    assert store.manifest["num_rows"] == 64 and len(store.shards) == 4
    assert store.manifest["seed_range"] == [0, 64]
    tables = [store.read_shard(s) for s in store.shards]
    seeds = sorted(v for t in tables for v in t.column("seed").to_pylist())
    assert seeds == list(range(64))  # every row once
    for t in tables:
        for pid, prompt in zip(t.column("prompt_id").to_pylist(), t.column("prompt").to_pylist()):
            assert prompt == f"class {pid}"
    fp = store.manifest["fingerprint"]
    assert fp["anchor_step"] == 20 and fp["guidance_scale"] == 2.0 and fp["shift"] == 1.0  # the toy2d recipe
    assert len(fp["weights_sha256"]) == 64
    assert store.negative().tensors["class_ids"].tolist() == [4]  # the null class


def test_anchor_equals_an_independent_teacher_rollout(out):
    config = tiny_config(out)
    store, _ = precompute(config, use_ray=False, progress=False)
    batch = next(store.batches(8))
    adapter, teacher = load_teacher(config)
    sigmas = sampling_sigmas(config.teacher.num_steps, config.teacher.shift)[: config.loss.anchor_step + 1]
    cond, uncond = batch.cond, store.negative().expand(8)

    def guided(x, t):
        v_u = teacher(x, t, uncond.tensors["class_ids"])
        v_c = teacher(x, t, cond.tensors["class_ids"])
        return v_u + config.teacher.guidance_scale * (v_c - v_u)

    with torch.no_grad():
        z = ode_rollout(guided, batch.eps, sigmas)
    torch.testing.assert_close(batch.z, z, atol=1e-5, rtol=1e-5)
    assert bool((batch.t_anchor == sigmas[-1]).all())
    # eps is the seeded noise of the row's seed
    from models.sampling import seeded_noise
    torch.testing.assert_close(batch.eps, seeded_noise(batch.seeds.tolist(), (2,)))


def test_same_settings_reuse_the_store_and_new_settings_make_a_new_one(out):
    config = tiny_config(out)
    first, _ = precompute(config, use_ray=False, progress=False)
    again, summary = precompute(config, use_ray=False, progress=False)
    assert summary.reused and again.root == first.root
    roots = {first.root}
    for change in (["loss.anchor_step=3"], ["teacher.guidance_scale=3.0"], ["trajectories.seed_offset=100"]):
        store, summary = precompute(tiny_config(out, *change), use_ray=False, progress=False)
        assert not summary.reused and store.root not in roots
        roots.add(store.root)
    # a run setting that does not touch the anchors shares the store, and so does a smaller size
    for change in ("loss.diversity_weight=0.0", "trajectories.seeds_per_prompt=8"):
        store, summary = precompute(tiny_config(out, change), use_ray=False, progress=False)
        assert summary.reused and store.root == first.root


def test_new_teacher_weights_make_a_new_store(out):
    store_a, _ = precompute(tiny_config(out), use_ray=False, progress=False)
    store_b, _ = precompute(tiny_config(out, "teacher.train.seed=1"), use_ray=False, progress=False)
    assert store_a.manifest["fingerprint"]["weights_sha256"] != store_b.manifest["fingerprint"]["weights_sha256"]
    assert store_a.root != store_b.root


def test_corrupt_and_missing_shards_are_named(tmp_path):
    config = tiny_config(tmp_path)
    store, _ = precompute(config, use_ray=False, progress=False)
    victim = store.shard_path(store.shards[2])
    data = Path(victim).read_bytes()
    Path(victim).write_bytes(data[:100] + bytes(len(data) - 100))  # same size, garbage inside
    with pytest.raises(StoreError, match="shard-00002.parquet"):
        store.verify(checksums=True)
    with pytest.raises(StoreError, match="shard-00002.parquet"):
        store.read_shard(store.shards[2])
    Path(victim).unlink()
    with pytest.raises(StoreError, match="shard-00002.parquet is missing"):
        open_store(store.fs, store.root)


def test_an_incomplete_store_is_refused(tmp_path):
    config = tiny_config(tmp_path)
    store, _ = precompute(config, use_ray=False, progress=False)
    Path(store.root, "manifest.json").unlink()
    with pytest.raises(StoreError, match="manifest.json is missing .*`dpdmd repair-store "):
        open_store(store.fs, store.root)
    with pytest.raises(StoreError, match="no complete trajectory store .*dpdmd precompute"):  # nothing there
        open_store(store.fs, str(tmp_path / "elsewhere"))


def test_killed_precompute_leaves_a_consistent_store_and_a_rerun_completes_it(tmp_path):
    tiny_config(tmp_path)  # train the teacher here, not in the subprocess
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO_SHARDS, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 17, proc.stderr
    root = next((tmp_path / "trajectories").iterdir())
    shards = sorted(root.glob("shard-*.parquet"))
    assert [p.name for p in shards] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not (root / "manifest.json").exists() and not list(root.glob("*.tmp"))
    for p in shards:
        assert pq.read_table(p).num_rows == 16  # whole shards only
    store, summary = precompute(tiny_config(tmp_path), use_ray=False, progress=False)
    assert summary.shards_written == 2 and store.num_rows == 64
    seeds = [s for shard in store.shards for s in store.read_shard(shard).column("seed").to_pylist()]
    assert sorted(seeds) == list(range(64))


def test_store_on_s3(tmp_path, s3_server):
    import boto3

    endpoint = s3_server.endpoint
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="anchors")
    overrides = ["storage.trajectory_root=s3://anchors/stores", f"storage.s3_endpoint_url={endpoint}"]
    config = tiny_config(tmp_path, *overrides)
    store, summary = precompute(config, use_ray=False, progress=False)
    assert store.root.startswith("anchors/stores/toy2d-") and store.num_rows == 64
    assert summary.rows == 64
    local, _ = precompute(tiny_config(tmp_path), use_ray=False, progress=False)
    a, b = next(store.batches(16, seed=3)), next(local.batches(16, seed=3))
    torch.testing.assert_close(a.z, b.z)
    _, again = precompute(config, use_ray=False, progress=False)
    assert again.reused
    assert "testing" not in str(store.manifest)


def test_store_batches_cover_each_rank_share_and_resume_position(out):
    store, _ = precompute(tiny_config(out), use_ray=False, progress=False)
    rank0 = next(store.batches(32, rank=0, world_size=2))
    rank1 = next(store.batches(32, rank=1, world_size=2))
    assert set(rank0.seeds.tolist()).isdisjoint(rank1.seeds.tolist())
    stream = store.batches(8, seed=1)
    first_three = [next(stream).seeds.tolist() for _ in range(3)]
    resumed = next(store.batches(8, start_row=16, seed=1)).seeds.tolist()
    assert resumed == first_three[2]


def test_the_store_holds_every_row_a_run_consumes_and_a_longer_run_extends_it(tmp_path):
    short = tiny_config(tmp_path, "trajectories.seeds_per_prompt=0")  # 4 updates x 8 rows: 2 shards of 16
    store, summary = precompute(short, use_ray=False, progress=False)
    assert store.num_rows == 32 and summary.shards_written == 2
    before = {s["name"]: (s["sha256"], Path(store.shard_path(s)).stat().st_mtime_ns) for s in store.shards}

    longer = tiny_config(tmp_path, "trajectories.seeds_per_prompt=0", "schedule.num_generator_updates=10")
    extended, summary = precompute(longer, use_ray=False, progress=False)
    assert extended.root == store.root and extended.num_rows == 80 and summary.shards_written == 3
    kept = {s["name"]: (s["sha256"], Path(extended.shard_path(s)).stat().st_mtime_ns) for s in extended.shards[:2]}
    assert kept == before  # the first shards were not rewritten
    seeds = [v for shard in extended.shards for v in extended.read_shard(shard).column("seed").to_pylist()]
    assert sorted(seeds) == list(range(80))
    # two ranks need whole shards each: 10 updates x 8 rows per rank
    _, two = precompute(longer, use_ray=False, progress=False, world_size=2)
    assert two.rows == 160


def test_a_run_reads_the_same_rows_and_makes_the_same_generator_after_another_run_extended_the_store(tmp_path):
    """Two runs of one config and seed made different generators when another run had extended the shared store
    in between: each rank read every shard the store held at the time, in an order drawn over their number."""
    import json

    from orchestrator.runs import distill_here
    from workers.train import GENERATOR_DIR

    config = tiny_config(tmp_path, "trajectories.seeds_per_prompt=0")
    store, _ = precompute(config, use_ray=False, progress=False)
    first = distill_here(config, tmp_path / "first", store, resume=False)
    longer = tiny_config(tmp_path, "trajectories.seeds_per_prompt=0", "schedule.num_generator_updates=10")
    extended, _ = precompute(longer, use_ray=False, progress=False)
    again_store, _ = precompute(config, use_ray=False, progress=False)  # the shared store as it is now
    assert again_store.root == store.root and len(again_store.shards) > len(store.shards)
    again = distill_here(config, tmp_path / "again", again_store, resume=False)

    weights = [sorted((p.relative_to(run.generator_dir).as_posix(), p.read_bytes())
                      for p in run.generator_dir.rglob("*.safetensors")) for run in (first, again)]
    assert weights[0] and weights[0] == weights[1]  # bit-identical
    records = [json.loads((run.run_dir / "data.json").read_text()) for run in (first, again)]
    assert records[0] == records[1]
    assert records[0]["store"] == store.root and (records[0]["shards"], records[0]["rows"]) == (2, 32)
    assert records[0]["world_size"] == 1 and (tmp_path / "first" / GENERATOR_DIR).is_dir()


def test_a_store_too_small_for_the_run_is_refused_before_training(tmp_path):
    from workers.context import LocalContext
    from workers.train import store_source, train

    store, _ = precompute(tiny_config(tmp_path), use_ray=False, progress=False)  # 64 rows
    config = tiny_config(tmp_path, "schedule.num_generator_updates=9")  # 72 anchor rows
    with pytest.raises(StoreError, match=r"holds 64 anchor rows .* need 72.*dpdmd precompute"):
        train(config, LocalContext(tmp_path / "run", resume=False), store_source(store), store.negative())
    assert not (tmp_path / "run" / "checkpoints").exists()
    # trajectories.max_reuse lets a run go over the same rows twice, on purpose
    reuse = tiny_config(tmp_path, "schedule.num_generator_updates=9", "trajectories.max_reuse=2")
    progress = train(reuse, LocalContext(tmp_path / "reuse", resume=False), store_source(store), store.negative())
    assert progress.generator_updates == 9


def test_generator_batches_never_repeat_a_row_and_ranks_never_share_one(tmp_path):
    config = tiny_config(tmp_path, "trajectories.seeds_per_prompt=0", "schedule.num_generator_updates=6")
    store, _ = precompute(config, use_ray=False, progress=False, world_size=2)
    seen = []
    for rank in (0, 1):
        stream = store.batches(8, rank, 2, seed=config.seed, max_epochs=1)
        for _ in range(6):
            batch = next(stream)
            seen += list(zip(batch.prompt_ids.tolist(), batch.seeds.tolist()))
    assert len(seen) == 96 and len(set(seen)) == 96
    with pytest.raises(StopIteration):  # one pass over the rank's rows, then the stream ends
        for _ in range(10):
            next(stream)


def test_precompute_prints_its_plan_first_and_one_line_per_interval_into_a_log(tmp_path):
    """`dpdmd precompute` started at once with nothing said of its size until a progress bar, which in a log file
    was one ever-growing line of carriage returns."""

    tiny_config(tmp_path)  # the teacher
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "precompute", "--no-ray", "--recipe", "toy2d",
                           *TINY_TEACHER, *TINY_STORE, *TINY_DISTILL, "trajectories.seeds_per_prompt=64",
                           f"storage.output_dir={tmp_path}"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    plan = console.index("[precompute] plan: 256 rows to compute, 16 shards of 16 (0 of 16 there already), into ")
    first = console.index("[precompute] first shard: 16 rows")
    assert plan < first and "the other 15 shards: about" in console
    assert "\r" not in proc.stderr  # a log, not a terminal: whole lines
    assert re.search(r"precompute anchors: 100%.*256/256", proc.stderr), proc.stderr


@pytest.mark.parametrize("command, key", [(["precompute", "--no-ray"], "trajectories.gpus_per_actor"),
                                          (["distill", "--no-ray"], "distributed.use_gpu")])
def test_a_gpu_recipe_without_a_gpu_is_refused_naming_the_cpu_overrides(tmp_path, capsys, command, key):
    """A recipe that asks for GPUs (the SD3.5 and SDXL ones) started on a machine without one, at CPU speed:
    with real weights, days."""
    from orchestrator import cli

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    tiny_config(tmp_path)  # the teacher
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = cli.main([*command, "--recipe", "toy2d", *TINY_TEACHER, *TINY_STORE, *TINY_DISTILL,
                     f"storage.output_dir={tmp_path}", f"{key}={'1' if 'gpus' in key else 'true'}"])
    err = capsys.readouterr().err
    assert code == 2 and key in err and "has none" in err and "Traceback" not in err
    assert "distributed.use_gpu=false trajectories.gpus_per_actor=0" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
