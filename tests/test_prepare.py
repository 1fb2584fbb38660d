"""python -m evl.prepare (and scripts/prepare_videos.py): re-encoding for fast random access."""

import contextlib
import multiprocessing
import os
import subprocess
import sys

import av
import numpy as np
import pytest

from evl.prepare import main as prepare_main
from evl.prepare import Share, output_size, resolve_share
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


def x264_settings(path) -> bytes:
    """The settings x264 writes into its stream (an SEI of the first frame)."""
    data = open(path, "rb").read()
    start = data.index(b"x264 - core")
    return data[start:data.index(b"\x00", start)]


def test_encodes_for_fast_decoding_unless_told_otherwise(sources, tmp_path, capsys):
    """The default --tune fastdecode: no CABAC, no deblocking, no weighted prediction (what costs
    decoding time); --tune none keeps x264's defaults; an unknown tune is refused up front."""
    flags = ["--list", sources / "list.txt", "--data_root", sources, "--short_side", "64", "--workers", "1"]
    assert run(capsys, *flags, "--output", tmp_path / "fast")[0] == 0
    assert run(capsys, *flags, "--output", tmp_path / "plain", "--tune", "none")[0] == 0
    fast, plain = x264_settings(tmp_path / "fast" / "a.mp4"), x264_settings(tmp_path / "plain" / "a.mp4")
    assert b" cabac=0 " in fast and b" deblock=0:" in fast and b" weightp=0 " in fast
    assert b" cabac=1 " in plain and b" deblock=1:" in plain
    with pytest.raises(SystemExit, match="--tune must be none or x264 tunes"):
        prepare_main([str(a) for a in flags] + ["--output", str(tmp_path / "x"), "--tune", "fastest"])


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


# --- Shares on several machines ----------------------------------------------------------------

SHARE_ENV = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN",
             "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_COUNT")


@pytest.fixture(autouse=True)
def no_share_environment(monkeypatch):
    """Tests choose their share themselves, also when the suite runs inside a SLURM array or torchrun."""
    for name in SHARE_ENV:
        monkeypatch.delenv(name, raising=False)


def with_more_videos(sources):
    """Five distinct videos, a segment line of the first, and a file that cannot be decoded."""
    write_video(str(sources / "d.mp4"), 12, size=(128, 96), gop=12)
    write_video(str(sources / "sub" / "e.mp4"), 10, size=(96, 128), gop=10)
    (sources / "bad.mp4").write_bytes(b"not a video" * 50)
    with open(sources / "list.txt", "a") as f:
        f.write("d.mp4 1\nbad.mp4 2\nsub/e.mp4 0\n")
    return sources


def one_machine_list(sources, tmp_path, capsys):
    """The list of a one-machine run of the same list (exit status 1: bad.mp4)."""
    out = tmp_path / "one"
    rc, _, _ = run(capsys, "--list", sources / "list.txt", "--data_root", sources, "--output", out,
                   "--short_side", "32", "--workers", "1")
    assert rc == 1
    return (out / "list.txt").read_text()


def test_shares_one_after_another_make_the_one_machine_list(sources, tmp_path, capsys):
    with_more_videos(sources)
    expected = one_machine_list(sources, tmp_path, capsys)
    assert len(expected.splitlines()) == 6  # 7 lines less bad.mp4
    out = tmp_path / "shared"
    flags = ("--list", sources / "list.txt", "--data_root", sources, "--output", out, "--short_side", "32",
             "--workers", "1", "--num_shards", "3")
    # Distinct videos in list order: a, sub/b, c, d, bad, sub/e -> shares {a, d}, {b, bad}, {c, e}.
    rc, stdout, _ = run(capsys, *flags, "--shard_index", "2")
    assert rc == 0 and "share 2 of 3 (--shard_index 2 --num_shards 3): 2 of the list's 6 videos" in stdout
    assert "share(s) 0, 1 of 3 not done yet" in stdout and not (out / "list.txt").exists()
    assert sorted(p.name for p in out.rglob("*.mp4")) == ["c.mp4", "e.mp4"]
    rc, stdout, err = run(capsys, *flags, "--shard_index", "1")
    assert rc == 1 and "bad.mp4: " in err and "share(s) 0 of 3 not done yet" in stdout
    rc, stdout, _ = run(capsys, *flags, "--shard_index", "0")
    assert rc == 0 and "all 3 shares done: 6 of 7 list lines" in stdout
    assert (out / "list.txt").read_text() == expected  # same lines, same order
    for r in read_list(str(out / "list.txt"), data_root=str(out)):
        assert probe_video(r.path).num_frames > 0

    # A rerun of a share redoes nothing and writes the same list again.
    mtimes = {p: os.stat(p).st_mtime_ns for p in out.rglob("*.mp4")}
    os.remove(out / "list.txt")
    rc, stdout, _ = run(capsys, *flags, "--shard_index", "2")
    assert rc == 0 and "0 re-encoded, 2 already done, 0 failed" in stdout
    assert (out / "list.txt").read_text() == expected
    assert {p: os.stat(p).st_mtime_ns for p in out.rglob("*.mp4")} == mtimes


def _share_process(argv, env, log):
    os.environ.update(env)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        sys.exit(prepare_main(argv))


def shares_in_processes(sources, out, envs, *flags):
    """Runs evl.prepare in one process per environment, all at the same time: (exit status, output) each.

    Forked from this process, which has imported everything already: a fresh interpreter per share
    would spend its time importing torch."""
    ctx = multiprocessing.get_context("fork")
    argv = ["--list", str(sources / "list.txt"), "--data_root", str(sources), "--output", str(out),
            "--short_side", "32", "--workers", "1", *flags]
    logs = [str(out) + f".{k}.log" for k in range(len(envs))]
    procs = [ctx.Process(target=_share_process, args=(argv, env, log)) for env, log in zip(envs, logs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    return [(p.exitcode, open(log).read()) for p, log in zip(procs, logs)]


def test_shares_of_a_slurm_array_in_parallel(sources, tmp_path, capsys):
    with_more_videos(sources)
    expected = one_machine_list(sources, tmp_path, capsys)
    out = tmp_path / "shared"
    # --array=4-8:2: task ids 4, 6, 8.
    array = {"SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "8", "SLURM_ARRAY_TASK_STEP": "2",
             "SLURM_ARRAY_TASK_COUNT": "3"}
    results = shares_in_processes(sources, out, [{**array, "SLURM_ARRAY_TASK_ID": str(t)} for t in (4, 6, 8)])
    assert [rc for rc, _ in results] == [0, 1, 0]  # share 1 has bad.mp4
    assert [f"share {i} of 3 (SLURM_ARRAY_TASK_ID={t} of SLURM_ARRAY_TASK_COUNT=3 from SLURM_ARRAY_TASK_MIN=4 in "
            f"steps of 2)" in log for i, (t, (_, log)) in enumerate(zip((4, 6, 8), results))] == [True] * 3
    assert sum("all 3 shares done: 6 of 7 list lines" in log for _, log in results) >= 1
    assert (out / "list.txt").read_text() == expected
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary files
    for r in read_list(str(out / "list.txt"), data_root=str(out)):
        assert probe_video(r.path).num_frames > 0


def test_torchrun_shares_and_flags_over_the_environment(sources, tmp_path, monkeypatch, capsys):
    expected = one_machine_list(with_more_videos(sources), tmp_path, capsys)
    out = tmp_path / "shared"
    flags = ("--list", sources / "list.txt", "--data_root", sources, "--output", out, "--short_side", "32",
             "--workers", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        rc, stdout, _ = run(capsys, *flags)
        assert f"share {rank} of 2 (RANK={rank} of WORLD_SIZE=2): 3 of the list's 6 videos" in stdout
    assert "all 2 shares done" in stdout and (out / "list.txt").read_text() == expected
    # Flags win: in a SLURM array, --num_shards 1 prepares the whole list in one run.
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    rc, stdout, _ = run(capsys, "--list", sources / "list.txt", "--data_root", sources, "--output", tmp_path / "whole",
                        "--short_side", "32", "--workers", "1", "--num_shards", "1")
    assert stdout.startswith("prepare: 5 re-encoded") and (tmp_path / "whole" / "list.txt").read_text() == expected


def test_resolve_share():
    assert resolve_share(None, None, {}) == Share(0, 1, "")
    assert resolve_share(2, 3, {"RANK": "0", "WORLD_SIZE": "8"}).index == 2  # the flags win
    assert resolve_share(None, 1, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}).count == 1
    slurm = {"SLURM_ARRAY_TASK_ID": "13", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_MAX": "19",
             "SLURM_ARRAY_TASK_COUNT": "10"}
    share = lambda environ: (lambda s: (s.index, s.count))(resolve_share(None, None, environ))  # noqa: E731
    assert share(slurm) == (3, 10)
    assert share({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "8"}) == (7, 8)
    assert share({**slurm, "SLURM_ARRAY_TASK_ID": "16", "SLURM_ARRAY_TASK_STEP": "3", "SLURM_ARRAY_TASK_MAX": "16",
                  "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 3)  # --array=10-16:3
    # torchrun inside an array task: the task's share is cut among its processes.
    assert share({**slurm, "RANK": "1", "WORLD_SIZE": "2"}) == (7, 20)
    assert share({"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)


@pytest.mark.parametrize("flags, environ, message", [
    ((3, 3), {}, r"--shard_index 3 is not in \[0, 3\)"),
    ((-1, 2), {}, r"--shard_index -1 is not in \[0, 2\)"),
    ((1, None), {}, "--shard_index needs --num_shards"),
    ((None, 4), {}, r"--num_shards 4 needs --shard_index \(0 to 3\)"),
    ((0, 0), {}, "--num_shards must be at least 1"),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9",
                    "SLURM_ARRAY_TASK_COUNT": "3"},
     r"the SLURM array.s task ids are not MIN, MIN \+ STEP.*--array=1,5,9"),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3"},
     "SLURM_ARRAY_TASK_ID=3 is not one of the array's task ids, 0 to 2 in steps of 1"),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"},
     "SLURM_ARRAY_TASK_ID='x' in the environment is not an integer"),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT is not set"),
    ((None, None), {"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 is not in \[0, WORLD_SIZE=2\)"),
    ((None, None), {"WORLD_SIZE": "2"}, "RANK is not set"),
])
def test_share_settings_that_name_no_share_are_refused(sources, tmp_path, monkeypatch, flags, environ, message):
    with pytest.raises(ValueError, match=message):
        resolve_share(*flags, environ)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    argv = ["--list", str(sources / "list.txt"), "--data_root", str(sources), "--output", str(tmp_path / "out")]
    argv += [x for flag, v in zip(("--shard_index", "--num_shards"), flags) if v is not None for x in (flag, str(v))]
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        prepare_main(argv)
    assert not (tmp_path / "out").exists()


def test_shares_of_another_run_are_not_mixed(sources, tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--list", str(sources / "list.txt"), "--data_root", str(sources), "--output", str(out),
             "--short_side", "32", "--workers", "1"]
    assert run(capsys, *flags, "--shard_index", "0", "--num_shards", "2")[0] == 0
    state = out / ".list.txt.shards"
    claims = sorted(p.name for p in state.iterdir())
    assert claims == ["share-00000-of-00002.json", "share-00000-of-00002.lock", "share-00000-of-00002.txt"]
    with pytest.raises(SystemExit, match=f"{state} holds the shares of another run \\(share-00000-of-00002.json: "
                                         "--num_shards 2 there, 3 here\\).*delete"):
        prepare_main([*flags, "--shard_index", "1", "--num_shards", "3"])
    with pytest.raises(SystemExit, match="--short_side 32 there, 64 here"):
        prepare_main([*flags[:-4], "--short_side", "64", "--workers", "1", "--shard_index", "1", "--num_shards", "2"])
    with pytest.raises(SystemExit, match="--tune fastdecode there, none here"):
        prepare_main([*flags, "--tune", "none", "--shard_index", "1", "--num_shards", "2"])
    with pytest.raises(SystemExit, match=f"{state} holds the shares of a run in 2 shares: .*--num_shards"):
        prepare_main(flags)  # the whole list in one run
    (sources / "list.txt").write_text("c.mkv 2\na.mp4 0\n")
    with pytest.raises(SystemExit, match="share-00000-of-00002.json: another list file"):
        prepare_main([*flags, "--shard_index", "1", "--num_shards", "2"])
    assert sorted(p.name for p in state.iterdir()) == claims  # the refused runs left no claim
    assert not (out / "list.txt").exists()


def test_a_claim_from_before_the_tune_flag_is_read_as_no_tune(sources, tmp_path, capsys):
    """Shares started by a version without --tune encoded with x264's defaults: their claims
    (no "tune") agree with --tune none and are refused with the default, saying which to use."""
    import json

    out = tmp_path / "out"
    flags = ["--list", str(sources / "list.txt"), "--data_root", str(sources), "--output", str(out),
             "--short_side", "32", "--workers", "1", "--num_shards", "2"]
    assert run(capsys, *flags, "--shard_index", "0", "--tune", "none")[0] == 0
    claim = out / ".list.txt.shards" / "share-00000-of-00002.json"
    old = json.loads(claim.read_text())
    del old["tune"]
    claim.write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="--tune none there, fastdecode here"):
        prepare_main([*flags, "--shard_index", "1"])
    assert run(capsys, *flags, "--shard_index", "1", "--tune", "none")[0] == 0
    assert len(read_list(str(out / "list.txt"), data_root=str(out))) == 4


def test_a_share_runs_once_at_a_time(sources, tmp_path):
    import fcntl

    out = tmp_path / "out"
    state = out / ".list.txt.shards"
    state.mkdir(parents=True)
    with open(state / "share-00001-of-00002.lock", "a+") as held:
        held.write("pid 123 on node7, since today\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match="share 1 of 2 is being prepared by pid 123 on node7"):
            prepare_main(["--list", str(sources / "list.txt"), "--data_root", str(sources), "--output", str(out),
                          "--shard_index", "1", "--num_shards", "2"])
    assert not list(out.rglob("*.mp4"))


def test_the_last_writer_of_the_list_has_seen_every_part(tmp_path, monkeypatch):
    """Two shares end together: one reads the parts, the other writes its new part and the list,
    then the first writes its list over it. Reading the parts again after writing catches that."""
    import evl.prepare as prep
    from pipelines.lists import VideoRecord

    out, state = str(tmp_path / "out"), str(tmp_path / "state")
    records = [VideoRecord(f"/src/{n}.mp4", 0) for n in "abcd"]
    targets = {r.path: os.path.join(out, os.path.basename(r.path)) for r in records}
    owner = {r.path: k % 2 for k, r in enumerate(records)}
    write = prep.write_list
    part = lambda i, names: write(prep._part_path(state, i, 2),  # noqa: E731
                                            [VideoRecord(targets[f"/src/{n}.mp4"], 0) for n in names], data_root=out)
    part(0, "a")  # a first run of share 0, before c was done
    part(1, "bd")
    writes = []

    def meanwhile(path, kept, **kw):
        if not writes:
            part(0, "ac")  # share 0 ends its rerun between this share's reading and writing
        writes.append([os.path.basename(r.path) for r in kept])
        write(path, kept, **kw)

    monkeypatch.setattr(prep, "write_list", meanwhile)
    kept, waiting = prep.combine_parts(records, targets, owner, state, 2, str(tmp_path / "list.txt"), out)
    assert waiting == [] and writes == [["a.mp4", "b.mp4", "d.mp4"], ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]]
    assert [os.path.basename(r.path) for r in read_list(str(tmp_path / "list.txt"), check_files=False)] == \
        ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
    os.remove(prep._part_path(state, 1, 2))
    assert prep.combine_parts(records, targets, owner, state, 2, str(tmp_path / "x.txt"), out) == (None, [1])
