"""``python -m evl.train``: the EVL training loop (evl-spec §3), on CPU, one GPU or torchrun.

With no arguments it runs the built-in demo: it writes a small motion-only video dataset,
trains a tiny-backbone EVL on the CPU for a few minutes and prints its val top-1. Otherwise:
AdamW on the trainable part only, cosine schedule per step with optional linear warmup,
gradient accumulation (``--batch_split``), bf16 autocast on GPU (fp16 with a grad scaler on
request), periodic multi-view evaluation, atomic checkpoints with exact resume, and
``metrics.jsonl`` plus a curves PNG in ``--output_dir``, and on request TensorBoard and W&B
(``--report_to``, :mod:`evl.reporting`). ``metrics.jsonl`` keeps every run made in the directory;
the curves show the current one (see :func:`curves`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt_io
from .cli import STOPPED, SetupError, safe_stdio, user_errors
from .config import EVLConfig, TrainConfig, parse_config
from .distributed import (StopAgreement, World, all_gather_object, all_reduce_max, all_reduce_sum, barrier,
                          print0, process_group, threads_beside_decoders)
from .eval import evaluate, evaluate_run
from .jobs import (build_run_model, check_inputs, check_world, has_val_data, load_run_checkpoint, make_pipeline,
                   setting_up)
from .precision import autocast, grad_scaler, resolve_precision
from .reporting import Reporting, check_reporting

log = logging.getLogger("evl.train")


def lr_lambda(cfg: TrainConfig):
    """Linear warmup, then cosine decay to 0 at ``num_steps``, per step."""
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.num_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return fn


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
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train, evals = curves(self.events())
        fig = Figure(figsize=(10, 4))
        FigureCanvasAgg(fig)  # Agg, without pyplot's global state (and its import)
        a, b = fig.subplots(1, 2)
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


# Resuming with other values of these would continue another run than the checkpoint's: the
# model and what it computes, the samples and their order, the optimiser's settings (restored
# from the checkpoint, so a new --lr or --weight_decay would be ignored). Refused, with a message.
RESUME_FIXED = tuple(f.name for f in dataclasses.fields(EVLConfig) if f.name != "backbone_path") + (
    "train_list_path", "sampling_rate", "sampling", "auto_augment", "mirror", "crop_scale", "seed", "lr",
    "weight_decay", "warmup_steps")
# How a run continues, not which run it is: not compared.
RESUME_IGNORED = ("output_dir", "auto_resume", "resume_path", "overwrite_output_dir", "eval_only", "debug",
                  "predictions_path", "extra", "batch_size", "pretrain", "report_to")


def check_resume_flags(state: dict, cfg: TrainConfig, path: str) -> list[str]:
    """Compares this run's flags with the checkpoint's (``state``). Raises for a change that would
    make the resumed run another run (:data:`RESUME_FIXED`, and the global batch); returns a line
    per change that takes effect from here on. A new process count is no change."""
    saved = state["config"]
    now = cfg.to_dict()
    fmt = lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    refused, changed = [], []
    for key, value in now.items():
        if key in RESUME_IGNORED or key not in saved:
            continue
        old = saved[key]
        if (list(old) if isinstance(old, (list, tuple)) else old) == (list(value) if isinstance(value, (list, tuple))
                                                                     else value):
            continue
        line = f"--{key} {fmt(old)} -> {fmt(value)}"
        (refused if key in RESUME_FIXED else changed).append(line)
    old_batch = ckpt_io.global_batch(state)
    if old_batch is not None and old_batch != cfg.batch_size:
        refused.append(f"global batch (--batch_size) {old_batch} -> {cfg.batch_size}")
    if refused:
        raise SetupError(f"{path} was trained with other flags: {'; '.join(refused)}. Resuming would continue "
                         "another run than the checkpoint's: pass the checkpoint's values (its config.json), or "
                         "start a new run in another --output_dir")
    return changed


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


def train(cfg: TrainConfig) -> dict:
    """Train as configured (``eval_only``: evaluate, as ``evl.eval``); returns the final metrics,
    and ``stopped_by`` (the signal's number) when a signal stopped the run."""
    if cfg.eval_only:
        return evaluate_run(cfg)
    check_reporting(cfg.report_to, cfg.output_dir)  # a missing package is said before anything is built
    check_inputs(cfg)
    from pipelines import cpu_workers

    with threads_beside_decoders(cpu_workers(cfg.pipeline, cfg.num_workers)), process_group(cfg.device) as world:
        run = open_run_directory(cfg, world)
        try:
            return _run(cfg, world, run)
        finally:
            if run is not None:
                run.unlock()


def train_step(model, batch, optimizer, scaler, scheduler, amp, batch_split: int,
               no_sync=contextlib.nullcontext) -> torch.Tensor:
    """One optimiser step on ``batch``, in ``batch_split`` chunks whose gradients accumulate
    (``no_sync``: DDP's, so that gradients are all-reduced once, with the last chunk). Returns
    the batch's loss, left on the device: reading it would wait for the step to finish."""
    optimizer.zero_grad(set_to_none=True)
    chunk = batch.labels.shape[0] // batch_split
    loss_sum = torch.zeros((), device=batch.labels.device)
    for j in range(batch_split):
        part = batch.rows(slice(j * chunk, (j + 1) * chunk))
        with (contextlib.nullcontext() if j == batch_split - 1 else no_sync()), amp():
            logits = model(part.clips, features=part.features)
            loss = F.cross_entropy(logits.float(), part.labels) / batch_split
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss_sum


def data_wait_share(wait_s: float, interval_s: float, world: World) -> float:
    """The share of an interval's wall time the training loop spent blocked in ``next(batches)``.

    On a GPU the step is asynchronous: the loop can be ahead of the device by the launch queue,
    so a wait may overlap the device's work on steps already queued. The interval ends at a
    sync (the non-finite check reads the last step's result), so its wall time covers the
    device's work too. Near 0: batches
    are ready when the loop asks (loading keeps up); near 1: the loop waits for data most of the
    time (loading is the bottleneck). Under DDP the largest share among the ranks: one slow
    loader holds every rank back at the gradient all-reduce, where no rank counts it as waiting.
    """
    share = min(1.0, wait_s / max(interval_s, 1e-9))
    if world.world_size > 1:
        share = all_reduce_max(torch.tensor(share, dtype=torch.float32, device=world.device)).item()
    return share


def start_reporting(cfg: TrainConfig, world: World, start: int) -> Reporting:
    """``--report_to``'s reporters, on rank 0 (an empty :class:`Reporting` elsewhere). One that
    does not start stops every rank before the first step, with rank 0's reason."""
    if not cfg.report_to:
        return Reporting()
    reporting, failure = Reporting(), None
    if world.is_primary:
        try:
            reporting = Reporting.start(cfg.report_to, output_dir=cfg.output_dir, start_step=start,
                                        config={**cfg.to_dict(), "world_size": world.world_size})
            print0(world, "reporting to " + reporting.describe())
        except SetupError as e:
            failure = e
    if world.world_size > 1:  # the other ranks would wait for rank 0 in the first step's all-reduce
        failed = all_reduce_max(torch.tensor(int(failure is not None), device=world.device)).item()
        if failed and failure is None:
            failure = SetupError("--report_to: rank 0's reporters did not start (its error says why)")
    if failure is not None:
        raise failure
    return reporting


def open_run_directory(cfg: TrainConfig, world: World) -> ckpt_io.RunDirectory | None:
    """The run's ``--output_dir``, checked on every rank and locked by rank 0.

    A directory that holds another run is never written into silently: continuing it needs
    ``--auto_resume`` (or ``--resume_path`` of one of its checkpoints), starting over needs
    ``--overwrite_output_dir``.
    """
    if not cfg.output_dir:
        return None
    run = ckpt_io.RunDirectory(cfg.output_dir, cfg.keep_last)
    if world.is_primary:
        run.lock()  # first: nobody else decides about this directory meanwhile
    try:
        used = run.run_files()
        resume_here = cfg.resume_path and os.path.samefile(os.path.dirname(os.path.abspath(cfg.resume_path)),
                                                           cfg.output_dir)
        if used and not (cfg.auto_resume or resume_here or cfg.overwrite_output_dir):
            shown = ", ".join(used[:4]) + (", ..." if len(used) > 4 else "")
            raise ckpt_io.RunDirectoryError(
                f"--output_dir {cfg.output_dir} holds an earlier run ({shown}): pass --auto_resume to continue it, "
                "--overwrite_output_dir to delete it and start over, or choose another --output_dir")
        if world.is_primary:
            gone = run.remove_temporaries()
            if gone:
                print0(world, f"removed {len(gone)} unfinished file(s) of a save that was interrupted: "
                              f"{', '.join(gone)}")
            if used and cfg.overwrite_output_dir:
                print0(world, f"--overwrite_output_dir: deleted the earlier run's {', '.join(run.start_over())}")
    except BaseException:
        run.unlock()
        raise
    return run


def _run(cfg: TrainConfig, world: World, run: ckpt_io.RunDirectory | None) -> dict:
    device = world.device
    print0(world, "config: " + json.dumps(cfg.to_dict()))
    with setting_up():
        check_world(cfg, world)
        precision = resolve_precision(cfg.mixed_precision, device)
        model = build_run_model(cfg, world)
        input_size = model.spec.image_size[0]
        resume = cfg.resume_path or (run.latest() if run is not None and cfg.auto_resume else None)
        state = None
        if cfg.pretrain and not resume:
            left_out = ckpt_io.load_pretrained(model, cfg.pretrain)
            print0(world, f"initialised from {cfg.pretrain}" + "".join(f"; {line}" for line in left_out))
        if resume:
            state = load_run_checkpoint(model, resume)
            if "config" in state and "optimizer" in state:
                changed = check_resume_flags(state, cfg, resume)
                if changed:
                    print0(world, "resuming with changed flags, in effect from here on: " + "; ".join(changed))
            print0(world, f"loaded {resume}")
        # Pipelines validate their lists (labels, missing files) before the model moves or trains.
        val_pipe = make_pipeline(cfg, world, False, input_size, model.config) if has_val_data(cfg) else None
        train_pipe = make_pipeline(cfg, world, True, input_size, model.config)
    out_dir = run.path if run is not None else None
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
        reporting.log(step, {"top1": res.top1, "top5": res.top5})
        return {"result": res, "top1": res.top1, "top5": res.top5}

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
        if run is not None:  # an evaluation after the checkpoint was saved may have found a better one
            best = max(best, run.best_record() or best, key=lambda b: b["top1"])
        restore_rng(state, world, cfg.seed)

    def save(next_step: int) -> str | None:
        # Every rank's dropout stream, so that each continues its own after a resume: a
        # collective, so every rank calls save (at the same steps) and rank 0 writes.
        rngs = all_gather_object(ckpt_io.rng_state()) if world.world_size > 1 else None
        if not (run and world.is_primary):
            return None
        return run.save(ckpt_io.training_state(model, optimizer, scheduler, scaler, next_step, cfg.to_dict(),
                                               {"best": best}, rngs), next_step)

    progress = None
    if world.is_primary:
        from tqdm import tqdm

        progress = tqdm(total=cfg.num_steps, initial=start, desc="train", dynamic_ncols=True,
                        disable=None)  # None: no bar when stderr is not a terminal: log lines instead
    reporting = start_reporting(cfg, world, start)
    if run is not None and world.is_primary:  # once set-up went through: a failed start leaves no run behind
        try:
            run.write_config(cfg.to_dict())
        except BaseException:
            reporting.close(failed=True)
            raise
    last = {}
    metrics.write(event="start", step=start)  # what the curves of earlier runs this run supersedes
    model.train()
    # Each logged interval: its wall time from the last log point (evaluations and saves left
    # out), the clips trained in it, and the wall time the loop spent blocked in next(batches).
    t_log, clips_since, wait_since = time.perf_counter(), 0, 0.0
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
            kept = (run.latest() if run is not None else None) or "none"
            raise FloatingPointError(f"non-finite loss at step {first + 1} (found at step {done}); stopping. "
                                     f"Last good checkpoint: {kept}")

    agreement = StopAgreement()  # every rank, at the same point: it makes a process group
    stopped_by = None
    batches = batches_forever(train_pipe, start) if start < cfg.num_steps else iter(())
    with reporting, StopRequest() as stop:
        while True:
            t_wait = time.perf_counter()
            try:
                step, batch = next(batches)  # not a for loop: an evaluation replaces the iterator
            except StopIteration:
                break
            wait_since += time.perf_counter() - t_wait
            loss_sum = train_step(ddp, batch, optimizer, scaler, scheduler, amp, cfg.batch_split,
                                  ddp.no_sync if world.world_size > 1 else contextlib.nullcontext)
            bad_step = torch.where((bad_step >= 0) | torch.isfinite(loss_sum), bad_step, step)
            n = batch.labels.shape[0]
            clips_since += n * world.world_size
            done = step + 1
            stopping = agreement.should_stop(stop.signal is not None)
            if done % cfg.print_freq == 0 or done == cfg.num_steps:
                check_finite(done)
                now = time.perf_counter()
                loss_all = all_reduce_sum(loss_sum.clone()) / world.world_size  # the global batch's loss
                last = {"step": done, "loss": loss_all.item(), "lr": optimizer.param_groups[0]["lr"],
                        "clips_per_s": clips_since / max(now - t_log, 1e-9),
                        "data_wait": data_wait_share(wait_since, now - t_log, world)}
                t_log, clips_since, wait_since = now, 0, 0.0
                metrics.write(**last)
                reporting.log(done, last)
                if progress is not None and not progress.disable:
                    progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                         clips_s=f"{last['clips_per_s']:.1f}", data_wait=f"{last['data_wait']:.0%}")
                elif world.is_primary:
                    print(f"step {done}/{cfg.num_steps} loss {last['loss']:.4f} lr {last['lr']:.2e} "
                          f"clips/s {last['clips_per_s']:.1f} data wait {last['data_wait']:.0%}", flush=True)
            if progress is not None:
                progress.update(1)
            saving = done % cfg.save_freq == 0 or done == cfg.num_steps or stopping
            evaluating = (done % cfg.eval_freq == 0 or done == cfg.num_steps) and not stopping
            if saving or evaluating:
                check_finite(done)
                t_pause = time.perf_counter()  # after that sync: the steps' device time stays in the interval
            if saving:  # before the evaluation: an evaluation that fails cannot cost these steps
                path = save(done)
            if evaluating:
                # The training pipeline is let go meanwhile (a DALI graph holds decoded batches
                # on the device) and picks up at the next step after: it starts mid-epoch without
                # decoding the batches before it.
                batches.close()
                r = run_eval(done)
                batches = batches_forever(train_pipe, done)
                if r and r["top1"] > best["top1"]:
                    best = {"top1": r["top1"], "top5": r["top5"], "step": done}
                    if run and world.is_primary:
                        run.save_best(ckpt_io.training_state(model, optimizer, scheduler, scaler, done, cfg.to_dict(),
                                                             {"best": best}), best)
                if world.is_primary:
                    metrics.plot()
            if saving or evaluating:  # left out of the logged interval: it measures training steps
                t_log += time.perf_counter() - t_pause
            if stopping:
                stopped_by = stop.signal if stop.signal is not None else signal.SIGTERM
                why = f"signal {stop.signal}" if stop.signal is not None else "a signal to another rank"
                print0(world, f"stopped by {why} after step {done}; checkpoint: {path}")
                break
            if done >= cfg.num_steps:
                break
    agreement.close()
    if progress is not None:
        progress.close()
    barrier()
    result = {"step": step + 1 if start < cfg.num_steps else start, **last}
    if best.get("step") is not None:
        result.update(best_top1=best["top1"], best_step=best["step"])
    if stopped_by is not None:
        result["stopped_by"] = int(stopped_by)
    return result


def main(argv: list[str] | None = None, prog: str = "python -m evl.train") -> dict:
    """The command line: errors in the input are one line and status 1; a run stopped by a
    signal exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT) once its
    checkpoint is saved, so that ``train && eval`` and schedulers can tell it from a finished run."""
    safe_stdio()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        from .demo import run_demo

        return run_demo()
    cfg = parse_config(argv, prog)
    with user_errors(prog, cfg.debug):
        result = train(cfg)
    if "stopped_by" in result:
        raise SystemExit(STOPPED + result["stopped_by"])
    return result


if __name__ == "__main__":
    from .cli import run_program

    run_program(main)
