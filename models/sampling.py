"""Seeded sampling: the same (prompt, seed) gives the same noise for every model and any batching."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.adapter import Role, TeacherAdapter
from models.flow import ode_rollout


def seeded_noise(seeds: list[int], shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """eps of shape (len(seeds), *shape): row i is drawn from its own generator seeded with seeds[i]."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    return torch.stack(rows) if rows else torch.empty(0, *shape, dtype=dtype)


@dataclass(frozen=True)
class Sampler:
    """How a model samples: its sigma schedule (num_steps + 1 entries, top -> 0), CFG scale, and whose
    sampler it is (the role picks the adapter's initial state: the teacher's pipeline or the generator's).

    guidance_scale None samples the conditional model alone (generators); a number runs CFG (teachers).
    """

    sigmas: torch.Tensor
    guidance_scale: float | None = None
    role: Role = "teacher"


@torch.no_grad()
def sample(adapter: TeacherAdapter, net: nn.Module, prompts: list[str], seeds: list[int], sampler: Sampler,
           batch_size: int = 256, device: torch.device | str = "cpu") -> torch.Tensor:
    """x0 samples (len(prompts), *latent_shape) for paired prompts[i], seeds[i]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must pair up, got {len(prompts)} prompts and {len(seeds)} seeds")
    out = []
    sigmas = sampler.sigmas.to(device)
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start:start + batch_size]
        eps = seeded_noise(seeds[start:start + batch_size], adapter.latent_shape).to(device)
        cond = adapter.encode_prompts(batch_prompts).to(device)
        uncond = None
        if sampler.guidance_scale is not None:
            uncond = adapter.negative_conditioning(len(batch_prompts)).to(device)
        velocity_fn = adapter.velocity_fn(net, cond, uncond, sampler.guidance_scale)
        out.append(ode_rollout(velocity_fn, adapter.initial_state(eps, sigmas, sampler.role), sigmas).cpu())
    return torch.cat(out) if out else torch.empty(0, *adapter.latent_shape)


def grid_pairs(prompts: list[str], seeds: list[int]) -> tuple[list[str], list[int]]:
    """Every (prompt, seed) pair, prompt-major: one grid row per prompt, one column per seed."""
    return [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds]
