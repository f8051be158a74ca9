"""A frozen network whose weights wait in host memory between its uses (distributed.offload_teacher).

The teacher runs once per generator update, for its guided score of the generator's samples; the rest of the cycle
its weights (4.6 GiB for SD3.5-Medium in bf16) would only hold GPU memory. Here they live in pinned host buffers.
A network with transformer blocks is streamed through them: while block i runs, block i + 1 is copied in on a side
stream, and block i's copy goes back to the allocator when it returns, so about two blocks are on the GPU at a time
(a block's copy takes about a third of its guided pass at SD3.5's size). What sits outside the blocks (embeddings,
the final norm and projection: 0.4 GiB for SD3.5-Medium) and the first block are copied in from the start of the
generator update, beside its rollout, and stay until park() after the score.

Offloading libraries move whole modules with synchronous hooks around each forward (accelerate's cpu_offload), or
shard trained parameters with their optimizer (DeepSpeed's ZeRO offload); a frozen network streamed beside its own
compute, whose blocks torch.compile compiled one by one, needs neither, so this is written here.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.engines import derived_class, transformer_blocks

ALIGN_BYTES = 512


class ParkedWeights:
    """Tensors (a network's parameters and buffers) whose data lives in pinned host buffers, one per dtype, and on the
    device between ready() and park(). Only the data moves: the tensor objects stay, so compiled code and references
    stay valid. On a CPU device the copy is an ordinary one (what the CPU tests see)."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device, stream: torch.cuda.Stream | None):
        self.tensors, self.device, self.stream = tensors, device, stream
        sizes: dict[torch.dtype, int] = {}
        self.places: list[tuple[torch.dtype, int]] = []  # each tensor's dtype and offset in its flat buffer
        for t in tensors:
            # each at a 512-byte boundary, as the allocator places tensors: compiled kernels assume aligned inputs
            # and copy (or compile anew for) misaligned ones
            step = max(1, ALIGN_BYTES // t.element_size())
            offset = -(-sizes.get(t.dtype, 0) // step) * step
            self.places.append((t.dtype, offset))
            sizes[t.dtype] = offset + t.numel()
        pin = device.type == "cuda"
        self.host = {dtype: torch.empty(n, dtype=dtype, pin_memory=pin) for dtype, n in sizes.items()}
        for t, (dtype, offset) in zip(tensors, self.places):
            self.host[dtype][offset:offset + t.numel()].copy_(t.detach().reshape(-1))
        self.on_device: dict[torch.dtype, torch.Tensor] | None = None  # the device copy, once fetched
        self.in_place = False  # whether the tensors point at the device copy
        self.park()

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.host.values())

    def fetch(self) -> None:
        """Start copying onto the device (on a GPU this returns at once); nothing if already there."""
        if self.on_device is not None:
            return
        copies = {}
        if self.stream is None:
            for dtype, host in self.host.items():
                copies[dtype] = host.to(self.device, copy=True)
        else:
            # allocated on the compute stream, so the copy waits for that stream's earlier work on the memory it
            # gets; record_stream keeps the allocator from handing it out again before the side stream is done
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            for dtype, host in self.host.items():
                copy = torch.empty(host.shape, dtype=dtype, device=self.device)
                with torch.cuda.stream(self.stream):
                    copy.copy_(host, non_blocking=True)
                copy.record_stream(self.stream)
                copies[dtype] = copy
        self.on_device = copies

    def ready(self) -> None:
        """The tensors on the device, fetched first if nobody did; the compute stream waits for the copy."""
        if self.in_place:
            return
        self.fetch()
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self._point(self.on_device)
        self.in_place = True

    def park(self) -> None:
        """The tensors back in host memory; the device copy goes back to the allocator (in stream order: work
        already queued on it still reads it)."""
        self._point(self.host)
        self.on_device, self.in_place = None, False

    def _point(self, flat: dict[torch.dtype, torch.Tensor]) -> None:
        for t, (dtype, offset) in zip(self.tensors, self.places):
            t.data = flat[dtype][offset:offset + t.numel()].view(t.shape)


class ParkedNetwork:
    """net's weights in host memory until fetch() or its next call, streamed block by block through
    net.transformer_blocks where it has them; park() after its use; restore() when done with it.

    The network's class, and each block's, is swapped for a subclass whose __call__ moves the weights around
    nn.Module's own call: a network or block that torch.compile compiled whole runs its hooks inside the compiled
    code, where Dynamo would trace the copies. (Dynamo guards on the class, so the teacher's blocks get graphs of
    their own instead of sharing those of the generator's and critic's blocks: one more compile in the first cycle.)
    """

    def __init__(self, net: nn.Module, device: torch.device):
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.block_modules = transformer_blocks(net)
        groups = _groups(net, len(self.block_modules))
        self.blocks = [ParkedWeights(groups[i], device, stream) for i in range(len(self.block_modules))]
        self.rest = ParkedWeights(groups[None], device, stream)
        self.modules: list[tuple[nn.Module, type]] = [(net, type(net)), *((b, type(b)) for b in self.block_modules)]
        for module, place in zip((net, *self.block_modules), (None, *range(len(self.block_modules)))):
            module.__class__ = derived_class(type(module), "parked", _parked_call)
            module._dpdmd_parked = (self, place)

    @property
    def nbytes(self) -> int:
        return self.rest.nbytes + sum(b.nbytes for b in self.blocks)

    def fetch(self) -> None:
        """Start copying what the network's call needs first: the weights outside the blocks and the first block."""
        self.rest.fetch()
        if self.blocks:
            self.blocks[0].fetch()

    def park(self) -> None:
        for part in (self.rest, *self.blocks):
            part.park()

    def restore(self, on_device: bool = True) -> None:
        """The network as it was handed in: its own classes, the weights on the device, or with on_device=False all
        in host memory, where they are valid CPU tensors (moving them there needs no GPU memory)."""
        for module, cls in self.modules:
            module.__class__ = cls
            del module._dpdmd_parked
        for part in (self.rest, *self.blocks):
            if on_device:
                part.ready()
            else:
                part.park()

    def call(self, place: int | None, call, *args, **kwargs):
        """The network's call (place None): the weights outside the blocks in place. Block i's call: its weights in
        place, the next block's on their way, its own parked after it."""
        if torch.is_grad_enabled():
            # autograd would keep the weights' memory for backward after park() handed it back to the allocator
            raise RuntimeError("a parked network runs without gradients (torch.no_grad()): it is a frozen teacher")
        if place is None:
            self.rest.ready()
            return call(*args, **kwargs)
        self.blocks[place].ready()
        if place + 1 < len(self.blocks):
            self.blocks[place + 1].fetch()
        try:
            return call(*args, **kwargs)
        finally:
            self.blocks[place].park()


def _groups(net: nn.Module, num_blocks: int) -> dict[int | None, list[torch.Tensor]]:
    """net's parameters and buffers by where they are used: block i's (transformer_blocks.i.) or the rest (None),
    each tensor once. A tensor shared between two groups would sit in host memory while the other one runs."""
    groups: dict[int | None, list[torch.Tensor]] = {i: [] for i in range(num_blocks)}
    groups[None] = []
    owner: dict[int, tuple[int | None, str]] = {}
    for name, t in (*net.named_parameters(remove_duplicate=False), *net.named_buffers(remove_duplicate=False)):
        parts = name.split(".")
        group = int(parts[1]) if num_blocks and parts[0] == "transformer_blocks" else None
        if id(t) in owner:
            if owner[id(t)][0] != group:
                raise ValueError(f"{name} and {owner[id(t)][1]} are one tensor used in two parts of the network; "
                                 "it cannot be streamed block by block")
            continue
        owner[id(t)] = (group, name)
        groups[group].append(t)
    return groups


def _parked_call(cls: type) -> dict:
    """A __call__ that moves the module's weights around cls's own (nn.Module's) call."""
    def __call__(self, *args, **kwargs):
        parked, place = self._dpdmd_parked
        return parked.call(place, cls.__call__.__get__(self), *args, **kwargs)

    return {"__call__": __call__}
