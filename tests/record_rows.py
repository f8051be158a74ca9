"""Run under torchrun by the tests: `dpdmd distill --no-ray` as one rank of torchrun runs it, recording the
(prompt_id, seed) rows its generator updates consumed, how many critic batches it drew and where its progress
ended, into LOG_DIR/rows_rank<R>.json.

    torchrun --nproc_per_node 2 tests/record_rows.py LOG_DIR key=value ...
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import workers.train  # noqa: E402
from orchestrator.cli import main as dpdmd  # noqa: E402


def recording(source, log: dict):
    def wrapped(config, ctx, progress):
        data = source(config, ctx, progress)

        def anchors(stream):
            for batch in stream:
                log["anchor_rows"] += list(zip(batch.prompt_ids.tolist(), batch.seeds.tolist()))
                yield batch

        def prompts(stream):
            for batch in stream:
                log["prompt_batches"] += 1
                yield batch
        data.anchors, data.prompts = anchors(data.anchors), prompts(data.prompts)
        return data
    return wrapped


def main(log_dir: str, *overrides: str) -> None:
    log = {"anchor_rows": [], "prompt_batches": 0}
    store_source, train = workers.train.store_source, workers.train.train

    def recorded_train(*args, **kwargs):
        progress = train(*args, **kwargs)
        log["progress"] = progress.__dict__
        return progress

    # the command's run path (orchestrator.runs.distill_here) imports both from workers.train when it runs
    workers.train.store_source = lambda store: recording(store_source(store), log)
    workers.train.train = recorded_train
    code = dpdmd(["distill", "--no-ray", "--recipe", "toy2d", *overrides])
    (Path(log_dir) / f"rows_rank{os.environ['RANK']}.json").write_text(json.dumps(log))
    sys.exit(code)


if __name__ == "__main__":
    main(*sys.argv[1:])
