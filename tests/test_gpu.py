"""The GPU check (`scripts/dev gpu`): every command a user runs on a GPU, short, end to end, as a new process of
`dpdmd` (`python -m orchestrator`) without Ray or an MLflow server, the way the README runs them on one GPU: the
shapes domain's precompute, distillation in bf16 and fp32, sampling, evaluation and both ways of running the
fidelity table (trials trained together, and a process per trial), each stopped and continued; the earlier
remedies (loss.method dmd-regression, dmd-gan) trained together and alone, and the regression on SD3 through
LPIPS on decoded images; the SD3 and SDXL
families on tiny random pipelines built in code (precompute, distillation with the teacher streamed from host
memory, compiled blocks and activation checkpointing (for SD3 the kind that keeps attention outputs), export, the
diffusers pipeline class loading the export, sampling, evaluation); and the SD3.5-Medium benchmark at two blocks.
Marked gpu: skipped on machines without CUDA (CI)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU check needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
SD_PROMPTS = ["a photo of a red cat", "a painting of a blue house", "a green tree in the snow", "a dog"]
# A few updates of everything, on the GPU; the shapes teacher is the shipped one
SHAPES = ["--recipe", "shapes", "distributed.use_gpu=true", "trajectories.gpus_per_actor=1",
          "schedule.num_generator_updates=4", "schedule.checkpoint_every=2", "schedule.log_every=2",
          "evaluation.seeds_per_prompt=2"]


def dpdmd(*args: str, out: Path, expect: int = 0, timeout: float = 240) -> str:
    """Run `python -m orchestrator ARGS storage.output_dir=OUT` as a user would (ARGS: the command, its options,
    then the recipe and its overrides); its console output. A command still running after timeout seconds is
    stopped with SIGABRT, so that Python's fault handler prints where every thread of it was."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args, f"storage.output_dir={out}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                                 "PYTHONFAULTHANDLER": "1"})
    start = time.perf_counter()
    try:
        console, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        console, _ = proc.communicate()
        pytest.fail(f"`dpdmd {args[0]}` still running after {timeout:.0f} s; where it was:\n{console[-6000:]}")
    print(f"dpdmd {args[0]}: {time.perf_counter() - start:.1f} s")  # shown with -s, and with a failure
    assert proc.returncode == expect, f"exit code {proc.returncode}:\n{console[-4000:]}"
    return console


def run_dir(out: Path, command: str, recipe: str) -> Path:
    """The newest run directory of a command."""
    return sorted((out / "runs").glob(f"*-{command}-{recipe}"))[-1]


@pytest.fixture(scope="module")
def shapes_out(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-shapes")


# The check runs its tests side by side (scripts/dev gpu: pytest -n 4 --dist loadgroup); the tests that share
# the precomputed shapes store run in one process, in this order
SHARES_THE_STORE = pytest.mark.xdist_group("shapes-store")


@SHARES_THE_STORE
def test_shapes_precompute_on_the_gpu(shapes_out):
    console = dpdmd("precompute", "--no-ray", *SHAPES, out=shapes_out)
    assert "rows in" in console and list((shapes_out / "trajectories").glob("shapes-*/manifest.json"))


@SHARES_THE_STORE
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_shapes_distill_sample_and_evaluate_on_the_gpu(shapes_out, precision):
    """Distillation in both precisions; sampling and evaluation once (the fidelity table evaluates fp32 trials)."""
    out = shapes_out / precision
    dpdmd("distill", "--no-ray", *SHAPES, f"distributed.precision={precision}",
          f"storage.trajectory_root={shapes_out / 'trajectories'}", out=out)
    generator = run_dir(out, "distill", "shapes") / "generator"
    metrics = [json.loads(line) for line in (generator.parent / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["generator_update"] == 4 and metrics[-1]["skipped_steps"] == 0
    if precision == "fp32":
        return
    console = dpdmd("sample", "--generator", str(generator), "--prompt", "a red circle", "--seeds", "0-3", *SHAPES,
                    out=out)
    assert "4 samples" in console
    console = dpdmd("evaluate", "--generator", str(generator), *SHAPES, out=out)
    assert "| generator |" in console
    evaluated = json.loads((run_dir(out, "evaluate", "shapes") / "metrics.json").read_text())["generator"]
    assert 0 <= evaluated["adherence"] <= 1 and evaluated["attribute_spread"] > 0


def _space(path: Path) -> Path:
    """Two trials: the table's smallest space (DMD over two training seeds)."""
    path.write_text("loss.diversity_weight: {grid: [0.0]}\nseed: {grid: [0, 1]}\n")
    return path


def test_shapes_fidelity_trials_trained_together_stop_at_the_time_limit_and_continue(tmp_path):
    """The README's one-GPU table command (--together, --time-limit, fp32), two trials: stopped at the time limit,
    then the same command with --out continues them to the table."""
    command = ["fidelity", "--no-ray", "--together", "2", "--time-limit", "0.05", *SHAPES,
               "distributed.precision=fp32", "schedule.num_generator_updates=40", "schedule.checkpoint_every=10",
               f"sweep.space={_space(tmp_path / 'space.yaml')}"]
    console = dpdmd(*command, out=tmp_path)
    assert "stopped at the time limit" in console, console[-3000:]
    table_dir = run_dir(tmp_path, "fidelity", "shapes")
    assert not (table_dir / "fidelity.md").exists()
    console = dpdmd(*command[:5], "60", "--out", str(table_dir), *command[6:], out=tmp_path)
    assert "| DMD | 2 |" in console and (table_dir / "fidelity.md").is_file()
    assert len(list((table_dir / "trials").glob("*/generator/dpdmd_generator.json"))) == 2
    assert len(list((table_dir / "trials").glob("*/data.json"))) == 2  # the rows each trial read


def test_shapes_fidelity_a_process_per_trial_and_a_rerun_runs_nothing_twice(tmp_path):
    command = ["fidelity", "--no-ray", "--jobs", "2", *SHAPES, "distributed.precision=bf16",
               f"sweep.space={_space(tmp_path / 'space.yaml')}"]
    console = dpdmd(*command, out=tmp_path)
    assert "| DMD | 2 |" in console
    table_dir = run_dir(tmp_path, "fidelity", "shapes")
    console = dpdmd(*command[:4], "--out", str(table_dir), *command[4:], out=tmp_path)
    assert "2 already done, 0 to run" in console and "| DMD | 2 |" in console


def test_shapes_baselines_trained_together_and_alone_on_the_gpu(tmp_path):
    """The two earlier remedies (loss.method dmd-regression, dmd-gan) beside DMD: the methods table's kind of space
    with trials trained together (fp32, grouped by method), then a dmd-gan run alone in bf16 (DeepSpeed, the GAN
    head in the critic's engine) from the same store of the teacher's samples."""
    space = tmp_path / "methods.yaml"
    space.write_text("loss.method: {grid: [dmd, dmd-regression, dmd-gan]}\nseed: {grid: [0, 1]}\n")
    console = dpdmd("fidelity", "--no-ray", "--together", "2", *SHAPES, "distributed.precision=fp32",
                    f"sweep.space={space}", out=tmp_path)
    for name in ("DMD", "DMD + regression", "DMD + GAN"):  # a row per method, the picked one marked
        assert re.search(rf"^\| {re.escape(name)}( \*\*picked\*\*)? \| 2 \|", console, re.M), console[-3000:]
    out = tmp_path / "gan"
    dpdmd("distill", "--no-ray", *SHAPES, "distributed.precision=bf16", "loss.method=dmd-gan",
          f"storage.trajectory_root={tmp_path / 'trajectories'}", out=out)
    metrics = [json.loads(line) for line in (run_dir(out, "distill", "shapes") / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["generator_update"] == 4 and metrics[-1]["skipped_steps"] == 0
    assert all(math.isfinite(metrics[-1][k]) for k in ("loss_gan", "loss_gan_critic", "loss_dmd"))


def _pretrained_family(tmp_path: Path, family: str) -> tuple[list[str], type]:
    """The family's 512 px recipe on a tiny random pipeline saved to disk (its own resolution), a few prompts,
    one GPU, a few updates: the command's arguments, and the diffusers pipeline class of the family."""
    from sd_models import prompt_file, save_tiny_dino, save_tiny_sd3, save_tiny_sdxl

    if family == "sd3":
        from diffusers import StableDiffusion3Pipeline as pipeline_class

        teacher = save_tiny_sd3(tmp_path / "teacher")
        # compiled blocks that keep their attention outputs through checkpointing (SD3's transformer blocks)
        network = ["distributed.compile=true", "generator.gradient_checkpointing=attention",
                   "critic.gradient_checkpointing=attention"]
    else:
        from diffusers import StableDiffusionXLPipeline as pipeline_class

        teacher = save_tiny_sdxl(tmp_path / "teacher")
        # the UNet's own checkpointing, and its attention blocks compiled one by one (diffusers' _repeated_blocks)
        network = ["distributed.compile=true", "generator.gradient_checkpointing=true",
                   "critic.gradient_checkpointing=true"]
    prompts = prompt_file(tmp_path / "prompts.txt", SD_PROMPTS)
    dino = save_tiny_dino(tmp_path / "dino")
    recipe = "sd35m-512" if family == "sd3" else "sdxl-512"
    overrides = ["--recipe", recipe, f"teacher.path={teacher}", "teacher.resolution=0", "teacher.num_steps=6",
                 "loss.anchor_step=2", "distributed.num_workers=1", "schedule.checkpoint_every=1",
                 f"trajectories.prompts={prompts}", f"evaluation.prompts={prompts}", f"evaluation.dino_path={dino}",
                 "evaluation.seeds_per_prompt=2", "trajectories.seeds_per_prompt=4", "trajectories.rows_per_shard=8",
                 "distributed.use_gpu=true", "trajectories.gpus_per_actor=1", "distributed.precision=bf16",
                 "distributed.batch_size_per_worker=2", "schedule.num_generator_updates=2",
                 "schedule.critic_updates_per_generator=2", "schedule.log_every=1",
                 "distributed.offload_teacher=true", *network]
    return overrides, pipeline_class


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_a_pretrained_family_from_precompute_to_the_diffusers_pipeline_on_the_gpu(tmp_path, family):
    from models.sampling import seeded_noise

    overrides, pipeline_class = _pretrained_family(tmp_path, family)
    out = tmp_path / "out"
    assert "rows in" in dpdmd("precompute", "--no-ray", *overrides, out=out)
    dpdmd("distill", "--no-ray", *overrides, out=out)
    generator = run_dir(out, "distill", overrides[1]) / "generator"
    meta = json.loads((generator / "dpdmd_generator.json").read_text())
    assert meta["family"] == family and len(meta["timesteps"]) == 4

    pipe = pipeline_class.from_pretrained(generator, dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    shape = (16, 8, 8) if family == "sd3" else (4, 8, 8)
    images = pipe(SD_PROMPTS[:2], num_inference_steps=4, guidance_scale=1.0, output_type="np",
                  latents=seeded_noise([1, 2], shape).to("cuda", torch.bfloat16)).images
    assert images.shape == (2, 64, 64, 3) and (images >= 0).all() and (images <= 1).all()

    console = dpdmd("sample", "--generator", str(generator), "--prompt", SD_PROMPTS[0], "--seeds", "0-1", *overrides,
                    out=out)
    assert "2 samples" in console
    console = dpdmd("evaluate", "--generator", str(generator), *overrides, out=out)
    assert "| generator |" in console


def test_the_regression_baseline_on_sd3_measures_lpips_on_the_gpu(tmp_path):
    """loss.method=dmd-regression on a latent family: the store of the teacher's samples, then a bf16 run whose
    regression term decodes through the VAE into LPIPS (random weight files under the published names), with the
    SD3 test's streamed teacher, compiled blocks and checkpointing."""
    from models.perceptual import save_random_weights

    overrides, _ = _pretrained_family(tmp_path, "sd3")
    save_random_weights(tmp_path / "lpips")
    out = tmp_path / "out"
    dpdmd("distill", "--no-ray", *overrides, "loss.method=dmd-regression", "loss.lpips_net=alex",
          f"loss.lpips_weights={tmp_path / 'lpips'}", "loss.lpips_resolution=64", out=out)
    metrics = [json.loads(line) for line in (run_dir(out, "distill", overrides[1]) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["generator_update"] == 2 and metrics[-1]["skipped_steps"] == 0
    assert metrics[-1]["loss_reg"] > 0 and all(math.isfinite(metrics[-1][k]) for k in ("loss_reg", "loss_dmd"))


def test_the_sd35_benchmark_at_two_blocks(tmp_path):
    """benchmarks.gpu_cycle at SD3.5-Medium's width with its first two transformer blocks: every mode runs, is
    timed and releases what it built."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_cycle", "--layers", "2", "--resolution", "512",
                           "--steps", "2", "--warmup", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "gpu_cycle.json").read_text())
    for label, m in result["runs"].items():
        assert "error" not in m, (label, m["error"])
        assert m["cycle_s"] > 0 and m["peak_memory_gib"] > 0 and 0 < m["mfu_measured"] < 1, label
        # no GPU sustains its specified peak on matrix products (NaN: a GPU the specification table lacks)
        assert math.isnan(m["mfu"]) or 0 < m["mfu"] < m["mfu_measured"], label
        released = m["released"]
        assert (released["engines"], released["optimizers"], released["tensor_bytes_left"]) == (0, 0, 0), label
