"""The one GPU check of the GPU data path: what NVDEC decodes, whether frames are numbered right,
what decoders cost (DALI's, and NVIDIA's PyNvVideoCodec where installed), training throughput,
evaluation memory, colour, the `gpu` tests and the benchmarks.

    python scripts/gpu_check.py              # on a GPU machine: about 10 minutes on one H200
    python scripts/gpu_check.py --dry-run    # every part a CPU can run (VP9 through DALI's CPU
                                             # decoder, small sizes; the benchmark scripts in
                                             # this process): tests/test_gpu_check.py

On the lent GPU machine (``../shared/device/README.md``; its image has OpenCV, pytest and tqdm,
so ``bash ../shared/device/pack-gpu-deps.sh pynvvideocodec``: DALI, open_clip, PyAV and
PyNvVideoCodec), install the parts, then run
``PYTHONPATH=/tmp/site python scripts/gpu_check.py --data /tmp/gpu_check --only SECTION,...``
(the sections, in the order given): a call there may last 10 minutes, so run them in two calls,
the measured ones last (README, "On a GPU").

It writes its own test videos under ``--data`` (default: ``videos`` in the results folder) and
its results to ``$OUT`` (else ``runs/gpu_check``): ``results.json``, one entry per section,
rewritten after each section so a run cut short keeps what it measured, and the sections' logs
(seven files, so that all of them come back from the lent machine). A section that fails is
recorded with its error and the others still run; the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from fractions import Fraction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the project, and the tests' numbered-frame videos

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SECTIONS = ("environment", "capabilities", "frame_numbering", "decoder_reuse", "colour", "training_throughput",
            "eval_memory", "gpu_tests", "benchmarks", "decoder_threads", "decoder_cost", "gpu_decoders")


class Check:
    def __init__(self, dry_run: bool, out: str, data: str | None = None):
        self.dry_run, self.out = dry_run, out
        self.gpu = not dry_run
        self.device = "cuda:0" if self.gpu else "cpu"
        self.device_id = 0 if self.gpu else None
        self.data = data or os.path.join(out, "videos")
        os.makedirs(self.data, exist_ok=True)
        self.capability = tuple(torch.cuda.get_device_capability(0)) if self.gpu else None
        # Processes that encode the test videos: the dry run's clips are tiny, and encoding them
        # here costs less than starting interpreters to do it.
        self.writers = min(16, os.cpu_count() or 1) if self.gpu else 1

    def path(self, name: str) -> str:
        return os.path.join(self.data, name)


# -- videos --------------------------------------------------------------------------------------


def natural(num_frames: int, height: int, width: int, seed: int = 0, saturation: float = 35.0) -> np.ndarray:
    """Smooth colour fields under a grey texture, panning: [T, H, W, 3] uint8."""
    rng = np.random.default_rng(seed)
    pan = 2 * num_frames
    size = (height + pan, width + pan)
    colour = torch.nn.functional.interpolate(torch.tensor(rng.normal(0, saturation, (1, 3, 5, 6)), dtype=torch.float32),
                                             size=size, mode="bicubic", align_corners=False)[0]
    grey = torch.nn.functional.interpolate(torch.tensor(rng.normal(0, 25, (1, 1, 8, 8)), dtype=torch.float32),
                                           size=size, mode="bilinear", align_corners=False)[0]
    field = (128 + colour + grey).permute(1, 2, 0).numpy()
    return np.clip(np.rint([field[2 * t:2 * t + height, t:t + width] for t in range(num_frames)]), 0, 255).astype(np.uint8)


def encode(path: str, encoder: str, pix_fmt: str, frames: np.ndarray, options: dict | None = None) -> str:
    from videos import encode_frames

    return encode_frames(path, frames, encoder, pix_fmt=pix_fmt, options=options)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def compare(check: Check, path: str, indices: list[int]) -> dict:
    """DALI's frames of ``path`` (no up-front refusal: what the decoder itself does) against PyAV's."""
    from pipelines import dali as D
    from pipelines.index import frame_index
    from pipelines.probe import probe_video
    from pipelines.pyav import read_frames

    info = probe_video(path)
    row = {"size": f"{info.width}x{info.height}", "codec": info.codec, "pix_fmt": info.pix_fmt,
           "profile": info.profile,
           "refused_up_front": D.nvdec_problem(info, check.capability) if check.gpu else None}
    everything = read_frames(path, range(info.num_frames))
    positions = np.asarray(indices)
    wanted, rows = np.unique(D.dali_frame_numbers(frame_index(path), positions, gpu=check.gpu), return_inverse=True)
    try:
        got = D._decode(path, wanted, check.device_id)[rows]
    except Exception as e:  # noqa: BLE001 -- the answer sought: what DALI says
        return {**row, "ok": False, "error": str(e).splitlines()[0][:300]}
    nearest = [int(np.argmin([np.abs(g.astype(int) - f).mean() for f in everything])) for g in got]
    return {**row, "ok": True, "aligned": nearest == list(indices), "psnr": round(psnr(got, everything[positions]), 2)}


# -- sections ------------------------------------------------------------------------------------


def environment(check: Check) -> dict:
    import nvidia.dali

    out = {"torch": torch.__version__, "dali": nvidia.dali.__version__, "av": av.__version__,
           "cuda": torch.cuda.is_available(), "libnvcuvid": ctypes.util.find_library("nvcuvid")}
    if check.gpu:
        out.update(device=torch.cuda.get_device_name(0), capability=list(check.capability))
        try:
            ctypes.CDLL("libnvcuvid.so.1")
            out["libnvcuvid_loads"] = True
        except OSError as e:
            out["libnvcuvid_loads"] = str(e)
        if shutil.which("nvidia-smi"):
            out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                                "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return out


def capabilities(check: Check) -> dict:
    """Codec x pixel format x size through DALI's decoder against PyAV: OK or the error,
    alignment, PSNR; and whether nvdec_problem predicted the outcome."""
    cases = [("vp9_64x48", "libvpx-vp9", "yuv420p", 48, 64, ".webm"),
             ("vp9_odd_98x66", "libvpx-vp9", "yuv420p", 66, 98, ".webm")]
    if check.gpu:
        cases = [
            ("h264_64x48", "libx264", "yuv420p", 48, 64, ".mp4"),
            ("h264_odd_182x102", "libx264", "yuv420p", 102, 182, ".mp4"),
            ("h264_high10", "libx264", "yuv420p10le", 144, 160, ".mp4"),
            ("h264_422", "libx264", "yuv422p", 144, 160, ".mp4"),
            ("h264_444", "libx264", "yuv444p", 144, 160, ".mp4"),
            ("hevc_160x144", "libx265", "yuv420p", 144, 160, ".mp4"),
            ("hevc_below_min_128x128", "libx265", "yuv420p", 128, 128, ".mp4"),
            ("hevc_main10", "libx265", "yuv420p10le", 144, 160, ".mp4"),
            ("hevc_444", "libx265", "yuv444p", 144, 160, ".mp4"),
            ("vp9_128x128", "libvpx-vp9", "yuv420p", 128, 128, ".webm"),
            ("vp9_below_min_128x96", "libvpx-vp9", "yuv420p", 96, 128, ".webm"),
            ("vp9_profile2_10bit", "libvpx-vp9", "yuv420p10le", 144, 160, ".webm"),
            ("av1_160x144", "libsvtav1", "yuv420p", 144, 160, ".mkv"),
            ("mpeg4_160x144", "mpeg4", "yuv420p", 144, 160, ".mp4"),
        ]
    results = {}
    for name, encoder, pix_fmt, h, w, ext in cases:
        try:
            path = encode(check.path(name + ext), encoder, pix_fmt, natural(12, h, w, seed=len(results)))
        except Exception as e:  # noqa: BLE001 -- an encoder this build lacks: said, not fatal
            results[name] = {"ok": False, "error": f"could not encode: {e}"}
            continue
        row = compare(check, path, [3, 0, 11, 7, 7])
        row["prediction_right"] = (row["refused_up_front"] is None) == row["ok"] if check.gpu else None
        results[name] = row
    return results


def frame_numbering(check: Check) -> dict:
    """Frames read by number from files whose layout makes numbering hard, checked by the number
    each frame carries (tests/videos.py)."""
    from videos import frame_number, remux_with_pts, write_video

    from pipelines.dali import read_frames

    size = (160, 144) if check.gpu else (96, 64)
    vp9 = dict(codec="libvpx-vp9", size=size)
    files = {
        "vp9_long_gop.webm": dict(num_frames=120, gop=120, **vp9),
        "vp9_short_gop.mkv": dict(num_frames=40, gop=1, **vp9),
    }
    if check.gpu:
        files.update({
            "h264_open_gop_bpyramid.mp4": dict(num_frames=60, gop=12, bframes=3, open_gop=True,
                                               options={"x264-params": "keyint=12:min-keyint=12:scenecut=0:bframes=3:"
                                                        "b-pyramid=normal:open-gop=1"}, size=size),
            "h264.mkv": dict(num_frames=40, gop=8, bframes=2, size=size),
            "h264_long_gop.mp4": dict(num_frames=300, gop=250, bframes=2, size=size),
            "h264_negative_start.mp4": dict(num_frames=40, gop=8, bframes=2, start_pts=-2, size=size),
            "h264_no_bframes_negative_start.mp4": dict(num_frames=40, gop=8, start_pts=-3, size=size),
            "hevc_negative_start.mp4": dict(codec="libx265", num_frames=40, gop=8, start_pts=-2, size=size),
            "vp9_negative_start.mp4": dict(num_frames=40, gop=8, start_pts=-2, **vp9),
        })
    results = {}
    for name, kw in files.items():
        n = kw.pop("num_frames")
        path = write_video(check.path(name), n, **kw)
        results[name] = _read_numbers(path, read_frames, frame_number, check)
    dup = remux_with_pts(write_video(check.path("dup_src.webm"), 30, gop=10, **vp9), check.path("duplicate_pts.webm"),
                         {5: 4 * 40, 6: 4 * 40})  # two frames given the pts of frame 4 (40 ms ticks at 25 fps)
    results["duplicate_pts.webm"] = _read_numbers(dup, read_frames, frame_number, check)
    return results


def _read_numbers(path, read_frames, frame_number, check: Check, reader: str = "dali") -> dict:
    from pipelines.probe import probe_video
    from pipelines.pyav import read_frames as pyav_read

    n = probe_video(path).num_frames
    wanted = sorted({0, 1, n // 3, n // 2, n - 2, n - 1, min(n - 1, 13)})
    try:
        frames = read_frames(path, wanted, device="gpu" if check.gpu else "cpu")
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": str(e).splitlines()[0][:300]}
    got = [frame_number(f) for f in frames]
    pyav = [frame_number(f) for f in pyav_read(path, wanted)]
    return {"ok": got == pyav, "wanted": wanted, reader: got, "pyav": pyav}


def decoder_reuse(check: Check) -> dict:
    """What opening a file costs DALI: one frame of each of several files of one size (its
    decoder cache can reuse a decoder), then of a file of a new size (a new decoder)."""
    from pipelines import dali as D

    encoder, ext, (h, w) = ("libx264", ".mp4", (320, 424)) if check.gpu else ("libvpx-vp9", ".webm", (64, 96))
    paths = [encode(check.path(f"reuse{i}{ext}"), encoder, "yuv420p", natural(16, h, w, seed=i)) for i in range(8)]
    other = encode(check.path(f"reuse_other{ext}"), encoder, "yuv420p", natural(16, h + 32, w + 32, seed=9))
    times = []
    for path in paths + [other]:
        t = time.perf_counter()
        D._decode(path, np.array([8]), check.device_id)
        times.append((time.perf_counter() - t) * 1000)
    return {"first_ms": round(times[0], 2), "same_size_median_ms": round(statistics.median(times[1:-1]), 2),
            "new_size_ms": round(times[-1], 2), "note": "first includes building DALI's one-sample pipeline"}


def colour(check: Check) -> dict:
    """Which colours each decoder gives on content converted to YUV with BT.601 and with BT.709
    (and tagged so): PSNR of DALI's RGB (corrected by the stream's tag, as the pipeline does, and
    as the decoder gives it: the correction assumes BT.601 there) and PyAV's against the source
    frames, and DALI's mean
    signed difference from PyAV per channel (what a model trained on one path sees differently
    when predicting through the other)."""
    from pipelines import dali as D
    from pipelines.pyav import read_frames

    encoder, ext, opts = (("libx264", ".mp4", {"crf": "8"}) if check.gpu
                          else ("libvpx-vp9", ".webm", {"crf": "8", "b": "0", "deadline": "realtime", "cpu-used": "8"}))
    source = natural(8, 144 if check.gpu else 64, 160 if check.gpu else 96, seed=3, saturation=70)
    results = {}
    for name, matrix, tag in (("bt601", "ITU601", "smpte170m"), ("bt709", "ITU709", "bt709")):
        path = check.path(f"colour_{name}{ext}")
        tags = ({"x264-params": f"colorprim={tag}:transfer={tag}:colormatrix={tag}"} if encoder == "libx264"
                else {"colorspace": tag})
        with av.open(path, "w") as container:
            stream = container.add_stream(encoder, rate=25, options={**opts, **tags})
            stream.width, stream.height, stream.pix_fmt = source.shape[2], source.shape[1], "yuv420p"
            for t, array in enumerate(source):
                frame = av.VideoFrame.from_ndarray(array, format="rgb24").reformat(format="yuv420p",
                                                                                   dst_colorspace=matrix)
                frame.pts, frame.time_base = t, Fraction(1, 25)
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        ours = D.read_frames(path, range(8), device="gpu" if check.gpu else "cpu")  # corrected by the tag
        raw = D._decode(path, np.arange(8), check.device_id)  # as the decoder gives them
        pyav = read_frames(path, range(8))
        results[name] = {"dali_vs_source_psnr": round(psnr(ours, source), 2),
                         "dali_uncorrected_vs_source_psnr": round(psnr(raw, source), 2),
                         "pyav_vs_source_psnr": round(psnr(pyav, source), 2),
                         "dali_minus_pyav_mean_rgb": [round(float(x), 2) for x in
                                                      (ours.astype(float) - pyav).mean(axis=(0, 1, 2))],
                         "dali_vs_pyav_psnr": round(psnr(ours, pyav), 2)}
    return results


class _Utilisation:
    """nvidia-smi's decoder and SM utilisation, sampled every 0.2 s while the block runs."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, float]] = []

    def __enter__(self):
        if self.enabled:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.decoder,utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "200", "-i", "0"],
                                         stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                dec, sm = (float(x) for x in line.split(","))
                self.samples.append((dec, sm))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.enabled:
            self.proc.terminate()
            self.proc.wait()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        return {"nvdec_util_mean": round(statistics.mean(s[0] for s in self.samples), 1),
                "sm_util_mean": round(statistics.mean(s[1] for s in self.samples), 1)}


def training_throughput(check: Check) -> dict:
    """Training batches (8 frames x stride 16, the recipe's augmentation) from short-GOP videos:
    first and steady batch times, clips/s, GPU memory, utilisation, and for DALI the share of the
    time the training thread spends feeding it."""
    from evl.demo import write_demo_dataset
    from pipelines import PipelineConfig, build_pipeline

    codec, size, clips, batch, frames, stride = (("h264", 320, 256, 32, 8, 16) if check.gpu
                                                 else ("vp9", 64, 16, 4, 8, 2))
    ds = write_demo_dataset(check.path("train_" + codec), codec=codec, num_train=clips, num_val=4, size=size,
                            num_frames=frames * stride + 8, workers=check.writers)
    results = {}
    # dali: fn.decoders.video on each batch's frame lists; dali_reader: the same clips read by
    # fn.experimental.readers.video, which keeps its decoders from clip to clip.
    for name in ("pyav", "dali", "dali_reader"):
        cfg = PipelineConfig(list_path=ds.train_list, data_root=ds.root, num_classes=4, num_frames=frames,
                             sampling_rate=stride, input_size=min(224, size), batch_size=batch, train=True,
                             num_workers=min(16, os.cpu_count() or 1), device=check.device,
                             auto_augment="rand-m7-n4-mstd0.5-inc1",
                             extra={"dali_decoder": "reader"} if name == "dali_reader" else {})
        pipe = build_pipeline("dali" if name.startswith("dali") else name, cfg)
        feeding = [0.0]
        if name.startswith("dali"):  # what the training thread spends in the external_source callback
            attr = "_build_batch" if name == "dali" else "_clip_columns"
            work = getattr(pipe, attr)

            def timed(*a, _work=work, **k):
                t = time.perf_counter()
                try:
                    return _work(*a, **k)
                finally:
                    feeding[0] += time.perf_counter() - t
            setattr(pipe, attr, timed)
        if check.gpu:
            torch.cuda.reset_peak_memory_stats()
        pipe.set_epoch(0)
        with _Utilisation(check.gpu) as util:
            t0 = time.perf_counter()
            times, n = [], 0
            for b in pipe:
                if check.gpu:
                    torch.cuda.synchronize()
                times.append(time.perf_counter())
                n += len(b.index)
        total = times[-1] - t0
        steady = (n - batch) / (times[-1] - times[0]) if len(times) > 1 else None
        # steady is the rate after the first batch: for PyAV's workers, whose prefetch can hold
        # the whole epoch by then, only clips_per_s (start included) compares.
        results[name] = {"first_batch_s": round(times[0] - t0, 3), "steady_clips_per_s": steady and round(steady, 1),
                         "clips_per_s": round(n / total, 1),
                         "clips": n, "feeding_share": round(feeding[0] / total, 3) if name != "pyav" else None,
                         "graphs_built": getattr(pipe, "graphs_built", None),
                         "readers_built": getattr(pipe, "readers_built", None),
                         "max_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if check.gpu else None,
                         **util.summary()}
    return {"setting": f"{codec} {size}p, batch {batch}, {frames}x{stride} frames, RandAugment", **results}


def eval_memory(check: Check) -> dict:
    """Evaluation batches of 3 views (the 8-frame recipe's 1x3) of 720p videos: peak GPU memory."""
    from evl.demo import write_demo_dataset
    from pipelines import PipelineConfig, build_pipeline

    codec, size, videos, frames, stride = ("h264", 720, 16, 140, 16) if check.gpu else ("vp9", 64, 4, 24, 2)
    ds = write_demo_dataset(check.path("eval_" + codec), codec=codec, num_train=4, num_val=videos, size=size,
                            num_frames=frames, workers=check.writers)
    cfg = PipelineConfig(list_path=ds.val_list, data_root=ds.root, num_classes=4, num_frames=8, sampling_rate=stride,
                         input_size=224 if check.gpu else 64, batch_size=8 if check.gpu else 2, train=False,
                         num_workers=4, device=check.device, num_spatial_views=1, num_temporal_views=3)
    if check.gpu:
        torch.cuda.reset_peak_memory_stats()
    rows = sum(len(b.index) for b in build_pipeline("dali", cfg))
    return {"setting": f"{codec} {size}p, {cfg.batch_size} videos x 3 views a batch", "rows": rows,
            "max_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if check.gpu else None}


def gpu_tests(check: Check) -> dict:
    log = os.path.join(check.out, "pytest.txt")
    # Every test marked `gpu`: DALI's graphs, the model and prediction in CUDA, PyAV's pinned batches.
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(argv + ([] if check.gpu else ["--co"]), cwd=ROOT, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(proc.stdout + proc.stderr)
    return {"returncode": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1], "log": log}


def _bench_videos(check: Check) -> list[str]:
    """benchmarks/throughput.py's data and timing flags: on the GPU, Kinetics-like 300-frame
    videos the benchmark writes itself; in the dry run, a few small VP9 clips, enough to run
    every part once."""
    if check.gpu:
        return ["--video_frames", "300", "--iters", "5", "--repeats", "2"]
    from evl.demo import DEMO_BACKBONE, write_demo_dataset

    root = check.path("bench_vp9")
    ds = write_demo_dataset(root, codec="vp9", num_train=8, num_val=4, num_frames=24)
    backbone = os.path.join(root, "tiny-vit.json")
    with open(backbone, "w", encoding="utf-8") as f:
        json.dump(DEMO_BACKBONE, f)
    return ["--train_list", ds.train_list, "--data_root", ds.root, "--backbone", backbone, "--num_classes", "4",
            "--batch_size", "4", "--num_frames", "4", "--sampling_rate", "2", "--iters", "1", "--repeats", "1",
            "--warmup", "1", "--min_seconds", "0"]


def _script_module(script: str):
    """The project's ``script`` (a path from the repository root) imported as a module, by file:
    PyNvVideoCodec's wheel installs a top-level "benchmarks" folder of its own. It is registered
    under its name, so that its functions pickle for a process pool (stock_videos.py's)."""
    import importlib.util

    name = "gpu_check_" + os.path.splitext(os.path.basename(script))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_tool(script: str, argv: list[str], log: str, separate: bool) -> tuple[int, str, str]:
    """``python SCRIPT ARGV`` from the repository root, its output also written to ``log``:
    (exit status, stdout, stderr).

    ``separate``: in a process of its own, as on the GPU, where a crash in a decoder then ends
    that tool and not the check. Otherwise (the dry run) the script's ``main(argv)`` runs in
    this process: the same code on the same arguments, without starting torch and DALI again
    for each tool.
    """
    if separate:
        proc = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True)
        status, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        import contextlib
        import io
        import logging

        from evl.cli import exit_status

        out_buf, err_buf = io.StringIO(), io.StringIO()
        # A tool's logging.basicConfig writes to its own log only, and sets its own level only.
        handlers, level = logging.root.handlers[:], logging.root.level
        with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
            try:
                status = exit_status(_script_module(script).main(argv))
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except Exception:  # noqa: BLE001 -- as the interpreter would: the traceback, status 1
                traceback.print_exc()
                status = 1
            finally:
                logging.root.handlers[:] = handlers
                logging.root.setLevel(level)
        out, err = out_buf.getvalue(), err_buf.getvalue()
    with open(log, "w") as f:
        f.write(out + err)
    return status, out, err


def _throughput(check: Check, name: str, argv: list[str]) -> str:
    """Runs benchmarks/throughput.py with ``argv`` on the check's device; its results go to
    ``$OUT/bench_NAME.json`` (the path returned) and its output to ``bench_NAME.txt``. Raises
    when it fails."""
    path = os.path.join(check.out, f"bench_{name}.json")
    status, _, err = run_tool("benchmarks/throughput.py", [*argv, "--device", check.device, "--work_dir",
                                                           check.path("bench"), "--json", path],
                              os.path.join(check.out, f"bench_{name}.txt"), separate=check.gpu)
    if status:
        raise RuntimeError(f"benchmarks/throughput.py ({name}) failed: {err.strip().splitlines()[-1:]}")
    return path


def benchmarks(check: Check) -> dict:
    """benchmarks/throughput.py: our graph against DALI's readers, and RandAugment's cost in the
    graph; benchmarks/augment_agreement.py: the graph's RandAugment against the CPU execution."""
    videos = _bench_videos(check) + ["--num_workers", str(os.cpu_count() if check.gpu else 2)]
    # One run (one process, one set of videos): each decoder with and without the recipe's
    # RandAugment, so the operators compare side by side and the policy's cost is each one's ratio.
    path = _throughput(check, "operators_and_augment", [
        "--stages", "data", "--pipelines", "dali,dali_reader,dali_legacy_reader", "--compare_augment",
        "--auto_augment", "rand-m7-n4-mstd0.5-inc1", *videos])
    out = {"operators_and_augment": {"returncode": 0, "json": path}}
    # RandAugment in the graph (on the GPU: the mixed variant) against the CPU execution: part 3
    # alone (parts 1 and 2 compare CPU code with timm's, the same on any machine).
    status, stdout, err = run_tool(
        "benchmarks/augment_agreement.py",
        ["--parts", "3", "--clips", "64" if check.gpu else "4", *(["--dali_device_id", "0"] if check.gpu else [])],
        os.path.join(check.out, "augment_agreement.txt"), separate=check.gpu)
    out["augment_agreement"] = {"returncode": status, "summary": stdout.strip().splitlines()[-3:]}
    if status:
        raise RuntimeError(f"benchmarks/augment_agreement.py failed: {err.strip().splitlines()[-1:]}")
    return out


def decoder_threads(check: Check) -> dict:
    """The DALI data stage (fn.decoders.video, the recipe's RandAugment) with more threads than
    cores: its mixed decoder opens one NVDEC decoder per sample on the pipeline's thread pool, so
    samples in flight, not cores, may bound it. PyAV with one worker per core, side by side."""
    cores = os.cpu_count() or 1
    videos = _bench_videos(check)
    counts = [cores, 2 * cores, 4 * cores] if check.gpu else [2]  # the dry run: one run, the plumbing
    out = {}
    for n in counts:  # one JSON and log for all: the last run's (the numbers go to results.json)
        path = _throughput(check, "decoder_threads", [
            "--stages", "data", "--pipelines", "pyav,dali" if n == counts[0] else "dali",
            "--auto_augment", "rand-m7-n4-mstd0.5-inc1", "--num_workers", str(n), *videos])
        with open(path) as f:
            rows = json.load(f)["results"]
        for row in rows:
            out[f"{row['pipeline']}_{n}_threads"] = row["clips_per_s"]
    return out


def decoder_cost(check: Check) -> dict:
    """What one sample costs fn.decoders.video alone (no augmentation), in ms per sample of a
    batch: 8 frames at stride 16 near the start and near the end of a 300-frame short-GOP file,
    the first 8 frames of a 24-frame file, with one thread and with one per core. A cost that
    grows with the frames' position means decoding from the file's start; one that stays with
    the thread count means the samples are serialised."""
    from pipelines import dali as D

    encoder, ext, (h, w) = ("libx264", ".mp4", (256, 340)) if check.gpu else ("libvpx-vp9", ".webm", (64, 96))
    opts = {"g": "8", "keyint_min": "8"} if check.gpu else {"g": "8", "deadline": "realtime", "cpu-used": "8"}
    long = encode(check.path(f"cost_long{ext}"), encoder, "yuv420p", natural(300, h, w, seed=5), options=opts)
    short = encode(check.path(f"cost_short{ext}"), encoder, "yuv420p", natural(24, h, w, seed=6), options=opts)
    batch, cores = (32, os.cpu_count() or 1) if check.gpu else (4, 2)
    cases = {"long_start": (long, np.arange(8) * 16), "long_end": (long, 180 + np.arange(8) * 16),
             "short": (short, np.arange(8))}
    out = {"setting": f"{encoder} {w}x{h}, GOP 8, batch {batch}"}
    for threads in sorted({1, cores}):
        pipe = D._reader_graph("cpu" if check.device_id is None else "mixed", batch_size=batch, num_threads=threads,
                               device_id=check.device_id)
        pipe.build()
        for name, (path, frames) in cases.items():
            data = np.fromfile(path, dtype=np.uint8)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                pipe.feed_input("encoded", [data] * batch)
                pipe.feed_input("frames", [frames.astype(np.int32)] * batch)
                (got,) = pipe.run()
                if check.gpu:
                    got.as_cpu()
                times.append(time.perf_counter() - t)
            out[f"{name}_{threads}_threads_ms_per_sample"] = round(statistics.median(times) * 1000 / batch, 2)
        del pipe
    return out


def _nvc_frames(nvc, decoder, indices) -> torch.Tensor:
    """PyNvVideoCodec's frames ``indices`` of ``decoder``'s file: [F, H, W, 3] uint8 on the GPU."""
    frames = decoder.get_batch_frames_by_index(list(indices))
    try:
        return torch.stack([torch.from_dlpack(f) for f in frames])
    except (TypeError, AttributeError, RuntimeError):  # no DLPack: the CUDA array interface
        return torch.stack([torch.as_tensor(f, device="cuda") for f in frames])


def _training_clips(paths: list[str], count: int, seed: int = 0) -> list[tuple[str, list[int]]]:
    """``count`` (file, frames) pairs: 8 frames at stride 16 from a random start, as training reads."""
    from pipelines.probe import probe_video

    rng = np.random.default_rng(seed)
    lengths = {p: probe_video(p).num_frames for p in paths}
    out = []
    for k in range(count):
        path = paths[k % len(paths)]
        start = int(rng.integers(0, max(1, lengths[path] - 7 * 16)))
        out.append((path, [min(start + 16 * i, lengths[path] - 1) for i in range(8)]))
    return out


def _clips_per_s(read, clips, threads: int, sync=lambda: None) -> float:
    """Clips read per second by ``threads`` threads, each with its own reader (``read(jobs)``)."""
    from concurrent.futures import ThreadPoolExecutor

    parts = [clips[i::threads] for i in range(threads)]
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, parts))
    sync()
    return round(len(clips) / (time.perf_counter() - t), 1)


def _pyav_clip(job) -> int:
    from pipelines.pyav import read_frames

    return len(read_frames(*job))


def gpu_decoders(check: Check) -> dict:
    """NVIDIA's PyNvVideoCodec, whose ``SimpleDecoder`` keeps NVDEC decoders in a cache and
    reconfigures them from file to file, against DALI's graph decoder and PyAV, on the training
    clips' access pattern (8 frames at stride 16 from a random start), decoding to RGB only (no
    crop or augmentation): whether its frame numbers are PyAV's on numbered files, then clips/s
    on short-GOP demo videos and on stock long-GOP ones. PyNvVideoCodec runs where it is
    installed (``pack-gpu-deps.sh pynvvideocodec``), on a GPU; the dry run times the other two
    on a few VP9 clips."""
    from concurrent.futures import ProcessPoolExecutor

    from videos import frame_number, write_video

    from evl.demo import write_demo_dataset
    from pipelines import dali as D
    from pipelines.index import frame_index
    from pipelines.lists import read_list

    out: dict = {}
    nvc = None
    if check.gpu:
        try:
            import PyNvVideoCodec as nvc
        except ImportError as e:
            out["pynvvideocodec"] = f"not installed: {e}"
    sync = torch.cuda.synchronize if check.gpu else (lambda: None)
    if nvc is not None:
        rgb = nvc.OutputColorType.RGB
        out["pynvvideocodec"] = getattr(nvc, "__version__", "installed")
        out["numbering"] = {}
        size = (160, 144)
        numbered = {"h264_bframes.mp4": dict(num_frames=60, gop=12, bframes=3, size=size),
                    "h264_long_gop.mp4": dict(num_frames=120, gop=120, bframes=2, size=size),
                    "h264_negative_start.mp4": dict(num_frames=40, gop=8, bframes=2, start_pts=-2, size=size),
                    "hevc.mp4": dict(codec="libx265", num_frames=40, gop=8, size=size)}

        def nvc_read(path, wanted, device):
            return _nvc_frames(nvc, nvc.SimpleDecoder(path, gpu_id=0, output_color_type=rgb), wanted).cpu().numpy()

        for name, kw in numbered.items():
            path = write_video(check.path("nvc_" + name), kw.pop("num_frames"), **kw)
            out["numbering"][name] = _read_numbers(path, nvc_read, frame_number, check, reader="nvc")

    cores = os.cpu_count() or 1
    if check.gpu:
        stock_videos = _script_module("benchmarks/stock_videos.py")
        demo = write_demo_dataset(check.path("nvc_demo"), codec="h264", num_train=64, num_val=4, num_frames=300,
                                  size=256, workers=check.writers)
        stock = os.path.join(os.path.dirname(stock_videos.write_stock_dataset(check.path("nvc_stock"), num_videos=32,
                                                                              workers=cores)), "videos")
        sets = {"demo_gop8": [r.path for r in read_list(demo.train_list, data_root=demo.root)],
                "stock_long_gop": sorted(os.path.join(stock, f) for f in os.listdir(stock))}
        count, batch = 256, 32
    else:
        demo = write_demo_dataset(check.path("nvc_demo_vp9"), codec="vp9", num_train=8, num_val=4, num_frames=40)
        sets = {"demo_vp9": [r.path for r in read_list(demo.train_list, data_root=demo.root)]}
        count, batch = 16, 4
    for name, paths in sets.items():
        clips = _training_clips(paths, count)
        row = {}
        if nvc is not None:
            def nvc_read(jobs):
                decoder = None
                for path, indices in jobs:
                    if decoder is None:
                        decoder = nvc.SimpleDecoder(path, gpu_id=0, output_color_type=rgb)
                    else:
                        decoder.reconfigure_decoder(path)
                    _nvc_frames(nvc, decoder, indices)

            try:
                _clips_per_s(nvc_read, clips[:8], 1, sync)  # warm-up: the first decoder
                for threads in sorted({1, 4, cores}):
                    row[f"pynvvideocodec_{threads}_threads"] = _clips_per_s(nvc_read, clips, threads, sync)
            except Exception as e:  # noqa: BLE001 -- recorded; DALI and PyAV still run
                row["pynvvideocodec_error"] = str(e).splitlines()[0][:300]
        pipe = D._reader_graph("cpu" if check.device_id is None else "mixed", batch_size=batch, num_threads=cores,
                               device_id=check.device_id)
        pipe.build()
        t = time.perf_counter()
        for i in range(0, len(clips), batch):
            part = clips[i:i + batch]
            pipe.feed_input("encoded", [np.fromfile(p, dtype=np.uint8) for p, _ in part])
            pipe.feed_input("frames", [D.dali_frame_numbers(frame_index(p), np.array(ix), gpu=check.gpu).astype(np.int32)
                                       for p, ix in part])
            pipe.run()
        sync()
        row["dali_graph"] = round(len(clips) / (time.perf_counter() - t), 1)
        del pipe
        t = time.perf_counter()
        with ProcessPoolExecutor(cores) as pool:
            frames = list(pool.map(_pyav_clip, clips, chunksize=4))
        row[f"pyav_{cores}_processes"] = round(len(clips) / (time.perf_counter() - t), 1)
        row["frames_per_clip"] = sorted(set(frames))
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the parts a CPU can run, at small sizes")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_check"))
    p.add_argument("--data", help="where the test videos go (default: OUT/videos)")
    p.add_argument("--only", help="comma-separated sections, run in the order given, of: " + ", ".join(SECTIONS))
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here: run with --dry-run, or on a GPU machine")
    os.makedirs(args.out, exist_ok=True)
    check = Check(args.dry_run, args.out, args.data)
    chosen = args.only.split(",") if args.only else SECTIONS
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    results, status = {"dry_run": args.dry_run}, 0
    for name in chosen:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            results[name] = globals()[name](check)
        except Exception as e:  # noqa: BLE001 -- recorded; the other sections still run
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            status = 1
        results[name]["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps(results[name], default=str)[:2000], flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    print(f"== done (status {status}); results in {os.path.join(args.out, 'results.json')}", flush=True)
    return status


if __name__ == "__main__":
    from evl.cli import run_program

    run_program(main)
