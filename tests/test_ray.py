"""Integration on a local Ray cluster: the cluster check, the actor-pool precompute (an actor killed mid-way), and
workers that find their own cluster beside another Ray. (Two ZeRO-3 workers under `ray job submit`, one of them
killed mid-run, logging to an MLflow server over HTTP: test_job_submit.py.)"""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import own_ray_processes, tiny_config
from orchestrator.distill import check_cluster
from orchestrator.precompute import precompute
from workers.config import ConfigError


def test_the_cluster_check_refuses_what_does_not_fit(ray_cluster, tmp_path):
    import ray

    with pytest.raises(ConfigError, match="distributed.cpus_per_worker"):
        check_cluster(tiny_config(tmp_path, "distributed.num_workers=4", "distributed.cpus_per_worker=1"),
                      ray.cluster_resources())
    with pytest.raises(ConfigError, match="GPU"):
        check_cluster(tiny_config(tmp_path, "distributed.use_gpu=true"), ray.cluster_resources())
    # bf16 without ZeRO was refused here as unsupported on CPUs, yet it trains there (tests/test_precision.py)
    check_cluster(tiny_config(tmp_path, "distributed.precision=bf16", "distributed.zero_stage=0"), ray.cluster_resources())
    # an actor pool whose actor is larger than the cluster waited for it for ever, printing Ray's autoscaler line
    with pytest.raises(ConfigError, match=r"trajectories.cpus_per_actor: one precompute actor asks for 64 CPUs"):
        precompute(tiny_config(tmp_path, "trajectories.cpus_per_actor=64"), use_ray=True, progress=False)
    assert not list(tmp_path.glob("trajectories/*/*"))  # nothing written


def test_an_actor_pool_precompute_survives_a_killed_actor_and_matches_the_in_process_writer(ray_cluster, tmp_path):
    """One precompute for two properties (each was one of its own): an actor of the pool killed mid-way is
    replaced, and the store completes without duplicates, shard for shard the bytes the in-process writer makes."""
    store_settings = ["trajectories.seeds_per_prompt=1500", "trajectories.rows_per_shard=500",
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
    assert summary.rows == 6000 and len(store.shards) == 12
    seeds = [s for shard in store.shards for s in store.read_shard(shard).column("seed").to_pylist()]
    assert sorted(seeds) == list(range(6000))
    store.verify(checksums=True)
    local, _ = precompute(tiny_config(tmp_path, *store_settings, f"storage.trajectory_root={tmp_path / 'local'}"),
                          use_ray=False, progress=False)
    assert [s["sha256"] for s in store.shards] == [s["sha256"] for s in local.shards]


ROOT = Path(__file__).resolve().parents[1]
# Another run's local cluster on this machine, started as a dpdmd command starts it; once up, it says how many idle
# worker processes its raylet runs, counted after Ray has had time to start any for this, its first driver
ANOTHER_RUN = """
import sys, time
sys.path.insert(0, "tests")
from helpers import own_ray_processes
from orchestrator.cluster import ensure_ray
ensure_ray()
time.sleep(3)
print("up idle", len(own_ray_processes("ray::IDLE") + own_ray_processes("default_worker.py")), flush=True)
sys.stdin.read()
"""


def test_every_worker_names_its_own_cluster_while_another_ray_runs_here(ray_cluster):
    """Ray's state API, called without an address from a worker (as Ray Train's placement-group cleaner asks
    about its controller), found two Rays on this machine and raised ConnectionError, uncaught: the cleaner's
    monitor died with a traceback on the console (seen with a `ray start` head beside a run, and with two test
    processes). Every worker now names its own cluster; the cleaner handles what the state API then raises."""
    import ray
    from ray.util.state.exception import RayStateApiException

    other = subprocess.Popen([sys.executable, "-c", ANOTHER_RUN], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        # Also: a cluster the project starts runs no idle workers it will never use. Ray started one per core for
        # the first driver, without the runtime environment that every task and actor of ours has, so none of
        # them ever ran one: two processes here, one per core of a large machine.
        assert other.stdout.readline().split() == ["up", "idle", "0"]

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
