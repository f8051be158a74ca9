"""DP-DMD losses as pure functions: tensors in, a LossOutput out. No model calls, no backward, no collectives.

Equation numbers refer to the list in docs/method.md ("The losses"). Every function also hands back the
intermediate tensors whose finiteness decides whether a step may be applied; nothing is ever zeroed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from models.flow import expand_t

Normaliser = Literal["xt", "xgen"]


class NonFiniteLossError(FloatingPointError):
    """A loss term, or a tensor it was computed from, holds NaN or Inf."""

    def __init__(self, terms: list[str], where: str = ""):
        self.terms = list(terms)
        self.where = where
        at = f" at {where}" if where else ""
        super().__init__(f"non-finite values{at} in: {', '.join(self.terms)}")


@dataclass
class LossOutput:
    """loss: scalar with gradient. metrics: detached scalars for logging.
    watched: named tensors (the loss included) that must be finite for the step to be applied."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    watched: dict[str, torch.Tensor] = field(default_factory=dict)

    def finite_flag(self) -> torch.Tensor:
        """A 0-dim bool tensor on the loss's device; no host sync, so ranks can all-reduce it."""
        flags = [torch.isfinite(t.detach()).all() for t in self.watched.values()]
        return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=self.loss.device)

    def nonfinite_terms(self) -> list[str]:
        return [name for name, t in self.watched.items() if not bool(torch.isfinite(t.detach()).all())]

    def raise_if_nonfinite(self, where: str = "") -> None:
        bad = self.nonfinite_terms()
        if bad:
            raise NonFiniteLossError(bad, where)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).mean()


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dim, kept broadcastable: (B, ...) -> (B, 1, ..., 1)."""
    return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)


def anchor_velocity(eps: torch.Tensor, z_anchor: torch.Tensor, t_anchor: torch.Tensor | float) -> torch.Tensor:
    """Loss 1 target: the average velocity over [t_K, 1], v_tilde = (eps - z_K) / (1 - t_K).

    eps, z_anchor: (B, ...); t_anchor: scalar or (B,), every entry < 1. Returns (B, ...).
    """
    t = torch.as_tensor(t_anchor, dtype=eps.dtype, device=eps.device)
    if bool((t >= 1).any()):
        raise ValueError("t_anchor must be < 1 (K >= 1 teacher steps); the anchor at t = 1 is eps itself")
    return (eps - z_anchor) / (1 - expand_t(t, eps))


def diversity_loss(v_first: torch.Tensor, v_target: torch.Tensor) -> LossOutput:
    """Loss 1: L_div = mean || v_gen(eps, t=1, c) - v_tilde ||^2 over every element.

    v_first: (B, ...) the generator's first-step velocity, with gradient; v_target: (B, ...) from
    anchor_velocity, treated as a constant.
    """
    loss = _mse(v_first, v_target.detach())
    return LossOutput(loss, {"loss_div": loss.detach()}, {"div.target": v_target, "div.loss": loss})


def diversity_loss_x0(x0_first: torch.Tensor, x0_teacher_anchor: torch.Tensor) -> LossOutput:
    """Loss 1 for epsilon-prediction teachers (SDXL): the x-prediction form of the target.

    x0_first: (B, ...) the generator's x0 estimate at its first step (eps, t = 1), with gradient;
    x0_teacher_anchor: (B, ...) the teacher's x0 estimate at the anchor z_K, a constant.
    L_div = mean || x0_gen - x0_teacher(z_K) ||^2.
    """
    loss = _mse(x0_first, x0_teacher_anchor.detach())
    return LossOutput(loss, {"loss_div": loss.detach()}, {"div.target": x0_teacher_anchor, "div.loss": loss})


def dmd_gradient(x0_teacher: torch.Tensor, x0_critic: torch.Tensor, x_t: torch.Tensor, x_gen: torch.Tensor,
                 normaliser: Normaliser = "xt") -> tuple[torch.Tensor, torch.Tensor]:
    """The DMD update direction, grad = (x0_critic - x0_teacher) / n, and the per-sample normaliser n.

    n = mean |x_t - x0_teacher| per sample ("xt", the reference script) or mean |x_gen - x0_teacher|
    ("xgen", DMD2). All inputs (B, ...), treated as constants. Returns grad (B, ...), n (B, 1, ...).
    """
    x0_teacher, x0_critic = x0_teacher.detach().float(), x0_critic.detach().float()
    if normaliser == "xt":
        reference = x_t.detach().float()
    elif normaliser == "xgen":
        reference = x_gen.detach().float()
    else:
        raise ValueError(f"normaliser must be 'xt' or 'xgen', got {normaliser!r}")
    n = _per_sample_mean((reference - x0_teacher).abs())
    return (x0_critic - x0_teacher) / n, n


def dmd_loss(x_gen: torch.Tensor, x0_teacher: torch.Tensor, x0_critic: torch.Tensor, x_t: torch.Tensor,
             normaliser: Normaliser = "xt") -> LossOutput:
    """Loss 3: L_dmd = 0.5 * mean (x_gen - sg(x_gen - grad))^2, so dL/dx_gen = grad / x_gen.numel().

    x_gen: (B, ...) generator sample with gradient; x_t = (1 - t) x_gen + t eps' (B, ...);
    x0_teacher (guided) and x0_critic: (B, ...) their x0 predictions at x_t. L = 0 where they agree.
    """
    grad, n = dmd_gradient(x0_teacher, x0_critic, x_t, x_gen, normaliser)
    target = (x_gen.detach().float() - grad).detach()
    loss = 0.5 * (x_gen.float() - target).pow(2).mean()
    metrics = {"loss_dmd": loss.detach(), "dmd_grad_norm": grad.pow(2).mean().sqrt().detach(),
               "dmd_normaliser": n.mean().detach()}
    watched = {"dmd.x0_teacher": x0_teacher, "dmd.x0_critic": x0_critic, "dmd.normaliser": n,
               "dmd.x_gen": x_gen, "dmd.loss": loss}
    return LossOutput(loss, metrics, watched)


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, name: str = "flow") -> LossOutput:
    """L = mean || v_pred(x_t, t) - (eps - x0) ||^2, with x_t = (1 - t) x0 + t eps; x0, eps: constants.

    All tensors (B, ...). Trains the embedded teachers, and (as critic_loss) the critic.
    """
    loss = _mse(v_pred, (eps - x0).detach())
    return LossOutput(loss, {f"loss_{name}": loss.detach()}, {f"{name}.v": v_pred, f"{name}.loss": loss})


def critic_loss(v_critic: torch.Tensor, x_gen: torch.Tensor, eps: torch.Tensor) -> LossOutput:
    """Loss 5: flow matching on generator samples, L = mean || v_critic(x_t, t) - (eps' - x_gen) ||^2.

    v_critic: (B, ...) the critic's velocity at x_t = (1 - t) x_gen + t eps', with gradient;
    x_gen, eps: (B, ...) constants (no gradient reaches the generator).
    """
    return flow_matching_loss(v_critic, x_gen, eps, name="critic")


def regression_loss(x_gen: torch.Tensor, x_teacher: torch.Tensor,
                    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> LossOutput:
    """The dmd-regression baseline's term (the original DMD's): L_reg = mean over rows of d(x_gen, x_teacher),
    a perceptual distance between the generator's sample for a noise and the teacher's full ODE sample from the
    same noise and prompt.

    x_gen: (B, ...) with gradient; x_teacher: (B, ...) a constant; distance: (B, ...) x 2 -> (B,)."""
    per_row = distance(x_gen.float(), x_teacher.detach().float())
    loss = per_row.mean()
    return LossOutput(loss, {"loss_reg": loss.detach()}, {"reg.target": x_teacher, "reg.loss": loss})


def gan_critic_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> LossOutput:
    """The dmd-gan baseline's critic term (DMD2's): the classifier head's logistic loss, real (the teacher's
    samples) against generated, L = mean softplus(-D(real)) + mean softplus(D(fake)). Logits (B,)."""
    loss = F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()
    metrics = {"loss_gan_critic": loss.detach(), "gan_real_prob": torch.sigmoid(logits_real.detach().float()).mean(),
               "gan_fake_prob": torch.sigmoid(logits_fake.detach().float()).mean()}
    return LossOutput(loss, metrics, {"gan.logits_real": logits_real, "gan.logits_fake": logits_fake,
                                      "gan.critic_loss": loss})


def gan_generator_loss(logits_fake: torch.Tensor) -> LossOutput:
    """The dmd-gan baseline's generator term: the non-saturating loss L = mean softplus(-D(fake)) on the head's
    logits (B,) for the generator's (noised) samples, with gradient through the samples only."""
    loss = F.softplus(-logits_fake.float()).mean()
    return LossOutput(loss, {"loss_gan": loss.detach()}, {"gan.logits": logits_fake, "gan.loss": loss})


def weighted_sum(base: LossOutput, terms: dict[str, tuple[LossOutput, float | torch.Tensor]],
                 total: str) -> LossOutput:
    """base.loss + sum of weight * term.loss over terms (name -> (term, weight)), as LossOutput `total`. A term
    of weight 0 adds nothing, and its watched tensors need not be finite (they are still logged). A weight may be
    one per trial, (N,) against losses of N trials trained together (workers/cycle.py, TrialRows): where it is 0,
    that trial's loss leaves the term out (a NaN times 0 would still be NaN)."""
    loss, watched, metrics = base.loss, dict(base.watched), dict(base.metrics)
    for term, weight in terms.values():
        metrics.update(term.metrics)
        if isinstance(weight, torch.Tensor):
            off = weight == 0
            loss = torch.where(off, loss, loss + weight * term.loss)
            watched.update({k: torch.where(off.reshape(-1, *[1] * (v.ndim - 1)), torch.zeros((), device=v.device),
                                           v.detach()) for k, v in term.watched.items()})
        elif weight:
            loss = loss + weight * term.loss
            watched.update(term.watched)
    return LossOutput(loss, {**metrics, f"loss_{total}": loss.detach()}, {**watched, f"{total}.loss": loss})


def generator_objective(dmd: LossOutput, diversity: LossOutput, diversity_weight: float | torch.Tensor,
                        extra: dict[str, tuple[LossOutput, float | torch.Tensor]] | None = None) -> LossOutput:
    """Loss 4: L = L_dmd + lambda * L_div; lambda = 0 is plain DMD (the diversity term is still logged, and its
    terms need not be finite). diversity_weight may be one lambda per trial, (N,) against losses of N trials
    trained together (workers/cycle.py, TrialRows): where it is 0, that trial's loss is its DMD loss alone.
    extra: the baselines' terms with their weights (name -> (term, weight)), added the same way."""
    return weighted_sum(dmd, {"div": (diversity, diversity_weight), **(extra or {})}, "generator")
