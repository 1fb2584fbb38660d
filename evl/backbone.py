"""The frozen CLIP image tower of EVL (spec §1.1).

Builds an open_clip ``VisionTransformer`` from a model name, an ``hf-hub:`` model or an open_clip
model-config JSON file and runs it block by block, handing over, for each of the last ``M``
blocks, the block's output tokens and its attention queries and keys (after the input
projection, before the 1/sqrt(d) scaling). The per-block forward uses open_clip's own modules
and weights, so it is numerically the same as open_clip's forward; CLIP's ``ln_post`` and
projection are never used. The tower is frozen: it runs under ``no_grad`` in its own precision
(bf16/fp16 on GPU, fp32 on CPU), whatever autocast the caller has on, and hands over fp32
tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionFeatures", "BackboneSpec", "BlockFeatures", "FrozenBackbone", "resolve_backbone",
           "create_vision_tower"]


class BlockFeatures(NamedTuple):
    """What one backbone block hands to the decoder; all ``[B, T, ...]`` and fp32."""

    out: torch.Tensor  # [B, T, L, C] block output tokens, CLS first
    q: torch.Tensor  # [B, T, L, heads, C/heads] attention queries, before scaling
    k: torch.Tensor  # [B, T, L, heads, C/heads] attention keys


class AttentionFeatures(NamedTuple):
    """What the decoder actually consumes of one block, as the feature cache stores it.

    ``q`` and ``k`` only ever enter the decoder through the head-averaged attention between
    adjacent frames, which is smaller (``2(T-1)hw^2`` vs ``2TLC`` numbers) and can be computed
    once; see ``evl.decoder.attention_features``.
    """

    out: torch.Tensor  # [B, T, L, C] block output tokens, CLS first
    attn_prev: torch.Tensor  # [B, T-1, hw, hw] frame t+1's patch queries over frame t's keys
    attn_next: torch.Tensor  # [B, T-1, hw, hw] frame t's patch queries over frame t+1's keys


@dataclass(frozen=True)
class BackboneSpec:
    """The identity and geometry of a CLIP ViT image tower."""

    name: str
    width: int
    layers: int
    heads: int
    patch_size: tuple[int, int]
    image_size: tuple[int, int]
    mlp_ratio: float
    quick_gelu: bool
    vision_cfg: dict
    embed_dim: int  # CLIP's joint embedding size: only sizes the (unused) final projection

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def num_tokens(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    def describe(self) -> str:
        return (f"{self.name} (width {self.width}, {self.layers} blocks, {self.heads} heads, "
                f"patch {self.patch_size[0]}, {self.image_size[0]} px)")


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def resolve_backbone(backbone: str, pretrained: str | None = None) -> BackboneSpec:
    """Resolve an open_clip model name (``ViT-B-16``), an ``hf-hub:ORG/REPO`` model (the config in
    its repository, fetched as open_clip fetches it: :mod:`evl.pretrained`) or a model-config JSON
    path; ``pretrained`` is an open_clip tag of the named model.

    The activation is the one the weights were trained with where that is known: a tag's
    ``quick_gelu``, an ``hf-hub:`` config's (GELU when it says nothing, as open_clip builds it).
    Otherwise QuickGELU, which the EVL paper's OpenAI CLIP uses, unless the config says
    ``"quick_gelu": false`` explicitly (LAION-style weights trained with GELU).
    """
    from .pretrained import hub_config, is_hf_hub, tag_config, warn_normalisation

    quick_gelu_default = True
    if is_hf_hub(backbone):
        hub = hub_config(backbone)
        cfg = hub["model_cfg"]
        quick_gelu_default = False
        pre = hub.get("preprocess_cfg") or {}
        warn_normalisation(backbone, pre.get("mean"), pre.get("std"))
    elif backbone.endswith(".json") or os.path.isfile(backbone):
        if not os.path.isfile(backbone):
            raise FileNotFoundError(f"backbone config file not found: {backbone}")
        with open(backbone, encoding="utf-8") as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{backbone}: not a valid open_clip model-config JSON: {e}") from None
        cfg = cfg.get("model_cfg", cfg)
    else:
        import open_clip  # only here: a config file is read without it (4 s of a process's start)

        cfg = open_clip.get_model_config(backbone)
        if cfg is None:
            vits = [m for m in open_clip.list_models() if m.startswith("ViT-")]
            raise ValueError(f"unknown open_clip model {backbone!r}; known ViTs: {', '.join(vits[:30])}, ... "
                             "or pass the path of an open_clip model-config JSON file")
    vision_cfg = dict(cfg.get("vision_cfg") or {})
    if "layers" not in vision_cfg or isinstance(vision_cfg.get("layers"), (list, tuple)) \
            or vision_cfg.get("timm_model_name"):
        raise ValueError(f"backbone {backbone!r} is not a CLIP ViT (EVL needs open_clip's VisionTransformer)")
    for key, unsupported in (("attentional_pool", True), ("qk_norm", True), ("scaled_cosine_attn", True),
                             ("scale_heads", True), ("scale_attn", True), ("scale_attn_inner", True)):
        if vision_cfg.get(key) == unsupported:
            raise ValueError(f"backbone {backbone!r}: vision_cfg option {key}={unsupported} is not supported")
    if vision_cfg.get("block_type") not in (None, "default"):
        raise ValueError(f"backbone {backbone!r}: block_type {vision_cfg['block_type']!r} is not supported")
    width = int(vision_cfg.get("width", 768))
    head_width = int(vision_cfg.get("head_width", 64))
    quick_gelu = bool(cfg.get("quick_gelu", quick_gelu_default))
    if pretrained:
        tag = tag_config(backbone, pretrained)
        quick_gelu = bool(tag.get("quick_gelu", False))
        warn_normalisation(f"{backbone} --pretrained {pretrained}", tag.get("mean"), tag.get("std"))
    name = os.path.splitext(os.path.basename(backbone))[0] if backbone.endswith(".json") else backbone
    return BackboneSpec(
        name=name, width=width, layers=int(vision_cfg["layers"]), heads=width // head_width,
        patch_size=_pair(vision_cfg.get("patch_size", 16)), image_size=_pair(vision_cfg.get("image_size", 224)),
        mlp_ratio=float(vision_cfg.get("mlp_ratio", 4.0)), quick_gelu=quick_gelu, vision_cfg=vision_cfg,
        embed_dim=int(cfg.get("embed_dim", width)),
    )


def create_vision_tower(spec: BackboneSpec) -> nn.Module:
    """A randomly initialised open_clip ``VisionTransformer`` for ``spec`` (no text tower)."""
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(embed_dim=spec.embed_dim, vision_cfg=spec.vision_cfg, quick_gelu=spec.quick_gelu)


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it (no overflow risk), fp16 on older GPUs, fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class FrozenBackbone(nn.Module):
    """open_clip ViT run block by block; returns :class:`BlockFeatures` of the last blocks."""

    def __init__(self, visual: nn.Module, spec: BackboneSpec, num_out_layers: int):
        super().__init__()
        if not 1 <= num_out_layers <= spec.layers:
            raise ValueError(f"cannot hand over {num_out_layers} blocks of a {spec.layers}-block backbone")
        for i, blk in enumerate(visual.transformer.resblocks):
            if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention) or hasattr(blk, "ln_1_kv"):
                raise ValueError(f"backbone block {i} is not a plain open_clip ResidualAttentionBlock")
        self.visual = visual
        self.spec = spec
        self.num_out_layers = num_out_layers
        # None: bf16/fp16 on GPU, fp32 on CPU (default_compute_dtype); set to force one.
        self.compute_dtype: torch.dtype | None = None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenBackbone":
        # Frozen means frozen: no dropout, and no state that training mode could change.
        return super().train(False)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(x).flatten(2).transpose(1, 2)  # [N, grid*grid, C]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def _block(self, blk: nn.Module, x: torch.Tensor, want_qk: bool):
        attn: nn.MultiheadAttention = blk.attn
        n, length, c = x.shape
        qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, attn.num_heads, c // attn.num_heads).unbind(2)  # [N, L, heads, d]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + blk.ls_1(attn.out_proj(o.transpose(1, 2).reshape(n, length, c)))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        return x, (q, k) if want_qk else None

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> list[BlockFeatures]:
        """``frames [B, 3, T, H, W]`` normalised -> the last ``num_out_layers`` blocks' features."""
        b, _, t, h, w = frames.shape
        if (h, w) != self.spec.image_size:
            raise ValueError(f"backbone {self.spec.name} takes {self.spec.image_size[0]}x{self.spec.image_size[1]} "
                             f"frames, got {h}x{w}")
        dtype = self.compute_dtype or default_compute_dtype(frames.device)
        if self.visual.conv1.weight.dtype != dtype:
            self.visual.to(dtype)  # once: frozen weights can live in the compute precision
        x = frames.transpose(1, 2).reshape(b * t, 3, h, w).to(dtype)
        first_out = self.spec.layers - self.num_out_layers
        feats = []
        # Autocast off: the tower runs in its own precision, not whatever the decoder uses.
        with torch.autocast(frames.device.type, enabled=False):
            x = self._embed(x)
            for i, blk in enumerate(self.visual.transformer.resblocks):
                x, qk = self._block(blk, x, want_qk=i >= first_out)
                if qk is not None:
                    feats.append(BlockFeatures(*(y.float().unflatten(0, (b, t)) for y in (x, *qk))))
        return feats
