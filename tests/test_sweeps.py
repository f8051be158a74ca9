"""Sweeps on a local Ray cluster (toy2d, one trajectory store for all): a two-trial sweep's runs nested in MLflow,
Optuna's multi-objective search yielding a Pareto front, and sweeps that watch diversity while they train: a
collapsing trial is stopped by the guard with its reason recorded and its live evaluations in MLflow as curves,
and PBT perturbs lambda and continues from checkpoints."""

import json
import re

import pytest

from helpers import mlflow_server, tiny_config
from orchestrator.sweep import run_sweep
from workers.config import ConfigError
from workers.configure import to_dict
from workers.tracking import tracking_uri

SHARED = ["distributed.cpus_per_worker=0.5", "evaluation.seeds_per_prompt=20"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The teacher, and a store big enough for every sweep here (the longest runs 40 updates), made in this
    process: the actor pool's precompute has tests of its own (test_ray.py)."""
    from orchestrator.precompute import precompute

    path = tmp_path_factory.mktemp("sweeps")
    precompute(tiny_config(path, *SHARED, "schedule.num_generator_updates=40"), use_ray=False, progress=False)
    return path


def _rest(uri: str, endpoint: str, body: dict | None = None) -> dict:
    """One call of MLflow's REST API (what its UI reads): GET with a query, or POST with a JSON body."""
    import urllib.request

    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if body is None:
        return json.loads(urllib.request.urlopen(url, timeout=30).read())
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def test_a_two_trial_sweep_nests_its_runs_in_mlflow_and_an_optuna_search_yields_a_pareto_front(ray_cluster, out,
                                                                                                 tmp_path):
    """Also: what the MLflow UI shows of a sweep, read through a tracking server's REST API: the parent run, its
    nested trials named by their settings, their params, metrics and artifacts."""
    server, uri = mlflow_server(tmp_path)
    try:
        _two_sweeps(out, uri)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _two_sweeps(out, uri):
    from mlflow.tracking import MlflowClient

    config = tiny_config(out, *SHARED, "sweep.space=lambda", "tracking.experiment=sweep-test",
                         f"tracking.tracking_uri={uri}")
    result = run_sweep(config, to_dict(config))
    assert sorted(r["params"]["loss.diversity_weight"] for r in result.rows) == [0.0, 0.5]
    assert result.front and 0 <= result.picked < 2
    assert (result.sweep_dir / "pareto.png").stat().st_size > 1000
    assert "sweep.quality_drop_from_best" in (result.sweep_dir / "sweep.md").read_text()  # why it picked what it did
    client = MlflowClient(tracking_uri(config))
    children = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 2
    assert sorted(c.info.run_name for c in children) == ["lambda=0", "lambda=0.5"]  # their settings
    assert re.fullmatch(r"sweep-toy2d-\d{8}-\d{6}", client.get_run(result.parent_run_id).info.run_name)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["loss.diversity_weight"] in ("0.0", "0.5")
        assert {"loss_dmd", "eval_mode_kl", "eval_off_mode_rate"} <= child.data.metrics.keys()
        assert {"config.yaml", "generator", "samples.png"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
    parent_artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"sweep.md", "pareto.png"} <= parent_artifacts
    parent_metrics = client.get_run(result.parent_run_id).data.metrics
    assert parent_metrics and all(k.startswith(("picked_eval_", "picked_diversity", "picked_quality"))
                                  for k in parent_metrics)  # the objectives, none of Tune's bookkeeping

    # the same, as the UI reads it over HTTP
    experiment = _rest(uri, "experiments/get-by-name?experiment_name=sweep-test")["experiment"]["experiment_id"]
    parent = _rest(uri, f"runs/get?run_id={result.parent_run_id}")["run"]
    assert parent["info"]["status"] == "FINISHED" and parent["info"]["run_name"].startswith("sweep-toy2d-")
    assert {m["key"] for m in parent["data"]["metrics"]} == set(parent_metrics)
    found = _rest(uri, "runs/search", {"experiment_ids": [experiment],
                                       "filter": f"tags.mlflow.parentRunId = '{result.parent_run_id}'"})["runs"]
    assert sorted(r["info"]["run_name"] for r in found) == ["lambda=0", "lambda=0.5"]
    for run in found:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["loss.diversity_weight"] in ("0.0", "0.5") and params["teacher.family"] == "toy2d"
        history = _rest(uri, f"metrics/get-history?run_id={run['info']['run_id']}&metric_key=loss_dmd")["metrics"]
        assert [m["step"] for m in history] == list(range(1, 5))  # every log_every (1) update
        listed = _rest(uri, f"artifacts/list?run_id={run['info']['run_id']}")["files"]
        assert {"config.yaml", "generator", "samples.png"} <= {f["path"] for f in listed}
        inside = _rest(uri, f"artifacts/list?run_id={run['info']['run_id']}&path=generator")["files"]
        assert "generator/dpdmd_generator.json" in {f["path"] for f in inside}

    # A second sweep in the same output directory and MLflow experiment trains its own trials: nothing of the first
    # one (which trained 4 updates) is picked up. It is Optuna's multi-objective search, which yields a Pareto front
    # (one sweep for two properties; each was a sweep of its own).
    optuna = tiny_config(out, *SHARED, "schedule.num_generator_updates=2", "sweep.search=optuna",
                         "sweep.num_samples=2", "tracking.experiment=sweep-test", f"tracking.tracking_uri={uri}")
    again = run_sweep(optuna, to_dict(optuna), space={"loss.diversity_weight": {"uniform": [0.0, 1.0]}})
    assert again.sweep_dir != result.sweep_dir
    assert [r["generator_update"] for r in again.rows] == [2, 2]
    assert len(again.rows) == 2 and again.front
    assert len({r["params"]["loss.diversity_weight"] for r in again.rows}) == 2
    sampled = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id],
                                 f"tags.mlflow.parentRunId = '{again.parent_run_id}'")
    for child in sampled:  # a sampled lambda reads with three significant digits, not all of a float's
        value = child.info.run_name.removeprefix("lambda=")
        assert value == f"{float(value):.3g}" and len(value) <= 8, child.info.run_name
    with pytest.raises(ConfigError, match="sweep.search"):  # Optuna draws every trial: a grid is refused
        run_sweep(optuna, to_dict(optuna), space={"loss.diversity_weight": {"grid": [0.0, 1.0]}})


def test_the_collapse_guard_stops_a_collapsing_trial_and_says_why(ray_cluster, out):
    """Also: training reports reach Tune while the trial runs, ASHA on the live objective accepts the reports
    made before the first evaluation, and the evaluations land in MLflow as step metrics."""
    from mlflow.tracking import MlflowClient

    config = tiny_config(out, *SHARED, "schedule.num_generator_updates=40", "evaluation.every=4",
                         "schedule.log_every=1", "schedule.on_nonfinite=skip", "sweep.collapse_fraction=0.5",
                         "sweep.collapse_patience=2", "tracking.experiment=guard-test",
                         # ASHA on the live objective: reports before the first evaluation carry NaN for it
                         "sweep.scheduler=asha", "sweep.metric=live_objective", "sweep.mode=max")
    # a learning rate that wrecks the generator within a few updates
    result = run_sweep(config, to_dict(config), space={"generator.optim.lr": {"grid": [0.5]}, "seed": {"grid": [0]}})
    (stopped,) = result.stopped
    # training reports reached Tune while the trial ran (the guard and ASHA act on nothing else)
    reported = [json.loads(line) for path in (result.sweep_dir / "tune").glob("*/result.json")
                for line in path.read_text().splitlines()]
    assert len(reported) >= 4 and all("loss_dmd" in r for r in reported)
    assert stopped["reason"].startswith("collapse guard: live live_modes below")
    assert stopped["generator_update"] < 40
    run = json.loads((result.sweep_dir / "lr=0.5-seed=0" / "mlflow.json").read_text())["run_id"]
    run = MlflowClient(tracking_uri(config)).get_run(run)
    assert run.info.status == "KILLED" and run.data.tags["dpdmd.stop_reason"] == stopped["reason"]
    # the evaluations beside training: step metrics in the trial's MLflow run and lines in live_eval.jsonl
    curve = MlflowClient(tracking_uri(config)).get_metric_history(run.info.run_id, "live_live_modes")
    steps = [m.step for m in curve]
    assert len(steps) >= 2 and all(step % 4 == 0 for step in steps)
    lines = (result.sweep_dir / "lr=0.5-seed=0" / "live_eval.jsonl").read_text().splitlines()
    in_file = sorted(json.loads(line)["generator_update"] for line in lines)
    # the stop may cut the evaluation it interrupted after its MLflow metrics, before its line (once: 4, 8, 12, 16
    # in the file against 4, 8, 12 in MLflow, when the file came first); every line is in MLflow, at most one not
    assert set(in_file) <= set(steps) and len(steps) - len(in_file) <= 1 and len(in_file) >= 2, (in_file, steps)
    assert (result.sweep_dir / "curves.png").stat().st_size > 1000


def test_pbt_perturbs_lambda_and_continues_from_checkpoints(ray_cluster, out, capsys):
    config = tiny_config(out, *SHARED, "schedule.num_generator_updates=8", "schedule.checkpoint_every=4",
                         "schedule.log_every=4", "sweep.scheduler=pbt", "sweep.metric=loss_generator",
                         "tracking.experiment=pbt-test")
    result = run_sweep(config, to_dict(config), space={"loss.diversity_weight": {"grid": [0.0, 0.5]}})
    assert len(result.rows) == 2 and all(r["generator_update"] == 8 for r in result.rows)
    # Synchronous PBT with two trials: at every interval the worse one takes over the better one's checkpoint
    # with lambda perturbed from the better one's (from the grid's values, so it may land on its own old one).
    # Tune's own record of each exploit: [.., .., from trial, to trial, .., .., old config, new config]
    exploits = [json.loads(line) for line in (result.sweep_dir / "tune" / "pbt_global.txt").read_text().splitlines()]
    assert exploits and all("loss.diversity_weight" in e[-1] for e in exploits)
    assert any(r["resumes"] >= 1 for r in result.rows)  # and continued from that checkpoint
    assert len(result.histories) == 2  # one per trial, whatever config PBT left each with
    for name, history in result.histories.items():  # each trial's reports carry the lambda it trained with
        assert set(history["loss.diversity_weight"].dropna()) <= {0.0, 0.5}, name
    assert (result.sweep_dir / "pbt.png").stat().st_size > 1000
    # the closing lines say where the report and pictures are, as distill's do (a sweep printed its table alone)
    closing = capsys.readouterr().out.strip().splitlines()[-6:]
    assert closing[0].startswith("[sweep] done in ") and "report:" in closing[2] and "sweep.md" in closing[2]
    assert any("PBT:" in line for line in closing) and "mlflow ui --backend-store-uri" in closing[-1]
