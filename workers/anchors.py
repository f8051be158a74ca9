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
from workers.distill import AnchorBatch


def row_ids(rows: torch.Tensor, num_prompts: int, seed_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_id, seed) of training rows: prompts interleave (row r has prompt r mod P), so every slice of
    rows mixes prompts, and seeds are unique across the set (seed_offset + r), so no two rows share noise."""
    return rows % num_prompts, seed_offset + rows


def training_rows(config: RunConfig, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (prompt_id, seed) row of the training set, in store order."""
    rows = torch.arange(len(prompts) * config.trajectories.seeds_per_prompt)
    return row_ids(rows, len(prompts), config.trajectories.seed_offset)


@torch.no_grad()
def compute_anchors(config: RunConfig, adapter: TeacherAdapter, teacher: nn.Module, prompts: list[str],
                    prompt_ids: torch.Tensor, seeds: torch.Tensor, device="cpu",
                    dtype=torch.float32) -> AnchorBatch:
    """K guided teacher ODE steps from each row's seeded noise. prompts: the prompt of each row.
    Epsilon-prediction teachers also get the teacher's x0 estimate at z_K, their diversity target."""
    t = config.teacher
    eps = seeded_noise(seeds.tolist(), adapter.latent_shape).to(device, dtype)
    cond = adapter.encode_prompts(prompts).to(device, dtype)
    uncond = adapter.negative_conditioning(len(prompts)).to(device, dtype)
    sigmas = adapter.sampling_sigmas(t.num_steps, t.shift, "teacher").to(device)
    anchor = teacher_anchor(adapter.velocity_fn(teacher, cond, uncond, t.guidance_scale),
                            adapter.initial_state(eps, sigmas, "teacher"), sigmas, config.loss.anchor_step,
                            x0_estimate=adapter.prediction_type == "epsilon")
    t_anchor = anchor.t.to(dtype).expand(len(prompts)).clone()
    return AnchorBatch(eps, anchor.z, t_anchor, cond, prompt_ids.clone(), seeds.clone(), anchor.x0)


class InlineAnchors:
    """Anchors computed at each step with the teacher, as the reference script does (for comparison and
    benchmarking). Rows are drawn in a seeded random order from the training rows of this rank."""

    def __init__(self, config: RunConfig, adapter: TeacherAdapter, teacher: nn.Module, prompts: list[str],
                 rank: int, world_size: int, device="cpu", dtype=torch.float32):
        self.config, self.adapter, self.teacher, self.prompts = config, adapter, teacher, prompts
        self.device, self.dtype = device, dtype
        prompt_ids, seeds = training_rows(config, prompts)
        self.prompt_ids, self.seeds = prompt_ids[rank::world_size], seeds[rank::world_size]
        self.rank = rank

    def batches(self, batch_size: int, start_row: int = 0) -> Iterator[AnchorBatch]:
        n = len(self.seeds)
        row = start_row
        while True:
            epoch, offset = divmod(row, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))
            index = order[offset:offset + batch_size]
            if len(index) < batch_size:  # wrap into the next epoch's order
                nxt = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch + 1))
                index = torch.cat([index, nxt[: batch_size - len(index)]])
            row += batch_size
            ids = self.prompt_ids[index]
            yield compute_anchors(self.config, self.adapter, self.teacher, [self.prompts[i] for i in ids], ids,
                                  self.seeds[index], self.device, self.dtype)
