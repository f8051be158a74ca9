"""SD3.5-Medium's networks with random weights, built in code (nothing downloaded): the transformer from
models.families.sd3, the three text encoders (CLIP-L, CLIP-G, T5-XXL) at their released sizes, which only the
reference-structure trainer and the precompute hold, and the VAE, which only the regression baseline's trainer
holds. --smoke swaps in tiny ones of the same structure. benchmarks.random_sdxl has the same names for SDXL."""

from __future__ import annotations

import contextlib

import torch

from models.families import sd3
from models.tiny_pipelines import clip_tokenizer, t5_tokenizer, tiny_vae

RECIPE = "sd35m"

# The text encoders of stabilityai/stable-diffusion-3.5-medium (text_encoder*/config.json): CLIP-L/14, OpenCLIP
# bigG/14 and T5 v1.1 XXL. CLIP-L + CLIP-G hidden states (768 + 1280) sit beside T5's 4096 in the 77 + 256 token
# sequence; their pooled projections make the 2048-wide pooled vector.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, vocab_size=49408, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)

# The VAE of stabilityai/stable-diffusion-3.5-medium (vae/config.json): 16 latent channels, downsampling 8.
SD35_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=sd3.SD3_SCALING_FACTOR,
                shift_factor=sd3.SD3_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False)

# Tiny stand-ins with the same structure: 64 px images (16 x 8 x 8 latents), 77 + 256 text tokens of width 32.
SMOKE_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                         caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16,
                         dual_attention_layers=(0,), qk_norm="rms_norm")
SMOKE_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                  vocab_size=1000, hidden_act="gelu")
SMOKE_T5 = dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8)
SMOKE_RESOLUTION = 64

def transformer_config(smoke: bool, num_layers: int = 0) -> dict:
    """SD3.5-Medium's transformer config (or the tiny one), optionally cut to its first num_layers blocks."""
    config = dict(SMOKE_TRANSFORMER if smoke else sd3.SD35_MEDIUM_TRANSFORMER)
    if num_layers:
        if not 1 <= num_layers <= config["num_layers"]:
            raise ValueError(f"--layers must be in [1, {config['num_layers']}], got {num_layers}")
        config["num_layers"] = num_layers
        config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < num_layers)
    return config


network_config = transformer_config
conditioning_shapes = sd3.conditioning_shapes
anchor_x0 = sd3.SD3Adapter.anchor_x0  # the anchor rollout also takes the teacher's x0 estimate there


def network_class():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel


def counting_adapter(config: dict, resolution: int):
    """The adapter the FLOP counter calls the network through (no scheduler, text encoders or VAE)."""
    return sd3.SD3Adapter(resolution, config["in_channels"], sd3.SD3_VAE_SCALE_FACTOR, scheduler=None)


def teacher(smoke: bool, resolution: int, device: torch.device, dtype: torch.dtype, num_layers: int = 0,
            seed: int = 0):
    """(adapter without text encoders, frozen transformer on device and dtype)."""
    adapter, net = sd3.random_teacher(transformer_config(smoke, num_layers), resolution, seed, dtype, device)
    return adapter, net.eval().requires_grad_(False)


def vae(smoke: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """SD3.5-Medium's VAE (or a tiny one) with random weights, frozen, on device in dtype."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = tiny_vae(16, seed) if smoke else AutoencoderKL(**SD35_VAE)
    return model.to(device, dtype).eval().requires_grad_(False)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def text_pipeline(smoke: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A StableDiffusion3Pipeline holding only the three random text encoders and their tokenizers, built
    straight on device in dtype (T5-XXL in fp32 alone would take 19 GB)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_l, clip_g, t5 = (SMOKE_CLIP, SMOKE_CLIP, SMOKE_T5) if smoke else (CLIP_L, CLIP_G, T5_XXL)
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**clip_l, **ids)),
                    CLIPTextModelWithProjection(CLIPTextConfig(**clip_g, **ids)),
                    T5EncoderModel(T5Config(**t5, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))]
    for encoder in encoders:
        encoder.to(device, dtype).eval().requires_grad_(False)
    pipe = StableDiffusion3Pipeline(transformer=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    text_encoder=encoders[0], tokenizer=clip_tokenizer(),
                                    text_encoder_2=encoders[1], tokenizer_2=clip_tokenizer(),
                                    text_encoder_3=encoders[2], tokenizer_3=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_text(adapter, text):
    """adapter with text as its text pipeline (prompts encoded in the process)."""
    return sd3.SD3Adapter(adapter.resolution, adapter.latent_channels, adapter.vae_scale_factor, adapter.scheduler,
                          text_pipeline=text)
