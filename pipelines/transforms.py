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

__all__ = ["apply_spec", "crop_resize", "decode_clips"]


def apply_spec(frames: np.ndarray, spec: ClipSpec, size: int) -> torch.Tensor:
    """Decoded frames of ``spec.frame_indices`` -> the clip ``[T, size, size, 3]`` uint8."""
    if spec.augment:
        return augment_clip(frames, spec.augment, spec.crop, size, spec.flip)
    return crop_resize(frames, spec.crop, size, spec.flip)


def decode_clips(read_frames: Callable[..., np.ndarray], path: str, specs: Sequence[ClipSpec],
                 size: int) -> torch.Tensor:
    """Decode and transform the clips of ``specs`` from one video: ``[V, T, size, size, 3]`` uint8.

    Views share frames (three crops of one temporal window), so each frame is decoded once. Of
    a clip without RandAugment (whose ops see the whole frame), only the crop box is read.
    """
    wanted = sorted({i for s in specs for i in s.frame_indices})
    if len(specs) == 1 and not specs[0].augment:
        spec = specs[0]
        frames = read_frames(path, wanted, crop=spec.crop)
        if list(spec.frame_indices) != wanted:
            frames = frames[[wanted.index(i) for i in spec.frame_indices]]
        # The frames are the box, contiguous: the resize reads them without another copy.
        return crop_resize(frames, (0, 0, *spec.crop[2:]), size, spec.flip)[None]
    frames = read_frames(path, wanted)
    row = {f: r for r, f in enumerate(wanted)}

    def clip(spec: ClipSpec) -> torch.Tensor:
        # A training clip's frames are usually the decoded ones, in order: no copy then.
        own = frames if list(spec.frame_indices) == wanted else frames[[row[i] for i in spec.frame_indices]]
        return apply_spec(own, spec, size)

    return clip(specs[0])[None] if len(specs) == 1 else torch.stack([clip(s) for s in specs])
