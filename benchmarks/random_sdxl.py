"""SDXL base's networks with random weights, built in code (nothing downloaded), for `benchmarks.gpu_cycle
--family sdxl`: the UNet from models.families.sdxl, the two text encoders (CLIP-L and OpenCLIP bigG) at their
released sizes, which only the reference-structure trainer and the precompute hold, and the VAE, which only
the regression baseline's trainer holds. --smoke swaps in tiny ones of the same structure. The same names as
benchmarks.random_sd3, so that the benchmark picks a family by module."""

from __future__ import annotations

import torch

from benchmarks.random_sd3 import CLIP_G, CLIP_L, default_dtype
from models.families import sdxl
from models.tiny_pipelines import clip_encoder, clip_text_model, clip_tokenizer, tiny_vae

RECIPE = "sdxl"

# The VAE of stabilityai/stable-diffusion-xl-base-1.0 (vae/config.json): 4 latent channels, downsampling 8.
SDXL_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=sdxl.SDXL_SCALING_FACTOR)

SMOKE_RESOLUTION = 64
anchor_x0 = sdxl.SDXLAdapter.anchor_x0  # the anchor rollout also takes the teacher's x0 estimate there


def network_config(smoke: bool, num_layers: int = 0) -> dict:
    """SDXL base's UNet config (or the tiny pipeline's). A UNet has no run of equal blocks to cut."""
    if num_layers:
        raise ValueError("--layers cuts SD3's transformer; SDXL's UNet runs whole (leave --layers at 0)")
    if smoke:
        from models.tiny_pipelines import TINY_SDXL_UNET  # here: --base trees older than it import this module

        return dict(TINY_SDXL_UNET)
    return dict(sdxl.SDXL_BASE_UNET)


def conditioning_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return sdxl.conditioning_shapes(config, pooled)


def network_class():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel


def counting_adapter(config: dict, resolution: int):
    """The adapter the FLOP counter calls the network through (no text encoders, no VAE)."""
    from diffusers import EulerDiscreteScheduler

    return sdxl.SDXLAdapter(resolution, config["in_channels"], sdxl.SDXL_VAE_SCALE_FACTOR,
                            EulerDiscreteScheduler(**sdxl.SDXL_SCHEDULER))


def teacher(smoke: bool, resolution: int, device: torch.device, dtype: torch.dtype, num_layers: int = 0,
            seed: int = 0):
    """(adapter without text encoders, frozen UNet on device and dtype)."""
    adapter, net = sdxl.random_teacher(network_config(smoke, num_layers), resolution, seed, dtype, device)
    return adapter, net.eval().requires_grad_(False)


def vae(smoke: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """SDXL's VAE (or a tiny one) with random weights, frozen, on device in dtype."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = tiny_vae(4, seed, scaling_factor=sdxl.SDXL_SCALING_FACTOR) if smoke else AutoencoderKL(**SDXL_VAE)
    return model.to(device, dtype).eval().requires_grad_(False)


def text_pipeline(smoke: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A StableDiffusionXLPipeline holding only the two random text encoders and their tokenizers, built
    straight on device in dtype; the empty prompt's negative is zeros, as SDXL base's."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if smoke:
        encoders = [clip_text_model(len(clip_tokenizer()), seed + 1), clip_encoder(len(clip_tokenizer()), seed + 2)]
    else:
        ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77)
        torch.manual_seed(seed)
        with torch.device(device), default_dtype(dtype):
            clip_l = {k: v for k, v in CLIP_L.items() if k != "projection_dim"}
            encoders = [CLIPTextModel(CLIPTextConfig(**clip_l, **ids)),
                        CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **ids))]
    for encoder in encoders:
        encoder.to(device, dtype).eval().requires_grad_(False)
    pipe = StableDiffusionXLPipeline(unet=None, vae=None, scheduler=EulerDiscreteScheduler(**sdxl.SDXL_SCHEDULER),
                                     text_encoder=encoders[0], tokenizer=clip_tokenizer(),
                                     text_encoder_2=encoders[1], tokenizer_2=clip_tokenizer(),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_text(adapter, text):
    """adapter with text as its text pipeline (prompts encoded in the process)."""
    return sdxl.SDXLAdapter(adapter.resolution, adapter.latent_channels, adapter.vae_scale_factor, adapter.scheduler,
                            text_pipeline=text)
