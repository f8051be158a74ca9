"""Trial runners for the fidelity tests' process pools: this module imports nothing heavy, so that the spawned
processes start in a moment."""

from pathlib import Path


def fake_group(config_dicts, run_dirs, threads, deadline):
    """A group runner: trial seed 1 is 'stopped at the time limit' the first time, the others finish."""
    out = []
    for config, run_dir in zip(config_dicts, run_dirs):
        marker = Path(run_dir).parent / f"stopped-{Path(run_dir).name}"
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        if config["seed"] == 1 and not marker.exists():
            marker.touch()
            out.append(None)
        else:
            out.append({"attribute_spread": 0.2 + config["loss"]["diversity_weight"] / 10 + config["seed"] / 100})
    return out


def fake_trial(config_dict, run_dir, threads):
    """Stands in for a distillation (a test about the runner): fails once for seed 1, lambda 0.5."""
    marker = Path(run_dir).parent / "failed-once"
    if config_dict["seed"] == 1 and config_dict["loss"]["diversity_weight"] == 0.5 and not marker.exists():
        marker.touch()
        raise RuntimeError("out of memory")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return {"feature_diversity": 0.1 + config_dict["loss"]["diversity_weight"] / 10 + config_dict["seed"] / 100}
