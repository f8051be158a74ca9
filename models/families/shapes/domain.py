"""The shapes domain: coloured shapes on a 32x32 canvas, each image drawn from known attributes (shape, colour,
centre, size, shade), so that diversity has a ground truth: a student that collapses to one position or one shade
per prompt shows it in numbers, not only in pictures. Images, prompts, data batches and the picture grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
# Base RGB in [0, 1]. A shade s in [0, 1] runs from a dark version (s = 0) to a pale one (s = 1).
BASE_RGB = {
    "red": (1.0, 0.15, 0.10),
    "green": (0.10, 0.80, 0.20),
    "blue": (0.15, 0.35, 1.0),
    "yellow": (1.0, 0.90, 0.10),
}
DARK, PALE = 0.55, 0.35  # s = 0: DARK x base; s = 1: base moved PALE of the way to white
BACKGROUND = 0.08  # grey level of the empty canvas, in [0, 1]
# Attribute ranges, in units of the canvas width (centre, size) or of the shade scale.
CENTRE_RANGE = (0.3, 0.7)
SIZE_RANGE = (0.12, 0.28)  # half-extent: circle radius; the other shapes are scaled to a similar area
SHADE_RANGE = (0.0, 1.0)
SQUARE_HALF_SIDE = 0.85  # x size
CROSS_HALF_WIDTH = 0.35  # x size: each bar spans +-size by +-CROSS_HALF_WIDTH * size
# The triangle is equilateral, centred on its centroid, apex up, with circumradius = size.


@dataclass(frozen=True)
class ShapeAttributes:
    """Ground truth of a batch of images, each field (B,): shape and colour indices into SHAPES and
    COLOURS; centre x (right) and y (down) and size in canvas widths; shade in [0, 1]."""

    shape: torch.Tensor
    colour: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    size: torch.Tensor
    shade: torch.Tensor

    def regression_targets(self) -> torch.Tensor:
        """(B, 4): x, y, size, shade, each mapped from its range to [0, 1]."""
        return torch.stack([normalise(self.x, CENTRE_RANGE), normalise(self.y, CENTRE_RANGE),
                            normalise(self.size, SIZE_RANGE), normalise(self.shade, SHADE_RANGE)], dim=1)


def normalise(value: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return (value - bounds[0]) / (bounds[1] - bounds[0])


def prompt_text(shape: int, colour: int) -> str:
    return f"a {COLOURS[colour]} {SHAPES[shape]}"


def parse_prompt(prompt: str) -> tuple[int, int]:
    """'a red circle' -> (shape index, colour index)."""
    words = prompt.lower().split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(f"shapes prompts look like 'a <colour> <shape>' with colour in {list(COLOURS)} and "
                         f"shape in {list(SHAPES)}, got {prompt!r}")
    return SHAPES.index(words[2]), COLOURS.index(words[1])


def sample_attributes(shape: torch.Tensor, colour: torch.Tensor, generator: torch.Generator) -> ShapeAttributes:
    """Uniform centre, size and shade for the given shape and colour indices (B,), from generator."""
    def uniform(bounds: tuple[float, float]) -> torch.Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(shape.numel(), generator=generator)
    x, y, size, shade = uniform(CENTRE_RANGE), uniform(CENTRE_RANGE), uniform(SIZE_RANGE), uniform(SHADE_RANGE)
    return ShapeAttributes(shape.long(), colour.long(), x, y, size, shade)


def shape_rgb(colour: torch.Tensor, shade: torch.Tensor) -> torch.Tensor:
    """Fill colour (B, 3) in [0, 1] for colour indices (B,) and shades (B,)."""
    base = torch.tensor([BASE_RGB[c] for c in COLOURS])[colour]
    dark, pale = DARK * base, base + PALE * (1 - base)
    return dark + shade[:, None] * (pale - dark)


def _signed_distances(px: torch.Tensor, py: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of every shape in SHAPES, (len(SHAPES), B, H, W), with px, py
    (B, H, W) the pixel positions relative to the centre (py pointing up) and size (B, 1, 1)."""
    circle = torch.sqrt(px ** 2 + py ** 2) - size

    def box(half_x: torch.Tensor, half_y: torch.Tensor) -> torch.Tensor:
        qx, qy = px.abs() - half_x, py.abs() - half_y
        outside = torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2)
        return outside + torch.maximum(qx, qy).clamp_max(0)

    square = box(SQUARE_HALF_SIDE * size, SQUARE_HALF_SIDE * size)
    cross = torch.minimum(box(size, CROSS_HALF_WIDTH * size), box(CROSS_HALF_WIDTH * size, size))
    # Equilateral triangle of half side r (Inigo Quilez's exact distance), centroid at the origin.
    r, k = size * math.sqrt(3) / 2, math.sqrt(3)
    qx, qy = px.abs() - r, py + r / k
    fold = qx + k * qy > 0
    qx, qy = torch.where(fold, (qx - k * qy) / 2, qx), torch.where(fold, (-k * qx - qy) / 2, qy)
    qx = qx - torch.maximum(torch.minimum(qx, torch.zeros_like(qx)), -2 * r)
    triangle = -torch.sqrt(qx ** 2 + qy ** 2) * torch.sign(qy)
    return torch.stack([circle, square, triangle, cross])


def render_images(attrs: ShapeAttributes, resolution: int = RESOLUTION) -> torch.Tensor:
    """Images (B, 3, resolution, resolution) in [-1, 1], anti-aliased: a pixel's coverage is its signed
    distance to the edge mapped linearly over one pixel, which keeps the covered area exact on average."""
    centres = (torch.arange(resolution, dtype=torch.float32) + 0.5)  # pixel centres, in pixels
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    px = gx[None] - attrs.x[:, None, None] * resolution
    py = attrs.y[:, None, None] * resolution - gy[None]  # image rows go down; shapes are drawn y-up
    distances = _signed_distances(px, py, attrs.size[:, None, None] * resolution)
    distance = distances.gather(0, attrs.shape[None, :, None, None].expand(1, *px.shape))[0]
    coverage = (0.5 - distance).clamp(0, 1)[:, None]  # (B, 1, H, W)
    rgb = shape_rgb(attrs.colour, attrs.shade)[:, :, None, None]
    image = BACKGROUND + coverage * (rgb - BACKGROUND)
    return image * 2 - 1


def sample_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], ShapeAttributes]:
    """Images (B, 3, 32, 32), prompts and ground truth, shape and colour uniform over the vocabulary."""
    shape = torch.randint(0, len(SHAPES), (batch_size,), generator=generator)
    colour = torch.randint(0, len(COLOURS), (batch_size,), generator=generator)
    attrs = sample_attributes(shape, colour, generator)
    prompts = [prompt_text(int(s), int(c)) for s, c in zip(shape, colour)]
    return render_images(attrs), prompts, attrs


def prompt_groups(prompts: list[str]) -> tuple[list[str], int]:
    """The distinct prompts of a prompt-major list and the number of seeds R each has; raises otherwise."""
    rows = list(dict.fromkeys(prompts))
    seeds = len(prompts) // max(len(rows), 1)
    if not prompts or seeds * len(rows) != len(prompts) or any(
            prompts[i] != rows[i // seeds] for i in range(len(prompts))):
        raise ValueError("shapes metrics and pictures need prompt-major samples (every prompt repeated for the "
                         "same number of seeds in a row), as models.sampling.grid_pairs makes them")
    return rows, seeds


def images_for_prompts(prompts: list[str], generator: torch.Generator) -> tuple[torch.Tensor, ShapeAttributes]:
    """Real images (B, 3, 32, 32) of the given prompts, with their ground truth."""
    ids = torch.tensor([parse_prompt(p) for p in prompts], dtype=torch.long).reshape(-1, 2)
    attrs = sample_attributes(ids[:, 0], ids[:, 1], generator)
    return render_images(attrs), attrs



def prompts() -> list[str]:
    """Every shape x colour pair: the domain is closed, so evaluation uses the training prompts (with held-out
    seeds, see EvalConfig.seed_offset)."""
    return [prompt_text(s, c) for c in range(len(COLOURS)) for s in range(len(SHAPES))]


def training_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Data x0 (B, 3, 32, 32) in [-1, 1] and their prompts."""
    x0, prompts, _ = sample_batch(batch_size, generator)
    return x0, prompts


# ----------------------------------------------------------------------------------------------------
# Pictures

CELL_SCALE = 2  # each 32 px sample is drawn at 64 px
CELL_GAP = 2
LABEL_WIDTH = 96
TITLE_HEIGHT = 16
MODEL_GAP = 12


def grid_layout(num_models: int, num_prompts: int, seeds_per_prompt: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG that render() writes."""
    cell = RESOLUTION * CELL_SCALE + CELL_GAP
    width = LABEL_WIDTH + num_models * (seeds_per_prompt * cell + MODEL_GAP)
    return width, TITLE_HEIGHT + num_prompts * cell


def render(samples: dict[str, torch.Tensor], prompts: list[str], path: str | Path) -> Path:
    """One PNG: a grid per model (name -> samples (B, 3, 32, 32)), side by side, one row per prompt and one
    column per seed. prompts (B,) is prompt-major, as models.sampling.grid_pairs makes it."""
    from PIL import Image, ImageDraw

    rows, seeds = prompt_groups(prompts)
    width, height = grid_layout(len(samples), len(rows), seeds)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    cell = RESOLUTION * CELL_SCALE + CELL_GAP
    for r, prompt in enumerate(rows):
        draw.text((4, TITLE_HEIGHT + r * cell + cell // 2 - 6), prompt, fill=(0, 0, 0))
    for m, (name, images) in enumerate(samples.items()):
        if images.shape[0] != len(prompts):
            raise ValueError(f"model {name!r} has {images.shape[0]} samples for {len(prompts)} prompts")
        left = LABEL_WIDTH + m * (seeds * cell + MODEL_GAP)
        draw.text((left, 2), name, fill=(0, 0, 0))
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pixels = pixels.repeat_interleave(CELL_SCALE, dim=2).repeat_interleave(CELL_SCALE, dim=3)
        for i, image in enumerate(pixels.permute(0, 2, 3, 1).numpy()):
            r, s = divmod(i, seeds)
            canvas.paste(Image.fromarray(image), (left + s * cell, TITLE_HEIGHT + r * cell))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
