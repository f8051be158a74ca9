import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A test's Ray node has nothing to drain when it is stopped; Ray's default waits up to 30 s for that on SIGTERM
os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for the tests of one module, shut down after them."""
    import ray

    from orchestrator.cluster import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


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
