"""Frame-exact random access to video files with PyAV, the CPU decoding backend.

``read_frames(path, indices)`` returns the requested frames, numbered in presentation order
from the container's packets (``frame_index``), without decoding the whole file: it seeks to
the right keyframe, matches decoded frames by pts and stops after the last requested one. The
rules it follows, and why, are in docs/decoding-notes.md ("Numbering frames", "Seeking").
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from .base import PipelineConfig
from .loader import DecodingPipeline

__all__ = ["FrameIndex", "VideoReadError", "frame_index", "read_frames"]

NO_TS = np.iinfo(np.int64).min  # a packet without dts (mkv often omits it)
INDEX_CACHE_SIZE = 4096  # entries of a few KB each: a few tens of MB per process at most
TRUNCATED_SHARE = 0.02  # frames missing from what the header declares, beyond 2, that make a file truncated


class VideoReadError(RuntimeError):
    """A video file that exists but cannot be read: corrupt, no video stream, no frames."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, eq=False)
class FrameIndex:
    """Where every frame of a file is, from one demux pass; frame k is the k-th pts.

    Per-frame arrays (length ``num_frames``) are in presentation order. ``decode_pos`` is the
    position of the frame's packet in demux (= decode) order. Without pts (raw ``.h264``) the
    arrays are in demux order, ``pts`` and ``dts`` hold ``NO_TS`` and frames must be counted
    from the start.
    """

    pts: np.ndarray  # int64, ascending
    dts: np.ndarray  # int64, NO_TS where missing
    decode_pos: np.ndarray  # int64
    keyframe: np.ndarray  # bool
    time_base: Fraction
    fps: float
    width: int
    height: int
    codec: str
    stream_index: int
    has_pts: bool = True
    # The demuxer that read the file ("mov", "matroska", ...): later opens name it instead of
    # letting FFmpeg probe every format (a quarter to a half of opening a small clip).
    container_format: str | None = None

    @property
    def num_frames(self) -> int:
        return len(self.keyframe)

    @functools.cached_property
    def shared_pts(self) -> int:
        """Frames whose pts another frame has too (a muxer's bug): 0 in a sound file."""
        if not self.has_pts or self.num_frames < 2:
            return 0
        same = self.pts[1:] == self.pts[:-1]
        return int(same.sum() + (same[1:] & ~same[:-1]).sum() + same[0])

    @functools.cached_property
    def _keys_by_decode(self) -> tuple[np.ndarray, np.ndarray]:
        """(presentation positions, decode positions) of the keyframes, in decode order."""
        pos = np.flatnonzero(self.keyframe)
        dec = self.decode_pos[pos]
        order = np.argsort(dec, kind="stable")
        return pos[order], dec[order]

    def start_keyframes(self, first: int, min_decode_pos: int) -> np.ndarray:
        """Keyframes to start decoding from to get every frame from ``first`` on, best first.

        A start keyframe displays at or before ``first`` and decodes at or before every wanted
        frame (``min_decode_pos``); the latest such keyframe in decode order decodes least.
        An open-GOP keyframe does not qualify for its own leading frames (they display before
        it), so for those the previous keyframe is chosen, from which they decode correctly.
        """
        pos, dec = self._keys_by_decode
        ok = (pos <= first) & (dec <= min_decode_pos)
        return pos[ok][::-1]


_local = threading.local()


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """``frame.to_ndarray(format="rgb24")``, through one reformatter per thread.

    ``to_ndarray`` sets up a new swscale context for every frame, which costs more than
    decoding a small frame; a reused reformatter keeps its context (same pixels).
    """
    # One thread, and one context per process: a threaded swscale context used across a fork
    # (DataLoader workers) waits forever on threads the child does not have. Parallelism comes
    # from the workers.
    pid, fmt = getattr(_local, "owner", (None, None))
    if pid != os.getpid():
        fmt = VideoReformatter()
        _local.owner = (os.getpid(), fmt)
    return fmt.reformat(frame, format="rgb24", threads=1).to_ndarray()


def _decoder_threads() -> str:
    """One decoding thread in a DataLoader worker, FFmpeg's choice elsewhere.

    The workers already decode one video each on every core; frame threads on top add thread
    hand-offs, and each seek drains them (8 per clip for sparse sampling). Kinetics-like 256 px
    H.264, one process: 12.2 ms per 8x16 clip single-threaded against 15.4 ms with "AUTO".
    In the main process (``--num_workers 0``, ``evl.predict``) threads still help large frames.
    """
    import torch.utils.data

    return "NONE" if torch.utils.data.get_worker_info() is not None else "AUTO"


def _video_stream(container: av.container.InputContainer, path: str) -> av.VideoStream:
    for stream in container.streams.video:
        # Cover art in mp4/mkv is a one-picture video stream; it is never the video.
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise VideoReadError(path, "no video stream")


def _open(path: str, container_format: str | None = None) -> av.container.InputContainer:
    try:
        if container_format:
            try:
                return av.open(path, format=container_format)
            except (av.FFmpegError, ValueError):
                pass  # no longer that format (the index is checked by size and mtime): probe it
        return av.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "video file not found", path) from None
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(path, f"cannot open: {e}") from e


def _declared_frames(container: av.container.InputContainer, stream: av.VideoStream, fps: float) -> int:
    """The frame count a file's header promises: the stream's (mp4 sample tables), else its
    duration's, else the container's duration when the video is its only stream (an audio
    track may outlast the video); 0 when it says nothing."""
    if stream.frames:
        return int(stream.frames)
    if fps <= 0:
        return 0
    if stream.duration and stream.time_base:
        return round(float(stream.duration * stream.time_base) * fps)
    if container.duration and len(container.streams) == 1:
        return round(container.duration / av.time_base * fps)
    return 0


def _build_index(path: str) -> FrameIndex:
    with _open(path) as container:
        stream = _video_stream(container, path)
        for other in container.streams:
            if other.index != stream.index:
                # Lets the demuxer skip audio etc. instead of returning it.
                other.discard = av.stream.Discard.all
        pts, dts, key = [], [], []
        hidden = 0
        try:
            for packet in container.demux(stream):
                # Empty packets are flush markers; discarded ones are hidden by an edit list
                # (mp4) and never displayed, so neither is a frame.
                if packet.size == 0 or packet.is_discard:
                    hidden += packet.size > 0
                    continue
                pts.append(packet.pts)
                dts.append(packet.dts)
                key.append(packet.is_keyframe)
        except av.FFmpegError as e:
            raise VideoReadError(path, f"cannot demux: {e}") from e
        if not key:
            raise VideoReadError(path, "no video frames")
        ctx = stream.codec_context
        n = len(key)
        has_pts = None not in pts
        decode_pos = np.arange(n, dtype=np.int64)
        dts_arr = np.array([NO_TS if d is None else d for d in dts], dtype=np.int64)
        key_arr = np.array(key, dtype=bool)
        if has_pts:
            pts_arr = np.array(pts, dtype=np.int64)
            order = np.argsort(pts_arr, kind="stable")
            pts_arr, dts_arr, decode_pos, key_arr = (
                pts_arr[order], dts_arr[order], decode_pos[order], key_arr[order])
        else:
            pts_arr = np.full(n, NO_TS, dtype=np.int64)
        time_base = stream.time_base or Fraction(1, 1)
        span = int(pts_arr[-1] - pts_arr[0]) if has_pts else 0
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        # The pts span is the truth; the declared rate wins only when it explains the span
        # to within the one tick of rounding of coarse time bases (mkv: 1 ms at 30000/1001).
        explained = rate and abs((n - 1) / rate - span * time_base) <= time_base
        if n > 1 and span > 0 and not explained:
            fps = float((n - 1) / (span * time_base))
        declared = _declared_frames(container, stream, fps)
        if declared and declared - (n + hidden) > max(2, TRUNCATED_SHARE * declared):
            raise VideoReadError(path, f"truncated: its header declares {declared} frames, the file holds {n + hidden} "
                                       "(an interrupted download or copy?)")
        for arr in (pts_arr, dts_arr, decode_pos, key_arr):
            arr.flags.writeable = False  # shared by every reader of the cached index
        return FrameIndex(
            pts=pts_arr, dts=dts_arr, decode_pos=decode_pos, keyframe=key_arr,
            time_base=time_base, fps=fps, width=ctx.width, height=ctx.height,
            codec=ctx.name, stream_index=stream.index, has_pts=has_pts,
            container_format=container.format.name.split(",")[0])


# -- frame indexes shared through the probe cache -------------------------------------------

# One record per frame, in presentation order: what FrameIndex holds per frame.
FRAME_RECORD = np.dtype([("pts", "<i8"), ("dts", "<i8"), ("decode_pos", "<i4"), ("keyframe", "u1")])


def index_records(index: FrameIndex) -> np.ndarray:
    """A frame index's per-frame arrays as ``FRAME_RECORD`` rows (for ``pipelines.probe``)."""
    rec = np.empty(index.num_frames, dtype=FRAME_RECORD)
    rec["pts"], rec["dts"], rec["decode_pos"], rec["keyframe"] = (
        index.pts, index.dts, index.decode_pos, index.keyframe)
    return rec


def index_meta(index: FrameIndex) -> dict:
    """The rest of a frame index, JSON-serialisable."""
    return {"time_base": [index.time_base.numerator, index.time_base.denominator], "fps": index.fps,
            "width": index.width, "height": index.height, "codec": index.codec,
            "stream_index": index.stream_index, "has_pts": index.has_pts, "format": index.container_format}


# abspath -> (size, mtime_ns, frames file, first row, rows, meta): registered by the probe in
# the training process, inherited by forked DataLoader workers, which then read a file's index
# from the shared frames file instead of demuxing the video once more.
_shared: dict[str, tuple] = {}
_frames_files: dict[str, np.ndarray] = {}  # per process: frames file -> its memory map


def register_shared_indexes(entries: dict[str, tuple]) -> None:
    _shared.update(entries)


def _shared_index(path: str, size: int, mtime_ns: int) -> FrameIndex | None:
    entry = _shared.get(path)
    if entry is None or entry[:2] != (size, mtime_ns):
        return None
    _, _, frames_file, first, count, meta = entry
    try:
        table = _frames_files.get(frames_file)
        if table is None:
            table = _frames_files[frames_file] = np.memmap(frames_file, dtype=FRAME_RECORD, mode="r")
        rows = np.array(table[first:first + count])
    except (OSError, ValueError):  # the file went away or is short: demux instead
        return None
    if len(rows) != count or count == 0:
        return None
    arrays = [rows[name].astype(np.int64 if name != "keyframe" else bool) for name in FRAME_RECORD.names]
    for arr in arrays:
        arr.flags.writeable = False
    pts, dts, decode_pos, keyframe = arrays
    return FrameIndex(pts=pts, dts=dts, decode_pos=decode_pos, keyframe=keyframe,
                      time_base=Fraction(*meta["time_base"]), fps=meta["fps"], width=meta["width"],
                      height=meta["height"], codec=meta["codec"], stream_index=meta["stream_index"],
                      has_pts=meta["has_pts"], container_format=meta.get("format"))


@functools.lru_cache(maxsize=INDEX_CACHE_SIZE)
def _cached_index(path: str, size: int, mtime_ns: int) -> FrameIndex:
    return _shared_index(path, size, mtime_ns) or _build_index(path)


def frame_index(path: str) -> FrameIndex:
    """The file's frame index, cached in-process per (path, size, mtime)."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "video file not found", path) from None
    return _cached_index(path, st.st_size, st.st_mtime_ns)


def _decode_packet(stream: av.VideoStream, packet: av.Packet) -> list[av.VideoFrame]:
    # One indirection so tests can count decoded frames.
    return stream.decode(packet)


class _ClipReader:
    """Decodes one request: owns the open container and the output array."""

    def __init__(self, path: str, index: FrameIndex, rows: dict[int, list[int]], num_rows: int):
        self.path, self.index, self.rows, self.num_rows = path, index, rows, num_rows
        self.out: np.ndarray | None = None
        self.container: av.container.InputContainer | None = None
        self.stream: av.VideoStream | None = None
        self.fresh = False  # nothing demuxed yet: decoding from the start needs no seek

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def reopen(self) -> None:
        self.close()
        self.container = _open(self.path, self.index.container_format)
        self.stream = self.container.streams[self.index.stream_index]
        self.stream.thread_type = _decoder_threads()
        self.fresh = True

    def _store(self, key: int, frame: av.VideoFrame) -> None:
        rgb = _to_rgb(frame)
        if self.out is None:
            self.out = np.empty((self.num_rows, *rgb.shape), dtype=np.uint8)
        elif rgb.shape != self.out.shape[1:]:
            raise VideoReadError(self.path, f"frame size changes mid-stream ({rgb.shape[:2]} "
                                 f"after {self.out.shape[1:3]})")
        rows = self.rows[key]
        if len(rows) == 1:
            self.out[rows[0]] = rgb
        else:
            self.out[rows] = rgb

    def _landed_at_or_before(self, packet: av.Packet, key: int) -> bool:
        index = self.index
        if packet.pts is not None:
            i = int(np.searchsorted(index.pts, packet.pts))
            if i < index.num_frames and index.pts[i] == packet.pts:
                return bool(index.decode_pos[i] <= index.decode_pos[key])
        key_dts = int(index.dts[key])
        return packet.dts is not None and key_dts != NO_TS and packet.dts <= key_dts

    def _attempt(
        self, want: set[int], drain_at: int, key: int | None, seek_ts: int | None
    ) -> set[int] | None:
        """Decodes from keyframe ``key`` (``seek_ts`` in stream time base) or from the start.

        ``drain_at`` is the pts of the wanted frame whose packet decodes last: once that packet
        is in, the decoder is drained instead of fed more packets to push out the frames it
        holds back for reordering (B-frames; frame threads hold one per thread). Packets of
        frames nobody wants are decoded with ``skip_frame = "NONREF"``: a frame no other frame
        predicts from (most B-frames, a third of a typical H.264 stream) is then not decoded.
        Returns the wanted pts that did not come out, or None when the seek landed after the
        keyframe (the demuxer seeks by dts, or ignores keyframe flags: MPEG-TS).
        """
        if seek_ts is None and not self.fresh:
            self.reopen()
        stream = self.stream
        if seek_ts is not None:
            try:
                self.container.seek(seek_ts, stream=stream, backward=True, any_frame=False)
            except av.FFmpegError:
                return None
        self.fresh = False
        missing = set(want)
        ctx = stream.codec_context
        check_landing = seek_ts is not None
        # Demuxers may land a keyframe or more early (mp4 with an edit list does): demuxing is
        # cheap, decoding is not, so packets before the chosen keyframe are skipped.
        skip_to = int(self.index.pts[key]) if key is not None else None
        for packet in self.container.demux(stream):
            if check_landing and packet.size:
                check_landing = False
                if not self._landed_at_or_before(packet, key):
                    return None
            if skip_to is not None:
                if packet.pts != skip_to:
                    continue
                skip_to = None
            last_in = packet.pts == drain_at and packet.size > 0
            ctx.skip_frame = "DEFAULT" if packet.pts in want else "NONREF"
            frames = _decode_packet(stream, packet)
            if last_in:  # every wanted packet is in: flush the rest out (a seek resets the decoder)
                frames = [*frames, *_decode_packet(stream, None)]
            for frame in frames:
                pts = frame.pts
                if pts in missing:
                    self._store(pts, frame)
                    missing.discard(pts)
                    if not missing:  # not "pts past the last wanted": a muxer's pts may go back
                        return missing
            if last_in:
                return missing
        return missing

    def read_segment(self, frames: np.ndarray) -> None:
        """Decodes the sorted unique presentation positions ``frames`` (one seek)."""
        index = self.index
        want = set(index.pts[frames].tolist())
        drain_at = int(index.pts[frames[np.argmax(index.decode_pos[frames])]])
        keys = index.start_keyframes(int(frames[0]), int(index.decode_pos[frames].min()))
        attempts: list[tuple[int | None, int | None]] = []
        # The best keyframe, then one earlier (the first may not decode what we need), each by
        # pts and, where the container has it, by dts; then the start of the file.
        for key in keys[:2].tolist():
            if index.decode_pos[key] == 0 and self.fresh:
                break  # the first packet: decoding from the start is the same, without a seek
            attempts.append((key, int(index.pts[key])))
            if index.dts[key] != NO_TS and index.dts[key] != index.pts[key]:
                attempts.append((key, int(index.dts[key])))
        attempts.append((None, None))
        failed_key = None
        for key, seek_ts in attempts:
            if key is not None and key == failed_key:
                continue  # it landed right but frames were missing: another ts will not help
            missing = self._attempt(want, drain_at, key, seek_ts)
            if missing is None:
                continue
            if not missing:
                return
            failed_key = key
        first_missing = sorted(missing)[0]
        frame = int(np.searchsorted(index.pts, first_missing))
        raise VideoReadError(self.path, f"frame {frame} (pts {first_missing}) could not be decoded "
                             f"({len(missing)} of {len(want)} wanted frames missing)")

    def read_sequential(self, last: int) -> None:
        """Decodes from the start up to presentation position ``last``, numbering frames as a
        sequential decode yields them: by output count in a file without pts; in a file whose
        frames share pts, the j-th frame decoded with pts p is the j-th position of p in the
        index (presentation order, ties in decode order), where matching by pts alone would
        give one frame for both."""
        index = self.index
        positions: dict[int, list[int]] | None = None
        if index.has_pts:
            positions = {}
            for pos, p in enumerate(index.pts.tolist()):
                positions.setdefault(p, []).append(pos)
        seen: dict[int, int] = {}
        todo = set(self.rows)
        n = -1
        packets = self.container.demux(self.stream)
        for packet in [*packets, None]:  # None: drain the frames the decoder still holds at the end
            for frame in _decode_packet(self.stream, packet):
                n += 1
                if positions is None:
                    pos = n
                else:
                    occurrence = seen.get(frame.pts, 0)
                    seen[frame.pts] = occurrence + 1
                    slots = positions.get(frame.pts, ())
                    if occurrence >= len(slots):
                        continue  # a frame the index does not count (an edit list hides it)
                    pos = slots[occurrence]
                if pos in todo:
                    self._store(pos, frame)
                    todo.discard(pos)
                    if not todo:
                        return
        raise VideoReadError(self.path, f"only {n + 1} frames decoded, frame {last} requested")


def _segments(index: FrameIndex, frames: np.ndarray) -> list[np.ndarray]:
    """Splits sorted unique positions where seeking to a later keyframe skips decoding.

    A new segment starts at a frame whose start keyframe decodes at least two packets after
    every frame of the current segment: continuing would decode the packets between them for
    nothing. A keyframe right after the segment (a dense clip across a GOP boundary) is
    reached by decoding on, without a seek and a new demux.
    """
    dec = index.decode_pos[frames]
    suffix_min = np.minimum.accumulate(dec[::-1])[::-1]
    # Only a frame with a keyframe shown since the previous wanted frame can start a segment;
    # a dense read then costs one check per GOP, not per frame.
    key_pos = np.flatnonzero(index.keyframe)
    gop = np.searchsorted(key_pos, frames, side="right")
    bounds = [0]
    for j in np.flatnonzero(gop[1:] != gop[:-1]).tolist():
        j += 1
        seg_max_dec = dec[bounds[-1] : j].max()
        keys = index.start_keyframes(int(frames[j]), int(suffix_min[j]))
        if len(keys) and index.decode_pos[keys[0]] > seg_max_dec + 1:
            bounds.append(j)
    bounds.append(len(frames))
    return [frames[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def requested_positions(path: str, frame_indices: Sequence[int], num_frames: int) -> np.ndarray:
    """``frame_indices`` as int64 positions, each checked against the video's frame count."""
    positions = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
    bad = positions[(positions < 0) | (positions >= num_frames)]
    if len(bad):
        raise IndexError(f"{path}: frame index {int(bad[0])} out of range for a video of {num_frames} frames")
    return positions


def read_frames(path: str, frame_indices: Sequence[int]) -> np.ndarray:
    """Frames ``frame_indices`` (presentation order, from 0) of ``path`` as uint8 [T, H, W, 3] RGB.

    Rows follow ``frame_indices``: repeated and unsorted indices are allowed. Raises
    FileNotFoundError for a missing file, IndexError for an index outside the video and
    VideoReadError when the file cannot be read.
    """
    index = frame_index(path)
    path = os.path.abspath(os.fspath(path))
    positions = requested_positions(path, frame_indices, index.num_frames)
    if len(positions) == 0:
        return np.empty((0, index.height, index.width, 3), dtype=np.uint8)
    frames = np.unique(positions)
    # Output rows per decoded frame, keyed the way frames are matched: by pts, or by count.
    by_pts = index.has_pts and not index.shared_pts  # else frames are numbered as they are decoded
    keys = index.pts[positions] if by_pts else positions
    rows: dict[int, list[int]] = {}
    for row, key in enumerate(keys.tolist()):
        rows.setdefault(key, []).append(row)
    reader = _ClipReader(path, index, rows, len(positions))
    try:
        reader.reopen()
        if by_pts:
            for segment in _segments(index, frames):
                reader.read_segment(segment)
        else:
            reader.read_sequential(int(frames[-1]))
    except av.FFmpegError as e:
        raise VideoReadError(path, f"decoding failed: {e}") from e
    finally:
        reader.close()
    return reader.out


# -- the PyAV pipeline ----------------------------------------------------------------------


class PyAVPipeline(DecodingPipeline):
    """``--pipeline pyav``: decode on the CPU in DataLoader workers, exactly the sampler's clips."""

    def __init__(self, cfg: PipelineConfig):
        super().__init__(cfg, read_frames)
