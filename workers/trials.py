"""Several trials of one teacher trained together in one process, as one batched computation: the fidelity
table's small-model trials without a process, a DeepSpeed engine and a stream of kernel launches per trial.

The trials differ only in their training seed and their loss weights (lambda, loss.diversity_weight, and the
baselines' weights; one loss.method for all). Their generator and critic
parameters are stacked on a leading trial dim and every network call runs all trials at once through
torch.func.vmap (StackedNetwork); the frozen teacher sees all trials' rows as one batch. Each trial does what
workers.train.train does with its own config: the same data streams and positions, the same noise from the
same RNG in the same order, the same cycle (workers/cycle.py, its losses applied per trial: TrialRows),
gradient clipping as DeepSpeed ZeRO does it and AdamW, in float32 (on a GPU with TF32 matrix products, see
train_trials; tests/test_trials.py compares the losses with train's on the CPU, for a flow and an epsilon
teacher). What differs is how it is run: no host sync per update (finiteness and metrics stay on the device
and are read every log interval). Every trial holds its own generator and critic with their optimizer state:
the small embedded teachers and small pretrained ones suit it; SD3's joint attention is refused.

    from workers.trials import train_trials
    results = train_trials(configs, run_dirs, store)          # one Progress (or error) per trial

A trial whose loss goes non-finite under schedule.on_nonfinite=raise stops (its updates are no longer
applied) and is reported as failed; the others go on. Checkpoints (checkpoints/step-N/trial.pt, progress.json,
the RNG) are written for every trial at the same update, so a stopped group continues from the newest update
all its trials saved.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

from models.adapter import Conditioning
from models.flow import sample_sigmas
from models.losses import NonFiniteLossError
from workers.batches import AnchorBatch, TrainingData, to_device
from workers.config import ConfigError, RunConfig
from workers.configure import to_dict
from workers.context import CHECKPOINTS, LocalContext, checkpoint_name, device_for
from workers.cycle import (CRITIC_METRICS, FiniteVote, Networks, TrialRows, critic_loss, generator_loss, generator_samples,
                           generator_update, teacher_samples)
from workers.distill import copy_for_training, critic_network
from workers.engines import allow_recompiles, compile_network
from workers.progress import Progress, read_progress, write_progress

TRIAL_STATE = "trial.pt"
# What may differ between the trials of one batch: everything else is one computation.
PER_TRIAL_KEYS = ("seed", "loss.diversity_weight", "loss.regression_weight", "loss.gan_generator_weight",
                  "loss.gan_critic_weight", "loss.detach_first_step", "tracking.run_name")


def check_batchable(configs: list[RunConfig]) -> None:
    """Refuse, naming the key and the fix, trials that cannot share one batched computation."""
    if not configs:
        raise ValueError("no trials to train")
    first = _flat(to_dict(configs[0]))
    for config in configs[1:]:
        for key, value in _flat(to_dict(config)).items():
            if key not in PER_TRIAL_KEYS and first.get(key) != value:
                raise ConfigError(key, f"trials trained together may differ only in {', '.join(PER_TRIAL_KEYS)}; "
                                       f"this one has {value!r} against {first.get(key)!r}: run them separately")
    config = configs[0]
    if config.distributed.num_workers != 1:
        raise ConfigError("distributed.num_workers", "trials trained together run in one process; set it to 1")
    if config.distributed.precision != "fp32":
        raise ConfigError("distributed.precision", "trials trained together train in fp32 (the same computation "
                                                   "as train's fp32); set distributed.precision=fp32")
    if config.distributed.offload_teacher:
        raise ConfigError("distributed.offload_teacher", "trials trained together keep their small teacher on the "
                                                         "device; set it to false")
    if config.teacher.family == "sd3":
        raise ConfigError("teacher.family", "trials trained together run attention as batched matrix products "
                                            "(diffusers' AttnProcessor), which has no form of SD3's joint attention; "
                                            "run sd3 trials one at a time (dpdmd fidelity --jobs)")
    if config.loss.method == "dmd-regression" and config.teacher.family in ("sd3", "sdxl"):
        raise ConfigError("loss.method", "trials trained together cannot run the regression remedy on a latent "
                                         "family: its VAE does not run under vmap (GroupNorm); run these trials one "
                                         "at a time (dpdmd fidelity --jobs)")
    for section in ("generator", "critic"):
        if getattr(config, section).optim.offload:
            raise ConfigError(f"{section}.optim.offload", "trials trained together keep their optimizer state on "
                                                          "the device (one stacked AdamW); set it to false")
        if getattr(config, section).gradient_checkpointing:
            raise ConfigError(f"{section}.gradient_checkpointing", "trials trained together keep their activations "
                                                                  "(no checkpointing); set it to false")


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ----------------------------------------------------------------------------------------------------
# Networks and optimizer over stacked trials


ATTENTION = ("classic", "folded", "sdpa")  # how stacked networks run attention (StackedNetwork)


class StackedNetwork(nn.Module):
    """num_trials networks of one architecture, their parameters stacked on a leading dim, called like one of
    them on a batch whose rows are trial-major (trial 0's rows, then trial 1's, ...): every tensor argument
    with that batch as its first dim is split by trial and the network runs under vmap, once for all.

    The parameters live in one flat (num_trials, P) tensor (`flat`, the leaf the optimizer steps), each named
    parameter a view of it: one optimizer update is a handful of kernels, not a handful per parameter.
    attention="classic": attention as matrix products (diffusers' AttnProcessor), which vmap batches; "folded":
    the fused kernel once for all trials (models/vmap_attention.py); "sdpa": the network's own fused attention,
    which has no batching rule and runs once per trial.

    compile_mode (distributed.compile_mode; None: eager): the call, vmap over the trials' networks included, runs
    through torch.compile, one compiled function per stacked network specialised to the call's shapes (a
    handful: with and without gradients, with and without a GAN head's logits). Compiling takes minutes, on a
    CPU and on a GPU alike (on an H100 the graph with gradients alone took over 100 s; BENCHMARKS.md), so it pays
    only for long runs; the output is the eager call's to rounding."""

    def __init__(self, template: nn.Module, num_trials: int, attention: str = "classic",
                 compile_mode: str | None = None):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        if attention != "sdpa":
            from diffusers.models.attention_processor import AttnProcessor

            from models.vmap_attention import FoldedAttnProcessor

            for module in template.modules():  # the network, or the network inside a critic with a GAN head
                if hasattr(module, "set_attn_processor"):
                    module.set_attn_processor(AttnProcessor() if attention == "classic" else FoldedAttnProcessor())
                    break
        self.num_trials = num_trials
        self._template = [template]  # a plain list: its parameters are replaced, never trained or registered
        named = list(template.named_parameters())
        self.layout = [(name, p.shape, p.numel()) for name, p in named]
        flat = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.flat = flat.unsqueeze(0).repeat(num_trials, 1).requires_grad_(True)
        self._logits: torch.Tensor | None = None
        self._compiled: Callable | None = None
        if compile_mode is not None:
            allow_recompiles()  # generator and critic share this code: several graphs each
            self._compiled = torch.compile(self._call, dynamic=False,
                                           mode=None if compile_mode == "default" else compile_mode)

    @property
    def classify(self) -> bool:
        """A critic with a GAN head (models/gan.py): the next calls also keep each trial's logits."""
        return getattr(self._template[0], "classify", False)

    @classify.setter
    def classify(self, value: bool) -> None:
        self._template[0].classify = value

    def take_logits(self) -> torch.Tensor:
        logits, self._logits = self._logits, None
        if logits is None:
            raise RuntimeError("no logits kept: set classify before calling the critic")
        return logits

    def trainable_tensors(self) -> list[torch.Tensor]:
        return [self.flat]

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Each named parameter, (num_trials, *shape): views of flat, made by one split. Its backward is one
        concatenation of the parameters' gradients; a slice per parameter had a backward per parameter, each a
        zero-filled gradient of the whole of flat with its slice copied in, then summed into flat's."""
        chunks = self.flat.split([numel for _, _, numel in self.layout], dim=1)
        return {name: chunk.view(self.num_trials, *shape) for (name, shape, _), chunk in zip(self.layout, chunks)}

    def forward(self, *args, **kwargs):
        return (self._compiled or self._call)(*args, **kwargs)

    def _call(self, *args, **kwargs):
        n, template = self.num_trials, self._template[0]
        batch = args[0].shape[0]
        if batch % n:
            raise ValueError(f"a batch of {batch} rows does not split into {n} trials")

        def rows(value) -> bool:
            return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch

        names = list(kwargs)
        values = (*args, *kwargs.values())  # tensors, or containers of them (SDXL's added_cond_kwargs)
        dims = tree_map(lambda v: 0 if rows(v) else None, values)
        tensors = tree_map(lambda v: v.reshape(n, batch // n, *v.shape[1:]) if rows(v) else v, values)
        returned = []  # what the network returns, so that the stacked call returns the same kind

        classify = self.classify

        def one(params, *values):
            out = functional_call(template, params, values[:len(args)], dict(zip(names, values[len(args):])))
            returned.append("tuple" if isinstance(out, tuple) else "sample" if hasattr(out, "sample") else "tensor")
            out = out[0] if isinstance(out, tuple) else out.sample if hasattr(out, "sample") else out
            return (out, template.take_logits()) if classify else out  # the head's logits leave vmap as outputs

        out = vmap(one, in_dims=(0, *dims))(self.params, *tensors)
        if classify:
            out, logits = out
            self._logits = logits.reshape(batch)
        out = out.reshape(batch, *out.shape[2:])
        # diffusers' return_dict=False (a tuple), its output classes (.sample), or a plain tensor (toy2d's MLP)
        return {"tuple": (out,), "sample": SimpleNamespace(sample=out), "tensor": out}[returned[-1]]

    def trial_module(self, index: int) -> nn.Module:
        """Trial index's network as a module of its own (a copy of the template with its parameters)."""
        net = copy.deepcopy(self._template[0])
        params = self.params
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(params[name][index])
        return net


class StackedAdamW:
    """AdamW (torch's update, step by step) for stacked trial parameters, each trial with its own step count,
    after DeepSpeed ZeRO's gradient clipping per trial (gradients divided by max(1, (norm + 1e-6) / clip), norm
    over all of the trial's gradients). A trial whose mask is False (a non-finite loss, a finished or failed
    trial) keeps its parameters, moments and step count."""

    def __init__(self, params: dict[str, torch.Tensor], lr: float, betas: tuple[float, float], weight_decay: float,
                 grad_clip: float, eps: float = 1e-8):
        self.params = list(params.values())
        self.names = list(params)
        self.lr, (self.beta1, self.beta2), self.weight_decay, self.grad_clip, self.eps = lr, betas, weight_decay, grad_clip, eps
        n = self.params[0].shape[0]
        self.step_count = torch.zeros(n, device=self.params[0].device)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, mask: torch.Tensor) -> torch.Tensor:
        """One update of the trials where mask (N,) is True; returns each trial's gradient norm (N,)."""
        grads = [p.grad for p in self.params]
        norm = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
        mask = mask & torch.isfinite(norm)  # ZeRO skips an update whose gradient norm overflowed
        if self.grad_clip > 0:
            scale = 1.0 / torch.clamp((norm + 1e-6) / self.grad_clip, min=1.0)
            grads = [g * _trial_view(scale, g) for g in grads]
        step = self.step_count + mask.float()
        bias1 = 1 - self.beta1 ** step
        bias2_sqrt = (1 - self.beta2 ** step).sqrt()
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            keep = _trial_view(mask, p)
            new_p = p * (1 - self.lr * self.weight_decay)
            new_m = m.lerp(g, 1 - self.beta1)
            new_v = v * self.beta2 + (1 - self.beta2) * g * g
            denom = new_v.sqrt() / _trial_view(bias2_sqrt, p) + self.eps
            new_p = new_p - _trial_view(self.lr / bias1, p) * new_m / denom
            p.copy_(torch.where(keep, new_p, p))
            m.copy_(torch.where(keep, new_m, m))
            v.copy_(torch.where(keep, new_v, v))
        self.step_count.copy_(step)
        for p in self.params:
            p.grad = None
        return norm

    def trial_state(self, index: int) -> dict:
        return {"step": self.step_count[index].clone(), "exp_avg": [m[index].clone() for m in self.exp_avg],
                "exp_avg_sq": [v[index].clone() for v in self.exp_avg_sq]}

    def load_trial_state(self, index: int, state: dict) -> None:
        with torch.no_grad():
            self.step_count[index] = state["step"]
            for m, v, sm, sv in zip(self.exp_avg, self.exp_avg_sq, state["exp_avg"], state["exp_avg_sq"]):
                m[index].copy_(sm)
                v[index].copy_(sv)


def _trial_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) per-trial values broadcastable against a stacked (N, ...) tensor."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------------------------------
# The trials' cycle


@dataclass
class Trial:
    """One trial's own state: config, run directory, data streams, RNG, where it stands."""

    config: RunConfig
    ctx: LocalContext
    rng: torch.Generator
    progress: Progress
    data: TrainingData | None = None
    error: Exception | None = None
    metrics: dict = field(default_factory=dict)


@dataclass
class CycleInputs:
    """One cycle's inputs for all trials, trial-major, on the device."""

    critic_eps: torch.Tensor  # (N * C * B, ...) noise of the generator samples the critic updates use
    critic_cond: Conditioning  # (N * C * B, ...) their prompts
    critic_t: list[torch.Tensor]  # C x (N * B,)
    critic_eps2: list[torch.Tensor]  # C x (N * B, ...)
    critic_real: torch.Tensor | None  # (N * C * B, ...) the teacher's samples of the critic rows (dmd-gan), or None
    anchors: AnchorBatch  # (N * B, ...) the generator update's anchor rows and prompts
    t: torch.Tensor  # (N * B,)
    eps2: torch.Tensor  # (N * B, ...)


class TrialBatch:
    """The trials' networks, optimizers and the two updates, for all trials at once."""

    def __init__(self, configs: list[RunConfig], adapter, teacher: nn.Module, negative: Conditioning,
                 device: torch.device, attention: str = "classic"):
        check_batchable(configs)
        self.configs, self.adapter, self.teacher, self.device = configs, adapter, teacher, device
        self.num_trials = n = len(configs)
        config = configs[0]
        dist = config.distributed
        mode = dist.compile_mode if dist.compile else None
        self.generator = StackedNetwork(copy_for_training(teacher), n, attention, mode)
        self.critic = StackedNetwork(critic_network(config, copy_for_training(teacher)), n, attention, mode)
        if dist.compile:  # as train does: after the copies, which would drop compiled code (Module.__getstate__)
            compile_network(teacher, dist.compile_mode)
        self.generator_optim = self._optimizer(self.generator, config.generator.optim)
        self.critic_optim = self._optimizer(self.critic, config.critic.optim)
        self.negative = negative.to(device)
        self.generator_sigmas = adapter.sampling_sigmas(config.generator.num_steps, config.generator_shift,
                                                        "generator").to(device)
        self.loss_sigmas = adapter.training_sigmas(config.teacher.shift)
        self.weights = {k: torch.tensor([c.loss.weights[k] for c in configs], device=device)
                        for k in config.loss.weights}
        self.critic_gan_weight = torch.tensor([c.loss.critic_gan_weight for c in configs], device=device)
        # the stop-gradient after the first step, resolved per trial (DMD at lambda = 0 has none): one flag for all
        # when they agree, else one per row of the trial-major anchor batch, made once
        detached = [c.loss.first_step_detached for c in configs]
        self.detach = detached[0] if len(set(detached)) == 1 else torch.tensor(
            detached, device=device).repeat_interleave(config.distributed.batch_size_per_worker)
        self.rows = TrialRows(n)
        # Each trial's finite vote; under on_nonfinite=raise a trial that voted no stops (its updates are no
        # longer applied) and is reported at the next read, under skip that update is skipped and counted
        self.vote = FiniteVote(config.schedule.on_nonfinite, n, device)

    def _optimizer(self, net: StackedNetwork, optim) -> StackedAdamW:
        return StackedAdamW({"flat": net.flat}, optim.lr, tuple(optim.betas), optim.weight_decay, optim.grad_clip)

    # -- the two updates, all trials at once -----------------------------------------------------------

    def generator_samples(self, eps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return generator_samples(self.adapter, self.generator, eps, cond, self.generator_sigmas)

    def critic_step(self, x_gen: torch.Tensor, t: torch.Tensor, eps2: torch.Tensor, cond: Conditioning,
                    update: torch.Tensor, real: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = critic_loss(self.adapter, self.critic, x_gen, t, eps2, cond, self.rows, real, self.critic_gan_weight)
        return self._apply(self.critic_optim, out, update)

    def generator_step(self, inputs: CycleInputs, update: torch.Tensor) -> dict[str, torch.Tensor]:
        nets = Networks(self.adapter, self.teacher, self.generator, self.critic, self.negative)
        with generator_update(self.configs[0], self.critic):
            out = generator_loss(nets, inputs.anchors, inputs.t, inputs.eps2, self.generator_sigmas, self.configs[0],
                                 self.rows, self.weights, self.detach)
            return self._apply(self.generator_optim, out, update)

    def _apply(self, optim: StackedAdamW, out, update: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backward of every trial's loss, and the update of the trials whose vote was yes (and still train):
        nothing is read back from the device."""
        ok = self.vote(self.rows.flags(out), update)
        out.loss.sum().backward()
        optim.step(ok & self.vote.active)
        return out.metrics

    # -- per-trial state -------------------------------------------------------------------------------

    def trial_state(self, index: int) -> dict:
        return {"generator": {k: p[index].detach().clone() for k, p in self.generator.params.items()},
                "critic": {k: p[index].detach().clone() for k, p in self.critic.params.items()},
                "generator_optim": self.generator_optim.trial_state(index),
                "critic_optim": self.critic_optim.trial_state(index), "skipped": self.vote.skipped[index].clone()}

    def load_trial_state(self, index: int, state: dict) -> None:
        with torch.no_grad():
            for net, key in ((self.generator, "generator"), (self.critic, "critic")):
                for name, p in net.params.items():
                    p[index].copy_(state[key][name])
        self.generator_optim.load_trial_state(index, state["generator_optim"])
        self.critic_optim.load_trial_state(index, state["critic_optim"])
        self.vote.skipped[index] = state["skipped"]


# ----------------------------------------------------------------------------------------------------
# Inputs: each trial's data and noise, drawn exactly as workers.train.train draws them


def draw_cycle(trials: list[Trial], adapter, loss_sigmas: torch.Tensor, device: torch.device) -> CycleInputs:
    """One cycle's batches and noise for every trial, in train's order from each trial's streams and RNG:
    the critic updates' prompt batches, their samples' noise in one draw, (t, eps') per critic update, then
    the generator update's anchor batch and its (t, eps')."""
    config = trials[0].config
    num_critic = config.schedule.critic_updates_per_generator
    shape = adapter.latent_shape
    per: list[dict] = []
    for trial in trials:
        progress, rng = trial.progress, trial.rng
        batch = config.distributed.batch_size_per_worker
        prompts = [next(trial.data.prompts) for _ in range(num_critic)]
        eps = torch.randn((num_critic * batch, *shape), generator=rng)
        critic = [(sample_sigmas(loss_sigmas, batch, rng), torch.randn((batch, *shape), generator=rng))
                  for _ in range(num_critic)]
        anchors = trial.data.next_anchors(f"generator update {progress.generator_updates + 1}")
        t, eps2 = sample_sigmas(loss_sigmas, batch, rng), torch.randn(anchors.eps.shape, generator=rng)
        per.append({"prompts": prompts, "eps": eps, "critic": critic, "anchors": anchors, "t": t, "eps2": eps2})

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return to_device(torch.cat(tensors), device)

    def cond(items: list[Conditioning]) -> Conditioning:
        joined = Conditioning.cat(items)
        return Conditioning({k: cat([v]) for k, v in joined.tensors.items()})

    return CycleInputs(
        critic_eps=cat([p["eps"] for p in per]),
        critic_cond=cond([b.cond for p in per for b in p["prompts"]]),
        critic_t=[cat([p["critic"][j][0] for p in per]) for j in range(num_critic)],
        critic_eps2=[cat([p["critic"][j][1] for p in per]) for j in range(num_critic)],
        critic_real=(cat([teacher_samples(b) for p in per for b in p["prompts"]]) if config.loss.method == "dmd-gan"
                     else None),
        anchors=AnchorBatch.cat([p["anchors"] for p in per])._map(lambda v: to_device(v, device)),
        t=cat([p["t"] for p in per]),
        eps2=cat([p["eps2"] for p in per]))


# ----------------------------------------------------------------------------------------------------
# Running the trials


@dataclass
class TrialsResult:
    progress: list[Progress]
    errors: list[Exception | None]
    finished: list[bool]  # reached schedule.num_generator_updates (False: stopped at the deadline)
    cycles_per_s: float = 0.0  # trial cycles per second over this call, all trials together


def train_trials(configs: list[RunConfig], run_dirs: list[Path], store, teacher=None,
                 deadline: float | None = None, on_cycle: Callable[[int, dict], None] | None = None,
                 save: bool = True, attention: str = "classic") -> TrialsResult:
    """Train the trials (configs, one run directory each) together to schedule.num_generator_updates over the
    trajectory store, continuing from the newest update all of them checkpointed; export each trial's generator
    into its run directory (workers.train.GENERATOR_DIR). deadline: a time.time() after which the trials
    checkpoint and stop (a job with a time limit; run again to continue). teacher: an (adapter, network) pair
    instead of loading configs[0].teacher (tests). on_cycle(generator_updates, metrics) after every cycle.
    attention: "classic" (vmap-batched matrix products), "folded" (the fused kernel once for all trials) or "sdpa"
    (the network's own fused attention, once per trial).

    On a GPU, while the trials train: cuDNN picks its convolution algorithms by timing them (cudnn.benchmark;
    every call has one of a few fixed shapes, and vmap runs the trials' convolutions as grouped ones), and
    matrix products use TF32 like PyTorch's convolutions already do (vmap turns every linear layer and the
    attention into batched products, which in plain fp32 took a third of the GPU's time; measured in
    BENCHMARKS.md). Storage, accumulation, anchors and flow times stay fp32. Both settings are restored
    afterwards."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return _train_trials(configs, run_dirs, store, teacher, deadline, on_cycle, save, attention)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved


def _train_trials(configs, run_dirs, store, teacher, deadline, on_cycle, save, attention) -> TrialsResult:
    """train_trials under its GPU settings: set the trials up, run their cycles to the end or the deadline (there,
    checkpoint where they stand), then export the generators of the trials that finished."""
    group = _set_up(configs, run_dirs, store, teacher, attention)
    trials, first, total = group.trials, group.first, configs[0].schedule.num_generator_updates
    stopped_early = _run_cycles(group, deadline, on_cycle, save)
    if stopped_early and save and trials[0].progress.generator_updates > first:
        _save_stopped(group)
    done = trials[0].progress.generator_updates - first
    elapsed = time.perf_counter() - group.start
    finished = [t.progress.generator_updates >= total and t.error is None for t in trials]
    if save:
        _export(group, finished)
    return TrialsResult([t.progress for t in trials], [t.error for t in trials], finished,
                        done * len(trials) / elapsed if elapsed > 0 else 0.0)


@dataclass
class _Group:
    """The trials of one train_trials call with their networks, when and at which generator update the call
    began, and the metrics summed on the device since the last read (one host sync per log interval)."""

    trials: list[Trial]
    batch: TrialBatch
    adapter: object
    device: torch.device
    start: float
    first: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach()
        self.count += 1

    def read(self, step: int) -> None:
        """The interval's mean metrics to every trial (_read), and a new interval."""
        elapsed = time.perf_counter() - self.start
        _read(self.trials, self.batch, {k: v / self.count for k, v in self.sums.items()}, step, elapsed,
              step - self.first)
        self.sums, self.count = {}, 0


def _set_up(configs, run_dirs, store, teacher, attention) -> _Group:
    """The teacher, every trial with its RNG and run directory, their stacked networks continued from the newest
    update all of them checkpointed, and each trial's data streams positioned where it stands."""
    from workers.teacher import load_teacher
    from workers.train import store_source

    check_batchable(configs)
    config = configs[0]
    device = device_for(config.distributed.use_gpu)
    torch.manual_seed(config.seed)
    adapter, net = teacher or load_teacher(config, device, torch.float32, text_encoders=bool(config.evaluation.every))
    trials = [Trial(c, LocalContext(d), torch.Generator().manual_seed(c.seed * 100_003), Progress())
              for c, d in zip(configs, run_dirs)]
    batch = TrialBatch(configs, adapter, net, store.negative(), device, attention)
    _resume(trials, batch, device)
    source = store_source(store)
    for trial in trials:
        trial.data = source(trial.config, trial.ctx, trial.progress)
    return _Group(trials, batch, adapter, device, time.perf_counter(), trials[0].progress.generator_updates)


def _run_cycles(group: _Group, deadline: float | None, on_cycle: Callable[[int, dict], None] | None,
                save: bool) -> bool:
    """Cycles until schedule.num_generator_updates, each handed to on_cycle, then read, checkpointed and evaluated
    as the schedule asks. True: the deadline stopped them first."""
    trials, batch = group.trials, group.batch
    schedule, every = trials[0].config.schedule, trials[0].config.evaluation.every
    total = schedule.num_generator_updates
    while trials[0].progress.generator_updates < total:
        if deadline is not None and time.time() > deadline:
            return True
        step = trials[0].progress.generator_updates + 1
        metrics = _cycle(group, step)
        if on_cycle is not None:
            on_cycle(step, metrics)
        last = step == total
        checkpoint = save and ((schedule.checkpoint_every and step % schedule.checkpoint_every == 0) or last)
        if step % schedule.log_every == 0 or last or checkpoint:
            group.read(step)
        if checkpoint:
            _save(trials, batch, step)
        if every and step % every == 0:
            _evaluate(trials, batch, group.adapter, step, group.device)
    return False


def _cycle(group: _Group, step: int) -> dict[str, torch.Tensor]:
    """One cycle of every trial: its inputs drawn, the critic updates, the generator update. Its metrics (per trial,
    on the device) are added to the interval's sums and every trial's progress moves on."""
    batch, device = group.batch, group.device
    update = torch.full((), step, dtype=torch.long, device=device)
    inputs = draw_cycle(group.trials, group.adapter, batch.loss_sigmas, device)
    num_critic = len(inputs.critic_t)
    critic_sums = _critic_updates(batch, inputs, update)
    metrics = batch.generator_step(inputs, update)
    metrics.update({k: v / num_critic for k, v in critic_sums.items()})
    group.add(metrics)
    batch_size = group.trials[0].config.distributed.batch_size_per_worker
    for trial in group.trials:
        p = trial.progress
        p.critic_updates += num_critic
        p.prompt_rows_consumed += num_critic * batch_size
        p.generator_updates += 1
        p.rows_consumed += batch_size
    return metrics


def _critic_updates(batch: TrialBatch, inputs: CycleInputs, update: torch.Tensor) -> dict[str, torch.Tensor]:
    """The cycle's critic updates, each on one batch of every trial's generator samples; each trial's summed
    critic metrics (CRITIC_METRICS)."""
    num_critic = len(inputs.critic_t)
    x_gen = batch.generator_samples(inputs.critic_eps, inputs.critic_cond)
    n = batch.num_trials
    # trial-major rows (trial, critic update, row) -> one (N * B) batch per critic update
    x_gen = x_gen.reshape(n, num_critic, -1, *x_gen.shape[1:])
    cond = {k: v.reshape(n, num_critic, -1, *v.shape[1:]) for k, v in inputs.critic_cond.tensors.items()}
    real = inputs.critic_real
    real = None if real is None else real.reshape(n, num_critic, -1, *real.shape[1:])
    sums: dict[str, torch.Tensor] = {}
    for j in range(num_critic):
        rows = lambda v: v[:, j].reshape(-1, *v.shape[3:])  # noqa: E731
        metrics = batch.critic_step(rows(x_gen), inputs.critic_t[j], inputs.critic_eps2[j],
                                    Conditioning({k: rows(v) for k, v in cond.items()}), update,
                                    None if real is None else rows(real))
        for key in CRITIC_METRICS:
            if key in metrics:
                sums[key] = sums.get(key, 0) + metrics[key]
    return sums


def _save_stopped(group: _Group) -> None:
    """At the deadline: the metrics not read yet, and a checkpoint of every trial where it stands, to continue."""
    step = group.trials[0].progress.generator_updates
    if group.sums:
        group.read(step)
    _save(group.trials, group.batch, step)


def _export(group: _Group, finished: list[bool]) -> None:
    """Each finished trial's generator into its run directory, as train exports one."""
    from workers.train import GENERATOR_DIR, export_generator

    for index, trial in enumerate(group.trials):
        if finished[index]:
            generator = SimpleNamespace(module=group.batch.generator.trial_module(index))
            export_generator(trial.config, group.adapter, generator, Path(trial.ctx.run_dir) / GENERATOR_DIR, 0)


def _read(trials: list[Trial], batch: TrialBatch, means: dict[str, torch.Tensor], step: int, elapsed: float,
          cycles: int) -> None:
    """The one host sync of a log interval: the trials' mean metrics, skipped steps and non-finite losses."""
    values = {k: v.tolist() for k, v in means.items()}
    failed_at, skipped = batch.vote.failed_at.tolist(), batch.vote.skipped.tolist()
    terms = {k: v.tolist() for k, v in batch.vote.failed_terms.items()}
    total = trials[0].config.schedule.num_generator_updates
    for index, trial in enumerate(trials):
        trial.progress.skipped_steps = int(skipped[index])
        if failed_at[index] and trial.error is None:
            names = [k for k, v in terms.items() if v[index]] or ["(unknown)"]
            trial.error = NonFiniteLossError(names, f"generator update {failed_at[index]} of {trial.ctx.run_dir.name}")
            print(f"[trials] {trial.ctx.run_dir.name} stopped: {trial.error}", flush=True)
        if trial.error is not None:
            continue
        bs = trial.config.distributed.batch_size_per_worker
        per_trial_s = elapsed / max(cycles, 1)
        metrics = {k: v[index] for k, v in values.items()}
        metrics.update(generator_update=step, critic_updates=trial.progress.critic_updates,
                       resumes=trial.progress.resumes, skipped_steps=trial.progress.skipped_steps,
                       cycle_s=per_trial_s, trials_together=len(trials),
                       samples_per_s=bs * (trial.config.schedule.critic_updates_per_generator + 1) / per_trial_s)
        if trial.data is not None and trial.data.rows_available:
            metrics["anchor_passes"] = trial.progress.rows_consumed / trial.data.rows_available
        trial.metrics = metrics
        trial.ctx.report(metrics)
    shown = " ".join(f"{t.ctx.run_dir.name}: dmd={t.metrics.get('loss_dmd', math.nan):.4g}" for t in trials[:4])
    rate = cycles * len(trials) / elapsed if elapsed > 0 else math.nan
    print(f"[trials] generator update {step}/{total}, {len(trials)} trials, {rate:.2f} trial cycles/s | {shown}"
          + (" ..." if len(trials) > 4 else ""), flush=True)


def _evaluate(trials: list[Trial], batch: TrialBatch, adapter, step: int, device: torch.device) -> None:
    """evaluation.every: each trial's generator on the held-out prompts and seeds, as the final evaluation
    scores it, into its live_eval.jsonl (the record evaluation beside training writes: live_<metric>)."""
    import json

    from workers.evaluate import evaluate, generator_sampler
    from workers.live_eval import PREFIX, RESULTS

    for index, trial in enumerate(trials):
        if trial.error is not None:
            continue
        net = batch.generator.trial_module(index).eval()
        metrics = evaluate(trial.config, adapter, net, generator_sampler(trial.config, adapter), device=device).metrics
        record = {"generator_update": step, **{PREFIX + k: float(v) for k, v in metrics.items()}}
        Path(trial.ctx.run_dir).mkdir(parents=True, exist_ok=True)
        with (Path(trial.ctx.run_dir) / RESULTS).open("a") as f:
            f.write(json.dumps(record) + "\n")
        trial.metrics.update(record)


def _save(trials: list[Trial], batch: TrialBatch, step: int) -> None:
    for index, trial in enumerate(trials):
        if trial.error is not None:
            continue
        directory = Path(trial.ctx.run_dir) / CHECKPOINTS / checkpoint_name(step)
        directory.mkdir(parents=True, exist_ok=True)
        trial.progress.skipped_steps = int(batch.vote.skipped[index])
        torch.save(batch.trial_state(index), directory / f"{TRIAL_STATE}.tmp")
        write_progress(directory, trial.progress, trial.rng, 0)
        (directory / f"{TRIAL_STATE}.tmp").replace(directory / TRIAL_STATE)  # last: the checkpoint is complete


def trial_checkpoints(run_dir: Path) -> dict[int, Path]:
    """A trial's complete checkpoints (written by train_trials), by generator update."""
    found = {}
    for path in (Path(run_dir) / CHECKPOINTS).glob(f"step-*/{TRIAL_STATE}"):
        found[int(path.parent.name.split("-")[1])] = path.parent
    return found


def _resume(trials: list[Trial], batch: TrialBatch, device: torch.device) -> None:
    """Continue from the newest update every trial has a complete checkpoint of (trials checkpoint together,
    so only a stop while writing leaves them apart); none: every trial starts afresh."""
    saved = [trial_checkpoints(t.ctx.run_dir) for t in trials]
    common = set(saved[0]).intersection(*saved[1:]) if saved else set()
    if not common:
        return
    step = max(common)
    for index, (trial, found) in enumerate(zip(trials, saved)):
        directory = found[step]
        batch.load_trial_state(index, torch.load(directory / TRIAL_STATE, map_location=device, weights_only=True))
        trial.progress = read_progress(directory, trial.rng, 0)
        trial.progress.resumes += 1
    print(f"[trials] {len(trials)} trials continue from generator update {step}", flush=True)
