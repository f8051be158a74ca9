"""The shapes family: procedural data, text encoder, adapter, teacher save/load and training, evaluator
metrics and pictures. Tiny models built in code with fixed seeds; the shipped teacher only in the slow test."""

from __future__ import annotations

import math

import pytest
import torch

from models.families import get_family, shapes
from models.families.shapes import domain
from models.families.shapes import teacher as shapes_teacher
from models.families.shapes.evaluator import evaluate_samples, evaluator_accuracy, load_evaluator

torch.set_num_threads(1)


def attributes(shape: str, colour: str, x=0.5, y=0.5, size=0.25, shade=0.5, n=1) -> domain.ShapeAttributes:
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return domain.ShapeAttributes(torch.full((n,), domain.SHAPES.index(shape)),
                                  torch.full((n,), domain.COLOURS.index(colour)), full(x), full(y), full(size),
                                  full(shade))


def coverage(image: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Per-pixel share of the shape (H, W), read from the channel where shape and background differ most."""
    c = int((rgb - domain.BACKGROUND).abs().argmax())
    return ((image[c] + 1) / 2 - domain.BACKGROUND) / (rgb[c] - domain.BACKGROUND)


@pytest.mark.parametrize("shape, area_per_r2", [
    ("circle", math.pi),
    ("square", (2 * domain.SQUARE_HALF_SIDE) ** 2),
    ("triangle", math.sqrt(3) * (math.sqrt(3) / 2) ** 2),  # half side r sqrt(3)/2 for circumradius r
    ("cross", 2 * (2 * 2 * domain.CROSS_HALF_WIDTH) - (2 * domain.CROSS_HALF_WIDTH) ** 2),
])
def test_render_area_centre_colour_and_background(shape, area_per_r2):
    attrs = attributes(shape, "blue", x=0.45, y=0.55, size=0.25, shade=0.3)
    image = domain.render_images(attrs)[0]
    rgb = domain.shape_rgb(attrs.colour, attrs.shade)[0]
    r_px = 0.25 * domain.RESOLUTION
    assert coverage(image, rgb).sum().item() == pytest.approx(area_per_r2 * r_px ** 2, rel=0.02)
    row, col = int(0.55 * domain.RESOLUTION), int(0.45 * domain.RESOLUTION)
    torch.testing.assert_close(image[:, row, col], rgb * 2 - 1)
    torch.testing.assert_close(image[:, 0, 0], torch.full((3,), domain.BACKGROUND * 2 - 1))
    edge = coverage(image, rgb)
    assert ((edge > 0.05) & (edge < 0.95)).any(), "edges should be anti-aliased, not binary"


def test_colours_and_shades_are_distinct():
    colour = torch.arange(len(domain.COLOURS))
    dark = domain.shape_rgb(colour, torch.zeros(len(colour)))
    pale = domain.shape_rgb(colour, torch.ones(len(colour)))
    assert (pale > dark).all()  # the shade runs dark -> pale within each colour
    for rgb in (dark, pale):
        assert torch.cdist(rgb, rgb).add(torch.eye(len(colour))).min() > 0.25
    red, green, blue, _ = pale.unbind()
    assert red.argmax() == 0 and green.argmax() == 1 and blue.argmax() == 2


def test_batches_follow_their_prompts_and_generator():
    x0, prompts, attrs = domain.sample_batch(64, torch.Generator().manual_seed(3))
    again, prompts_again, _ = domain.sample_batch(64, torch.Generator().manual_seed(3))
    other, _, _ = domain.sample_batch(64, torch.Generator().manual_seed(4))
    assert x0.shape == (64, 3, 32, 32) and x0.min() >= -1 and x0.max() <= 1
    assert torch.equal(x0, again) and prompts == prompts_again and not torch.equal(x0, other)
    for prompt, s, c in zip(prompts, attrs.shape, attrs.colour):
        assert domain.parse_prompt(prompt) == (int(s), int(c))
    assert set(prompts) <= set(domain.prompts())
    targets = attrs.regression_targets()
    assert targets.min() >= 0 and targets.max() <= 1


def test_prompts_parse_and_reject_unknown_words():
    assert domain.parse_prompt("a yellow triangle") == (domain.SHAPES.index("triangle"), domain.COLOURS.index("yellow"))
    assert len(set(domain.prompts())) == len(domain.SHAPES) * len(domain.COLOURS)
    with pytest.raises(ValueError, match="shape in"):
        domain.parse_prompt("a purple circle")
    assert get_family("shapes") is shapes.FAMILY


@pytest.fixture(scope="module")
def tiny_teacher():
    return shapes_teacher.new_teacher(width=8, seed=0)


def test_text_encoder_shapes_and_empty_prompt(tiny_teacher):
    adapter, _ = tiny_teacher
    cond = adapter.encode_prompts(["a red circle", "", "a blue cross"])
    seq, pooled = cond.tensors["prompt_embeds"], cond.tensors["pooled_projections"]
    dim, length = adapter.text_encoder.config.dim, adapter.text_encoder.config.max_length
    assert seq.shape == (3, length, dim) and pooled.shape == (3, dim)
    assert not torch.allclose(seq[0], seq[1]) and not torch.allclose(seq[0], seq[2])
    torch.testing.assert_close(adapter.negative_conditioning(2).tensors["prompt_embeds"][1], seq[1])
    with pytest.raises(ValueError, match="unknown words"):
        adapter.encode_prompts(["a red banana"])


def test_velocity_shape_and_save_load_round_trip(tiny_teacher, tmp_path):
    adapter, net = tiny_teacher
    net.eval(), adapter.text_encoder.eval()  # from_pretrained returns eval mode (the fused attention path)
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(3, *adapter.latent_shape, generator=g), torch.rand(3, generator=g)
    prompts = ["a green square", "", "a yellow triangle"]
    with torch.no_grad():
        v = adapter.velocity(net, x_t, t, adapter.encode_prompts(prompts))
    assert v.shape == (3, 3, 32, 32) and torch.isfinite(v).all()
    shapes_teacher.save_teacher(adapter, net, tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "text_encoder" / "diffusion_pytorch_model.safetensors").is_file()
    adapter2, net2 = shapes_teacher.load_teacher(tmp_path)
    with torch.no_grad():
        v2 = adapter2.velocity(net2, x_t, t, adapter2.encode_prompts(prompts))
    torch.testing.assert_close(v2, v, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="unet"):
        shapes_teacher.load_teacher(tmp_path / "unet")


def test_tiny_teacher_trains_with_the_generic_trainer(tmp_path):
    import json

    from orchestrator.recipe import resolve
    from workers.teacher import train_teacher

    config = resolve("shapes", ["teacher.train.steps=30", "teacher.train.batch_size=16",
                                "teacher.train.width=8", "teacher.train.lr=1e-3"])
    out = train_teacher(config, tmp_path / "teacher", progress=False)
    losses = json.loads((out / "training_log.json").read_text())["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    adapter, _ = shapes_teacher.load_teacher(out)
    before = shapes_teacher.new_teacher(width=8, seed=0)[0].text_encoder.token_embed.weight
    assert not torch.equal(adapter.text_encoder.token_embed.weight, before), "the text encoder must train too"


def real_grid(seeds: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    prompts = [p for p in domain.prompts() for _ in range(seeds)]
    images, _ = domain.images_for_prompts(prompts, torch.Generator().manual_seed(seed))
    return images, prompts


def test_evaluator_is_accurate_on_real_images():
    accuracy = evaluator_accuracy(load_evaluator(), num_images=512, seed=99)
    assert accuracy["joint_accuracy"] >= 0.98
    assert max(accuracy[f"{a}_mae"] for a in ("x", "y", "size", "shade")) < 0.05


def test_evaluate_samples_on_real_data_and_on_copies():
    images, prompts = real_grid(seeds=6, seed=5)
    real = evaluate_samples(images, prompts, seed=1)
    assert real["adherence"] >= 0.97
    assert real["feature_diversity"] > 0.05 and real["attribute_spread"] > 0.2
    copies = images.reshape(16, 6, 3, 32, 32)[:, :1].expand(16, 6, 3, 32, 32).reshape(-1, 3, 32, 32)
    same = evaluate_samples(copies, prompts, seed=1)
    assert same["feature_diversity"] == pytest.approx(0, abs=1e-6)
    assert same["attribute_spread"] == pytest.approx(0, abs=1e-6)
    assert same["adherence"] >= 0.9
    assert same["frechet_distance"] > real["frechet_distance"]
    wrong = evaluate_samples(images, [p.replace("red", "TMP").replace("blue", "red").replace("TMP", "blue")
                                      for p in prompts], seed=1)
    assert wrong["adherence"] < 0.6 and wrong["shape_accuracy"] >= 0.97
    with pytest.raises(ValueError, match="prompt-major"):
        evaluate_samples(images, prompts[1:] + prompts[:1])


def test_failed_samples_add_feature_diversity_but_no_attribute_spread():
    images, prompts = real_grid(seeds=6, seed=5)
    real = evaluate_samples(images, prompts, seed=1)
    broken = images.clone().reshape(16, 6, 3, 32, 32)
    broken[:, 3] = -1  # a blank tile
    broken[:, 4:] = broken[:, 4:] * 0.15 - 0.85  # faint shapes
    broken = evaluate_samples(broken.reshape(-1, 3, 32, 32), prompts, seed=1)
    assert broken["adherence"] < 0.6
    assert broken["feature_diversity"] > 2 * real["feature_diversity"]  # what failed samples do to features
    assert broken["attribute_spread_all"] > real["attribute_spread_all"] + 0.02
    # the headline counts the good samples only: half as many per prompt, the same spread within noise
    assert broken["attribute_spread"] <= real["attribute_spread"] + 0.005


def test_adherent_spread_ignores_failed_samples_and_counts_a_lost_prompt_as_none():
    from models.families.shapes.evaluator import adherent_spread

    attributes = torch.tensor([[[0.0], [1.0], [9.0]], [[0.0], [1.0], [2.0]]])  # 2 prompts x 3 seeds x 1
    ok = torch.tensor([[True, True, False], [True, False, False]])
    # prompt 0: std of (0, 1) = 0.7071; prompt 1: one good sample, no spread
    torch.testing.assert_close(adherent_spread(attributes, ok), torch.tensor([0.7071068 / 2]))


def test_render_writes_a_png_of_the_layout_size(tmp_path):
    from PIL import Image

    images, prompts = real_grid(seeds=3, seed=0)
    path = domain.render({"data": images, "noise": torch.randn_like(images)}, prompts, tmp_path / "grid.png")
    with Image.open(path) as picture:
        assert picture.size == domain.grid_layout(num_models=2, num_prompts=16, seeds_per_prompt=3)
        # pixel (row 15, col 20) of the first sample, drawn CELL_SCALE times larger in the top-left cell
        row, col = 15, 20
        drawn = picture.getpixel((domain.LABEL_WIDTH + domain.CELL_SCALE * col,
                                  domain.TITLE_HEIGHT + domain.CELL_SCALE * row))
    assert list(drawn) == ((images[0, :, row, col] + 1) * 127.5).round().int().tolist()


@pytest.mark.slow
def test_shipped_teacher_follows_its_prompts():
    from models.flow import sampling_sigmas
    from models.sampling import Sampler, grid_pairs, sample
    from orchestrator.recipe import resolve

    path = shapes.FAMILY.shipped_teacher
    assert (path / "unet" / "config.json").is_file(), "models/weights/shapes-teacher is missing"
    teacher = resolve("shapes").teacher
    adapter, net = shapes_teacher.load_teacher(path)
    prompts, seeds = grid_pairs(domain.prompts(), list(range(1_000_000, 1_000_009)))
    samples = sample(adapter, net.eval(), prompts, seeds,
                     Sampler(sampling_sigmas(teacher.num_steps, teacher.shift), teacher.guidance_scale))
    metrics = evaluate_samples(samples, prompts, seed=0)
    assert metrics["adherence"] >= 0.95
    assert metrics["attribute_spread"] > 0.15


def test_the_recipe_uses_the_shipped_teacher_and_other_settings_do_not(tmp_path):
    from orchestrator.recipe import resolve
    from workers.teacher import embedded_teacher_dir, teacher_dir

    config = resolve("shapes", [f"storage.output_dir={tmp_path}"])
    assert teacher_dir(config) == shapes.FAMILY.shipped_teacher
    other = resolve("shapes", [f"storage.output_dir={tmp_path}", "teacher.train.steps=10"])
    assert teacher_dir(other) == embedded_teacher_dir(other)
