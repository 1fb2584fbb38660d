"""The per-dataset video index: frame count, fps, size, codec and GOP of every file, cached.

Each file is probed with the same single demux pass that numbers its frames for reading
(``pipelines.index.frame_index``), so "frame k" means the same thing here and in the reader.
Results are cached in a JSON file keyed by (absolute path, size, mtime_ns), so a dataset is read
once; ``check_videos`` flags files that random access will be slow or inexact on (long GOPs,
variable frame rate; see docs/decoding-notes.md, "What it buys").

The frame indexes themselves (every frame's pts, dts, decode position and keyframe flag) are
kept too, in a binary file beside the JSON (``<list>.probe.json.frames-<token>``, 33 bytes per
frame), and registered with ``pipelines.pyav``: DataLoader workers then read a file's index from
it instead of demuxing the whole video again before decoding a clip (a large share of the
time of a short clip's read).
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

from . import index as frame_indexes
from .files import atomic_write

__all__ = ["VideoInfo", "check_videos", "probe_video", "probe_videos", "video_info"]

# 2: frame indexes kept in a frames file; 3: truncated files, shared timestamps; 4: pix_fmt;
# 5: the colour matrix tag; 6: frames an edit list hides; 7: where each packet lies in the file
# and what a decoder needs beyond the packets.
CACHE_VERSION = 7
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
    shared_timestamps: int = 0  # frames whose pts another frame has too (read by decoding from the start)
    display_order_differs: bool = False  # some frame is shown before a frame decoded ahead of it
    pix_fmt: str | None = None  # FFmpeg's pixel format: chroma subsampling and bit depth
    profile: str | None = None  # the codec's profile, as FFmpeg names it
    colorspace: int | None = None  # the YUV -> RGB matrix tag (FFmpeg's AVColorSpace; 2: none)
    hidden_leading: int = 0  # frames an edit list hides before the first shown one (NVDEC still outputs them)
    hidden_later: int = 0  # hidden frames after it


def video_info(index: frame_indexes.FrameIndex) -> VideoInfo:
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
        duration_sec=n / index.fps if index.fps > 0 else 0.0, shared_timestamps=index.shared_pts,
        display_order_differs=bool((index.decode_pos != np.arange(n)).any()), pix_fmt=index.pix_fmt,
        profile=index.profile, colorspace=index.colorspace, hidden_leading=index.hidden_leading,
        hidden_later=index.hidden_later)


def probe_video(path: str) -> VideoInfo:
    """Probes one file; raises like ``pipelines.index.frame_index``."""
    return video_info(frame_indexes.frame_index(path))


def _probe_one(path: str) -> tuple[dict | None, str | None, frame_indexes.FrameIndex | None]:
    # Never raises: a failure is returned, so one bad file cannot stop the pool.
    try:
        index = frame_indexes.frame_index(path)
        return asdict(video_info(index)), None, index
    except (frame_indexes.VideoReadError, OSError) as e:
        return None, frame_indexes.failure_reason(e), None


def _load_cache(cache_path: str) -> tuple[dict[str, dict], str | None, str | None]:
    """(videos, the frames file's name, a stale frames file's name) of a probe cache; no videos
    when it is missing or unusable. A cache of another version is unusable, and the frames file
    it names is stale: it goes once the new cache is written."""
    try:
        with open(cache_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}, None, None
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable probe cache {cache_path}: {e}", stacklevel=3)
        return {}, None, None
    if not isinstance(data, dict) or not isinstance(data.get("videos"), dict):
        warnings.warn(f"ignoring malformed probe cache {cache_path}", stacklevel=3)
        return {}, None, None
    frames = data.get("frames_file")
    frames = frames if isinstance(frames, str) and os.sep not in frames else None
    if data.get("version") != CACHE_VERSION:
        return {}, None, frames
    return data["videos"], frames, None


def _save_cache(cache_path: str, videos: dict[str, dict], frames_file: str | None) -> None:
    # Atomically: a reader (or a crash) never sees a half-written cache.
    data = json.dumps({"version": CACHE_VERSION, "frames_file": frames_file, "videos": videos}).encode()
    atomic_write(cache_path, data, what="probe cache", keeps="the previous probe cache is untouched")


class _FramesWriter:
    """Writes a new frames file beside the cache: rows kept from the old one, then new ones.

    The file gets a new name, and the JSON that points at it is written after it, so a crash
    leaves the old pair intact (at worst beside an orphaned frames file).
    """

    def __init__(self, cache_path: str):
        self.directory = os.path.dirname(os.path.abspath(cache_path))
        self.prefix = os.path.basename(cache_path) + ".frames-"
        os.makedirs(self.directory, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=".frames-", suffix=".tmp", dir=self.directory)
        self.file = os.fdopen(fd, "wb")
        self.rows = 0
        self.error: OSError | None = None  # the first failed write (a full disk): nothing more is written

    def add(self, records: np.ndarray) -> list[int] | None:
        """The rows' (first, count) in the new file, or None once writing has failed."""
        if self.error is None:
            try:
                self.file.write(np.ascontiguousarray(records, dtype=frame_indexes.FRAME_RECORD).tobytes())
            except OSError as e:
                self.error = e
        if self.error is not None:
            return None
        first, self.rows = self.rows, self.rows + len(records)
        return [first, len(records)]

    def finish(self) -> str:
        self.file.close()
        name = self.prefix + os.path.basename(self.tmp)[len(".frames-"):-len(".tmp")]
        os.replace(self.tmp, os.path.join(self.directory, name))
        return name

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # the buffered rows that could not be written: the file goes anyway
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


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


def _old_rows(directory: str, frames_file: str | None) -> np.ndarray | None:
    if not frames_file:
        return None
    try:
        return np.memmap(os.path.join(directory, frames_file), dtype=frame_indexes.FRAME_RECORD, mode="r")
    except (OSError, ValueError):
        return None


def _probe_many(paths: list[str], num_workers: int, progress: bool, on_result) -> None:
    # disable=None: no bar when stderr is not a terminal (CI logs, redirected output).
    with tqdm(total=len(paths), desc="probing videos", unit="video", disable=None if progress else True) as bar:
        if num_workers <= 0:
            for j, path in enumerate(paths):
                on_result(j, _probe_one(path))
                bar.update()
            return
        # Threads, not processes: demuxing is mostly I/O and FFmpeg work outside the GIL, and a
        # spawned pool would re-import the caller's unguarded __main__ script.
        with ThreadPoolExecutor(num_workers) as pool:
            for j, result in enumerate(pool.map(_probe_one, paths)):
                on_result(j, result)
                bar.update()


def probe_videos(
    paths: Sequence[str],
    cache_path: str | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[list[VideoInfo | None], list[tuple[str, str]]]:
    """Probes ``paths``: one VideoInfo per path (None if unreadable), and (path, reason) failures.

    With ``cache_path``, results (failures included) are read from and written to that JSON
    file, only new or changed files are probed, and the files' frame indexes are shared with
    the PyAV reader (see the module docstring). ``num_workers > 0`` probes in a thread pool.
    """
    cache, frames_file, stale = _load_cache(cache_path) if cache_path else ({}, None, None)
    directory = os.path.dirname(os.path.abspath(cache_path)) if cache_path else ""
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
        writer = None
        if cache_path:
            try:
                writer = _FramesWriter(cache_path)
            except OSError as e:  # the cached rows stay valid; only the new results are not kept
                _unsaved(cache_path, e)
        try:
            if writer:  # the rows of every other file the cache knows, carried over
                old = _old_rows(directory, frames_file)
                changed = {key for _, key, _, _ in todo}
                for key, entry in cache.items():
                    span = entry.get("frames")
                    rows = old[span[0]:span[0] + span[1]] if old is not None and span and key not in changed else None
                    if rows is not None and len(rows) == span[1]:
                        entry["frames"] = writer.add(rows)
                    else:
                        entry.pop("frames", None)

            def on_result(j, result):
                i, key, size, mtime_ns = todo[j]
                info, error, index = result
                results[i] = (None if info is None else VideoInfo(**info), error)
                entry = {"size": size, "mtime_ns": mtime_ns, "info": info, "error": error}
                if writer and index is not None:
                    entry["frames"], entry["meta"] = writer.add(frame_indexes.index_records(index)), frame_indexes.index_meta(index)
                cache[key] = entry

            _probe_many([key for _, key, _, _ in todo], num_workers, progress, on_result)
            if writer:
                new_file = None
                try:
                    if writer.error is not None:
                        raise writer.error
                    new_file = writer.finish()
                    _save_cache(cache_path, cache, new_file)
                except OSError as e:  # a full disk: train on what was probed, without keeping it
                    writer.abort()
                    if new_file and os.path.exists(os.path.join(directory, new_file)):
                        os.remove(os.path.join(directory, new_file))
                    # The entries' rows now point into the file that could not be written.
                    frames_file = None
                    _unsaved(cache_path, e)
                else:
                    old_file, frames_file = frames_file, new_file
                    for gone in (old_file, stale):  # the frames files no cache names any more
                        if gone and gone != frames_file and os.path.exists(os.path.join(directory, gone)):
                            os.remove(os.path.join(directory, gone))
        except BaseException:
            if writer:
                writer.abort()
            raise

    if cache_path and frames_file:
        shared = {}
        for path, (info, _) in zip(paths, results):
            key = os.path.abspath(os.fspath(path))
            entry = cache.get(key)
            if info is not None and entry and entry.get("frames") and entry.get("meta"):
                shared[key] = (entry["size"], entry["mtime_ns"], os.path.join(directory, frames_file),
                               *entry["frames"], entry["meta"])
        frame_indexes.register_shared_indexes(shared)

    infos = [info for info, _ in results]
    failures = [(str(path), error) for path, (info, error) in zip(paths, results) if info is None]
    return infos, failures


def _unsaved(cache_path: str, error: OSError) -> None:
    warnings.warn(f"could not write the probe cache {cache_path} ({error.strerror or error}): the videos are "
                  "probed again next time", stacklevel=3)


def check_videos(infos: Sequence[VideoInfo | None], paths: Sequence[str], sampling: str = "dense",
                 num_frames: int = 8) -> list[str]:
    """Warnings for files that are slow (long GOP, shared timestamps) or inexact (variable frame
    rate) to sample. Segment sampling takes ``num_frames`` frames spread over the whole video: a
    video of up to ``num_frames * MAX_KEYFRAME_INTERVAL`` frames (Something-Something's) is then
    decoded about whole whatever its GOP, so its GOP is no warning."""
    fix = "re-encode the dataset with `python -m evl.prepare`"
    messages = []
    for info, path in zip(infos, paths):
        if info is None:
            continue
        whole = sampling == "segment" and info.num_frames <= num_frames * MAX_KEYFRAME_INTERVAL
        if info.max_keyframe_interval > MAX_KEYFRAME_INTERVAL and not whole:
            messages.append(
                f"{path}: keyframes up to {info.max_keyframe_interval} frames apart "
                f"(> {MAX_KEYFRAME_INTERVAL}), so reading a clip decodes up to that many frames "
                f"per sampled frame; {fix}")
        if info.variable_frame_rate:
            messages.append(
                f"{path}: variable frame rate, so frame numbers are not evenly spaced in time; "
                f"{fix}")
        if info.shared_timestamps:
            messages.append(
                f"{path}: {info.shared_timestamps} frames share their timestamp with another (a muxer's bug), so "
                f"reading them decodes the file from its start; {fix}")
    return messages
