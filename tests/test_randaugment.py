"""RandAugment decided once: timm's grammar, timm's own draws, and their statistics."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipelines.randaugment import GEOMETRIC, INCREASING_TRANSFORMS, TRANSFORMS, AugOp, PolicyError, parse_policy
from videos import photo_frames

timm_aa = pytest.importorskip("timm.data.auto_augment")
RECIPE = "rand-m7-n4-mstd0.5-inc1"


def test_grammar_reads_every_section():
    p = parse_policy("rand-m9-n3-p0.7-mstd0.25-mmax12-inc1")
    assert (p.magnitude, p.num_layers, p.prob, p.magnitude_std, p.magnitude_max, p.increasing) == \
        (9, 3, 0.7, 0.25, 12.0, True)
    assert p.transforms == INCREASING_TRANSFORMS
    d = parse_policy("rand")
    assert (d.magnitude, d.num_layers, d.prob, d.magnitude_std, d.increasing) == (10, 2, 0.5, 0.0, False)
    assert d.transforms == TRANSFORMS
    assert parse_policy("rand-mstd101").magnitude_std == math.inf  # timm: above 100 means uniform
    assert not parse_policy("rand-inc0").increasing


@pytest.mark.parametrize("spec, words", [
    ("augmix-m5", "only timm RandAugment"),
    ("rand-m7-x3", "unknown section 'x3'"),
    ("rand-m7-tweights", "unknown section 'tweights'"),
    ("rand-mfoo", "unknown section 'mfoo'"),
    ("rand-m7.5", "bad value in section 'm7.5'"),
    ("rand-p1.5", "p in [0, 1]"),
])
def test_bad_policies_are_one_clear_error(spec, words):
    with pytest.raises(PolicyError, match=None) as err:
        parse_policy(spec)
    assert words in str(err.value) and spec in str(err.value)


def _apply_with_timm_ops(img: Image.Image, ops) -> np.ndarray:
    for op in ops:
        args = () if op.arg is None else (op.arg,)
        img = timm_aa.NAME_TO_OP[op.name](img, *args, fillcolor=(128, 128, 128), resample=Image.BICUBIC)
    return np.asarray(img)


@pytest.mark.parametrize("spec", [RECIPE, "rand-m9-n2", "rand-m12-n3-mmax15-mstd1-inc1", "rand-m6-n3-p0.8-mstd101"])
def test_decisions_are_timms_own_draws(spec):
    """timm's RandAugment, with Python's and NumPy's generators seeded by the clip's seed, gives
    the image that our decisions give when executed by timm's own op functions."""
    img = Image.fromarray(photo_frames(1, 64, 80)[0])
    ra = timm_aa.rand_augment_transform(spec, {"interpolation": Image.BICUBIC, "img_mean": (128, 128, 128)})
    policy, compared = parse_policy(spec), 0
    for seed in range(120):
        random.seed(seed)
        np.random.seed(seed)
        try:
            expected = np.asarray(ra(img))
        except ValueError:  # timm's Posterize with 0 bits, which Pillow 10+ refuses
            continue
        assert np.array_equal(_apply_with_timm_ops(img, policy.decide(seed)), expected), (seed, policy.decide(seed))
        compared += 1
    assert compared > 100


def test_decisions_are_plain_data_and_deterministic():
    policy = parse_policy(RECIPE)
    a, b = policy.decide(12345), policy.decide(12345)
    assert a == b and all(isinstance(op, AugOp) for op in a)
    assert eval(repr(a), {"AugOp": AugOp}) == a  # printable and comparable
    assert len({policy.decide(s) for s in range(50)}) > 40


def test_op_rates_and_magnitudes_follow_the_policy():
    """Over many clips: each op is applied at n * p / len(ops) per clip, magnitudes ~ N(m, mstd)."""
    policy = parse_policy(RECIPE)
    clips = 6000
    decisions = [policy.decide(seed) for seed in range(clips)]
    counts = Counter(op.name for ops in decisions for op in ops)
    expected = clips * policy.num_layers * policy.prob / len(policy.transforms)  # 800
    sd = math.sqrt(expected)
    for name in policy.transforms:
        assert abs(counts[name] - expected) < 5 * sd, (name, counts[name], expected)
    mags = np.array([op.magnitude for ops in decisions for op in ops])
    assert abs(mags.mean() - 7) < 0.03 and abs(mags.std() - 0.5) < 0.03
    # Signs of the symmetric ops are a coin toss.
    rotations = np.array([op.arg for ops in decisions for op in ops if op.name == "Rotate"])
    assert abs((rotations > 0).mean() - 0.5) < 0.06
    assert np.allclose(np.abs(rotations) / 30 * 10, [op.magnitude for ops in decisions for op in ops
                                                     if op.name == "Rotate"])
    layers = Counter(len(ops) for ops in decisions)
    for k in range(5):  # ops applied per clip ~ Binomial(4, 0.5)
        assert abs(layers[k] / clips - math.comb(4, k) / 16) < 0.02


def test_uniform_magnitudes_and_clamping():
    uniform = [op.magnitude for s in range(3000) for op in parse_policy("rand-m8-n2-mstd101").decide(s)]
    assert min(uniform) >= 0 and max(uniform) <= 8 and abs(np.mean(uniform) - 4) < 0.15
    clamped = [op.magnitude for s in range(3000) for op in parse_policy("rand-m10-n2-mstd3").decide(s)]
    assert max(clamped) == 10.0 and min(clamped) >= 0  # the default bound, 10
    raised = [op.magnitude for s in range(3000) for op in parse_policy("rand-m10-n2-mstd3-mmax20").decide(s)]
    assert max(raised) > 12


def test_sampler_draws_decisions_from_the_clip_seed():
    from pipelines.sampling import ClipSampler

    policy = parse_policy(RECIPE)
    sampler = ClipSampler(num_frames=4, sampling_rate=2, size=32, augment=policy, seed=3)
    spec = sampler.train_clip(7, 2, num_frames_in_video=40, height=48, width=64)
    assert spec.augment == policy.decide(spec.aug_seed)
    assert ClipSampler(num_frames=4, sampling_rate=2, size=32, seed=3).train_clip(
        7, 2, num_frames_in_video=40, height=48, width=64).augment == ()
    # Evaluation views are never augmented.
    assert all(s.augment == () for s in sampler.eval_clips(7, num_frames_in_video=40, height=48, width=64))
    assert any(op.kind in GEOMETRIC for s in range(40)
               for op in sampler.train_clip(s, 0, num_frames_in_video=40, height=48, width=64).augment)
