"""The clip sampler: which frames and which crop each sample uses, decided once for every backend.

`ClipSampler` turns (sample index, epoch, video size) into a `ClipSpec`: source frame numbers,
a crop box in source pixels, a flip and the clip's RandAugment ops (`pipelines.randaugment`,
drawn from the spec's `aug_seed`). PyAV, DALI and the feature cache only execute specs,
so they can be compared frame for frame. Training follows the reference recipe (EVL spec
section 2): dense or segment ("TSN") frame sampling and torchvision's RandomResizedCrop box;
evaluation follows the reference's temporal views and its resize-short-side-then-crop spatial
views, re-expressed as boxes in the source frame. Every random draw is keyed by
(seed, epoch, index), so a sample's clip does not depend on call order, worker count or the
number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .randaugment import AugOp, RandAugmentPolicy

__all__ = ["ClipSpec", "ClipSampler", "epoch_permutation", "shard_indices"]

# One random stream per decision, so that e.g. turning on flips does not change the crops.
# Streams are numbered from 1: numpy's SeedSequence pads short keys with zeros, so
# [seed, epoch] (epoch_permutation) equals [seed, epoch, 0, 0] and must never be a sample's key.
_TIME, _CROP, _FLIP, _AUG = 1, 2, 3, 4


@dataclass(frozen=True)
class ClipSpec:
    """One clip to decode: frames in presentation order, RandAugment `augment` on whole frames
    (the same ops for every frame), then crop `(top, left, height, width)` in source pixels,
    resize to the sampler's `size` squared, then flip if `flip`."""

    index: int
    view: int
    frame_indices: tuple[int, ...]
    crop: tuple[int, int, int, int]
    flip: bool
    aug_seed: int
    augment: tuple[AugOp, ...] = ()


def _rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    # default_rng's stream, built without its argument checks: 12 instead of 20 us, four per clip.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index, stream])))


def _frame_range(n: int, first_frame: int, last_frame: int | None) -> tuple[int, int]:
    if n < 1:
        raise ValueError(f"num_frames_in_video must be at least 1, got {n}")
    # A segment end converted from seconds may overshoot the probed frame count by rounding.
    last = n if last_frame is None else min(last_frame, n)
    if not 0 <= first_frame < last:
        raise ValueError(
            f"empty frame range [{first_frame}, {last_frame}) in a video of {n} frames"
        )
    return first_frame, last


def _random_resized_crop(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest central crop whose aspect ratio is within range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


class ClipSampler:
    """Decides the frames and crop of every training clip and evaluation view.

    `mode="dense"`: `num_frames` frames `sampling_rate` apart; `mode="segment"`: one frame from
    each of `num_frames` equal segments (`sampling_rate` unused). Training crops follow
    RandomResizedCrop(`size`, `scale`, `ratio`), flip with probability `hflip` and, with an
    `augment` policy, RandAugment; evaluation gives `num_spatial_views * num_temporal_views`
    views per video.
    """

    def __init__(
        self,
        *,
        num_frames: int,
        sampling_rate: int,
        size: int = 224,
        mode: str = "dense",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.0,
        num_temporal_views: int = 1,
        num_spatial_views: int = 1,
        augment: RandAugmentPolicy | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in ("dense", "segment"):
            raise ValueError(f"mode must be 'dense' or 'segment', got {mode!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        if mode == "dense" and sampling_rate < 1:
            raise ValueError(f"sampling_rate must be at least 1, got {sampling_rate}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip is a probability, got {hflip}")
        if num_temporal_views < 1:
            raise ValueError(f"num_temporal_views must be at least 1, got {num_temporal_views}")
        if num_spatial_views not in (1, 3):
            # The reference defines 1 (centre) and 3 (start / middle / end) spatial views only.
            raise ValueError(f"num_spatial_views must be 1 or 3, got {num_spatial_views}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_frames = num_frames
        self.sampling_rate = sampling_rate
        self.size = size
        self.mode = mode
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.num_temporal_views = num_temporal_views
        self.num_spatial_views = num_spatial_views
        self.augment = augment
        self.seed = seed

    @property
    def num_views(self) -> int:
        """Evaluation views per video."""
        return self.num_spatial_views * self.num_temporal_views

    @property
    def span(self) -> int:
        """Source frames covered by a dense clip: `(T - 1) * s + 1`."""
        return (self.num_frames - 1) * self.sampling_rate + 1

    def __repr__(self) -> str:
        return (
            f"ClipSampler(num_frames={self.num_frames}, sampling_rate={self.sampling_rate}, "
            f"size={self.size}, mode={self.mode!r}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip}, num_temporal_views={self.num_temporal_views}, "
            f"num_spatial_views={self.num_spatial_views}, "
            f"augment={self.augment.spec if self.augment else None!r}, seed={self.seed})"
        )

    # -- training ----------------------------------------------------------------------------

    def train_clip(
        self,
        index: int,
        epoch: int,
        *,
        num_frames_in_video: int,
        height: int,
        width: int,
        first_frame: int = 0,
        last_frame: int | None = None,
    ) -> ClipSpec:
        """The random training clip of sample `index` in `epoch`, within
        `[first_frame, last_frame)` of the video."""
        if index < 0 or epoch < 0:
            raise ValueError(f"index and epoch must be non-negative, got {index}, {epoch}")
        if height < 1 or width < 1:
            raise ValueError(f"frame size must be positive, got {height}x{width}")
        first, last = _frame_range(num_frames_in_video, first_frame, last_frame)
        n = last - first
        rng = _rng(self.seed, epoch, index, _TIME)
        if self.mode == "segment":
            # The reference's TSN sampling: segment bounds rounded, the end frame included.
            seg = (n - 1) / self.num_frames
            offsets = [
                int(rng.integers(round(seg * i), round(seg * (i + 1)) + 1))
                for i in range(self.num_frames)
            ]
        elif self.span >= n:
            offsets = [min(i * self.sampling_rate, n - 1) for i in range(self.num_frames)]
        else:
            start = int(rng.integers(0, n - self.span + 1))
            offsets = [start + i * self.sampling_rate for i in range(self.num_frames)]

        crop = _random_resized_crop(
            _rng(self.seed, epoch, index, _CROP), height, width, self.scale, self.ratio
        )
        flip = self.hflip > 0 and bool(_rng(self.seed, epoch, index, _FLIP).random() < self.hflip)
        aug_seed = int(_rng(self.seed, epoch, index, _AUG).integers(0, 2**31))
        return ClipSpec(
            index=index,
            view=0,
            frame_indices=tuple(first + o for o in offsets),
            crop=crop,
            flip=flip,
            aug_seed=aug_seed,
            augment=self.augment.decide(aug_seed) if self.augment else (),
        )

    # -- evaluation --------------------------------------------------------------------------

    def _temporal_views(self, n: int) -> list[list[int]]:
        """Frame offsets of each temporal view in a range of `n` frames."""
        views = self.num_temporal_views
        if self.mode == "segment":
            # Not in the reference (its evaluation is dense only): view v takes the frame at
            # (v + 1) / (views + 1) of each training segment, i.e. the middle for one view.
            seg = (n - 1) / self.num_frames
            result = []
            for v in range(views):
                offsets = []
                for i in range(self.num_frames):
                    lo, hi = round(seg * i), round(seg * (i + 1))
                    offsets.append(lo + (hi - lo) * (v + 1) // (views + 1))
                result.append(offsets)
            return result
        # The reference pads a short video to the span by repeating its last frame.
        slide = max(n - self.span, 0)
        result = []
        for v in range(views):
            start = slide // 2 if views == 1 else round(slide / (views - 1) * v)
            result.append(
                [min(start + j * self.sampling_rate, n - 1) for j in range(self.num_frames)]
            )
        return result

    def _spatial_views(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The reference's crops of the short-side-resized frame, as boxes in source pixels."""
        size = self.size
        # The reference's resize: short side to `size`, long side floored.
        if height < width:
            new_h, new_w = size, width * size // height
        else:
            new_h, new_w = height * size // width, size
        if self.num_spatial_views == 1:
            starts = [((new_h - size) // 2, (new_w - size) // 2)]
        else:
            margin = max(new_h, new_w) - size
            along = [0, margin // 2, margin]
            # Crops move along the long side: down for portrait, right otherwise.
            starts = [(s, 0) for s in along] if height > width else [(0, s) for s in along]
        side = min(height, width)
        half = size / 2
        boxes = []
        for top_r, left_r in starts:
            # Map the crop's centre (resized x -> source x * source / resized, as bilinear
            # with align_corners=False does), then round half up. Centres, not corners: the
            # floored resize makes a resized crop slightly wider than `side` source pixels,
            # and mapping corners would leave the end crop a pixel short of the frame's edge.
            top = math.floor((top_r + half) * height / new_h - side / 2 + 0.5)
            left = math.floor((left_r + half) * width / new_w - side / 2 + 0.5)
            top = min(max(top, 0), height - side)
            left = min(max(left, 0), width - side)
            boxes.append((top, left, side, side))
        return boxes

    def eval_clips(
        self,
        index: int,
        *,
        num_frames_in_video: int,
        height: int,
        width: int,
        first_frame: int = 0,
        last_frame: int | None = None,
    ) -> list[ClipSpec]:
        """All evaluation views of sample `index`; view = spatial * num_temporal_views + temporal."""
        if height < 1 or width < 1:
            raise ValueError(f"frame size must be positive, got {height}x{width}")
        first, last = _frame_range(num_frames_in_video, first_frame, last_frame)
        temporal = self._temporal_views(last - first)
        specs = []
        for s, box in enumerate(self._spatial_views(height, width)):
            for t, offsets in enumerate(temporal):
                specs.append(
                    ClipSpec(
                        index=index,
                        view=s * self.num_temporal_views + t,
                        frame_indices=tuple(first + o for o in offsets),
                        crop=box,
                        flip=False,
                        aug_seed=0,
                    )
                )
        return specs


def shard_indices(num_samples: int, rank: int, world_size: int, *, pad: bool) -> list[int]:
    """Positions `rank::world_size` of `range(num_samples)` for one process.

    `pad=True` (training) wraps around to the start so every rank gets the same count and the
    ranks step together; `pad=False` (evaluation) never repeats a sample, so each is counted
    exactly once across ranks and the counts may differ by one.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be non-negative, got {num_samples}")
    if not pad or num_samples == 0:
        return list(range(rank, num_samples, world_size))
    total = math.ceil(num_samples / world_size) * world_size
    return [i % num_samples for i in range(rank, total, world_size)]


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of `epoch`, the same on every process."""
    if num_samples < 0 or seed < 0 or epoch < 0:
        raise ValueError("num_samples, seed and epoch must be non-negative")
    return np.random.default_rng([seed, epoch]).permutation(num_samples)
