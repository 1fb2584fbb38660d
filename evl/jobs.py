"""What a training or evaluation job builds from its :class:`~evl.config.TrainConfig`: the flags
checked, the model (seeded the same on every rank, a checkpoint loaded and its backbone
checked) and the pipelines of its splits. ``evl.train`` and ``evl.eval`` both start here.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from . import checkpoint as ckpt_io
from .cli import SetupError
from .config import TrainConfig
from .distributed import World
from .model import EVLModel, build_model

__all__ = ["check_inputs", "check_world", "setting_up", "build_run_model", "load_run_checkpoint", "has_val_data",
           "pipeline_config", "make_pipeline"]


def check_inputs(cfg: TrainConfig) -> None:
    """Fail on inconsistent flags before any heavy work."""
    problems = []
    if not cfg.eval_only and not cfg.train_list_path and cfg.pipeline not in ("dummy", "cache"):
        problems.append("--train_list_path is required for training")
    if cfg.eval_only and not (cfg.val_list_path or cfg.pipeline in ("dummy", "cache")):
        problems.append("--eval_only needs --val_list_path")
    # An evl.export folder holds a model to evaluate or start from, not a run to resume.
    folder_ok = {"pretrain"} | ({"resume_path"} if cfg.eval_only else set())
    for flag in ("train_list_path", "val_list_path", "backbone_path", "resume_path", "pretrain"):
        path = getattr(cfg, flag)
        if path and not os.path.isfile(path) and not (flag in folder_ok and os.path.isdir(path)):
            problems.append(f"--{flag} {path}: file not found")
    at_least = {"batch_size": 1, "batch_split": 1, "num_steps": 1, "save_freq": 1, "eval_freq": 1, "print_freq": 1,
                "keep_last": 1, "warmup_steps": 0, "num_workers": 0, "num_frames": 1, "num_classes": 1,
                "num_temporal_views": 1}
    if cfg.sampling == "dense":
        at_least["sampling_rate"] = 1
    for flag, low in at_least.items():
        if getattr(cfg, flag) < low:
            problems.append(f"--{flag} {getattr(cfg, flag)} must be at least {low}")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        problems.append(f"--max_bad_fraction {cfg.max_bad_fraction} must be in [0, 1]")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)) or cfg.weight_decay < 0:
        problems.append(f"--lr {cfg.lr} must be positive and --weight_decay {cfg.weight_decay} not negative")
    if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        problems.append(f"--crop_scale {cfg.crop_scale[0]} {cfg.crop_scale[1]} must satisfy 0 < MIN <= MAX <= 1")
    if cfg.overwrite_output_dir and (cfg.auto_resume or cfg.resume_path):
        problems.append("--overwrite_output_dir starts a run over: it cannot go with --auto_resume or --resume_path")
    if cfg.batch_size >= 1 and cfg.batch_split >= 1 and cfg.batch_size % cfg.batch_split:
        problems.append(f"--batch_size {cfg.batch_size} is not divisible by --batch_split {cfg.batch_split}")
    if cfg.pipeline == "cache" and not cfg.feature_cache:
        problems.append("--pipeline cache needs --feature_cache DIR")
    if problems:
        raise SetupError("; ".join(problems))


@contextlib.contextmanager
def setting_up():
    """Before the first step, a plain ``ValueError`` is about the input (the flags, the model, the
    data): it becomes a :class:`SetupError`, one line for the user. Its subclasses say what they
    are (``ListFileError``, ``WeightsError``, ...) and pass as they are."""
    try:
        yield
    except ValueError as e:
        if type(e) is not ValueError:
            raise
        raise SetupError(str(e)) from e


def check_world(cfg: TrainConfig, world: World) -> None:
    """What the flags ask of this process count: the global batch must divide among the processes
    (training; an evaluation takes any count)."""
    if not cfg.eval_only:
        cfg.batch_per_process(world.world_size)


def build_run_model(cfg: TrainConfig, world: World) -> EVLModel:
    """The run's model, the same on every rank (a random backbone included: it is the seed's);
    the global RNG is left seeded per rank, so ranks draw different dropout masks."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_config())
    torch.manual_seed(cfg.seed + world.rank)
    size = model.spec.image_size[0]
    if cfg.spatial_size is not None and cfg.spatial_size != size:
        raise ValueError(f"--spatial_size {cfg.spatial_size}: backbone {cfg.backbone} takes {size}x{size} frames")
    return model


def load_run_checkpoint(model: EVLModel, path: str) -> dict:
    """Load ``path`` into ``model``; a checkpoint of ours must name the same backbone weights."""
    state = ckpt_io.load_checkpoint(model, path)
    if "model_config" in state:
        ckpt_io.check_backbone_identity(state, model, path)
    return state


def has_val_data(cfg: TrainConfig) -> bool:
    return bool(cfg.val_list_path) or cfg.pipeline == "dummy" or (
        cfg.pipeline == "cache" and os.path.isdir(os.path.join(cfg.feature_cache, "val")))


def pipeline_config(cfg: TrainConfig, world: World, train: bool, input_size: int, model_config: dict | None = None):
    """The pipelines' view of the run configuration, for one split: this process's share of the
    global batch (training), or a training chunk's worth of videos (evaluation)."""
    batch = cfg.batch_per_process(world.world_size) if train else cfg.eval_batch_per_process(world.world_size)
    return cfg.data_config(train).pipeline_config(
        list_path=cfg.train_list_path if train else cfg.val_list_path, train=train, num_frames=cfg.num_frames,
        num_classes=cfg.num_classes, input_size=input_size, batch_size=batch, seed=cfg.seed,
        device=str(world.device), rank=world.rank, world_size=world.world_size,
        extra={"feature_cache": cfg.feature_cache, "cache_in_memory": cfg.cache_in_memory,
               "model_config": model_config, **cfg.extra})


def make_pipeline(cfg: TrainConfig, world: World, train: bool, input_size: int, model_config: dict | None = None):
    from pipelines import build_pipeline

    return build_pipeline(cfg.pipeline, pipeline_config(cfg, world, train, input_size, model_config))
