"""Shared test settings: a tiny toy2d teacher that trains in about a second."""

from pathlib import Path

import pytest

from orchestrator.recipe import resolve
from workers.teacher import embedded_teacher_dir, train_teacher

TINY_TEACHER = ["teacher.train.steps=150", "teacher.train.width=64", "teacher.train.batch_size=256",
                "teacher.train.lr=3e-3"]
TINY_STORE = ["trajectories.seeds_per_prompt=16", "trajectories.rows_per_shard=16", "trajectories.batch_size=8"]
TINY_DISTILL = ["schedule.num_generator_updates=4", "schedule.critic_updates_per_generator=2",
                "schedule.checkpoint_every=2", "schedule.log_every=1", "distributed.batch_size_per_worker=8",
                "generator.optim.lr=1e-3", "critic.optim.lr=1e-3"]


def own_ray_processes(title: str, head_pid: int | None = None) -> list:
    """This process's Ray cluster's worker processes whose title contains `title` (as psutil.Process), or those of
    the `ray start` head with pid head_pid: a test that kills one must not hit another Ray on the same machine
    (the other pytest-xdist process's cluster, or this one's)."""
    import psutil
    import ray

    if head_pid is None:
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
        candidates = psutil.Process(raylet).children()
    else:
        candidates = psutil.Process(head_pid).children(recursive=True)
    found = []
    for proc in candidates:
        try:
            if any(title in part for part in proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # it ended meanwhile
            pass
    return found


def train_each_alone(configs, out: Path, store, save=lambda index: False) -> list[list[dict]]:
    """Each config trained by workers.train.train on its own from store, in out/alone<i>: every cycle's metrics
    per config (what trials trained together are compared with). save(i): whether run i writes checkpoints."""
    from workers.context import LocalContext
    from workers.train import store_source, train

    alone = []
    for i, config in enumerate(configs):
        seen: list[dict] = []
        train(config, LocalContext(out / f"alone{i}"), store_source(store), store.negative(),
              on_cycle=lambda progress, metrics: seen.append(dict(metrics)), save=save(i))
        alone.append(seen)
    return alone


def tiny_config(out: Path, *overrides: str):
    """A resolved toy2d config under out whose tiny teacher exists (trained once per out directory)."""
    config = resolve("toy2d", [*TINY_TEACHER, *TINY_STORE, *TINY_DISTILL, f"storage.output_dir={out}", *overrides])
    if not embedded_teacher_dir(config).is_dir():
        train_teacher(config, progress=False)
    return config


def mlflow_server(tmp_path: Path):
    """A real MLflow tracking server on a free local port, its artifacts under tmp_path: (process, uri)."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              # no job runner: its seven consumer processes cost 16 CPU-seconds and run nothing here
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    return server, uri


def same_loss(ours: float, theirs: float, cycle: int, config) -> bool:
    """A loss of trials trained together against train's for the same trial (config) and cycle. The same computation
    in another order: float32 rounding apart, rel 1e-6 to 1e-5. A trial whose first step is in the gradient (DMD and
    the baselines: no stop-gradient) drifts more from its first generator update on: AdamW's first steps are about
    lr * sign(g), so a near-zero gradient element whose rounding flips its sign moves a whole step. Measured on a DMD
    trial, its losses after it drift by up to 2e-4, and by 1e-6 under an optimizer whose step follows the gradient
    (AdamW at eps = 1): rel 1e-3 for those, 1e-4 for every other."""
    loose = cycle > 0 and not config.loss.first_step_detached
    return ours == pytest.approx(theirs, rel=1e-3 if loose else 1e-4, abs=1e-6)
