"""sd3: Stable Diffusion 3 / 3.5 teachers, loaded from diffusers StableDiffusion3Pipeline directories.

The flow runs in the VAE's latent space, (16, H/8, W/8) for the released models, in the convention of
models.flow: the SD3 transformer predicts v = eps - x0 at timestep 1000 t, as the pipeline calls it, and
the pipeline's Euler steps are ours. Latents are the VAE's, scaled: x0 = (vae latent - shift_factor) *
scaling_factor; decode() undoes that. The text encoders (CLIP-L, CLIP-G and T5 at 256 tokens) load only
where prompts are encoded (precompute actors, evaluation); training workers load the transformer alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import nn

from models.adapter import Conditioning, LoadOptions, TeacherAdapter
from models.errors import ConfigError
from models.families.pretrained import (check_resolution, load_components, lpips_distance, pretrained_family,
                                       random_denoiser, read_component_config, read_model_index)
from models.flow import sampling_sigmas

NAME = "sd3"
MAX_SEQUENCE_LENGTH = 256  # T5 tokens, the pipeline's default and the reference script's

# transformer/config.json of stabilityai/stable-diffusion-3.5-medium (MMDiT-X: the first 13 blocks attend
# over the image stream a second time), so that benchmarks can build the real network with random weights.
SD35_MEDIUM_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
# The SD3 / SD3.5 VAE's latent statistics and downsampling (vae/config.json).
SD3_LATENT_CHANNELS, SD3_VAE_SCALE_FACTOR = 16, 8
SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR = 1.5305, 0.0609


class SD3Adapter(TeacherAdapter):
    """Conditioning: {"prompt_embeds": (B, 77 + 256, 4096), "pooled_projections": (B, 2048)} for SD3.5, from
    the pipeline's own encode_prompt. Holds the text encoders and VAE only when they were loaded."""

    family = NAME

    def __init__(self, resolution: int, latent_channels: int, vae_scale_factor: int,
                 scheduler: FlowMatchEulerDiscreteScheduler, source: Path | None = None, text_pipeline=None,
                 vae: AutoencoderKL | None = None, scaling_factor: float = SD3_SCALING_FACTOR,
                 shift_factor: float = SD3_SHIFT_FACTOR):
        self.resolution, self.latent_channels, self.vae_scale_factor = resolution, latent_channels, vae_scale_factor
        self.scheduler, self.source = scheduler, source
        self.text_pipeline, self.vae = text_pipeline, vae
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor

    @property
    def latent_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale_factor
        return (self.latent_channels, side, side)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        if self.text_pipeline is None:
            raise RuntimeError("this SD3 teacher was loaded without its text encoders (training workers read "
                               "prompt embeddings from the trajectory store); load it with "
                               "LoadOptions(text_encoders=True) to encode prompts")
        device = self.text_pipeline.text_encoder.device
        with torch.no_grad():
            embeds, _, pooled, _ = self.text_pipeline.encode_prompt(
                prompt=list(prompts), prompt_2=None, prompt_3=None, device=device,
                do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
        return Conditioning({"prompt_embeds": embeds, "pooled_projections": pooled})

    def network_velocity(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # The timestep goes in float32, as the pipeline passes it.
        return net(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=cond.tensors["prompt_embeds"],
                   pooled_projections=cond.tensors["pooled_projections"], return_dict=False)[0]

    def to(self, device: torch.device | str) -> SD3Adapter:
        if self.text_pipeline is not None:
            self.text_pipeline.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def check_schedule(self, num_steps: int, shift: float) -> None:
        check_flow_schedule(self.scheduler, num_steps, shift)

    def generator_scheduler(self, shift: float) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config, shift=shift)

    @torch.no_grad()
    def decode(self, samples: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], on the CPU, as the pipeline decodes them."""
        if self.vae is None:
            raise RuntimeError("this SD3 teacher was loaded without its VAE; load it with LoadOptions(vae=True) "
                               "to decode latents into images")
        return torch.cat([self.decode_latents(chunk).float().clamp(-1, 1).cpu() for chunk in samples.split(batch_size)])

    def decode_latents(self, samples: torch.Tensor) -> torch.Tensor:
        """Latents -> images (about [-1, 1], unclamped), in the VAE's dtype on its device; differentiable."""
        latents = samples.to(self.vae.device, self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]

    def regression_distance(self, device: torch.device, options=None) -> nn.Module:
        return lpips_distance(self, device, options)


def check_flow_schedule(scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, shift: float) -> None:
    """The anchors and the DMD timesteps use sampling_sigmas(num_steps, shift); the teacher's own scheduler
    must visit the same sigmas, or the anchors would not be the teacher's ODE."""
    if scheduler.config.get("use_dynamic_shifting"):
        raise ConfigError("teacher.path", "the teacher's scheduler uses dynamic (resolution-dependent) shifting, "
                                          "which the anchor rollout does not reproduce; use a pipeline whose "
                                          "scheduler has a fixed shift")
    own = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    own.set_timesteps(num_steps, device="cpu")
    ours = sampling_sigmas(num_steps, shift)
    if own.sigmas.shape != ours.shape or not torch.allclose(own.sigmas.float(), ours, atol=1e-4):
        raise ConfigError("teacher.shift", f"the teacher's scheduler (shift {scheduler.config.shift}) visits other "
                                           f"sigmas than teacher.shift={shift} gives over {num_steps} steps; set "
                                           f"teacher.shift={scheduler.config.shift}")


def deterministic_scheduler(path: Path, family: str) -> FlowMatchEulerDiscreteScheduler:
    """The pipeline's scheduler, if it is the deterministic flow-matching Euler ODE the anchors need."""
    config = read_component_config(path, "scheduler")
    name = config.get("_class_name", "?")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise ConfigError("teacher.path", f"{path}/scheduler is a {name}; the {family} anchor rollout is the "
                                          "deterministic FlowMatchEulerDiscreteScheduler ODE, so the pipeline must "
                                          "use that scheduler")
    if config.get("stochastic_sampling"):
        raise ConfigError("teacher.path", f"{path}/scheduler samples stochastically (stochastic_sampling: true); "
                                          "the teacher's anchor rollout needs its deterministic ODE: set "
                                          "stochastic_sampling to false in scheduler/scheduler_config.json")
    return FlowMatchEulerDiscreteScheduler.from_config(config)


# ----------------------------------------------------------------------------------------------------
# Loading, and the benchmarks' random teacher


def load_teacher(path: str | Path, options: LoadOptions = LoadOptions()) -> tuple[SD3Adapter, SD3Transformer2DModel]:
    """(adapter, transformer) from a StableDiffusion3Pipeline directory; text encoders and VAE as options say."""
    path = Path(path)
    read_model_index(path, NAME)
    scheduler = deterministic_scheduler(path, NAME)
    transformer_config = read_component_config(path, "transformer")
    vae_config = read_component_config(path, "vae")
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    patch, native = transformer_config.get("patch_size", 2), transformer_config["sample_size"] * vae_scale_factor
    resolution = options.resolution or native
    max_tokens = transformer_config.get("pos_embed_max_size") or transformer_config["sample_size"] // patch
    check_resolution(resolution, vae_scale_factor * patch, max_tokens * patch * vae_scale_factor, NAME)
    net, vae, text_pipeline = load_components(path, options, "transformer", SD3Transformer2DModel,
                                              "StableDiffusion3Pipeline", scheduler)
    adapter = SD3Adapter(resolution, transformer_config["in_channels"], vae_scale_factor, scheduler, path,
                         text_pipeline, vae, vae_config.get("scaling_factor", SD3_SCALING_FACTOR),
                         vae_config.get("shift_factor", SD3_SHIFT_FACTOR) or 0.0)
    return adapter, net


def random_teacher(transformer_config: dict = SD35_MEDIUM_TRANSFORMER, resolution: int = 1024, seed: int = 0,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                   ) -> tuple[SD3Adapter, SD3Transformer2DModel]:
    """(adapter, transformer) with random weights and no text encoders or VAE: the real network's cost without
    a download (benchmarks feed it random prompt embeddings of the shapes in conditioning_shapes)."""
    net = random_denoiser(SD3Transformer2DModel, transformer_config, seed, dtype, device)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return SD3Adapter(resolution, transformer_config["in_channels"], SD3_VAE_SCALE_FACTOR, scheduler), net


def conditioning_shapes(transformer_config: dict = SD35_MEDIUM_TRANSFORMER,
                        clip_tokens: int = 77) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the conditioning tensors: CLIP and T5 tokens side by side, pooled CLIP-L + CLIP-G."""
    return {"prompt_embeds": (clip_tokens + MAX_SEQUENCE_LENGTH, transformer_config["joint_attention_dim"]),
            "pooled_projections": (transformer_config["pooled_projection_dim"],)}


FAMILY = pretrained_family(NAME, "StableDiffusion3Pipeline", "transformer", load_teacher)
