"""A split's videos, checked and described: the list, its probe, and the sampler's view of them.

``load_dataset`` reads and validates the list (``pipelines.lists``), probes every video once
(``pipelines.probe``, cached next to the list; one process per node under ``torchrun``) and
leaves out what cannot be used, with a report: unreadable or truncated files, segments outside
their video; past ``max_bad_fraction`` of the list it stops. ``make_sampler`` and
``clip_specs`` turn a record into the clips the shared sampler decides for it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from .base import PipelineConfig, TooManyBadVideos
from .groups import available_cores, local_leader_first
from .lists import VideoRecord, read_list
from .randaugment import parse_policy
from .sampling import ClipSampler, ClipSpec

if TYPE_CHECKING:
    from .probe import VideoInfo

__all__ = ["clip_specs", "frame_range", "load_dataset", "make_sampler", "probe_cache_path", "probe_dataset"]

log = logging.getLogger("pipelines.dataset")


def probe_cache_path(list_path: str) -> str | None:
    """The probe cache next to the list, or None where that directory is read-only."""
    path = f"{list_path}.probe.json"
    return path if os.access(os.path.dirname(os.path.abspath(path)), os.W_OK) else None


def probe_dataset(cfg: PipelineConfig):
    """``(records, infos, failures, warnings)`` of the list, nothing logged: every record with its
    probe (None where unreadable or out of range), the ``(what, reason)`` of each unreadable one,
    and the warnings about slow or inexact files."""
    from .probe import check_videos, probe_videos

    records = read_list(cfg.list_path, data_root=cfg.data_root, num_classes=cfg.num_classes,
                        check_files=not cfg.missing_ok)
    with local_leader_first():
        infos, failures = probe_videos([r.path for r in records], probe_cache_path(cfg.list_path),
                                       num_workers=min(cfg.num_workers, available_cores()),
                                       progress=cfg.rank == 0 and len(records) > 200)
    warnings = check_videos(infos, [r.path for r in records], cfg.sampling, cfg.num_frames)
    for i, (record, info) in enumerate(zip(records, infos)):
        if info is None or record.start_sec is None:
            continue
        segment = f"{record.source}: segment {record.start_sec:g}-{record.end_sec:g} s of {record.path}"
        if record.start_sec * info.fps >= info.num_frames:  # nothing of it is in the video
            failures.append((segment, f"starts after the video's end ({info.duration_sec:.2f} s)"))
            infos[i] = None
        elif (record.end_sec * info.fps) - info.num_frames > 1:
            warnings.append(f"{segment}: ends after the video's end ({info.duration_sec:.2f} s); its clips use "
                            "the part in the video")
    return records, infos, failures, warnings


def load_dataset(cfg: PipelineConfig) -> tuple[list[VideoRecord], list[VideoInfo]]:
    """Read and validate the list, probe its videos (or take ``cfg.probed``), exclude (and report)
    unreadable ones."""
    records, infos, failures, warnings = cfg.probed if cfg.probed is not None else probe_dataset(cfg)
    if warnings:  # one summary, not one line per file of a large dataset
        more = f"\n  ... and {len(warnings) - 5} more" if len(warnings) > 5 else ""
        log.warning("%s: %d video warning(s):\n  %s%s", cfg.list_path, len(warnings), "\n  ".join(warnings[:5]), more)
    if failures:
        shown = "\n".join(f"  {path}: {reason}" for path, reason in failures[:20])
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        msg = f"{cfg.list_path}: {len(failures)} of {len(records)} videos are unreadable or out of range:\n{shown}{more}"
        if len(failures) > cfg.max_bad_fraction * len(records):
            raise TooManyBadVideos(msg + f"\nthat is more than {cfg.max_bad_fraction:.1%}: fix or remove them")
        if not cfg.missing_ok:
            log.warning(msg + "\nthey are excluded")
    keep = [i for i, info in enumerate(infos) if info is not None]
    return [records[i] for i in keep], [infos[i] for i in keep]


def frame_range(record: VideoRecord, info: VideoInfo) -> tuple[int, int | None]:
    """An untrimmed segment's [first, last) frames; the whole video for trimmed ones."""
    if record.start_sec is None:
        return 0, None
    first = min(int(round(record.start_sec * info.fps)), info.num_frames - 1)
    return first, max(first + 1, int(round(record.end_sec * info.fps)))


def make_sampler(cfg: PipelineConfig) -> ClipSampler:
    augment = parse_policy(cfg.auto_augment) if cfg.train and cfg.auto_augment else None
    return ClipSampler(
        num_frames=cfg.num_frames, sampling_rate=cfg.sampling_rate, size=cfg.input_size, mode=cfg.sampling,
        scale=cfg.crop_scale, ratio=cfg.crop_ratio, hflip=cfg.hflip if cfg.train else 0.0,
        num_temporal_views=1 if cfg.train else cfg.num_temporal_views,
        num_spatial_views=1 if cfg.train else cfg.num_spatial_views, augment=augment, seed=cfg.seed)


def clip_specs(sampler: ClipSampler, train: bool, key: tuple[int, int], record: VideoRecord,
               info: VideoInfo) -> list[ClipSpec]:
    """The specs of one item: one training clip, or every evaluation view of a video."""
    epoch, index = key
    first, last = frame_range(record, info)
    geometry = dict(num_frames_in_video=info.num_frames, height=info.height, width=info.width,
                    first_frame=first, last_frame=last)
    if train:
        return [sampler.train_clip(index, epoch, **geometry)]
    return sampler.eval_clips(index, **geometry)
