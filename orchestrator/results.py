"""Aggregating trial results: the sweep's objectives, Pareto front and pick, its result and trial histories; the
fidelity table's settings, their mean and spread over training seeds and the gap they recover. Numbers in,
numbers out: reports.py writes them as tables, plots and markdown."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from models.families import get_family



def objectives(family: str, metrics: dict[str, float]) -> tuple[float, float]:
    """(diversity, quality), each signed so that higher is better."""
    found = get_family(family)
    (d, d_sign), (q, q_sign) = found.diversity, found.quality
    return d_sign * metrics[d], q_sign * metrics[q]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both objectives (both maximised), by diversity."""
    front = [i for i, (d, q) in enumerate(points)
             if not any(d2 >= d and q2 >= q and (d2, q2) != (d, q) for d2, q2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def pick(points: list[tuple[float, float]], tolerance: float) -> int:
    """The most diverse Pareto point whose quality is within tolerance of the best quality."""
    front = pareto_front(points)
    best_quality = max(points[i][1] for i in front)
    eligible = [i for i in front if points[i][1] >= best_quality - tolerance]
    return max(eligible, key=lambda i: points[i][0])




@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict] = field(default_factory=list)  # one per trial: params, metrics, objectives
    front: list[int] = field(default_factory=list)
    picked: int = -1
    teacher_metrics: dict = field(default_factory=dict)
    parent_run_id: str = ""
    stopped: list[dict] = field(default_factory=list)  # trials a scheduler or the collapse guard ended, with why
    histories: dict = field(default_factory=dict)  # Tune's trial id -> its reports over time (a DataFrame)


def trial_histories(trials) -> dict:
    """Each trial's reports over time, by Tune's trial id: under PBT a trial's config (and so its name) is the
    last one PBT gave it, and two trials that end on the same config would share a name."""
    return {(t.metrics or {}).get("trial_id", str(i)): t.metrics_dataframe for i, t in enumerate(trials)
            if t.metrics_dataframe is not None}


def live_curves(run_dir: Path) -> dict[str, list[dict]]:
    """Every live evaluation under run_dir, by trial directory: [{"generator_update": ..., "live_*": ...}]."""
    curves = {}
    for path in sorted(Path(run_dir).glob("**/live_eval.jsonl")):
        curves[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return curves


SEED_KEY = "seed"


TEACHER = "teacher"


def gap_metrics(name: str) -> list[str]:
    """The diversity metrics whose recovered share of DMD's gap to the teacher the table reports: the
    family's headline diversity first."""
    return list(get_family(name).gap_metrics)


def metric_columns(name: str) -> list[str]:
    """The columns a family's table shows: its diversity and quality metrics first."""
    return list(get_family(name).fidelity_columns)


METHOD_KEY = "loss.method"
METHOD_NAMES = {"dmd": "DMD", "dp-dmd": "DP-DMD", "dmd-regression": "DMD + regression", "dmd-gan": "DMD + GAN"}


def setting_method(params: dict, default_weight: float, default_method: str = "dp-dmd") -> str:
    """The objective a setting trains with: its loss.method (the run's, default_method, when the space leaves it
    out), where dp-dmd at lambda = 0 is plain DMD."""
    method = params.get(METHOD_KEY, default_method)
    if method == "dp-dmd" and params.get("loss.diversity_weight", default_weight) == 0:
        return "dmd"
    return method


def setting_name(params: dict, default_weight: float, default_method: str = "dp-dmd") -> str:
    """DMD, DP-DMD (default), DMD + regression, DMD + GAN, with the setting's non-default values; lambda only where
    the method uses it."""
    method = setting_method(params, default_weight, default_method)
    weight = params.get("loss.diversity_weight", default_weight)
    hidden = {METHOD_KEY, "loss.diversity_weight"}
    others = {k: v for k, v in sorted(params.items()) if k not in hidden}
    shown = [f"lambda={weight:g}"] if method == "dp-dmd" and "loss.diversity_weight" in params else []
    shown += [f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
              for k, v in others.items()]
    label = METHOD_NAMES[method]
    return f"{label} ({', '.join(shown)})" if shown else label


def is_ours(params: dict, default_weight: float, default_method: str = "dp-dmd") -> bool:
    """The recipe's DP-DMD setting: dp-dmd at the recipe's lambda, nothing else changed."""
    rest = {k: v for k, v in params.items() if not (k == METHOD_KEY and v == "dp-dmd")}
    return (rest in ({}, {"loss.diversity_weight": default_weight})
            and setting_method(params, default_weight, default_method) == "dp-dmd")


def aggregate(rows: list[dict], teacher: dict[str, float], family: str, default_weight: float,
              tolerance: float, default_method: str = "dp-dmd") -> dict:
    """Group trial rows (params incl. seed, eval_<metric> values) into settings with mean/std over seeds.

    Returns {"settings": [...], "picked": index or -1, "dmd": index}: each setting has name, params (seed
    removed), seeds, mean and std per metric, and gap_recovered: mean and std over seeds of
    (div_seed - div_DMD_seed) / (div_teacher - mean div_DMD), pairing each seed with DMD's same seed. The
    denominator is DMD's mean gap, not each seed's own: a DMD seed that lands near the teacher would otherwise
    divide by almost nothing (seen on shapes: one seed's gap of 0.005 turned a gap of the means of 0.62 into
    0.08 +- 1.1). Over paired seeds the mean is the gap of the means, as the paper reports it.
    """
    (d_name, d_sign), (q_name, q_sign) = get_family(family).diversity, get_family(family).quality
    columns = metric_columns(family)
    groups: dict[str, dict] = {}
    for row in rows:
        params = {k: v for k, v in row["params"].items() if k != SEED_KEY}
        key = json.dumps(params, sort_keys=True)
        group = groups.setdefault(key, {"params": params, "per_seed": {}, "run_dirs": {}})
        seed = row["params"].get(SEED_KEY, 0)
        group["per_seed"][seed] = {c: row[f"eval_{c}"] for c in columns}
        group["run_dirs"][seed] = row.get("run_dir")
    settings = []
    for group in groups.values():
        per_seed = group["per_seed"]
        setting = {"name": setting_name(group["params"], default_weight, default_method), "params": group["params"],
                   "method": setting_method(group["params"], default_weight, default_method),
                   "seeds": sorted(per_seed), "per_seed": per_seed, "run_dirs": group["run_dirs"],
                   "mean": {c: statistics.fmean(m[c] for m in per_seed.values()) for c in columns},
                   "std": {c: _stdev([m[c] for m in per_seed.values()])
                           for c in columns}}
        settings.append(setting)
    order = list(METHOD_NAMES)
    settings.sort(key=lambda s: (order.index(s["method"]), json.dumps(s["params"], sort_keys=True)))
    dmd = next((i for i, s in enumerate(settings) if s["method"] == "dmd"), -1)
    for setting in settings:
        setting["gaps"] = {}
        for metric in gap_metrics(family):
            if dmd < 0:
                setting["gaps"][metric] = (math.nan, math.nan)
                continue
            dmd_seeds = settings[dmd]["per_seed"]
            gap = teacher[metric] - settings[dmd]["mean"][metric]
            gaps = [(m[metric] - dmd_seeds[s][metric]) / gap if gap else math.nan
                    for s, m in setting["per_seed"].items() if s in dmd_seeds]
            setting["gaps"][metric] = (statistics.fmean(gaps) if gaps else math.nan,
                                       _stdev(gaps))
        setting["gap_recovered"] = setting["gaps"][d_name]
    picked = -1
    if dmd >= 0:
        floor = q_sign * settings[dmd]["mean"][q_name] - tolerance
        eligible = [i for i, s in enumerate(settings) if i != dmd and q_sign * s["mean"][q_name] >= floor]
        picked = max(eligible, key=lambda i: d_sign * settings[i]["mean"][d_name], default=-1)
    return {"settings": settings, "dmd": dmd, "picked": picked}


def _stdev(values: list[float]) -> float:
    """The sample standard deviation; 0 for one value, NaN where a value is NaN (no adherent samples, say)."""
    if len(values) < 2:
        return 0.0
    return math.nan if any(math.isnan(v) for v in values) else statistics.stdev(values)
