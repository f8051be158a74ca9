"""Shared test settings: a tiny toy2d teacher that trains in about a second."""

from pathlib import Path

from orchestrator.recipe import resolve
from workers.teacher import embedded_teacher_dir, train_teacher

TINY_TEACHER = ["teacher.train.steps=150", "teacher.train.width=64", "teacher.train.batch_size=256",
                "teacher.train.lr=3e-3"]
TINY_STORE = ["trajectories.seeds_per_prompt=16", "trajectories.rows_per_shard=16", "trajectories.batch_size=8"]
TINY_DISTILL = ["schedule.num_generator_updates=4", "schedule.critic_updates_per_generator=2",
                "schedule.checkpoint_every=2", "schedule.log_every=1", "distributed.batch_size_per_worker=8",
                "generator.optim.lr=1e-3", "critic.optim.lr=1e-3"]


def tiny_config(out: Path, *overrides: str):
    """A resolved toy2d config under out whose tiny teacher exists (trained once per out directory)."""
    config = resolve("toy2d", [*TINY_TEACHER, *TINY_STORE, *TINY_DISTILL, f"storage.output_dir={out}", *overrides])
    if not embedded_teacher_dir(config).is_dir():
        train_teacher(config, progress=False)
    return config
