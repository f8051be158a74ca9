"""What a training rank reads: anchor batches for generator updates and prompt batches for critic updates.

Generator updates consume anchor rows, and within a run each row is used once (fresh noise for every
update); critic updates draw their own noise and need only the prompts' conditioning, so they consume none.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from models.adapter import Conditioning


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """tensor on device. A copy from host memory to a GPU goes through pinned memory, which makes it asynchronous;
    a tensor on a GPU already (rows the store's read-ahead put there) cannot be pinned and needs no copy."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclass
class AnchorBatch:
    """One generator batch: noise eps (B, ...), the teacher's anchor z (B, ...) at t_anchor (B,), the
    prompt conditioning, and the rows' ids (prompt_id, seed). x0_anchor (B, ...): the teacher's guided x0
    estimate at z, for epsilon-prediction teachers only (their diversity target). x_teacher (B, ...): the
    teacher's full sample from eps, for the baselines that read it (loss.method dmd-regression, dmd-gan). The
    tensors of states are float32, whatever precision the networks train in."""

    eps: torch.Tensor
    z: torch.Tensor
    t_anchor: torch.Tensor
    cond: Conditioning
    prompt_ids: torch.Tensor
    seeds: torch.Tensor
    x0_anchor: torch.Tensor | None = None
    x_teacher: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> AnchorBatch:
        """The same batch on device; dtypes are kept (the networks cast their inputs themselves)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.eps, self.z, self.t_anchor, self.prompt_ids, self.seeds, self.x0_anchor,
                            self.x_teacher, *self.cond.tensors.values()) if t is not None]

    def pin_memory(self) -> AnchorBatch:
        return self._map(torch.Tensor.pin_memory)

    @staticmethod
    def cat(batches: list[AnchorBatch]) -> AnchorBatch:
        """The batches' rows one after another (trials trained together: trial-major)."""
        def joined(name):
            values = [getattr(b, name) for b in batches]
            return None if values[0] is None else torch.cat(values)

        return AnchorBatch(joined("eps"), joined("z"), joined("t_anchor"), Conditioning.cat([b.cond for b in batches]),
                           joined("prompt_ids"), joined("seeds"), joined("x0_anchor"), joined("x_teacher"))

    def _map(self, fn) -> AnchorBatch:
        return AnchorBatch(fn(self.eps), fn(self.z), fn(self.t_anchor),
                           Conditioning({k: fn(t) for k, t in self.cond.tensors.items()}), fn(self.prompt_ids),
                           fn(self.seeds), None if self.x0_anchor is None else fn(self.x0_anchor),
                           None if self.x_teacher is None else fn(self.x_teacher))


@dataclass
class PromptBatch:
    """One critic batch: the prompts' conditioning and their ids; the critic draws its own noise. x_teacher:
    the teacher's samples of the same rows (the dmd-gan baseline's real data), when the run reads them."""

    cond: Conditioning
    prompt_ids: torch.Tensor
    x_teacher: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> PromptBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.prompt_ids, self.x_teacher, *self.cond.tensors.values()) if t is not None]

    def pin_memory(self) -> PromptBatch:
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> PromptBatch:
        return PromptBatch(Conditioning({k: fn(t) for k, t in self.cond.tensors.items()}), fn(self.prompt_ids),
                           None if self.x_teacher is None else fn(self.x_teacher))


class AnchorsExhausted(RuntimeError):
    """A rank's anchor rows ran out mid-run: the store was smaller than the run needs."""


@dataclass
class TrainingData:
    """A rank's two streams, positioned where the run stands (resume starts mid-stream)."""

    anchors: Iterator[AnchorBatch]  # one batch per generator update; no row twice within a run
    prompts: Iterator[PromptBatch]  # endless; one batch per critic update
    rows_available: int | None = None  # anchor rows this rank can draw from (None: unbounded, computed inline)

    def next_anchors(self, where: str) -> AnchorBatch:
        try:
            return next(self.anchors)
        except StopIteration:
            raise AnchorsExhausted(f"no anchor rows left for {where}: the trajectory store holds "
                                   f"{self.rows_available} rows for this rank; run `dpdmd precompute` with the "
                                   "run's recipe and overrides to extend it") from None
