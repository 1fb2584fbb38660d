"""Clips per second, side by side in one run, each beside its ceiling.

Stages (``--stages``):
  data   the pipeline alone: clips/s and decoded frames/s, against the decode ceiling (the frames
         each clip needs, pre-roll from its keyframe included, over the sequential decode rate of
         the same files with all cores, the faster of a measurement before and after the pass);
  model  one training step on synthetic input (frozen backbone forward, decoder forward and
         backward), against the backbone's bf16 FLOP ceiling on GPU;
  train  end to end: pipeline + training step;
  cache  training from the feature cache (built first when missing).
Memory: peak RSS (and peak GPU memory) per stage, and the training step's memory with the frozen
backbone against the same model with the backbone trainable.

Without ``--train_list`` it uses the built-in demo data and tiny backbone (CPU-sized). Example:
    python benchmarks/throughput.py --pipelines pyav,dali,cache --json results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense bf16 tensor-core peak, FLOP/s (vendor datasheets; SXM parts).
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_cpu_seconds() -> float | None:
    """User + system CPU time of this process's live children (DataLoader workers); Linux only."""
    try:
        tick, me, total = os.sysconf("SC_CLK_TCK"), os.getpid(), 0.0
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
                except OSError:
                    continue  # gone meanwhile
                if int(fields[1]) == me:  # ppid
                    total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return total
    except (OSError, ValueError):
        return None


def vit_macs_per_frame(spec) -> float:
    """Multiply-accumulates of the ViT tower for one frame (patch embed + blocks, no head)."""
    n, c = spec.num_tokens, spec.width
    patch = (n - 1) * c * 3 * spec.patch_size[0] * spec.patch_size[1]
    hidden = spec.mlp_ratio * c
    block = 4 * n * c * c + 2 * n * c * hidden + 2 * n * n * c
    return patch + spec.layers * block


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)


def timed(fn, warmup: int, iters: int, repeats: int, sync, min_seconds: float = 0.0) -> list[float]:
    """Seconds per iteration of ``fn`` for each repeat, after ``warmup`` calls.

    A repeat runs ``iters`` calls, and more until it has lasted ``min_seconds``: ten batches of
    a fast stage take a fraction of a second, too short to average out a shared machine.
    """
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while n < iters or time.perf_counter() - t0 < min_seconds:
            fn()
            n += 1
        sync()
        out.append((time.perf_counter() - t0) / n)
    return out


def setup(args):
    """The run configuration: the demo's (tiny backbone, demo videos) unless lists are given."""
    from evl.config import parse_config
    from evl.demo import DEMO_BACKBONE, demo_argv, write_demo_dataset

    if args.train_list:
        argv = ["--backbone", args.backbone, "--train_list_path", args.train_list, "--num_classes",
                str(args.num_classes), "--num_frames", str(args.num_frames), "--sampling_rate",
                str(args.sampling_rate), "--pipeline", "pyav", "--auto_augment", args.auto_augment or "none"]
        if args.data_root:
            argv += ["--data_root", args.data_root]
        if args.backbone_path:
            argv += ["--backbone_path", args.backbone_path]
    else:
        on_gpu = torch.device(args.device).type == "cuda"
        dali_cpu = not on_gpu and any(name.startswith("dali") for name in args.pipelines)
        codec = "vp9" if dali_cpu else "h264"  # DALI's CPU decoders read VP9, not H.264
        frames = args.video_frames
        # Long videos (Kinetics-like 10 s clips) are 256 px and fewer, so that writing them stays quick.
        long = frames > 16
        ds = write_demo_dataset(os.path.join(args.work_dir, f"demo{frames}", codec), codec=codec,
                                num_train=128 if long else 2048, num_val=32, num_frames=frames,
                                size=256 if long else 64, workers=min(8, os.cpu_count() or 1) if long else 1)
        bb = os.path.join(args.work_dir, "tiny-vit.json")
        with open(bb, "w", encoding="utf-8") as f:
            json.dump(DEMO_BACKBONE, f)
        argv = demo_argv(ds, bb, os.path.join(args.work_dir, f"run{frames}"))
        if frames > 16:  # the paper's sparse clips: 8 frames, stride 16, from a random start
            argv += ["--sampling_rate", str(min(16, (frames - 1) // 7))]
    argv += ["--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers), "--device", args.device]
    if args.auto_augment:  # after the demo's own "none"
        argv += ["--auto_augment", args.auto_augment]
    return parse_config(argv + shlex.split(getattr(args, "train_flags", None) or ""))


def make_model(cfg, device):
    from evl.model import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(cfg.model_config()).to(device)


def step_fn(model, opt, get_batch, device, precision):
    from evl.precision import autocast

    def step():
        batch = get_batch()
        with autocast(precision, device):
            logits = model(batch.clips, features=batch.features)
            loss = F.cross_entropy(logits.float(), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def full_decode_read(path: str, frame_indices, crop=None):
    """The reference implementation's decode strategy: decode every frame of the file, order
    them by pts, convert the sampled ones (and cut the crop box). Plugged into our pipeline (same
    workers, sampler and transforms), it isolates what frame-exact seeking buys over it."""
    import av
    import numpy as np

    with av.open(path) as c:
        frames = {f.pts: f for f in c.decode(video=0)}
    ordered = [frames[k] for k in sorted(frames)]
    out = np.stack([ordered[i].to_ndarray(format="rgb24") for i in frame_indices])
    if crop is not None:
        top, left, h, w = crop
        out = np.ascontiguousarray(out[:, top:top + h, left:left + w])
    return out


class ReferenceLoader:
    """The reference implementation's own training loader, run from a checkout of it.

    ``video_dataset.dataloader.create_train_loader`` of github.com/OpenGVLab/efficient-video-recognition
    (``--reference_repo PATH``; not shipped here), given the run's list, workers, batch and clip
    geometry as the reference's own flags, with its recipes' CLIP mean and std. Data stage only:
    it yields ``(clips, labels)`` without our sampler, so it is compared on throughput alone.
    """

    def __init__(self, repo: str, cfg, batch_size: int, num_workers: int, size: int, num_batches: int):
        if not os.path.isfile(os.path.join(repo, "video_dataset", "dataloader.py")):
            raise FileNotFoundError(f"--reference_repo {repo}: no video_dataset/dataloader.py there (a checkout of "
                                    "github.com/OpenGVLab/efficient-video-recognition is expected)")
        sys.path.insert(0, os.path.abspath(repo))
        from video_dataset.dataloader import create_train_loader

        flags = argparse.Namespace(
            train_list_path=cfg.train_list_path, train_data_root=cfg.data_root or "", data_root=cfg.data_root or "",
            batch_size=batch_size, num_steps=num_batches, num_workers=num_workers, auto_augment=cfg.auto_augment,
            interpolation="bicubic", mirror=cfg.mirror, num_frames=cfg.num_frames, sampling_rate=cfg.sampling_rate,
            tsn_sampling=cfg.sampling == "segment", spatial_size=size, dummy_dataset=False,
            mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])
        self.loader = create_train_loader(flags)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        from pipelines.base import Batch

        for clips, labels in self.loader:
            yield Batch(clips, labels, labels, labels)


class LegacyReaderPipeline:
    """``dali_legacy_reader``: DALI's older ``fn.readers.video`` (GPU only) fed a per-epoch file
    list of frame ranges, one per video, in the shared sampler's epoch order with its start
    frames: the same clips as ``--pipeline dali`` for dense sampling of videos long enough to
    hold a clip (a start within ``stride`` frames of the end moves back, as this reader wants
    ``T * stride`` frames of room). Whole frames resized to the input size, flip and crop left
    out: a throughput harness for the decoding operator, not a pipeline. (``dali_reader`` is
    the DALI pipeline itself with ``fn.experimental.readers.video``: ``dali_decoder="reader"``.)
    """

    def __init__(self, cfg, device, work_dir: str):
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        from evl.backbone import resolve_backbone
        from pipelines.base import CLIP_MEAN, CLIP_STD
        from pipelines.dali import _device_id
        from pipelines.dataset import clip_specs, load_dataset, make_sampler
        from pipelines.sampling import epoch_permutation

        self.device_id = _device_id(device)
        if self.device_id is None:
            raise ValueError("fn.readers.video decodes on the GPU only")
        pcfg = make_pipeline_config(cfg, device, True, resolve_backbone(cfg.backbone).image_size[0])
        records, infos = load_dataset(pcfg)
        sampler = make_sampler(pcfg)
        order = epoch_permutation(len(records), pcfg.seed, 0)
        span = cfg.num_frames * cfg.sampling_rate
        lines = []
        for i in order.tolist():
            if infos[i].num_frames < span:
                continue
            start = int(clip_specs(sampler, True, (0, i), records[i], infos[i])[0].frame_indices[0])
            start = min(start, infos[i].num_frames - span)
            lines.append(f"{records[i].path} {records[i].label} {start} {start + span}")
        os.makedirs(work_dir, exist_ok=True)
        self.list_path = os.path.join(work_dir, "dali_legacy_reader_list.txt")
        with open(self.list_path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        size, list_path = pcfg.input_size, self.list_path

        @dali.pipeline_def(batch_size=pcfg.batch_size, num_threads=max(1, pcfg.num_workers), device_id=self.device_id,
                           prefetch_queue_depth=2)
        def graph():
            video, label = fn.readers.video(device="gpu", file_list=list_path, sequence_length=cfg.num_frames,
                                            stride=cfg.sampling_rate, step=span, random_shuffle=False, name="reader",
                                            file_list_frame_num=True)
            video = fn.resize(video, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
            video = fn.crop_mirror_normalize(video, dtype=types.FLOAT, output_layout="CFHW",
                                             mean=[255 * m for m in CLIP_MEAN], std=[255 * s for s in CLIP_STD])
            return video, label

        self.pipe = graph()
        self.pipe.build()

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        from pipelines.base import Batch
        from pipelines.dali import to_torch

        while True:
            video, label = self.pipe.run()
            labels = to_torch(label, self.device_id).flatten().long()
            yield Batch(to_torch(video, self.device_id), labels, labels, labels)


def pipeline(cfg, name, device, args=None, train=True):
    """Pipeline ``name`` for the run ``cfg``; ``args``: the benchmark's flags (cache, reference)."""
    from evl.backbone import resolve_backbone
    from evl.distributed import World
    from evl.jobs import make_pipeline

    size = resolve_backbone(cfg.backbone).image_size[0]
    if name == "reference":
        if not (args and args.reference_repo):
            raise ValueError("the reference pipeline needs --reference_repo PATH (a checkout of the reference)")
        batches = args.warmup + args.iters * args.repeats + 1
        return ReferenceLoader(args.reference_repo, cfg, args.batch_size, args.num_workers, size, batches)
    if name == "dali_legacy_reader":
        return LegacyReaderPipeline(cfg, device, args.work_dir if args else tempfile.gettempdir())
    if name == "fulldecode":
        from pipelines.workers import DecodingPipeline

        return DecodingPipeline(make_pipeline_config(cfg, device, train, size), full_decode_read)
    extra = {}
    if name == "dali_reader":  # the DALI pipeline, training clips read by fn.experimental.readers.video
        name, extra["extra"] = "dali", {**cfg.extra, "dali_decoder": "reader"}
    if name == "cache":
        work_dir = args.work_dir if args else tempfile.gettempdir()
        extra["feature_cache"] = ensure_cache(cfg, work_dir, args.cache_views if args else 4)
    c = type(cfg)(**{**cfg.to_dict(), "pipeline": name, **extra})
    return make_pipeline(c, World(0, 1, 0, device), train, size, None)


def make_pipeline_config(cfg, device, train, size):
    """The PipelineConfig evl.train would build for ``cfg`` (for pipelines built here directly)."""
    from evl.distributed import World
    from evl.jobs import pipeline_config

    return pipeline_config(cfg, World(0, 1, 0, device), train, size, None)


def cycle(pipe):
    epoch = 0
    while True:
        pipe.set_epoch(epoch)
        yield from pipe
        epoch += 1


def ensure_cache(cfg, work_dir: str, views: int = 4) -> str:
    """Build the training feature cache for ``cfg`` once (``evl.cache``'s build)."""
    import dataclasses

    from evl.cache import CacheBuild, run_build

    job = CacheBuild.for_run(cfg, "train", "", num_views=views, device=cfg.device or "cpu")
    # One cache per list and geometry: a run on other videos (VP9 for DALI, long videos) or
    # another backbone must not find, and be refused by, a cache built for different settings.
    key = json.dumps([os.path.abspath(job.list_path), dataclasses.asdict(job.model),
                      dataclasses.asdict(dataclasses.replace(job.data, num_workers=0)), job.seed, views])
    out = os.path.join(work_dir, "feature_cache", hashlib.sha256(key.encode()).hexdigest()[:12])
    if not os.path.isfile(os.path.join(out, "train", "manifest.json")):
        run_build(dataclasses.replace(job, output=out), progress=False)
    return out


def decode_work(pipe, clips: int) -> dict:
    """What the decode ceiling of ``pipe``'s clips counts: the frames each clip needs from its
    keyframe (pre-roll included), and what the PyAV reader decodes for the same clips."""
    from pipelines.dataset import clip_specs
    from pipelines.index import frame_index
    from pipelines.pyav import read_frames, read_stats

    ds = pipe.dataset
    need = []
    for i in range(min(clips, len(ds))):
        specs = clip_specs(ds.sampler, True, (0, i), ds.records[i], ds.infos[i])
        idx = frame_index(ds.records[i].path)
        # Each sampled frame needs the frames from its keyframe up to itself (decode order);
        # overlapping runs are counted once.
        decoded = set()
        for f in sorted({f for s in specs for f in s.frame_indices}):
            keys = idx.start_keyframes(f, int(idx.decode_pos[f]))
            first = int(idx.decode_pos[keys[0]]) if len(keys) else 0
            decoded.update(range(first, int(idx.decode_pos[f]) + 1))
        need.append(len(decoded))
    # What the PyAV reader actually decodes for the same clips (it skips the B-frames no other
    # frame references and nobody wants), on a sample.
    sample, before = min(32, len(ds)), read_stats()
    for i in range(sample):
        for s in clip_specs(ds.sampler, True, (0, i), ds.records[i], ds.infos[i]):
            read_frames(ds.records[i].path, s.frame_indices)
    cost = read_stats() - before
    return {"frames_per_clip": statistics.mean(need), "pyav_decoded_frames_per_clip": cost.frames / sample,
            "pyav_packets_per_clip": cost.packets / sample}


def decode_rate(records, workers: int, trial_seconds: float = 0.5) -> float:
    """Frames per second decoding the first videos of ``records`` whole on ``workers`` threads:
    the faster of one decoding thread per file (files in parallel) and FFmpeg's own threads,
    best of 3 trials of at least ``trial_seconds`` each (a short run of small files is noisy)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.index import frame_index, open_video

    paths = [r.path for r in records[:max(64, workers * 8)]]
    formats = {p: frame_index(p).container_format for p in paths}

    def decode_all(path, threads):
        # Opened as the pipeline opens it (the demuxer named, an mp4 without the stream probe),
        # so that the ceiling stays an upper bound for the pipeline's own decoding.
        with open_video(path, formats[path], probe=False) as c:
            s = c.streams.video[0]
            s.thread_type = threads
            return sum(1 for _ in c.decode(s))

    rate = 0.0
    with ThreadPoolExecutor(workers) as ex:
        for threads in ("NONE", "AUTO"):
            decode_all(paths[0], threads)
            for _ in range(3):
                frames, t0 = 0, time.perf_counter()
                while not frames or time.perf_counter() - t0 < trial_seconds:  # one pass at least
                    frames += sum(ex.map(lambda p: decode_all(p, threads), paths))
                rate = max(rate, frames / (time.perf_counter() - t0))
    return rate


def merge_passes(results: list[dict]) -> list[dict]:
    """One record per (stage, pipeline, augment): where a job ran in several passes, its median
    pass by clips/s (with that pass's CPU figures), and every pass's rate in ``clips_per_s_passes``."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["stage"], r["pipeline"], r["augment"]), []).append(r)
    merged = []
    for runs in groups.values():
        ok = sorted((r for r in runs if "clips_per_s" in r), key=lambda r: r["clips_per_s"])
        if len(runs) == 1 or not ok:
            merged.append(runs[0])
            continue
        rec = dict(ok[(len(ok) - 1) // 2])  # the median pass (the lower one of an even count)
        rec["clips_per_s_passes"] = [r["clips_per_s"] for r in runs if "clips_per_s" in r]
        rec["first_batch_s"] = runs[0].get("first_batch_s", rec.get("first_batch_s"))
        shares = [r["ceiling_fraction"] for r in runs if "ceiling_fraction" in r]
        if shares:  # each pass beside its own ceiling: the median share
            rec["ceiling_fraction_passes"] = shares
            rec["ceiling_fraction"] = statistics.median(shares)
        merged.append(rec)
    return merged


def step_memory(cfg, device: torch.device, batch_size: int, trainable: bool) -> dict:
    """Memory of one training step: activations autograd keeps for backward, gradients and
    optimizer state (exact byte counts, CPU or GPU), and the GPU's peak when on one.

    ``trainable=True`` runs the same model with the tower fine-tuned (no ``no_grad``, its
    parameters in the optimizer): the difference is what the frozen backbone saves.
    """
    model = make_model(cfg, device)
    s = model.spec
    x = torch.randn(batch_size, 3, cfg.num_frames, *s.image_size, device=device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    params = list(model.parameters())
    if trainable:
        model.backbone.visual.float().requires_grad_(True)
        model.backbone.compute_dtype = torch.float32  # fine-tuning keeps fp32 master weights
        params += list(model.backbone.visual.parameters())
        body = model.backbone.forward.__wrapped__  # FrozenBackbone.forward without its no_grad
        run = lambda: model.forward_head(body(model.backbone, x))  # noqa: E731
    else:
        run = lambda: model(x)  # noqa: E731
    opt = torch.optim.AdamW(params, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(run().float(), y)
    loss.backward()
    opt.step()
    mb = 2 ** 20
    res = {"activations_mb": sum(saved.values()) / mb,
           "grads_mb": sum(p.grad.nbytes for p in params if p.grad is not None) / mb,
           "optimizer_mb": sum(v.nbytes for st in opt.state.values() for v in st.values()
                               if isinstance(v, torch.Tensor)) / mb}
    res["total_mb"] = sum(res.values())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        res["gpu_peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / mb
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="data,model,train,cache")
    p.add_argument("--pipelines", default="pyav,dali,cache",
                   help="comma-separated: dummy, pyav, dali, cache, fulldecode (the reference loader's strategy: "
                        "decode whole files, in our workers), reference (the reference's own loader, data stage; "
                        "needs --reference_repo), dali_reader (the dali pipeline with its training "
                        "clips read by fn.experimental.readers.video), dali_legacy_reader (fn.readers.video on the "
                        "sampler's frame ranges, GPU only, data stage): the operator comparison)")
    p.add_argument("--reference_repo", help="a checkout of github.com/OpenGVLab/efficient-video-recognition")
    p.add_argument("--video_frames", type=int, default=8,
                   help="frames per demo video; e.g. 300 for Kinetics-like 10 s clips (sparse 8x16 sampling)")
    p.add_argument("--train_list")
    p.add_argument("--data_root")
    p.add_argument("--backbone", default="ViT-B-16")
    p.add_argument("--backbone_path")
    p.add_argument("--num_classes", type=int, default=400)
    p.add_argument("--num_frames", type=int, default=8)
    p.add_argument("--sampling_rate", type=int, default=16)
    p.add_argument("--auto_augment", help="the RandAugment policy of every stage, e.g. rand-m7-n4-mstd0.5-inc1 "
                   "(default: none)")
    p.add_argument("--compare_augment", action="store_true",
                   help="data stage: each pipeline with --auto_augment and without it, side by side")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3, help="batches before timing")
    p.add_argument("--iters", type=int, default=10, help="batches per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements; the median is reported")
    p.add_argument("--passes", type=int, default=1, metavar="K",
                   help="run the data stage's jobs K times, in alternating order (A B, B A, A B, ...), and report "
                   "each job's median pass: a machine whose speed drifts then biases no job (default: %(default)s)")
    p.add_argument("--min_seconds", type=float, default=2.0, help="each measurement lasts at least this long")
    p.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "bench"))
    p.add_argument("--cache_views", type=int, default=4, help="views per clip in the benchmark's feature cache")
    p.add_argument("--train_flags", help="more evl.train flags for the model and data, e.g. a decoder variant: "
                   "'--no_temporal_cross_attention --decoder_num_layers 2'")
    p.add_argument("--json", help="write the results here")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.pipelines = [x for x in args.pipelines.split(",") if x]
    stages = [x for x in args.stages.split(",") if x]

    import logging

    logging.basicConfig(level=logging.ERROR)
    from tqdm import tqdm

    from evl.distributed import threads_beside_decoders
    from pipelines import BACKENDS, cpu_workers

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = setup(args)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    results = []
    jobs = []
    policy = cfg.auto_augment
    if "data" in stages:
        for name in args.pipelines:
            if name != "cache":
                jobs += [("data", name, policy)] + ([("data", name, None)] if args.compare_augment and policy else [])
    if args.passes > 1:  # alternating order: a drift of the machine's speed favours no job
        jobs = [j for k in range(args.passes) for j in (jobs if k % 2 == 0 else jobs[::-1])]
    if "model" in stages:
        jobs.append(("model", "synthetic", None))
    if "train" in stages:
        data_only = ("cache", "reference", "dali_legacy_reader")
        jobs += [("train", name, policy) for name in args.pipelines if name not in data_only]
    if "cache" in stages and "cache" in args.pipelines:
        jobs.append(("cache", "cache", policy))
    base_cfg, work = cfg, None
    for stage, name, augment in tqdm(jobs, desc="benchmark", disable=None):
        cfg = type(base_cfg)(**{**base_cfg.to_dict(), "auto_augment": augment})
        rec = {"stage": stage, "pipeline": name, "augment": augment}
        it = None
        # Compute threads as evl.train sets them: a core left to each CPU worker of the pipeline
        # (the harness's own readers decode in workers as PyAV does).
        backend = name if name in BACKENDS else "pyav"
        decoders = cpu_workers(backend, args.num_workers) if stage in ("data", "train", "cache") else 0
        with threads_beside_decoders(decoders):
            rec["threads"] = torch.get_num_threads()
            try:
                if stage == "data":
                    pipe = pipeline(cfg, name, device, args)
                    cores, trial = os.cpu_count() or 1, min(0.5, args.min_seconds / 4)
                    if name == "pyav":  # the decode ceiling before the pass (its workers not started yet)
                        rate_before = decode_rate(pipe.dataset.records, cores, trial)
                    it = cycle(pipe)
                    # The first batch pays the start-up (DALI: building the graph; PyAV: the
                    # workers' start), once per run: reported apart from the steady rate.
                    t0 = time.perf_counter()
                    next(it)
                    sync()
                    rec["first_batch_s"] = time.perf_counter() - t0
                    for _ in range(args.warmup - 1):
                        next(it)
                    # Where the CPU goes: this process (the hand-over, DALI's threads) and its
                    # worker processes (decoding), per clip, over the timed batches.
                    calls, main0, kids0 = [0], time.process_time(), children_cpu_seconds()

                    def fetch():
                        calls[0] += 1
                        return next(it)

                    per = timed(fetch, 0, args.iters, args.repeats, sync, args.min_seconds)
                    kids1, clips = children_cpu_seconds(), calls[0] * args.batch_size
                    rec["main_cpu_ms_per_clip"] = 1e3 * (time.process_time() - main0) / clips
                    if kids0 is not None and kids1 is not None and kids1 > kids0:
                        rec["workers_cpu_ms_per_clip"] = 1e3 * (kids1 - kids0) / clips
                    rec["clips_per_s"] = args.batch_size / statistics.median(per)
                    rec["frames_per_s"] = rec["clips_per_s"] * cfg.num_frames
                    if hasattr(pipe, "graphs_built"):  # rebuilds within the timed batches would bias the rate
                        rec["graphs_built"] = pipe.graphs_built
                    if name == "pyav":
                        # The decode ceiling is measured right before and right after each job
                        # (its workers stopped), and the faster counts: the machine's speed drifts
                        # within seconds here, and a ceiling taken in a slow moment alone once put
                        # a pass above it. Its trials last half a second, or a quarter of
                        # --min_seconds when shorter.
                        pipe.close()
                        work = work or decode_work(pipe, 256)  # the same clips for every job
                        rates = (rate_before, decode_rate(pipe.dataset.records, cores, trial))
                        rec.update(work, decode_fps=max(rates), decode_fps_before_after=rates,
                                   ceiling_clips_per_s=max(rates) / work["frames_per_clip"])
                        rec["ceiling_fraction"] = rec["clips_per_s"] / rec["ceiling_clips_per_s"]
                    del pipe
                else:
                    model = make_model(cfg, device)
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as evl.train
                    precision = "bf16" if device.type == "cuda" else "fp32"
                    if stage == "model":
                        from pipelines.base import Batch

                        s = model.spec
                        x = torch.randn(args.batch_size, 3, cfg.num_frames, *s.image_size, device=device)
                        y = torch.zeros(args.batch_size, dtype=torch.long, device=device)
                        batch = Batch(x, y, y, y)
                        get = lambda: batch  # noqa: E731
                    else:
                        it = cycle(pipeline(cfg, name, device, args))
                        get = lambda: next(it)  # noqa: E731
                    step = step_fn(model, opt, get, device, precision)
                    per = timed(step, args.warmup, args.iters, args.repeats, sync, args.min_seconds)
                    rec["clips_per_s"] = args.batch_size / statistics.median(per)
                    if stage == "model":
                        macs = vit_macs_per_frame(model.spec) * cfg.num_frames
                        rec["backbone_gmacs_per_clip"] = macs / 1e9
                        peak = gpu_peak_flops(device)
                        if peak:
                            rec["flop_ceiling_clips_per_s"] = peak / (2 * macs)
                            rec["ceiling_fraction"] = rec["clips_per_s"] / rec["flop_ceiling_clips_per_s"]
                rec["peak_rss_mb"] = peak_rss_mb()
                if device.type == "cuda":
                    rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            except Exception as e:  # noqa: BLE001 -- one unavailable pipeline must not hide the others
                rec["error"] = f"{type(e).__name__}: {e}"
            finally:
                if it is not None:  # stop the pipeline's workers: they must not run during the next stage
                    it.close()
        results.append(rec)
    results = merge_passes(results)
    if "model" in stages:
        results.append({"stage": "memory", "frozen_backbone": step_memory(cfg, device, args.batch_size, False),
                        "trainable_backbone": step_memory(cfg, device, args.batch_size, True)})

    def rate(stage, name, augment):
        return next((r["clips_per_s"] for r in results if r.get("stage") == stage and r.get("pipeline") == name
                     and r.get("augment") == augment and "clips_per_s" in r), None)

    cfg = base_cfg
    print(f"\nconfig: backbone {cfg.backbone}, {cfg.num_frames} frames x stride {cfg.sampling_rate}, "
          f"batch {args.batch_size}, {args.num_workers} workers, device {device}, RandAugment {cfg.auto_augment}")
    print(f"{'stage':<7} {'pipeline':<10} {'augment':>7} {'threads':>7} {'clips/s':>10} {'frames/s':>10}  "
          "ceiling / notes")
    for r in results:
        if r["stage"] == "memory":
            for label, m in (("frozen", r["frozen_backbone"]), ("trainable", r["trainable_backbone"])):
                gpu = f", GPU peak {m['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in m else ""
                print(f"memory  {label + ' backbone':<20} step {m['total_mb']:.0f} MB (activations "
                      f"{m['activations_mb']:.0f}, grads {m['grads_mb']:.0f}, optimizer {m['optimizer_mb']:.0f}){gpu}")
            continue
        aug = "yes" if r.get("augment") else "no"
        if "error" in r:
            print(f"{r['stage']:<7} {r['pipeline']:<10} {aug:>7} {'-':>7} {'-':>10} {'-':>10}  "
                  f"unavailable: {r['error'][:90]}")
            continue
        same = r.get("augment")  # ratios compare runs with the same augmentation
        live, full = rate("train", "pyav", same), rate("data", "fulldecode", same)
        pyav_data, ref, dali_data = rate("data", "pyav", same), rate("data", "reference", same), rate("data", "dali", same)
        notes = []
        if "ceiling_clips_per_s" in r:
            note = (f"decode ceiling {r['ceiling_clips_per_s']:.0f} clips/s ({r['frames_per_clip']:.1f} frames/clip "
                    f"at {r['decode_fps']:.0f} fps"
                    + (", the faster of {:.0f} before and {:.0f} after the pass".format(*r["decode_fps_before_after"])
                       if "decode_fps_before_after" in r else "")
                    + f"): {100 * r['ceiling_fraction']:.0f}%"
                    + (" (median of its passes: " + ", ".join(f"{100 * x:.0f}%" for x in r["ceiling_fraction_passes"])
                       + ")" if "ceiling_fraction_passes" in r else "") + "; PyAV decodes "
                    f"{r['pyav_decoded_frames_per_clip']:.1f} frames/clip")
            if "workers_cpu_ms_per_clip" in r:  # the ceiling spends cores / ceiling rate per clip
                note += (f"; CPU per clip: workers {r['workers_cpu_ms_per_clip']:.2f} ms + main "
                         f"{r['main_cpu_ms_per_clip']:.2f} ms, the ceiling's decoding "
                         f"{1e3 * (os.cpu_count() or 1) / r['ceiling_clips_per_s']:.2f} ms")
            notes.append(note)
        elif "flop_ceiling_clips_per_s" in r:
            notes.append(f"bf16 FLOP ceiling {r['flop_ceiling_clips_per_s']:.0f} clips/s: "
                         f"{100 * r['ceiling_fraction']:.0f}%")
        elif r["stage"] == "model":
            notes.append(f"backbone {r['backbone_gmacs_per_clip']:.2f} GMACs/clip")
        if "clips_per_s_passes" in r:
            notes.append(f"median of {len(r['clips_per_s_passes'])} passes ("
                         + ", ".join(f"{v:.1f}" for v in r["clips_per_s_passes"]) + ")")
        if "first_batch_s" in r:
            notes.append(f"first batch {r['first_batch_s']:.2f} s" + (
                f" ({r['graphs_built']} graph build{'s' if r['graphs_built'] > 1 else ''})" if "graphs_built" in r
                else ""))
        if r["stage"] == "data" and same:
            without = rate("data", r["pipeline"], None)
            if without:
                notes.append(f"{r['clips_per_s'] / without:.2f}x without RandAugment")
        if r["stage"] in ("train", "cache") and live and r["pipeline"] != "pyav":
            notes.append(f"{r['clips_per_s'] / live:.1f}x live PyAV")
        if r["stage"] == "data" and r["pipeline"] == "pyav" and full:
            notes.append(f"{r['clips_per_s'] / full:.1f}x full-file decoding (the reference's strategy)")
        if r["stage"] == "data" and r["pipeline"] == "pyav" and ref:
            notes.append(f"{r['clips_per_s'] / ref:.1f}x the reference's own loader")
        if r["stage"] == "data" and r["pipeline"].startswith("dali") and pyav_data:
            notes.append(f"{r['clips_per_s'] / pyav_data:.1f}x PyAV")
        if r["stage"] == "data" and r["pipeline"] in ("dali_reader", "dali_legacy_reader") and dali_data:
            notes.append(f"{r['clips_per_s'] / dali_data:.2f}x our fn.decoders.video graph (dali)")
        frames = f"{r['frames_per_s']:.0f}" if "frames_per_s" in r else "-"
        print(f"{r['stage']:<7} {r['pipeline']:<10} {aug:>7} {r['threads']:>7} {r['clips_per_s']:>10.1f} {frames:>10}  "
              + "; ".join(notes))
    report = {
        "results": results, "config": cfg.to_dict(), "argv": sys.argv[1:], "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
        platform.machine(), "cpu_count": os.cpu_count(), "versions": versions(),
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


def versions() -> dict:
    """The libraries' versions, from their installed metadata: a job that did not use open_clip or
    DALI does not import them (4 s for open_clip) to say which it has."""
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod, dists in (("av", ["av"]), ("open_clip", ["open_clip_torch"]), ("numpy", ["numpy"]),
                       ("nvidia.dali", ["nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"])):
        out[mod] = None
        for dist in dists:
            try:
                out[mod] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


if __name__ == "__main__":
    from evl.cli import run_program

    run_program(main)
