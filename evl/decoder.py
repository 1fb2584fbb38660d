"""The trainable part of EVL: the decoder with its three temporal modules, and the head (spec §1.2-1.3).

Module and parameter names follow the reference implementation (``decoder.decoder_layers.{i}``,
``decoder.temporal_conv.{i}``, ``decoder.temporal_pos_embed.{i}``, ``decoder.cross_attention.{i}``,
``proj.{0,2}``) so that its released checkpoints load by name; see ``evl.weights``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import AttentionFeatures, BlockFeatures

__all__ = ["QuickGELU", "DecoderLayer", "TemporalCrossAttention", "EVLDecoder", "EVLHead", "attention_features"]


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _PooledAttention(torch.autograd.Function):
    """``softmax(q_y @ y^T + shift) @ y`` for a few queries ``q_y [B, M, C]`` over many tokens
    ``y [B, N, C]``, with a backward written for that shape.

    Autograd's own backward builds the token gradient from two outer products (``K = 1``
    matrix products, slow on the CPU) and a full-size add; here it is one product,
    ``[a; g_logits]^T @ [g_pooled; q_y]`` (``K = 2M``). Under autocast the products run in
    the autocast dtype and the softmax and its backward in float32, as autocast would.
    """

    @staticmethod
    def forward(ctx, q_y: torch.Tensor, shift: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        attn = torch.baddbmm(shift, q_y, y.transpose(1, 2)).float().softmax(dim=-1)  # [B, M, N]
        mm_dtype = torch.promote_types(q_y.dtype, y.dtype)
        if torch.is_autocast_enabled(y.device.type):
            mm_dtype = torch.get_autocast_dtype(y.device.type)
        ctx.save_for_backward(attn, q_y, y)
        ctx.mm_dtype = mm_dtype
        return torch.bmm(attn.to(mm_dtype), y.to(mm_dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        attn, q_y, y = ctx.saved_tensors
        dt = ctx.mm_dtype
        g, y_ = g.to(dt), y.to(dt)
        g_attn = torch.bmm(g, y_.transpose(1, 2)).float()  # [B, M, N]
        g_logits = attn * (g_attn - (g_attn * attn).sum(-1, keepdim=True))  # softmax backward
        g_q = g_shift = g_y = None
        if ctx.needs_input_grad[0]:
            g_q = torch.bmm(g_logits.to(dt), y_).to(q_y.dtype)
        if ctx.needs_input_grad[1]:
            g_shift = g_logits.sum(-1, keepdim=True)
        if ctx.needs_input_grad[2]:
            left = torch.cat([attn, g_logits], 1).to(dt)  # [B, 2M, N]
            g_y = torch.bmm(left.transpose(1, 2), torch.cat([g, q_y.to(dt)], 1)).to(y.dtype)
        return g_q, g_shift, g_y


class CrossAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (xavier weights, zero bias).

    The decoder's queries are few (one token) and its keys many (``T*L`` frame tokens), so the
    key and value projections are moved to the query side instead of being applied to every
    token. Per head ``h``, with ``k_j = W_k y_j + b_k`` and ``v_j = W_v y_j + b_v``:

    - ``q_h . k_j = (W_kh^T q_h) . y_j + q_h . b_kh``, whose second term is the same for every
      ``j`` (softmax ignores it; it is kept so that ``b_k`` still gets its zero gradient);
    - ``sum_j a_j v_j = W_vh (sum_j a_j y_j) + b_vh``, because the weights ``a_j`` sum to one.

    That is the same attention, computed with ``2 * heads * Lq`` multiply-adds per frame-token
    channel instead of ``2 * qkv_dim``: 64x fewer for the decoder's query on ViT-B/16.
    """

    def __init__(self, dim: int, qkv_dim: int, num_heads: int):
        super().__init__()
        if qkv_dim % num_heads:
            raise ValueError(f"decoder qkv dim {qkv_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, qkv_dim)
        self.k_proj = nn.Linear(dim, qkv_dim)
        self.v_proj = nn.Linear(dim, qkv_dim)
        self.out_proj = nn.Linear(qkv_dim, dim)
        for m in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Queries ``x [B, Lq, C]`` attend to tokens ``y [B, N, C]`` -> ``[B, Lq, C]``."""
        h, (b, lq, _), c = self.num_heads, x.shape, y.shape[-1]
        d = self.q_proj.out_features // h
        # Head-major products, batched over heads with the B*Lq queries as rows: a weight
        # broadcast over the batch (``[B, h, Lq, d] @ [h, d, C]``) makes autograd build one
        # outer product per clip for its gradient and then sum them (about 1 ms of a 16 ms
        # demo step on the CPU).
        q = (self.q_proj(x) * d ** -0.5).view(b * lq, h, d).transpose(0, 1)  # [h, B*Lq, d]
        q_y = torch.bmm(q, self.k_proj.weight.view(h, d, c))  # each head's query in token space
        # The key bias adds the same logit to every token (softmax drops it); kept for exactness.
        shift = torch.bmm(q, self.k_proj.bias.view(h, d, 1))  # [h, B*Lq, 1]

        def per_clip(t: torch.Tensor) -> torch.Tensor:  # [h, B*Lq, n] -> [B, h*Lq, n]
            return t.view(h, b, lq, -1).transpose(0, 1).reshape(b, h * lq, -1)

        pooled = _PooledAttention.apply(per_clip(q_y), per_clip(shift), y)  # sum_j a_j y_j: [B, h*Lq, C]
        pooled = pooled.view(b, h, lq, c).transpose(0, 1).reshape(h, b * lq, c)
        o = torch.baddbmm(self.v_proj.bias.view(h, 1, d), pooled, self.v_proj.weight.view(h, d, c).transpose(1, 2))
        return self.out_proj(o.view(h, b, lq, d).permute(1, 2, 0, 3).reshape(b, lq, h * d))


class DecoderLayer(nn.Module):
    """Pre-LN cross-attention layer: the query attends to all ``T*L`` frame tokens."""

    def __init__(self, dim: int, qkv_dim: int, num_heads: int, mlp_factor: float, mlp_dropout: float):
        super().__init__()
        hidden = round(mlp_factor * dim)
        self.attn = CrossAttention(dim, qkv_dim, num_heads)
        self.mlp = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(dim, hidden)),
            ("act", QuickGELU()),
            ("dropout", nn.Dropout(mlp_dropout)),
            ("fc2", nn.Linear(hidden, dim)),
        ]))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        for m in (self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        y = self.norm3(frames)
        x = x + self.attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """``[hw, hw]`` row of the (2h-1)(2w-1) offset table for each (query patch, key patch)."""
    h, w = grid
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    i, j = i.flatten(), j.flatten()
    return (i[:, None] - i[None, :] + h - 1) * (2 * w - 1) + (j[:, None] - j[None, :] + w - 1)


class TemporalCrossAttention(nn.Module):
    """The local temporal module on attention maps between adjacent frames.

    For each patch of frame t, the head-averaged attention of its query over the keys of frame
    t-1 (and t+1) weights a learned vector per relative 2-D offset (``w1``, ``w2``): motion
    shows up as where the attention mass lands. Values are never used.
    """

    def __init__(self, grid: tuple[int, int], dim: int):
        super().__init__()
        rows = (2 * grid[0] - 1) * (2 * grid[1] - 1)
        self.grid = tuple(grid)
        self.w1 = nn.Parameter(torch.zeros(rows, dim))
        self.w2 = nn.Parameter(torch.zeros(rows, dim))
        self.register_buffer("idx", relative_position_index(self.grid), persistent=False)

    @staticmethod
    def frame_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Head-averaged ``softmax(q_t . k_t' / sqrt(d))`` over patch tokens: ``[B, T', hw, hw]``."""
        q, k = q[:, :, 1:], k[:, :, 1:]  # drop CLS
        attn = torch.einsum("btqhd,btkhd->bthqk", q * q.shape[-1] ** -0.5, k)
        return attn.softmax(dim=-1).mean(dim=2)

    @classmethod
    def attention_maps(cls, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k ``[B, T, L, heads, d]`` -> (frames 1..T-1 over their previous frame, frames 0..T-2
        over their next frame), each ``[B, T-1, hw, hw]``."""
        return cls.frame_attention(q[:, 1:], k[:, :-1]), cls.frame_attention(q[:, :-1], k[:, 1:])

    def check_maps(self, attn: torch.Tensor) -> None:
        hw = attn.shape[2]
        if hw != self.grid[0] * self.grid[1]:
            raise ValueError(f"cross-attention built for a {self.grid} patch grid got maps over {hw} patches")

    def forward_maps(self, attn_prev: torch.Tensor, attn_next: torch.Tensor) -> torch.Tensor:
        """Adjacent-frame attention maps (``attention_maps``) -> ``[B, T, L, C]`` (zero on CLS)."""
        self.check_maps(attn_prev)
        b, _, hw = attn_prev.shape[:3]
        prev = torch.einsum("btqk,qkc->btqc", attn_prev, self.w1[self.idx])  # frames 1..T-1 look back
        nxt = torch.einsum("btqk,qkc->btqc", attn_next, self.w2[self.idx])  # frames 0..T-2 look ahead
        zero = prev.new_zeros(b, 1, hw, prev.shape[-1])
        patches = torch.cat([zero, prev], 1) + torch.cat([nxt, zero], 1)
        return F.pad(patches, (0, 0, 1, 0))  # CLS gets nothing

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q, k ``[B, T, L, heads, d]`` -> ``[B, T, L, C]`` to add to the frame tokens (zero on CLS)."""
        if q.shape[2] != 1 + self.grid[0] * self.grid[1]:
            raise ValueError(f"cross-attention built for a {self.grid} patch grid got {q.shape[2]} tokens")
        return self.forward_maps(*self.attention_maps(q, k))


def attention_features(features: Sequence[BlockFeatures]) -> list[AttentionFeatures]:
    """Per-block (out, q, k) -> (out, attention maps): what the feature cache stores."""
    return [AttentionFeatures(f.out, *TemporalCrossAttention.attention_maps(f.q, f.k)) for f in features]


class EVLDecoder(nn.Module):
    """A single learnable query passed through ``num_layers`` decoder layers (spec §1.2)."""

    def __init__(
        self,
        *,
        num_frames: int,
        grid: tuple[int, int],
        dim: int,
        num_layers: int = 4,
        qkv_dim: int | None = None,
        num_heads: int | None = None,
        mlp_factor: float = 4.0,
        mlp_dropout: float = 0.5,
        enable_temporal_conv: bool = True,
        enable_temporal_pos_embed: bool = True,
        enable_temporal_cross_attention: bool = True,
    ):
        super().__init__()
        qkv_dim = qkv_dim or dim
        num_heads = num_heads or max(qkv_dim // 64, 1)
        self.num_frames = num_frames
        self.num_layers = num_layers
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(dim, qkv_dim, num_heads, mlp_factor, mlp_dropout) for _ in range(num_layers))
        self.temporal_conv = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel_size=3, padding=1, groups=dim) for _ in range(num_layers)
        ) if enable_temporal_conv else None
        self.temporal_pos_embed = nn.ParameterList(
            nn.Parameter(torch.zeros(num_frames, dim)) for _ in range(num_layers)
        ) if enable_temporal_pos_embed else None
        self.cross_attention = nn.ModuleList(
            TemporalCrossAttention(grid, dim) for _ in range(num_layers)
        ) if enable_temporal_cross_attention else None
        self.cls_token = nn.Parameter(torch.zeros(dim))

    def frame_tokens(self, i: int, out: torch.Tensor, maps: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Layer ``i``'s input tokens: block output ``out [B, T, L, C]`` plus its temporal
        convolution, temporal position embedding and cross-attention on ``maps``."""
        conv = self.temporal_conv[i] if self.temporal_conv is not None else None
        pos = self.temporal_pos_embed[i] if self.temporal_pos_embed is not None else None
        ca = self.cross_attention[i] if self.cross_attention is not None else None
        if ca is not None:
            ca.check_maps(maps[0])
        needs_grad = out.requires_grad or any(m.requires_grad for m in maps or ())
        if not (torch.is_grad_enabled() and needs_grad):  # always so in EVL training: the backbone is frozen
            conv_wb = (conv.weight, conv.bias) if conv is not None else (None, None)
            ca_args = (*maps, ca.w1, ca.w2, ca.idx) if ca is not None else (None,) * 5
            attn_prev, attn_next, w1, w2, idx = ca_args
            return _FrameTokens.apply(out, attn_prev, attn_next, *conv_wb, pos, w1, w2, idx)
        # The same function in plain autograd ops, for features that need gradients (a fine-tuned tower).
        f = out
        if conv is not None:
            t, c = out.shape[1], out.shape[3]
            f = f + conv(out.permute(0, 2, 3, 1).flatten(0, 1)).view(out.shape[0], -1, c, t).permute(0, 3, 1, 2)
        if pos is not None:
            f = f + pos.view(1, pos.shape[0], 1, -1)
        if ca is not None:
            f = f + ca.forward_maps(*maps)
        return f

    def forward(self, features: Sequence[BlockFeatures | AttentionFeatures]) -> torch.Tensor:
        """The last ``num_layers`` blocks' features (live or cached) -> the final query token ``[B, C]``.

        A block's features are its ``out`` tokens with either its ``q`` and ``k`` (live) or the
        cross-attention maps ``attn_prev`` and ``attn_next`` (cached: any tuple with those
        fields, such as the feature cache's own)."""
        if len(features) != self.num_layers:
            raise ValueError(f"decoder has {self.num_layers} layers but got features of {len(features)} blocks")
        b, t, length, c = features[0].out.shape
        if self.temporal_pos_embed is not None and t != self.num_frames:
            raise ValueError(f"model was built for {self.num_frames} frames (temporal position embedding), "
                             f"got clips of {t} frames")
        x = self.cls_token.view(1, 1, c).expand(b, 1, c)
        for i, feat in enumerate(features):
            maps = None
            if self.cross_attention is not None:
                maps = ((feat.attn_prev, feat.attn_next) if hasattr(feat, "attn_prev")
                        else TemporalCrossAttention.attention_maps(feat.q, feat.k))
            f = self.frame_tokens(i, feat.out, maps)
            x = self.decoder_layers[i](x, f.flatten(1, 2))
        return x[:, 0]


class _FrameTokens(torch.autograd.Function):
    """``EVLDecoder.frame_tokens`` for frozen features, fused: one autograd node, float32.

    Forward: the temporal convolution as a ``(3, 1)`` depthwise conv2d on the channels-last view
    of the ``[B, T, L, C]`` tokens (no transposes; the residual folded into the centre tap), the
    position embedding added in place, and the cross-attention as one batched product over the
    query patches for both directions, ``[attn_prev | attn_next][q] @ [w1 ; w2][idx[q]]``.
    Backward computes only the parameters' gradients (the features are frozen): the
    convolution's own weight-and-bias backward, a sum for the position embedding, and one
    batched product for the cross-attention.

    ``conv_w``/``conv_b``, ``pos`` and ``w1``/``w2``/``idx`` (with the maps) may each be None
    (the module disabled). Autocast is switched off inside: these are memory-bound element-wise
    passes over the tokens, and float32 keeps them equal to the unfused path.
    """

    @staticmethod
    def forward(ctx, out, attn_prev, attn_next, conv_w, conv_b, pos, w1, w2, idx):
        with torch.autocast(out.device.type, enabled=False):
            b, t, length, c = out.shape
            out = out.float()
            if conv_w is not None:
                k = conv_w.shape[-1]
                weight = conv_w.detach().float().clone()
                weight[:, 0, k // 2] += 1  # f = out + conv(out)
                f = F.conv2d(out.permute(0, 3, 1, 2), weight.unsqueeze(-1), conv_b.detach().float(),
                             padding=(k // 2, 0), groups=c).permute(0, 2, 3, 1).contiguous()
            else:
                f = out.clone(memory_format=torch.contiguous_format)
            if pos is not None:
                f += pos.detach().float().view(1, t, 1, c)
            a = pair_rows = None
            if w1 is not None:
                # Both directions in one product per query patch q: frame t's row of maps is
                # [over frame t-1 | over frame t+1] (zeros where there is no such frame), its
                # weights [w1[idx[q]] ; w2[idx[q]]], accumulated straight into the patch tokens.
                hw = attn_prev.shape[2]
                a = out.new_zeros(hw, b, t, 2 * hw)
                a[:, :, 1:, :hw] = attn_prev.permute(2, 0, 1, 3)
                a[:, :, :-1, hw:] = attn_next.permute(2, 0, 1, 3)
                a = a.view(hw, b * t, 2 * hw)  # [q, B*T, 2k]
                # One gather from the stacked tables ([q, 2k, C]: 236 MB a layer at ViT-B/16,
                # whatever the batch); gathering each table and concatenating copied it twice.
                pair_rows = torch.cat([idx, idx + w1.shape[0]], 1)  # [q, 2k]: the row of each pair
                w = torch.cat([w1, w2]).detach().float()[pair_rows]
                f[:, :, 1:].permute(2, 0, 1, 3).view(hw, b * t, c).baddbmm_(a, w)
        ctx.save_for_backward(out if conv_w is not None else None, a, pair_rows)
        ctx.has = (conv_w is not None, pos is not None, w1 is not None)
        ctx.kernel = conv_w.shape[-1] if conv_w is not None else 0
        ctx.offsets = w1.shape[0] if w1 is not None else 0
        ctx.dtypes = [x.dtype if x is not None else None for x in (conv_w, conv_b, pos, w1, w2)]
        return f

    @staticmethod
    def backward(ctx, g):
        has_conv, has_pos, has_ca = ctx.has
        out, a, pair_rows = ctx.saved_tensors
        g = g.float().contiguous()
        b, t, length, c = g.shape
        grads = [None] * 9
        if has_pos:
            grads[5] = g.sum(0).sum(1)  # [T, C]: sum over clips and tokens
        if has_conv:
            # The convolution's own weight-and-bias backward: one pass over the tokens, where a
            # product and a reduction per tap would take three (and on two threads reduce
            # across the split of the product that produced them, far slower).
            k = ctx.kernel
            _, w_grad, b_grad = torch.ops.aten.convolution_backward(
                g.permute(0, 3, 1, 2), out.permute(0, 3, 1, 2), g.new_zeros(c, 1, k, 1), [c], [1, 1], [k // 2, 0],
                [1, 1], False, [0, 0], c, [False, True, True])
            grads[3], grads[4] = w_grad.view(c, 1, k), b_grad
        if has_ca:
            rows = ctx.offsets
            go = g[:, :, 1:].permute(2, 0, 1, 3).reshape(a.shape[0], b * t, c)  # [q, B*T, C]
            per_pair = torch.bmm(a.transpose(1, 2), go)  # [q, 2k, C]
            # Pairs at the same relative offset share a row of w1 (first k) or w2 (last k).
            w_grad = per_pair.new_zeros(2 * rows, c).index_add_(0, pair_rows.flatten(), per_pair.reshape(-1, c))
            grads[6], grads[7] = w_grad[:rows], w_grad[rows:]
        for j, dtype in zip(range(3, 8), ctx.dtypes):
            if grads[j] is not None:
                grads[j] = grads[j].to(dtype)
        return tuple(grads)


def EVLHead(dim: int, num_classes: int, dropout: float = 0.5) -> nn.Sequential:
    """``LayerNorm -> Dropout -> Linear``; indices 0 and 2 carry the reference's ``proj.{0,2}`` names."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Dropout(dropout), nn.Linear(dim, num_classes))
