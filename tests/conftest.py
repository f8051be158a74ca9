import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
