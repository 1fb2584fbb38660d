"""ClipSampler: frame indices, crop boxes, determinism and sharding, against hand-computed values."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.sampling import ClipSampler, ClipSpec, epoch_permutation, shard_indices


def _train(sampler, index=0, epoch=0, n=100, h=240, w=320, **kw):
    return sampler.train_clip(index, epoch, num_frames_in_video=n, height=h, width=w, **kw)


def _eval(sampler, index=0, n=100, h=240, w=320, **kw):
    return sampler.eval_clips(index, num_frames_in_video=n, height=h, width=w, **kw)


# -- training frames ---------------------------------------------------------------------------


def test_dense_long_video_stride_span_and_start_range():
    sampler = ClipSampler(num_frames=8, sampling_rate=4)
    assert sampler.span == 29
    starts = set()
    for index in range(400):
        frames = _train(sampler, index, n=100).frame_indices
        assert len(frames) == 8
        assert np.all(np.diff(frames) == 4)
        assert 0 <= frames[0] and frames[-1] <= 99
        starts.add(frames[0])
    # Uniform start over [0, 100 - 29]: both ends reachable, nothing beyond.
    assert min(starts) == 0 and max(starts) == 71
    assert len(starts) > 60


def test_dense_short_video_repeats_last_frame():
    sampler = ClipSampler(num_frames=8, sampling_rate=4)
    for index in range(5):
        assert _train(sampler, index, n=20).frame_indices == (0, 4, 8, 12, 16, 19, 19, 19)
    # A video exactly one span long has a single possible clip.
    assert _train(sampler, n=29).frame_indices == (0, 4, 8, 12, 16, 20, 24, 28)
    assert _train(ClipSampler(num_frames=4, sampling_rate=2), n=1).frame_indices == (0, 0, 0, 0)


def test_segment_mode_one_frame_per_segment_inclusive_ends():
    sampler = ClipSampler(num_frames=8, sampling_rate=1, mode="segment")
    # n = 100: segment length 99 / 8 = 12.375, bounds rounded (round half to even),
    # both ends included: 12.375->12, 24.75->25, 37.125->37, 49.5->50, 61.875->62,
    # 74.25->74, 86.625->87, 99.
    bounds = [(0, 12), (12, 25), (25, 37), (37, 50), (50, 62), (62, 74), (74, 87), (87, 99)]
    draws = np.array([_train(sampler, i, n=100).frame_indices for i in range(1500)])
    for j, (lo, hi) in enumerate(bounds):
        assert draws[:, j].min() == lo and draws[:, j].max() == hi
    assert np.all(np.diff(draws, axis=1) >= 0)


def test_segment_mode_sampling_rate_is_ignored():
    a = ClipSampler(num_frames=4, sampling_rate=1, mode="segment")
    b = ClipSampler(num_frames=4, sampling_rate=-1, mode="segment")
    assert _train(a, 3, 1, n=50) == _train(b, 3, 1, n=50)


def test_untrimmed_range_is_respected():
    dense = ClipSampler(num_frames=8, sampling_rate=2)
    segment = ClipSampler(num_frames=8, sampling_rate=1, mode="segment")
    for index in range(100):
        for sampler in (dense, segment):
            frames = _train(sampler, index, n=500, first_frame=50, last_frame=80).frame_indices
            assert all(50 <= f < 80 for f in frames)
    # A segment shorter than the span starts at its first frame and repeats its last.
    assert _train(dense, n=500, first_frame=50, last_frame=60).frame_indices == (
        50, 52, 54, 56, 58, 59, 59, 59,
    )
    # An end past the video (rounded seconds) is clamped to the last frame.
    assert _train(dense, n=55, first_frame=50, last_frame=70).frame_indices[-1] == 54
    with pytest.raises(ValueError):
        _train(dense, n=100, first_frame=60, last_frame=60)
    with pytest.raises(ValueError):
        _train(dense, n=100, first_frame=100)


# -- evaluation frames -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, t, s, views, expected_starts",
    [
        # span 29, slide 71: starts 0, round(35.5) = 36, 71
        (100, 8, 4, 3, [0, 36, 71]),
        # one view: slide // 2 = 35
        (100, 8, 4, 1, [35]),
        # span 16, slide 34: 0, round(11.33) = 11, round(22.67) = 23, 34
        (50, 4, 5, 4, [0, 11, 23, 34]),
        # span 2, slide 5: 0, round(2.5) = 2 (half to even, as Python's round), 5
        (7, 2, 1, 3, [0, 2, 5]),
        # slide 1, one view: 1 // 2 = 0
        (30, 8, 4, 1, [0]),
    ],
)
def test_eval_temporal_views(n, t, s, views, expected_starts):
    sampler = ClipSampler(num_frames=t, sampling_rate=s, num_temporal_views=views)
    specs = _eval(sampler, n=n)
    assert [spec.frame_indices for spec in specs] == [
        tuple(start + j * s for j in range(t)) for start in expected_starts
    ]
    assert all(spec.view == v and not spec.flip and spec.aug_seed == 0 for v, spec in enumerate(specs))


def test_eval_short_video_repeats_last_frame_in_every_view():
    sampler = ClipSampler(num_frames=8, sampling_rate=4, num_temporal_views=3)
    specs = _eval(sampler, n=20)
    assert [s.frame_indices for s in specs] == [(0, 4, 8, 12, 16, 19, 19, 19)] * 3


def test_eval_untrimmed_offsets_views():
    sampler = ClipSampler(num_frames=2, sampling_rate=10, num_temporal_views=2)
    specs = _eval(sampler, n=1000, first_frame=100, last_frame=200)
    # span 11 in 100 frames: slide 89, starts 0 and 89, shifted by 100.
    assert [s.frame_indices for s in specs] == [(100, 110), (189, 199)]


def test_eval_segment_mode_takes_segment_middles():
    sampler = ClipSampler(num_frames=4, sampling_rate=1, mode="segment")
    # n = 9: segments [0, 2], [2, 4], [4, 6], [6, 8]; middles 1, 3, 5, 7.
    assert _eval(sampler, n=9)[0].frame_indices == (1, 3, 5, 7)


# -- spatial views -----------------------------------------------------------------------------


def test_spatial_boxes_landscape_and_portrait():
    # 340x256 to short side 224: 297x224 (floored), margin 73, starts 0 / 36 / 73, i.e. crop
    # centres 112 / 148 / 185 resized = 128.2 / 169.4 / 211.8 source; minus half of 256.
    one = ClipSampler(num_frames=1, sampling_rate=1, size=224)
    three = ClipSampler(num_frames=1, sampling_rate=1, size=224, num_spatial_views=3)
    assert [s.crop for s in _eval(one, h=256, w=340)] == [(0, 41, 256, 256)]
    assert [s.crop for s in _eval(three, h=256, w=340)] == [
        (0, 0, 256, 256), (0, 41, 256, 256), (0, 84, 256, 256),
    ]
    assert [s.crop for s in _eval(one, h=340, w=256)] == [(41, 0, 256, 256)]
    assert [s.crop for s in _eval(three, h=340, w=256)] == [
        (0, 0, 256, 256), (41, 0, 256, 256), (84, 0, 256, 256),
    ]
    # 1920x1080: the end crop reaches the frame's right edge.
    assert [s.crop for s in _eval(three, h=1080, w=1920)] == [
        (0, 0, 1080, 1080), (0, 420, 1080, 1080), (0, 840, 1080, 1080),
    ]
    assert {s.crop for s in _eval(three, h=300, w=300)} == {(0, 0, 300, 300)}


def test_view_numbering_spatial_major():
    sampler = ClipSampler(
        num_frames=2, sampling_rate=1, size=32, num_spatial_views=3, num_temporal_views=2
    )
    specs = _eval(sampler, index=7, n=10, h=40, w=60)
    assert [s.view for s in specs] == list(range(6))
    assert all(s.index == 7 for s in specs)
    assert [s.crop for s in specs[0::2]] == [s.crop for s in specs[1::2]]  # same spatial view
    assert specs[0].frame_indices == specs[2].frame_indices == specs[4].frame_indices
    assert specs[0].frame_indices != specs[1].frame_indices


def _smooth_image(h, w, seed):
    low = torch.from_numpy(np.random.default_rng(seed).random((1, 3, 9, 12), dtype=np.float32))
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=True)


@pytest.mark.parametrize("h, w, views", [(180, 240, 3), (240, 150, 3), (131, 197, 1)])
def test_box_equals_resize_then_crop(h, w, views):
    size = 64
    image = _smooth_image(h, w, seed=h + w)
    if h < w:
        new_h, new_w = size, w * size // h
    else:
        new_h, new_w = h * size // w, size
    resized = F.interpolate(image, size=(new_h, new_w), mode="bilinear", align_corners=False)
    # The reference's crops, by hand: centre (1 view) or start / middle / end of the long side.
    if views == 1:
        starts = [((new_h - size) // 2, (new_w - size) // 2)]
    else:
        margin = max(new_h, new_w) - size
        starts = [(0, m) if w >= h else (m, 0) for m in (0, margin // 2, margin)]
    sampler = ClipSampler(num_frames=1, sampling_rate=1, size=size, num_spatial_views=views)
    specs = _eval(sampler, n=1, h=h, w=w)
    assert len(specs) == len(starts)
    def crop_resize(top, left, side):
        box = image[..., top : top + side, left : left + side]
        return F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False)

    for spec, (y, x) in zip(specs, starts):
        expected = resized[..., y : y + size, x : x + size]
        top, left, bh, bw = spec.crop
        assert bh == bw == min(h, w)
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
        error = (crop_resize(top, left, bh) - expected).abs().mean().item()
        # Image values span [0, 1] with std about 0.25; the rest is the floored resize's
        # slightly different scale.
        assert error < 0.01, error
        # Sensitivity: boxes 2 px off along the long side match clearly worse.
        for shift in (-2, 2):
            dy, dx = (shift, 0) if h > w else (0, shift)
            if 0 <= top + dy <= h - bh and 0 <= left + dx <= w - bw:
                off = (crop_resize(top + dy, left + dx, bh) - expected).abs().mean().item()
                assert off > 1.5 * error, (shift, off, error)


# -- training crops ----------------------------------------------------------------------------


def test_random_resized_crop_in_frame_and_in_range():
    h, w = 240, 320
    sampler = ClipSampler(num_frames=1, sampling_rate=1)
    areas, ratios, tops, lefts = [], [], set(), set()
    for index in range(2000):
        top, left, bh, bw = _train(sampler, index, n=1, h=h, w=w).crop
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
        assert bh > 0 and bw > 0
        areas.append(bh * bw / (h * w))
        ratios.append(bw / bh)
        tops.add(top)
        lefts.add(left)
    # Sides are rounded to whole pixels, hence the small tolerances.
    assert 0.08 * 0.95 <= min(areas) and max(areas) <= 1.0
    assert min(areas) < 0.1 and max(areas) > 0.9
    assert 3 / 4 * 0.97 <= min(ratios) and max(ratios) <= 4 / 3 * 1.03
    assert min(ratios) < 0.8 and max(ratios) > 1.25
    assert len(tops) > 100 and len(lefts) > 100


def test_random_resized_crop_fallback_is_central():
    sampler = ClipSampler(num_frames=1, sampling_rate=1)
    # 10x1000: no draw fits (h >= sqrt(800 * 3/4) > 10), so the central 4:3 crop: w = 13;
    # 1000x10: the central 3:4 crop, h = round(10 / (3 / 4)) = 13.
    assert _train(sampler, h=10, w=1000, n=1).crop == (0, 493, 10, 13)
    assert _train(sampler, h=1000, w=10, n=1).crop == (493, 0, 13, 10)


def test_flip_probability():
    never = ClipSampler(num_frames=2, sampling_rate=1, hflip=0.0)
    always = ClipSampler(num_frames=2, sampling_rate=1, hflip=1.0)
    half = ClipSampler(num_frames=2, sampling_rate=1, hflip=0.5)
    assert not any(_train(never, i).flip for i in range(50))
    assert all(_train(always, i).flip for i in range(50))
    flips = sum(_train(half, i).flip for i in range(400))
    assert 150 < flips < 250
    # Flips draw from their own stream: turning them on changes nothing else.
    for i in range(20):
        a, b = _train(never, i, 3), _train(always, i, 3)
        assert (a.frame_indices, a.crop, a.aug_seed) == (b.frame_indices, b.crop, b.aug_seed)


# -- reproducibility ---------------------------------------------------------------------------


def test_same_key_same_spec_regardless_of_call_order():
    kwargs = dict(num_frames=8, sampling_rate=4, hflip=0.5, seed=3)
    first, second = ClipSampler(**kwargs), ClipSampler(**kwargs)
    keys = [(i, e) for e in range(3) for i in range(20)]
    forward = {k: _train(first, *k) for k in keys}
    backward = {k: _train(second, *k) for k in reversed(keys)}
    assert forward == backward
    assert isinstance(forward[(0, 0)], ClipSpec)
    assert all(0 <= s.aug_seed < 2**31 for s in forward.values())


def test_each_draw_is_numpys_default_stream_of_seed_epoch_index_and_stream():
    """A clip's draws are ``default_rng([seed, epoch, index, stream])``'s, whatever builds the
    generator: the clips a run trained on stay those of the runs before it."""
    from pipelines.sampling import _rng

    for key in [(0, 0, 0, 0), (3, 2, 123456, 1), (2**40, 7, 9, 3)]:
        ours, numpys = _rng(*key), np.random.default_rng(list(key))
        assert ours.integers(0, 2**31, size=64).tolist() == numpys.integers(0, 2**31, size=64).tolist()
        assert ours.random() == numpys.random()


def test_epochs_and_seeds_change_the_draws():
    a = ClipSampler(num_frames=8, sampling_rate=4, seed=0)
    b = ClipSampler(num_frames=8, sampling_rate=4, seed=1)
    e0 = [_train(a, i, 0) for i in range(20)]
    e1 = [_train(a, i, 1) for i in range(20)]
    s1 = [_train(b, i, 0) for i in range(20)]
    for x, y, z in zip(e0, e1, s1):
        assert x.frame_indices != y.frame_indices or x.crop != y.crop
        assert x.aug_seed != y.aug_seed and x.aug_seed != z.aug_seed
    assert len({s.aug_seed for s in e0}) == 20


# -- sharding and shuffling --------------------------------------------------------------------


def test_shard_indices_eval_counts_each_sample_once():
    for n, world in [(10, 3), (2, 4), (7, 1), (0, 2), (12, 4)]:
        shards = [shard_indices(n, r, world, pad=False) for r in range(world)]
        merged = sorted(i for s in shards for i in s)
        assert merged == list(range(n))
    assert shard_indices(10, 0, 3, pad=False) == [0, 3, 6, 9]
    assert shard_indices(10, 2, 3, pad=False) == [2, 5, 8]


def test_shard_indices_train_pads_to_equal_length():
    shards = [shard_indices(10, r, 4, pad=True) for r in range(4)]
    assert shards == [[0, 4, 8], [1, 5, 9], [2, 6, 0], [3, 7, 1]]
    tiny = [shard_indices(2, r, 4, pad=True) for r in range(4)]
    assert tiny == [[0], [1], [0], [1]]
    for n, world in [(10, 3), (9, 3), (101, 8)]:
        shards = [shard_indices(n, r, world, pad=True) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        assert set(i for s in shards for i in s) == set(range(n))
    with pytest.raises(ValueError):
        shard_indices(10, 4, 4, pad=True)


def test_epoch_permutation():
    p = epoch_permutation(50, seed=0, epoch=0)
    assert sorted(p.tolist()) == list(range(50))
    assert np.array_equal(p, epoch_permutation(50, seed=0, epoch=0))
    assert not np.array_equal(p, epoch_permutation(50, seed=0, epoch=1))
    assert not np.array_equal(p, epoch_permutation(50, seed=1, epoch=0))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ClipSampler(num_frames=8, sampling_rate=4, mode="random")
    with pytest.raises(ValueError):
        ClipSampler(num_frames=8, sampling_rate=0)
    with pytest.raises(ValueError):
        ClipSampler(num_frames=8, sampling_rate=4, num_spatial_views=2)
    with pytest.raises(ValueError):
        _train(ClipSampler(num_frames=8, sampling_rate=4), n=0)
