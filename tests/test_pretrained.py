"""CLIP weights by name: ``--pretrained TAG`` and ``--backbone hf-hub:ORG/REPO``, resolved by
open_clip's and huggingface_hub's own code, offline, from a Hugging Face cache the tests write in
the real on-disk layout (``refs/main`` -> ``snapshots/<commit>/<file>`` -> ``blobs/<hash>``)."""

import hashlib
import json
import os
import shutil
from types import SimpleNamespace

import open_clip
import pytest
import torch
from huggingface_hub import constants as hf_constants
from open_clip import factory as oc_factory
from open_clip import pretrained as oc_pretrained
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP
from open_clip.push_to_hf_hub import save_config_for_hf
from safetensors.torch import load_file, save_file

import evl
from evl import train as train_mod
from evl.cli import SetupError
from evl.config import parse_config
from evl.inference import load_predictor
from evl.predict import main as predict_main
from evl.pretrained import PretrainedError
from evl.weights import WeightsError, safe_load

from conftest import TINY_VIT, train_argv

# The tiny ViT of the other tests, as a whole CLIP (open_clip's files hold both towers).
TINY_CLIP = dict(TINY_VIT, text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1})
HUB = "evl-test/tiny-clip"  # open_clip_config.json + open_clip_model.safetensors
HUB_BIN = "evl-test/tiny-clip-bin"  # open_clip_config.json + open_clip_pytorch_model.bin only
MODEL = "EVL-Tiny"  # registered as a builtin open_clip model name by the `tiny_tags` fixture


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def write_repo(cache, repo: str, files: dict[str, bytes]) -> dict[str, str]:
    """``files`` as huggingface_hub stores a download of ``repo`` at ``main``; their snapshot paths."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "blobs").mkdir()
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    paths = {}
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), snapshot / name)
        paths[name] = str(snapshot / name)
    return paths


def tiny_clip_files(tmp, seed: int, safetensors: bool) -> dict[str, bytes]:
    """What open_clip's ``save_for_hf`` writes for a random tiny CLIP: its config and its weights
    (full-CLIP keys, ``visual.*`` included)."""
    torch.manual_seed(seed)
    model = CLIP(**TINY_CLIP)
    model.visual.image_mean, model.visual.image_std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # as create_model sets
    tmp.mkdir()
    save_config_for_hf(model, tmp / "open_clip_config.json", model_config=TINY_CLIP)
    weights = tmp / ("open_clip_model.safetensors" if safetensors else "open_clip_pytorch_model.bin")
    if safetensors:
        save_file(model.state_dict(), str(weights))
    else:
        torch.save(model.state_dict(), str(weights))
    return {p.name: p.read_bytes() for p in (tmp / "open_clip_config.json", weights)}


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    cache = root / "hub"
    paths = {HUB: write_repo(cache, HUB, tiny_clip_files(root / "a", seed=1, safetensors=True)),
             HUB_BIN: write_repo(cache, HUB_BIN, tiny_clip_files(root / "b", seed=2, safetensors=False))}
    return SimpleNamespace(home=root, cache=cache, weights=paths[HUB]["open_clip_model.safetensors"],
                           bin_weights=paths[HUB_BIN]["open_clip_pytorch_model.bin"])


def use_cache(monkeypatch, home, cache) -> None:
    """Offline, with ``cache`` as the Hugging Face cache. huggingface_hub reads these variables
    once, when it is imported, and this process imported it already: its constants are set too,
    to what a fresh ``python -m evl.train`` started with the variables would hold."""
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture
def hub(hub_files, monkeypatch):
    use_cache(monkeypatch, hub_files.home, hub_files.cache)
    return hub_files


@pytest.fixture
def tiny_tags(hub, tmp_path, monkeypatch):
    """``EVL-Tiny`` as a builtin open_clip model with pretrained tags, so that a tag is resolved
    offline without a 350 MB ViT-B: open_clip's ``add_model_config`` registers the config (on
    copies of its registry, which the monkeypatch puts back afterwards), and the tags go into
    open_clip's own tag table, pointing at the cached repositories, so that
    ``get_pretrained_cfg`` and ``download_pretrained`` run as they do for ``openai``."""
    monkeypatch.setattr(oc_factory, "_MODEL_CONFIG_PATHS", list(oc_factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(oc_factory, "_MODEL_CONFIGS", dict(oc_factory._MODEL_CONFIGS))
    config = tmp_path / f"{MODEL}.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    monkeypatch.setitem(oc_pretrained._PRETRAINED, MODEL, {
        "tiny": oc_pretrained._pcfg(hf_hub=f"{HUB_BIN}/"),
        "tiny_again": oc_pretrained._pcfg(hf_hub=f"{HUB_BIN}/"),  # the same weights under another tag
        "tiny_quickgelu": oc_pretrained._pcfg(hf_hub=f"{HUB_BIN}/", quick_gelu=True),
        "tiny_laion_norm": oc_pretrained._pcfg(hf_hub=f"{HUB_BIN}/", mean=(0.5,) * 3, std=(0.5,) * 3),
        "absent": oc_pretrained._pcfg(hf_hub="evl-test/not-cached/"),
    })
    assert MODEL in open_clip.list_models() and open_clip.get_pretrained_cfg(MODEL, "tiny")
    return hub


def assert_visual_weights(model, path):
    """The tower holds exactly the ``visual.*`` tensors of the open_clip weights file ``path``."""
    src = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
    own = model.backbone.visual.state_dict()
    assert own and all(torch.equal(v, src[f"visual.{k}"]) for k, v in own.items())


def build(backbone, **kw):
    torch.manual_seed(0)
    return evl.build_model(backbone, 4, 4, **kw)


def test_hf_hub_backbone_gets_the_repositorys_config_and_weights(hub):
    model = build(f"hf-hub:{HUB}")
    assert_visual_weights(model, hub.weights)
    assert model.config["backbone_sha256"] == sha256(hub.weights)
    assert model.config["backbone_id"].startswith(f"hf-hub:{HUB} (width 64, 4 blocks")
    assert model.spec.quick_gelu is False  # the config says nothing: open_clip builds GELU
    # No safetensors in the repository: its .bin, read with weights_only.
    model = build(f"hf-hub:{HUB_BIN}")
    assert_visual_weights(model, hub.bin_weights)


def test_a_pretrained_tag_of_a_builtin_model(tiny_tags):
    model = build(MODEL, pretrained="tiny")
    assert_visual_weights(model, tiny_tags.bin_weights)
    assert model.config["pretrained"] == "tiny"
    assert model.config["backbone_sha256"] == sha256(tiny_tags.bin_weights)
    # The activation is the tag's: GELU here, where a bare config would get QuickGELU.
    assert model.spec.quick_gelu is False
    assert build(MODEL, pretrained="tiny_quickgelu").spec.quick_gelu is True
    with pytest.warns(UserWarning, match=r"tiny_laion_norm was trained on frames normalised with mean \(0.5, 0.5"):
        build(MODEL, pretrained="tiny_laion_norm")
    with pytest.warns(UserWarning, match="RANDOM"):
        assert build(MODEL).spec.quick_gelu is True


def test_training_on_hf_hub_weights_records_them_and_predict_finds_them_again(hub, tiny_vit, demo_data, tmp_path,
                                                                              monkeypatch, capsys):
    out = tmp_path / "run"
    train_mod.train(parse_config(train_argv(tiny_vit, demo_data, out, "--backbone", f"hf-hub:{HUB}", "--num_steps",
                                            "2", "--save_freq", "2", "--val_list_path", "")))
    ckpt = str(out / "checkpoint-2.pth")
    record = safe_load(ckpt)["model_config"]
    assert record["backbone"] == f"hf-hub:{HUB}" and record["backbone_path"] is None
    assert record["backbone_sha256"] == sha256(hub.weights)
    # Another machine: the same repository in another cache, nothing else shared.
    other = tmp_path / "elsewhere"
    shutil.copytree(hub.cache, other / "hub", symlinks=True)
    use_cache(monkeypatch, other, other / "hub")
    predictor = load_predictor(ckpt, device="cpu")
    assert_visual_weights(predictor.model, str(other / "hub" / os.path.relpath(hub.weights, hub.cache)))
    video = f"{demo_data.root}/{open(demo_data.val_list).readline().split()[0]}"
    assert predict_main([video, "--checkpoint", ckpt, "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["topk"]
    # Other weights under the repository's name: refused by their sha256.
    blob = os.path.realpath(other / "hub" / os.path.relpath(hub.weights, hub.cache))
    torch.manual_seed(3)
    save_file(CLIP(**TINY_CLIP).state_dict(), blob)
    with pytest.raises(WeightsError, match=f"weights sha256 {record['backbone_sha256']}.*but this run uses"):
        load_predictor(ckpt, device="cpu")


def test_training_on_a_tag_records_it_and_resuming_with_another_is_refused(tiny_tags, tiny_vit, demo_data, tmp_path):
    out = tmp_path / "run"
    argv = train_argv(tiny_vit, demo_data, out, "--backbone", MODEL, "--save_freq", "1", "--val_list_path", "")
    train_mod.train(parse_config(argv + ["--pretrained", "tiny", "--num_steps", "1"]))
    ckpt = str(out / "checkpoint-1.pth")
    record = safe_load(ckpt)["model_config"]
    assert (record["backbone"], record["pretrained"], record["backbone_path"]) == (MODEL, "tiny", None)
    assert record["backbone_sha256"] == sha256(tiny_tags.bin_weights)
    # The same file under another tag is another model's identity: refused like one.
    with pytest.raises(SetupError, match="--pretrained tiny -> tiny_again"):
        train_mod.train(parse_config(argv + ["--pretrained", "tiny_again", "--num_steps", "2", "--auto_resume"]))
    # Inference resolves the tag again; a local copy of the file does as well, with the tag's activation.
    assert_visual_weights(load_predictor(ckpt, device="cpu").model, tiny_tags.bin_weights)
    copy = shutil.copy(tiny_tags.bin_weights, tmp_path / "copy.bin")
    predictor = load_predictor(ckpt, backbone_path=str(copy), device="cpu")
    assert predictor.model.spec.quick_gelu is False and predictor.settings["pretrained"] == "tiny"


def one_error_line(capsys, argv, prog="python -m evl.train") -> str:
    with pytest.raises(SystemExit) as e:
        train_mod.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: ")
    return err


def test_an_unknown_tag_lists_the_models_tags(hub, tiny_vit, demo_data, tmp_path, capsys):
    err = one_error_line(capsys, train_argv(tiny_vit, demo_data, tmp_path / "a", "--backbone", "ViT-B-16",
                                            "--pretrained", "nope"))
    assert "--pretrained nope" in err and "ViT-B-16" in err and "openai, laion400m_e31" in err
    err = one_error_line(capsys, train_argv(tiny_vit, demo_data, tmp_path / "b", "--pretrained", "openai"))
    assert "no pretrained weights for" in err and "tiny-vit.json" in err


def test_weights_neither_cached_nor_downloadable_name_the_tag_and_the_cache(hub, tiny_tags, tiny_vit, demo_data,
                                                                            tmp_path, capsys):
    for backbone, tag, named in (("ViT-B-16", "openai", "timm/vit_base_patch16_clip_224.openai"),
                                 (MODEL, "absent", "evl-test/not-cached")):
        err = one_error_line(capsys, train_argv(tiny_vit, demo_data, tmp_path / tag, "--backbone", backbone,
                                                "--pretrained", tag))
        assert f"--pretrained {tag} of {backbone}" in err and named in err
        assert f"Hugging Face cache {hub.cache}," in err and "HF_HUB_OFFLINE=1" in err
    err = one_error_line(capsys, train_argv(tiny_vit, demo_data, tmp_path / "r", "--backbone", "hf-hub:evl-test/gone"))
    assert "hf-hub:evl-test/gone" in err and f"Hugging Face cache {hub.cache}," in err
    with pytest.raises(PretrainedError, match=f"hf-hub:{HUB} names its weights itself"):
        build(f"hf-hub:{HUB}", pretrained="openai")
    assert set(os.listdir(tmp_path / "openai")) <= {".lock"}  # no run left behind


def test_backbone_path_and_pretrained_together_are_refused(hub, tiny_vit, demo_data, tmp_path, capsys):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    for call in (lambda: parse_config(train_argv(tiny_vit, demo_data, tmp_path, "--backbone_path", str(weights),
                                                 "--pretrained", "openai")),
                 lambda: predict_main(["v.mp4", "--checkpoint", "c.pth", "--pretrained", "openai", "--backbone_path",
                                       str(weights)])):
        with pytest.raises(SystemExit) as e:
            call()
        err = capsys.readouterr().err
        assert e.value.code == 2 and "not allowed with argument" in err.splitlines()[-1]


def test_an_export_of_a_tagged_model_finds_its_weights_by_the_tag(tiny_tags, tiny_vit, demo_data, tmp_path, capsys):
    """evl.export of a checkpoint trained on a tag: the folder names the tag, loads without a
    weights path, and its model card says no --backbone_path is needed."""
    from evl.export import main as export_main

    out = tmp_path / "run"
    train_mod.train(parse_config(train_argv(tiny_vit, demo_data, out, "--backbone", MODEL, "--pretrained", "tiny",
                                            "--num_steps", "1", "--save_freq", "1", "--val_list_path", "")))
    folder = tmp_path / "exported"
    assert export_main([str(out / "checkpoint-1.pth"), "--output", str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["backbone"]["pretrained"] == "tiny" and config["model_config"]["pretrained"] == "tiny"
    assert "--backbone_path" not in (folder / "README.md").read_text()
    assert_visual_weights(load_predictor(str(folder), device="cpu").model, tiny_tags.bin_weights)


def test_a_cache_build_takes_the_tag(tiny_tags, demo_data, tmp_path, capsys):
    """evl.cache build --pretrained: the features of the tag's weights, with no random-backbone
    warning; its manifest names the weights' sha256."""
    import evl.cache as cache_cli

    manifest = cache_cli.main([
        "build", "--split", "val", "--list_path", demo_data.val_list, "--data_root", demo_data.root,
        "--backbone", MODEL, "--pretrained", "tiny", "--num_frames", "4", "--sampling_rate", "2",
        "--num_temporal_views", "1", "--decoder_num_layers", "2", "--output", str(tmp_path / "feats"),
        "--num_workers", "0", "--batch_size", "6", "--device", "cpu", "--no_progress"])
    assert manifest["backbone_sha256"] == sha256(tiny_tags.bin_weights)
    assert "RANDOM" not in capsys.readouterr().out
