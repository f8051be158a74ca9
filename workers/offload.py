"""A frozen network whose weights wait in host memory between its uses (distributed.offload_teacher).

The teacher runs once per generator update, for its guided score of the generator's samples; the rest of the cycle
its weights (4.6 GiB for SD3.5-Medium in bf16) would only hold GPU memory. Here they live in pinned host buffers.
A network with transformer blocks is streamed through them: while block i runs, block i + 1 is copied in on a side
stream, and block i's copy goes back to the allocator when it returns, so about two blocks are on the GPU at a time
(a block's copy takes about a third of its guided pass at SD3.5's size). What sits outside the blocks (embeddings,
the final norm and projection) is copied in when the network is called and stays until park().

Offloading libraries move whole modules with synchronous hooks around each forward (accelerate's cpu_offload), or
shard trained parameters with their optimizer (DeepSpeed's ZeRO offload); a frozen network streamed beside its own
compute, whose blocks torch.compile compiled one by one, needs neither, so this is written here.
"""

from __future__ import annotations

import torch
from torch import nn

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
    net.transformer_blocks where it has them; park() after its use; restore() when done with it."""

    def __init__(self, net: nn.Module, device: torch.device):
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        blocks = getattr(net, "transformer_blocks", None)
        self.block_modules = list(blocks) if isinstance(blocks, nn.ModuleList) else []
        seen: set[int] = set()

        def own(module: nn.Module) -> list[torch.Tensor]:  # each tensor once, in the first group that reaches it
            fresh = [t for t in (*module.parameters(), *module.buffers()) if id(t) not in seen]
            seen.update(id(t) for t in fresh)
            return fresh

        self.blocks = [ParkedWeights(own(block), device, stream) for block in self.block_modules]
        self.rest = ParkedWeights(own(net), device, stream)
        self.classes = [type(block) for block in self.block_modules]
        for i, block in enumerate(self.block_modules):
            block.__class__ = _streamed(type(block))
            block._dpdmd_stream = (self, i)
        self.hook = net.register_forward_pre_hook(lambda module, args: self.rest.ready())

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
        """The network as it was handed in: no hook, its blocks' own classes, the weights on the device (or left in
        host memory with on_device=False, where they are valid CPU tensors)."""
        self.hook.remove()
        for block, cls in zip(self.block_modules, self.classes):
            block.__class__ = cls
            del block._dpdmd_stream
        if on_device:
            for part in (self.rest, *self.blocks):
                part.ready()

    def call_block(self, i: int, call, *args, **kwargs):
        """Block i's call, its weights in place, the next block's on their way, its own parked after it."""
        self.blocks[i].ready()
        if i + 1 < len(self.blocks):
            self.blocks[i + 1].fetch()
        try:
            return call(*args, **kwargs)
        finally:
            self.blocks[i].park()


_STREAMED: dict[type, type] = {}


def _streamed(cls: type) -> type:
    """cls with a __call__ that streams the block's weights around nn.Module's own call (and so around the compiled
    code of a compiled block: hooks would run inside it, where Dynamo would trace them). One subclass per class."""
    if cls not in _STREAMED:
        def __call__(self, *args, **kwargs):
            stream, i = self._dpdmd_stream
            return stream.call_block(i, super(streamed, self).__call__, *args, **kwargs)

        streamed = type(cls.__name__, (cls,), {"__call__": __call__, "__doc__": cls.__doc__})
        _STREAMED[cls] = streamed
    return _STREAMED[cls]
