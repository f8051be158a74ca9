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


def _dashboard_url(gcs: int) -> str:
    """The address our head's dashboard actually bound, as recorded in its GCS. The dashboard moves to the
    next port when the asked one is taken, and on a shared machine a pre-chosen port may meanwhile belong
    to another process (another Ray, say, that answers with its own authentication rules)."""
    probe = ("import ray\n"
             f"ctx = ray.init(address='127.0.0.1:{gcs}', logging_level='ERROR', log_to_driver=False)\n"
             "print('URL=' + (ctx.dashboard_url or ''))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    urls = [line[4:] for line in out.stdout.splitlines() if line.startswith("URL=") and len(line) > 4]
    assert urls, f"the head's dashboard did not come up: {out.stdout[-2000:]}{out.stderr[-2000:]}"
    return urls[0] if urls[0].startswith("http") else f"http://{urls[0]}"


@pytest.fixture
def head(tmp_path):
    import ray

    ray.shutdown()  # no in-process cluster of another test may linger
    for attempt in range(3):  # a port chosen free may be taken before `ray start` binds it
        gcs, dashboard = _free_port(), _free_port()
        started = subprocess.run([RAY, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                                  f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
                                  "--disable-usage-stats"], capture_output=True, text=True)
        if started.returncode == 0:
            break
        subprocess.run([RAY, "stop", "--force"], capture_output=True)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield _dashboard_url(gcs)
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
