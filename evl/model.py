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
from typing import Sequence

import torch
from torch import nn

from .backbone import (AttentionFeatures, BackboneSpec, BlockFeatures, FrozenBackbone, create_vision_tower,
                       resolve_backbone)
from .decoder import EVLDecoder, EVLHead

__all__ = ["EVLModel", "build_model"]


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


def build_model(
    backbone: str,
    num_classes: int,
    num_frames: int,
    *,
    backbone_path: str | None = None,
    decoder_num_layers: int = 4,
    decoder_qkv_dim: int | None = None,
    decoder_num_heads: int | None = None,
    decoder_mlp_factor: float = 4.0,
    enable_temporal_conv: bool = True,
    enable_temporal_pos_embed: bool = True,
    enable_temporal_cross_attention: bool = True,
    cls_dropout: float = 0.5,
    decoder_mlp_dropout: float = 0.5,
) -> EVLModel:
    """Build EVL on an open_clip ViT (a model name or a model-config JSON path).

    ``backbone_path`` loads CLIP weights offline (an OpenAI TorchScript archive, a full CLIP state
    dict or a visual-only one); without it the backbone is random and a warning says so.
    The decoder reads the last ``decoder_num_layers`` blocks; its width is the backbone's,
    ``decoder_qkv_dim`` defaults to it and ``decoder_num_heads`` to ``qkv_dim / 64``.
    """
    from .weights import load_backbone_weights

    if num_classes < 1 or num_frames < 1:
        raise ValueError(f"num_classes and num_frames must be positive, got {num_classes} and {num_frames}")
    spec = resolve_backbone(backbone)
    visual = create_vision_tower(spec)
    weights_sha256 = None
    if backbone_path:
        weights_sha256 = load_backbone_weights(visual, backbone_path, spec)
    else:
        warnings.warn(f"no backbone_path given: the {spec.name} backbone has RANDOM weights "
                      "(fine for tests and speed measurements, useless for real accuracy)", stacklevel=2)
    frozen = FrozenBackbone(visual, spec, decoder_num_layers)
    decoder = EVLDecoder(
        num_frames=num_frames, grid=spec.grid, dim=spec.width, num_layers=decoder_num_layers,
        qkv_dim=decoder_qkv_dim, num_heads=decoder_num_heads, mlp_factor=decoder_mlp_factor,
        mlp_dropout=decoder_mlp_dropout, enable_temporal_conv=enable_temporal_conv,
        enable_temporal_pos_embed=enable_temporal_pos_embed,
        enable_temporal_cross_attention=enable_temporal_cross_attention,
    )
    config = dict(
        backbone=backbone, backbone_id=spec.describe(), num_classes=num_classes, num_frames=num_frames, backbone_path=backbone_path,
        backbone_sha256=weights_sha256, decoder_num_layers=decoder_num_layers,
        decoder_qkv_dim=decoder.decoder_layers[0].attn.q_proj.out_features,
        decoder_num_heads=decoder.decoder_layers[0].attn.num_heads, decoder_mlp_factor=decoder_mlp_factor,
        enable_temporal_conv=enable_temporal_conv, enable_temporal_pos_embed=enable_temporal_pos_embed,
        enable_temporal_cross_attention=enable_temporal_cross_attention, cls_dropout=cls_dropout,
        decoder_mlp_dropout=decoder_mlp_dropout,
    )
    return EVLModel(frozen, decoder, EVLHead(spec.width, num_classes, cls_dropout), config)
