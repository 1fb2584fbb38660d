"""Running a trained EVL checkpoint on videos: what ``evl.predict`` and ``evl.extract`` share.

:func:`load_predictor` rebuilds the model a checkpoint was trained as and loads it. This
project's checkpoints record everything (``model_config``: architecture and backbone identity;
``config``: frames, stride, views, seed); the reference implementation's released ones hold
only decoder weights, so the backbone, its weights and the stride are given by the caller and
the decoder's size is read from the weights' shapes (spec §3). A folder written by ``evl.export``
records what this project's checkpoints do, and may hold the backbone's weights too; it loads
wherever a checkpoint file does. Videos are then read exactly as
evaluation reads them (spec §2): :class:`ViewReader` turns a video, or a time window of one,
into its evaluation views with the shared ``ClipSampler``, ``read_frames`` and ``decode_clips``,
and :meth:`Predictor.run` averages nothing: it returns per-view softmax, query embedding and
optionally the last block's per-frame CLS tokens, leaving the averaging to the caller.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

from pipelines.base import thwc_uint8_to_bcthw
from pipelines.probe import VideoInfo, probe_video
from pipelines.pyav import read_frames
from pipelines.sampling import ClipSampler
from pipelines.transforms import decode_clips

from .checkpoint import check_backbone_identity, describe_state, load_state, read_checkpoint, read_model_state
from .distributed import resolve_device
from .model import EVLConfig, EVLModel, build_model
from .pretrained import is_hf_hub, weights_file
from .precision import autocast, resolve_precision
from .weights import WeightsError, file_sha256

__all__ = ["Predictor", "ViewReader", "load_model", "load_predictor", "infer_decoder_config", "add_model_arguments",
           "predictor_from_args", "read_class_names"]


def infer_decoder_config(sd: Mapping[str, torch.Tensor], path: str) -> dict:
    """``build_model`` keyword arguments implied by a decoder state dict's keys and shapes.

    The number of decoder heads leaves no trace in the shapes; it defaults to ``qkv_dim / 64``
    as in every released model (12 for width 768, 16 for 1024).
    """
    layers = {k.split(".")[2] for k in sd if k.startswith("decoder.decoder_layers.")}
    needed = ("decoder.cls_token", "proj.2.weight", "decoder.decoder_layers.0.attn.q_proj.weight",
              "decoder.decoder_layers.0.mlp.fc1.weight")
    absent = [k for k in needed if k not in sd]
    if not layers or absent:
        raise WeightsError(f"{path}: cannot infer the decoder's size: not an EVL decoder state dict "
                           f"(no {', '.join(absent) or 'decoder.decoder_layers.*'}; found {describe_state(sd)})")
    width = int(sd["decoder.cls_token"].shape[0])
    return {
        "num_classes": int(sd["proj.2.weight"].shape[0]),
        "num_frames": int(pos.shape[0]) if (pos := sd.get("decoder.temporal_pos_embed.0")) is not None else None,
        "decoder_num_layers": len(layers),
        "decoder_qkv_dim": int(sd["decoder.decoder_layers.0.attn.q_proj.weight"].shape[0]),
        "decoder_mlp_factor": sd["decoder.decoder_layers.0.mlp.fc1.weight"].shape[0] / width,
        "enable_temporal_conv": "decoder.temporal_conv.0.weight" in sd,
        "enable_temporal_pos_embed": "decoder.temporal_pos_embed.0" in sd,
        "enable_temporal_cross_attention": "decoder.cross_attention.0.w1" in sd,
        "width": width,
    }


def read_class_names(path: str, num_classes: int | None = None) -> list[str]:
    """A JSON list of class names, index = position (the reference's ``k400_class_mappings.json``)."""
    import json

    if not os.path.isfile(path):
        raise FileNotFoundError(f"class-names file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            names = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a JSON list of class names (index = position), "
                         f"got {type(names).__name__}")
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{path} has {len(names)} class names but the model has {num_classes} classes")
    return names


@dataclass(frozen=True)
class ViewReader:
    """A video (or frames ``[first_frame, last_frame)`` of it) -> its evaluation views, uint8.

    Picklable and model-free, so DataLoader workers can run it.
    """

    sampler: ClipSampler

    def __call__(self, path: str, first_frame: int = 0, last_frame: int | None = None,
                 info: VideoInfo | None = None) -> torch.Tensor:
        """``[V, T, S, S, 3]`` uint8, V = spatial x temporal views (view order of ``eval_clips``)."""
        info = info or probe_video(path)
        specs = self.sampler.eval_clips(0, num_frames_in_video=info.num_frames, height=info.height,
                                        width=info.width, first_frame=first_frame, last_frame=last_frame)
        return decode_clips(read_frames, path, specs, self.sampler.size)


@dataclass
class Predictor:
    """A loaded model, how it reads videos and where it runs."""

    model: EVLModel
    reader: ViewReader
    device: torch.device
    precision: str
    settings: dict = field(default_factory=dict)  # what was resolved, for reports and manifests

    @property
    def num_classes(self) -> int:
        return int(self.model.config["num_classes"])

    @torch.no_grad()
    def run(self, clips: torch.Tensor, want_cls: bool = False) -> dict[str, torch.Tensor]:
        """uint8 clips ``[N, T, S, S, 3]`` -> per-clip ``probs [N, K]``, ``embedding [N, C]`` and,
        with ``want_cls``, the last backbone block's CLS token per frame ``cls [N, T, C]``; fp32 on CPU."""
        return self.run_normalised(thwc_uint8_to_bcthw(clips, self.device), want_cls)

    @torch.no_grad()
    def run_normalised(self, x: torch.Tensor, want_cls: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`run` on clips as the pipelines give them: ``[N, 3, T, S, S]`` float, normalised."""
        x = x.to(self.device)
        with autocast(self.precision, self.device):
            feats = self.model.forward_features(x)
            logits, emb = self.model.forward_head(feats, return_embedding=True)
        out = {"probs": logits.float().softmax(-1).cpu(), "embedding": emb.float().cpu()}
        if want_cls:
            # The block output before ln_post (which EVL never uses), as the decoder sees it.
            out["cls"] = feats[-1].out[:, :, 0].float().cpu()
        return out


def default_views(num_frames: int) -> tuple[int, int]:
    """(spatial, temporal) views of the reference's evaluation: 1x3 for 8 frames, 3x1 beyond (spec §2)."""
    return (1, 3) if num_frames <= 8 else (3, 1)


def _weights_hint(recorded_path: str | None, sha: str | None) -> str:
    return (f"the checkpoint records CLIP weights {recorded_path or '(no path)'} with sha256 {sha}; "
            "pass --backbone_path to where that file is")


def load_model(
    checkpoint: str,
    *,
    backbone: str | None = None,
    backbone_path: str | None = None,
    pretrained: str | None = None,
    num_frames: int | None = None,
    sampling_rate: int | None = None,
    num_spatial_views: int | None = None,
    num_temporal_views: int | None = None,
    load_backbone: bool = True,
) -> tuple[EVLModel, dict, Any]:
    """Rebuild the model of ``checkpoint`` (a file, or a folder ``evl.export`` wrote) on the CPU in
    eval mode; the arguments override what it records. Returns the model, what was resolved (the
    :attr:`Predictor.settings`) and the checkpoint as read.

    The backbone's weights: those a folder includes; else the CLIP weights file (``backbone_path``,
    by default the one the checkpoint records), or, when there is none or it is not on this machine,
    the file open_clip resolves for the recorded (or given) ``pretrained`` tag or ``hf-hub:``
    backbone, through the Hugging Face cache; its sha256 must be the recorded one. With
    ``load_backbone=False`` no weights file is read (the tower keeps the seed's random weights):
    what ``evl.export`` needs to write a folder that refers to the weights by their sha256, which
    ``settings['backbone_sha256']`` then holds.

    Raises ``WeightsError`` (wrong or unusable checkpoint, backbone weights that differ from the
    ones it was trained with), ``FileNotFoundError`` (checkpoint, backbone config or weights
    missing) or ``ValueError`` (inconsistent arguments), each with a message naming the file.
    """
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    ckpt = read_checkpoint(checkpoint)
    sd = read_model_state(ckpt, checkpoint)
    model_config = ckpt.get("model_config") if isinstance(ckpt, Mapping) else None
    train_config: dict[str, Any] = (ckpt.get("config") or {}) if isinstance(ckpt, Mapping) else {}
    included = isinstance(ckpt, Mapping) and ckpt.get("backbone_weights") is not None

    if model_config:  # this project's checkpoint, or an exported folder: it says what it is
        # What the checkpoint says the model is, but for what the arguments decide below.
        kwargs = {k: v for k, v in asdict(EVLConfig.from_dict(model_config)).items()
                  if k not in ("backbone", "backbone_path", "pretrained", "num_classes", "num_frames")}
        by_name = pretrained is not None  # a tag given here names the weights, whatever path is recorded
        pretrained = pretrained or model_config.get("pretrained")
        saved_frames = int(model_config["num_frames"])
        num_classes = int(model_config["num_classes"])
        if backbone is None:
            backbone = model_config["backbone"]
            if backbone.endswith(".json") and not os.path.isfile(backbone):
                raise FileNotFoundError(f"backbone config {backbone} recorded in {checkpoint} not found (paths are "
                                        "relative to where training ran); pass --backbone")
        recorded_path, sha = model_config.get("backbone_path"), model_config.get("backbone_sha256")
        if included:
            if backbone_path is not None:
                warnings.warn(f"{checkpoint} includes its backbone's weights: --backbone_path {backbone_path} "
                              "is not used", stacklevel=2)
            backbone_path = None
        elif backbone_path is None and sha is not None:
            recorded_here = bool(recorded_path) and os.path.isfile(recorded_path)
            if by_name or ((pretrained or is_hf_hub(backbone)) and not recorded_here):
                # Weights named by tag or hf-hub repository: found by that name, here as on the
                # machine that trained.
                backbone_path = weights_file(backbone, pretrained) if load_backbone else None
            else:
                if load_backbone and not recorded_path:
                    raise WeightsError(f"{checkpoint}: {_weights_hint(recorded_path, sha)}")
                if load_backbone and not os.path.isfile(recorded_path):
                    raise FileNotFoundError(f"CLIP weights file not found: {recorded_path} ("
                                            f"{_weights_hint(recorded_path, sha)})")
                backbone_path = recorded_path
        seed = int(train_config.get("seed", 0))
        sampling = train_config.get("sampling", "dense")
        rate = sampling_rate or int(train_config.get("sampling_rate", 16))
        spatial = num_spatial_views or int(train_config.get("num_spatial_views", 1))
        temporal = num_temporal_views or int(train_config.get("num_temporal_views", 3))
    else:  # the reference's released checkpoint: decoder weights only
        named = backbone_path or pretrained or is_hf_hub(backbone)
        missing = [flag for flag, v in (("--backbone", backbone), ("--backbone_path", named),
                                        ("--sampling_rate", sampling_rate)) if not v]
        inferred = infer_decoder_config(sd, checkpoint)
        if inferred["num_frames"] is None and num_frames is None:
            missing.append("--num_frames")
        if missing:
            tag = " (or, for the weights, an open_clip tag: --pretrained)" if "--backbone_path" in missing else ""
            raise ValueError(f"{checkpoint} records no configuration (a reference-implementation checkpoint: "
                             f"{describe_state(sd)}); pass {', '.join(missing)}{tag}")
        saved_frames = inferred["num_frames"] or num_frames
        num_classes = inferred["num_classes"]
        kwargs = {k: v for k, v in inferred.items() if k not in ("num_classes", "num_frames", "width")}
        # Its sha256 is all that identifies the backbone it was trained on: the file is needed.
        backbone_path = backbone_path or weights_file(backbone, pretrained)
        sha, seed, sampling, rate = None, 0, "dense", sampling_rate
        spatial_default, temporal_default = default_views(saved_frames)
        spatial, temporal = num_spatial_views or spatial_default, num_temporal_views or temporal_default
    if num_frames is not None and num_frames != saved_frames:
        raise ValueError(f"--num_frames {num_frames} does not fit {checkpoint}: it was trained on {saved_frames} "
                         "frames (its temporal position embedding is tied to that count)")
    # The weights file is read when loading; a reference checkpoint's is hashed in any case: its
    # sha256 is all that identifies the backbone it was trained on.
    if backbone_path is not None and (load_backbone or not model_config) and not os.path.isfile(backbone_path):
        raise FileNotFoundError(f"CLIP weights file not found: {backbone_path}")
    weights = backbone_path if load_backbone else None

    # A checkpoint trained on a random backbone (tests, the demo) is only meaningful with that same
    # backbone: training seeded torch with its seed right before build_model, so do the same
    # (on a forked RNG: loading a model should not reseed the caller's).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the model is built on the CPU
        model = build_model(backbone, num_classes, saved_frames, backbone_path=weights, pretrained=pretrained,
                            load_backbone=weights is not None, **kwargs)
    if not model_config and model.spec.width != inferred["width"]:
        raise WeightsError(f"{checkpoint} is a checkpoint of another model: its decoder has width "
                           f"{inferred['width']} but backbone {model.spec.describe()} has width {model.spec.width}")
    load_state(model, ckpt, checkpoint)
    if model_config and (load_backbone or included):
        check_backbone_identity(ckpt, model, checkpoint)
    elif model_config and model_config.get("backbone_id") not in (None, model.config["backbone_id"]):
        raise WeightsError(f"{checkpoint} was trained with backbone {model_config['backbone_id']}, but backbone "
                           f"{backbone} is {model.config['backbone_id']}")
    if not model_config:
        sha = model.config["backbone_sha256"] if weights else file_sha256(backbone_path)
    model.eval()
    settings = {"checkpoint": checkpoint, "backbone": backbone, "backbone_id": model.config["backbone_id"],
                "backbone_path": backbone_path, "pretrained": pretrained, "backbone_sha256": sha,
                "backbone_included": included, "num_classes": num_classes, "num_frames": saved_frames,
                "sampling_rate": rate, "sampling": sampling, "num_spatial_views": spatial,
                "num_temporal_views": temporal, "input_size": model.spec.image_size[0], "seed": seed,
                "class_names": ckpt.get("class_names") if isinstance(ckpt, Mapping) else None}
    return model, settings, ckpt


def load_predictor(checkpoint: str, *, device: str | None = None, **overrides) -> Predictor:
    """Rebuild and load the model of ``checkpoint`` (:func:`load_model`; ``overrides`` are its
    keyword arguments, which override what the checkpoint records) on ``device``, reading videos
    as it was evaluated. Raises as :func:`load_model` does."""
    model, settings, _ = load_model(checkpoint, **overrides)
    dev = resolve_device(device)
    model.to(dev)
    sampler = ClipSampler(num_frames=settings["num_frames"], sampling_rate=settings["sampling_rate"],
                          size=settings["input_size"], mode=settings["sampling"],
                          num_spatial_views=settings["num_spatial_views"],
                          num_temporal_views=settings["num_temporal_views"])
    return Predictor(model, ViewReader(sampler), dev, resolve_precision(None, dev), settings)


# -- the command-line flags predict and extract share -------------------------------------------

def add_model_arguments(p: argparse.ArgumentParser, checkpoint_flag: bool = True, device: bool = True) -> None:
    """The checkpoint and its overrides (reference flag names), for ``evl.predict`` / ``evl.extract``
    (and, without ``--checkpoint`` and ``--device``, ``evl.export``)."""
    g = p.add_argument_group("model", "this project's checkpoints record all of these; the reference's released "
                                      "checkpoints need --backbone, --backbone_path (or --pretrained) and "
                                      "--sampling_rate")
    if checkpoint_flag:
        g.add_argument("--checkpoint", required=True, metavar="CKPT",
                       help="an EVL checkpoint (.pth: this project's or the reference's) or a folder written by "
                            "python -m evl.export")
    g.add_argument("--backbone", metavar="NAME_OR_JSON",
                   help="open_clip model name, hf-hub:ORG/REPO or model-config JSON (default: the checkpoint's)")
    weights = g.add_mutually_exclusive_group()
    weights.add_argument("--backbone_path", metavar="FILE", help="CLIP weights file (default: the one the checkpoint "
                         "records, or its --pretrained tag's; its sha256 must match the checkpoint's record)")
    weights.add_argument("--pretrained", metavar="TAG", help="CLIP weights by open_clip pretrained tag of --backbone, "
                         "through the Hugging Face cache (default: the checkpoint's tag)")
    g.add_argument("--num_frames", type=int, metavar="T", help="frames per clip (must match the checkpoint)")
    g.add_argument("--sampling_rate", type=int, metavar="S", help="frame stride (default: the checkpoint's)")
    g.add_argument("--num_spatial_views", type=int, choices=[1, 3], help="default: the checkpoint's evaluation views")
    g.add_argument("--num_temporal_views", type=int, metavar="N")
    if device:
        g.add_argument("--device", metavar="DEV", help="cuda, cuda:N or cpu (default: cuda when available)")


def predictor_from_args(ns: argparse.Namespace) -> Predictor:
    return load_predictor(ns.checkpoint, backbone=ns.backbone, backbone_path=ns.backbone_path, pretrained=ns.pretrained,
                          num_frames=ns.num_frames, sampling_rate=ns.sampling_rate,
                          num_spatial_views=ns.num_spatial_views, num_temporal_views=ns.num_temporal_views,
                          device=ns.device)
