"""The demo dataset: the labelled motion is in the pixels, and the files are readable and stable."""

import json
import os

import av
import numpy as np
import pytest

from evl.demo import CLASS_NAMES, _checker, object_size, render_clip, write_demo_dataset
from pipelines.lists import read_list

# Direction of each class as (dy, dx) signs.
_DIRECTIONS = {0: (0, -1), 1: (0, 1), 2: (-1, 0), 3: (1, 0)}


def _locate(frame, template):
    """Top-left corner of the best match of `template` in `frame` (sum of squared differences)."""
    side = template.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(frame.astype(np.float32), (side, side, 3))
    ssd = ((windows[:, :, 0] - template) ** 2).sum(axis=(2, 3, 4))
    return np.unravel_index(np.argmin(ssd), ssd.shape)


def _track(frames):
    template = _checker(object_size(frames.shape[1]))
    return np.array([_locate(f, template) for f in frames])


@pytest.mark.parametrize("label", range(4))
def test_render_clip_moves_in_the_labelled_direction(label):
    for i in range(3):
        frames = render_clip(np.random.default_rng([7, label, i]), label, size=64, num_frames=16)
        assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
        side = object_size(64)
        positions = _track(frames)
        # Fully inside the frame all along (the match window only slides over valid spots).
        assert positions.min() >= 0 and positions.max() <= 64 - side
        steps = np.diff(positions, axis=0)
        dy, dx = _DIRECTIONS[label]
        moving, still = (steps[:, 0], steps[:, 1]) if dy else (steps[:, 1], steps[:, 0])
        sign = dy or dx
        assert np.all(still == 0)
        # 2 to 4 px per frame on average; single steps are rounded to whole pixels.
        assert np.all(sign * moving >= 1)
        assert 2 <= sign * moving.mean() <= 4


def test_render_clip_background_changes_but_object_look_is_fixed():
    a = render_clip(np.random.default_rng(1), 0, size=64, num_frames=4)
    b = render_clip(np.random.default_rng(2), 0, size=64, num_frames=4)
    template = _checker(object_size(64))
    for frames in (a, b):
        y, x = _locate(frames[0], template)
        patch = frames[0, y : y + 16, x : x + 16].astype(np.float32)
        assert np.abs(patch - template).mean() < 10  # only the small pixel noise
    assert np.abs(a[0].astype(int) - b[0].astype(int)).mean() > 20
    # The background is static within a clip: pixels the object never covers never change.
    covered = np.zeros((64, 64), bool)
    for y, x in _track(a):
        covered[y : y + 16, x : x + 16] = True
    assert covered.mean() < 0.5
    assert np.all(a[:, ~covered] == a[:1, ~covered])
    assert np.array_equal(a, render_clip(np.random.default_rng(1), 0, size=64, num_frames=4))


def test_render_clip_long_clips_slow_down_to_fit():
    frames = render_clip(np.random.default_rng(0), 1, size=64, num_frames=32)
    positions = _track(frames)
    assert positions[:, 1].max() <= 64 - object_size(64)
    assert np.all(np.diff(positions[:, 1]) >= 1)
    with pytest.raises(ValueError):
        render_clip(np.random.default_rng(0), 1, size=16, num_frames=64)


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _decode(path):
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("codec, ext", [("h264", ".mp4"), ("vp9", ".webm")])
def test_write_demo_dataset(tmp_path, codec, ext):
    root = str(tmp_path / "demo")
    demo = write_demo_dataset(root, num_train=8, num_val=4, codec=codec, seed=3)
    train = read_list(demo.train_list, data_root=root, num_classes=4)
    val = read_list(demo.val_list, data_root=root, num_classes=4)
    assert len(train) == 8 and len(val) == 4
    assert [r.label for r in train] == [0, 1, 2, 3] * 2  # balanced
    assert all(r.path.endswith(ext) and r.path.startswith(root) for r in train + val)
    with open(demo.train_list, encoding="utf-8") as f:
        assert f.readline().startswith(f"videos/train/00000{ext} ")  # relative to root
    with open(demo.class_names_path, encoding="utf-8") as f:
        assert json.load(f) == list(CLASS_NAMES)
    assert len(CLASS_NAMES) == 4

    with av.open(train[1].path) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == codec
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 25
    frames = _decode(train[1].path)
    assert frames.shape == (16, 64, 64, 3)
    # Lossy, but the object is still where the rendering put it (label 1: moving right).
    positions = _track(frames)
    assert np.all(np.diff(positions[:, 1]) >= 1) and np.all(np.diff(positions[:, 0]) == 0)


def test_write_demo_dataset_is_deterministic_and_idempotent(tmp_path):
    a = write_demo_dataset(str(tmp_path / "a"), num_train=4, num_val=4, seed=5)
    b = write_demo_dataset(str(tmp_path / "b"), num_train=4, num_val=4, seed=5)
    c = write_demo_dataset(str(tmp_path / "c"), num_train=4, num_val=4, seed=6)
    clip = "videos/val/00002.mp4"
    for name in ("videos/train/00000.mp4", "videos/train/00003.mp4", clip):
        assert _bytes(os.path.join(a.root, name)) == _bytes(os.path.join(b.root, name))
    assert not np.array_equal(
        _decode(os.path.join(a.root, clip)), _decode(os.path.join(c.root, clip))
    )
    # Train and val clips differ even at the same position.
    assert not np.array_equal(
        _decode(os.path.join(a.root, "videos/train/00002.mp4")),
        _decode(os.path.join(a.root, clip)),
    )

    def mtimes(root):
        return {
            os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(root)
            for n in names
        }

    before = mtimes(a.root)
    assert write_demo_dataset(a.root, num_train=4, num_val=4, seed=5) == a
    assert mtimes(a.root) == before

    # Other parameters: rewritten, without clips of the old dataset left behind.
    write_demo_dataset(a.root, num_train=2, num_val=1, seed=5, codec="vp9")
    assert sorted(os.listdir(os.path.join(a.root, "videos", "train"))) == [
        "00000.webm",
        "00001.webm",
    ]


def test_partial_dataset_is_rewritten(tmp_path):
    root = str(tmp_path / "demo")
    demo = write_demo_dataset(root, num_train=4, num_val=4)
    os.remove(os.path.join(root, "videos", "train", "00003.mp4"))  # e.g. an interrupted copy
    write_demo_dataset(root, num_train=4, num_val=4)
    assert len(read_list(demo.train_list, data_root=root)) == 4
    os.remove(os.path.join(root, "demo.json"))  # an interrupted write never got this far
    clip = os.path.join(root, "videos", "val", "00000.mp4")
    os.utime(clip, ns=(0, 0))
    write_demo_dataset(root, num_train=4, num_val=4)
    assert os.path.exists(os.path.join(root, "demo.json"))
    assert os.stat(clip).st_mtime_ns != 0


def test_worker_processes_write_the_same_clips(tmp_path):
    one = write_demo_dataset(str(tmp_path / "one"), num_train=4, num_val=2, workers=1)
    two = write_demo_dataset(str(tmp_path / "two"), num_train=4, num_val=2, workers=2)
    for clip in ("videos/train/00003.mp4", "videos/val/00001.mp4"):
        assert _bytes(os.path.join(one.root, clip)) == _bytes(os.path.join(two.root, clip))


def test_vp9_is_deterministic(tmp_path):
    a = write_demo_dataset(str(tmp_path / "a"), num_train=1, num_val=1, codec="vp9")
    b = write_demo_dataset(str(tmp_path / "b"), num_train=1, num_val=1, codec="vp9")
    clip = "videos/train/00000.webm"
    assert _bytes(os.path.join(a.root, clip)) == _bytes(os.path.join(b.root, clip))


def test_demo_cache_is_rebuilt_when_its_settings_change(tmp_path, tiny_vit, capsys):
    """A cache built for other settings is left alone; the demo builds one for the new ones."""
    from evl.demo import build_demo_cache, demo_argv
    from pipelines.cache import read_manifest

    demo = write_demo_dataset(str(tmp_path / "demo"), num_train=4, num_val=2, num_frames=8)
    argv = demo_argv(demo, tiny_vit, str(tmp_path / "run")) + ["--num_workers", "0"]
    first = build_demo_cache(demo, tiny_vit, argv)
    assert build_demo_cache(demo, tiny_vit, argv) == first  # unchanged settings: reused
    assert capsys.readouterr().out.count("demo: caching") == 2  # train and val, once
    second = build_demo_cache(demo, tiny_vit, argv + ["--sampling_rate", "2"])
    assert second != first and "demo: caching" in capsys.readouterr().out
    for directory, rate in ((first, 1), (second, 2)):
        assert read_manifest(os.path.join(directory, "train"))["sampling_rate"] == rate
