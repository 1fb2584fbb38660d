"""Where every frame of a video file is: the frame index both decoding backends number frames by.

One demux pass over a file's packets (no decoding) gives its ``FrameIndex``: per frame, in
presentation order, its pts, dts, decode position and keyframe flag, plus the stream's size,
codec and rate. "Frame k" is the k-th frame a sequential decode shows: the k-th pts, ties in
decode order (docs/decoding-notes.md, "Numbering frames"). The PyAV reader (:mod:`pipelines.pyav`)
seeks by it, the probe (:mod:`pipelines.probe`) summarises and caches it, and DALI's frame
lists are built from it. A file that cannot be indexed (no video stream, no frames, cut short)
raises :class:`VideoReadError` naming it.
"""

from __future__ import annotations

import array
import base64
import bisect
import errno
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

__all__ = ["FRAME_RECORD", "NO_TS", "FrameIndex", "VideoReadError", "failure_reason", "frame_index", "index_meta",
           "index_records", "open_video", "register_shared_indexes", "requested_positions"]

NO_TS = np.iinfo(np.int64).min  # a packet without dts (mkv often omits it)
INDEX_CACHE_SIZE = 4096  # entries of a few KB each: a few tens of MB per process at most
TRUNCATED_SHARE = 0.02  # frames missing from what the header declares, beyond 2, that make a file truncated


class VideoReadError(RuntimeError):
    """A video file that exists but cannot be read: corrupt, no video stream, no frames."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def failure_reason(e: BaseException) -> str:
    """Why a video failed, for a line that names the video already: a :class:`VideoReadError`'s
    reason and an OSError's message without the path they carry; anything else with its type."""
    if isinstance(e, VideoReadError):
        return e.reason
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


def ffmpeg_reason(e: Exception) -> str:
    """What went wrong in ``e``, for a :class:`VideoReadError` that names the file itself:
    FFmpeg's message and its last log line, without the error number and the file name PyAV's
    own text adds (``[Errno 1094995529] Invalid data found when processing input: '/path'``)."""
    if not isinstance(e, av.FFmpegError) or not e.strerror:
        return str(e)
    log = e.log  # (level, the logging component, its message), or None
    if not log or len(log) < 3:
        return e.strerror
    component, message = (str(part or "").strip() for part in log[1:3])
    if not message:
        return e.strerror
    return f"{e.strerror} ({f'[{component}] ' if component else ''}{message})"


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
    pix_fmt: str | None = None  # FFmpeg's name: chroma subsampling and bit depth ("yuv420p10le")
    profile: str | None = None  # the codec's profile ("High", "High 10", "Main 10", "Profile 2")
    colorspace: int | None = None  # the YUV -> RGB matrix the stream is tagged with (FFmpeg's AVColorSpace)
    # Frames an edit list (mp4) hides, which are no frames of the index: those shown before its
    # first frame, and the others. NVDEC outputs them, so DALI's GPU numbering counts them.
    hidden_leading: int = 0
    hidden_later: int = 0
    # Where each frame's packet lies in the file (byte offset and size, presentation order), in a
    # file whose packets are its own bytes (an mp4 without edit-list-hidden frames or in-band
    # side data): the reader then reads packets itself instead of seeking the demuxer. None
    # elsewhere (matroska and MPEG-TS frame their packets).
    offset: np.ndarray | None = None
    packet_size: np.ndarray | None = None
    # What a decoder needs beyond the packets: the codec's setup bytes (parameter sets) and
    # the colour range tag (the matrix is ``colorspace``), which the container may carry instead
    # of the stream. With them the reader decodes in-place packets without opening the file.
    extradata: bytes | None = None
    color_range: int | None = None

    @property
    def num_frames(self) -> int:
        return len(self.keyframe)

    @functools.cached_property
    def by_decode(self) -> np.ndarray:
        """The presentation position of the frame at each decode position."""
        order = np.empty(self.num_frames, dtype=np.int64)
        order[self.decode_pos] = np.arange(self.num_frames)
        return order

    @functools.cached_property
    def shared_pts(self) -> int:
        """Frames whose pts another frame has too (a muxer's bug): 0 in a sound file."""
        if not self.has_pts or self.num_frames < 2:
            return 0
        same = self.pts[1:] == self.pts[:-1]
        return int(same.sum() + (same[1:] & ~same[:-1]).sum() + same[0])

    @property
    def matched_by_pts(self) -> bool:
        """Whether every frame has a pts of its own, so that a decoded frame is known by its pts;
        otherwise frames are numbered in the order a sequential decode outputs them."""
        return self.has_pts and not self.shared_pts

    @functools.cached_property
    def keyframe_positions(self) -> np.ndarray:
        """The presentation positions of the keyframes, ascending."""
        return np.flatnonzero(self.keyframe)

    @functools.cached_property
    def _keys_by_decode(self) -> tuple[array.array, array.array]:
        """(presentation positions, decode positions) of the keyframes, in decode order.

        Python arrays (8 bytes an item, as numpy's): a reader bisects them and walks a few items
        per seek, where numpy's per-call cost is larger than the work."""
        pos = self.keyframe_positions
        dec = self.decode_pos[pos]
        order = np.argsort(dec, kind="stable")
        return array.array("q", pos[order].tolist()), array.array("q", dec[order].tolist())

    def start_keyframes(self, first: int, min_decode_pos: int, limit: int | None = None) -> list[int]:
        """Keyframes to start decoding from to get every frame from ``first`` on, best first
        (the first ``limit`` of them).

        A start keyframe displays at or before ``first`` and decodes at or before every wanted
        frame (``min_decode_pos``); the latest such keyframe in decode order decodes least.
        An open-GOP keyframe does not qualify for its own leading frames (they display before
        it), so for those the previous keyframe is chosen, from which they decode correctly.
        """
        pos, dec = self._keys_by_decode
        found: list[int] = []
        for i in range(bisect.bisect_right(dec, min_decode_pos) - 1, -1, -1):
            if pos[i] <= first:
                found.append(pos[i])
                if len(found) == limit:
                    break
        return found


def _video_stream(container: av.container.InputContainer, path: str) -> av.VideoStream:
    for stream in container.streams.video:
        # Cover art in mp4/mkv is a one-picture video stream; it is never the video.
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise VideoReadError(path, "no video stream")


# FFmpeg's stream probe (avformat_find_stream_info) decodes a file's first frames (up to 7 of an
# H.264 stream) to learn what the decoder finds out again as it decodes: most of the time it
# takes to open a small mp4 (1.5-2 ms of 2.0-2.4 at 340x256 on one core). An mp4's header
# already says where the streams and packets are, so a reader that has the file's index opens
# it with the probe limited to one packet and no frame decoded. Matroska's open costs the same
# either way.
_UNPROBED = {"mov": {"probesize": "32", "skip_frame": "all"}}


def open_video(path: str, container_format: str | None = None, probe: bool = True) -> av.container.InputContainer:
    """Opens ``path`` with PyAV, as the demuxer ``container_format`` (else FFmpeg guesses).

    ``probe=False`` skips the stream probe's decoding where the format allows it: for readers that
    take a file's layout from its :class:`FrameIndex` and match frames by pts, not for indexing.
    """
    try:
        if container_format:
            try:
                options = {} if probe else _UNPROBED.get(container_format, {})
                return av.open(path, format=container_format, options=options)
            except (av.FFmpegError, ValueError):
                pass  # no longer that format (the index is checked by size and mtime): probe it
        return av.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "video file not found", path) from None
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(path, f"cannot open: {ffmpeg_reason(e)}") from e


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
    with open_video(path) as container:
        stream = _video_stream(container, path)
        for other in container.streams:
            if other.index != stream.index:
                # Lets the demuxer skip audio etc. instead of returning it.
                other.discard = av.stream.Discard.all
        pts, dts, key, offset, size = [], [], [], [], []
        hidden_pts = []
        in_place = container.format.name.startswith("mov")
        fd = os.open(path, os.O_RDONLY) if in_place else -1  # to compare the packets with the file's bytes
        try:
            for packet in container.demux(stream):
                # Empty packets are flush markers; discarded ones are hidden by an edit list
                # (mp4) and never displayed, so neither is a frame.
                if packet.size == 0 or packet.is_discard:
                    if packet.size > 0:
                        hidden_pts.append(packet.pts)
                    continue
                pts.append(packet.pts)
                dts.append(packet.dts)
                key.append(packet.is_keyframe)
                if in_place:
                    in_place = _in_place(packet, fd)
                    offset.append(packet.pos)
                    size.append(packet.size)
        except av.FFmpegError as e:
            raise VideoReadError(path, f"cannot demux: {ffmpeg_reason(e)}") from e
        finally:
            if fd >= 0:
                os.close(fd)
        if not key:
            raise VideoReadError(path, "no video frames")
        ctx = stream.codec_context
        n = len(key)
        has_pts = None not in pts
        decode_pos = np.arange(n, dtype=np.int64)
        dts_arr = np.array([NO_TS if d is None else d for d in dts], dtype=np.int64)
        key_arr = np.array(key, dtype=bool)
        # The reader only reads packets itself for frames it matches by pts, with every packet
        # the decoder needs in the index (none hidden).
        in_place = in_place and has_pts and not hidden_pts
        offset_arr = np.array(offset, dtype=np.int64) if in_place else None
        size_arr = np.array(size, dtype=np.int64) if in_place else None
        if has_pts:
            pts_arr = np.array(pts, dtype=np.int64)
            order = np.argsort(pts_arr, kind="stable")
            pts_arr, dts_arr, decode_pos, key_arr = (
                pts_arr[order], dts_arr[order], decode_pos[order], key_arr[order])
            if in_place:
                offset_arr, size_arr = offset_arr[order], size_arr[order]
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
        hidden = len(hidden_pts)
        leading = sum(p is not None and p < pts_arr[0] for p in hidden_pts) if has_pts else 0
        if declared and declared - (n + hidden) > max(2, TRUNCATED_SHARE * declared):
            raise VideoReadError(path, f"truncated: its header declares {declared} frames, the file holds {n + hidden} "
                                       "(an interrupted download or copy?)")
        for arr in (pts_arr, dts_arr, decode_pos, key_arr, offset_arr, size_arr):
            if arr is not None:
                arr.flags.writeable = False  # shared by every reader of the cached index
        return FrameIndex(
            pts=pts_arr, dts=dts_arr, decode_pos=decode_pos, keyframe=key_arr,
            time_base=time_base, fps=fps, width=ctx.width, height=ctx.height,
            codec=ctx.name, stream_index=stream.index, has_pts=has_pts,
            container_format=container.format.name.split(",")[0], pix_fmt=ctx.pix_fmt, profile=ctx.profile,
            colorspace=_colorspace(ctx), hidden_leading=leading, hidden_later=hidden - leading,
            offset=offset_arr, packet_size=size_arr, extradata=ctx.extradata,
            color_range=_int_or_none(getattr(ctx, "color_range", None)))


def _in_place(packet: av.Packet, fd: int) -> bool:
    """Whether ``packet`` is the bytes of the open file ``fd`` at its position, with nothing the
    demuxer adds (side data: a new parameter set or palette; decryption changes the bytes)."""
    if packet.pos is None or packet.pos < 0 or next(iter(packet.iter_sidedata()), None) is not None:
        return False
    try:
        return os.pread(fd, packet.size, packet.pos) == bytes(packet)
    except OSError:
        return False


def _colorspace(ctx) -> int | None:
    return _int_or_none(getattr(ctx, "colorspace", None))


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


# -- frame indexes shared through the probe cache -------------------------------------------

# One record per frame, in presentation order: what FrameIndex holds per frame (offset -1 and
# size 0 where the reader does not read packets itself).
FRAME_RECORD = np.dtype([("pts", "<i8"), ("dts", "<i8"), ("decode_pos", "<i4"), ("keyframe", "u1"),
                         ("offset", "<i8"), ("size", "<i4")])


def index_records(index: FrameIndex) -> np.ndarray:
    """A frame index's per-frame arrays as ``FRAME_RECORD`` rows (for ``pipelines.probe``)."""
    rec = np.empty(index.num_frames, dtype=FRAME_RECORD)
    rec["pts"], rec["dts"], rec["decode_pos"], rec["keyframe"] = (
        index.pts, index.dts, index.decode_pos, index.keyframe)
    rec["offset"], rec["size"] = (index.offset, index.packet_size) if index.offset is not None else (-1, 0)
    return rec


def index_meta(index: FrameIndex) -> dict:
    """The rest of a frame index, JSON-serialisable."""
    return {"time_base": [index.time_base.numerator, index.time_base.denominator], "fps": index.fps,
            "width": index.width, "height": index.height, "codec": index.codec,
            "stream_index": index.stream_index, "has_pts": index.has_pts, "format": index.container_format,
            "pix_fmt": index.pix_fmt, "profile": index.profile, "colorspace": index.colorspace,
            "hidden": [index.hidden_leading, index.hidden_later], "in_place": index.offset is not None,
            "extradata": None if index.extradata is None else base64.b64encode(index.extradata).decode("ascii"),
            "color_range": index.color_range}


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
    pts, dts, decode_pos, keyframe, offset, packet_size = arrays
    if not meta.get("in_place"):
        offset = packet_size = None
    hidden_leading, hidden_later = meta.get("hidden", (0, 0))
    extradata = meta.get("extradata")
    return FrameIndex(pts=pts, dts=dts, decode_pos=decode_pos, keyframe=keyframe,
                      time_base=Fraction(*meta["time_base"]), fps=meta["fps"], width=meta["width"],
                      height=meta["height"], codec=meta["codec"], stream_index=meta["stream_index"],
                      has_pts=meta["has_pts"], container_format=meta.get("format"), pix_fmt=meta.get("pix_fmt"),
                      profile=meta.get("profile"), colorspace=meta.get("colorspace"),
                      hidden_leading=hidden_leading, hidden_later=hidden_later, offset=offset,
                      packet_size=packet_size, extradata=None if extradata is None else base64.b64decode(extradata),
                      color_range=meta.get("color_range"))


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


def requested_positions(path: str, frame_indices: Sequence[int], num_frames: int) -> np.ndarray:
    """``frame_indices`` as int64 positions, each checked against the video's frame count."""
    positions = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
    bad = positions[(positions < 0) | (positions >= num_frames)]
    if len(bad):
        raise IndexError(f"{path}: frame index {int(bad[0])} out of range for a video of {num_frames} frames")
    return positions
