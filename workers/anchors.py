"""Teacher anchors: (eps, z_K) pairs for (prompt, seed) rows. They depend only on the prompt, the seed and
the teacher's settings, never on the generator, so they are computed once (precompute actors) or, in the
reference script's structure, inline at every generator step."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from models.adapter import TeacherAdapter
from models.rollout import teacher_anchor
from models.sampling import seeded_noise
from workers.config import RunConfig
from workers.batches import AnchorBatch, PromptBatch


def row_ids(rows: torch.Tensor, num_prompts: int, seed_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_id, seed) of training rows: prompts interleave (row r has prompt r mod P), so every slice of
    rows mixes prompts, and seeds are unique across the set (seed_offset + r), so no two rows share noise."""
    return rows % num_prompts, seed_offset + rows


@torch.no_grad()
def compute_anchors(config: RunConfig, adapter: TeacherAdapter, teacher: nn.Module, prompts: list[str],
                    prompt_ids: torch.Tensor, seeds: torch.Tensor, device="cpu") -> AnchorBatch:
    """K guided teacher ODE steps from each row's seeded noise. prompts: the prompt of each row.

    The ODE state, the times and the Euler steps are float32; the teacher network runs in its own dtype
    inside each step. Adapters that ask for it (anchor_x0) also get the teacher's x0 estimate at z_K, their
    diversity target; methods that read it (loss.teacher_samples) the teacher's full sample from the same eps."""
    t = config.teacher
    eps = seeded_noise(seeds.tolist(), adapter.latent_shape).to(device)
    cond = adapter.encode_prompts(prompts).to(device)
    uncond = adapter.negative_conditioning(len(prompts)).to(device)
    sigmas = adapter.sampling_sigmas(t.num_steps, t.shift, "teacher").to(device)
    anchor = teacher_anchor(adapter.velocity_fn(teacher, cond, uncond, t.guidance_scale),
                            adapter.initial_state(eps, sigmas, "teacher"), sigmas, config.loss.anchor_step,
                            x0_estimate=adapter.anchor_x0, full_sample=config.loss.teacher_samples)
    t_anchor = anchor.t.float().expand(len(prompts)).clone()
    return AnchorBatch(eps, anchor.z, t_anchor, cond, prompt_ids.clone(), seeds.clone(), anchor.x0, anchor.sample)


class InlineAnchors:
    """Anchors computed at each generator update with the teacher, as the reference script does (for
    comparison and benchmarking). Every batch takes new rows: rank k of W takes rows k, k + W, k + 2W, ...
    (row_ids numbering), so no noise is drawn twice in a run; critic batches are the prompts of rows
    drawn in a seeded random order, encoded on the spot."""

    def __init__(self, config: RunConfig, adapter: TeacherAdapter, teacher: nn.Module, prompts: list[str],
                 rank: int, world_size: int, device="cpu"):
        self.config, self.adapter, self.teacher, self.prompts = config, adapter, teacher, prompts
        self.rank, self.world_size, self.device = rank, world_size, device

    def batches(self, batch_size: int, start_row: int = 0) -> Iterator[AnchorBatch]:
        row = start_row
        while True:
            rows = self.rank + self.world_size * torch.arange(row, row + batch_size)
            ids, seeds = row_ids(rows, len(self.prompts), self.config.trajectories.seed_offset)
            row += batch_size
            yield compute_anchors(self.config, self.adapter, self.teacher, [self.prompts[i] for i in ids], ids,
                                  seeds, self.device)

    def prompt_batches(self, batch_size: int, start_row: int = 0) -> Iterator[PromptBatch]:
        row = start_row
        while True:
            draw = torch.Generator().manual_seed(self.config.seed * 7919 + self.rank * 104_729 + row)
            ids = torch.randint(0, len(self.prompts), (batch_size,), generator=draw)
            row += batch_size
            cond = self.adapter.encode_prompts([self.prompts[i] for i in ids]).to(self.device)
            yield PromptBatch(cond, ids)
