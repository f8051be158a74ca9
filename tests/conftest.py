import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A test's Ray node has nothing to drain when it is stopped; Ray's default waits up to 30 s for that on SIGTERM
os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
# Ray Train's preemption watcher (an actor per run that polls for cloud nodes about to be taken away) has nothing to
# watch on a test's local node: about 1.6 CPU-seconds per run, 22 in the default test run
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test run (of this test process: pytest-xdist runs two), shut down at
    its end. Tests that run a command under Ray join it; starting one per module cost about 5 CPU-seconds each."""
    import ray

    from orchestrator.cluster import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture
def ray_env(ray_cluster):
    """What a `dpdmd` command run as a process of its own adds to its environment to join the test run's Ray
    cluster (RAY_ADDRESS, as `ray job submit` sets it) instead of starting one: about 10 CPU-seconds a command."""
    import ray

    return {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}


@pytest.fixture
def s3_server(monkeypatch):
    """A local S3 endpoint (moto) with test credentials in the environment: .endpoint, and .stop() for a test
    that must show nothing touches S3 any more (the fixture stops it otherwise)."""
    moto = pytest.importorskip("moto.server")
    from types import SimpleNamespace

    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    host, port = server.get_host_and_port()
    running = [True]

    def stop():
        if running[0]:
            running[0] = False
            server.stop()

    yield SimpleNamespace(endpoint=f"http://{host}:{port}", stop=stop)
    stop()


# The default run spreads whole modules over two processes (pyproject's addopts), each taking the next module as
# it finishes one. The longest start first, so that neither process is left with a long one at the end (their
# times: BENCHMARKS.md, "The test suite"); the rest keep their order.
LONGEST_FIRST = ("test_sweeps.py", "test_runs.py", "test_job_submit.py", "test_sd3.py", "test_sdxl.py",
                 "test_bench.py", "test_ray.py", "test_distill_local.py", "test_fidelity.py", "test_live_eval.py",
                 "test_store_repair.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
