"""Multi-view evaluation (evl-spec §2): the softmax of all views of a video averaged into one
prediction; top-1 / top-5 over every readable val video exactly once, under DDP too.

``python -m evl.eval`` takes the training flags plus ``--resume_path CKPT`` (or
``--checkpoint``) and writes per-video predictions as JSON lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass

import torch

from .cli import safe_stdio, user_errors
from .config import TrainConfig, parse_config
from .distributed import all_reduce_sum, print0, process_group, threads_beside_decoders
from .jobs import build_run_model, check_inputs, has_val_data, load_run_checkpoint, make_pipeline, setting_up
from .precision import autocast, resolve_precision


@dataclass
class EvalResult:
    top1: float
    top5: float
    num_videos: int
    probs: torch.Tensor  # [num_samples, C] averaged softmax (zeros for videos not evaluated)
    seen: torch.Tensor  # [num_samples] bool
    labels: torch.Tensor  # [num_samples]


@torch.no_grad()
def evaluate(model: torch.nn.Module, pipeline, autocast_ctx, device: torch.device, num_classes: int,
             progress: bool = False) -> EvalResult:
    was_training = model.training
    model.eval()
    n = pipeline.num_samples
    sums = torch.zeros(n, num_classes, device=device)
    views = torch.zeros(n, device=device)
    labels = torch.full((n,), -1, dtype=torch.long, device=device)
    batches = pipeline
    if progress:
        from tqdm import tqdm

        batches = tqdm(pipeline, total=len(pipeline), desc="eval", leave=False, dynamic_ncols=True, disable=None)
    for batch in batches:
        with autocast_ctx():
            logits = model(batch.clips, features=batch.features)
        sums.index_add_(0, batch.index, logits.float().softmax(-1))
        views.index_add_(0, batch.index, torch.ones_like(batch.index, dtype=torch.float))
        labels[batch.index] = batch.labels
    # Shards are disjoint, so summing over ranks counts every video once.
    all_reduce_sum(sums)
    all_reduce_sum(views)
    labels = all_reduce_sum(labels + 1) - 1  # each label is held by one rank, -1 elsewhere
    seen = views > 0
    probs = sums / views.clamp(min=1)[:, None]
    k = min(5, num_classes)
    topk = probs[seen].topk(k, dim=-1).indices
    hit = topk == labels[seen][:, None]
    count = int(seen.sum())
    model.train(was_training)
    return EvalResult(
        top1=float(hit[:, 0].float().mean()) * 100 if count else 0.0,
        top5=float(hit.any(-1).float().mean()) * 100 if count else 0.0,
        num_videos=count, probs=probs.cpu(), seen=seen.cpu(), labels=labels.cpu())


def write_predictions(path: str, result: EvalResult, paths: list[str], class_names: list[str] | None = None) -> None:
    """One JSON object per evaluated video: path, label, top-5 classes and probabilities."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    k = min(5, result.probs.shape[1])
    with open(path, "w", encoding="utf-8") as f:
        for i in torch.nonzero(result.seen).flatten().tolist():
            p, c = result.probs[i].topk(k)
            rec = {"path": paths[i], "label": int(result.labels[i]), "top5": c.tolist(),
                   "top5_prob": [round(float(x), 6) for x in p]}
            if class_names:
                rec["top5_names"] = [class_names[j] for j in c.tolist()]
            f.write(json.dumps(rec) + "\n")


def evaluate_run(cfg: TrainConfig) -> dict:
    """Evaluate the model of ``cfg.resume_path`` on the val split (``--eval_only``): its own model
    and pipeline, nothing written but the predictions (``--predictions_path``, or
    ``OUTPUT_DIR/predictions.jsonl``). Returns top-1 and top-5."""
    from pipelines import cpu_workers

    check_inputs(cfg)
    with threads_beside_decoders(cpu_workers(cfg.pipeline, cfg.num_workers)), process_group(cfg.device) as world:
        device = world.device
        print0(world, "config: " + json.dumps(cfg.to_dict()))
        with setting_up():
            precision = resolve_precision(cfg.mixed_precision, device)
            model = build_run_model(cfg, world)
            state = load_run_checkpoint(model, cfg.resume_path) if cfg.resume_path else {}
            if cfg.resume_path:
                print0(world, f"loaded {cfg.resume_path}")
            if not has_val_data(cfg):
                return {}
            pipe = make_pipeline(cfg, world, False, model.spec.image_size[0], model.config)
        model.to(device)
        res = evaluate(model, pipe, lambda: autocast(precision, device), device, cfg.num_classes,
                       progress=world.is_primary)
        print0(world, f"step {int(state.get('next_step', 0))}: val top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}%  "
                      f"({res.num_videos} videos)")
        pred = cfg.predictions_path or (os.path.join(cfg.output_dir, "predictions.jsonl") if cfg.output_dir else None)
        if pred and world.is_primary:
            records = getattr(pipe, "records", None)  # the dummy pipeline's samples have no files
            paths = [r.path for r in records] if records else [str(i) for i in range(pipe.num_samples)]
            write_predictions(pred, res, paths)
            print0(world, f"predictions written to {pred}")
        return {"top1": res.top1, "top5": res.top5}


def main(argv: list[str] | None = None, prog: str = "python -m evl.eval") -> dict:
    safe_stdio()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["--resume_path" if a == "--checkpoint" else a for a in argv]
    cfg = parse_config(argv + ["--eval_only"], prog)
    with user_errors(prog, cfg.debug):
        return evaluate_run(cfg)


if __name__ == "__main__":
    from .cli import run_program

    run_program(main)
