"""EVL model: shapes, what trains, the frozen backbone, and parity with the spec (evl-spec.md §1)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import evl
from evl.backbone import default_compute_dtype
from evl.decoder import TemporalCrossAttention, attention_features, relative_position_index

from conftest import build_tiny


def clips(b=2, t=4, size=64, seed=1):
    return torch.randn(b, 3, t, size, size, generator=torch.Generator().manual_seed(seed))


def test_output_shape_and_finite(tiny_vit):
    model = build_tiny(tiny_vit).eval()
    out = model(clips())
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


def test_random_backbone_warns(tiny_vit):
    with pytest.warns(UserWarning, match="RANDOM"):
        evl.build_model(tiny_vit, 3, 4)


def test_recorded_config_rebuilds_the_same_model(tiny_vit):
    # A checkpoint's model_config is enough to build the model again: same parameters, same shapes,
    # the decoder sizes it resolved (qkv width, heads) recorded rather than left to defaults.
    model = build_tiny(tiny_vit, decoder_num_layers=2, decoder_qkv_dim=128, enable_temporal_conv=False)
    assert model.config["decoder_num_heads"] == 2  # qkv_dim / 64, resolved at build time
    cfg = evl.EVLConfig.from_dict(model.config)
    assert (cfg.decoder_num_layers, cfg.decoder_qkv_dim, cfg.enable_temporal_conv) == (2, 128, False)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        again = evl.build_model(cfg)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    assert again.config == model.config


def test_config_rejects_unknown_fields(tiny_vit):
    with pytest.raises(TypeError):
        evl.build_model(tiny_vit, 5, 4, decoder_layers=2)  # a typo is an error, not a default


def test_only_decoder_and_head_receive_gradients(tiny_vit):
    model = build_tiny(tiny_vit).train()
    model(clips()).logsumexp(-1).sum().backward()
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith(("decoder.", "proj.")) for n in names)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())


def test_backbone_features_carry_no_graph(tiny_vit):
    # No autograd graph through the backbone: backward memory cannot grow with its depth.
    model = build_tiny(tiny_vit).train()
    feats = model.forward_features(clips())
    assert len(feats) == 4
    assert all(not t.requires_grad and t.grad_fn is None and t.dtype == torch.float32 for f in feats for t in f)


def test_backbone_frozen_through_optimizer_step_and_train_mode(tiny_vit):
    model = build_tiny(tiny_vit)
    model.train()
    assert model.training and not model.backbone.training
    before = copy.deepcopy(model.backbone.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    for _ in range(2):
        opt.zero_grad()
        model(clips()).sum().backward()
        opt.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.backbone.training
    assert "backbone" not in str(list(model.state_dict()))


def test_per_block_features_equal_open_clip_forward(tiny_vit):
    model = build_tiny(tiny_vit, decoder_num_layers=3)
    visual = model.backbone.visual
    block_out, attn_in = {}, {}
    hooks = []
    for i, blk in enumerate(visual.transformer.resblocks):
        hooks.append(blk.register_forward_hook(lambda m, a, o, i=i: block_out.__setitem__(i, o)))
        hooks.append(blk.attn.register_forward_pre_hook(lambda m, a, i=i: attn_in.__setitem__(i, a[0])))
    x = clips(b=1, t=2)
    with torch.no_grad():
        visual(x.transpose(1, 2).flatten(0, 1))  # open_clip's own forward, frames as images
    for h in hooks:
        h.remove()
    feats = model.forward_features(x)
    for j, f in enumerate(feats):
        i = 1 + j  # last 3 of 4 blocks
        torch.testing.assert_close(f.out.flatten(0, 1), block_out[i], atol=1e-5, rtol=1e-5)
        # q and k must be the block's own (pre-scaling, per head): their softmax is the attention
        # map open_clip's MultiheadAttention computes.
        attn = visual.transformer.resblocks[i].attn
        _, ref_w = attn(attn_in[i], attn_in[i], attn_in[i], need_weights=True, average_attn_weights=False)
        q, k = f.q.flatten(0, 1), f.k.flatten(0, 1)
        ours = torch.einsum("nqhd,nkhd->nhqk", q / math.sqrt(q.shape[-1]), k).softmax(-1)
        torch.testing.assert_close(ours, ref_w, atol=1e-5, rtol=1e-4)


def test_relative_position_index_matches_spec_formula():
    h, w = 3, 4
    idx = relative_position_index((h, w))
    for a in range(h * w):
        for b in range(h * w):
            qi, qj, ki, kj = a // w, a % w, b // w, b % w
            assert idx[a, b] == (qi - ki + h - 1) * (2 * w - 1) + (qj - kj + w - 1)
    assert idx.max() == (2 * h - 1) * (2 * w - 1) - 1


def spec_cross_attention(q, k, w1, w2, grid):
    """evl-spec §1.2 step 3, written with loops over frames and patches."""
    b, t, length, heads, d = q.shape
    h, w = grid
    out = torch.zeros(b, t, length, w1.shape[1])
    for n in range(b):
        for f in range(t):
            for other, table in ((f - 1, w1), (f + 1, w2)):
                if not 0 <= other < t:
                    continue
                logits = torch.einsum("qhd,khd->hqk", q[n, f, 1:], k[n, other, 1:]) / math.sqrt(d)
                attn = logits.softmax(-1).mean(0)
                for a in range(h * w):
                    for bb in range(h * w):
                        row = (a // w - bb // w + h - 1) * (2 * w - 1) + (a % w - bb % w + w - 1)
                        out[n, f, 1 + a] += attn[a, bb] * table[row]
    return out


def test_temporal_cross_attention_matches_spec_loops():
    torch.manual_seed(0)
    grid = (2, 3)
    mod = TemporalCrossAttention(grid, dim=5)
    with torch.no_grad():
        mod.w1.normal_()
        mod.w2.normal_()
    q, k = torch.randn(2, 3, 7, 2, 4), torch.randn(2, 3, 7, 2, 4)
    torch.testing.assert_close(mod(q, k), spec_cross_attention(q, k, mod.w1.detach(), mod.w2.detach(), grid),
                               atol=1e-5, rtol=1e-5)


def spec_decoder(model, feats):
    """evl-spec §1.2-1.3 written step by step with plain tensor ops (eval mode: no dropout)."""
    dec = model.decoder
    b, t, length, c = feats[0].out.shape
    x = dec.cls_token.expand(b, 1, c)
    for i, feat in enumerate(feats):
        raw = feat.out
        conv = dec.temporal_conv[i]
        f = raw.clone()
        for n in range(b):
            for tok in range(length):
                f[n, :, tok] += F.conv1d(raw[n, :, tok].T[None], conv.weight, conv.bias, padding=1, groups=c)[0].T
        f = f + dec.temporal_pos_embed[i][None, :, None, :]
        ca = dec.cross_attention[i]
        f = f + spec_cross_attention(feat.q, feat.k, ca.w1, ca.w2, ca.grid)
        f = f.flatten(1, 2)
        layer = dec.decoder_layers[i]
        a = layer.attn
        heads = a.num_heads
        qq = a.q_proj(layer.norm1(x)).unflatten(-1, (heads, -1))
        kv_in = layer.norm3(f)
        kk = a.k_proj(kv_in).unflatten(-1, (heads, -1))
        vv = a.v_proj(kv_in).unflatten(-1, (heads, -1))
        aff = torch.einsum("nqhc,nkhc->nhqk", qq / math.sqrt(qq.shape[-1]), kk).softmax(-1)
        x = x + a.out_proj(torch.einsum("nhqk,nkhc->nqhc", aff, vv).flatten(-2))
        hdn = layer.mlp.fc1(layer.norm2(x))
        x = x + layer.mlp.fc2(hdn * torch.sigmoid(1.702 * hdn))
    return model.proj[2](model.proj[0](x[:, 0]))


def test_decoder_matches_spec_with_nonzero_parameters(tiny_vit):
    """Outputs and every parameter's gradient, live features and cached (attention-map) ones.

    The decoder computes the same function in another order (keys and values projected on the
    query side, the cross-attention as one product over relative offsets), so the gradients are
    checked too; every parameter must get one (DDP without find_unused_parameters needs it).
    """
    model = build_tiny(tiny_vit, decoder_num_layers=2, num_frames=3, decoder_num_heads=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        feats = model.forward_features(clips(t=3))
    names = [n for n, _ in model.named_parameters()]
    probe = torch.randn(2, model.proj[2].out_features)

    def grads(logits):
        return dict(zip(names, torch.autograd.grad((logits * probe).sum(), list(model.parameters()),
                                                    allow_unused=True)))

    want_logits = spec_decoder(model, feats)
    want = grads(want_logits)
    for inputs in (feats, attention_features(feats)):
        logits = model.forward_head(inputs)
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
        got = grads(logits)
        for n in names:
            assert got[n] is not None, n
            torch.testing.assert_close(got[n], want[n] if want[n] is not None else torch.zeros_like(got[n]),
                                       atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.parametrize("disabled", [(), ("enable_temporal_conv",), ("enable_temporal_pos_embed",),
                                      ("enable_temporal_cross_attention",),
                                      ("enable_temporal_conv", "enable_temporal_pos_embed")])
def test_fused_frame_tokens_equal_the_autograd_path(tiny_vit, disabled):
    """Frozen features take the fused path (parameter gradients only); features that need
    gradients (a fine-tuned tower) take plain autograd ops. Same outputs, same parameter grads."""
    model = build_tiny(tiny_vit, decoder_num_layers=2, num_frames=3, **{k: False for k in disabled}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        feats = attention_features(model.forward_features(clips(t=3)))
    params = list(model.parameters())

    def run(features):
        logits = model.forward_head(features)
        return logits, torch.autograd.grad(logits.square().sum(), params + [t for f in features for t in f
                                                                             if t.requires_grad], allow_unused=True)

    fused, g_fused = run(feats)
    leaves = [type(f)(*(t.clone().requires_grad_() for t in f)) for f in feats]
    plain, g_plain = run(leaves)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_fused, g_plain[:len(params)]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert g_plain[len(params)].abs().sum() > 0  # the block output of layer 0 got its gradient


def test_decoder_under_bf16_autocast(tiny_vit):
    """The custom autograd functions under autocast (bf16 also runs on the CPU): close to fp32,
    and float32 gradients for the float32 parameters."""
    model = build_tiny(tiny_vit, decoder_num_layers=2, num_frames=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        feats = attention_features(model.forward_features(clips(t=3)))
    params = list(model.parameters())
    want = model.forward_head(feats)
    g_want = torch.autograd.grad(want.square().sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.forward_head(feats)
    g_got = torch.autograd.grad(got.float().square().sum(), params)
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)
    for a, b in zip(g_got, g_want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-3


@pytest.mark.parametrize("module", ["temporal_conv", "temporal_pos_embed", "cross_attention"])
def test_each_temporal_module_matters(tiny_vit, module):
    flag = {"temporal_conv": "enable_temporal_conv", "temporal_pos_embed": "enable_temporal_pos_embed",
            "cross_attention": "enable_temporal_cross_attention"}[module]
    model = build_tiny(tiny_vit).eval()
    without = build_tiny(tiny_vit, **{flag: False}).eval()
    without.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(tuple(without.state_dict()))})
    params = [p for n, p in model.named_parameters() if n.startswith(f"decoder.{module}")]
    x = clips()
    with torch.no_grad():
        for p in params:
            p.zero_()
        torch.testing.assert_close(model(x), without(x))  # zero parameters: the module is a no-op
        for p in params:
            p.normal_(0, 0.5)
        assert (model(x) - without(x)).abs().max() > 1e-3


def test_zero_initialised_parameters(tiny_vit):
    model = build_tiny(tiny_vit)
    dec = model.decoder
    assert not dec.cls_token.any()
    assert all(not p.any() for p in dec.temporal_pos_embed)
    assert all(not m.w1.any() and not m.w2.any() for m in dec.cross_attention)
    assert all(not layer.attn.q_proj.bias.any() for layer in dec.decoder_layers)
    assert all(m.weight.any() for m in dec.temporal_conv)  # PyTorch's default init, not zero
    assert 0 < dec.decoder_layers[0].mlp.fc1.bias.abs().max() < 1e-4  # N(0, 1e-6)


def test_wrong_frame_count_or_size_is_clear(tiny_vit):
    model = build_tiny(tiny_vit, num_frames=4)
    with pytest.raises(ValueError, match="4 frames"):
        model(clips(t=6))
    with pytest.raises(ValueError, match="64x64"):
        model(clips(size=48))


@pytest.mark.parametrize("name, trainable, tower", [
    ("ViT-B-16", 33_183_376, 86_192_640),
    ("ViT-L-14", 58_727_824, 303_966_208),
])
def test_trainable_parameter_counts(name, trainable, tower):
    with torch.device("meta"), pytest.warns(UserWarning):
        model = evl.build_model(name, 400, 8)
    assert sum(p.numel() for p in model.parameters()) == trainable
    assert sum(p.numel() for p in model.backbone.visual.parameters()) == tower


def test_decoder_defaults_follow_backbone_width():
    with torch.device("meta"), pytest.warns(UserWarning):
        model = evl.build_model("ViT-L-14", 400, 8)
    layer = model.decoder.decoder_layers[0]
    assert layer.attn.q_proj.out_features == 1024 and layer.attn.num_heads == 16
    assert model.decoder.cross_attention[0].w1.shape == (31 * 31, 1024)  # 16x16 patch grid at 224/14


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        evl.build_model("ViT-Z-99", 4, 8)


def test_compute_dtype_policy():
    assert default_compute_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.gpu
def test_gpu_backbone_runs_in_half_precision(tiny_vit):
    model = build_tiny(tiny_vit).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(clips().cuda())
    assert model.backbone.visual.conv1.weight.dtype in (torch.bfloat16, torch.float16)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_cross_attention_equals_plain_multi_head_attention():
    """Query-side projections, head-major products: still softmax(q k^T / sqrt(d)) v per head,
    for several queries and heads, with every bias non-zero; outputs and all gradients."""
    from evl.decoder import CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention(dim=32, qkv_dim=48, num_heads=4)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, y = torch.randn(3, 5, 32, requires_grad=True), torch.randn(3, 7, 32, requires_grad=True)

    def plain(x, y):
        h = attn.num_heads
        q = attn.q_proj(x).unflatten(-1, (h, -1)).transpose(1, 2)
        k = attn.k_proj(y).unflatten(-1, (h, -1)).transpose(1, 2)
        v = attn.v_proj(y).unflatten(-1, (h, -1)).transpose(1, 2)
        a = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return attn.out_proj((a @ v).transpose(1, 2).flatten(2))

    probe = torch.randn(3, 5, 32)
    results = []
    for fn in (attn, plain):
        attn.zero_grad()
        x.grad = y.grad = None
        out = fn(x, y)
        (out * probe).sum().backward()
        results.append([out.detach(), x.grad, y.grad] + [p.grad.clone() for p in attn.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
