"""python -m evl.extract: feature files and their index, resuming, unreadable videos."""

import json
import os

import numpy as np
import pytest
import torch

from evl.extract import main as extract_main
from evl.inference import load_predictor
from evl.train import main as train_main

from conftest import build_tiny, train_argv


@pytest.fixture(scope="module")
def checkpoint(tiny_vit, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("extract-run")
    train_main(train_argv(tiny_vit, demo_data, out, "--num_steps", "2", "--save_freq", "2", "--val_list_path", ""))
    return str(out / "checkpoint-2.pth")


def write_list(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


def run(capsys, *argv):
    rc = extract_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_features_index_resume_and_unreadable_videos(checkpoint, tiny_vit, demo_data, tmp_path, capsys,
                                                     monkeypatch):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    lst = write_list(tmp_path / "list.txt", [
        f"{demo_data.root}/videos/val/00000.mp4 0", f"{demo_data.root}/videos/val/00001.mp4 1",
        f"{videos}/corrupt.mp4 2", f"{demo_data.root}/videos/val/00002.mp4 2 0.0 0.2",  # a segment: frames 0-4
        f"{videos}/missing.mp4 3", f"{demo_data.root}/videos/val/00003.mp4 3"])
    out = tmp_path / "features"
    flags = ("--list", lst, "--checkpoint", checkpoint, "--output", out, "--batch_size", "3", "--num_workers", "0")
    import pipelines.probe

    probes = []
    probe_videos = pipelines.probe.probe_videos
    monkeypatch.setattr(pipelines.probe, "probe_videos", lambda *a, **k: probes.append(a[0]) or probe_videos(*a, **k))
    rc, stdout, err = run(capsys, *flags, "--cls", "--num_workers", "2")
    assert rc == 1
    assert len(probes) == 1 and len(probes[0]) == 6  # the list is probed once, for the share and the pipeline
    assert "4 extracted, 0 already done, 2 unreadable; 4 of 6 videos" in stdout
    assert "2 unreadable video(s):" in err and f"{videos}/corrupt.mp4: " in err
    assert f"{videos}/missing.mp4: " in err

    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [e["line"] for e in index] == [1, 2, 4, 6] and [e["label"] for e in index] == [0, 1, 2, 3]
    assert index[2]["start_sec"] == 0.0 and index[2]["end_sec"] == 0.2 and "start_sec" not in index[0]
    emb = {e["line"]: np.load(out / e["embedding"]) for e in index}
    cls = {e["line"]: np.load(out / e["cls"]) for e in index}
    assert all(a.shape == (64,) and a.dtype == np.float32 for a in emb.values())
    assert all(a.shape == (4, 64) and a.dtype == np.float32 for a in cls.values())  # [T, C], T = 4 frames

    # The embedding is the mean over the 2 evaluation views; CLS tokens are the first view's.
    predictor = load_predictor(checkpoint)
    # Trained on a random backbone: the predictor rebuilds the one training drew from its seed.
    drawn = build_tiny(tiny_vit, seed=0, num_classes=4, num_frames=4).backbone.visual.state_dict()
    assert all(torch.equal(v, drawn[k]) for k, v in predictor.model.backbone.visual.state_dict().items())
    views = predictor.reader(index[1]["path"])
    ref = predictor.run(views, want_cls=True)
    np.testing.assert_allclose(emb[2], ref["embedding"].mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(cls[2], ref["cls"][0].numpy(), atol=1e-5)
    segment = predictor.run(predictor.reader(index[2]["path"], 0, 5))["embedding"].mean(0)
    np.testing.assert_allclose(emb[4], segment.numpy(), atol=1e-5)
    assert not np.allclose(emb[1], emb[2])

    # Resuming skips complete videos: nothing is rewritten, a deleted file is redone.
    mtimes = {p: os.stat(p).st_mtime_ns for p in out.rglob("*.npy")}
    rc, stdout, _ = run(capsys, *flags, "--cls")
    assert rc == 1 and "0 extracted, 4 already done, 2 unreadable" in stdout
    redone = out / index[0]["embedding"]
    os.remove(redone)
    rc, stdout, _ = run(capsys, *flags)
    assert "1 extracted, 3 already done" in stdout
    assert {p: os.stat(p).st_mtime_ns for p in out.rglob("*.npy") if p != redone} == \
        {p: t for p, t in mtimes.items() if p != redone}
    np.testing.assert_allclose(np.load(redone), emb[1], atol=1e-5)  # another batch: rounding differs
    assert not [p for p in (out / "features").iterdir() if p.name.startswith(".tmp")]

    # Features of another checkpoint never mix with these.
    other = tmp_path / "other.pth"
    ck = torch.load(checkpoint, weights_only=True)
    ck["model"]["proj.2.bias"] += 1
    torch.save(ck, str(other))
    with pytest.raises(SystemExit, match="holds features of another extraction.*checkpoint_sha256"):
        extract_main(["--list", lst, "--checkpoint", str(other), "--output", str(out)])


def test_bad_list_or_checkpoint_fail_before_any_work(checkpoint, tmp_path):
    bad = write_list(tmp_path / "bad.txt", ["a.mp4 zero"])
    with pytest.raises(SystemExit, match=r"bad.txt:1: label 'zero' is not an integer"):
        extract_main(["--list", bad, "--checkpoint", checkpoint, "--output", str(tmp_path / "o")])
    ok = write_list(tmp_path / "ok.txt", ["a.mp4 0"])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        extract_main(["--list", ok, "--checkpoint", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_extract_under_torchrun_shares_the_videos(checkpoint, demo_data, tmp_path, capsys):
    """Two processes extract every other remaining video each; rank 0 writes one index and
    reports every process's unreadable videos; the features equal one process's."""
    import launch

    lst = write_list(tmp_path / "list.txt", [f"{demo_data.root}/videos/val/{i:05d}.mp4 {i % 4}" for i in range(5)]
                     + [f"{tmp_path}/missing.mp4 1"])
    flags = ["--list", lst, "--checkpoint", checkpoint, "--batch_size", "2", "--num_workers", "0", "--device", "cpu"]
    rc, _, _ = run(capsys, *flags, "--output", tmp_path / "one")
    assert rc == 1
    codes, out, err = launch.run_ranks("evl.extract", [*flags, "--output", tmp_path / "two"], tmp_path / "logs")
    assert codes == [1, 1], out + err  # a video is unreadable: both processes exit 1
    assert "5 extracted, 0 already done, 1 unreadable; 5 of 6 videos" in out
    assert err.count(f"{tmp_path}/missing.mp4: ") == 1
    one = (tmp_path / "one" / "index.jsonl").read_text()
    assert (tmp_path / "two" / "index.jsonl").read_text() == one
    for entry in map(json.loads, one.splitlines()):
        np.testing.assert_allclose(np.load(tmp_path / "two" / entry["embedding"]),
                                   np.load(tmp_path / "one" / entry["embedding"]), atol=1e-5)
