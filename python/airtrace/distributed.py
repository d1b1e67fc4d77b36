"""The communication layer (torch.distributed, gloo on CPU, NCCL on GPU): the process group, rank splits, gathers and
reductions that featurize, fit and score call; imports only the kernels layer, never the pipeline above it.

Launch any script that uses :class:`airtrace.Attributor` (or the CLI) with
``torchrun --nproc-per-node N``; once a process group is initialised (see
:func:`process_group`), the Attributor splits its work and every rank ends with
the single-process result:

- ``featurize``: the ranks split the batches into contiguous blocks, each writes a
  sub-store and rank 0 merges them (:mod:`airtrace.attribute.ranks`).
- ``fit``: the K-FAC token pass splits the batches, and the feature passes
  (Fisher, low rank, EK-FAC corrections) split the store's shards (or the
  batches); the fitters' float64 sums and example counts are gathered and added
  in rank order, so every rank finalises the same factors (equal to the
  single-process factors up to float64 summation order); rank 0 saves them.
- ``score``: every rank computes the (small) preconditioned query matrix,
  scores its contiguous block of shards with a running top-k over *global* row
  indices, and the per-rank top-k are all-gathered and merged with
  the ``merge_topk`` op (ties by lower index, as in one process);
  group sums are all-reduced.

Only rank 0 writes shared files (final store, curvature) and, in the CLI,
prints. A failure on one rank is reported on every rank (the ranks exchange an
ok/error status instead of a bare barrier), so none waits for the collective
timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist

from airtrace.ops.merge_topk import merge_topk as merge_shard_topk

TIMEOUT = datetime.timedelta(minutes=30)
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """Another rank failed; the message names the rank and its error."""


# --------------------------------------------------------------------------- process group


def launched() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher) with WORLD_SIZE > 1."""
    return all(v in os.environ for v in LAUNCH_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or no process group: the process that prints and writes shared files."""
    return rank() == 0


@contextlib.contextmanager
def process_group(device: str | torch.device = "cpu") -> Iterator[torch.device]:
    """Initialise the default process group from torchrun's environment for the block.

    Uses NCCL when ``device`` is CUDA (each rank on ``cuda:LOCAL_RANK``) and gloo
    otherwise. Does nothing (yields ``device``) when the process was not launched
    with WORLD_SIZE > 1 or a group is already initialised.

    Args:
        device: the device the work runs on ("cpu", "cuda", "cuda:1", ...).

    Yields:
        The device this rank uses.
    """
    device = torch.device(device)
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield device
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: Any) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def all_or_none(what: str) -> Iterator[None]:
    """Run the block on every rank; if it raised anywhere, raise on every rank.

    The rank that failed re-raises its own exception; the others raise
    :class:`DistributedError` naming the failed rank and its message. Ends with
    a synchronisation point (like a barrier) on success.
    """
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
        error = exc
    if not active():
        if error is not None:
            raise error
        return
    status = None if error is None else f"{type(error).__name__}: {error}"
    failures = [(r, msg) for r, msg in enumerate(gather_objects(status)) if msg]
    if error is not None:
        raise error
    if failures:
        r, msg = failures[0]
        raise DistributedError(f"{what} failed on rank {r} of {world_size()}: {msg}")


# --------------------------------------------------------------------------- splitting work


def block(n: int, r: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The r-th of ``world`` contiguous blocks of ``range(n)``: ``[n*r//world, n*(r+1)//world)``."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    return n * r // world, n * (r + 1) // world


def rank_batches(batches: Iterable, what: str = "batches") -> Iterable:
    """This rank's contiguous block of ``batches`` (all of them without a process group).

    Every rank must see the same batches in the same order. A sized iterable
    (list, DataLoader) is split by ``len``; another re-iterable is counted with
    one extra pass.

    Raises:
        ValueError: ``batches`` is a one-shot iterator (ranks could not agree on a split).
    """
    if not active():
        return batches
    if not isinstance(batches, Sized):
        if iter(batches) is batches:
            raise ValueError(f"{what} is a one-shot iterator; a distributed run splits the batches by position, so "
                             "pass a list or another re-iterable that yields the same batches on every rank")
        n = sum(1 for _ in batches)
    else:
        n = len(batches)
    lo, hi = block(n)
    return itertools.islice(batches, lo, hi)


def rank_shards(store):
    """A view of ``store`` (an :class:`airtrace.store.Store`) holding only this rank's contiguous block of
    shards (the store itself alone).

    Row offsets of the streamed chunks stay global; ``len()`` of the view is its
    own row count. The view shares the store's files and is read-only.
    """
    if not active():
        return store
    return store.shard_range(*block(len(store.shards)))


def share(total: int | None) -> int | None:
    """This rank's part of ``total`` examples under :func:`block` (for progress bars)."""
    if total is None:
        return None
    lo, hi = block(total)
    return hi - lo


# --------------------------------------------------------------------------- reductions


def reduce_fitter(fitter) -> None:
    """Sum a curvature fitter's per-layer float64 sums and example counts over ranks, in place.

    Works for every streaming fitter of :mod:`airtrace.curvature`. The states of
    all ranks are gathered and added in rank order, so every rank holds the same
    bits; a rank that saw no examples contributes nothing.
    """
    if active():
        fitter.load_states(gather_objects(fitter.state()))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place (returns it)."""
    if active():
        buf = t.to(_comm_device())
        dist.all_reduce(buf)
        t.copy_(buf)
    return t


def merge_topk(values: torch.Tensor, indices: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k from every rank's (q, topk) running top-k over global row indices.

    Returns:
        values (q, topk), indices (q, topk) int64 on the input's device, as
        the ``merge_topk`` op sorts them.
    """
    if not active():
        return values, indices
    device, comm = values.device, _comm_device()
    parts_v = [torch.empty_like(values, device=comm) for _ in range(world_size())]
    parts_i = [torch.empty_like(indices, device=comm) for _ in range(world_size())]
    dist.all_gather(parts_v, values.contiguous().to(comm))
    dist.all_gather(parts_i, indices.contiguous().to(comm))
    v, i = merge_shard_topk(parts_v, parts_i, topk)
    return v.to(device), i.to(device)
