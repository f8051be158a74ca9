"""Connecting to Ray: an existing cluster (RAY_ADDRESS, or inside `ray job submit`) or a local one."""

from __future__ import annotations

import os

# Every Ray worker process inherits these: passive OpenMP waiting (see cli.py) and no hub lookups.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
              "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def ensure_ray(object_store_gb: float = 1.0) -> None:
    """ray.init once: join the cluster named by RAY_ADDRESS if set (as `ray job submit` sets it), else start a
    small local one."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # ours are enough
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # reports in 0.2 s, not 2 s
    runtime_env = {"env_vars": WORKER_ENV}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=True)
    else:  # "local": a new cluster of our own, never one that another `ray start` on this machine left behind
        ray.init(address="local", include_dashboard=False, object_store_memory=int(object_store_gb * 2**30),
                 runtime_env=runtime_env, log_to_driver=True, configure_logging=True, logging_level="WARNING")
