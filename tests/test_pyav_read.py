"""Frame-exact reading with pipelines.pyav: every read equals a full sequential decode."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipelines import pyav
from pipelines.pyav import VideoReadError, frame_index, read_frames
from tests.videos import decode_all, encode_frames, frame_number, photo_frames, remux_with_pts, write_video

# name -> (file name, frames written, write_video options, frames hidden by an edit list)
VIDEOS = {
    "h264_bframes": ("b.mp4", 60, dict(bframes=3, gop=12), 0),
    "h264_open_gop": ("open.mp4", 60, dict(bframes=3, gop=12, open_gop=True), 0),
    "h264_start_pts": ("start.mp4", 60, dict(bframes=3, gop=12, start_pts=17), 0),
    "h264_edit_list": ("edit.mp4", 60, dict(bframes=3, gop=12, start_pts=-3), 3),
    "vp9_webm": ("v.webm", 60, dict(codec="libvpx-vp9", gop=12), 0),
    "h264_mkv": ("o.mkv", 60, dict(bframes=3, gop=12, open_gop=True), 0),
    "h264_with_audio": ("av.mp4", 40, dict(bframes=2, gop=10, audio=True), 0),
    "h264_raw_no_pts": ("raw.h264", 30, dict(bframes=2, gop=12), 0),
    "hevc_bframes_mp4": ("h.mp4", 60, dict(codec="libx265", gop=12, options={
        "x265-params": "keyint=12:min-keyint=12:bframes=3:b-adapt=0:scenecut=0:log-level=error"}), 0),
    "vp9_mp4": ("v9.mp4", 60, dict(codec="libvpx-vp9", gop=12), 0),
    "mpeg4_bframes_mp4": ("m4.mp4", 60, dict(codec="mpeg4", gop=12, options={"bf": "2", "q:v": "3"}), 0),
    "h264_fragmented_mp4": ("frag.mp4", 60, dict(bframes=3, gop=12, container_options={
        "movflags": "frag_keyframe+empty_moov"}), 0),
    # Every frame an IDR picture: sparse reads decode them one after another without a flush.
    "h264_all_intra": ("intra.mp4", 40, dict(gop=1), 0),
    "hevc_all_intra": ("hintra.mp4", 40, dict(codec="libx265", gop=1, options={
        "x265-params": "keyint=1:min-keyint=1:scenecut=0:log-level=error"}), 0),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """name -> (path, reference frames from a full sequential decode, first frame number)."""
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for name, (file_name, num_frames, options, hidden) in VIDEOS.items():
        path = write_video(str(root / file_name), num_frames, **options)
        out[name] = (path, decode_all(path)[1], hidden)
    return out


def _index_sets(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    sets = [[0], [n - 1], [n // 2 + 3], [n - 1, 0, 7, 7, n - 1], list(range(n)), [5, 3, 1],
            list(range(0, n, 16)), [13, 13, 13]]
    sets += [rng.integers(0, n, size=rng.integers(1, 12)).tolist() for _ in range(8)]
    return sets


@pytest.mark.parametrize("threads", ["AUTO", "NONE"])  # the main process, a DataLoader worker
@pytest.mark.parametrize("name", list(VIDEOS))
def test_read_equals_sequential_decode(videos, name, threads, monkeypatch):
    monkeypatch.setattr(pyav, "_decoder_threads", lambda: threads)
    path, ref, hidden = videos[name]
    n = len(ref)
    assert frame_index(path).num_frames == n == VIDEOS[name][1] - hidden
    for indices in _index_sets(n, seed=len(name)):
        got = read_frames(path, indices)
        assert got.dtype == np.uint8 and got.shape == (len(indices), 64, 96, 3)
        assert np.array_equal(got, ref[indices]), indices
    # The frames are the ones written, in order: frame k shows number k (+ frames hidden).
    assert [frame_number(f) for f in read_frames(path, range(n))] == list(range(hidden, hidden + n))


def test_threading_on_and_index_reused(videos):
    path = videos["h264_bframes"][0]
    assert frame_index(path) is frame_index(path)
    before = pyav.read_stats()
    read_frames(path, [20])
    cost = pyav.read_stats() - before
    assert cost.opens >= 1 and cost.threaded == cost.opens  # the main process decodes with FFmpeg's threads
    assert cost.frames >= 1 and cost.packets >= 1


def _cost(read):
    before = pyav.read_stats()
    out = read()
    return out, pyav.read_stats() - before


def test_long_gop_clip_near_end_is_not_fully_decoded(tmp_path):
    # Keyframes at 0 and 60; B-frames reorder, so frames come out a few packets late.
    path = write_video(str(tmp_path / "long.mp4"), 120, bframes=3, gop=60)
    ref, index = decode_all(path)[1], frame_index(path)
    got, cost = _cost(lambda: read_frames(path, [100, 104, 108]))
    assert np.array_equal(got, ref[[100, 104, 108]])
    # From keyframe 60 to the last packet a wanted frame needs, not from frame 0, and no
    # packet after it: the decoder is drained instead of fed until the frames come out.
    last = max(index.decode_pos[[100, 104, 108]])
    assert cost.packets == last - index.decode_pos[60] + 1 and cost.seeks == 1
    # Frames no other frame references and nobody wants (B-frames) are not even decoded.
    assert 3 <= cost.frames < last - index.decode_pos[60] + 1
    got, cost = _cost(lambda: read_frames(path, [5]))
    assert np.array_equal(got, ref[[5]])
    assert cost.frames <= 10 and cost.seeks == 0  # from the start, and it stops after the last requested frame


def test_sparse_clip_seeks_between_gops(videos):
    path, ref, _ = videos["h264_open_gop"]
    indices = [1, 26, 51]  # one frame in each of three 12-frame GOPs, far apart
    got, cost = _cost(lambda: read_frames(path, indices))
    assert np.array_equal(got, ref[indices])
    assert cost.frames < 30 and cost.seeks >= 2  # a single pass from frame 0 would decode 52


def test_a_read_seeks_only_past_frames_nobody_wants(tmp_path):
    path = write_video(str(tmp_path / "gop5.mp4"), 20, gop=5)
    ref = decode_all(path)[1]
    dense = np.arange(3, 9)  # across the keyframe at 5: decoding on reaches it, no seek
    got, cost = _cost(lambda: read_frames(path, dense))
    assert np.array_equal(got, ref[dense])
    assert cost.seeks == 0 and cost.opens + cost.reused == 1 and cost.frames <= 9  # frames 0-8 at most, each once
    sparse = np.array([0, 1, 8, 9])  # the keyframe at 5 skips frames 2-4
    got, cost = _cost(lambda: read_frames(path, sparse))
    assert np.array_equal(got, ref[sparse])
    assert cost.seeks == 1 and cost.frames <= 7  # 0-1 then 5-9, not 0-9


def test_reader_names_the_indexed_demuxer_and_falls_back_to_probing(videos, monkeypatch):
    import dataclasses

    # An mp4 whose packets are not all in the index (an edit list hides some) is read through its demuxer.
    mp4, webm = videos["h264_edit_list"][0], videos["vp9_webm"][0]
    assert frame_index(mp4).container_format == "mov" and frame_index(webm).container_format == "matroska"
    want = decode_all(mp4)[1][[3, 7]]
    opened = []
    real_open = pyav.av.open
    monkeypatch.setattr(pyav.av, "open", lambda path, **kw: opened.append(kw.get("format")) or real_open(path, **kw))
    assert np.array_equal(read_frames(mp4, [3, 7]), want) and opened == ["mov"]
    # An index naming a demuxer that cannot read the file: FFmpeg probes it instead.
    wrong = dataclasses.replace(frame_index(mp4), container_format="mpegts")
    monkeypatch.setattr(pyav, "frame_index", lambda path: wrong)
    opened.clear()
    assert np.array_equal(read_frames(mp4, [3, 7]), want) and opened == ["mpegts", None]


def test_an_indexed_mp4_is_read_without_the_stream_probe(videos, tmp_path, monkeypatch):
    """Where frames are matched by pts in an mp4, the probe's decoding is skipped: H.264 and HEVC
    packets (10-bit included) are read in place by a decoder set up from the index, without
    opening the file; other codecs and files with frames an edit list hides open without the
    probe. The frames read are those of a full decode."""
    ten_bit = [encode_frames(str(tmp_path / f"{enc}10.mp4"), photo_frames(30, 64, 96), enc, pix_fmt="yuv420p10le",
                             gop=10, options=opts)
               for enc, opts in (("libx264", {"bf": "2"}), ("libx265", {"x265-params": "bframes=2:log-level=error"}))]
    want = [decode_all(path)[1][[29, 0, 11, 12]] for path in ten_bit]
    assert all(frame_index(path).pix_fmt == "yuv420p10le" for path in ten_bit)
    opened_mp4 = [videos[name][:2] for name in ("h264_edit_list", "mpeg4_bframes_mp4")]
    webm, raw = videos["vp9_webm"][0], videos["h264_raw_no_pts"][0]
    for path in (*(path for path, _ in opened_mp4), webm, raw):
        frame_index(path)  # indexed (opened with the probe) before the opens are counted
    opened = []
    real_open = pyav.av.open
    monkeypatch.setattr(pyav.av, "open", lambda path, **kw: opened.append(kw.get("options") or {}) or real_open(path, **kw))
    for path, frames in zip(ten_bit, want):
        assert np.array_equal(read_frames(path, [29, 0, 11, 12]), frames), path
    assert opened == []
    for path, ref in opened_mp4:
        assert np.array_equal(read_frames(path, [29, 0, 11, 12]), ref[[29, 0, 11, 12]]), path
    assert len(opened) == 2 and all(o.get("skip_frame") == "all" for o in opened)
    opened.clear()
    read_frames(webm, [5])  # matroska: the probe costs nothing to skip
    read_frames(raw, [5])  # no pts: frames are counted in output order
    assert opened == [{}, {}]


def test_mp4_packets_are_read_in_place_where_the_file_holds_them_as_they_are(videos):
    """An mp4's packets are bytes of the file at offsets its header gives: the reader reads them
    itself, without the demuxer's seeks. Not where an edit list hides frames (their packets are
    not in the index) nor in matroska, MPEG-TS or raw streams, which frame their packets."""
    in_place = {name for name in VIDEOS if frame_index(videos[name][0]).offset is not None}
    assert in_place == {"h264_bframes", "h264_open_gop", "h264_start_pts", "h264_with_audio", "hevc_bframes_mp4",
                        "vp9_mp4", "mpeg4_bframes_mp4", "h264_fragmented_mp4", "h264_all_intra", "hevc_all_intra"}
    path = videos["h264_with_audio"][0]  # video packets between audio ones
    index = frame_index(path)
    with open(path, "rb") as f, pyav.av.open(path) as container:
        for packet in (p for p in container.demux(video=0) if p.size):
            i = int(np.searchsorted(index.pts, packet.pts))
            f.seek(int(index.offset[i]))
            assert f.read(int(index.packet_size[i])) == bytes(packet)


def test_a_packet_is_read_in_place_only_if_the_file_holds_it_as_the_demuxer_returns_it(videos):
    """What the index checks of each packet: the bytes at its offset are the packet's, and the
    demuxer added nothing (side data such as a new parameter set)."""
    from av.packet import PacketSideData, packet_sidedata_type_from_literal

    from pipelines.index import _in_place

    path, other = videos["h264_bframes"][0], videos["h264_open_gop"][0]
    with pyav.av.open(path) as container, open(path, "rb") as raw, open(other, "rb") as wrong:
        packet = next(p for p in container.demux(video=0) if p.size)
        assert _in_place(packet, raw.fileno()) and not _in_place(packet, wrong.fileno())
        side_data = PacketSideData(packet_sidedata_type_from_literal("new_extradata"), 4)
        side_data.update(b"\0\0\0\1")
        packet.set_sidedata(side_data)
        assert not _in_place(packet, raw.fileno())


def test_packets_read_in_place_live_in_memory_ffmpeg_owns(videos, monkeypatch):
    """A packet made from a Python bytes object is freed by a callback that takes the GIL. A
    frame-threaded decoder freed while the GIL is held (a read in the main process) waits for
    its threads, one of which may be freeing such a packet: reads of a 10-bit HEVC mp4 hung that
    way, now and then. So the reader reads packets straight into packets FFmpeg allocates."""
    path, ref, _ = videos["hevc_bframes_mp4"]
    assert frame_index(path).offset is not None
    made = []
    real = pyav.av.Packet
    monkeypatch.setattr(pyav.av, "Packet", lambda input=None: made.append(type(input)) or real(input))
    assert np.array_equal(read_frames(path, [59, 0, 30]), ref[[59, 0, 30]])
    assert made and set(made) == {int}


def test_a_colour_tag_only_the_mp4_carries_reaches_a_decoder_that_never_opens_it(tmp_path, monkeypatch):
    """The YUV -> RGB matrix and range can be tagged in the mp4 header alone (not in the H.264
    stream); a decoder set up from the index converts with them, as one opened from the file does."""
    src = write_video(str(tmp_path / "untagged.mp4"), 12, gop=4, bframes=2)
    path = str(tmp_path / "tagged.mp4")
    with pyav.av.open(src) as source, pyav.av.open(path, "w") as target:
        stream = source.streams.video[0]
        out = target.add_stream_from_template(stream)
        ctx = out.codec_context
        # BT.709 throughout (the muxer writes the tag whole), full range
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = 1
        ctx.color_range = 2
        for packet in (p for p in source.demux(stream) if p.size):
            packet.stream = out
            target.mux(packet)
    ref = decode_all(path)[1]
    assert not np.array_equal(ref, decode_all(src)[1])  # the tags change the pixels
    assert frame_index(path).offset is not None
    opened = []
    real_open = pyav.av.open
    monkeypatch.setattr(pyav.av, "open", lambda path, **kw: opened.append(path) or real_open(path, **kw))
    assert np.array_equal(read_frames(path, [11, 0, 5]), ref[[11, 0, 5]]) and opened == []


@pytest.mark.parametrize("ext", ["mp4", "mkv"])  # packets read in place, and demuxed
def test_av1_frames_are_read_whatever_the_first_packet_asks_the_decoder_to_skip(tmp_path, ext):
    """libdav1d (FFmpeg's AV1 decoder here) takes ``skip_frame`` once, when it opens: opened by a
    packet nobody wants (skip non-reference frames), it dropped every non-reference frame of the
    read, and a sparse read of an AV1 file failed."""
    path = encode_frames(str(tmp_path / f"av1.{ext}"), photo_frames(24, 64, 96), "libsvtav1", gop=8)
    assert frame_index(path).codec == "libdav1d"
    ref = decode_all(path)[1]
    for want in ([1], [3, 9], [23, 0, 12, 12]):
        assert np.array_equal(read_frames(path, want), ref[want]), want


def _boxes(height: int, width: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Crop boxes (top, left, height, width): odd and even corners and sizes, the whole frame,
    one pixel, and boxes that reach the last row or column."""
    rng = np.random.default_rng(seed)
    boxes = [(0, 0, height, width), (height - 1, width - 1, 1, 1), (1, 1, height - 1, width - 1),
             (0, 1, height, width - 2), (3, 5, 7, 9)]
    for _ in range(24):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        boxes.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    return boxes


@pytest.mark.parametrize("name", ["h264_bframes", "vp9_webm", "hevc_bframes_mp4", "mpeg4_bframes_mp4"])
def test_a_crop_box_holds_the_pixels_of_the_whole_frames(videos, name):
    """``crop`` keeps a box of each frame (of an 8-bit 4:2:0 frame, only the box is converted
    to RGB): the pixels are those of the whole frames, whatever the box's corners."""
    path, ref, _ = videos[name]
    want = [17, 3, 3, 40]
    for box in _boxes(64, 96, seed=len(name)):
        top, left, h, w = box
        got = read_frames(path, want, crop=box)
        assert got.shape == (4, h, w, 3) and got.flags.c_contiguous, box
        assert np.array_equal(got, ref[want, top:top + h, left:left + w]), box


def test_a_crop_box_of_odd_sized_10_bit_and_full_range_frames(tmp_path):
    """Frames of an odd size (their last chroma sample covers one column or row), 10-bit and
    full-range frames (converted whole, then cut), BT.709: the box of the whole frames."""
    paths = [
        encode_frames(str(tmp_path / "odd.webm"), photo_frames(6, 65, 97), gop=3),
        encode_frames(str(tmp_path / "ten.mp4"), photo_frames(6, 64, 96), "libx264", pix_fmt="yuv420p10le", gop=3),
        encode_frames(str(tmp_path / "full.mp4"), photo_frames(6, 64, 96), "libx264", pix_fmt="yuvj420p", gop=3),
        encode_frames(str(tmp_path / "bt709.mp4"), photo_frames(6, 64, 96), "libx264", gop=3,
                      options={"colorspace": "bt709", "color_range": "tv"}),
    ]
    for path in paths:
        ref = decode_all(path)[1]
        height, width = ref.shape[1:3]
        for box in _boxes(height, width, seed=height):
            top, left, h, w = box
            assert np.array_equal(read_frames(path, [5, 1], crop=box), ref[[5, 1], top:top + h, left:left + w]), \
                (path, box)


def test_a_crop_box_outside_the_frames_is_refused_by_name(videos):
    path = videos["h264_bframes"][0]
    for box in ((60, 0, 5, 10), (0, 90, 10, 7), (-1, 0, 4, 4)):
        with pytest.raises(VideoReadError, match=r"b\.mp4: its 96x64 frames do not hold the crop box"):
            read_frames(path, [2], crop=box)
    assert read_frames(path, [], crop=(0, 0, 5, 7)).shape == (0, 5, 7, 3)


@pytest.mark.parametrize("name", ["h264_bframes", "h264_mkv", "mpeg4_bframes_mp4"])  # decoder alone, demuxed, opened
def test_a_read_that_fails_leaves_no_file_open(videos, monkeypatch, name):
    """A read that fails in the decoder (an FFmpeg error, reported as a VideoReadError) or
    around it closes what it opened: a worker reads thousands of files."""
    path = videos[name][0]
    read_frames(path, [1])  # indexed
    fds = len(os.listdir("/proc/self/fd"))

    def broken(self, packet):
        raise pyav.av.error.InvalidDataError(-1094995529, "Invalid data found when processing input")

    with pytest.raises(VideoReadError, match="decoding failed"):
        with monkeypatch.context() as m:
            m.setattr(pyav._ClipReader, "_decode", broken)
            read_frames(path, [5, 30])
    with pytest.raises(VideoReadError, match="do not hold the crop box"):
        read_frames(path, [5, 30], crop=(0, 0, 65, 9))
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_decoding_error_reads_as_ffmpeg_words_and_its_log(videos, monkeypatch):
    """A decoder's failure names the file once, with FFmpeg's message and its last log line, not
    PyAV's ``[Errno -1094995529] ...`` form."""
    path = videos["h264_bframes"][0]
    read_frames(path, [1])

    def broken(self, packet):
        raise pyav.av.error.InvalidDataError(-1094995529, "Invalid data found when processing input",
                                             None, (16, "h264", "no frame!\n"))

    with monkeypatch.context() as m:
        m.setattr(pyav._ClipReader, "_decode", broken)
        with pytest.raises(VideoReadError) as caught:
            read_frames(path, [5, 30])
    assert str(caught.value) == f"{path}: decoding failed: Invalid data found when processing input ([h264] no frame!)"


def test_ffmpeg_reason_takes_the_log_line_as_it_comes():
    from pipelines.index import ffmpeg_reason

    error = pyav.av.error.InvalidDataError
    message = "Invalid data found when processing input"
    assert ffmpeg_reason(error(-1094995529, message, "/a/b.mp4")) == message
    assert ffmpeg_reason(error(-1094995529, message, None, (16, None, None))) == message
    assert ffmpeg_reason(error(-1094995529, message, None, (16, None, "bad\n"))) == f"{message} (bad)"
    assert ffmpeg_reason(ValueError("not FFmpeg's")) == "not FFmpeg's"


def test_only_idr_pictures_are_decoded_without_a_flush_before_them(videos, monkeypatch):
    """Before each keyframe of a sparse read the decoder is flushed, as a seek would, except
    before an IDR picture (H.264, HEVC) where the decoder holds no frame back: an IDR restarts the
    decoder itself. Open-GOP keyframes (x264's recovery points, x265's CRA pictures) are not
    IDR pictures, nor is anything but the first packet of a closed H.264 GOP."""
    def first_slices(name):
        path = videos[name][0]
        index = frame_index(path)
        size = pyav._nal_length_size(index.codec, index.extradata)
        with pyav.av.open(path) as c:
            packets = [p for p in c.demux(video=0) if p.size]
        return [pyav._is_idr(p, index.codec, size) for p in packets], [p.is_keyframe for p in packets]

    idr, key = first_slices("h264_bframes")
    assert idr == key and sum(idr) == 5  # closed GOPs of 12
    for name in ("h264_open_gop", "hevc_bframes_mp4"):
        idr, key = first_slices(name)
        assert idr[0] and not any(idr[1:]) and sum(key) > 1, name
    for name in ("h264_all_intra", "hevc_all_intra"):
        assert all(first_slices(name)[0]), name
    assert pyav._nal_length_size("vp9", b"\x01" * 30) is None
    monkeypatch.setattr(pyav._local, "decoder", None, raising=False)  # no decoder left by earlier reads
    checked = []
    real = pyav._is_idr
    monkeypatch.setattr(pyav, "_is_idr", lambda *a: checked.append(real(*a)) or checked[-1])
    monkeypatch.setattr(pyav, "_decoder_threads", lambda: "NONE")
    for name in ("h264_all_intra", "hevc_all_intra", "h264_open_gop"):
        path, ref, _ = videos[name]
        for want in ([3, 9, 17, 31], [39, 0, 20, 20, 21]):
            assert np.array_equal(read_frames(path, want), ref[want]), (name, want)
    # Per all-intra file: the 3 frames after the first, then the next read's 4, each read alone
    # with the decoder the first left; open GOPs reorder, so they are flushed unchecked.
    assert checked == [True] * 14


def test_an_all_intra_read_decodes_each_frame_from_its_own_packet(videos, monkeypatch):
    """Of a file whose keyframes are IDR pictures and whose decoder holds no frame back (an
    all-intra H.264 or HEVC file), a read decodes each wanted keyframe from its packet alone,
    with no seek of the general path; a frame that does not come out is decoded again by it."""
    monkeypatch.setattr(pyav, "_decoder_threads", lambda: "NONE")
    segments = []
    real_segment = pyav._ClipReader.read_segment
    monkeypatch.setattr(pyav._ClipReader, "read_segment", lambda self, f: segments.append(f.tolist()) or real_segment(self, f))
    for name in ("h264_all_intra", "hevc_all_intra"):
        path, ref, _ = videos[name]
        for want in ([3, 9, 17, 31], [39, 0, 20, 20, 21], [5, 4, 3]):
            got, cost = _cost(lambda: read_frames(path, want))
            assert np.array_equal(got, ref[want]), (name, want)
            assert cost.packets == cost.frames == len(set(want)), (name, want)
    assert segments == []
    # B-frames: a new decoder learns from the first picture that it reorders, and holds it back:
    # drained out, as the general path would; the rest is the general path's.
    path, ref, _ = videos["h264_bframes"]
    monkeypatch.setattr(pyav._local, "decoder", None)
    got = read_frames(path, [0, 12, 24, 30])
    assert np.array_equal(got, ref[[0, 12, 24, 30]]) and sorted(sum(segments, [])) == [12, 24, 30]
    # A frame that does not come out of its packet: the general path decodes it, and the rest.
    path, ref, _ = videos["h264_all_intra"]
    real_decode, lost, pts20 = pyav._ClipReader._decode, [], int(frame_index(path).pts[20])

    def loses_one(self, packet):
        frames = real_decode(self, packet)
        if packet is not None and packet.pts == pts20 and not lost:
            lost.append(frames)
            return []
        return frames

    monkeypatch.setattr(pyav._ClipReader, "_decode", loses_one)
    segments.clear()
    assert np.array_equal(read_frames(path, [8, 20, 33]), ref[[8, 20, 33]])
    assert lost and len(lost[0]) == 1 and segments == [[20], [33]]
    # Frames read alone, then a failure on the general path: the read failed, and its decoder
    # is not kept for the next one.
    monkeypatch.setattr(pyav._local, "decoder", None)

    def fails_after_8(self, packet):
        if packet is not None and packet.pts != int(frame_index(path).pts[8]):
            raise pyav.av.error.InvalidDataError(-1094995529, "Invalid data found when processing input")
        return real_decode(self, packet)

    monkeypatch.setattr(pyav._ClipReader, "_decode", fails_after_8)
    monkeypatch.setattr(pyav._ClipReader, "_takes_as_is", lambda self, packet: False)  # 20 goes to the general path
    with pytest.raises(VideoReadError, match="decoding failed"):
        read_frames(path, [8, 20])
    assert pyav._local.decoder is None


def test_the_next_read_takes_over_a_decoder_set_up_the_same_way(tmp_path, monkeypatch):
    """A read whose decoder is set up as the previous read's was (codec, set-up bytes, colour
    tags, size: files of one re-encoded dataset) takes that decoder over instead of setting up a
    new one, and reads the same frames; after a read that failed, it sets up a new one."""
    monkeypatch.setattr(pyav, "_decoder_threads", lambda: "NONE")
    monkeypatch.setattr(pyav._local, "decoder", None, raising=False)  # none left by earlier tests' reads
    a, b = (write_video(str(tmp_path / f"{n}.mp4"), 30, gop=1, pattern=p) for n, p in (("a", "bars"), ("b", "field")))
    c = write_video(str(tmp_path / "c.mp4"), 30, gop=1, size=(64, 48))
    d = write_video(str(tmp_path / "d.mp4"), 30, gop=10, bframes=2)
    refs = {path: decode_all(path)[1] for path in (a, b, c, d)}
    plan = [(a, [3, 9, 27], 0), (b, [0, 1, 29], 1), (a, [5], 1), (c, [2, 20], 0), (a, [7, 8], 0), (d, [25, 4], 0),
            (d, [9, 11, 29], 1), (d, [0, 1], 1), (a, [1], 0)]
    for path, want, reused in plan:
        got, cost = _cost(lambda: read_frames(path, want))
        assert np.array_equal(got, refs[path][want]), (path, want)
        assert (cost.reused, cost.opens) == (reused, 1 - reused), (path, want)
    with pytest.raises(VideoReadError, match="do not hold the crop box"):
        read_frames(a, [2], crop=(0, 0, 65, 10))
    got, cost = _cost(lambda: read_frames(a, [4, 2]))
    assert np.array_equal(got, refs[a][[4, 2]]) and (cost.reused, cost.opens) == (0, 1)
    # A frame-threaded decoder (the main process's) is not kept: freed in a DataLoader worker
    # forked from this process, it would wait forever for its threads (the test suite hung).
    monkeypatch.setattr(pyav, "_decoder_threads", lambda: "AUTO")
    assert np.array_equal(read_frames(a, [6]), refs[a][[6]]) and pyav._local.decoder is None


def test_file_change_invalidates_index(tmp_path):
    path = str(tmp_path / "v.mp4")
    write_video(path, 20, gop=5)
    assert frame_index(path).num_frames == 20
    write_video(path, 30, gop=5)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    assert frame_index(path).num_frames == 30
    assert np.array_equal(read_frames(path, [29]), decode_all(path)[1][[29]])


def test_empty_request(videos):
    assert read_frames(videos["h264_bframes"][0], []).shape == (0, 64, 96, 3)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.mp4")
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_frames(path, [0])
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        frame_index(path)


@pytest.mark.parametrize("index", [60, 1000, -1])
def test_out_of_range_index(videos, index):
    path = videos["h264_bframes"][0]
    with pytest.raises(IndexError) as e:
        read_frames(path, [0, index])
    assert path in str(e.value) and "60 frames" in str(e.value)


def test_random_bytes(tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoReadError, match="junk.mp4"):
        read_frames(str(path), [0])


def test_truncated_mp4(tmp_path):
    full = write_video(str(tmp_path / "full.mp4"), 30)
    path = tmp_path / "cut.mp4"
    data = open(full, "rb").read()
    path.write_bytes(data[: len(data) // 2])  # the mp4 index (moov) is at the end: lost
    with pytest.raises(VideoReadError, match="cut.mp4"):
        read_frames(str(path), [0])


@pytest.mark.parametrize("name, options", [("cut.mkv", None), ("cut.webm", None),
                                           ("cut.mp4", {"movflags": "faststart"})])
def test_truncated_files_are_refused_by_name(tmp_path, name, options):
    """A partly downloaded file was read as a shorter video, without a word: its header (mp4's
    sample table up front, mkv's and webm's duration) says how many frames it should hold."""
    codec = "libvpx-vp9" if name.endswith(".webm") else "libx264"
    full = write_video(str(tmp_path / ("full" + name[3:])), 60, gop=12, codec=codec, container_options=options)
    assert frame_index(full).num_frames == 60
    path = str(tmp_path / name)
    data = open(full, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(VideoReadError, match=rf"{name}: truncated: its header declares 60 frames, the file holds \d+"):
        frame_index(path)


def test_no_video_stream(tmp_path):
    import av

    path = str(tmp_path / "audio.wav")
    with av.open(path, "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        silence = np.zeros((1, 800), np.int16)
        frame = av.AudioFrame.from_ndarray(silence, format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(VideoReadError, match="audio.wav.*no video stream"):
        read_frames(path, [0])


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_no_frames(tmp_path, ext):
    # The mp4 muxer drops the empty track; the mkv has a header and nothing else.
    path = write_video(str(tmp_path / f"empty.{ext}"), 0)
    with pytest.raises(VideoReadError, match=f"empty.{ext}"):
        read_frames(path, [0])


def test_bad_landing_falls_back(videos, monkeypatch):
    # As if the demuxer ignored keyframe flags (MPEG-TS): every seek is rejected.
    path, ref, _ = videos["h264_mkv"]
    monkeypatch.setattr(pyav._ClipReader, "_landed_at_or_before", lambda self, packet, key: False)
    assert np.array_equal(read_frames(path, [40, 30]), ref[[40, 30]])


def test_start_keyframes_are_those_that_decode_every_wanted_frame_latest_first(videos):
    """Every keyframe shown at or before the first wanted frame and decoded at or before every
    wanted one, the latest in decode order first, on closed and open GOPs and shifted
    timestamps; ``limit`` keeps the first of them."""
    for name in ("h264_bframes", "h264_open_gop", "h264_start_pts", "h264_edit_list", "vp9_webm"):
        index = frame_index(videos[name][0])
        keys = [int(k) for k in np.flatnonzero(index.keyframe)]
        for first in range(index.num_frames):
            for min_decode_pos in {int(index.decode_pos[first]), max(0, int(index.decode_pos[first]) - 3)}:
                want = sorted((k for k in keys if k <= first and index.decode_pos[k] <= min_decode_pos),
                              key=lambda k: -int(index.decode_pos[k]))
                assert index.start_keyframes(first, min_decode_pos) == want, (name, first, min_decode_pos)
                assert index.start_keyframes(first, min_decode_pos, limit=1) == want[:1]


@pytest.mark.parametrize("name", ["h264_bframes", "h264_mkv"])  # packets read in place, and demuxed
def test_missing_frames_retry_from_earlier(videos, monkeypatch, name):
    # A start keyframe after the wanted frames decodes none of them: the reader must notice.
    path, ref, _ = videos[name]
    monkeypatch.setattr(pyav.FrameIndex, "start_keyframes",
                        lambda self, first, min_decode_pos, limit=None: [48, 24][:limit])
    assert np.array_equal(read_frames(path, [30, 5]), ref[[30, 5]])


class _ThreadsSeen(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        from pipelines.pyav import _decoder_threads

        return _decoder_threads()


def test_one_decoding_thread_per_dataloader_worker():
    """Workers decode one video each per core: no FFmpeg threads on top. Elsewhere, FFmpeg's choice."""
    from pipelines.pyav import _decoder_threads

    assert _decoder_threads() == "AUTO"
    loader = torch.utils.data.DataLoader(_ThreadsSeen(), num_workers=1, batch_size=None)
    assert list(loader) == ["NONE"]


@pytest.mark.parametrize("ext, codec", [(".mkv", "libx264"), (".webm", "libvpx-vp9")])
def test_frames_sharing_a_timestamp_are_each_their_own(tmp_path, ext, codec):
    """Frame k is the k-th a sequential decode yields (presentation order, ties in decode order):
    matched by pts alone, the second frame of a pair was read as the first."""
    from pipelines.probe import check_videos, probe_video

    pts = list(range(6)) + [5] + list(range(6, 23))  # frames 5 and 6 share pts 5
    path = write_video(str(tmp_path / f"dup{ext}"), 24, codec=codec, gop=8, pts=pts)
    ref = decode_all(path)[1]
    assert [frame_number(f) for f in ref[4:8]] == [4, 5, 6, 7]
    want = [6, 5, 23, 0, 6]
    got = read_frames(path, want)
    assert [frame_number(f) for f in got] == [6, 5, 23, 0, 6]
    assert np.array_equal(got, ref[want])
    info = probe_video(path)
    assert info.shared_timestamps == 2
    assert any("2 frames share their timestamp with another" in m for m in check_videos([info], [path]))


def test_timestamps_that_go_back_are_read_in_presentation_order(tmp_path):
    """A frame whose pts goes back (shown before frames decoded ahead of it) is still frame k of
    its pts order; the reader stopped at the first later pts and missed it."""
    src = write_video(str(tmp_path / "src.webm"), 24, codec="libvpx-vp9", gop=8)
    step = int(decode_all(src)[0][1])
    path = remux_with_pts(src, str(tmp_path / "back.webm"), {9: int(3.5 * step)})  # frame 9 shown after 3
    ref = decode_all(path)[1]
    assert [frame_number(f) for f in ref[:6]] == [0, 1, 2, 3, 9, 4]
    for want in ([4], [4, 9], [3, 4, 5, 10]):
        assert np.array_equal(read_frames(path, want), ref[want]), want
