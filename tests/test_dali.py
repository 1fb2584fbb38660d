"""The DALI backend against the PyAV one: same frames, same clips, same rows, same sharding.

CPU tests decode VP9 with DALI's CPU decoder on tiny videos written here. DALI and PyAV convert
YUV to RGB differently (docs/decoding-notes.md), so frames are compared by alignment (each DALI
frame is nearest to the PyAV frame of its own index) and by PSNR on natural-looking content:
smooth, moderately saturated colour fields under a grey texture, moving, as camera video
is; not sharp synthetic colour edges. GPU tests (NVDEC, H.264) carry the `gpu` marker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

import av  # noqa: E402

from pipelines import build_pipeline  # noqa: E402
from pipelines.base import CLIP_STD, PipelineConfig, TooManyBadVideos  # noqa: E402
from pipelines.lists import VideoRecord, write_list  # noqa: E402
from pipelines import dali as D, pyav as P  # noqa: E402
from videos import encode_frames  # noqa: E402

MIN_PSNR = 40.0
_CODECS = {"vp9": ("libvpx-vp9", ".webm", {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
           "h264": ("libx264", ".mp4", {"crf": "18", "preset": "veryfast", "bf": "2",
                                        "x264-params": "keyint=8:min-keyint=8:scenecut=0:bframes=2:b-adapt=0"})}


def natural_frames(seed: int, num_frames: int, height: int = 72, width: int = 96) -> np.ndarray:
    """A panning view over smooth colour blobs and a finer grey texture: [T, H, W, 3] uint8."""
    rng = np.random.default_rng(seed)
    pan = 2 * num_frames
    size = (height + pan, width + pan)
    colour = torch.tensor(rng.normal(0, 35, (1, 3, 5, 6)), dtype=torch.float32)
    colour = torch.nn.functional.interpolate(colour, size=size, mode="bicubic", align_corners=False)[0]
    grey = torch.tensor(rng.normal(0, 25, (1, 1, size[0] // 3, size[1] // 3)), dtype=torch.float32)
    grey = torch.nn.functional.interpolate(grey, size=size, mode="bilinear", align_corners=False)[0]
    field = (128 + colour + grey).permute(1, 2, 0).numpy()
    frames = [field[2 * t:2 * t + height, t:t + width] for t in range(num_frames)]
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def write_video(path: str, frames: np.ndarray, codec: str = "vp9", gop: int = 8) -> str:
    name, _, options = _CODECS[codec]
    return encode_frames(path, frames, name, options=options, gop=gop)


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    mse = ((torch.as_tensor(a).double() - torch.as_tensor(b).double()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def assert_aligned(dali_frames: np.ndarray, all_pyav: np.ndarray, indices) -> None:
    """Each DALI frame is closer to the PyAV frame of its own index than to any other frame."""
    for row, i in enumerate(indices):
        dist = [np.abs(dali_frames[row].astype(int) - f).mean() for f in all_pyav]
        assert int(np.argmin(dist)) == i, (row, i, dist)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Nine VP9 videos of different lengths (3 shorter than an 8 x 2 clip) and sizes, and lists."""
    root = tmp_path_factory.mktemp("dali")
    lengths = [24, 30, 5, 20, 16, 9, 28, 12, 18]
    records = []
    for i, n in enumerate(lengths):
        h, w = (72, 96) if i % 3 else (80, 64)  # some portrait videos for the 3-crop views
        write_video(str(root / f"v{i}.webm"), natural_frames(i, n, h, w))
        records.append(VideoRecord(f"v{i}.webm", i % 3))
    write_list(str(root / "all.txt"), records)
    return root


def make_cfg(root, train: bool, **kw) -> PipelineConfig:
    base = dict(list_path=str(root / "all.txt"), data_root=str(root), num_classes=3, num_frames=8, sampling_rate=2,
                input_size=48, batch_size=4, train=train, num_workers=0, seed=5, hflip=0.5 if train else 0.0,
                crop_scale=(0.3, 1.0), num_spatial_views=3, num_temporal_views=2)
    base.update(kw)
    return PipelineConfig(**base)


def to_pixels(clips: torch.Tensor) -> torch.Tensor:
    """Normalised clips back to the 0-255 scale, where PSNR is measured."""
    return clips * torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1) * 255


def collect(pipe, epoch: int = 0, skip: int = 0) -> list:
    pipe.set_epoch(epoch, skip_batches=skip)
    return list(pipe)


# -- read_frames -----------------------------------------------------------------------------


def test_read_frames_matches_pyav(tmp_path):
    path = write_video(str(tmp_path / "nat.webm"), natural_frames(0, 24, 96, 128))
    indices = [3, 0, 23, 7, 7, 15, 22, 8, 16]  # unsorted, repeated, across GOPs, the last frame
    got = D.read_frames(path, indices)
    everything = P.read_frames(path, range(24))
    assert got.shape == (len(indices), 96, 128, 3) and got.dtype == np.uint8
    assert_aligned(got, everything, indices)
    diff = np.abs(got.astype(int) - everything[indices])
    value = psnr(got, everything[indices])
    print(f"\nDALI-CPU vs PyAV, VP9 natural content: mean |diff| {diff.mean():.2f}, PSNR {value:.1f} dB, "
          f"max {diff.max()}")
    assert value >= MIN_PSNR and diff.mean() < 2.5


def test_read_frames_contract(tmp_path):
    path = write_video(str(tmp_path / "v.webm"), natural_frames(1, 10))
    assert D.read_frames(path, []).shape == (0, 72, 96, 3)
    with pytest.raises(IndexError, match="out of range"):
        D.read_frames(path, [0, 10])
    with pytest.raises(FileNotFoundError):
        D.read_frames(str(tmp_path / "missing.webm"), [0])
    with pytest.raises(ValueError, match="device"):
        D.read_frames(path, [0], device="tpu")


def test_irregular_timestamps_give_the_frames_pyav_gives(tmp_path):
    """Frames sharing a pts, and a pts that goes back: DALI's frame lists name the same frames
    as the PyAV reader and a sequential decode (presentation order, ties in decode order)."""
    import videos

    dup = videos.write_video(str(tmp_path / "dup.webm"), 24, codec="libvpx-vp9", gop=8,
                             pts=list(range(6)) + [5] + list(range(6, 23)))
    src = videos.write_video(str(tmp_path / "src.webm"), 24, codec="libvpx-vp9", gop=8)
    step = int(videos.decode_all(src)[0][1])
    back = videos.remux_with_pts(src, str(tmp_path / "back.webm"), {9: int(3.5 * step)})
    for path, want in ((dup, [5, 6, 7, 23]), (back, [3, 4, 5, 10])):
        expected = [videos.frame_number(f) for f in videos.decode_all(path)[1][want]]
        assert [videos.frame_number(f) for f in D.read_frames(path, want)] == expected, path
        assert [videos.frame_number(f) for f in P.read_frames(path, want)] == expected, path


def write_tagged(path: str, frames: np.ndarray, matrix: str, tag: str) -> str:
    """VP9 of RGB ``frames`` converted to YUV with ``matrix`` (swscale's name) and tagged ``tag``."""
    from fractions import Fraction

    with av.open(path, "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=25, options={
            "crf": "8", "b": "0", "deadline": "realtime", "cpu-used": "8", "colorspace": tag})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for t, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24").reformat(format="yuv420p", dst_colorspace=matrix)
            frame.pts, frame.time_base = t, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_colour_correction_is_the_matrix_change():
    """The correction turns BT.601's YCbCr -> RGB into the tagged matrix's (BT.709 here)."""
    ycc = np.random.default_rng(0).uniform(-0.4, 0.4, (100, 3)) + [0.5, 0, 0]
    assert D.colour_correction(2) is None and D.colour_correction(6) is None and D.colour_correction(None) is None
    np.testing.assert_allclose(ycc @ D._ycbcr_to_rgb(0.299, 0.114).T @ D.colour_correction(1).T.astype(np.float64),
                               ycc @ D._ycbcr_to_rgb(0.2126, 0.0722).T, atol=1e-6)


def test_colours_follow_the_streams_matrix_tag(tmp_path):
    """DALI converts every stream as BT.601; PyAV follows the tag. On BT.709 content the
    corrected DALI frames and clips are as close to PyAV's as on BT.601 content, where no
    correction runs (uncorrected, BT.709 is several dB further off)."""
    source = natural_frames(3, 8, 64, 96)
    source = np.clip((source.astype(float) - 128) * 1.6 + 128, 0, 255).astype(np.uint8)  # saturated colours
    bt601 = write_tagged(str(tmp_path / "bt601.webm"), source, "ITU601", "smpte170m")
    bt709 = write_tagged(str(tmp_path / "bt709.webm"), source, "ITU709", "bt709")
    near = {}
    for name, path in (("bt601", bt601), ("bt709", bt709)):
        near[name] = psnr(D.read_frames(path, range(8)), P.read_frames(path, range(8)))
    raw = psnr(D._decode(bt709, np.arange(8), None), P.read_frames(bt709, range(8)))
    print(f"\nDALI vs PyAV: BT.601 {near['bt601']:.1f} dB, BT.709 {near['bt709']:.1f} dB (uncorrected {raw:.1f} dB)")
    assert near["bt709"] >= near["bt601"] - 1.5 and raw <= near["bt709"] - 3

    write_list(str(tmp_path / "all.txt"), [VideoRecord("bt709.webm", 0), VideoRecord("bt601.webm", 1)])
    cfg = PipelineConfig(list_path=str(tmp_path / "all.txt"), data_root=str(tmp_path), num_classes=2, num_frames=8,
                         sampling_rate=1, input_size=48, batch_size=2, train=False, num_workers=0)
    dali_pipe = build_pipeline("dali", cfg)
    assert dali_pipe.correct_colours
    (a,), (b,) = collect(dali_pipe), collect(build_pipeline("pyav", cfg))
    assert psnr(to_pixels(a.clips[:1]), to_pixels(b.clips[:1])) >= near["bt709"] - 1.5
    train = dataclasses.replace(cfg, train=True)  # the reader's clips are corrected the same way
    graph, reader = (collect(build_pipeline("dali", dataclasses.replace(train, extra={"dali_decoder": d})))
                     for d in ("graph", "reader"))
    assert torch.equal(graph[0].clips, reader[0].clips)


def test_h264_without_gpu_is_refused_with_a_hint(tmp_path):
    path = write_video(str(tmp_path / "clip.mp4"), natural_frames(2, 10), codec="h264")
    with pytest.raises(D.UnsupportedCodecError, match="--pipeline pyav") as info:
        D.read_frames(path, [0])
    assert "clip.mp4" in str(info.value)
    write_list(str(tmp_path / "list.txt"), [VideoRecord("clip.mp4", 0)] * 4)
    cfg = PipelineConfig(list_path=str(tmp_path / "list.txt"), data_root=str(tmp_path), num_classes=1,
                         batch_size=2, num_workers=0, device="cpu")
    with pytest.raises(D.UnsupportedCodecError, match="--pipeline pyav") as info:
        build_pipeline("dali", cfg)
    assert "clip.mp4" in str(info.value) and "h264" in str(info.value)


def test_what_nvdec_cannot_decode_is_refused_before_the_first_batch(tmp_path):
    """The probe records the pixel format and profile; the GPU path refuses up front, naming the
    file and the reason, what NVDEC (or DALI's conversion) cannot decode, instead of failing it
    mid-epoch. Checked without a GPU: the decision needs only the probe and the GPU generation."""
    from pipelines.probe import probe_videos

    hopper, ampere = (9, 0), (8, 0)
    cases = {  # name: (codec, pix_fmt, width, height, on Hopper, on Ampere) -- the expected reason
        "h264.mp4": ("libx264", "yuv420p", 64, 48, None, None),
        "h264_422.mp4": ("libx264", "yuv422p", 64, 48, "4:2:0 video only", "4:2:0 video only"),
        "h264_10bit.mp4": ("libx264", "yuv420p10le", 64, 48, "10-bit", "10-bit"),
        "hevc_10bit.mkv": ("libx265", "yuv420p10le", 160, 160, None, None),  # Main 10: read right on an H200
        "vp9_small.webm": ("libvpx-vp9", "yuv420p", 96, 64, "minimum of 128x128", "minimum of 128x128"),
        "vp9.webm": ("libvpx-vp9", "yuv420p", 160, 128, None, None),
        "av1.mkv": ("libsvtav1", "yuv420p", 128, 128, "no AV1 decoder", None),
    }
    paths = []
    for name, (codec, pix_fmt, w, h, *_) in cases.items():
        try:
            paths.append(encode_frames(str(tmp_path / name), natural_frames(7, 4, h, w), codec, pix_fmt=pix_fmt))
        except (av.error.FFmpegError, ValueError) as e:  # an encoder this PyAV build lacks
            pytest.skip(f"cannot encode {name}: {e}")
    infos, failures = probe_videos(paths, str(tmp_path / "probe.json"))
    assert not failures
    assert infos[1].pix_fmt == "yuv422p" and infos[1].profile == "High 4:2:2"
    assert infos[2].pix_fmt == "yuv420p10le" and infos[2].profile == "High 10"
    assert probe_videos(paths, str(tmp_path / "probe.json"))[0] == infos  # read back from the cache
    for (name, (*_, on_hopper, on_ampere)), info in zip(cases.items(), infos):
        for capability, want in ((hopper, on_hopper), (ampere, on_ampere)):
            got = D.nvdec_problem(info, capability)
            assert (got is None) if want is None else (want in (got or "")), (name, capability, got)
    with pytest.raises(D.UnsupportedCodecError) as e:
        D._check_codecs(list(zip(paths, infos)), gpu=True, capability=hopper)
    message = str(e.value)
    assert "4 video(s) on the GPU" in message and "h264_10bit.mp4: yuv420p10le" in message
    assert "--pipeline pyav" in message
    inside = dataclasses.replace(infos[0], hidden_later=2)  # an edit list that cuts frames out of the middle
    assert "edit list hides 2 frame(s) inside" in D.nvdec_problem(inside, hopper)
    assert D.nvdec_problem(dataclasses.replace(infos[0], hidden_leading=2), hopper) is None


def test_frames_an_edit_list_hides_are_numbered_for_each_decoder(tmp_path):
    """An mp4 whose edit list hides its first frames: FFmpeg's decoders (DALI's CPU decoder
    among them) drop them, NVDEC outputs them, so on the GPU DALI's frame numbers count them.
    The probe records them, the CPU graph reads the shown frames, and the GPU numbering skips the
    hidden ones (its reading is test_gpu_frames_an_edit_list_hides_are_skipped)."""
    from pipelines.index import frame_index
    from pipelines.probe import probe_video
    from videos import frame_number, write_video

    vp9 = write_video(str(tmp_path / "edit_vp9.mp4"), 30, codec="libvpx-vp9", gop=8, start_pts=-2, size=(96, 64))
    h264 = write_video(str(tmp_path / "edit_h264.mp4"), 30, gop=8, bframes=2, start_pts=-3, size=(96, 64))
    plain = write_video(str(tmp_path / "plain.mp4"), 30, gop=8, bframes=2, size=(96, 64))
    assert [probe_video(p).hidden_leading for p in (vp9, h264, plain)] == [2, 3, 0]
    assert probe_video(h264).num_frames == 27 and probe_video(h264).hidden_later == 0
    wanted = [0, 1, 5, 26]
    assert [frame_number(f) for f in D.read_frames(vp9, wanted, device="cpu")] == [2, 3, 7, 28]
    positions = np.array(wanted)
    index = frame_index(h264)
    assert list(D.dali_frame_numbers(index, positions)) == wanted
    assert list(D.dali_frame_numbers(index, positions, gpu=True)) == [3, 4, 8, 29]
    assert list(D.dali_frame_numbers(frame_index(plain), positions, gpu=True)) == wanted


# -- the pipeline against the PyAV pipeline --------------------------------------------------


def assert_same_batches(dali_batches, pyav_batches) -> list[float]:
    assert len(dali_batches) == len(pyav_batches)
    values = []
    for d, p in zip(dali_batches, pyav_batches):
        assert torch.equal(d.index, p.index) and torch.equal(d.view, p.view) and torch.equal(d.labels, p.labels)
        assert d.clips.shape == p.clips.shape and d.clips.dtype == torch.float32
        for a, b in zip(to_pixels(d.clips), to_pixels(p.clips)):  # per sample: same frames, same crop
            values.append(psnr(a, b))
    assert min(values) >= MIN_PSNR, values
    return values


def test_training_batches_match_pyav(dataset):
    cfg = make_cfg(dataset, train=True)
    dali_pipe, pyav_pipe = build_pipeline("dali", cfg), build_pipeline("pyav", cfg)
    assert len(dali_pipe) == len(pyav_pipe) == 2  # 9 videos, batches of 4: the partial one is dropped
    values = assert_same_batches(collect(dali_pipe, epoch=3), collect(pyav_pipe, epoch=3))
    print(f"\ntraining clips, DALI-CPU vs PyAV: PSNR min {min(values):.1f} dB, mean {np.mean(values):.1f} dB")
    # A resumed epoch starts where it was left, without the skipped batches.
    resumed = collect(dali_pipe, epoch=3, skip=1)
    assert len(resumed) == 1 and torch.equal(resumed[0].index, collect(pyav_pipe, epoch=3)[1].index)


@pytest.mark.parametrize("temporal", [2, 1], ids=["views-take-their-frames", "views-crop-shared-frames"])
def test_evaluation_views_match_pyav(dataset, temporal):
    cfg = make_cfg(dataset, train=False, num_temporal_views=temporal)
    dali_batches = collect(build_pipeline("dali", cfg))
    pyav_batches = collect(build_pipeline("pyav", cfg))
    views = 3 * temporal
    assert [len(b.index) for b in dali_batches] == [4 * views, 4 * views, views]  # the last batch is partial
    assert dali_batches[0].view[:views].tolist() == list(range(views))
    assert_same_batches(dali_batches, pyav_batches)


def test_files_are_read_ahead_off_the_training_thread(dataset, monkeypatch):
    """The feeding callback runs on the training thread inside pipe.run(): every batch but the
    first has its files read ahead by other threads, so a slow disk does not stall training."""
    import threading

    readers = []
    fromfile = np.fromfile

    def recording(path, *args, **kwargs):
        readers.append(threading.current_thread() is threading.main_thread())
        return fromfile(path, *args, **kwargs)

    monkeypatch.setattr(D.np, "fromfile", recording)
    cfg = make_cfg(dataset, train=False, num_spatial_views=1, num_temporal_views=1, batch_size=2)
    batches = collect(build_pipeline("dali", cfg))
    assert sorted(i for b in batches for i in b.index.tolist()) == list(range(9))
    assert len(readers) == 9 and sum(readers) == 2  # the first batch's two files only


def test_a_training_pipeline_builds_its_graph_once(dataset):
    """An epoch run to its end leaves the training graph ready for the next one; an epoch left
    early (the loop lets go of it for an evaluation) releases it. The batches are a fresh
    pipeline's either way. An evaluation pipeline lets go of its graph after every pass."""
    cfg = make_cfg(dataset, train=True, num_spatial_views=1, num_temporal_views=1)
    kept = build_pipeline("dali", cfg)
    epochs = [collect(kept, epoch=e) for e in range(3)]
    assert kept.graphs_built == 1

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x.clips, y.clips) and torch.equal(x.index, y.index)
                                        for x, y in zip(a, b))

    assert same(epochs[2], collect(build_pipeline("dali", cfg), epoch=2))
    kept.set_epoch(1)
    left = iter(kept)
    next(left)
    left.close()
    assert same(collect(kept, epoch=1), epochs[1]) and kept.graphs_built == 2
    evaluation = build_pipeline("dali", make_cfg(dataset, train=False, num_spatial_views=1, num_temporal_views=1))
    assert same(collect(evaluation), collect(evaluation)) and evaluation.graphs_built == 2


def test_the_randaugment_graph_is_defined_without_origin_records_and_dalis_setting_comes_back():
    """DALI records each operator's Python stack as it is created; the RandAugment graph (about
    1,100 operators) is defined without, and the user's own graphs get DALI's setting back, also
    when a definition fails."""
    dali_trace = pytest.importorskip("nvidia.dali._utils.dali_trace")
    from pipelines.dali_augment import untraced_definition

    assert dali_trace.is_tracing_enabled()
    with untraced_definition():
        assert not dali_trace.is_tracing_enabled()
    with pytest.raises(RuntimeError, match="graph"), untraced_definition():
        raise RuntimeError("a graph that fails to build")
    with untraced_definition(enabled=False):  # a graph without RandAugment keeps the records
        assert dali_trace.is_tracing_enabled()
    assert dali_trace.is_tracing_enabled()


@pytest.mark.parametrize("policy", [None, "rand-m7-n4-mstd0.5-inc1"], ids=["plain", "randaugment"])
def test_the_reader_gives_the_graphs_clips(dataset, policy):
    """dali_decoder="reader": fn.experimental.readers.video over a per-epoch list of the
    sampler's frame ranges gives the graph's training batches exactly, short videos' repeated
    last frames included (three of the nine videos are shorter than a clip)."""
    cfg = make_cfg(dataset, train=True, num_spatial_views=1, num_temporal_views=1, auto_augment=policy)
    graph = build_pipeline("dali", cfg)
    reader = build_pipeline("dali", dataclasses.replace(cfg, extra={"dali_decoder": "reader"}))
    for epoch in (0, 1):
        a, b = collect(graph, epoch=epoch), collect(reader, epoch=epoch)
        assert len(a) == len(b) == 2
        for x, y in zip(a, b):
            assert torch.equal(x.index, y.index) and torch.equal(x.labels, y.labels) and torch.equal(x.view, y.view)
            assert torch.equal(x.clips, y.clips)
    assert (reader.readers_built, reader.graphs_built) == (2, 0)  # one reader per epoch, no fallback


def test_the_reader_hands_over_to_the_graph(tmp_path, caplog):
    """A file the reader cannot open: it leaves the file out of its list, which shifts the clips
    after it (the videos are of one size, so nothing else fails); the line numbers it returns
    show it, and the graph decodes the rest of the epoch, replacing the video as it would have.
    Paths the reader's list cannot hold (whitespace) go to the graph."""
    root = tmp_path / "my videos"
    root.mkdir()
    for i in range(8):
        write_video(str(root / f"v{i}.webm"), natural_frames(i, 20))
    write_list(str(root / "all.txt"), [VideoRecord(f"v{i}.webm", i % 3) for i in range(8)])
    cfg = make_cfg(root, train=True, num_spatial_views=1, num_temporal_views=1, batch_size=2, max_bad_fraction=0.5)
    graph = build_pipeline("dali", cfg)
    spaced = build_pipeline("dali", dataclasses.replace(cfg, extra={"dali_decoder": "reader"}))
    expected = collect(graph, epoch=2)
    assert all(torch.equal(x.clips, y.clips) for x, y in zip(collect(spaced, epoch=2), expected))
    assert (spaced.readers_built, spaced.graphs_built) == (0, 1)

    plain = tmp_path / "videos"
    root.rename(plain)
    cfg = dataclasses.replace(cfg, list_path=str(plain / "all.txt"), data_root=str(plain))
    graph, reader = build_pipeline("dali", cfg), build_pipeline("dali", dataclasses.replace(
        cfg, extra={"dali_decoder": "reader"}))
    bad = plain / f"v{expected[2].index[0].item()}.webm"  # the first clip of the epoch's third batch
    bad.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 8)
    expected, got = collect(graph, epoch=2), collect(reader, epoch=2)
    assert [b.index.tolist() for b in got] == [b.index.tolist() for b in expected]
    assert all(torch.equal(x.clips, y.clips) for x, y in zip(got, expected))
    assert "DALI's video reader failed at batch 2 of the epoch" in caplog.text
    # The graph takes over, finds the file and starts again from that batch: two builds.
    assert [p for p, _ in reader.bad] == [str(bad)] and (reader.readers_built, reader.graphs_built) == (1, 2)


def test_the_reader_takes_paths_with_braces(tmp_path):
    """The reader's file list is written line by line, whatever characters a path holds."""
    root = tmp_path / "clips{0}"
    root.mkdir()
    for i in range(4):
        write_video(str(root / f"v{{{i}}}.webm"), natural_frames(i, 20))
    write_list(str(root / "all.txt"), [VideoRecord(f"v{{{i}}}.webm", 0) for i in range(4)])
    cfg = make_cfg(root, train=True, num_spatial_views=1, num_temporal_views=1, batch_size=2, num_classes=1)
    reader = build_pipeline("dali", dataclasses.replace(cfg, extra={"dali_decoder": "reader"}))
    got, expected = collect(reader, epoch=0), collect(build_pipeline("dali", cfg), epoch=0)
    assert all(torch.equal(a.clips, b.clips) for a, b in zip(got, expected)) and len(got) == 2
    assert (reader.readers_built, reader.graphs_built) == (1, 0)


def test_a_file_whose_timestamps_go_back_is_read_by_the_graph(tmp_path):
    """A VP9 file whose pts go back: DALI numbers its frames in decode order, so no frame range
    gives the sampler's frames; its batch goes to the graph, the others to the reader, and the
    clips are the graph's."""
    import videos

    for i in range(3):
        videos.write_video(str(tmp_path / f"v{i}.webm"), 24, codec="libvpx-vp9", gop=8)
    src = videos.write_video(str(tmp_path / "src.webm"), 24, codec="libvpx-vp9", gop=8)
    step = int(videos.decode_all(src)[0][1])
    videos.remux_with_pts(src, str(tmp_path / "back.webm"), {9: int(3.5 * step)})
    write_list(str(tmp_path / "all.txt"), [VideoRecord(n, 0) for n in ("v0.webm", "v1.webm", "v2.webm", "back.webm")])
    cfg = PipelineConfig(list_path=str(tmp_path / "all.txt"), data_root=str(tmp_path), num_classes=1, num_frames=4,
                         sampling_rate=4, input_size=32, batch_size=2, train=True, num_workers=0, seed=1)
    reader = build_pipeline("dali", dataclasses.replace(cfg, extra={"dali_decoder": "reader"}))
    assert reader.infos[3].display_order_differs
    got, expected = collect(reader, epoch=0), collect(build_pipeline("dali", cfg), epoch=0)
    assert all(torch.equal(a.index, b.index) and torch.equal(a.clips, b.clips) for a, b in zip(got, expected))
    assert (reader.readers_built, reader.graphs_built) == (1, 1)


def test_training_with_the_reader_from_the_command_line(dataset, tmp_path, tiny_vit):
    """``evl.train --pipeline dali --dali_decoder reader``: the same steps as with the graph."""
    from evl import train as train_mod
    from evl.config import parse_config

    def run(out, *extra):
        argv = ["--backbone", tiny_vit, "--num_classes", "3", "--num_frames", "8", "--sampling_rate", "2",
                "--train_list_path", str(dataset / "all.txt"), "--data_root", str(dataset), "--pipeline", "dali",
                "--batch_size", "4", "--num_workers", "1", "--auto_augment", "none", "--cls_dropout", "0",
                "--decoder_mlp_dropout", "0", "--num_steps", "3", "--device", "cpu", "--output_dir", str(out),
                *extra]
        train_mod.train(parse_config(argv))
        with open(out / "metrics.jsonl") as f:
            return [e["loss"] for e in map(json.loads, f) if "loss" in e]

    assert run(tmp_path / "reader", "--dali_decoder", "reader") == run(tmp_path / "graph")


def test_extract_reads_with_dali(dataset, tmp_path, tiny_vit):
    """``evl.extract --pipeline dali``: every video's features nearest to its own PyAV-read
    features (the decoders differ by colour conversion only); a missing file is reported."""
    from evl import train as train_mod
    from evl.config import parse_config
    from evl.extract import main as extract_main

    run = tmp_path / "run"
    train_mod.train(parse_config([
        "--backbone", tiny_vit, "--num_classes", "3", "--num_frames", "8", "--sampling_rate", "2",
        "--train_list_path", str(dataset / "all.txt"), "--data_root", str(dataset), "--batch_size", "4",
        "--num_workers", "0", "--auto_augment", "none", "--num_steps", "1", "--device", "cpu",
        "--output_dir", str(run)]))
    lst = tmp_path / "list.txt"
    lst.write_text((dataset / "all.txt").read_text() + f"{tmp_path}/missing.webm 0\n")
    emb = {}
    for pipeline in ("pyav", "dali"):
        out = tmp_path / pipeline
        rc = extract_main(["--list", str(lst), "--data_root", str(dataset), "--checkpoint", str(run / "checkpoint-1.pth"),
                           "--output", str(out), "--pipeline", pipeline, "--num_workers", "1", "--batch_size", "4"])
        assert rc == 1  # the missing file
        index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
        assert [e["line"] for e in index] == list(range(1, 10))
        emb[pipeline] = np.stack([np.load(out / e["embedding"]) for e in index])
    dist = np.linalg.norm(emb["dali"][:, None] - emb["pyav"][None], axis=-1)
    assert (dist.argmin(1) == np.arange(9)).all(), dist

    # evl.predict --pipeline dali, whole video and windows: PyAV's probabilities within the
    # decoders' colour difference.
    from evl.inference import load_predictor
    from evl.predict import predict_video

    predictor = load_predictor(str(run / "checkpoint-1.pth"), device="cpu")
    video = str(dataset / "v1.webm")  # 30 frames
    a, b = (predict_video(predictor, video, window_sec=0.6, stride_sec=0.4, pipeline=p) for p in ("pyav", "dali"))
    assert len(a["windows"]) == len(b["windows"]) == 3
    torch.testing.assert_close(b["probs"], a["probs"], atol=0.02, rtol=0)


def test_evaluation_shards_cover_every_video_once(dataset):
    seen = []
    for rank in range(2):
        pipe = build_pipeline("dali", make_cfg(dataset, train=False, rank=rank, world_size=2, num_spatial_views=1,
                                               num_temporal_views=1, batch_size=2))
        batches = collect(pipe)
        assert len(batches) == len(pipe) == (3 if rank == 0 else 2)  # 5 and 4 videos
        seen += [i for b in batches for i in b.index.tolist()]
    assert sorted(seen) == list(range(9))


# -- the feature cache built with DALI ---------------------------------------------------------


def cache_argv(root, split, out, pipeline, tiny_vit, *extra):
    return ["build", "--pipeline", pipeline, "--split", split, "--list_path", str(root / "all.txt"),
            "--data_root", str(root), "--backbone", tiny_vit, "--num_frames", "8", "--sampling_rate", "2",
            "--num_views", "2", "--num_temporal_views", "2", "--num_spatial_views", "3", "--mirror",
            "--crop_scale", "0.3", "1", "--decoder_num_layers", "2", "--seed", "5", "--shard_clips", "4",
            "--batch_size", "6", "--num_workers", "0", "--device", "cpu", "--output", str(out), "--no_progress",
            *extra]


@pytest.mark.parametrize("split", ["train", "val"])
def test_cache_built_with_dali_holds_the_features_pyav_gives(dataset, tmp_path, tiny_vit, split):
    """``evl.cache build --pipeline dali`` stores, row for row, the features of the clips the PyAV
    build stores, up to the two decoders' colour difference: each row is nearest to the PyAV row
    of its own (clip, view); it is the backbone's features of the clip the DALI pipeline gives for
    that key; and that clip is the PyAV pipeline's within the decoders' PSNR bound."""
    import warnings

    import evl.cache as cache_cli
    from evl.decoder import attention_features
    from evl.model import build_model
    from pipelines.cache import FeatureStore, read_manifest, split_dir

    train = split == "train"
    extra = ["--auto_augment", "none"] if train else []
    stores, clips = {}, {}
    for pipeline in ("dali", "pyav"):
        out = tmp_path / pipeline
        argv = cache_argv(dataset, split, out, pipeline, tiny_vit, *extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            manifest = cache_cli.main(argv)
        assert manifest["num_clips"] == 9 and not any(sh["bad"] for sh in manifest["shards"])
        directory = split_dir(str(out), train)
        stores[pipeline] = torch.from_numpy(FeatureStore(directory, read_manifest(directory)).read(
            np.arange(manifest["num_clips"] * manifest["num_views"])).astype(np.float32))
        # The clips of the same keys, as the pipeline gives them.
        job = cache_cli.job_from_args(cache_cli.build_parser().parse_args(argv))
        keys = [(v, i) for i in range(9) for v in range(2)] if train else [(0, i) for i in range(9)]
        pcfg = job.data.pipeline_config(list_path=job.list_path, train=train, num_frames=8, num_classes=None,
                                        input_size=64, batch_size=4, seed=5, keys=keys)
        clips[pipeline] = torch.cat([b.clips for b in build_pipeline(pipeline, pcfg)])

    got, want = stores["dali"], stores["pyav"]
    distance = torch.cdist(got, want)  # views of a video too short for them are the same clip: ties
    assert (distance.diagonal() <= distance.min(1).values).all()
    values = [psnr(a, b) for a, b in zip(to_pixels(clips["dali"]), to_pixels(clips["pyav"]))]
    assert len(values) == len(want) and min(values) >= MIN_PSNR, values
    torch.manual_seed(5)  # the build's random backbone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(tiny_vit, 1, 8, decoder_num_layers=2).eval()
    with torch.no_grad():
        feats = attention_features(model.forward_features(clips["dali"]))
    live = torch.cat([t.flatten(1) for f in feats for t in f], 1)
    torch.testing.assert_close(got, live, atol=2e-3, rtol=2e-3)  # float16 storage
    relative = ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()
    print(f"\n{split} cache, DALI-CPU vs PyAV: clip PSNR min {min(values):.1f} dB, relative feature "
          f"difference max {relative:.3f}")


def test_cache_build_with_dali_on_h264_without_gpu_points_to_pyav(tmp_path, tiny_vit, capsys):
    import evl.cache as cache_cli

    write_video(str(tmp_path / "clip.mp4"), natural_frames(2, 20), codec="h264")
    write_list(str(tmp_path / "all.txt"), [VideoRecord("clip.mp4", 0)] * 2)
    with pytest.raises(SystemExit) as e:
        cache_cli.main(cache_argv(tmp_path, "val", tmp_path / "out", "dali", tiny_vit))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "clip.mp4" in err and "--pipeline pyav" in err, err
    assert "Traceback" not in err


# -- bad input -------------------------------------------------------------------------------


def test_corrupt_video_mid_epoch_is_replaced_or_skipped(dataset, tmp_path, caplog):
    root = tmp_path / "copy"
    root.mkdir()
    for name in os.listdir(dataset):
        if name.endswith((".webm", ".txt")):
            os.link(dataset / name, root / name)
    train = build_pipeline("dali", make_cfg(root, train=True, max_bad_fraction=0.5))
    one_view = dict(train=False, num_spatial_views=1, num_temporal_views=1)
    evaluate = build_pipeline("dali", make_cfg(root, max_bad_fraction=0.5, **one_view))
    strict = build_pipeline("dali", make_cfg(root, max_bad_fraction=0.0, **one_view))
    # Probed fine, then broken (a new file: the others share the dataset's inodes): DALI itself
    # fails on it mid-epoch, since its bytes are read without complaint.
    bad = root / "v4.webm"
    os.unlink(bad)
    bad.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 8)
    with pytest.raises(P.VideoReadError, match="v4.webm"):
        D.read_frames(str(bad), [0])

    batches = collect(train, epoch=1)
    assert len(batches) == 2 and all(len(b.index) == 4 for b in batches)  # replaced, not dropped
    assert 4 not in [i for b in batches for i in b.index.tolist()]
    assert train.bad and {p for p, _ in train.bad} == {str(bad)}
    assert "v4.webm" in caplog.text

    rows = [i for b in collect(evaluate) for i in b.index.tolist()]
    assert sorted(rows) == [0, 1, 2, 3, 5, 6, 7, 8]  # skipped, never duplicated
    assert [p for p, _ in evaluate.bad] == [str(bad)]
    with pytest.raises(TooManyBadVideos, match="v4.webm"):
        collect(strict)


# -- RandAugment inside the graph -----------------------------------------------------------

RECIPE = "rand-m7-n4-mstd0.5-inc1"


@pytest.mark.parametrize("device_id", [None, pytest.param(0, marks=pytest.mark.gpu)], ids=["cpu", "gpu"])
def test_graph_runs_the_cpu_executors_ops(device_id):
    """Each op, and whole decisions of the recipe, through DALI's operators (CPU, or GPU) against
    the CPU executor on the same frames: the same ops with the same parameters (the CPU executor
    itself is held to timm's ops by tests/test_augment.py)."""
    from pipelines.augment import augment_clip
    from pipelines.dali_augment import augment_frames
    from pipelines.randaugment import INCREASING_TRANSFORMS, AugOp, _arg, parse_policy
    from pipelines.sampling import ClipSampler
    from videos import photo_frames

    frames = photo_frames(2, 72, 96)
    rng = random.Random(0)
    ops = [(AugOp(name, 7, _arg(name, 7, rng)),) for name in INCREASING_TRANSFORMS]
    crops = [(6, 10, 60, 70)] * len(ops)
    sampler = ClipSampler(num_frames=2, sampling_rate=1, size=48, augment=parse_policy(RECIPE))
    for i in range(12):
        spec = sampler.train_clip(i, 0, num_frames_in_video=2, height=72, width=96)
        ops.append(spec.augment)
        crops.append(spec.crop)
    got = augment_frames([frames] * len(ops), ops, crops, 48, num_slots=4, device_id=device_id)
    values = [psnr(g, augment_clip(frames, o, c, 48).numpy()) for g, o, c in zip(got, ops, crops)]
    print(f"\nDALI graph ({'CPU' if device_id is None else 'GPU'}) vs CPU executor, same frames: "
          f"PSNR min {min(values):.1f} dB, median {np.median(values):.1f}")
    assert min(values) >= 40, sorted(zip(values, ops))[:3]


def check_pipeline_applies_the_samplers_decisions(root, caplog, device: str) -> None:
    """The DALI pipeline runs the recipe with no warning, and its training batches equal the CPU
    executor's output for the same specs on DALI's own decoded frames (so the two decoders'
    colours do not enter), clip by clip."""
    from pipelines.augment import augment_clip
    from pipelines.base import thwc_uint8_to_bcthw
    from pipelines.dataset import clip_specs

    cfg = make_cfg(root, train=True, auto_augment=RECIPE, num_frames=4, device=device)
    batches = collect(build_pipeline("dali", cfg), epoch=2)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    ds = build_pipeline("pyav", make_cfg(root, train=True, auto_augment=RECIPE, num_frames=4)).dataset
    values, kinds = [], set()
    for batch in batches:
        for row, index in enumerate(batch.index.tolist()):
            (spec,) = clip_specs(ds.sampler, True, (2, index), ds.records[index], ds.infos[index])
            kinds |= {op.kind for op in spec.augment}
            frames = D.read_frames(ds.records[index].path, spec.frame_indices, device="cpu" if device == "cpu" else "gpu")
            expected = thwc_uint8_to_bcthw(augment_clip(frames, spec.augment, spec.crop, 48, spec.flip)[None], "cpu")
            values.append(psnr(to_pixels(batch.clips[row:row + 1].cpu()), to_pixels(expected)))
    assert len(values) == 8 and len(kinds) >= 4  # several kinds of ops ran
    assert min(values) >= 40, values


def test_pipeline_applies_the_samplers_decisions(dataset, caplog):
    check_pipeline_applies_the_samplers_decisions(dataset, caplog, "cpu")


def test_import_fails_cleanly_without_dali():
    code = ("import sys; sys.modules['nvidia.dali'] = None\n"
            "import pipelines\n"
            "assert 'dali' not in pipelines.available_backends()\n"
            "try:\n"
            "    pipelines.build_pipeline('dali', None)\n"
            "except ImportError as e:\n"
            "    assert '--pipeline pyav' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no ImportError')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


# -- GPU (NVDEC) -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_gpu_read_frames_matches_pyav(tmp_path, codec):
    ext = _CODECS[codec][1]
    # 160x144: above every codec's NVDEC minimum (HEVC's 144x144 is the largest); the refusal
    # of smaller files is test_what_nvdec_cannot_decode_is_refused_before_the_first_batch.
    path = write_video(str(tmp_path / f"nat{ext}"), natural_frames(0, 24, 144, 160), codec=codec)
    indices = [3, 0, 23, 7, 7, 15, 22, 8, 16]
    got = D.read_frames(path, indices, device="gpu")
    everything = P.read_frames(path, range(24))
    assert got.shape == (len(indices), 144, 160, 3) and got.dtype == np.uint8
    assert_aligned(got, everything, indices)
    diff = np.abs(got.astype(int) - everything[indices])
    value = psnr(got, everything[indices])
    print(f"\nDALI-GPU vs PyAV, {codec} natural content: mean |diff| {diff.mean():.2f}, PSNR {value:.1f} dB, "
          f"max {diff.max()}")
    assert value >= MIN_PSNR


@pytest.mark.gpu
@pytest.mark.parametrize("codec,bframes,start", [("h264", 2, -2), ("h264", 0, -3), ("hevc", 2, -2), ("vp9", 0, -2)],
                         ids=["h264_bframes", "h264", "hevc", "vp9"])
def test_gpu_frames_an_edit_list_hides_are_skipped(tmp_path, codec, bframes, start):
    """NVDEC outputs the frames an mp4 edit list hides; frame k read on the GPU is still the
    k-th shown frame, as PyAV reads it."""
    from videos import frame_number, write_video

    encoder = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9"}[codec]
    path = write_video(str(tmp_path / f"edit_{codec}.mp4"), 40, codec=encoder, gop=8, bframes=bframes, start_pts=start,
                       size=(160, 144), options={"bf": str(bframes)} if codec == "hevc" else None)
    wanted = [0, 1, 12, 13, 19, 36 + start, 37 + start]
    got = [frame_number(f) for f in D.read_frames(path, wanted, device="gpu")]
    assert got == [frame_number(f) for f in P.read_frames(path, wanted)] == [w - start for w in wanted]


@pytest.fixture(scope="module")
def h264_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_h264")
    records = []
    for i, n in enumerate([24, 30, 5, 20, 16, 9, 28, 12, 18]):
        write_video(str(root / f"v{i}.mp4"), natural_frames(i, n), codec="h264")
        records.append(VideoRecord(f"v{i}.mp4", i % 3))
    write_list(str(root / "all.txt"), records)
    return root


@pytest.mark.gpu
@pytest.mark.parametrize("train", [True, False])
def test_gpu_pipeline_yields_normalised_batches_on_cuda(h264_dataset, train):
    cfg = make_cfg(h264_dataset, train=train, device="cuda:0", num_workers=2)
    dali_batches = collect(build_pipeline("dali", cfg), epoch=1)
    pyav_batches = collect(build_pipeline("pyav", cfg), epoch=1)
    assert all(b.clips.device.type == "cuda" and b.labels.device.type == "cuda" for b in dali_batches)
    cpu = [b._replace(clips=b.clips.cpu(), labels=b.labels.cpu(), index=b.index.cpu(), view=b.view.cpu())
           for b in dali_batches]
    pyav_cpu = [b._replace(clips=b.clips.cpu(), labels=b.labels.cpu(), index=b.index.cpu(), view=b.view.cpu())
                for b in pyav_batches]
    assert_same_batches(cpu, pyav_cpu)


@pytest.mark.gpu
def test_gpu_pipeline_applies_the_samplers_decisions(h264_dataset, caplog):
    check_pipeline_applies_the_samplers_decisions(h264_dataset, caplog, "cuda:0")


@pytest.mark.gpu
def test_gpu_reader_gives_the_graphs_clips(h264_dataset):
    """dali_decoder="reader" on NVDEC (H.264 with B-frames): the graph's training clips, indices
    and labels; pixels within the decoders' rounding (two NVDEC decoders, one per path)."""
    cfg = make_cfg(h264_dataset, train=True, device="cuda:0", num_workers=2, num_spatial_views=1,
                   num_temporal_views=1, auto_augment=RECIPE)
    graph = collect(build_pipeline("dali", cfg), epoch=1)
    reader_pipe = build_pipeline("dali", dataclasses.replace(cfg, extra={"dali_decoder": "reader"}))
    reader = collect(reader_pipe, epoch=1)
    assert reader_pipe.readers_built == 1 and reader_pipe.graphs_built == 0
    for a, b in zip(graph, reader, strict=True):
        assert torch.equal(a.index.cpu(), b.index.cpu()) and torch.equal(a.labels.cpu(), b.labels.cpu())
        assert psnr(to_pixels(a.clips.cpu()), to_pixels(b.clips.cpu())) >= MIN_PSNR
