"""A clip's RandAugment decisions executed inside the DALI graph, on the clip's device.

The same plan as the CPU's (:mod:`pipelines.augment`), built from DALI operators and fed per
sample from the host (only the decisions and the geometry: no pixels go back and forth):

- ``fn.slice`` takes the source region the output reads (:class:`~pipelines.augment.ClipPlan`);
- the colour ops run on it in order, one *slot* per RandAugment layer. Each sample's slot holds
  its op's code, and a binary split over the codes (DALI conditionals, as DALI's own
  ``auto_aug`` selects ops) gives each op only the samples that apply it. Point ops are
  arithmetic (Invert, Posterize, Solarize, SolarizeAdd, Brightness, Contrast, AutoContrast);
  Color is ``fn.coord_transform`` with the blend as a colour matrix; Sharpness is ``fn.filter``
  with the blend folded into its kernel. Equalize needs a per-sample lookup table, which DALI
  lacks: ``fn.dl_tensor_python_function`` gathers it with torch on the images' device;
- ``fn.resize`` (antialiased) and one ``fn.warp_affine`` do the geometry, the crop and the resize;
- each geometric op's grey goes where its map leaves the frame: DALI finds those pixels itself
  by warping a 2x2 image of ones through the op's map (nearest, zero outside), and the grey is
  carried through the colour ops after its op in a tiny image of one pixel per slot.

The statistics (Contrast's mean, AutoContrast's range, Equalize's histogram) are the whole
frame's, as in the reference: a second, half-resolution copy of the frames replays the sequence
(each geometric op as its own warp with grey fill) to provide them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali.pipeline import do_not_convert

from .augment import STATS_STRIDE, ClipPlan, equalize_lut, op_matrix
from .randaugment import FILL, GEOMETRIC, AugOp

__all__ = ["COLUMNS_PER_SLOT", "COLUMNS_PER_VIEW", "augment_columns", "augment_graph", "column_types",
           "untraced_definition"]

# Slot codes: which colour op a sample's slot applies (geometric ops are 0 here: the warp does them).
NONE, BLEND, CONTRAST, AUTOCONTRAST, THRESHOLD, COLOR, SHARPNESS, EQUALIZE = range(8)
_CODES = {"Invert": BLEND, "Brightness": BLEND, "Contrast": CONTRAST, "AutoContrast": AUTOCONTRAST,
          "Posterize": THRESHOLD, "Solarize": THRESHOLD, "SolarizeAdd": THRESHOLD, "Color": COLOR,
          "Sharpness": SHARPNESS, "Equalize": EQUALIZE}
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # PIL's ImageFilter.SMOOTH
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # PIL's convert("L") weights

# Per view: region start and shape, resize ROI start and end, resize size, warp, half-resolution size.
COLUMNS_PER_VIEW = 7
# Per slot: code, parameters, 3x3 matrix (Color / Sharpness), geometric flag, its half-resolution
# warp, the mask of the grey pixel it resets, and its validity map.
COLUMNS_PER_SLOT = 7


def column_types(num_slots: int) -> list:
    """DALI dtypes of one view's columns (see :func:`augment_columns`)."""
    per_view = [types.INT32, types.INT32, types.FLOAT, types.FLOAT, types.FLOAT, types.FLOAT, types.FLOAT]
    per_slot = [types.INT32, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT, types.UINT8, types.FLOAT]
    return per_view + per_slot * num_slots


def _half(height: int, width: int) -> tuple[int, int]:
    return -(-height // STATS_STRIDE), -(-width // STATS_STRIDE)


@do_not_convert
def _grid() -> np.ndarray:
    """Half-resolution pixels -> frame coordinates: pixel (i, j) is source pixel (s i, s j)."""
    s = STATS_STRIDE
    return np.array([[s, 0, 0.5 - s / 2], [0, s, 0.5 - s / 2], [0, 0, 1]], dtype=np.float64)


def _params(op: AugOp) -> tuple[np.ndarray, np.ndarray]:
    """(parameters, 3x3 matrix) of a colour op's slot."""
    par, mat = np.zeros(4, np.float32), np.eye(3, dtype=np.float32)
    kind, a = op.kind, op.arg
    if kind == "Invert":
        par[:2] = (127.5, -1.0)  # 127.5 - (x - 127.5) = 255 - x
    elif kind == "Brightness":
        par[:2] = (0.0, a)
    elif kind == "Contrast":
        par[1] = a
    elif kind == "Posterize":
        bits = int(a)
        par[:] = (256, (~((1 << (8 - min(max(bits, 0), 8))) - 1)) & 0xFF, 0, 0)
    elif kind == "Solarize":
        par[:] = (a, 255, 0, 1)
    elif kind == "SolarizeAdd":
        par[:] = (128, 255, int(a), 0)
    elif kind == "Color":
        mat = (1 - a) * np.tile(_LUMA, (3, 1)) + a * np.eye(3, dtype=np.float32)
    elif kind == "Sharpness":
        mat = (1 - a) * _SMOOTH
        mat[1, 1] += a
    return par, mat.astype(np.float32)


def augment_columns(ops: Sequence[AugOp], plan: ClipPlan, height: int, width: int, size: int,
                    num_slots: int) -> list[np.ndarray]:
    """One view's external-source columns for :func:`augment_graph`: the plan's geometry and,
    per slot (one per RandAugment layer; skipped layers and ``ops`` past the end are empty), the
    op to run."""
    if plan.region is None:  # the crop left the frame: a pixel to sample, every output pixel filled
        region, roi, resized, warp = (0, 1, 0, 1), (0, 0, 1, 1), (1, 1), np.zeros((3, 3))
    else:
        region, roi, resized = plan.region, plan.roi, plan.resized
        warp = plan.warp if plan.warp is not None else np.eye(3)
    y0, y1, x0, x1 = region
    top, left, h, w = roi
    cols = [np.array([y0, x0], np.int32), np.array([y1 - y0, x1 - x0], np.int32),
            np.array([top, left], np.float32), np.array([top + h, left + w], np.float32),
            np.array(resized, np.float32), warp[:2].astype(np.float32), np.array(_half(height, width), np.float32)]
    stages = dict(plan.stages)
    to_unit = np.diag([2 / width, 2 / height, 1.0])  # frame coordinates -> those of a 2x2 image
    grid = _grid()
    for j in range(num_slots):
        op = ops[j] if j < len(ops) else None
        keep = np.ones((1, 1, num_slots, 1), np.uint8)
        if op is not None and op.kind in GEOMETRIC:
            code, (par, mat) = NONE, _params(op)
            keep[0, 0, j, 0] = 0
            half_warp = (np.linalg.inv(grid) @ op_matrix(op, height, width) @ grid)[:2]
            valid = (to_unit @ stages[j])[:2]
        else:
            code = _CODES[op.kind] if op is not None else NONE
            par, mat = _params(op) if op is not None else (np.zeros(4, np.float32), np.eye(3, dtype=np.float32))
            half_warp = np.eye(3)[:2]
            valid = np.array([[0, 0, 1], [0, 0, 1]])  # every pixel to (1, 1): inside
        cols += [np.array(code, np.int32), par, mat, np.array(op is not None and op.kind in GEOMETRIC, np.int32),
                 half_warp.astype(np.float32), keep, valid.astype(np.float32)]
    return cols


# -- the graph ---------------------------------------------------------------------------------


@do_not_convert
def _u8(x):
    return fn.cast(dmath.clamp(x, 0, 255), dtype=types.UINT8)


@do_not_convert
def _blend(x, deg, f):
    """PIL's ``Image.blend(degenerate, x, f)``: ``deg + f (x - deg)``, truncated, clipped."""
    return _u8(dmath.floor(deg + f * (fn.cast(x, dtype=types.FLOAT) - deg)))


@do_not_convert
def _const(array: np.ndarray, gpu: bool):
    return types.Constant(array, device="gpu" if gpu else "cpu")


@do_not_convert
def _luma_mean(w, gpu: bool):
    """Per frame, the mean of PIL's luma of the half-resolution frames, rounded as PIL does."""
    mean = fn.reductions.mean(w, axis_names="HW", keep_dims=True)
    return dmath.floor(fn.reductions.sum(mean * _const(_LUMA, gpu), axis_names="C", keep_dims=True) + 0.5)


@do_not_convert
def _autocontrast(xs, w):
    lo = fn.cast(fn.reductions.min(w, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
    hi = fn.cast(fn.reductions.max(w, axis_names="HW", keep_dims=True), dtype=types.FLOAT)
    stretch = hi > lo
    scale = 255.0 / dmath.max(hi - lo, 1.0)
    out = []
    for x in xs:
        xf = fn.cast(x, dtype=types.FLOAT)
        y = stretch * dmath.floor(xf * scale - lo * scale) + (stretch ^ True) * xf
        out.append(_u8(y))
    return out


@do_not_convert
def _threshold(x, par):
    """Solarize, SolarizeAdd and Posterize: ``x < t ? min(255, (x & m) + add) : flip ? 255 - x : x``."""
    t, m, add, flip = (par[i] for i in range(4))
    xi = fn.cast(x, dtype=types.INT32)
    below = fn.cast(x, dtype=types.FLOAT) < t
    low = dmath.min((xi & fn.cast(m, dtype=types.INT32)) + fn.cast(add, dtype=types.INT32), 255)
    flipped = fn.cast(flip, dtype=types.INT32)
    high = flipped * (255 - xi) + (1 - flipped) * xi
    return _u8(below * low + (below ^ True) * high)


def _equalize_batch(regions, wholes, greys, stats):
    """``fn.dl_tensor_python_function`` body: Equalize each sample's three images with the tables
    of its whole frames' histograms (``stats``), on their device, with torch."""
    import torch

    outs: tuple[list, list, list] = ([], [], [])
    device = None
    for images, whole in zip(zip(regions, wholes, greys), stats):
        whole = torch.from_dlpack(whole)  # [T, h, w, 3] uint8
        device, t = whole.device, whole.shape[0]
        # One bincount over (frame, channel, level): histograms [T, 3, 256].
        offsets = (256 * torch.arange(3 * t, device=device)).view(t, 1, 1, 3)
        hist = torch.bincount((whole.long() + offsets).reshape(-1), minlength=768 * t).view(t, 3, 256)
        table = equalize_lut(hist).reshape(-1)
        for image, out in zip(images, outs):
            x = torch.from_dlpack(image)
            out.append(torch.utils.dlpack.to_dlpack(table[x.long() + offsets].contiguous()))
    if device is not None and device.type == "cuda":
        # DALI runs on once this returns: the work queued on torch's stream must be done.
        torch.cuda.current_stream(device).synchronize()
    return outs


@do_not_convert
def _equalize(xs, w):
    """``ImageOps.equalize`` with the tables of the whole frames' histograms, exactly: DALI has
    no per-sample lookup table, so the gather runs in torch on the images' device."""
    return list(fn.dl_tensor_python_function(*xs, w, function=_equalize_batch, num_outputs=3, batch_processing=True,
                                             output_layouts=["FHWC"] * 3))


@do_not_convert
def _apply(code: int, xs, w, par, mat, gpu: bool):
    """Colour op ``code`` on each image of ``xs``; ``w`` is the half-resolution whole frame."""
    if code == NONE:
        return xs
    if code == BLEND:
        return [_blend(x, par[0], par[1]) for x in xs]
    if code == CONTRAST:
        deg = _luma_mean(w, gpu)
        return [_blend(x, deg, par[1]) for x in xs]
    if code == AUTOCONTRAST:
        return _autocontrast(xs, w)
    if code == THRESHOLD:
        return [_threshold(x, par) for x in xs]
    if code == COLOR:
        return [fn.coord_transform(x, M=mat, dtype=types.UINT8) for x in xs]
    if code == SHARPNESS:
        kernel = mat.gpu() if gpu else mat
        return [fn.filter(x, kernel, border="clamp") for x in xs]
    return _equalize(xs, w)


def _select(lo: int, hi: int, code, xs, w, par, mat, gpu: bool):
    """``_apply(code)`` per sample, splitting the batch in halves over the codes ``[lo, hi]``."""
    if lo == hi:
        return _apply(lo, xs, w, par, mat, gpu)
    mid = (lo + hi) // 2
    if code <= mid:
        out = _select(lo, mid, code, xs, w, par, mat, gpu)
    else:
        out = _select(mid + 1, hi, code, xs, w, par, mat, gpu)
    return out


@contextlib.contextmanager
def untraced_definition(enabled: bool = True) -> Iterator[None]:
    """Defines and builds a DALI graph without recording each operator's Python stack.

    DALI keeps, for every operator it creates, the stack that created it, so that an error can
    say where the failing operator was defined. RandAugment's slots are about 1,100 operators,
    and those records are about a third of the time it takes to define and build the graph. The
    graph is this module's, so an error in it is our bug and its origin is known: it is defined
    without them. Uses DALI's private ``set_tracing``; where a DALI lacks it, nothing changes.
    """
    try:
        from nvidia.dali._utils import dali_trace
    except ImportError:
        dali_trace = None
    if not enabled or not hasattr(dali_trace, "set_tracing"):
        yield
        return
    was = dali_trace.is_tracing_enabled()
    dali_trace.set_tracing(enabled=False)
    try:
        yield
    finally:
        dali_trace.set_tracing(enabled=was)


def augment_graph(clip, cols: Sequence, size: int, num_slots: int, gpu: bool):
    """``clip`` (FHWC uint8) RandAugmented, cropped and resized to ``size``: FHWC uint8.

    ``cols`` are the external-source nodes of :func:`augment_columns`. The pipeline needs
    ``enable_conditionals=True``.
    """
    anchor, shape, roi_start, roi_end, resized, warp, half = cols[:COLUMNS_PER_VIEW]
    slots = [cols[COLUMNS_PER_VIEW + COLUMNS_PER_SLOT * j:COLUMNS_PER_VIEW + COLUMNS_PER_SLOT * (j + 1)]
             for j in range(num_slots)]
    dev = (lambda node: node.gpu()) if gpu else (lambda node: node)
    region = fn.slice(clip, anchor, shape, axis_names="HW")
    # Sampled at source pixel centres, the warp picks every STATS_STRIDE-th pixel exactly.
    whole = fn.warp_affine(clip, matrix=types.Constant(_grid()[:2].astype(np.float32)), size=half,
                           interp_type=types.INTERP_LINEAR)
    grey = _u8(fn.slice(whole, [0, 0], [1, num_slots], axis_names="HW", out_of_bounds_policy="pad") * 0
               + FILL)  # [T, 1, slots, 3]
    for code, par, mat, geometric, half_warp, keep, _ in slots:
        if geometric == 1:
            whole = fn.warp_affine(whole, matrix=half_warp, size=half, fill_value=FILL,
                                   interp_type=types.INTERP_LINEAR)
            k = dev(keep)
            grey = _u8(grey * k + (1 - k) * FILL)  # this slot's grey pixel starts as grey
        region, whole, grey = _select(NONE, EQUALIZE, code, [region, whole, grey], whole, dev(par), mat, gpu)
    out = fn.resize(region, roi_start=roi_start, roi_end=roi_end, size=resized, interp_type=types.INTERP_LINEAR,
                    antialias=True)
    out = fn.warp_affine(out, matrix=warp, size=[size, size], interp_type=types.INTERP_LINEAR)
    ones = types.Constant(np.ones((2, 2, 1), np.uint8), device="gpu" if gpu else "cpu", layout="HWC")
    for j, (*_, valid) in enumerate(slots):  # in op order: a later op's grey covers an earlier one's
        inside = fn.expand_dims(fn.warp_affine(ones, matrix=valid, size=[size, size], fill_value=0,
                                               interp_type=types.INTERP_NN), axes=[0])
        out = _u8(out * inside + grey[:, :, j:j + 1, :] * (1 - inside))
    return out


def augment_frames(frames: Sequence[np.ndarray], ops: Sequence[Sequence[AugOp]], crops: Sequence[tuple],
                   size: int, num_slots: int | None = None, device_id: int | None = None) -> list[np.ndarray]:
    """Clips ``[T, H, W, 3]`` uint8 through :func:`augment_graph`, as the DALI pipeline runs it
    (DALI's CPU operators without ``device_id``): ``[T, size, size, 3]`` uint8 each. For checks
    against :func:`pipelines.augment.augment_clip`."""
    import nvidia.dali as dali

    from .augment import plan_clip

    num_slots = num_slots or max(1, max(len(o) for o in ops))
    gpu = device_id is not None
    kinds = column_types(num_slots)

    @dali.pipeline_def(batch_size=len(frames), num_threads=1, device_id=device_id, exec_dynamic=True,
                       prefetch_queue_depth=1, enable_conditionals=True)
    def graph():
        clip = fn.external_source(name="frames", dtype=types.UINT8, ndim=4, layout="FHWC",
                                  device="gpu" if gpu else "cpu")
        cols = [fn.external_source(name=f"c{i}", dtype=kind) for i, kind in enumerate(kinds)]
        return augment_graph(clip, cols, size, num_slots, gpu)

    with untraced_definition():
        pipe = graph()
        pipe.build()
    pipe.feed_input("frames", [np.ascontiguousarray(f) for f in frames])
    columns = []
    for f, o, crop in zip(frames, ops, crops):
        height, width = f.shape[1:3]
        columns.append(augment_columns(o, plan_clip(o, height, width, crop, size), height, width, size, num_slots))
    for i in range(len(kinds)):
        pipe.feed_input(f"c{i}", [c[i] for c in columns])
    (out,) = pipe.run()
    out = out.as_cpu() if gpu else out
    return [np.array(out[i]) for i in range(len(frames))]
