"""Tiny Stable Diffusion pipelines (SD3, SDXL) with random weights, built in code (nothing downloaded), in the manner
of diffusers' get_dummy_components: 64 x 64 px images, CLIP and T5 encoders a few layers deep, tokenizers over a
small word vocabulary. `teacher.path=builtin:sd3-tiny` (the sd3-tiny recipe) or `builtin:sdxl-tiny` distils one:
the whole real-teacher path (precompute with the text encoders, distillation, export as a diffusers pipeline,
sampling, evaluation) in minutes on a laptop's CPU. Their samples are noise-like: the networks are untrained."""

from __future__ import annotations

import torch

# builtin:<name> -> the family it belongs to
BUILT_IN = {"sd3-tiny": "sd3", "sdxl-tiny": "sdxl"}

WORDS = ("a", "photo", "painting", "of", "red", "blue", "green", "cat", "dog", "house", "tree", "in", "the", "snow")


def prompts(count: int) -> list[str]:
    """count prompts over WORDS (the encoders pad every prompt to full length, so the words do not change
    their cost)."""
    pool = [f"{style} {colour} {thing}{where}" for style in ("a photo of a", "a painting of a")
            for colour in ("red", "blue", "green") for thing in ("cat", "dog", "house", "tree")
            for where in ("", " in the snow")]
    return [pool[i % len(pool)] for i in range(count)]


def built_in_prompts(evaluation: bool) -> list[str]:
    """The prompts a built-in pipeline trains on (all 48 of the vocabulary's), or is evaluated on (4 of them)."""
    pool = prompts(48)
    return pool[::12] if evaluation else pool


def clip_tokenizer(max_length: int = 77):
    """A CLIP BPE tokenizer over WORDS, built in code; prompts are padded to 77 tokens as with the real one."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    for char in sorted(set("".join(WORDS))):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    for word in WORDS:
        piece = word[0] if len(word) > 1 else word + "</w>"
        for i, char in enumerate(word[1:], 1):
            nxt = char + "</w>" if i == len(word) - 1 else char
            if (piece, nxt) not in merges:
                merges.append((piece, nxt))
            piece += nxt
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer():
    """A T5 unigram tokenizer over WORDS; the pipeline pads to 256 tokens as with the real one."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    return T5Tokenizer(vocab=pieces + [("\u2581" + w, -1.0) for w in WORDS], extra_ids=0)


def clip_encoder(vocab_size: int, seed: int, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, projection_dim=projection,
        max_position_embeddings=77, hidden_act="gelu"))


def clip_text_model(vocab_size: int, seed: int, hidden: int = 32):
    """A plain CLIP text encoder (SDXL's first, whose penultimate hidden states it reads)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77,
        hidden_act="gelu"))


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


def sdxl_scheduler(**overrides):
    """SDXL base's EulerDiscreteScheduler ("leading" spacing, steps_offset 1)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                     "steps_offset": 1, "timestep_spacing": "leading", **overrides})


# The tiny SDXL UNet: 2 levels, SDXL's text_time added conditioning (6 time ids x 8 + pooled 32).
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
    cross_attention_dim=64, norm_num_groups=4)


def tiny_sdxl_pipeline(seed: int = 0, scheduler=None):
    """A StableDiffusionXLPipeline at 64 x 64 px: latents (4, 8, 8), a 2-level UNet with SDXL's text_time
    added conditioning (6 time ids x 8 + pooled 32), text encoders of 32 + 32 = 64 channels."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    return StableDiffusionXLPipeline(
        unet=unet, scheduler=scheduler or sdxl_scheduler(), vae=tiny_vae(4, seed + 4, scaling_factor=0.13025),
        text_encoder=clip_text_model(len(tokenizer), seed + 1), tokenizer=tokenizer,
        text_encoder_2=clip_encoder(len(tokenizer), seed + 2), tokenizer_2=clip_tokenizer(),
        force_zeros_for_empty_prompt=True, add_watermarker=False)


def pipeline(name: str, seed: int = 0):
    """The built-in pipeline named name (a key of BUILT_IN)."""
    return {"sd3-tiny": tiny_sd3_pipeline, "sdxl-tiny": tiny_sdxl_pipeline}[name](seed)
