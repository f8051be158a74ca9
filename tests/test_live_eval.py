"""Evaluation beside training: snapshots are scored by an evaluator of their own while the loop goes on, the
scores are those of the generator at that update, and they ride along in the training reports."""

import json
import time

import torch

from helpers import tiny_config
from orchestrator.precompute import precompute
from workers.context import LocalContext
from workers.evaluate import evaluate, generator_sampler, load_generator
from workers.live_eval import Evaluator, LiveEvaluation
from workers.train import GENERATOR_DIR, store_source, train

SLEEP_S = 2.0


class SlowEvaluator(Evaluator):
    """Takes SLEEP_S longer than a real evaluation, and notes when it worked on each snapshot."""

    def evaluate(self, step, state):
        started = time.time()
        time.sleep(SLEEP_S)
        result = super().evaluate(step, state)
        with (self.path.parent / "timing.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "started": started, "ended": time.time()}) + "\n")
        return result


def test_training_goes_on_while_a_snapshot_is_scored(tmp_path):
    config = tiny_config(tmp_path, "schedule.num_generator_updates=100", "evaluation.every=20",
                         "evaluation.seeds_per_prompt=20", "schedule.checkpoint_every=0", "schedule.log_every=100")
    store, _ = precompute(config, use_ray=False, progress=False)
    run_dir = tmp_path / "run"
    cycles: list[tuple[int, float]] = []
    live = LiveEvaluation.in_process(config, run_dir, SlowEvaluator)
    train(config, LocalContext(run_dir, resume=False), store_source(store), store.negative(),
          on_cycle=lambda progress, metrics: cycles.append((progress.generator_updates, time.time())), live=live)
    steps = list(range(20, 101, 20))
    timing = {t["step"]: t for t in map(json.loads, (run_dir / "timing.jsonl").read_text().splitlines())}
    assert sorted(timing) == steps
    # while snapshots were being scored the loop went on with later updates, and it ended long before the
    # evaluator had scored them all (5 snapshots x SLEEP_S)
    overlapping = [(step, t) for t in timing.values() for step, at in cycles if t["started"] < at < t["ended"]]
    assert overlapping and all(step > t["step"] for step, t in overlapping), (timing, cycles[-1])
    assert timing[100]["ended"] - cycles[-1][1] > SLEEP_S
    results = [json.loads(line) for line in (run_dir / "live_eval.jsonl").read_text().splitlines()]
    assert [r["generator_update"] for r in results] == steps
    assert [r["generator_update"] for r in live.results] == steps


def test_live_scores_are_the_generators_and_ride_along_in_the_reports(tmp_path):
    config = tiny_config(tmp_path, "schedule.num_generator_updates=60", "evaluation.every=4", "schedule.log_every=4",
                         "evaluation.seeds_per_prompt=20", "schedule.checkpoint_every=0")
    store, _ = precompute(config, use_ray=False, progress=False)
    run_dir = tmp_path / "run"
    train(config, LocalContext(run_dir, resume=False), store_source(store), store.negative(),
          live=LiveEvaluation.in_process(config, run_dir))
    results = [json.loads(line) for line in (run_dir / "live_eval.jsonl").read_text().splitlines()]
    assert [r["generator_update"] for r in results] == list(range(4, 61, 4))
    # the score of the last snapshot is the exported generator's, to the last digit
    adapter, net, sampler = load_generator(run_dir / "checkpoints" / "step-0000060" / GENERATOR_DIR)
    final = evaluate(config, adapter, net, sampler).metrics
    assert results[-1]["live_mode_kl"] == final["mode_kl"] and results[-1]["live_live_modes"] == final["live_modes"]
    assert torch.equal(sampler.sigmas, generator_sampler(config, adapter).sigmas)
    # reports made while training carry the newest finished score, which lags behind training
    reports = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    carried = [r for r in reports if "live_mode_kl" in r]
    assert carried and all(r["live_generator_update"] <= r["generator_update"] for r in carried)
