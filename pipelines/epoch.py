"""One epoch of a split, the same for every backend (PyAV, DALI, the feature cache).

Which samples a process gets and in which order (training: whole global batches of one
shuffled order, so any number of processes sees the same global batches; evaluation: every
sample exactly once), how many batches that makes, and which video stands in for a training
sample whose video cannot be read. Every draw is keyed by (seed, epoch, sample), never by
worker or process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .base import PipelineConfig
from .sampling import epoch_permutation, shard_indices

__all__ = ["MAX_REPLACEMENTS", "EpochKeys", "KeyStream", "batches_per_epoch", "training_epoch", "replacements",
           "train_shard"]

MAX_REPLACEMENTS = 10  # videos a training sample tries before it gives up
_REPLACEMENT_STREAM = 99  # a sampler stream number of its own (pipelines.sampling numbers its own from 1)


def train_shard(order: Sequence[int], batch_size: int, rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s part of each global batch of ``order``, whole global batches only.

    Global batch g is ``order[g*G:(g+1)*G]`` with ``G = batch_size * world_size``, whatever the
    number of processes, so 8 GPUs x 32, 4 x 64 and 1 x 256 (with accumulation) see the same
    global batches and, up to float rounding, take the same steps.
    """
    g = batch_size * world_size
    usable = len(order) // g * g
    return [int(order[start + rank * batch_size + j]) for start in range(0, usable, g) for j in range(batch_size)]


def batches_per_epoch(num_keys: int, cfg: PipelineConfig, what: str) -> int:
    """Batches of ``num_keys`` keys: training drops a last partial batch (the ranks step
    together), evaluation keeps it. ``what`` names the data in the error for an empty epoch."""
    if not training_epoch(cfg):
        return -(-num_keys // cfg.batch_size)
    if num_keys < cfg.batch_size:
        raise ValueError(f"{what}: {num_keys} samples per process are fewer than one batch of {cfg.batch_size} "
                         f"({cfg.world_size} process(es))")
    return num_keys // cfg.batch_size


def training_epoch(cfg: PipelineConfig) -> bool:
    """Whether ``cfg`` reads a training epoch: shuffled whole batches, a sample whose video fails
    replaced by another. Evaluation, and reading given ``keys``, keep the last partial batch and
    leave a bad video out."""
    return cfg.train and cfg.keys is None


def replacements(seed: int, epoch: int, index: int, num_samples: int) -> Iterator[int]:
    """The videos a training sample tries, in order: its own, then up to ``MAX_REPLACEMENTS`` - 1
    others from a stream of its own, the same in every backend (a generator is only made if a
    video fails: it costs 15 us per clip)."""
    yield index
    rng = np.random.default_rng([seed, epoch, index, _REPLACEMENT_STREAM])
    for _ in range(MAX_REPLACEMENTS - 1):
        yield int(rng.integers(num_samples))


class EpochKeys(torch.utils.data.Sampler):
    """This rank's ``(epoch, index)`` keys: a shuffled padded shard (train), an exact one (eval), or
    the config's ``keys`` as given."""

    def __init__(self, num_samples: int, cfg: PipelineConfig):
        self.n, self.cfg, self.epoch, self.skip = num_samples, cfg, 0, 0

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's samples of ``epoch`` (default: the current one), in order."""
        cfg = self.cfg
        if not cfg.train:
            return shard_indices(self.n, cfg.rank, cfg.world_size, pad=False)
        epoch = self.epoch if epoch is None else epoch
        return train_shard(epoch_permutation(self.n, cfg.seed, epoch), cfg.batch_size, cfg.rank, cfg.world_size)

    def _keys(self) -> Sequence[tuple[int, int]]:
        if self.cfg.keys is not None:
            return self.cfg.keys
        return [(self.epoch, i) for i in self.indices()]

    def __len__(self) -> int:
        return len(self._keys()) - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(int(e), int(i)) for e, i in self._keys()[self.skip:]])


class KeyStream(torch.utils.data.Sampler):
    """A training run's keys epoch after epoch, without end, from ``start`` = (epoch, skipped keys).

    Each epoch is ``EpochKeys``' whole batches, so no batch mixes two epochs, and a key is the
    same (epoch, index) a fresh epoch would give: which clips a run sees does not change. What
    changes is that DataLoader workers fed from it decode the next epoch's first batches while
    the training process finishes this one, as the reference's step-based sampler lets them,
    instead of idling while an epoch drains, which on a list of a few batches is much of the time.
    """

    def __init__(self, keys: EpochKeys):
        self.keys, self.start = keys, (0, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.start
        while True:
            for i in self.keys.indices(epoch)[skip:]:
                yield epoch, int(i)
            epoch, skip = epoch + 1, 0
