"""The demo dataset: four classes of synthetic clips that differ only in their motion.

Each clip shows one object with a fixed look (a two-colour checker with a little pixel noise)
moving left, right, up or down over a smooth random background that changes every clip
(EVL spec section 6). A single frame says nothing about the class, so a model can only learn
it from time, which is what EVL's temporal modules add to a frozen image backbone. The object's
look is kept fixed on purpose: with a random frozen backbone, random looks leave the model at
chance. `write_demo_dataset` writes the videos (H.264 mp4 or VP9 webm, 25 fps), the
`train.txt` / `val.txt` list files and `class_names.json`, deterministically from a seed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from pipelines.files import atomic_write
from pipelines.lists import ListFileError, VideoRecord, read_list, write_list

__all__ = ["CLASS_NAMES", "DemoDataset", "object_size", "render_clip", "write_demo_dataset"]

CLASS_NAMES = ("moving left", "moving right", "moving up", "moving down")
FPS = 25
# Bump when the rendering or encoding changes, so that old datasets are rewritten.
_FORMAT_VERSION = 2
_SPLITS = ("train", "val")
# The checker's two colours: far apart in luma so that they survive 4:2:0 chroma subsampling.
_COLOURS = np.array([[240, 220, 40], [20, 40, 160]], dtype=np.float32)
_OBJECT_NOISE_STD = 6.0
# Background noise grid (per side) before upsampling: a few smooth blobs per frame.
_BACKGROUND_GRID = 5
_CODECS = {
    # Low CRF keeps the checker's edges crisp; short GOPs (_GOP) bound the cost of a seek.
    # On frames this small, x264's macroblock tree makes the output vary from run to run with
    # the heap's contents (not with asm=0); it is off so that the same seed gives the same bytes.
    "h264": ("libx264", ".mp4", {"crf": "18", "preset": "veryfast", "x264-params": "mbtree=0"}),
    "vp9": ("libvpx-vp9", ".webm", {"crf": "20", "b": "0", "deadline": "good", "cpu-used": "4"}),
}
_GOP = 8  # keyframes well within the 15 frames DALI needs for exact seeks


@dataclass(frozen=True)
class DemoDataset:
    """Where a written demo dataset lives (the paths inside the list files are relative to
    `root`: pass it as `data_root`)."""

    root: str
    train_list: str
    val_list: str
    class_names_path: str
    class_names: tuple[str, ...] = CLASS_NAMES


def object_size(size: int) -> int:
    """Side of the checker square in a `size` x `size` frame: a quarter, in whole 4x4 cells."""
    return max(4, size // 16 * 4)


def _checker(side: int) -> np.ndarray:
    cell = side // 4
    ys, xs = np.indices((side, side)) // cell
    return _COLOURS[(ys + xs) % 2]


def _smooth_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random low-resolution colours upsampled bilinearly (corners aligned) to `size`."""
    k = _BACKGROUND_GRID
    grid = rng.uniform(0, 255, (k, k, 3)).astype(np.float32)
    pos = np.linspace(0, k - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), k - 2)
    frac = (pos - lo).astype(np.float32)
    # Element-wise two-term blends, not a matmul or einsum: those sum in an order that depends
    # on memory alignment, and a last-bit change can flip a rounded pixel, so the same seed
    # would not always give the same video.
    rows = grid[lo] * (1 - frac)[:, None, None] + grid[lo + 1] * frac[:, None, None]
    return rows[:, lo] * (1 - frac)[None, :, None] + rows[:, lo + 1] * frac[None, :, None]


def render_clip(
    rng: np.random.Generator, label: int, *, size: int = 64, num_frames: int = 16
) -> np.ndarray:
    """One clip of class `label` (index into `CLASS_NAMES`) as uint8 `[T, H, W, 3]`.

    The object moves 2-4 px per frame (less when the clip is too long for the object to cross
    the frame at that speed) along the class's direction, from a random start chosen so that
    it stays fully inside the frame.
    """
    if label not in range(len(CLASS_NAMES)):
        raise ValueError(f"label must be in [0, {len(CLASS_NAMES)}), got {label}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be at least 2 to show motion, got {num_frames}")
    side = object_size(size)
    room = size - side
    fastest = min(4.0, room / (num_frames - 1))
    if fastest < 0.5:
        raise ValueError(f"a {size}px frame is too small for {num_frames} frames of motion")
    speed = rng.uniform(min(2.0, fastest), fastest)
    travel = speed * (num_frames - 1)
    sign = -1 if label in (0, 2) else 1  # left and up move towards 0
    start = rng.uniform(0, room - travel) + (travel if sign < 0 else 0)
    along = np.rint(start + sign * speed * np.arange(num_frames)).astype(int)
    across = np.full(num_frames, int(rng.integers(0, room + 1)))
    ys, xs = (along, across) if label >= 2 else (across, along)

    background = _smooth_background(rng, size)
    checker = _checker(side)
    noise = rng.normal(0, _OBJECT_NOISE_STD, (num_frames, side, side, 3)).astype(np.float32)
    frames = np.repeat(background[None], num_frames, axis=0)
    for t in range(num_frames):
        frames[t, ys[t] : ys[t] + side, xs[t] : xs[t] + side] = checker + noise[t]
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _encode(path: str, frames: np.ndarray, codec: str) -> None:
    codec_name, _, options = _CODECS[codec]
    # bitexact: no random track UIDs (webm) or version strings, so same seed, same bytes.
    with av.open(path, "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec_name, rate=FPS, options=dict(options))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = _GOP
        # One thread: tiny frames gain nothing from threads, and the bitstream stays reproducible.
        stream.codec_context.thread_count = 1
        for t, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_clip(job: tuple[str, int, int, int, int, int, int, str]) -> None:
    path, seed, split_id, i, label, size, num_frames, codec = job
    rng = np.random.default_rng([seed, split_id, i])
    _encode(path, render_clip(rng, label, size=size, num_frames=num_frames), codec)


def _paths(root: str) -> DemoDataset:
    return DemoDataset(
        root=root,
        train_list=os.path.join(root, "train.txt"),
        val_list=os.path.join(root, "val.txt"),
        class_names_path=os.path.join(root, "class_names.json"),
    )


def _is_complete(dataset: DemoDataset, manifest_path: str, params: dict) -> bool:
    try:
        with open(manifest_path, encoding="utf-8") as f:
            if json.load(f) != params:
                return False
        counts = [
            len(read_list(dataset.train_list, data_root=dataset.root)),
            len(read_list(dataset.val_list, data_root=dataset.root)),
        ]
    except (OSError, ValueError, ListFileError):
        return False
    return counts == [params["num_train"], params["num_val"]] and os.path.isfile(
        dataset.class_names_path
    )


def _write_atomic_json(path: str, value: object) -> None:
    atomic_write(path, (json.dumps(value, indent=1) + "\n").encode(), what="demo dataset file")


def write_demo_dataset(
    root: str | os.PathLike,
    *,
    num_train: int = 256,
    num_val: int = 64,
    codec: str = "h264",
    size: int = 64,
    num_frames: int = 16,
    seed: int = 0,
    workers: int = 1,
) -> DemoDataset:
    """Write the demo dataset under `root`, or return the one already there.

    A dataset counts as already there when `root/demo.json`, written last, records the same
    parameters and its lists and videos exist; anything else is rewritten. Clips are numbered
    per split and labelled `i % 4`, so classes are balanced. Encoding a 64 px clip takes a few
    milliseconds, so one process (`workers=1`) writes the default dataset in seconds; more
    workers help for large frames. Not safe to call from several processes at once: call it
    on one rank and wait.
    """
    if codec not in _CODECS:
        raise ValueError(f"codec must be one of {sorted(_CODECS)}, got {codec!r}")
    if num_train < 1 or num_val < 1:
        raise ValueError("num_train and num_val must be at least 1")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if size % 2:
        raise ValueError(f"size must be even (4:2:0 video), got {size}")
    root = os.fspath(root)
    dataset = _paths(root)
    manifest_path = os.path.join(root, "demo.json")
    params = {
        "format_version": _FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "codec": codec,
        "size": size,
        "num_frames": num_frames,
        "fps": FPS,
        "seed": seed,
        "class_names": list(CLASS_NAMES),
    }
    if _is_complete(dataset, manifest_path, params):
        return dataset
    # Fail on bad sizes here, before anything on disk is touched.
    render_clip(np.random.default_rng(0), 0, size=size, num_frames=num_frames)

    os.makedirs(root, exist_ok=True)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # until rewritten last, the dataset is incomplete
    ext = _CODECS[codec][1]
    jobs, records = [], {split: [] for split in _SPLITS}
    for split_id, (split, count) in enumerate(zip(_SPLITS, (num_train, num_val))):
        directory = os.path.join(root, "videos", split)
        os.makedirs(directory, exist_ok=True)
        # Clips of an earlier, different dataset (another codec, more clips) must not linger.
        for name in os.listdir(directory):
            if re.fullmatch(r"\d{5}\.(mp4|webm)", name):
                os.remove(os.path.join(directory, name))
        for i in range(count):
            relative = f"videos/{split}/{i:05d}{ext}"
            label = i % len(CLASS_NAMES)
            jobs.append(
                (os.path.join(root, relative), seed, split_id, i, label, size, num_frames, codec)
            )
            records[split].append(VideoRecord(relative, label))

    if workers > 1:
        # spawn, not fork: the caller may hold threads (torch, a DataLoader) that fork breaks.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            list(pool.map(_write_clip, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_clip(job)

    write_list(dataset.train_list, records["train"])
    write_list(dataset.val_list, records["val"])
    _write_atomic_json(dataset.class_names_path, list(CLASS_NAMES))
    _write_atomic_json(manifest_path, params)
    return dataset


# -- the demo run (`python -m evl.train` with no arguments) ----------------------------------

# A tiny random frozen CLIP tower (evl-spec §6): 64 px, patch 16, width 64, 4 blocks, 4 heads.
DEMO_BACKBONE = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 16,
                                                 "head_width": 16}}


def demo_argv(dataset: DemoDataset, backbone_json: str, output_dir: str, *, pipeline: str = "pyav",
              num_steps: int = 1000) -> list[str]:
    """The training flags of the demo: the spec §6 recipe, whole frames, no augmentation."""
    return [
        "--backbone", backbone_json, "--pipeline", pipeline, "--num_classes", str(len(dataset.class_names)),
        "--train_list_path", dataset.train_list, "--val_list_path", dataset.val_list, "--data_root", dataset.root,
        "--num_frames", "8", "--sampling_rate", "1", "--num_temporal_views", "1", "--num_spatial_views", "1",
        # Whole frames: a 64 px clip has no room for crops, and flips would swap left and right.
        "--crop_scale", "1", "1", "--auto_augment", "none",
        "--batch_size", "32", "--lr", "1e-3", "--weight_decay", "0.05", "--num_steps", str(num_steps),
        "--eval_freq", str(max(1, num_steps // 4)), "--save_freq", str(num_steps), "--print_freq", "20",
        "--num_workers", "2", "--mixed_precision", "fp32", "--device", "cpu", "--output_dir", output_dir,
        "--overwrite_output_dir",  # the demo's own directory: each demo starts over
    ]


def build_demo_cache(dataset: DemoDataset, backbone_json: str, train_argv: list[str]) -> str:
    """The demo's feature cache (4 views per training clip, the val views), built once per
    setting: the directory is named by a hash of the build's settings and the backbone's config,
    so a change of either builds a new cache instead of failing on the old one's manifest."""
    import dataclasses
    import hashlib

    from .cache import CacheBuild, run_build
    from .config import parse_config

    cfg = parse_config(train_argv)
    jobs = [CacheBuild.for_run(cfg, split, "", num_views=4, device="cpu") for split in ("train", "val")]
    with open(backbone_json, encoding="utf-8") as f:
        settings = [dataclasses.asdict(jobs[0].model), dataclasses.asdict(jobs[0].data), jobs[0].seed, f.read()]
    out = os.path.join(dataset.root, "feature_cache", hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12])
    for job in jobs:
        if not os.path.isfile(os.path.join(out, job.split, "manifest.json")):
            print(f"demo: caching the backbone's features of the {job.split} clips in {out}", flush=True)
            run_build(dataclasses.replace(job, output=out))
    return out


def run_demo(root: str = "data/demo", output_dir: str = "runs/demo", *, pipeline: str = "pyav",
             num_steps: int = 1000, extra_argv: tuple[str, ...] = ()) -> dict:
    """Write the demo dataset (once), train on it on the CPU and report val top-1.

    ``pipeline``: ``pyav`` (the default), ``dali`` (DALI's CPU decoder, on VP9 copies of the
    clips) or ``cache`` (the backbone's features cached once, then the decoder trained alone).
    """
    import time
    import warnings

    from .config import parse_config
    from .train import train

    codec = "vp9" if pipeline == "dali" else "h264"  # DALI's CPU decoder reads VP9, not H.264
    root = os.path.join(root, codec)
    if pipeline not in ("pyav", "dali", "cache"):
        raise ValueError(f"the demo runs with --pipeline pyav, dali or cache, not {pipeline!r}")
    t0 = time.perf_counter()
    # 8-frame clips whose object moves 2-4 px per frame (spec §6); enough clips that the decoder
    # must learn motion rather than memorise backgrounds (256 clips are memorised: val at chance).
    dataset = write_demo_dataset(root, codec=codec, num_train=2048, num_val=256, num_frames=8)
    backbone_json = os.path.join(root, "tiny-vit.json")
    with open(backbone_json, "w", encoding="utf-8") as f:
        json.dump(DEMO_BACKBONE, f)
    print(f"demo: {len(read_list(dataset.train_list, data_root=root))} train / "
          f"{len(read_list(dataset.val_list, data_root=root))} val clips in {root} "
          f"({', '.join(dataset.class_names)}); training a tiny random-backbone EVL for {num_steps} steps "
          f"on the CPU", flush=True)
    argv = demo_argv(dataset, backbone_json, output_dir, pipeline=pipeline, num_steps=num_steps)
    if pipeline == "cache":
        argv += ["--feature_cache", build_demo_cache(dataset, backbone_json, argv)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no backbone_path given")  # random on purpose here
        result = train(parse_config(argv + list(extra_argv)))
    elapsed = time.perf_counter() - t0
    print(f"demo: val top-1 {result.get('best_top1', float('nan')):.1f}% (chance 25%) in {elapsed:.0f} s; "
          f"checkpoints, metrics.jsonl and curves.png in {output_dir}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    import argparse

    p = argparse.ArgumentParser(prog="python -m evl.demo", description="Train the built-in demo on the CPU "
                                "(`python -m evl.train` with no arguments runs it with PyAV).")
    p.add_argument("--pipeline", choices=["pyav", "dali", "cache"], default="pyav")
    p.add_argument("--num_steps", type=int, default=1000)
    p.add_argument("--output_dir", help="default: runs/demo (runs/demo-PIPELINE for dali and cache)")
    args = p.parse_args(argv)
    out = args.output_dir or ("runs/demo" if args.pipeline == "pyav" else f"runs/demo-{args.pipeline}")
    return run_demo(output_dir=out, pipeline=args.pipeline, num_steps=args.num_steps)


if __name__ == "__main__":
    from .cli import run_program

    run_program(main)
