"""Encodings of the same videos side by side: what a frame costs to decode, what the files weigh,
and how close they are to their source. For choosing ``evl.prepare``'s flags.

    python benchmarks/encodings.py runs/prep_a runs/prep_b [--source runs/stock] [--rounds 5]

Each directory holds the same videos by relative path (``evl.prepare --output`` directories,
say). Decoding is sequential, one thread, every frame, without the RGB conversion (the PyAV
pipeline converts only the sampled frames), timed in process CPU time; the directories take
turns in alternating order, round after round, and the median round is reported, so that a
drift of the machine's speed favours none. With ``--source``, PSNR against the source frames
resized as ``evl.prepare`` resizes them (bicubic, then RGB), over each file's frames.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def video_files(root: str) -> list[str]:
    """The videos under ``root``, as sorted paths relative to it."""
    found = []
    for directory, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(directory, n), root) for n in names if n.endswith(VIDEO_EXTENSIONS)]
    return sorted(found)


def decode_ms_per_frame(paths: list[str]) -> float:
    """CPU ms per frame of decoding ``paths`` from start to end, one thread."""
    start, frames = time.process_time(), 0
    for path in paths:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "NONE"
            for _ in container.decode(stream):
                frames += 1
    return (time.process_time() - start) * 1000 / max(frames, 1)


def _rgb(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    with av.open(path) as container:
        frames = container.decode(video=0)
        if size is not None:
            frames = (f.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="BICUBIC")
                      for f in frames)
        return np.stack([f.to_ndarray(format="rgb24") for f in frames]).astype(np.float64)


def psnr_to_source(encoded: str, source: str) -> float:
    """PSNR of ``encoded``'s frames against ``source``'s, resized to ``encoded``'s size."""
    with av.open(encoded) as container:
        ctx = container.streams.video[0].codec_context
        size = (ctx.width, ctx.height)
    got, want = _rgb(encoded), _rgb(source, size)
    n = min(len(got), len(want))
    mse = float(((got[:n] - want[:n]) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def compare(dirs: list[str], source: str | None = None, rounds: int = 5) -> list[dict]:
    names = [video_files(d) for d in dirs]
    common = sorted(set(names[0]).intersection(*names[1:]))
    if not common:
        raise SystemExit("error: the directories hold no video under the same relative path")
    paths = {d: [os.path.join(d, n) for n in common] for d in dirs}
    times: dict[str, list[float]] = {d: [] for d in dirs}
    for r in range(rounds):
        for d in dirs if r % 2 == 0 else dirs[::-1]:
            times[d].append(decode_ms_per_frame(paths[d]))
    rows = []
    for d in dirs:
        row = {"dir": d, "videos": len(common), "bytes": sum(os.path.getsize(p) for p in paths[d]),
               "decode_ms_per_frame": statistics.median(times[d]), "rounds_ms": times[d]}
        if source is not None:
            row["psnr_db"] = statistics.mean(psnr_to_source(p, os.path.join(source, n)) for p, n in zip(paths[d], common))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", metavar="DIR", help="directories of the same videos, differently encoded")
    p.add_argument("--source", metavar="DIR", help="the videos they were made from, for PSNR")
    p.add_argument("--rounds", type=int, default=5, help="decoding rounds per directory (default: %(default)s)")
    args = p.parse_args(argv)
    rows = compare(args.dirs, args.source, args.rounds)
    base = rows[0]
    print(f"{rows[0]['videos']} videos each; decoding: one thread, every frame, median of {args.rounds} rounds")
    print(f"{'directory':40s} {'MB':>8s} {'ms/frame':>9s} {'vs first':>9s}" + (f" {'PSNR dB':>8s}" if args.source else ""))
    for row in rows:
        line = (f"{row['dir']:40s} {row['bytes'] / 1e6:8.2f} {row['decode_ms_per_frame']:9.3f} "
                f"{row['decode_ms_per_frame'] / base['decode_ms_per_frame']:8.2f}x")
        print(line + (f" {row['psnr_db']:8.2f}" if args.source else ""))
    return rows


if __name__ == "__main__":
    main()
