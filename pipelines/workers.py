"""DataLoader machinery for backends that decode on the CPU in worker processes (PyAV).

The list is validated and probed once (frame counts and sizes, cached next to the list);
unreadable files are excluded there with a report. A ``torch.utils.data.Sampler`` running in
the main process hands each worker an ``(epoch, index)`` key, so the clip decided by the shared
:class:`~pipelines.sampling.ClipSampler` depends only on (seed, epoch, index), never on which
worker runs it or on persistent-worker state. A video that fails while training is replaced
by another sample, counted and reported at the end of the epoch; past ``max_bad_fraction`` of
an epoch the run stops with the list of files. In evaluation a failed video is skipped and
reported, never duplicated, so metrics count every readable video exactly once.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import weakref
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from .base import (Batch, PipelineConfig, check_bad_videos, report_bad_videos, row_ids_to_device,
                   summarise_bad_videos, thwc_uint8_to_bcthw)
from .dataset import clip_specs, load_dataset, make_sampler
from .epoch import EpochKeys, KeyStream, batches_per_epoch, replacements, training_epoch
from .index import failure_reason
from .lists import VideoRecord
from .sampling import ClipSampler, ClipSpec
from .transforms import decode_clips

if TYPE_CHECKING:
    from .probe import VideoInfo

__all__ = ["BatchSlots", "DecodingPipeline", "ClipDataset", "SharedMemoryFull", "WorkerSignals", "cat_for_transfer",
           "collate"]

log = logging.getLogger(__name__)

ReadFrames = Callable[..., np.ndarray]  # (path, frame indices, crop=None) -> [T, H, W, 3] uint8


class ClipDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by ``(epoch, index)``; returns a dict per item (see ``collate``).

    ``slots`` (set by :class:`DecodingPipeline`): the workers' batch memory, which a batch's
    clips are written into as they are made (``__getitems__``).
    """

    slots: BatchSlots | None = None

    def __init__(self, records: Sequence[VideoRecord], infos: Sequence[VideoInfo], sampler: ClipSampler,
                 read_frames: ReadFrames, *, train: bool, replace: bool | None = None):
        self.records, self.infos = list(records), list(infos)
        self.sampler, self.read_frames = sampler, read_frames
        self.train = train
        self.replace = train if replace is None else replace

    def __len__(self) -> int:
        return len(self.records)

    def load(self, key: tuple[int, int], into: torch.Tensor | None = None) -> tuple[torch.Tensor, list[ClipSpec]]:
        """Decode and transform one item: ``[V, T, S, S, 3]`` uint8 and its specs; written into
        the first V rows of ``into`` where it has them."""
        record, info = self.records[key[1]], self.infos[key[1]]
        specs = clip_specs(self.sampler, self.train, key, record, info)
        out = into[:len(specs)] if into is not None and len(into) >= len(specs) else None
        return decode_clips(self.read_frames, record.path, specs, self.sampler.size, out), specs

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return self.item(key)

    def item(self, key: tuple[int, int], into: torch.Tensor | None = None) -> dict:
        """One item (see ``load``), or its failures."""
        epoch, index = key
        failures = []
        # Training replaces a video that fails (the same replacement in every backend); evaluation skips it.
        tries = replacements(self.sampler.seed, epoch, index, len(self.records)) if self.replace else (index,)
        for index in tries:
            try:
                clips, specs = self.load((epoch, index), into)
                return {"clips": clips, "label": self.records[index].label, "index": [s.index for s in specs],
                        "view": [epoch] if self.train else [s.view for s in specs], "failures": failures}
            except Exception as e:  # noqa: BLE001 -- any decoder failure is a bad video, reported below
                failures.append((self.records[index].path, failure_reason(e)))
        return {"clips": None, "failures": failures}

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict]:
        """A batch's items (the DataLoader's batched fetch). In a worker, each item's clips are
        resized straight into the rows of a lent slot of ``slots``, one item after another: the
        batch then leaves the worker without being copied (``collate``)."""
        s = self.sampler
        views = 1 if self.train else s.num_views
        shape = (len(keys) * views, s.num_frames, s.size, s.size, 3)
        try:
            lent = self.slots.lend(math.prod(shape)) if self.slots is not None else None
        except SharedMemoryFull:
            lent = None  # collate tries again, and reports it
        if lent is None:
            return [self.item(key) for key in keys]
        storage, lease = lent
        rows = torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)
        items, at = [], 0
        for key in keys:
            item = self.item(key, None if rows is None else rows[at:])
            clips = item["clips"]
            if rows is not None and clips is not None:
                if at + len(clips) <= len(rows) and clips.data_ptr() == rows[at].data_ptr():
                    at += len(clips)
                else:  # more views than foreseen, or not made in place: collated as without a slot
                    self.slots.give_back(lease.slot, lease.token)
                    for it in items:  # off the slot, which collate may lend again
                        it["clips"] = None if it["clips"] is None else it["clips"].clone()
                    rows = None
            items.append(item)
        if rows is None:
            return items
        if at == 0:  # every video failed
            self.slots.give_back(lease.slot, lease.token)
            return items
        return _LaidOut(items, rows[:at], lease)


class _LaidOut(list):
    """A batch's items whose clips are, in order, the rows of ``rows``: memory of a lent slot
    that ``lease`` gives back (``ClipDataset.__getitems__``)."""

    def __init__(self, items: list[dict], rows: torch.Tensor, lease: _Lease):
        super().__init__(items)
        self.rows, self.lease = rows, lease


class WorkerSignals:
    """``worker_init_fn``: SIGTERM and SIGINT are the training process's to handle.

    A scheduler stops a job by signalling its whole process group (``scancel``, ``kill -TERM
    -PGID``, Ctrl-C): workers that died of it left the training process, which was finishing
    its step to save a checkpoint, waiting for a batch and then failing with "DataLoader worker
    exited unexpectedly", without the checkpoint. So workers ignore SIGINT, and SIGTERM until
    the training process exits. Its exit hook, run before multiprocessing's (which ends daemonic
    children with SIGTERM and waits for them: ignored, that hung the exit), first shuts down the
    workers of every pipeline still alive, as DataLoader does when an iterator is deleted, and
    then tells any worker left to obey SIGTERM. Workers also end when their parent dies.
    """

    _flags: list = []  # every pipeline's "exiting" flag
    _pipelines = None  # weakref.WeakSet of the pipelines to shut down at exit

    def __init__(self):
        import multiprocessing

        self.exiting = multiprocessing.get_context().Value("b", 0, lock=False)
        if not WorkerSignals._flags:
            import atexit
            import weakref

            WorkerSignals._pipelines = weakref.WeakSet()
            # Registered after multiprocessing's own hook (imported with torch): exit hooks run
            # last-registered first, so this one runs before the workers get their SIGTERM.
            atexit.register(WorkerSignals._exit)
        WorkerSignals._flags.append(self.exiting)

    @staticmethod
    def _exit() -> None:
        for pipe in list(WorkerSignals._pipelines or ()):
            pipe.close()
        for flag in WorkerSignals._flags:
            flag.value = 1

    def __call__(self, worker_id: int) -> None:
        import signal

        exiting = self.exiting

        def on_sigterm(signum, frame):
            if exiting.value:  # the training process is exiting and ending its workers: die of it,
                signal.signal(signum, signal.SIG_DFL)  # as DataLoader expects of a worker it ends
                os.kill(os.getpid(), signum)

        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class BatchSlots:
    """Shared memory that each DataLoader worker reuses for its batches, lent to the training
    process one batch at a time.

    A batch leaves a worker in shared memory. A new segment for every batch, as torch's default
    collate makes, costs the worker the segment and a page fault for every 4 KiB it writes,
    and the training process a fresh mapping of it: about 1 ms per 8-frame 224 px clip, half as
    much as the clip's crop and resize. Here a worker keeps up to ``per_worker`` segments and writes
    a batch into one that the training process no longer reads. The batch carries a lease
    (``out["lease"]``) that gives its slot back when the training process drops it: once it has
    copied the clips (``thwc_uint8_to_bcthw`` does), or when the batch is discarded (a restarted
    iterator drops the batches in flight). A worker with no slot free allocates a new segment,
    as before, so a lease that is kept costs memory, never a batch. A worker allocates a slot
    only when the others are lent: it keeps as many segments as it had batches in flight at
    most, until it exits.

    Who holds a slot is in one shared array, one entry per worker and slot: 0 or the random
    token of the worker process that lent it. A worker restarted with the same id has another
    token, so a slot left busy by its predecessor (its batch never received) is taken over,
    and a late lease of the predecessor cannot free the slot of its successor.
    """

    def __init__(self, num_workers: int, per_worker: int):
        import multiprocessing

        ctx = multiprocessing.get_context()
        self.per_worker = per_worker
        self.holder = ctx.Array("q", num_workers * per_worker, lock=False)
        self.lock = ctx.Lock()
        self.key = int.from_bytes(os.urandom(8), "little") >> 1
        _slots_here[self.key] = self  # the training process's side: where leases come back

    def lend(self, nbytes: int) -> tuple[torch.UntypedStorage, _Lease] | None:
        """In a worker: a shared segment of at least ``nbytes`` to write a batch into and the
        lease to send with it, or None when every slot of this worker is lent."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return None
        token, storages = _lender(self.key)
        first = info.id * self.per_worker
        if not self.lock.acquire(timeout=1):
            return None
        try:
            for slot in range(first, first + self.per_worker):
                if self.holder[slot] != token:  # free, or left busy by a predecessor
                    self.holder[slot] = token
                    break
            else:
                return None
        finally:
            self.lock.release()
        storage = storages.get(slot)
        if storage is None or storage.nbytes() < nbytes:
            storages.pop(slot, None)  # freed before its successor is allocated
            try:
                storage = storages[slot] = _new_shared(nbytes)
            except SharedMemoryFull:
                self.give_back(slot, token)
                raise
        return storage, _Lease(self.key, slot, token)

    def give_back(self, slot: int, token: int) -> None:
        """In the training process: the worker may write into ``slot`` again."""
        if self.lock.acquire(timeout=1):  # a worker killed holding the lock: the slot stays lent
            try:
                if self.holder[slot] == token:
                    self.holder[slot] = 0
            finally:
                self.lock.release()


class SharedMemoryFull(OSError):
    """A worker could not allocate a batch's shared memory: /dev/shm is full."""


def _new_shared(nbytes: int) -> torch.UntypedStorage:
    try:
        return torch.UntypedStorage._new_shared(nbytes)
    except RuntimeError as e:  # torch: "unable to allocate shared memory(shm) ...: No space left on device (28)"
        if "No space left on device" not in str(e):
            raise
        raise SharedMemoryFull(
            errno.ENOSPC, f"no space left in shared memory (/dev/shm) for a batch of {nbytes / 2**20:.1f} MiB "
            f"from a DataLoader worker: give it more (docker run --shm-size, a larger /dev/shm) or lower "
            f"--num_workers or --batch_size") from e


_slots_here: weakref.WeakValueDictionary[int, BatchSlots] = weakref.WeakValueDictionary()
_lenders: dict[tuple[int, int], tuple[int, dict]] = {}


def _lender(key: int) -> tuple[int, dict[int, torch.UntypedStorage]]:
    """This worker process's token and segments for the :class:`BatchSlots` ``key``."""
    state = _lenders.get((key, os.getpid()))
    if state is None:
        state = _lenders[key, os.getpid()] = (int.from_bytes(os.urandom(8), "little") >> 1 or 1, {})
    return state


class _Lease:
    """Sent with a batch written into a lent slot; arrives in the training process as a
    :class:`_HeldSlot`."""

    def __init__(self, key: int, slot: int, token: int):
        self.key, self.slot, self.token = key, slot, token

    def __reduce__(self):
        return _HeldSlot, (self.key, self.slot, self.token)


class _HeldSlot:
    """A lent slot in the training process: given back when the last reference to it dies."""

    def __init__(self, key: int, slot: int, token: int):
        self.slots, self.slot, self.token = _slots_here.get(key), slot, token

    def __del__(self):
        if self.slots is not None:
            self.slots.give_back(self.slot, self.token)


def cat_for_transfer(tensors: list[torch.Tensor],
                     slots: BatchSlots | None = None) -> tuple[torch.Tensor, _Lease | None]:
    """``torch.cat`` of a batch's clips and its lease. Inside a DataLoader worker the clips go
    straight into shared memory, as torch's default_collate does, so that the batch leaves the
    worker without another copy: into a lent slot of ``slots`` where one is free (see
    :class:`BatchSlots`), else into a new segment."""
    if torch.utils.data.get_worker_info() is None:
        return torch.cat(tensors), None
    first = tensors[0]
    shape = (sum(len(t) for t in tensors), *first.shape[1:])
    nbytes = math.prod(shape) * first.element_size()
    lent = slots.lend(nbytes) if slots is not None else None
    if lent is None:
        storage, lease = _new_shared(nbytes), None
    else:
        storage, lease = lent
    into = first.new_empty(0).set_(storage, 0, shape)
    return torch.cat(tensors, out=into), lease


def collate(items: list[dict], slots: BatchSlots | None = None) -> dict:
    """One batch: the clips as one tensor, labels, indexes and views as numpy arrays.

    Every tensor leaves a worker through a shared-memory segment and a file descriptor sent
    over a socket (about 0.3 ms each for the main process); the three small per-clip arrays
    travel inside the pickled message instead, and become tensors in the main process. The
    clips' segment is one of ``slots`` where a slot is free; the batch's ``lease`` then gives
    it back when the main process drops it.
    """
    good = [it for it in items if it["clips"] is not None]
    out = {"failures": [f for it in items for f in it["failures"]]}
    if good:
        if isinstance(items, _LaidOut):  # written in place by the worker
            out["clips"], lease = items.rows, items.lease
        else:
            try:
                out["clips"], lease = cat_for_transfer([it["clips"] for it in good], slots)
            except SharedMemoryFull as e:  # raised again by the training process, as one line
                out["shm_full"] = e.strerror
                return out
        if lease is not None:
            out["lease"] = lease
        out["labels"] = np.array([it["label"] for it in good for _ in it["index"]], dtype=np.int64)
        out["index"] = np.array([i for it in good for i in it["index"]], dtype=np.int64)
        out["view"] = np.array([v for it in good for v in it["view"]], dtype=np.int64)
    return out


class DecodingPipeline:
    """A :class:`~pipelines.base.Pipeline` over a CPU ``read_frames`` function."""

    def __init__(self, cfg: PipelineConfig, read_frames: ReadFrames):
        self.cfg = cfg
        records, infos = load_dataset(cfg)
        self.records = records
        self.num_samples = len(records)
        self.dataset = ClipDataset(records, infos, make_sampler(cfg), read_frames, train=cfg.train,
                                   replace=training_epoch(cfg))
        self.keys = EpochKeys(len(records), cfg)
        self.batches_per_epoch = batches_per_epoch(len(self.keys), cfg, f"{cfg.list_path} ({len(records)} readable videos)")
        # Training with workers reads one stream of keys across epochs (see KeyStream): the
        # iterator is kept while epochs are read to their end, one after another.
        self.stream = KeyStream(self.keys) if training_epoch(cfg) and cfg.num_workers > 0 else None
        self._batches = None  # the stream's DataLoader iterator
        self._stream_at: tuple[int, int] | None = None  # the (epoch, skip) it yields next
        prefetch = 4
        # Each worker has up to `prefetch` batches in flight, and the training process reads one
        # more: as much shared memory as the batches in flight took before slots, now kept.
        slots = BatchSlots(cfg.num_workers, prefetch + 1) if cfg.num_workers > 0 else None
        self.dataset.slots = slots
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.batch_size, sampler=self.stream or self.keys, num_workers=cfg.num_workers,
            collate_fn=functools.partial(collate, slots=slots), pin_memory=torch.device(cfg.device).type == "cuda",
            drop_last=training_epoch(cfg), persistent_workers=cfg.num_workers > 0,
            prefetch_factor=prefetch if cfg.num_workers > 0 else None,
            worker_init_fn=WorkerSignals() if cfg.num_workers > 0 else None,
            # Its own generator: a new iterator (each epoch, or a resume mid-epoch) must not draw
            # from the global RNG that dropout uses, or a resumed run would diverge.
            generator=torch.Generator().manual_seed(cfg.seed))
        self._mapped: dict[int, torch.UntypedStorage] = {}  # lent slot -> its segment, mapped here
        if cfg.num_workers > 0:
            WorkerSignals._pipelines.add(self)
        self.bad: list[tuple[str, str]] = []

    def close(self) -> None:
        """Stops the decoding workers now (persistent, they otherwise live as long as the pipeline)."""
        it = getattr(self.loader, "_iterator", None)  # where DataLoader keeps persistent workers
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
        self._batches = self._stream_at = None
        self._mapped.clear()

    def __len__(self) -> int:
        return self.batches_per_epoch  # a full epoch, whatever a resume skips

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Reseed for ``epoch``; a resumed run starts ``skip_batches`` into it without decoding them."""
        self.keys.epoch, self.keys.skip = epoch, skip_batches * self.cfg.batch_size

    def _epoch_outputs(self) -> Iterator[dict]:
        """The collated outputs of this epoch: a fresh DataLoader epoch, or the next part of the
        stream when the previous epoch was read to its end and this one follows it."""
        if self.stream is None:
            yield from self.loader
            return
        start = (self.keys.epoch, self.keys.skip)
        if self._batches is None or self._stream_at != start:
            self.stream.start = start  # read when the iterator starts: in-flight batches are dropped
            self._batches = iter(self.loader)
        self._stream_at = None  # unknown until this epoch is read to its end
        for _ in range(len(self.keys) // self.cfg.batch_size):
            yield next(self._batches)
        self._stream_at = (start[0] + 1, 0)

    def __iter__(self) -> Iterator[Batch]:
        self.bad = []
        for out in self._epoch_outputs():
            if "shm_full" in out:
                raise SharedMemoryFull(errno.ENOSPC, out["shm_full"])
            if out["failures"]:
                report_bad_videos(out["failures"], training_epoch(self.cfg))
                self.bad += out["failures"]
                check_bad_videos(self.bad, len(self.keys), self.cfg.max_bad_fraction)
            if "clips" not in out:
                continue
            device = self.cfg.device
            labels, index, view = row_ids_to_device(out["labels"], out["index"], out["view"], device)
            lease = out.pop("lease", None)
            if lease is not None and out["clips"].is_shared():  # not a pinned copy (pin_memory's thread)
                # The slot's segment stays mapped: its next batch needs no new mapping.
                self._mapped[lease.slot] = out["clips"].untyped_storage()
            clips = thwc_uint8_to_bcthw(out.pop("clips"), device)  # a copy: on the device, or float
            del lease  # the worker may write another batch where these clips were
            yield Batch(clips, labels, index, view)
        summarise_bad_videos(self.keys.epoch, self.bad, training_epoch(self.cfg))
