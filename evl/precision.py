"""Mixed precision for the trainable part: bf16 autocast by default on GPU, fp16 with a grad
scaler on request, fp32 on CPU. (The frozen backbone picks its own precision: evl.backbone.)"""

from __future__ import annotations

import contextlib

import torch


def resolve_precision(name: str | None, device: torch.device) -> str:
    if name is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--mixed_precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return name


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
