"""The shapes domain's evaluator: a small CNN trained on procedural images, our stand-in for the paper's
DINO/CLIP protocol. It classifies shape and colour (prompt adherence, GenEval's role), regresses centre,
size and shade (attribute spread, a diversity measure with a ground truth), and its penultimate features are
the feature space for the paper's pairwise diversity and for a Frechet distance to real images.

    python -c "from models.families.shapes.evaluator import train_evaluator; train_evaluator('models/weights/shapes-evaluator')"
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from models.families import SHIPPED_WEIGHTS
from models.families.shapes.domain import (COLOURS, SHAPES, images_for_prompts, parse_prompt, prompt_groups,
                                           sample_batch)
from models.metrics import frechet_distance, pairwise_diversity

ATTRIBUTES = ("x", "y", "size", "shade")


class ShapesEvaluator(ModelMixin, ConfigMixin):
    """(B, 3, 32, 32) in [-1, 1] -> shape logits (B, S), colour logits (B, C), attributes (B, 4: x, y, size,
    shade, each scaled to [0, 1] over its range) and features (B, feature_dim), the input of every head."""

    @register_to_config
    def __init__(self, width: int = 32, feature_dim: int = 128, num_shapes: int = len(SHAPES),
                 num_colours: int = len(COLOURS)):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GELU(),  # 16 px
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # 8 px
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # 4 px
            nn.Flatten(),  # keeps where things are: a global pool would blur position away
            nn.Linear(2 * w * 16, feature_dim), nn.GELU())
        self.shape_head = nn.Linear(feature_dim, num_shapes)
        self.colour_head = nn.Linear(feature_dim, num_colours)
        self.attribute_head = nn.Linear(feature_dim, len(ATTRIBUTES))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(images.clamp(-1, 1))
        return {"shape_logits": self.shape_head(features), "colour_logits": self.colour_head(features),
                "attributes": self.attribute_head(features), "features": features}


def evaluator_loss(out: dict[str, torch.Tensor], shape: torch.Tensor, colour: torch.Tensor,
                   attributes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on shape and colour plus 10 x MSE on the four [0, 1]-scaled attributes."""
    ce = nn.functional.cross_entropy
    return (ce(out["shape_logits"], shape) + ce(out["colour_logits"], colour)
            + 10 * nn.functional.mse_loss(out["attributes"], attributes))


def train_evaluator(out_dir: str | Path, steps: int = 3000, seed: int = 0, batch_size: int = 256,
                    lr: float = 2e-3, device: str | torch.device = "cpu") -> Path:
    """Train the evaluator on fresh procedural images and save it (save_pretrained) with its accuracy on
    held-out real images in accuracy.json. Training images get Gaussian noise of a random std up to 0.1,
    so that a sample with a little residual noise is still read by what it shows."""
    torch.manual_seed(seed)
    evaluator = ShapesEvaluator().to(device).train()
    optimizer = torch.optim.AdamW(evaluator.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        images, _, attrs = sample_batch(batch_size, generator)
        images = images + torch.rand(batch_size, 1, 1, 1, generator=generator) * 0.1 * torch.randn(
            images.shape, generator=generator)
        out = evaluator(images.to(device))
        loss = evaluator_loss(out, attrs.shape.to(device), attrs.colour.to(device),
                              attrs.regression_targets().to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"evaluator loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    evaluator = evaluator.cpu().eval()
    out_dir = Path(out_dir)
    evaluator.save_pretrained(str(out_dir))
    accuracy = evaluator_accuracy(evaluator)
    record = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
              "seconds": round(time.time() - start, 1), "accuracy": accuracy}
    (out_dir / "accuracy.json").write_text(json.dumps(record, indent=2))
    return out_dir


@torch.no_grad()
def evaluator_accuracy(evaluator: ShapesEvaluator, num_images: int = 4096, seed: int = 123_456) -> dict[str, float]:
    """On fresh real images: shape, colour and joint (shape and colour) accuracy, and the mean absolute
    error of each attribute in units of its range (0.01 = 1% of the range)."""
    images, _, attrs = sample_batch(num_images, torch.Generator().manual_seed(seed))
    out = _predict(evaluator, images)
    shape_ok = out["shape_logits"].argmax(1) == attrs.shape
    colour_ok = out["colour_logits"].argmax(1) == attrs.colour
    error = (out["attributes"] - attrs.regression_targets()).abs().mean(0)
    return {"shape_accuracy": shape_ok.float().mean().item(), "colour_accuracy": colour_ok.float().mean().item(),
            "joint_accuracy": (shape_ok & colour_ok).float().mean().item(),
            **{f"{name}_mae": error[i].item() for i, name in enumerate(ATTRIBUTES)}}


def shipped_evaluator_dir() -> Path:
    return SHIPPED_WEIGHTS / "shapes-evaluator"


@functools.lru_cache(maxsize=2)
def load_evaluator(path: str | None = None) -> ShapesEvaluator:
    """The evaluator at path (default: the one shipped in models/weights/shapes-evaluator), frozen."""
    directory = Path(path) if path else shipped_evaluator_dir()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no shapes evaluator at {directory}; train one with "
                                f"models.families.shapes.evaluator.train_evaluator('{directory}')")
    return ShapesEvaluator.from_pretrained(str(directory), low_cpu_mem_usage=False).eval().requires_grad_(False)


@torch.no_grad()
def _predict(evaluator: ShapesEvaluator, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
    parts = [evaluator(images[i:i + batch_size].float().cpu()) for i in range(0, images.shape[0], batch_size)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def adherent_spread(attributes: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """attributes (P, R, A) of R seeds per prompt, ok (P, R): which samples adhere to their prompt. The std
    over each prompt's adherent samples (0 where fewer than two adhere), averaged over prompts: (A,)."""
    weight = ok.to(attributes.dtype).unsqueeze(-1)
    count = weight.sum(dim=1)  # (P, 1)
    mean = (attributes * weight).sum(dim=1) / count.clamp_min(1)
    var = ((attributes - mean.unsqueeze(1)) ** 2 * weight).sum(dim=1) / (count - 1).clamp_min(1)
    return torch.where(count >= 2, var.sqrt(), torch.zeros_like(var)).mean(dim=0)


def evaluate_samples(samples: torch.Tensor, prompts: list[str], seed: int = 0,
                     evaluator: ShapesEvaluator | None = None) -> dict[str, float]:
    """Metrics of samples (B, 3, 32, 32) for prompt-major prompts (B,), R >= 2 seeds per prompt.

    feature_diversity: models.metrics.pairwise_diversity of the evaluator's features over the R seeds of
      each prompt (the paper's DINO/CLIP diversity, with our evaluator as the feature extractor);
      data_feature_diversity is the same on real images of the same prompts, its value for the data.
    attribute_spread: std over the R seeds of the predicted x, y, size and shade (each in units of its
      range, so uniform data gives about 0.29) among the samples the evaluator reads as the prompted shape
      and colour, averaged over prompts and then over the four (each alone as spread_<name>). A prompt with
      fewer than two such samples counts as no spread: failed samples (blank, faint, wrong shape) can only
      lower it, never add "diversity". attribute_spread_all: the same over every sample.
    adherence: fraction of samples whose predicted shape AND colour match their prompt (GenEval's role);
      shape_accuracy and colour_accuracy alone.
    frechet_distance: between evaluator features of the samples and of as many real images of the same
      prompts, drawn with seed. With 16 prompts x 9 seeds two independent real draws sit about 37 apart:
      that is the floor of this estimate, not 0.
    """
    rows, seeds = prompt_groups(prompts)
    if seeds < 2:
        raise ValueError(f"diversity needs at least 2 seeds per prompt, got {seeds}")
    evaluator = evaluator if evaluator is not None else load_evaluator()
    out = _predict(evaluator, samples)
    target = torch.tensor([parse_prompt(p) for p in prompts], dtype=torch.long)
    shape_ok = out["shape_logits"].argmax(1) == target[:, 0]
    colour_ok = out["colour_logits"].argmax(1) == target[:, 1]
    spread = adherent_spread(out["attributes"].reshape(len(rows), seeds, -1),
                             (shape_ok & colour_ok).reshape(len(rows), seeds))  # (4,)
    real, _ = images_for_prompts(prompts, torch.Generator().manual_seed(seed))
    real_features = _predict(evaluator, real)["features"]
    features = out["features"]
    return {
        "feature_diversity": pairwise_diversity(features.reshape(len(rows), seeds, -1)).item(),
        "data_feature_diversity": pairwise_diversity(real_features.reshape(len(rows), seeds, -1)).item(),
        "attribute_spread": spread.mean().item(),
        **{f"spread_{name}": spread[i].item() for i, name in enumerate(ATTRIBUTES)},
        "attribute_spread_all": out["attributes"].reshape(len(rows), seeds, -1).std(dim=1).mean().item(),
        "adherence": (shape_ok & colour_ok).float().mean().item(),
        "shape_accuracy": shape_ok.float().mean().item(),
        "colour_accuracy": colour_ok.float().mean().item(),
        "frechet_distance": frechet_distance(features, real_features).item(),
    }
