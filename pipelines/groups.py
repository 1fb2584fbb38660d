"""Process-group helpers the data layer needs under ``torchrun`` (gloo, on the CPU).

``gloo_group`` makes a group of its own for a collective that must not pair with the training
group's (``evl.distributed`` uses it too); ``local_leader_first`` lets one process per node probe a
dataset before the node's others read its cache; ``available_cores`` is this process's share of
the node's cores, the budget every job's threads and worker processes are cut from.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os

__all__ = ["available_cores", "gloo_group", "local_leader_first"]


def available_cores() -> int:
    """Cores this process may use: its CPU affinity (a SLURM task's ``--cpus-per-task``, a
    ``taskset``), not every core of the machine, shared among the ``LOCAL_WORLD_SIZE`` processes
    torchrun starts on a node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores // local)


def gloo_group(purpose: str, fallback: str, timeout_days: float | None = None):
    """A gloo process group of its own (a collective: every rank calls it), or None, with a
    warning saying ``fallback``, where gloo cannot connect (a network it cannot use)."""
    import torch.distributed as dist

    try:
        if timeout_days is None:
            return dist.new_group(backend="gloo")
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=timeout_days))
    except RuntimeError as e:
        logging.getLogger("pipelines.groups").warning("no gloo group %s (%s): %s", purpose, e, fallback)
        return None


@contextlib.contextmanager
def local_leader_first():
    """Under ``torchrun``, a node's local rank 0 runs the block before its other ranks do.

    For the probe: one process per node demuxes the new videos and writes the cache, and the
    node's other ranks then read the cache instead of each probing the whole list at once
    (8 GPUs: 8 full demux passes over the dataset fighting for the same cores and disk).
    Every rank passes one barrier, the leader after the block even when it raises, so a
    failure cannot leave the others waiting. The barrier runs in a gloo group of its own with
    a day's timeout (a first probe of a large dataset outlasts the default group's timeout),
    made for the block and destroyed after it: a group left to the end of the process was
    torn down after the default one and could abort the process at exit.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    group = gloo_group("to order the probe", "every rank probes its list", timeout_days=1)
    if group is None:
        yield
        return
    leader = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    try:
        if not leader:
            dist.barrier(group=group)
        try:
            yield
        finally:
            if leader:
                dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)
