"""`ray job submit` of a tiny distillation against a head started with `ray start --head`: two ZeRO-3 workers
that log to an MLflow tracking server over HTTP, one of them killed mid-run and the run resumed by Ray Train."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import TINY_DISTILL, TINY_STORE, TINY_TEACHER, mlflow_server, own_ray_processes, tiny_config

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
# Ray >= 2.60 turns token authentication on by itself when ~/.ray/auth_token exists; this loopback-only
# head and its clients agree on it being off, whatever an earlier Ray left in the home directory.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
# The head's raylet would start an idle worker per core for the first driver (the probe below), which no job with
# a working directory can use; our own local clusters do without them too (orchestrator/cluster.py)
HEAD_ENV = {**ENV, "RAY_prestart_worker_first_driver": "0"}
# Planted in the head's environment, which the job's driver and workers inherit: none of them may reach a file
# the run writes, MLflow's database included
SECRETS = {"AWS_SECRET_ACCESS_KEY": "planted-aws-secret", "AWS_SESSION_TOKEN": "planted-session-token",
           "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token", "HF_TOKEN": "planted-hf-token"}


def _port() -> int:
    """A free port below the kernel's ephemeral range and above Ray's worker ports (10002-19999), where
    other processes on a shared machine are least likely to take it before our head binds it: gRPC servers
    bind with SO_REUSEPORT, so a port taken meanwhile would be shared with someone else's server."""
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def _dashboard_url(gcs: int, head: subprocess.Popen, timeout: float = 120.0) -> str | None:
    """The address our head's dashboard bound, as its GCS records it, once the head answers; None if the
    head died or answered as someone else's cluster would (then the caller starts over on other ports)."""
    probe = ("import ray\n"
             f"ctx = ray.init(address='127.0.0.1:{gcs}', logging_level='ERROR', log_to_driver=False)\n"
             "print('URL=' + (ctx.dashboard_url or ''))\n")
    deadline = time.time() + timeout
    while time.time() < deadline and head.poll() is None:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=ENV)
        urls = [line[4:] for line in out.stdout.splitlines() if line.startswith("URL=") and len(line) > 4]
        if urls:
            return urls[0] if urls[0].startswith("http") else f"http://{urls[0]}"
        if "AuthenticationError" in out.stderr or "InvalidAuthToken" in out.stderr:
            return None
        time.sleep(2)
    return None


def _stop(head: subprocess.Popen) -> None:
    """Stop our head and only ours (`ray stop` would stop every Ray of this user on the machine)."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    address_file = Path("/tmp/ray/ray_current_cluster")  # `ray stop` removes it; a signal does not
    if address_file.is_file() and address_file.read_text().strip().endswith(f":{head.gcs_port}"):
        address_file.unlink(missing_ok=True)


def _checkout(target: Path) -> Path:
    """The files a clean checkout has (git's tracked and not-ignored ones), as a user would submit them: a
    developer's local build folders must not travel with the job. Without git, the tree as it is."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        return ROOT
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture
def head(tmp_path):
    for attempt in range(3):
        # the job agent's port too: every other Ray on the machine (this test process's own cluster, another test
        # process's) has an agent holding the default one, and the job agent then never serves
        gcs, dashboard, agent = _port(), _port(), _port()
        log = open(tmp_path / f"head-{attempt}.log", "w")
        proc = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
                                 "--num-cpus=2", "--include-dashboard=true",
                                 "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT,
                                env={**HEAD_ENV, **SECRETS})
        proc.gcs_port = gcs
        url = _dashboard_url(gcs, proc)
        if url:
            break
        _stop(proc)
    else:
        pytest.fail("no Ray head came up on three tries: " + (tmp_path / "head-2.log").read_text()[-3000:])
    try:
        yield SimpleNamespace(url=url, proc=proc)
    finally:
        _stop(proc)


def _kill_a_worker_once(head: subprocess.Popen, runs: Path, killed: list) -> None:
    """Once a run's step-20 checkpoint is being written (step 10 is then a committed one to resume from), kill one
    of its Ray Train workers: a process of our head's node, not of another Ray on the machine."""
    deadline = time.time() + 300
    while time.time() < deadline and not list(runs.glob("*-distill-killed-run/checkpoints/step-0000020")):
        time.sleep(0.05)
    for proc in own_ray_processes("RayTrainWorker", head.pid)[:1]:
        proc.kill()
        killed.append(proc.pid)


def test_our_runtime_environment_steps_aside_for_what_the_job_sets():
    """Ray merges a submitted job's runtime environment with the one ray.init asks for, and refuses any key both
    set, an environment variable such as HF_HUB_OFFLINE included."""
    from ray.runtime_env.runtime_env import _merge_runtime_env  # as ray.init runs it inside a job

    from orchestrator.cluster import beside_the_job

    ours = {"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}, "worker_process_setup_hook": "x"}
    job = {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "0", "MINE": "1"}, "working_dir": "."}}
    assert _merge_runtime_env(job["runtime_env"], ours) is None  # ours as it was: refused
    merged = _merge_runtime_env(job["runtime_env"], beside_the_job(ours, json.dumps(job)))
    assert merged["env_vars"] == {"HF_HUB_OFFLINE": "0", "MINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert merged["worker_process_setup_hook"] == "x" and merged["working_dir"] == "."
    assert beside_the_job(ours, "") == ours  # not inside a job


def test_inside_a_job_the_resume_hint_is_a_job(monkeypatch):
    """After a job stopped, the hint to continue it was a local command."""
    from orchestrator.cluster import as_a_job

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert as_a_job("dpdmd distill --resume /runs/x") == "dpdmd distill --resume /runs/x"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    hint = as_a_job("dpdmd distill --resume /runs/x")
    assert hint.startswith("ray job submit --address ") and "--working-dir . --" in hint
    assert hint.endswith(f"-- {sys.executable} -m orchestrator distill --resume /runs/x")


def test_job_submit_distils_on_two_zero3_workers_survives_a_killed_one_and_logs_to_an_mlflow_server(head, tmp_path):
    """One run for six properties (each was a run of its own): `ray job submit` runs a tiny distillation; two
    ZeRO-3 workers distil with lambda = 0.5 and export a generator that loads; a worker killed mid-run is restarted
    by Ray Train from the last checkpoint, and the run ends where an uninterrupted one would; rank 0 logs params,
    metrics every log_every updates and at the last one, and the artifacts to an MLflow tracking server over HTTP;
    secrets in the environment appear in none of the files the run writes, the server's database included."""
    from mlflow.tracking import MlflowClient

    from orchestrator.precompute import precompute
    from workers.evaluate import load_generator

    two_zero3 = ["distributed.num_workers=2", "distributed.cpus_per_worker=0.5", "distributed.zero_stage=3",
                 "loss.diversity_weight=0.5", "schedule.num_generator_updates=40", "schedule.checkpoint_every=10",
                 "schedule.log_every=30", "name=killed-run"]
    # the teacher and the trajectory store the job will use, made here: the actor pool's precompute has tests of
    # its own (test_ray.py)
    config = tiny_config(tmp_path, *two_zero3)
    precompute(config, use_ray=False, progress=False)
    server, uri = mlflow_server(tmp_path)
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_a_worker_once, args=(head.proc, tmp_path / "runs", killed), daemon=True)
    watcher.start()
    try:
        overrides = [*TINY_TEACHER, *TINY_STORE, *TINY_DISTILL, f"storage.output_dir={tmp_path}", *two_zero3,
                     f"tracking.tracking_uri={uri}", "tracking.experiment=server-test"]
        # the job's own environment variables beside the project's (one of them the project sets too): Ray refused
        # to merge them and the job died before it started
        runtime_env = {"excludes": [".venv", "outputs", ".git", "*.egg-info"],
                       "env_vars": {"HF_HUB_OFFLINE": "1", "DPDMD_JOB_MARK": "kept"}}
        working_dir = _checkout(tmp_path / "checkout")
        for _ in range(30):  # a fresh head's job agent registers a little after its dashboard answers
            proc = subprocess.run(
                [RAY, "job", "submit", "--address", head.url, "--working-dir", str(working_dir),
                 "--runtime-env-json", json.dumps(runtime_env), "--",
                 sys.executable, "-m", "orchestrator", "distill", "--recipe", "toy2d", *overrides],
                capture_output=True, text=True, timeout=600, env=ENV)
            if "No available agent to submit job" not in proc.stderr:
                break
            time.sleep(2)
        watcher.join(timeout=5)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout
        assert killed, "no worker was killed"
        (run_dir,) = (tmp_path / "runs").glob("*-distill-killed-run")
        assert (run_dir / "generator" / "dpdmd_generator.json").is_file() and (run_dir / "config.yaml").is_file()
        adapter, net, sampler = load_generator(run_dir / "generator")
        assert sum(p.numel() for p in net.parameters()) > 0 and len(sampler.sigmas) == 5

        client = MlflowClient(uri)
        run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["resumes"] >= 1
        assert (run.data.metrics["generator_update"], run.data.metrics["critic_updates"]) == (40, 80)
        assert run.data.metrics["skipped_steps"] == 0
        assert run.data.params["loss.diversity_weight"] == "0.5"
        assert run.data.params["distributed.zero_stage"] == "3"
        assert run.data.params["loss.anchor_step"] == str(config.loss.anchor_step)
        # rank 0 logs every log_every updates, and the last one always (40 is not a multiple of 30); the worker
        # was killed at update 20, so neither was logged twice
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss_dmd")) == [30, 40]
        assert len(client.get_metric_history(run_id, "loss_critic")) == 2
        assert {"config.yaml", "generator"} <= {a.path for a in client.list_artifacts(run_id)}
        assert list((tmp_path / "artifacts").rglob("dpdmd_generator.json"))  # stored by the server
    finally:
        server.terminate()
        server.wait(timeout=30)
    for path in (p for p in tmp_path.rglob("*") if p.is_file() and "checkout" not in p.relative_to(tmp_path).parts):
        data = path.read_bytes()
        assert not [v for v in SECRETS.values() if v.encode() in data], path


def test_the_workers_quiet_the_libraries_unless_the_user_set_them(monkeypatch):
    """Ray workers get the project's quiet library settings in their runtime environment, which overrides what
    they inherit: a user's own MLFLOW_LOGGING_LEVEL (or diffusers' verbosity) was lost in the workers."""
    from orchestrator import cluster

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")
    env = cluster.worker_env()
    assert env["MLFLOW_LOGGING_LEVEL"] == "WARNING" and env["TRANSFORMERS_VERBOSITY"] == "error"
    assert env["DIFFUSERS_VERBOSITY"] == "info"
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "DEBUG")
    assert cluster.worker_env()["MLFLOW_LOGGING_LEVEL"] == "DEBUG"
    monkeypatch.setattr(cluster, "VERBOSE", True)
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL")
    assert "MLFLOW_LOGGING_LEVEL" not in cluster.worker_env()
