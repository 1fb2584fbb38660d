"""EVL: Frozen CLIP Models are Efficient Video Learners (Lin et al., ECCV 2022).

Public API: :func:`build_model` builds the model on a frozen open_clip ViT and
:func:`load_checkpoint` loads this project's or the reference implementation's checkpoints, or a
folder written by ``python -m evl.export`` (``config.json`` + ``model.safetensors``).
"""

from .checkpoint import load_checkpoint
from .model import EVLConfig, EVLModel, build_model

__all__ = ["build_model", "load_checkpoint", "EVLConfig", "EVLModel"]
