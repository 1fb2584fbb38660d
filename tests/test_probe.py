"""The cached per-dataset video index of pipelines.probe."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from pipelines import index as frame_indexes, probe, pyav
from pipelines.probe import VideoInfo, check_videos, probe_video, probe_videos
from tests.videos import write_video


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    return {
        "short": write_video(str(root / "short.mp4"), 48, gop=12, bframes=3),
        "long": write_video(str(root / "long.mp4"), 60, gop=30),
        "vp9": write_video(str(root / "v.webm"), 30, codec="libvpx-vp9", gop=10, fps=30),
        # A 3-frame gap after frame 10: 25 fps pts with a hole, as from a dropped-frame camera.
        "vfr": write_video(str(root / "vfr.mkv"), 20, gop=5,
                           pts=[i + 3 * (i > 10) for i in range(20)]),
        "junk": _junk(root / "junk.mp4"),
    }


def _junk(path) -> str:
    path.write_bytes(b"\x00not a video\xff" * 100)
    return str(path)


def test_probe_values(dataset):
    info = probe_video(dataset["short"])
    assert info == VideoInfo(num_frames=48, fps=25.0, width=96, height=64, codec="h264",
                             max_keyframe_interval=12, variable_frame_rate=False,
                             duration_sec=48 / 25, display_order_differs=True,  # B-frames
                             pix_fmt="yuv420p", profile="High",  # as written: x264's 8-bit 4:2:0 profile
                             colorspace=2)  # no colour-matrix tag (AVCOL_SPC_UNSPECIFIED)
    assert probe_video(dataset["long"]).max_keyframe_interval == 30
    vp9 = probe_video(dataset["vp9"])
    assert (vp9.codec, vp9.num_frames, vp9.fps, vp9.max_keyframe_interval) == ("vp9", 30, 30.0, 10)
    assert not vp9.variable_frame_rate  # mkv/webm pts are rounded to milliseconds
    vfr = probe_video(dataset["vfr"])
    assert vfr.variable_frame_rate and vfr.num_frames == 20


def test_probe_videos_reports_failures(dataset, tmp_path):
    missing = str(tmp_path / "gone.mp4")
    paths = [dataset["short"], dataset["junk"], missing]
    infos, failures = probe_videos(paths, cache_path=None)
    assert infos[0].num_frames == 48 and infos[1] is None and infos[2] is None
    assert [p for p, _ in failures] == [dataset["junk"], missing]
    # The pair names the file; its reason does not name it again (a report prints "path: reason"),
    # and has FFmpeg's words without its error number.
    assert failures[0][1] == "cannot open: Invalid data found when processing input"
    assert failures[1][1] == "cannot stat: No such file or directory"


def test_cache_hit_and_invalidation(dataset, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache" / "probe.json")
    changing = write_video(str(tmp_path / "changing.mp4"), 24, gop=12)
    paths = [dataset["short"], dataset["junk"], changing]
    first = probe_videos(paths, cache_path=cache)
    names = sorted(os.listdir(tmp_path / "cache"))  # no temp file left behind
    assert names[0] == "probe.json" and len(names) == 2 and names[1].startswith("probe.json.frames-")

    probed = []

    def no_reading(path):
        probed.append(path)
        raise AssertionError("cached file probed again")

    monkeypatch.setattr(frame_indexes, "frame_index", no_reading)
    assert probe_videos(paths, cache_path=cache) == first  # failures come from the cache too
    assert probed == []

    write_video(changing, 36, gop=12)
    os.utime(changing, ns=(1, 1))
    monkeypatch.undo()
    infos, failures = probe_videos(paths, cache_path=cache)
    assert infos[2].num_frames == 36 and infos[0] == first[0][0] and failures == first[1]
    assert json.load(open(cache))["videos"][os.path.abspath(changing)]["info"]["num_frames"] == 36


@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "videos": [1, 2]}', "[]"])
def test_corrupt_cache_is_ignored(dataset, tmp_path, content):
    cache = tmp_path / "probe.json"
    cache.write_text(content)
    with pytest.warns(UserWarning, match="probe cache"):
        infos, failures = probe_videos([dataset["short"]], cache_path=str(cache))
    assert infos[0].num_frames == 48 and failures == []
    assert json.loads(cache.read_text())["version"] == probe.CACHE_VERSION  # rewritten


def test_bad_cache_entry_is_reprobed(dataset, tmp_path):
    cache = tmp_path / "probe.json"
    st = os.stat(dataset["short"])
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "info": {"num_frames": 1}}
    videos = {os.path.abspath(dataset["short"]): entry}
    cache.write_text(json.dumps({"version": 1, "videos": videos}))
    assert probe_videos([dataset["short"]], cache_path=str(cache))[0][0].num_frames == 48


def test_worker_pool_matches_serial(dataset):
    paths = [dataset["short"], dataset["junk"], dataset["vp9"]]
    serial = probe_videos(paths, cache_path=None)
    assert serial[0][1] is None and serial[1] != []
    assert probe_videos(paths, cache_path=None, num_workers=2, progress=True) == serial


def test_check_videos(dataset):
    paths = [dataset["short"], dataset["long"], dataset["vfr"], dataset["junk"]]
    infos, _ = probe_videos(paths, cache_path=None)
    messages = check_videos(infos, paths)
    assert len(messages) == 2
    assert dataset["long"] in messages[0] and "30 frames" in messages[0]
    assert dataset["vfr"] in messages[1] and "variable frame rate" in messages[1]
    assert all("python -m evl.prepare" in m for m in messages)
    # Segment sampling spreads 4 frames over the 60-frame video: it is decoded about whole
    # whatever its GOP, so only the frame-rate warning; 2 frames from it gain from short GOPs.
    assert check_videos(infos, paths, "segment", num_frames=4) == messages[1:]
    assert check_videos(infos, paths, "segment", num_frames=2) == messages


def _index_fields(index):
    """Every field of a frame index, arrays as lists."""
    return {f.name: (v.tolist() if isinstance(v := getattr(index, f.name), np.ndarray) else v)
            for f in dataclasses.fields(index)}


def test_readers_take_frame_indexes_from_the_probe_cache(dataset, tmp_path, monkeypatch):
    """After probing, a reader (a DataLoader worker) gets a file's frame index from the frames
    file beside the cache instead of demuxing the video again; a changed file, or a lost frames
    file, falls back to demuxing."""
    import shutil

    files = {name: shutil.copy(dataset[name], tmp_path / os.path.basename(dataset[name]))
             for name in ("short", "vp9", "vfr")}
    paths = [str(p) for p in files.values()]
    want = {p: _index_fields(frame_indexes._build_index(os.path.abspath(p))) for p in paths}
    # The mp4's packets are read in place: where they are, and the decoder's set-up, come along.
    assert [want[p]["offset"] is not None for p in paths] == [True, False, False]
    assert want[paths[0]]["extradata"] and want[paths[0]]["color_range"] is not None
    frames = {p: pyav.read_frames(p, [0, 5, 3]) for p in paths}
    cache = str(tmp_path / "list.txt.probe.json")
    probe_videos(paths, cache_path=cache)

    built = []
    build = frame_indexes._build_index
    monkeypatch.setattr(frame_indexes, "_build_index", lambda p: built.append(p) or build(p))
    frame_indexes._cached_index.cache_clear()  # a fresh worker
    for p in paths:
        assert _index_fields(frame_indexes.frame_index(p)) == want[p]
        assert (pyav.read_frames(p, [0, 5, 3]) == frames[p]).all()
    assert built == []

    # A file changed since the probe: its shared index is stale and is not used.
    write_video(paths[0], 30, gop=10)
    frame_indexes._cached_index.cache_clear()
    assert frame_indexes.frame_index(paths[0]).num_frames == 30 and built == [os.path.abspath(paths[0])]

    # Re-probing rewrites the frames file (with the changed file) and removes the old one.
    old = [n for n in os.listdir(tmp_path) if ".frames-" in n]
    probe_videos(paths, cache_path=cache)
    new = [n for n in os.listdir(tmp_path) if ".frames-" in n]
    assert len(new) == 1 and new != old
    frame_indexes._cached_index.cache_clear()
    built.clear()
    assert [frame_indexes.frame_index(p).num_frames for p in paths] == [30, 30, 20] and built == []

    # The frames file lost: readers demux, as without a cache.
    os.remove(tmp_path / new[0])
    frame_indexes._frames_files.clear()
    frame_indexes._cached_index.cache_clear()
    assert _index_fields(frame_indexes.frame_index(paths[1])) == want[paths[1]] and len(built) == 1


@pytest.mark.parametrize("fails", ["frames_rows", "cache_json"])
def test_full_disk_keeps_the_old_cache_and_the_results(dataset, tmp_path, monkeypatch, fails):
    """The probe cache is an optimisation: a full disk while writing it is a warning, the probe's
    results are still returned, the old cache stays as it was, and no reader gets a frame index
    from rows that were never written."""
    import errno
    import shutil

    paths = [str(shutil.copy(dataset[n], tmp_path / os.path.basename(dataset[n]))) for n in ("short", "vp9")]
    cache = str(tmp_path / "list.txt.probe.json")
    probe_videos(paths, cache_path=cache)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if n.startswith("list.txt.probe")}
    write_video(paths[0], 30, gop=10)  # changed: it must be probed again

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fails == "frames_rows":
        init = probe._FramesWriter.__init__

        def init_then_full(self, *a):
            init(self, *a)
            self.file.write = no_space
        monkeypatch.setattr(probe._FramesWriter, "__init__", init_then_full)
    else:
        monkeypatch.setattr(probe, "_save_cache", no_space)
    with pytest.warns(UserWarning, match="could not write the probe cache .*No space left on device"):
        infos, failures = probe_videos(paths, cache_path=cache)
    assert [i.num_frames for i in infos] == [30, 30] and failures == []
    after = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path) if n.startswith("list.txt.probe")}
    assert after == before and not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    frame_indexes._cached_index.cache_clear()  # a fresh worker: the changed file is read as it is now
    assert frame_indexes.frame_index(paths[0]).num_frames == 30
    assert (pyav.read_frames(paths[0], [29, 0]) == pyav.read_frames(paths[0], [0, 29])[::-1]).all()


def test_a_cache_of_another_version_leaves_no_frames_file_behind(dataset, tmp_path):
    """A probe cache written by another version of the code is probed again, and the frames file
    it named is deleted with it (on Kinetics-400 it is a few gigabytes)."""
    import json

    from pipelines import probe

    cache = tmp_path / "probe.json"
    probe_videos([dataset["short"]], cache_path=str(cache))
    data = json.loads(cache.read_text())
    old = data["frames_file"]
    cache.write_text(json.dumps({**data, "version": probe.CACHE_VERSION - 1}))
    infos, _ = probe_videos([dataset["short"]], cache_path=str(cache))
    assert infos[0].num_frames == 48
    frames = sorted(n for n in os.listdir(tmp_path) if ".frames-" in n)
    assert len(frames) == 1 and frames[0] != old and json.loads(cache.read_text())["frames_file"] == frames[0]
