"""Runs a user can trust and follow: hints instead of tracebacks for expected mistakes (with nothing left
behind), Ctrl-C that stops cleanly and says how to continue, `--resume` that finishes the run where it
stopped, and a console that is the project's, not Ray's."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY_DISTILL, TINY_STORE, TINY_TEACHER, tiny_config
from orchestrator.cli import main
from workers.context import checkpoint_name

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_TEACHER, *TINY_STORE, *TINY_DISTILL]
# What the libraries printed on a run's console: MLflow setting up its database (`dpdmd --verbose` shows it),
# DeepSpeed saying in every CPU process that trains that it found no GPU
LIBRARY_NOISE = ("Creating initial MLflow database tables", "Updating database tables", "Setting accelerator to CPU")


@pytest.mark.parametrize("no_ray", [False, True])
def test_a_missing_teacher_is_a_hint_and_leaves_nothing_behind(tmp_path, capsys, no_ray):
    code = main(["distill", *(["--no-ray"] if no_ray else []), "--recipe", "toy2d", *TINY,
                 f"storage.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "dpdmd train-teacher" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()

    empty = tmp_path / "empty-teacher"
    empty.mkdir()
    code = main(["distill", "--recipe", "toy2d", *TINY, f"storage.output_dir={tmp_path}", f"teacher.path={empty}"])
    err = capsys.readouterr().err
    assert code == 2 and "teacher.path" in err and "holds no weight files" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("command", ["precompute", "distill"])
def test_weights_without_a_pipeline_index_are_refused_before_the_store(tmp_path, capsys, command):
    """A directory of weights that is not a diffusers pipeline (no model_index.json) passed the weight-file check;
    `dpdmd precompute` then wrote the store's config.yaml and only the teacher's loading refused it."""
    weights = tmp_path / "weights-only"
    (weights / "transformer").mkdir(parents=True)
    (weights / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    code = main([command, "--no-ray", "--recipe", "sd35m", "distributed.use_gpu=false",
                 "trajectories.gpus_per_actor=0", f"trajectories.prompts={prompts}", f"evaluation.prompts={prompts}",
                 f"teacher.path={weights}", f"storage.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "model_index.json" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_generator_of_another_family_is_named_with_its_recipe(tmp_path, capsys):
    """The hint named `--recipe <family>`: right for toy2d and shapes, but no recipe is called sd3 or sdxl."""
    generator = tmp_path / "run" / "generator"
    generator.mkdir(parents=True)
    (generator / "dpdmd_generator.json").write_text(json.dumps({"family": "sd3", "num_steps": 4}))
    code = main(["sample", "--recipe", "shapes", "--generator", str(generator), f"storage.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "--generator" in err and "teacher.family is sd3" in err and "--recipe sd3" not in err
    (tmp_path / "run" / "config.yaml").write_text("teacher: {family: sd3}\n")  # its run directory's recipe
    code = main(["evaluate", "--recipe", "shapes", "--generator", str(generator), f"storage.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"--recipe {tmp_path / 'run' / 'config.yaml'}" in err
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_overrides_and_non_run_directories(tmp_path, capsys):
    assert main(["distill", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["sweep", "--resume", str(tmp_path / "missing")]) == 2  # its hint named `dpdmd distill`
    err = capsys.readouterr().err
    assert "`dpdmd sweep` printed" in err and "-sweep-" in err and "distill" not in err
    (tmp_path / "config.yaml").write_text("name: x\n")
    assert main(["distill", "--resume", str(tmp_path), "loss.diversity_weight=0.1"]) == 2
    assert "keeps the settings it started with" in capsys.readouterr().err
    assert main(["distill", "--resume", str(tmp_path), "--recipe", "shapes"]) == 2  # it went on with toy2d, silently
    assert "keeps the settings it started with (its config.yaml); drop --recipe shapes" in capsys.readouterr().err


def test_resume_refuses_another_commands_directory_and_names_its_command(tmp_path, capsys):
    """`distill --resume SWEEP_DIR` trained a new run inside the sweep's directory (exit 0); `sweep --resume
    RUN_DIR` of a distill run failed on a missing tune/tuner.pkl after reopening that run's MLflow run as FAILED."""
    sweep, run, early, demo = tmp_path / "sweep", tmp_path / "run", tmp_path / "early", tmp_path / "1-2-demo-toy2d"
    for d in (sweep / "tune", run / "checkpoints", early, demo / "sweep"):
        d.mkdir(parents=True)
    for d in (sweep, run, early, demo):
        (d / "config.yaml").write_text("name: x\n")
    assert main(["distill", "--resume", str(demo)]) == 2  # the demo has no command that continues it
    assert "a demo directory; continue it with `dpdmd demo` (a new run" in capsys.readouterr().err
    assert main(["distill", "--no-ray", "--resume", str(sweep)]) == 2
    assert f"a sweep directory; continue it with `dpdmd sweep --resume {sweep}`" in capsys.readouterr().err
    assert main(["sweep", "--resume", str(run)]) == 2
    assert f"a distill directory; continue it with `dpdmd distill --resume {run}`" in capsys.readouterr().err
    assert main(["sweep", "--resume", str(early)]) == 2
    assert "holds no Tune state (tune/)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["1-2-demo-toy2d", "checkpoints", "config.yaml",
                                                           "config.yaml", "config.yaml", "config.yaml", "early",
                                                           "run", "sweep", "sweep", "tune"]


def test_evaluate_refusing_a_prompt_leaves_no_run_directory(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("class 9\n")  # toy2d has classes 0-3
    code = main(["evaluate", "--recipe", "toy2d", f"evaluation.prompts={prompts}",
                 f"storage.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out" / "runs").exists(), err


def test_a_local_cluster_that_starts_too_slowly_is_one_line_naming_what_to_do(tmp_path, capsys, monkeypatch):
    """On a busy machine (load average 23) `dpdmd sweep --resume` ended in Ray's traceback: "The current node timed
    out during startup"; the same command again worked."""
    import ray

    def slow(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the Ray "
                        "processes failed to startup.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", slow)
    code = main(["sweep", "--recipe", "toy2d", f"storage.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1 and "did not start in time" in err and "run the command again" in err and "Traceback" not in err


def test_jobs_without_no_ray_is_refused_not_ignored(tmp_path, capsys):
    """`dpdmd fidelity --jobs 4` under Ray ran its trials as Tune allowed, the flag silently dropped."""
    assert main(["fidelity", "--recipe", "shapes", "--jobs", "4", "sweep.space=fidelity",
                 f"storage.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "--jobs" in err and "--no-ray" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def _interrupt_after_first_checkpoint(command: list[str], runs: Path, env: dict,
                                      run: str = "*") -> tuple[subprocess.CompletedProcess, Path]:
    """Start a dpdmd command, send it SIGINT once its first checkpoint is complete and registered (without Ray:
    the `latest` marker; under Ray Train: its checkpoint manager's record, written a moment after the files);
    its output and run dir. run: where a run's directory lies under runs (a sweep's trials: */*)."""
    def registered() -> bool:
        records = [*runs.glob(f"{run}/checkpoints/latest"),
                   *runs.glob(f"{run}/checkpoints/checkpoint_manager_snapshot.json")]
        return any("step-" in record.read_text() for record in records)

    # SIGINT as a terminal gives it: a test run started as a background job of a script (`scripts/dev test &`)
    # ignores SIGINT, Python keeps an ignored SIGINT ignored, and the command would run to its end
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and not registered():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(command, proc.returncode, out), next(runs.iterdir())


def _interrupt_mid_run(command_for, runs: Path, env: dict) -> tuple[subprocess.CompletedProcess, Path, int]:
    """_interrupt_after_first_checkpoint on command_for(updates), and the updates it ran for. 100 toy2d updates
    take about 2 s: a poller descheduled that long on a busy machine would send its SIGINT after the run had
    finished (its generator exported; without Ray it exits 0, under Ray the signal meets the process's teardown;
    both seen with a 4 s delay put before the signal). Then the run is made again, 10 times longer, in a fresh
    run directory."""
    for updates in (100, 1000):
        stopped, run_dir = _interrupt_after_first_checkpoint(command_for(updates), runs, env)
        if not (run_dir / "generator").is_dir():
            break
        shutil.rmtree(runs)
    return stopped, run_dir, updates


def _run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_ctrl_c_stops_cleanly_and_resume_finishes_the_same_run_without_ray(tmp_path, capsys):
    """Ctrl-C goes to a command in a process of its own; the resume and the rerun of a finished run call the same
    entry point here (as processes of their own, each paid again for importing torch, diffusers and DeepSpeed)."""
    tiny_config(tmp_path)  # the teacher
    overrides = [*TINY, f"storage.output_dir={tmp_path}", "schedule.checkpoint_every=10", "schedule.log_every=100"]
    dpdmd = [sys.executable, "-m", "orchestrator", "distill", "--no-ray"]
    stopped, run_dir, updates = _interrupt_mid_run(
        lambda updates: [*dpdmd, "--recipe", "toy2d", *overrides, f"schedule.num_generator_updates={updates}"],
        tmp_path / "runs", _env())
    assert stopped.returncode == 130, stopped.stdout[-3000:]
    assert "Setting accelerator to CPU" not in stopped.stdout, stopped.stdout[-3000:]  # DeepSpeed (LIBRARY_NOISE)
    last = stopped.stdout.strip().splitlines()[-1]
    assert "dpdmd: stopped; the last checkpoint is" in last and f"--resume {run_dir}" in last

    assert main(["distill", "--no-ray", "--resume", str(run_dir)]) == 0, capsys.readouterr()
    progress = json.loads((run_dir / "checkpoints" / checkpoint_name(updates) / "progress.json").read_text())
    assert progress["generator_updates"] == updates and progress["resumes"] == 1
    assert (progress["rows_consumed"], progress["prompt_rows_consumed"]) == (updates * 8, updates * 2 * 8)
    assert (run_dir / "generator" / "dpdmd_generator.json").is_file()
    capsys.readouterr()
    assert main(["distill", "--no-ray", "--resume", str(run_dir)]) == 0  # a finished run says so, does nothing
    assert "has finished already" in capsys.readouterr().out


def test_under_ray_ctrl_c_marks_the_mlflow_run_killed_and_resume_finishes_it_with_a_readable_console(tmp_path,
                                                                                                      ray_env):
    from mlflow.tracking import MlflowClient

    from orchestrator.precompute import precompute

    overrides = [*TINY, f"storage.output_dir={tmp_path}", "schedule.num_generator_updates=100",
                 "schedule.checkpoint_every=20", "schedule.log_every=50"]
    # the teacher and the store, made here (the actor pool's precompute has tests of its own): Ctrl-C is what
    # is tested
    precompute(tiny_config(tmp_path, *overrides[len(TINY):]), use_ray=False, progress=False)
    dpdmd = [sys.executable, "-m", "orchestrator", "distill"]
    env = {**_env(), **ray_env}
    stopped, run_dir, updates = _interrupt_mid_run(
        lambda updates: [*dpdmd, "--recipe", "toy2d", *overrides, f"schedule.num_generator_updates={updates}"],
        tmp_path / "runs", env)
    assert stopped.returncode == 130, stopped.stdout[-3000:]
    assert f"Continue with: dpdmd distill --resume {run_dir}" in stopped.stdout
    for noise in LIBRARY_NOISE:  # the command made the MLflow database, and its worker imported DeepSpeed on a CPU
        assert noise not in stopped.stdout, stopped.stdout[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"

    resumed = _run([*dpdmd, "--resume", str(run_dir)], env)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    console = (resumed.stdout + resumed.stderr).strip().splitlines()
    assert len(console) <= 40 and not any("TrainingReport(" in line for line in console), "\n".join(console)
    assert not [line for line in console for noise in LIBRARY_NOISE if noise in line], "\n".join(console)
    assert any(line.startswith(f"[distill] generator update {updates}/{updates}") for line in console)
    closing = "\n".join(console[-5:])
    for what in ("run directory:", "generator:", "MLflow run:"):
        assert what in closing
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["resumes"] >= 1
    assert run.data.metrics["generator_update"] == updates


def test_ctrl_c_stops_a_sweep_with_its_resume_line_and_the_resume_finishes_every_trial(tmp_path, ray_env):
    """Tune's own SIGINT handler ended fit() as if the sweep were done: the unfinished trials were reported as
    "stopped early by the none scheduler", the report was written and the command exited 0 (the demo printed
    "done"); before any trial had reported, collecting them raised a TypeError."""
    from orchestrator.precompute import precompute

    space = tmp_path / "space.yaml"
    space.write_text("loss.diversity_weight: {grid: [0.0, 0.5]}\n")
    overrides = [*TINY, f"storage.output_dir={tmp_path}", f"sweep.space={space}", "schedule.num_generator_updates=150",
                 "schedule.checkpoint_every=20", "schedule.log_every=100"]
    precompute(tiny_config(tmp_path, *overrides[len(TINY):]), use_ray=False, progress=False)  # the store, here
    dpdmd = [sys.executable, "-m", "orchestrator", "sweep"]
    env = {**_env(), **ray_env}
    stopped, sweep_dir = _interrupt_after_first_checkpoint([*dpdmd, "--recipe", "toy2d", *overrides],
                                                           tmp_path / "runs", env, run="*/*")
    assert stopped.returncode == 130, stopped.stdout[-3000:]
    assert f"Continue with: dpdmd sweep --resume {sweep_dir}" in stopped.stdout
    assert "of its trials are kept" in stopped.stdout  # it said "no checkpoint was written yet": the trials' were
    assert "stopped early" not in stopped.stdout and not (sweep_dir / "sweep.md").exists()
    resumed = _run([*dpdmd, "--resume", str(sweep_dir)], env)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    trials = sorted(p.parent.name for p in sweep_dir.glob("*/generator"))
    assert trials == ["diversity_weight=0", "diversity_weight=0.5"], resumed.stdout[-2000:]
    assert (sweep_dir / "sweep.md").is_file()


def test_the_console_shows_every_trials_progress_line_and_drops_rays_noise():
    """Two trials printing alike progress lines made Ray's driver fold them into one line with a "[repeated 2x
    across cluster] (Ray deduplicates logs by default...)" note, and Ray Train's controller printed an error-level
    line about its preemption watcher for every trial (both seen in the demo's console). Ray's own deduplicator,
    as the command configures it, passes both trials' lines and drops the noise."""
    script = """
import json
from orchestrator.cli import main
code = main(['distill', '--recipe', 'toy2d', 'no.such.key=1'])
from ray._private.ray_logging import stdout_deduplicator as dedup
lines = []
for pid in (101, 102):
    batch = {'ip': '10.0.0.1', 'pid': pid, 'lines': [
        '[distill] generator update 100/400 (25%), 0:08 elapsed, 0:24 left | loss_dmd=0.1344',
        "[2026-11-29 13:19:39,254 E 9373 9450] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
        "ID: 'b84787' has constructor arguments in the object store and max_restarts > 0.",
        "[2026-11-29 13:59:03,492 E 2229 2229] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
        "AnchorWriter))' and ID: 'f8265b' has constructor arguments in the object store and max_restarts > 0."]}
    lines += [line for out in dedup.deduplicate(batch) for line in out['lines']]
lines += [line for out in dedup.flush() for line in out['lines']]
print(json.dumps([code, lines]))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_DEDUP_LOGS")}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    code, lines = json.loads(out.stdout.splitlines()[-1])
    assert code == 2
    assert lines == ["[distill] generator update 100/400 (25%), 0:08 elapsed, 0:24 left | loss_dmd=0.1344"] * 2, lines


def test_sigterm_to_a_ray_driver_says_how_to_continue(tmp_path, ray_env):
    """`ray job stop` sends SIGTERM, which ray.init's handler turns into sys.exit(15) in the driver: the command
    ended without the line that says how to continue (Ctrl-C had it). Ray's native signal handler also arms a
    3-second abort alarm on SIGTERM, so a teardown slower than that (a busy machine, MLflow's last writes) ended
    in SIGABRT instead of the exit code; the atexit sleep below stands for such a teardown."""
    script = f"""
import atexit, os, signal, time, ray
from orchestrator.runs import stop_cleanly
ray.init()  # the test run's cluster, from RAY_ADDRESS
atexit.register(time.sleep, 4)
with stop_cleanly({str(tmp_path)!r}, "dpdmd distill --resume RUN"):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**_env(), **ray_env})
    assert proc.returncode == 128 + 15, proc.stderr[-3000:]
    assert "dpdmd: terminated; no checkpoint was written yet. Continue with: dpdmd distill --resume RUN" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
