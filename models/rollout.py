"""The two trajectories DP-DMD needs: the teacher's anchor (eps -> z_K) and the generator's few-step rollout."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.flow import VelocityFn, batch_t, euler_step, ode_rollout, x0_from_velocity


@dataclass(frozen=True)
class Anchor:
    """The teacher's state z_K after K guided ODE steps from eps, its time t_K, and (when asked for) the
    teacher's guided x0 estimate at z_K, the diversity target of epsilon-prediction teachers, and its full sample
    (the ODE run on from z_K to t = 0), the baselines' target."""

    z: torch.Tensor  # (B, ...)
    t: torch.Tensor  # scalar
    x0: torch.Tensor | None = None  # (B, ...)
    sample: torch.Tensor | None = None  # (B, ...)


def teacher_anchor(guided_velocity_fn: VelocityFn, eps: torch.Tensor, teacher_sigmas: torch.Tensor,
                   anchor_step: int, x0_estimate: bool = False, full_sample: bool = False) -> Anchor:
    """Run the first anchor_step (K) Euler steps of the teacher's guided ODE from eps, the state at
    t = teacher_sigmas[0] (1 for flow teachers; the adapter's initial_state otherwise).

    guided_velocity_fn must be deterministic (CFG velocity of the teacher): a stochastic sampler breaks
    the target. teacher_sigmas: (S + 1,) from the adapter's sampling_sigmas(S, shift), 1 <= K < S + 1.
    x0_estimate: also evaluate the teacher once more at z_K for its x0 estimate there (one more NFE).
    full_sample: also run the ODE on from z_K to the end of teacher_sigmas (S - K more steps).
    """
    num_steps = teacher_sigmas.numel() - 1
    if not 1 <= anchor_step <= num_steps:
        raise ValueError(f"anchor_step K must be in [1, {num_steps}] for a {num_steps}-step teacher, got {anchor_step}")
    sigmas = teacher_sigmas[: anchor_step + 1]
    with torch.no_grad():
        z = ode_rollout(guided_velocity_fn, eps, sigmas)
        x0 = x0_from_velocity(z, guided_velocity_fn(z, batch_t(sigmas[-1], z)), sigmas[-1]) if x0_estimate else None
        sample = None
        if full_sample:
            sample = ode_rollout(guided_velocity_fn, z, teacher_sigmas[anchor_step:]) if anchor_step < num_steps else z
    return Anchor(z=z, t=sigmas[-1].clone(), x0=x0, sample=sample)


@dataclass(frozen=True)
class GeneratorRollout:
    """v_first: the generator's velocity at (eps, t = 1), carrying gradient (for the diversity loss).
    x_first: the state after the first step, detached when the stop-gradient is on.
    x_gen: the final sample (t = 0), carrying gradient through steps 2..N only."""

    v_first: torch.Tensor
    x_first: torch.Tensor
    x_gen: torch.Tensor


def generator_rollout(velocity_fn: VelocityFn, eps: torch.Tensor, generator_sigmas: torch.Tensor,
                      detach_first_step: bool | torch.Tensor = True) -> GeneratorRollout:
    """The N-step generator sample with the DP-DMD stop-gradient after step 1 (docs/method.md, loss 2).

    eps: (B, ...) the starting state at t = generator_sigmas[0] (noise itself at t = 1, the adapter's
    initial_state below that); generator_sigmas: (N + 1,) ending at 0.
    Step 1 gives v_first and x_first = eps + (t_1 - t_0) v_first, detached so that the DMD term
    reaches the generator only through steps 2..N and the diversity term only through step 1.
    detach_first_step may be (B,) bool, one flag per row (trials trained together, some of them plain DMD).
    """
    if generator_sigmas.numel() < 2:
        raise ValueError("generator_sigmas needs at least two entries (one step)")
    t0, t1 = generator_sigmas[0], generator_sigmas[1]
    v_first = velocity_fn(eps, batch_t(t0, eps))
    x_first = euler_step(eps, v_first, t0, t1)
    if isinstance(detach_first_step, torch.Tensor):
        rows = detach_first_step.to(x_first.device).reshape(-1, *[1] * (x_first.ndim - 1))
        x_first = torch.where(rows, x_first.detach(), x_first)
    elif detach_first_step:
        x_first = x_first.detach()
    x_gen = ode_rollout(velocity_fn, x_first, generator_sigmas[1:])
    return GeneratorRollout(v_first=v_first, x_first=x_first, x_gen=x_gen)
