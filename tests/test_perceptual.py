"""The regression baseline's distance on the latent families: LPIPS (models/perceptual.py) against a hand
computation of its published arithmetic, its two weight files loaded by their published names and found where
torchvision and the lpips package keep them (or the error that names them), and an SD3 run whose regression term
reaches the generator through the VAE's decoded images and nothing else."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from models.perceptual import LPIPS, DecodedLPIPS, PerceptualOptions, lpips_file_names, lpips_files
from models.perceptual import save_random_weights as write_weights
from orchestrator.precompute import precompute
from orchestrator.recipe import resolve
from sd_models import prompt_file, save_tiny_sd3
from workers.config import ConfigError
from workers.distill import Distiller, copy_for_training, critic_network
from workers.engines import build_engine, distributed
from workers.teacher import load_teacher

# torchvision's `features` layouts: the indices of their convolutions (alexnet, vgg16)
CONVS = {"alex": (0, 3, 6, 8, 10), "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}


def test_the_trunks_have_torchvisions_layout_so_its_checkpoints_load_by_name():
    for net, convs in CONVS.items():
        keys = set(LPIPS(net).features.state_dict())
        assert keys == {f"{i}.{kind}" for i in convs for kind in ("weight", "bias")}, net
    with pytest.raises(ValueError, match="vgg, alex"):
        LPIPS("squeeze")


# Per trunk, each convolution of torchvision's features in order: (stride, padding, read after its ReLU, pool after)
HAND = {"alex": [(4, 2, True, (3, 2)), (1, 2, True, (3, 2)), (1, 1, True, None), (1, 1, True, None),
                 (1, 1, True, None)],
        "vgg": [(1, 1, tap, (2, 2) if tap and i < 12 else None)
                for i, tap in enumerate([False, True, False, True, False, False, True, False, False, True, False,
                                         False, True])]}


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_is_its_published_arithmetic_by_hand(tmp_path, net):
    model = LPIPS.from_files(net, *write_weights(tmp_path, net))
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    trunk = torch.load(tmp_path / lpips_file_names(net)[0])
    lins = torch.load(tmp_path / lpips_file_names(net)[1])

    def taps(images):  # the trunk's features (torchvision), read after the five ReLUs LPIPS reads
        h = (images - torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)) / torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
        out = []
        for i, (stride, padding, tap, pool) in zip(CONVS[net], HAND[net]):
            h = F.relu(F.conv2d(h, trunk[f"features.{i}.weight"], trunk[f"features.{i}.bias"], stride, padding))
            if tap:
                out.append(h)
            if pool:
                h = F.max_pool2d(h, *pool)
        return out

    expected = 0
    for i, (fx, fy) in enumerate(zip(taps(x), taps(y))):
        ux = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        uy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        expected = expected + ((ux - uy).pow(2) * lins[f"lin{i}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean((1, 2))
    d = model(x, y)
    assert d.shape == (2,) and torch.allclose(d, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(model(x, x), torch.zeros(2))
    assert not any(p.requires_grad for p in model.parameters())


def test_a_relative_weights_directory_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = resolve("sd35m-512", ["loss.method=dmd-regression", "loss.lpips_weights=lpips"])
    assert config.loss.lpips_weights == str(tmp_path / "lpips")


def test_the_weight_files_are_found_where_torchvision_and_lpips_keep_them_or_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ConfigError, match=r"loss.lpips_weights.*vgg16-397923af.pth \(not in .*torch/hub/checkpoints\)"
                                          r".*vgg.pth \(no lpips package installed\).*loss.lpips_weights=DIR"):
        lpips_files(PerceptualOptions("vgg"))
    trunk, _ = write_weights(tmp_path / "torch" / "hub" / "checkpoints")
    (tmp_path / "site" / "lpips").mkdir(parents=True)
    (tmp_path / "site" / "lpips" / "__init__.py").write_text("raise ImportError('never imported')\n")
    _, lin = write_weights(tmp_path / "site" / "lpips" / "weights" / "v0.1")
    importlib.invalidate_caches()  # the package appeared after its folder was first searched
    assert lpips_files(PerceptualOptions("alex")) == (trunk, lin)
    with pytest.raises(ConfigError, match=r"alexnet-owt-7be5be79.pth \(not in .*elsewhere\); alex.pth"):
        lpips_files(PerceptualOptions("alex", str(tmp_path / "elsewhere")))
    own = write_weights(tmp_path / "elsewhere")
    assert lpips_files(PerceptualOptions("alex", str(tmp_path / "elsewhere"))) == own


def test_the_decoded_distance_resizes_and_reaches_the_generator_sample_only(tmp_path):
    lpips = LPIPS.from_files("alex", *write_weights(tmp_path))
    decoder = torch.nn.Conv2d(4, 3, 1).requires_grad_(False)
    seen = []

    def decode(latents):  # a frozen "VAE": 4 channels at 16 px -> 3 at 128 px
        seen.append(torch.is_grad_enabled())
        return decoder(F.interpolate(latents, scale_factor=8))

    distance = DecodedLPIPS(decode, lpips, resolution=64)
    assert distance.images(torch.randn(1, 4, 16, 16)).shape == (1, 3, 64, 64)
    x, y = torch.randn(2, 4, 16, 16, requires_grad=True), torch.randn(2, 4, 16, 16, requires_grad=True)
    seen.clear()
    d = distance(x, y)
    assert seen == [False, True]  # the teacher's sample decoded without a graph
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and y.grad is None
    assert torch.allclose(distance(x.detach(), x.detach()), torch.zeros(2))


# -- on the SD3 family ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipeline")


def sd3_regression(tmp_path, teacher_path, *overrides):
    prompts = prompt_file(tmp_path / "prompts.txt", ["a photo of a red cat", "a painting of a blue house"])
    return resolve(None, ["teacher.family=sd3", f"teacher.path={teacher_path}", "teacher.num_steps=6",
                          "loss.anchor_step=2", f"trajectories.prompts={prompts}", f"evaluation.prompts={prompts}",
                          "trajectories.seeds_per_prompt=2", "distributed.batch_size_per_worker=2",
                          "generator.num_steps=2", "schedule.num_generator_updates=2", "trajectories.rows_per_shard=8",
                          "trajectories.batch_size=8", f"storage.output_dir={tmp_path / 'out'}",
                          "loss.method=dmd-regression", "loss.regression_weight=1.0", "loss.lpips_net=alex",
                          f"loss.lpips_weights={tmp_path / 'lpips'}", "loss.lpips_resolution=64", *overrides])


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_an_sd3_regression_step_measures_lpips_on_decoded_images_and_trains_the_generator_only(tmp_path,
                                                                                               teacher_path):
    write_weights(tmp_path / "lpips")
    store, _ = precompute(sd3_regression(tmp_path, teacher_path), use_ray=False, progress=False)
    batch = next(store.batches(2))
    assert batch.x_teacher.shape == (2, 16, 8, 8)  # the teacher's full samples, in the same store

    def step(weight: float):
        """One generator update from the same start, with the regression term at weight."""
        config = sd3_regression(tmp_path, teacher_path, f"loss.regression_weight={weight}")
        with distributed(False):
            adapter, teacher = load_teacher(config, vae=True, text_encoders=False)
            generator = build_engine(copy_for_training(teacher), config.generator.optim, config)
            critic = build_engine(critic_network(config, copy_for_training(teacher)), config.critic.optim, config)
            d = Distiller(config, adapter, teacher, generator, critic, torch.device("cpu"),
                          torch.Generator().manual_seed(0), store.negative())
            critic_before = _params(critic.module)
            metrics = d.generator_step(batch, "generator")
        assert _same(critic_before, _params(critic.module))  # the critic's engine never stepped
        assert all(p.grad is None for p in adapter.vae.parameters())  # nothing accumulates in the frozen VAE
        distance = adapter.regression_distance(torch.device("cpu"), config.loss.perceptual)
        assert isinstance(distance, DecodedLPIPS) and distance.lpips.net == "alex"
        return metrics, _params(generator.module)

    plain, moved_plain = step(0.0)
    metrics, moved = step(1.0)
    assert metrics["loss_reg"] > 0
    assert metrics["loss_dmd"] == pytest.approx(plain["loss_dmd"], rel=1e-6)  # the same start and batch
    assert metrics["loss_generator"] == pytest.approx(metrics["loss_dmd"] + metrics["loss_reg"], rel=1e-5)
    assert not _same(moved_plain, moved)  # the regression's gradient reached the generator through the VAE


def test_a_regression_run_without_the_lpips_weights_stops_before_any_work_naming_them(tmp_path, teacher_path,
                                                                                      monkeypatch, capsys):
    from orchestrator.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    prompts = prompt_file(tmp_path / "prompts.txt", ["a photo of a red cat"])
    code = main(["distill", "--no-ray", "teacher.family=sd3", f"teacher.path={teacher_path}", "teacher.num_steps=6",
                 "loss.anchor_step=2", f"trajectories.prompts={prompts}", f"evaluation.prompts={prompts}",
                 f"storage.output_dir={tmp_path / 'out'}", "loss.method=dmd-regression",
                 f"loss.lpips_weights={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "vgg16-397923af.pth" in err and "vgg.pth" in err and "loss.lpips_weights=DIR" in err, err
    assert not (tmp_path / "out").exists()  # no store, no run directory


def test_a_store_for_the_regression_remedy_fills_where_lpips_is_not(tmp_path, teacher_path, monkeypatch):
    """The store holds the teacher's samples, not LPIPS's distances: it may be filled on a machine without LPIPS's
    weights (the trainers need them). The preflight precompute ran for the pipeline check refused it for them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    store, _ = precompute(sd3_regression(tmp_path, teacher_path, f"loss.lpips_weights={tmp_path / 'nowhere'}"),
                          use_ray=False, progress=False)
    assert next(store.batches(2)).x_teacher.shape == (2, 16, 8, 8)
