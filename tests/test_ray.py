"""Integration on a local Ray cluster: the actor-pool precompute (an actor killed mid-way), 2-worker ZeRO-3 distillation logging to MLflow, a
worker killed mid-run that the run survives by resuming from its last checkpoint, and workers that find their own
cluster beside another Ray. (Two ZeRO-2 workers logging to an MLflow server over HTTP: test_job_submit.py.)"""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import own_ray_processes, tiny_config
from orchestrator.distill import check_cluster, run_distill
from orchestrator.precompute import precompute
from workers.config import ConfigError
from workers.evaluate import load_generator
from workers.tracking import tracking_uri

TWO_WORKERS = ["distributed.num_workers=2", "distributed.cpus_per_worker=0.5", "trajectories.cpus_per_actor=0.5"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The teacher and the store of the distillation here, made in this process (the actor pool's precompute is
    tested below, on a store of its own)."""
    path = tmp_path_factory.mktemp("ray")
    precompute(tiny_config(path, *TWO_WORKERS, "schedule.num_generator_updates=60"), use_ray=False, progress=False)
    return path


def test_the_cluster_check_refuses_what_does_not_fit(ray_cluster, out):
    import ray

    with pytest.raises(ConfigError, match="distributed.cpus_per_worker"):
        check_cluster(tiny_config(out, "distributed.num_workers=4", "distributed.cpus_per_worker=1"),
                      ray.cluster_resources())
    with pytest.raises(ConfigError, match="GPU"):
        check_cluster(tiny_config(out, "distributed.use_gpu=true"), ray.cluster_resources())


def _kill_a_worker_once(checkpoint: Path, killed: list):
    deadline = time.time() + 240
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.05)
    for proc in own_ray_processes("RayTrainWorker")[:1]:
        proc.kill()
        killed.append(proc.pid)


def test_zero3_workers_distill_and_a_killed_worker_resumes_from_the_last_checkpoint(ray_cluster, out, monkeypatch):
    """One run for three properties (each was a run of its own): two ZeRO-3 workers distil with lambda = 0.5 and
    log every log_every updates and the last one; a worker killed mid-run is restarted by Ray Train from the
    last checkpoint, and the run ends where an uninterrupted one would; secrets in the environment appear in
    none of the files the run writes, MLflow's database included."""
    from mlflow.tracking import MlflowClient

    secrets = {"AWS_SECRET_ACCESS_KEY": "planted-aws-secret", "AWS_SESSION_TOKEN": "planted-session-token",
               "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token", "HF_TOKEN": "planted-hf-token"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)

    config = tiny_config(out, *TWO_WORKERS, "distributed.zero_stage=3", "loss.diversity_weight=0.5",
                         "schedule.num_generator_updates=60", "schedule.checkpoint_every=10", "schedule.log_every=50",
                         "tracking.run_name=kill", "name=killed-run")
    runs = Path(config.storage.output_dir) / "runs"
    before = set(runs.glob("*")) if runs.exists() else set()
    killed: list[int] = []

    def watch():
        deadline = time.time() + 240
        while time.time() < deadline:
            found = [p for p in runs.glob("*-distill-killed-run") if p not in before] if runs.exists() else []
            if found:
                # once step 20 is being written, step 10 is a committed checkpoint to resume from
                return _kill_a_worker_once(found[0] / "checkpoints" / "step-0000020", killed)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = run_distill(config)
    watcher.join(timeout=5)
    assert killed, "no worker was killed"
    assert result.metrics["resumes"] >= 1
    assert result.metrics["generator_update"] == 60 and result.metrics["critic_updates"] == 120
    assert result.metrics["skipped_steps"] == 0
    adapter, net, sampler = load_generator(result.generator_dir)
    assert (result.run_dir / "config.yaml").is_file()
    assert sum(p.numel() for p in net.parameters()) > 0 and len(sampler.sigmas) == 5

    client = MlflowClient(tracking_uri(config))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.diversity_weight"] == "0.5"
    assert run.data.params["distributed.zero_stage"] == "3"
    # rank 0 logs every log_every updates, and the last one always (60 is not a multiple of 50)
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "loss_dmd")) == [50, 60]
    assert {"config.yaml", "generator"} <= {a.path for a in client.list_artifacts(result.run_id)}
    for path in (p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert not [v for v in secrets.values() if v.encode() in data], path


def test_an_actor_pool_precompute_survives_a_killed_actor_and_matches_the_in_process_writer(ray_cluster, tmp_path):
    """One precompute for two properties (each was one of its own): an actor of the pool killed mid-way is
    replaced, and the store completes without duplicates, shard for shard the bytes the in-process writer makes."""
    store_settings = ["trajectories.seeds_per_prompt=3000", "trajectories.rows_per_shard=500",
                      "trajectories.batch_size=500"]
    config = tiny_config(tmp_path, *store_settings, "trajectories.num_actors=2", "trajectories.cpus_per_actor=0.5")
    killed: list[int] = []

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            shards = list((tmp_path / "trajectories").glob("*/shard-*.parquet"))
            if len(shards) >= 3:
                for proc in own_ray_processes("AnchorWriter")[:1]:
                    proc.kill()
                    killed.append(proc.pid)
                    return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    store, summary = precompute(config, progress=False)
    watcher.join(timeout=5)
    assert killed, "no actor was killed"
    assert summary.rows == 12000 and len(store.shards) == 24
    seeds = [s for shard in store.shards for s in store.read_shard(shard).column("seed").to_pylist()]
    assert sorted(seeds) == list(range(12000))
    store.verify(checksums=True)
    local, _ = precompute(tiny_config(tmp_path, *store_settings, f"storage.trajectory_root={tmp_path / 'local'}"),
                          use_ray=False, progress=False)
    assert [s["sha256"] for s in store.shards] == [s["sha256"] for s in local.shards]


def test_every_worker_names_its_own_cluster_while_another_ray_runs_here(ray_cluster):
    """Ray's state API, called without an address from a worker (as Ray Train's placement-group cleaner asks
    about its controller), found two Rays on this machine and raised ConnectionError, uncaught: the cleaner's
    monitor died with a traceback on the console (seen with a `ray start` head beside a run, and with two test
    processes). Every worker now names its own cluster; the cleaner handles what the state API then raises."""
    import ray
    from ray.util.state.exception import RayStateApiException

    other = subprocess.Popen([sys.executable, "-c", "import ray, sys; ray.init(address='local', num_cpus=0, "
                              "include_dashboard=False); print('up', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout.readline().strip() == "up"

        @ray.remote(num_cpus=0)
        def ask_about(actor_id: str):
            import os

            from ray.train.v2._internal.state.util import is_actor_alive
            try:
                answer = repr(is_actor_alive(actor_id, timeout=5))
            except RayStateApiException as err:  # caught by the cleaner, which goes on watching
                answer = f"handled: {type(err).__name__}"
            except Exception as err:  # noqa: BLE001  (what killed the cleaner's thread)
                answer = f"unhandled: {err!r}"
            return os.environ.get("RAY_ADDRESS"), answer

        address, answer = ray.get(ask_about.remote("ff" * 16))
        assert address == ray.get_runtime_context().gcs_address
        assert not answer.startswith("unhandled"), answer
    finally:
        other.stdin.close()
        other.wait(timeout=60)
