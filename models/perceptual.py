"""The perceptual distance of the dmd-regression baseline on pixel-space domains (shapes): LPIPS's form, with
features of a fixed random convolutional network instead of a trained one.

Why not the trained evaluator: the regression must not optimise the network the fidelity table measures with
(models/families/shapes/evaluator.py), or the baseline would be graded on its own loss. Why random features: they
need no training data and no weights file (the network is rebuilt from its seed, bit for bit, wherever the
project runs), and like LPIPS they compare local structure at several scales rather than pixels alone.

    distance = RandomFeatureDistance()            # seed 0: the one the recipes train with
    d = distance(x, y)                            # (B,) for images (B, C, H, W) in [-1, 1]
"""

from __future__ import annotations

import torch
from torch import nn


class RandomFeatureDistance(nn.Module):
    """d(x, y) = mean squared pixel difference + the sum over scales of the mean squared difference of unit-length
    feature vectors (LPIPS's channel normalisation, equal weights). Three stages of 3x3 convolutions with ReLU, the
    second and third at half the resolution of the one before, weights drawn from seed (He initialisation); frozen.
    """

    def __init__(self, channels: int = 3, widths: tuple[int, ...] = (32, 64, 64), seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        stages, before = [], channels
        for i, width in enumerate(widths):
            conv = nn.Conv2d(before, width, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2 / (before * 9)) ** 0.5)
                conv.bias.zero_()
            stages.append(nn.Sequential(conv, nn.ReLU()))
            before = width
        self.stages = nn.ModuleList(stages)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = (x - y).pow(2).flatten(1).mean(1)
        fx, fy = x, y
        for stage in self.stages:
            fx, fy = stage(fx), stage(fy)
            total = total + (unit(fx) - unit(fy)).pow(2).sum(1).flatten(1).mean(1)
        return total


def unit(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each position's feature vector (dim 1) scaled to unit length, as LPIPS does."""
    return features / (features.pow(2).sum(1, keepdim=True) + eps).sqrt()
