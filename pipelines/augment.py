"""A clip's RandAugment decisions executed on the CPU, fused with its crop and resize.

The reference applies RandAugment to whole frames (PIL, one op after another), then crops and
resizes (evl-spec §2). Done that way, every op costs a pass over full-size frames. Here the same
result is computed in one pass at the output size, from the same decisions
(:class:`~pipelines.randaugment.AugOp` tuples):

- **Geometry.** Rotate, ShearX/Y and TranslateX/YRel are affine maps in PIL's coordinates
  (:func:`op_matrix`); with the crop box and the resize they compose into one map from output
  pixels to source pixels, sampled once (bilinear; the source region is first resized with an
  antialiasing filter when the crop shrinks). Where an op's map leaves the frame, PIL fills with
  grey: each op's out-of-frame region is found on the output grid, and the grey is put there at
  the op's place in the sequence, so later colour ops change it and earlier ones do not.
- **Colour.** Point ops (Invert, Posterize, Solarize, SolarizeAdd, Brightness, Contrast,
  AutoContrast, Equalize) are 256-entry lookup tables per frame and channel, composed while
  consecutive and applied once. Color (blend with the luma) and Sharpness (blend with PIL's
  SMOOTH filter) run at the output size. They follow PIL's arithmetic: the tests compare each op
  with timm's.
- **Statistics.** AutoContrast, Equalize and Contrast read the whole frame's histogram as it is
  at that point of the sequence (earlier geometry and colour included). That frame is emulated,
  op by op as the reference does, on a grid of every ``STATS_STRIDE``-th source pixel: cheap,
  and the histograms of whole frames, not of the crop.

The ops are the same for every frame of a clip; statistics are per frame, as the reference
computes them frame by frame. Bilinear sampling stands in for PIL's bicubic, and colour ops run
after resampling instead of before: the tests bound the difference from the reference order
(PSNR), and docs say how far it goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .randaugment import FILL, GEOMETRIC, STATISTICS, AugOp

__all__ = ["STATS_STRIDE", "ClipPlan", "augment_clip", "crop_resize", "reference_clip", "equalize_lut", "inside", "op_matrix", "opencv",
           "plan_clip"]

STATS_STRIDE = 2  # the statistics' grid: every 2nd pixel of every 2nd row of the source frame
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # PIL's ImageFilter.SMOOTH


@lru_cache(maxsize=1)
def opencv():
    """OpenCV, single-threaded: parallelism comes from the decoding workers, and a threaded
    OpenCV pool used across a fork (DataLoader workers) can deadlock the child."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def crop_resize(frames: np.ndarray | torch.Tensor, crop: tuple[int, int, int, int], size: int | tuple[int, int],
                flip: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[T, H, W, 3]`` uint8 -> the crop box resized to ``[T, size, size, 3]`` (or ``size`` =
    (h, w)) uint8, bilinear with an antialiasing filter, as DALI's resize; into ``out`` (a
    contiguous uint8 tensor of that shape: a batch's rows) where given."""
    x = torch.as_tensor(frames)
    top, left, h, w = crop
    x = x[:, top:top + h, left:left + w].permute(0, 3, 1, 2)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if out is not None and not flip and (h, w) != size:
        # Written where the batch wants it (channels last, as the kernel writes): no copy after.
        torch.ops.aten._upsample_bilinear2d_aa.out(x, list(size), False, None, None, out=out.permute(0, 3, 1, 2))
        return out
    if (h, w) != size:
        # uint8 in and out: PyTorch's uint8 kernel (the one torchvision resizes uint8 images
        # with), within one level of resizing in float and several times faster on the CPU.
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    x = x.permute(0, 2, 3, 1)
    if out is not None:
        return torch.ops.aten.flip.out(x, [2], out=out) if flip else out.copy_(x)
    return x.flip(2) if flip else x.contiguous()


# -- geometry ----------------------------------------------------------------------------------


def op_matrix(op: AugOp, height: int, width: int) -> np.ndarray:
    """The 3x3 map of a geometric op from output to input coordinates, as PIL applies it.

    Coordinates are continuous, pixel ``(i, j)`` covering ``[j, j+1) x [i, i+1)`` (PIL's
    convention). Rotation is counter-clockwise by ``arg`` degrees about the frame's centre
    (``Image.rotate``); shears and translations are ``Image.transform`` AFFINE data.
    """
    kind, a = op.kind, float(op.arg)
    m = np.eye(3)
    if kind == "Rotate":
        t = -math.radians(a)
        c, s = math.cos(t), math.sin(t)
        cx, cy = width / 2, height / 2
        m[:2, :2] = [[c, s], [-s, c]]
        m[0, 2] = cx - (c * cx + s * cy)
        m[1, 2] = cy - (-s * cx + c * cy)
    elif kind == "ShearX":
        m[0, 1] = a
    elif kind == "ShearY":
        m[1, 0] = a
    elif kind == "TranslateXRel":
        m[0, 2] = a * width
    elif kind == "TranslateYRel":
        m[1, 2] = a * height
    else:
        raise ValueError(f"{op.name} is not a geometric op")
    return m


def _crop_matrix(crop: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Output pixels of a ``size``-square resize of the crop box -> frame coordinates."""
    top, left, h, w = crop
    return np.array([[w / size, 0, left], [0, h / size, top], [0, 0, 1]], dtype=np.float64)


def _shift(x0: float, y0: float) -> np.ndarray:
    return np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], dtype=np.float64)


def inside(m: np.ndarray, shape: tuple[int, int], height: int, width: int) -> np.ndarray:
    """``[h, w]`` bool: the output pixels whose centres ``m`` maps into a ``height x width`` frame.

    A 2x2 image of ones warped through ``m`` scaled to it, nearest, zero outside: what the DALI
    graph does too, and a tenth of the cost of evaluating the map on the grid."""
    cv2 = opencv()
    unit = np.diag([2 / width, 2 / height, 1.0]) @ m
    out = cv2.warpAffine(np.ones((2, 2), np.uint8), _to_cv2(unit)[:2], (shape[1], shape[0]),
                         flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.astype(bool)


def _to_cv2(m: np.ndarray) -> np.ndarray:
    """A map between PIL's coordinates (pixel centres at +0.5) as OpenCV's (centres at integers)."""
    return np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]]) @ m @ np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])


@dataclass(frozen=True)
class ClipPlan:
    """How a clip's frames become its output, for the CPU here and for the DALI graph.

    The colour ops run on ``region`` = (y0, y1, x0, x1) of the source frames. Then ``roi`` =
    (top, left, h, w) of the region is resized (antialiased) to ``resized`` = (h, w), and,
    where the ops move pixels, ``warp`` (3x3: output pixels -> resized pixels) samples the
    ``size``-square output from it (bilinear). ``stages`` holds, per geometric op in order,
    its position in the ops and the map (output pixels -> frame coordinates) of the point that
    op looks up: where that point is outside the frame, the op fills grey, and the colour ops
    after it change the grey. ``region`` is None when the ops move the crop off the frame.
    """

    region: tuple[int, int, int, int] | None
    roi: tuple[int, int, int, int]
    resized: tuple[int, int]
    warp: np.ndarray | None
    stages: tuple[tuple[int, np.ndarray], ...] = ()


def plan_clip(ops: Sequence[AugOp], height: int, width: int, crop: tuple[int, int, int, int],
              size: int) -> ClipPlan:
    """The :class:`ClipPlan` of a ``height x width`` clip with ``ops``, ``crop``, resized to ``size``."""
    top, left, h, w = crop
    if not any(op.kind in GEOMETRIC for op in ops):
        # The crop, and a pixel around it where Sharpness reads the neighbours of its edge.
        m = 1 if any(op.kind == "Sharpness" for op in ops) else 0
        y0, y1, x0, x1 = max(0, top - m), min(height, top + h + m), max(0, left - m), min(width, left + w + m)
        return ClipPlan((y0, y1, x0, x1), (top - y0, left - x0, h, w), (size, size), None)
    stages, m = [], _crop_matrix(crop, size)
    for pos in range(len(ops) - 1, -1, -1):
        if ops[pos].kind in GEOMETRIC:
            m = op_matrix(ops[pos], height, width) @ m
            stages.append((pos, m))
    stages.reverse()
    # The map shrinks the source by the crop's factors (the ops' own scale is about 1): when it
    # does, the region is resized by them with an antialiasing filter before it is sampled,
    # since bilinear sampling alone aliases where it skips source pixels.
    sx, sy = min(1.0, size / w), min(1.0, size / h)
    out = np.array([[0, size, 0, size], [0, 0, size, size], [1, 1, 1, 1]], dtype=np.float64)
    corners = m @ out
    margin = 2 + math.ceil(1 / min(sx, sy))  # the bilinear taps and the resize filter's support
    x0 = max(0, math.floor(corners[0].min()) - margin)
    x1 = min(width, math.ceil(corners[0].max()) + margin)
    y0 = max(0, math.floor(corners[1].min()) - margin)
    y1 = min(height, math.ceil(corners[1].max()) + margin)
    if x1 <= x0 or y1 <= y0:
        return ClipPlan(None, (0, 0, 0, 0), (0, 0), None, tuple(stages))
    rh, rw = max(1, round((y1 - y0) * sy)), max(1, round((x1 - x0) * sx))
    warp = np.diag([rw / (x1 - x0), rh / (y1 - y0), 1.0]) @ _shift(x0, y0) @ m
    return ClipPlan((y0, y1, x0, x1), (0, 0, y1 - y0, x1 - x0), (rh, rw), warp, tuple(stages))


def _resample(region: np.ndarray, plan: ClipPlan, size: int) -> np.ndarray:
    """The colour-processed ``region`` resized and warped as ``plan`` says: ``[T, size, size, 3]``."""
    if plan.warp is None:
        return crop_resize(region, plan.roi, size).numpy()
    return _warp(region, plan.resized, plan.warp, (size, size))


def _warp(region: np.ndarray, resized: tuple[int, int], m: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """``region`` resized to ``resized`` (antialiased), then sampled through ``m`` (output ->
    resized pixels) at ``out_shape``, bilinearly; border pixels repeat outside it."""
    cv2 = opencv()
    if region.shape[1:3] != resized:
        region = crop_resize(region, (0, 0, *region.shape[1:3]), resized).numpy()
    m = _to_cv2(m)
    out_h, out_w = out_shape
    # The map's source coordinates once per clip (OpenCV's fixed point, 1/32 pixel, as
    # warpAffine's), then one remap per frame: half the time of a 3-channel warpAffine per frame.
    xs, ys = np.arange(out_w, dtype=np.float64), np.arange(out_h, dtype=np.float64)[:, None]
    map_x = (m[0, 0] * xs + m[0, 1] * ys + m[0, 2]).astype(np.float32)
    map_y = (m[1, 0] * xs + m[1, 1] * ys + m[1, 2]).astype(np.float32)
    map_xy, map_frac = cv2.convertMaps(map_x, map_y, cv2.CV_16SC2)
    out = np.empty((len(region), out_h, out_w, 3), np.uint8)
    for i in range(len(region)):  # OpenCV reads a frame's rows in place: no copy of the region
        cv2.remap(region[i], map_xy, map_frac, cv2.INTER_LINEAR, dst=out[i], borderMode=cv2.BORDER_REPLICATE)
    return out


# -- colour ------------------------------------------------------------------------------------

_IDENTITY = np.arange(256, dtype=np.uint8)


def _blend_lut(degenerate: np.ndarray | float, factor: float) -> np.ndarray:
    """PIL's ``Image.blend(degenerate, image, factor)`` of a constant as a table: float32
    arithmetic, truncated towards zero, clipped."""
    x = _IDENTITY.astype(np.float32)
    deg = np.asarray(degenerate, np.float32)[..., None]
    return np.clip(np.trunc(deg + np.float32(factor) * (x - deg)), 0, 255).astype(np.uint8)


def _histograms(x: np.ndarray) -> np.ndarray:
    """``[T, 3, 256]`` per-frame, per-channel histograms of ``[T, h, w, 3]`` uint8."""
    cv2 = opencv()
    return np.stack([np.stack([cv2.calcHist([f], [c], None, [256], [0, 256]).reshape(-1) for c in range(3)])
                     for f in x]).astype(np.int64)


def _autocontrast_lut(hist: np.ndarray) -> np.ndarray:
    """``ImageOps.autocontrast`` (no cutoff) per frame and channel, from ``[T, 3, 256]``."""
    nz = hist > 0
    lo = nz.argmax(-1)
    hi = 255 - nz[..., ::-1].argmax(-1)
    scale = 255.0 / np.maximum(hi - lo, 1)
    offset = -lo * scale
    lut = np.clip(np.trunc(np.arange(256) * scale[..., None] + offset[..., None]), 0, 255)
    lut = np.where((hi <= lo)[..., None], np.arange(256), lut)
    return lut.astype(np.uint8)


def equalize_lut(hist: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize``'s tables from ``[..., 256]`` histograms (any device): per histogram,
    ``step = (pixels - count of the last used level) // 255`` and level ``v`` maps to
    ``(step // 2 + pixels below v) // step``, or to itself when ``step`` is 0."""
    hist = hist.long()
    used = hist > 0
    last = 255 - used.flip(-1).long().argmax(-1, keepdim=True)  # the highest level present
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    below = hist.cumsum(-1) - hist
    levels = torch.arange(256, device=hist.device).expand_as(hist)
    lut = torch.minimum((step // 2 + below) // step.clamp(min=1), torch.tensor(255, device=hist.device))
    return torch.where(step > 0, lut, levels).to(torch.uint8)


def _luma(x: np.ndarray) -> np.ndarray:
    """PIL's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 2^15) >> 16`` (integers)."""
    x = x.astype(np.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def _point_lut(op: AugOp, x: np.ndarray) -> np.ndarray:
    """The table of a point op, ``[256]`` or per frame and channel ``[T, 3, 256]``; ``x`` is the
    whole frame at that point of the sequence (for the statistics)."""
    kind, a = op.kind, op.arg
    v = _IDENTITY.astype(np.int32)
    if kind == "Invert":
        return (255 - v).astype(np.uint8)
    if kind == "Posterize":
        bits = int(a)
        return _IDENTITY if bits >= 8 else (v & (~((1 << (8 - max(bits, 0))) - 1) & 0xFF)).astype(np.uint8)
    if kind == "Solarize":
        return np.where(v < a, v, 255 - v).astype(np.uint8)
    if kind == "SolarizeAdd":
        return np.where(v < 128, np.minimum(255, v + int(a)), v).astype(np.uint8)
    if kind == "Brightness":
        return _blend_lut(0.0, a)
    if kind == "Contrast":
        means = np.floor(_luma(x).mean(axis=(1, 2)) + 0.5)  # PIL: int(mean + 0.5)
        return np.repeat(_blend_lut(means, a)[:, None], 3, axis=1)
    if kind == "AutoContrast":
        return _autocontrast_lut(_histograms(x))
    if kind == "Equalize":
        return equalize_lut(torch.from_numpy(_histograms(x))).numpy()
    raise ValueError(f"{op.name} is not a point op")


def _compose(first: np.ndarray | None, then: np.ndarray) -> np.ndarray:
    """The table of ``then`` after ``first`` (either ``[256]`` or ``[T, 3, 256]``)."""
    if first is None:
        return then
    if then.ndim == 1:
        return then[first]
    if first.ndim == 1:
        return then[..., first]
    return np.take_along_axis(then, first.astype(np.int64), axis=-1)


def _apply_lut(x: np.ndarray, lut: np.ndarray) -> np.ndarray:
    cv2 = opencv()
    if lut.ndim == 1:
        return cv2.LUT(x.reshape(-1, 3), lut).reshape(x.shape)
    out = np.empty_like(x)
    for i in range(len(x)):
        cv2.LUT(x[i], lut[i].T[:, None, :].copy(), dst=out[i])
    return out


def _color(x: np.ndarray, factor: float) -> np.ndarray:
    """``ImageEnhance.Color``: each pixel blended with its luma, as one colour matrix
    (``factor * x + (1 - factor) * luma``; PIL rounds the luma and truncates the blend, this
    rounds once: within one level)."""
    cv2 = opencv()
    matrix = (1 - factor) * np.tile(np.array([[0.299, 0.587, 0.114]], np.float32), (3, 1))
    matrix += factor * np.eye(3, dtype=np.float32)
    out = np.empty_like(x)
    for i in range(len(x)):
        cv2.transform(x[i], matrix, dst=out[i])
    return out


def _sharpness(x: np.ndarray, factor: float, edges: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """``ImageEnhance.Sharpness``: blend with SMOOTH. PIL leaves the frame's 1-pixel border as it
    is: ``edges`` says which sides of ``x`` (top, bottom, left, right) are the frame's."""
    cv2 = opencv()
    kernel = (1 - factor) * _SMOOTH
    kernel[1, 1] += factor  # factor * x + (1 - factor) * smooth(x): one filter
    out = np.empty_like(x)
    for i in range(len(x)):
        cv2.filter2D(x[i], -1, kernel, dst=out[i], borderType=cv2.BORDER_REPLICATE)
    top, bottom, left, right = edges
    rows = [r for r, keep in ((0, top), (-1, bottom)) if keep]
    cols = [c for c, keep in ((0, left), (-1, right)) if keep]
    out[:, rows] = x[:, rows]
    out[:, :, cols] = x[:, :, cols]
    return out


_ALL_EDGES = (True, True, True, True)


def _colour(x: np.ndarray, ops: Sequence[AugOp], stats, edges: tuple[bool, bool, bool, bool] = _ALL_EDGES,
            start: int = 0) -> np.ndarray:
    """The colour ops of ``ops[start:]``, in order, on ``x`` (geometric ops are the caller's);
    consecutive point ops become one table. ``stats(pos)`` is the whole frame before op ``pos``,
    for the ops that read statistics; ``edges``: the sides of ``x`` that are the frame's."""
    pending = None
    for pos in range(start, len(ops)):
        op = ops[pos]
        if op.kind in GEOMETRIC:
            continue
        if op.kind in ("Color", "Sharpness"):
            if pending is not None:
                x, pending = _apply_lut(x, pending), None
            x = _color(x, op.arg) if op.kind == "Color" else _sharpness(x, op.arg, edges)
        else:
            pending = _compose(pending, _point_lut(op, stats(pos) if op.kind in STATISTICS else None))
    return x if pending is None else _apply_lut(x, pending)


class _WholeFrames:
    """The whole frames as the reference sees them before each op, emulated on a coarse grid.

    Built lazily, op by op, on every ``STATS_STRIDE``-th pixel of the source frames: each
    geometric op resamples the grid through its own map and fills grey where it leaves the
    frame, as PIL does; colour ops use their own statistics. Only clips with a statistics op
    pay for it.
    """

    def __init__(self, frames: np.ndarray, ops: Sequence[AugOp]):
        self.frames, self.ops = frames, ops
        self.done: list[np.ndarray] = []  # done[p]: the frames before op p

    def __call__(self, pos: int) -> np.ndarray:
        s = STATS_STRIDE
        if not self.done:
            self.done.append(np.ascontiguousarray(self.frames[:, ::s, ::s]))
        height, width = self.frames.shape[1:3]
        # Grid pixel (i, j) is source pixel (s i, s j): its centre s j + 0.5 in frame coordinates.
        grid = np.array([[s, 0, 0.5 - s / 2], [0, s, 0.5 - s / 2], [0, 0, 1]], dtype=np.float64)
        while len(self.done) <= pos:
            x, op = self.done[-1], self.ops[len(self.done) - 1]
            if op.kind in GEOMETRIC:
                m = op_matrix(op, height, width) @ grid
                x = _warp(x, x.shape[1:3], np.linalg.inv(grid) @ m, x.shape[1:3])
                x[:, ~inside(m, x.shape[1:3], height, width)] = FILL
            else:
                x = _colour(x, [op], lambda _, x=x: x)
            self.done.append(x)
        return self.done[pos]


def augment_clip(frames: np.ndarray, ops: Sequence[AugOp], crop: tuple[int, int, int, int], size: int,
                 flip: bool = False) -> torch.Tensor:
    """``frames`` ``[T, H, W, 3]`` uint8 RandAugmented by ``ops`` as whole frames, then cropped to
    ``crop`` and resized to ``size`` (then flipped): ``[T, size, size, 3]`` uint8.

    The colour ops run in order on the source pixels the output reads, at source resolution, as
    the reference runs them; one resampling then does the geometry, the crop and the resize.
    Where a geometric op finds nothing, its grey goes in, changed by the colour ops after it.
    """
    frames = np.asarray(frames)
    t, height, width = frames.shape[:3]
    plan = plan_clip(ops, height, width, crop, size)
    stats = _WholeFrames(frames, ops)
    if plan.region is None:  # the ops moved the crop off the frame: every pixel is filled
        x = np.zeros((t, size, size, 3), np.uint8)
    else:
        y0, y1, x0, x1 = plan.region
        edges = (y0 == 0, y1 == height, x0 == 0, x1 == width)
        x = _resample(_colour(frames[:, y0:y1, x0:x1], ops, stats, edges), plan, size)
    for pos, m in plan.stages:  # in op order: a later op's grey covers an earlier one's
        outside = ~inside(m, (size, size), height, width)
        if outside.any():
            # The grey the op fills with, changed by the colour ops after it (per frame: so
            # are the statistics).
            grey = _colour(np.full((t, 1, 1, 3), FILL, np.uint8), ops, stats, start=pos + 1)
            x[:, outside] = grey[:, 0]
    out = torch.from_numpy(np.ascontiguousarray(x))
    return out.flip(2).contiguous() if flip else out


def reference_clip(frames: np.ndarray, ops: Sequence[AugOp], crop: tuple[int, int, int, int], size: int,
                   resample: str = "bicubic") -> np.ndarray:
    """What :func:`augment_clip` is held to: timm's PIL ops (``timm``, a test and benchmark
    dependency) on each whole frame, one after another with the reference's grey fill and
    ``resample``, then :func:`crop_resize`; ``[T, size, size, 3]`` uint8."""
    from PIL import Image
    from timm.data.auto_augment import NAME_TO_OP

    method = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[resample]
    out = []
    for frame in frames:
        img = Image.fromarray(frame)
        for op in ops:
            if op.kind == "Posterize" and op.arg == 0:  # 0 bits: black (Pillow 10+ refuses it)
                img = Image.new("RGB", img.size)
                continue
            args = () if op.arg is None else (op.arg,)
            img = NAME_TO_OP[op.name](img, *args, fillcolor=(FILL,) * 3, resample=method)
        out.append(np.asarray(img))
    return crop_resize(np.stack(out), crop, size).numpy()
