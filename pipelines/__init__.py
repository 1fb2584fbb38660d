"""Everything between a list file and a batch on the device.

:func:`build_pipeline` is the one factory: it imports a backend only when it is asked for, so a
machine without DALI or a GPU still imports everything else. See :mod:`pipelines.base` for
what a pipeline yields.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Batch, Pipeline, PipelineConfig, TooManyBadVideos

_FROM_BASE = ("Batch", "Pipeline", "PipelineConfig", "TooManyBadVideos")


def __getattr__(name: str):
    """The batch types, imported on first use: they import torch, which a process that only
    lists, probes or re-encodes videos (an ``evl.prepare`` worker) does not need."""
    if name in _FROM_BASE:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# name -> (module, class); "cache" reads features written by `python -m evl.cache build`.
BACKENDS = {
    "pyav": ("pipelines.pyav", "PyAVPipeline"),
    "dali": ("pipelines.dali", "DALIPipeline"),
    "dummy": ("pipelines.dummy", "DummyPipeline"),
    "cache": ("pipelines.cache", "CachePipeline"),
}


def cpu_workers(name: str, num_workers: int) -> int:
    """How many CPU workers backend ``name`` runs beside the training step, given
    ``--num_workers``: its decoding processes (PyAV) or threads (DALI), the feature cache's one
    read-ahead thread, none for synthetic batches. The training process leaves them a core each
    (``evl.distributed.threads_beside_decoders``)."""
    if name == "cache":
        return 1
    return 0 if name == "dummy" else num_workers


def available_backends() -> list[str]:
    """Backends whose module imports here (DALI only where nvidia-dali is installed)."""
    names = []
    for name, (module, _) in BACKENDS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        names.append(name)
    return names


def build_pipeline(name: str, cfg: PipelineConfig) -> Pipeline:
    if name not in BACKENDS:
        raise ValueError(f"unknown pipeline {name!r}; choose from {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        hint = " (pip install '.[dali]', or use --pipeline pyav)" if name == "dali" else ""
        raise ImportError(f"pipeline {name!r} is not available here: {e}{hint}") from e
    return getattr(mod, cls)(cfg)


__all__ = ["Batch", "Pipeline", "PipelineConfig", "TooManyBadVideos", "build_pipeline", "available_backends",
           "cpu_workers", "BACKENDS"]


def __dir__() -> list[str]:
    return sorted([*globals(), *_FROM_BASE])
