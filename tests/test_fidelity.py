"""The fidelity table: mean and spread over training seeds, the gap recovered, the picking rule, and the
local trial runner (resume after a failure), with a real tiny run end to end."""

import json
import math

import pytest

from fake_runners import fake_trial
from helpers import TINY_DISTILL, TINY_STORE, TINY_TEACHER
from orchestrator.cli import main
from orchestrator.fidelity import check_space
from orchestrator.reports import format_fidelity
from orchestrator.results import aggregate
from orchestrator.trial_runs import run_local_trials
from workers.config import ConfigError

TEACHER = {"feature_diversity": 0.14, "attribute_spread": 0.24, "adherence": 1.0, "frechet_distance": 76.0}


def _row(weight, seed, diversity, adherence, spread=None):
    return {"params": {"loss.diversity_weight": weight, "seed": seed},
            "eval_feature_diversity": diversity, "eval_attribute_spread": diversity + 0.1 if spread is None else spread,
            "eval_adherence": adherence, "eval_frechet_distance": 100.0}


def test_settings_get_mean_spread_and_a_seed_paired_gap():
    rows = [_row(0.0, 0, 0.10, 0.99), _row(0.0, 1, 0.12, 0.97),
            _row(0.05, 0, 0.12, 0.99), _row(0.05, 1, 0.13, 0.97),
            _row(0.5, 0, 0.15, 0.80), _row(0.5, 1, 0.15, 0.82)]
    result = aggregate(rows, TEACHER, "shapes", default_weight=0.05, tolerance=0.02)
    names = [s["name"] for s in result["settings"]]
    assert names[result["dmd"]] == "DMD"
    dmd, default, strong = result["settings"]
    assert dmd["mean"]["feature_diversity"] == pytest.approx(0.11)
    assert dmd["std"]["feature_diversity"] == pytest.approx(math.sqrt(2) * 0.01)
    # each seed against DMD's same seed, over DMD's mean gap (0.14 - 0.11): 0.02 / 0.03 and 0.01 / 0.03, whose mean
    # is the gap of the means, (0.125 - 0.11) / 0.03 = 0.5; for the headline (attribute spread) and the feature
    # diversity alike
    for metric in ("attribute_spread", "feature_diversity"):
        assert default["gaps"][metric][0] == pytest.approx(0.5)
        assert default["gaps"][metric][1] == pytest.approx(math.sqrt(2) / 6)
    assert default["gap_recovered"] == default["gaps"]["attribute_spread"]
    # lambda = 0.5 is more diverse but loses 17 points of adherence: the rule picks lambda = 0.05
    assert result["settings"][result["picked"]] is default
    table = format_fidelity(result, TEACHER, "shapes")
    assert "| DP-DMD (lambda=0.05) **picked** | 2 |" in table
    assert "0.11 ± 0.014" in table
    assert "| gap recovered (attribute_spread) | gap recovered (feature_diversity) |" in table.splitlines()[0]


def test_a_dmd_seed_near_the_teacher_does_not_blow_up_the_gap():
    """Shapes, 300 updates (one H200): one DMD seed's attribute spread landed 0.005 below the teacher's, and gaps
    taken against each seed's own DMD gap gave 0.08 +- 1.1 where the means recover 0.62 of the gap."""
    rows = [_row(0.0, 0, 0.10, 0.99, spread=0.20), _row(0.0, 1, 0.10, 0.99, spread=0.239),
            _row(0.05, 0, 0.12, 0.99, spread=0.23), _row(0.05, 1, 0.12, 0.99, spread=0.235)]
    ours = aggregate(rows, TEACHER, "shapes", default_weight=0.05, tolerance=0.02)["settings"][1]
    gap, spread = ours["gap_recovered"]
    assert gap == pytest.approx((0.2325 - 0.2195) / (0.24 - 0.2195))  # the gap of the means: 0.63
    assert spread == pytest.approx(math.sqrt(2) * (0.03 + 0.004) / 2 / 0.0205)  # per seed 1.46 and -0.20


def test_the_headline_follows_attribute_spread_not_feature_diversity():
    """Broken samples raise feature diversity: a setting that 'wins' on it while losing attribute spread
    recovers nothing of the headline gap."""
    rows = [_row(0.0, s, 0.10, 0.99, spread=0.20) for s in (0, 1)] \
        + [_row(0.05, s, 0.16, 0.99, spread=0.19) for s in (0, 1)]
    result = aggregate(rows, TEACHER, "shapes", default_weight=0.05, tolerance=0.02)
    broken = result["settings"][1]
    assert broken["gaps"]["feature_diversity"][0] > 1 and broken["gap_recovered"][0] < 0


def test_with_a_looser_tolerance_the_more_diverse_setting_is_picked():
    rows = [_row(0.0, s, 0.10, 0.99) for s in (0, 1)] + [_row(0.05, s, 0.12, 0.99) for s in (0, 1)] \
        + [_row(0.5, s, 0.15, 0.80) for s in (0, 1)]
    result = aggregate(rows, TEACHER, "shapes", default_weight=0.05, tolerance=0.25)
    assert result["settings"][result["picked"]]["name"] == "DP-DMD (lambda=0.5)"


@pytest.mark.parametrize("space, message", [
    ({"loss.diversity_weight": {"grid": [0.0, 0.05]}}, "seed.*add sweep.space=fidelity"),  # the fix, named
    ({"loss.diversity_weight": {"grid": [0.0, 0.05]}, "seed": {"grid": [0]}}, "at least 2"),
    ({"loss.diversity_weight": {"grid": [0.05, 0.5]}, "seed": {"grid": [0, 1]}}, "lambda = 0"),
    ({"loss.diversity_weight": {"grid": [0.0]}, "seed": {"grid": [0, 1]}, "generator.optim.lr": {"uniform": [1e-5, 1e-4]}},
     "grid values only"),
])
def test_spaces_that_cannot_make_the_table_are_refused(space, message):
    with pytest.raises(ConfigError, match=message):
        check_space(space)


def test_a_failed_trial_loses_nothing_says_where_and_a_rerun_runs_only_the_rest(tmp_path, capsys):
    from workers.config import RunConfig
    from workers.configure import to_dict

    base = to_dict(RunConfig())
    space = {"loss.diversity_weight": {"grid": [0.0, 0.5]}, "seed": {"grid": [0, 1]}}
    with pytest.raises(RuntimeError, match="1 of 4 trials failed") as failed:
        run_local_trials(base, space, tmp_path, jobs=2, runner=fake_trial)
    assert len(list(tmp_path.glob("*/result.json"))) == 3
    # what failed and where: the message names the trial's traceback file and the console shows its last lines
    (log,) = tmp_path.glob("*/error.log")
    assert "error.log" in str(failed.value)
    full = log.read_text()
    assert 'fake_runners.py", line' in full and "in fake_trial" in full and "RuntimeError: out of memory" in full
    console = capsys.readouterr().out
    assert f"full traceback: {log}" in console and "in fake_trial" in console
    first = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/result.json")}
    rows = run_local_trials(base, space, tmp_path, jobs=2, runner=fake_trial)
    assert len(rows) == 4
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # finished trials were not rerun
    assert not list(tmp_path.glob("*/error.log"))  # the failed trial succeeded this time
    row = next(r for r in rows if r["params"] == {"loss.diversity_weight": 0.5, "seed": 1})
    assert row["eval_feature_diversity"] == pytest.approx(0.16)


def test_fidelity_command_runs_real_trials_without_ray(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("loss.diversity_weight: {grid: [0.0, 0.5]}\nseed: {grid: [0, 1]}\n")
    code = main(["fidelity", "--no-ray", "--jobs", "2", "--recipe", "toy2d", *TINY_TEACHER, *TINY_STORE, *TINY_DISTILL,
                 f"storage.output_dir={tmp_path}", f"sweep.space={space}", "evaluation.seeds_per_prompt=50"])
    assert code == 0
    out_dir = next((tmp_path / "runs").glob("*-fidelity-toy2d"))
    data = json.loads((out_dir / "fidelity.json").read_text())
    assert sorted(s["name"] for s in data["settings"]) == ["DMD", "DP-DMD (lambda=0.5)"]
    assert all(s["seeds"] == [0, 1] for s in data["settings"])
    # the seeds really differ: each trial trained with its own noise
    dmd = next(s for s in data["settings"] if s["name"] == "DMD")
    assert dmd["per_seed"]["0"]["mode_kl"] != dmd["per_seed"]["1"]["mode_kl"]
    for name in ("fidelity.md", "fidelity.png", "fidelity_samples.png", "teacher_samples.npz"):
        assert (out_dir / name).is_file(), name
    assert "| DMD | 2 |" in capsys.readouterr().out
    assert len(list((out_dir / "trials").glob("*/generator/dpdmd_generator.json"))) == 4

    # A table whose trials finished on another machine: only what the table reads came back (each trial's
    # result.json and samples.npz, the teacher's evaluation); the same command with --out writes the same table
    # and trains nothing again.
    kept = {"result.json", "samples.npz"}
    for trial in (out_dir / "trials").iterdir():
        for path in sorted(trial.rglob("*"), reverse=True):
            if path.is_dir():
                path.rmdir()
            elif path.name not in kept:
                path.unlink()
    for path in out_dir.iterdir():
        if path.is_file() and path.name not in ("teacher_metrics.json", "teacher_samples.npz"):
            path.unlink()
    code = main(["fidelity", "--no-ray", "--jobs", "2", "--recipe", "toy2d", *TINY_TEACHER, *TINY_STORE,
                 *TINY_DISTILL, f"storage.output_dir={tmp_path}", f"sweep.space={space}",
                 "evaluation.seeds_per_prompt=50", "--out", str(out_dir)])
    assert code == 0 and "4 trials, 4 already done, 0 to run" in capsys.readouterr().out
    assert json.loads((out_dir / "fidelity.json").read_text())["settings"] == data["settings"]
    assert (out_dir / "fidelity_samples.png").is_file()


def test_a_table_that_asks_for_a_gpu_is_refused_before_anything_starts_on_a_machine_without_one(tmp_path, capsys):
    """The README's GPU table commands, run on a CPU machine, made a run directory and evaluated the teacher on
    the CPU before the trials' own check could refuse them."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for gpu in (["distributed.use_gpu=true"], ["distributed.use_gpu=false", "trajectories.gpus_per_actor=1"]):
        code = main(["fidelity", "--no-ray", "--together", "5", "--jobs", "2", "--recipe", "shapes",
                     "sweep.space=methods", *gpu, f"storage.output_dir={tmp_path}"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert f"{gpu[-1].split('=')[0]}: the recipe asks for a GPU and this machine has none" in err, err
        assert "distributed.use_gpu=false trajectories.gpus_per_actor=0" in err
    assert list(tmp_path.iterdir()) == []  # no run directory, no teacher evaluated
