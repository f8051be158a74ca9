"""DeepSpeed engines for the generator and the critic: ZeRO stage, precision, clipping from the recipe.

The optimizer is a client torch.optim.AdamW (PyTorch's kernels: nothing JIT-compiles), an update whose
gradients are not finite is skipped on the GPU (NonfiniteGradients) instead of by DeepSpeed's bf16 check, and
ZeRO-1/2's clipping norm is computed by one multi-tensor kernel (fused_grad_norm) instead of two per gradient.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from workers.config import OptimConfig, RunConfig


@contextmanager
def distributed(use_gpu: bool):
    """The process group (init_distributed) plus what DeepSpeed's engines read from the environment while they
    run: LOCAL_RANK, which a world of one lacks. It is set for the duration only and removed afterwards: the one
    environment write outside the entry points (the `dpdmd` command, the Ray worker's setup hook), because
    DeepSpeed reads the local rank from nowhere else, and train() is also called as a library function
    (tests/test_distill_local.py holds that such a call leaves os.environ as it found it)."""
    init_distributed(use_gpu)
    if "LOCAL_RANK" in os.environ:
        yield
        return
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        os.environ.pop("LOCAL_RANK", None)


def import_deepspeed(use_gpu: bool):
    """The deepspeed module. Imported on a CPU it warned on every process's console that it found no GPU and
    picked the CPU (which init_distributed then sets anyway); its logger drops what it logs below ERROR while it
    is imported there. On a GPU, and once it is imported, nothing is held back."""
    import logging
    import sys

    if use_gpu or "deepspeed" in sys.modules:
        import deepspeed
        return deepspeed
    logger = logging.getLogger("DeepSpeed")  # the object DeepSpeed configures as it is imported

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    logger.addFilter(errors_only)
    try:
        import deepspeed
    finally:
        logger.removeFilter(errors_only)
    return deepspeed


def init_distributed(use_gpu: bool) -> None:
    """Join (or, in a single process, create) the process group DeepSpeed needs.

    Under Ray Train or torchrun the group or its environment (RANK, MASTER_ADDR, ...) already exists. Alone,
    a world of one on an in-memory store: no port, and nothing written into os.environ, so processes
    started later (trials, benchmarks) inherit no rendezvous settings."""
    deepspeed = import_deepspeed(use_gpu)
    if not use_gpu:
        from deepspeed.accelerator import set_accelerator
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a 35 s g++ build on CPU
    backend = "nccl" if use_gpu else "gloo"
    if not torch.distributed.is_initialized() and "RANK" not in os.environ:
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def guards_gradients(config: RunConfig, optim: OptimConfig) -> bool:
    """ZeRO-1/2 on the GPU's optimizer, which computes the global gradient norm before stepping: there
    NonfiniteGradients replaces DeepSpeed's own bf16 check. ZeRO-3 and an optimizer offloaded to host memory
    (optim.offload, whose norm and overflow check DeepSpeed computes as it copies the gradients out) keep
    DeepSpeed's."""
    return config.distributed.zero_stage in (1, 2) and not optim.offload


def deepspeed_config(config: RunConfig, optim: OptimConfig) -> dict:
    dist = config.distributed
    bf16 = dist.precision == "bf16"
    zero = {"stage": dist.zero_stage}
    if optim.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": dist.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": dist.batch_size_per_worker,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        # ZeRO-Offload with the client AdamW below (DeepSpeed would otherwise demand its own CPU Adam, a C++
        # extension built on first use); PyTorch's AdamW updates the host copy
        **({"zero_force_ds_cpu_optimizer": False} if optim.offload else {}),
        # DeepSpeed's bf16 check reads every gradient in seven small kernels and two host waits per parameter:
        # about 6,000 launches per update for SD3.5, over which the GPU idles (benchmarks/gaps.py measured it).
        "bf16": {"enabled": bf16, **({"check_grad_overflow": False} if bf16 and guards_gradients(config, optim) else {})},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# ZeRO-1/2 step one parameter group at a time, each through a float32 copy of its whole gradient: groups of at
# most this many elements keep that copy near 1 GB instead of 9 GB for SD3.5-Medium's 2.2 B parameters. The
# groups share every setting, so the update is the same (the clipping norm sums its parts in another order).
OPTIMIZER_GROUP_NUMEL = 2**28


def parameter_groups(params: list[nn.Parameter], max_numel: int | None = None) -> list[dict]:
    """params in order, cut into consecutive groups of at most max_numel (default OPTIMIZER_GROUP_NUMEL)
    elements; a larger parameter makes a group of its own."""
    max_numel = max_numel or OPTIMIZER_GROUP_NUMEL
    groups: list[list[nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if groups[-1] and size + p.numel() > max_numel:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel()
    return [{"params": group} for group in groups if group]


def build_engine(net: nn.Module, optim: OptimConfig, config: RunConfig):
    """A DeepSpeed engine around net with a client AdamW from optim; under ZeRO-1/2 its
    nonfinite_gradients (NonfiniteGradients) skips updates whose gradients are not finite."""
    import deepspeed

    params = [p for p in net.parameters() if p.requires_grad]
    # PyTorch's fused kernel on a GPU and wherever NonfiniteGradients must skip through it (bf16); float32 on
    # the CPU keeps the default (foreach) kernel, whose results the CPU figures in the README were measured with
    fused = config.distributed.use_gpu or config.distributed.precision == "bf16"
    optimizer = torch.optim.AdamW(parameter_groups(params), lr=optim.lr, betas=tuple(optim.betas),
                                  weight_decay=optim.weight_decay, **({"fused": True} if fused else {}))
    engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=deepspeed_config(config, optim))
    guarded = guards_gradients(config, optim)
    # every ZeRO optimizer records an update it skipped as an infinite norm: reported wherever DeepSpeed skips
    engine.nonfinite_gradients = NonfiniteGradients(engine.optimizer, optimizer, params[0].device, skips=guarded)
    if guarded:
        fused_grad_norm(engine.optimizer)
    return engine


def fused_grad_norm(zero_optimizer) -> None:
    """ZeRO-1/2's global gradient norm (the clipping's, and the one NonfiniteGradients reads) from one multi-tensor
    kernel per parameter group, in place of DeepSpeed's loop (get_grad_norm_direct), which casts every gradient to
    float64 and reduces it on its own: two kernels and a Python iteration per gradient, 908 per update for SD3.5,
    over which the GPU idled (benchmarks/gaps.py). DeepSpeed fuses this only under ZeRO-3, so the optimizer's method
    is replaced here, keeping its contract: the same parameters counted (pipeline-replicated ones skipped, model-
    parallel ones once), squares summed over the data- and model-parallel groups, an inf or NaN norm returned as -1.
    Each gradient's norm accumulates in float64 inside the kernel (the kernel clip_grad_norm_ uses, asked for a
    float64 result: torch.nn.utils.get_total_norm would return bf16 gradients' norms in bf16), and the rest is
    DeepSpeed's arithmetic, so that float32 runs clip exactly as before: a float32 accumulation changed the CPU
    demo's digits through the clipping."""
    from deepspeed import comm as dist
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace

    deepspeeds_own = zero_optimizer.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return deepspeeds_own(gradients, params, norm_type)
        counted = [g.detach() for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params)
                   if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
                   and (is_model_parallel_parameter(p) or zero_optimizer.model_parallel_rank == 0)]
        device = zero_optimizer.device
        if counted:
            norms = torch._foreach_norm(counted, 2.0, dtype=torch.float64)
            squares = torch.stack(norms).to(device).pow(2.0).sum().float()
        else:
            squares = torch.zeros((), dtype=torch.float32, device=device)
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=zero_optimizer.dp_process_group)
        zero_optimizer._model_parallel_all_reduce(tensor=squares, op=dist.ReduceOp.SUM)
        total = squares.pow(1.0 / 2.0)
        mask_nan_or_inf_with_val_inplace(total, device=device)
        return total

    zero_optimizer.get_grad_norm_direct = get_grad_norm_direct


class NonfiniteGradients:
    """Skips an update whose gradients hold an inf or NaN, without waiting for the GPU.

    DeepSpeed's ZeRO-1/2 optimizer sums the global gradient norm over every rank before it steps (an inf or NaN
    norm becomes -1). In float32 it skips such an update itself; in bf16 (its per-parameter check off, see
    deepspeed_config) it steps the client optimizer group by group, and before each group's step this hands
    PyTorch's fused AdamW found_inf = "the norm is not a finite, non-negative number": the kernel then leaves
    weights, moments and step counts as they were, on every rank alike (the norm is all-reduced). flag() says
    whether the last update was skipped, as a device tensor the caller reads when it next syncs.

    skips=False: only that report, where DeepSpeed's own check skips the update and sets the norm to inf (ZeRO-3,
    and an optimizer offloaded to host memory, whose gradients it checks as it copies them out). An optimizer
    without a global norm (float32 without ZeRO) reports nothing (flag() is None)."""

    def __init__(self, zero_optimizer, client: torch.optim.Optimizer, device: torch.device, skips: bool = True):
        self.zero_optimizer = zero_optimizer
        self.device = device  # the weights' (under ZeRO-3 the client's groups hold no parameters)
        self._norm, self._flag = None, None  # the last norm read, and its flag: every group's step shares them
        if skips and client.defaults.get("fused"):  # only the fused kernel reads found_inf; fp32: DeepSpeed skips
            client.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer, args, kwargs) -> None:
        optimizer.found_inf = self.flag()

    def flag(self) -> torch.Tensor | None:
        """1.0 if the last update's gradients were not finite (so it was not applied), else 0.0; None before
        the first update. DeepSpeed sets the norm before any group steps, and to inf when it skips itself."""
        norm = getattr(self.zero_optimizer, "_global_grad_norm", None)
        if norm is None:
            return None
        if norm is not self._norm:  # a new update (DeepSpeed stores a new norm object every step)
            value = torch.as_tensor(norm, dtype=torch.float32, device=self.device)
            self._norm, self._flag = norm, (~torch.isfinite(value) | (value < 0)).to(torch.float32)
        return self._flag


def _saves_attention(ctx, op, *args, **kwargs):
    """Selective checkpointing's policy: keep what the attention kernels return (output and log-sum-exp, whatever
    backend runs them: flash, cuDNN, memory-efficient, CPU), recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if "scaled_dot_product" in str(op) else CheckpointPolicy.PREFER_RECOMPUTE


def _attention_saved():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_saves_attention)


def transformer_blocks(net: nn.Module) -> list[nn.Module]:
    """net's transformer blocks (its transformer_blocks list, as diffusers' transformers have it), or none."""
    blocks = getattr(net, "transformer_blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


_DERIVED: dict[tuple[str, type], type] = {}


def derived_class(cls: type, kind: str, members: Callable[[type], dict]) -> type:
    """cls with members(cls) in place of its own, under its name: one subclass per class and kind, made once (a
    class already derived for kind comes back as it is). Swapping a module's class this way changes what it does
    while its weights, state dict and deep copies stay those of the original; a network holding such a class does
    not pickle (nothing in the project pickles networks)."""
    if _DERIVED.get((kind, cls.__base__)) is cls:
        return cls
    if (kind, cls) not in _DERIVED:
        _DERIVED[(kind, cls)] = type(cls.__name__, (cls,), {**members(cls), "__doc__": cls.__doc__})
    return _DERIVED[(kind, cls)]


def checkpoint_keeping_attention(net: nn.Module) -> None:
    """Activation checkpointing of each transformer block that keeps the attention kernels' outputs: backward
    recomputes the block's projections, norms and MLP but not its attention, the largest part of a recomputed
    forward at 1024 px (SD3.5: about 17 TFLOP of the forward's 45 at batch 4), for one attention output per block
    held through the pass (about 54 MB per block and batch of 4 at 1024 px).

    The checkpoint sits inside each block's forward (the block's class is swapped for a subclass that wraps its
    forward in torch.utils.checkpoint with a selective policy), not around the call as diffusers' own
    checkpointing does: a selective policy runs as a dispatch mode, under which compiled code would fall back to
    eager, while inside the block torch.compile traces the checkpoint and applies the policy itself. Without
    compilation the policy runs as that dispatch mode over every op, which costs more than the attention it saves
    (BENCHMARKS.md); pair it with distributed.compile=true. Weights, state dicts and deep copies are those of the
    original block."""
    blocks = transformer_blocks(net)
    if not blocks:
        raise ValueError(f"{type(net).__name__} has no transformer_blocks")
    for block in blocks:
        block.__class__ = derived_class(type(block), "keeping attention", _keeping_attention)


def _keeping_attention(cls: type) -> dict:
    """cls's forward inside a selective checkpoint. The original forward is called as the plain function:
    diffusers marks its block classes allow_in_graph, and Dynamo cannot trace `cls.forward` through such a class
    (a graph break in every block; tests/test_sd3.py)."""
    from torch.utils.checkpoint import checkpoint

    original = cls.forward

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return original(self, *args, **kwargs)
        return checkpoint(original, self, *args, use_reentrant=False, context_fn=_attention_saved, **kwargs)

    return {"forward": forward}


RECOMPILE_LIMIT = 64


def allow_recompiles() -> None:
    """Dynamo's limit of graphs per code object raised to RECOMPILE_LIMIT, for code that compiles to several
    graphs (a block kind per pass, a stacked network with and without gradients); past the limit it runs eagerly."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)


def compile_network(net: nn.Module, mode: str = "default") -> None:
    """torch.compile in place, by region where the network has repeated blocks (one graph serves every block of
    a kind, so compiling takes seconds instead of minutes): the classes diffusers names in the model's
    _repeated_blocks (SDXL's UNet: its BasicTransformerBlocks, through diffusers' compile_repeated_blocks), else
    each of its transformer_blocks (SD3.5's transformer), else the whole network; with torch.compile's mode. The
    first call of each compiled piece compiles it.

    One block's code serves several graphs: SD3.5's block kinds (dual attention, plain, the last context-only
    one) times the passes a cycle makes (no-grad, with grad, recomputed under checkpointing). Dynamo's default
    limit of 8 graphs per code object would run the rest eagerly, so it is raised (allow_recompiles)."""
    allow_recompiles()
    if getattr(net, "_repeated_blocks", None):
        net.compile_repeated_blocks(mode=mode)
        return
    for module in transformer_blocks(net) or [net]:
        module.compile(mode=mode)
