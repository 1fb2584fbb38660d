"""Loading EVL checkpoints: this project's and the reference implementation's released ones.

Both hold the decoder and head only (``decoder.*``, ``proj.*``), the reference's with DDP's
``module.`` prefix and usually wrapped as ``{'model': ...}`` (spec §3). Every file load goes
through ``torch.load(weights_only=True)``. A folder written by ``evl.export`` (``config.json`` +
``model.safetensors``, optionally with the backbone's weights under ``backbone.*``) is read
without unpickling anything and loads wherever a checkpoint file does. A checkpoint of another
model (frame count, width, depth, patch grid, class count) is refused with a message saying what
differs, never loaded partially.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch
from torch import nn

from pipelines.files import atomic_write

from .weights import WeightsError, is_safetensors, load_visual_state, read_safetensors, safe_load, strip_prefix

__all__ = ["load_checkpoint", "load_state", "read_checkpoint", "read_exported", "load_pretrained", "read_model_state",
           "describe_state", "global_batch", "EXPORT_FORMAT", "EXPORT_CONFIG", "EXPORT_WEIGHTS"]


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

    Accepts this project's checkpoints, the reference implementation's (``module.`` keys, with
    or without the ``{'model': ...}`` wrapper) and folders written by ``evl.export`` (whose
    backbone weights, when it includes them, are loaded too). Strict: any missing, unexpected or
    differently shaped key is an error that compares the two architectures.
    """
    return load_state(model, read_checkpoint(path), path)


def load_state(model: nn.Module, ckpt: Any, path: str) -> dict:
    """:func:`load_checkpoint` of a checkpoint already read (:func:`read_checkpoint`) from ``path``."""
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
    backbone = ckpt.get("backbone_weights") if isinstance(ckpt, Mapping) else None
    if backbone is not None:  # an exported folder with its backbone: the model becomes the exported one
        source = path if os.path.isfile(path) else os.path.join(path, EXPORT_WEIGHTS)
        load_visual_state(model.backbone.visual, backbone, source, model.spec)
        if isinstance(getattr(model, "config", None), dict):
            model.config.update(backbone_path=None, backbone_sha256=ckpt["model_config"].get("backbone_sha256"))
    model.load_state_dict(sd, strict=True)
    if isinstance(ckpt, dict) and "model" in ckpt:
        return {k: v for k, v in ckpt.items() if k != "backbone_weights"}
    return {"model": sd}


# -- exported models (``evl.export``) ------------------------------------------------------------

EXPORT_FORMAT = "evl-export/1"
EXPORT_CONFIG = "config.json"  # written last: a folder without it is an unfinished export
EXPORT_WEIGHTS = "model.safetensors"
BACKBONE_PREFIX = "backbone."  # the CLIP visual tower's keys, when the export includes it


def read_checkpoint(path: str) -> Any:
    """What a checkpoint holds, from a ``.pth`` file (``torch.load(weights_only=True)``), a
    safetensors file of decoder weights, or a folder written by ``evl.export`` (as a checkpoint
    dict: :func:`read_exported`). Nothing is unpickled beyond tensors, dicts, lists and numbers."""
    if os.path.isdir(path):
        return read_exported(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) == EXPORT_WEIGHTS and os.path.isfile(os.path.join(folder, EXPORT_CONFIG)):
        return read_exported(folder)
    if path.endswith(".safetensors") or is_safetensors(path):
        return read_safetensors(path)
    return safe_load(path)


def _check_fields(record: Any, fields: Mapping[str, type], where: str) -> dict:
    if not isinstance(record, dict):
        raise WeightsError(f"{where}: expected an object, found {type(record).__name__}")
    absent = [f for f in fields if f not in record]
    if absent:
        raise WeightsError(f"{where}: missing {', '.join(absent)}")
    wrong = [f"{f} ({type(record[f]).__name__}, not {t.__name__})" for f, t in fields.items()
             if not isinstance(record[f], t) or isinstance(record[f], bool)]
    if wrong:
        raise WeightsError(f"{where}: {', '.join(wrong)}")
    return record


def read_exported(path: str) -> dict:
    """The checkpoint dict of a folder ``evl.export`` wrote: ``model`` (decoder and head),
    ``model_config``, ``config`` (its sampling, views and seed), ``evaluation``, ``class_names``,
    ``backbone_weights`` (the visual tower's state dict, or None) and ``format``.

    Reads JSON and safetensors only. A folder that lacks a file, or whose files disagree, is a
    ``WeightsError`` naming the file.
    """
    config_path, weights_path = os.path.join(path, EXPORT_CONFIG), os.path.join(path, EXPORT_WEIGHTS)
    for name in (EXPORT_CONFIG, EXPORT_WEIGHTS):
        if not os.path.isfile(os.path.join(path, name)):
            raise WeightsError(f"{path}: not an exported EVL model: {name} is missing (python -m evl.export writes "
                               f"{EXPORT_CONFIG} and {EXPORT_WEIGHTS})")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{config_path}: not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise WeightsError(f"{config_path}: not an exported EVL model's configuration (format {found!r}; this "
                           f"version reads {EXPORT_FORMAT!r})")
    model_config = dict(_check_fields(config.get("model_config"), {"backbone": str, "num_classes": int,
                                                                   "num_frames": int}, f"{config_path}: model_config"))
    data = _check_fields(config.get("data"), {"sampling_rate": int, "sampling": str, "num_spatial_views": int,
                                              "num_temporal_views": int}, f"{config_path}: data")
    seed = _check_fields({"seed": config.get("seed", 0)}, {"seed": int}, config_path)["seed"]
    backbone_record = config.get("backbone") or {}
    names = config.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                              or len(names) != model_config["num_classes"]):
        raise WeightsError(f"{config_path}: class_names must be a list of {model_config['num_classes']} names")
    # An open_clip model-config JSON the export copied into the folder is named relative to it.
    backbone = model_config["backbone"]
    if backbone.endswith(".json") and not os.path.isabs(backbone) and os.path.isfile(os.path.join(path, backbone)):
        model_config["backbone"] = os.path.join(path, backbone)

    tensors = read_safetensors(weights_path)
    visual = {k[len(BACKBONE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
    included = bool(backbone_record.get("included"))
    if included != bool(visual):
        raise WeightsError(f"{weights_path}: " + (
            f"{EXPORT_CONFIG} says the backbone's weights are included, but there are no backbone.* tensors"
            if included else f"holds backbone.* tensors that {EXPORT_CONFIG} does not declare"))
    return {"format": EXPORT_FORMAT, "model": {k: v for k, v in tensors.items() if not k.startswith(BACKBONE_PREFIX)},
            "model_config": model_config, "config": {**data, "seed": seed},
            "evaluation": config.get("evaluation"), "class_names": names, "source": config.get("source"),
            "backbone_weights": visual or None}


def load_pretrained(model: nn.Module, path: str) -> list[str]:
    """``--pretrain``: start from ``path``'s decoder and head weights (this project's checkpoint, an
    ``evl.export`` folder or the reference's), e.g. a Kinetics model fine-tuned on another
    dataset. Unlike a resume it is not strict, as in the reference: keys the model lacks, or
    holds with another shape (a head for another class count), are left out. Returns a line per
    kind of key left out."""
    ckpt = read_checkpoint(path)
    sd = read_model_state(ckpt, path)
    own = model.state_dict()
    if any(k.startswith(("backbone.", "visual.")) for k in sd):
        raise WeightsError(f"{path}: holds backbone weights: --pretrain takes an EVL checkpoint (decoder and head)")
    shapes = sorted(k for k in own.keys() & sd.keys() if own[k].shape != sd[k].shape)
    usable = {k: v for k, v in sd.items() if k in own and k not in shapes}
    if not usable:
        raise WeightsError(f"{path}: no weight of this model in it (it has {describe_state(sd)}; the model has "
                           f"{describe_state(own)})")
    model.load_state_dict(usable, strict=False)
    return [f"{label}: {', '.join(keys[:5])}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
            for label, keys in (("kept as initialised (not in the checkpoint)", sorted(own.keys() - sd.keys())),
                                ("not in this model", sorted(sd.keys() - own.keys())),
                                ("other shape, kept as initialised", shapes)) if keys]


# -- saving and resuming (this project's format) ---------------------------------------------

# 2: the config's batch_size is the global batch (1: the batch of each process).
FORMAT = "evl-checkpoint/2"


def global_batch(ckpt: dict) -> int | None:
    """The global batch a training checkpoint was written with, from either format."""
    config = ckpt.get("config") or {}
    if "batch_size" not in config:
        return None
    if ckpt.get("format") == "evl-checkpoint/1":
        return config["batch_size"] * len(ckpt.get("rng_per_rank") or [None])
    return config["batch_size"]


def save_atomic(obj: dict, path: str) -> None:
    """``torch.save`` to ``path`` through :func:`pipelines.atomic.atomic_write`: a crash or a full
    disk leaves the previous file intact and names the file."""
    atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint", keeps="earlier checkpoints are untouched")


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


# -- the run directory -------------------------------------------------------------------------


class RunDirectoryError(RuntimeError):
    """An ``--output_dir`` this run may not write to: another run's, or in use."""


class RunDirectory:
    """A training run's ``--output_dir``: its checkpoints (names, pruning, ``best.pth``),
    ``config.json``, ``metrics.jsonl``, and the lock that keeps a second writer out.

    ``checkpoint-<step>.pth`` files are the run's resume points, the last ``keep_last`` kept;
    ``best.pth`` is the best evaluation's. Every file is written atomically. The lock is an
    ``flock`` on ``.lock``, held while the run lives: the kernel releases it when the process
    ends, however it ends, so a killed run never blocks its own resume.
    """

    # ``tensorboard``, ``wandb_run_id``: --report_to's (W&B's own offline files, which may not be
    # uploaded yet, are never deleted).
    RUN_FILES = ("config.json", "metrics.jsonl", "best.pth", "best.json", "tensorboard", "wandb_run_id")

    def __init__(self, path: str, keep_last: int = 2):
        self.path, self.keep_last = path, keep_last
        self._lock_file = None

    def checkpoints(self) -> list[tuple[int, str]]:
        """``(step, path)`` of the resume points, oldest first."""
        import glob
        import os
        import re

        found = []
        for path in glob.glob(os.path.join(self.path, "checkpoint-*.pth")):
            m = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
            if m:
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self) -> str | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def run_files(self) -> list[str]:
        """The names of an earlier run's files here (empty for a new directory)."""
        import os

        names = [os.path.basename(p) for _, p in self.checkpoints()]
        return names + [n for n in self.RUN_FILES if os.path.exists(os.path.join(self.path, n))]

    def lock(self) -> None:
        """Take the directory for this process, or raise naming the process that has it."""
        import fcntl
        import os
        import socket
        import time

        os.makedirs(self.path, exist_ok=True)
        path = os.path.join(self.path, ".lock")
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirectoryError(f"{self.path} is in use by another run ({holder}): two runs writing one "
                                    "directory would mix their checkpoints; wait for it, or use another "
                                    "--output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def remove_temporaries(self) -> list[str]:
        """Deletes the temporary files of saves a kill interrupted (safe under the lock: no
        other writer); returns their names."""
        import glob
        import os

        gone = []
        for path in glob.glob(os.path.join(self.path, ".tmp-*")):
            os.remove(path)
            gone.append(os.path.basename(path))
        return gone

    def start_over(self) -> list[str]:
        """Deletes an earlier run's files (``--overwrite_output_dir``); returns their names."""
        import os

        import shutil

        names = self.run_files()
        for name in names + ["curves.png"]:
            path = os.path.join(self.path, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        return names

    def write_config(self, config: dict) -> None:
        import json
        import os

        atomic_write(os.path.join(self.path, "config.json"), (json.dumps(config, indent=2) + "\n").encode(),
                     what="run configuration", keeps="checkpoints written so far are untouched")

    def save(self, state: dict, step: int) -> str:
        """``checkpoint-<step>.pth``, then the oldest beyond ``keep_last`` removed."""
        import os

        path = os.path.join(self.path, f"checkpoint-{step}.pth")
        save_atomic(state, path)
        for _, old in self.checkpoints()[:-self.keep_last]:
            if old != path:
                os.remove(old)
        return path

    def save_best(self, state: dict, best: dict) -> str:
        """``best.pth``, and ``best.json`` (its step and scores) beside it: a resumed run reads
        the best score from there, since an evaluation may follow the checkpoint it resumes."""
        import json
        import os

        path = os.path.join(self.path, "best.pth")
        save_atomic(state, path)
        atomic_write(os.path.join(self.path, "best.json"), json.dumps(best).encode(), what="best score",
                     keeps="best.pth is written")
        return path

    def best_record(self) -> dict | None:
        """The scores of ``best.pth`` (``{"top1", "top5", "step"}``), or None."""
        import json
        import os

        try:
            with open(os.path.join(self.path, "best.json"), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("top1"), (int, float)) else None
