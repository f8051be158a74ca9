"""Batches read and moved to the device ahead of the training loop, on a background thread, so that
Parquet decoding and host-to-device copies overlap the previous step's compute instead of following it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

import torch

from workers.batches import AnchorBatch, PromptBatch

Batch = TypeVar("Batch", AnchorBatch, PromptBatch)

_DONE = object()


def prefetched(batches: Iterator[Batch], device: torch.device, depth: int = 2) -> Iterator[Batch]:
    """Yield batches (AnchorBatch or PromptBatch) already on device, up to depth of them prepared ahead.

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
                        batch = batch.pin_memory().to(device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    batch = batch.to(device)
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
                for tensor in batch.tensors():
                    tensor.record_stream(consumer)
            yield batch
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)

