"""What the pretrained diffusers families (sd3, sdxl) share: reading a saved pipeline directory with errors
that name the fix, writing an exported generator around the teacher's other components, pictures, and the
Family they build from their own loader (pretrained_family)."""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from models.adapter import LoadOptions, TeacherAdapter, cast
from models.errors import ConfigError
from models.families import NAMES, Family, get_family
from models.metrics import pairwise_diversity

MODEL_INDEX = "model_index.json"


def read_model_index(path: str | Path, family_name: str) -> dict:
    """The pipeline's model_index.json, after checking that it is the pipeline class this family loads."""
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
    pipelines = {name: get_family(name).pipeline_class for name in NAMES if get_family(name).pipeline_class}
    if found != pipelines[family_name]:
        refused = f"{path} holds a {found}, which the {family_name} family does not load"
        other = [name for name, cls in pipelines.items() if cls == found]
        if other:
            raise ConfigError("teacher.family", f"{refused}; set teacher.family={other[0]}")
        supported = ", ".join(f"{c} (teacher.family={n})" for n, c in pipelines.items())
        raise ConfigError("teacher.path", f"{refused}; supported pipelines: {supported}")
    return index


def read_component_config(path: str | Path, component: str) -> dict:
    """config.json (or scheduler_config.json) of one component folder, without loading its weights."""
    folder = Path(path) / component
    for name in ("config.json", "scheduler_config.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    raise FileNotFoundError(f"{folder} has no config.json: the pipeline directory is incomplete")


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' own console output while pipelines load and save kept to errors: a progress bar
    per component and per weight file, advice to install accelerate, the torch_dtype rename (a FutureWarning kept
    for diffusers < 0.36, which has no `dtype`). The commands print their own plan and progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        for lib, (verbosity, bars) in zip(libraries, before):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


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


def load_components(path: Path, options: LoadOptions, denoiser: str, denoiser_class, pipeline_class: str, scheduler):
    """(net, vae, text_pipeline) of a pipeline directory in options.dtype: the denoiser (the component folder
    named denoiser, of denoiser_class); the VAE when options.vae; when options.text_encoders, the pipeline (the
    diffusers class named pipeline_class) without denoiser and VAE, for its encode_prompt."""
    import diffusers
    from diffusers import AutoencoderKL

    with quiet_loading():  # the pipeline module's first import also tells of transformers' image processors
        net = denoiser_class.from_pretrained(path, subfolder=denoiser, torch_dtype=options.dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=options.dtype) if options.vae else None
        if vae is not None:  # frozen: the regression baseline's gradient passes through it to the generator only
            vae.eval().requires_grad_(False)
        text_pipeline = None
        if options.text_encoders:
            text_pipeline = getattr(diffusers, pipeline_class).from_pretrained(
                path, **{denoiser: None}, vae=None, scheduler=scheduler, torch_dtype=options.dtype)
            text_pipeline.set_progress_bar_config(disable=True)
    return net, vae, text_pipeline


def random_denoiser(denoiser_class, config: dict, seed: int, dtype: torch.dtype, device: torch.device | str):
    """A denoiser of the released architecture (config) with random weights: the real network's cost without a
    download, for benchmarks."""
    torch.manual_seed(seed)
    with torch.device(device):
        net = denoiser_class(**config)
    return cast(net, dtype)


def check_resolution(resolution: int, multiple: int, largest: int, family: str) -> None:
    if resolution % multiple or not 0 < resolution <= largest:
        raise ConfigError("teacher.resolution", f"{resolution} does not fit this {family} teacher: it must be a "
                                                f"multiple of {multiple} and at most {largest} (0 picks the model's "
                                                "native resolution)")


def lpips_distance(adapter: TeacherAdapter, device: torch.device, options=None) -> nn.Module:
    """The regression baseline's distance on a latent family: LPIPS on the VAE's decoded images
    (models/perceptual.py), built once per adapter, device and options. The VAE decodes with gradient
    checkpointing: its full-resolution activations would otherwise be held for the generator's backward."""
    from models.perceptual import LPIPS, DecodedLPIPS, PerceptualOptions, lpips_files

    options = options or PerceptualOptions()
    if adapter.vae is None:
        raise RuntimeError("the regression baseline decodes latents: load the teacher with its VAE "
                           "(LoadOptions(vae=True))")
    key = (str(device), options)
    if getattr(adapter, "_lpips", (None,))[0] != key:
        adapter.vae.enable_gradient_checkpointing()
        lpips = LPIPS.from_files(options.net, *lpips_files(options)).to(device)
        adapter._lpips = (key, DecodedLPIPS(adapter.decode_latents, lpips, options.resolution))
    return adapter._lpips[1]


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


def pretrained_family(name: str, pipeline_class: str, denoiser: str,
                      load_teacher: Callable[[Path, LoadOptions], tuple[TeacherAdapter, nn.Module]],
                      anchor_scheduler: str = "FlowMatchEulerDiscreteScheduler") -> Family:
    """The Family of a diffusers pipeline whose denoiser (the component folder that distillation trains,
    e.g. "transformer" or "unet") is loaded by load_teacher. It has no built-in prompts or trainer; its sweep
    objectives are the paper's DINO diversity and PickScore (evaluation.dino_path, evaluation.pickscore_path),
    and without those its own metric is the pixel-space diversity."""

    def save_teacher(adapter: TeacherAdapter, net: nn.Module, path: str | Path) -> None:
        """A pipeline directory: the teacher's components with net as the denoiser (export_generator then
        writes the generator's scheduler over the teacher's)."""
        path = Path(path)
        copy_pipeline_components(adapter.source, path, {denoiser}, name)
        with quiet_loading():
            net.save_pretrained(path / denoiser)

    def evaluate_samples(images: torch.Tensor, prompts: list[str], seed: int = 0) -> dict[str, float]:
        return {"pixel_diversity": pixel_diversity(images, prompts)}

    return Family(name=name, load_teacher=load_teacher, save_teacher=save_teacher, evaluate_samples=evaluate_samples,
                  render=render, diversity=("dino_diversity", 1), quality=("pickscore", 1),
                  pipeline_class=pipeline_class, anchor_scheduler=anchor_scheduler)
