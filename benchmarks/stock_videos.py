"""Kinetics-like videos as users have them, for benchmarks: natural content, stock encoding.

Each video is a camera panning and zooming over a photograph (matplotlib's sample photo, so no
download) with a little sensor noise, encoded by libx264 with its defaults (preset medium, crf
23): a keyframe every 250 frames or at scene cuts, B-frames, as ``ffmpeg -i in.mp4 out.mp4``
writes them and as most downloaded datasets come. Smooth synthetic content would decode faster
and flatter every loader; the demo's moving-object clips are not this.

    python benchmarks/stock_videos.py --output runs/stock [--num_videos 24] [--frames 300] [--size 340x256]

writes ``OUTPUT/videos/NNN.mp4`` and ``OUTPUT/train.txt`` (``videos/NNN.mp4 <label>``, 4 labels);
pass ``--train_list OUTPUT/train.txt --data_root OUTPUT --num_classes 4`` to throughput.py.
"""

from __future__ import annotations

import argparse
import math
import os
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction

import numpy as np


def stock_frames(seed: int, num_frames: int = 300, size: tuple[int, int] = (340, 256)):
    """The frames of video ``seed``: ``[H, W, 3]`` uint8 RGB, one at a time."""
    import matplotlib.cbook
    from PIL import Image

    rng = np.random.default_rng(seed)
    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    photo = photo.resize((photo.width * 2, photo.height * 2), Image.BICUBIC)
    cast = rng.integers(-30, 30, 3)  # a colour cast per video
    big = Image.fromarray(np.clip(np.asarray(photo).astype(np.int16) + cast, 0, 255).astype(np.uint8))
    width, height = size
    zoom0, speed = rng.uniform(1.0, 1.5), rng.uniform(-1.5, 1.5, 2)
    start = rng.uniform(0, 1, 2) * (np.array(big.size) - np.array(size) * 1.7)
    for t in range(num_frames):
        zoom = zoom0 + 0.15 * math.sin(t / 45)
        w, h = width * zoom, height * zoom
        x = float(np.clip(start[0] + speed[0] * t, 0, big.width - w - 1))
        y = float(np.clip(start[1] + speed[1] * t, 0, big.height - h - 1))
        view = big.resize((width, height), Image.BILINEAR, box=(x, y, x + w, y + h))
        pixels = np.asarray(view).astype(np.int16) + rng.normal(0, 2.5, (height, width, 3)).astype(np.int16)
        yield np.clip(pixels, 0, 255).astype(np.uint8)


def write_stock_video(path: str, seed: int, num_frames: int = 300, size: tuple[int, int] = (340, 256),
                      fps: int = 30) -> str:
    import av

    tmp = path + ".partial.mp4"
    with av.open(tmp, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "23", "preset": "medium"})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for t, pixels in enumerate(stock_frames(seed, num_frames, size)):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    os.replace(tmp, path)
    return path


def write_stock_dataset(output: str, num_videos: int = 24, num_frames: int = 300, size: tuple[int, int] = (340, 256),
                        workers: int = os.cpu_count() or 1) -> str:
    """Writes the videos (those not already there) and ``train.txt``; returns the list's path."""
    os.makedirs(os.path.join(output, "videos"), exist_ok=True)
    names = [f"videos/{i:03d}.mp4" for i in range(num_videos)]
    todo = [i for i, n in enumerate(names) if not os.path.exists(os.path.join(output, n))]
    jobs = ([os.path.join(output, names[i]) for i in todo], todo, [num_frames] * len(todo), [size] * len(todo))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(workers, len(todo))) as ex:
            list(ex.map(write_stock_video, *jobs))
    else:
        list(map(write_stock_video, *jobs))
    list_path = os.path.join(output, "train.txt")
    with open(list_path, "w", encoding="utf-8") as f:
        f.writelines(f"{n} {i % 4}\n" for i, n in enumerate(names))
    return list_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--num_videos", type=int, default=24)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--size", default="340x256", help="WIDTHxHEIGHT")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    print(write_stock_dataset(args.output, args.num_videos, args.frames, (width, height)))


if __name__ == "__main__":
    main()
