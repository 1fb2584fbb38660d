"""Dummy pipeline (``--pipeline dummy``, alias ``--dummy_dataset``): correctly shaped batches at
negligible cost, for measuring the model and the loop without any decoding.

The batches are made once, on the device, and yielded again and again; labels cycle through the
classes. The list file, when given, only sets the epoch length (as in the reference).
"""

from __future__ import annotations

from typing import Iterator

import torch

from .base import Batch, PipelineConfig
from .sampling import shard_indices


class DummyPipeline:
    def __init__(self, cfg: PipelineConfig, num_samples: int | None = None):
        self.cfg = cfg
        if num_samples is None:
            if cfg.list_path:
                with open(cfg.list_path, encoding="utf-8") as f:
                    num_samples = sum(1 for line in f if line.strip() and not line.startswith("#"))
            else:
                num_samples = 100 * cfg.batch_size * cfg.world_size
        self.num_samples = num_samples
        views = 1 if cfg.train else cfg.num_spatial_views * cfg.num_temporal_views
        g = torch.Generator().manual_seed(cfg.seed)
        b, s = cfg.batch_size, cfg.input_size
        self.clips = torch.randn(b * views, 3, cfg.num_frames, s, s, generator=g).to(cfg.device)
        self.labels = (torch.arange(b * views) // views % cfg.num_classes).to(cfg.device)
        self.view = (torch.arange(b * views) % views).to(cfg.device)
        self.views = views
        self.shard = shard_indices(num_samples, cfg.rank, cfg.world_size, pad=cfg.train)
        self.skip = 0

    def __len__(self) -> int:
        n = len(self.shard)
        return n // self.cfg.batch_size if self.cfg.train else -(-n // self.cfg.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.skip = skip_batches

    def __iter__(self) -> Iterator[Batch]:
        b = self.cfg.batch_size
        start, self.skip = self.skip, 0
        for i in range(start, len(self)):
            idx = torch.tensor(self.shard[i * b:(i + 1) * b], device=self.cfg.device)
            rows = len(idx) * self.views
            yield Batch(self.clips[:rows], self.labels[:rows], idx.repeat_interleave(self.views), self.view[:rows])
