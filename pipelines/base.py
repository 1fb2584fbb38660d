"""The contract between data pipelines and the training loop.

A pipeline is built once per split by :func:`pipelines.build_pipeline` from a
:class:`PipelineConfig`. Iterating it yields :class:`Batch` es already on the training device:
``clips`` float ``[B, 3, T, H, W]`` normalised with CLIP's mean and std (or, for the feature
cache, the backbone ``features``), ``labels`` int64 ``[B]``, and for evaluation the sample
``index`` and ``view`` of every row so that views of one video can be averaged. ``len()`` is
the number of batches this process yields per epoch; ``set_epoch(epoch, skip_batches)``
reseeds the sampler and lets a resumed run start mid-epoch without decoding what it skips.
Sharding is by ``rank`` / ``world_size``: training shards are padded to equal length, evaluation
shards hold every video exactly once.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Protocol, Sequence

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Batch(NamedTuple):
    clips: torch.Tensor | None  # [B, 3, T, H, W] float, normalised; None when features are given
    labels: torch.Tensor  # [B] int64
    index: torch.Tensor  # [B] int64 sample index in the list
    view: torch.Tensor  # [B] int64 view number (0 in training)
    features: Sequence[Any] | None = None  # cached backbone features (pipelines.cache)

    def rows(self, sl: slice) -> "Batch":
        """Rows ``sl`` of the batch (each field of the cached features sliced alike)."""
        features = None if self.features is None else [type(f)(*(t[sl] for t in f)) for f in self.features]
        return Batch(None if self.clips is None else self.clips[sl], self.labels[sl], self.index[sl], self.view[sl],
                     features)


@dataclass
class PipelineConfig:
    list_path: str | None
    num_classes: int
    num_frames: int = 8
    sampling_rate: int = 16
    sampling: str = "dense"  # or "segment" (TSN)
    input_size: int = 224
    batch_size: int = 32
    train: bool = True
    data_root: str | None = None
    num_workers: int = 4
    num_spatial_views: int = 1
    num_temporal_views: int = 1
    auto_augment: str | None = None  # e.g. "rand-m7-n4-mstd0.5-inc1"
    hflip: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int = 0
    device: str = "cpu"
    rank: int = 0
    world_size: int = 1
    max_bad_fraction: float = 0.01  # stop when more than this share of an epoch is unreadable
    # Read exactly these (epoch, index) keys, in this order: no shuffling, sharding, dropped last
    # batch or replacement of a bad video (it is left out and reported in ``bad``). Batch.view is
    # then the key's epoch for a training key. For jobs that read a list once (the feature cache).
    keys: Sequence[tuple[int, int]] | None = None
    # A listed file that does not exist is an unreadable video, not an error in the list, and
    # the videos left out at the probe are not logged: for jobs that report what they could not
    # read themselves (feature extraction).
    missing_ok: bool = False
    # pipelines.dataset.probe_dataset's result for this configuration, when the caller has probed
    # the list already (to choose what to read): the pipeline takes it instead of reading again.
    probed: tuple | None = None
    extra: dict = field(default_factory=dict)  # backend-specific options (e.g. feature_cache dir)


class Pipeline(Protocol):
    num_samples: int  # videos in the list (all ranks)

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None: ...

    def __iter__(self) -> Iterator[Batch]: ...


class TooManyBadVideos(RuntimeError):
    """More unreadable videos in an epoch than ``max_bad_fraction`` allows."""


# How every decoding backend reports videos that fail mid-epoch: each one as it happens, the
# epoch's list at its end, and a stop past the limit.
_log = logging.getLogger("pipelines")


def report_bad_videos(failures: Sequence[tuple[str, str]], replaced: bool) -> None:
    for path, reason in failures:
        _log.warning("unreadable video %s (%s): %s", path, reason,
                     "replaced by another sample" if replaced else "skipped")


def check_bad_videos(bad: Sequence[tuple[str, str]], epoch_size: int, max_fraction: float) -> None:
    if len(bad) > max_fraction * epoch_size:
        files = "\n".join(f"  {p}: {r}" for p, r in bad[:50])
        raise TooManyBadVideos(f"{len(bad)} unreadable videos in one epoch of {epoch_size} "
                               f"(limit {max_fraction:.1%}):\n{files}")


def summarise_bad_videos(epoch: int, bad: Sequence[tuple[str, str]], replaced: bool) -> None:
    if bad:
        _log.warning("epoch %d: %d unreadable video(s) %s: %s", epoch, len(bad), "replaced" if replaced else "skipped",
                     ", ".join(sorted({p for p, _ in bad})))


def row_ids_to_device(labels, index, view, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """A batch's labels, indices and views (int64, one per row) on ``device`` in one copy: from
    pinned memory and non-blocking to a GPU, so the host runs ahead instead of waiting for it."""
    rows = torch.stack([torch.as_tensor(x, dtype=torch.long) for x in (labels, index, view)])
    if torch.device(device).type == "cuda":
        rows = rows.pin_memory().to(device, non_blocking=True)
    return tuple(rows.unbind(0))


def thwc_uint8_to_bcthw(clips: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``[B, T, H, W, 3]`` uint8 (as decoders produce) -> ``[B, 3, T, H, W]`` float normalised.

    The uint8 batch travels to the device first: 4x less to copy than float.
    """
    x = clips.to(device, non_blocking=True)
    *lead, w, _ = x.shape
    rows = x.reshape(-1, w * 3)
    # (x / 255 - mean) / std as x * scale + shift, on rows of W*3 values: a factor per channel
    # on a last dimension of 3 does not vectorise.
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64)
    std = torch.tensor(CLIP_STD, dtype=torch.float64)
    scale = (1 / (255 * std)).float().repeat(w).to(x.device)
    shift = (-mean / std).float().repeat(w).to(x.device)
    if x.device.type != "cpu":
        y = rows.float()
        return torch.addcmul(shift, y, scale, out=y).view(*lead, w, 3).permute(0, 4, 1, 2, 3)
    # On a CPU, into reused memory (see _ReusedArrays), a megabyte at a time, converted and then
    # scaled while it is in the core's cache: the batch goes to memory once. Faster than a
    # float table per channel (OpenCV's LUT), which gathers every value.
    y = torch.from_numpy(_float_batches.take(tuple(rows.shape)))
    step = max(1, (1 << 18) // (w * 3))
    for i in range(0, len(rows), step):
        part = y[i:i + step]
        torch.addcmul(shift, part.copy_(rows[i:i + step]), scale, out=part)
    return y.view(*lead, w, 3).permute(0, 4, 1, 2, 3)


class _ReusedArrays:
    """float32 arrays for the CPU's normalised batches, each reused once nothing refers to it.

    A batch is large (38 MB for 8 clips of 8 frames at 224 px), and fresh memory of that size
    comes from the kernel as zeroed pages: handing them over cost about as much as writing the
    batch. Each batch is written into a new view of a kept buffer, and the tensor
    ``torch.from_numpy`` makes of that view holds it until the last tensor, view or array of the
    batch is gone: the buffer is reused only once a weak reference says the view has died. A
    loop that keeps its current batch while the next is made finds the one before free; a
    caller that keeps every batch gets new memory.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self.slots: list = []  # (buffer, weak reference to the view its last batch was written to)
        self.lock = threading.Lock()

    def take(self, shape: tuple[int, ...]):
        """An array of ``shape`` to write a batch into, which the caller must keep (or hand to
        ``torch.from_numpy``) for as long as the batch is used."""
        import numpy as np

        with self.lock:
            spare = None
            for i, (buffer, user) in enumerate(self.slots):
                if user() is None:
                    if buffer.shape == shape:
                        view = buffer.view()
                        self.slots[i] = (buffer, weakref.ref(view))
                        return view
                    spare = i
            buffer = np.empty(shape, np.float32)
            view = buffer.view()
            slot = (buffer, weakref.ref(view))
            if spare is not None:  # another batch size (the last batch, evaluation): replaced
                self.slots[spare] = slot
            elif len(self.slots) < self.keep:
                self.slots.append(slot)
            return view


_float_batches = _ReusedArrays(keep=2)
