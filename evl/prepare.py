"""``python -m evl.prepare``: re-encode a dataset for fast, frame-exact random access.

Reading an 8-frame clip from a video with long GOPs decodes up to a whole GOP per sampled frame
(docs/decoding-notes.md, "What it buys"), and variable frame rates make frame numbers uneven in
time. This re-encodes every video of a list file with PyAV: short side resized to ``--short_side``
(aspect kept, even dimensions), H.264 (libx264, yuv420p, ``--crf``, ``--preset``) with a keyframe
at least every ``--keyint`` frames and no scene-cut keyframes, at a constant frame rate (the
source's average; every decoded frame kept and timestamped by its number), video only. Each
output is written under a temporary name, checked with ``pipelines.probe`` (keyframe interval,
frame count equal to the source's decoded frames, constant rate) and then renamed, so an
interrupted run resumes where it stopped. Sources are never overwritten. A new list file with
the same labels (and segment columns) points at the new files; failures are listed at the end.
"""

from __future__ import annotations

import argparse
import errno
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction

from pipelines.lists import ListFileError, VideoRecord, read_list, write_list

__all__ = ["EncodeJob", "encode_video", "main", "output_size"]

DEFAULT_KEYINT = 15  # pipelines.probe warns above 15 frames between keyframes


@dataclass(frozen=True)
class EncodeJob:
    source: str
    target: str
    short_side: int = 320
    crf: int = 23
    preset: str = "veryfast"
    keyint: int = DEFAULT_KEYINT
    threads: int = 1


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
                               "x264-params": f"keyint={job.keyint}:min-keyint={job.keyint}:scenecut=0"}
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evl.prepare", description="Re-encode a list file's videos to H.264 with short GOPs, a "
        "constant frame rate and a given short side, for fast random access.")
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
    p.add_argument("--keyint", type=int, default=DEFAULT_KEYINT, metavar="N",
                   help="at most this many frames between keyframes, <= 16 (default: %(default)s, the most "
                   "pipelines.probe accepts without a warning)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="parallel encoding processes (default: all cores, %(default)s here)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0, or 1 when some video failed."""
    from tqdm import tqdm

    ns = build_parser().parse_args(argv)
    if ns.short_side < 2 or ns.short_side % 2:
        raise SystemExit(f"error: --short_side must be even and positive, got {ns.short_side}")
    if not 1 <= ns.keyint <= 16:
        raise SystemExit(f"error: --keyint must be in [1, 16], got {ns.keyint}")
    if ns.workers < 1:
        raise SystemExit("error: --workers must be at least 1")
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

    todo = [s for s, t in targets.items() if not os.path.exists(t)]
    threads = max(1, (os.cpu_count() or 1) // min(ns.workers, max(len(todo), 1)))
    jobs = [EncodeJob(s, targets[s], ns.short_side, ns.crf, ns.preset, ns.keyint, threads) for s in todo]
    failed: dict[str, str] = {}
    disk_full = None  # (source, error) of the first video that found the disk full: stop there

    def take(source: str, error: str | None, full: bool) -> None:
        nonlocal disk_full
        if full:
            disk_full = disk_full or (source, error)
        elif error:
            failed[source] = error
        bar.update()

    with tqdm(total=len(jobs), desc="prepare", unit="video", dynamic_ncols=True, disable=None) as bar:
        if ns.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                take(*_run(job))
                if disk_full:
                    break
        else:
            # spawn, not fork: the caller may hold threads (torch) that fork breaks.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(ns.workers, len(jobs)), mp_context=ctx) as pool:
                futures = [pool.submit(_run, job) for job in jobs]
                for fut in as_completed(futures):
                    if fut.cancelled():
                        continue
                    take(*fut.result())
                    if disk_full:  # the others would fail the same way: let the running ones end
                        for f in futures:
                            f.cancel()

    # The list holds the videos that are there: re-encoded now or before.
    kept = [VideoRecord(targets[r.path], r.label, r.start_sec, r.end_sec) for r in records
            if os.path.exists(targets[r.path])]
    try:
        if kept:
            os.makedirs(os.path.dirname(os.path.abspath(output_list)), exist_ok=True)
            write_list(output_list, kept, data_root=output)
    except OSError as e:
        raise SystemExit(f"error: could not write {output_list} ({e.strerror or e}); the re-encoded videos are "
                         "kept, and a rerun writes the list") from None
    done_now = sum(1 for j in jobs if os.path.exists(j.target))
    print(f"prepare: {done_now} re-encoded, {len(targets) - len(jobs)} already done, "
          f"{len(failed)} failed; {len(kept)} of {len(records)} list lines in {output_list} "
          f"(paths relative to {output})", flush=True)
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
    sys.exit(main())
