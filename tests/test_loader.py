"""The PyAV pipeline: batches, determinism across workers, sharding, bad input (issue: data layer)."""

import logging
import os
import shutil

import pytest
import torch

from pipelines import PipelineConfig, TooManyBadVideos, build_pipeline
from pipelines.base import CLIP_MEAN, CLIP_STD
from pipelines.lists import read_list
from pipelines.epoch import train_shard
from pipelines.pyav import read_frames
from pipelines.sampling import ClipSampler
from pipelines.transforms import apply_spec


def cfg(demo, **kw):
    base = dict(list_path=demo.train_list, data_root=demo.root, num_classes=4, num_frames=4, sampling_rate=2,
                input_size=48, batch_size=4, num_workers=0, crop_scale=(0.3, 1.0), auto_augment=None, seed=3)
    base.update(kw)
    return PipelineConfig(**base)


def collect(pipe, epoch=0):
    pipe.set_epoch(epoch)
    return [(b.clips, b.labels, b.index, b.view) for b in pipe]


def test_batches_shape_dtype_and_normalisation(demo_data):
    pipe = build_pipeline("pyav", cfg(demo_data))
    batches = collect(pipe)
    assert len(batches) == len(pipe) == 32 // 4
    clips, labels, index, view = batches[0]
    assert clips.shape == (4, 3, 4, 48, 48) and clips.dtype == torch.float32
    assert labels.dtype == torch.int64 and (view == 0).all()
    pixels = clips * torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    records = read_list(demo_data.train_list, data_root=demo_data.root)
    assert labels.tolist() == [records[i].label for i in index.tolist()]


def test_cpu_batches_reuse_their_memory_only_once_nothing_refers_to_it(monkeypatch):
    """The float batches' memory is reused, but never while a batch, a view of it or an array
    made from it is still held: what a loop keeps stays as it was made."""
    from pipelines import base

    monkeypatch.setattr(base, "_float_batches", base._ReusedArrays(keep=2))  # this test's own
    gen = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 256, (2, 4, 16, 16, 3), dtype=torch.uint8, generator=gen) for _ in range(2)]

    def fresh(x):  # the same normalisation, in new memory
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1)
        return (x.permute(0, 4, 1, 2, 3).double() / 255 - mean) / std

    a = base.thwc_uint8_to_bcthw(frames[0], "cpu")
    b = base.thwc_uint8_to_bcthw(frames[1], "cpu")
    c = base.thwc_uint8_to_bcthw(frames[1], "cpu")  # a and b are held: new memory
    assert len({a.data_ptr(), b.data_ptr(), c.data_ptr()}) == 3
    where = a.data_ptr()
    view, array = a[:, :, ::2], a.numpy()
    del a
    d = base.thwc_uint8_to_bcthw(frames[1], "cpu")  # a's view and array are held
    assert d.data_ptr() != where
    del view
    e = base.thwc_uint8_to_bcthw(frames[1], "cpu")  # the array still is
    assert e.data_ptr() != where
    torch.testing.assert_close(torch.from_numpy(array.copy()).double(), fresh(frames[0]),
                               atol=1e-5, rtol=0)
    del array
    f = base.thwc_uint8_to_bcthw(frames[0], "cpu")  # nothing refers to a's memory now: reused
    assert f.data_ptr() == where
    for got, x in ((b, frames[1]), (c, frames[1]), (d, frames[1]), (e, frames[1]), (f, frames[0])):
        torch.testing.assert_close(got.double(), fresh(x), atol=1e-5, rtol=0)
    # Another batch size (an epoch's last batch, evaluation) takes the place of a free array.
    del b, f
    small = frames[0][:1]
    g = base.thwc_uint8_to_bcthw(small, "cpu")
    h = base.thwc_uint8_to_bcthw(frames[1], "cpu")
    torch.testing.assert_close(g.double(), fresh(small), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.double(), fresh(frames[1]), atol=1e-5, rtol=0)


class _Numbered(torch.utils.data.Dataset):
    """Item i: a clip whose every value is i, as ClipDataset's items look."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"clips": torch.full((1, 2, 4, 4, 3), i, dtype=torch.uint8), "label": 0, "index": [i], "view": [0],
                "failures": []}


def test_worker_batches_reuse_shared_memory_only_once_the_training_process_gives_it_back():
    """A worker writes a batch into a slot the training process has given back, never into one
    whose batch it still holds: what it keeps stays as it arrived, and with every slot held the
    worker uses new memory."""
    import functools

    from pipelines.workers import BatchSlots, collate

    def loader(slots):
        return torch.utils.data.DataLoader(_Numbered(), batch_size=1, num_workers=1, prefetch_factor=2,
                                           collate_fn=functools.partial(collate, slots=slots))

    slots = BatchSlots(num_workers=1, per_worker=3)
    kept = list(loader(slots))  # every batch and its lease kept
    assert [int(b["clips"].min()) for b in kept] == [int(b["clips"].max()) for b in kept] == list(range(12))
    assert sum("lease" in b for b in kept) == 3  # the rest came in new memory

    slots = BatchSlots(num_workers=1, per_worker=3)
    seen = []
    for b in loader(slots):
        assert b["clips"].unique().tolist() == [len(seen)]
        seen.append(b.pop("lease").slot)  # dropped here: the slot is given back
        del b
    assert len(seen) == 12 and set(seen) <= {0, 1, 2}  # every batch in a lent slot


def test_a_workers_clips_are_made_in_the_batchs_shared_memory(demo_data, tmp_path, monkeypatch):
    """In a worker, each clip is resized straight into the rows of a lent slot, one item after
    another, and collate hands that memory over without copying it: the batch is the one made
    without slots, in training (flipped clips among them) and in evaluation (six views per
    video; a video that fails leaves no gap)."""
    import types

    from pipelines import workers
    from pipelines.dataset import clip_specs

    root = tmp_path / "d"
    shutil.copytree(demo_data.root, root)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: types.SimpleNamespace(id=0))
    monkeypatch.setattr(workers, "_lenders", {})
    evaluation = dict(train=False, num_spatial_views=3, num_temporal_views=2)
    for split, kw in (("train", dict(hflip=0.5)), ("val", evaluation)):
        pipe = build_pipeline("pyav", cfg(demo_data, list_path=str(root / f"{split}.txt"), data_root=str(root), **kw))
        ds = pipe.dataset
        keys = [(1, i) for i in range(8)]
        if split == "train":
            assert 0 < sum(clip_specs(ds.sampler, True, k, ds.records[k[1]], ds.infos[k[1]])[0].flip for k in keys) < 8
        else:  # corrupted after probing: skipped
            with open(ds.records[2].path, "wb") as f:
                f.write(b"corrupted")
        plain = workers.collate([ds[k] for k in keys])
        ds.slots = workers.BatchSlots(num_workers=1, per_worker=2)
        items = ds.__getitems__(keys)
        batch = workers.collate(items)
        assert isinstance(items, workers._LaidOut) and "lease" in batch
        assert batch["clips"].data_ptr() == items.rows.data_ptr()
        views = 1 if split == "train" else 6
        assert batch["clips"].shape == plain["clips"].shape == (len(plain["index"]), 4, 48, 48, 3)
        assert len(plain["index"]) == (8 if split == "train" else 7) * views
        assert torch.equal(batch["clips"], plain["clips"])
        for name in ("labels", "index", "view"):
            assert batch[name].tolist() == plain[name].tolist()
        assert len(batch["failures"]) == len(plain["failures"]) == (split == "val")
    # Clips not made in place (more views than the slot has rows for): the batch is collated as
    # without slots, from clips taken off the slot first, and the same.
    load = ds.load
    monkeypatch.setattr(ds, "load", lambda key, into=None: load(key))
    items = ds.__getitems__(keys)
    assert not isinstance(items, workers._LaidOut)
    assert torch.equal(workers.collate(items, ds.slots)["clips"], plain["clips"])


def test_a_restarted_workers_slots_are_its_own(monkeypatch):
    """A worker that replaces another (same id, after a restart) takes over the slots its
    predecessor left lent, and a late lease of the predecessor does not free them."""
    import pickle
    import types

    from pipelines import workers

    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: types.SimpleNamespace(id=0))
    monkeypatch.setattr(workers, "_lenders", {})
    slots = workers.BatchSlots(num_workers=1, per_worker=1)
    _, first = slots.lend(64)
    assert slots.lend(64) is None  # its only slot is lent
    workers._lenders.clear()  # another process in the same worker's place
    storage, second = slots.lend(64)
    assert storage.nbytes() >= 64 and slots.lend(64) is None
    late = pickle.loads(pickle.dumps(first))  # the predecessor's batch reaches the training process
    del late
    assert slots.lend(64) is None  # still lent to the successor
    back = pickle.loads(pickle.dumps(second))
    del back
    assert slots.lend(64) is not None


def test_a_full_dev_shm_is_one_clear_error(demo_data, monkeypatch):
    """Workers that cannot allocate a batch's shared memory end the epoch with an OSError that
    names /dev/shm and what to change (the CLI prints an OSError as one line), not a worker's
    traceback."""
    import errno

    from pipelines.workers import SharedMemoryFull

    def full(nbytes):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2_3>: "
                           "No space left on device (28)")

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", staticmethod(full))  # the workers fork with it
    pipe = build_pipeline("pyav", cfg(demo_data, num_workers=1))
    with pytest.raises(SharedMemoryFull) as e:
        collect(pipe)
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert "/dev/shm" in str(e.value) and "--num_workers" in str(e.value) and "\n" not in str(e.value)
    pipe.close()


def test_clip_is_the_samplers_decision(demo_data):
    c = cfg(demo_data)
    pipe = build_pipeline("pyav", c)
    clips, _, index, _ = collect(pipe, epoch=2)[0]
    i = int(index[0])
    record = read_list(demo_data.train_list, data_root=demo_data.root)[i]
    sampler = ClipSampler(num_frames=4, sampling_rate=2, size=48, scale=(0.3, 1.0), seed=3)
    spec = sampler.train_clip(i, 2, num_frames_in_video=8, height=64, width=64)
    expect = apply_spec(read_frames(record.path, spec.frame_indices), spec, 48)
    got = (clips[0] * torch.tensor(CLIP_STD).view(3, 1, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)) * 255
    torch.testing.assert_close(got.permute(1, 2, 3, 0), expect.float(), atol=1e-3, rtol=0)


def test_a_clip_without_randaugment_reads_only_its_crop_box(demo_data):
    """A training clip without RandAugment has its frames read as the crop box alone; the clip is
    the one resized from the box of whole frames. A clip with the policy, and evaluation's views
    (several crops of the same frames), read whole frames."""
    from pipelines.augment import crop_resize
    from pipelines.randaugment import AugOp
    from pipelines.sampling import ClipSpec
    from pipelines.transforms import decode_clips

    path = read_list(demo_data.train_list, data_root=demo_data.root)[0].path
    crops = []

    def spy(path, indices, crop=None):
        crops.append(crop)
        return read_frames(path, indices, crop=crop)

    height, width = read_frames(path, [0]).shape[1:3]
    for frames, crop, flip in (((7, 1, 5, 5), (3, 7, 41, 55), True), ((0, 2, 4, 6), (1, 0, height - 1, width), False)):
        spec = ClipSpec(index=0, view=0, frame_indices=frames, crop=crop, flip=flip, aug_seed=0)
        want = crop_resize(read_frames(path, frames), crop, 48, flip)
        crops.clear()
        got = decode_clips(spy, path, [spec], 48)
        assert crops == [crop] and got.shape == (1, 4, 48, 48, 3) and torch.equal(got[0], want)
    solarize = ClipSpec(index=0, view=0, frame_indices=(0, 2), crop=(3, 7, 41, 55), flip=False, aug_seed=0,
                        augment=(AugOp("Solarize", 1.0, 128),))
    views = [ClipSpec(index=0, view=v, frame_indices=(0, 2), crop=(0, 16 * v, 40, 40), flip=False, aug_seed=0)
             for v in range(2)]
    crops.clear()
    decode_clips(spy, path, [solarize], 48), decode_clips(spy, path, views, 48)
    assert crops == [None, None]


def test_evaluation_views_are_each_their_frames_crop_resized(tmp_path):
    """Several views of one video (two temporal windows that share frames, crops that differ in
    both directions, a flip, one view with RandAugment): each is what its own frames, cropped and
    resized alone, give, whether written into given rows or returned."""
    from videos import encode_frames, photo_frames

    from pipelines.randaugment import AugOp
    from pipelines.sampling import ClipSpec
    from pipelines.transforms import apply_spec, decode_clips

    path = encode_frames(str(tmp_path / "v.mp4"), photo_frames(8, 64, 96), "libx264", gop=4)
    crops = ((0, 0, 48, 48), (8, 30, 48, 40), (16, 48, 40, 48))
    specs = [ClipSpec(index=0, view=3 * t + c, frame_indices=frames, crop=crop, flip=c == 1, aug_seed=0)
             for t, frames in enumerate(((0, 2, 4, 6), (3, 4, 5, 6))) for c, crop in enumerate(crops)]
    specs.append(ClipSpec(index=0, view=6, frame_indices=(0, 2, 4, 6), crop=(2, 3, 44, 50), flip=False,
                          aug_seed=0, augment=(AugOp("Solarize", 1.0, 128),)))
    want = torch.stack([apply_spec(read_frames(path, sp.frame_indices), sp, 32) for sp in specs])
    assert torch.equal(decode_clips(read_frames, path, specs, 32), want)
    rows = torch.full((len(specs), 4, 32, 32, 3), 7, dtype=torch.uint8)
    assert decode_clips(read_frames, path, specs, 32, out=rows) is rows and torch.equal(rows, want)


def test_crop_resize_matches_resizing_in_float():
    """The uint8 resize stays within one level of an antialiased bilinear resize in float."""
    import torch.nn.functional as F

    from pipelines.transforms import crop_resize

    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 90, 120, 3), generator=g, dtype=torch.uint8)
    frames[:, 30:60, 40:80] = 200  # flat regions and edges, not only noise
    for crop, size, flip in (((5, 10, 70, 90), 48, False), ((0, 0, 90, 120), 32, True), ((10, 20, 20, 20), 48, False)):
        top, left, h, w = crop
        box = frames[:, top:top + h, left:left + w].permute(0, 3, 1, 2).float()
        ref = F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        ref = ref.round().clamp(0, 255).permute(0, 2, 3, 1)
        if flip:
            ref = ref.flip(2)
        got = crop_resize(frames.numpy(), crop, size, flip)
        assert got.dtype == torch.uint8 and got.shape == (3, size, size, 3) and got.is_contiguous()
        diff = (got.float() - ref).abs()
        assert diff.max() <= 1 and diff.mean() < 0.3


def test_same_batches_with_any_worker_count_and_epochs_differ(demo_data):
    a = collect(build_pipeline("pyav", cfg(demo_data, num_workers=0)), epoch=1)
    b = collect(build_pipeline("pyav", cfg(demo_data, num_workers=2)), epoch=1)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    c = collect(build_pipeline("pyav", cfg(demo_data, num_workers=0)), epoch=2)
    assert not torch.equal(a[0][2], c[0][2])


@pytest.mark.gpu
def test_cuda_batches_through_pinned_memory_match_the_cpus(demo_data):
    """On CUDA each batch goes through pin_memory's thread and its slot is given back after the
    copy to the device: three epochs of batches match the CPU pipeline's, none written over."""
    cpu = build_pipeline("pyav", cfg(demo_data, num_workers=0))
    gpu = build_pipeline("pyav", cfg(demo_data, num_workers=2, device="cuda"))
    for epoch in range(3):
        for a, b in zip(collect(cpu, epoch), collect(gpu, epoch)):
            torch.testing.assert_close(b[0].cpu(), a[0], atol=1e-5, rtol=0)
            for u, v in zip(a[1:], b[1:]):
                assert torch.equal(u, v.cpu())
    gpu.close()


def test_augmented_clips_do_not_depend_on_workers_or_processes(demo_data):
    """RandAugment's ops are the clip's (seed, epoch, index) decision, like its frames and crop:
    the same pixels from 2 workers in 1 process as from 2 processes of 1 worker each."""
    recipe = "rand-m7-n4-mstd0.5-inc1"
    one = collect(build_pipeline("pyav", cfg(demo_data, auto_augment=recipe, num_workers=2)), epoch=1)
    clips = {int(i): c for batch in one for c, i in zip(batch[0], batch[2])}
    seen = 0
    for rank in range(2):
        shard = build_pipeline("pyav", cfg(demo_data, auto_augment=recipe, batch_size=2, rank=rank, world_size=2))
        for batch in collect(shard, epoch=1):
            for c, i in zip(batch[0], batch[2]):
                assert torch.equal(c, clips[int(i)])
                seen += 1
    assert seen == len(clips) == 32
    plain = collect(build_pipeline("pyav", cfg(demo_data, num_workers=0)), epoch=1)
    changed = sum(not torch.equal(a, b) for x, y in zip(one, plain) for a, b in zip(x[0], y[0]))
    assert changed > 20  # the policy changed most clips (a clip draws no op with probability 1/16)


def test_global_batches_do_not_depend_on_process_count():
    order = list(range(100, 120))
    one = train_shard(order, 8, 0, 1)
    two = [train_shard(order, 4, r, 2) for r in range(2)]
    assert one == order[:16]
    assert sorted(two[0][:4] + two[1][:4]) == sorted(one[:8])
    assert sorted(two[0][4:] + two[1][4:]) == sorted(one[8:])


def test_eval_views_and_two_rank_sharding_count_every_video_once(demo_data):
    base = dict(list_path=demo_data.val_list, train=False, num_spatial_views=3, num_temporal_views=2,
                batch_size=5)
    seen = []
    for rank in range(2):
        for _, _, index, view in collect(build_pipeline("pyav", cfg(demo_data, rank=rank, world_size=2, **base))):
            seen += list(zip(index.tolist(), view.tolist()))
    assert sorted(seen) == [(i, v) for i in range(12) for v in range(6)]


def test_bad_videos_are_excluded_up_front_with_a_report(demo_data, tmp_path, caplog):
    root = tmp_path / "d"
    shutil.copytree(demo_data.root, root)
    (root / "videos/train/00003.mp4").write_bytes(b"not a video")
    with caplog.at_level(logging.WARNING):
        pipe = build_pipeline("pyav", cfg(demo_data, list_path=str(root / "train.txt"), data_root=str(root),
                                          max_bad_fraction=0.05))
    assert pipe.num_samples == 31
    assert "00003.mp4" in caplog.text and "1 of 32 videos are unreadable or out of range" in caplog.text
    with pytest.raises(TooManyBadVideos, match="00003.mp4"):
        build_pipeline("pyav", cfg(demo_data, list_path=str(root / "train.txt"), data_root=str(root),
                                   max_bad_fraction=0.01))


def test_video_failing_mid_epoch_is_replaced_counted_and_limited(demo_data, tmp_path, caplog):
    root = tmp_path / "d"
    shutil.copytree(demo_data.root, root)
    pipe = build_pipeline("pyav", cfg(demo_data, list_path=str(root / "train.txt"), data_root=str(root),
                                      max_bad_fraction=0.1))
    (root / "videos/train/00005.mp4").write_bytes(b"corrupted after probing")
    with caplog.at_level(logging.WARNING):
        batches = collect(pipe)
    assert sum(len(b[1]) for b in batches) == 32  # replaced, not dropped
    assert 5 not in torch.cat([b[2] for b in batches]).tolist()
    assert [p for p, _ in pipe.bad] == [str(root / "videos/train/00005.mp4")]
    assert "1 unreadable video(s) replaced" in caplog.text
    # The report names the file once: the reason is the reader's, without the path again.
    reason = pipe.bad[0][1]
    assert reason.startswith("cannot open: ") and "00005.mp4" not in reason and "Errno" not in reason
    for i in (1, 2, 7, 9):
        (root / f"videos/train/0000{i}.mp4").write_bytes(b"")
    with pytest.raises(TooManyBadVideos, match="unreadable videos in one epoch"):
        collect(pipe, epoch=1)


def test_dummy_pipeline_shapes(demo_data):
    pipe = build_pipeline("dummy", cfg(demo_data, train=False, num_temporal_views=3, list_path=demo_data.val_list))
    batches = list(pipe)
    assert sum(len(b.labels) for b in batches) == 12 * 3
    assert batches[0].clips.shape == (12, 3, 4, 48, 48)


def test_unknown_pipeline_name():
    with pytest.raises(ValueError, match="unknown pipeline 'nvdec'"):
        build_pipeline("nvdec", PipelineConfig(list_path=None, num_classes=2))


def _probe_rank(rank: int, init_file: str, list_path: str, root: str, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    from pipelines import probe
    from pipelines.dataset import load_dataset

    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    probed = []
    one = probe._probe_one
    probe._probe_one = lambda path: probed.append(path) or one(path)
    records, infos = load_dataset(cfg_for_probe(list_path, root))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"probed": len(probed), "videos": len(records), "frames": [i.num_frames for i in infos]}, f)
    dist.destroy_process_group()


def cfg_for_probe(list_path, root):
    return PipelineConfig(list_path=list_path, num_classes=4, num_frames=4, sampling_rate=2, input_size=48,
                          batch_size=4, train=True, data_root=root, num_workers=0)


@pytest.mark.slow
def test_one_rank_per_node_probes_the_others_read_its_cache(demo_data, tmp_path):
    import json
    import shutil

    import launch

    list_path = str(tmp_path / "train.txt")
    shutil.copy(demo_data.train_list, list_path)  # a list with no probe cache yet
    launch.spawn(_probe_rank, args=(str(tmp_path / "init"), list_path, demo_data.root, str(tmp_path)), nprocs=2)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["probed"] == ranks[0]["videos"] == 32 and ranks[1]["probed"] == 0
    assert ranks[0]["frames"] == ranks[1]["frames"]


EXIT_WITH_LIVE_WORKERS = """
import sys
from pipelines import PipelineConfig, build_pipeline
root = sys.argv[1]
cfg = PipelineConfig(list_path=root + "/train.txt", data_root=root, num_classes=4, num_frames=4, sampling_rate=2,
                     input_size=64, batch_size=4, num_workers=2)
pipe = build_pipeline("pyav", cfg)
pipe.set_epoch(0)
it = iter(pipe)  # left alive: Python's exit ends the daemonic workers with SIGTERM, then waits
print(tuple(next(it).clips.shape), flush=True)
"""


def test_exit_with_live_workers_does_not_hang(demo_data):
    """Workers ignore the SIGTERM a scheduler sends the whole process group (the training
    process decides when to stop), but not the one Python's exit sends them: ignoring that
    one hung every script that exited with a live iterator."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", EXIT_WITH_LIVE_WORKERS, demo_data.root], capture_output=True,
                          text=True, timeout=60, cwd=root, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(4, 3, 4, 64, 64)" and "exited unexpectedly" not in proc.stderr


def test_segments_past_the_end_of_their_video_are_reported_by_line(demo_data, tmp_path, caplog):
    """`<path> <label> 5.0 10.0` on a 0.3 s video trained on one repeated frame: such a line is
    left out and named; one that only runs over the end is warned about."""
    from pipelines.dataset import load_dataset

    video = read_list(demo_data.train_list, data_root=demo_data.root)[0].path  # 8 frames
    lines = f"{video} 0 0.0 0.2\n{video} 1 5.0 10.0\n{video} 2 0.1 3.0\n"
    (tmp_path / "segments.txt").write_text(lines)
    c = cfg(demo_data, list_path=str(tmp_path / "segments.txt"), max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        records, _ = load_dataset(c)
    assert [r.label for r in records] == [0, 2]
    assert f"segments.txt:2: segment 5-10 s of {video}: starts after the video's end" in caplog.text
    assert "segments.txt:3: segment 0.1-3 s" in caplog.text and "ends after the video's end" in caplog.text
    with pytest.raises(TooManyBadVideos, match="segments.txt:2"):
        load_dataset(cfg(demo_data, list_path=str(tmp_path / "segments.txt"), max_bad_fraction=0.0))


def _logged_read(log_path, path, frame_indices, crop=None):
    with open(log_path, "a") as f:
        f.write(f"{os.path.basename(path)} {' '.join(map(str, frame_indices))}\n")
    return read_frames(path, frame_indices, crop=crop)


def test_training_workers_run_ahead_into_the_next_epoch_with_the_same_clips(demo_data, tmp_path):
    """Reading epochs one after another through one pipeline, its workers decode the next
    epoch's first clips before the training process asks for that epoch (no idle drain at an
    epoch's end), and every epoch still gives the batches a fresh pipeline gives it: after a
    full epoch, after one left early and when resuming mid-epoch."""
    import functools
    import time
    from collections import Counter

    from pipelines.dataset import clip_specs
    from pipelines.workers import DecodingPipeline

    def batches(pipe, epoch, skip=0, limit=None):
        pipe.set_epoch(epoch, skip_batches=skip)
        out = []
        for b in pipe:
            out.append((b.clips, b.labels, b.index, b.view))
            if len(out) == limit:
                break
        return out

    def same(a, b):
        assert len(a) == len(b)
        assert all(torch.equal(u, v) for x, y in zip(a, b) for u, v in zip(x, y))

    log = tmp_path / "reads.txt"
    c = cfg(demo_data, num_workers=2)
    pipe = DecodingPipeline(c, functools.partial(_logged_read, str(log)))
    first = batches(pipe, 0)
    n = 32  # clips in an epoch
    deadline = time.monotonic() + 30
    while len(log.read_text().splitlines()) <= n and time.monotonic() < deadline:
        time.sleep(0.05)
    reads = Counter(log.read_text().splitlines())
    assert sum(reads.values()) > n  # epoch 1 is being decoded before it is asked for ...
    ds = pipe.dataset

    def epoch_reads(epoch):
        specs = [clip_specs(ds.sampler, True, (epoch, i), ds.records[i], ds.infos[i])[0] for i in range(n)]
        return Counter(f"{os.path.basename(r.path)} {' '.join(map(str, s.frame_indices))}"
                       for r, s in zip(ds.records, specs))

    assert not reads - epoch_reads(0) - epoch_reads(1)  # ... and they are epoch 1's own clips
    second = batches(pipe, 1)
    fresh = build_pipeline("pyav", cfg(demo_data, num_workers=0))
    same(first, batches(fresh, 0))
    same(second, batches(fresh, 1))
    left = batches(pipe, 2, limit=3)  # left early: the next epoch starts afresh, at its own start
    same(left, batches(fresh, 2)[:3])
    same(batches(pipe, 3), batches(fresh, 3))
    same(batches(pipe, 4, skip=5), batches(fresh, 4, skip=5))  # a resume mid-epoch
    same(batches(pipe, 5), batches(fresh, 5))  # continues from the resumed epoch's end
    pipe.close()
