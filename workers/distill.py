"""One run's updates, as the training loop on every worker takes them: critic_step() and generator_step().

The loop knows nothing of Ray: a WorkerContext (workers/context.py) supplies rank, data, reporting and
checkpoints, so the same function runs under Ray Train, torchrun or a single process.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.profiler import record_function

from models.adapter import Conditioning, TeacherAdapter
from models.flow import sample_sigmas
from models.losses import LossOutput, NonFiniteLossError
from workers.batches import AnchorBatch, PromptBatch
from workers.config import RunConfig
from workers.cycle import (REGION, FiniteVote, Networks, Rows, critic_loss, generator_loss, generator_samples,
                           generator_update, teacher_samples)
from workers.offload import ParkedNetwork


class Distiller:
    """Holds the three networks and takes one critic or generator update at a time: the cycle's steps
    (workers/cycle.py) on one run's rows, each update applied once every rank agrees its loss is finite.

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
        self.rows = Rows()
        self.vote = FiniteVote(config.schedule.on_nonfinite, 1, device)

    @property
    def skipped(self) -> int:
        """Updates skipped on a non-finite loss or gradients (schedule.on_nonfinite=skip), resumes included."""
        return int(self.vote.skipped[0])

    @skipped.setter
    def skipped(self, value: int) -> None:
        self.vote.skipped.fill_(value)

    # -- the two updates -------------------------------------------------------------------------------

    def generator_samples(self, batches: list[PromptBatch]) -> list[torch.Tensor]:
        """Fresh no-grad generator samples for a cycle's critic updates, one per batch, from one rollout of
        all of them: the generator does not change between critic updates."""
        sizes = [b.cond.batch_size for b in batches]
        cond = Conditioning.cat([b.cond for b in batches])
        eps = self._noise((sum(sizes), *self.adapter.latent_shape))
        x_gen = generator_samples(self.adapter, self.generator.module, eps, cond, self.generator_sigmas)
        return list(x_gen.split(sizes))

    def critic_step(self, batch: PromptBatch, x_gen: torch.Tensor, where: str) -> dict[str, float]:
        """Loss 5 on x_gen, a fresh no-grad generator sample for the batch's prompts (generator_samples); under
        dmd-gan with the head's loss on the batch's teacher samples against x_gen."""
        t, eps2 = self._draw_t(len(x_gen)), self._noise(x_gen.shape)
        loss = self.config.loss
        real = teacher_samples(batch) if loss.method == "dmd-gan" else None
        out = critic_loss(self.adapter, self.critic.module, x_gen, t, eps2, batch.cond, self.rows, real,
                          loss.critic_gan_weight)
        return self._apply(self.critic, out, where)

    def generator_step(self, batch: AnchorBatch, where: str) -> dict[str, float]:
        """Losses 1-4: DMD on x_gen (steps 2..N) plus lambda times the anchor loss on step 1 (dp-dmd), or a
        baseline's term (dmd-regression, dmd-gan)."""
        t, eps2 = self._draw_t(len(batch.eps)), self._noise(batch.eps.shape)
        nets = Networks(self.adapter, self.teacher, self.generator.module, self.critic.module, self.negative,
                        self.teacher_weights)
        with generator_update(self.config, self.critic.module):
            out = generator_loss(nets, batch, t, eps2, self.generator_sigmas, self.config, self.rows,
                                 self.config.loss.weights, self.config.loss.first_step_detached)
            return self._apply(self.generator, out, where)

    # -- helpers ---------------------------------------------------------------------------------------

    def _apply(self, engine, out: LossOutput, where: str) -> dict[str, float]:
        """Backward and step, once every rank agrees the loss is finite (one sync per step); an update whose
        gradients were not finite was not applied (workers/engines.py) and counts as skipped, or raises."""
        with record_function(f"{REGION}finite vote"):
            agree = lambda ok: torch.tensor([self.all_finite(ok[0])], device=ok.device)  # noqa: E731
            if not bool(self.vote(self.rows.flags(out), agree=agree)[0]):
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
            self.vote({"gradients": torch.zeros(1, dtype=torch.bool, device=self.device)})
            return self._nonfinite(["gradients (the update was not applied)"], where)
        return metrics

    def _nonfinite(self, terms: list[str], where: str) -> dict[str, float]:
        """What the vote decided for an update that was not applied: raise naming terms (on_nonfinite=raise),
        or report the skip it counted."""
        if self.vote.stops:
            raise NonFiniteLossError(terms, where)
        return {"skipped": 1.0}

    def _noise(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng).to(self.device)

    def _draw_t(self, n: int) -> torch.Tensor:
        return sample_sigmas(self.loss_sigmas, n, self.rng).to(self.device)


def copy_for_training(teacher: nn.Module) -> nn.Module:
    """A trainable copy of the teacher's network: generator and critic both start here."""
    net = copy.deepcopy(teacher)
    net.train().requires_grad_(True)
    return net


def critic_network(config: RunConfig, net: nn.Module) -> nn.Module:
    """The critic the run trains: the network itself, or under dmd-gan the network with its classifier head
    (models/gan.py), which trains with it."""
    if config.loss.method != "dmd-gan":
        return net
    from models.gan import CriticWithHead

    return CriticWithHead(net)
