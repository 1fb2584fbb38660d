"""Process-group set-up for ``torchrun`` (NCCL on GPU, gloo on CPU) and rank-0 helpers."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> World:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank, world_size, local_rank, dev)


def compute_threads(decode_workers: int) -> int | None:
    """Intra-op threads for this process, leaving a core to each of its decoding workers.

    PyTorch takes every core for its own ops, while the pipeline's worker processes (PyAV) or
    threads (DALI on the CPU) decode on the same cores: on 2 cores with 2 workers, the demo
    trained 20% faster with one compute thread (104 s against 131 s). The cores are shared by
    the ``LOCAL_WORLD_SIZE`` processes of a node. None when ``OMP_NUM_THREADS`` is set: the
    user's choice stands.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return None
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = max(1, (os.cpu_count() or 1) // local)
    return max(1, cores - max(0, decode_workers))


@contextlib.contextmanager
def threads_beside_decoders(decode_workers: int):
    """Run the block with :func:`compute_threads`; the previous setting is restored after."""
    previous, n = torch.get_num_threads(), compute_threads(decode_workers)
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
