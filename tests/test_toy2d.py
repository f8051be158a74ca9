"""The toy2d family: a tiny teacher that really trains, and the commands that use it."""

import json

import numpy as np
import pytest
import torch

from models.families import toy2d
from orchestrator import cli
from orchestrator.recipe import resolve
from workers.teacher import embedded_teacher_dir, load_teacher, train_teacher

TINY = ["teacher.train.steps=150", "teacher.train.width=64", "teacher.train.batch_size=256", "teacher.train.lr=3e-3",
        "evaluation.seeds_per_prompt=50"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    overrides = TINY + [f"storage.output_dir={out}"]
    config = resolve("toy2d", overrides)
    train_teacher(config, progress=False)
    return config, overrides


def test_tiny_teacher_loss_falls(tiny):
    config, _ = tiny
    log = json.loads((embedded_teacher_dir(config) / "training_log.json").read_text())
    losses = log["losses"]
    assert len(losses) == 150
    assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:15])


def test_teacher_round_trips_through_save_and_load(tiny):
    config, _ = tiny
    adapter, net = load_teacher(config)
    assert not any(p.requires_grad for p in net.parameters())
    x, t = torch.randn(4, 2), torch.rand(4)
    cond = adapter.encode_prompts(["class 0", "class 3", "", "class 1"])
    again_adapter, again = toy2d.load_teacher(embedded_teacher_dir(config))
    torch.testing.assert_close(adapter.velocity(net, x, t, cond), again_adapter.velocity(again, x, t, cond))


def test_teacher_directory_depends_on_training_settings(tmp_path):
    a = resolve("toy2d", [f"storage.output_dir={tmp_path}"])
    b = resolve("toy2d", [f"storage.output_dir={tmp_path}", "teacher.train.steps=10"])
    c = resolve("toy2d", [f"storage.output_dir={tmp_path}", "loss.diversity_weight=0.0"])
    assert embedded_teacher_dir(a) != embedded_teacher_dir(b)
    assert embedded_teacher_dir(a) == embedded_teacher_dir(c)


def test_missing_teacher_names_the_fix(tmp_path):
    config = resolve("toy2d", [f"storage.output_dir={tmp_path}", "teacher.train.seed=7"])  # no shipped teacher
    with pytest.raises(FileNotFoundError, match="dpdmd train-teacher"):
        load_teacher(config)


def test_the_recipe_uses_the_shipped_teacher_and_other_settings_train_their_own(tmp_path):
    from workers.teacher import teacher_dir

    assert teacher_dir(resolve("toy2d", [f"storage.output_dir={tmp_path}"])) == toy2d.FAMILY.shipped_teacher
    assert teacher_dir(resolve("toy2d", [f"storage.output_dir={tmp_path}", "teacher.train.width=64"])) != \
        toy2d.FAMILY.shipped_teacher


def test_bad_prompt_names_the_valid_ones():
    with pytest.raises(ValueError, match="'class 0' .. 'class 3'"):
        toy2d.Toy2DAdapter().encode_prompts(["a cat"])


def test_sample_command_writes_grid_and_arrays(tiny, tmp_path, capsys):
    _, overrides = tiny
    out = tmp_path / "samples"
    assert cli.main(["sample", "--recipe", "toy2d", "--prompt", "class 1", "--prompt", "class 2",
                     "--seeds", "0-4", "--out", str(out), *overrides]) == 0
    arrays = np.load(out / "samples.npz")
    assert arrays["sample"].shape == (10, 2)
    assert list(arrays["prompt"]) == ["class 1"] * 5 + ["class 2"] * 5
    assert list(arrays["seed"]) == [0, 1, 2, 3, 4] * 2
    assert (out / "samples.png").stat().st_size > 1000
    # the same (prompt, seed) gives the same sample whatever else is in the batch
    again = tmp_path / "again"
    cli.main(["sample", "--prompt", "class 2", "--seeds", "3", "--out", str(again), *overrides])
    np.testing.assert_allclose(np.load(again / "samples.npz")["sample"][0], arrays["sample"][8], atol=1e-5)


def test_evaluate_command_saves_metrics_and_config(tiny, capsys):
    config, overrides = tiny
    assert cli.main(["evaluate", *overrides]) == 0
    out = capsys.readouterr().out
    assert "| teacher |" in out and "coverage" in out
    run = sorted((embedded_teacher_dir(config).parents[1] / "runs").glob("*-evaluate-*"))[-1]
    metrics = json.loads((run / "metrics.json").read_text())["teacher"]
    assert set(metrics) >= {"coverage", "mode_kl", "off_mode_rate", "pairwise_distance", "energy_distance"}
    assert resolve(run / "config.yaml") == config


def test_bad_seed_list_is_a_config_error(tiny, capsys):
    _, overrides = tiny
    assert cli.main(["sample", "--seeds", "a-b", *overrides]) == 2
    assert "0-8" in capsys.readouterr().err


@pytest.mark.slow
def test_default_teacher_keeps_every_mode(tmp_path):
    """The recipe's teacher (about a minute to train): 30-step CFG sampling keeps all 20 modes."""
    from workers.evaluate import evaluate, teacher_sampler

    config = resolve("toy2d", [f"storage.output_dir={tmp_path}", "evaluation.seeds_per_prompt=1000"])
    train_teacher(config, progress=False)
    adapter, net = load_teacher(config)
    metrics = evaluate(config, adapter, net, teacher_sampler(config, adapter)).metrics
    assert metrics["live_modes"] == 20
    assert metrics["off_mode_rate"] < 0.02
