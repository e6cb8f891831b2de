"""Data-parallel runs under torchrun: the process group, batch slices and gathering across processes.

A run started by ``torchrun --nproc_per_node N`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in the environment) computes what one process computes: every rank takes one
contiguous slice of each global batch, and evaluation is split by whole batches and gathered
back in order. Without those variables every function here is the single-process identity.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


# -- who am I -------------------------------------------------------------------------------------
def requested() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def active() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs and prints."""
    return rank() == 0


def quiet_unless_main() -> dict:
    """tqdm options: progress bars on rank 0 only (the other ranks show the same progress)."""
    return {} if is_main() else {"disable": True}


@contextmanager
def process_group(device_type: str):
    """Join the torchrun process group for the duration of a run: NCCL on GPUs, gloo elsewhere.

    Does nothing without torchrun's variables, or when the caller already set up a group
    (which it then keeps).
    """
    if not requested() or dist.is_initialized():
        yield
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def device_of_rank(device: torch.device) -> torch.device:
    """The GPU of this rank (cuda:LOCAL_RANK) for a CUDA device; other devices as they are."""
    if device.type == "cuda" and active():
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of a few numbers over all ranks (one all-reduce)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def all_agree(flag: bool) -> bool:
    """True only if `flag` is true on every rank, so that all ranks take the same branch."""
    return all_sum([0.0 if flag else 1.0])[0] == 0.0


def main_first(fn: Callable[[], T]) -> T:
    """Call `fn` on rank 0, then on the other ranks (which find its downloads and caches ready).

    When rank 0 fails, the other ranks raise too instead of waiting for it forever.
    """
    if not active():
        return fn()
    result, ok = None, True
    if is_main():
        try:
            result = fn()
        except BaseException:
            ok = False
            all_agree(ok)
            raise
    if not all_agree(ok):
        raise RuntimeError("rank 0 failed while preparing the run; see its error above")
    if not is_main():
        result = fn()
    return result


@contextmanager
def main_writes():
    """Run the block on rank 0 only (`with main_writes() as writer: if writer: ...`); all ranks then
    wait at a barrier, so nobody reads or exits before the files exist."""
    try:
        yield is_main()
    finally:
        barrier()


# -- training: each rank's slice of a global batch --------------------------------------------
@dataclass(frozen=True)
class Shard:
    """This process's part of one global batch.

    ``indices`` are the samples to load: the contiguous slice ``[first, first + count)`` of the
    global batch, or, when the slice is empty (a batch smaller than the number of processes),
    one stand-in sample whose loss weighs nothing, so that every rank still runs a step.
    """

    indices: list[int]
    first: int
    count: int
    total: int

    @property
    def weight(self) -> float:
        """This slice's share of the global batch; the gradient is the sum over ranks of weight x
        (slice mean), i.e. the mean over the global batch."""
        return self.count / self.total if self.total else 0.0


def slice_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when n items are cut into `parts` contiguous pieces, the first
    n % parts pieces one longer."""
    size, extra = divmod(n, parts)
    start = index * size + min(index, extra)
    return start, start + size + (1 if index < extra else 0)


def shard_batch(batch: Sequence[int], rank_: int | None = None, world: int | None = None) -> Shard:
    """The slice of a global batch (a list of sample indices) that this rank trains on."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    start, stop = slice_bounds(len(batch), world, rank_)
    indices = list(batch[start:stop])
    if not indices:
        return Shard([batch[0]], start, 0, len(batch))
    return Shard(indices, start, len(indices), len(batch))


def shard_batches(batches: Iterator[list[int]], shards: deque[Shard]) -> Iterator[list[int]]:
    """The sample indices of this rank's slice of each global batch; each Shard is appended to
    `shards` as its indices are handed out (a data loader may read ahead, so the consumer pops them
    from the left, in order)."""
    for batch in batches:
        shard = shard_batch(batch)
        shards.append(shard)
        yield shard.indices


# -- evaluation: whole batches round-robin, gathered in order -----------------------------------
def my_batches(n_batches: int) -> list[int]:
    """The global batch numbers this rank evaluates: rank, rank + N, ... (each batch is computed
    exactly as one process computes it)."""
    return list(range(rank(), n_batches, world_size()))


def gather_batches(mine: list[T], n_batches: int) -> list[T]:
    """Every rank's per-batch results (from `my_batches`) on every rank, in global batch order."""
    if not active():
        return mine
    everyone: list[list[T] | None] = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    ordered: list[T] = []
    for b in range(n_batches):
        ordered.append(everyone[b % world_size()][b // world_size()])
    return ordered


def gather_outputs(compute: Callable[[list[int]], list[tuple[torch.Tensor, torch.Tensor]]],
                   n_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute(batch_numbers)`` returns (outputs, labels) per batch on CPU; this runs it on this
    rank's batches and concatenates everyone's results in order (each image exactly once)."""
    results = gather_batches(compute(my_batches(n_batches)), n_batches)
    if not results:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat([o for o, _ in results]), torch.cat([y for _, y in results])
