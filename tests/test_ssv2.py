"""Something-Something v2 (evl.ssv2, scripts/*ssv2*.sh): the official annotation files to list
files, their errors, training on the result with segment sampling, and the recipes' flags.

The synthetic set is written here in the official format (labels.json: class name -> id string;
train/validation.json: entries with "id" and a "template" whose bracket-free text is the class;
test.json: ids only) with tiny VP9 ``<id>.webm`` videos. The lists are checked against these
annotations, not against the converter's own output.
"""

import json
import math
import os
import shutil
import stat
import subprocess
import sys

import pytest

from evl import ssv2
from evl import train as train_mod
from evl.config import parse_config
from pipelines.lists import read_list

from videos import write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, VAL, TEST, LABELS = (
    "something-something-v2-train.json", "something-something-v2-validation.json", "something-something-v2-test.json",
    "something-something-v2-labels.json")
# Ids deliberately not in template order, so that a list ordered by name or by first use fails.
CLASS_IDS = {"Pushing something from right to left": "1", "Pushing something from left to right": "0",
             "Holding something next to something": "3", "Approaching something with your camera": "2"}
TEMPLATES = ["Pushing [something] from left to right", "Pushing [something] from right to left",
             "Approaching [something] with your camera", "Holding [something] next to [something]"]
RECIPES = ("train_ssv2_vitb16_8f_dec12x768.sh", "train_ssv2_vitb16_8f_dec12x768_1gpu.sh",
           "eval_ssv2_vitb16_8f_dec12x768.sh")


def entry(vid: int, template: str) -> dict:
    return {"id": str(vid), "label": template.replace("[something]", "a cup"), "template": template,
            "placeholders": ["a cup"] * template.count("[")}


def write_annotations(directory, train, val, labels=None, test=None) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, value in ((LABELS, CLASS_IDS if labels is None else labels), (TRAIN, train), (VAL, val),
                        (TEST, test or [{"id": "90001"}, {"id": "90002"}])):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(value, f)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official layout: annotations/ (the four JSON files) and videos/<id>.webm, 64 px, 20 frames."""
    root = tmp_path_factory.mktemp("ssv2")
    train = [entry(1000 + 7 * i, TEMPLATES[i % 4]) for i in range(8)]
    val = [entry(5000 + 3 * i, TEMPLATES[(i + 1) % 4]) for i in range(4)]
    write_annotations(root / "annotations", train, val)
    (root / "videos").mkdir()
    for e in train + val:
        write_video(str(root / "videos" / f"{e['id']}.webm"), 20, codec="libvpx-vp9", size=(64, 64), gop=10,
                    pattern="field")
    return {"root": root, "annotations": str(root / "annotations"), "videos": str(root / "videos"),
            "train": train, "val": val}


def expected(entries, prefix):
    """The list lines the annotations call for: `<prefix>/<id>.webm <class id of the template>`."""
    return [f"{prefix}/{e['id']}.webm {int(CLASS_IDS[e['template'].replace('[', '').replace(']', '')])}"
            for e in entries]


def lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def convert(official, output, *extra):
    return ssv2.main(["--annotations", official["annotations"], "--videos", official["videos"], "--output",
                      str(output), *extra])


@pytest.mark.parametrize("layout", ["videos_inside_output", "lists_elsewhere", "data_root_flag"])
def test_lists_and_class_names_follow_the_annotation_files(official, tmp_path, layout, capsys):
    root, videos = official["root"], official["videos"]
    if layout == "videos_inside_output":  # the recipe's layout: $SSV2 holds videos/ and the lists
        out = tmp_path / "ssv2"
        videos = str(out / "videos")
        shutil.copytree(official["videos"], videos)
        argv = ["--annotations", official["annotations"], "--videos", str(out / "videos"), "--output", str(out)]
        data_root, prefix = out, "videos"
    elif layout == "lists_elsewhere":  # paths relative to --output, which is outside the videos' tree
        out = tmp_path / "lists"
        argv = ["--annotations", official["annotations"], "--videos", official["videos"], "--output", str(out)]
        data_root, prefix = out, os.path.relpath(official["videos"], out)
    else:
        out = tmp_path / "lists"
        argv = ["--annotations", official["annotations"], "--videos", official["videos"], "--output", str(out),
                "--data_root", str(root)]
        data_root, prefix = root, "videos"
    assert ssv2.main(argv) == 0
    assert lines(out / "train.txt") == expected(official["train"], prefix)
    assert lines(out / "val.txt") == expected(official["val"], prefix)
    with open(out / "class_names.json", encoding="utf-8") as f:
        names = json.load(f)
    assert names == sorted(CLASS_IDS, key=lambda name: int(CLASS_IDS[name]))
    assert names[0] == "Pushing something from left to right" and names[1] == "Pushing something from right to left"
    # The project's reader takes them as they are, every file found, every label a class.
    for split, entries in (("train", official["train"]), ("val", official["val"])):
        records = read_list(out / f"{split}.txt", data_root=str(data_root), num_classes=len(names))
        assert [os.path.realpath(r.path) for r in records] == \
            [os.path.realpath(os.path.join(videos, f"{e['id']}.webm")) for e in entries]
    assert not any(name.startswith(".tmp-") for name in os.listdir(out))  # atomic writes leave nothing behind
    printed = capsys.readouterr().out
    assert "train 8 videos" in printed and "val 4 videos" in printed and "4 classes" in printed
    assert f"--data_root {os.path.abspath(data_root)}" in printed


def _template_not_a_class(labels, train, val):
    train[3]["template"] = "Spinning [something] around"
    return TRAIN, ["entry 3 (id 1021)", "'Spinning [something] around' is not a class"]


def _template_missing(labels, train, val):
    del val[1]["template"]
    return VAL, ["entry 1 (id 5003)", "'template' missing"]


def _entry_not_an_object(labels, train, val):
    train[5] = ["1035", "Pushing [something] from right to left"]
    return TRAIN, ["entry 5:", "expected an object with 'id' and 'template', got list"]


def _id_not_a_file_name(labels, train, val):
    train[2]["id"] = "../1014"
    return TRAIN, ["entry 2:", "'id' '../1014' is not a video id"]


def _id_twice(labels, train, val):
    val[2]["id"] = val[0]["id"]
    return VAL, ["entry 2 (id 5000)", "id given twice (also entry 0)"]


def _id_in_both_splits(labels, train, val):
    val[3]["id"] = train[4]["id"]
    return VAL, ["entry 3 (id 1028)", f"also in {TRAIN} (entry 4)"]


def _two_problems(labels, train, val):
    del train[1]["id"]
    train[6]["template"] = "Spinning [something] around"
    return TRAIN, ["entry 1: 'id' missing", "(and 1 more problem in this file)"]


def _class_id_not_a_number(labels, train, val):
    labels["Holding something next to something"] = "three"
    return LABELS, ["entry 'Holding something next to something'", "'three' is not a non-negative integer"]


def _class_id_twice(labels, train, val):
    labels["Holding something next to something"] = "1"
    return LABELS, ["entry 'Holding something next to something'", "class id 1 is also the id of"]


def _class_ids_with_a_gap(labels, train, val):
    labels["Holding something next to something"] = "7"
    return LABELS, ["class ids are not 0..3", "first: 3"]


ANNOTATION_ERRORS = [_template_not_a_class, _template_missing, _entry_not_an_object, _id_not_a_file_name, _id_twice,
                     _id_in_both_splits, _two_problems, _class_id_not_a_number, _class_id_twice, _class_ids_with_a_gap]


def assert_one_line_error(capsys, out, before, *needles):
    """One ``error:`` line naming what is wrong; the output directory exactly as it was."""
    err = capsys.readouterr().err
    assert err.startswith("python -m evl.ssv2: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    return err


@pytest.fixture
def earlier_output(tmp_path):
    """An output directory with an earlier conversion's files, which a failed one must leave alone."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("train.txt", "val.txt", "class_names.json"):
        (out / name).write_text(f"earlier {name}\n")
    return out, {name: (out / name).read_bytes() for name in os.listdir(out)}


@pytest.mark.parametrize("mutate", ANNOTATION_ERRORS, ids=lambda f: f.__name__.strip("_"))
def test_bad_annotations_are_one_line_naming_file_and_entry(official, tmp_path, mutate, capsys, earlier_output):
    labels = dict(CLASS_IDS)
    train, val = json.loads(json.dumps(official["train"])), json.loads(json.dumps(official["val"]))  # deep copies
    bad_file, needles = mutate(labels, train, val)
    annotations = tmp_path / "annotations"
    write_annotations(annotations, train, val, labels)
    out, before = earlier_output
    with pytest.raises(SystemExit) as e:
        ssv2.main(["--annotations", str(annotations), "--videos", official["videos"], "--output", str(out)])
    assert e.value.code == 1
    assert_one_line_error(capsys, out, before, os.path.join(str(annotations), bad_file), *needles)


@pytest.mark.parametrize("case", ["truncated_json", "missing_file", "wrong_top_level", "no_videos_dir"])
def test_unreadable_inputs_are_one_line(official, tmp_path, case, capsys, earlier_output):
    annotations = tmp_path / "annotations"
    shutil.copytree(official["annotations"], annotations)
    videos = official["videos"]
    if case == "truncated_json":
        text = (annotations / TRAIN).read_text()
        (annotations / TRAIN).write_text(text[: len(text) // 2])
        needles = [f"{annotations / TRAIN}: not valid JSON (line 1, column"]
    elif case == "missing_file":
        (annotations / VAL).unlink()
        needles = [f"{annotations / VAL}: file not found", LABELS]
    elif case == "wrong_top_level":
        (annotations / LABELS).write_text(json.dumps(sorted(CLASS_IDS)))
        needles = [f"{annotations / LABELS}: expected a JSON object of class name -> class id, got list"]
    else:
        videos = str(tmp_path / "no_such_dir")
        needles = [f"{videos}: videos directory not found"]
    out, before = earlier_output
    with pytest.raises(SystemExit) as e:
        ssv2.main(["--annotations", str(annotations), "--videos", videos, "--output", str(out)])
    assert e.value.code == 1
    assert_one_line_error(capsys, out, before, *needles)


def test_missing_videos_are_refused_or_skipped_with_a_report(official, tmp_path, capsys, earlier_output):
    """Refused by default (a partial val set gives another benchmark); --skip_missing leaves them out."""
    videos = tmp_path / "videos"
    videos.mkdir()
    gone = {official["train"][2]["id"], official["val"][1]["id"]}
    for name in os.listdir(official["videos"]):
        if name[: -len(".webm")] not in gone:
            os.symlink(os.path.join(official["videos"], name), videos / name)
    out, before = earlier_output
    argv = ["--annotations", official["annotations"], "--videos", str(videos), "--output", str(out)]
    with pytest.raises(SystemExit) as e:
        ssv2.main(argv)
    assert e.value.code == 1
    assert_one_line_error(capsys, out, before, f"{videos}: videos not found as <id>.webm",
                          "train 1 of 8 (ids 1014)", "val 1 of 4 (ids 5003)", "--skip_missing")

    assert ssv2.main(argv + ["--skip_missing"]) == 0
    err = capsys.readouterr().err
    assert "1 train video(s) not found" in err and "(ids 1014)" in err
    assert "1 val video(s) not found" in err and "(ids 5003)" in err
    prefix = os.path.relpath(videos, out)
    assert lines(out / "train.txt") == expected([e for e in official["train"] if e["id"] not in gone], prefix)
    assert lines(out / "val.txt") == expected([e for e in official["val"] if e["id"] not in gone], prefix)


# -- training on the converted set: segment sampling through both pipelines --------------------------------------


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssv2_lists")
    assert convert(official, out) == 0
    return out


@pytest.mark.parametrize("pipeline", ["pyav", "dali"])
def test_trains_on_the_converted_lists_with_segment_sampling(converted, tiny_vit, tmp_path, pipeline):
    if pipeline == "dali":
        pytest.importorskip("nvidia.dali")  # on the CPU, DALI decodes VP9: the official videos' codec
    out = tmp_path / "run"
    argv = ["--backbone", tiny_vit, "--num_classes", "4", "--num_frames", "4", "--sampling", "segment",
            "--decoder_num_layers", "4", "--train_list_path", str(converted / "train.txt"),
            "--val_list_path", str(converted / "val.txt"), "--data_root", str(converted), "--pipeline", pipeline,
            "--batch_size", "4", "--num_workers", "0", "--num_steps", "2", "--eval_freq", "2", "--save_freq", "2",
            "--num_spatial_views", "1", "--num_temporal_views", "2", "--device", "cpu", "--print_freq", "1",
            "--auto_augment", "none",  # RandAugment on either pipeline: tests/test_dali.py, tests/test_augment.py
            "--output_dir", str(out)]
    result = train_mod.train(parse_config(argv))
    assert result["step"] == 2 and math.isfinite(result["loss"])
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        events = [json.loads(line) for line in f]
    assert [e["step"] for e in events if "loss" in e] == [1, 2]
    assert [(e["step"], e["num_videos"]) for e in events if "top1" in e] == [(2, 4)]  # every val video, read
    with open(out / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert (config["sampling"], config["pipeline"], config["mirror"]) == ("segment", pipeline, False)


# -- the recipes -------------------------------------------------------------------------------------------------


def run_recipe(script, tmp_path, ssv2_dir, **env):
    """Runs a recipe with a stand-in ``python`` that records each call's arguments; ``-m evl.ssv2``
    runs the real converter. Returns (completed process, [argv of each call])."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "python"
    fake.write_text('#!/bin/sh\n{ printf "%s\\n" "$@"; echo "--end-of-call--"; } >> "$ARGS_OUT"\n'
                    f'if [ "$2" = evl.ssv2 ]; then cd "{ROOT}" && exec "{sys.executable}" "$@"; fi\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "args.txt"
    log.unlink(missing_ok=True)
    full_env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", ARGS_OUT=str(log), CLIP_DIR="/clip",
                    SSV2=str(ssv2_dir), CKPT="/ck.pth", RUN_DIR=str(tmp_path / "run"), NPROC="8", **env)
    for name in ("SSV2_ANNOTATIONS", "SSV2_VIDEOS"):
        if name not in env:
            full_env.pop(name, None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", script)], env=full_env, cwd=tmp_path,
                          capture_output=True, text=True)
    calls, call = [], []
    for arg in (log.read_text().splitlines() if log.exists() else []):
        if arg == "--end-of-call--":
            calls.append(call)
            call = []
        else:
            call.append(arg)
    return proc, calls


def job_argv(call):
    module = call.index("evl.train") if "evl.train" in call else call.index("evl.eval")
    return call[module + 1:]


@pytest.mark.parametrize("script, processes", [(RECIPES[0], 8), (RECIPES[1], 1)])
def test_train_recipes_carry_the_ssv2_settings(script, processes, tmp_path):
    lists = tmp_path / "ssv2"
    lists.mkdir()
    (lists / "train.txt").write_text("videos/1.webm 0\n")
    (lists / "val.txt").write_text("videos/2.webm 0\n")
    proc, calls = run_recipe(script, tmp_path, lists)
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1  # the lists are there: no conversion
    cfg = parse_config(job_argv(calls[0]))
    # The spec's (§2, §5): segment sampling, 12 decoder layers, no flip; SSv2's 174 classes.
    assert (cfg.backbone, cfg.num_frames, cfg.sampling, cfg.decoder_num_layers) == ("ViT-B-16", 8, "segment", 12)
    assert cfg.num_classes == 174 and not cfg.mirror
    # The global batch of 256 in chunks of 32 per forward pass, on one GPU as on eight.
    assert cfg.batch_size == 256 and cfg.batch_per_process(processes) // cfg.batch_split == 32
    assert ("--nproc_per_node" in calls[0]) == (processes > 1)
    assert (cfg.lr, cfg.weight_decay, cfg.num_steps, cfg.warmup_steps) == (4e-4, 0.05, 40_000, 0)
    assert cfg.auto_augment == "rand-m7-n4-mstd0.5-inc1" and (cfg.num_spatial_views, cfg.num_temporal_views) == (3, 1)
    assert (cfg.train_list_path, cfg.val_list_path, cfg.data_root) == \
        (f"{lists}/train.txt", f"{lists}/val.txt", str(lists))
    assert cfg.backbone_path == "/clip/ViT-B-16.pt" and cfg.output_dir == str(tmp_path / "run") and cfg.auto_resume


def test_eval_recipe_carries_the_ssv2_settings(tmp_path):
    lists = tmp_path / "ssv2"
    lists.mkdir()
    (lists / "train.txt").write_text("")
    (lists / "val.txt").write_text("")
    proc, calls = run_recipe(RECIPES[2], tmp_path, lists)
    assert proc.returncode == 0, proc.stderr
    argv = ["--resume_path" if a == "--checkpoint" else a for a in job_argv(calls[-1])]
    cfg = parse_config(argv)
    assert (cfg.sampling, cfg.decoder_num_layers, cfg.num_frames, cfg.num_classes) == ("segment", 12, 8, 174)
    assert (cfg.num_spatial_views, cfg.num_temporal_views, cfg.resume_path) == (3, 1, "/ck.pth")
    assert cfg.val_list_path == f"{lists}/val.txt" and cfg.data_root == str(lists)


def test_one_command_from_the_official_files(official, tmp_path):
    """With SSV2 still empty, the recipe converts the official files into it, then trains on them."""
    lists = tmp_path / "ssv2"
    proc, calls = run_recipe(RECIPES[1], tmp_path, lists, SSV2_ANNOTATIONS=official["annotations"],
                             SSV2_VIDEOS=official["videos"])
    assert proc.returncode == 0, proc.stderr
    assert [c[:2] for c in calls] == [["-m", "evl.ssv2"], ["-m", "evl.train"]]
    cfg = parse_config(job_argv(calls[1]))
    assert lines(cfg.train_list_path) == expected(official["train"], os.path.relpath(official["videos"], lists))
    records = read_list(cfg.val_list_path, data_root=cfg.data_root, num_classes=cfg.num_classes)
    assert [r.label for r in records] == [int(CLASS_IDS[ssv2.class_of(e["template"])]) for e in official["val"]]

    # Once converted, the lists are used as they are.
    _, again = run_recipe(RECIPES[1], tmp_path, lists, SSV2_ANNOTATIONS=official["annotations"],
                          SSV2_VIDEOS=official["videos"])
    assert [c[:2] for c in again] == [["-m", "evl.train"]]


def test_recipe_without_lists_or_official_files_says_what_to_set(tmp_path):
    proc, calls = run_recipe(RECIPES[0], tmp_path, tmp_path / "empty")
    assert proc.returncode != 0 and calls == []
    assert "SSV2_ANNOTATIONS" in proc.stderr and "something-something-v2" in proc.stderr


def test_recipes_are_executable():
    for script in RECIPES:
        assert os.access(os.path.join(ROOT, "scripts", script), os.X_OK), script
