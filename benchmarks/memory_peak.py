"""Where in a cycle the GPU memory peaks: the peak of allocated memory in each part of the cycle.

The training loop names its parts for the profiler (workers/distill.py, workers/train.py: `record_function` with
the "dpdmd/" prefix). For one cycle, RegionPeaks wraps those calls: entering a part it reads the peak since the
last reading (charged to the part that just ended, or to "between parts") and resets the allocator's peak; so
each part's figure is the most memory allocated at any moment inside it. Backward and the optimizer step are
shared by both engines and named after the loss they follow (critic or generator).

The allocator's own history recorder (torch.cuda.memory._record_memory_history) would say which code allocated
what, but in torch 2.11 it crashes the backward of compiled blocks under activation checkpointing (SystemError
from autograd's Function.apply, pytorch/pytorch#179536), so the benchmark reads peaks, not stacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

GIB = 2**30
PREFIX = "dpdmd/"  # workers.distill.REGION
BETWEEN = "between parts"
LOSSES = {"critic loss": "critic", "generator rollout": "generator", "teacher and critic scores": "generator"}
SHARED = ("backward", "optimizer step")


class RegionPeaks:
    """Peak allocated bytes per part of the cycle while installed (install() ... close()). peak_gib: the peak
    over all parts; by_part_gib: each part's peak; run_peak: the run's peak up to the last reading, since the
    readings reset the allocator's; allocated/max_allocated/reset_peak: the allocator's readings (torch.cuda's
    for device by default)."""

    def __init__(self, device=None, allocated: Callable[[], int] | None = None,
                 max_allocated: Callable[[], int] | None = None, reset_peak: Callable[[], None] | None = None,
                 reserved: Callable[[], int] | None = None, snapshot: Callable[[], list[dict]] | None = None):
        if allocated is None:
            import torch

            allocated = lambda: torch.cuda.memory_allocated(device)  # noqa: E731
            max_allocated = lambda: torch.cuda.max_memory_allocated(device)  # noqa: E731
            reset_peak = lambda: torch.cuda.reset_peak_memory_stats(device)  # noqa: E731
            reserved = lambda: torch.cuda.memory_reserved(device)  # noqa: E731
            index = torch.device(device or "cuda").index
            index = torch.cuda.current_device() if index is None else index
            snapshot = lambda: [s for s in torch.cuda.memory_snapshot() if s["device"] == index]  # noqa: E731
        self.allocated, self.max_allocated, self.reset_peak = allocated, max_allocated, reset_peak
        self.reserved = reserved or (lambda: 0)
        self.by_part: dict[str, int] = {}
        self.start = self.allocated()
        self.held = held_blocks(snapshot()) if snapshot else {}  # what the cycle starts from, block by block
        self.before = self.max_allocated()  # the run's peak so far, which the first reset would lose
        self.overall = 0  # the recorded stretch's peak
        self._loss = ""
        self._undo: list[Callable[[], None]] = []
        self.reset_peak()

    @property
    def run_peak(self) -> int:
        """The run's peak up to the last reading: what the allocator's own peak no longer holds."""
        return max(self.before, self.overall)

    def _read(self, part: str) -> None:
        peak = self.max_allocated()
        self.overall = max(self.overall, peak)
        self.by_part[part] = max(self.by_part.get(part, 0), peak)
        self.reset_peak()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        short = name.split("/", 1)[-1]
        self._loss = LOSSES.get(short, self._loss)
        label = f"{short} ({self._loss})" if short in SHARED and self._loss else short
        self._read(BETWEEN)
        try:
            yield
        finally:
            self._read(label)

    def install(self, modules) -> None:
        """Wrap each module's record_function (the name the loop calls) while recording."""
        for module in modules:
            original = module.record_function

            def wrapped(name, *args, _original=original, **kwargs):
                if not name.startswith(PREFIX):
                    return _original(name, *args, **kwargs)
                stack = contextlib.ExitStack()
                stack.enter_context(_original(name, *args, **kwargs))
                stack.enter_context(self.part(name))
                return stack

            module.record_function = wrapped
            self._undo.append(lambda m=module, o=original: setattr(m, "record_function", o))

    def close(self) -> dict:
        for undo in self._undo:
            undo()
        self._undo.clear()
        self._read(BETWEEN)
        return {"start_gib": self.start / GIB, "peak_gib": self.overall / GIB, "reserved_gib": self.reserved() / GIB,
                "by_part_gib": {k: v / GIB for k, v in sorted(self.by_part.items(), key=lambda kv: -kv[1])},
                "held_blocks": self.held}


def held_blocks(snapshot: list[dict], top: int = 10) -> dict:
    """The allocator's allocated blocks (torch.cuda.memory_snapshot(): segments of blocks, no history needed) by
    size: the top sizes by the memory they hold, with their count, and what the other sizes hold. Weights, fp32
    master weights and optimizer moments come in sizes of their own (the engines' parameter groups, the
    parameters), so the sizes say what is held without a recorder."""
    by_size: dict[int, int] = {}
    for segment in snapshot:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                by_size[block["size"]] = by_size.get(block["size"], 0) + 1
    ranked = sorted(by_size.items(), key=lambda kv: -kv[0] * kv[1])
    return {"total_gib": sum(s * n for s, n in ranked) / GIB,
            "top": [{"mib": s / 2**20, "count": n, "gib": s * n / GIB} for s, n in ranked[:top]],
            "other_gib": sum(s * n for s, n in ranked[top:]) / GIB, "other_sizes": len(ranked[top:])}
