"""The per-dataset video index: frame count, fps, size, codec and GOP of every file, cached.

Each file is probed with the same single demux pass that numbers its frames for reading
(``pipelines.pyav.frame_index``), so "frame k" means the same thing here and in the reader.
Results are cached in a JSON file keyed by (absolute path, size, mtime_ns), so a dataset is read
once; ``check_videos`` flags files that random access will be slow or inexact on (long GOPs,
variable frame rate; see docs/decoding-notes.md, "What it buys").
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from pipelines import pyav

__all__ = ["VideoInfo", "check_videos", "probe_video", "probe_videos", "video_info"]

CACHE_VERSION = 1
MAX_KEYFRAME_INTERVAL = 15  # a clip frame then costs at most ~15 decoded frames
VFR_TOLERANCE = 0.05  # relative pts-delta jitter still called constant (ms-rounded mkv pts)


@dataclass(frozen=True)
class VideoInfo:
    """What the pipelines need to know about one video file."""

    num_frames: int
    fps: float
    width: int
    height: int
    codec: str
    max_keyframe_interval: int  # longest run of frames, in presentation order, between keyframes
    variable_frame_rate: bool
    duration_sec: float


def video_info(index: pyav.FrameIndex) -> VideoInfo:
    """Summarises a frame index."""
    n = index.num_frames
    # Runs start at a keyframe (or the file start) and end at the next keyframe (or the file
    # end), so a single-GOP file reports its length.
    edges = np.union1d([0, n], np.flatnonzero(index.keyframe))
    max_interval = int(np.diff(edges).max())
    vfr = False
    if index.has_pts and n > 2:
        deltas = np.diff(index.pts)
        median = float(np.median(deltas))
        vfr = median <= 0 or bool(np.abs(deltas - median).max() > max(1.0, VFR_TOLERANCE * median))
    return VideoInfo(
        num_frames=n, fps=index.fps, width=index.width, height=index.height, codec=index.codec,
        max_keyframe_interval=max_interval, variable_frame_rate=vfr,
        duration_sec=n / index.fps if index.fps > 0 else 0.0)


def probe_video(path: str) -> VideoInfo:
    """Probes one file; raises like ``pipelines.pyav.frame_index``."""
    return video_info(pyav.frame_index(path))


def _probe_one(path: str) -> tuple[dict | None, str | None]:
    # Never raises: a failure is returned, so one bad file cannot stop the pool.
    try:
        return asdict(probe_video(path)), None
    except (pyav.VideoReadError, OSError) as e:
        return None, str(e)


def _load_cache(cache_path: str) -> dict[str, dict]:
    try:
        with open(cache_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable probe cache {cache_path}: {e}", stacklevel=3)
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("videos"), dict):
        warnings.warn(f"ignoring malformed probe cache {cache_path}", stacklevel=3)
        return {}
    if data.get("version") != CACHE_VERSION:
        return {}
    return data["videos"]


def _save_cache(cache_path: str, videos: dict[str, dict]) -> None:
    directory = os.path.dirname(os.path.abspath(cache_path))
    os.makedirs(directory, exist_ok=True)
    # Temp file + rename: a reader (or a crash) never sees a half-written cache.
    fd, tmp = tempfile.mkstemp(prefix=".probe-", suffix=".json.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "videos": videos}, f)
        os.replace(tmp, cache_path)
    except BaseException:
        os.unlink(tmp)
        raise


def _from_entry(
    entry: object, size: int, mtime_ns: int
) -> tuple[VideoInfo | None, str | None] | None:
    """The cached result if ``entry`` is valid and for this version of the file, else None."""
    if not isinstance(entry, dict):
        return None
    if entry.get("size") != size or entry.get("mtime_ns") != mtime_ns:
        return None
    try:
        if entry.get("error") is not None:
            return None, str(entry["error"])
        return VideoInfo(**entry["info"]), None
    except (KeyError, TypeError):
        return None


def _probe_many(
    paths: list[str], num_workers: int, progress: bool
) -> list[tuple[dict | None, str | None]]:
    results = []
    # disable=None: no bar when stderr is not a terminal (CI logs, redirected output).
    with tqdm(total=len(paths), desc="probing videos", unit="video", disable=None if progress else True) as bar:
        if num_workers <= 0:
            for path in paths:
                results.append(_probe_one(path))
                bar.update()
            return results
        # Threads, not processes: demuxing is mostly I/O and FFmpeg work outside the GIL, and a
        # spawned pool would re-import the caller's unguarded __main__ script.
        with ThreadPoolExecutor(num_workers) as pool:
            for result in pool.map(_probe_one, paths):
                results.append(result)
                bar.update()
    return results


def probe_videos(
    paths: Sequence[str],
    cache_path: str | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[list[VideoInfo | None], list[tuple[str, str]]]:
    """Probes ``paths``: one VideoInfo per path (None if unreadable), and (path, reason) failures.

    With ``cache_path``, results (failures included) are read from and written to that JSON
    file, and only new or changed files are probed. ``num_workers > 0`` probes in a thread pool.
    """
    cache = _load_cache(cache_path) if cache_path else {}
    results: list[tuple[VideoInfo | None, str | None]] = [(None, None)] * len(paths)
    todo: list[tuple[int, str, int, int]] = []  # (position, absolute path, size, mtime_ns)
    for i, path in enumerate(paths):
        key = os.path.abspath(os.fspath(path))
        try:
            st = os.stat(key)
        except OSError as e:
            results[i] = (None, f"cannot stat: {e.strerror or e}")
            continue
        cached = _from_entry(cache.get(key), st.st_size, st.st_mtime_ns)
        if cached is not None:
            results[i] = cached
        else:
            todo.append((i, key, st.st_size, st.st_mtime_ns))

    if todo:
        probed = _probe_many([key for _, key, _, _ in todo], num_workers, progress)
        for (i, key, size, mtime_ns), (info, error) in zip(todo, probed):
            results[i] = (None if info is None else VideoInfo(**info), error)
            cache[key] = {"size": size, "mtime_ns": mtime_ns, "info": info, "error": error}
        if cache_path:
            _save_cache(cache_path, cache)

    infos = [info for info, _ in results]
    failures = [(str(path), error) for path, (info, error) in zip(paths, results) if info is None]
    return infos, failures


def check_videos(infos: Sequence[VideoInfo | None], paths: Sequence[str]) -> list[str]:
    """Warnings for files that are slow (long GOP) or inexact (variable frame rate) to sample."""
    fix = "re-encode the dataset with `python -m evl.prepare`"
    messages = []
    for info, path in zip(infos, paths):
        if info is None:
            continue
        if info.max_keyframe_interval > MAX_KEYFRAME_INTERVAL:
            messages.append(
                f"{path}: keyframes up to {info.max_keyframe_interval} frames apart "
                f"(> {MAX_KEYFRAME_INTERVAL}), so reading a clip decodes up to that many frames "
                f"per sampled frame; {fix}")
        if info.variable_frame_rate:
            messages.append(
                f"{path}: variable frame rate, so frame numbers are not evenly spaced in time; "
                f"{fix}")
    return messages
