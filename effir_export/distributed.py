"""Data parallelism on torch.distributed: the process group ``torchrun`` describes in the environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and the few collectives the stages use. Every function
is a no-op in a single process, so the stages call them unconditionally.

Ranks split work by index (rank r takes items r, r + N, r + 2N, ...), reduce sums with ``all_reduce``
and gather shards with ``all_gather_object``; only rank 0 writes files, and decisions that depend on
files or the machine (a cache hit, a skipped stage) are rank 0's, broadcast (:func:`run_on_main`). CPU
runs use the gloo backend, CUDA runs NCCL (one device per rank: ``LOCAL_RANK``)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .errors import EffirError

T = TypeVar("T")
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


def shutdown() -> None:
    """Leave the process group before the interpreter exits. Without it gloo's worker threads are torn
    down during finalization and the process can abort (SIGABRT, "terminate called without an active
    exception") after its work succeeded: pytorch/pytorch#190489."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def accelerate_shards() -> bool:
    """True when ``accelerate launch`` started this process with an FSDP config (it says so in the
    environment); the recipe's ``distributed.strategy`` must then be ``fsdp``."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


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


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RankZeroError(EffirError):
    """Raised on the other ranks when work that rank 0 alone did failed (its message and exit code)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_on_main(work: Callable[[], T]) -> T:
    """``work()`` on rank 0 alone, its result on every rank; when it raises, every rank raises (rank 0 the
    original exception, the others a :class:`RankZeroError` with its message), so no rank waits for a
    result that never comes."""
    if not active():
        return work()
    outcome: tuple = (True, None)
    failure: BaseException | None = None
    if is_main():
        try:
            outcome = (True, work())
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            failure = exc
            outcome = (False, (str(exc), getattr(exc, "exit_code", 3)))
    ok, value = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if not ok:
        raise RankZeroError(*value)
    return value


def shard(count: int) -> list[int]:
    """The indices of ``count`` items this rank handles."""
    return list(range(rank(), count, world_size()))


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (float64 sums stay float64)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(parameters) -> None:
    """Replace each gradient by its mean over the ranks (what DDP does after backward); FSDP-sharded
    parameters (DTensors) are skipped, their gradients were reduce-scattered in backward."""
    if not active():
        return
    from torch.distributed.tensor import DTensor

    world = world_size()
    for parameter in parameters:
        if parameter.grad is not None and not isinstance(parameter, DTensor):
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
    on the other ranks a scratch folder that is removed, named like rank 0's temp folder and beside it
    when the parent exists (so a rerun clears what a killed rank left). Every rank leaves after rank 0
    has renamed it."""
    from .models.format import atomic_directory

    if is_main():
        with atomic_directory(target) as tmp:
            yield tmp
    else:
        parent = target.parent if target.parent.is_dir() else None
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.tmp-rank{rank()}-", dir=parent) as tmp:
            yield Path(tmp)
    barrier()


def launch(nproc: int, args: list[str]) -> int:
    """Run ``python -m effir_export ARGS`` as ``nproc`` ranks on this machine through torchrun's own
    launcher (``torch.distributed.run``, standalone rendezvous on loopback, no restarts); returns the
    exit code of the first rank that failed, 0 when all succeed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if active() or "TORCHELASTIC_RUN_ID" in os.environ:
        raise EffirError("--nproc starts torchrun, and this process already runs under it; drop --nproc")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise EffirError(f"--nproc {nproc} needs one GPU per rank and {torch.cuda.device_count()} are visible; "
                         f"pass --nproc {torch.cuda.device_count()} or fewer")
    options = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0",
                                            "-m", "effir_export", *args])
    try:
        run(options)
    except ChildFailedError as exc:
        return exc.get_first_failure()[1].exitcode or 1
    return 0
