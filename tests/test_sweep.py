"""Search spaces keyed by dotted config paths; the Pareto front and the picking rule on known points."""

from pathlib import Path

import pytest

from orchestrator.sweep import SPACE_DIR, grid_points, load_space, pareto_front, pick, trial_config
from workers.config import ConfigError, RunConfig
from workers.configure import to_dict


@pytest.mark.parametrize("name", sorted(p.stem for p in SPACE_DIR.glob("*.yaml")))
def test_every_shipped_space_resolves(name):
    space = load_space(name)
    assert space
    for point in grid_points(space):
        trial_config(to_dict(RunConfig()), point)


def test_default_space_covers_plain_dmd_and_k():
    space = load_space("default")
    assert 0.0 in space["loss.diversity_weight"]["grid"]
    assert "loss.anchor_step" in space


def _space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_space(_space(tmp_path, "loss.lambda: {grid: [0, 1]}\n"))
    assert info.value.key == "loss.lambda"


def test_bad_kind_and_bad_values_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="grid"):
        load_space(_space(tmp_path, "loss.diversity_weight: {range: [0, 1]}\n"))
    with pytest.raises(ConfigError, match=r"\[low, high\]"):
        load_space(_space(tmp_path, "loss.diversity_weight: {uniform: [0, 1, 2]}\n"))
    with pytest.raises(ConfigError) as info:
        load_space(_space(tmp_path, "loss.diversity_weight: {grid: [0.1, -1]}\n"))
    assert info.value.key == "loss.diversity_weight"


def test_missing_space_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="default"):
        load_space("nope")


def test_grid_points_cross_the_grids(tmp_path):
    space = load_space(_space(tmp_path, "loss.diversity_weight: {grid: [0, 0.5]}\nloss.anchor_step: {grid: [5, 10]}\n"
                                        "generator.optim.lr: {loguniform: [1.0e-5, 1.0e-3]}\n"))
    points = grid_points(space)
    assert len(points) == 4 and {"loss.diversity_weight": 0.5, "loss.anchor_step": 10} in points


def test_pareto_front_on_known_points():
    points = [(0.1, 0.9), (0.2, 0.8), (0.15, 0.7), (0.3, 0.5), (0.05, 0.95), (0.3, 0.4)]
    # (0.15, 0.7) is beaten by (0.2, 0.8); (0.3, 0.4) by (0.3, 0.5)
    assert pareto_front(points) == [4, 0, 1, 3]


def test_pick_is_the_most_diverse_within_the_quality_tolerance():
    points = [(0.1, 0.9), (0.2, 0.88), (0.3, 0.5), (0.05, 0.95)]
    assert pick(points, tolerance=0.0) == 3
    assert pick(points, tolerance=0.05) == 0
    assert pick(points, tolerance=0.07) == 1
    assert pick(points, tolerance=1.0) == 2


def test_pbt_trials_that_end_on_the_same_config_keep_a_history_each():
    # Under PBT both trials may end with the lambda of the better one: keyed by trial name (their final config),
    # one history replaced the other.
    from types import SimpleNamespace

    import pandas as pd

    from orchestrator.sweep import trial_histories

    same = {"loss.diversity_weight": 0.5, "seed": 0}
    trials = [SimpleNamespace(config=same, metrics={"trial_id": tid}, metrics_dataframe=pd.DataFrame({"x": [tid]}))
              for tid in ("a1", "b2")] + [SimpleNamespace(config=same, metrics=None, metrics_dataframe=None)]
    histories = trial_histories(trials)
    assert sorted(histories) == ["a1", "b2"] and histories["b2"]["x"].tolist() == ["b2"]
