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
