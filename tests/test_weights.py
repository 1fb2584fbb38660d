"""CLIP weight files in, EVL checkpoints in and out (evl-spec.md §3)."""

import json
import re
import warnings

import pytest
import torch
from torch import nn

import evl
from evl.weights import WeightsError, to_reference_state_dict

from conftest import TINY_VIT, build_tiny


def random_visual_state(tiny_vit, seed=3):
    """A random CLIP visual state dict in OpenAI naming (what open_clip's tower uses)."""
    model = build_tiny(tiny_vit)
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.backbone.visual.state_dict().items()}


def clip_file_layout(vis, layout):
    """``vis`` as a CLIP weight file lays it out, and what the backbone should then hold: the
    tower alone, a whole CLIP model, under DDP's ``module.`` prefix, or stored in fp16."""
    if layout == "visual_only":
        return vis, vis
    if layout == "full_clip":
        return {**{f"visual.{k}": v for k, v in vis.items()}, "token_embedding.weight": torch.zeros(10, 4),
                "logit_scale": torch.tensor(4.6)}, vis
    if layout == "ddp_prefix":
        return {f"module.visual.{k}": v for k, v in vis.items()}, vis
    if layout == "fp16":
        return {f"visual.{k}": v.half() for k, v in vis.items()}, {k: v.half().float() for k, v in vis.items()}
    raise ValueError(layout)


def assert_backbone_is(model, visual_sd):
    got = model.backbone.visual.state_dict()
    for k, v in visual_sd.items():
        torch.testing.assert_close(got[k], v, msg=k)


@pytest.mark.parametrize("layout", ["visual_only", "full_clip", "wrapped_ddp", "fp16"])
def test_backbone_weights_from_state_dicts(tiny_vit, tmp_path, layout):
    if layout == "wrapped_ddp":  # a training checkpoint: the DDP-prefixed state dict inside
        state, vis = clip_file_layout(random_visual_state(tiny_vit), "ddp_prefix")
        obj = {"epoch": 3, "state_dict": state}
    else:
        obj, vis = clip_file_layout(random_visual_state(tiny_vit), layout)
    path = tmp_path / "clip.pt"
    torch.save(obj, path)
    model = evl.build_model(tiny_vit, 5, 4, backbone_path=str(path))
    assert_backbone_is(model, vis)
    assert len(model.config["backbone_sha256"]) == 64


class _Clip(nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, x):
        return self.visual(x)


def test_backbone_weights_from_openai_torchscript_archive(tiny_vit, tmp_path):
    vis = random_visual_state(tiny_vit, seed=5)
    donor = build_tiny(tiny_vit).backbone.visual
    donor.load_state_dict(vis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(_Clip(donor).eval(), torch.randn(1, 3, 64, 64), check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(scripted, str(path))
    model = evl.build_model(tiny_vit, 5, 4, backbone_path=str(path))
    assert_backbone_is(model, vis)


def test_missing_weights_file(tiny_vit, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        evl.build_model(tiny_vit, 5, 4, backbone_path=str(tmp_path / "nope.pt"))


def test_weights_of_another_architecture_name_file_and_keys(tiny_vit, tmp_path):
    other = tmp_path / "wide.json"
    cfg = json.loads(json.dumps(TINY_VIT))
    cfg["vision_cfg"].update(width=96, layers=5)
    other.write_text(json.dumps(cfg))
    torch.save(random_visual_state(str(other)), tmp_path / "wide.pt")
    with pytest.raises(WeightsError) as e:
        evl.build_model(tiny_vit, 5, 4, backbone_path=str(tmp_path / "wide.pt"))
    msg = str(e.value)
    assert "wide.pt" in msg and "width 96, 5 blocks" in msg
    assert "transformer.resblocks.4" in msg and "conv1.weight" in msg


def test_unexpected_keys_are_named(tiny_vit, tmp_path):
    vis = random_visual_state(tiny_vit)
    vis["adapter.weight"] = torch.zeros(3)
    torch.save(vis, tmp_path / "x.pt")
    with pytest.raises(WeightsError, match=r"x\.pt.*unexpected keys: adapter\.weight"):
        evl.build_model(tiny_vit, 5, 4, backbone_path=str(tmp_path / "x.pt"))


class Payload:
    """Stands for any object whose unpickling would run code."""


def test_pickled_objects_are_refused(tiny_vit, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"decoder.cls_token": torch.zeros(64)}, "extra": Payload()}, path)
    with pytest.raises(WeightsError, match="evil.pt.*refused"):
        evl.build_model(tiny_vit, 5, 4, backbone_path=str(path))
    with pytest.raises(WeightsError, match="evil.pt.*refused"):
        evl.load_checkpoint(build_tiny(tiny_vit), str(path))


def test_corrupt_file_is_named(tiny_vit, tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match="broken.pth"):
        evl.load_checkpoint(build_tiny(tiny_vit), str(path))


def spec_reference_keys(num_layers):
    """The released checkpoint's key list, as evl-spec.md §3 spells it."""
    keys = {"module.decoder.cls_token", "module.proj.0.weight", "module.proj.0.bias", "module.proj.2.weight",
            "module.proj.2.bias"}
    for i in range(num_layers):
        p = f"module.decoder.decoder_layers.{i}."
        keys |= {f"{p}attn.{n}_proj.{w}" for n in "qkv" for w in ("weight", "bias")}
        keys |= {f"{p}attn.out_proj.{w}" for w in ("weight", "bias")}
        keys |= {f"{p}mlp.fc{j}.{w}" for j in (1, 2) for w in ("weight", "bias")}
        keys |= {f"{p}norm{j}.{w}" for j in (1, 2, 3) for w in ("weight", "bias")}
        keys |= {f"module.decoder.temporal_conv.{i}.weight", f"module.decoder.temporal_conv.{i}.bias",
                 f"module.decoder.temporal_pos_embed.{i}", f"module.decoder.cross_attention.{i}.w1",
                 f"module.decoder.cross_attention.{i}.w2"}
    return keys


@pytest.mark.parametrize("wrapped", [True, False])
def test_reference_checkpoint_layout_round_trips(tiny_vit, tmp_path, wrapped):
    src = build_tiny(tiny_vit, seed=1, decoder_num_layers=3).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.1)
    ref = to_reference_state_dict(src)
    assert set(ref) == spec_reference_keys(3)
    assert ref["module.decoder.temporal_conv.0.weight"].shape == (64, 1, 3)
    assert ref["module.decoder.temporal_pos_embed.0"].shape == (4, 64)
    torch.save({"model": ref} if wrapped else ref, tmp_path / "ref.pth")

    dst = build_tiny(tiny_vit, seed=2, decoder_num_layers=3).eval()
    dst.backbone.visual.load_state_dict(src.backbone.visual.state_dict())
    x = torch.randn(2, 3, 4, 64, 64)
    assert not torch.allclose(src(x), dst(x))
    evl.load_checkpoint(dst, str(tmp_path / "ref.pth"))
    torch.testing.assert_close(src(x), dst(x), atol=0, rtol=0)


@pytest.mark.parametrize("change, expect", [
    ({"num_frames": 8}, "8 frames"),
    ({"num_classes": 9}, "9 classes"),
    ({"decoder_num_layers": 2}, "2 decoder layers"),
])
def test_checkpoint_of_another_model_is_refused_without_partial_load(tiny_vit, tmp_path, change, expect):
    other = build_tiny(tiny_vit, **change)
    torch.save({"model": to_reference_state_dict(other)}, tmp_path / "other.pth")
    model = build_tiny(tiny_vit)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match=f"other.pth is a checkpoint of another model.*{expect}"):
        evl.load_checkpoint(model, str(tmp_path / "other.pth"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoint_with_backbone_weights_is_refused(tiny_vit, tmp_path):
    model = build_tiny(tiny_vit)
    sd = dict(model.state_dict())
    sd["backbone.conv1.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "full.pth")
    with pytest.raises(WeightsError, match="backbone weights"):
        evl.load_checkpoint(model, str(tmp_path / "full.pth"))


def test_backbone_weights_in_the_reference_implementations_vit_naming(tiny_vit, tmp_path):
    # The reference's VisionTransformer2D: Linear patch embedding (with bias), q/k/v split, fc1/fc2.
    vis = random_visual_state(tiny_vit, seed=9)
    width = 64
    bias = torch.randn(width)
    ref = {"cls_token": vis["class_embedding"], "pos_embed": vis["positional_embedding"],
           "patch_embed.proj.weight": vis["conv1.weight"].flatten(1), "patch_embed.proj.bias": bias,
           "ln_pre.weight": vis["ln_pre.weight"], "ln_pre.bias": vis["ln_pre.bias"]}
    for i in range(4):
        s, d = f"transformer.resblocks.{i}.", f"blocks.{i}."
        for j, n in enumerate("qkv"):
            ref[f"{d}attn.{n}_proj.weight"] = vis[f"{s}attn.in_proj_weight"][j * width:(j + 1) * width]
            ref[f"{d}attn.{n}_proj.bias"] = vis[f"{s}attn.in_proj_bias"][j * width:(j + 1) * width]
        for ours, theirs in (("attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                             ("norm1", "ln_1"), ("norm2", "ln_2")):
            for kind in ("weight", "bias"):
                ref[f"{d}{ours}.{kind}"] = vis[f"{s}{theirs}.{kind}"]
    torch.save(ref, tmp_path / "ref_vit.pth")
    model = evl.build_model(tiny_vit, 5, 4, backbone_path=str(tmp_path / "ref_vit.pth"))
    vis["positional_embedding"] = vis["positional_embedding"].clone()
    vis["positional_embedding"][1:] += bias
    assert_backbone_is(model, {k: v for k, v in vis.items() if not k.startswith(("ln_post", "proj"))})
    # The folded bias is exact: the embedded tokens equal the reference's Linear-with-bias patch embedding.
    x = torch.randn(2, 3, 64, 64)
    patches = x.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
    tokens = torch.cat([ref["cls_token"].expand(2, 1, -1), patches @ ref["patch_embed.proj.weight"].T + bias], 1)
    expected = model.backbone.visual.ln_pre(tokens + ref["pos_embed"])
    torch.testing.assert_close(model.backbone._embed(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["visual_only", "full_clip", "ddp_prefix", "fp16", "reference_vit"])
def test_backbone_weights_from_safetensors(tiny_vit, tmp_path, monkeypatch, layout):
    from safetensors.torch import save_file

    vis = random_visual_state(tiny_vit, seed=4)
    if layout != "reference_vit":
        tensors, vis = clip_file_layout(vis, layout)
    else:  # the reference's ViT naming (no patch bias), as its .pt files are converted
        tensors = {"cls_token": vis["class_embedding"], "pos_embed": vis["positional_embedding"],
                   "patch_embed.proj.weight": vis["conv1.weight"].flatten(1), "ln_pre.weight": vis["ln_pre.weight"],
                   "ln_pre.bias": vis["ln_pre.bias"]}
        for i in range(4):
            s, d = f"transformer.resblocks.{i}.", f"blocks.{i}."
            for j, n in enumerate("qkv"):
                for kind in ("weight", "bias"):
                    tensors[f"{d}attn.{n}_proj.{kind}"] = vis[f"{s}attn.in_proj_{kind}"][j * 64:(j + 1) * 64]
            for ours, theirs in (("attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                                 ("mlp.fc2", "mlp.c_proj"), ("norm1", "ln_1"), ("norm2", "ln_2")):
                for kind in ("weight", "bias"):
                    tensors[f"{d}{ours}.{kind}"] = vis[f"{s}{theirs}.{kind}"]
        vis = {k: v for k, v in vis.items() if not k.startswith(("ln_post", "proj"))}
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))

    def refuse(*args, **kwargs):
        raise AssertionError("a safetensors file was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.jit, "load", refuse)
    model = evl.build_model(tiny_vit, 5, 4, backbone_path=str(path))
    assert_backbone_is(model, vis)
    assert len(model.config["backbone_sha256"]) == 64
    # The same bytes under another name are recognised by their header, not their extension.
    renamed = tmp_path / "clip.bin"
    renamed.write_bytes(path.read_bytes())
    assert_backbone_is(evl.build_model(tiny_vit, 5, 4, backbone_path=str(renamed)), vis)


@pytest.mark.parametrize("content, expect", [
    (b"\x00garbage" * 10, r"truncated or corrupt\?"),
    (b"", r"truncated or corrupt\?"),
    ("pytorch", r"it is a PyTorch file: give it a \.pt name"),
    ("cut", r"truncated or corrupt\?"),
])
def test_unreadable_safetensors_are_one_line_errors(tiny_vit, tmp_path, monkeypatch, capsys, content, expect):
    from safetensors.torch import save_file
    from evl.train import main as train_main

    path = tmp_path / "clip.safetensors"
    if content == "pytorch":
        torch.save(random_visual_state(tiny_vit), str(path))
    elif content == "cut":
        save_file(random_visual_state(tiny_vit), str(path))
        path.write_bytes(path.read_bytes()[:-64])
    else:
        path.write_bytes(content)
    with monkeypatch.context() as m, pytest.raises(WeightsError) as e:
        m.setattr(torch, "load", lambda *a, **k: pytest.fail("a .safetensors file went to torch.load"))
        evl.build_model(tiny_vit, 5, 4, backbone_path=str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: not a readable safetensors file") and "\n" not in msg
    assert re.search(expect, msg)

    # From the command line: one error line naming the file, no traceback.
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--backbone", tiny_vit, "--backbone_path", str(path), "--pipeline", "dummy", "--num_classes", "4",
                    "--num_frames", "4", "--batch_size", "2", "--num_steps", "1", "--device", "cpu"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m evl.train: error: ") and str(path) in err[0]
