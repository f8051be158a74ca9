"""Tiny random Stable Diffusion pipelines (SD3, SDXL) built in code (nothing downloaded), in the manner of diffusers'
get_dummy_components: CLIP and T5 encoders a few layers deep and tokenizers over a small word vocabulary."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.random_sd3 import clip_tokenizer, t5_tokenizer


def clip_encoder(vocab_size: int, seed: int, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, projection_dim=projection,
        max_position_embeddings=77, hidden_act="gelu"))


def tiny_vae(latent_channels: int, seed: int, **kwargs):
    """Four levels (downsampling 8, as the real VAEs) of 4 channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1, sample_size=64,
                         **kwargs)


def tiny_sd3_transformer(seed: int = 0):
    """SD3's transformer at 64 x 64 px: 16 image tokens, two blocks, the first with the second (image-only)
    attention of SD3.5."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=64,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


def tiny_sd3_inputs() -> dict:
    """A batch of 2 for tiny_sd3_transformer: latents, 5 text tokens, pooled embeddings, timesteps."""
    return dict(hidden_states=torch.randn(2, 16, 8, 8), encoder_hidden_states=torch.randn(2, 5, 32),
                pooled_projections=torch.randn(2, 64), timestep=torch.tensor([3., 700.]))


def tiny_sd3_pipeline(seed: int = 0, scheduler=None):
    """A StableDiffusion3Pipeline at 64 x 64 px: latents (16, 8, 8), 16 image tokens, 77 + 256 text tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    tokenizer, tokenizer_3 = clip_tokenizer(), t5_tokenizer()
    transformer = tiny_sd3_transformer(seed)
    torch.manual_seed(seed + 3)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(16, seed + 4, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                     use_post_quant_conv=False),
        text_encoder=clip_encoder(len(tokenizer), seed + 1), tokenizer=tokenizer,
        text_encoder_2=clip_encoder(len(tokenizer), seed + 2), tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def save_tiny_sd3(path: Path, seed: int = 0, scheduler=None) -> Path:
    tiny_sd3_pipeline(seed, scheduler).save_pretrained(path)
    return path


def clip_text_model(vocab_size: int, seed: int, hidden: int = 32):
    """A plain CLIP text encoder (SDXL's first, whose penultimate hidden states it reads)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77,
        hidden_act="gelu"))


def sdxl_scheduler(**overrides):
    """SDXL base's EulerDiscreteScheduler ("leading" spacing, steps_offset 1)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                     "steps_offset": 1, "timestep_spacing": "leading", **overrides})


def tiny_sdxl_pipeline(seed: int = 0, scheduler=None):
    """A StableDiffusionXLPipeline at 64 x 64 px: latents (4, 8, 8), a 2-level UNet with SDXL's text_time
    added conditioning (6 time ids x 8 + pooled 32), text encoders of 32 + 32 = 64 channels."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=4)
    return StableDiffusionXLPipeline(
        unet=unet, scheduler=scheduler or sdxl_scheduler(), vae=tiny_vae(4, seed + 4, scaling_factor=0.13025),
        text_encoder=clip_text_model(len(tokenizer), seed + 1), tokenizer=tokenizer,
        text_encoder_2=clip_encoder(len(tokenizer), seed + 2), tokenizer_2=clip_tokenizer(),
        force_zeros_for_empty_prompt=True, add_watermarker=False)


def save_tiny_sdxl(path: Path, seed: int = 0, scheduler=None) -> Path:
    tiny_sdxl_pipeline(seed, scheduler).save_pretrained(path)
    return path


def prompt_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


def save_tiny_dino(path: Path, seed: int = 0) -> Path:
    """A 2-layer DINOv2 image model and its image processor, as a from_pretrained directory."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             image_size=32, patch_size=8)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A tiny CLIP model with its processor (the tiny tokenizer): the clip_path and pickscore_path shape."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)
    return path
