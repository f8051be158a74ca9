"""The DP-DMD cycle at SD3.5-Medium scale: throughput, MFU, memory, precompute, against the reference structure.

Every mode runs workers.train.train, the function Ray Train workers run, on SD3.5-Medium's exact transformer
with random weights (models.sd3.random_teacher), 1024 x 1024 images (16 x 128 x 128 latents), prompt
embeddings of the real shapes (77 CLIP + 256 T5 tokens x 4096, pooled 2048), bf16, DeepSpeed ZeRO engines:

  ours       anchors and prompt embeddings from a trajectory store written by this run's precompute,
             read ahead on a background thread; the trainer holds no text encoder
  inline     the precompute effect alone: embeddings from the store, but the K-step guided teacher anchor
             rollout inside every generator step; every other setting as ours
  reference  what the reference script does: eager networks, prompts encoded in the loop by full-size random
             CLIP-L, CLIP-G and T5-XXL held by the trainer, the anchor rollout inside every generator step

Figures, per GPU, medians over --steps cycles after --warmup (one cycle = --critic-updates critic updates +
one generator update, --batch rows each): cycle seconds, samples/s (rows consumed per second), model FLOPs
of one cycle (torch.utils.flop_counter over one warm-up cycle), MFU against a bf16 matmul peak measured
here, peak GPU memory; precompute anchors/s against the bound of the teacher's own forward passes.
Writes <out>/gpu_cycle.json and <out>/gpu_cycle.md (a table for BENCHMARKS.md). Imports neither Ray nor MLflow.

    python -m benchmarks.gpu_cycle --out outputs/bench/1gpu                                  # one GPU
    torchrun --standalone --nproc_per_node 2 -m benchmarks.gpu_cycle --out outputs/bench/2gpu  # two GPUs
    python -m benchmarks.gpu_cycle --scaling outputs/bench/1gpu outputs/bench/2gpu            # 1 -> 2 scaling
    python -m benchmarks.gpu_cycle --smoke --out /tmp/bench-smoke                             # CPU, tiny SD3

Speed options, each measurable on its own: --compile (torch.compile per transformer block, ours and
inline), --gradient-checkpointing (generator and critic), --prefetch 0 (read batches in the loop),
--zero-stage, --layers N (the first N of the 24 blocks, e.g. to fit one GPU). On one 80 GB GPU the full
generator + critic + AdamW state does not fit (36-45 GB per engine unsharded); a mode that runs out of
memory is recorded as such with its peak, and the run goes on to the next mode.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see BENCHMARKS.md: spinning OpenMP threads on shared CPUs

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks import random_sd3  # noqa: E402
from models.rollout import teacher_anchor  # noqa: E402
from models.sampling import seeded_noise  # noqa: E402
from models.flow import sampling_sigmas  # noqa: E402
from orchestrator.recipe import resolve  # noqa: E402
from workers.anchors import compute_anchors  # noqa: E402
from workers.config import RunConfig  # noqa: E402
from workers.context import LocalContext  # noqa: E402
from workers.batches import PromptBatch, TrainingData  # noqa: E402
from workers.distill import Progress  # noqa: E402
from workers.engines import init_distributed  # noqa: E402
from workers.prefetch import prefetched  # noqa: E402
from workers.train import store_source, train  # noqa: E402

MODES = ("reference", "inline", "ours")  # in run order: the text encoders are freed after the reference
NUM_PROMPTS = 16


# ----------------------------------------------------------------------------------------------------
# Settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_cycle", description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="all", help="all, or a comma list of " + ", ".join(MODES))
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="rows per GPU per update")
    p.add_argument("--critic-updates", type=int, default=5, help="critic updates per generator update")
    p.add_argument("--anchor-step", type=int, default=5, help="K: teacher ODE steps to the anchor")
    p.add_argument("--steps", type=int, default=10, help="timed cycles per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed cycles first (compilation, allocator)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (ours and inline)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--prefetch", type=int, default=2, help="batches read ahead on a thread (0: in the loop)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--layers", type=int, default=0, help="use the first N transformer blocks (0: all)")
    p.add_argument("--precompute-rows", type=int, default=32, help="rows the precompute writes (per run)")
    p.add_argument("--precompute-batch", type=int, default=4, help="rows per precompute batch and shard")
    p.add_argument("--smoke", action="store_true", help="tiny SD3 and encoders on CPU, 2 timed cycles")
    p.add_argument("--out", default="outputs/bench")
    p.add_argument("--scaling", nargs=2, metavar=("ONE_GPU_OUT", "TWO_GPU_OUT"),
                   help="compare two earlier runs' JSON (same per-GPU batch) and print the scaling efficiency")
    args = p.parse_args(argv)
    if args.smoke:
        args.resolution = random_sd3.SMOKE_RESOLUTION
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    args.modes = MODES if args.mode == "all" else tuple(m for m in MODES if m in args.mode.split(","))
    unknown = set(args.mode.split(",")) - set(MODES) - {"all"}
    if unknown or not args.modes:
        p.error(f"--mode: unknown {sorted(unknown)}; use all or a comma list of {', '.join(MODES)}")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1 (FLOPs are counted over the last warm-up cycle)")
    return args


def run_config(args: argparse.Namespace, use_gpu: bool, world_size: int, compile: bool) -> RunConfig:
    """The paper's recipe (sd35m) with the benchmark's settings; teacher.path is never read (the teacher is
    built in code and handed to train)."""
    checkpointing = str(args.gradient_checkpointing).lower()
    return resolve("sd35m", [
        f"teacher.resolution={args.resolution}", f"loss.anchor_step={args.anchor_step}",
        f"schedule.critic_updates_per_generator={args.critic_updates}",
        f"schedule.num_generator_updates={args.warmup + args.steps}", "schedule.checkpoint_every=0",
        f"schedule.log_every={args.warmup + args.steps}",
        f"generator.gradient_checkpointing={checkpointing}", f"critic.gradient_checkpointing={checkpointing}",
        f"distributed.num_workers={world_size}", f"distributed.use_gpu={str(use_gpu).lower()}",
        f"distributed.zero_stage={args.zero_stage}", f"distributed.batch_size_per_worker={args.batch}",
        f"distributed.compile={str(compile).lower()}", f"trajectories.batch_size={args.precompute_batch}",
        f"trajectories.rows_per_shard={args.precompute_batch}", f"storage.output_dir={args.out}"])


# ----------------------------------------------------------------------------------------------------
# Measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """The GPU's measured bf16 matrix-multiply rate (FLOP/s), the denominator of MFU; NaN on CPU."""
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


def peak_memory_gib(device: torch.device) -> float:
    """This rank's peak allocated GPU memory since the last reset, the largest over ranks; NaN on CPU."""
    if device.type != "cuda":
        return float("nan")
    peak = torch.tensor(float(torch.cuda.max_memory_allocated(device)), device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return peak.item() / 2**30


def live_text_encoders() -> list[str]:
    """Class names of every transformers model alive in this process (the text encoders are the only ones)."""
    import warnings

    from transformers import PreTrainedModel

    gc.collect()
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        return sorted(type(o).__name__ for o in gc.get_objects() if isinstance(o, PreTrainedModel))


class CycleClock:
    """train's on_cycle hook: times each cycle between device-synchronised marks, counts the FLOPs of the last
    warm-up cycle, and notes which text encoders are alive while the trainer runs."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.seconds: list[float] = []
        self.flops = 0
        self.counter: FlopCounterMode | None = None
        self.text_encoders: list[str] | None = None
        self.mark = 0.0

    def start(self) -> None:
        if self.warmup == 1:  # the counted cycle is the first: count from the start of train
            self._count()

    def _count(self) -> None:
        self.counter = FlopCounterMode(display=False)
        self.counter.__enter__()

    def __call__(self, progress: Progress, metrics: dict) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        step = progress.generator_updates
        if step > self.warmup:
            self.seconds.append(now - self.mark)
        if step == self.warmup:
            self.counter.__exit__(None, None, None)
            self.flops, self.counter = self.counter.get_total_flops(), None
        if self.text_encoders is None:
            self.text_encoders = live_text_encoders()
        if step == self.warmup - 1:
            self._count()
        self.mark = time.perf_counter()


# ----------------------------------------------------------------------------------------------------
# Data sources (workers.train.DataSource) for the modes the store does not serve


def reference_source(adapter, teacher, prompts: list[str], device):
    """The reference script's data path: every batch's prompts encoded in the loop, and on generator
    batches the K-step guided teacher rollout from fresh noise (compute_anchors encodes the empty prompt
    too)."""
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
    teacher's K guided steps from its eps: the precompute effect alone."""
    def source(config, ctx, progress):
        t = config.teacher
        sigmas = sampling_sigmas(t.num_steps, t.shift).to(device)
        uncond = negative.to(device)
        data = reader(config, ctx, progress)

        def anchors():
            for batch in data.anchors:
                batch = batch.to(device)
                fn = adapter.velocity_fn(teacher, batch.cond, uncond.expand(len(batch.eps)), t.guidance_scale)
                batch.z = teacher_anchor(fn, batch.eps, sigmas, config.loss.anchor_step).z
                yield batch
        return TrainingData(anchors(), data.prompts, data.rows_available)
    return source


def prefetching(reader, device, depth: int):
    if depth <= 0:
        return reader

    def source(config, ctx, progress):
        data = reader(config, ctx, progress)
        return TrainingData(prefetched(data.anchors, device, depth), prefetched(data.prompts, device, depth),
                            data.rows_available)
    return source


# ----------------------------------------------------------------------------------------------------
# Precompute: the trajectory store ours and inline read, and its throughput


def precompute(config: RunConfig, args, adapter, teacher, prompts, device, dtype, rank: int, world: int):
    """Anchors and embeddings for --precompute-rows rows into a store under <out>/store (shards split over
    ranks), timed per shard; the bound is --precompute-batch rows per K guided teacher passes."""
    import shutil

    from workers.schema import batch_to_table
    from workers.store import StoreSpec, filesystem, open_store, shards_needed, verified_shards, write_manifest, \
        write_negative, write_shard

    # At least --precompute-rows, and every anchor row the timed run consumes (no row twice, as in distill)
    num_shards = max(-(-args.precompute_rows // args.precompute_batch), shards_needed(config, len(prompts), world))
    spec = StoreSpec({"family": "sd3", "model": "random-weights", "resolution": args.resolution, "layers": args.layers,
                      "anchor_step": args.anchor_step, "smoke": args.smoke}, prompts, 0, args.precompute_batch,
                     num_shards)
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

    # The bound: the K guided teacher passes (a doubled batch each) and nothing else.
    t = config.teacher
    cond = store.negative().expand(args.precompute_batch).to(device)
    eps = torch.randn(args.precompute_batch, *adapter.latent_shape).to(device)
    fn = adapter.velocity_fn(teacher, cond, cond, t.guidance_scale)
    sigmas = sampling_sigmas(t.num_steps, t.shift).to(device)
    rollout_s = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        teacher_anchor(fn, eps, sigmas, args.anchor_step)
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
    return store, result


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------------
# The modes


def run_mode(mode: str, config: RunConfig, args, teacher_pair, source, negative, device, peak_flops: float) -> dict:
    """One mode through workers.train.train; its figures, or the error that stopped it (out of memory)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    clock = CycleClock(args.warmup, device)
    ctx = LocalContext(Path(args.out) / "runs" / mode, resume=False)
    result: dict = {"mode": mode, "compile": config.distributed.compile}
    try:
        clock.start()
        train(config, ctx, source, negative, teacher=teacher_pair, on_cycle=clock, save=False)
    except torch.cuda.OutOfMemoryError as err:
        result["error"] = f"out of memory: {str(err).splitlines()[0]}"
    finally:
        if clock.counter is not None:
            clock.counter.__exit__(None, None, None)
    result["peak_memory_gib"] = peak_memory_gib(device)
    if "error" in result:
        return result
    cycle_s = statistics.median(clock.seconds)
    rows = args.batch * (args.critic_updates + 1)
    result.update(cycle_s=cycle_s, cycle_s_all=clock.seconds, samples_per_s_per_gpu=rows / cycle_s,
                  flops_per_cycle=clock.flops, tflops_per_s_per_gpu=clock.flops / cycle_s / 1e12,
                  mfu=clock.flops / cycle_s / peak_flops, text_encoders_in_trainer=clock.text_encoders,
                  # FLOPs as executed: with gradient checkpointing they include the recomputed forward passes
                  recompute_counted=config.generator.gradient_checkpointing or config.critic.gradient_checkpointing)
    return result


def teacher_forward_flops(adapter, teacher, cond, batch: int, device, dtype) -> int:
    """FLOPs of one teacher forward pass at batch rows (the unit the anchor rollout costs 2 K of)."""
    x = torch.zeros(batch, *adapter.latent_shape, device=device, dtype=dtype)
    t = torch.ones(batch, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter.velocity(teacher, x, t, cond.expand(batch).to(device, dtype))
    return counter.get_total_flops()


def benchmark(args: argparse.Namespace) -> dict:
    use_gpu = torch.cuda.is_available() and not args.smoke
    init_distributed(use_gpu)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = LocalContext(Path(args.out)).device(use_gpu)
    dtype = torch.bfloat16
    peak_flops = matmul_peak(device)
    prompts = random_sd3.prompts(NUM_PROMPTS)
    adapter, teacher = random_sd3.teacher(args.smoke, args.resolution, device, dtype, args.layers)
    text = random_sd3.text_pipeline(args.smoke, device, dtype)
    from models.sd3 import SD3Adapter

    text_adapter = SD3Adapter(adapter.resolution, adapter.latent_channels, adapter.vae_scale_factor,
                              adapter.scheduler, text_pipeline=text)
    eager = run_config(args, use_gpu, world, compile=False)
    tuned = run_config(args, use_gpu, world, compile=args.compile)
    store, precompute_result = precompute(eager, args, text_adapter, teacher, prompts, device, dtype, rank, world)
    negative = store.negative()
    modes: dict[str, dict] = {}
    if "reference" in args.modes:
        modes["reference"] = run_mode("reference", eager, args, (text_adapter, teacher),
                                      reference_source(text_adapter, teacher, prompts, device), None,
                                      device, peak_flops)
    del text, text_adapter  # from here on no text encoder exists in this process
    reader = prefetching(store_source(store), device, args.prefetch)
    if "inline" in args.modes:
        modes["inline"] = run_mode("inline", tuned, args, (adapter, teacher),
                                   inline_anchor_source(reader, adapter, teacher, negative, device),
                                   negative, device, peak_flops)
    if "ours" in args.modes:
        modes["ours"] = run_mode("ours", tuned, args, (adapter, teacher), reader, negative, device, peak_flops)

    # ours_vs_X: measured throughput of ours over X's; flops_X_over_ours: the ideal of that ratio from FLOPs.
    ratios = {}
    ours = modes.get("ours", {})
    for other in ("reference", "inline"):
        theirs = modes.get(other, {})
        if "cycle_s" in ours and "cycle_s" in theirs:
            ratios[f"ours_vs_{other}"] = ours["samples_per_s_per_gpu"] / theirs["samples_per_s_per_gpu"]
            ratios[f"flops_{other}_over_ours"] = theirs["flops_per_cycle"] / ours["flops_per_cycle"]
    return {
        "benchmark": "gpu_cycle", "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if use_gpu else "cpu", "world_size": world,
        "torch": torch.__version__, "matmul_peak_tflops": peak_flops / 1e12,
        "settings": {k: v for k, v in vars(args).items() if k not in ("modes", "scaling")},
        "model": {"transformer": random_sd3.transformer_config(args.smoke, args.layers),
                  "parameters": sum(p.numel() for p in teacher.parameters()),
                  "latent_shape": list(adapter.latent_shape),
                  "conditioning": {k: list(v.shape[1:]) for k, v in negative.tensors.items()},
                  "teacher_forward_flops_per_row": teacher_forward_flops(adapter, teacher, negative, 1, device,
                                                                         dtype)},
        "precompute": precompute_result, "modes": modes, "ratios": ratios,
    }


# ----------------------------------------------------------------------------------------------------
# Reporting


def _fmt(value, spec: str = ".3g", missing: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return missing
    return format(value, spec)


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"{result['device']} x {result['world_size']}, {result['date']}, torch {result['torch']}; "
        f"bf16 matmul peak {_fmt(result['matmul_peak_tflops'], '.0f')} TFLOP/s; batch {s['batch']} per GPU, "
        f"{s['critic_updates']} critic updates per generator update, K = {s['anchor_step']}, "
        f"{s['resolution']} px, ZeRO-{s['zero_stage']}, compile {s['compile']}, "
        f"checkpointing {s['gradient_checkpointing']}, prefetch {s['prefetch']}; "
        f"median of {s['steps']} cycles after {s['warmup']}.",
        "",
        f"| mode | cycle s | samples/s per GPU | TFLOP per cycle | TFLOP/s per GPU | "
        f"{'HFU (recompute counted)' if s['gradient_checkpointing'] else 'MFU'} | peak GiB | ours is |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["modes"].items():
        if "error" in m:
            lines.append(f"| {name} | {m['error']} | | | | | {_fmt(m['peak_memory_gib'], '.1f')} | |")
            continue
        ratio = 1.0 if name == "ours" else result["ratios"].get(f"ours_vs_{name}")
        lines.append(f"| {name} | {m['cycle_s']:.3g} | {m['samples_per_s_per_gpu']:.3g} | "
                     f"{m['flops_per_cycle'] / 1e12:.4g} | {_fmt(m['tflops_per_s_per_gpu'])} | "
                     f"{_fmt(m['mfu'] * 100, '.1f')}{'%' if m['mfu'] == m['mfu'] else ''} | "
                     f"{_fmt(m['peak_memory_gib'], '.1f')} | {_fmt(ratio, '.2f')}{'x' if ratio else ''} |")
    p = result["precompute"]
    lines += ["", f"Precompute: {p['anchors_per_s_per_gpu']:.3g} anchors/s per GPU (batch {p['batch']}, writing "
                  f"{p['write_share'] * 100:.0f}% of the time); the teacher's K guided passes alone bound it at "
                  f"{p['bound_anchors_per_s_per_gpu']:.3g} ({p['efficiency'] * 100:.0f}% of the bound)."]
    return "\n".join(lines) + "\n"


def scaling(one: Path, two: Path) -> str:
    """1 -> N GPU scaling efficiency per mode: per-GPU throughput on N over per-GPU throughput on 1."""
    a, b = (json.loads((Path(p) / "gpu_cycle.json").read_text()) for p in (one, two))
    lines = [f"| mode | {a['world_size']} GPU samples/s per GPU | {b['world_size']} GPU samples/s per GPU | "
             "scaling efficiency |", "|---|---|---|---|"]
    for mode in MODES:
        x, y = (r["modes"].get(mode, {}).get("samples_per_s_per_gpu") for r in (a, b))
        if x and y:
            lines.append(f"| {mode} | {x:.3g} | {y:.3g} | {y / x * 100:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scaling:
        print(scaling(*args.scaling), end="")
        return 0
    result = benchmark(args)
    if torch.distributed.get_rank() == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_cycle.json").write_text(json.dumps(result, indent=1))
        (out / "gpu_cycle.md").write_text(markdown(result))
        print(markdown(result), end="")
        print(f"\n[bench] {out / 'gpu_cycle.json'} and {out / 'gpu_cycle.md'}")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
