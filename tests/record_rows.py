"""Run under torchrun by the tests: one rank of a distillation over a precomputed store, recording the
(prompt_id, seed) rows its generator updates consumed and how many critic batches it drew, into
<run_dir>/rows_rank<R>.json.

    torchrun --nproc_per_node 2 tests/record_rows.py RUN_DIR key=value ...
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.precompute import precompute  # noqa: E402
from orchestrator.recipe import resolve  # noqa: E402
from workers.context import LocalContext  # noqa: E402
from workers.train import store_source, train  # noqa: E402


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


def main(run_dir: str, *overrides: str) -> None:
    config = resolve("toy2d", list(overrides))
    store, _ = precompute(config, use_ray=False, progress=False)  # complete already: opened, not written
    ctx = LocalContext(Path(run_dir), resume=False)
    log = {"anchor_rows": [], "prompt_batches": 0}
    progress = train(config, ctx, recording(store_source(store), log), store.negative())
    log["progress"] = progress.__dict__
    (Path(run_dir) / f"rows_rank{ctx.rank}.json").write_text(json.dumps(log))


if __name__ == "__main__":
    main(*sys.argv[1:])
