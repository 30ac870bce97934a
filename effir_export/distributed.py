"""Data parallelism on torch.distributed: the process group ``torchrun`` describes in the environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and the few collectives the stages use. Every function
is a no-op in a single process, so the stages call them unconditionally.

Ranks split work by index (rank r takes items r, r + N, r + 2N, ...), reduce sums with ``all_reduce``
and gather shards with ``all_gather_object``; only rank 0 writes files. CPU runs use the gloo backend,
CUDA runs NCCL (one device per rank: ``LOCAL_RANK``)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

TIMEOUT = timedelta(hours=2)  # a rank waiting for rank 0's export or write (7B checkpoints take a while)


def init_from_env() -> bool:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1); True when running distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shard(count: int) -> list[int]:
    """The indices of ``count`` items this rank handles."""
    return list(range(rank(), count, world_size()))


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (float64 sums stay float64)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(parameters) -> None:
    """Replace each gradient by its mean over the ranks (what DDP does after backward)."""
    if not active():
        return
    world = world_size()
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad.div_(world)


def gather_rows(local: np.ndarray, count: int) -> np.ndarray:
    """Rows computed for :func:`shard` ``(count)`` on every rank, assembled in index order on all ranks."""
    if not active():
        return local
    pieces: list = [None] * world_size()
    dist.all_gather_object(pieces, (shard(count), local))
    out = np.empty((count, *local.shape[1:]), dtype=local.dtype)
    for indices, rows in pieces:
        out[indices] = rows
    return out


@contextmanager
def written_by_main(target: Path) -> Iterator[Path]:
    """A folder to write ``target``'s files into: on rank 0 the atomic temp folder that replaces ``target``,
    on the other ranks a scratch folder that is removed. Every rank leaves after rank 0 has renamed it."""
    from .models.format import atomic_directory

    if is_main():
        with atomic_directory(target) as tmp:
            yield tmp
    else:
        with tempfile.TemporaryDirectory(prefix=f"effir-rank{rank()}-") as tmp:
            yield Path(tmp)
    barrier()
