"""What a training worker needs from whoever runs it: rank, reporting, checkpoints and the finite-loss vote.

LocalContext serves a single process or torchrun; workers/ray_worker.py gives the Ray Train one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch


LOGGED = ("loss_dmd", "loss_div", "loss_critic", "samples_per_s", "skipped_steps")
CHECKPOINTS = "checkpoints"  # a run directory's checkpoint folder, under Ray Train and without it


def checkpoint_name(generator_updates: int) -> str:
    return f"step-{generator_updates:07d}"


def device_for(use_gpu: bool) -> torch.device:
    """Where one process computes: the GPU when asked for and there is one, else the CPU (a command's own
    sampling and scoring, trials trained together; a rank of a run uses WorkerContext.device)."""
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def clock(seconds: float) -> str:
    """1:02:03 / 2:03 for a duration in seconds."""
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class WorkerContext:
    """Base: a world of one, reports to stdout, no checkpoints to resume from."""

    rank: int = 0
    world_size: int = 1

    def device(self, use_gpu: bool) -> torch.device:
        """This rank's device: its local GPU, or the CPU."""
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_gpu else torch.device("cpu")

    def all_finite(self, flag: torch.Tensor) -> bool:
        """True only if every rank's flag is True: one small all-reduce, the loop's only host sync."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            flag = flag.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag)

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        raise NotImplementedError

    def log(self, metrics: dict, total: int, elapsed_s: float, eta_s: float) -> None:
        """One progress line from rank 0: where the run stands, elapsed time, time left, the losses."""
        if self.rank == 0:
            step = metrics["generator_update"]
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in LOGGED if k in metrics)
            print(f"[distill] generator update {step}/{total} ({100 * step / total:.0f}%), {clock(elapsed_s)} "
                  f"elapsed, {clock(eta_s)} left | {shown}", flush=True)

    def latest_checkpoint(self) -> Path | None:
        return None

    def checkpoint_staging_dir(self, name: str) -> Path:
        """Where this rank writes a checkpoint before report() hands it over."""
        raise NotImplementedError


class LocalContext(WorkerContext):
    """A single process or one torchrun rank; checkpoints live under run_dir/checkpoints/<name>/, the newest
    `keep` of them (as a Ray Train run keeps its own: a real teacher's checkpoint is gigabytes)."""

    def __init__(self, run_dir: Path, resume: bool = True, keep: int = 2):
        self.keep = keep
        self.run_dir = Path(run_dir)
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.resume = resume
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        if checkpoint_dir is not None:
            if self.world_size > 1:
                torch.distributed.barrier()  # every rank's shards are written
            if self.rank == 0:
                (self.run_dir / CHECKPOINTS / "latest").write_text(checkpoint_dir.name)
                older = sorted(p for p in (self.run_dir / CHECKPOINTS).iterdir()
                               if p.is_dir() and p.name < checkpoint_dir.name)
                for path in older[:max(0, len(older) - (self.keep - 1))]:
                    shutil.rmtree(path, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        marker = self.run_dir / CHECKPOINTS / "latest"
        if not self.resume or not marker.is_file():
            return None
        return self.run_dir / CHECKPOINTS / marker.read_text().strip()

    def checkpoint_staging_dir(self, name: str) -> Path:
        path = self.run_dir / CHECKPOINTS / name
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)
        if self.world_size > 1:
            torch.distributed.barrier()
        path.mkdir(parents=True, exist_ok=True)
        return path
