"""Integration on a local Ray cluster: the actor-pool precompute, 2-worker ZeRO-2/3 distillation, and a
worker killed mid-run that the run survives by resuming from its last checkpoint."""

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers import tiny_config
from orchestrator.distill import check_cluster, run_distill
from orchestrator.precompute import precompute
from workers.config import ConfigError
from workers.evaluate import load_generator
from workers.tracking import tracking_uri

TWO_WORKERS = ["distributed.num_workers=2", "distributed.cpus_per_worker=0.5", "trajectories.cpus_per_actor=0.5"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray")
    tiny_config(path)
    return path


def test_precompute_with_an_actor_pool_matches_the_in_process_writer(ray_cluster, out, tmp_path):
    pooled, summary = precompute(tiny_config(out, "trajectories.num_actors=2", *TWO_WORKERS[2:]), progress=False)
    assert summary.rows == 64 and summary.shards_written == 4
    local, _ = precompute(tiny_config(out, f"storage.trajectory_root={tmp_path}"), use_ray=False, progress=False)
    assert [s["sha256"] for s in pooled.shards] == [s["sha256"] for s in local.shards]


@pytest.mark.parametrize("zero_stage,weight,log_every", [(2, 0.0, 1), (3, 0.5, 10)])
def test_two_workers_distill(ray_cluster, out, zero_stage, weight, log_every):
    config = tiny_config(out, *TWO_WORKERS, f"distributed.zero_stage={zero_stage}", f"loss.diversity_weight={weight}",
                         f"schedule.log_every={log_every}")
    result = run_distill(config)
    assert result.metrics["generator_update"] == 4 and result.metrics["critic_updates"] == 8
    assert result.metrics["skipped_steps"] == 0
    adapter, net, sampler = load_generator(result.generator_dir)
    assert (result.run_dir / "config.yaml").is_file()
    assert sum(p.numel() for p in net.parameters()) > 0 and len(sampler.sigmas) == 5

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(config))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.diversity_weight"] == str(weight)
    assert run.data.params["distributed.zero_stage"] == str(zero_stage)
    history = client.get_metric_history(result.run_id, "loss_dmd")
    # rank 0 logs every log_every updates, and the last one always: a run shorter than log_every logs too
    assert sorted(m.step for m in history) == ([1, 2, 3, 4] if log_every == 1 else [4])
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "generator"} <= artifacts


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
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
            os.kill(proc.info["pid"], signal.SIGKILL)
            killed.append(proc.info["pid"])
            return


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_cluster, out):
    config = tiny_config(out, *TWO_WORKERS, "schedule.num_generator_updates=60", "schedule.checkpoint_every=10",
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


def test_a_two_trial_sweep_nests_its_runs_in_mlflow(ray_cluster, out):
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import run_sweep
    from workers.configure import to_dict

    config = tiny_config(out, "distributed.cpus_per_worker=0.5", "evaluation.seeds_per_prompt=20",
                         "sweep.space=lambda", "tracking.experiment=sweep-test")
    result = run_sweep(config, to_dict(config))
    assert sorted(r["params"]["loss.diversity_weight"] for r in result.rows) == [0.0, 0.5]
    assert result.front and 0 <= result.picked < 2
    assert (result.sweep_dir / "pareto.png").stat().st_size > 1000
    client = MlflowClient(tracking_uri(config))
    children = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["loss.diversity_weight"] in ("0.0", "0.5")
        assert {"loss_dmd", "eval_mode_kl", "eval_off_mode_rate"} <= child.data.metrics.keys()
        assert {"config.yaml", "generator", "samples.png"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
    parent_artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"sweep.md", "pareto.png"} <= parent_artifacts
    parent_metrics = client.get_run(result.parent_run_id).data.metrics
    assert parent_metrics and all(k.startswith(("picked_eval_", "picked_diversity", "picked_quality"))
                                  for k in parent_metrics)  # the objectives, none of Tune's bookkeeping

    # A second sweep in the same output directory trains its own trials: nothing of the first one (same trial
    # names, more updates) is picked up.
    shorter = tiny_config(out, "distributed.cpus_per_worker=0.5", "evaluation.seeds_per_prompt=20",
                          "schedule.num_generator_updates=2", "tracking.experiment=sweep-test")
    again = run_sweep(shorter, to_dict(shorter), space={"loss.diversity_weight": {"grid": [0.0]}})
    assert again.sweep_dir != result.sweep_dir
    assert [r["generator_update"] for r in again.rows] == [2]


def test_distill_logs_to_a_real_mlflow_server(ray_cluster, out, tmp_path):
    import socket
    import subprocess
    import sys
    import urllib.request

    from mlflow.tracking import MlflowClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        config = tiny_config(out, f"tracking.tracking_uri={uri}", "tracking.experiment=server-test")
        result = run_distill(config)
        client = MlflowClient(uri)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED" and run.data.params["loss.anchor_step"] == str(config.loss.anchor_step)
        assert len(client.get_metric_history(result.run_id, "loss_critic")) == 4
        assert "generator" in {a.path for a in client.list_artifacts(result.run_id)}
        assert list((tmp_path / "artifacts").rglob("dpdmd_generator.json"))
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_killed_precompute_actor_is_replaced_and_the_store_completes_without_duplicates(ray_cluster, tmp_path):
    config = tiny_config(tmp_path, "trajectories.seeds_per_prompt=3000", "trajectories.rows_per_shard=500",
                         "trajectories.batch_size=500", "trajectories.num_actors=1", "trajectories.cpus_per_actor=0.5")
    killed: list[int] = []

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            shards = list((tmp_path / "trajectories").glob("*/shard-*.parquet"))
            if len(shards) >= 3:
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if any("AnchorWriter" in part for part in proc.info["cmdline"] or []):
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        killed.append(proc.info["pid"])
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
