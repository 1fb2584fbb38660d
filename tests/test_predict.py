"""python -m evl.predict: evaluation-exact predictions, windows, reference checkpoints, bad input."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from evl.checkpoint import load_checkpoint
from evl.eval import main as eval_main
from evl.inference import load_predictor
from evl.predict import main as predict_main
from evl.predict import predict_video, sliding_windows
from evl.train import main as train_main
from evl.weights import safe_load, to_reference_state_dict

from conftest import TINY_VIT, build_tiny, train_argv
from videos import write_video


def save_clip_weights(path, backbone, seed):
    """A CLIP weights file (visual-only state dict) for a random tower of ``backbone``."""
    torch.save(build_tiny(backbone, seed=seed).backbone.visual.state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def trained(tiny_vit, demo_data, tmp_path_factory):
    """A 2-step checkpoint of the real trainer, on CLIP weights from a file."""
    d = tmp_path_factory.mktemp("predict")
    weights = save_clip_weights(d / "tiny-clip.pt", tiny_vit, seed=1)
    train_main(train_argv(tiny_vit, demo_data, d / "run", "--num_steps", "2", "--save_freq", "2",
                          "--val_list_path", "", "--backbone_path", weights))
    return SimpleNamespace(ckpt=str(d / "run" / "checkpoint-2.pth"), weights=weights, dir=d)


def val_paths(demo, n=None):
    with open(demo.val_list) as f:
        return [f"{demo.root}/{line.split()[0]}" for line in f][:n]


def run(capsys, *argv):
    rc = predict_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def json_lines(out):
    return [json.loads(line) for line in out.splitlines()]


def test_predictions_equal_multi_view_evaluation(trained, tiny_vit, demo_data, tmp_path, capsys):
    pred, val = tmp_path / "eval.jsonl", tmp_path / "val.txt"
    with open(demo_data.val_list) as f:
        val.write_text("".join(f.readlines()[:6]))
    eval_main(train_argv(tiny_vit, demo_data, tmp_path / "ev", "--checkpoint", trained.ckpt, "--backbone_path",
                         trained.weights, "--val_list_path", str(val), "--predictions_path", str(pred)))
    evaluated = {r["path"]: r for r in map(json.loads, pred.read_text().splitlines())}
    capsys.readouterr()
    paths = val_paths(demo_data, 6)
    assert sorted(evaluated) == sorted(paths)
    rc, out, _ = run(capsys, *paths, "--checkpoint", trained.ckpt, "--class_names", demo_data.class_names_path,
                     "--json", "--topk", "3")
    assert rc == 0
    recs = json_lines(out)
    assert [r["path"] for r in recs] == paths
    for r in recs:
        ref = evaluated[r["path"]]
        assert r["num_views"] == 2  # the checkpoint's 1 spatial x 2 temporal views
        assert [t["class"] for t in r["topk"]] == ref["top5"][:3]
        assert [t["prob"] for t in r["topk"]] == pytest.approx(ref["top5_prob"][:3], abs=1e-5)
        assert [t["name"] for t in r["topk"]] == [demo_data.class_names[k] for k in ref["top5"][:3]]

    rc, out, _ = run(capsys, paths[0], "--checkpoint", trained.ckpt, "--class_names", demo_data.class_names_path)
    assert rc == 0 and out.startswith(f"{paths[0]} (2 views)\n")
    first = evaluated[paths[0]]
    top = f"  {first['top5_prob'][0]:.3f}  {demo_data.class_names[first['top5'][0]]}"
    assert out.splitlines()[1] == top and len(out.splitlines()) == 1 + 4


def test_sliding_windows():
    assert sliding_windows(4.0, 1.0, 0.75) == [(0, 1), (0.75, 1.75), (1.5, 2.5), (2.25, 3.25), (3, 4)]
    assert sliding_windows(3.5, 1.0, 1.0) == [(0, 1), (1, 2), (2, 3), (2.5, 3.5)]  # the tail gets a window
    assert sliding_windows(0.5, 1.0, 1.0) == [(0.0, 0.5)]  # shorter than a window: the whole video


def test_windows_on_a_long_video(trained, tmp_path, capsys):
    long_video = write_video(str(tmp_path / "long.mp4"), 60, size=(96, 64), fps=25)  # 2.4 s
    rc, out, _ = run(capsys, long_video, "--checkpoint", trained.ckpt, "--window_sec", "1", "--stride_sec", "0.75",
                     "--json")
    assert rc == 0
    (rec,) = json_lines(out)
    assert rec["duration_sec"] == pytest.approx(2.4)
    assert [(w["start"], w["end"]) for w in rec["windows"]] == [(0, 1), (0.75, 1.75), (1.4, 2.4)]
    assert all(0 < w["prob"] <= 1 and 0 <= w["class"] < 4 and w["name"] is None for w in rec["windows"])

    res = predict_video(load_predictor(trained.ckpt), long_video, window_sec=1, stride_sec=0.75)
    stacked = torch.stack([w["probs"] for w in res["windows"]])
    torch.testing.assert_close(res["probs"], stacked.mean(0))  # the whole video: mean of its windows
    assert [int(w["probs"].argmax()) for w in res["windows"]] == [w["class"] for w in rec["windows"]]
    window_probs = [float(w["probs"].max()) for w in res["windows"]]
    assert [w["prob"] for w in rec["windows"]] == pytest.approx(window_probs, abs=1e-6)
    assert rec["topk"][0]["prob"] == pytest.approx(float(res["probs"].max()), abs=1e-6)

    rc, out, _ = run(capsys, long_video, "--checkpoint", trained.ckpt, "--window_sec", "2")
    lines = out.splitlines()
    assert rc == 0 and lines[0] == f"{long_video} (2.40 s, 2 windows, 2 views each)"
    assert lines[1].split()[:4] == ["0.00", "-", "2.00", "s"] and lines[2].split()[:3] == ["0.40", "-", "2.40"]
    assert lines[3] == "  whole video (mean of the windows):" and len(lines) == 4 + 4


def test_plot_of_a_long_video(trained, tmp_path, monkeypatch, capsys):
    import evl.predict as predict
    from PIL import Image

    long_video = write_video(str(tmp_path / "long.mp4"), 60, size=(96, 64), fps=25)  # 2.4 s
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["walking", "running", "jumping", "sitting"]))
    drawn, results = [], []
    plot = predict.plot_timeline

    def plot_and_keep(result, *args, **kw):
        results.append(result)
        drawn.append(plot(result, *args, **kw))
        return drawn[-1]

    monkeypatch.setattr(predict, "plot_timeline", plot_and_keep)
    png = tmp_path / "plots" / "long.png"
    rc, out, err = run(capsys, long_video, "--checkpoint", trained.ckpt, "--class_names", names, "--window_sec", "0.5",
                       "--stride_sec", "0.25", "--topk", "4", "--json", "--plot", png)
    assert rc == 0 and f"timeline of {long_video} in {png}" in err
    (rec,) = json_lines(out)  # stdout stays JSON
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.size == drawn[0]["size"] == (1100, 450)
    # What was drawn is what was printed: every class (4 of 4), one point per window at its middle.
    (fig,) = drawn
    windows = rec["windows"]
    assert len(windows) == 9 and sorted(fig["classes"]) == [0, 1, 2, 3]
    assert fig["classes"] == [t["class"] for t in rec["topk"]]  # in the order of the whole video's top-k
    class_names = json.loads(names.read_text())
    assert [line["label"].split(":")[0] for line in fig["lines"]] == [class_names[k] for k in fig["classes"]]
    for line in fig["lines"]:
        assert line["times"] == pytest.approx([(w["start"] + w["end"]) / 2 for w in windows], abs=1e-3)
    for j, w in enumerate(windows):
        at_j = {k: line["probs"][j] for k, line in zip(fig["classes"], fig["lines"])}
        assert at_j[w["class"]] == pytest.approx(w["prob"], abs=1e-6) and max(at_j.values()) == at_j[w["class"]]
        assert sum(at_j.values()) == pytest.approx(1, abs=1e-5)
    overall = {t["class"]: t["prob"] for t in rec["topk"]}
    assert [float(line["label"].rsplit(": ", 1)[1]) for line in fig["lines"]] == \
        pytest.approx([overall[k] for k in fig["classes"]], abs=0.005)

    # Fewer lines: the classes on top of some window first, then the most probable over the video.
    (res,) = results
    two = plot(res, str(tmp_path / "two.png"), None, num_classes=2)
    leads = {int(w["probs"].argmax()) for w in res["windows"]}
    others = sorted(set(range(4)) - leads, key=lambda k: -float(res["probs"][k]))
    assert len(leads) < 2 and set(two["classes"]) == leads | {others[0]}
    assert two["classes"] == sorted(two["classes"], key=lambda k: -float(res["probs"][k]))  # legend order
    assert [line["label"].split(":")[0] for line in two["lines"]] == [f"class {k}" for k in two["classes"]]
    assert [line["probs"] for line in two["lines"]] == \
        [pytest.approx([float(w["probs"][k]) for w in res["windows"]]) for k in two["classes"]]

    with pytest.raises(SystemExit, match="^error: --plot draws a timeline of windows: it needs --window_sec$"):
        predict_main([long_video, "--checkpoint", trained.ckpt, "--plot", str(png)])
    with pytest.raises(SystemExit, match="^error: --plot draws one video, got 2"):
        predict_main([long_video, long_video, "--checkpoint", trained.ckpt, "--window_sec", "1", "--plot", str(png)])


def test_plot_shows_the_classes_on_top_of_some_window(tmp_path):
    """A long video, mostly class 0, with short stretches of 1 and 2 and a class 3 that is never on
    top but more probable overall than 1 or 2: all peaks near 1, so only who leads where tells."""
    from evl.predict import plot_timeline

    probs = torch.full((80, 4), 0.02)
    probs[:, 0], probs[:, 3] = 0.68, 0.28
    probs[10:12], probs[50:51] = torch.tensor([0.005, 0.99, 0.0, 0.005]), torch.tensor([0.005, 0.0, 0.99, 0.005])
    windows = [{"start": j * 0.5, "end": j * 0.5 + 1.0, "probs": p} for j, p in enumerate(probs)]
    result = {"path": "/videos/long.mp4", "probs": probs.mean(0), "duration_sec": 40.5, "windows": windows}
    png = tmp_path / "t.png"
    assert plot_timeline(result, str(png), ["a", "b", "c", "d"], num_classes=3)["classes"] == [0, 1, 2]
    drawn = plot_timeline(result, str(png), ["a", "b", "c", "d"], num_classes=5)
    assert drawn["classes"] == [0, 3, 1, 2]  # whole-video probability, highest first
    assert [line["label"] for line in drawn["lines"]] == ["a: 0.65", "d: 0.27", "b: 0.04", "c: 0.03"]
    assert [line["probs"] for line in drawn["lines"]] == [pytest.approx(probs[:, k].tolist()) for k in (0, 3, 1, 2)]
    assert drawn["lines"][0]["times"] == pytest.approx([j * 0.5 + 0.5 for j in range(80)])
    assert png.read_bytes().startswith(b"\x89PNG") and drawn["size"] == (1100, 450)


def test_reference_checkpoint_with_explicit_flags(trained, tiny_vit, demo_data, tmp_path, capsys):
    model = build_tiny(tiny_vit, num_classes=4, num_frames=4, backbone_path=trained.weights)
    load_checkpoint(model, trained.ckpt)
    ref = tmp_path / "reference.pth"
    torch.save({"model": to_reference_state_dict(model)}, str(ref))
    paths = val_paths(demo_data, 3)
    rc, out, _ = run(capsys, *paths, "--checkpoint", trained.ckpt, "--json")
    ours = json_lines(out)
    # Decoder size, classes and frames come from the weights' shapes; stride and views from flags.
    rc, out, _ = run(capsys, *paths, "--checkpoint", ref, "--backbone", tiny_vit, "--backbone_path", trained.weights,
                     "--num_frames", "4", "--sampling_rate", "2", "--num_temporal_views", "2", "--json")
    assert rc == 0 and json_lines(out) == ours

    with pytest.raises(SystemExit, match="records no configuration.*4 decoder layers, width 64, 4 frames, 4x4 patch "
                                         "grid, 4 classes.*pass --backbone, --backbone_path, --sampling_rate"):
        predict_main([paths[0], "--checkpoint", str(ref)])
    with pytest.raises(SystemExit, match="--num_frames 8 does not fit .*trained on 4 frames"):
        predict_main([paths[0], "--checkpoint", str(ref), "--backbone", tiny_vit, "--backbone_path", trained.weights,
                      "--sampling_rate", "2", "--num_frames", "8"])
    wide = tmp_path / "wide-vit.json"
    cfg = json.loads(json.dumps(TINY_VIT))
    cfg["vision_cfg"]["width"] = 96
    wide.write_text(json.dumps(cfg))
    wide_weights = save_clip_weights(tmp_path / "wide.pt", str(wide), seed=0)
    with pytest.raises(SystemExit, match="another model: its decoder has width 64 but backbone wide-vit .* width 96"):
        predict_main([paths[0], "--checkpoint", str(ref), "--backbone", str(wide), "--backbone_path", wide_weights,
                      "--sampling_rate", "2"])


def test_unreadable_videos_are_reported_and_the_others_predicted(trained, demo_data, tmp_path, capsys):
    good = val_paths(demo_data, 2)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    missing = tmp_path / "missing.mp4"
    rc, out, err = run(capsys, good[0], corrupt, missing, good[1], "--checkpoint", trained.ckpt, "--json")
    assert rc == 1
    recs = json_lines(out)
    assert [r["path"] for r in recs] == [good[0], str(corrupt), str(missing), good[1]]
    assert "topk" in recs[0] and "topk" in recs[3]
    assert "error" in recs[1] and recs[2]["error"] == "video file not found"
    assert f"error: {corrupt}: " in err and f"error: {missing}: video file not found" in err
    assert "2 of 4 videos could not be read" in err


def test_a_video_path_with_spaces(trained, demo_data, tmp_path, capsys):
    """Videos are read as a list file's segments; a path a list file cannot hold still reads."""
    import shutil

    src = val_paths(demo_data, 1)[0]
    spaced = tmp_path / "my videos" / "a clip.mp4"
    spaced.parent.mkdir()
    shutil.copy(src, spaced)
    rc, out, _ = run(capsys, src, spaced, "--checkpoint", trained.ckpt, "--json")
    assert rc == 0
    first, second = json_lines(out)
    assert second["path"] == str(spaced) and second["topk"] == first["topk"]


def test_checkpoint_of_another_model_is_refused(trained, tiny_vit, demo_data, tmp_path):
    ckpt = safe_load(trained.ckpt)
    other = build_tiny(tiny_vit, num_classes=5, num_frames=4, backbone_path=trained.weights)
    ckpt["model"] = other.state_dict()  # a 5-class model under a 4-class model's config
    bad = tmp_path / "other.pth"
    torch.save(ckpt, str(bad))
    with pytest.raises(SystemExit, match=r"another model: checkpoint has .*5 classes; model has .*4 classes"):
        predict_main([val_paths(demo_data, 1)[0], "--checkpoint", str(bad)])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        predict_main([val_paths(demo_data, 1)[0], "--checkpoint", str(tmp_path / "nope.pth")])


def test_class_names_must_fit_the_model(trained, demo_data, tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["a", "b", "c"]))
    with pytest.raises(SystemExit, match=f"{names} has 3 class names but the model has 4 classes"):
        predict_main([val_paths(demo_data, 1)[0], "--checkpoint", trained.ckpt, "--class_names", str(names)])
    names.write_text(json.dumps({"a": 0}))
    with pytest.raises(SystemExit, match="expected a JSON list of class names"):
        predict_main([val_paths(demo_data, 1)[0], "--checkpoint", trained.ckpt, "--class_names", str(names)])


def test_backbone_weights_missing_moved_or_different(trained, tiny_vit, demo_data, tmp_path, capsys):
    video = val_paths(demo_data, 1)[0]
    ckpt = safe_load(trained.ckpt)
    recorded = tmp_path / "moved-away.pt"
    ckpt["model_config"]["backbone_path"] = str(recorded)
    moved = tmp_path / "moved.pth"
    torch.save(ckpt, str(moved))
    with pytest.raises(SystemExit, match=f"CLIP weights file not found: {recorded} .*--backbone_path"):
        predict_main([video, "--checkpoint", str(moved)])
    # The same weights elsewhere: --backbone_path overrides the recorded path.
    copy = str(shutil.copy(trained.weights, tmp_path / "copy.pt"))
    assert run(capsys, video, "--checkpoint", moved, "--backbone_path", copy)[0] == 0
    other = save_clip_weights(tmp_path / "other.pt", tiny_vit, seed=2)
    with pytest.raises(SystemExit, match=r"trained with backbone tiny-vit .*weights sha256 [0-9a-f]{64}\), but this "
                                         r"run uses tiny-vit .*weights sha256 [0-9a-f]{64}"):
        predict_main([video, "--checkpoint", trained.ckpt, "--backbone_path", other])
    with pytest.raises(SystemExit, match="CLIP weights file not found: .*nope.pt"):
        predict_main([video, "--checkpoint", trained.ckpt, "--backbone_path", str(tmp_path / "nope.pt")])
    ckpt["model_config"]["backbone"] = str(tmp_path / "gone.json")
    torch.save(ckpt, str(moved))
    with pytest.raises(SystemExit, match=f"backbone config {tmp_path}/gone.json recorded in .*pass --backbone"):
        predict_main([video, "--checkpoint", str(moved), "--backbone_path", copy])
    assert run(capsys, video, "--checkpoint", moved, "--backbone_path", copy, "--backbone", tiny_vit)[0] == 0


@pytest.mark.gpu
def test_predict_on_gpu_matches_cpu(trained, demo_data, capsys):
    paths = val_paths(demo_data, 4)
    rc_cpu, cpu, _ = run(capsys, *paths, "--checkpoint", trained.ckpt, "--json", "--device", "cpu")
    rc_gpu, gpu, _ = run(capsys, *paths, "--checkpoint", trained.ckpt, "--json", "--device", "cuda")
    assert rc_cpu == rc_gpu == 0
    for a, b in zip(json_lines(cpu), json_lines(gpu)):  # bf16 backbone and decoder on the GPU
        pa = {t["class"]: t["prob"] for t in a["topk"]}
        pb = {t["class"]: t["prob"] for t in b["topk"]}
        assert pa == pytest.approx(pb, abs=0.05)
