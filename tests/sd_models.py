"""Test helpers around the tiny pipelines of models/tiny_pipelines.py: saved copies, inputs for the SD3 transformer,
prompt files, tiny DINOv2 and CLIP image models."""

from __future__ import annotations

from pathlib import Path

import torch

from models.tiny_pipelines import clip_tokenizer, tiny_sd3_pipeline, tiny_sdxl_pipeline


def tiny_sd3_inputs() -> dict:
    """A batch of 2 for tiny_sd3_transformer: latents, 5 text tokens, pooled embeddings, timesteps."""
    return dict(hidden_states=torch.randn(2, 16, 8, 8), encoder_hidden_states=torch.randn(2, 5, 32),
                pooled_projections=torch.randn(2, 64), timestep=torch.tensor([3., 700.]))


def save_tiny_sd3(path: Path, seed: int = 0, scheduler=None) -> Path:
    tiny_sd3_pipeline(seed, scheduler).save_pretrained(path)
    return path


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
