"""The DALI backend (``--pipeline dali``): decode, crop, resize, flip and normalise inside DALI.

Sampling is the shared :class:`~pipelines.sampling.ClipSampler`'s, exactly as in the PyAV
pipeline (same keys, same order, same ClipSpecs), so the two backends can be compared clip for
clip. Each batch enters DALI through one ``fn.external_source`` callback: per video the encoded
file bytes, the sorted unique frames its clips need and, per view, the order of those frames
and the crop box. ``fn.decoders.video`` decodes exactly those frames (its ``frames=`` argument
takes an arbitrary per-sample list), ``fn.sequence_rearrange`` lays them out per view (a short
video's repeated last frame, uneven TSN spacing, views sharing frames are decoded once),
``fn.slice`` + ``fn.resize`` (linear, antialiased: what ``transforms.crop_resize`` does) execute
the crop box, and ``fn.crop_mirror_normalize`` flips, normalises with CLIP's mean and std and
turns ``FHWC`` into ``CFHW``. With RandAugment, each clip's ops (the sampler's decisions, the
PyAV pipeline's) run inside the graph with the crop and resize (:mod:`pipelines.dali_augment`).
A training pipeline builds its graph once and reuses it from epoch to epoch.

``dali_decoder="reader"`` (``cfg.extra``) reads training clips with
``fn.experimental.readers.video`` instead, which keeps its decoders and file indexes from one
clip to the next: a per-epoch file list holds each clip's frame range (with ``pad_mode="edge"``
the reader repeats a short video's last frame as the sampler does), and the clips are the
graph's, bit for bit on the CPU. Segment sampling and evaluation views, which a range cannot
express, stay with the graph.

With ``cfg.device`` on CUDA the decoder is the "mixed" one (NVDEC) and batches come out on that
GPU; on the CPU (``device_id=None``) DALI decodes VP8, VP9 and MJPEG only, so anything else is
refused up front with a hint to use ``--pipeline pyav``. Unreadable
videos are replaced (training) or skipped (evaluation), counted and reported as in
:mod:`pipelines.workers`; DALI does not say which sample of a batch failed, so the batch's videos
are checked one by one and the pipeline is rebuilt from that batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import nvidia.dali as dali  # the one import that may fail: build_pipeline turns it into a hint
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch

from .augment import plan_clip
from .base import (CLIP_MEAN, CLIP_STD, Batch, PipelineConfig, check_bad_videos, report_bad_videos,
                   row_ids_to_device, summarise_bad_videos)
from .dali_augment import augment_columns, augment_graph, column_types, untraced_definition
from .dataset import clip_specs, load_dataset, make_sampler
from .epoch import EpochKeys, batches_per_epoch, replacements, training_epoch
from .index import VideoReadError, failure_reason, frame_index, requested_positions

__all__ = ["CPU_CODECS", "GPU_CODECS", "DALIPipeline", "UnsupportedCodecError", "colour_correction", "nvdec_problem",
           "read_frames", "to_torch"]

log = logging.getLogger(__name__)

# What fn.decoders.video reads (DALI 2.4 docs): VP8/VP9/MJPEG on both backends, the rest on
# NVDEC ("mixed") only. Keys are FFmpeg decoder names, as the probe records them.
CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_CODECS = CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}
_CODEC_ALIASES = {"libvpx": "vp8", "libvpx-vp9": "vp9", "libdav1d": "av1", "libaom-av1": "av1"}


class UnsupportedCodecError(ValueError):
    """Videos that DALI cannot decode on the requested device."""


# NVDEC's smallest frames (NVDEC application note, Video Codec SDK 13: the decoder capability
# table; DALI asks cuvidGetDecoderCaps and fails a file below them when it opens it).
NVDEC_MIN_SIZE = {"h264": (48, 16), "hevc": (144, 144), "vp8": (48, 16), "vp9": (128, 128), "av1": (128, 128),
                  "mpeg4": (48, 16)}


def pixel_layout(pix_fmt: str | None) -> tuple[str | None, int | None]:
    """(chroma subsampling "420" / "422" / "444" / "400", bits per sample) of an FFmpeg pixel
    format name, (None, None) when unknown: ``yuv420p10le`` -> ("420", 10), ``nv12`` -> ("420", 8)."""
    if not pix_fmt:
        return None, None
    m = re.match(r"yuvj?(4[0-4][0-4])p(\d+)?", pix_fmt)
    if m:
        return m.group(1), int(m.group(2) or 8)
    semi = {"nv12": ("420", 8), "nv21": ("420", 8), "p010le": ("420", 10), "p016le": ("420", 16),
            "gray": ("400", 8), "gray10le": ("400", 10)}
    return semi.get(pix_fmt, (None, None))


def nvdec_problem(video, capability: tuple[int, int] | None = None) -> str | None:
    """Why DALI's GPU decoder would fail on ``video`` (a probe's VideoInfo or a FrameIndex), or None.

    What NVDEC decodes depends on the GPU generation (``capability``, CUDA's compute capability):
    no AV1 before Ampere nor on Hopper (H100/H200); H.264 only as 8-bit 4:2:0 before Blackwell.
    DALI converts 4:2:0 surfaces only, so 4:2:2, 4:4:4 and monochrome files are refused:
    ``--pipeline pyav`` reads them. Of the 10-bit codecs, HEVC Main 10 gives the right frames
    and colours on an H200 (``scripts/gpu_check.sh``); VP9 profile 2 has not been checked and is
    refused. A file whose edit list hides frames after its first shown one is refused too: NVDEC
    outputs hidden frames, and DALI's numbering of those is unknown.
    """
    codec = _CODEC_ALIASES.get(video.codec, video.codec)
    if codec not in GPU_CODECS:
        return f"{video.codec}: not a codec DALI's GPU decoder reads"
    chroma, bits = pixel_layout(video.pix_fmt)
    if chroma not in (None, "420"):
        return f"{video.pix_fmt}: DALI's GPU decoder converts 4:2:0 video only"
    if bits not in (None, 8) and not (codec == "hevc" and bits == 10):
        return f"{video.pix_fmt}: {bits}-bit {codec} is not read by the GPU path yet"
    if codec == "av1" and capability is not None and (capability < (8, 0) or capability[0] == 9):
        return f"av1: this GPU's NVDEC (compute capability {capability[0]}.{capability[1]}) has no AV1 decoder"
    if video.hidden_later:
        return f"an edit list hides {video.hidden_later} frame(s) inside the video"
    low = NVDEC_MIN_SIZE.get(codec)
    if low and (video.width < low[0] or video.height < low[1]):
        return f"{video.width}x{video.height}: smaller than NVDEC's {codec} minimum of {low[0]}x{low[1]}"
    return None


def _check_codecs(items: Sequence[tuple[str, object]], gpu: bool, capability: tuple[int, int] | None = None) -> None:
    """Raises for the (path, video) pairs DALI cannot decode on this device, naming the files and why."""
    if gpu:
        bad = [(p, why) for p, v in items if (why := nvdec_problem(v, capability))]
    else:
        bad = [(p, v.codec) for p, v in items if _CODEC_ALIASES.get(v.codec, v.codec) not in CPU_CODECS]
    if not bad:
        return
    where = "on the GPU" if gpu else "without a GPU (CPU decoding reads only VP8, VP9 and MJPEG)"
    shown = "\n".join(f"  {p}: {why}" for p, why in bad[:5])
    more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise UnsupportedCodecError(
        f"DALI cannot decode {len(bad)} video(s) {where}:\n{shown}{more}\n"
        f"use --pipeline pyav{'' if gpu else ', or run on a GPU'}")


def _capability(device_id: int | None) -> tuple[int, int] | None:
    return None if device_id is None else tuple(torch.cuda.get_device_capability(device_id))


def dali_frame_numbers(index, positions: np.ndarray, gpu: bool = False) -> np.ndarray:
    """DALI's numbers of the frames at presentation ``positions`` of a file, decoded on the GPU
    (NVDEC) or not.

    DALI numbers the frames of a codec that never reorders them (VP8, VP9, MJPEG) in decode
    order. In a sound file that is the presentation order; where a muxer's timestamps go back,
    the two differ, and the frame shown k-th is the one decoded at the index's ``decode_pos[k]``.
    Codecs with B-frames keep the presentation position (their decoders reorder). NVDEC also
    outputs the frames an mp4 edit list hides, which FFmpeg's decoders drop: on the GPU the
    hidden frames before the first shown one count too.
    """
    numbers = index.decode_pos[positions] if _numbered_in_decode_order(index.codec) else positions
    return numbers + index.hidden_leading if gpu else numbers


def _renumbered(info, gpu: bool) -> bool:
    """Whether a video's DALI frame numbers differ from its presentation positions."""
    return (info.display_order_differs and _numbered_in_decode_order(info.codec)) or (gpu and info.hidden_leading > 0)


def _numbered_in_decode_order(codec: str) -> bool:
    """Whether DALI numbers ``codec``'s frames in decode order (:func:`dali_frame_numbers`)."""
    return _CODEC_ALIASES.get(codec, codec) in CPU_CODECS


def _device_id(device: str | torch.device) -> int | None:
    """DALI's device_id for a torch device: None (CPU-only pipeline) unless it is CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def to_torch(out, device_id: int | None) -> torch.Tensor:
    """A DALI output batch as one torch tensor, on DALI's device, without a copy."""
    tensor = out.as_tensor()
    if device_id is None:
        return torch.from_dlpack(tensor)
    with torch.cuda.device(device_id):
        return torch.from_dlpack(tensor)


# -- colour ------------------------------------------------------------------------------------

# (Kr, Kb) of the YUV -> RGB matrices FFmpeg's swscale applies by a stream's colour-matrix tag
# (AVColorSpace): what PyAV's conversion, and so the PyAV pipeline, uses. Untagged streams and
# the other tags get BT.601's, which is also what DALI's decoders apply to every stream.
_BT601 = (0.299, 0.114)
_MATRIX_K = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 7: (0.212, 0.087), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}


def _ycbcr_to_rgb(kr: float, kb: float) -> np.ndarray:
    kg = 1 - kr - kb
    return np.array([[1, 0, 2 * (1 - kr)], [1, -2 * (1 - kb) * kb / kg, -2 * (1 - kr) * kr / kg],
                     [1, 2 * (1 - kb), 0]])


@functools.lru_cache(maxsize=None)
def colour_correction(colorspace: int | None) -> np.ndarray | None:
    """The 3x3 matrix that turns DALI's RGB of a stream tagged ``colorspace`` (converted with
    BT.601's coefficients, whatever the tag) into the RGB its own matrix gives, as PyAV
    converts it; None where the two already agree. Both conversions share the scaled Y, Cb and
    Cr, so the correction is linear in RGB (exact but for DALI's clipping of out-of-gamut
    colours to 0-255)."""
    k = _MATRIX_K.get(colorspace)
    if k is None:
        return None
    matrix = (_ycbcr_to_rgb(*k) @ np.linalg.inv(_ycbcr_to_rgb(*_BT601))).astype(np.float32)
    matrix.flags.writeable = False  # one array per tag, shared by every video with it
    return matrix


_NO_CORRECTION = np.eye(3, dtype=np.float32)
_NO_CORRECTION.flags.writeable = False


def _correct_colours(frames: np.ndarray, colorspace: int | None) -> np.ndarray:
    matrix = colour_correction(colorspace)
    if matrix is None:
        return frames
    return np.clip(np.rint(frames.astype(np.float32) @ matrix.T), 0, 255).astype(np.uint8)


# -- read_frames -----------------------------------------------------------------------------


@dali.pipeline_def(exec_dynamic=True, prefetch_queue_depth=1)
def _reader_graph(decoder_device: str):
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    return fn.decoders.video(encoded, frames=frames, device=decoder_device, pad_mode="none")


_readers: dict[int | None, dali.Pipeline] = {}
_readers_lock = threading.Lock()


def _decode(path: str, frames: np.ndarray, device_id: int | None) -> np.ndarray:
    """Sorted unique ``frames`` of ``path`` via a cached one-sample DALI pipeline, ``[F, H, W, 3]``."""
    data = np.fromfile(path, dtype=np.uint8)
    with _readers_lock:  # a DALI pipeline is not thread-safe
        pipe = _readers.get(device_id)
        if pipe is None:
            pipe = _reader_graph("cpu" if device_id is None else "mixed", batch_size=1, num_threads=1,
                                 device_id=device_id)
            pipe.build()
            _readers[device_id] = pipe
        try:
            pipe.feed_input("encoded", [data])
            pipe.feed_input("frames", [frames.astype(np.int32)])
            (out,) = pipe.run()
        except Exception as e:  # noqa: BLE001 -- DALI raises RuntimeError/IndexError/...; the pipeline is dead
            del _readers[device_id]
            raise VideoReadError(path, f"DALI cannot decode it: {_first_line(e)}") from e
        out = out.as_cpu() if device_id is not None else out
        return np.array(out[0])


def _first_line(e: BaseException) -> str:
    # DALI's messages carry the graph's Python traceback; the reason is in the "encountered" part.
    text = str(e)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def read_frames(path: str, frame_indices: Sequence[int], device: str = "cpu") -> np.ndarray:
    """Frames ``frame_indices`` (presentation order, from 0) of ``path`` as uint8 [T, H, W, 3] RGB,
    decoded by DALI on the CPU or (``device="gpu"``) with NVDEC.

    The contract of :func:`pipelines.pyav.read_frames`: rows follow ``frame_indices`` (repeated and
    unsorted indices allowed); FileNotFoundError for a missing file, IndexError for an index outside
    the video, VideoReadError when the file cannot be read. Frames are numbered by the same probe
    index as the PyAV reader, in the colours of the stream's matrix tag as PyAV converts it
    (:func:`colour_correction`); the pixels differ from PyAV's by the decoders' rounding and
    chroma upsampling only (see docs/decoding-notes.md). A codec DALI cannot decode on
    ``device`` raises UnsupportedCodecError.
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    index = frame_index(path)
    path = os.path.abspath(os.fspath(path))
    device_id = None if device == "cpu" else _device_id("cuda")
    _check_codecs([(path, index)], gpu=device_id is not None, capability=_capability(device_id))
    positions = requested_positions(path, frame_indices, index.num_frames)
    if len(positions) == 0:
        return np.empty((0, index.height, index.width, 3), dtype=np.uint8)
    frames, rows = np.unique(dali_frame_numbers(index, positions, gpu=device_id is not None), return_inverse=True)
    decoded = _decode(path, frames, device_id)
    if len(decoded) != len(frames):
        raise VideoReadError(path, f"DALI returned {len(decoded)} of {len(frames)} frames")
    return _correct_colours(decoded[rows.reshape(-1)], index.colorspace)


# -- the DALI pipeline -----------------------------------------------------------------------


def _view_types(num_slots: int) -> list:
    """DALI dtypes of one view's columns: frame order, flip, then the crop box, or with
    RandAugment (``num_slots`` layers) the augmentation's columns."""
    if not num_slots:
        return [types.INT32, types.INT32, types.INT32, types.INT32]
    return [types.INT32, types.INT32, *column_types(num_slots)]


def _view_graph(video, order, mirror, rest, size: int, num_slots: int, gpu: bool, crop_first: bool):
    """One view of decoded frames ``video`` (FHWC uint8): its frames in ``order`` (None: already
    in clip order), cropped, resized (and RandAugmented), flipped and normalised: CFHW float."""
    if num_slots:
        clip = augment_graph(video if order is None else fn.sequence_rearrange(video, new_order=order), rest,
                             size, num_slots, gpu=gpu)
    else:
        anchor, shape = rest
        # Integer anchor/shape are pixels (floats would be relative); crop then resize, as
        # the CPU transform does: a resize ROI instead would blend in pixels from outside.
        first = order is not None and not crop_first
        clip = fn.sequence_rearrange(video, new_order=order) if first else video
        clip = fn.slice(clip, anchor, shape, axis_names="HW")
        clip = fn.resize(clip, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
        if order is not None and crop_first:
            clip = fn.sequence_rearrange(clip, new_order=order)
    return fn.crop_mirror_normalize(clip, dtype=types.FLOAT, output_layout="CFHW", mirror=mirror,
                                    mean=[255 * m for m in CLIP_MEAN], std=[255 * s for s in CLIP_STD])


@dali.pipeline_def(exec_dynamic=True)
def _clip_graph(feed, num_views: int, size: int, decoder_device: str, num_slots: int = 0, crop_first: bool = False,
                correct: bool = False):
    """Encoded videos -> ``num_views`` outputs of ``[C, T, size, size]`` float clips.

    ``crop_first``: views that share the decoded frames (spatial views, a training clip) crop and
    resize them before putting them in the view's order, so no view copies full-size frames;
    views with frames of their own (temporal views) take them first. ``correct``: each video's
    decoded frames go through its :func:`colour_correction` (a 3x3 matrix per video, fed).
    """
    view_types = _view_types(num_slots)
    n = len(view_types)
    video_types = [types.UINT8, types.INT32] + ([types.FLOAT] if correct else [])
    columns = fn.external_source(source=feed, num_outputs=len(video_types) + n * num_views, batch=True,
                                 dtype=video_types + view_types * num_views)
    encoded, frames = columns[:2]
    per_view = columns[len(video_types):]
    # pad_mode="none": a frame past DALI's end of the video is an error, not a black frame
    # (DALI's default), should DALI ever count a file's frames differently from the probe.
    video = fn.decoders.video(encoded, frames=frames, device=decoder_device, pad_mode="none")  # FHWC uint8
    if correct:
        video = fn.coord_transform(video, M=columns[2], dtype=types.UINT8)
    outputs = []
    for v in range(num_views):
        order, mirror, *rest = per_view[n * v:n * (v + 1)]
        outputs.append(_view_graph(video, order, mirror, rest, size, num_slots, decoder_device == "mixed",
                                   crop_first))
    return tuple(outputs)


@dali.pipeline_def(exec_dynamic=True)
def _reader_graph_of_clips(feed, file_list: str, num_frames: int, stride: int, size: int, gpu: bool,
                           num_slots: int = 0, correct: bool = False):
    """``fn.experimental.readers.video`` over ``file_list`` (one ``path label first end`` line per
    training clip, in batch order) -> ``[C, T, size, size]`` float clips. The reader keeps its
    decoders and file indexes from one clip to the next. A range ``[first, first + (T - 1) *
    stride + 1)`` cut at the video's end, with ``pad_mode="edge"``, gives exactly the sampler's
    frames, a short video's repeated last frame included. ``feed`` gives each clip's colour
    correction, flip and crop (or RandAugment) columns in the same order. The lines' labels are
    their numbers in the list, returned with the clips: a reader that leaves out a file it
    cannot open shifts them."""
    # No frame order: the reader's frames are the clip's.
    view_types = ([types.FLOAT] if correct else []) + _view_types(num_slots)[1:]
    columns = fn.external_source(source=feed, num_outputs=len(view_types), batch=True, dtype=view_types)
    colour, (mirror, *rest) = (columns[0], columns[1:]) if correct else (None, columns)
    video, line = fn.experimental.readers.video(
        device="gpu" if gpu else "cpu", file_list=file_list, file_list_format="frames",
        file_list_include_end=False, sequence_length=num_frames, stride=stride, step=2**30, pad_mode="edge",
        random_shuffle=False, name="reader")
    if correct:
        video = fn.coord_transform(video, M=colour, dtype=types.UINT8)
    return _view_graph(video, None, mirror, rest, size, num_slots, gpu, crop_first=True), line


@dataclass
class _Pending:
    """What the training loop needs of a batch fed to DALI, kept outside the graph."""

    number: int  # batch position in the epoch
    paths: list[str]
    frames: list[np.ndarray]
    labels: list[int]
    index: list[int]
    epoch: list[int]


class _Feeder:
    """The external_source callback: builds batch ``cursor`` of the epoch, skipping bad videos.
    One feeder serves its graph for every epoch (:meth:`start`)."""

    def __init__(self, owner: DALIPipeline):
        self.owner, self.batches, self.cursor = owner, [], 0
        self.pending: collections.deque[_Pending] = collections.deque()

    def start(self, batches: list[list[tuple[int, int]]], cursor: int) -> None:
        self.batches, self.cursor = batches, cursor
        self.pending.clear()

    def __call__(self):
        while self.cursor < len(self.batches):
            number, self.cursor = self.cursor, self.cursor + 1
            if self.cursor < len(self.batches):  # the next batch's files load while this one is built
                self.owner._read_ahead(self.batches[self.cursor])
            fed = self.owner._build_batch(number, self.batches[number])
            if fed is not None:
                self.pending.append(fed[0])
                return fed[1]
        raise StopIteration


class _ReaderFeed:
    """The reader graph's external_source callback: batch ``cursor``'s flip and crop (or
    RandAugment) columns, in the order of the reader's file list."""

    def __init__(self, owner: DALIPipeline, batches: list[list[tuple[int, int]]], specs: dict):
        self.owner, self.batches, self.specs, self.cursor = owner, batches, specs, 0
        self.pending: collections.deque[_Pending] = collections.deque()

    def __call__(self):
        if self.cursor >= len(self.batches):
            raise StopIteration
        number, self.cursor = self.cursor, self.cursor + 1
        pending = _Pending(number, [], [], [], [], [])
        columns: list[list[np.ndarray]] = []
        for epoch, index in self.batches[number]:
            # training: one view, whose ClipSpec the epoch's plan drew
            wanted, (view,) = self.owner._clip_columns(epoch, index, self.specs[epoch, index])
            # no frame order: the reader gives the clip's frames in order
            colour = [self.owner._colour[index]] if self.owner.correct_colours else []
            columns.append([*colour, *view[1:]])
            record = self.owner.records[index]
            pending.paths.append(record.path)
            pending.frames.append(wanted)
            pending.labels.append(record.label)
            pending.index.append(index)
            pending.epoch.append(epoch)
        self.pending.append(pending)
        return tuple(list(c) for c in zip(*columns))


class DALIPipeline:
    """``--pipeline dali``: the sampler's clips decoded and transformed by DALI (GPU or CPU).

    ``cfg.extra["dali_decoder"]``: ``"graph"`` (default) decodes each batch's frame lists with
    ``fn.decoders.video``; ``"reader"`` has training epochs with dense sampling read by
    ``fn.experimental.readers.video``, which keeps its decoders from clip to clip, the same clips
    (a per-epoch file list of the sampler's frame ranges), with the graph for the batches the
    reader cannot give (VP8/VP9/MJPEG files whose timestamps go back, known bad videos, paths
    with whitespace) and for the rest of an epoch in which the reader failed.
    """

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.device_id = _device_id(self.device)
        records, infos = load_dataset(cfg)
        _check_codecs([(r.path, i) for r, i in zip(records, infos)], gpu=self.device_id is not None,
                      capability=_capability(self.device_id))
        self.records, self.infos = records, infos
        self.num_samples = len(records)
        # Each video's colour correction (identity where none is needed); the graph applies them
        # only when some video needs one.
        corrections = [colour_correction(i.colorspace) for i in infos]
        self._colour = [_NO_CORRECTION if m is None else m for m in corrections]
        self.correct_colours = any(m is not None for m in corrections)
        self.sampler = make_sampler(cfg)
        self.num_views = 1 if cfg.train else self.sampler.num_views
        self.keys = EpochKeys(len(records), cfg)
        self.batches_per_epoch = batches_per_epoch(len(self.keys), cfg, f"{cfg.list_path} ({len(records)} readable videos)")
        # One slot per RandAugment layer: each clip's ops run inside the graph.
        self.num_slots = self.sampler.augment.num_layers if self.sampler.augment else 0
        self.known_bad: dict[str, str] = {}  # path -> reason, across epochs
        self._failures: dict[tuple[int, int], list[tuple[str, str]]] = {}  # (batch, slot) -> failures
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None  # read-ahead of the next batch's files
        self._ahead: dict[int, concurrent.futures.Future] = {}
        self.bad: list[tuple[str, str]] = []  # this epoch's, as DecodingPipeline.bad
        # A training pipeline keeps its built graph from one epoch to the next (an epoch that ran
        # to its end leaves nothing queued in it); an evaluation's lets go of it after each pass,
        # so that it holds no device memory while training runs.
        self._graph: tuple[_Feeder, dali.Pipeline] | None = None
        self.graphs_built = 0
        decoder = cfg.extra.get("dali_decoder", "graph")
        if decoder not in ("graph", "reader"):
            raise ValueError(f"dali_decoder must be 'graph' or 'reader', got {decoder!r}")
        self.use_reader = decoder == "reader" and training_epoch(cfg) and cfg.sampling == "dense"
        self.readers_built = 0

    def __len__(self) -> int:
        return self.batches_per_epoch  # a full epoch, whatever a resume skips

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Reseed for ``epoch``; a resumed run starts ``skip_batches`` into it without decoding them."""
        self.keys.epoch, self.keys.skip = epoch, skip_batches * self.cfg.batch_size

    # -- feeding -----------------------------------------------------------------------------

    def _epoch_batches(self) -> list[list[tuple[int, int]]]:
        keys, b = list(self.keys), self.cfg.batch_size
        batches = [keys[i:i + b] for i in range(0, len(keys), b)]
        if training_epoch(self.cfg) and batches and len(batches[-1]) < b:
            batches.pop()  # as the PyAV pipeline's drop_last
        return batches

    def _read_ahead(self, keys: list[tuple[int, int]]) -> None:
        """Start reading the files of ``keys`` in the read-ahead threads: the feeding callback runs
        on the training thread, inside ``pipe.run()``, which must not wait for the disk."""
        if self._reader is None:
            self._reader = concurrent.futures.ThreadPoolExecutor(max(1, min(8, self.cfg.num_workers)),
                                                                 thread_name_prefix="dali-read-ahead")
        for _, index in keys:
            if index not in self._ahead and self.records[index].path not in self.known_bad:
                self._ahead[index] = self._reader.submit(np.fromfile, self.records[index].path, dtype=np.uint8)

    def _read(self, index: int) -> np.ndarray:
        path = self.records[index].path
        if path in self.known_bad:
            raise VideoReadError(path, self.known_bad[path])
        ahead = self._ahead.pop(index, None)
        return ahead.result() if ahead is not None else np.fromfile(path, dtype=np.uint8)

    def _build_batch(self, number: int, keys: list[tuple[int, int]]):
        """(pending record, external_source outputs) of one batch, or None when every video is bad."""
        pending = _Pending(number, [], [], [], [], [])
        per_view = len(_view_types(self.num_slots))
        first_view = 3 if self.correct_colours else 2  # after the bytes, the frames (and the colour matrix)
        columns: list[list[np.ndarray]] = [[] for _ in range(first_view + per_view * self.num_views)]
        for slot, (epoch, first) in enumerate(keys):
            failures, data = [], None
            # Training replaces a video that fails, as the PyAV pipeline does; evaluation skips it.
            replace = training_epoch(self.cfg)
            tries = replacements(self.cfg.seed, epoch, first, len(self.records)) if replace else (first,)
            for index in tries:
                try:
                    data = self._read(index)
                    break
                except (OSError, VideoReadError) as e:
                    failures.append((self.records[index].path, failure_reason(e)))
            self._record_failures((number, slot), failures)
            if data is None:
                continue
            wanted, views = self._clip_columns(epoch, index)
            columns[0].append(data)
            columns[1].append(wanted.astype(np.int32))
            if self.correct_colours:
                columns[2].append(self._colour[index])
            for v, view in enumerate(views):
                for c, value in enumerate(view):
                    columns[first_view + per_view * v + c].append(value)
            pending.paths.append(self.records[index].path)
            pending.frames.append(wanted)
            pending.labels.append(self.records[index].label)
            pending.index.append(index)
            pending.epoch.append(epoch)
        return (pending, tuple(columns)) if pending.paths else None

    def _clip_columns(self, epoch: int, index: int, specs=None) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """Video ``index``'s clips of ``epoch`` (``specs``, or the sampler's): the sorted unique
        frames they need, and per view the external_source columns (frame order, flip, then the
        crop box or RandAugment's columns)."""
        if specs is None:
            specs = clip_specs(self.sampler, self.cfg.train, (epoch, index), self.records[index], self.infos[index])
        positions = np.array([s.frame_indices for s in specs])
        info = self.infos[index]
        if _renumbered(info, self.device_id is not None):
            positions = dali_frame_numbers(frame_index(self.records[index].path), positions, self.device_id is not None)
        wanted, rows = np.unique(positions, return_inverse=True)
        rows = rows.reshape(len(specs), -1)
        views = []
        for v, spec in enumerate(specs):
            top, left, h, w = spec.crop
            view = [rows[v].astype(np.int32), np.array(spec.flip, np.int32)]
            if self.num_slots:
                plan = plan_clip(spec.augment, info.height, info.width, spec.crop, self.sampler.size)
                view += augment_columns(spec.augment, plan, info.height, info.width, self.sampler.size,
                                        self.num_slots)
            else:
                view += [np.array([top, left], np.int32), np.array([h, w], np.int32)]
            views.append(view)
        return wanted, views

    def _record_failures(self, slot: tuple[int, int], failures: list[tuple[str, str]]) -> None:
        # A batch is fed again after a rebuild: keyed by slot, its failures are counted once.
        if not failures:
            self._failures.pop(slot, None)
            return
        old = self._failures.get(slot, [])
        report_bad_videos(failures[len(old):] if failures[:len(old)] == old else failures,
                          training_epoch(self.cfg))
        self._failures[slot] = failures
        self.bad = [f for fs in self._failures.values() for f in fs]

    # -- running -----------------------------------------------------------------------------

    def _build(self, feeder: _Feeder) -> dali.Pipeline:
        with untraced_definition(self.num_slots > 0):
            pipe = _clip_graph(feeder, self.num_views, self.sampler.size,
                               "cpu" if self.device_id is None else "mixed", self.num_slots,
                               crop_first=self.cfg.train or self.sampler.num_temporal_views == 1,
                               correct=self.correct_colours, batch_size=self.cfg.batch_size,
                               num_threads=max(1, self.cfg.num_workers), device_id=self.device_id,
                               prefetch_queue_depth=2, enable_conditionals=self.num_slots > 0)
            pipe.build()
        return pipe

    def _find_bad(self, pending: Sequence[_Pending], error: Exception) -> None:
        """Decodes a failed batch's videos one by one; marks the unreadable ones or raises."""
        found = False
        for fed in pending:
            for path, frames in zip(fed.paths, fed.frames):
                try:
                    _decode(path, frames, self.device_id)
                except Exception as e:  # noqa: BLE001 -- whatever DALI says, this file is what fails
                    self.known_bad[path] = failure_reason(e)
                    found = True
            if found:
                return
        files = "\n".join(f"  {p}" for fed in pending for p in fed.paths)
        raise RuntimeError(f"DALI failed on a batch holding these videos, each of which decodes on its own:\n"
                           f"{files}\n{error}") from error

    def _check_limit(self) -> None:
        check_bad_videos(self.bad, len(self.keys), self.cfg.max_bad_fraction)

    def _batch(self, outputs, fed: _Pending) -> Batch:
        clips = [to_torch(o, self.device_id) for o in outputs]  # num_views x [B, 3, T, S, S]
        # Rows video-major, views in order within a video: as the PyAV pipeline's collate.
        clips = clips[0] if len(clips) == 1 else torch.stack(clips, 1).flatten(0, 1)
        v = self.num_views
        labels = torch.tensor(fed.labels, dtype=torch.long).repeat_interleave(v)
        index = torch.tensor(fed.index, dtype=torch.long).repeat_interleave(v)
        # A training row's view is its clip's epoch, as in the PyAV pipeline.
        view = torch.tensor(fed.epoch) if self.cfg.train else torch.arange(v, dtype=torch.long).repeat(len(fed.index))
        return Batch(clips, *row_ids_to_device(labels, index, view, self.device))

    def close(self) -> None:
        """Let go of the built graph (it is built again on the next pass)."""
        self._graph = None
        self._ahead.clear()

    def __iter__(self) -> Iterator[Batch]:
        self._failures, self.bad = {}, []
        batches = self._epoch_batches()
        stream = torch.cuda.current_stream(self.device_id) if self.device_id is not None else None
        yield from (self._reader_batches if self.use_reader else self._graph_batches)(batches, stream)
        self._check_limit()
        summarise_bad_videos(self.keys.epoch, self.bad, training_epoch(self.cfg))

    def _graph_batches(self, batches: list[list[tuple[int, int]]], stream) -> Iterator[Batch]:
        start = 0
        while start < len(batches):
            if self._graph is None:
                feeder = _Feeder(self)
                self._graph = (feeder, self._build(feeder))
                self.graphs_built += 1
            feeder, pipe = self._graph
            feeder.start(batches, start)
            ended = False
            try:
                while True:
                    try:
                        outputs = pipe.run(stream)
                    except StopIteration:
                        pipe.reset()  # ready for the next epoch's first run
                        start, ended = len(batches), True
                        break
                    except Exception as e:  # noqa: BLE001 -- a DALI error kills the pipeline: find the file
                        self._find_bad(list(feeder.pending), e)
                        start = feeder.pending[0].number  # rebuild, and feed that batch again
                        break
                    self._check_limit()
                    fed = feeder.pending.popleft()
                    yield self._batch(outputs, fed)
            finally:
                if not (ended and self.cfg.train):  # an epoch left early has batches queued in the graph
                    self.close()
                self._ahead.clear()  # reads for batches that will not be fed (an epoch left early)

    # -- the reader (dali_decoder="reader") ------------------------------------------------------

    def _reader_range(self, index: int, spec) -> tuple[int, int] | None:
        """``[first, end)`` of the reader's file-list line that gives training clip ``spec`` of
        video ``index`` (``first + i * stride`` while below ``end``, then frame ``end - 1``
        repeated), or None when no line does."""
        record, info = self.records[index], self.infos[index]
        # A file whose DALI frame numbers are not its presentation positions (a reorder-free
        # codec with a muxer's odd timestamps: dali_frame_numbers) has no such range; nor has one
        # with frames an edit list hides, whose numbering in the reader is unknown.
        renumbered = _renumbered(info, self.device_id is not None) or info.hidden_leading > 0
        if renumbered or record.path in self.known_bad or any(c.isspace() for c in record.path):
            return None
        frames = np.asarray(spec.frame_indices)
        first, last = int(frames[0]), int(frames[-1])
        if not np.array_equal(frames, np.minimum(first + self.cfg.sampling_rate * np.arange(len(frames)), last)):
            return None
        return first, last + 1

    def _reader_batches(self, batches: list[list[tuple[int, int]]], stream) -> Iterator[Batch]:
        import tempfile

        # Each clip's ClipSpec, drawn once: for its range here and its columns when it is fed.
        specs = {(e, i): clip_specs(self.sampler, True, (e, i), self.records[i], self.infos[i])
                 for keys in batches for e, i in keys}
        ranges = [[self._reader_range(i, specs[e, i][0]) for e, i in keys] for keys in batches]
        by_reader = [all(r is not None for r in rs) for rs in ranges]
        if not any(by_reader):
            yield from self._graph_batches(batches, stream)
            return
        clips = [(i, r) for keys, rs, use in zip(batches, ranges, by_reader) if use for (_, i), r in zip(keys, rs)]
        lines = [f"{self.records[i].path} {number} {r[0]} {r[1]}\n" for number, (i, r) in enumerate(clips)]
        with tempfile.TemporaryDirectory(prefix="evl-dali-reader-") as tmp:
            list_path = os.path.join(tmp, "clips.txt")
            with open(list_path, "w", encoding="utf-8") as f:
                f.writelines(lines)
            feed = _ReaderFeed(self, [keys for keys, use in zip(batches, by_reader) if use], specs)
            try:  # the reader opens every file of its list here
                with untraced_definition(self.num_slots > 0):
                    pipe = _reader_graph_of_clips(
                        feed, list_path, self.cfg.num_frames, self.cfg.sampling_rate, self.sampler.size,
                        self.device_id is not None, self.num_slots, self.correct_colours,
                        batch_size=self.cfg.batch_size,
                        num_threads=max(1, self.cfg.num_workers), device_id=self.device_id, prefetch_queue_depth=2,
                        enable_conditionals=self.num_slots > 0)
                    pipe.build()
            except Exception as e:  # noqa: BLE001 -- the graph finds and replaces what failed
                log.warning("DALI's video reader could not start (%s); the graph decodes this epoch", _first_line(e))
                yield from self._graph_batches(batches, stream)
                return
            self.readers_built += 1
            fallback = [keys for keys, use in zip(batches, by_reader) if not use]
            graph = self._graph_batches(fallback, stream)
            try:
                for k, use in enumerate(by_reader):
                    if not use:
                        yield next(graph)
                        continue
                    problem = None
                    try:
                        clips, line = pipe.run(stream)
                        got = np.concatenate([np.asarray(t).reshape(-1) for t in
                                              (line.as_cpu() if hasattr(line, "as_cpu") else line)])
                        first = feed.pending[0].number * self.cfg.batch_size  # the list line of its first clip
                        if not np.array_equal(got, np.arange(first, first + len(got))):
                            problem = "it left out a file it could not open, so its clips no longer follow the list"
                    except Exception as e:  # noqa: BLE001 -- the graph finds and replaces what failed
                        problem = _first_line(e)
                    if problem is not None:
                        log.warning("DALI's video reader failed at batch %d of the epoch (%s); the graph decodes "
                                    "the rest of it", k, problem)
                        graph.close()
                        del pipe
                        yield from self._graph_batches(batches[k:], stream)
                        return
                    yield self._batch((clips,), feed.pending.popleft())
                next(graph, None)  # the fallback batches ran out: the graph's epoch ends cleanly
            finally:
                graph.close()
