"""What checking a trajectory shard at its first read costs: sha256 alone, the whole first read (fetch, hash,
parse, finite values: Store.check_shard) and a later read (Parquet only), on a shard of SD3.5-shaped rows
(16 x 64 x 64 float32 eps and z, 333 x 4096 bf16 prompt embeddings, 2048 pooled), written to a local dir.

    python -m benchmarks.store_check --out /tmp/store-check
"""

from __future__ import annotations

import argparse
import hashlib
import time

import pyarrow.parquet as pq
import torch

from models.adapter import Conditioning
from workers.batches import AnchorBatch
from workers.schema import batch_to_table
from workers.store import Store, filesystem, write_shard
from workers.config import RunConfig


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    n = args.rows
    cond = Conditioning({"prompt_embeds": torch.randn(n, 333, 4096).bfloat16(),
                         "pooled_prompt_embeds": torch.randn(n, 2048).bfloat16()})
    batch = AnchorBatch(torch.randn(n, 16, 64, 64), torch.randn(n, 16, 64, 64), torch.full((n,), 0.9), cond,
                        torch.arange(n), torch.arange(n))
    fs, root = filesystem(RunConfig(), args.out)
    info = write_shard(fs, root, 0, batch_to_table(batch, ["a prompt"] * n)[0])
    store = Store(fs, root, {"shards": [info.to_json()], "columns": {}, "num_rows": n})
    shard = store.shards[0]
    data = fs.cat_file(store.shard_path(shard))
    mb = len(data) / 1e6

    sha = best_of(args.repeats, lambda: hashlib.sha256(data).hexdigest())
    first = best_of(args.repeats, lambda: store.check_shard(shard))
    later = best_of(args.repeats, lambda: pq.read_table(store.shard_path(shard), filesystem=fs))
    extra = (first - later) / mb  # seconds per MB the check adds to a read that happens anyway
    print(f"shard: {n} rows, {mb:.1f} MB")
    print(f"sha256 alone: {mb / sha:.0f} MB/s ({sha * 1e3:.0f} ms)")
    print(f"first read, checked: {first * 1e3:.0f} ms; later read (Parquet only): {later * 1e3:.0f} ms; "
          f"the check adds {extra * 1e3:.1f} s per GB")
    for gb in (3, 400):
        print(f"a {gb} GB store: sha256 alone {gb * 1e3 * sha / mb:.0f} s; the checks at first reads add "
              f"{gb * 1e3 * extra:.0f} s in all (split over the ranks, once per process)")

if __name__ == "__main__":
    main()
