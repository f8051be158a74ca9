"""Flow-matching conventions shared by every teacher family, and the sigma schedules from diffusers.

t in [0, 1]; t = 0 is data, t = 1 is noise. x_t = (1 - t) x0 + t eps, v = eps - x0,
Euler step x <- x + (t_next - t) v, and x0_hat = x_t - t v. The scheduler's sigmas are the t values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""velocity_fn(x_t, t) -> v, with x_t of shape (B, ...) and t of shape (B,)."""


def make_scheduler(shift: float, num_train_timesteps: int = 1000) -> FlowMatchEulerDiscreteScheduler:
    """The teacher family's flow scheduler (SD3 / SD3.5 use shift 3.0)."""
    # Imported here: diffusers (and the scipy it pulls in) take about 2 s to import, which processes that only
    # pass configs and stores around (Ray Train's controller, which unpickles the store) need not pay
    from diffusers import FlowMatchEulerDiscreteScheduler

    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)


def sampling_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The num_steps + 1 sigmas an Euler sampler visits, from 1 down to 0, as diffusers computes them.

    Shape (num_steps + 1,), float32. With shift 3: 30 steps visit 0.9883, 0.9631, 0.9353 and 0.8513
    after 1, 3, 5 and 10 steps; 4 steps visit 1, 0.8577, 0.6022, 0.0089, 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = make_scheduler(shift)
    scheduler.set_timesteps(num_inference_steps=num_steps, device="cpu")
    return scheduler.sigmas.to(torch.float32).clone()


def training_sigmas(shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The shifted sigmas of the training timesteps, shape (num_train_timesteps,), from 1 down.

    The DMD and critic losses draw their t uniformly from these (as the reference script does).
    """
    return make_scheduler(shift, num_train_timesteps).sigmas.to(torch.float32).clone()


def sample_sigmas(table: torch.Tensor, batch_size: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Draw batch_size entries of a sigma table uniformly, shape (batch_size,)."""
    index = torch.randint(0, table.numel(), (batch_size,), generator=generator, device=table.device)
    return table[index].to(device if device is not None else table.device)


def expand_t(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample t of shape (B,) against x of shape (B, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.shape != x.shape[:1]:
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def batch_t(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A per-sample t of shape (B,) from a scalar or (B,) t."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps."""
    t = expand_t(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = eps - x0, the flow-matching regression target."""
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x0_hat = x_t - t v."""
    return x_t - expand_t(t, x_t) * v


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """v = (x_t - x0) / t, the inverse of x0_from_velocity (t > 0)."""
    return (x_t - x0) / expand_t(t, x_t)


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance, v = v_uncond + w (v_cond - v_uncond).

    w = guidance_scale exactly: w = 1 is the conditional model, w = 0 the unconditional one.
    """
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def euler_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float,
               t_next: torch.Tensor | float) -> torch.Tensor:
    """x <- x + (t_next - t) v."""
    return x + (expand_t(t_next, x) - expand_t(t, x)) * v


def ode_rollout(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Deterministic Euler integration from sigmas[0] to sigmas[-1].

    x: (B, ...) state at t = sigmas[0]; sigmas: (S,) decreasing. Returns the state at sigmas[-1].
    """
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        t_b = batch_t(t, x)
        x = euler_step(x, velocity_fn(x, t_b), t, t_next)
    return x
