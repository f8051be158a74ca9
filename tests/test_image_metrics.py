"""The paper's image metrics through their hooks (models/metrics/image.py), on tiny random DINO and CLIP
models saved to disk: plumbing and the metrics' known answers, not the real models' numbers."""

from __future__ import annotations

import pytest
import torch

from models.metrics.image import FeatureModel, PickScore, external_metrics
from sd_models import save_tiny_clip, save_tiny_dino


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric-models")
    return {"dino": save_tiny_dino(root / "dino"), "clip": save_tiny_clip(root / "clip")}


def grid(prompts: list[str], seeds: int, same: bool) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(len(prompts), 1 if same else seeds, 3, 48, 48, generator=g) * 2 - 1
    return images.expand(len(prompts), seeds, 3, 48, 48).reshape(-1, 3, 48, 48), [p for p in prompts for _ in range(seeds)]


def test_feature_diversity_is_zero_for_copies_and_positive_otherwise(weights):
    prompts = ["a red cat", "a blue house"]
    for name in ("dino", "clip"):
        model = FeatureModel.load(name, str(weights[name]))
        copies, rows = grid(prompts, 3, same=True)
        varied, _ = grid(prompts, 3, same=False)
        assert model.features(varied).shape[0] == 6
        assert model.diversity(copies, rows) == pytest.approx(0, abs=1e-6)
        assert model.diversity(varied, rows) > 1e-4


def test_pickscore_is_the_scaled_cosine_of_image_and_prompt(weights):
    scorer = PickScore.load(str(weights["clip"]))
    images, prompts = grid(["a red cat", "a dog in the snow"], 2, same=False)
    scores = scorer.scores(images, prompts, batch_size=3)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    other = scorer.scores(images, ["a green tree"] * 4)
    assert not torch.allclose(scores, other)  # the prompt matters
    model, processor = scorer.model, scorer.processor
    from models.metrics.image import _embeds, to_pil

    with torch.no_grad():
        image = _embeds(model.get_image_features(**processor(images=to_pil(images[:1]), return_tensors="pt")))
        text = _embeds(model.get_text_features(**processor(text=prompts[:1], return_tensors="pt")))
    expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(image, text)
    torch.testing.assert_close(scores[:1], expected, atol=1e-5, rtol=1e-5)


def test_only_configured_metrics_run_and_missing_weights_are_named(weights, tmp_path):
    images, prompts = grid(["a red cat"], 2, same=False)
    assert external_metrics(images, prompts) == {}
    metrics = external_metrics(images, prompts, dino_path=str(weights["dino"]), pickscore_path=str(weights["clip"]))
    assert set(metrics) == {"dino_diversity", "pickscore"}
    with pytest.raises(FileNotFoundError, match="clip weights not found"):
        external_metrics(images, prompts, clip_path=str(tmp_path / "nowhere"))
    with pytest.raises((ImportError, FileNotFoundError), match="image-reward|ImageReward"):
        external_metrics(images, prompts, imagereward_path=str(tmp_path / "ImageReward.pt"))


def test_evaluate_decodes_sd3_samples_and_reports_the_paper_metrics(weights, tmp_path):
    from orchestrator.recipe import resolve
    from sd_models import prompt_file, save_tiny_sd3
    from workers.evaluate import evaluate, teacher_sampler
    from workers.teacher import load_teacher

    prompts = prompt_file(tmp_path / "prompts.txt", ["a red cat", "a blue house"])
    config = resolve(None, ["teacher.family=sd3", f"teacher.path={save_tiny_sd3(tmp_path / 'sd3')}",
                            "teacher.num_steps=4", "loss.anchor_step=1", f"evaluation.prompts={prompts}",
                            "evaluation.seeds_per_prompt=2", f"evaluation.dino_path={weights['dino']}",
                            f"evaluation.clip_path={weights['clip']}", f"evaluation.pickscore_path={weights['clip']}"])
    adapter, net = load_teacher(config, vae=True)
    result = evaluate(config, adapter, net, teacher_sampler(config, adapter))
    assert result.samples.shape == (4, 3, 64, 64)  # decoded images, not latents
    assert {"pixel_diversity", "dino_diversity", "clip_diversity", "pickscore"} <= set(result.metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())
