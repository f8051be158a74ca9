"""Where a run stands (Progress), and how it is saved into and restored from a checkpoint directory together
with each rank's random streams: with the engines' own checkpoints, everything a resume needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Progress:
    """Where the run stands; with the engines and RNG state, everything a resume needs."""

    generator_updates: int = 0  # completed generator updates (one cycle = critic updates + 1 generator update)
    critic_updates: int = 0
    cycle_position: int = 0  # critic updates done in the current cycle
    rows_consumed: int = 0  # data position: anchor rows this rank's generator updates have consumed
    prompt_rows_consumed: int = 0  # data position of the critic's prompt stream
    skipped_steps: int = 0  # steps every rank agreed to skip on a non-finite loss
    resumes: int = 0  # times the run continued from a checkpoint

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Progress:
        return cls(**json.loads(text))


def write_progress(directory: Path, progress: Progress, rng: torch.Generator, rank: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (directory / "progress.json").write_text(progress.to_json())
    torch.save({"rng": rng.get_state(), "torch": torch.get_rng_state()}, directory / f"rng_rank{rank}.pt")


def read_progress(directory: Path, rng: torch.Generator, rank: int) -> Progress:
    progress = Progress.from_json((directory / "progress.json").read_text())
    state = torch.load(directory / f"rng_rank{rank}.pt", weights_only=True)
    rng.set_state(state["rng"])
    torch.set_rng_state(state["torch"])
    return progress

