"""Diversity and quality metrics, as pure functions of samples (and features) with known answers.

Image domains follow the paper's protocol: R seeds per prompt, diversity = 1 - mean pairwise cosine
similarity of L2-normalised features, averaged over prompts. toy2d's mode metrics live in models/families/toy2d.py;
the paper's image feature models in models/metrics/image.py.
"""

from __future__ import annotations

import torch



def pairwise_diversity(features: torch.Tensor) -> torch.Tensor:
    """1 - mean_{i<j} cos(f_i, f_j) per prompt, averaged over prompts.

    features: (P, R, D), R >= 2 seeds per prompt. Identical samples give 0.
    """
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"features must be (prompts, seeds >= 2, dim), got {tuple(features.shape)}")
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    sim = f @ f.transpose(1, 2)  # (P, R, R)
    r = f.shape[1]
    off_diagonal = (sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(dim=1)) / (r * (r - 1))
    return (1 - off_diagonal).mean()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    # tr sqrt(cov_a cov_b) from the eigenvalues of sqrt(cov_a) cov_b sqrt(cov_a), which is symmetric PSD
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| for point sets x (N, D), y (M, D); 0 when they are equal."""
    x, y = x.double(), y.double()
    return 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()


def mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance over pairs i != j of x (N, D)."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("need at least two points")
    return torch.cdist(x.double(), x.double()).sum() / (n * (n - 1))
