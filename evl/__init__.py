"""EVL: Frozen CLIP Models are Efficient Video Learners (Lin et al., ECCV 2022).

Public API: :func:`build_model` builds the model on a frozen open_clip ViT and
:func:`load_checkpoint` loads this project's or the reference implementation's checkpoints, or a
folder written by ``python -m evl.export`` (``config.json`` + ``model.safetensors``).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checkpoint import load_checkpoint
    from .model import EVLConfig, EVLModel, build_model

__all__ = ["build_model", "load_checkpoint", "EVLConfig", "EVLModel"]

_PUBLIC = {"build_model": "model", "EVLConfig": "model", "EVLModel": "model", "load_checkpoint": "checkpoint"}


def __getattr__(name: str):
    """The public API, imported on first use: it imports torch, which a process that only
    re-encodes videos (an ``evl.prepare`` worker) or writes the demo's clips does not need."""
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
