"""Loading EVL checkpoints: this project's and the reference implementation's released ones.

Both hold the decoder and head only (``decoder.*``, ``proj.*``), the reference's with DDP's
``module.`` prefix and usually wrapped as ``{'model': ...}`` (spec §3). Every load goes through
``torch.load(weights_only=True)``. A checkpoint of another model (frame count, width, depth,
patch grid, class count) is refused with a message saying what differs, never loaded partially.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .weights import WeightsError, safe_load, strip_prefix

__all__ = ["load_checkpoint", "read_model_state", "describe_state"]


def read_model_state(ckpt: Any, path: str) -> dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint object, without DDP prefixes."""
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: no model state dict found (expected a dict of tensors, "
                           "or {'model': {...}, ...})")
    return strip_prefix(sd, "module.")


def describe_state(sd: Mapping[str, torch.Tensor]) -> str:
    """The architecture a decoder state dict implies, e.g. '8 frames, 4 layers, width 768, ...'."""
    layers = {k.split(".")[2] for k in sd if k.startswith("decoder.decoder_layers.")}
    parts = [f"{len(layers)} decoder layers"]
    if "decoder.cls_token" in sd:
        parts.append(f"width {sd['decoder.cls_token'].shape[0]}")
    if "decoder.temporal_pos_embed.0" in sd:
        parts.append(f"{sd['decoder.temporal_pos_embed.0'].shape[0]} frames")
    if "decoder.cross_attention.0.w1" in sd:
        rows = sd["decoder.cross_attention.0.w1"].shape[0]
        side = (round(rows ** 0.5) + 1) // 2
        parts.append(f"{side}x{side} patch grid" if (2 * side - 1) ** 2 == rows else f"{rows} offset rows")
    if "proj.2.weight" in sd:
        parts.append(f"{sd['proj.2.weight'].shape[0]} classes")
    return ", ".join(parts)


def load_checkpoint(model: nn.Module, path: str) -> dict:
    """Load decoder and head weights into ``model``; returns the whole checkpoint dict.

    Accepts this project's checkpoints and the reference implementation's (``module.`` keys,
    with or without the ``{'model': ...}`` wrapper). Strict: any missing, unexpected or
    differently shaped key is an error that compares the two architectures.
    """
    ckpt = safe_load(path)
    sd = read_model_state(ckpt, path)
    own = model.state_dict()
    backbone_keys = sorted(k for k in sd if k.startswith(("backbone.", "visual.")))
    missing = sorted(own.keys() - sd.keys())
    unexpected = sorted(sd.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & sd.keys() if own[k].shape != sd[k].shape)
    if backbone_keys:
        raise WeightsError(f"{path}: holds backbone weights ({backbone_keys[0]}, ...): EVL checkpoints hold the "
                           "decoder and head only; pass CLIP weights with --backbone_path")
    if missing or unexpected or shapes:
        detail = [f"{label}: {', '.join(keys[:5])}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                  for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys]
        raise WeightsError(f"{path} is a checkpoint of another model: checkpoint has {describe_state(sd)}; "
                           f"model has {describe_state(own)}. " + "; ".join(detail))
    model.load_state_dict(sd, strict=True)
    return ckpt if isinstance(ckpt, dict) and "model" in ckpt else {"model": sd}


# -- saving and resuming (this project's format) ---------------------------------------------

FORMAT = "evl-checkpoint/1"


def save_atomic(obj: dict, path: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``.

    A crash or a full disk leaves the previous file intact; the temp file is removed.
    """
    import os
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not write checkpoint {path} ({e.strerror}); earlier checkpoints "
                                   "are untouched") from e
        raise


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(model: nn.Module, optimizer, scheduler, scaler, next_step: int, config: dict,
                   metrics: dict | None = None, rng_per_rank: list[dict] | None = None) -> dict:
    """Everything an exact resume needs, loadable with ``weights_only=True``.

    ``rng_per_rank``: every rank's :func:`rng_state` (``evl.distributed.all_gather_object``), so
    that each rank of a resumed run continues its own dropout stream; ``rng`` is this process's.
    """
    return {
        "format": FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "lr_sched": scheduler.state_dict(), "loss_scaler": scaler.state_dict(), "next_step": next_step,
        "rng": rng_state(), "rng_per_rank": rng_per_rank or [rng_state()], "config": config,
        "model_config": dict(getattr(model, "config", {})), "metrics": metrics or {},
    }


def check_backbone_identity(ckpt: dict, model: nn.Module, path: str) -> None:
    """Refuse to resume or evaluate a checkpoint with another backbone than it was trained on."""
    saved, own = ckpt.get("model_config") or {}, getattr(model, "config", {})
    for key in ("backbone_id", "backbone_sha256"):
        if saved.get(key) != own.get(key):
            raise WeightsError(f"{path} was trained with backbone {saved.get('backbone_id')} "
                               f"(weights sha256 {saved.get('backbone_sha256')}), but this run uses "
                               f"{own.get('backbone_id')} (weights sha256 {own.get('backbone_sha256')})")
