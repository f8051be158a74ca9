"""MLflow for every run: the driver opens the run and logs params and artifacts; rank 0 of the workers logs
step metrics into the same run. Other ranks get a stand-in that does nothing, so the loop never asks.

Credentials never pass through here: MLflow reads them from its own environment variables.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from workers.config import RunConfig
from workers.configure import flatten, to_dict


def tracking_uri(config: RunConfig) -> str:
    """The configured URI, or a sqlite file in the output folder."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    return f"sqlite:///{(Path(config.storage.output_dir) / 'mlflow.db').resolve()}"


def experiment_id(config: RunConfig) -> str:
    """The experiment's id, created with its artifacts beside the sqlite file if it does not exist."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(config))
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if not config.tracking.tracking_uri:
        location = (Path(config.storage.output_dir) / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(config.tracking.experiment, artifact_location=location)


class MetricLogger:
    """Step metrics into an existing MLflow run (rank 0 only; see null_logger)."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id
        self.pending = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def close(self) -> None:
        """Wait for the metrics still in flight: a worker that exits first would lose them."""
        for operation in self.pending:
            operation.wait()
        self.pending.clear()


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def metric_logger(uri: str | None, run_id: str | None, rank: int):
    return MetricLogger(uri, run_id) if rank == 0 and uri and run_id else NullLogger()


def config_params(config: RunConfig) -> dict[str, str]:
    """The config as MLflow params: {'loss.anchor_step': '5', ...}."""
    return {k: str(v) for k, v in flatten(to_dict(config)).items()}


class TrackedRun:
    """An open MLflow run on the driver side."""

    def __init__(self, client, run_id: str, uri: str):
        self.client, self.run_id, self.uri = client, run_id, uri

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(prefix + k, float(v), now, step or 0)
                                                    for k, v in metrics.items() if isinstance(v, (int, float))])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)


STOP_REASON = "dpdmd.stop_reason"  # tag: why a sweep stopped this run early


@contextmanager
def mlflow_run(config: RunConfig, run_name: str, kind: str, parent_run_id: str | None = None,
               run_id: str | None = None, on_open=None):
    """Open a run with the flattened config as params (or reopen run_id, to continue it); it ends FINISHED,
    KILLED on Ctrl-C, or FAILED on an exception. on_open(tracked) runs once the run exists."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(config)
    client = MlflowClient(uri)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
    else:
        tags = {"dpdmd.kind": kind}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = client.create_run(experiment_id(config), run_name=run_name, tags=tags).info.run_id
        params = [Param(k, v) for k, v in config_params(config).items()]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start:start + 100])
    tracked = TrackedRun(client, run_id, uri)
    if on_open is not None:
        on_open(tracked)
    try:
        yield tracked
    except (KeyboardInterrupt, SystemExit):
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        # a sweep that stopped this trial on purpose (its collapse guard, a scheduler) tags it before or after
        # the trial's teardown reaches here: stopped, not failed
        stopped = STOP_REASON in client.get_run(run_id).data.tags
        client.set_terminated(run_id, "KILLED" if stopped else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
