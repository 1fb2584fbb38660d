"""The fused CPU RandAugment against timm's PIL ops in the reference's order (whole frames, then
crop and resize), on natural frames: per op at several magnitudes, and whole recipe sequences.

Colour ops follow PIL's arithmetic, so they match exactly or within a level; geometry is the same
map, sampled bilinearly where PIL is bicubic (checked exactly against PIL's bilinear too). The
numbers these tests hold are in docs/augmentation.md.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipelines.augment import augment_clip, crop_resize, plan_clip, reference_clip as reference
from pipelines.randaugment import FILL, GEOMETRIC, INCREASING_TRANSFORMS, TRANSFORMS, AugOp, _arg, parse_policy
from pipelines.sampling import ClipSampler
from videos import photo_frames

timm_aa = pytest.importorskip("timm.data.auto_augment")
H, W, S = 192, 256, 160
FRAMES = photo_frames(2, H, W)
CROPS = [(0, 0, H, W), (20, 30, 140, 150), (60, 100, 90, 70), (0, 40, H, 180)]


def psnr(a, b) -> float:
    mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def ours(frames, ops, crop, size) -> np.ndarray:
    return augment_clip(frames, ops, crop, size).numpy()


def op_at(name: str, magnitude: float, sign: int = 0) -> AugOp:
    return AugOp(name, magnitude, _arg(name, magnitude, random.Random(sign)))


COLOUR = [n for n in INCREASING_TRANSFORMS + TRANSFORMS if n not in GEOMETRIC]


@pytest.mark.parametrize("name", sorted(set(COLOUR)))
def test_colour_ops_match_pil(name):
    """Point ops exactly; the statistics ops (histograms of every other pixel) and Color and
    Sharpness (rounded once, not twice) within a level or so."""
    floor = 42.0 if name in ("AutoContrast", "Equalize", "Color", "ColorIncreasing", "Sharpness",
                             "SharpnessIncreasing") else float("inf")
    for magnitude in (1, 4, 7, 10):
        op = op_at(name, magnitude)
        for crop in CROPS:
            got = psnr(reference(FRAMES, [op], crop, S), ours(FRAMES, [op], crop, S))
            assert got >= floor, (op, crop, got)


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_geometry_is_pils_map(name):
    """The same affine map as PIL: against PIL's bilinear resampling only rounding and the hard
    fill edge differ; against its bicubic (the recipe's), the kernel."""
    for magnitude in (2, 6, 10):
        for sign in (0, 3):
            op = op_at(name, magnitude, sign)
            square = np.ascontiguousarray(FRAMES[:, :, :H])
            same = psnr(reference(square, [op], (0, 0, H, H), H, "bilinear"), ours(square, [op], (0, 0, H, H), H))
            assert same >= 45, (op, same)
            for crop in CROPS:
                got = psnr(reference(FRAMES, [op], crop, S), ours(FRAMES, [op], crop, S))
                assert got >= 32, (op, crop, got)


def test_recipe_sequences_stay_close_to_the_reference_order():
    """Whole decisions of the paper's policy: colour ops at source resolution, one resampling,
    each geometric op's grey coloured by the ops after it."""
    policy = parse_policy("rand-m7-n4-mstd0.5-inc1")
    sampler = ClipSampler(num_frames=2, sampling_rate=1, size=S, augment=policy)
    values = []
    for i in range(80):
        spec = sampler.train_clip(i, 0, num_frames_in_video=2, height=H, width=W)
        values.append(psnr(reference(FRAMES, spec.augment, spec.crop, S), ours(FRAMES, spec.augment, spec.crop, S)))
    values = np.array(values)
    assert np.median(values) >= 38 and np.percentile(values, 10) >= 28, np.sort(values)[:10]


def test_fill_takes_only_the_ops_after_it():
    """A rotation's grey corners: darkened by a Brightness after it, untouched by one before."""
    rotate, dim = AugOp("Rotate", 10, 30.0), AugOp("Brightness", 10, 0.1)
    after = ours(FRAMES, [rotate, dim], (0, 0, H, W), S)
    before = ours(FRAMES, [dim, rotate], (0, 0, H, W), S)
    assert (after[:, 0, 0] == int(0.1 * FILL)).all() and (before[:, 0, 0] == FILL).all()
    assert abs(int(after[0, S // 2, S // 2, 0]) - int(before[0, S // 2, S // 2, 0])) <= 2


def test_statistics_are_the_whole_frames():
    """AutoContrast of a crop stretches by the whole frame's range, as the reference does: here
    the frame spans 0-255 (its edges), the crop 64-191, so the crop must come out unstretched."""
    frames = (64 + FRAMES // 2).astype(np.uint8)
    frames[:, :10], frames[:, -10:] = 0, 255
    op, crop = AugOp("AutoContrast", 5, None), (60, 60, 100, 100)
    whole = reference(frames, [op], crop, S)
    assert np.array_equal(whole, crop_resize(frames, crop, S).numpy())
    assert psnr(whole, ours(frames, [op], crop, S)) >= 44
    top, left, h, w = crop
    crop_only = ours(np.ascontiguousarray(frames[:, top:top + h, left:left + w]), [op], (0, 0, h, w), S)
    assert psnr(whole, crop_only) < 25  # what the crop's own statistics would give


def test_crop_off_the_frame_is_all_fill():
    ops = [AugOp("TranslateXRel", 10, 0.45), AugOp("TranslateXRel", 10, 0.45), AugOp("TranslateXRel", 10, 0.45)]
    assert plan_clip(ops, H, W, (0, 0, 50, 50), S).region is None
    assert (ours(FRAMES, ops, (0, 0, 50, 50), S) == FILL).all()


def test_no_ops_is_the_plain_crop_and_flip():
    crop = CROPS[1]
    assert torch.equal(augment_clip(FRAMES, [], crop, S, flip=True), crop_resize(FRAMES, crop, S, flip=True))
