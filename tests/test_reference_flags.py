"""The reference implementation's scripts run with ``-m evl.train`` in place of ``main.py``: its
flags, as its scripts write them, give the same recipe here (issue 18, item 7)."""

import os

import pytest
import torch

from evl import checkpoint as ckpt_io
from evl import train as train_mod
from evl.cli import SetupError
from evl.config import parse_config
from evl.weights import safe_load

from conftest import build_tiny, train_argv

# The flags of the reference's scripts/train_k400_vitb16_8f_dec4x768.sh (8 GPUs), word for word.
REFERENCE_TRAIN_B16_8F = """
    --num_steps 50000 --backbone ViT-B/16-lnpre --backbone_type clip
    --backbone_path /path/to/clip_models/ViT-B-16.pt --decoder_num_layers 4 --decoder_qkv_dim 768
    --decoder_num_heads 12 --num_classes 400 --checkpoint_dir runs/k400_vitb16_8f_dec4x768 --auto_resume
    --train_list_path /path/to/k400/train.txt --val_list_path /path/to/k400/val.txt --batch_size 256
    --batch_split 1 --auto_augment rand-m7-n4-mstd0.5-inc1
    --mean 0.48145466 0.4578275 0.40821073 --std 0.26862954 0.26130258 0.27577711
    --num_workers 12 --num_frames 8 --sampling_rate 16 --num_spatial_views 1 --num_temporal_views 3
""".split()
# scripts/train_k400_vitl14_32f_dec4x1024.sh: gradient accumulation over 4 chunks.
REFERENCE_TRAIN_L14_32F = """
    --num_steps 50000 --backbone ViT-L/14-lnpre --backbone_type clip
    --backbone_path /path/to/clip_models/ViT-L-14.pt --decoder_num_layers 4 --decoder_qkv_dim 1024
    --decoder_num_heads 16 --num_classes 400 --checkpoint_dir runs/k400_vitl14_32f_dec4x1024 --auto_resume
    --train_list_path /path/to/k400/train.txt --val_list_path /path/to/k400/val.txt --batch_size 256
    --batch_split 4 --auto_augment rand-m7-n4-mstd0.5-inc1
    --mean 0.48145466 0.4578275 0.40821073 --std 0.26862954 0.26130258 0.27577711
    --num_workers 12 --num_frames 32 --sampling_rate 8 --num_spatial_views 3 --num_temporal_views 1
""".split()
# scripts/eval_k400_vitb16_8f_dec4x768.sh (4 GPUs).
REFERENCE_EVAL_B16_8F = """
    --num_steps 50000 --backbone ViT-B/16-lnpre --backbone_type clip
    --backbone_path /path/to/clip_models/ViT-B-16.pt --decoder_num_layers 4 --decoder_qkv_dim 768
    --decoder_num_heads 12 --num_classes 400 --val_list_path /path/to/k400/val.txt --batch_size 256
    --batch_split 1 --auto_augment rand-m7-n4-mstd0.5-inc1
    --mean 0.48145466 0.4578275 0.40821073 --std 0.26862954 0.26130258 0.27577711
    --num_workers 12 --num_frames 8 --sampling_rate 16 --num_spatial_views 1 --num_temporal_views 3
    --resume_path /path/to/checkpoint_release/k400_vitb16_8f_dec4x768.pth --eval_only
""".split()


@pytest.mark.parametrize("argv, gpus, backbone, frames, stride, views, chunk", [
    (REFERENCE_TRAIN_B16_8F, 8, "ViT-B-16", 8, 16, (1, 3), 32),
    (REFERENCE_TRAIN_L14_32F, 8, "ViT-L-14", 32, 8, (3, 1), 8),
])
def test_reference_train_scripts_give_the_papers_recipe(argv, gpus, backbone, frames, stride, views, chunk):
    cfg = parse_config(argv)
    assert (cfg.backbone, cfg.num_frames, cfg.sampling_rate) == (backbone, frames, stride)
    assert (cfg.num_spatial_views, cfg.num_temporal_views) == views
    assert (cfg.num_steps, cfg.lr, cfg.weight_decay) == (50_000, 4e-4, 0.05)
    assert cfg.output_dir.startswith("runs/") and cfg.auto_resume and cfg.auto_augment == "rand-m7-n4-mstd0.5-inc1"
    # The global batch of 256 over the script's 8 GPUs: 32 clips each, in --batch_split chunks.
    assert cfg.batch_size == 256 and cfg.batch_per_process(gpus) == 32
    assert cfg.batch_per_process(gpus) // cfg.batch_split == chunk
    # On one GPU the same flags take the whole global batch in one process, not 8x less.
    assert cfg.batch_per_process(1) == 256
    assert not cfg.mirror and cfg.sampling == "dense" and cfg.mixed_precision is None


def test_reference_eval_script():
    cfg = parse_config(REFERENCE_EVAL_B16_8F)
    assert cfg.eval_only and cfg.resume_path.endswith("k400_vitb16_8f_dec4x768.pth")
    assert (cfg.backbone, cfg.num_spatial_views, cfg.num_temporal_views) == ("ViT-B-16", 1, 3)
    assert cfg.eval_batch_per_process(4) == 64  # 256 over 4 GPUs, every view of each video
    with pytest.raises(ValueError, match="does not divide among 3 processes"):
        cfg.batch_per_process(3)


@pytest.mark.parametrize("flags, value", [
    (["--tsn_sampling"], ("sampling", "segment")),
    (["--no_mirror"], ("mirror", False)),
    (["--mirror"], ("mirror", True)),
    (["--disable_fp16"], ("mixed_precision", "fp32")),
    (["--backbone", "ViT-L/14@336px"], ("backbone", "ViT-L-14-336")),
    (["--backbone", "ViT-B/16"], ("backbone", "ViT-B-16")),
    (["--backbone", "configs/my-vit.json"], ("backbone", "configs/my-vit.json")),
    (["--mean", "0.48145466", "0.4578275", "0.40821073"], ("batch_size", 32)),
    (["--train_data_root", "/a", "--val_data_root", "/b"], ("train_data_root", "/a")),
])
def test_reference_flags_have_their_meaning(flags, value):
    cfg = parse_config(flags)
    assert getattr(cfg, value[0]) == value[1]


@pytest.mark.parametrize("flags, words", [
    (["--mean", "0.45"], "--mean 0.45: the frozen CLIP backbone takes CLIP's --mean 0.48145466"),
    (["--std", "0.225", "0.225", "0.225"], "--std 0.225 0.225 0.225: the frozen CLIP backbone"),
    (["--mean", "0.48145466", "0.4578275"], "--mean 0.48145466 0.4578275:"),
    (["--finetune_backbone"], "--finetune_backbone: EVL trains with the backbone frozen"),
    (["--backbone_type", "imagenet"], "invalid choice: 'imagenet'"),
    (["--interpolation", "bilinear"], "invalid choice: 'bilinear'"),
])
def test_reference_flags_we_cannot_honour_are_refused(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err, err


def test_split_data_roots_and_spatial_size_in_a_run(tiny_vit, demo_data, tmp_path):
    """--train_data_root / --val_data_root override --data_root per split, as in the reference;
    --spatial_size must be the backbone's."""
    argv = train_argv(tiny_vit, demo_data, tmp_path / "run", "--num_steps", "1", "--eval_freq", "1",
                      "--data_root", str(tmp_path / "nowhere"), "--train_data_root", demo_data.root,
                      "--val_data_root", demo_data.root, "--spatial_size", "64")
    result = train_mod.train(parse_config(argv))
    assert result["step"] == 1 and "best_top1" in result  # both splits read from their own roots
    with pytest.raises(SetupError, match="--spatial_size 224: backbone .* takes 64x64 frames"):
        train_mod.train(parse_config(train_argv(tiny_vit, demo_data, tmp_path / "r2", "--spatial_size", "224")))


def test_the_global_batch_must_divide_into_chunks(tiny_vit, demo_data, tmp_path):
    with pytest.raises(SetupError, match="--batch_size 6 is not divisible by --batch_split 4"):
        train_mod.train(parse_config(train_argv(tiny_vit, demo_data, tmp_path / "run", "--batch_size", "6",
                                                "--batch_split", "4")))
    assert not (tmp_path / "run").exists()


def test_pretrain_starts_from_another_models_decoder(tiny_vit, demo_data, tmp_path, capsys):
    """--pretrain: a 4-class run's decoder initialises a 5-class model; the head of another
    shape is left as initialised, and said. A resume takes precedence over it."""
    src = tmp_path / "src"
    train_mod.train(parse_config(train_argv(tiny_vit, demo_data, src, "--num_steps", "1", "--save_freq", "1")))
    path = str(src / "checkpoint-1.pth")
    saved = safe_load(path)["model"]
    model = build_tiny(tiny_vit, seed=3, num_classes=5)
    head = model.proj[2].weight.detach().clone()
    left_out = ckpt_io.load_pretrained(model, path)
    own = model.state_dict()
    decoder = [k for k in saved if k.startswith("decoder.")]
    assert decoder and all(torch.equal(own[k], saved[k]) for k in decoder)
    assert torch.equal(model.proj[2].weight, head)
    assert left_out == ["other shape, kept as initialised: proj.2.bias, proj.2.weight"]

    capsys.readouterr()
    out = tmp_path / "ft"
    train_mod.train(parse_config(train_argv(tiny_vit, demo_data, out, "--num_steps", "1", "--save_freq", "1",
                                            "--pretrain", path)))
    assert f"initialised from {path}" in capsys.readouterr().out
    train_mod.train(parse_config(train_argv(tiny_vit, demo_data, out, "--num_steps", "2", "--auto_resume",
                                            "--pretrain", path)))
    assert "initialised from" not in capsys.readouterr().out
    assert os.path.isfile(out / "checkpoint-2.pth")


def test_a_checkpoint_from_before_the_global_batch_resumes(tiny_vit, demo_data, tmp_path, capsys):
    """A checkpoint of format 1 stored the batch of each process: 4 in each of 2 processes is a
    global batch of 8, which a one-process run with --batch_size 8 continues."""
    out = tmp_path / "run"
    train_mod.train(parse_config(train_argv(tiny_vit, demo_data, out, "--num_steps", "2", "--save_freq", "2")))
    path = out / "checkpoint-2.pth"
    state = safe_load(str(path))
    state["format"] = "evl-checkpoint/1"
    state["config"]["batch_size"] = 4
    state["rng_per_rank"] = state["rng_per_rank"] * 2
    torch.save(state, path)
    with pytest.raises(SetupError, match=r"global batch \(--batch_size\) 8 -> 4"):
        train_mod.train(parse_config(train_argv(tiny_vit, demo_data, out, "--num_steps", "4", "--auto_resume",
                                                "--batch_size", "4")))
    result = train_mod.train(parse_config(train_argv(tiny_vit, demo_data, out, "--num_steps", "4", "--auto_resume")))
    assert result["step"] == 4
