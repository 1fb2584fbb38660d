"""``python -m evl.train``: the EVL training loop (evl-spec §3), on CPU, one GPU or torchrun.

With no arguments it runs the built-in demo: it writes a small motion-only video dataset,
trains a tiny-backbone EVL on the CPU for a few minutes and prints its val top-1. Otherwise:
AdamW on the trainable part only, cosine schedule per step with optional linear warmup,
gradient accumulation (``--batch_split``), bf16 autocast on GPU (fp16 with a grad scaler on
request), periodic multi-view evaluation, atomic checkpoints with exact resume, and
``metrics.jsonl`` plus a curves PNG in ``--output_dir``. ``metrics.jsonl`` keeps every run made
in the directory; the curves show the current one (see :func:`curves`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt_io
from .config import TrainConfig, parse_config
from .distributed import (StopAgreement, World, all_gather_object, all_reduce_max, all_reduce_sum, barrier,
                          cleanup, init_distributed, threads_beside_decoders)
from .eval import evaluate, write_predictions
from .model import build_model
from .precision import autocast, grad_scaler, resolve_precision

log = logging.getLogger("evl.train")


def print0(world: World, *args) -> None:
    if world.is_primary:
        print(*args, flush=True)


def lr_lambda(cfg: TrainConfig):
    """Linear warmup, then cosine decay to 0 at ``num_steps``, per step."""
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.num_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return fn


def check_inputs(cfg: TrainConfig) -> None:
    """Fail on inconsistent flags before any heavy work."""
    problems = []
    if not cfg.eval_only and not cfg.train_list_path and cfg.pipeline not in ("dummy", "cache"):
        problems.append("--train_list_path is required for training")
    if cfg.eval_only and not (cfg.val_list_path or cfg.pipeline in ("dummy", "cache")):
        problems.append("--eval_only needs --val_list_path")
    for flag in ("train_list_path", "val_list_path", "backbone_path", "resume_path"):
        path = getattr(cfg, flag)
        if path and not os.path.isfile(path):
            problems.append(f"--{flag} {path}: file not found")
    if cfg.batch_size % cfg.batch_split:
        problems.append(f"--batch_size {cfg.batch_size} is not divisible by --batch_split {cfg.batch_split}")
    if cfg.pipeline == "cache" and not cfg.feature_cache:
        problems.append("--pipeline cache needs --feature_cache DIR")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def pipeline_config(cfg: TrainConfig, world: World, train: bool, input_size: int, model_config: dict | None = None):
    """The pipelines' view of the run configuration, for one split."""
    from pipelines import PipelineConfig

    return PipelineConfig(
        list_path=cfg.train_list_path if train else cfg.val_list_path, num_classes=cfg.num_classes,
        num_frames=cfg.num_frames, sampling_rate=cfg.sampling_rate, sampling=cfg.sampling, input_size=input_size,
        batch_size=cfg.batch_size, train=train, data_root=cfg.data_root, num_workers=cfg.num_workers,
        num_spatial_views=cfg.num_spatial_views, num_temporal_views=cfg.num_temporal_views,
        auto_augment=cfg.auto_augment if train else None, hflip=0.5 if cfg.mirror and train else 0.0,
        crop_scale=tuple(cfg.crop_scale), seed=cfg.seed, device=str(world.device), rank=world.rank,
        world_size=world.world_size, max_bad_fraction=cfg.max_bad_fraction,
        extra={"feature_cache": cfg.feature_cache, "cache_in_memory": cfg.cache_in_memory,
               "model_config": model_config, **cfg.extra})


def make_pipeline(cfg: TrainConfig, world: World, train: bool, input_size: int, model_config: dict | None = None):
    from pipelines import build_pipeline

    return build_pipeline(cfg.pipeline, pipeline_config(cfg, world, train, input_size, model_config))


def checkpoint_files(output_dir: str) -> list[tuple[int, str]]:
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        m = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def prune_checkpoints(output_dir: str, keep_last: int) -> None:
    for _, path in checkpoint_files(output_dir)[:-keep_last] if keep_last > 0 else []:
        os.remove(path)


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per event) and ``curves.png``, on rank 0."""

    def __init__(self, output_dir: str | None, enabled: bool):
        self.path = os.path.join(output_dir, "metrics.jsonl") if output_dir and enabled else None
        self._tail_checked = False

    def write(self, **event) -> None:
        if self.path:
            try:
                line = json.dumps(event) + "\n"
                if not self._tail_checked:  # a line an earlier crash cut short must not swallow this one
                    self._tail_checked = True
                    if os.path.exists(self.path) and os.path.getsize(self.path):
                        with open(self.path, "rb") as f:
                            f.seek(-1, os.SEEK_END)
                            line = ("" if f.read(1) == b"\n" else "\n") + line
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line)
            except OSError as e:  # a full disk: say which file; checkpoints are written atomically apart
                raise OSError(e.errno, f"could not append to {self.path} ({e.strerror}); checkpoints written "
                                       "so far are untouched") from e

    def events(self) -> list[dict]:
        """Every event logged; a line a crash or a full disk cut short is skipped, with a warning."""
        out, bad = [], []
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        bad.append(n)
        if bad:
            log.warning("%s: skipped %d unreadable line(s) (%s), cut short by an earlier crash or a full disk",
                        self.path, len(bad), ", ".join(map(str, bad[:5])))
        return out

    def plot(self) -> None:
        if not self.path or not os.path.exists(self.path):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train, evals = curves(self.events())
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot([e["step"] for e in train], [e["loss"] for e in train])
        a.set(xlabel="step", ylabel="training loss", yscale="log")
        b.plot([e["step"] for e in evals], [e["top1"] for e in evals], "o-", label="top-1")
        b.plot([e["step"] for e in evals], [e["top5"] for e in evals], "s--", label="top-5")
        b.set(xlabel="step", ylabel="val accuracy (%)")
        b.legend()
        fig.tight_layout()
        png = os.path.join(os.path.dirname(self.path), "curves.png")
        try:
            fig.savefig(png, dpi=100)
        except OSError as e:  # a picture is not worth stopping a run for
            log.warning("could not write %s (%s)", png, e.strerror or e)
        finally:
            plt.close(fig)


def curves(events: list[dict]) -> tuple[list[dict], list[dict]]:
    """The current run's (training, evaluation) events from a ``metrics.jsonl`` history.

    The file only grows: each run of the trainer starts with ``{"event": "start", "step": S}``,
    S the steps its checkpoint had done. A resumed run keeps what earlier runs logged up to step
    S and replaces the steps it repeats after it; a fresh run (S = 0) replaces everything.
    """
    kept: list[dict] = []
    for e in events:
        if e.get("event") == "start":
            kept = [k for k in kept if k.get("step", 0) <= e["step"]] if e["step"] > 0 else []
        else:
            kept.append(e)
    return [e for e in kept if "loss" in e], [e for e in kept if "top1" in e]


class StopRequest:
    """SIGINT / SIGTERM: finish the current step, save a checkpoint, exit cleanly."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def restore_rng(state: dict, world: World, seed: int) -> None:
    """Each rank continues the random stream (dropout) it had at the checkpoint.

    Checkpoints hold every rank's state. One written by another number of processes, or before
    they held every rank's (only rank 0's), cannot continue the other ranks' streams: each
    rank then draws a fresh stream of its own, keyed by the step, rather than all ranks
    drawing rank 0's and so the same dropout masks.
    """
    per_rank = state.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == world.world_size:
        ckpt_io.set_rng_state(per_rank[world.rank])
    elif world.world_size == 1 and "rng" in state:
        ckpt_io.set_rng_state(state["rng"])
    elif "rng" in state:
        saved = len(per_rank) if per_rank is not None else "an unknown number of"
        print0(world, f"checkpoint written by {saved} process(es), resumed by {world.world_size}: "
                      "the ranks' dropout streams restart (the run is not bit-exact with an uninterrupted one)")
        torch.manual_seed(int(np.random.default_rng([seed, world.rank, int(state["next_step"])]).integers(2**62)))


def batches_forever(pipeline, start_step: int):
    """Yield (step, batch) from ``start_step`` on, resuming mid-epoch at the right batch."""
    per_epoch = len(pipeline)
    if per_epoch == 0:
        raise ValueError("the training pipeline yields no batch per epoch (list shorter than a batch?)")
    epoch, skip = divmod(start_step, per_epoch)
    step = start_step
    while True:
        pipeline.set_epoch(epoch, skip_batches=skip)
        for batch in pipeline:
            yield step, batch
            step += 1
        epoch, skip = epoch + 1, 0


def decode_workers(cfg: TrainConfig) -> int:
    """How many workers of this process feed it batches from its cores: the decoders (PyAV
    processes, DALI threads), or the feature cache's read-ahead thread. On 2 cores the cache
    trained about 10% faster with one compute thread beside that thread than with two (median
    of five benchmark runs each: 1,884 against 1,710 clips/s)."""
    if cfg.pipeline == "cache":
        return 1
    return cfg.num_workers if cfg.pipeline in ("pyav", "dali") else 0


def train(cfg: TrainConfig) -> dict:
    """Train (or evaluate, with ``eval_only``) as configured; returns the final metrics."""
    check_inputs(cfg)
    with threads_beside_decoders(decode_workers(cfg)):
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict:
    world = init_distributed(cfg.device)
    device = world.device
    precision = resolve_precision(cfg.mixed_precision, device)
    torch.manual_seed(cfg.seed)  # the same model on every rank, a random backbone included
    out_dir = cfg.output_dir
    if out_dir and world.is_primary:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "config.json")
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(cfg.to_dict(), f, indent=2)
        except OSError as e:  # a full disk, say: name the file
            raise OSError(e.errno, f"could not write {path} ({e.strerror})") from e
    print0(world, "config: " + json.dumps(cfg.to_dict()))

    model = build_model(cfg.backbone, cfg.num_classes, cfg.num_frames, **cfg.model_kwargs())
    torch.manual_seed(cfg.seed + world.rank)  # ranks draw different dropout masks
    input_size = model.spec.image_size[0]
    resume = cfg.resume_path
    if not resume and cfg.auto_resume and out_dir and checkpoint_files(out_dir):
        resume = checkpoint_files(out_dir)[-1][1]
    state = None
    if resume:
        state = ckpt_io.load_checkpoint(model, resume)
        if "model_config" in state:
            ckpt_io.check_backbone_identity(state, model, resume)
        print0(world, f"loaded {resume}")
    # Pipelines validate their lists (labels, missing files) before the model moves or trains.
    has_val = cfg.val_list_path or cfg.pipeline == "dummy" or (
        cfg.pipeline == "cache" and os.path.isdir(os.path.join(cfg.feature_cache, "val")))
    val_pipe = make_pipeline(cfg, world, False, input_size, model.config) if has_val else None
    train_pipe = None if cfg.eval_only else make_pipeline(cfg, world, True, input_size, model.config)
    model.to(device)
    ddp = model
    if world.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = lambda: autocast(precision, device)  # noqa: E731
    metrics = MetricsLog(out_dir, world.is_primary)

    def run_eval(step: int) -> dict | None:
        if val_pipe is None:
            return None
        res = evaluate(ddp, val_pipe, amp, device, cfg.num_classes, progress=world.is_primary)
        print0(world, f"step {step}: val top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}%  ({res.num_videos} videos)")
        metrics.write(step=step, top1=res.top1, top5=res.top5, num_videos=res.num_videos)
        return {"result": res, "top1": res.top1, "top5": res.top5}

    if cfg.eval_only:
        r = run_eval(int(state.get("next_step", 0)) if state else 0)
        if r and world.is_primary:
            pred = cfg.predictions_path or (os.path.join(out_dir, "predictions.jsonl") if out_dir else None)
            if pred:
                write_predictions(pred, r["result"], [rec.path for rec in val_pipe.records]
                                  if hasattr(val_pipe, "records") else [str(i) for i in range(val_pipe.num_samples)])
                print0(world, f"predictions written to {pred}")
        cleanup()
        return {"top1": r["top1"], "top5": r["top5"]} if r else {}

    # fused: one kernel for all parameters (CPU and GPU); fewer passes over the optimizer state.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    scaler = grad_scaler(precision, device)
    start, best = 0, {"top1": -1.0, "step": None}
    if state and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_sched"])
        scaler.load_state_dict(state["loss_scaler"])
        start = int(state["next_step"])
        best = state.get("metrics", {}).get("best", best)
        restore_rng(state, world, cfg.seed)

    def save(next_step: int) -> str | None:
        # Every rank's dropout stream, so that each continues its own after a resume: a
        # collective, so every rank calls save (at the same steps) and rank 0 writes.
        rngs = all_gather_object(ckpt_io.rng_state()) if world.world_size > 1 else None
        if not (out_dir and world.is_primary):
            return None
        path = os.path.join(out_dir, f"checkpoint-{next_step}.pth")
        ckpt_io.save_atomic(ckpt_io.training_state(model, optimizer, scheduler, scaler, next_step, cfg.to_dict(),
                                                   {"best": best}, rngs), path)
        prune_checkpoints(out_dir, cfg.keep_last)
        return path

    progress = None
    if world.is_primary:
        from tqdm import tqdm

        progress = tqdm(total=cfg.num_steps, initial=start, desc="train", dynamic_ncols=True,
                        disable=None)  # None: no bar when stderr is not a terminal
    last = {}
    metrics.write(event="start", step=start)  # what the curves of earlier runs this run supersedes
    model.train()
    t_log, clips_since = time.perf_counter(), 0
    step = start
    # The first step (0-based) whose loss was not finite, kept on the device: testing the loss on
    # the host every step would wait for the GPU each step and stall the launch queue. It is
    # read where the run logs, evaluates or saves, so nothing after a bad step is ever written.
    bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def check_finite(done: int) -> None:
        # Every rank checks at the same steps (stops too are agreed on), so the ranks agree (max)
        # and stop together.
        first = int(all_reduce_max(bad_step.clone()).item())
        if first >= 0:
            kept = checkpoint_files(out_dir)[-1][1] if out_dir and checkpoint_files(out_dir) else "none"
            raise FloatingPointError(f"non-finite loss at step {first + 1} (found at step {done}); stopping. "
                                     f"Last good checkpoint: {kept}")

    agreement = StopAgreement()  # every rank, at the same point: it makes a process group
    with StopRequest() as stop:
        for step, batch in batches_forever(train_pipe, start) if start < cfg.num_steps else ():
            optimizer.zero_grad(set_to_none=True)
            n = batch.labels.shape[0]
            chunk = n // cfg.batch_split
            loss_sum = torch.zeros((), device=device)
            for j in range(cfg.batch_split):
                sl = slice(j * chunk, (j + 1) * chunk)
                feats = None if batch.features is None else [type(f)(*(t[sl] for t in f)) for f in batch.features]
                sync = j == cfg.batch_split - 1 or world.world_size == 1
                ctx = contextlib.nullcontext() if sync else ddp.no_sync()  # all-reduce once per step
                with ctx, amp():
                    logits = ddp(None if batch.clips is None else batch.clips[sl], features=feats)
                    loss = F.cross_entropy(logits.float(), batch.labels[sl]) / cfg.batch_split
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            bad_step = torch.where((bad_step >= 0) | torch.isfinite(loss_sum), bad_step, step)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            clips_since += n * world.world_size
            done = step + 1
            stopping = agreement.should_stop(stop.signal is not None)
            if done % cfg.print_freq == 0 or done == cfg.num_steps:
                check_finite(done)
                now = time.perf_counter()
                loss_all = all_reduce_sum(loss_sum.clone()) / world.world_size  # the global batch's loss
                last = {"step": done, "loss": loss_all.item(), "lr": optimizer.param_groups[0]["lr"],
                        "clips_per_s": clips_since / max(now - t_log, 1e-9)}
                t_log, clips_since = now, 0
                metrics.write(**last)
                if progress is not None:
                    progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                         clips_s=f"{last['clips_per_s']:.1f}")
                elif world.is_primary:
                    print(f"step {done}/{cfg.num_steps} loss {last['loss']:.4f} lr {last['lr']:.2e} "
                          f"clips/s {last['clips_per_s']:.1f}", flush=True)
            if progress is not None:
                progress.update(1)
            if done % cfg.eval_freq == 0 or done == cfg.num_steps:
                check_finite(done)
                r = run_eval(done)
                if r and r["top1"] > best["top1"]:
                    best = {"top1": r["top1"], "top5": r["top5"], "step": done}
                    if out_dir and world.is_primary:
                        ckpt_io.save_atomic(ckpt_io.training_state(model, optimizer, scheduler, scaler, done,
                                                                   cfg.to_dict(), {"best": best}),
                                            os.path.join(out_dir, "best.pth"))
                if world.is_primary:
                    metrics.plot()
            if done % cfg.save_freq == 0 or done == cfg.num_steps or stopping:
                check_finite(done)
                path = save(done)
                if stopping:
                    why = f"signal {stop.signal}" if stop.signal is not None else "a signal to another rank"
                    print0(world, f"stopped by {why} after step {done}; checkpoint: {path}")
                    break
            if done >= cfg.num_steps:
                break
    agreement.close()
    if progress is not None:
        progress.close()
    barrier()
    cleanup()
    result = {"step": step + 1 if start < cfg.num_steps else start, **last}
    if best.get("step") is not None:
        result.update(best_top1=best["top1"], best_step=best["step"])
    return result


def main(argv: list[str] | None = None, prog: str = "python -m evl.train") -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        from .demo import run_demo

        return run_demo()
    return train(parse_config(argv, prog))


if __name__ == "__main__":
    main()
