"""What the pretrained diffusers families (sd3, sdxl) share: reading a saved pipeline directory with errors
that name the fix, writing an exported generator around the teacher's other components, and pictures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from models.metrics import pairwise_diversity

MODEL_INDEX = "model_index.json"


def read_model_index(path: str | Path, expected_class: str, family: str) -> dict:
    """The pipeline's model_index.json, after checking that it is the pipeline class this family loads."""
    from models.families import FAMILY_PIPELINES

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"teacher.path {path} does not exist: give a diffusers pipeline directory "
                                "(save_pretrained), an s3://bucket/prefix URL of one, or a hub id")
    index_path = path / MODEL_INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no {MODEL_INDEX}); give the "
                                "directory that DiffusionPipeline.save_pretrained writes")
    index = json.loads(index_path.read_text())
    found = index.get("_class_name", "?")
    if found != expected_class:
        other = [name for name, cls in FAMILY_PIPELINES.items() if cls == found]
        fix = (f"set teacher.family={other[0]}" if other else
               f"supported pipelines: {', '.join(f'{c} (teacher.family={n})' for n, c in FAMILY_PIPELINES.items())}")
        raise ValueError(f"{path} holds a {found}, which the {family} family does not load; {fix}")
    return index


def read_component_config(path: str | Path, component: str) -> dict:
    """config.json (or scheduler_config.json) of one component folder, without loading its weights."""
    folder = Path(path) / component
    for name in ("config.json", "scheduler_config.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    raise FileNotFoundError(f"{folder} has no config.json: the pipeline directory is incomplete")


def copy_pipeline_components(source: Path | None, target: Path, skip: set[str], family: str) -> None:
    """Copy model_index.json and every component folder of the teacher's pipeline except those in skip:
    an exported generator is the teacher's pipeline with the distilled denoiser and its own scheduler."""
    if source is None:
        raise ValueError(f"this {family} teacher was built in code, not loaded from a pipeline directory, so "
                         "there are no text encoders, tokenizers or VAE to export the generator with")
    target.mkdir(parents=True, exist_ok=True)
    for entry in Path(source).iterdir():
        if entry.name in skip or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name, dirs_exist_ok=True)
        elif entry.name == MODEL_INDEX:
            shutil.copy2(entry, target / entry.name)


def check_resolution(resolution: int, multiple: int, largest: int, family: str) -> None:
    if resolution % multiple or not 0 < resolution <= largest:
        raise ValueError(f"teacher.resolution={resolution} does not fit this {family} teacher: it must be a multiple "
                         f"of {multiple} and at most {largest} (0 picks the model's native resolution)")


def pixel_diversity(images: torch.Tensor, prompts: list[str]) -> float:
    """The paper's diversity formula on raw pixels: a cheap stand-in when no feature model is configured.

    images: (B, 3, H, W), prompt-major with the same number of seeds per prompt.
    """
    rows = list(dict.fromkeys(prompts))
    seeds = len(prompts) // len(rows)
    return float(pairwise_diversity(images.float().reshape(len(rows), seeds, -1)))


def render(samples: dict[str, torch.Tensor], prompts: list[str], path: str | Path, cell: int = 256) -> Path:
    """One PNG: a grid per model (name -> images (B, 3, H, W) in [-1, 1]), side by side, one row per prompt
    and one column per seed, each image resized to cell pixels. prompts is prompt-major."""
    from PIL import Image, ImageDraw

    rows = list(dict.fromkeys(prompts))
    seeds = len(prompts) // max(len(rows), 1)
    label, gap, title = 160, 4, 16
    width = label + len(samples) * (seeds * (cell + gap) + 12)
    canvas = Image.new("RGB", (width, title + len(rows) * (cell + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, prompt in enumerate(rows):
        draw.text((4, title + r * (cell + gap) + cell // 2 - 6), prompt[:28], fill=(0, 0, 0))
    for m, (name, images) in enumerate(samples.items()):
        left = label + m * (seeds * (cell + gap) + 12)
        draw.text((left, 2), name, fill=(0, 0, 0))
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        for i, image in enumerate(pixels.permute(0, 2, 3, 1).numpy()):
            r, s = divmod(i, seeds)
            picture = Image.fromarray(image).resize((cell, cell), Image.Resampling.BICUBIC)
            canvas.paste(picture, (left + s * (cell + gap), title + r * (cell + gap)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
