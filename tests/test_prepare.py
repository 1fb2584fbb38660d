"""python -m evl.prepare (and scripts/prepare_videos.py): re-encoding for fast random access."""

import os
import subprocess
import sys

import av
import numpy as np
import pytest

from evl.prepare import main as prepare_main
from evl.prepare import output_size
from pipelines.lists import read_list
from pipelines.probe import probe_video

from videos import decode_all, frame_number, write_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def sources(tmp_path):
    """Long GOPs with B-frames, VP9 portrait in a subdirectory, a variable frame rate, audio."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    write_video(str(src / "a.mp4"), 40, size=(192, 128), gop=40, bframes=2, audio=True)
    write_video(str(src / "sub" / "b.webm"), 20, codec="libvpx-vp9", size=(128, 192), gop=20)
    vfr = [0, 1, 2, 4, 5, 7, 8, 9, 10, 12, 13, 14, 15, 16, 18, 19]
    write_video(str(src / "c.mkv"), len(vfr), size=(192, 128), gop=8, pts=vfr)
    lst = src / "list.txt"
    lst.write_text("a.mp4 0\nsub/b.webm 1\nc.mkv 2\na.mp4 3 0.5 1.25\n")
    return src


def run(capsys, *argv):
    rc = prepare_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_output_size_keeps_aspect_with_even_sides():
    assert output_size(1920, 1080, 320) == (568, 320)
    assert output_size(1080, 1920, 320) == (320, 568)
    assert output_size(341, 256, 320) == (426, 320)
    assert output_size(100, 100, 64) == (64, 64)


def test_reencodes_with_short_gops_and_the_same_frames(sources, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = run(capsys, "--list", sources / "list.txt", "--data_root", sources, "--output", out,
                        "--short_side", "64", "--workers", "1")
    assert rc == 0 and "3 re-encoded, 0 already done, 0 failed; 4 of 4 list lines" in stdout
    for src, dst, size in (("a.mp4", "a.mp4", (96, 64)), ("sub/b.webm", "sub/b.mp4", (64, 96)),
                           ("c.mkv", "c.mp4", (96, 64))):
        info, before = probe_video(str(out / dst)), probe_video(str(sources / src))
        assert (info.width, info.height) == size and info.codec == "h264"
        assert info.max_keyframe_interval <= 15 and not info.variable_frame_rate
        _, frames = decode_all(str(sources / src))
        assert info.num_frames == len(frames) == before.num_frames
        assert info.fps == pytest.approx(before.fps, rel=1e-3)  # the source's average rate, VFR included
        _, new = decode_all(str(out / dst))
        assert [frame_number(f) for f in new] == list(range(len(frames)))  # same frames, same order
        with av.open(str(out / dst)) as c:
            assert [s.type for s in c.streams] == ["video"]  # audio dropped
            assert c.streams.video[0].codec_context.pix_fmt == "yuv420p"
    records = read_list(str(out / "list.txt"), data_root=str(out))
    assert [(os.path.relpath(r.path, out), r.label, r.start_sec, r.end_sec) for r in records] == [
        ("a.mp4", 0, None, None), ("sub/b.mp4", 1, None, None), ("c.mp4", 2, None, None), ("a.mp4", 3, 0.5, 1.25)]


def test_resumes_and_reports_failures(sources, tmp_path, capsys):
    (sources / "bad.mp4").write_bytes(b"not a video" * 50)
    with open(sources / "list.txt", "a") as f:
        f.write("bad.mp4 1\nmissing.mp4 2\n")
    out = tmp_path / "out"
    flags = ("--list", sources / "list.txt", "--data_root", sources, "--output", out, "--short_side", "32",
             "--output_list", tmp_path / "lists" / "new.txt")
    rc, stdout, err = run(capsys, *flags, "--workers", "2")  # a spawned process pool
    assert rc == 1 and "3 re-encoded, 0 already done, 2 failed; 4 of 6 list lines" in stdout
    assert f"{sources}/bad.mp4: " in err and f"{sources}/missing.mp4: " in err
    assert [os.path.basename(r.path) for r in read_list(str(tmp_path / "lists" / "new.txt"), data_root=str(out))] \
        == ["a.mp4", "b.mp4", "c.mp4", "a.mp4"]
    assert sorted(p.name for p in out.rglob("*")) == ["a.mp4", "b.mp4", "c.mp4", "sub"]  # no temporary files left

    mtimes = {p: os.stat(p).st_mtime_ns for p in out.rglob("*.mp4")}
    os.remove(out / "c.mp4")
    (out / ".c.mp4.partial.mp4").write_bytes(b"left over by a crash")
    rc, stdout, _ = run(capsys, *flags, "--workers", "1")
    assert rc == 1 and "1 re-encoded, 2 already done, 2 failed" in stdout
    assert {p: os.stat(p).st_mtime_ns for p in out.rglob("*.mp4") if p.name != "c.mp4"} == \
        {p: t for p, t in mtimes.items() if p.name != "c.mp4"}
    assert probe_video(str(out / "c.mp4")).num_frames == 16 and not (out / ".c.mp4.partial.mp4").exists()


def test_full_disk_stops_with_one_message_and_a_list_of_what_is_there(sources, tmp_path, monkeypatch, capsys):
    """A full disk is not a bad video: the run stops at the first ENOSPC (instead of failing
    every remaining video), says so once, lists only the videos that were written, and a
    rerun continues."""
    import errno

    import evl.prepare as prep

    encode, calls = prep.encode_video, []

    def disk_fills_up(job):
        calls.append(job.source)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", job.target)
        return encode(job)

    monkeypatch.setattr(prep, "encode_video", disk_fills_up)
    out = tmp_path / "out"
    flags = ("--list", sources / "list.txt", "--data_root", sources, "--output", out, "--short_side", "32",
             "--workers", "1")
    rc, stdout, err = run(capsys, *flags)
    assert rc == 1 and len(calls) == 2  # the third video was not tried
    assert "1 re-encoded, 0 already done, 0 failed; " in stdout
    assert f"error: the disk of {out} is full" in err and "stopped with 2 video(s) left" in err
    assert "video(s) failed" not in err
    listed = [os.path.basename(r.path) for r in read_list(str(out / "list.txt"), data_root=str(out))]
    assert listed == ["a.mp4", "a.mp4"]  # a.mp4 and its segment line: what is on disk
    monkeypatch.setattr(prep, "encode_video", encode)
    rc, stdout, _ = run(capsys, *flags)
    assert rc == 0 and "2 re-encoded, 1 already done, 0 failed; 4 of 4 list lines" in stdout


def test_never_overwrites_sources(sources, tmp_path, monkeypatch, capsys):
    before = {p: p.read_bytes() for p in sources.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match="is the input directory"):
        prepare_main(["--list", str(sources / "list.txt"), "--data_root", str(sources), "--output", str(sources)])
    with pytest.raises(SystemExit, match="would overwrite .*list.txt"):
        prepare_main(["--list", str(sources / "list.txt"), "--data_root", str(sources / "sub"),
                      "--output", str(sources)])
    # Paths relative to the working directory (no --data_root) that would land on themselves.
    other = tmp_path / "lists"
    other.mkdir()
    (other / "list.txt").write_text("a.mp4 0\n")
    monkeypatch.chdir(sources)
    with pytest.raises(SystemExit, match=f"refusing to overwrite source video a.mp4 .*{sources}/a.mp4"):
        prepare_main(["--list", str(other / "list.txt"), "--output", str(sources)])
    assert {p: p.read_bytes() for p in sources.rglob("*") if p.is_file()} == before


def test_script_wrapper(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "prepare_videos.py"), "--help"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "--short_side" in proc.stdout


def test_frame_content_survives_resizing(sources, tmp_path, capsys):
    out = tmp_path / "out"
    (sources / "one.txt").write_text("a.mp4 0\n")
    assert run(capsys, "--list", sources / "one.txt", "--data_root", sources, "--output", out, "--short_side", "128",
               "--workers", "1")[0] == 0
    _, src = decode_all(str(sources / "a.mp4"))
    _, dst = decode_all(str(out / "a.mp4"))
    assert dst.shape == src.shape  # 128 is the source's short side: only re-encoded
    assert np.abs(dst.astype(int) - src.astype(int)).mean() < 3
