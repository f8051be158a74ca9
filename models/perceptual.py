"""The perceptual distances of the dmd-regression baseline: on pixel-space domains (shapes) LPIPS's form over a
fixed random convolutional network; on latent families (SD3, SDXL) LPIPS itself, on the decoded images.

Why not the trained evaluator: the regression must not optimise the network the fidelity table measures with
(models/families/shapes/evaluator.py), or the baseline would be graded on its own loss. Why random features: they
need no training data and no weights file (the network is rebuilt from its seed, bit for bit, wherever the
project runs), and like LPIPS they compare local structure at several scales rather than pixels alone.

    distance = RandomFeatureDistance()            # seed 0: the one the recipes train with
    d = distance(x, y)                            # (B,) for images (B, C, H, W) in [-1, 1]

LPIPS (Zhang et al. 2018, version 0.1) is rebuilt here from its two published weight files rather than imported
from the `lpips` package: that package builds its trunk through torchvision, and torchvision's wheels are built for
one torch each (its CUDA builds fail to import beside torch's CPU build), while this project runs with whatever torch
a machine has. The weights are the package's and torchvision's own files, loaded unchanged (lpips_files says where
it looks), and the arithmetic is the package's: tests/test_perceptual.py holds it to a hand computation.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ConfigError


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


# -- LPIPS ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PerceptualOptions:
    """Which LPIPS the latent families' regression measures with (the recipe's loss.lpips_*): the trunk network,
    a directory holding its weight files ("" looks where torchvision and the lpips package keep them), and the side
    the decoded images are resized to first."""

    net: str = "vgg"
    weights: str = ""
    resolution: int = 224


# Per trunk: its layers as torchvision's `features` (so that torchvision's ImageNet checkpoint loads by name), the
# layers LPIPS reads (after these ReLUs), their widths, and the checkpoint's file name.
_TRUNKS = {
    "vgg": ((64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
            (3, 8, 15, 22, 29), (64, 128, 256, 512, 512), "vgg16-397923af.pth"),
    "alex": (((64, 11, 4, 2), "P", (192, 5, 1, 2), "P", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)),
             (1, 4, 7, 9, 11), (64, 192, 384, 256, 256), "alexnet-owt-7be5be79.pth"),
}
TRUNK_URL = "https://download.pytorch.org/models/"
# LPIPS's input scaling (its ScalingLayer): images in [-1, 1] to the trunk's ImageNet statistics.
_SHIFT, _SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)


def _trunk_layers(net: str) -> nn.Sequential:
    layers, before = [], 3
    for item in _TRUNKS[net][0]:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        elif item == "P":
            layers.append(nn.MaxPool2d(3, 2))
        else:
            width, kernel, stride, padding = item if isinstance(item, tuple) else (item, 3, 1, 1)
            layers += [nn.Conv2d(before, width, kernel, stride, padding), nn.ReLU()]
            before = width
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """d(x, y) = sum over the trunk's five layers of the spatial mean of w_l . (unit(f_l(x)) - unit(f_l(y)))^2, for
    images (B, 3, H, W) in [-1, 1] -> (B,); frozen. Built with random weights; from_files loads the real ones."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in _TRUNKS:
            raise ValueError(f"LPIPS trunk must be one of {', '.join(_TRUNKS)}, got {net!r}")
        self.net, self.features, self.taps = net, _trunk_layers(net), _TRUNKS[net][1]
        self.lins = nn.ModuleList(nn.Conv2d(width, 1, 1, bias=False) for width in _TRUNKS[net][2])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, net: str, trunk_file: Path, lin_file: Path) -> LPIPS:
        """torchvision's ImageNet checkpoint of the trunk (its `features.*` tensors) and the lpips package's linear
        layers (weights/v0.1/<net>.pth, `linN.model.1.weight`)."""
        model = cls(net)
        trunk = torch.load(trunk_file, map_location="cpu", weights_only=True)
        model.features.load_state_dict({k[len("features."):]: v for k, v in trunk.items() if k.startswith("features.")})
        lins = torch.load(lin_file, map_location="cpu", weights_only=True)
        model.lins.load_state_dict({f"{i}.weight": lins[f"lin{i}.model.1.weight"] for i in range(len(model.lins))})
        return model

    def layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        h, out = (images - self.shift) / self.scale, []
        for i, layer in enumerate(self.features[:self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0
        for lin, fx, fy in zip(self.lins, self.layers(x), self.layers(y)):
            total = total + lin((_lpips_unit(fx) - _lpips_unit(fy)).pow(2)).mean((2, 3))
        return total.flatten()


def _lpips_unit(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """LPIPS's channel normalisation (its normalize_tensor: the eps outside the root, unlike unit()). Its root has
    no finite gradient at an all-zero position, but every tap follows a ReLU, whose backward sets the gradient of
    a position at or below zero to 0, so no NaN reaches the image."""
    return features / (features.pow(2).sum(1, keepdim=True).sqrt() + eps)


def lpips_file_names(net: str) -> tuple[str, str]:
    """The file names of a trunk's two weight files: torchvision's checkpoint and the lpips package's layers."""
    return _TRUNKS[net][3], f"{net}.pth"


def save_random_weights(directory: Path, net: str = "alex", seed: int = 0) -> tuple[Path, Path]:
    """Random LPIPS weight files under the published names and layouts, for tests and benchmarks (the time and
    memory of a distance do not depend on its weights): torchvision's whole-network checkpoint (a classifier
    tensor too) and the lpips package's linear layers (non-negative, as its trained ones are)."""
    torch.manual_seed(seed)
    model = LPIPS(net)
    trunk_name, lin_name = lpips_file_names(net)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trunk = {f"features.{k}": v.clone() for k, v in model.features.state_dict().items()}
    torch.save(trunk | {"classifier.1.weight": torch.randn(4, 4)}, directory / trunk_name)
    torch.save({f"lin{i}.model.1.weight": torch.rand_like(lin.weight) for i, lin in enumerate(model.lins)},
               directory / lin_name)
    return directory / trunk_name, directory / lin_name


def lpips_files(options: PerceptualOptions) -> tuple[Path, Path]:
    """(trunk checkpoint, linear layers) of options.net: in options.weights when set, else torchvision's download
    cache (torch.hub's checkpoints) and the installed lpips package; the error names both files and how to get them."""
    trunk_name, lin_name = lpips_file_names(options.net)
    if options.weights:
        places = [Path(options.weights).expanduser()] * 2
    else:
        found = importlib.util.find_spec("lpips")
        package = Path(next(iter(found.submodule_search_locations))) if found and found.submodule_search_locations \
            else None
        places = [Path(torch.hub.get_dir()) / "checkpoints", package / "weights" / "v0.1" if package else None]
    trunk, lin = (place / name if place else None for place, name in zip(places, (trunk_name, lin_name)))
    missing = [f"{name} (not in {place})" if place else f"{name} (no lpips package installed)"
               for place, name, path in zip(places, (trunk_name, lin_name), (trunk, lin))
               if path is None or not path.is_file()]
    if missing:
        raise ConfigError("loss.lpips_weights", f"the regression baseline on a latent family measures LPIPS "
                          f"({options.net}) on decoded images and needs two weight files that are not on this machine: "
                          f"{'; '.join(missing)}. They are torchvision's ImageNet trunk ({TRUNK_URL}{trunk_name}) "
                          f"and LPIPS's linear layers (the lpips package's lpips/weights/v0.1/{lin_name}, from `pip "
                          "download --no-deps lpips` or github.com/richzhang/PerceptualSimilarity); put both in one "
                          "directory and set loss.lpips_weights=DIR")
    return trunk, lin


class DecodedLPIPS(nn.Module):
    """The latent families' regression distance: decode both latents to images (decode: latents -> images in
    [-1, 1], differentiable), resize them to options.resolution on their shorter side, and measure LPIPS. The
    teacher's samples (y) are constants, decoded without a graph."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], lpips: LPIPS, resolution: int):
        super().__init__()
        self.decode, self.lpips, self.resolution = decode, lpips, resolution

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.decode(latents).float()
        side = min(images.shape[-2:])
        if side != self.resolution:
            size = tuple(round(n * self.resolution / side) for n in images.shape[-2:])
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return images

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.images(y)
        return self.lpips(self.images(x), target)
