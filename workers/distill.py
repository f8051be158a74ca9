"""The DP-DMD training loop that runs on every worker: critic_step() and generator_step() in a short loop.

The loop knows nothing of Ray: a WorkerContext (workers/context.py) supplies rank, data, reporting and
checkpoints, so the same function runs under Ray Train, torchrun or a single process.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.profiler import record_function

from models.adapter import Conditioning, TeacherAdapter
from models.flow import interpolate, sample_sigmas, x0_from_velocity
from models.losses import LossOutput, NonFiniteLossError, critic_loss, dmd_loss, generator_objective
from models.rollout import GeneratorRollout, generator_rollout
from workers.batches import AnchorBatch, PromptBatch
from workers.config import RunConfig
from workers.offload import ParkedNetwork


REGION = "dpdmd/"  # the profiler's name for each part of a cycle (benchmarks/gaps.py charges idle GPU time to them)


class Distiller:
    """Holds the three networks and takes one critic or generator update at a time.

    generator and critic are engines (DeepSpeed, or anything with .module, .backward(loss), .step()),
    initialised from the teacher; the teacher is a frozen module. States, noise, flow times and Euler steps
    are float32 whatever dtype the networks compute in (the adapter casts each network's inputs).
    """

    def __init__(self, config: RunConfig, adapter: TeacherAdapter, teacher: nn.Module, generator, critic,
                 device: torch.device, rng: torch.Generator, negative: Conditioning, all_finite=None,
                 teacher_weights: ParkedNetwork | None = None):
        self.config, self.adapter, self.teacher = config, adapter, teacher
        self.teacher_weights = teacher_weights  # the teacher's weights in host memory outside its score
        self.negative = negative.to(device)  # the empty prompt, batch 1: no text encoder needed here
        self.generator, self.critic = generator, critic
        self.device, self.rng = device, rng
        self.generator_sigmas = adapter.sampling_sigmas(config.generator.num_steps, config.generator_shift,
                                                        "generator").to(device)
        self.loss_sigmas = adapter.training_sigmas(config.teacher.shift)  # drawn from on the CPU, with rng
        self.all_finite = all_finite or (lambda flag: bool(flag))
        self.skipped = 0

    # -- the two updates -------------------------------------------------------------------------------

    @torch.no_grad()
    def generator_samples(self, batches: list[PromptBatch]) -> list[torch.Tensor]:
        """Fresh no-grad generator samples for a cycle's critic updates, one per batch, from one rollout of
        all of them: the generator does not change between critic updates."""
        with record_function(f"{REGION}critic samples"):
            sizes = [b.cond.batch_size for b in batches]
            cond = Conditioning.cat([b.cond for b in batches])
            eps = self._noise((sum(sizes), *self.adapter.latent_shape))
            x_gen = generator_rollout(self._velocity_fn(self.generator.module, cond), self._start(eps),
                                      self.generator_sigmas).x_gen
            return list(x_gen.split(sizes))

    def critic_step(self, batch: PromptBatch, x_gen: torch.Tensor, where: str) -> dict[str, float]:
        """Loss 5: flow matching on x_gen, a fresh no-grad generator sample for the batch's prompts
        (generator_samples)."""
        with record_function(f"{REGION}critic loss"):
            t, eps2 = self._draw_t(len(x_gen)), self._noise(x_gen.shape)
            x_t = interpolate(x_gen, eps2, t)
            out = critic_loss(self.adapter.velocity(self.critic.module, x_t, t, batch.cond), x_gen, eps2)
        return self._apply(self.critic, out, where)

    def generator_step(self, batch: AnchorBatch, where: str) -> dict[str, float]:
        """Losses 1-4: DMD on x_gen (steps 2..N) plus lambda times the anchor loss on step 1."""
        loss_cfg = self.config.loss
        if self.teacher_weights is not None:
            self.teacher_weights.fetch()  # what its score needs first, copied beside the rollout
        with record_function(f"{REGION}generator rollout"):
            x_start = self._start(batch.eps)
            rollout = generator_rollout(self._velocity_fn(self.generator.module, batch.cond), x_start,
                                        self.generator_sigmas, loss_cfg.detach_first_step)
            div = self._diversity(rollout, x_start, batch)
        with record_function(f"{REGION}teacher and critic scores"), torch.no_grad():
            t, eps2 = self._draw_t(len(batch.eps)), self._noise(batch.eps.shape)
            x_t = interpolate(rollout.x_gen.detach(), eps2, t)
            uncond = self.negative.expand(len(x_t))
            v_teacher = self.adapter.guided_velocity(self.teacher, x_t, t, batch.cond, uncond,
                                                     self.config.teacher.guidance_scale)
            v_critic = self.adapter.velocity(self.critic.module, x_t, t, batch.cond)
            if self.teacher_weights is not None:
                self.teacher_weights.park()  # out of the way of the generator's backward, where memory peaks
        dmd = dmd_loss(rollout.x_gen, x0_from_velocity(x_t, v_teacher, t), x0_from_velocity(x_t, v_critic, t),
                       x_t, loss_cfg.normaliser)
        return self._apply(self.generator, generator_objective(dmd, div, loss_cfg.diversity_weight), where)

    def _diversity(self, rollout: GeneratorRollout, x_start: torch.Tensor, batch: AnchorBatch) -> LossOutput:
        """Loss 1 in the teacher's parameterisation, which the adapter knows (docs/method.md)."""
        return self.adapter.diversity_loss(rollout.v_first, x_start, self.generator_sigmas[0], batch.eps, batch.z,
                                           batch.t_anchor, batch.x0_anchor)

    # -- helpers ---------------------------------------------------------------------------------------

    def _start(self, eps: torch.Tensor) -> torch.Tensor:
        """The generator's starting state for noise eps: eps itself at t = 1 (flow families)."""
        return self.adapter.initial_state(eps, self.generator_sigmas, "generator")

    def _apply(self, engine, out: LossOutput, where: str) -> dict[str, float]:
        """Backward and step, once every rank agrees the loss is finite (one sync per step); an update whose
        gradients were not finite was not applied (workers/engines.py) and counts as skipped, or raises."""
        with record_function(f"{REGION}finite vote"):
            finite = self.all_finite(out.finite_flag())
        if not finite:
            return self._nonfinite(out.nonfinite_terms() or ["(another rank)"], where)
        with record_function(f"{REGION}backward"):
            engine.backward(out.loss)
        with record_function(f"{REGION}optimizer step"):
            engine.step()
        with record_function(f"{REGION}metrics"):
            metrics = {k: float(v) for k, v in out.metrics.items()}
            guard = getattr(engine, "nonfinite_gradients", None)  # workers/engines.py: skipped on the GPU
            flag = guard.flag() if guard is not None else None
        if flag is not None and bool(flag):
            return self._nonfinite(["gradients (the update was not applied)"], where)
        return metrics

    def _nonfinite(self, terms: list[str], where: str) -> dict[str, float]:
        """schedule.on_nonfinite for an update that was not applied: raise naming terms, or count the skip."""
        if self.config.schedule.on_nonfinite == "raise":
            raise NonFiniteLossError(terms, where)
        self.skipped += 1
        return {"skipped": 1.0}

    def _velocity_fn(self, net: nn.Module, cond: Conditioning):
        return lambda x_t, t: self.adapter.velocity(net, x_t, t, cond)

    def _noise(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng).to(self.device)

    def _draw_t(self, n: int) -> torch.Tensor:
        return sample_sigmas(self.loss_sigmas, n, self.rng).to(self.device)


def copy_for_training(teacher: nn.Module) -> nn.Module:
    """A trainable copy of the teacher's network: generator and critic both start here."""
    net = copy.deepcopy(teacher)
    net.train().requires_grad_(True)
    return net
