"""Anchor batches read and moved to the device ahead of the training loop, on a background thread, so that
Parquet decoding and host-to-device copies overlap the previous step's compute instead of following it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

from models.adapter import Conditioning
from workers.distill import AnchorBatch

_DONE = object()


def prefetched(batches: Iterator[AnchorBatch], device: torch.device, dtype: torch.dtype,
               depth: int = 2) -> Iterator[AnchorBatch]:
    """Yield batches already on device and dtype, up to depth of them prepared ahead.

    On CUDA the copies run from pinned memory on a side stream; each batch's consumer stream waits for
    its copy (an event, no host sync), and the tensors are marked as used there so the caching allocator
    does not hand their memory out early. Errors in the reader are raised at the next batch."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None

    def reader() -> None:
        if cuda:  # the current device is per thread: without this, pinning would open a context on GPU 0
            torch.cuda.set_device(device)
        try:
            for batch in batches:
                if stop.is_set():
                    return
                event = None
                if cuda:
                    with torch.cuda.stream(stream):
                        batch = _moved(_pinned(batch), device, dtype, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    batch = _moved(batch, device, dtype)
                ready.put((batch, event))
        except BaseException as err:  # handed to the consumer
            ready.put((err, None))
        ready.put((_DONE, None))

    thread = threading.Thread(target=reader, name="anchor-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            batch, event = ready.get()
            if batch is _DONE:
                return
            if isinstance(batch, BaseException):
                raise batch
            if event is not None:
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(event)
                for tensor in _tensors(batch):
                    tensor.record_stream(consumer)
            yield batch
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)


def _tensors(batch: AnchorBatch) -> list[torch.Tensor]:
    return [batch.eps, batch.z, batch.t_anchor, batch.prompt_ids, batch.seeds, *batch.cond.tensors.values()]


def _pinned(batch: AnchorBatch) -> AnchorBatch:
    return _mapped(batch, lambda t: t.pin_memory())


def _moved(batch: AnchorBatch, device: torch.device, dtype: torch.dtype, non_blocking: bool = False) -> AnchorBatch:
    """AnchorBatch.to, with non_blocking copies: floating tensors take dtype, the rest keep theirs."""
    return _mapped(batch, lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None,
                                         non_blocking=non_blocking))


def _mapped(batch: AnchorBatch, fn) -> AnchorBatch:
    return AnchorBatch(fn(batch.eps), fn(batch.z), fn(batch.t_anchor),
                       Conditioning({k: fn(t) for k, t in batch.cond.tensors.items()}),
                       fn(batch.prompt_ids), fn(batch.seeds))
