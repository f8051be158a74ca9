"""Search spaces keyed by dotted config paths; the Pareto front and the picking rule on known points."""

from pathlib import Path

import pytest

from orchestrator.results import pareto_front, pick
from orchestrator.spaces import SPACE_DIR, grid_points, load_space, trial_config, trial_name, trial_title
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


@pytest.mark.parametrize("text, message", [
    ("loss.diversity_weight: {loguniform: [0.0, 1.0]}", "loguniform needs low > 0"),  # Ray's text, naming no key
    ("loss.anchor_step: {uniform: [5, 20]}", "takes whole numbers; use randint"),  # every trial failed, 248 lines
    ("loss.diversity_weight: {uniform: [0.5, 0.1]}", "low < high"),
    ("loss.diversity_weight: {randint: [0, 3]}", "loss.diversity_weight takes float"),
    ("loss.diversity_weight: {uniform: [-1, 0.1]}", "must be >= 0"),  # an end the key refuses
    ("generator.shift: {randint: [1, 3]}", "generator.shift takes float | None"),  # a union's name: was a crash
    ("loss.anchor_step: {randint: [1, 32]}", "K = 31 must not exceed"),  # the last value randint draws
])
def test_a_range_that_cannot_be_drawn_is_refused_naming_its_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_space(_space(tmp_path, text + "\n"))
    assert err.value.key == text.split(":")[0]


def test_a_range_is_checked_on_what_tune_draws_from_it(tmp_path):
    """randint leaves its high end out (K = 1..30 of 30 teacher steps), and a continuous range never draws its
    high end (a key open there, 0 <= x < 1): both were refused on that end."""
    assert load_space(_space(tmp_path, "loss.anchor_step: {randint: [1, 31]}\n"
                                       "sweep.collapse_fraction: {uniform: [0, 1]}\n"))


def test_range_ends_are_numbers_as_tune_draws_them(tmp_path):
    space = load_space(_space(tmp_path, "critic.optim.lr: {loguniform: [1e-5, 1e-3]}\n"
                                        "loss.anchor_step: {randint: [5, 21]}\n"))
    assert space == {"critic.optim.lr": {"loguniform": [1e-5, 1e-3]}, "loss.anchor_step": {"randint": [5, 21]}}


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

    from orchestrator.results import trial_histories

    same = {"loss.diversity_weight": 0.5, "seed": 0}
    trials = [SimpleNamespace(config=same, metrics={"trial_id": tid}, metrics_dataframe=pd.DataFrame({"x": [tid]}))
              for tid in ("a1", "b2")] + [SimpleNamespace(config=same, metrics=None, metrics_dataframe=None)]
    histories = trial_histories(trials)
    assert sorted(histories) == ["a1", "b2"] and histories["b2"]["x"].tolist() == ["b2"]


def test_trials_and_runs_are_named_so_that_people_can_compare_them():
    """MLflow named standalone runs by their time only and trials that Optuna sampled by every digit of a float."""
    from orchestrator.runs import run_title

    params = {"seed": 1, "loss.anchor_step": 5, "loss.diversity_weight": 0.0512345678}
    assert trial_title(params) == "lambda=0.0512 K=5 seed=1"
    assert trial_title({"loss.diversity_weight": 0.0, "generator.optim.lr": 1e-4}) == "lambda=0 lr=0.0001"
    assert trial_title({}) == "trial"
    # directories keep six digits: two sampled trials must not share one
    assert trial_name(params) != trial_name({**params, "loss.diversity_weight": 0.0512399})
    assert run_title(Path("/x/runs/20261205-065233-distill-toy2d")) == "distill-toy2d-20261205-065233"
    assert run_title(Path("/x/runs/20261205-065233-distill-sd35m-512")) == "distill-sd35m-512-20261205-065233"
    assert run_title(Path("/x/sweep/diversity_weight=0.5")) == "diversity_weight=0.5"


def test_the_pick_says_why_in_one_sentence_and_a_planted_better_trial_is_picked():
    """A toy2d sweep picked DMD though a DP-DMD trial had the better mode KL, and nothing said why."""
    from orchestrator.reports import sweep_table
    from orchestrator.results import SweepResult, objectives
    from models.families import get_family

    (d_name, _), (q_name, _) = get_family("toy2d").diversity, get_family("toy2d").quality

    def row(weight, diversity, quality):  # toy2d: mode KL and off-mode rate, both lower is better
        metrics = {d_name: diversity, q_name: quality}
        d, q = objectives("toy2d", metrics)
        return {"params": {"loss.diversity_weight": weight}, "diversity": d, "quality": q,
                **{f"eval_{k}": v for k, v in metrics.items()}}

    # DP-DMD (0.5) has the better mode KL, DMD the better off-mode rate by more than the tolerance: DMD is picked,
    # and the sentence says that lambda=0.5 was not eligible
    rows = [row(0.0, 0.20, 0.050), row(0.5, 0.14, 0.060), row(0.2, 0.25, 0.070)]
    planted = row(0.05, 0.10, 0.040)  # better than every other trial on both
    for candidates, expect in ((rows, 0.0), ([*rows, planted], 0.05)):
        result = SweepResult(Path("."), rows=candidates)
        points = [(r["diversity"], r["quality"]) for r in candidates]
        result.front, result.picked = pareto_front(points), pick(points, 0.005)
        sentence = sweep_table(result, "toy2d", 0.005).splitlines()[-1]
        assert candidates[result.picked]["params"]["loss.diversity_weight"] == expect
        assert sentence.startswith(f"Picked lambda={expect:g}: of the {len(result.front)} trials"), sentence
        assert "sweep.quality_drop_from_best = 0.005" in sentence and d_name in sentence and q_name in sentence
    assert result.front == [3]
    assert "lambda=0.5 has the better mode_kl (0.14) but its off_mode_rate (0.06) is outside the tolerance" in sweep_table(SweepResult(Path("."), rows=rows, front=[1, 0],
                                                                            picked=0), "toy2d", 0.005)


def test_a_sweep_its_searcher_or_scheduler_refuses_stops_before_any_work(tmp_path, capsys):
    """sweep.search=optuna over the default space's grids was refused only after the stores were computed, a run
    directory made and an MLflow run marked failed (about 40 s on toy2d); PBT's refusals came as late."""
    from orchestrator.cli import main

    seeds_only = tmp_path / "seeds.yaml"
    seeds_only.write_text("seed: {grid: [0, 1]}\n")
    out = tmp_path / "out"
    for settings, says in ((["sweep.search=optuna", "sweep.space=fidelity"], "sweep.search: optuna draws every trial"),
                           (["sweep.scheduler=pbt", f"sweep.space={seeds_only}"], "sweep.scheduler: pbt perturbs")):
        code = main(["sweep", "--recipe", "toy2d", *settings, f"storage.output_dir={out}"])
        err = capsys.readouterr().err
        assert code == 2 and says in err and "Traceback" not in err, err
    assert not out.exists()  # no store, no run directory, no MLflow database
