"""Frame-exact random access to video files with PyAV, the CPU decoding backend.

``read_frames(path, indices)`` returns the requested frames, numbered by the file's
:class:`~pipelines.index.FrameIndex`, without decoding the whole file: it seeks to the right
keyframe (in an mp4, it reads the packets from there itself, at the offsets the index holds),
matches decoded frames by pts and stops once the last requested one is out. The rules it
follows, and why, are in docs/decoding-notes.md ("Numbering frames", "Seeking").
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
from collections.abc import Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from .base import PipelineConfig
from .index import NO_TS, FrameIndex, VideoReadError, ffmpeg_reason, frame_index, open_video, requested_positions
from .workers import DecodingPipeline

__all__ = ["FrameIndex", "ReadStats", "VideoReadError", "frame_index", "read_frames",  # the index's, for callers
           "read_stats"]


@dataclasses.dataclass
class ReadStats:
    """What :func:`read_frames` cost in this process (DataLoader workers count their own): files
    opened (or decoders set up), seeks, packets given to the decoder, frames it returned
    (B-frames nobody needs are skipped, so fewer than the packets), opens that decode with
    FFmpeg's threads, and reads that took over the decoder the previous read left set up."""

    opens: int = 0
    seeks: int = 0
    packets: int = 0
    frames: int = 0
    threaded: int = 0
    reused: int = 0

    def __sub__(self, other: ReadStats) -> ReadStats:
        return ReadStats(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


_stats = ReadStats()


def read_stats() -> ReadStats:
    """A snapshot of this process's :class:`ReadStats`: the difference of two is what the reads
    between them cost."""
    return dataclasses.replace(_stats)


_local = threading.local()


def _to_rgb(frame: av.VideoFrame, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """``frame.to_ndarray(format="rgb24")``, through one reformatter per thread, or its ``box``
    (top, left, height, width) alone: a view, or None where the frame does not hold the box.

    ``to_ndarray`` sets up a new swscale context for every frame, which costs more than
    decoding a small frame; a reused reformatter keeps its context (same pixels). Of an 8-bit
    4:2:0 frame, only the box's pixels are converted (a training crop holds about half the frame
    on average): swscale converts each pixel from its own luma and chroma samples, so the converted box,
    widened to whole chroma samples, holds the pixels the whole frame's conversion does.
    """
    # One thread, and one context per process: a threaded swscale context used across a fork
    # (DataLoader workers) waits forever on threads the child does not have. Parallelism comes
    # from the workers.
    pid, fmt = getattr(_local, "owner", (None, None))
    if pid != os.getpid():
        fmt = VideoReformatter()
        _local.owner = (os.getpid(), fmt)
    if box is not None:
        top, left, h, w = box
        if top < 0 or left < 0 or top + h > frame.height or left + w > frame.width:
            return None
        if frame.format.name in _CROPPED_IN_YUV and frame.width % 2 == 0 and frame.height % 2 == 0:
            t0, l0 = top & ~1, left & ~1  # the box widened to whole chroma samples
            b1, r1 = top + h + (top + h) % 2, left + w + (left + w) % 2
            y, u, v = (np.frombuffer(p, np.uint8).reshape(p.height, p.line_size) for p in frame.planes)
            part = av.VideoFrame.from_dlpack([y[t0:b1, l0:r1], u[t0 // 2:b1 // 2, l0 // 2:r1 // 2],
                                              v[t0 // 2:b1 // 2, l0 // 2:r1 // 2]], format=frame.format.name)
            part.colorspace, part.color_range = frame.colorspace, frame.color_range
            rgb = fmt.reformat(part, format="rgb24", threads=1).to_ndarray()
            return rgb[top - t0:top - t0 + h, left - l0:left - l0 + w]
    rgb = fmt.reformat(frame, format="rgb24", threads=1).to_ndarray()
    return rgb if box is None else rgb[top:top + h, left:left + w]


# 8-bit 4:2:0 formats whose box _to_rgb converts alone, in frames of an even size (swscale
# converts frames of an odd size another way, interpolating chroma across the box's edges).
_CROPPED_IN_YUV = {"yuv420p", "yuvj420p"}


def _decoder_threads() -> str:
    """One decoding thread in a DataLoader worker, FFmpeg's choice elsewhere.

    The workers already decode one video each on every core; frame threads on top add thread
    hand-offs, and each seek drains them (8 per clip for sparse sampling), so a clip takes longer
    with them than on one thread. In the main process (``--num_workers 0``, ``evl.predict``)
    threads still help large frames.
    """
    import torch.utils.data

    return "NONE" if torch.utils.data.get_worker_info() is not None else "AUTO"


# Decoders that take everything they need from the packets, the codec's setup bytes (extradata)
# and the colour tags: for these, a file whose packets are read in place is never opened.
_STANDALONE_DECODERS = {"h264", "hevc", "vp9", "av1", "libdav1d"}


def _nal_length_size(codec: str, extradata: bytes | None) -> int | None:
    """Bytes of the length field before each NAL unit of an mp4's H.264 (avcC) or HEVC (hvcC)
    packets; None for other codecs and set-ups (start codes)."""
    if not extradata or extradata[0] != 1:
        return None
    if codec == "h264" and len(extradata) >= 7:
        return (extradata[4] & 3) + 1
    if codec == "hevc" and len(extradata) >= 23:
        return (extradata[21] & 3) + 1
    return None


def _is_idr(packet: av.Packet, codec: str, length_size: int | None) -> bool:
    """Whether ``packet``'s first slice is an IDR picture (H.264 NAL type 5, HEVC 19-20).

    An IDR decodes from nothing before it, and the decoder drops every reference and restarts
    its picture order as it starts one, as a flush does. A flush costs the H.264 decoder its
    tables, set up again at the next picture: about 6% of an all-intra frame's decoding
    (callgrind), paid before every frame of a sparse clip of such a file.
    """
    if length_size is None:
        return False
    data = memoryview(packet)
    i, n = 0, len(data)
    while i + length_size < n:
        size = int.from_bytes(data[i:i + length_size], "big")
        i += length_size
        if codec == "h264":
            kind = data[i] & 0x1F
            if 1 <= kind <= 5:  # the first slice
                return kind == 5
        else:
            kind = data[i] >> 1 & 0x3F
            if kind < 32:  # the first slice
                return kind in (19, 20)
        i += size
    return False


class _ClipReader:
    """Decodes one request: owns the decoder (and the open container, if any) and the output array."""

    def __init__(self, path: str, index: FrameIndex, rows: dict[int, list[int]], num_rows: int,
                 box: tuple[int, int, int, int] | None = None):
        self.path, self.index, self.rows, self.num_rows = path, index, rows, num_rows
        self.box = box  # (top, left, height, width): the part of each frame kept, or None for all of it
        self.out: np.ndarray | None = None
        self.container: av.container.InputContainer | None = None
        self.stream: av.VideoStream | None = None
        self.ctx: av.VideoCodecContext | None = None
        self.fresh = False  # nothing demuxed yet: decoding from the start needs no seek
        self.fd: int | None = None  # the file, where packets are read from it by the index's offsets
        # Packets read in place: only for frames matched by pts (the others are counted from the start).
        self.in_place = index.offset is not None and index.matched_by_pts
        self.fed = False  # the decoder has been given packets since its last reset
        self.drained = False  # the decoder has been sent the end of the stream since its last reset
        self.nal_length_size = _nal_length_size(index.codec, index.extradata)
        self.kept_as: tuple | None = None  # the key the decoder is kept by for the next read, if it may be
        self.one_thread = True  # the decoder runs on the calling thread (no frame threads holding frames back)

    def finish(self) -> None:
        """Ends a read that succeeded: the decoder is kept for the next read with the same set-up."""
        if self.kept_as is not None:
            _local.decoder = (self.kept_as, self.ctx, self.fed, self.drained)
        self.close()

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def reopen(self) -> None:
        self.close()
        index = self.index
        threads = _decoder_threads()
        self.one_thread = threads == "NONE"
        self.kept_as = None
        if self.in_place and index.codec in _STANDALONE_DECODERS:
            # The packets come from the file's bytes: the decoder alone, set up as the container
            # would set it up (opening an mp4 costs about 0.5 ms, as much as a small frame's decoding).
            # The last read's decoder is taken over where it was set up the same way (files a
            # re-encoded dataset made share it): a new one costs its set-up and its first frame's
            # memory, about 5% of an all-intra clip's decoding. Only a single-threaded one (in
            # DataLoader workers): a frame-threaded decoder freed in a fork's child waits forever
            # for threads the child does not have. Per process; not after a read that failed.
            key = (os.getpid(), threads, index.codec, index.extradata, index.colorspace, index.color_range,
                   index.pix_fmt, index.width, index.height)
            kept = getattr(_local, "decoder", None)
            _local.decoder = None
            if kept is not None and kept[0] == key:
                self.kept_as, (_, self.ctx, self.fed, self.drained) = key, kept
                self.fresh = True
                _stats.reused += 1
                return
            self.kept_as = key if threads == "NONE" else None
            self.ctx = av.CodecContext.create(index.codec, "r")
            if index.extradata:
                self.ctx.extradata = index.extradata
            for name in ("colorspace", "color_range"):
                if getattr(index, name) is not None:
                    setattr(self.ctx, name, getattr(index, name))
        else:
            # Frames matched by pts do not depend on the order the decoder outputs them in, which
            # the stream probe's guess of its reordering delay could change: the file opens unprobed.
            self.container = open_video(self.path, index.container_format, probe=not index.matched_by_pts)
            self.stream = self.container.streams[index.stream_index]
            self.ctx = self.stream.codec_context
        self.ctx.thread_type = threads
        # Opened now, before a packet nobody wants sets skip_frame: libdav1d (AV1) takes it once,
        # when it opens, and would then drop every non-reference frame of the read.
        self.ctx.open(strict=False)
        self.fresh = True
        self.fed = self.drained = False
        _stats.opens += 1
        _stats.threaded += threads != "NONE"

    def _decode(self, packet: av.Packet | None) -> list[av.VideoFrame]:
        """The frames the decoder returns for ``packet`` (None: drain it)."""
        frames = self.ctx.decode(packet)
        _stats.packets += packet is not None and packet.size > 0
        _stats.frames += len(frames)
        return frames

    def _packets_in_place(self, first: int, last: int):
        """The stream's packets at decode positions ``first`` to ``last``, read from the file at
        the offsets of the index: what the demuxer returns after seeking to that keyframe, without
        the seek and the demuxer's per-packet work."""
        for i in self.index.by_decode[first:last + 1].tolist():
            yield self._packet(i)

    def _packet(self, i: int) -> av.Packet:
        """The packet of the frame at presentation position ``i``, read from the file at the
        offset of the index."""
        index = self.index
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        # Read straight into memory FFmpeg owns: a packet made from a Python bytes object is
        # freed by a callback that takes the GIL, which deadlocks with a frame-threaded
        # decoder freed while the GIL is held (it waits for the thread that frees the packet).
        size = int(index.packet_size[i])
        packet = av.Packet(size)
        if os.preadv(self.fd, [packet], int(index.offset[i])) != size:
            raise VideoReadError(self.path, "shorter than its index says (changed while being read?)")
        dts = int(index.dts[i])
        packet.pts, packet.dts = int(index.pts[i]), None if dts == NO_TS else dts
        packet.is_keyframe = bool(index.keyframe[i])
        return packet

    def _takes_as_is(self, packet: av.Packet) -> bool:
        """Whether the decoder, fed before, may be given ``packet`` without a flush: an IDR picture
        needs no reset where the decoder holds no frame back (no drain pending, no reordering, no
        frame threads), since it drops every reference itself."""
        holds_none = not self.drained and not self.ctx.has_b_frames and self.one_thread
        return holds_none and _is_idr(packet, self.index.codec, self.nal_length_size)

    def read_alone(self, frames: list[int]) -> int:
        """Decodes the leading ``frames`` (sorted unique presentation positions) that are IDR
        keyframes, each from its own packet alone; returns how many it read.

        An all-intra file's sparse clip is eight such frames: the general path
        (``read_segment``) gives each its own seek, its attempts and its bookkeeping (together
        0.15-0.2 ms of a 5.5-5.7 ms clip here, in process). Here a frame is its packet, decoded
        by a decoder that holds no frame back (one thread, no reordering, not drained), which an
        IDR picture resets by itself (``_takes_as_is``): the frame comes straight out, or with the
        decoder drained where a new decoder turns out to reorder. Anything else (a frame that is
        no keyframe, a decoder that reorders or was drained, a frame that did not come out) is
        left to the general path from that frame on, with the decoder flushed where a frame went
        missing.
        """
        index, ctx = self.index, self.ctx
        if not (self.in_place and self.container is None and self.one_thread and self.nal_length_size):
            return 0
        ctx.skip_frame = "DEFAULT"
        keyframe, decode_pos = index.keyframe, index.decode_pos
        done = 0
        for f in frames:
            if not keyframe[f]:
                break
            packet = self._packet(f)
            if self.fed and not self._takes_as_is(packet):
                break
            _stats.seeks += not (self.fresh and decode_pos[f] == 0)  # as read_segment counts them
            self.fed, self.fresh = True, False
            out = self._decode(packet)
            if not out:  # held back (a new decoder learns of reordering from its first picture):
                self.drained = True  # drained out, as the general path drains a segment's last packet
                out = self._decode(None)
            if len(out) != 1 or out[0].pts != packet.pts:
                ctx.flush_buffers()  # whatever it holds: the general path decodes this frame again
                self.drained = False
                break
            self._store(packet.pts, out[0])
            done += 1
        return done

    def _store(self, key: int, frame: av.VideoFrame) -> None:
        rgb = _to_rgb(frame, self.box)
        if rgb is None:
            raise VideoReadError(self.path, f"its {frame.width}x{frame.height} frames do not hold the crop box "
                                 f"(top, left, height, width) {self.box}")
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
        self, want: set[int], drain_at: int, last: int, key: int | None, seek_ts: int | None
    ) -> set[int] | None:
        """Decodes from keyframe ``key`` (``seek_ts`` in stream time base) or from the start.

        ``drain_at`` is the pts of the wanted frame whose packet decodes last (at decode position
        ``last``): once that packet is in, the decoder is drained instead of fed more packets to
        push out the frames it holds back for reordering (B-frames; frame threads hold one per
        thread). Packets of frames nobody wants are decoded with ``skip_frame = "NONREF"``: a
        frame no other frame predicts from (most B-frames, a third of a typical H.264 stream) is
        then not decoded.
        Returns the wanted pts that did not come out, or None when the seek landed after the
        keyframe (the demuxer seeks by dts, or ignores keyframe flags: MPEG-TS). Packets read in
        place need no seek: the index says where each one is.
        """
        in_place = self.in_place
        if seek_ts is None and not self.fresh and not in_place:
            self.reopen()
        stream, ctx = self.stream, self.ctx
        if in_place:  # the packets from the keyframe on, read where the index says they are
            index = self.index
            packets = self._packets_in_place(int(index.decode_pos[key]) if key is not None else 0, last)
            if self.fed:
                first = next(packets, None)  # none where the keyframe comes after the wanted frames
                if first is None or not self._takes_as_is(first):
                    ctx.flush_buffers()  # as a seek does
                    self.drained = False
                if first is not None:
                    packets = itertools.chain([first], packets)
            self.fed = True
            _stats.seeks += key is not None
        else:
            if seek_ts is not None:
                try:
                    self.container.seek(seek_ts, stream=stream, backward=True, any_frame=False)
                except av.FFmpegError:
                    return None
                _stats.seeks += 1
            packets = self.container.demux(stream)
        self.fresh = False
        missing = set(want)
        check_landing = seek_ts is not None and not in_place
        # Demuxers may land a keyframe or more early (mp4 with an edit list does): demuxing is
        # cheap, decoding is not, so packets before the chosen keyframe are skipped.
        skip_to = int(self.index.pts[key]) if key is not None else None
        for packet in packets:
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
            for frame in self._decode(packet):
                if self._take(frame, missing):
                    return missing
            if last_in:  # every wanted packet is in: drain what the decoder holds back (a seek resets it)
                self.drained = True
                for frame in self._decode(None):
                    if self._take(frame, missing):
                        return missing
                return missing
        return missing

    def _take(self, frame: av.VideoFrame, missing: set[int]) -> bool:
        """Stores ``frame`` if it is one of the ``missing``; True once none is missing (not "pts
        past the last wanted": a muxer's pts may go back)."""
        pts = frame.pts
        if pts in missing:
            self._store(pts, frame)
            missing.discard(pts)
        return not missing

    def read_segment(self, frames: np.ndarray) -> None:
        """Decodes the sorted unique presentation positions ``frames`` (one seek)."""
        index = self.index
        first = int(frames[0])
        if len(frames) == 1:  # a sparse clip's segment: the same, without numpy's per-call cost
            drain_at, last = int(index.pts[first]), int(index.decode_pos[first])
            want, min_decode_pos = {drain_at}, last
        else:
            want = set(index.pts[frames].tolist())
            decode_pos = index.decode_pos[frames]
            i = int(decode_pos.argmax())
            drain_at, last = int(index.pts[frames[i]]), int(decode_pos[i])
            min_decode_pos = int(decode_pos.min())
        attempts: list[tuple[int | None, int | None]] = []
        # The best keyframe, then one earlier (the first may not decode what we need), each by
        # pts and, where the container has it, by dts; then the start of the file.
        for key in index.start_keyframes(first, min_decode_pos, limit=2):
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
            missing = self._attempt(want, drain_at, last, key, seek_ts)
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
            for frame in self._decode(packet):
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
    suffix_min = np.minimum.accumulate(dec[::-1])[::-1].tolist()
    # Only a frame with a keyframe shown since the previous wanted frame can start a segment;
    # a dense read then costs one check per GOP, not per frame.
    gop = np.searchsorted(index.keyframe_positions, frames, side="right")
    dec = dec.tolist()
    bounds = [0]
    for j in np.flatnonzero(gop[1:] != gop[:-1]).tolist():
        j += 1
        seg_max_dec = max(dec[bounds[-1]:j])
        keys = index.start_keyframes(int(frames[j]), suffix_min[j], limit=1)
        if keys and index.decode_pos[keys[0]] > seg_max_dec + 1:
            bounds.append(j)
    bounds.append(len(frames))
    return [frames[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def read_frames(path: str, frame_indices: Sequence[int], crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Frames ``frame_indices`` (presentation order, from 0) of ``path`` as uint8 [T, H, W, 3] RGB.

    Rows follow ``frame_indices``: repeated and unsorted indices are allowed. With ``crop``
    (top, left, height, width), only that box of each frame is returned, [T, height, width, 3]:
    a training clip's crop, for which the rest of the frame is never copied. Raises
    FileNotFoundError for a missing file, IndexError for an index outside the video and
    VideoReadError when the file cannot be read (or its frames do not hold the crop box).
    """
    index = frame_index(path)
    path = os.path.abspath(os.fspath(path))
    positions = requested_positions(path, frame_indices, index.num_frames)
    if len(positions) == 0:
        return np.empty((0, *(crop[2:] if crop else (index.height, index.width)), 3), dtype=np.uint8)
    frames = np.unique(positions)
    # Output rows per decoded frame, keyed the way frames are matched: by pts, or by count.
    by_pts = index.matched_by_pts
    keys = index.pts[positions] if by_pts else positions
    rows: dict[int, list[int]] = {}
    for row, key in enumerate(keys.tolist()):
        rows.setdefault(key, []).append(row)
    reader = _ClipReader(path, index, rows, len(positions), crop)
    done = False
    try:
        reader.reopen()
        if by_pts:
            alone = reader.read_alone(frames.tolist())
            for segment in _segments(index, frames[alone:]) if alone < len(frames) else ():
                reader.read_segment(segment)
        else:
            reader.read_sequential(int(frames[-1]))
        done = True
    except av.FFmpegError as e:
        raise VideoReadError(path, f"decoding failed: {ffmpeg_reason(e)}") from e
    finally:
        reader.finish() if done else reader.close()  # a failed read's decoder is not kept
    return reader.out


# -- the PyAV pipeline ----------------------------------------------------------------------


class PyAVPipeline(DecodingPipeline):
    """``--pipeline pyav``: decode on the CPU in DataLoader workers, exactly the sampler's clips."""

    def __init__(self, cfg: PipelineConfig):
        super().__init__(cfg, read_frames)
