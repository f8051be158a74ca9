"""Connecting to Ray: an existing cluster (RAY_ADDRESS, or inside `ray job submit`) or a local one."""

from __future__ import annotations

import json
import logging
import os

# set by `ray job submit` in its entrypoint's environment: the job's config, its runtime environment included
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

VERBOSE = False  # `dpdmd --verbose`: Ray's, its workers' and the libraries' log lines on the console too


def worker_env() -> dict[str, str]:
    """What every Ray worker process of a run gets in its environment: passive OpenMP waiting (see
    BENCHMARKS.md), no hub lookups, training reports every 0.2 s instead of 2 s, and, unless verbose, no
    library chatter (diffusers' and transformers' warnings, MLflow's information lines, Python warnings)."""
    env = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not VERBOSE:
        quiet = {"DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error", "MLFLOW_LOGGING_LEVEL": "WARNING",
                 "PYTHONWARNINGS": "ignore"}
        env.update({k: os.environ.get(k, v) for k, v in quiet.items()})  # a user's own setting wins
    return env


def ensure_ray(object_store_gb: float = 1.0) -> None:
    """ray.init once: join the cluster named by RAY_ADDRESS if set (as `ray job submit` sets it), else start a
    small local one. Unless VERBOSE, Ray's own log lines below ERROR stay in its log files; the project's
    progress lines (printed by the workers) still reach the console."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # ours are enough
    if ray.is_initialized():
        return
    level = logging.INFO if VERBOSE else logging.ERROR
    logging.getLogger("ray.data").setLevel(level)  # Ray Data's execution plans, in this (the driver's) process
    ours = {"env_vars": worker_env(), "worker_process_setup_hook": "orchestrator.cluster.pin_cluster_address"}
    options = dict(runtime_env=beside_the_job(ours), log_to_driver=True, logging_level=level,
                   logging_config=ray.LoggingConfig(log_level=logging.getLevelName(level)))
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**options)
    else:  # "local": a new cluster of our own, never one that another `ray start` on this machine left behind
        # A sweep starts several processes per trial (its driver, Ray Train's controller and workers): more than
        # the one-per-core the raylet starts at a time and warns about. Ray also starts one idle worker per core
        # for the first driver, but those have no runtime environment and ours sets one, so none of them would
        # ever run our tasks: on a 2-core machine that was two useless processes, on a 64-core one sixty-four.
        # Without a dashboard nothing reads Ray's metrics, which every process of the cluster would still record
        # and export (an idle cluster: 1.9 -> 1.2 CPU-seconds a minute on the 2-core machine).
        try:
            ray.init(address="local", include_dashboard=False, object_store_memory=int(object_store_gb * 2**30),
                     configure_logging=True, **options,
                     _system_config={"worker_maximum_startup_concurrency": 16, "prestart_worker_first_driver": False,
                                     "enable_metrics_collection": False})
        except Exception as err:  # Ray raises a bare Exception when its processes start too slowly
            if "timed out during startup" not in str(err):
                raise
            raise ClusterStartError("the local Ray cluster did not start in time (a busy machine starts its processes "
                                    "slowly); run the command again, or start a cluster with `ray start --head` and "
                                    "set RAY_ADDRESS=auto") from None


class ClusterStartError(RuntimeError):
    """Ray's local cluster did not come up: a transient failure, told in one line (exit 1), not a traceback."""


def beside_the_job(ours: dict, job_config_json: str | None = None) -> dict:
    """Our runtime environment for ray.init, without what the submitted job's own sets (inside `ray job submit`,
    whose runtime environment Ray merges with ray.init's and refuses on any shared key, an environment variable
    such as HF_HUB_OFFLINE included): the job's values win, ours fill in the rest. job_config_json: the job's
    config as Ray hands it to the driver (read from the environment by default)."""
    raw = job_config_json if job_config_json is not None else os.environ.get(JOB_CONFIG_ENV)
    job = (json.loads(raw).get("runtime_env") or {}) if raw else {}
    merged = {k: v for k, v in ours.items() if k != "env_vars" and k not in job}
    env_vars = {k: v for k, v in ours.get("env_vars", {}).items() if k not in (job.get("env_vars") or {})}
    return {**merged, **({"env_vars": env_vars} if env_vars else {})}


def as_a_job(command: str) -> str:
    """command (`dpdmd ...`) as the user runs it here: inside `ray job submit`, a job with this interpreter (the
    command as given otherwise)."""
    if not os.environ.get(JOB_CONFIG_ENV):
        return command
    import sys

    return (f"ray job submit --address <your dashboard address> --working-dir . -- {sys.executable} -m orchestrator "
            + command.removeprefix("dpdmd "))


def pin_cluster_address() -> None:
    """Every Ray worker process of a run starts here (the runtime environment's setup hook): it names its own
    cluster in RAY_ADDRESS. Ray Train's placement-group cleaner asks Ray's state API about its controller with
    no address, which looks for the one Ray on this machine and raises once there are two (two dpdmd commands
    side by side, or a `ray start` head beside a local run): its monitor thread then dies with a traceback on the
    console and stops watching the run's placement group."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def trials_that_fit(resources: dict, trial_cpus: float, worker_cpus: float, workers_gpus: float) -> int:
    """How many sweep trials can run at once: each needs its own CPU share plus its Ray Train workers'. Tune
    sees only the trial's own share, and a trial it starts whose workers cannot get theirs waits and times
    out, so the sweep caps the concurrency itself."""
    fit = int(resources.get("CPU", 0) // (trial_cpus + worker_cpus)) if trial_cpus + worker_cpus else 1 << 30
    if workers_gpus:
        fit = min(fit, int(resources.get("GPU", 0) // workers_gpus))
    return max(1, fit)
