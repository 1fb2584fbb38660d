"""The configurations: the model (:class:`EVLConfig`), how its clips are read
(:class:`DataConfig`) and a training run (:class:`TrainConfig`, both and the run's own settings),
with the flags that make them.

Every flag of the reference implementation's ``main.py`` is accepted here with its meaning, so
that its scripts run with ``-m evl.train`` in place of ``main.py``: ``--batch_size`` is the global
batch, ``--backbone "ViT-B/16-lnpre"`` names open_clip's ``ViT-B-16``, ``--mean``/``--std`` must be
CLIP's (the frozen backbone's), and so on (:func:`reference_flags`). The resolved configuration
is printed once, written to the run directory and stored in every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class EVLConfig:
    """What an EVL model is: everything :func:`evl.build_model` needs to build it again.

    Checkpoints store it (``model_config``, with the backbone's description and the sha256 of its
    weights file: a local ``backbone_path``, or the file open_clip resolves for the ``pretrained``
    tag or an ``hf-hub:`` backbone); the training flags of the same names make it. The decoder's
    width is the backbone's; ``decoder_qkv_dim`` defaults to it and ``decoder_num_heads`` to
    ``qkv_dim / 64``.
    """

    backbone: str = "ViT-B-16"
    num_classes: int = 400
    num_frames: int = 8
    backbone_path: str | None = None
    pretrained: str | None = None  # an open_clip pretrained tag of ``backbone`` (its weights, by name)
    decoder_num_layers: int = 4
    decoder_qkv_dim: int | None = None
    decoder_num_heads: int | None = None
    decoder_mlp_factor: float = 4.0
    enable_temporal_conv: bool = True
    enable_temporal_pos_embed: bool = True
    enable_temporal_cross_attention: bool = True
    cls_dropout: float = 0.5
    decoder_mlp_dropout: float = 0.5

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides):
        """The fields ``values`` holds (a checkpoint's ``model_config``, a run's flags), overridden."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in values.items() if k in names}, **overrides})


@dataclass(frozen=True)
class DataConfig:
    """How clips are read and sampled: the data flags every job that reads video shares (training,
    evaluation, the feature cache build). :meth:`pipeline_config` turns it into what a pipeline
    of :mod:`pipelines` takes, for one list and split."""

    pipeline: str = "pyav"
    data_root: str | None = None
    sampling_rate: int = 16
    sampling: str = "dense"
    num_spatial_views: int = 1
    num_temporal_views: int = 3
    auto_augment: str | None = "rand-m7-n4-mstd0.5-inc1"
    mirror: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)
    num_workers: int = 4
    max_bad_fraction: float = 0.01
    dali_decoder: str = "graph"

    @classmethod
    def add_arguments(cls, group, pipelines: Sequence[str] = ("pyav", "dali", "dummy", "cache")) -> None:
        d = cls()
        group.add_argument("--pipeline", default=d.pipeline, choices=list(pipelines))
        group.add_argument("--data_root", help="directory the list's relative video paths are under")
        group.add_argument("--sampling_rate", type=int, default=d.sampling_rate)
        group.add_argument("--sampling", default=d.sampling, choices=["dense", "segment"],
                           help="segment = TSN sampling, one frame per segment (Something-Something)")
        group.add_argument("--tsn_sampling", dest="sampling", action="store_const", const="segment",
                           help="the reference's name of --sampling segment")
        group.add_argument("--num_spatial_views", type=int, default=d.num_spatial_views, choices=[1, 3])
        group.add_argument("--num_temporal_views", type=int, default=d.num_temporal_views)
        group.add_argument("--auto_augment", type=auto_augment_arg, default=d.auto_augment,
                           help="timm RandAugment policy, the same ops for every frame of a clip; 'none' to disable")
        group.add_argument("--mirror", action="store_true", help="random horizontal flip (off in the reference recipe)")
        group.add_argument("--no_mirror", dest="mirror", action="store_false",
                           help="no flip (the default; the reference's flag, whose flip its loader never applies)")
        group.add_argument("--crop_scale", type=float, nargs=2, default=d.crop_scale, metavar=("MIN", "MAX"))
        group.add_argument("--num_workers", type=int, default=d.num_workers)
        group.add_argument("--max_bad_fraction", type=float, default=d.max_bad_fraction)
        group.add_argument("--dali_decoder", default=d.dali_decoder, choices=["graph", "reader"],
                           help="--pipeline dali: decode each batch's frame lists with fn.decoders.video (graph), "
                           "or read training clips with fn.experimental.readers.video, which keeps its decoders "
                           "(reader; the same clips)")

    @staticmethod
    def from_args(ns) -> "DataConfig":
        """The data settings of parsed flags (or of any object that has them, a ``TrainConfig``)."""
        values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(DataConfig)}
        return DataConfig(**dict(values, crop_scale=tuple(values["crop_scale"])))

    def pipeline_config(self, *, list_path: str | None, train: bool, num_frames: int, num_classes: int | None,
                        input_size: int, batch_size: int, seed: int, device: str = "cpu", rank: int = 0,
                        world_size: int = 1, keys=None, extra: dict | None = None):
        """The pipelines' view of these settings for one split: RandAugment and the flip are
        training's only."""
        from pipelines import PipelineConfig

        return PipelineConfig(
            list_path=list_path, num_classes=num_classes, num_frames=num_frames, sampling_rate=self.sampling_rate,
            sampling=self.sampling, input_size=input_size, batch_size=batch_size, train=train,
            data_root=self.data_root, num_workers=self.num_workers, num_spatial_views=self.num_spatial_views,
            num_temporal_views=self.num_temporal_views, auto_augment=self.auto_augment if train else None,
            hflip=0.5 if self.mirror and train else 0.0, crop_scale=tuple(self.crop_scale), seed=seed,
            device=device, rank=rank, world_size=world_size, max_bad_fraction=self.max_bad_fraction, keys=keys,
            extra={"dali_decoder": self.dali_decoder, **(extra or {})})


@dataclass(frozen=True)
class TrainConfig(DataConfig, EVLConfig):
    """A training (or ``--eval_only``) run: the model, the data, and the run's own settings."""

    train_list_path: str | None = None
    val_list_path: str | None = None
    train_data_root: str | None = None  # override --data_root for one split, as in the reference
    val_data_root: str | None = None
    spatial_size: int | None = None  # the reference's flag; must be the backbone's input size
    pretrain: str | None = None  # initial weights (not a resume): the reference's --pretrain
    feature_cache: str | None = None
    cache_in_memory: bool = False
    # optimisation (evl-spec §3)
    batch_size: int = 32  # global, over all processes (the reference's meaning)
    batch_split: int = 1
    lr: float = 4e-4
    weight_decay: float = 0.05
    num_steps: int = 50_000
    warmup_steps: int = 0
    mixed_precision: str | None = None  # bf16 on GPU, fp32 on CPU when unset
    seed: int = 0
    # bookkeeping
    output_dir: str | None = None
    eval_freq: int = 5000
    save_freq: int = 5000
    print_freq: int = 10
    keep_last: int = 2
    auto_resume: bool = False
    overwrite_output_dir: bool = False
    resume_path: str | None = None
    eval_only: bool = False
    predictions_path: str | None = None
    report_to: tuple[str, ...] = ()  # "tensorboard", "wandb" (evl.reporting), besides metrics.jsonl
    device: str | None = None
    debug: bool = False
    extra: dict = field(default_factory=dict)

    def model_config(self) -> EVLConfig:
        """The model these flags describe."""
        return EVLConfig.from_dict(self.to_dict())

    def data_config(self, train: bool | None = None) -> DataConfig:
        """The data settings; for one split (``train``), with that split's data root."""
        data = DataConfig.from_args(self)
        root = None if train is None else (self.train_data_root if train else self.val_data_root)
        return dataclasses.replace(data, data_root=root) if root else data

    def batch_per_process(self, world_size: int) -> int:
        """This process's share of the global ``batch_size``; raises ``ValueError`` when it does
        not divide evenly, or not into ``batch_split`` chunks."""
        if self.batch_size % world_size:
            raise ValueError(f"--batch_size {self.batch_size} (the global batch) does not divide among "
                             f"{world_size} processes")
        share = self.batch_size // world_size
        if share % self.batch_split:
            raise ValueError(f"--batch_size {self.batch_size} over {world_size} process(es) is {share} per process, "
                             f"which --batch_split {self.batch_split} does not divide")
        return share

    def eval_batch_per_process(self, world_size: int) -> int:
        """Videos per evaluation batch in each process: a training chunk's size (``batch_size /
        world_size / batch_split``), which is what fits in memory, and at least one."""
        return max(1, self.batch_size // world_size // self.batch_split)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def auto_augment_arg(text: str) -> str | None:
    """``--auto_augment``: a timm RandAugment string, checked here, or None for ``none``."""
    from pipelines.randaugment import PolicyError, parse_policy

    if text in ("", "none", "None"):
        return None
    try:
        parse_policy(text)
    except PolicyError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def report_to_arg(text: str) -> tuple[str, ...]:
    """``--report_to``: comma-separated reporter names (:mod:`evl.reporting`), checked here."""
    from .reporting import parse_report_to

    try:
        return parse_report_to(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# The reference's ViT presets (``vit_presets``: ln_pre, as in CLIP) and OpenAI CLIP's model names,
# in open_clip's names: ViT-B/16-lnpre, ViT-B/16 -> ViT-B-16; ViT-L/14@336px -> ViT-L-14-336.
_REFERENCE_BACKBONE = re.compile(r"^(ViT-[A-Za-z]+)/(\d+)(@(\d+)px)?(-lnpre)?$")


def backbone_arg(text: str) -> str:
    """``--backbone``: an open_clip name or config path as it is; a reference or OpenAI name in
    open_clip's spelling."""
    m = _REFERENCE_BACKBONE.match(text)
    if not m:
        return text
    return f"{m.group(1)}-{m.group(2)}" + (f"-{m.group(4)}" if m.group(4) else "")


def add_model_arguments(group, names: Sequence[str] | None = None) -> None:
    """The model's flags (reference names), all of them or ``names``, with :class:`EVLConfig`'s defaults."""
    d = EVLConfig()
    flags = {
        "backbone": (("--backbone",), dict(default=d.backbone, type=backbone_arg,
                                           help="open_clip model name (ViT-B-16; the reference's and OpenAI's "
                                                "ViT-B/16-lnpre, ViT-L/14@336px too), hf-hub:ORG/REPO (config and "
                                                "weights from that repository) or model-config JSON path")),
        "backbone_path": (("--backbone_path",), dict(help="local CLIP weights (OpenAI .pt archive or state dict)")),
        "pretrained": (("--pretrained",), dict(metavar="TAG", help="CLIP weights by open_clip pretrained tag of "
                                               "--backbone (openai, laion2b_s34b_b88k, ...), through the Hugging Face "
                                               "cache (HF_HOME; HF_HUB_OFFLINE=1 reads only the cache)")),
        "num_classes": (("--num_classes",), dict(type=int, default=d.num_classes)),
        "num_frames": (("--num_frames",), dict(type=int, default=d.num_frames)),
        "decoder_num_layers": (("--decoder_num_layers",), dict(type=int, default=d.decoder_num_layers)),
        "decoder_qkv_dim": (("--decoder_qkv_dim",), dict(type=int)),
        "decoder_num_heads": (("--decoder_num_heads",), dict(type=int)),
        "decoder_mlp_factor": (("--decoder_mlp_factor",), dict(type=float, default=d.decoder_mlp_factor)),
        "cls_dropout": (("--cls_dropout",), dict(type=float, default=d.cls_dropout)),
        "decoder_mlp_dropout": (("--decoder_mlp_dropout",), dict(type=float, default=d.decoder_mlp_dropout)),
        "enable_temporal_conv": (("--no_temporal_conv",), dict(dest="enable_temporal_conv", action="store_false")),
        "enable_temporal_pos_embed": (("--no_temporal_pos_embed",),
                                      dict(dest="enable_temporal_pos_embed", action="store_false")),
        "enable_temporal_cross_attention": (("--no_temporal_cross_attention",),
                                            dict(dest="enable_temporal_cross_attention", action="store_false")),
    }
    weights = None  # --backbone_path and --pretrained name the weights two ways: one at a time
    for name in names or flags:
        args, kwargs = flags[name]
        if name in ("backbone_path", "pretrained"):
            weights = weights or group.add_mutually_exclusive_group()
            weights.add_argument(*args, **kwargs)
        else:
            group.add_argument(*args, **kwargs)


def build_parser(prog: str = "python -m evl.train") -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog=prog, description="Train or evaluate EVL on a frozen CLIP backbone. "
                                "With no arguments: the built-in CPU demo.")
    add_model_arguments(p.add_argument_group("model"))
    g = p.add_argument_group("data")
    DataConfig.add_arguments(g)
    g.add_argument("--dummy_dataset", action="store_true", help="alias of --pipeline dummy")
    g.add_argument("--train_list_path")
    g.add_argument("--val_list_path")
    g.add_argument("--feature_cache", help="cache root written by `python -m evl.cache build` (ROOT/train, ROOT/val)")
    g.add_argument("--cache_in_memory", action="store_true",
                   help="load the feature cache into RAM instead of reading it through the page cache")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=int, default=d.batch_size,
                   help="the global batch, over all processes (each takes batch_size / processes)")
    o.add_argument("--batch_split", type=int, default=d.batch_split, help="gradient accumulation steps per batch")
    o.add_argument("--lr", type=float, default=d.lr)
    o.add_argument("--weight_decay", type=float, default=d.weight_decay)
    o.add_argument("--num_steps", type=int, default=d.num_steps)
    o.add_argument("--warmup_steps", type=int, default=d.warmup_steps)
    o.add_argument("--mixed_precision", choices=["bf16", "fp16", "fp32"])
    o.add_argument("--seed", type=int, default=d.seed)
    r = p.add_argument_group("run")
    r.add_argument("--output_dir", "--checkpoint_dir", dest="output_dir")
    r.add_argument("--eval_freq", type=int, default=d.eval_freq)
    r.add_argument("--save_freq", type=int, default=d.save_freq)
    r.add_argument("--print_freq", type=int, default=d.print_freq)
    r.add_argument("--keep_last", type=int, default=d.keep_last, help="checkpoints kept besides the best")
    r.add_argument("--auto_resume", action="store_true", help="continue the run in --output_dir from its newest "
                   "checkpoint (a new run there is refused: see --overwrite_output_dir)")
    r.add_argument("--overwrite_output_dir", action="store_true",
                   help="delete the earlier run's checkpoints, config and metrics in --output_dir and start over")
    r.add_argument("--resume_path")
    r.add_argument("--eval_only", action="store_true")
    r.add_argument("--predictions_path", help="where --eval_only writes per-video predictions (JSON lines)")
    r.add_argument("--report_to", type=report_to_arg, default=d.report_to, metavar="NAMES",
                   help="also log training progress to tensorboard (<output_dir>/tensorboard), wandb (configured "
                   "by its WANDB_* variables), or both, comma-separated; default none")
    r.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    r.add_argument("--debug", action="store_true", help="show the traceback of errors in the input too "
                   "(or set EVL_DEBUG=1)")
    reference_flags(p)
    return p


def reference_flags(p: argparse.ArgumentParser) -> None:
    """The reference's flags that have no setting of their own here: accepted with their meaning
    where it is ours, refused with a message where it is not (:func:`parse_config`)."""
    g = p.add_argument_group("the reference implementation's flags")
    g.add_argument("--train_data_root", help="--data_root for the training list only")
    g.add_argument("--val_data_root", help="--data_root for the validation list only")
    g.add_argument("--pretrain", metavar="CKPT", help="initial decoder and head weights (this project's or the "
                   "reference's checkpoint; keys of other shapes are left as initialised); a resume overrides it")
    g.add_argument("--spatial_size", type=int, help="frame size; must be the backbone's input size")
    g.add_argument("--backbone_type", default="clip", choices=["clip"], help="how --backbone_path is stored: "
                   "CLIP's (the only kind the reference ships)")
    g.add_argument("--mean", type=float, nargs="+", help="must be CLIP's (the default): the backbone is frozen")
    g.add_argument("--std", type=float, nargs="+", help="must be CLIP's (the default): the backbone is frozen")
    g.add_argument("--interpolation", default="bicubic", choices=["bicubic"],
                   help="RandAugment's resampling: bicubic, the reference's (see docs/augmentation.md)")
    g.add_argument("--disable_fp16", dest="mixed_precision", action="store_const", const="fp32",
                   help="--mixed_precision fp32")
    g.add_argument("--finetune_backbone", action="store_true", help=argparse.SUPPRESS)


def parse_config(argv: list[str] | None, prog: str = "python -m evl.train") -> TrainConfig:
    p = build_parser(prog)
    ns = p.parse_args(argv)
    if ns.dummy_dataset:
        ns.pipeline = "dummy"
    if ns.finetune_backbone:
        p.error("--finetune_backbone: EVL trains with the backbone frozen, which is all this project does")
    from pipelines.base import CLIP_MEAN, CLIP_STD

    for flag, clip in (("mean", CLIP_MEAN), ("std", CLIP_STD)):
        given = getattr(ns, flag)
        if given is not None and (len(given) not in (1, 3) or any(
                abs(a - b) > 1e-6 for a, b in zip(given * 3 if len(given) == 1 else given, clip))):
            p.error(f"--{flag} {' '.join(map(str, given))}: the frozen CLIP backbone takes CLIP's --{flag} "
                    f"{' '.join(map(str, clip))}, which is what every pipeline applies; other values are not supported")
    for name in ("dummy_dataset", "finetune_backbone", "backbone_type", "mean", "std", "interpolation"):
        delattr(ns, name)
    ns.crop_scale = tuple(ns.crop_scale)
    return TrainConfig(**vars(ns))
