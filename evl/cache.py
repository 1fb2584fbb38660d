"""``python -m evl.cache``: build (``build``), describe (``info``) and check (``verify``) a feature cache.

``build`` runs the frozen backbone once per stored view of every clip of a list file and writes
what the decoder consumes of the last ``--decoder_num_layers`` blocks (``pipelines.cache``
describes the format): for ``--split train`` ``--num_views K`` augmented views per clip (view
``v`` = the sampler's training clip of epoch ``v``), for ``--split val`` every temporal x
spatial evaluation view. ``python -m evl.train --pipeline cache --feature_cache ROOT`` then
trains from ``ROOT/train`` and evaluates on ``ROOT/val`` without decoding or the backbone.
The build is resumable: shards are written under temporary names and renamed when complete,
the manifest is written last, and a rerun of the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import shutil
import sys
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from pipelines import build_pipeline, cpu_workers
from pipelines.files import atomic_write
from pipelines.cache import (BUILD, DTYPE, FORMAT, MANIFEST, CacheError, FeatureStore, cache_identity, read_json,
                             read_manifest, record_fields, row_elems, shard_name, split_dir)

from .cli import SetupError, user_errors
from .config import DataConfig, EVLConfig, TrainConfig, add_model_arguments
from .pretrained import is_hf_hub
from .decoder import attention_features
from .distributed import PatientGroup, process_group, resolve_device, threads_beside_decoders
from .model import build_model
from .weights import file_sha256

# Keys of build.json that may differ when a build is resumed (same data, another path to it).
_INFORMATIONAL = ("list_path", "data_root", "backbone_path")
_SHARD_TARGET_BYTES = 512 << 20
DECODERS = ("pyav", "dali")  # the pipelines a build can read video with


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _write_json_atomic(path: str, value: dict) -> None:
    try:
        atomic_write(path, (json.dumps(value, indent=1) + "\n").encode(), what="feature cache file",
                     keeps="the shards written so far are kept: rerun the build")
    except OSError as e:
        raise CacheError(str(e)) from None


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reserve(path: str) -> None:
    """Allocate the blocks of a (sparse) shard file now.

    Its rows are written through a memory map, and a store into a page the full disk cannot
    back kills the process with SIGBUS, without a message. Reserved up front, a disk that
    filled up since the build's own check fails here, with the file named. Filesystems that
    cannot reserve are left to the check.
    """
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheError(f"no disk space left for feature cache shard {path} ({e.strerror}): free some "
                                 "and rerun the build; the shards written so far are kept") from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        except AttributeError:  # no posix_fallocate on this OS
            pass


class _ShardWriter:
    """One shard being written under a temporary name."""

    def __init__(self, directory: str, k: int, num_clips: int, views: int, elems: int):
        self.directory, self.k = directory, k
        self.tmp = os.path.join(directory, f".tmp-{shard_name(k)}")
        try:
            self.arr = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=DTYPE, shape=(num_clips * views, elems))
        except OSError as e:
            raise CacheError(f"could not create feature cache shard {self.tmp} ({e.strerror or e}): the shards written "
                             "so far are kept; free some space and rerun the build") from None
        _reserve(self.tmp)
        self.remaining = num_clips * views
        self.bad: dict[int, str] = {}

    def write(self, local_rows: np.ndarray, data: np.ndarray) -> None:
        self.arr[local_rows] = data
        self.remaining -= len(local_rows)


def _finish_shard(writer: _ShardWriter, info: dict) -> dict:
    """Checksum the complete shard, fsync it, rename it into place, then write its bookkeeping."""
    arr = writer.arr
    arr.flush()
    crc = [zlib.crc32(arr[r]) for r in range(arr.shape[0])]
    del arr
    writer.arr = None
    with open(writer.tmp, "rb+") as f:
        os.fsync(f.fileno())
    final = os.path.join(writer.directory, shard_name(writer.k))
    info = dict(info, file=shard_name(writer.k), bytes=os.path.getsize(writer.tmp), sha256=file_sha256(writer.tmp),
                row_crc32=crc, bad=sorted(writer.bad), bad_reasons={str(i): r for i, r in sorted(writer.bad.items())})
    os.replace(writer.tmp, final)
    _write_json_atomic(os.path.join(writer.directory, shard_name(writer.k)[:-4] + ".json"), info)
    _fsync_dir(writer.directory)
    return info


def _shard_done(directory: str, k: int, expected_bytes: int) -> dict | None:
    """The shard's bookkeeping when its file is complete, else None (it will be rebuilt)."""
    side = os.path.join(directory, shard_name(k)[:-4] + ".json")
    path = os.path.join(directory, shard_name(k))
    try:
        info = read_json(side)
    except (OSError, ValueError):
        return None
    if not os.path.isfile(path) or os.path.getsize(path) != info.get("bytes") or info["bytes"] < expected_bytes:
        return None
    return info


@dataclass(frozen=True)
class CacheBuild:
    """One ``build``: which list, which split, the model and data settings the features are of
    (those of the training run that will read them), and how the build runs."""

    list_path: str
    output: str  # cache root: the split goes to OUTPUT/train or OUTPUT/val
    split: str = "train"
    model: EVLConfig = EVLConfig()  # backbone, backbone_path, num_frames and decoder_num_layers matter
    data: DataConfig = DataConfig()
    num_views: int = 4  # training: augmented views stored per clip
    num_classes: int | None = None  # check the labels against it
    seed: int = 0
    batch_size: int = 32  # clip-views per backbone batch
    device: str | None = None
    shard_clips: int | None = None
    overwrite: bool = False

    @classmethod
    def for_run(cls, cfg: TrainConfig, split: str, output: str, **overrides) -> "CacheBuild":
        """The build whose cache ``cfg`` (``--pipeline cache --feature_cache OUTPUT``) reads."""
        data = cfg.data_config()
        if data.pipeline not in DECODERS:  # the run reads the cache (or dummy clips): decode with PyAV
            data = dataclasses.replace(data, pipeline="pyav")
        values = dict(list_path=cfg.train_list_path if split == "train" else cfg.val_list_path, output=output,
                      split=split, model=cfg.model_config(), data=data, num_classes=cfg.num_classes,
                      seed=cfg.seed, batch_size=cfg.batch_size, device=cfg.device)
        return cls(**{**values, **overrides})


def build_cache(job: CacheBuild, say=print, progress: bool = True) -> dict:
    """Build (or finish building) the cache of one split; returns its manifest.

    Under ``torchrun`` (whose process group it joins, and leaves, unless the caller had) every process builds its share of the shards (shard ``k`` on rank
    ``k % world_size``, each on its own GPU), and rank 0 writes the manifest once all are done.
    """
    if job.split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {job.split!r}")
    if job.num_views < 1:
        raise ValueError("--num_views must be at least 1")
    with process_group(job.device) as world:
        group = PatientGroup()  # ranks finish their shares at different times
        try:
            return _build(job, world, group, say if world.is_primary else (lambda *a, **k: None), say, progress)
        finally:
            group.close()


def _build(job: CacheBuild, world, group: PatientGroup, say, warn, progress: bool) -> dict:
    """``build_cache`` on one rank; ``say`` prints on rank 0 only, ``warn`` on every rank."""
    from pipelines.dataset import load_dataset, make_sampler

    train = job.split == "train"
    directory = split_dir(job.output, train)
    device = world.device
    # Seeded as evl.train seeds before build_model, so that a random (test/demo) backbone is the same.
    torch.manual_seed(job.seed)
    with warnings.catch_warnings():
        if not (job.model.backbone_path or job.model.pretrained or is_hf_hub(job.model.backbone)):
            warnings.filterwarnings("ignore", message="no backbone_path given")
            say(f"warning: no --backbone_path or --pretrained: caching the features of a RANDOM "
                f"{job.model.backbone} backbone (seed {job.seed}), as evl.train would build it")
        model = build_model(dataclasses.replace(job.model, num_classes=1))
    spec = model.spec
    num_frames, layers = job.model.num_frames, job.model.decoder_num_layers
    pcfg = job.data.pipeline_config(list_path=job.list_path, train=train, num_frames=num_frames,
                                    num_classes=job.num_classes, input_size=spec.image_size[0], batch_size=1,
                                    seed=job.seed, device=str(device))
    records, _ = load_dataset(pcfg)
    sampler = make_sampler(pcfg)
    views = job.num_views if train else sampler.num_views
    fields = record_fields(num_frames, spec.num_tokens, spec.width, layers)
    elems = row_elems(fields)
    view_bytes = elems * np.dtype(DTYPE).itemsize
    n = len(records)
    shard_clips = job.shard_clips or max(1, _SHARD_TARGET_BYTES // (view_bytes * views))
    num_shards = -(-n // shard_clips)
    # What the cache is (the settings a run must match: pipelines.cache.cache_identity) and how it
    # is laid out. Resuming a build needs both to be the same.
    header = {
        "format": FORMAT, "backbone": job.model.backbone, "backbone_path": job.model.backbone_path,
        "auto_augment": pcfg.auto_augment, "crop_scale": list(pcfg.crop_scale), "crop_ratio": list(pcfg.crop_ratio),
        "hflip": pcfg.hflip, "seed": job.seed, "num_views": views,
        "num_temporal_views": sampler.num_temporal_views, "num_spatial_views": sampler.num_spatial_views,
        "dtype": np.dtype(DTYPE).name, "fields": fields, "row_elems": elems, "row_bytes": view_bytes,
        "num_clips": n, "shard_clips": shard_clips, "num_shards": num_shards,
        "list_path": os.path.abspath(job.list_path), "data_root": job.data.data_root,
        "clips": [[r.path, r.label] for r in records],
        **cache_identity(pcfg, model.config),
    }
    os.makedirs(directory, exist_ok=True)
    build_path = os.path.join(directory, BUILD)
    diff = []
    if os.path.isfile(build_path):  # every rank checks (the same file, the same verdict) ...
        old = read_json(build_path)
        diff = [k for k in sorted(set(old) | set(header)) if k not in _INFORMATIONAL and old.get(k) != header.get(k)]
        if diff and not job.overwrite:
            raise CacheError(f"{directory} holds a cache built with other settings (differs in: {', '.join(diff)}); "
                             "pass --overwrite to replace it, or choose another --output")
    group.barrier()
    if world.is_primary:  # ... before rank 0 changes anything
        if diff:
            shutil.rmtree(directory)
            os.makedirs(directory)
        for name in os.listdir(directory):
            if name.startswith(".tmp-"):  # a shard (or json) an interrupted build left half-written
                os.remove(os.path.join(directory, name))
        _write_json_atomic(build_path, header)
    group.barrier()

    def shard_range(k: int) -> tuple[int, int]:
        return k * shard_clips, min(n, (k + 1) * shard_clips)

    def shard_bytes(k: int) -> int:
        a, b = shard_range(k)
        return (b - a) * views * view_bytes

    done = {k: info for k in range(num_shards) if (info := _shard_done(directory, k, shard_bytes(k)))}
    pending = [k for k in range(num_shards) if k not in done]
    manifest_path = os.path.join(directory, MANIFEST)
    need = sum(shard_bytes(k) + 4096 for k in pending)
    free = shutil.disk_usage(directory).free
    say(f"feature cache {directory}: {n} clips x {views} views, {view_bytes:,} bytes per view "
        f"({view_bytes * views:,} bytes = {_human(view_bytes * views)} per clip), "
        f"{_human(n * views * view_bytes)} in total in {num_shards} shard(s); "
        f"{len(pending)} shard(s) ({_human(need)}) to write, {_human(free)} free"
        + (f"; {world.world_size} processes share them" if world.world_size > 1 else ""))
    if need > free:
        raise CacheError(f"not enough disk space for the feature cache in {directory}: {need:,} bytes "
                         f"({_human(need)}) still to write, {free:,} bytes ({_human(free)}) free")
    group.barrier()  # every rank has seen the shards that were done before rank 0 touches the manifest
    if pending and world.is_primary and os.path.exists(manifest_path):
        os.remove(manifest_path)  # until rewritten last, the cache is incomplete
    pending = pending[world.rank::world.world_size]  # this process's share
    if world.world_size > 1:
        warn(f"rank {world.rank}: {len(pending)} shard(s) to write {pending}")

    if pending:
        keys = [(v, i) if train else (0, i) for k in pending for i in range(*shard_range(k))
                for v in (range(views) if train else (0,))]
        per_item = 1 if train else views
        # The pipeline training uses reads every key once, in order; a video that fails is left
        # out and reported (the cache's limit on them is applied once every shard is written).
        try:
            pipe = build_pipeline(job.data.pipeline, dataclasses.replace(
                pcfg, keys=keys, batch_size=max(1, job.batch_size // per_item), max_bad_fraction=1.0))
        except ValueError as e:  # the data does not suit the pipeline (a codec DALI cannot decode here)
            raise SetupError(str(e)) from e
        model.to(device)
        from tqdm import tqdm

        todo = sum(shard_range(k)[1] - shard_range(k)[0] for k in pending) * views
        if world.world_size > 1:  # rank 0's bar: its own share (the others print nothing)
            bar = tqdm(total=todo, desc=f"cache {job.split} (rank 0 of {world.world_size})", unit="view",
                       dynamic_ncols=True, disable=not (progress and world.is_primary) or None)
        else:
            bar = tqdm(total=n * views, initial=n * views - todo, desc=f"cache {job.split}", unit="view",
                       dynamic_ncols=True, disable=not progress or None)
        writers: dict[int, _ShardWriter] = {}

        def store(key: tuple[int, int], data: np.ndarray | None) -> None:
            """Write the key's rows, or (``None``) record its video as left out."""
            epoch, i = key
            k, local_clip = divmod(i, shard_clips)
            if k not in writers:
                a, b = shard_range(k)
                writers[k] = _ShardWriter(directory, k, b - a, views, elems)
            w = writers[k]
            if data is None:
                reason = dict(pipe.bad).get(records[i].path, "could not be read")
                w.bad[i] = reason
                warn(f"warning: {records[i].path}: {reason} (left out of the cache)")
                w.remaining -= per_item  # its rows stay zero and are never read
            else:
                first = local_clip * views + (epoch if train else 0)
                w.write(np.arange(first, first + per_item), data)
            if w.remaining == 0:
                a, b = shard_range(k)
                done[k] = _finish_shard(w, {"shard": k, "first_clip": a, "num_clips": b - a})
                del writers[k]

        position = 0  # keys before it are written or left out
        try:
            for batch in pipe:
                feats = attention_features(model.forward_features(batch.clips))
                data = torch.cat([t.flatten(1) for f in feats for t in f], 1).to(torch.float16).cpu().numpy()
                if not np.isfinite(data).all():
                    raise CacheError("backbone features overflow float16; this backbone cannot be cached in fp16")
                index, view = batch.index.tolist(), batch.view.tolist()
                for r in range(0, len(index), per_item):  # a training row, or a video's evaluation views
                    key = (view[r], index[r]) if train else (0, index[r])
                    while keys[position] != key:  # the pipeline left these out
                        store(keys[position], None)
                        position += 1
                    store(key, data[r:r + per_item])
                    position += 1
                bar.update(len(index))
            for key in keys[position:]:
                store(key, None)
        finally:
            bar.close()
            close = getattr(pipe, "close", None)
            if close is not None:
                close()
            for w in writers.values():
                w.arr = None  # the half-written .tmp file is removed by the next run
    if world.world_size > 1:
        group.barrier()  # every share written: rank 0 reads the others' shards from disk
        if not world.is_primary:
            group.barrier()  # until the manifest is written
            return read_manifest(directory)
        done = {k: info for k in range(num_shards) if (info := _shard_done(directory, k, shard_bytes(k)))}
    try:
        missing = [k for k in range(num_shards) if k not in done]
        if missing:
            raise CacheError(f"{directory}: shard(s) {missing} were not completed")
        manifest = dict(header, shards=[done[k] for k in range(num_shards)])
        bad = {int(i): (k, reason) for k in done for i, reason in done[k].get("bad_reasons", {}).items()}
        if len(bad) > job.data.max_bad_fraction * n:
            # The limit live training applies: past it the cache is not completed (no manifest),
            # and the finished shards are kept for the rerun.
            shown = "\n".join(f"  {records[i].path}: {reason}" for i, (_, reason) in sorted(bad.items())[:20])
            shards = sorted({shard_name(k) for k, _ in bad.values()})
            raise CacheError(
                f"{len(bad)} of {n} videos could not be decoded, more than --max_bad_fraction "
                f"({job.data.max_bad_fraction:.1%}):\n{shown}\nthe finished shards are kept: rerun with a higher "
                f"--max_bad_fraction to complete the cache without them, or fix them, delete "
                f"{', '.join(shards[:5])}{' ...' if len(shards) > 5 else ''} and rerun")
        if bad:
            say(f"warning: {len(bad)} of {n} video(s) could not be decoded and are left out of the cache")
        _write_json_atomic(manifest_path, manifest)
        _fsync_dir(directory)
        say(f"feature cache {directory}: complete ({_human(sum(s['bytes'] for s in manifest['shards']))})")
        return manifest
    finally:
        if world.world_size > 1:
            group.barrier()  # the other ranks return (or, without a manifest, fail to read it)


def verify_cache(directory: str, say=print) -> None:
    """Check every shard's SHA-256 against the manifest; raise naming the first bad shard."""
    manifest = read_manifest(directory)
    FeatureStore(directory, manifest, verify=False)  # presence, sizes, headers
    for sh in manifest["shards"]:
        path = os.path.join(directory, sh["file"])
        if file_sha256(path) != sh["sha256"]:
            raise CacheError(f"feature cache shard {path} is corrupted (SHA-256 mismatch): delete it and rerun "
                             "the build")
    say(f"{directory}: {len(manifest['shards'])} shard(s) ok")


def describe(directory: str) -> str:
    m = read_manifest(directory)
    keys = ("split", "backbone_id", "backbone_sha256", "num_frames", "sampling_rate", "sampling", "input_size",
            "decoder_num_layers", "auto_augment", "crop_scale", "hflip", "seed", "num_views", "num_temporal_views",
            "num_spatial_views", "dtype", "row_bytes", "num_clips", "num_shards", "list_path", "list_sha256")
    total = sum(s["bytes"] for s in m["shards"])
    bad = sum(len(s["bad"]) for s in m["shards"])
    return "\n".join([f"{directory}:"] + [f"  {k}: {m.get(k)}" for k in keys]
                     + [f"  bytes: {total} ({_human(total)})", f"  bad clips: {bad}"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evl.cache", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="run the frozen backbone over a list and store the decoder's inputs")
    b.add_argument("--list_path", "--train_list_path", "--val_list_path", dest="list_path", required=True)
    b.add_argument("--split", choices=["train", "val"], default="train",
                   help="train: --num_views augmented views per clip; val: every evaluation view")
    b.add_argument("--output", "--feature_cache", dest="output", required=True,
                   help="cache root: the split is written to OUTPUT/train or OUTPUT/val")
    add_model_arguments(b, ("backbone", "backbone_path", "pretrained", "num_frames", "decoder_num_layers"))
    b.add_argument("--num_classes", type=int, help="check labels against it (optional)")
    b.add_argument("--num_views", type=int, default=4, help="training: augmented views stored per clip")
    DataConfig.add_arguments(b, pipelines=DECODERS)
    b.add_argument("--seed", type=int, default=0, help="the sampler's seed (and a random backbone's)")
    b.add_argument("--batch_size", type=int, default=32, help="clip-views per backbone batch")
    b.add_argument("--device")
    b.add_argument("--shard_clips", type=int, help="clips per shard (default: about 512 MiB per shard)")
    b.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings")
    b.add_argument("--no_progress", dest="progress", action="store_false")
    for name, text in (("info", "describe a cache"), ("verify", "check every shard's SHA-256")):
        s = sub.add_parser(name, help=text)
        s.add_argument("directory", help="a split directory (ROOT/train or ROOT/val) or a cache root")
    return p


def job_from_args(args: argparse.Namespace) -> CacheBuild:
    model = EVLConfig(backbone=args.backbone, backbone_path=args.backbone_path, pretrained=args.pretrained,
                      num_frames=args.num_frames, decoder_num_layers=args.decoder_num_layers)
    return CacheBuild(list_path=args.list_path, output=args.output, split=args.split, model=model,
                      data=DataConfig.from_args(args), num_views=args.num_views, num_classes=args.num_classes,
                      seed=args.seed, batch_size=args.batch_size, device=args.device, shard_clips=args.shard_clips,
                      overwrite=args.overwrite)


def run_build(job: CacheBuild, progress: bool = True) -> dict:
    """:func:`build_cache` as a job of its own: the device checked first, the CPU threads left
    beside the decoders."""
    try:
        resolve_device(job.device)
    except ValueError as e:
        raise SetupError(str(e)) from None
    with threads_beside_decoders(cpu_workers(job.data.pipeline, job.data.num_workers)):
        return build_cache(job, progress=progress)


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    with user_errors("python -m evl.cache"):
        if args.command == "build":
            if args.num_views < 1:
                raise SetupError("--num_views must be at least 1")
            return run_build(job_from_args(args), progress=args.progress)
        dirs = [args.directory]
        if not os.path.isfile(os.path.join(args.directory, MANIFEST)):
            dirs = [d for d in (split_dir(args.directory, True), split_dir(args.directory, False))
                    if os.path.isdir(d)] or dirs
        for d in dirs:
            if args.command == "info":
                print(describe(d))
            else:
                verify_cache(d)
        return None


if __name__ == "__main__":
    from .cli import run_program

    run_program(main)
