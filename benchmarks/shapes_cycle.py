"""The shapes domain's training cycle on one GPU: a trial trained alone by workers.train.train (DeepSpeed
engines) against trials trained together by workers.trials (one batched computation per process).

A cycle is schedule.critic_updates_per_generator critic updates and one generator update. Figures: seconds per
cycle (the mean over --cycles cycles after --warmup, between device-synchronised marks), trial cycles per
second, peak GPU memory, and from torch.profiler over one cycle the kernels launched, the host syncs
(cudaStreamSynchronize, synchronous copies, aten item reads) and the GPU's busy time. Writes <out>/shapes_cycle.json.

    python -m benchmarks.shapes_cycle --out outputs/bench/shapes                     # GPU: every variant
    python -m benchmarks.shapes_cycle --out /tmp/s --cycles 2 --warmup 1 --trials 2 --alone fp32 --smoke   # CPU
    python -m benchmarks.shapes_cycle --out /tmp/m --trials 5 --alone "" --methods dmd,dp-dmd,dmd-regression,dmd-gan

Imports neither Ray nor MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from benchmarks.gaps import gpu_work  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shapes_cycle", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/bench/shapes")
    p.add_argument("--cycles", type=int, default=10, help="timed cycles per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed cycles first")
    p.add_argument("--trials", default="1,6,12", help="comma list: trials trained together (N, N:folded for fused "
                                                      "attention once for all trials, or N:sdpa for the network's "
                                                      "fused attention run once per trial; a +compile suffix, "
                                                      "N:classic+compile or +compile=MODE, trains them with "
                                                      "distributed.compile=true and that compile_mode)")
    p.add_argument("--alone", default="bf16,fp32", help="comma list of precisions for a trial trained alone by train")
    p.add_argument("--methods", default="dp-dmd", help="comma list of loss.method values, each measured in every "
                                                       "variant (dmd-regression and dmd-gan read a store of teacher samples)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny teacher built in code")
    return p.parse_args(argv)


def base_config(args, precision: str, cycles: int, seed: int = 0, weight: float = 0.05, method: str = "dp-dmd",
                overrides: tuple[str, ...] = ()):
    from orchestrator.recipe import resolve

    gpu = torch.cuda.is_available() and not args.smoke
    extra = []
    if args.smoke:
        extra = [f"teacher.path={Path(args.out) / 'tiny-teacher'}", "teacher.num_steps=6", "loss.anchor_step=2",
                 "schedule.critic_updates_per_generator=2"]
    return resolve("shapes", [f"distributed.use_gpu={str(gpu).lower()}", f"distributed.precision={precision}",
                              f"distributed.batch_size_per_worker={args.batch}", f"schedule.num_generator_updates={cycles}",
                              "schedule.checkpoint_every=0", f"schedule.log_every={cycles}", "trajectories.batch_size=512",
                              "trajectories.rows_per_shard=1024", f"trajectories.gpus_per_actor={int(gpu)}",
                              f"storage.output_dir={args.out}", f"seed={seed}", f"loss.diversity_weight={weight}",
                              f"loss.method={method}", *extra, *overrides])


class Clock:
    """Synchronised marks at the end of the warm-up and of the timed cycles; a profile of the cycle after."""

    def __init__(self, warmup: int, cycles: int, device: torch.device, profile: bool):
        self.warmup, self.cycles, self.device, self.profile = warmup, cycles, device, profile
        self.marks: dict[str, float] = {}
        self.profiler = None
        self.summary: dict = {}

    def __call__(self, step: int) -> None:
        if step in (self.warmup, self.warmup + self.cycles) or step == self.warmup + self.cycles + 1:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            if step == self.warmup:
                self.marks["start"] = now
            elif step == self.warmup + self.cycles:
                self.marks["end"] = now
                if self.profile:
                    from torch.profiler import ProfilerActivity, profile

                    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
                    self.profiler = profile(activities=activities)
                    self.profiler.__enter__()
                    self.marks["profile_start"] = now
            elif self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                self.summary = summarise(self.profiler, now - self.marks["profile_start"])
                self.profiler = None

    @property
    def cycle_s(self) -> float:
        return (self.marks["end"] - self.marks["start"]) / self.cycles


def summarise(prof, wall_s: float) -> dict:
    events = prof.events()
    names = Counter(e.name for e in events)
    # kernels, copies and memsets: not the GPU-timeline mirrors of the cycle's record_function regions, whose spans
    # (nested, overlapping the kernels) once counted as busy time too (a 12-trial cycle read 559% busy)
    kernels = [e for e in events if gpu_work(e)]
    busy_us = sum(e.device_time for e in kernels) if kernels else 0.0
    syncs = {k: v for k, v in names.items() if k in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
                                                       "cudaEventSynchronize", "aten::_local_scalar_dense", "aten::item")}
    launches = sum(v for k, v in names.items() if k in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                          "cuLaunchKernelEx", "cudaGraphLaunch"))
    top = []
    try:
        averages = sorted(prof.key_averages(), key=lambda a: -getattr(a, "self_device_time_total", 0))[:15]
        top = [(a.key[:90], a.count, getattr(a, "self_device_time_total", 0) / 1e6) for a in averages]
    except Exception:  # noqa: BLE001
        pass
    return {"top_device_time_s": top, "wall_s": wall_s, "kernels": len(kernels), "launch_calls": launches, "gpu_busy_s": busy_us / 1e6,
            "busy_share": busy_us / 1e6 / wall_s if wall_s else float("nan"), "host_syncs": syncs,
            "aten_ops": sum(v for k, v in names.items() if k.startswith("aten::"))}


def store_for(args, config):
    from orchestrator.precompute import precompute

    store, summary = precompute(config, use_ray=False, progress=False)
    print(summary, flush=True)
    return store


def _named(variant: str, method: str) -> str:
    return variant if method == "dp-dmd" else f"{variant}, {method}"


def measure_alone(args, precision: str, device, method: str = "dp-dmd") -> dict:
    from workers.context import LocalContext
    from workers.train import store_source, train

    total = args.warmup + args.cycles + 1
    config = base_config(args, precision, total, method=method)
    store = store_for(args, config)
    clock = Clock(args.warmup, args.cycles, device, args.profile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(config, LocalContext(Path(args.out) / f"alone-{precision}-{method}", resume=False), store_source(store),
          store.negative(), on_cycle=lambda progress, metrics: clock(progress.generator_updates), save=False)
    return {"variant": _named(f"alone, {precision}, ZeRO-{config.distributed.zero_stage}", method), "trials": 1,
            "cycle_s": clock.cycle_s, "trial_cycles_per_s": 1 / clock.cycle_s, "profile": clock.summary,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}


def parse_together(what: str) -> tuple[int, str, str | None]:
    """"12", "12:folded", "12:classic+compile", "12+compile=max-autotune-no-cudagraphs" -> (trials, attention,
    torch.compile mode: None without +compile, "default" for a bare +compile)."""
    what, _, compile_part = what.partition("+")
    n, _, attention = what.partition(":")
    mode = None
    if compile_part:
        name, _, value = compile_part.partition("=")
        if name != "compile":
            raise ValueError(f"unknown suffix +{compile_part} in {what!r}: +compile or +compile=MODE")
        mode = value or "default"
    return int(n), attention or "classic", mode


def measure_together(args, what: str, device, method: str = "dp-dmd") -> dict:
    from workers.trials import train_trials

    n, attention, mode = parse_together(what)
    total = args.warmup + args.cycles + 1
    compiling = () if mode is None else ("distributed.compile=true", f"distributed.compile_mode={mode}")
    configs = [base_config(args, "fp32", total, seed=i % 3, weight=(0.0, 0.05, 0.2, 0.5)[i // 3 % 4], method=method,
                           overrides=compiling) for i in range(n)]
    store = store_for(args, configs[0])
    clock = Clock(args.warmup, args.cycles, device, args.profile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dirs = [Path(args.out) / f"together-{n}-{method}" / str(i) for i in range(n)]
    train_trials(configs, dirs, store, on_cycle=lambda step, metrics: clock(step), save=False, attention=attention)
    compiled = "" if mode is None else ", compiled" if mode == "default" else f", compiled ({mode})"
    return {"variant": _named(f"{n} together, fp32, {attention} attention{compiled}", method), "trials": n,
            "cycle_s": clock.cycle_s,
            "trial_cycles_per_s": n / clock.cycle_s, "profile": clock.summary,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda") if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    if args.smoke and not (out / "tiny-teacher").is_dir():
        from models.families.shapes import teacher as shapes

        shapes.save_teacher(*shapes.new_teacher(width=8, seed=0), out / "tiny-teacher")
    result = {"benchmark": "shapes_cycle", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "command": "python -m benchmarks.shapes_cycle " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": []}
    plans = [("alone", p) for p in args.alone.split(",") if p] + [("together", n) for n in args.trials.split(",") if n]
    for method in args.methods.split(","):
        for kind, what in plans:
            measure = measure_alone if kind == "alone" else measure_together
            try:
                m = measure(args, what, device, method)
            except Exception as err:  # noqa: BLE001  (recorded; the other variants still run)
                m = {"variant": _named(f"{kind} {what}", method), "error": repr(err)[:500]}
            result["runs"].append(m)
            print(json.dumps(m), flush=True)
            (out / "shapes_cycle.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


def table(result: dict) -> str:
    lines = [f"{result['device']}, torch {result['torch']}, {result['date']}", "",
             "| variant | s per cycle | trial cycles/s | kernels per cycle | host syncs per cycle | GPU busy | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for m in result["runs"]:
        if "error" in m:
            lines.append(f"| {m['variant']} | {m['error']} | | | | | |")
            continue
        prof = m.get("profile") or {}
        syncs = sum(prof.get("host_syncs", {}).values()) if prof else float("nan")
        lines.append(f"| {m['variant']} | {m['cycle_s']:.3f} | {m['trial_cycles_per_s']:.2f} | {prof.get('kernels', 'n/a')} | "
                     f"{syncs} | {prof.get('busy_share', float('nan')) * 100:.0f}% | {m['peak_gib']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.modules.update(ray=None, mlflow=None)
    sys.exit(main())
