"""Shared fixtures: a tiny open_clip ViT config written by the tests, and the `gpu` marker."""

import json
import warnings

import pytest
import torch


TINY_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 16,
                                             "head_width": 16}}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> str:
    """Path of a tiny open_clip model-config JSON: 64 px, patch 16, width 64, 4 blocks, 4 heads."""
    path = tmp_path_factory.mktemp("cfg") / "tiny-vit.json"
    path.write_text(json.dumps(TINY_VIT))
    return str(path)


def build_tiny(tiny_vit: str, seed: int = 0, **kw):
    import evl

    torch.manual_seed(seed)
    kw.setdefault("num_classes", 5)
    kw.setdefault("num_frames", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evl.build_model(tiny_vit, **kw)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small H.264 demo dataset (32 train / 12 val clips of 8 frames, 64 px)."""
    from evl.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path_factory.mktemp("demo")), num_train=32, num_val=12, num_frames=8)


def train_argv(tiny_vit, demo, out, *extra):
    """Flags for a tiny CPU run on the demo data; ``extra`` overrides."""
    return ["--backbone", tiny_vit, "--num_classes", "4", "--num_frames", "4", "--sampling_rate", "2",
            "--train_list_path", demo.train_list, "--val_list_path", demo.val_list, "--data_root", demo.root,
            "--batch_size", "8", "--num_workers", "0", "--auto_augment", "none", "--crop_scale", "0.5", "1",
            "--num_temporal_views", "2", "--lr", "1e-3", "--print_freq", "1", "--eval_freq", "1000",
            "--save_freq", "1000", "--device", "cpu", "--output_dir", str(out), *extra]


def pytest_unconfigure(config):
    """As ``evl.cli.run_program`` does for the entry points: the objects left at the end are kept
    out of the interpreter's last garbage collections, which otherwise walk every object torch
    and open_clip made at import (over a second at exit)."""
    import gc

    gc.freeze()
