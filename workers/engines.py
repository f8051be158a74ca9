"""DeepSpeed engines for the generator and the critic: ZeRO stage, precision, clipping from the recipe.

The optimizer is a client torch.optim.AdamW (fused on GPU), so that nothing JIT-compiles on CPU.
"""

from __future__ import annotations

import os
import socket

import torch
from torch import nn

from workers.config import OptimConfig, RunConfig


def init_distributed(use_gpu: bool) -> None:
    """Join (or, in a single process, create) the process group DeepSpeed needs.

    Under Ray Train or torchrun the group or its environment already exists; alone, a world of one.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    import deepspeed

    if not use_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a 35 s g++ build on CPU
    if not torch.distributed.is_initialized() and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", verbose=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(config: RunConfig, optim: OptimConfig) -> dict:
    dist = config.distributed
    return {
        "train_micro_batch_size_per_gpu": dist.batch_size_per_worker,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": dist.zero_stage},
        "bf16": {"enabled": dist.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(net: nn.Module, optim: OptimConfig, config: RunConfig):
    """A DeepSpeed engine around net with a client AdamW from optim."""
    import deepspeed

    params = [p for p in net.parameters() if p.requires_grad]
    fused = {"fused": True} if config.distributed.use_gpu else {}
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                                  **fused)
    engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=deepspeed_config(config, optim))
    return engine


def compile_network(net: nn.Module) -> None:
    """torch.compile in place: each transformer block on its own where the network has them (regional
    compilation: one graph serves every block, so compiling takes seconds instead of minutes), else the whole
    network. The first call of each compiled piece compiles it."""
    blocks = getattr(net, "transformer_blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        for block in blocks:
            block.compile()
    else:
        net.compile()
