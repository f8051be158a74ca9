"""toy2d: class-conditional 2-D Gaussian mixtures with unequal mode weights, and an MLP flow teacher.

Small enough to train in seconds on a CPU, yet it shows what DMD does to diversity: low-mass modes
(5-10% of a class) are the first a mode-seeking student drops, and dropping one is measurable exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from models.adapter import Conditioning, LoadOptions, TeacherAdapter, check_native_resolution
from models.families import SHIPPED_WEIGHTS, Family, TeacherTrainer
from models.metrics import energy_distance, mean_pairwise_distance

NAME = "toy2d"


@dataclass(frozen=True)
class Mixture:
    """Per class c: modes with means (M_c, 2), a shared std and weights (M_c,) that sum to 1."""

    means: list[torch.Tensor]
    weights: list[torch.Tensor]
    std: float

    @property
    def num_classes(self) -> int:
        return len(self.means)

    def sample(self, class_ids: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Points (B, 2) and their mode index within the class (B,) for the given class ids (B,)."""
        points = torch.empty(class_ids.numel(), 2)
        modes = torch.empty(class_ids.numel(), dtype=torch.long)
        for c in range(self.num_classes):
            rows = (class_ids == c).nonzero().flatten()
            if rows.numel() == 0:
                continue
            m = torch.multinomial(self.weights[c], rows.numel(), replacement=True, generator=generator)
            noise = torch.randn(rows.numel(), 2, generator=generator) * self.std
            points[rows] = self.means[c][m] + noise
            modes[rows] = m
        return points, modes


def default_mixture() -> Mixture:
    """4 classes x 5 modes: 20 modes on a ring of radius 2, the classes interleaved (class c holds every
    4th position), with weights 40/25/17/10/8% in each class, the rare modes in different places.

    Interleaving keeps every class's mean near the origin, so guidance separates the classes rather
    than pushing every sample towards the mode farthest from the centre.
    """
    weights = torch.tensor([0.40, 0.25, 0.17, 0.10, 0.08])
    means, ws = [], []
    for c in range(4):
        angles = (torch.arange(5) * 4 + c) * (2 * math.pi / 20)
        means.append(2.0 * torch.stack([angles.cos(), angles.sin()], dim=1))
        ws.append(weights.roll(c))
    return Mixture(means=means, weights=ws, std=0.08)


def class_prompt(c: int) -> str:
    return f"class {c}"


def parse_prompt(prompt: str, num_classes: int) -> int:
    """'class 2' -> 2; '' -> num_classes (the null class CFG is taken against)."""
    text = prompt.strip()
    if text == "":
        return num_classes
    head, _, index = text.partition(" ")
    if head != "class" or not index.isdigit() or int(index) >= num_classes:
        raise ValueError(f"toy2d prompts are 'class 0' .. 'class {num_classes - 1}' or '' (unconditional), "
                         f"got {prompt!r}")
    return int(index)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1], shape (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Toy2DVelocityNet(ModelMixin, ConfigMixin):
    """MLP velocity field v(x_t, t, class). Class index num_classes is the null (unconditional) class."""

    @register_to_config
    def __init__(self, num_classes: int = 4, hidden: int = 256, depth: int = 4, time_dim: int = 64):
        super().__init__()
        self.class_embed = nn.Embedding(num_classes + 1, hidden)
        self.time_proj = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(2, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        h = self.inp(x_t)
        c = self.class_embed(class_ids) + self.time_proj(timestep_embedding(t, self.config.time_dim).to(x_t.dtype))
        for block in self.blocks:
            h = h + block(h + c)
        return self.out(h)


class Toy2DAdapter(TeacherAdapter):
    family = NAME

    def __init__(self, num_classes: int = 4):
        self.num_classes = num_classes

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (2,)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        ids = torch.tensor([parse_prompt(p, self.num_classes) for p in prompts], dtype=torch.long)
        return Conditioning({"class_ids": ids})

    def network_velocity(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return net(x_t, t, cond.tensors["class_ids"].to(x_t.device))


# ----------------------------------------------------------------------------------------------------
# The family's parts: building, loading, data, evaluation and pictures


def new_teacher(width: int, seed: int) -> tuple[Toy2DAdapter, Toy2DVelocityNet]:
    """A freshly initialised (adapter, net); the adapter has nothing to train here."""
    torch.manual_seed(seed)
    net = Toy2DVelocityNet(num_classes=default_mixture().num_classes, hidden=width)
    return Toy2DAdapter(net.config.num_classes), net


def save_teacher(adapter: Toy2DAdapter, net: Toy2DVelocityNet, path: str | Path) -> None:
    net.save_pretrained(str(path))


def load_teacher(path: str | Path, options: LoadOptions = LoadOptions()) -> tuple[Toy2DAdapter, Toy2DVelocityNet]:
    check_native_resolution(options, None, NAME)
    net = Toy2DVelocityNet.from_pretrained(str(path), low_cpu_mem_usage=False)
    return Toy2DAdapter(net.config.num_classes), net


def prompts() -> list[str]:
    return [class_prompt(c) for c in range(default_mixture().num_classes)]


def training_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Data x0 (B, 2) and their prompts, classes drawn uniformly."""
    mixture = default_mixture()
    class_ids = torch.randint(0, mixture.num_classes, (batch_size,), generator=generator)
    x0, _ = mixture.sample(class_ids, generator)
    return x0, [class_prompt(int(c)) for c in class_ids]


def evaluate_samples(samples: torch.Tensor, prompts: list[str], seed: int = 0) -> dict[str, float]:
    """Mode metrics of samples (B, 2) for their prompts, against as many fresh data points."""
    mixture = default_mixture()
    class_ids = torch.tensor([parse_prompt(p, mixture.num_classes) for p in prompts])
    reference, _ = mixture.sample(class_ids, torch.Generator().manual_seed(seed))
    return toy2d_metrics(samples, class_ids, mixture, reference, class_ids)


def render(samples: dict[str, torch.Tensor], prompts: list[str], path: str | Path) -> Path:
    """One scatter panel per model (name -> samples (B, 2)), coloured by class, with the modes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixture = default_mixture()
    class_ids = torch.tensor([parse_prompt(p, mixture.num_classes) for p in prompts])
    fig, axes = plt.subplots(1, len(samples), figsize=(4.2 * len(samples), 4.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], samples.items()):
        for c in range(mixture.num_classes):
            rows = class_ids == c
            ax.scatter(points[rows, 0], points[rows, 1], s=2, alpha=0.35, color=f"C{c}")
            ax.scatter(mixture.means[c][:, 0], mixture.means[c][:, 1], s=60 * mixture.weights[c] / 0.1,
                       facecolors="none", edgecolors="black", linewidths=0.8)
        ax.set_title(name)
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Mode metrics


def assign_modes(points: torch.Tensor, class_ids: torch.Tensor, mixture: Mixture,
                 off_mode_stds: float = 4.0) -> torch.Tensor:
    """Index of the nearest mode of each point's own class (B,), or -1 if farther than off_mode_stds stds."""
    modes = torch.full((points.shape[0],), -1, dtype=torch.long)
    for c in range(mixture.num_classes):
        rows = (class_ids == c).nonzero().flatten()
        if rows.numel() == 0:
            continue
        dist = torch.cdist(points[rows].double(), mixture.means[c].double())
        nearest, index = dist.min(dim=1)
        modes[rows] = torch.where(nearest <= off_mode_stds * mixture.std, index, torch.full_like(index, -1))
    return modes


def toy2d_metrics(points: torch.Tensor, class_ids: torch.Tensor, mixture: Mixture,
                  reference: torch.Tensor | None = None, reference_ids: torch.Tensor | None = None,
                  live_fraction: float = 0.2) -> dict[str, float]:
    """Mode metrics of samples points (B, 2) with classes class_ids (B,), averaged over classes.

    coverage: fraction of modes that are live, i.e. hold at least live_fraction x their true weight of
      the class's on-mode samples; live_modes: their total count over all classes.
    mode_kl: KL(true weights || sampled weights), sampled weights with add-1/2 smoothing.
    off_mode_rate: fraction of samples farther than 4 stds from every mode of their class (quality).
    pairwise_distance: mean within-class pairwise distance. energy_distance: to reference samples (the
      data), when given.
    """
    modes = assign_modes(points, class_ids, mixture)
    coverage, kls, pairwise, energies, live_total = [], [], [], [], 0
    for c in range(mixture.num_classes):
        in_class = class_ids == c
        if int(in_class.sum()) < 2:
            raise ValueError(f"need at least two samples of class {c}")
        weights = mixture.weights[c].double()
        counts = torch.bincount(modes[in_class & (modes >= 0)], minlength=weights.numel()).double()
        on_mode = counts.sum()
        share = counts / on_mode if on_mode > 0 else torch.zeros_like(counts)
        live = share >= live_fraction * weights
        live_total += int(live.sum())
        coverage.append(live.double().mean())
        q = (counts + 0.5) / (on_mode + 0.5 * weights.numel())
        kls.append((weights * (weights / q).log()).sum())
        pairwise.append(mean_pairwise_distance(points[in_class]))
        if reference is not None:
            energies.append(energy_distance(points[in_class], reference[reference_ids == c]))
    result = {
        "coverage": float(torch.stack(coverage).mean()),
        "live_modes": float(live_total),
        "mode_kl": float(torch.stack(kls).mean()),
        "off_mode_rate": float((modes < 0).double().mean()),
        "pairwise_distance": float(torch.stack(pairwise).mean()),
    }
    if energies:
        result["energy_distance"] = float(torch.stack(energies).mean())
    return result


FAMILY = Family(
    name=NAME, load_teacher=load_teacher, save_teacher=save_teacher, evaluate_samples=evaluate_samples, render=render,
    # The sweep's two objectives: how far the sampled mode weights are from the true ones (dropped and drained
    # modes), and how many samples land on no mode.
    diversity=("mode_kl", -1), quality=("off_mode_rate", -1),
    collapse="live_modes",  # mode_kl is lower-is-better; the collapse guard watches the live modes instead
    fidelity_columns=("mode_kl", "live_modes", "off_mode_rate", "pairwise_distance"),
    prompts=tuple(prompts()), trainer=TeacherTrainer(new_teacher, training_batch),
    # Trained with orchestrator/recipes/toy2d.yaml: the demo's runs start from the same weights on every machine
    # (and skip half a minute of training).
    shipped_teacher=SHIPPED_WEIGHTS / "toy2d-teacher")
