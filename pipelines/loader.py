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

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from .base import (Batch, PipelineConfig, TooManyBadVideos, check_bad_videos, report_bad_videos,
                   summarise_bad_videos, thwc_uint8_to_bcthw)
from .lists import VideoRecord, read_list
from .randaugment import parse_policy
from .sampling import ClipSampler, ClipSpec, epoch_permutation, shard_indices
from .transforms import decode_clips

if TYPE_CHECKING:  # the probe reads files with pipelines.pyav, which builds on this module
    from .probe import VideoInfo

log = logging.getLogger(__name__)

ReadFrames = Callable[[str, Sequence[int]], np.ndarray]
MAX_REPLACEMENTS = 10  # tries before a training sample gives up finding a readable video


def probe_cache_path(list_path: str) -> str | None:
    """The probe cache next to the list, or None where that directory is read-only."""
    path = f"{list_path}.probe.json"
    return path if os.access(os.path.dirname(os.path.abspath(path)), os.W_OK) else None


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

    from evl.distributed import gloo_group

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


def load_dataset(cfg: PipelineConfig) -> tuple[list[VideoRecord], list[VideoInfo]]:
    """Read and validate the list, probe its videos, exclude (and report) unreadable ones."""
    from .probe import check_videos, probe_videos

    records = read_list(cfg.list_path, data_root=cfg.data_root, num_classes=cfg.num_classes)
    with local_leader_first():
        infos, failures = probe_videos([r.path for r in records], probe_cache_path(cfg.list_path),
                                       num_workers=min(cfg.num_workers, os.cpu_count() or 1),
                                       progress=cfg.rank == 0 and len(records) > 200)
    warnings = check_videos(infos, [r.path for r in records])
    for i, (record, info) in enumerate(zip(records, infos)):
        if info is None or record.start_sec is None:
            continue
        segment = f"{record.source}: segment {record.start_sec:g}-{record.end_sec:g} s of {record.path}"
        if record.start_sec * info.fps >= info.num_frames:  # nothing of it is in the video
            failures.append((segment, f"starts after the video's end ({info.duration_sec:.2f} s)"))
            infos[i] = None
        elif (record.end_sec * info.fps) - info.num_frames > 1:
            warnings.append(f"{segment}: ends after the video's end ({info.duration_sec:.2f} s); its clips use "
                            "the part in the video")
    if warnings:  # one summary, not one line per file of a large dataset
        more = f"\n  ... and {len(warnings) - 5} more" if len(warnings) > 5 else ""
        log.warning("%s: %d video warning(s):\n  %s%s", cfg.list_path, len(warnings), "\n  ".join(warnings[:5]), more)
    if failures:
        shown = "\n".join(f"  {path}: {reason}" for path, reason in failures[:20])
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        msg = f"{cfg.list_path}: {len(failures)} of {len(records)} videos are unreadable or out of range:\n{shown}{more}"
        if len(failures) > cfg.max_bad_fraction * len(records):
            raise TooManyBadVideos(msg + f"\nthat is more than {cfg.max_bad_fraction:.1%}: fix or remove them")
        log.warning(msg + "\nthey are excluded")
    keep = [i for i, info in enumerate(infos) if info is not None]
    return [records[i] for i in keep], [infos[i] for i in keep]


def frame_range(record: VideoRecord, info: VideoInfo) -> tuple[int, int | None]:
    """An untrimmed segment's [first, last) frames; the whole video for trimmed ones."""
    if record.start_sec is None:
        return 0, None
    first = min(int(round(record.start_sec * info.fps)), info.num_frames - 1)
    return first, max(first + 1, int(round(record.end_sec * info.fps)))


def make_sampler(cfg: PipelineConfig) -> ClipSampler:
    augment = parse_policy(cfg.auto_augment) if cfg.train and cfg.auto_augment else None
    return ClipSampler(
        num_frames=cfg.num_frames, sampling_rate=cfg.sampling_rate, size=cfg.input_size, mode=cfg.sampling,
        scale=cfg.crop_scale, ratio=cfg.crop_ratio, hflip=cfg.hflip if cfg.train else 0.0,
        num_temporal_views=1 if cfg.train else cfg.num_temporal_views,
        num_spatial_views=1 if cfg.train else cfg.num_spatial_views, augment=augment, seed=cfg.seed)


def clip_specs(sampler: ClipSampler, train: bool, key: tuple[int, int], record: VideoRecord,
               info: VideoInfo) -> list[ClipSpec]:
    """The specs of one item: one training clip, or every evaluation view of a video."""
    epoch, index = key
    first, last = frame_range(record, info)
    geometry = dict(num_frames_in_video=info.num_frames, height=info.height, width=info.width,
                    first_frame=first, last_frame=last)
    if train:
        return [sampler.train_clip(index, epoch, **geometry)]
    return sampler.eval_clips(index, **geometry)


class ClipDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by ``(epoch, index)``; returns a dict per item (see ``collate``)."""

    def __init__(self, records: Sequence[VideoRecord], infos: Sequence[VideoInfo], sampler: ClipSampler,
                 read_frames: ReadFrames, *, train: bool):
        self.records, self.infos = list(records), list(infos)
        self.sampler, self.read_frames = sampler, read_frames
        self.train = train

    def __len__(self) -> int:
        return len(self.records)

    def load(self, key: tuple[int, int]) -> tuple[torch.Tensor, list[ClipSpec]]:
        """Decode and transform one item: ``[V, T, S, S, 3]`` uint8 and its specs."""
        record, info = self.records[key[1]], self.infos[key[1]]
        specs = clip_specs(self.sampler, self.train, key, record, info)
        return decode_clips(self.read_frames, record.path, specs, self.sampler.size), specs

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        failures, rng = [], None
        for attempt in range(MAX_REPLACEMENTS if self.train else 1):
            try:
                clips, specs = self.load((epoch, index))
                return {"clips": clips, "label": self.records[index].label, "index": [s.index for s in specs],
                        "view": [s.view for s in specs], "failures": failures}
            except Exception as e:  # noqa: BLE001 -- any decoder failure is a bad video, reported below
                failures.append((self.records[index].path, f"{type(e).__name__}: {e}"))
                if rng is None:  # made on the first failure only: a generator costs 15 us per clip
                    rng = np.random.default_rng([self.sampler.seed, epoch, key[1], 99])
                index = int(rng.integers(len(self.records)))  # a deterministic replacement
        return {"clips": None, "failures": failures}


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
    _pipelines: "weakref.WeakSet[DecodingPipeline]" = None  # the pipelines to shut down at exit

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


def cat_for_transfer(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` of a batch's clips; inside a DataLoader worker straight into shared memory,
    as torch's default_collate does, so that the batch leaves the worker without another copy."""
    into = None
    if torch.utils.data.get_worker_info() is not None:
        first = tensors[0]
        shared = first._typed_storage()._new_shared(sum(t.numel() for t in tensors), device=first.device)
        into = first.new(shared).view(sum(len(t) for t in tensors), *first.shape[1:])
    return torch.cat(tensors, out=into)


def collate(items: list[dict]) -> dict:
    """One batch: the clips as one tensor, labels, indexes and views as numpy arrays.

    Every tensor leaves a worker through a shared-memory segment and a file descriptor sent
    over a socket (about 0.3 ms each for the main process); the three small per-clip arrays
    travel inside the pickled message instead, and become tensors in the main process.
    """
    good = [it for it in items if it["clips"] is not None]
    out = {"failures": [f for it in items for f in it["failures"]]}
    if good:
        out["clips"] = cat_for_transfer([it["clips"] for it in good])
        out["labels"] = np.array([it["label"] for it in good for _ in it["index"]], dtype=np.int64)
        out["index"] = np.array([i for it in good for i in it["index"]], dtype=np.int64)
        out["view"] = np.array([v for it in good for v in it["view"]], dtype=np.int64)
    return out


def train_shard(order: Sequence[int], batch_size: int, rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s part of each global batch of ``order``, whole global batches only.

    Global batch g is ``order[g*G:(g+1)*G]`` with ``G = batch_size * world_size``, whatever the
    number of processes, so 8 GPUs x 32, 4 x 64 and 1 x 256 (with accumulation) see the same
    global batches and, up to float rounding, take the same steps.
    """
    g = batch_size * world_size
    usable = len(order) // g * g
    return [int(order[start + rank * batch_size + j]) for start in range(0, usable, g) for j in range(batch_size)]


class EpochKeys(torch.utils.data.Sampler):
    """This rank's ``(epoch, index)`` keys: a shuffled padded shard (train) or an exact one (eval)."""

    def __init__(self, num_samples: int, cfg: PipelineConfig):
        self.n, self.cfg, self.epoch, self.skip = num_samples, cfg, 0, 0

    def indices(self) -> list[int]:
        cfg = self.cfg
        if not cfg.train:
            return shard_indices(self.n, cfg.rank, cfg.world_size, pad=False)
        return train_shard(epoch_permutation(self.n, cfg.seed, self.epoch), cfg.batch_size, cfg.rank, cfg.world_size)

    def __len__(self) -> int:
        return len(self.indices()) - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.indices()[self.skip:]])


class DecodingPipeline:
    """A :class:`~pipelines.base.Pipeline` over a CPU ``read_frames`` function."""

    def __init__(self, cfg: PipelineConfig, read_frames: ReadFrames):
        self.cfg = cfg
        records, infos = load_dataset(cfg)
        self.records = records
        self.num_samples = len(records)
        self.dataset = ClipDataset(records, infos, make_sampler(cfg), read_frames, train=cfg.train)
        self.keys = EpochKeys(len(records), cfg)
        self.batches_per_epoch = len(self.keys) // cfg.batch_size if cfg.train else -(-len(self.keys) // cfg.batch_size)
        if cfg.train and self.batches_per_epoch == 0:
            raise ValueError(f"{cfg.list_path}: {len(records)} readable videos are fewer than one global batch "
                             f"of {cfg.batch_size} x {cfg.world_size} processes")
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.batch_size, sampler=self.keys, num_workers=cfg.num_workers,
            collate_fn=collate, pin_memory=torch.device(cfg.device).type == "cuda", drop_last=cfg.train,
            persistent_workers=cfg.num_workers > 0, prefetch_factor=4 if cfg.num_workers > 0 else None,
            worker_init_fn=WorkerSignals() if cfg.num_workers > 0 else None,
            # Its own generator: a new iterator (each epoch, or a resume mid-epoch) must not draw
            # from the global RNG that dropout uses, or a resumed run would diverge.
            generator=torch.Generator().manual_seed(cfg.seed))
        if cfg.num_workers > 0:
            WorkerSignals._pipelines.add(self)
        self.bad: list[tuple[str, str]] = []

    def close(self) -> None:
        """Stops the decoding workers now (persistent, they otherwise live as long as the pipeline)."""
        it = getattr(self.loader, "_iterator", None)  # where DataLoader keeps persistent workers
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None

    def __len__(self) -> int:
        return self.batches_per_epoch  # a full epoch, whatever a resume skips

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Reseed for ``epoch``; a resumed run starts ``skip_batches`` into it without decoding them."""
        self.keys.epoch, self.keys.skip = epoch, skip_batches * self.cfg.batch_size

    def __iter__(self) -> Iterator[Batch]:
        self.bad = []
        for out in self.loader:
            if out["failures"]:
                report_bad_videos(out["failures"], self.cfg.train)
                self.bad += out["failures"]
                check_bad_videos(self.bad, len(self.keys), self.cfg.max_bad_fraction)
            if "clips" not in out:
                continue
            device = self.cfg.device
            labels, index, view = (torch.from_numpy(out[k]).to(device) for k in ("labels", "index", "view"))
            yield Batch(thwc_uint8_to_bcthw(out["clips"], device), labels, index, view)
        summarise_bad_videos(self.keys.epoch, self.bad, self.cfg.train)


__all__ = ["DecodingPipeline", "ClipDataset", "EpochKeys", "WorkerSignals", "cat_for_transfer", "collate",
           "load_dataset"]
