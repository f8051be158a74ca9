"""Metrics on distributions with known answers."""

import math

import pytest
import torch

from models.families import toy2d
from models.metrics import energy_distance, frechet_distance, mean_pairwise_distance, pairwise_diversity


def test_identical_samples_have_zero_diversity():
    features = torch.randn(4, 1, 16).expand(4, 9, 16)
    assert pairwise_diversity(features).item() == pytest.approx(0.0, abs=1e-12)


def test_orthogonal_samples_have_diversity_one():
    features = torch.eye(5).unsqueeze(0).repeat(2, 1, 1)  # 2 prompts, 5 orthogonal seeds
    assert pairwise_diversity(features).item() == pytest.approx(1.0)


def test_diversity_by_hand():
    # two seeds at 60 degrees: cos = 0.5, diversity 0.5; second prompt identical seeds: 0
    f = torch.tensor([[[1.0, 0.0], [0.5, math.sqrt(3) / 2]], [[0.0, 2.0], [0.0, 1.0]]])
    assert pairwise_diversity(f).item() == pytest.approx(0.25)


def test_diversity_needs_two_seeds():
    with pytest.raises(ValueError, match="seeds >= 2"):
        pairwise_diversity(torch.randn(3, 1, 8))


def test_frechet_distance_known_answers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    assert frechet_distance(a, a).item() == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, 2.0, 0.0])
    assert frechet_distance(a, a + shift).item() == pytest.approx(5.0, rel=1e-6)
    # b and 2b: means m and 2m, covariances C and 4C: |m|^2 + tr C + 4 tr C - 2 tr sqrt(4 C^2) = |m|^2 + tr C
    b = torch.randn(4000, 3, generator=g).double()
    expected = b.mean(0).pow(2).sum() + torch.cov(b.T).trace()
    assert frechet_distance(b, 2 * b).item() == pytest.approx(expected.item(), rel=1e-9)


def test_energy_distance_and_pairwise_distance():
    x = torch.randn(200, 2)
    assert energy_distance(x, x).item() == pytest.approx(0.0, abs=1e-9)
    assert energy_distance(x, x + 3.0).item() > 1.0
    assert mean_pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]])).item() == pytest.approx(5.0)


def _two_mode_mixture():
    means = [torch.tensor([[-1.0, 0.0], [1.0, 0.0]])]
    return toy2d.Mixture(means=means, weights=[torch.tensor([0.5, 0.5])], std=0.05)


def test_samples_from_one_of_two_equal_modes_cover_half():
    mixture = _two_mode_mixture()
    points = torch.tensor([-1.0, 0.0]) + 0.02 * torch.randn(500, 2)
    ids = torch.zeros(500, dtype=torch.long)
    m = toy2d.toy2d_metrics(points, ids, mixture)
    assert m["coverage"] == 0.5
    assert m["live_modes"] == 1
    assert m["off_mode_rate"] == 0.0
    # KL(true || smoothed sampled): 0.5 log(0.5 / (500.5 / 501)) + 0.5 log(0.5 / (0.5 / 501))
    assert m["mode_kl"] == pytest.approx(0.5 * math.log(0.5 * 501 / 500.5) + 0.5 * math.log(501), rel=1e-9)


def test_data_samples_cover_every_mode_and_off_mode_points_are_counted():
    mixture = toy2d.default_mixture()
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(4).repeat_interleave(2000)
    points, _ = mixture.sample(ids, g)
    m = toy2d.toy2d_metrics(points, ids, mixture)
    assert m["coverage"] == 1.0 and m["live_modes"] == 20
    assert m["mode_kl"] < 0.01
    natural = int((toy2d.assign_modes(points, ids, mixture)[800:] < 0).sum())  # the data's own 4-std tails
    points[:800] = 0.0  # the centre of the ring is far from every mode
    assert toy2d.toy2d_metrics(points, ids, mixture)["off_mode_rate"] == pytest.approx((800 + natural) / 8000)


def test_energy_distance_to_data_is_small_for_data():
    prompts = [toy2d.class_prompt(c) for c in range(4) for _ in range(500)]
    ids = torch.arange(4).repeat_interleave(500)
    points, _ = toy2d.default_mixture().sample(ids, torch.Generator().manual_seed(5))
    data_metrics = toy2d.evaluate_samples(points, prompts)
    collapsed = toy2d.evaluate_samples(torch.zeros_like(points) + points[:1], prompts)
    assert data_metrics["energy_distance"] < 0.05 < collapsed["energy_distance"]
