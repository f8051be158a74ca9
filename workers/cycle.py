"""One DP-DMD cycle, written once: the critic's samples and loss, the generator's rollout, the teacher's and
the critic's scores, the DMD and diversity losses, the generator objective, and the finite vote with what
follows a non-finite one (schedule.on_nonfinite: stop or skip).

Two trainers call these steps: workers.distill.Distiller (one run, DeepSpeed engines, one host sync per update)
and workers.trials.TrialBatch (trials trained together: stacked networks under vmap, nothing read back until a
log interval). What differs between them is handed in, not written again: the networks (anything the adapter
can call), the rows a loss applies to (Rows: one run's batch; TrialRows: each trial's rows, its own loss), the
noise and flow times (drawn by the caller, in its order) and the optimizer step (the caller's, after the vote).

    out = critic_loss(adapter, critic, x_gen, t, eps2, cond, rows, real, gan_weight)
    out = generator_loss(nets, anchors, t, eps2, sigmas, config, rows, weights, detach)
    ok = vote(rows.flags(out), update)              # (rows.num,) bool: apply the update where True

The baselines (loss.method dmd-regression, dmd-gan) are steps of the same cycle: the regression term on the
generator's sample against the teacher's (anchors.x_teacher), and the GAN terms through the critic's classifier
head (models/gan.py): on the critic's samples against the teacher's (real) in its update, on the generator's
sample in the generator's, the critic's weights frozen there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import vmap
from torch.profiler import record_function

from models.adapter import Conditioning, TeacherAdapter
from models.flow import interpolate, x0_from_velocity
from models.losses import (LossOutput, dmd_loss, gan_critic_loss, gan_generator_loss, generator_objective,
                           regression_loss, weighted_sum)
from models.losses import critic_loss as critic_flow_loss
from models.rollout import generator_rollout
from workers.config import RunConfig
from workers.offload import ParkedNetwork

# What a cycle reports of its critic updates, each the mean over them: the flow-matching loss, and under dmd-gan the
# head's loss and its mean probability of "real" on the teacher's and on the generator's samples
CRITIC_METRICS = ("loss_critic", "loss_gan_critic", "gan_real_prob", "gan_fake_prob")
REGION = "dpdmd/"  # the profiler's name for each part of a cycle (benchmarks/gaps.py charges idle GPU time to them)


class Rows:
    """How a loss of models/losses.py applies to one run's batch: once, over all its rows (scalars out)."""

    num = 1

    def loss(self, fn: Callable[..., LossOutput], *args, **kwargs) -> LossOutput:
        return fn(*args, **kwargs)

    def flags(self, out: LossOutput) -> dict[str, torch.Tensor]:
        """Each watched term's "finite" flag, (num,) bool, on the device."""
        return {name: torch.isfinite(t.detach()).all().reshape(1) for name, t in out.watched.items()}


class TrialRows(Rows):
    """Trial-major rows of num trials (trial 0's rows, then trial 1's, ...): a loss applies to each trial's rows
    on their own, under vmap, so its loss and metrics are (num,) and its watched tensors (num, ...). Arguments
    whose first dim is the batch are split by trial; others (a flow time, None) are the same for every trial."""

    def __init__(self, num: int):
        self.num = num

    def loss(self, fn: Callable[..., LossOutput], *args, **kwargs) -> LossOutput:
        rows = next(a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.ndim)
        split = [isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] == rows for a in args]

        def one(*values):
            out = fn(*values, **kwargs)
            return out.loss, out.metrics, out.watched

        loss, metrics, watched = vmap(one, in_dims=tuple(0 if s else None for s in split))(
            *(a.reshape(self.num, -1, *a.shape[1:]) if s else a for a, s in zip(args, split)))
        return LossOutput(loss, metrics, watched)

    def flags(self, out: LossOutput) -> dict[str, torch.Tensor]:
        return {name: torch.isfinite(t.detach()).reshape(self.num, -1).all(1) for name, t in out.watched.items()}


@dataclass
class Networks:
    """What a cycle calls: the adapter and its networks (engines' modules, stacked trials, a compiled network),
    the empty prompt's conditioning (batch 1), and the teacher's weights when they live in host memory between
    its scores (distributed.offload_teacher)."""

    adapter: TeacherAdapter
    teacher: nn.Module
    generator: nn.Module
    critic: nn.Module
    negative: Conditioning
    teacher_weights: ParkedNetwork | None = None


@torch.no_grad()
def generator_samples(adapter: TeacherAdapter, generator: nn.Module, eps: torch.Tensor, cond: Conditioning,
                      sigmas: torch.Tensor) -> torch.Tensor:
    """No-grad generator samples for noise eps (the critic updates' data): one rollout for all of them."""
    with record_function(f"{REGION}critic samples"):
        start = adapter.initial_state(eps, sigmas, "generator")
        return generator_rollout(adapter.velocity_fn(generator, cond), start, sigmas).x_gen


def critic_loss(adapter: TeacherAdapter, critic: nn.Module, x_gen: torch.Tensor, t: torch.Tensor,
                eps2: torch.Tensor, cond: Conditioning, rows: Rows, real: torch.Tensor | None = None,
                gan_weight: float | torch.Tensor = 0.0) -> LossOutput:
    """Loss 5: flow matching on the generator samples x_gen at flow times t with noise eps2. dmd-gan (real: the
    teacher's samples for the same prompts): plus gan_weight times the head's classification loss, real against
    x_gen, both noised with the same t and eps2 (the fake ones are the flow loss's own inputs: one call)."""
    with record_function(f"{REGION}critic loss"):
        x_t = interpolate(x_gen, eps2, t)
        if real is None:
            return rows.loss(critic_flow_loss, adapter.velocity(critic, x_t, t, cond), x_gen, eps2)
        with classifying(critic):
            v = adapter.velocity(critic, x_t, t, cond)
            fake = critic.take_logits()
            adapter.velocity(critic, interpolate(real, eps2, t), t, cond)
            real_logits = critic.take_logits()
        flow = rows.loss(critic_flow_loss, v, x_gen, eps2)
        return weighted_sum(flow, {"gan": (rows.loss(gan_critic_loss, real_logits, fake), gan_weight)},
                            "critic_objective")


def generator_loss(nets: Networks, anchors, t: torch.Tensor, eps2: torch.Tensor, sigmas: torch.Tensor,
                   config: RunConfig, rows: Rows, weights: dict[str, float | torch.Tensor],
                   detach: bool | torch.Tensor) -> LossOutput:
    """Losses 1-4 for an anchor batch (workers.batches.AnchorBatch: eps, z, t_anchor, x0_anchor, cond): the
    generator's rollout from eps over sigmas, the diversity loss on its first step in the teacher's
    parameterisation (the adapter's), DMD on its sample scored by the guided teacher and the critic at flow
    times t with noise eps2, and the objective with weights (config.loss.weights: div, reg, gan; each a float, or
    one per trial under TrialRows). detach: the stop-gradient after the first step (config.loss.first_step_detached,
    or one flag per row of the batch when trials trained together differ in it). The baselines' terms are computed
    only for the method that uses them. Runs with its backward and step under generator_update (dmd-gan's critic
    frozen)."""
    adapter, parked, method = nets.adapter, nets.teacher_weights, config.loss.method
    if parked is not None:
        parked.fetch()  # what its score needs first, copied beside the rollout
    with record_function(f"{REGION}generator rollout"):
        start = adapter.initial_state(anchors.eps, sigmas, "generator")
        rollout = generator_rollout(adapter.velocity_fn(nets.generator, anchors.cond), start, sigmas, detach)
        prediction, target = adapter.diversity_terms(rollout.v_first, start, sigmas[0], anchors.eps, anchors.z,
                                                     anchors.t_anchor, anchors.x0_anchor)
        div = rows.loss(adapter.diversity_fn, prediction, target)
    with record_function(f"{REGION}teacher and critic scores"), torch.no_grad():
        x_t = interpolate(rollout.x_gen.detach(), eps2, t)
        uncond = nets.negative.expand(len(x_t))
        v_teacher = adapter.guided_velocity(nets.teacher, x_t, t, anchors.cond, uncond,
                                            config.teacher.guidance_scale)
        v_critic = adapter.velocity(nets.critic, x_t, t, anchors.cond)
        if parked is not None:
            parked.park()  # out of the way of the generator's backward, where memory peaks
    dmd = rows.loss(dmd_loss, rollout.x_gen, x0_from_velocity(x_t, v_teacher, t), x0_from_velocity(x_t, v_critic, t),
                    x_t, normaliser=config.loss.normaliser)
    extra = {}
    if method == "dmd-regression":
        with record_function(f"{REGION}regression"):
            distance = adapter.regression_distance(rollout.x_gen.device, config.loss.perceptual)
            extra["reg"] = (rows.loss(regression_loss, rollout.x_gen, teacher_samples(anchors), distance=distance),
                            weights["reg"])
    elif method == "dmd-gan":
        with record_function(f"{REGION}gan"), classifying(nets.critic):  # the critic frozen: generator_update
            adapter.velocity(nets.critic, interpolate(rollout.x_gen, eps2, t), t, anchors.cond)
            extra["gan"] = (rows.loss(gan_generator_loss, nets.critic.take_logits()), weights["gan"])
    return generator_objective(dmd, div, weights["div"], extra)


def teacher_samples(batch) -> torch.Tensor:
    """A batch's teacher samples (x_teacher), or the error that names where they come from."""
    if batch.x_teacher is None:
        raise ValueError("this loss.method reads the teacher's samples from the trajectory store (its x_teacher "
                         "column): train from a store precomputed with the run's recipe and overrides")
    return batch.x_teacher


@contextmanager
def classifying(critic: nn.Module) -> Iterator[None]:
    """The critic's calls also keep its classifier head's logits (models/gan.py) for take_logits()."""
    critic.classify = True
    try:
        yield
    finally:
        critic.classify = False


def generator_update(config: RunConfig, critic: nn.Module):
    """The context a generator update (its loss, backward and step) runs in: under dmd-gan the critic frozen
    throughout, not only while its GAN term is taken, because a critic with activation checkpointing recomputes
    that call in the generator's backward and must see the same weights without requires_grad (autograd saves
    other tensors otherwise, and torch.utils.checkpoint refuses the mismatch)."""
    return frozen(critic) if config.loss.method == "dmd-gan" else nullcontext()


@contextmanager
def frozen(net: nn.Module) -> Iterator[None]:
    """net's trainable tensors without requires_grad for a while: gradients reach its inputs, not its weights (the
    generator's GAN term goes through the critic without training it)."""
    tensors = net.trainable_tensors() if hasattr(net, "trainable_tensors") else list(net.parameters())
    tensors = [p for p in tensors if p.requires_grad]
    for p in tensors:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in tensors:
            p.requires_grad_(True)


class FiniteVote:
    """The finite vote of each row group (one run: 1; trials: one per trial), kept on the device: an update is
    applied where every watched term is finite. Under schedule.on_nonfinite=raise a group that voted no stops
    (active turns False; failed_at keeps the update, failed_terms the terms); under skip that update is not
    applied and is counted (skipped)."""

    def __init__(self, on_nonfinite: str, num: int, device: torch.device):
        self.stops = on_nonfinite == "raise"
        self.active = torch.ones(num, dtype=torch.bool, device=device)
        self.failed_at = torch.zeros(num, dtype=torch.long, device=device)  # 1-based update, 0: none
        self.failed_terms: dict[str, torch.Tensor] = {}
        self.skipped = torch.zeros(num, device=device)

    def __call__(self, flags: dict[str, torch.Tensor], update: int | torch.Tensor = 1,
                 agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """(num,) bool: where the update may be applied. agree: all ranks' verdict from this rank's (one run
        on several ranks: every rank applies an update or none does)."""
        ok = torch.stack(list(flags.values())).all(0)
        if agree is not None:
            ok = agree(ok)
        bad = ~ok & self.active
        if self.stops:
            self.failed_at.copy_(torch.where(bad & (self.failed_at == 0), update, self.failed_at))
            for name, flag in flags.items():
                seen = self.failed_terms.setdefault(name, torch.zeros_like(ok))
                seen |= bad & ~flag
            self.active &= ok
        else:
            self.skipped += bad.float()
        return ok

    def terms(self, index: int = 0) -> list[str]:
        """The terms that were not finite when group index stopped (a host read)."""
        return [name for name, seen in self.failed_terms.items() if bool(seen[index])]
