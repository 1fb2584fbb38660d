"""``python -m evl.prepare``: re-encode a dataset for fast, frame-exact random access.

Reading an 8-frame clip from a video with long GOPs decodes up to a whole GOP per sampled frame
(docs/decoding-notes.md, "What it buys"), and variable frame rates make frame numbers uneven in
time. This re-encodes every video of a list file with PyAV: short side resized to ``--short_side``
(aspect kept, even dimensions), H.264 (libx264, yuv420p, ``--crf``, ``--preset``, ``--tune``:
by default ``fastdecode``, which decodes a frame in about 20% less time) with a keyframe at least every
``--keyint`` frames and no scene-cut keyframes, at a constant frame rate (the
source's average; every decoded frame kept and timestamped by its number), video only. Each
output is written under a temporary name, checked with ``pipelines.probe`` (keyframe interval,
frame count equal to the source's decoded frames, constant rate) and then renamed, so an
interrupted run resumes where it stopped. Sources are never overwritten. A new list file with
the same labels (and segment columns) points at the new files; failures are listed at the end.

On several machines the list is cut into shares (``--shard_index I --num_shards N``, or a SLURM
array's or torchrun's environment, see :func:`resolve_share`): share ``I`` re-encodes every
``N``-th distinct video, from the ``I``-th on, into the same ``--output``. The shares meet in a
state directory beside the new list (``.<list name>.shards/``), where each writes a claim with
its settings when it starts (a share whose settings or share count differ from another's is
refused) and its part of the list, atomically, when it ends. Whichever share ends with every
part there (or any rerun of one) writes the whole list from the parts, in the input list's order.
"""

from __future__ import annotations

import argparse
import errno
import glob
import json
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction

from pipelines.files import atomic_write, file_sha256
from pipelines.groups import available_cores
from pipelines.lists import ListFileError, VideoRecord, read_list, write_list

__all__ = ["EncodeJob", "Share", "encode_video", "main", "output_size", "resolve_share"]

DEFAULT_KEYINT = 15  # pipelines.probe warns above 15 frames between keyframes
# x264's fastdecode tune (no CABAC, no deblocking, no weighted prediction): on Kinetics-like
# videos at 424x320 a frame decodes in about 0.8x the time, for about 9% more bytes and 0.14 dB
# less PSNR against the source (README, "evl.prepare's encoding").
DEFAULT_TUNE = "fastdecode"


@dataclass(frozen=True)
class EncodeJob:
    source: str
    target: str
    short_side: int = 320
    crf: int = 23
    preset: str = "veryfast"
    keyint: int = DEFAULT_KEYINT
    threads: int = 1
    tune: str = DEFAULT_TUNE  # an x264 tune, or "none"


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side ``short_side`` and the aspect kept, both even."""
    even = lambda x: max(2, int(round(x / 2)) * 2)  # noqa: E731 -- yuv420p needs even sizes
    if width <= height:
        return even(short_side), even(height * short_side / width)
    return even(width * short_side / height), even(short_side)


def _temp_path(target: str) -> str:
    # A fixed name: a rerun after a crash overwrites the leftover instead of piling up new ones.
    directory, name = os.path.split(target)
    return os.path.join(directory, f".{name}.partial.mp4")


def encode_video(job: EncodeJob) -> int:
    """Re-encode ``job.source`` to ``job.target``; returns the number of frames written.

    Raises on any failure (after removing the temporary file); the target then does not exist.
    """
    import av

    from pipelines.probe import probe_video
    from pipelines.index import frame_index

    tmp = _temp_path(job.target)
    os.makedirs(os.path.dirname(os.path.abspath(job.target)), exist_ok=True)
    try:
        with av.open(job.source) as src:
            streams = [s for s in src.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
            if not streams:
                raise ValueError("no video stream")
            vin = streams[0]
            vin.thread_type = "AUTO"
            # The average rate over the pts span (the declared one where it explains the span),
            # as pipelines.pyav measures it; a variable-rate source keeps its duration.
            fps = frame_index(job.source).fps
            if fps <= 0:
                raise ValueError("unknown frame rate")
            rate = Fraction(fps).limit_denominator(1001)
            width, height = output_size(vin.codec_context.width, vin.codec_context.height, job.short_side)
            count = 0
            with av.open(tmp, "w", format="mp4") as dst:
                out = dst.add_stream("libx264", rate=rate)
                out.width, out.height, out.pix_fmt = width, height, "yuv420p"
                out.codec_context.time_base = 1 / rate
                out.codec_context.gop_size = job.keyint
                out.codec_context.thread_count = job.threads
                out.options = {"crf": str(job.crf), "preset": job.preset,
                               # Fixed GOPs: no scene-cut keyframes that would make the interval uneven.
                               "x264-params": f"keyint={job.keyint}:min-keyint={job.keyint}:scenecut=0",
                               **({} if job.tune == "none" else {"tune": job.tune})}
                for frame in src.decode(vin):
                    # Constant rate: frames keep their decoded order, timestamped by their number.
                    frame = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
                    frame.pts, frame.time_base = count, 1 / rate
                    dst.mux(out.encode(frame))
                    count += 1
                dst.mux(out.encode(None))
        if count == 0:
            raise ValueError("no frames decoded")
        info = probe_video(tmp)
        problems = []
        if info.num_frames != count:
            problems.append(f"{info.num_frames} frames written, {count} decoded from the source")
        if info.max_keyframe_interval > job.keyint:
            problems.append(f"keyframes {info.max_keyframe_interval} frames apart (> {job.keyint})")
        if info.variable_frame_rate:
            problems.append("variable frame rate")
        if (info.width, info.height) != (width, height):
            problems.append(f"size {info.width}x{info.height}, expected {width}x{height}")
        if problems:
            raise ValueError("re-encoded file failed its check: " + "; ".join(problems))
        os.replace(tmp, job.target)
        return count
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _run(job: EncodeJob) -> tuple[str, str | None, bool]:
    """Top-level, picklable, never raises: (source, error or None, whether the disk is full)."""
    try:
        encode_video(job)
        return job.source, None, False
    except Exception as e:  # noqa: BLE001 -- one bad video must not stop the others
        full = any(isinstance(x, OSError) and x.errno in _DISK_FULL for x in (e, e.__cause__, e.__context__))
        return job.source, f"{type(e).__name__}: {e}", full


def _relative(record_path: str, data_root: str | None) -> str:
    """Where a video goes under the output directory: its path relative to the input root."""
    if data_root is not None:
        rel = os.path.relpath(os.path.abspath(record_path), os.path.abspath(data_root))
        if not rel.startswith(os.pardir):
            return rel
    if not os.path.isabs(record_path) and not record_path.startswith(os.pardir):
        return os.path.normpath(record_path)
    return os.path.abspath(record_path).lstrip(os.sep)  # outside the root: mirror the whole path


def plan(records: list[VideoRecord], data_root: str | None, output: str) -> dict[str, str]:
    """source path -> output path (``.mp4``); refuses collisions and anything that would overwrite a source."""
    targets: dict[str, str] = {}
    for r in records:
        if r.path not in targets:
            targets[r.path] = os.path.join(output, os.path.splitext(_relative(r.path, data_root))[0] + ".mp4")
    real_sources = {os.path.realpath(s): s for s in targets}
    seen: dict[str, str] = {}
    for source, target in targets.items():
        real = os.path.realpath(target)
        if real in real_sources:
            raise ValueError(f"refusing to overwrite source video {real_sources[real]} (output {target}); "
                             "choose another --output")
        if real in seen:
            raise ValueError(f"{seen[real]} and {source} would both be written to {target}")
        seen[real] = source
    return targets


# --- Shares of a list, one per machine (or process) -------------------------------------------

@dataclass(frozen=True)
class Share:
    """This process's part of the work: every ``count``-th distinct video of the list, from the
    ``index``-th on. ``origin`` says what chose it (flags or environment variables)."""

    index: int = 0
    count: int = 1
    origin: str = ""


def _env_int(environ: Mapping[str, str], name: str, context: str) -> int:
    if name not in environ:
        raise ValueError(f"{name} is not set in the environment (needed with {context})")
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"{name}={environ[name]!r} in the environment is not an integer") from None


def resolve_share(shard_index: int | None, num_shards: int | None, environ: Mapping[str, str]) -> Share:
    """The share named by ``--shard_index``/``--num_shards``, else by the environment.

    A SLURM array task takes share ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
    SLURM_ARRAY_TASK_STEP`` of ``SLURM_ARRAY_TASK_COUNT``; a torchrun process share ``RANK`` of
    ``WORLD_SIZE``; under both, each array task's share is cut again among its processes. The
    flags win over the environment (``--num_shards 1`` prepares the whole list inside an array
    job). Raises ValueError, naming the flag or variable, for settings that do not pick one share.
    """
    if shard_index is not None or num_shards is not None:
        if num_shards is None:
            raise ValueError("--shard_index needs --num_shards")
        if num_shards < 1:
            raise ValueError(f"--num_shards must be at least 1, got {num_shards}")
        if shard_index is None:
            if num_shards > 1:
                raise ValueError(f"--num_shards {num_shards} needs --shard_index (0 to {num_shards - 1})")
            shard_index = 0
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"--shard_index {shard_index} is not in [0, {num_shards}): shares are numbered "
                             f"from 0 to --num_shards - 1")
        return Share(shard_index, num_shards, f"--shard_index {shard_index} --num_shards {num_shards}")
    index, count, origin = 0, 1, []
    if "SLURM_ARRAY_TASK_ID" in environ:
        ctx = "SLURM_ARRAY_TASK_ID"
        task = _env_int(environ, "SLURM_ARRAY_TASK_ID", ctx)
        first = _env_int(environ, "SLURM_ARRAY_TASK_MIN", ctx) if "SLURM_ARRAY_TASK_MIN" in environ else 0
        step = _env_int(environ, "SLURM_ARRAY_TASK_STEP", ctx) if "SLURM_ARRAY_TASK_STEP" in environ else 1
        tasks = _env_int(environ, "SLURM_ARRAY_TASK_COUNT", ctx)
        last = _env_int(environ, "SLURM_ARRAY_TASK_MAX", ctx) if "SLURM_ARRAY_TASK_MAX" in environ \
            else first + (tasks - 1) * step
        names = (f"SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_MIN={first}, SLURM_ARRAY_TASK_STEP={step}, "
                 f"SLURM_ARRAY_TASK_MAX={last}, SLURM_ARRAY_TASK_COUNT={tasks}")
        if tasks < 1 or step < 1 or (last - first) != (tasks - 1) * step:
            raise ValueError(f"the SLURM array's task ids are not MIN, MIN + STEP, ..., MAX ({names}); for such an "
                             "array (e.g. --array=1,5,9) pass --shard_index and --num_shards")
        if not first <= task <= last or (task - first) % step:
            raise ValueError(f"SLURM_ARRAY_TASK_ID={task} is not one of the array's task ids, {first} to {last} in "
                             f"steps of {step} ({names})")
        index, count = (task - first) // step, tasks
        origin.append(f"SLURM_ARRAY_TASK_ID={task} of SLURM_ARRAY_TASK_COUNT={tasks}"
                      + (f" from SLURM_ARRAY_TASK_MIN={first}" if first else "")
                      + (f" in steps of {step}" if step > 1 else ""))
    if "WORLD_SIZE" in environ:
        world = _env_int(environ, "WORLD_SIZE", "WORLD_SIZE")
        rank = _env_int(environ, "RANK", "WORLD_SIZE")
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        index, count = index * world + rank, count * world
        origin.append(f"RANK={rank} of WORLD_SIZE={world}")
    return Share(index, count, ", ".join(origin))


# What every share of one list must agree on: the share count, the list, and the encoding.
_SHARED_SETTINGS = ("num_shards", "list_sha256", "short_side", "crf", "preset", "keyint", "tune")
_BEFORE_SETTING = {"tune": "none"}  # what a claim written before a setting existed had


def shard_directory(output_list: str) -> str:
    """The shares' meeting place: claims, locks and parts, beside the list they make."""
    directory, name = os.path.split(os.path.abspath(output_list))
    return os.path.join(directory, f".{name}.shards")


def _share_name(index: int, count: int) -> str:
    return f"share-{index:05d}-of-{count:05d}"


def _claims(state: str) -> dict[str, dict]:
    """File name -> settings of every share's claim in ``state``."""
    found = {}
    for path in sorted(glob.glob(os.path.join(state, "share-*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                found[os.path.basename(path)] = json.load(f)
        except FileNotFoundError:
            continue  # a share that gave up its claim meanwhile
        except (OSError, ValueError) as e:
            raise ValueError(f"unreadable share claim {path} ({e}); delete {state} to start the shares over") from None
    return found


def _first_conflict(claims: dict[str, dict], mine: dict) -> str | None:
    """What the first claim that differs from ``mine`` differs in, or None."""
    for name, other in claims.items():
        theirs = {k: other.get(k, _BEFORE_SETTING.get(k)) for k in _SHARED_SETTINGS}
        diff = [f"--{k} {theirs[k]} there, {mine[k]} here" if k != "list_sha256" else "another list file"
                for k in _SHARED_SETTINGS if theirs[k] != mine[k]]
        if diff:
            return f"{name}: {'; '.join(diff)}"
    return None


def _refuse_mixing(state: str, conflict: str) -> ValueError:
    return ValueError(f"{state} holds the shares of another run ({conflict}): every share must be run with the same "
                      f"list, --num_shards and encoding flags; finish that run with its settings, or delete {state} "
                      "to share the list out afresh (videos already re-encoded are kept and not redone)")


def claim_share(state: str, share: Share, settings: dict) -> None:
    """Record this share's settings in ``state``; raise ValueError when another share's (or this
    share's earlier run's) differ. Two shares that start at once with different settings each
    write their claim before reading the others', so at least one of them sees the other."""
    mine = {"num_shards": share.count, **settings}
    conflict = _first_conflict(_claims(state), mine)
    if conflict:
        raise _refuse_mixing(state, conflict)
    own = os.path.join(state, _share_name(share.index, share.count) + ".json")
    existed = os.path.exists(own)
    atomic_write(own, (json.dumps({**mine, "shard_index": share.index}, indent=1) + "\n").encode(),
                 what="share claim", keeps="no video was re-encoded")
    conflict = _first_conflict(_claims(state), mine)
    if conflict:
        if not existed:  # an earlier claim stays: the newcomer that conflicts with it refuses too
            os.remove(own)
        raise _refuse_mixing(state, conflict)


def _lock_share(state: str, share: Share):
    """An ``flock`` that keeps a second run of the same share out (a resubmitted array task):
    both would write the same temporary files. Without flock on the filesystem, no guard."""
    import fcntl

    f = open(os.path.join(state, _share_name(share.index, share.count) + ".lock"), "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            return f  # ENOLCK, EOPNOTSUPP: a filesystem without locks
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"share {share.index} of {share.count} is being prepared by {holder}; wait for it to end "
                         "(a rerun then continues where it stopped)") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def _part_path(state: str, index: int, count: int) -> str:
    return os.path.join(state, _share_name(index, count) + ".txt")


def _read_parts(state: str, count: int) -> dict[int, bytes]:
    parts = {}
    for i in range(count):
        try:
            with open(_part_path(state, i, count), "rb") as f:
                parts[i] = f.read()
        except FileNotFoundError:
            pass
    return parts


def _part_targets(path: str, data: bytes, output: str) -> set[str]:
    """The output paths a part lists (list format, paths relative to ``output``)."""
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a list file written by evl.prepare; delete it and rerun its share") from None
    return {os.path.normpath(os.path.join(output, line.split()[0])) for line in lines
            if line.strip() and not line.lstrip().startswith("#")}


def combine_parts(records: list[VideoRecord], targets: dict[str, str], owner: dict[str, int], state: str,
                  count: int, output_list: str, output: str) -> tuple[list[VideoRecord] | None, list[int]]:
    """Write the whole list from the shares' parts once every part is there.

    Returns ``(the records written, [])``, or ``(None, the shares whose part is missing)``.
    A list line is kept when the part of the share its video belongs to lists the video; lines
    keep the input list's order. The parts are read again after the list is written and the list
    rewritten if one changed meanwhile: of shares that finish together, the one that writes last
    has then seen every part, so the list ends up matching the final parts.
    """
    parts = _read_parts(state, count)
    while True:
        missing = [i for i in range(count) if i not in parts]
        if missing:
            return None, missing
        done = {i: _part_targets(_part_path(state, i, count), data, output) for i, data in parts.items()}
        kept = [VideoRecord(targets[r.path], r.label, r.start_sec, r.end_sec) for r in records
                if targets[r.path] in done[owner[r.path]]]
        if kept:
            write_list(output_list, kept, data_root=output)
        again = _read_parts(state, count)
        if again == parts:
            return kept, []
        parts = again


# --- The command ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evl.prepare", description="Re-encode a list file's videos to H.264 with short GOPs, a "
        "constant frame rate and a given short side, for fast random access. On several machines, run one share "
        "of the list on each (--shard_index/--num_shards, or a SLURM array or torchrun); the last share to end "
        "writes the whole list.")
    p.add_argument("--list", required=True, dest="list_path", metavar="LIST",
                   help="list file, '<path> <label>' per line")
    p.add_argument("--data_root", metavar="DIR", help="directory the list's paths are relative to")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (must differ from the input)")
    p.add_argument("--output_list", metavar="FILE", help="the new list file (default: OUTPUT/<name of --list>); "
                   "its paths are relative to OUTPUT, so use --data_root OUTPUT with it")
    p.add_argument("--short_side", type=int, default=320, metavar="PX", help="output short side in pixels, aspect kept "
                   "(default: %(default)s)")
    p.add_argument("--crf", type=int, default=23, metavar="Q",
                   help="x264 quality, lower is better (default: %(default)s)")
    p.add_argument("--preset", default="veryfast", metavar="NAME", help="x264 preset (default: %(default)s)")
    p.add_argument("--tune", default=DEFAULT_TUNE, metavar="NAME",
                   help="x264 tune, or none (default: %(default)s: no CABAC, deblocking or weighted prediction, "
                   "so a frame decodes in about 20%% less time, for about 9%% more disk)")
    p.add_argument("--keyint", type=int, default=DEFAULT_KEYINT, metavar="N",
                   help="at most this many frames between keyframes, <= 16 (default: %(default)s, the most "
                   "pipelines.probe accepts without a warning)")
    p.add_argument("--workers", type=int, metavar="N",
                   help=f"parallel encoding processes (default: the cores this process may use, {available_cores()} "
                   "here)")
    p.add_argument("--shard_index", type=int, metavar="I", help="re-encode share I (from 0) of the list's videos: "
                   "every --num_shards-th one from the I-th on (default: from SLURM_ARRAY_TASK_ID or torchrun's RANK)")
    p.add_argument("--num_shards", type=int, metavar="N", help="the number of shares, all with the same --output "
                   "and --output_list (default: from SLURM_ARRAY_TASK_COUNT or torchrun's WORLD_SIZE; 1 for the "
                   "whole list here)")
    return p


def _encode_all(jobs: list[EncodeJob], workers: int) -> tuple[dict[str, str], tuple[str, str] | None]:
    """Run the jobs; returns (source -> error of the failed ones, (source, error) of the first
    video that found the disk full, or None). A full disk stops the run: the others would fail
    the same way."""
    from tqdm import tqdm

    failed: dict[str, str] = {}
    disk_full = None

    def take(source: str, error: str | None, full: bool) -> None:
        nonlocal disk_full
        if full:
            disk_full = disk_full or (source, error)
        elif error:
            failed[source] = error
        bar.update()

    with tqdm(total=len(jobs), desc="prepare", unit="video", dynamic_ncols=True, disable=None) as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                take(*_run(job))
                if disk_full:
                    break
        else:
            # spawn, not fork: the caller may hold threads (torch) that fork breaks.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                futures = [pool.submit(_run, job) for job in jobs]
                for fut in as_completed(futures):
                    if fut.cancelled():
                        continue
                    take(*fut.result())
                    if disk_full:  # let the running ones end
                        for f in futures:
                            f.cancel()
    return failed, disk_full


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0, or 1 when some video failed."""
    ns = build_parser().parse_args(argv)
    if ns.short_side < 2 or ns.short_side % 2:
        raise SystemExit(f"error: --short_side must be even and positive, got {ns.short_side}")
    if not 1 <= ns.keyint <= 16:
        raise SystemExit(f"error: --keyint must be in [1, 16], got {ns.keyint}")
    tunes = {"film", "animation", "grain", "stillimage", "psnr", "ssim", "fastdecode", "zerolatency"}
    if ns.tune != "none" and not set(ns.tune.split(",")) <= tunes:
        raise SystemExit(f"error: --tune must be none or x264 tunes joined by commas ({', '.join(sorted(tunes))}), "
                         f"got {ns.tune!r}")
    workers = ns.workers if ns.workers is not None else available_cores()
    if workers < 1:
        raise SystemExit("error: --workers must be at least 1")
    try:
        share = resolve_share(ns.shard_index, ns.num_shards, os.environ)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    output = os.path.abspath(ns.output)
    output_list = ns.output_list or os.path.join(output, os.path.basename(ns.list_path))
    in_root = ns.data_root if ns.data_root is not None else os.path.dirname(os.path.abspath(ns.list_path))
    if os.path.realpath(output) == os.path.realpath(in_root):
        raise SystemExit(f"error: --output {ns.output} is the input directory; choose another one")
    if os.path.realpath(output_list) == os.path.realpath(ns.list_path):
        raise SystemExit(f"error: the new list file would overwrite {ns.list_path}; pass --output_list")
    try:
        records = read_list(ns.list_path, data_root=ns.data_root, check_files=False)
        targets = plan(records, ns.data_root, output)
    except (ListFileError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

    # Shares are cut from the distinct videos in list order, whatever is done already, so that
    # shares started at different times agree on who does what.
    owner = {source: k % share.count for k, source in enumerate(targets)}
    state = shard_directory(output_list)
    lock = None
    try:
        if share.count > 1:
            os.makedirs(state, exist_ok=True)
            settings = {"list_sha256": file_sha256(ns.list_path), "short_side": ns.short_side, "crf": ns.crf,
                        "preset": ns.preset, "keyint": ns.keyint, "tune": ns.tune}
            claim_share(state, share, settings)
            lock = _lock_share(state, share)
        elif claims := _claims(state):
            counts = sorted({c.get("num_shards") for c in claims.values()}, key=str)
            raise ValueError(f"{state} holds the shares of a run in {' or '.join(map(str, counts))} shares: run this "
                             f"list's shares with that --num_shards, or delete {state} to prepare it in one run "
                             "(videos already re-encoded are kept and not redone)")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    try:
        return _prepare(ns, share, records, targets, owner, output, output_list, state, workers)
    finally:
        if lock is not None:
            lock.close()  # closing releases the flock


def _prepare(ns: argparse.Namespace, share: Share, records: list[VideoRecord], targets: dict[str, str],
             owner: dict[str, int], output: str, output_list: str, state: str, workers: int) -> int:
    mine = [s for s in targets if owner[s] == share.index]
    todo = [s for s in mine if not os.path.exists(targets[s])]
    if share.count > 1:
        print(f"prepare: share {share.index} of {share.count} ({share.origin}): {len(mine)} of the list's "
              f"{len(targets)} videos, {len(todo)} left to re-encode", flush=True)
    cores = available_cores()
    threads = max(1, cores // min(workers, max(len(todo), 1)))
    jobs = [EncodeJob(s, targets[s], ns.short_side, ns.crf, ns.preset, ns.keyint, threads, ns.tune) for s in todo]
    failed, disk_full = _encode_all(jobs, workers)

    # A list holds the videos that are there: re-encoded now or before.
    kept = [VideoRecord(targets[r.path], r.label, r.start_sec, r.end_sec) for r in records
            if owner[r.path] == share.index and os.path.exists(targets[r.path])]
    done_now = sum(1 for j in jobs if os.path.exists(j.target))
    counts = f"{done_now} re-encoded, {len(mine) - len(jobs)} already done, {len(failed)} failed"
    if share.count == 1:
        try:
            if kept:
                os.makedirs(os.path.dirname(os.path.abspath(output_list)), exist_ok=True)
                write_list(output_list, kept, data_root=output)
        except OSError as e:
            raise SystemExit(f"error: could not write {output_list} ({e.strerror or e}); the re-encoded videos are "
                             "kept, and a rerun writes the list") from None
        print(f"prepare: {counts}; {len(kept)} of {len(records)} list lines in {output_list} "
              f"(paths relative to {output})", flush=True)
    else:
        part = _part_path(state, share.index, share.count)
        try:
            write_list(part, kept, data_root=output)
            print(f"prepare: share {share.index} of {share.count}: {counts}; its {len(kept)} list lines in {part}",
                  flush=True)
            combined, waiting = combine_parts(records, targets, owner, state, share.count, output_list, output)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}; the re-encoded videos are kept, and a rerun of this share writes "
                             "the lists") from None
        if waiting:
            print(f"prepare: share(s) {', '.join(map(str, waiting))} of {share.count} not done yet: the last share to "
                  f"end writes {output_list}", flush=True)
        else:
            print(f"prepare: all {share.count} shares done: {len(combined)} of {len(records)} list lines in "
                  f"{output_list} (paths relative to {output})", flush=True)
    if disk_full:
        print(f"error: the disk of {output} is full ({disk_full[0]}: {disk_full[1]}); stopped with "
              f"{len(jobs) - done_now - len(failed)} video(s) left: free some space and rerun the same command "
              "to continue", file=sys.stderr, flush=True)
    if failed:
        print(f"{len(failed)} video(s) failed:", file=sys.stderr)
        for source, error in failed.items():
            print(f"  {source}: {error}", file=sys.stderr)
        sys.stderr.flush()
    return 1 if failed or disk_full else 0


if __name__ == "__main__":
    from .cli import run_program

    run_program(main)
