"""``python -m evl.export``: a trained EVL model as a folder to share.

The folder holds nothing that must be unpickled:

- ``config.json``: a format marker, the model's identity (``model_config``, as checkpoints record
  it), how it reads videos (frames, stride, sampling, evaluation views, input size), the class
  names, the run's evaluation numbers and the checkpoint it came from;
- ``model.safetensors``: the decoder and head (``decoder.*``, ``proj.*``); with
  ``--include_backbone`` also the frozen CLIP visual tower (``backbone.*``, in half precision
  where that is exact, as OpenAI's fp16 weights are). Without it the folder names the CLIP
  weights it needs by their sha256 (and the path training read them from), and loading checks
  the file it is given against that;
- ``backbone_config/<name>.json``: the open_clip model config, when the backbone was given as one;
- ``README.md``: a model card.

``evl.predict``, ``evl.extract`` and :func:`evl.load_checkpoint` take the folder wherever they take
a checkpoint (:func:`evl.checkpoint.read_exported`). This project's checkpoints and the reference
implementation's released ones export alike; the latter need ``--backbone``, ``--backbone_path``
and ``--sampling_rate``, as ``evl.predict`` does. Every file is written atomically,
``config.json`` last, so a folder without it is an export that did not finish.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any, Mapping

import torch

from pipelines.base import CLIP_MEAN, CLIP_STD
from pipelines.files import atomic_write

from .checkpoint import BACKBONE_PREFIX, EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_WEIGHTS, RunDirectory
from .cli import safe_stdio, user_errors
from .inference import add_model_arguments, load_model, read_class_names
from .jobs import setting_up
from .weights import UNUSED_VISUAL_KEYS, WeightsError, file_sha256

__all__ = ["export_model", "find_class_names", "find_evaluation", "model_card", "main"]

BACKBONE_CONFIG_DIR = "backbone_config"
_KEEPS = "the checkpoint is untouched; run the export again"


def _check_output(output: str, checkpoint: str, overwrite: bool) -> None:
    """Refuse an output that is a file, the checkpoint itself, a training run's directory, or (without
    ``overwrite``) any folder that is not empty."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"--output {output} is a file, not a folder")
    if not os.path.isdir(output) or not os.listdir(output):
        return
    if os.path.exists(checkpoint) and os.path.samefile(output, checkpoint if os.path.isdir(checkpoint)
                                                        else os.path.dirname(os.path.abspath(checkpoint))):
        raise FileExistsError(f"--output {output} is where the checkpoint {checkpoint} is: export into another folder")
    if not overwrite:
        raise FileExistsError(f"--output {output} is not empty: pass --overwrite to replace an earlier export "
                              "there, or choose another folder")
    config = os.path.join(output, EXPORT_CONFIG)
    run_files = [n for n in RunDirectory(output).run_files() if n != EXPORT_CONFIG]
    if os.path.isfile(config) and not run_files:
        try:
            with open(config, encoding="utf-8") as f:
                if json.load(f).get("format") == EXPORT_FORMAT:
                    return
        except (OSError, ValueError, AttributeError):
            pass
        run_files.append(EXPORT_CONFIG)
    if run_files:
        raise FileExistsError(f"--output {output} holds a training run's files ({', '.join(run_files[:4])}), "
                              "which --overwrite does not replace: export into another folder")


def find_class_names(checkpoint: str, ckpt: Any, num_classes: int) -> tuple[list[str] | None, str | None]:
    """The class names of a checkpoint's run, and where they came from, when there is one obvious
    file: an exported folder's own, else a ``class_names.json`` beside the checkpoint or beside the
    run's list files or data root (as training recorded them) that lists ``num_classes`` names.
    Candidates that disagree give none."""
    if isinstance(ckpt, Mapping) and ckpt.get("format") == EXPORT_FORMAT:
        return ckpt.get("class_names"), checkpoint if ckpt.get("class_names") else None
    config = (ckpt.get("config") or {}) if isinstance(ckpt, Mapping) else {}
    folders = [checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))]
    folders += [os.path.dirname(config[k]) for k in ("train_list_path", "val_list_path") if config.get(k)]
    folders += [config[k] for k in ("data_root", "train_data_root", "val_data_root") if config.get(k)]
    found: dict[str, list[str]] = {}
    for folder in folders:
        path = os.path.join(folder, "class_names.json")
        if os.path.isfile(path) and not any(os.path.samefile(path, p) for p in found):
            try:
                found[path] = read_class_names(path, num_classes)
            except (OSError, ValueError):
                continue
    if not found or any(names != next(iter(found.values())) for names in found.values()):
        return None, None
    path, names = next(iter(found.items()))
    return names, path


def _event(record: Any, source: str) -> dict | None:
    if not isinstance(record, Mapping) or not isinstance(record.get("top1"), (int, float)):
        return None
    out = {k: record[k] for k in ("top1", "top5", "step", "num_videos") if record.get(k) is not None}
    return dict(out, source=source)


def find_evaluation(checkpoint: str, ckpt: Any) -> tuple[dict | None, dict | None]:
    """(the evaluation of the checkpoint's own weights, the run's best evaluation when it was of
    other weights): ``{'top1', 'top5', 'step', ['num_videos'], 'source'}`` or None each.

    From the checkpoint's ``metrics`` (the run's best so far), ``best.json`` and ``metrics.jsonl``
    beside it: a training checkpoint is saved before the evaluation at its step, so its own
    numbers are the evaluation at its ``next_step``.
    """
    if not isinstance(ckpt, Mapping):
        return None, None
    if ckpt.get("format") == EXPORT_FORMAT:
        return ckpt.get("evaluation"), None
    if not ckpt.get("model_config"):  # the reference's released weights: no run beside them
        return None, None
    step = ckpt.get("next_step")
    folder = os.path.dirname(os.path.abspath(checkpoint))
    bests = [_event((ckpt.get("metrics") or {}).get("best"), "checkpoint"),
             _event(RunDirectory(folder).best_record(), "best.json")]
    bests = [b for b in bests if b is not None and b.get("step") is not None]
    own = next((b for b in bests if step is not None and b["step"] == step), None)
    from .train import MetricsLog, curves

    metrics = MetricsLog(folder, enabled=True)
    if step is not None and os.path.isfile(metrics.path):
        events = [e for e in metrics.events() if isinstance(e, dict)]  # lines a crash cut short: skipped
        at_step = [e for e in curves(events)[1] if e.get("step") == step]
        if at_step:
            own = dict(own or {}, **_event(at_step[-1], "metrics.jsonl"))
    best = max(bests, key=lambda b: b["top1"], default=None)
    return own, (best if best is not None and (own is None or best["step"] != own.get("step")) else None)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` in half precision when that holds it exactly (OpenAI's CLIP weights are fp16)."""
    if t.dtype == torch.float32:
        for dtype in (torch.float16, torch.bfloat16):
            half = t.to(dtype)
            if torch.equal(half.float(), t):
                return half
    return t.detach().clone().contiguous()


def _percent(x: float) -> str:
    return f"{x:.2f}%"


def model_card(config: dict) -> str:
    """The ``README.md`` of an exported folder, from its ``config.json``."""
    mc, data, bb = config["model_config"], config["data"], config["backbone"]
    frames, size = data["num_frames"], data["input_size"]
    names = config.get("class_names")
    source = config.get("source") or {}
    modules = [name for flag, name in (("enable_temporal_conv", "temporal convolution"),
                                       ("enable_temporal_pos_embed", "temporal position embedding"),
                                       ("enable_temporal_cross_attention", "temporal cross-attention"))
               if mc.get(flag, True)]
    lines = [
        f"# EVL video classifier: {mc['num_classes']} classes, {frames} frames, {bb['id']}", "",
        "An EVL model (\"Frozen CLIP Models are Efficient Video Learners\", Lin et al., ECCV 2022): a frozen CLIP "
        f"ViT image tower and a trained EVL decoder of {mc['decoder_num_layers']} layers ("
        + (", ".join(modules) if modules else "no temporal modules") + ") with a linear head"
        + (f", exported by `python -m evl.export` from `{source['checkpoint']}`" if source.get("checkpoint") else "")
        + (f" (step {source['step']})." if source.get("step") is not None else "."), "",
        "| | |", "|---|---|",
        f"| input | {frames} frames, stride {data['sampling_rate']} ({data['sampling']} sampling), {size}x{size} px, "
        "CLIP's mean and std |",
        f"| evaluation views | {data['num_spatial_views']} spatial x {data['num_temporal_views']} temporal, "
        "softmax averaged |",
        f"| classes | {mc['num_classes']}" + (f" (names in `config.json`: {', '.join(names[:5])}"
                                              f"{', ...' if len(names) > 5 else ''})" if names else
                                              " (no class names recorded)") + " |",
        "| backbone weights | " + ("included in `model.safetensors` (`backbone.*`)" if bb["included"] else
                                  (f"not included: the CLIP weights file with sha256 `{bb['sha256']}`"
                                   + (f" (trained with `{bb['path']}`)" if bb.get("path") else "")
                                   if bb.get("sha256") else
                                   f"not included: a random tower, rebuilt from seed {config['seed']}")) + " |",
        "", "## Evaluation", ""]
    own, best = config.get("evaluation"), config.get("run_best")
    views = f"{data['num_spatial_views']}x{data['num_temporal_views']} views"
    if own:
        videos = f", {own['num_videos']} videos" if own.get("num_videos") else ""
        lines.append(f"On the training run's validation list ({views}{videos}): top-1 {_percent(own['top1'])}, "
                     f"top-5 {_percent(own['top5'])}" + (f" at step {own['step']}." if own.get("step") else "."))
    else:
        lines.append("No evaluation of these weights was recorded.")
    if best:
        lines.append(f"The run's best evaluation was of other weights: top-1 {_percent(best['top1'])}, top-5 "
                     f"{_percent(best['top5'])} at step {best['step']}.")
    # Weights found by name (an open_clip tag, hf-hub:) are found again by it; a file must be given.
    by_name = bb.get("pretrained") or str(mc.get("backbone", "")).startswith("hf-hub:")
    weights_flag = "" if bb["included"] or not bb.get("sha256") or by_name else " --backbone_path /path/to/clip-weights"
    lines += [
        "", "## Loading", "",
        "With fast-evl, the folder goes wherever a checkpoint does:", "",
        "```bash",
        f"python -m evl.predict VIDEO.mp4 --checkpoint THIS_FOLDER{weights_flag}",
        f"python -m evl.extract --list LIST.txt --checkpoint THIS_FOLDER --output FEATURES{weights_flag}",
        "```", "", "```python",
        "from evl.inference import load_predictor",
        "predictor = load_predictor(\"THIS_FOLDER\"" + (", backbone_path=\"/path/to/clip-weights\"" if weights_flag
                                                        else "") + ")",
        "```", "",
        "`evl.load_checkpoint(model, \"THIS_FOLDER\")` loads it into a model built with `evl.build_model` from "
        "`config.json`'s `model_config`" + (" (its backbone weights too)." if bb["included"] else "."),
        "Without the backbone's weights in the folder, the CLIP weights file given (or the recorded path) must "
        "have the recorded sha256.", "",
        "## Files", "",
        "- `config.json`: the model (`model_config`), its input (`data`), `class_names`, evaluation, provenance;",
        "- `model.safetensors`: the decoder and head (`decoder.*`, `proj.*`)"
        + (", and the CLIP visual tower (`backbone.*`)" if bb["included"] else "")
        + "; safetensors, no pickled objects;",
    ]
    if bb.get("open_clip_config"):
        lines.append(f"- `{bb['open_clip_config']}`: the backbone's open_clip model config.")
    return "\n".join(lines) + "\n"


def export_model(checkpoint: str, output: str, *, class_names: str | None = None, include_backbone: bool = False,
                 overwrite: bool = False, backbone: str | None = None, backbone_path: str | None = None,
                 pretrained: str | None = None, num_frames: int | None = None, sampling_rate: int | None = None,
                 num_spatial_views: int | None = None, num_temporal_views: int | None = None) -> dict:
    """Write ``checkpoint`` (this project's, the reference's, or an export) as a folder at
    ``output``; returns the ``config.json`` written, with where the class names came from as
    ``class_names_source``. Raises as :func:`evl.inference.load_model` does, and
    ``FileExistsError`` for an output folder it may not write."""
    _check_output(output, checkpoint, overwrite)
    model, settings, ckpt = load_model(
        checkpoint, backbone=backbone, backbone_path=backbone_path, pretrained=pretrained, num_frames=num_frames,
        sampling_rate=sampling_rate, num_spatial_views=num_spatial_views, num_temporal_views=num_temporal_views,
        load_backbone=include_backbone)
    sha = settings["backbone_sha256"]
    if backbone_path and not include_backbone and not settings["backbone_included"] and sha is not None:
        # The path the folder will name: it must hold the weights the model was trained with.
        if not os.path.isfile(backbone_path):
            raise FileNotFoundError(f"CLIP weights file not found: {backbone_path}")
        given = file_sha256(backbone_path)
        if given != sha:
            raise WeightsError(f"{checkpoint} was trained with backbone weights of sha256 {sha}, but {backbone_path} "
                               f"has sha256 {given}")
    include = include_backbone or settings["backbone_included"]
    num_classes = settings["num_classes"]
    if class_names:
        names, names_source = read_class_names(class_names, num_classes), class_names
    else:
        names, names_source = find_class_names(checkpoint, ckpt, num_classes)
    own, best = find_evaluation(checkpoint, ckpt)

    spec = model.spec
    open_clip_config = None
    name = settings["backbone"]
    if name.endswith(".json") and os.path.isfile(name):
        open_clip_config = f"{BACKBONE_CONFIG_DIR}/{os.path.basename(name)}"
        with open(name, "rb") as f:
            open_clip_config_bytes = f.read()
        name = open_clip_config
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if include:
        tensors.update({BACKBONE_PREFIX + k: _compact(v) for k, v in model.backbone.visual.state_dict().items()
                        if k not in UNUSED_VISUAL_KEYS})
    source = None
    if isinstance(ckpt, Mapping) and ckpt.get("format") == EXPORT_FORMAT:
        source = ckpt.get("source")
    if source is None:
        source = {"checkpoint": os.path.basename(os.path.normpath(checkpoint)), "sha256": file_sha256(checkpoint),
                  "format": ckpt.get("format") if isinstance(ckpt, Mapping) else None,
                  "step": ckpt.get("next_step") if isinstance(ckpt, Mapping) else None}
    config = {
        "format": EXPORT_FORMAT,
        "model_config": dict(model.config, backbone=name, backbone_path=settings["backbone_path"],
                             backbone_sha256=sha),
        "backbone": {"name": spec.name, "id": settings["backbone_id"], "sha256": sha,
                     "path": settings["backbone_path"], "pretrained": settings.get("pretrained"), "included": include,
                     "open_clip_config": open_clip_config},
        "data": {k: settings[k] for k in ("num_frames", "sampling_rate", "sampling", "num_spatial_views",
                                          "num_temporal_views", "input_size")}
        | {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        "seed": settings["seed"],
        "class_names": names,
        "evaluation": own,
        "run_best": best,
        "source": source,
    }

    from safetensors.torch import save

    os.makedirs(output, exist_ok=True)
    for old in (os.path.join(output, EXPORT_CONFIG), os.path.join(output, BACKBONE_CONFIG_DIR)):
        if os.path.isdir(old):  # an earlier export's (--overwrite): the folder is incomplete until config.json
            shutil.rmtree(old)
        elif os.path.exists(old):
            os.remove(old)
    blob = save(tensors, metadata={"format": "pt", "evl_format": EXPORT_FORMAT})
    atomic_write(os.path.join(output, EXPORT_WEIGHTS), blob, what="model weights", keeps=_KEEPS)
    if open_clip_config:
        atomic_write(os.path.join(output, open_clip_config), open_clip_config_bytes, what="backbone config",
                     keeps=_KEEPS)
    atomic_write(os.path.join(output, "README.md"), model_card(config).encode(), what="model card", keeps=_KEEPS)
    atomic_write(os.path.join(output, EXPORT_CONFIG), (json.dumps(config, indent=2) + "\n").encode(),
                 what="model configuration", keeps=_KEEPS)
    return dict(config, class_names_source=names_source)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evl.export", description="Write a trained EVL checkpoint as a folder to share: config.json, "
        "model.safetensors (decoder and head; the CLIP tower too with --include_backbone) and a README.md model "
        "card. evl.predict, evl.extract and evl.load_checkpoint take the folder as a checkpoint.")
    p.add_argument("checkpoint", metavar="CKPT", help="an EVL checkpoint (.pth): this project's or the reference's")
    p.add_argument("--output", required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.add_argument("--class_names", metavar="JSON", help="JSON list of class names, index = position (default: the "
                   "class_names.json beside the checkpoint or the run's list files, when there is one)")
    p.add_argument("--include_backbone", action="store_true", help="include the CLIP visual tower's weights "
                   "(read from --backbone_path or the path the checkpoint records); without it the folder names "
                   "them by sha256")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors in the input too")
    add_model_arguments(p, checkpoint_flag=False, device=False)
    return p


def main(argv: list[str] | None = None) -> int:
    safe_stdio()
    ns = build_parser().parse_args(argv)
    prog = "python -m evl.export"
    with user_errors(prog, ns.debug), setting_up():
        config = export_model(ns.checkpoint, ns.output, class_names=ns.class_names,
                              include_backbone=ns.include_backbone, overwrite=ns.overwrite, backbone=ns.backbone,
                              backbone_path=ns.backbone_path, pretrained=ns.pretrained, num_frames=ns.num_frames,
                              sampling_rate=ns.sampling_rate, num_spatial_views=ns.num_spatial_views,
                              num_temporal_views=ns.num_temporal_views)
    bb = config["backbone"]
    size = os.path.getsize(os.path.join(ns.output, EXPORT_WEIGHTS)) / 2 ** 20
    names = (f"{len(config['class_names'])} class names from {config['class_names_source']}" if config["class_names"]
             else "no class names (pass --class_names)")
    weights = "included" if bb["included"] else (f"referenced by sha256 {bb['sha256']}" if bb["sha256"] else
                                                 f"a random tower, rebuilt from seed {config['seed']}")
    print(f"exported {ns.checkpoint} to {ns.output}: {EXPORT_CONFIG}, {EXPORT_WEIGHTS} ({size:.1f} MiB), README.md; "
          f"backbone weights: {weights}; {names}", flush=True)
    return 0


if __name__ == "__main__":
    from .cli import run_program

    run_program(main)
