"""sdxl: Stable Diffusion XL teachers, loaded from diffusers StableDiffusionXLPipeline directories.

SDXL is an epsilon-prediction model on the variance-exploding ("EDM") scale: x_edm = x0 + sigma eps, with
the UNet reading x_edm / sqrt(sigma^2 + 1) at the training timestep of sigma. The adapter presents it in the
flow convention of models.flow, so that rollouts, CFG and the losses need no SDXL branch:

    t = sigma / (1 + sigma),   x_t = x_edm / (1 + sigma) = (1 - t) x0 + t eps,
    x0_hat = x_edm - sigma eps_hat,   v = eps_hat - x0_hat = (1 + sigma) (eps_hat - x_t).

An Euler step in t is then exactly the EulerDiscreteScheduler's step in sigma (and DDIM's with eta = 0).
The largest training noise, sigma ~ 14.6, is t ~ 0.936: schedules start below t = 1, from the state the
pipeline starts from (initial_state). Latents are the VAE's scaled by its scaling_factor, as the pipeline's.
Conditioning holds the added SDXL inputs too (pooled CLIP-G embeds and the size/crop time ids), so training
workers load the UNet alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from torch import nn

from models.adapter import Conditioning, LoadOptions, Role, TeacherAdapter, network_dtype
from models.errors import ConfigError
from models.families.pretrained import (check_resolution, load_components, lpips_distance, pretrained_family,
                                       random_denoiser, read_component_config, read_model_index)
from models.flow import expand_t, x0_from_velocity
from models.losses import diversity_loss_x0

NAME = "sdxl"

# Schedulers whose sampling is the deterministic Euler ODE in sigma (DDIM with eta = 0, the pipeline's
# default, takes the same step), and schedulers that inject noise at every step.
ODE_SCHEDULERS = ("EulerDiscreteScheduler", "DDIMScheduler")
ANCHOR_SCHEDULER = "EulerDiscreteScheduler"  # what the anchors are computed with (the trajectory store's key)
STOCHASTIC_SCHEDULERS = ("EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
                         "DDPMScheduler", "LCMScheduler", "TCDScheduler", "CMStochasticIterativeScheduler")

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0, so that benchmarks can build the real
# network with random weights.
SDXL_BASE_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# The SDXL VAE's latent scale and downsampling (vae/config.json); its scheduler's noise schedule.
SDXL_LATENT_CHANNELS, SDXL_VAE_SCALE_FACTOR, SDXL_SCALING_FACTOR = 4, 8, 0.13025
SDXL_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                  "timestep_spacing": "leading", "prediction_type": "epsilon"}


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """Flow time of an EDM noise level: t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """EDM noise level of a flow time t < 1: sigma = t / (1 - t)."""
    return t / (1 - t)


class SDXLAdapter(TeacherAdapter):
    """Conditioning: {"prompt_embeds": (B, 77, 2048), "text_embeds": (B, 1280), "time_ids": (B, 6)} for SDXL,
    from the pipeline's own encode_prompt; the negative is the pipeline's too (zeros when the pipeline has
    force_zeros_for_empty_prompt). Holds the text encoders and VAE only when they were loaded."""

    family = NAME
    anchor_x0 = True

    def __init__(self, resolution: int, latent_channels: int, vae_scale_factor: int, scheduler: EulerDiscreteScheduler,
                 source: Path | None = None, text_pipeline=None, vae: AutoencoderKL | None = None,
                 scaling_factor: float = SDXL_SCALING_FACTOR, latents_mean=None, latents_std=None):
        self.resolution, self.latent_channels, self.vae_scale_factor = resolution, latent_channels, vae_scale_factor
        self.scheduler, self.source = scheduler, source
        self.text_pipeline, self.vae = text_pipeline, vae
        self.scaling_factor, self.latents_mean, self.latents_std = scaling_factor, latents_mean, latents_std
        # log sigma of every training timestep 0..T-1 (increasing), to map a sigma back to its timestep.
        alphas_cumprod = scheduler.alphas_cumprod.double()
        self.log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale_factor
        return (self.latent_channels, side, side)

    # -- conditioning ----------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self._encode(list(prompts), negative=False)
        return self._conditioning(embeds, pooled)

    def negative_conditioning(self, batch_size: int) -> Conditioning:
        """What the pipeline's CFG runs against with no negative prompt: zeros when the pipeline sets
        force_zeros_for_empty_prompt (SDXL base does), else the empty prompt's embeddings."""
        _, negative, _, negative_pooled = self._encode([""], negative=True)
        return self._conditioning(negative, negative_pooled).expand(batch_size)

    def _encode(self, prompts: list[str], negative: bool):
        if self.text_pipeline is None:
            raise RuntimeError("this SDXL teacher was loaded without its text encoders (training workers read "
                               "prompt embeddings from the trajectory store); load it with "
                               "LoadOptions(text_encoders=True) to encode prompts")
        device = self.text_pipeline.text_encoder_2.device
        with torch.no_grad():
            return self.text_pipeline.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=negative)

    def _conditioning(self, embeds: torch.Tensor, pooled: torch.Tensor) -> Conditioning:
        # The pipeline's add_time_ids: original size, crop top-left (0, 0), target size; the same for the
        # negative branch.
        side = self.resolution
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=embeds.dtype, device=embeds.device)
        return Conditioning({"prompt_embeds": embeds, "text_embeds": pooled,
                             "time_ids": time_ids.expand(len(embeds), 6).clone()})

    # -- parameterisation --------------------------------------------------------------------------------

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) training timestep of each noise level, interpolated in log sigma as diffusers'
        EulerDiscreteScheduler does (its _sigma_to_t): the timesteps the pipeline passes to the UNet."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.double().clamp_min(1e-10).log()
        low = torch.searchsorted(log_sigmas, log_sigma, right=True).sub(1).clamp(0, len(log_sigmas) - 2)
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).float()

    def velocity(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v = eps_hat - x0_hat at flow state x_t (B, C, h, w), t: (B,) in [0, t_max], in x_t's dtype.

        Overrides the base class so that the conversion from eps_hat uses the state x_t as given (float32
        states stay exact): only the scaled model input is cast to the UNet's dtype."""
        dtype = network_dtype(net, x_t.dtype)
        sigma = t_to_sigma(t.float())
        # x_edm / sqrt(sigma^2 + 1), the pipeline's scale_model_input, from x_t = x_edm / (1 + sigma).
        model_input = x_t.float() * expand_t((1 + sigma) / (sigma ** 2 + 1).sqrt(), x_t.float())
        eps_hat = self.network_velocity(net, model_input.to(dtype), sigma, cond.to(x_t.device, dtype))
        return ((eps_hat.float() - x_t.float()) * expand_t(1 + sigma, x_t.float())).to(x_t.dtype)

    def network_velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's noise prediction eps_hat for its scaled input x at noise levels sigma (B,) (velocity()
        turns it into a flow velocity)."""
        return net(x, self.timesteps(sigma), encoder_hidden_states=cond.tensors["prompt_embeds"],
                   added_cond_kwargs={"text_embeds": cond.tensors["text_embeds"], "time_ids": cond.tensors["time_ids"]},
                   return_dict=False)[0]

    # -- schedules ---------------------------------------------------------------------------------------

    def check_schedule(self, num_steps: int, shift: float) -> None:
        if shift != 1.0:
            raise ConfigError("teacher.shift", "the sdxl family samples with its own EulerDiscreteScheduler's sigmas, "
                                               "which no shift changes; set teacher.shift=1.0 and leave "
                                               f"generator.shift unset (got {shift})")

    def _own_scheduler(self, role: Role) -> EulerDiscreteScheduler:
        return (EulerDiscreteScheduler.from_config(self.scheduler.config) if role == "teacher"
                else self.generator_scheduler(1.0))

    def _set(self, role: Role, num_steps: int) -> EulerDiscreteScheduler:
        scheduler = self._own_scheduler(role)
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler

    def sampling_sigmas(self, num_steps: int, shift: float, role: Role = "teacher") -> torch.Tensor:
        """Flow times of the teacher's own scheduler (its timestep spacing, e.g. "leading" for SDXL base) or
        of the exported generator's ("trailing": 4 steps at timesteps 999, 749, 499, 249)."""
        self.check_schedule(num_steps, shift)
        return sigma_to_t(self._set(role, num_steps).sigmas.double()).float()

    def training_sigmas(self, shift: float) -> torch.Tensor:
        """Flow times of the 1000 training timesteps, from the top down (t ~ 0.936 to 0.028)."""
        self.check_schedule(1, shift)
        return sigma_to_t(self.log_sigmas.exp().flip(0)).float()

    def initial_state(self, eps: torch.Tensor, sigmas: torch.Tensor, role: Role = "teacher") -> torch.Tensor:
        """The pipeline's starting latents eps * init_noise_sigma (sigma_max for "trailing" spacing,
        sqrt(sigma_max^2 + 1) for "leading"), as a flow state: divided by 1 + sigma_max."""
        scheduler = self._set(role, len(sigmas) - 1)
        sigma_max = float(scheduler.sigmas[0])
        if not math.isclose(sigma_max / (1 + sigma_max), float(sigmas[0]), rel_tol=1e-4):
            raise ValueError(f"the {role} schedule starts at t = {float(sigmas[0]):.4f}, not at its scheduler's "
                             f"top t = {sigma_max / (1 + sigma_max):.4f}")
        return eps * (float(scheduler.init_noise_sigma) / (1 + sigma_max))

    def generator_scheduler(self, shift: float) -> EulerDiscreteScheduler:
        """The teacher's noise schedule with "trailing" spacing, so that set_timesteps(N) starts at the top
        timestep (999) and the pipeline starts from sigma_max * eps, as the generator was trained."""
        self.check_schedule(1, shift)
        return EulerDiscreteScheduler.from_config(self.scheduler.config, timestep_spacing="trailing",
                                                  final_sigmas_type="zero")

    # -- the diversity target ------------------------------------------------------------------------------

    diversity_fn = staticmethod(diversity_loss_x0)

    def diversity_terms(self, v_first: torch.Tensor, x_start: torch.Tensor, t_start: torch.Tensor, eps: torch.Tensor,
                        z_anchor: torch.Tensor, t_anchor: torch.Tensor,
                        x0_anchor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss 1 in the x-prediction form of epsilon-prediction teachers (docs/method.md): the generator's x0
        estimate at its first step, and the teacher's guided x0 estimate at z_K (diversity_loss_x0)."""
        if x0_anchor is None:
            raise ValueError("this epsilon-prediction teacher's diversity target needs the anchors' x0 estimates "
                             "(x0_anchor), which these anchor rows lack; precompute them again")
        return x0_from_velocity(x_start, v_first, t_start), x0_anchor

    # -- the rest ------------------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> SDXLAdapter:
        if self.text_pipeline is not None:
            self.text_pipeline.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    @torch.no_grad()
    def decode(self, samples: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1], on the CPU, as the pipeline decodes them."""
        if self.vae is None:
            raise RuntimeError("this SDXL teacher was loaded without its VAE; load it with LoadOptions(vae=True) "
                               "to decode latents into images")
        return torch.cat([self.decode_latents(chunk).float().clamp(-1, 1).cpu() for chunk in samples.split(batch_size)])

    def decode_latents(self, samples: torch.Tensor) -> torch.Tensor:
        """Latents -> images (about [-1, 1], unclamped), in the VAE's dtype on its device; differentiable."""
        device, dtype = self.vae.device, self.vae.dtype
        latents = samples.to(device, dtype)
        if self.latents_mean is not None and self.latents_std is not None:
            mean = torch.tensor(self.latents_mean).view(1, -1, 1, 1).to(device, dtype)
            std = torch.tensor(self.latents_std).view(1, -1, 1, 1).to(device, dtype)
            latents = latents * std / self.scaling_factor + mean
        else:
            latents = latents / self.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]

    def regression_distance(self, device: torch.device, options=None) -> nn.Module:
        return lpips_distance(self, device, options)


def ode_scheduler(path: Path) -> EulerDiscreteScheduler:
    """The pipeline's scheduler as the deterministic EulerDiscreteScheduler ODE the anchors need."""
    config = read_component_config(path, "scheduler")
    name = config.get("_class_name", "?")
    algorithm = str(config.get("algorithm_type", ""))
    if name in STOCHASTIC_SCHEDULERS or "sde" in algorithm:
        raise ConfigError("teacher.path", f"{path}/scheduler is a {name}{f' ({algorithm})' if algorithm else ''}, "
                          "which samples stochastically; the teacher's anchor rollout needs a deterministic ODE "
                          "sampler: save the pipeline with EulerDiscreteScheduler.from_config(pipe.scheduler.config) "
                          "(or DDIMScheduler)")
    if name not in ODE_SCHEDULERS:
        raise ConfigError("teacher.path", f"{path}/scheduler is a {name}; the sdxl anchor rollout is the Euler ODE of "
                                          f"{' or '.join(ODE_SCHEDULERS)}: save the pipeline with "
                                          "EulerDiscreteScheduler.from_config(pipe.scheduler.config)")
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ConfigError("teacher.path", f"{path}/scheduler has prediction_type {config['prediction_type']!r}; the "
                                          "sdxl family loads epsilon-prediction teachers (SDXL base) only")
    if config.get("timestep_type", "discrete") != "discrete" or config.get("rescale_betas_zero_snr"):
        raise ConfigError("teacher.path", f"{path}/scheduler uses continuous timesteps or zero-terminal-SNR betas, "
                                          "which the sdxl family does not support; use the discrete "
                                          "epsilon-prediction schedule of SDXL base")
    return EulerDiscreteScheduler.from_config(config)


# ----------------------------------------------------------------------------------------------------
# Loading, and the benchmarks' random teacher


def load_teacher(path: str | Path, options: LoadOptions = LoadOptions()) -> tuple[SDXLAdapter, UNet2DConditionModel]:
    """(adapter, UNet) from a StableDiffusionXLPipeline directory; text encoders and VAE as options say."""
    path = Path(path)
    read_model_index(path, NAME)
    scheduler = ode_scheduler(path)
    unet_config = read_component_config(path, "unet")
    if unet_config.get("addition_embed_type") != "text_time":
        raise ConfigError("teacher.path", f"{path}/unet is not an SDXL UNet (addition_embed_type "
                                          f"{unet_config.get('addition_embed_type')!r}, expected 'text_time')")
    vae_config = read_component_config(path, "vae")
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    native = unet_config["sample_size"] * vae_scale_factor
    resolution = options.resolution or native
    check_resolution(resolution, vae_scale_factor * 2 ** (len(unet_config["down_block_types"]) - 1), 2 * native, NAME)
    net, vae, text_pipeline = load_components(path, options, "unet", UNet2DConditionModel,
                                              "StableDiffusionXLPipeline", scheduler)
    adapter = SDXLAdapter(resolution, unet_config["in_channels"], vae_scale_factor, scheduler, path, text_pipeline,
                          vae, vae_config.get("scaling_factor", SDXL_SCALING_FACTOR), vae_config.get("latents_mean"),
                          vae_config.get("latents_std"))
    return adapter, net


def random_teacher(unet_config: dict = SDXL_BASE_UNET, resolution: int = 1024, seed: int = 0,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                   ) -> tuple[SDXLAdapter, UNet2DConditionModel]:
    """(adapter, UNet) with random weights and no text encoders or VAE: the real network's cost without a
    download (benchmarks feed it random prompt embeddings of the shapes in conditioning_shapes)."""
    net = random_denoiser(UNet2DConditionModel, unet_config, seed, dtype, device)
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    return SDXLAdapter(resolution, unet_config["in_channels"], SDXL_VAE_SCALE_FACTOR, scheduler), net


def conditioning_shapes(unet_config: dict = SDXL_BASE_UNET, pooled_dim: int = 1280) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the conditioning tensors: CLIP-L and CLIP-G tokens side by side, pooled CLIP-G, time ids."""
    return {"prompt_embeds": (77, unet_config["cross_attention_dim"]), "text_embeds": (pooled_dim,), "time_ids": (6,)}


FAMILY = pretrained_family(NAME, "StableDiffusionXLPipeline", "unet", load_teacher, ANCHOR_SCHEDULER)
