"""The EVL video classifier: frozen CLIP tower + trainable decoder and head (spec §1).

The frozen tower is deliberately not a registered submodule (as in the reference
implementation): it never appears in ``parameters()``, ``state_dict()``, an optimizer or DDP's
gradient buckets, and ``model.train()`` cannot switch it out of eval mode. ``.to()``/``.cuda()``
still move it (see ``_apply``). The split ``forward_features`` / ``forward_head`` is what the
feature cache uses: cached features (``AttentionFeatures``, see ``evl.decoder.attention_features``)
go straight into ``forward_head``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, replace
from typing import Sequence

import torch
from torch import nn

from .backbone import (AttentionFeatures, BackboneSpec, BlockFeatures, FrozenBackbone, create_vision_tower,
                       resolve_backbone)
from .config import EVLConfig
from .decoder import EVLDecoder, EVLHead

__all__ = ["EVLConfig", "EVLModel", "build_model"]


class EVLModel(nn.Module):
    def __init__(self, backbone: FrozenBackbone, decoder: EVLDecoder, proj: nn.Sequential, config: dict):
        super().__init__()
        self._frozen = (backbone,)  # a tuple hides it from nn.Module registration
        self.decoder = decoder
        self.proj = proj
        self.config = dict(config)  # build_model's arguments, recorded in checkpoints

    @property
    def backbone(self) -> FrozenBackbone:
        return self._frozen[0]

    @property
    def spec(self) -> BackboneSpec:
        return self.backbone.spec

    @property
    def num_frames(self) -> int:
        return self.decoder.num_frames

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.backbone._apply(fn, recurse)
        return self

    def forward_features(self, clips: torch.Tensor) -> list[BlockFeatures]:
        """Normalised clips ``[B, 3, T, H, W]`` -> frozen per-block features (no gradients)."""
        if clips.dim() != 5 or clips.shape[1] != 3:
            raise ValueError(f"expected clips of shape [B, 3, T, H, W], got {list(clips.shape)}")
        return self.backbone(clips)

    def forward_head(self, features: Sequence[BlockFeatures | AttentionFeatures], return_embedding: bool = False):
        """Backbone features -> logits ``[B, num_classes]`` (and the final query ``[B, C]``)."""
        emb = self.decoder(features)
        logits = self.proj(emb)
        return (logits, emb) if return_embedding else logits

    def forward(self, clips: torch.Tensor | None = None, *,
                features: Sequence[BlockFeatures | AttentionFeatures] | None = None) -> torch.Tensor:
        """Clips -> logits; or cached backbone ``features`` -> logits (through DDP too)."""
        return self.forward_head(self.forward_features(clips) if features is None else features)


def build_model(backbone: str | EVLConfig, num_classes: int | None = None, num_frames: int | None = None, *,
                load_backbone: bool = True, **kwargs) -> EVLModel:
    """Build EVL on an open_clip ViT: ``build_model(EVLConfig(...))``, or with the config's fields
    as arguments, ``build_model("ViT-B-16", 400, 8, pretrained="openai")``.

    ``backbone`` is an open_clip model name, an ``hf-hub:ORG/REPO`` model or a model-config JSON
    path. The CLIP weights: the local file ``backbone_path`` (an OpenAI TorchScript archive, a full
    CLIP state dict or a visual-only one), else those open_clip resolves for the ``pretrained`` tag
    or the ``hf-hub:`` repository, through the Hugging Face cache (:mod:`evl.pretrained`). With
    both, the file is taken to hold the tag's weights (the tag still sets the activation). With
    neither, the backbone is random and a warning says so. ``load_backbone=False`` reads no weights
    at all (a caller that loads them itself) and records no sha256.
    """
    from .pretrained import weights_file
    from .weights import load_backbone_weights

    if isinstance(backbone, EVLConfig):
        cfg = backbone
    else:
        given = {k: v for k, v in (("num_classes", num_classes), ("num_frames", num_frames)) if v is not None}
        cfg = EVLConfig(backbone=backbone, **given, **kwargs)
    if cfg.num_classes < 1 or cfg.num_frames < 1:
        raise ValueError(f"num_classes and num_frames must be positive, got {cfg.num_classes} and {cfg.num_frames}")
    spec = resolve_backbone(cfg.backbone, cfg.pretrained)
    weights = None
    if load_backbone:  # found (or downloaded) before the tower is built: a missing file fails fast
        weights = cfg.backbone_path or weights_file(cfg.backbone, cfg.pretrained)
        if not weights:
            warnings.warn(f"no backbone_path given and no pretrained tag: the {spec.name} backbone has RANDOM "
                          "weights (fine for tests and speed measurements, useless for real accuracy)", stacklevel=2)
    visual = create_vision_tower(spec)
    weights_sha256 = load_backbone_weights(visual, weights, spec) if weights else None
    frozen = FrozenBackbone(visual, spec, cfg.decoder_num_layers)
    decoder = EVLDecoder(
        num_frames=cfg.num_frames, grid=spec.grid, dim=spec.width, num_layers=cfg.decoder_num_layers,
        qkv_dim=cfg.decoder_qkv_dim, num_heads=cfg.decoder_num_heads, mlp_factor=cfg.decoder_mlp_factor,
        mlp_dropout=cfg.decoder_mlp_dropout, enable_temporal_conv=cfg.enable_temporal_conv,
        enable_temporal_pos_embed=cfg.enable_temporal_pos_embed,
        enable_temporal_cross_attention=cfg.enable_temporal_cross_attention,
    )
    # The identity a checkpoint records: the config with the decoder's resolved sizes, the
    # backbone's description and its weights' sha256.
    resolved = replace(cfg, decoder_qkv_dim=decoder.decoder_layers[0].attn.q_proj.out_features,
                       decoder_num_heads=decoder.decoder_layers[0].attn.num_heads)
    config = dict(asdict(resolved), backbone_id=spec.describe(), backbone_sha256=weights_sha256)
    return EVLModel(frozen, decoder, EVLHead(spec.width, cfg.num_classes, cfg.cls_dropout), config)
