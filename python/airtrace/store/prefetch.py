"""Background shard prefetching for the reader: a read-ahead thread and the copy to the target device (pinned memory and
a side CUDA stream on GPUs); imports ``airtrace.store.errors`` and ``.format``."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import torch

from airtrace.store.errors import StoreError
from airtrace.store.format import FEATURES


class CpuTransfer:
    pin = False

    def __init__(self, device: torch.device, dtype: torch.dtype | None):
        self.device, self.dtype = device, dtype

    def send(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {n: t.to(self.device) for n, t in tensors.items()}
        if self.dtype is not None:
            out[FEATURES] = out[FEATURES].to(self.dtype)
        return out

    def receive(self, tensors):
        return tensors


class CudaTransfer:
    """Pinned host buffers, copied with non_blocking on a side stream; the consumer waits on an event."""

    pin = True

    def __init__(self, device: torch.device, dtype: torch.dtype | None):
        if not torch.cuda.is_available():
            raise StoreError(f"device {device} requested but torch.cuda.is_available() is False")
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.dtype = dtype
        self.stream = torch.cuda.Stream(self.device)

    def send(self, tensors: dict[str, torch.Tensor]):
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            out = {n: t.to(self.device, non_blocking=True) for n, t in tensors.items()}
            if self.dtype is not None:
                out[FEATURES] = out[FEATURES].to(self.dtype)
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def receive(self, sent):
        tensors, event = sent
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors.values():
            t.record_stream(current)  # allocated on the side stream, used on the current one
        return tensors


_DONE = object()


def prefetched(load, items: Sequence, prefetch: int) -> Iterator:
    """``map(load, items)`` computed by a background thread at most ``prefetch`` items ahead.

    The thread runs at most ``prefetch`` items ahead of the item the consumer
    holds; while ``next()`` runs, the consumer usually still references its
    previous item too, so up to ``prefetch + 2`` items are alive at a time.
    Exceptions in ``load`` are re-raised in the consumer; closing the
    generator early stops the thread.
    """
    results: queue.Queue = queue.Queue()
    slots = threading.Semaphore(prefetch + 1)
    stop = threading.Event()

    def worker():
        try:
            for item in items:
                while not slots.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                results.put((True, load(item)))
            results.put((True, _DONE))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            results.put((False, exc))

    thread = threading.Thread(target=worker, name="airtrace-store-prefetch", daemon=True)
    thread.start()
    try:
        first = True
        while True:
            ok, value = results.get()
            if not first:
                slots.release()  # the previously yielded item is done with
            first = False
            if not ok:
                raise value
            if value is _DONE:
                return
            yield value
    finally:
        stop.set()
        thread.join()
