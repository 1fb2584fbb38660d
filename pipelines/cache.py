"""The feature cache: ``--pipeline cache`` reads what ``python -m evl.cache build`` wrote.

The backbone is frozen, so what it hands the decoder for a given clip never changes: the cache
stores it once per stored view and training then runs the decoder alone, without decoding a
video or running the backbone. For each of the last ``M`` blocks a view stores the block's
output tokens ``out [T, L, C]`` and the two head-averaged adjacent-frame attention maps that
are all the decoder uses of its queries and keys (``attn_prev``, ``attn_next``, each
``[T-1, hw, hw]``; see ``evl.decoder.attention_features``), in fp16.

Layout of a split directory (``DIR/train``, ``DIR/val``)::

    manifest.json        written last: identity, geometry, clips, shards with checksums
    build.json           the settings of the build (to resume it, or refuse to mix two)
    shard-00000.npy      float16 [rows, row_elems], row = (clip - first_clip) * views + view
    shard-00000.json     the shard's bookkeeping, written once the .npy is complete

A row is the concatenation, block by block, of ``out``, ``attn_prev`` and ``attn_next``
flattened; ``manifest["fields"]`` gives every field's offset and shape. Shards are written
under a temporary name and renamed when complete, so a half-written shard is never read; every
row has a CRC-32 (checked the first time a store reads the row) and every shard a SHA-256
(``python -m evl.cache verify``). Training views: view ``v`` of clip ``i`` is the sampler's training clip of "epoch"
``v``; in training epoch ``e`` clip ``i`` uses view :func:`train_views` ``(seed, e, N, K)[i]``.
Evaluation stores every temporal x spatial view of each video, as the live pipeline decodes.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, NamedTuple

import numpy as np
import torch

from .base import Batch, PipelineConfig, check_bad_videos
from .lists import VideoRecord
from .epoch import batches_per_epoch, train_shard
from .files import file_sha256
from .sampling import epoch_permutation, shard_indices

__all__ = ["CacheError", "CacheMismatch", "CachePipeline", "FeatureStore", "FORMAT", "bytes_per_view",
           "check_manifest", "read_manifest", "record_fields", "split_dir", "train_views"]

log = logging.getLogger(__name__)

FORMAT = "evl-feature-cache/1"
MANIFEST = "manifest.json"
BUILD = "build.json"
DTYPE = np.float16
FIELDS = ("out", "attn_prev", "attn_next")  # per block, in this order


class CachedBlock(NamedTuple):
    """One backbone block's cached features, as the model takes them (``Batch.features``): its
    output tokens and the temporal cross-attention's maps with the previous and next frame.
    The fields are those of ``evl.backbone.AttentionFeatures``; the decoder reads them by name."""

    out: torch.Tensor
    attn_prev: torch.Tensor
    attn_next: torch.Tensor
_VIEW_STREAM = 5  # after pipelines.sampling's streams 1-4, so a view draw shares no stream with them


class CacheError(RuntimeError):
    """A feature cache that is missing, unfinished or corrupted; the message says which file."""


class CacheMismatch(CacheError):
    """A cache built with other settings than the run that reads it; the message names the fields."""


def split_dir(root: str, train: bool) -> str:
    return os.path.join(root, "train" if train else "val")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npy"


def record_fields(num_frames: int, num_tokens: int, width: int, num_blocks: int) -> list[dict]:
    """Every stored field of a row: block, name, shape and element offset."""
    hw = num_tokens - 1
    shapes = {"out": [num_frames, num_tokens, width], "attn_prev": [num_frames - 1, hw, hw],
              "attn_next": [num_frames - 1, hw, hw]}
    fields, offset = [], 0
    for block in range(num_blocks):
        for name in FIELDS:
            fields.append({"block": block, "name": name, "shape": shapes[name], "offset": offset})
            offset += int(np.prod(shapes[name]))
    return fields


def row_elems(fields: list[dict]) -> int:
    last = fields[-1]
    return last["offset"] + int(np.prod(last["shape"]))


def bytes_per_view(num_frames: int, num_tokens: int, width: int, num_blocks: int) -> int:
    return row_elems(record_fields(num_frames, num_tokens, width, num_blocks)) * np.dtype(DTYPE).itemsize


def train_views(seed: int, epoch: int, num_clips: int, num_views: int) -> np.ndarray:
    """The stored view each clip uses in training epoch ``epoch`` (``out[i]`` for clip ``i``).

    One draw per epoch, keyed by (seed, epoch) on a stream of its own: the same on every rank
    and for every batch size and worker count, like the sampler's draws.
    """
    return np.random.default_rng([seed, epoch, _VIEW_STREAM]).integers(num_views, size=num_clips)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        hint = ("an interrupted build: rerun the same `python -m evl.cache build` command to finish it"
                if os.path.isfile(os.path.join(directory, BUILD)) else
                "build it with `python -m evl.cache build --output ROOT --split train|val ...`")
        raise CacheError(f"{directory} is not a finished feature cache ({MANIFEST} missing): {hint}")
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable manifest: {e}") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: format {manifest.get('format')!r}, this code reads {FORMAT!r}: rebuild the cache")
    return manifest


def cache_identity(cfg: PipelineConfig, model_config: dict | None) -> dict:
    """What a cache is of: the settings of the features it holds, which a run's must equal for
    it to read them. The build records them; a run checks them with :func:`check_manifest`."""
    want = {"split": "train" if cfg.train else "val", "num_frames": cfg.num_frames,
            "sampling_rate": cfg.sampling_rate, "sampling": cfg.sampling, "input_size": cfg.input_size}
    if cfg.train:
        want.update(auto_augment=cfg.auto_augment, crop_scale=list(cfg.crop_scale),
                    crop_ratio=list(cfg.crop_ratio), hflip=cfg.hflip)
    else:
        want.update(num_temporal_views=cfg.num_temporal_views, num_spatial_views=cfg.num_spatial_views)
    if model_config:
        want.update(backbone_id=model_config.get("backbone_id"), backbone_sha256=model_config.get("backbone_sha256"),
                    decoder_num_layers=model_config.get("decoder_num_layers"))
        if model_config.get("backbone_sha256") is None:
            # A random backbone (tests, the demo) has no weights file to hash: it is the seed's.
            want["seed"] = cfg.seed
    if cfg.list_path:
        want["list_sha256"] = file_sha256(cfg.list_path)
    return want


def check_manifest(manifest: dict, expected: dict, where: str) -> None:
    """Raise :class:`CacheMismatch` naming every field where the cache differs from ``expected``."""
    def norm(v):
        return [float(x) for x in v] if isinstance(v, (list, tuple)) else v

    bad = [f"{k}: cache {manifest.get(k)!r}, this run {v!r}" for k, v in expected.items()
           if norm(manifest.get(k)) != norm(v)]
    if bad:
        raise CacheMismatch(f"feature cache {where} does not match this run ({len(bad)} field(s)):\n  "
                            + "\n  ".join(bad) + "\nrebuild it with matching flags, or fix the flags")


class FeatureStore:
    """The rows of a finished cache, memory-mapped (page cache) or loaded into RAM."""

    def __init__(self, directory: str, manifest: dict, in_memory: bool = False, verify: bool = True):
        self.directory, self.manifest, self.verify = directory, manifest, verify
        self.views = int(manifest["num_views"])
        self.rows_per_shard = int(manifest["shard_clips"]) * self.views
        self.elems = int(manifest["row_elems"])
        self.shards, self.crc = [], []
        for sh in manifest["shards"]:
            path = os.path.join(directory, sh["file"])
            if not os.path.isfile(path):
                raise CacheError(f"feature cache shard {path} is missing: rerun the build to rewrite it")
            if os.path.getsize(path) != sh["bytes"]:
                raise CacheError(f"feature cache shard {path} has {os.path.getsize(path)} bytes, the manifest "
                                 f"says {sh['bytes']}: it is damaged; delete it and rerun the build")
            try:
                arr = np.load(path, mmap_mode=None if in_memory else "r")
            except ValueError as e:
                raise CacheError(f"feature cache shard {path} is unreadable ({e}): delete it and rerun the build") \
                    from None
            if arr.dtype != DTYPE or arr.shape != (sh["num_clips"] * self.views, self.elems):
                raise CacheError(f"feature cache shard {path} holds {arr.dtype} {arr.shape}, expected "
                                 f"{np.dtype(DTYPE)} {(sh['num_clips'] * self.views, self.elems)}")
            self.shards.append(arr)
            self.crc.append(np.asarray(sh["row_crc32"], dtype=np.uint32))
        self.checked = [np.zeros(len(c), dtype=bool) for c in self.crc]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Global rows -> ``[len(rows), row_elems]`` float16.

        Each row's CRC-32 is checked the first time this store reads it (a corrupted row is
        never used); later reads of a row that passed skip the check, which otherwise cost as
        much as the copy. ``python -m evl.cache verify`` checks whole shards.
        """
        out = np.empty((len(rows), self.elems), dtype=DTYPE)
        shard_of, local = np.divmod(rows, self.rows_per_shard)
        for k in np.unique(shard_of).tolist():
            sel = np.flatnonzero(shard_of == k)
            out[sel] = self.shards[k][local[sel]]
            if self.verify:
                for j in sel[~self.checked[k][local[sel]]].tolist():
                    if zlib.crc32(out[j]) != self.crc[k][local[j]]:
                        clip, view = divmod(int(rows[j]), self.views)
                        path = os.path.join(self.directory, self.manifest["shards"][k]["file"])
                        raise CacheError(f"feature cache shard {path} is corrupted: row {int(local[j])} (clip "
                                         f"{clip}, view {view}) fails its checksum; delete the shard and rerun "
                                         "the build to rewrite it")
                    self.checked[k][local[j]] = True
        return out


class CachePipeline:
    """``--pipeline cache``: batches of cached backbone features, no decoding and no backbone.

    ``cfg.extra``: ``feature_cache`` (the root holding ``train/`` and ``val/``), ``cache_in_memory``
    (load the shards into RAM instead of reading them through the page cache) and ``model_config``
    (the model's ``config``, to refuse a cache of another backbone or decoder depth).
    """

    def __init__(self, cfg: PipelineConfig):
        root = cfg.extra.get("feature_cache")
        if not root:
            raise ValueError("--pipeline cache needs --feature_cache DIR (built by `python -m evl.cache build`)")
        self.cfg = cfg
        self.directory = split_dir(root, cfg.train)
        manifest = read_manifest(self.directory)
        check_manifest(manifest, cache_identity(cfg, cfg.extra.get("model_config")), self.directory)
        self.manifest = manifest
        self.records = [VideoRecord(path, int(label)) for path, label in manifest["clips"]]
        self.num_samples = len(self.records)
        bad_label = [r for r in self.records if not 0 <= r.label < cfg.num_classes]
        if bad_label:
            raise CacheMismatch(f"feature cache {self.directory}: label {bad_label[0].label} of {bad_label[0].path} "
                                f"is outside [0, {cfg.num_classes}) (--num_classes)")
        self.store = FeatureStore(self.directory, manifest, in_memory=bool(cfg.extra.get("cache_in_memory")))
        self.views = self.store.views
        bad = {int(i) for sh in manifest["shards"] for i in sh["bad"]}
        if bad:
            # Counted as live training counts unreadable videos: past the run's limit, it stops.
            check_bad_videos([(self.records[i].path, "failed to decode when the cache was built") for i in sorted(bad)],
                             self.num_samples, cfg.max_bad_fraction)
            log.warning("%s: %d video(s) failed to decode at build time and are left out", self.directory, len(bad))
        self.valid = np.array([i for i in range(self.num_samples) if i not in bad], dtype=np.int64)
        self.labels = torch.tensor([r.label for r in self.records], dtype=torch.long)
        self.fields = manifest["fields"]
        self.num_blocks = 1 + max(f["block"] for f in self.fields)
        # Per block, (start, stop, shape) of each field of a row, in AttentionFeatures order.
        where = {(f["block"], f["name"]): (f["offset"], f["offset"] + int(np.prod(f["shape"])), tuple(f["shape"]))
                 for f in self.fields}
        self._slices = [[where[b, name] for name in FIELDS] for b in range(self.num_blocks)]
        n = len(self.valid)
        self.epoch, self.skip = 0, 0
        self._views, self._views_epoch = None, None
        self.shard_len = len(self._clips())
        self.batches_per_epoch = batches_per_epoch(self.shard_len, cfg, f"feature cache {self.directory} ({n} clips)")

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def _clips(self) -> np.ndarray:
        """This rank's clips of the epoch, in order: shuffled and padded (train) or exact (eval)."""
        cfg, n = self.cfg, len(self.valid)
        if not cfg.train:
            return self.valid[shard_indices(n, cfg.rank, cfg.world_size, pad=False)]
        # The live pipelines' global batches (pipelines.epoch.train_shard), from the same permutation.
        order = self.valid[epoch_permutation(n, cfg.seed, self.epoch)]
        return np.asarray(train_shard(order, cfg.batch_size, cfg.rank, cfg.world_size), dtype=np.int64)

    def _field_major(self, data: np.ndarray) -> np.ndarray:
        """Rows ``[n, row_elems]`` -> one flat array holding each field's ``[n, ...]`` in turn.

        Fields are consecutive in a row, so field ``[start, stop)`` lands at ``[n*start, n*stop)``.
        The decoder then gets contiguous tensors: views into the row-major batch had the row
        as their batch stride, and the convolution and layer norm copied them (6% of the step).
        """
        n = len(data)
        flat = np.empty(data.size, dtype=data.dtype)
        for block in self._slices:
            for start, stop, _ in block:
                flat[n * start:n * stop].reshape(n, stop - start)[...] = data[:, start:stop]
        return flat

    def _features(self, flat: np.ndarray, n: int) -> list:
        # fp16 to the device (half the bytes), fp32 there: the live backbone hands over fp32 too.
        x = torch.from_numpy(flat).to(self.cfg.device, non_blocking=True).float()
        return [CachedBlock(*(x[n * start:n * stop].view(n, *shape) for start, stop, shape in block))
                for block in self._slices]

    def _rows(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch's clips -> (store rows, clip index and view of each sample)."""
        views = self.views
        if self.cfg.train:
            if self._views_epoch != self.epoch:
                self._views = train_views(self.cfg.seed, self.epoch, self.num_samples, views)
                self._views_epoch = self.epoch
            view = self._views[chunk]
            # The Batch contract: view 0 in training.
            return chunk * views + view, chunk, np.zeros_like(chunk)
        index = np.repeat(chunk, views)
        view_out = np.tile(np.arange(views), len(chunk))
        return index * views + view_out, index, view_out

    def _read(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, index, view = self._rows(chunk)
        return self._field_major(self.store.read(rows)), index, view

    def _batch(self, data: np.ndarray, index: np.ndarray, view: np.ndarray) -> Batch:
        device, idx = self.cfg.device, torch.from_numpy(index)
        return Batch(None, self.labels[idx].to(device), idx.to(device), torch.from_numpy(view).to(device),
                     features=self._features(data, len(index)))

    def __iter__(self) -> Iterator[Batch]:
        bs, clips = self.cfg.batch_size, self._clips()
        chunks = [clips[b * bs:(b + 1) * bs] for b in range(self.skip, self.batches_per_epoch)]
        self.skip = 0
        # One batch read ahead in a thread: numpy copies and CRC-32 release the GIL, so with large
        # rows (ViT-B: 13 MiB a view) reading overlaps the decoder's step instead of adding to it.
        # The thread runs numpy only. A torch op there would start a second OpenMP team, and with
        # more OpenMP threads than cores libgomp stops spinning between parallel regions: the
        # training step then runs at about half speed.
        with ThreadPoolExecutor(1, thread_name_prefix="feature-cache") as pool:
            ahead = pool.submit(self._read, chunks[0]) if chunks else None
            for nxt in chunks[1:] + [None]:
                data, index, view = ahead.result()
                ahead = pool.submit(self._read, nxt) if nxt is not None else None
                yield self._batch(data, index, view)
