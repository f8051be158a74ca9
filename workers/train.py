"""The train function every worker runs: build the engines, resume, then critic/generator cycles.

    train(config, LocalContext(run_dir))           # a single process, or one rank under torchrun
    workers.ray_worker.train_fn_per_worker(...)     # the same, under Ray Train
"""

from __future__ import annotations

import copy
import gc
import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from models.adapter import Conditioning, TeacherAdapter, cast
from models.families import get_family
from workers.anchors import InlineAnchors
from workers.batches import TrainingData
from workers.config import ConfigError, RunConfig
from workers.context import WorkerContext, checkpoint_name
from workers.cycle import CRITIC_METRICS, REGION
from workers.distill import Distiller, copy_for_training, critic_network
from workers.engines import build_engine, checkpoint_keeping_attention, compile_network, distributed
from workers.evaluate import GENERATOR_META, training_prompts
from workers.live_eval import PREFIX as LIVE
from workers.live_eval import LiveEvaluation, snapshot_generator
from workers.offload import ParkedNetwork
from workers.prefetch import prefetched
from workers.progress import Progress, read_progress, write_progress
from workers.teacher import load_teacher
from workers.tracking import metric_logger

GENERATOR_DIR = "generator"  # the export: what the family's pipeline class loads, safetensors and configs only
# DeepSpeed's checkpoint of each engine (pickled: its module and optimizer states), beside the export, never in it
ENGINE_TAGS = {"generator": "generator_engine", "critic": "critic_engine"}

DataSource = Callable[[RunConfig, WorkerContext, Progress], TrainingData]
"""source(config, ctx, progress) -> this rank's anchor and prompt streams, positioned where progress stands."""


def inline_source(adapter, teacher, device) -> DataSource:
    """Anchors computed with the teacher at every generator update, as the reference script does."""
    def source(config: RunConfig, ctx: WorkerContext, progress: Progress) -> TrainingData:
        if config.loss.method == "dmd-gan":
            raise ConfigError("loss.method", "dmd-gan's critic reads the teacher's samples of its rows from the "
                                             "trajectory store, which anchors computed at each update do not give: "
                                             "train from a store (dpdmd precompute, then distill)")
        anchors = InlineAnchors(config, adapter, teacher, training_prompts(config), ctx.rank, ctx.world_size, device)
        batch = config.distributed.batch_size_per_worker
        return TrainingData(anchors.batches(batch, progress.rows_consumed),
                            anchors.prompt_batches(batch, progress.prompt_rows_consumed))
    return source


def store_source(shared) -> DataSource:
    """This rank's share of the rows its run reads from a shared trajectory store (Store.for_run: the same rows
    however many other runs have added), read directly with pyarrow: generator updates take new anchor rows (at
    most trajectories.max_reuse passes, checked before training), critic updates read the prompts' conditioning
    only. On a GPU both are read ahead on threads (workers/prefetch.py):
    the loop waits for the GPU once per update (the finite vote, the metrics), and a read after that wait would
    leave the GPU idle for as long as the read takes."""
    def source(config: RunConfig, ctx: WorkerContext, progress: Progress) -> TrainingData:
        store = shared.for_run(config, ctx.world_size)  # the same rows however many the store holds now
        store.check_capacity(config, ctx.rank, ctx.world_size)
        batch = config.distributed.batch_size_per_worker
        anchors = store.batches(batch, ctx.rank, ctx.world_size, progress.rows_consumed, seed=config.seed,
                                max_epochs=config.trajectories.max_reuse)
        prompts = store.prompt_batches(batch, ctx.rank, ctx.world_size, progress.prompt_rows_consumed,
                                       seed=config.seed, with_samples=config.loss.method == "dmd-gan")
        device = ctx.device(config.distributed.use_gpu)
        if device.type == "cuda":
            anchors, prompts = prefetched(anchors, device), prefetched(prompts, device)
        return TrainingData(anchors, prompts, rows_available=store.rank_rows(ctx.rank, ctx.world_size))
    return source


def train(config: RunConfig, ctx: WorkerContext, source: DataSource | None = None,
          negative: Conditioning | None = None, mlflow_run: tuple[str, str] | None = None,
          teacher: tuple[TeacherAdapter, nn.Module] | None = None,
          on_cycle: Callable[[Progress, dict], None] | None = None, save: bool = True,
          live: LiveEvaluation | None = None) -> Progress:
    """Run (or resume) distillation to schedule.num_generator_updates. The final checkpoint also holds
    the exported generator (GENERATOR_DIR), ready for the sample command.

    source: where anchor and prompt batches come from (store_source); None computes anchors inline with
    the teacher, as the reference script does (slow: for comparison and benchmarks). negative: the empty-prompt
    conditioning (from the store); None encodes it here. mlflow_run: (tracking URI, run id) that rank 0
    logs step metrics into.

    For benchmarks: teacher, an (adapter, network) pair already frozen on this rank's device and dtype,
    replaces loading config.teacher (a network built in code, no download); on_cycle(progress, metrics)
    runs after every critic/generator cycle; save=False writes no checkpoints and exports nothing.

    live (rank 0): evaluation beside training (workers/live_eval.py): every evaluation.every generator
    updates a snapshot of the generator goes to it and training goes on; the newest finished result rides
    along in the next reports (live_* metrics), for Tune's schedulers and stoppers."""
    with distributed(config.distributed.use_gpu), ExitStack() as cleanup:
        return _train(config, ctx, source, negative, mlflow_run, teacher, on_cycle, save, live, cleanup)


def _train(config: RunConfig, ctx: WorkerContext, source: DataSource | None, negative: Conditioning | None,
           mlflow_run: tuple[str, str] | None, teacher: tuple[TeacherAdapter, nn.Module] | None,
           on_cycle: Callable[[Progress, dict], None] | None, save: bool, live: LiveEvaluation | None,
           cleanup: ExitStack) -> Progress:
    """train()'s body inside its cleanup stack, which destroys the engines (and hands back the parked teacher and
    the collector's frozen objects) whether it returns or raises."""
    device, dtype = _claim_device(config, ctx)
    torch.manual_seed(config.seed)  # identical initial weights on every rank

    # Training workers hold no text encoders: the store carries every row's prompt embeddings and the
    # empty prompt's. Only the inline (reference-script) structure encodes prompts here. The VAE only for the
    # regression baseline, which measures latent families on decoded images.
    adapter, teacher = teacher or load_teacher(config, device, dtype, text_encoders=source is None or negative is None,
                                               vae=config.loss.method == "dmd-regression")
    generator, critic, teacher_weights = _engines(config, teacher, device, cleanup)
    rng = torch.Generator().manual_seed(config.seed * 100_003 + ctx.rank)  # noise differs across ranks
    progress = _resume(ctx, generator, critic, rng)

    source = source or inline_source(adapter, teacher, device)
    data = source(config, ctx, progress)
    negative = negative if negative is not None else adapter.negative_conditioning(1)
    distiller = Distiller(config, adapter, teacher, generator, critic, device, rng, negative, ctx.all_finite,
                          teacher_weights)
    distiller.skipped = progress.skipped_steps
    logger = metric_logger(*(mlflow_run or (None, None)), ctx.rank)

    _cycles(_Run(config, ctx, device, adapter, generator, critic, rng, progress, data, distiller, logger, cleanup,
                 on_cycle, save, live))
    if live is not None:
        live.close()  # the snapshots still being scored: their results land in MLflow and live_eval.jsonl
    logger.close()
    return progress


@dataclass
class _Run:
    """What the cycles of one train() call share: the engines and the distiller that updates them, the data
    streams, where the run stands (progress and the noise RNG, both checkpointed) and where reports go."""

    config: RunConfig
    ctx: WorkerContext
    device: torch.device
    adapter: TeacherAdapter
    generator: Any  # DeepSpeed engines
    critic: Any
    rng: torch.Generator
    progress: Progress
    data: TrainingData
    distiller: Distiller
    logger: Any
    cleanup: ExitStack
    on_cycle: Callable[[Progress, dict], None] | None
    save: bool
    live: LiveEvaluation | None


def _claim_device(config: RunConfig, ctx: WorkerContext) -> tuple[torch.device, torch.dtype]:
    """This rank's device, made the process's current one on a GPU, and the dtype distributed.precision trains in."""
    device = ctx.device(config.distributed.use_gpu)
    if device.type == "cuda":  # the run owns its process's current device: NCCL and the allocator use it
        torch.cuda.set_device(device)
    return device, torch.bfloat16 if config.distributed.precision == "bf16" else torch.float32


def _engines(config: RunConfig, teacher: nn.Module, device: torch.device, cleanup: ExitStack):
    """The generator's and the critic's engines, trainable copies of the teacher that cleanup destroys; compiled
    with the teacher under distributed.compile. The third value is the teacher's weights parked in host memory
    under distributed.offload_teacher (None otherwise), which cleanup hands back."""
    dist = config.distributed
    generator = build_engine(_trainable(teacher, config.generator.gradient_checkpointing, "generator"),
                             config.generator.optim, config)
    critic = build_engine(critic_network(config, _trainable(teacher, config.critic.gradient_checkpointing, "critic")),
                          config.critic.optim, config)
    # DeepSpeed's gradient hooks hold each engine through autograd's C++ nodes, where Python's collector cannot see
    # the cycle: without destroy() every train() call would leave both engines and their optimizer state behind.
    for engine in (generator, critic):
        cleanup.callback(engine.destroy)
    if dist.compile:  # deep copies drop compiled code (Module.__getstate__), so compile after copying
        for net in (teacher, generator.module, getattr(critic.module, "net", critic.module)):  # dmd-gan: not the head
            compile_network(net, dist.compile_mode)
    teacher_weights = None
    if dist.offload_teacher:  # after the generator and critic were copied from the teacher on the device
        teacher_weights = ParkedNetwork(teacher, device)
        # handed back on the device when train() returns; after a failure, in host memory (no GPU memory needed)
        cleanup.push(lambda failed, *_: teacher_weights.restore(on_device=failed is None))
    return generator, critic, teacher_weights


def _resume(ctx: WorkerContext, generator, critic, rng: torch.Generator) -> Progress:
    """Where the run stands: the engines, the RNG and the progress from the newest checkpoint, or a fresh start."""
    progress = Progress()
    checkpoint = ctx.latest_checkpoint()
    if checkpoint is not None:
        # checkpoints written before the engines had tags of their own kept them in the export's directory
        tags = ENGINE_TAGS if (Path(checkpoint) / ENGINE_TAGS["generator"]).is_dir() else {k: k for k in ENGINE_TAGS}
        generator.load_checkpoint(str(checkpoint), tag=tags["generator"])
        critic.load_checkpoint(str(checkpoint), tag=tags["critic"])
        progress = read_progress(checkpoint, rng, ctx.rank)
        progress.resumes += 1
    return progress


def _cycles(run: _Run) -> None:
    """Critic/generator cycles until schedule.num_generator_updates, each handed to on_cycle, then logged,
    checkpointed and reported as the schedule asks."""
    progress, schedule = run.progress, run.config.schedule
    began, first = time.perf_counter(), progress.generator_updates
    while progress.generator_updates < schedule.num_generator_updates:
        start = time.perf_counter()
        critic_metrics = _critic_updates(run)
        metrics = _generator_update(run, first)
        step = progress.generator_updates
        _live_evaluation(run, step, metrics)
        _cycle_metrics(run, metrics, critic_metrics, time.perf_counter() - start)
        last = step == schedule.num_generator_updates
        if run.on_cycle is not None:
            run.on_cycle(progress, metrics)
        if step % schedule.log_every == 0 or last:
            _log(run, metrics, step, time.perf_counter() - began, first)
        if run.save and ((schedule.checkpoint_every and step % schedule.checkpoint_every == 0) or last):
            _checkpoint(run, metrics, step, last)
        elif step % schedule.log_every == 0:
            run.ctx.report(metrics)


def _critic_updates(run: _Run) -> list[dict[str, float]]:
    """The cycle's critic updates still due (schedule.critic_updates_per_generator less progress.cycle_position),
    each on its own prompt batch and the generator's samples for it; their metrics, in order."""
    progress = run.progress
    critic_metrics: list[dict[str, float]] = []
    with record_function(f"{REGION}data"):
        prompts = [next(run.data.prompts).to(run.device)
                   for _ in range(run.config.schedule.critic_updates_per_generator - progress.cycle_position)]
    for batch, x_gen in zip(prompts, run.distiller.generator_samples(prompts)):
        where = f"critic update {progress.critic_updates + 1} (generator update {progress.generator_updates + 1})"
        critic_metrics.append(run.distiller.critic_step(batch, x_gen, where))
        progress.cycle_position += 1
        progress.critic_updates += 1
        progress.prompt_rows_consumed += run.config.distributed.batch_size_per_worker
    return critic_metrics


def _generator_update(run: _Run, first: int) -> dict[str, float]:
    """The cycle's generator update on the next anchor batch, and its metrics. After this call's first one,
    what lives as long as the run is frozen for the collector (freeze_survivors)."""
    progress = run.progress
    where = f"generator update {progress.generator_updates + 1}"
    with record_function(f"{REGION}data"):
        anchors = run.data.next_anchors(where).to(run.device)
    metrics = run.distiller.generator_step(anchors, where)
    progress.generator_updates += 1
    if progress.generator_updates == first + 1:
        freeze_survivors(run.cleanup)
    progress.cycle_position = 0
    progress.rows_consumed += run.config.distributed.batch_size_per_worker
    progress.skipped_steps = run.distiller.skipped
    if run.data.rows_available:
        metrics["anchor_passes"] = progress.rows_consumed / run.data.rows_available
    return metrics


def _live_evaluation(run: _Run, step: int, metrics: dict) -> None:
    """Every evaluation.every generator updates a snapshot of the generator, for the live evaluation (rank 0);
    its newest finished result joins the metrics."""
    config, live = run.config, run.live
    if config.evaluation.every and step % config.evaluation.every == 0:
        snapshot = snapshot_generator(run.generator, config, run.ctx.rank)  # every rank: ZeRO-3 gathers collectively
        if live is not None:
            live.submit(step, snapshot)
    if live is not None:
        # Tune's schedulers refuse a report without their metric: until the first evaluation is back, NaN
        if config.sweep.metric.startswith(LIVE):
            metrics[config.sweep.metric] = float("nan")
        metrics.update(live.newest())


def _cycle_metrics(run: _Run, metrics: dict, critic_metrics: list[dict[str, float]], cycle_s: float) -> None:
    """The cycle's mean critic loss, where the run stands and how fast it goes, added to its metrics."""
    progress, batch_size = run.progress, run.config.distributed.batch_size_per_worker
    metrics.update({k: sum(m.get(k, 0.0) for m in critic_metrics) / len(critic_metrics)
                    for k in CRITIC_METRICS if k == "loss_critic" or any(k in m for m in critic_metrics)})
    metrics.update(generator_update=progress.generator_updates, critic_updates=progress.critic_updates,
                   resumes=progress.resumes, skipped_steps=progress.skipped_steps, cycle_s=cycle_s,
                   samples_per_s=batch_size * (run.config.schedule.critic_updates_per_generator + 1) / cycle_s)


def _log(run: _Run, metrics: dict, step: int, elapsed: float, first: int) -> None:
    """The metrics to the context's log, with the time left estimated from this call's pace, and to MLflow."""
    total = run.config.schedule.num_generator_updates
    run.ctx.log(metrics, total, elapsed, elapsed / (step - first) * (total - step))
    run.logger.log({k: v for k, v in metrics.items() if not k.startswith(LIVE)}, step)  # the evaluator logs those


def _checkpoint(run: _Run, metrics: dict, step: int, last: bool) -> None:
    """Both engines, the progress and the RNG into the step's checkpoint, with the exported generator after the
    last update; then the metrics are reported with it."""
    directory = run.ctx.checkpoint_staging_dir(checkpoint_name(step))
    run.generator.save_checkpoint(str(directory), tag=ENGINE_TAGS["generator"])
    run.critic.save_checkpoint(str(directory), tag=ENGINE_TAGS["critic"])
    write_progress(directory, run.progress, run.rng, run.ctx.rank)
    if last:
        export_generator(run.config, run.adapter, run.generator, directory / GENERATOR_DIR, run.ctx.rank)
    run.ctx.report(metrics, directory)


def freeze_survivors(cleanup: ExitStack) -> None:
    """After the first cycle, what lives as long as the run (networks, engines, optimizer state, the compiled
    blocks and their caches: about a million objects for SD3.5) goes to the collector's permanent generation
    (gc.freeze). Python's full collections, every few cycles, otherwise walk all of it while every thread waits
    on the interpreter lock and the GPU runs dry: 0.63-0.76 s each on one H200, 0.03 s frozen (BENCHMARKS.md).
    Collections still run on what the cycles allocate; cleanup gives the collector everything back when train()
    ends."""
    gc.collect()
    gc.freeze()
    cleanup.callback(gc.unfreeze)


def _trainable(teacher, gradient_checkpointing: bool | str, section: str):
    """A trainable copy of the teacher, with diffusers' activation checkpointing if asked for (true), or the
    selective kind that keeps attention outputs ("attention": checkpoint_keeping_attention)."""
    net = copy_for_training(teacher)
    key = f"{section}.gradient_checkpointing"
    if gradient_checkpointing == "attention":
        try:
            checkpoint_keeping_attention(net)
        except ValueError as err:
            raise ConfigError(key, f"'attention' needs a transformer with transformer_blocks (SD3): {err}; "
                                   "set it to true") from None
    elif gradient_checkpointing:
        if not getattr(net, "_supports_gradient_checkpointing", False):
            raise ConfigError(key, f"{type(net).__name__} does not support gradient checkpointing; set it to false")
        net.enable_gradient_checkpointing()
    return net


def export_generator(config: RunConfig, adapter, generator, export_dir: Path, rank: int) -> None:
    """The generator in the teacher family's format plus its few-step sampler: loads with the sample command."""
    from workers.engines import import_deepspeed

    deepspeed = import_deepspeed(config.distributed.use_gpu)  # trials trained together import it here first

    params = list(generator.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=config.distributed.zero_stage == 3):
        if rank == 0:
            export_dir.mkdir(parents=True, exist_ok=True)
            module = cast(copy.deepcopy(generator.module), torch.float32)
            get_family(config.teacher.family).save_teacher(adapter, module, export_dir)
            # The scheduler's set_timesteps(num_steps) visits exactly the sigmas the generator trained on;
            # they are also written out (flow times, and the scheduler's timesteps), so that any sampler can
            # be given them explicitly.
            num_steps = config.generator.num_steps
            scheduler = adapter.generator_scheduler(config.generator_shift)
            scheduler.save_pretrained(export_dir / "scheduler")
            scheduler.set_timesteps(num_steps, device="cpu")
            sigmas = adapter.sampling_sigmas(num_steps, config.generator_shift, "generator")
            (export_dir / GENERATOR_META).write_text(json.dumps({
                "family": config.teacher.family, "num_steps": num_steps,
                "shift": config.generator_shift, "guidance_scale": None,
                "sigmas": [float(s) for s in sigmas],
                "timesteps": [float(s) for s in scheduler.timesteps],
                "resolution": config.teacher.resolution}, indent=2))
