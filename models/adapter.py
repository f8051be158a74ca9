"""The interface every teacher family implements: conditioning, parameterisation and CFG live here,
so that losses and training loops never ask which family they are running."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from models import flow
from models.errors import ConfigError
from models.flow import VelocityFn, cfg_combine, x0_from_velocity
from models.losses import LossOutput, anchor_velocity, diversity_loss

Role = Literal["teacher", "generator"]
"""Whose sampler a schedule is: the teacher's own multi-step one, or the exported few-step generator's."""


@dataclass(frozen=True)
class LoadOptions:
    """What a family's load_teacher(path, options) loads, beyond the denoiser itself.

    Text encoders are needed only where prompts are encoded (precompute actors, evaluation, sampling):
    training workers read prompt embeddings, the empty prompt's included, from the trajectory store. The
    VAE only decodes latents to images. Families whose encoders are part of the teacher (the embedded
    ones) load them regardless, and ignore dtype (the caller casts the network).
    """

    text_encoders: bool = True
    vae: bool = True
    resolution: int = 0  # image side in pixels; 0 = the model's native resolution
    dtype: torch.dtype = torch.float32


def check_native_resolution(options: LoadOptions, native: int | None, family: str) -> None:
    """For families with one fixed sample size: refuse any other teacher.resolution."""
    if options.resolution not in (0, native):
        allowed = "0 (its native size)" + (f" or {native}" if native else "")
        raise ConfigError("teacher.resolution", f"the {family} family has a fixed sample size; it must be {allowed}, "
                                                f"got {options.resolution}")


@dataclass(frozen=True)
class Conditioning:
    """The prompt embeddings a family's network takes, each with the batch as its first dim.

    SD3: {"prompt_embeds": (B, L, D), "pooled_projections": (B, P)}; SDXL: {"prompt_embeds": (B, 77, D),
    "text_embeds": (B, P), "time_ids": (B, 6)}; the embedded families use one tensor.
    """

    tensors: Mapping[str, torch.Tensor]

    def __post_init__(self):
        sizes = {name: t.shape[0] for name, t in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"conditioning tensors disagree on batch size: {sizes}")

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def to(self, device=None, dtype=None) -> Conditioning:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return Conditioning({k: move(t) for k, t in self.tensors.items()})

    def expand(self, batch_size: int) -> Conditioning:
        """Repeat a batch-1 conditioning (the empty prompt) to batch_size rows."""
        if self.batch_size != 1:
            raise ValueError(f"only a batch-1 conditioning can be expanded, this one has {self.batch_size}")
        return Conditioning({k: t.expand(batch_size, *t.shape[1:]) for k, t in self.tensors.items()})

    def __getitem__(self, index) -> Conditioning:
        return Conditioning({k: t[index] for k, t in self.tensors.items()})

    def where(self, mask: torch.Tensor, other: Conditioning) -> Conditioning:
        """Row-wise choice: other's row where mask (B,) is True, else this row (CFG dropout)."""
        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(mask.reshape(-1, *([1] * (a.ndim - 1))).to(a.device), b.to(a.device), a)
        return Conditioning({k: pick(t, other.tensors[k]) for k, t in self.tensors.items()})

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        keys = items[0].tensors.keys()
        return Conditioning({k: torch.cat([c.tensors[k] for c in items]) for k in keys})


def cast(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """net in dtype, in place. torch's own Module.to: diffusers' override warns about modules "to keep in
    float32" on every dtype cast, even for models that list none."""
    return nn.Module.to(net, dtype)


def network_dtype(net: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The floating dtype a network computes in: that of its first floating parameter."""
    for p in net.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


class TeacherAdapter(ABC):
    """One per teacher family. The same network class serves as teacher, generator and critic; the
    adapter turns (network, x_t, t, conditioning) into a velocity in the flow convention of models.flow.

    Subclasses implement the abstract methods; a family whose diversity target is not the flow form (SDXL's
    epsilon prediction) overrides diversity_terms and diversity_fn and sets anchor_x0.
    """

    family: ClassVar[str]
    # Whether the anchors keep the teacher's guided x0 estimate at z_K (one more teacher call per anchor), for
    # a diversity target in x-prediction form.
    anchor_x0: ClassVar[bool] = False
    # Loss 1 on diversity_terms' (prediction, target): models.losses' flow form unless the family's differs
    diversity_fn: ClassVar[Callable[[torch.Tensor, torch.Tensor], LossOutput]] = staticmethod(diversity_loss)

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample in the space the flow runs in, without the batch dim."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompt embeddings for a list of prompts; the empty prompt "" is the unconditional one."""

    @abstractmethod
    def network_velocity(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The family's network call: the velocity at x (B, *latent_shape), already in the network's dtype
        and on its device, for flow times t (B,) in float32 (never rounded to a low-precision dtype: bf16
        holds 1000 t only in steps of up to 4), with cond cast like x. Any floating dtype may come back."""

    def velocity(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The velocity at flow state x_t (B, *latent_shape) and times t (B,), in x_t's dtype.

        The network runs in its own dtype (bf16 when training in bf16), while states, times and Euler steps
        stay in the caller's: float32 states keep float32 anchors, timesteps and step sizes in every precision.
        """
        dtype = network_dtype(net, x_t.dtype)
        v = self.network_velocity(net, x_t.to(dtype), t.float(), cond.to(x_t.device, dtype))
        return v.to(x_t.dtype)

    def to(self, device: torch.device | str) -> TeacherAdapter:
        """Move the frozen modules the adapter owns (text encoders, VAE) to device; none by default."""
        return self

    def check_schedule(self, num_steps: int, shift: float) -> None:
        """Raise ValueError if a pretrained teacher's own scheduler would not visit
        sampling_sigmas(num_steps, shift); embedded teachers have no scheduler of their own."""

    def sampling_sigmas(self, num_steps: int, shift: float, role: Role = "teacher") -> torch.Tensor:
        """The num_steps + 1 flow times t a sampler visits, from the top of the schedule down to 0, shape
        (num_steps + 1,) float32: the teacher's own sampler (role "teacher") or the exported generator's
        scheduler ("generator"). Flow families start at t = 1: models.flow.sampling_sigmas for both."""
        return flow.sampling_sigmas(num_steps, shift)

    def training_sigmas(self, shift: float) -> torch.Tensor:
        """The flow times the DMD and critic losses draw t from, uniformly (one per training timestep)."""
        return flow.training_sigmas(shift)

    def initial_state(self, eps: torch.Tensor, sigmas: torch.Tensor, role: Role = "teacher") -> torch.Tensor:
        """The flow state at t = sigmas[0] that a sampler starts from for noise eps (B, *latent_shape).
        At t = 1 that is eps itself; families whose schedule tops out below 1 scale it as their pipeline does."""
        return eps

    def generator_scheduler(self, shift: float):
        """The diffusers scheduler an exported generator samples with: set_timesteps(N) must visit the
        sigmas it was trained on, sampling_sigmas(N, shift)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(shift=shift)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples (B, *latent_shape) -> what pictures and metrics read; pixel-space families return them as is."""
        return samples

    def trainable_modules(self) -> list[nn.Module]:
        """Modules the adapter owns that train with an embedded teacher (a text encoder); none by default."""
        return []

    def negative_conditioning(self, batch_size: int) -> Conditioning:
        """The empty-prompt conditioning CFG is taken against, repeated to batch_size."""
        return self.encode_prompts([""]).expand(batch_size)

    def guided_velocity(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                        uncond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """CFG velocity v_u + w (v_c - v_u), with both branches in one doubled batch."""
        v = self.velocity(net, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
        v_uncond, v_cond = v.chunk(2)
        return cfg_combine(v_uncond, v_cond, guidance_scale)

    def diversity_terms(self, v_first: torch.Tensor, x_start: torch.Tensor, t_start: torch.Tensor, eps: torch.Tensor,
                        z_anchor: torch.Tensor, t_anchor: torch.Tensor,
                        x0_anchor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss 1's prediction and target in the teacher's parameterisation (docs/method.md), row by row: for
        flow teachers the generator's first-step velocity v_first (B, ...), taken at x_start and time t_start,
        and the average velocity over [t_K, 1] from noise eps to the anchor z_anchor (B, ...) at t_anchor (B,).
        x0_anchor: the teacher's x0 estimate at z_K, present when anchor_x0 is set. The loss itself is
        diversity_fn(prediction, target), which the cycle applies per run or per trial (workers/cycle.py)."""
        return v_first, anchor_velocity(eps, z_anchor, t_anchor)

    def regression_distance(self, device: torch.device,
                            options=None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The dmd-regression baseline's perceptual distance d(x, y) between samples (B, *latent_shape), per row
        (B,), on device (built before any vmap that calls it): the mean squared difference here (points have no
        perception); pixel families override it, and latent families measure LPIPS on the decoded images as
        options (models.perceptual.PerceptualOptions, the recipe's loss.lpips_*) say."""
        return lambda x, y: (x - y).pow(2).flatten(1).mean(1)

    def x0(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return x0_from_velocity(x_t, self.velocity(net, x_t, t, cond), t)

    def velocity_fn(self, net: nn.Module, cond: Conditioning, uncond: Conditioning | None = None,
                    guidance_scale: float | None = None) -> VelocityFn:
        """Bind a network and conditioning into velocity_fn(x_t, t) for rollouts; guided when uncond is given."""
        if uncond is None:
            return lambda x_t, t: self.velocity(net, x_t, t, cond)
        if guidance_scale is None:
            raise ValueError("a guided velocity_fn needs guidance_scale")
        return lambda x_t, t: self.guided_velocity(net, x_t, t, cond, uncond, guidance_scale)
