"""``python -m evl.predict``: the top-k classes of single videos, with a trained EVL checkpoint.

Each video is read like an evaluation video (spec §2): every spatial x temporal view of the
checkpoint's evaluation setting, the softmax averaged over views. Long, untrimmed videos can be
cut into sliding windows (``--window_sec``, ``--stride_sec``): each window is predicted the same
way and printed as a timeline, and the whole video's prediction is the mean of its windows'.
``--plot FILE.png`` draws that timeline: the probability of the video's top classes over time.
Videos are read by the training pipelines (``--pipeline pyav``, or ``dali``: NVDEC on a GPU),
each window as a list file's segment. A video that cannot be read is reported and skipped; the
exit status is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile

import torch

from pipelines import PipelineConfig, build_pipeline
from pipelines.files import atomic_write
from pipelines.lists import VideoRecord, write_list
from pipelines.probe import probe_video
from pipelines.index import VideoReadError

from .inference import Predictor, add_model_arguments, predictor_from_args, read_class_names
from .weights import WeightsError

__all__ = ["main", "plot_timeline", "predict_video", "sliding_windows"]


def sliding_windows(duration: float, window: float, stride: float) -> list[tuple[float, float]]:
    """``(start, end)`` seconds of windows ``stride`` apart that cover ``[0, duration]``.

    Every window is ``window`` long; where the strides leave a tail uncovered, one more window
    ends at the video's end. A video shorter than a window is one window.
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window and stride must be positive, got {window} and {stride}")
    eps = 1e-6
    if duration <= window + eps:
        return [(0.0, duration)]
    count = int(math.floor((duration - window) / stride + eps)) + 1
    starts = [k * stride for k in range(count)]
    if starts[-1] + window < duration - eps:
        starts.append(duration - window)
    return [(s, s + window) for s in starts]


def _segment_probs(predictor: Predictor, path: str, link: str, segments: list[tuple[float | None, float | None]],
                   batch_size: int, pipeline: str) -> list[torch.Tensor]:
    """Softmax averaged over the evaluation views of each ``(start_sec, end_sec)`` segment of
    ``path`` (``(None, None)``: the whole video), read through ``link`` by ``pipeline`` as
    evaluation reads them: the segments are a list file's lines, so they are the clips
    ``evl.eval`` would read."""
    s = predictor.settings
    views = predictor.reader.sampler.num_views
    tmp = os.path.dirname(link)
    list_path = os.path.join(tmp, "segments.txt")
    write_list(list_path, [VideoRecord(link, 0, start, end) for start, end in segments], data_root=tmp)
    cfg = PipelineConfig(
        list_path=list_path, data_root=tmp, num_classes=None, num_frames=s["num_frames"],
        sampling_rate=s["sampling_rate"], sampling=s["sampling"], input_size=s["input_size"],
        batch_size=max(1, batch_size // views), train=False, num_workers=0,
        num_spatial_views=s["num_spatial_views"], num_temporal_views=s["num_temporal_views"],
        device=str(predictor.device), max_bad_fraction=1.0, missing_ok=True)
    try:
        with _quiet_pipelines():  # warnings about the dataset (GOPs, ...): one video is no dataset
            pipe = build_pipeline(pipeline, cfg)
            if pipe.num_samples != len(segments):
                raise VideoReadError(path, "it cannot be read")
            sums = torch.zeros(len(segments), predictor.num_classes)
            seen = torch.zeros(len(segments))
            for batch in pipe:
                index = batch.index.cpu()
                sums.index_add_(0, index, predictor.run_normalised(batch.clips)["probs"])
                seen.index_add_(0, index, torch.ones(len(index)))
    except VideoReadError as e:  # named by the link: name the video
        raise VideoReadError(path, e.reason) from e
    except (ValueError, RuntimeError) as e:  # a codec DALI cannot decode here, DALI's own errors
        raise VideoReadError(path, str(e).splitlines()[0]) from e
    if pipe.bad or not bool((seen > 0).all()):
        raise VideoReadError(path, pipe.bad[0][1] if pipe.bad else "it cannot be read")
    return list(sums / seen[:, None])


@contextlib.contextmanager
def _quiet_pipelines():
    logger = logging.getLogger("pipelines")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def predict_video(predictor: Predictor, path: str, *, window_sec: float | None = None,
                  stride_sec: float | None = None, batch_size: int = 32, pipeline: str = "pyav") -> dict:
    """``{'path', 'probs' [K], 'num_views'}``, plus ``'duration_sec'`` and ``'windows'``
    (``[{'start', 'end', 'probs'}]``) with ``window_sec``. The video is read by ``pipeline``
    (``pyav``, or ``dali``: NVDEC on a GPU), as evaluation reads it. Raises VideoReadError (or
    FileNotFoundError) for a video that cannot be read."""
    views = predictor.reader.sampler.num_views
    with tempfile.TemporaryDirectory(prefix="evl-predict-") as tmp:
        # The video under a name a list file can hold (no spaces), with its own extension. It is
        # probed under that name, so that the pipeline finds its frame index in this process.
        link = os.path.join(tmp, "video" + os.path.splitext(path)[1].lower())
        os.symlink(os.path.abspath(path), link)
        try:
            info = probe_video(link)
        except FileNotFoundError as e:
            raise FileNotFoundError(e.errno, e.strerror, path) from None
        except VideoReadError as e:
            raise VideoReadError(path, e.reason) from None
        if window_sec is None:
            (probs,) = _segment_probs(predictor, path, link, [(None, None)], batch_size, pipeline)
            return {"path": path, "probs": probs, "num_views": views}
        if info.fps <= 0:
            raise VideoReadError(path, "unknown frame rate: cannot cut it into windows of seconds")
        duration = info.num_frames / info.fps
        segments = sliding_windows(duration, window_sec, stride_sec or window_sec)
        probs = _segment_probs(predictor, path, link, segments, batch_size, pipeline)
    windows = [{"start": start, "end": end, "probs": p} for (start, end), p in zip(segments, probs)]
    return {"path": path, "probs": torch.stack(probs).mean(0), "num_views": views, "duration_sec": duration,
            "windows": windows}


def _name(names: list[str] | None, k: int) -> str | None:
    return names[k] if names else None


def to_json(result: dict, names: list[str] | None, topk: int) -> dict:
    p, c = result["probs"].topk(min(topk, len(result["probs"])))
    out = {"path": result["path"], "num_views": result["num_views"],
           "topk": [{"class": int(k), "name": _name(names, int(k)), "prob": round(float(q), 6)}
                    for q, k in zip(p, c)]}
    if "windows" in result:
        out["duration_sec"] = round(result["duration_sec"], 3)
        out["windows"] = []
        for w in result["windows"]:
            q, k = w["probs"].max(0)
            out["windows"].append({"start": round(w["start"], 3), "end": round(w["end"], 3), "class": int(k),
                                   "name": _name(names, int(k)), "prob": round(float(q), 6)})
    return out


def to_text(rec: dict) -> str:
    label = lambda r: r["name"] if r["name"] is not None else f"class {r['class']}"  # noqa: E731
    views = f"{rec['num_views']} view{'s' if rec['num_views'] != 1 else ''}"
    if "windows" not in rec:
        lines = [f"{rec['path']} ({views})"]
    else:
        w = rec["windows"]
        lines = [f"{rec['path']} ({rec['duration_sec']:.2f} s, {len(w)} window{'s' if len(w) != 1 else ''}, "
                 f"{views} each)"]
        lines += [f"  {x['start']:8.2f} - {x['end']:8.2f} s  {x['prob']:.3f}  {label(x)}" for x in w]
        lines.append("  whole video (mean of the windows):")
    lines += [f"  {r['prob']:.3f}  {label(r)}" for r in rec["topk"]]
    return "\n".join(lines)


def plot_timeline(result: dict, path: str, names: list[str] | None = None, *, num_classes: int = 5) -> dict:
    """Draw a windowed prediction (:func:`predict_video` with ``window_sec``) to the PNG ``path``.

    One line for each of ``num_classes`` classes (at most 10, the distinct colours of ``tab10``):
    first the classes that are the top class of some window, so that one that fills only a stretch
    of a long video shows, then the others; in each group the most probable over the whole video
    first. Each point is a window's probability, at the window's middle. The legend, beside the
    plot, names the classes with their whole-video probability, highest first.
    Returns what the figure holds, read back from it: ``{'classes': [k], 'lines': [{'label',
    'times', 'probs'}], 'size': (width, height)}`` (pixels), lines in the legend's order.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    windows = result["windows"]
    probs = torch.stack([w["probs"] for w in windows])  # [windows, classes]
    overall = result["probs"]
    leads = set(probs.argmax(1).tolist())
    ranked = sorted(range(probs.shape[1]), key=lambda k: (k not in leads, -float(overall[k])))
    classes = sorted(ranked[:max(1, min(num_classes, 10))], key=lambda k: -float(overall[k]))
    times = [(w["start"] + w["end"]) / 2 for w in windows]
    colours = matplotlib.colormaps["tab10"].colors
    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    ax = fig.add_subplot()
    marker = "o" if len(windows) <= 60 else None  # more markers would blur into a band
    for colour, k in zip(colours, classes):
        name = names[k] if names else f"class {k}"
        ax.plot(times, probs[:, k].tolist(), color=colour, marker=marker, markersize=4, linewidth=1.8,
                label=f"{name}: {float(overall[k]):.2f}")
    ax.set_xlim(0, result["duration_sec"])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("time (s), at the middle of each window")
    ax.set_ylabel("probability")
    ax.grid(True, alpha=0.3)
    start, end = windows[0]["start"], windows[0]["end"]
    cut = (f"{len(windows)} windows of {end - start:.3g} s every {windows[1]['start'] - start:.3g} s"
           if len(windows) > 1 else "1 window")
    ax.set_title(f"{os.path.basename(result['path'])}: {result['duration_sec']:.1f} s, {cut}", loc="left")
    fig.legend(loc="outside right upper", title="class: whole video")
    drawn = {"classes": classes, "size": fig.canvas.get_width_height(),
             "lines": [{"label": line.get_label(), "times": [float(x) for x in line.get_xdata()],
                        "probs": [float(y) for y in line.get_ydata()]} for line in ax.get_lines()]}
    atomic_write(path, lambda f: fig.savefig(f, format="png"), what="plot", keeps="the predictions are printed")
    return drawn


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evl.predict", description="Top-k classes of videos with a trained EVL checkpoint "
        "(softmax averaged over the evaluation views; optionally over sliding windows of long videos).")
    p.add_argument("videos", nargs="+", metavar="VIDEO")
    add_model_arguments(p)
    p.add_argument("--class_names", metavar="JSON",
                   help="JSON list of class names, index = position (e.g. k400_class_mappings.json)")
    p.add_argument("--topk", type=int, default=5, metavar="K")
    p.add_argument("--json", action="store_true", help="one JSON object per video on stdout")
    p.add_argument("--window_sec", type=float, metavar="SEC",
                   help="predict sliding windows of this many seconds (untrimmed videos)")
    p.add_argument("--stride_sec", type=float, metavar="SEC", help="window stride in seconds (default: --window_sec)")
    p.add_argument("--plot", metavar="FILE.png", help="with --window_sec and one VIDEO: draw the probability of its "
                   "--topk classes (the highest in any window; at most 10) over time to this PNG")
    p.add_argument("--batch_size", type=int, default=32, metavar="N", help="views per forward pass")
    p.add_argument("--pipeline", default="pyav", choices=["pyav", "dali"],
                   help="how videos are decoded, as in training (dali: on the GPU with NVDEC; on the CPU "
                   "VP8/VP9/MJPEG)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0, or 1 when some video could not be read."""
    ns = build_parser().parse_args(argv)
    if ns.topk < 1 or ns.batch_size < 1:
        raise SystemExit("error: --topk and --batch_size must be positive")
    if ns.stride_sec is not None and ns.window_sec is None:
        raise SystemExit("error: --stride_sec needs --window_sec")
    if (ns.window_sec is not None and ns.window_sec <= 0) or (ns.stride_sec is not None and ns.stride_sec <= 0):
        raise SystemExit("error: --window_sec and --stride_sec must be positive")
    if ns.plot is not None and ns.window_sec is None:
        raise SystemExit("error: --plot draws a timeline of windows: it needs --window_sec")
    if ns.plot is not None and len(ns.videos) > 1:
        raise SystemExit(f"error: --plot draws one video, got {len(ns.videos)}; run once per video")
    try:
        predictor = predictor_from_args(ns)
        names = (read_class_names(ns.class_names, predictor.num_classes) if ns.class_names
                 else predictor.settings.get("class_names"))  # an exported folder's
    except (WeightsError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    failed = []
    for path in ns.videos:
        try:
            result = predict_video(predictor, path, window_sec=ns.window_sec, stride_sec=ns.stride_sec,
                                   batch_size=ns.batch_size, pipeline=ns.pipeline)
        except (VideoReadError, OSError) as e:
            reason = e.reason if isinstance(e, VideoReadError) else (e.strerror or str(e))
            failed.append(path)
            print(f"error: {path}: {reason}", file=sys.stderr, flush=True)
            if ns.json:
                print(json.dumps({"path": path, "error": reason}), flush=True)
            continue
        rec = to_json(result, names, ns.topk)
        print(json.dumps(rec) if ns.json else to_text(rec), flush=True)
        if ns.plot is not None:
            try:
                plot_timeline(result, ns.plot, names, num_classes=ns.topk)
            except OSError as e:
                raise SystemExit(f"error: {e}") from None
            print(f"timeline of {path} in {ns.plot}", file=sys.stderr if ns.json else sys.stdout, flush=True)
    if failed:
        print(f"{len(failed)} of {len(ns.videos)} videos could not be read: {', '.join(failed)}",
              file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    from .cli import run_program

    run_program(main)
