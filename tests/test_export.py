"""python -m evl.export: a shareable folder (config.json + model.safetensors + README.md) that
evl.predict, evl.extract and evl.load_checkpoint load as they load the checkpoint it came from."""

import json
import os
import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import evl
from evl.config import parse_config
from evl.export import main as export_main
from evl.extract import main as extract_main
from evl.inference import load_predictor
from evl.predict import main as predict_main
from evl.train import train
from evl.weights import WeightsError, to_reference_state_dict

from conftest import build_tiny, train_argv


def save_clip_safetensors(path, backbone, seed):
    """CLIP weights as a full-CLIP safetensors file (``visual.*`` keys) for a random tower."""
    visual = build_tiny(backbone, seed=seed).backbone.visual.state_dict()
    save_file({f"visual.{k}": v.contiguous() for k, v in visual.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def run(tiny_vit, demo_data, tmp_path_factory):
    """A 2-step run of the real trainer on CLIP weights from a .safetensors file, evaluated at step 2."""
    d = tmp_path_factory.mktemp("export")
    weights = save_clip_safetensors(d / "tiny-clip.safetensors", tiny_vit, seed=1)
    val = d / "val.txt"  # four of the demo's val videos
    with open(demo_data.val_list) as f:
        val.write_text("".join(f.readlines()[:4]))
    train(parse_config(train_argv(tiny_vit, demo_data, d / "run", "--num_steps", "2", "--save_freq", "2",
                                  "--eval_freq", "2", "--backbone_path", weights, "--val_list_path", str(val))))
    return SimpleNamespace(dir=d, run=d / "run", ckpt=str(d / "run" / "checkpoint-2.pth"), weights=weights)


@pytest.fixture(scope="module")
def exported(run):
    """The run's checkpoint exported twice: referring to its backbone, and including it."""
    out = run.dir / "exported"
    assert export_main([run.ckpt, "--output", str(out)]) == 0
    full = run.dir / "exported-full"
    assert export_main([run.ckpt, "--output", str(full), "--include_backbone"]) == 0
    return SimpleNamespace(ref=str(out), full=str(full))


def val_videos(demo, n):
    with open(demo.val_list) as f:
        return [f"{demo.root}/{line.split()[0]}" for line in f][:n]


def predict_json(capsys, *argv):
    rc = predict_main([str(a) for a in argv] + ["--json", "--topk", "4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()]


def no_pickle(monkeypatch):
    """Make every way of unpickling fail: loading an exported folder must not need one."""
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    for module, name in ((torch, "load"), (torch.jit, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)


def test_folder_contents_config_and_card(run, exported, demo_data):
    out = exported.ref
    assert sorted(os.listdir(out)) == ["README.md", "backbone_config", "config.json", "model.safetensors"]
    assert os.listdir(os.path.join(out, "backbone_config")) == ["tiny-vit.json"]
    ckpt = torch.load(run.ckpt, weights_only=True)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["format"] == "evl-export/1"
    assert config["model_config"] == dict(ckpt["model_config"], backbone="backbone_config/tiny-vit.json")
    assert config["backbone"]["sha256"] == ckpt["model_config"]["backbone_sha256"]
    assert not config["backbone"]["included"]
    assert config["backbone"]["path"] == run.weights
    assert {k: config["data"][k] for k in ("num_frames", "sampling_rate", "sampling", "num_spatial_views",
                                           "num_temporal_views", "input_size")} == {
        "num_frames": 4, "sampling_rate": 2, "sampling": "dense", "num_spatial_views": 1, "num_temporal_views": 2,
        "input_size": 64}
    assert config["class_names"] == list(demo_data.class_names)  # the class_names.json beside the run's lists
    best = json.load(open(run.run / "best.json"))
    assert best["step"] == 2
    assert config["evaluation"]["top1"] == best["top1"] and config["evaluation"]["step"] == 2
    assert config["evaluation"]["num_videos"] == 4
    assert config["source"]["checkpoint"] == "checkpoint-2.pth" and config["source"]["step"] == 2

    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert tensors.keys() == ckpt["model"].keys()
    assert all(torch.equal(tensors[k], v) for k, v in ckpt["model"].items())
    full = load_file(os.path.join(exported.full, "model.safetensors"))
    backbone = {k for k in full if k.startswith("backbone.")}
    assert backbone and full.keys() - backbone == tensors.keys()
    assert "backbone.conv1.weight" in backbone and "backbone.proj" not in backbone  # only what EVL uses

    for folder in (out, exported.full):  # JSON, safetensors and text only: no zip or pickle anywhere
        for root, _, names in os.walk(folder):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    assert f.read(2)[:1] not in (b"P", b"\x80"), name
    card = open(os.path.join(out, "README.md")).read()
    assert f"top-1 {best['top1']:.2f}%" in card and "4 videos" in card
    assert config["backbone"]["sha256"] in card and "--backbone_path" in card
    assert "included in `model.safetensors`" in open(os.path.join(exported.full, "README.md")).read()


def test_predict_extract_and_load_checkpoint_take_the_folder(run, exported, tiny_vit, demo_data, tmp_path, capsys,
                                                             monkeypatch):
    videos = val_videos(demo_data, 2)
    # The folder names the classes (its class_names), the .pth needs --class_names for that.
    names = ["--class_names", str(demo_data.class_names_path)]
    from_ckpt = predict_json(capsys, *videos, "--checkpoint", run.ckpt, *names)
    with monkeypatch.context() as m:
        no_pickle(m)
        assert predict_json(capsys, *videos, "--checkpoint", exported.ref) == from_ckpt
        assert predict_json(capsys, *videos, "--checkpoint", exported.full) == from_ckpt

    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{v} 0\n" for v in videos))
    feats = {}
    for name, ckpt in (("pth", run.ckpt), ("folder", exported.ref)):
        assert extract_main(["--list", str(lst), "--checkpoint", ckpt, "--output", str(tmp_path / name),
                             "--num_workers", "0", "--cls"]) == 0
        index = [json.loads(line) for line in (tmp_path / name / "index.jsonl").read_text().splitlines()]
        feats[name] = [np.load(tmp_path / name / e[k]) for e in index for k in ("embedding", "cls")]
    assert len(feats["pth"]) == 4
    assert all(np.array_equal(a, b) for a, b in zip(feats["pth"], feats["folder"]))

    # evl.load_checkpoint into a model built on the same weights; a folder with its backbone brings it.
    x = torch.randn(2, 3, 4, 64, 64)
    expected = build_tiny(tiny_vit, num_classes=4, backbone_path=run.weights).eval()
    evl.load_checkpoint(expected, run.ckpt)
    model = build_tiny(tiny_vit, num_classes=4, backbone_path=run.weights).eval()
    state = evl.load_checkpoint(model, exported.ref)
    assert state["format"] == "evl-export/1" and state["class_names"] == list(demo_data.class_names)
    torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)
    random_tower = build_tiny(tiny_vit, seed=7, num_classes=4).eval()
    assert not torch.allclose(random_tower(x), expected(x))
    evl.load_checkpoint(random_tower, exported.full)
    torch.testing.assert_close(random_tower(x), expected(x), rtol=0, atol=0)
    assert random_tower.config["backbone_sha256"] == expected.config["backbone_sha256"]


def test_backbone_is_checked_against_the_recorded_sha256(run, exported, tiny_vit, demo_data, tmp_path, monkeypatch):
    video = val_videos(demo_data, 1)[0]
    other = save_clip_safetensors(tmp_path / "other.safetensors", tiny_vit, seed=2)
    with pytest.raises(SystemExit, match=r"error: .*exported was trained with backbone tiny-vit .*weights sha256 "
                                         r"[0-9a-f]{64}\), but this run uses .*sha256 [0-9a-f]{64}"):
        predict_main([video, "--checkpoint", exported.ref, "--backbone_path", other])
    # The recorded weights file moved: the folder names it and its sha256; a copy elsewhere works.
    moved = tmp_path / "moved"
    shutil.copytree(exported.ref, moved)
    config = json.load(open(moved / "config.json"))
    config["model_config"]["backbone_path"] = str(tmp_path / "gone.safetensors")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"gone.safetensors .*sha256 [0-9a-f]{64}; pass --backbone_path"):
        load_predictor(str(moved))
    copy = shutil.copy(run.weights, tmp_path / "copy.safetensors")
    predictor = load_predictor(str(moved), backbone_path=str(copy))
    assert predictor.settings["backbone_sha256"] == config["backbone"]["sha256"]
    # A folder with its backbone reads no weights file at all.
    with monkeypatch.context() as m:
        m.setattr("evl.weights.read_clip_state_dict", lambda *a: pytest.fail("read a CLIP weights file"))
        predictor = load_predictor(exported.full)
    assert predictor.settings["backbone_included"] and predictor.settings["backbone_path"] is None
    # Exporting with weights other than the checkpoint's is refused too.
    with pytest.raises(SystemExit) as e:
        export_main([run.ckpt, "--output", str(tmp_path / "x"), "--backbone_path", other])
    assert e.value.code == 1 and not (tmp_path / "x" / "config.json").exists()


def test_broken_folders_are_one_line_errors(exported, tiny_vit, demo_data, tmp_path):
    video = val_videos(demo_data, 1)[0]

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(exported.full if name.startswith("full") else exported.ref, folder)
        change(folder)
        return str(folder)

    cases = [
        (broken("no-weights", lambda f: os.remove(f / "model.safetensors")), "model.safetensors is missing"),
        (broken("no-config", lambda f: os.remove(f / "config.json")), "config.json is missing"),
        (broken("corrupt", lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64)),
         r"model.safetensors: not a readable safetensors file \(truncated or corrupt\?\)"),
        (broken("truncated", lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:-100])), "model.safetensors: not a readable safetensors file"),
        (broken("bad-json", lambda f: (f / "config.json").write_text("{")), "config.json: not valid JSON"),
        (broken("other-format", lambda f: (f / "config.json").write_text('{"format": "x"}')),
         "not an exported EVL model's configuration"),
        (broken("bad-field", lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text().replace('"num_classes": 4', '"num_classes": "4"'))),
         r"model_config: num_classes \(str, not int\)"),
        (broken("full-undeclared", lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text().replace('"included": true', '"included": false'))),
         "holds backbone.\\* tensors that config.json does not declare"),
        (str(tmp_path), "not an exported EVL model: config.json is missing"),
    ]
    for folder, message in cases:
        with pytest.raises(WeightsError, match=message):
            evl.load_checkpoint(build_tiny(tiny_vit, num_classes=4), folder)
        with pytest.raises(SystemExit) as e:
            predict_main([video, "--checkpoint", folder])
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value), folder


def test_output_folder_rules(run, exported, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        export_main([run.ckpt, "--output", str(taken)])
    assert e.value.code == 1 and "is not empty: pass --overwrite" in capsys.readouterr().err
    assert os.listdir(taken) == ["notes.txt"]
    again = tmp_path / "again"
    shutil.copytree(exported.full, again)
    assert export_main([run.ckpt, "--output", str(again), "--overwrite"]) == 0  # an earlier export is replaced
    assert not any(k.startswith("backbone.") for k in load_file(again / "model.safetensors"))
    assert "referenced by sha256" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        export_main([run.ckpt, "--output", str(run.run), "--overwrite"])  # never into a training run
    assert "where the checkpoint" in capsys.readouterr().err


def test_reference_checkpoint_exports_with_its_flags(run, exported, tiny_vit, demo_data, tmp_path, capsys):
    model = build_tiny(tiny_vit, num_classes=4, backbone_path=run.weights)
    evl.load_checkpoint(model, run.ckpt)
    ref = tmp_path / "reference.pth"
    torch.save({"model": to_reference_state_dict(model)}, str(ref))
    with pytest.raises(SystemExit):
        export_main([str(ref), "--output", str(tmp_path / "no-flags")])
    assert "records no configuration" in capsys.readouterr().err
    out = tmp_path / "reference-export"
    assert export_main([str(ref), "--output", str(out), "--backbone", tiny_vit, "--backbone_path", run.weights,
                        "--sampling_rate", "2", "--num_temporal_views", "2"]) == 0
    capsys.readouterr()
    config = json.load(open(out / "config.json"))
    ours = json.load(open(os.path.join(exported.ref, "config.json")))
    assert config["backbone"]["sha256"] == ours["backbone"]["sha256"]
    assert config["evaluation"] is None and config["class_names"] is None
    videos = val_videos(demo_data, 2)
    assert predict_json(capsys, *videos, "--checkpoint", out) == predict_json(capsys, *videos, "--checkpoint", run.ckpt)


def test_evaluation_pretraining_and_class_names_from_the_folder(run, exported, tiny_vit, demo_data, tmp_path,
                                                                capsys):
    """``evl.eval --checkpoint DIR`` gives the .pth's numbers; ``--pretrain DIR`` starts from its
    decoder; ``evl.predict`` names classes from the folder without ``--class_names``."""
    from evl.eval import main as eval_main

    results = [eval_main(train_argv(tiny_vit, demo_data, tmp_path / name, "--backbone_path", run.weights,
                                    "--checkpoint", ckpt)) for name, ckpt in (("pth", run.ckpt), ("dir", exported.ref))]
    assert results[0]["top1"] == results[1]["top1"] and results[0]["top5"] == results[1]["top5"]

    capsys.readouterr()
    train(parse_config(train_argv(tiny_vit, demo_data, tmp_path / "ft", "--backbone_path", run.weights,
                                  "--num_steps", "1", "--pretrain", exported.ref)))
    assert f"initialised from {exported.ref}" in capsys.readouterr().out

    (rec,) = predict_json(capsys, val_videos(demo_data, 1)[0], "--checkpoint", exported.ref)
    assert {c["name"] for c in rec["topk"]} == set(demo_data.class_names)  # all 4, named
