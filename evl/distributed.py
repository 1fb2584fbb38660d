"""Process-group set-up for ``torchrun`` (NCCL on GPU, gloo on CPU) and rank-0 helpers."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipelines.groups import available_cores, gloo_group


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def print0(world: World, *args) -> None:
    """``print`` on rank 0 only, flushed (logs are read live)."""
    if world.is_primary:
        print(*args, flush=True)


def resolve_device(device: str | None) -> torch.device:
    """``--device``: cuda when there is one and none is named; a clear error for CUDA without one."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return dev


def init_distributed(device: str | None = None) -> World:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank, world_size, local_rank, dev)


@contextlib.contextmanager
def process_group(device: str | None = None):
    """The block runs in torchrun's process group (joined here when there is one) on this
    process's device; a group joined here is left when the block ends, whichever way it ends."""
    joined = not (dist.is_available() and dist.is_initialized())
    try:
        yield init_distributed(device)
    finally:
        if joined:
            cleanup()


def compute_threads(decode_workers: int) -> int | None:
    """Intra-op threads for this process, leaving a core to each of its decoding workers.

    PyTorch takes every core for its own ops, while the pipeline's worker processes (PyAV) or
    threads (DALI on the CPU) decode on the same cores, and the two fight over them when both
    take them all (the demo trains faster with a core left to each worker). The cores are this
    process's :func:`~pipelines.groups.available_cores`. None when ``OMP_NUM_THREADS`` is set:
    the user's choice stands.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, available_cores() - max(0, decode_workers))


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


class StopAgreement:
    """Makes every rank stop at the same step when any of them is asked to (SIGTERM, SIGINT).

    A signal reaches each rank at its own step, or only some ranks (``scancel`` of one task, a
    node drained): a rank that stopped on its own would wait in its last collective while the
    others went on into the next gradient all-reduce, and the job would hang without a
    checkpoint. So after every step each rank posts its flag to a max-reduction and reads the
    previous step's result: all ranks see the same flags at the same step, one step after the
    first signal. The reduction runs in a gloo group of its own, on the CPU and asynchronously:
    the step neither waits for it nor syncs with the GPU, and it cannot pair with a collective
    of the training group. One process: a signal stops it at once.
    """

    def __init__(self):
        self.group, self.pending = None, None
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed:
            self.group = gloo_group("for stop requests", "each step waits for their all-reduce")

    def should_stop(self, requested: bool) -> bool:
        """Called once per step on every rank with this rank's request; True on all ranks alike."""
        if not self.distributed:
            return requested
        if self.group is None:
            flag = torch.tensor([int(requested)], device=_group_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        stop = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([int(requested)], dtype=torch.int32)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return stop

    def close(self) -> None:
        """Waits for the last posted flag (every rank posted as many) and frees the group, which
        must go before the default group does (``cleanup``)."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


def _group_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class PatientGroup:
    """Barriers for ranks that may wait long for each other: a gloo group with a day's timeout.

    For jobs split into shares that end at different times (each rank's part of a feature-cache
    build), where the training group's timeout (10-30 minutes) would abort the early ranks.
    Made while the ranks are in step (it is a collective); without gloo, the default group's
    barrier. A no-op in one process. ``close()`` frees the group before the default one goes.
    """

    def __init__(self):
        self.group = None
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.active:
            self.group = gloo_group("for long waits", "the default group's timeout applies", timeout_days=1)

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process). Between this job's own
    processes only: it pickles."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
