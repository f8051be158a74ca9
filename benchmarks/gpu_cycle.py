"""The DP-DMD cycle at SD3.5-Medium (or SDXL) scale: time, MFU and HFU, memory, against the reference structure.

Every mode runs workers.train.train, the function Ray Train workers run, on SD3.5-Medium's exact transformer
with random weights (models.families.sd3.random_teacher), 1024 x 1024 images (16 x 128 x 128 latents), prompt
embeddings of the real shapes (77 CLIP + 256 T5 tokens x 4096, pooled 2048), bf16, DeepSpeed ZeRO engines,
the paper's recipe (sd35m); with --family sdxl, on SDXL base's UNet (models.families.sdxl.random_teacher: 4 x
128 x 128 latents, 77 tokens x 2048, pooled 1280 and 6 size ids) with the sdxl recipe, its two CLIP encoders
and its VAE (benchmarks/random_sdxl.py):

  ours       what `dpdmd distill` runs: workers.train.store_source over a trajectory store written by this
             run's precompute; the trainer holds no text encoder
  inline     the precompute effect alone: embeddings from the store, but the K-step guided teacher anchor
             rollout inside every generator step; every other setting as ours
  reference  what the reference script does: eager networks with diffusers' whole-block checkpointing, prompts
             encoded in the loop by the family's full-size random text encoders held by the trainer (SD3:
             CLIP-L, CLIP-G and T5-XXL; SDXL: CLIP-L and CLIP-G), the anchor rollout inside every generator step

Each mode (and each --variant, an extra run of ours with config overrides) runs in a process of its own, so
that it starts from an empty GPU, its peak memory is its own, and an out-of-memory error or a crash is recorded
while the other runs go on; the parent process only orders runs and writes the report. Figures, per GPU:
median cycle seconds over --steps cycles after --warmup (one cycle = the critic updates + one generator update),
samples/s, peak and held (between cycles) GPU memory, and FLOPs per cycle counted outside the measured runs
(benchmarks/cycle_flops.py: each kind of network pass counted on the meta device, times the passes a cycle
makes): MFU from model FLOPs, HFU with activation-checkpointing recompute, each against the GPU's specified
dense bf16 peak (SPEC_BF16_TFLOPS, as the field reports MFU) and against a bf16 matmul measured here; each timed
cycle's seconds and the time Python's garbage collector held the process in it. Also
precompute anchors/s against the bound of the teacher's guided passes alone (K; K + 1 for SDXL, whose anchors
also take the teacher's x0 estimate).
Writes <out>/gpu_cycle.json and <out>/gpu_cycle.md (a table for BENCHMARKS.md) after every run.

    python -m benchmarks.gpu_cycle --out outputs/bench/1gpu                         # one GPU, three modes
    python -m benchmarks.gpu_cycle --gpus 2 --out outputs/bench/2gpu                # each mode under torchrun
    python -m benchmarks.gpu_cycle --mode ours --profile --variant compile:distributed.compile=true
    python -m benchmarks.gpu_cycle --scaling outputs/bench/1gpu outputs/bench/2gpu  # 1 -> 2 GPU scaling
    python -m benchmarks.gpu_cycle --smoke --out /tmp/bench-smoke                   # CPU, tiny networks (the tests)
    python -m benchmarks.gpu_cycle --mode ours --variant regression:loss.method=dmd-regression  # a baseline's cost
    python -m benchmarks.gpu_cycle --family sdxl --mode ours --out outputs/bench/sdxl  # SDXL base's UNet

A variant with a baseline's loss.method runs from a store that also holds the teacher's full samples; the
regression's VAE (the family's) and LPIPS weight files are random, built here; the FLOP count models DMD's
cycle only, so such a run's MFU reads n/a.

--smoke also counts one whole cycle of every mode under FlopCounterMode (with and without checkpointing) and
records it beside the per-pass sum (tests/test_bench.py holds them equal); never on GPU, where the counter holds
about five times the memory a cycle needs. --base DIR first runs ours with workers/, models/ and orchestrator/
from DIR, an earlier commit (`git archive main workers models orchestrator | tar -x -C DIR`), with ours' settings,
for before/after figures (repeatable: one run per earlier tree). --profile adds, per profiled cycle, where the GPU
sat idle and what the host threads did meanwhile (benchmarks/gaps.py); --memory, the peak memory of each part of
one more cycle (benchmarks/memory_peak.py). Imports neither Ray nor MLflow.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import cycle_flops, gaps, memory_peak
from models import tiny_pipelines
from models.perceptual import save_random_weights

MODES = cycle_flops.MODES
NUM_PROMPTS = 16
SIMULATED_OOM = "simulated-oom"
# --family: the module that builds its networks (benchmarks/random_sd3.py, random_sdxl.py) and names its recipe
FAMILY_NAMES = {"sd3": "SD3.5-Medium's transformer", "sdxl": "SDXL base's UNet"}
ROOT = Path(__file__).resolve().parents[1]
# Children run without Ray and MLflow, as on the GPU machine (DeepSpeed tries MLflow and does without it).
CHILD = ("import sys; sys.modules.update(ray=None, mlflow=None); from benchmarks.gpu_cycle import main; "
         "sys.exit(main(sys.argv[1:]))")


# ----------------------------------------------------------------------------------------------------
# Settings


def family_models(family: str):
    """benchmarks/random_sd3.py or random_sdxl.py, imported when asked for: --base runs this benchmark on an
    earlier tree, whose models/ may lack what another family's module imports."""
    return importlib.import_module(f"benchmarks.random_{family}")


@dataclass(frozen=True)
class Run:
    """One measured run: a mode, config overrides on top of the benchmark's, and the source tree it imports."""

    label: str
    mode: str
    overrides: tuple[str, ...] = ()
    source: str = ""  # "" = this tree; else a directory holding workers/, models/, orchestrator/


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_cycle", description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="all", help="all, or a comma list of " + ", ".join(MODES) + " (run in that order)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                   help="one more run of ours with these config overrides (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for inline, ours, ours@base and the variants (repeatable)")
    p.add_argument("--base", action="append", default=[], metavar="DIR",
                   help="also run ours with workers/models/orchestrator from DIR, with the same --set and --compile "
                        "(repeatable: the runs are named ours@<DIR's name>; one alone is ours@base)")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="rows per GPU per update")
    p.add_argument("--critic-updates", type=int, default=5, help="critic updates per generator update")
    p.add_argument("--anchor-step", type=int, default=5, help="K: teacher ODE steps to the anchor")
    p.add_argument("--steps", type=int, default=4, help="timed cycles per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed cycles first (allocator, kernels, compilation)")
    p.add_argument("--compile", action="store_true", help="same as --set distributed.compile=true")
    p.add_argument("--gradient-checkpointing", choices=("true", "false", "attention"), default=None,
                   help="generator and critic activation checkpointing (default: the recipe's, true)")
    p.add_argument("--family", choices=tuple(FAMILY_NAMES), default="sd3",
                   help="sd3: SD3.5-Medium's transformer and the sd35m recipe; sdxl: SDXL base's UNet and the "
                        "sdxl recipe")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--layers", type=int, default=0, help="use the first N transformer blocks (0: all; SD3 only)")
    p.add_argument("--precompute-batch", type=int, default=4, help="rows per precompute batch and shard")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per run (more than 1: each run under torchrun)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over one more cycle of ours and each variant: kernel mix, idle GPU time")
    p.add_argument("--memory", action="store_true",
                   help="one more cycle of ours and each variant: its peak memory in each part of the cycle")
    p.add_argument("--verify-flops", action=argparse.BooleanOptionalAction, default=None,
                   help="count whole cycles under FlopCounterMode after each run (default: with --smoke only)")
    p.add_argument("--simulate-oom", action="store_true",
                   help="first a run of ours that raises out-of-memory after one cycle (tests the recording path)")
    p.add_argument("--peak-tflops", type=float, default=0.0, metavar="TFLOPS",
                   help="the GPU's dense bf16 peak for MFU, where the built-in specification table lacks it or "
                        "should be overridden (the measured matmul peak is reported beside it either way)")
    p.add_argument("--deadline", type=float, default=0.0, metavar="S",
                   help="stop a run at S seconds from the start and start none with under 60 s left (0: no limit)")
    p.add_argument("--smoke", action="store_true", help="the family's tiny networks on CPU, 2 timed cycles")
    p.add_argument("--out", default="outputs/bench")
    p.add_argument("--scaling", nargs=2, metavar=("ONE_GPU_OUT", "N_GPU_OUT"),
                   help="compare two earlier runs' JSON (same per-GPU batch) and print the scaling efficiency")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = family_models(args.family)
    if args.smoke:
        args.resolution = args.models.SMOKE_RESOLUTION
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    if args.verify_flops is None:
        args.verify_flops = args.smoke
    modes = [m for m in args.mode.split(",") if m]
    unknown = set(modes) - set(MODES) - {"all"}
    if unknown or not modes:
        p.error(f"--mode: unknown {sorted(unknown)}; use all or a comma list of {', '.join(MODES)}")
    args.modes = tuple(MODES) if "all" in modes else tuple(dict.fromkeys(modes))
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    try:
        args.models.network_config(args.smoke, args.layers)
        args.runs = runs(args)
        for run in args.runs:  # a setting the config refuses stops the benchmark here, not inside its precompute
            check_run(args, run)
    except ValueError as err:  # ConfigError included
        p.error(str(err))
    return args


def runs(args: argparse.Namespace) -> list[Run]:
    tuned = tuple(args.set) + (("distributed.compile=true",) if args.compile else ())
    out = [Run(SIMULATED_OOM, "ours", tuned)] if args.simulate_oom else []
    bases = [Path(b).resolve() for b in args.base]  # before the runs they are compared with, ours' settings
    labels = ["ours@base"] if len(bases) == 1 else [f"ours@{b.name}" for b in bases]
    if len(set(labels)) < len(labels):
        raise ValueError(f"--base: give directories of different names, got {args.base}")
    out += [Run(label, "ours", tuned, str(base)) for label, base in zip(labels, bases)]
    out += [Run(mode, mode, reference_settings(args) if mode == "reference" else tuned) for mode in args.modes]
    for text in args.variant:
        label, _, overrides = text.partition(":")
        if not label or not overrides or label in (*MODES, SIMULATED_OOM) or any(r.label == label for r in out):
            raise ValueError(f"--variant {text!r}: give LABEL:KEY=VALUE[,KEY=VALUE] with a new label")
        out.append(Run(label, "ours", tuned + tuple(overrides.split(","))))
    return out


def check_run(args: argparse.Namespace, run: Run) -> None:
    """The run's config resolved as its process will resolve it: a setting it refuses (ConfigError) is refused
    here, before anything runs ('attention' checkpointing on SDXL's UNet among them)."""
    run_config(args, torch.cuda.is_available() and not args.smoke, args.gpus, run.overrides)


def reference_settings(args: argparse.Namespace) -> tuple[str, ...]:
    """The reference structure checkpoints whole blocks (diffusers' own), as the reference script does, unless
    checkpointing is off; selective checkpointing in eager mode would run every op through a dispatch mode and
    slow the reference for reasons of ours (measured: 13.9 s per cycle against 12.1)."""
    if args.gradient_checkpointing == "false":
        return ()
    return "generator.gradient_checkpointing=true", "critic.gradient_checkpointing=true"


def run_config(args: argparse.Namespace, use_gpu: bool, world_size: int, overrides=(), cycles: int = 0):
    """The paper's recipe of the family (sd35m or sdxl) with the benchmark's settings; teacher.path is never read
    (the teacher is built in code and handed to train)."""
    from orchestrator.recipe import resolve

    checkpointing = args.gradient_checkpointing
    cycles = cycles or args.warmup + args.steps + int(args.profile) + int(args.memory)
    return resolve(args.models.RECIPE, [
        f"teacher.resolution={args.resolution}", f"loss.anchor_step={args.anchor_step}",
        f"schedule.critic_updates_per_generator={args.critic_updates}",
        f"schedule.num_generator_updates={cycles}", "schedule.checkpoint_every=0", f"schedule.log_every={cycles}",
        *([f"generator.gradient_checkpointing={checkpointing}", f"critic.gradient_checkpointing={checkpointing}"]
          if checkpointing else []),
        f"distributed.num_workers={world_size}", f"distributed.use_gpu={str(use_gpu).lower()}",
        f"distributed.zero_stage={args.zero_stage}", f"distributed.batch_size_per_worker={args.batch}",
        f"trajectories.batch_size={args.precompute_batch}", f"trajectories.rows_per_shard={args.precompute_batch}",
        f"storage.output_dir={args.out}", f"loss.lpips_weights={Path(args.out) / 'lpips'}", *overrides])


def cycle_shape(config) -> cycle_flops.CycleShape:
    return cycle_flops.CycleShape(
        config.schedule.critic_updates_per_generator, config.distributed.batch_size_per_worker,
        config.generator.num_steps, config.loss.anchor_step, config.loss.diversity_weight > 0,
        config.loss.first_step_detached, family_models(config.teacher.family).anchor_x0)


# ----------------------------------------------------------------------------------------------------
# Measuring (inside a child process)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """The GPU's measured bf16 matrix-multiply rate (FLOP/s) on random data, the denominator of MFU; NaN on CPU."""
    if device.type != "cuda":
        return float("nan")
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1000)


# Dense bf16 tensor-core peaks of the vendors' specification sheets, TFLOP/s without sparsity, by a model name as
# a whole word of the name torch reports (the first that matches: the more specific names first, so that "H100 NVL"
# is not read as an H100 SXM, nor "RTX A1000" as an A100). MFU against these is what torchtitan, Megatron-LM and
# most published training figures report; --peak-tflops overrides the table.
SPEC_BF16_TFLOPS = (("GH200", 989.4), ("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5),
                    ("H100 PCIe", 756.5), ("H100", 989.4), ("GB200", 2500.0), ("B200", 2250.0), ("A100", 312.0),
                    ("L40S", 362.05), ("L40", 181.05), ("RTX 6000 Ada", 364.2), ("RTX A6000", 154.8))


def spec_peak(device_name: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """The specification's dense bf16 peak (FLOP/s) of the named GPU and where it comes from; NaN for a device
    the table lacks (and for the CPU), unless override_tflops (--peak-tflops) names it."""
    import re

    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if "MIG" in device_name:  # a slice of the card: a share of its peak that the name does not say
        return float("nan"), f"a MIG slice ({device_name}); give --peak-tflops"
    for model, tflops in SPEC_BF16_TFLOPS:
        if re.search(rf"\b{re.escape(model)}\b", device_name):
            return tflops * 1e12, f"the {model} specification"
    return float("nan"), f"not in the specification table ({device_name}); give --peak-tflops"


def gib(device: torch.device, peak: bool = False) -> float:
    """This rank's allocated (or peak allocated) GPU memory in GiB; NaN on CPU."""
    if device.type != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**30


def live_objects() -> dict[str, int]:
    """What a run builds and must release: DeepSpeed engines, optimizers, text encoders, and the bytes of every
    tensor alive in the process (the CPU's view of memory: the smoke has no allocator statistics)."""
    from deepspeed import DeepSpeedEngine
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from transformers import PreTrainedModel

    gc.collect()
    counts = {"engines": 0, "optimizers": 0, "text_encoders": 0}
    storages: dict[int, int] = {}
    for o in tracked_objects():
        kind = type(o)  # not isinstance: that dereferences weak proxies, which torch.compile leaves dead ones of
        if issubclass(kind, (FakeTensor, FunctionalTensor)):
            continue  # torch.compile's caches keep these: shapes without memory (their data pointer raises)
        if issubclass(kind, torch.Tensor):
            if o.device.type != "meta":
                storage = o.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        elif issubclass(kind, DeepSpeedEngine):
            counts["engines"] += 1
        elif issubclass(kind, torch.optim.Optimizer):
            counts["optimizers"] += 1
        elif issubclass(kind, PreTrainedModel):
            counts["text_encoders"] += 1
    return {**counts, "tensor_bytes": sum(storages.values())}


class CycleClock:
    """train's on_cycle hook: times each cycle between device-synchronised marks, notes the memory held between
    cycles and the text encoders alive while the trainer runs; optionally reads the peak memory of each part of
    one cycle after the timed ones (benchmarks/memory_peak.py) and profiles the next, or raises a simulated
    out-of-memory error after the first cycle."""

    def __init__(self, warmup: int, steps: int, device: torch.device, profile: bool = False, fail: bool = False,
                 memory: bool = False):
        self.warmup, self.steps, self.device, self.profile, self.fail = warmup, steps, device, profile, fail
        self.memory, self.regions = memory, None
        self.memory_summary: dict | None = None
        self.peak_floor = 0  # the allocator's peak is reset while parts are read: the highest reading before
        self.seconds: list[float] = []
        self.warmup_seconds: list[float] = []  # the first includes building the engines (and compiling)
        self.held_gib = float("nan")
        self.text_encoders: list[str] | None = None
        self.profiler = None
        self.profile_summary: dict | None = None
        self.gc = GcPauses()
        self.gc_s: list[float] = []  # Python's garbage collector, per timed cycle: seconds every thread stood still
        self.gc_full: list[int] = []  # and its full (oldest-generation) collections
        self.gc_objects: dict[str, int] = {}  # what a full collection scans after the warm-up, and what it skips
        self.mark = time.perf_counter()

    def __call__(self, progress, metrics: dict) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        step = progress.generator_updates
        if self.fail:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by --simulate-oom)")
        print(f"[bench] cycle {step}: {now - self.mark:.2f} s", flush=True)
        if step <= self.warmup:
            self.warmup_seconds.append(now - self.mark)
        elif step <= self.warmup + self.steps:
            self.seconds.append(now - self.mark)
            self.gc_s.append(self.gc.seconds)
            self.gc_full.append(self.gc.full)
            self.held_gib = gib(self.device)
        if step == self.warmup:
            self.gc_objects = {"tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count()}
        if self.text_encoders is None:
            self.text_encoders = text_encoders()
        try:  # a memory reading that fails costs the reading, not the run
            self._end_regions()
            if self.memory and step == self.warmup + self.steps:
                import workers.distill
                import workers.train

                self.regions = memory_peak.RegionPeaks(self.device)
                self.regions.install([workers.distill, workers.train])
        except Exception as err:  # noqa: BLE001
            self.regions, self.memory_summary = None, {"error": f"{type(err).__name__}: {err}"[:300]}
        try:  # a profiler that fails costs the profile, not the run
            if self.profiler is not None:  # the profiled cycle just ended
                self.profiler.__exit__(None, None, None)
                self.profile_summary = profile_summary(self.profiler, now - self.mark)
                self.profiler = None
            if self.profile and step == self.warmup + self.steps + int(self.memory):
                from torch.profiler import ProfilerActivity, profile

                self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.profiler.__enter__()
        except Exception as err:  # noqa: BLE001
            self.profiler, self.profile_summary = None, {"error": f"{type(err).__name__}: {err}"[:300]}
        self.gc.reset()
        self.mark = time.perf_counter()

    def _end_regions(self) -> None:
        if self.regions is not None:
            regions, self.regions = self.regions, None
            self.memory_summary = regions.close()
            self.peak_floor = regions.run_peak

    def close(self) -> None:
        self.gc.close()
        self._end_regions()
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None


class GcPauses:
    """The time Python's garbage collector holds the process (gc.callbacks), since the last reset(): its
    collections run on whichever thread allocates, with the interpreter lock held, so every thread waits."""

    def __init__(self):
        self.seconds, self.full, self._start = 0.0, 0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.full += info["generation"] == 2

    def reset(self) -> None:
        self.seconds, self.full = 0.0, 0

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


def text_encoders() -> list[str]:
    from transformers import PreTrainedModel

    return sorted(type(o).__name__ for o in tracked_objects() if issubclass(type(o), PreTrainedModel))


def tracked_objects() -> list:
    """gc.get_objects(), the frozen ones included: from its first cycle on, train() keeps what outlives it out of
    the collector's generations (gc.freeze), where gc.get_objects() does not look. Everything tracked now is
    frozen again afterwards."""
    if not gc.get_freeze_count():
        return gc.get_objects()
    gc.unfreeze()
    try:
        return gc.get_objects()
    finally:
        gc.freeze()


KERNEL_KINDS = (  # first match wins: cuDNN's attention kernels also carry "sm90" in their names
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "splitk")),
    ("optimizer", ("adam", "multi_tensor")),
    ("communication", ("nccl",)),
    ("copy", ("memcpy", "memset")),
)


def profile_summary(prof, wall_s: float) -> dict:
    """GPU time of one profiled cycle by kernel kind (matmul, attention, optimizer, communication, copies, the
    rest: elementwise and reductions), the busiest kernels, the share of the cycle's wall time the GPU was busy,
    and where it was idle (benchmarks/gaps.py)."""
    events = prof.events()
    totals: dict[str, list] = {}  # kernel name -> [seconds, calls]: the GPU's work only (host operators carry
    for event in events:          # their kernels' time too, and regions are mirrored onto the GPU's timeline)
        if gaps.gpu_work(event):
            entry = totals.setdefault(event.name, [0.0, 0])
            entry[0] += (event.time_range.end - event.time_range.start) / 1e6
            entry[1] += 1
    kinds: dict[str, float] = {}
    kernels = []
    for key, (seconds, calls) in totals.items():
        name = key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + seconds
        kernels.append((seconds, calls, kind, key[:120]))
    busy = sum(kinds.values())
    kernels.sort(reverse=True)
    return {"wall_s": wall_s, "kernel_s": busy, "busy_share": busy / wall_s,
            "kernel_calls": sum(c for _, c in totals.values()),
            "by_kind_s": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"s": s, "calls": n, "kind": k, "name": name} for s, n, k, name in kernels[:30]],
            "idle": gaps.from_profiler(events)}


# ----------------------------------------------------------------------------------------------------
# Data sources (workers.train.DataSource) for the modes the store does not serve


def reference_source(adapter, teacher, prompts: list[str], device):
    """The reference script's data path: every batch's prompts encoded in the loop, and on generator
    batches the K-step guided teacher rollout from fresh noise (compute_anchors encodes the empty prompt
    too)."""
    from workers.anchors import compute_anchors
    from workers.batches import PromptBatch, TrainingData

    def source(config, ctx, progress):
        assert progress.generator_updates == 0, "benchmarks never resume"
        batch_size = config.distributed.batch_size_per_worker

        def rows(index: int):
            seeds = torch.arange(batch_size) + 1_000_003 * ctx.rank + index * batch_size
            return seeds % len(prompts), seeds

        def anchors():
            for index in itertools.count():
                ids, seeds = rows(2 * index)
                yield compute_anchors(config, adapter, teacher, [prompts[i] for i in ids], ids, seeds, device)

        def critic_prompts():
            for index in itertools.count():
                ids, _ = rows(2 * index + 1)
                yield PromptBatch(adapter.encode_prompts([prompts[i] for i in ids]).to(device), ids)
        return TrainingData(anchors(), critic_prompts())
    return source


def inline_anchor_source(reader, adapter, teacher, negative, device):
    """Rows and embeddings from reader (the store), but each generator batch's anchor recomputed by the
    teacher's K guided steps from its eps, as compute_anchors does (and its x0 estimate there, for teachers
    whose diversity target it is): the precompute effect alone."""
    from models.rollout import teacher_anchor
    from workers.batches import TrainingData

    def source(config, ctx, progress):
        t = config.teacher
        sigmas = adapter.sampling_sigmas(t.num_steps, t.shift, "teacher").to(device)
        uncond = negative.to(device)
        data = reader(config, ctx, progress)

        def anchors():
            for batch in data.anchors:
                batch = batch.to(device)
                fn = adapter.velocity_fn(teacher, batch.cond, uncond.expand(len(batch.eps)), t.guidance_scale)
                anchor = teacher_anchor(fn, adapter.initial_state(batch.eps, sigmas, "teacher"), sigmas,
                                        config.loss.anchor_step, x0_estimate=adapter.anchor_x0)
                batch.z = anchor.z
                if anchor.x0 is not None:
                    batch.x0_anchor = anchor.x0
                yield batch
        return TrainingData(anchors(), data.prompts, data.rows_available)
    return source


# ----------------------------------------------------------------------------------------------------
# Precompute: the trajectory store the runs read, and its throughput (a child process)


def precompute(config, args, adapter, teacher, prompts, device, rank: int, world: int):
    """Anchors and embeddings for every row the runs consume into a store under <out>/store (shards split over
    ranks), timed per shard; the bound is --precompute-batch rows per K guided teacher passes (K + 1 where the
    teacher's x0 estimate at the anchor is the diversity target)."""
    from models.rollout import teacher_anchor
    from workers.anchors import compute_anchors
    from workers.schema import batch_to_table
    from workers.store import StoreSpec, filesystem, open_store, shards_needed, verified_shards, write_manifest, \
        write_negative, write_shard

    num_shards = max(2, shards_needed(config, len(prompts), world))
    spec = StoreSpec({"family": args.family, "model": "random-weights", "resolution": args.resolution,
                      "layers": args.layers, "anchor_step": args.anchor_step, "smoke": args.smoke}, prompts, 0,
                     args.precompute_batch, num_shards)
    root = Path(args.out) / "store" / spec.key
    if rank == 0 and root.exists():
        shutil.rmtree(root)
    _barrier()
    fs, path = filesystem(config, str(root))
    if rank == 0:
        write_negative(fs, path, adapter.negative_conditioning(1))
    compute_s, write_s, rows = [], [], []
    for index in range(rank, spec.num_shards, world):
        ids, seeds = spec.shard_rows(index)
        synchronize(device)
        start = time.perf_counter()
        batch = compute_anchors(config, adapter, teacher, [prompts[i] for i in ids], ids, seeds, device)
        synchronize(device)
        middle = time.perf_counter()
        write_shard(fs, path, index, batch_to_table(batch.to("cpu"), [prompts[i] for i in ids])[0])
        compute_s.append(middle - start)
        write_s.append(time.perf_counter() - middle)
        rows.append(len(seeds))
    _barrier()
    if rank == 0:
        write_manifest(fs, path, spec, verified_shards(fs, path, spec)[0])
    _barrier()
    store = open_store(fs, path)

    # The bound: the guided teacher passes (a doubled batch each) and nothing else.
    t = config.teacher
    cond = store.negative().expand(args.precompute_batch).to(device)
    sigmas = adapter.sampling_sigmas(t.num_steps, t.shift, "teacher").to(device)
    eps = adapter.initial_state(torch.randn(args.precompute_batch, *adapter.latent_shape).to(device), sigmas, "teacher")
    fn = adapter.velocity_fn(teacher, cond, cond, t.guidance_scale)
    rollout_s = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        teacher_anchor(fn, eps, sigmas, args.anchor_step, x0_estimate=adapter.anchor_x0)
        synchronize(device)
        rollout_s.append(time.perf_counter() - start)
    timed = slice(1, None) if len(compute_s) > 1 else slice(None)  # the first shard warms the kernels up
    shard_s = [c + w for c, w in zip(compute_s, write_s)][timed]
    result = {
        "rows_per_gpu": sum(rows), "shards_per_gpu": len(rows), "batch": args.precompute_batch,
        "anchors_per_s_per_gpu": args.precompute_batch / statistics.median(shard_s),
        "compute_only_anchors_per_s_per_gpu": args.precompute_batch / statistics.median(compute_s[timed]),
        "bound_anchors_per_s_per_gpu": args.precompute_batch / statistics.median(rollout_s[1:]),
        "write_share": sum(write_s[timed]) / sum(shard_s),
    }
    result["efficiency"] = result["anchors_per_s_per_gpu"] / result["bound_anchors_per_s_per_gpu"]
    return str(root), result


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def text_adapter_for(args, adapter, device, dtype):
    return args.models.with_text(adapter, args.models.text_pipeline(args.smoke, device, dtype))


def precompute_child(args, device, use_gpu: bool, rank: int, world: int) -> dict:
    """The store every run reads, the matmul peak, and the FLOPs of the reference's prompt encoding (counted on
    the real encoders, outside any measured run)."""
    dtype = torch.bfloat16
    peak_flops = matmul_peak(device)
    prompts = tiny_pipelines.prompts(NUM_PROMPTS)
    adapter, teacher = args.models.teacher(args.smoke, args.resolution, device, dtype, args.layers)
    text_adapter = text_adapter_for(args, adapter, device, dtype)
    # Every run consumes at most this many anchor rows (the --verify-flops runs take one cycle each). With a
    # baseline among the runs, the store also holds the teacher's full samples (each row's whole ODE), and the
    # regression's LPIPS gets random weight files under their published names (its cost is the same).
    losses = [run_config(args, use_gpu, world, run.overrides).loss for run in args.runs]
    baselines = [loss.method for loss in losses if loss.teacher_samples]
    config = run_config(args, use_gpu, world, (f"loss.method={baselines[0]}",) if baselines else ())
    for loss in losses if rank == 0 else ():
        if loss.method == "dmd-regression" and loss.lpips_weights == str(Path(args.out) / "lpips"):
            save_random_weights(Path(loss.lpips_weights), loss.lpips_net)
    store_root, result = precompute(config, args, text_adapter, teacher, prompts, device, rank, world)
    with torch.no_grad():
        text_flops = {n: cycle_flops.count(lambda: text_adapter.encode_prompts(prompts[:n] if n > 1 else [""]))
                      for n in (1, args.batch)}
    return {"store": store_root, "matmul_peak_flops": peak_flops, "precompute": result,
            "text_flops": {str(k): v for k, v in text_flops.items()},
            "device": torch.cuda.get_device_name(device) if use_gpu else "cpu", "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------------
# One run (a child process)


def run_child(args, run: Run, device, use_gpu: bool, rank: int, world: int, store_root: str) -> dict:
    from workers.context import LocalContext
    from workers.store import filesystem, open_store
    from workers.train import store_source, train

    dtype = torch.bfloat16
    profiled = args.profile and run.mode == "ours"  # ours and its variants
    recorded = args.memory and run.mode == "ours" and device.type == "cuda"
    config = run_config(args, use_gpu, world, run.overrides,
                        cycles=args.warmup + args.steps + int(profiled) + int(recorded))
    store = open_store(*filesystem(config, store_root))
    prompts = tiny_pipelines.prompts(NUM_PROMPTS)
    adapter, teacher = args.models.teacher(args.smoke, args.resolution, device, dtype, args.layers)
    if config.loss.method == "dmd-regression":  # LPIPS on decoded images
        adapter.vae = args.models.vae(args.smoke, device, dtype)
    before = live_objects()
    start_gib = gib(device)
    result: dict = {"label": run.label, "mode": run.mode, "overrides": list(run.overrides), "source": run.source}

    # The teacher pair train gets, its data source and the empty prompt's conditioning, as the mode has them
    text_adapter = None
    if run.mode == "reference":
        text_adapter = text_adapter_for(args, adapter, device, dtype)
        pair, negative = (text_adapter, teacher), text_adapter.negative_conditioning(1)
        source = reference_source(text_adapter, teacher, prompts, device)
    else:
        pair, negative = (adapter, teacher), store.negative()
        source = store_source(store)
        if run.mode == "inline":
            source = inline_anchor_source(source, adapter, teacher, negative, device)
    clock = CycleClock(args.warmup, args.steps, device, profile=profiled, fail=run.label == SIMULATED_OOM,
                       memory=recorded)
    ctx = LocalContext(Path(args.out) / "runs" / run.label, resume=False)
    try:
        train(config, ctx, source, negative, teacher=pair, on_cycle=clock, save=False)
    except torch.cuda.OutOfMemoryError as err:
        result["error"] = f"out of memory: {str(err).splitlines()[0][:200]}"
    finally:
        clock.close()
    result["peak_memory_gib"] = max(gib(device, peak=True), clock.peak_floor / memory_peak.GIB)
    if "error" not in result:
        result.update(cycle_s_all=clock.seconds, warmup_s_all=clock.warmup_seconds, held_memory_gib=clock.held_gib,
                      gc_s_all=clock.gc_s, gc_full_all=clock.gc_full, gc_objects=clock.gc_objects,
                      text_encoders_in_trainer=clock.text_encoders, profile=clock.profile_summary,
                      memory=clock.memory_summary)
        if args.verify_flops:  # whole cycles counted, outside the measured run
            result["counted_flops"] = {
                name: cycle_flops.count(lambda: train(
                    run_config(args, use_gpu, world, (*run.overrides, *extra), cycles=1),
                    LocalContext(Path(args.out) / "runs" / f"{run.label}-counted", resume=False), source, negative,
                    teacher=pair, save=False))
                for name, extra in (("hardware", ()), ("model", ("generator.gradient_checkpointing=false",
                                                                   "critic.gradient_checkpointing=false")))}
    # Everything the run built goes before the process ends: the check that nothing outlives a run.
    del clock, pair, source, negative, text_adapter
    adapter.__dict__.pop("_lpips", None)  # the regression's LPIPS (the VAE, made before `before`, is counted there)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    after = live_objects()
    result["released"] = {"engines": after["engines"], "optimizers": after["optimizers"],
                          "text_encoders": after["text_encoders"],
                          "tensor_bytes_left": after["tensor_bytes"] - before["tensor_bytes"],
                          "gpu_gib_left": gib(device) - start_gib}
    return result


def child_main(args: argparse.Namespace) -> int:
    from workers.context import LocalContext
    from workers.engines import init_distributed

    use_gpu = torch.cuda.is_available() and not args.smoke
    init_distributed(use_gpu)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = LocalContext(Path(args.out)).device(use_gpu)
    parts = Path(args.out) / "parts"
    if args.child == "precompute":
        result = precompute_child(args, device, use_gpu, rank, world)
    else:
        run = next(r for r in args.runs if r.label == args.child)
        store = json.loads((parts / "precompute.rank0.json").read_text())["store"]
        result = run_child(args, run, device, use_gpu, rank, world, store)
    parts.mkdir(parents=True, exist_ok=True)
    (parts / f"{args.child}.rank{rank}.json").write_text(json.dumps(result, indent=1))
    torch.distributed.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------------
# The parent: runs every child, counts the FLOPs, writes the report


def launch(args: argparse.Namespace, argv: list[str], label: str, source: str, timeout: float | None) -> dict:
    """Run one child (under torchrun for --gpus > 1); its rank results merged, or why there are none."""
    parts = Path(args.out) / "parts"
    for stale in parts.glob(f"{label}.rank*.json"):
        stale.unlink()
    cwd = ROOT
    if source:  # the earlier tree's workers/models/orchestrator with this benchmark: a scratch copy of both
        cwd = Path(args.out).resolve() / "base-tree"
        shutil.rmtree(cwd, ignore_errors=True)
        shutil.copytree(source, cwd, ignore=shutil.ignore_patterns("benchmarks", "__pycache__", ".git", "outputs"))
        shutil.copytree(ROOT / "benchmarks", cwd / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    python = [sys.executable, "-c", CHILD]
    if args.gpus > 1:
        python = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
                  "--no-python", *python]
    out = str(Path(args.out).resolve())
    cmd = [*python, *strip_out(argv), "--out", out, "--child", label]
    log = Path(args.out) / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as f:
        # OMP_WAIT_POLICY is read when torch loads, so it goes into the child's environment (the caller's own
        # setting wins): spinning OpenMP threads slow small models down many times over on shared CPUs (BENCHMARKS.md).
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    seconds = time.perf_counter() - start
    ranks = [json.loads(p.read_text()) for p in sorted(parts.glob(f"{label}.rank*.json"))]
    if code == 0 and len(ranks) == args.gpus:
        merged = dict(ranks[0])
        if "peak_memory_gib" in merged:
            merged["peak_memory_gib"] = max(r["peak_memory_gib"] for r in ranks)
            merged["held_memory_gib"] = max(r.get("held_memory_gib", float("nan")) for r in ranks)
        errors = [r["error"] for r in ranks if "error" in r]
        if errors:
            merged["error"] = errors[0]
        merged["process_s"] = seconds
        return merged
    tail = log.read_text()[-1500:].strip().splitlines()[-1:] if log.exists() else []
    why = "timed out" if code is None else f"exit code {code}"
    return {"label": label, "error": f"{why} after {seconds:.0f} s ({tail[0][:200] if tail else 'no output'}); "
                                     f"log: {log}", "process_s": seconds}


def strip_out(argv: list[str]) -> list[str]:
    """argv without --out: the children get an absolute one (a run from --base works in another directory)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    return kept


def figures(args, result: dict, label: str, m: dict) -> dict:
    """Cycle time, throughput, FLOPs, MFU and HFU of a finished run."""
    if "error" in m or not m.get("cycle_s_all"):
        return m
    config = run_config(args, not args.smoke, args.gpus, m.get("overrides", ()))
    shape = cycle_shape(config)
    passes = cycle_flops.PassFlops.from_json(result["model"]["pass_flops"])
    model = cycle_flops.cycle_flops(m["mode"], shape, passes, (False, False))
    hardware = cycle_flops.cycle_flops(m["mode"], shape, passes, (config.generator.gradient_checkpointing,
                                                                    config.critic.gradient_checkpointing))
    cycle_s = statistics.median(m["cycle_s_all"])
    # MFU and HFU against the specification's dense peak (as the field reports them), and against the matmul
    # peak measured in the run (what this GPU sustains on large matrix products)
    spec, measured = result.get("spec_peak_flops", float("nan")), result["matmul_peak_flops"]
    m.update(cycle_s=cycle_s, samples_per_s_per_gpu=args.batch * (args.critic_updates + 1) / cycle_s,
             model_flops_per_cycle=model, hardware_flops_per_cycle=hardware,
             model_tflops_per_s_per_gpu=model / cycle_s / 1e12, mfu=model / cycle_s / spec,
             hfu=hardware / cycle_s / spec, mfu_measured=model / cycle_s / measured,
             hfu_measured=hardware / cycle_s / measured)
    if config.loss.method in ("dmd-regression", "dmd-gan"):
        # The pass counter models DMD's and DP-DMD's cycle; the baselines' VAE, LPIPS and GAN passes are not in it
        m.update({key: float("nan") for key in ("model_flops_per_cycle", "hardware_flops_per_cycle",
                                                "model_tflops_per_s_per_gpu", "mfu", "hfu", "mfu_measured",
                                                "hfu_measured")})
    if "counted_flops" in m:
        m["flops_check"] = {"model": [model, m["counted_flops"]["model"]],
                            "hardware": [hardware, m["counted_flops"]["hardware"]]}
    return m


def count_passes(args) -> cycle_flops.PassFlops:
    """Per-pass FLOPs of the denoiser on the meta device (no memory, no GPU time)."""
    config = args.models.network_config(args.smoke, args.layers)
    network = args.models.network_class()
    shape = cycle_shape(run_config(args, False, 1))
    return cycle_flops.network_passes(args.models.counting_adapter(config, args.resolution),
                                      lambda: network(**config), args.models.conditioning_shapes(config),
                                      cycle_flops.forward_batches(shape), shape.batch, torch.bfloat16)


def parent_main(args: argparse.Namespace, argv: list[str]) -> dict:
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def left() -> float | None:
        return None if not args.deadline else args.deadline - (time.perf_counter() - start)

    result: dict = {"benchmark": "gpu_cycle", "date": time.strftime("%Y-%m-%d"),
                    "command": "python -m benchmarks.gpu_cycle " + " ".join(argv), "world_size": args.gpus,
                    "settings": {k: v for k, v in vars(args).items()
                                 if k not in ("runs", "scaling", "child", "models")},
                    "runs": {}}
    result["settings"]["runs"] = [r.__dict__ for r in args.runs]
    # The store and the encoders' FLOPs in a child, while this process counts the denoiser's passes.
    counted: dict = {}
    counting = threading.Thread(target=lambda: counted.update(passes=count_passes(args)))
    counting.start()
    pre = launch(args, argv, "precompute", "", left())
    counting.join()
    passes = counted["passes"]
    if "error" in pre:
        result["precompute_error"] = pre["error"]
        write_report(out, result)
        return result
    passes.text = {int(k): v for k, v in pre["text_flops"].items()}
    network = args.models.network_config(args.smoke, args.layers)
    latent_shape = args.models.counting_adapter(network, args.resolution).latent_shape
    spec_flops, spec_source = spec_peak(pre["device"], args.peak_tflops)
    result.update(device=pre["device"], torch=pre["torch"], matmul_peak_flops=pre["matmul_peak_flops"],
                  spec_peak_flops=spec_flops, spec_peak_source=spec_source,
                  precompute=pre["precompute"],
                  model={"family": args.family, "network": network, "latent_shape": list(latent_shape),
                         "conditioning": {k: list(v) for k, v in args.models.conditioning_shapes(network).items()},
                         "pass_flops": passes.to_json()})
    for run in args.runs:
        remaining = left()
        if remaining is not None and remaining < 60:
            result["runs"][run.label] = {"label": run.label, "mode": run.mode, "overrides": list(run.overrides),
                                         "error": f"not run: {remaining:.0f} s left of --deadline {args.deadline:.0f}"}
            continue
        m = launch(args, argv, run.label, run.source, remaining)
        m.setdefault("mode", run.mode)
        m.setdefault("overrides", list(run.overrides))
        result["runs"][run.label] = figures(args, result, run.label, m)
        result["ratios"] = ratios(result["runs"])
        write_report(out, result)
    result["ratios"] = ratios(result["runs"])
    write_report(out, result)
    return result


def ratios(runs: dict) -> dict:
    """Each finished run's throughput over the reference's and over inline's (where they finished)."""
    out = {}
    for other in ("reference", "inline"):
        theirs = runs.get(other, {}).get("samples_per_s_per_gpu")
        if theirs:
            out.update({f"{label}_vs_{other}": m["samples_per_s_per_gpu"] / theirs for label, m in runs.items()
                        if label != other and m.get("samples_per_s_per_gpu")})
    return out


def write_report(out: Path, result: dict) -> None:
    (out / "gpu_cycle.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_cycle.md").write_text(markdown(result))


# ----------------------------------------------------------------------------------------------------
# Reporting


def _fmt(value, spec: str = ".3g", missing: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return missing
    return format(value, spec)


def _pct(value) -> str:
    return _fmt(None if value is None else value * 100, ".1f") + ("%" if value is not None and value == value else "")


def markdown(result: dict) -> str:
    s = result["settings"]
    checkpointing = s["gradient_checkpointing"] or "as in the recipe"
    if s["gradient_checkpointing"] == "attention" and "reference" in result.get("runs", {}):
        checkpointing += " (the reference: whole blocks)"
    lines = [
        f"{FAMILY_NAMES[s.get('family', 'sd3')]} with random weights; "
        f"{result.get('device', '?')} x {result['world_size']}, {result['date']}, torch {result.get('torch', '?')}; "
        f"dense bf16 peak {_fmt(result.get('spec_peak_flops', float('nan')) / 1e12, '.0f')} TFLOP/s "
        f"({result.get('spec_peak_source', 'not known')}; MFU and HFU against it), bf16 matmul peak measured "
        f"{_fmt(result.get('matmul_peak_flops', float('nan')) / 1e12, '.0f')} TFLOP/s (MFU and HFU measured); "
        f"batch {s['batch']} per GPU, {s['critic_updates']} critic updates per generator update, "
        f"K = {s['anchor_step']}, {s['resolution']} px, ZeRO-{s['zero_stage']}, "
        f"checkpointing {checkpointing}; "
        f"median of {s['steps']} cycles after {s['warmup']}; "
        f"every run in a process of its own.",
        "",
        "| run | cycle s | samples/s per GPU | model TFLOP per cycle | MFU | MFU measured | HFU (recompute counted) | "
        "HFU measured | peak GiB | held GiB | x reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "precompute_error" in result:
        return "\n".join(lines[:1] + ["", f"precompute failed: {result['precompute_error']}"]) + "\n"
    for label, m in result["runs"].items():
        name = label + (f" ({', '.join(m['overrides'])})" if m.get("overrides") and label not in MODES else "")
        if "error" in m:
            lines.append(f"| {name} | {m['error']} | | | | | | | {_fmt(m.get('peak_memory_gib'), '.1f')} | | |")
            continue
        ratio = 1.0 if label == "reference" else result.get("ratios", {}).get(f"{label}_vs_reference")
        lines.append(f"| {name} | {m['cycle_s']:.3g} | {m['samples_per_s_per_gpu']:.3g} | "
                     f"{_fmt(m['model_flops_per_cycle'] / 1e12, '.4g')} | {_pct(m['mfu'])} | {_pct(m['mfu_measured'])} | "
                     f"{_pct(m['hfu'])} | {_pct(m['hfu_measured'])} | "
                     f"{_fmt(m['peak_memory_gib'], '.1f')} | {_fmt(m.get('held_memory_gib'), '.1f')} | "
                     f"{_fmt(ratio, '.2f')}{'x' if ratio else ''} |")
    p = result["precompute"]
    lines += ["", f"Precompute: {p['anchors_per_s_per_gpu']:.3g} anchors/s per GPU (batch {p['batch']}, writing "
                  f"{p['write_share'] * 100:.0f}% of the time); the teacher's guided passes alone bound it at "
                  f"{p['bound_anchors_per_s_per_gpu']:.3g} ({p['efficiency'] * 100:.0f}% of the bound)."]
    for label, m in result["runs"].items():
        if m.get("cycle_s_all"):
            cycles = ", ".join(f"{x:.2f}" for x in m["cycle_s_all"])
            line = f"{label}: timed cycles {cycles} s"
            if m.get("gc_s_all"):
                objects = m.get("gc_objects") or {}
                line += (f"; Python's garbage collector {statistics.median(m['gc_s_all']):.3f} s per cycle (median; "
                         f"{sum(m.get('gc_full_all', []))} full collections in all), {objects.get('tracked', 0):,} "
                         f"objects tracked after the warm-up, {objects.get('frozen', 0):,} frozen")
            lines += ["", line + "."]
        mem = m.get("memory")
        if mem and "error" not in mem:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in mem["by_part_gib"].items())
            lines += ["", f"Peak memory of one {label} cycle by part, GiB (allocated at its start "
                          f"{mem['start_gib']:.1f}, reserved at its end {mem.get('reserved_gib', float('nan')):.1f}): "
                          f"{parts}."]
            held = mem.get("held_blocks") or {}
            if held.get("top"):
                sizes = ", ".join(f"{b['count']} x {b['mib']:.1f} MiB" for b in held["top"])
                lines += ["", f"Held at its start, by block size ({held['total_gib']:.1f} GiB): {sizes}; "
                              f"{held['other_gib']:.1f} GiB in {held['other_sizes']} other sizes."]
        elif mem:
            lines += ["", f"Memory reading of {label} failed: {mem['error']}"]
        prof = m.get("profile")
        if prof and "error" not in prof:
            kinds = ", ".join(f"{k} {v:.2f} s" for k, v in prof["by_kind_s"].items())
            lines += ["", f"Profile of one {label} cycle ({prof['wall_s']:.2f} s wall, GPU busy "
                          f"{prof['busy_share'] * 100:.0f}%): {kinds}."]
            idle = prof.get("idle") or {}
            if "idle_s" in idle:
                def top(key: str, n: int = 6) -> str:
                    return ", ".join(f"{k} {v:.2f} s" for k, v in list(idle[key].items())[:n])
                lines += [f"GPU idle {idle['idle_s']:.2f} s in {idle['stretches']} stretches; by region: "
                          f"{top('by_region_s')}; by operator: {top('by_outer_op_s')}; host waits for the GPU: "
                          f"{idle['host_syncs']}."]
    return "\n".join(lines) + "\n"


# What two runs must share for their per-GPU throughputs to compare: the model (results from before the family
# setting are SD3's) and each GPU's work per cycle
SCALING_SAME = {"family": lambda r: r.get("model", {}).get("family", "sd3"),
                "network": lambda r: r.get("model", {}).get("network"),
                "resolution": lambda r: r.get("settings", {}).get("resolution"),
                "batch": lambda r: r.get("settings", {}).get("batch"),
                "critic updates": lambda r: r.get("settings", {}).get("critic_updates")}


def scaling(one: Path, two: Path) -> str:
    """1 -> N GPU scaling efficiency per run: per-GPU throughput on N over per-GPU throughput on 1."""
    a, b = (json.loads((Path(p) / "gpu_cycle.json").read_text()) for p in (one, two))
    differ = [f"{name} {get(a)!r} against {get(b)!r}" for name, get in SCALING_SAME.items() if get(a) != get(b)]
    if differ:
        raise ValueError(f"--scaling: {one} and {two} measured different work per GPU ({'; '.join(differ)}); "
                         "compare two runs of the same --family, --layers, --resolution, --batch and "
                         "--critic-updates")
    lines = [f"| run | {a['world_size']} GPU samples/s per GPU | {b['world_size']} GPU samples/s per GPU | "
             "scaling efficiency |", "|---|---|---|---|"]
    for label in a["runs"]:
        x, y = (r["runs"].get(label, {}).get("samples_per_s_per_gpu") for r in (a, b))
        if x and y:
            lines.append(f"| {label} | {x:.3g} | {y:.3g} | {y / x * 100:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.scaling:
        try:
            print(scaling(*args.scaling), end="")
        except ValueError as err:
            print(err, file=sys.stderr)
            return 2
        return 0
    if args.child:
        return child_main(args)
    if "RANK" in os.environ:
        raise SystemExit("run the benchmark itself without torchrun: --gpus N starts each run under torchrun")
    result = parent_main(args, argv)
    print(markdown(result), end="")
    print(f"\n[bench] {Path(args.out) / 'gpu_cycle.json'} and {Path(args.out) / 'gpu_cycle.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
