"""FLOPs of one DP-DMD cycle: each kind of network pass counted once on the meta device (shapes only: nothing is
computed or allocated, so counting never touches the memory or the time of a measured cycle), times the passes
a cycle makes. `python -m benchmarks.gpu_cycle --smoke` checks the sum against whole cycles counted on the CPU.

Counting convention: torch.utils.flop_counter (matrix products, convolutions, attention; elementwise work is
free), with attention in its plain form (two products forward, four backward) whatever kernel runs it. Model
FLOPs are those of the passes themselves; hardware FLOPs add the forward passes that activation checkpointing
runs again during backward (not the recomputation inside a fused attention kernel's own backward); checkpointing
that keeps attention outputs (gradient_checkpointing "attention") runs the forward again without its attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.adapter import Conditioning, TeacherAdapter

MODES = ("reference", "inline", "ours")


@contextlib.contextmanager
def plain_attention():
    """Attention as two matrix products (the math kernel), so that it is counted the same way on any device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def count(fn: Callable[[], object]) -> int:
    """FLOPs of fn() (backward passes it runs included), attention counted in its plain form."""
    with plain_attention(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_attention(fn: Callable[[], object]) -> int:
    """The attention FLOPs of fn(): in the plain form its two products are the only batched matrix products
    (aten.bmm) of the transformers counted here, when their weights are trainable (their linear layers are then
    addmm and mm)."""
    with plain_attention(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0)


@dataclass
class PassFlops:
    """FLOPs of single network passes. forward[n]: a no-grad pass over n rows. train[(n, input_grad, ckpt)]:
    forward and backward over n rows, with the input requiring gradient or not (the first layer's input gradient),
    with activation checkpointing (its recomputed forward counted) or without. text[n]: encoding n prompts.
    attention[n]: the attention part of a forward pass over n rows."""

    forward: dict[int, int] = field(default_factory=dict)
    train: dict[tuple[int, bool, bool], int] = field(default_factory=dict)
    text: dict[int, int] = field(default_factory=dict)
    attention: dict[int, int] = field(default_factory=dict)

    def train_flops(self, n: int, input_grad: bool, checkpointing: bool | str) -> int:
        """train[...], where checkpointing "attention" recomputes the forward without its attention."""
        if checkpointing == "attention":
            return self.train[(n, input_grad, True)] - self.attention[n]
        return self.train[(n, input_grad, bool(checkpointing))]

    def to_json(self) -> dict:
        return {"forward": {str(k): v for k, v in self.forward.items()},
                "train": {f"{n},{int(g)},{int(c)}": v for (n, g, c), v in self.train.items()},
                "text": {str(k): v for k, v in self.text.items()},
                "attention": {str(k): v for k, v in self.attention.items()}}

    @classmethod
    def from_json(cls, data: dict) -> PassFlops:
        def key(text: str) -> tuple[int, bool, bool]:
            n, g, c = (int(x) for x in text.split(","))
            return n, bool(g), bool(c)
        return cls({int(k): v for k, v in data["forward"].items()}, {key(k): v for k, v in data["train"].items()},
                   {int(k): v for k, v in data.get("text", {}).items()},
                   {int(k): v for k, v in data.get("attention", {}).items()})


def network_passes(adapter: TeacherAdapter, build: Callable[[], nn.Module], cond_shapes: dict[str, tuple[int, ...]],
                   forward_batches: set[int], train_batch: int, dtype: torch.dtype,
                   device: torch.device | str = "meta") -> PassFlops:
    """Count the passes a cycle makes on one network built by build() (teacher, generator and critic share the
    architecture) on device ("meta": shapes only), through adapter.velocity as the training loop calls it."""
    with torch.device(device):
        net = build()
    net = net.to(device, dtype)
    flops = PassFlops()

    def inputs(n: int, input_grad: bool = False):
        x = torch.randn(n, *adapter.latent_shape, device=device, requires_grad=input_grad)
        cond = Conditioning({k: torch.randn(n, *shape, device=device) for k, shape in cond_shapes.items()})
        return x, torch.rand(n, device=device), cond

    net.eval().requires_grad_(False)
    for n in sorted(forward_batches):
        x, t, cond = inputs(n)
        with torch.no_grad():
            flops.forward[n] = count(lambda: adapter.velocity(net, x, t, cond))
    net.train().requires_grad_(True)
    # With frozen weights some linear layers over a sliced input run as batched products too (matmul does not fold
    # them), so the attention part is read with trainable weights, as in the passes it is taken from.
    x, t, cond = inputs(train_batch)
    with torch.no_grad():
        flops.attention[train_batch] = count_attention(lambda: adapter.velocity(net, x, t, cond))
    for checkpointing in (False, True):
        if checkpointing:
            net.enable_gradient_checkpointing()
        for input_grad in (False, True):
            x, t, cond = inputs(train_batch, input_grad)
            flops.train[(train_batch, input_grad, checkpointing)] = count(
                lambda: adapter.velocity(net, x, t, cond).float().pow(2).mean().backward())
    return flops


@dataclass(frozen=True)
class CycleShape:
    """What one cycle runs: critic updates C, rows per update B, generator steps N, anchor steps K, whether the
    diversity loss is on (lambda > 0) and the first generator step detached, and whether the anchor rollout also
    takes the teacher's x0 estimate at the anchor (epsilon teachers' diversity target: one more guided pass)."""

    critic_updates: int
    batch: int
    generator_steps: int
    anchor_step: int
    diversity: bool = True
    detach_first_step: bool = True
    anchor_x0: bool = False


def cycle_passes(mode: str, s: CycleShape,
                 checkpointing: tuple[bool | str, bool | str]) -> list[tuple[str, str, object, int]]:
    """The network passes of one cycle as (what, kind, key into PassFlops, how many): kind is forward, train
    or text. checkpointing: (generator's, critic's); (False, False) gives the model FLOPs."""
    c, b, n = s.critic_updates, s.batch, s.generator_steps
    generator_ckpt, critic_ckpt = checkpointing
    passes: list[tuple[str, str, object, int]] = [
        ("generator rollout for the critic updates (no grad)", "forward", c * b, n),
        ("critic update (forward + backward)", "train", (b, False, critic_ckpt), c),
    ]
    # Generator rollout with gradient: step 1 gets its gradient from the diversity loss (or, without the
    # stop-gradient, from the steps after it); step 2's input carries gradient only without the stop-gradient.
    if s.diversity or not s.detach_first_step:
        passes.append(("generator step 1 (forward + backward)", "train", (b, False, generator_ckpt), 1))
    else:
        passes.append(("generator step 1 (forward only)", "forward", b, 1))
    if n >= 2:
        passes.append(("generator step 2 (forward + backward)", "train",
                       (b, not s.detach_first_step, generator_ckpt), 1))
    if n >= 3:
        passes.append(("generator steps 3.. (forward + backward)", "train", (b, True, generator_ckpt), n - 2))
    passes += [("teacher, guided (doubled batch)", "forward", 2 * b, 1), ("critic at x_t (no grad)", "forward", b, 1)]
    if mode in ("inline", "reference"):
        passes.append(("teacher anchor rollout, K guided steps", "forward", 2 * b, s.anchor_step))
        if s.anchor_x0:
            passes.append(("teacher x0 estimate at the anchor, guided", "forward", 2 * b, 1))
    if mode == "reference":
        passes += [("prompt encoding, every batch", "text", b, c + 1), ("empty prompt encoding", "text", 1, 1)]
    return passes


def forward_batches(s: CycleShape) -> set[int]:
    return {s.critic_updates * s.batch, s.batch, 2 * s.batch}


def cycle_flops(mode: str, s: CycleShape, flops: PassFlops, checkpointing: tuple[bool | str, bool | str]) -> int:
    """FLOPs of one cycle of mode: model FLOPs with checkpointing (False, False), hardware FLOPs with the run's
    (generator, critic) setting."""
    total = 0
    for _, kind, key, times in cycle_passes(mode, s, checkpointing):
        total += times * (flops.train_flops(*key) if kind == "train" else getattr(flops, kind)[key])
    return total
