"""`ray job submit` of a tiny distillation against a head started with `ray start --head`."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_DISTILL, TINY_STORE, TINY_TEACHER, tiny_config

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    import ray

    ray.shutdown()  # no in-process cluster of another test may linger
    gcs, dashboard = _free_port(), _free_port()
    subprocess.run([RAY, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
                    "--disable-usage-stats"], check=True, capture_output=True, text=True)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)


def test_job_submit_runs_a_tiny_distillation(head, tmp_path):
    tiny_config(tmp_path)  # the teacher the job will use
    overrides = [*TINY_TEACHER, *TINY_STORE, *TINY_DISTILL, f"storage.output_dir={tmp_path}",
                 "distributed.num_workers=2", "distributed.cpus_per_worker=0.5", "trajectories.cpus_per_actor=0.5"]
    runtime_env = {"excludes": [".venv", "outputs", ".git", "*.egg-info"]}
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", head, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--",
         sys.executable, "-m", "orchestrator", "distill", "--recipe", "toy2d", *overrides],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    exported = list((tmp_path / "runs").glob("*-distill-toy2d/generator/dpdmd_generator.json"))
    assert len(exported) == 1
