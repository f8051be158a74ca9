"""Evaluation beside training: generator snapshots go to an evaluator of their own (a Ray actor, or a background
process without Ray) that samples the held-out prompts and seeds and scores them, while the training loop
goes on. Each result lands in the run's MLflow run as step metrics (live_<metric> at the generator update
of the snapshot) and in <run dir>/live_eval.jsonl, and the next training report carries the newest one, so
that Tune's schedulers and stoppers can act on diversity while a trial trains.

    live = LiveEvaluation.in_process(config, run_dir)      # without Ray: a background process
    live = LiveEvaluation.ray_actor(config, run_dir, ...)  # a Ray actor (its own CPU or GPU share)
    live.submit(step, snapshot_generator(generator, config, rank))   # rank 0, every evaluation.every updates
    metrics.update(live.newest())                                    # never waits
"""

from __future__ import annotations

import json
import multiprocessing
import queue
from dataclasses import asdict
from pathlib import Path

import torch

from workers.config import RunConfig

PREFIX = "live_"
RESULTS = "live_eval.jsonl"


class Evaluator:
    """Holds one copy of the generator's network and scores snapshots of its weights: the same sampler and
    held-out prompts x seeds as the final evaluation (workers.evaluate)."""

    def __init__(self, config: dict, run_dir: str, mlflow_run: tuple[str, str] | None = None, device: str = "cpu"):
        from workers.configure import build
        from workers.evaluate import generator_sampler
        from workers.teacher import load_teacher

        self.config = build(RunConfig, config)
        self.device = torch.device(device)
        self.adapter, self.net = load_teacher(self.config, self.device, vae=True)
        self.sampler = generator_sampler(self.config, self.adapter)
        self.path = Path(run_dir) / RESULTS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.mlflow = None
        if mlflow_run is not None:
            from mlflow.tracking import MlflowClient

            self.mlflow = (MlflowClient(mlflow_run[0]), mlflow_run[1])

    def evaluate(self, step: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Score the snapshot taken at generator update step; returns {"generator_update": step, live_*: ...}."""
        from models.families import get_family
        from workers.evaluate import evaluate

        self.net.load_state_dict(state)
        metrics = evaluate(self.config, self.adapter, self.net, self.sampler, device=self.device).metrics
        family = get_family(self.config.teacher.family)
        (d_name, d_sign), (q_name, q_sign) = family.diversity, family.quality
        metrics["objective"] = d_sign * metrics[d_name] + q_sign * metrics[q_name]  # one number for schedulers
        result = {"generator_update": step, **{PREFIX + k: float(v) for k, v in metrics.items()}}
        # MLflow first, the run directory's file second: an evaluator stopped between the two (its trial stopped
        # by a guard or a scheduler) leaves the file a subset of the run's metrics, never a line MLflow lacks
        if self.mlflow is not None:
            import time

            from mlflow.entities import Metric

            client, run_id = self.mlflow
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in result.items()
                                              if k.startswith(PREFIX)])
        with self.path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        return result


def snapshot_generator(generator, config: RunConfig, rank: int) -> dict[str, torch.Tensor] | None:
    """The generator's weights on the CPU in float32, on rank 0 (None elsewhere). Every rank must call it:
    with ZeRO-3 the parameters are gathered collectively."""
    from workers.engines import import_deepspeed

    deepspeed = import_deepspeed(config.distributed.use_gpu)  # trials trained together import it here first

    params = list(generator.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=config.distributed.zero_stage == 3):
        if rank != 0:
            return None
        return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in generator.module.state_dict().items()}


class LiveEvaluation:
    """The training loop's side of evaluation beside training: submit() hands a snapshot over and returns at
    once; newest() is the most recent finished result (empty until one has finished); close() waits for the
    snapshots still being scored, after the last update."""

    def __init__(self, submit, poll, close):
        self._submit, self._poll, self._close = submit, poll, close
        self.results: list[dict] = []

    def submit(self, step: int, state: dict[str, torch.Tensor] | None) -> None:
        if state is not None:
            self._submit(step, state)

    def newest(self) -> dict[str, float]:
        """The most recent finished result as live_* metrics, with live_generator_update: the update of its
        snapshot (training has moved on since)."""
        self.results.extend(self._poll(block=False))
        if not self.results:
            return {}
        newest = dict(self.results[-1])
        return {PREFIX + "generator_update": newest.pop("generator_update"), **newest}

    def close(self) -> list[dict]:
        self.results.extend(self._close())
        return self.results

    # -- the two places an evaluator runs -------------------------------------------------------------------

    @staticmethod
    def in_process(config: RunConfig, run_dir: Path, evaluator_cls=Evaluator) -> LiveEvaluation:
        """A background process (spawned: CUDA cannot be forked) with its own Evaluator, ready (its model
        loaded) when this returns."""
        context = multiprocessing.get_context("spawn")
        todo, done = context.Queue(), context.Queue()
        process = context.Process(target=_serve, args=(evaluator_cls, asdict(config), str(run_dir), todo, done),
                                  name="dpdmd-live-eval", daemon=True)
        process.start()
        ready = done.get(timeout=600)
        if isinstance(ready, BaseException):
            raise ready
        pending = [0]

        def submit(step, state):
            pending[0] += 1
            todo.put((step, state))

        def poll(block: bool) -> list[dict]:
            out = []
            while pending[0]:
                try:
                    item = done.get(block=block, timeout=None if block else 0)
                except queue.Empty:
                    break
                pending[0] -= 1
                if isinstance(item, BaseException):
                    raise item
                out.append(item)
            return out

        def close() -> list[dict]:
            out = poll(block=True)
            todo.put(None)
            process.join(timeout=60)
            return out

        return LiveEvaluation(submit, poll, close)

    @staticmethod
    def ray_actor(actor) -> LiveEvaluation:
        """An Evaluator Ray actor (made by the driver with its own resources, e.g. ray.remote(num_cpus=...)
        (Evaluator).remote(...)), shared by reference with the training workers; ready (its model loaded) when
        this returns, as in_process's is: training that starts before it would hand its first snapshots to an
        evaluator still starting, and their scores (which the collapse guard and ASHA act on) would come late."""
        import ray

        ray.get(actor.__ray_ready__.remote())
        refs: list = []

        def submit(step, state):
            refs.append(actor.evaluate.remote(step, state))

        def poll(block: bool) -> list[dict]:
            if not refs:
                return []
            ready, rest = ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)
            refs[:] = rest
            return [ray.get(r) for r in ready]

        def close() -> list[dict]:
            out = []
            while refs:
                out += poll(block=True)
            return out

        return LiveEvaluation(submit, poll, close)


def _serve(evaluator_cls, config: dict, run_dir: str, todo, done) -> None:
    """The background process: score snapshots until told to stop (None)."""
    torch.set_num_threads(1)
    try:
        evaluator = evaluator_cls(config, run_dir)
    except BaseException as err:
        done.put(err)
        return
    done.put("ready")
    while (item := todo.get()) is not None:
        try:
            done.put(evaluator.evaluate(*item))
        except BaseException as err:  # handed to the training process at its next poll
            done.put(err)
