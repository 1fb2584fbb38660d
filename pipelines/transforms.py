"""Executing a :class:`~pipelines.sampling.ClipSpec` on decoded frames, on the CPU.

The sampler has already decided the frames, the crop box, the flip and the RandAugment ops;
this applies them to ``[T, H, W, 3]`` uint8 frames: RandAugment as on whole frames, the same ops
for every frame, then crop, resize to ``size x size`` (bilinear, antialiased, as DALI's resize)
and flip (evl-spec §2), fused into one pass by :mod:`pipelines.augment`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .augment import augment_clip, crop_resize
from .sampling import ClipSpec

__all__ = ["apply_spec", "crop_in_read", "crop_resize", "decode_clips", "read_box"]


def apply_spec(frames: np.ndarray, spec: ClipSpec, size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decoded frames of ``spec.frame_indices`` -> the clip ``[T, size, size, 3]`` uint8, written
    into ``out`` (a contiguous tensor of that shape: a batch's rows) where given."""
    if spec.augment:
        clip = augment_clip(frames, spec.augment, spec.crop, size, spec.flip)
        return clip if out is None else out.copy_(clip)
    return crop_resize(frames, spec.crop, size, spec.flip, out)


def read_box(spec: ClipSpec) -> tuple[int, int, int, int] | None:
    """What of each frame a clip needs read: its crop box, or None (the whole frame) for a clip
    with RandAugment, whose ops see the whole frame."""
    return None if spec.augment else spec.crop


def crop_in_read(spec: ClipSpec) -> tuple[int, int, int, int]:
    """The clip's crop box in the frames as ``read_box`` has them read: the box itself where
    whole frames are read, else all of what was read."""
    return spec.crop if read_box(spec) is None else (0, 0, *spec.crop[2:])


def decode_clips(read_frames: Callable[..., np.ndarray], path: str, specs: Sequence[ClipSpec],
                 size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode and transform the clips of ``specs`` from one video: ``[V, T, size, size, 3]`` uint8,
    written into ``out`` (a contiguous tensor of that shape: a batch's rows) where given.

    Views share frames (three crops of one temporal window), so each frame is decoded once. Of
    a clip without RandAugment, only the crop box is read (``read_box``).
    """
    if len(specs) == 1:  # the reader returns its rows in the clip's order, repeats included
        spec = specs[0]
        box = read_box(spec)
        frames = read_frames(path, spec.frame_indices, crop=box)
        dst = None if out is None else out[0]
        # Where the frames are the box, contiguous, the resize reads them without another copy.
        clip = (apply_spec(frames, spec, size, dst) if box is None else
                crop_resize(frames, crop_in_read(spec), size, spec.flip, dst))
        return clip[None] if out is None else out
    wanted = sorted({i for s in specs for i in s.frame_indices})
    frames = read_frames(path, wanted)
    row = {f: r for r, f in enumerate(wanted)}
    if out is None:
        out = torch.empty((len(specs), len(specs[0].frame_indices), size, size, 3), dtype=torch.uint8)
    for spec, dst in zip(specs, out):  # each resized straight into its rows
        if list(spec.frame_indices) == wanted:
            apply_spec(frames, spec, size, dst)
            continue
        own = [row[i] for i in spec.frame_indices]
        box = read_box(spec)
        if box is None:
            apply_spec(frames[own], spec, size, dst)
        else:  # of another temporal window's frames, only the box is copied
            top, left, h, w = box
            crop_resize(frames[own, top:top + h, left:left + w], crop_in_read(spec), size, spec.flip, dst)
    return out
