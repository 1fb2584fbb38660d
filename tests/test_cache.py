"""The feature cache: live-path equivalence, manifest checks, resumable build, corruption, training."""

import os
import re
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evl.cache as cache_cli
from evl.decoder import attention_features
from pipelines import PipelineConfig
from pipelines.base import thwc_uint8_to_bcthw
from pipelines.cache import CacheError, CacheMismatch, CachePipeline, train_views
from conftest import build_tiny

FRAMES, STRIDE, VIEWS, LAYERS = 4, 2, 2, 2


def build_argv(data, split, output, *extra):
    return ["build", "--split", split, "--list_path", data.demo.train_list if split == "train" else data.demo.val_list,
            "--data_root", data.demo.root, "--backbone", data.tiny_vit, "--backbone_path", data.weights,
            "--num_frames", str(FRAMES), "--sampling_rate", str(STRIDE), "--num_views", str(VIEWS),
            "--num_temporal_views", "2", "--auto_augment", "none", "--crop_scale", "0.5", "1",
            "--decoder_num_layers", str(LAYERS), "--output", str(output), "--num_workers", "0",
            "--shard_clips", "3", "--batch_size", "6", "--device", "cpu", "--no_progress", *extra]


def fails(capsys, pattern: str, argv: list) -> None:
    """``python -m evl.cache ARGV`` stops with exit status 1 and one error line matching ``pattern``."""
    with pytest.raises(SystemExit) as e:
        cache_cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and re.search(pattern, err), err


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_vit):
    from evl.demo import write_demo_dataset

    tmp = tmp_path_factory.mktemp("cache")
    demo = write_demo_dataset(str(tmp / "demo"), num_train=8, num_val=4, num_frames=8)
    weights = str(tmp / "tiny-visual.pt")
    torch.save(build_tiny(tiny_vit, seed=3).backbone.visual.state_dict(), weights)
    d = namedtuple("Data", "demo weights root tiny_vit")(demo, weights, str(tmp / "features"), tiny_vit)
    for split in ("train", "val"):
        cache_cli.main(build_argv(d, split, d.root))
    return d


def model_for(data, **kw):
    return build_tiny(data.tiny_vit, num_classes=4, num_frames=FRAMES, decoder_num_layers=LAYERS,
                      backbone_path=data.weights, **kw)


def pipe_cfg(data, train=True, **kw):
    base = dict(list_path=data.demo.train_list if train else data.demo.val_list, num_classes=4, num_frames=FRAMES,
                sampling_rate=STRIDE, input_size=64, batch_size=4, train=train, data_root=data.demo.root,
                num_temporal_views=2, crop_scale=(0.5, 1.0), extra={"feature_cache": data.root})
    base.update(kw)
    return PipelineConfig(**base)


def test_cached_loss_and_gradients_equal_the_live_path(data):
    from pipelines.dataset import load_dataset, make_sampler
    from pipelines.workers import ClipDataset
    from pipelines.pyav import read_frames

    model = model_for(data).eval()  # no dropout: the two paths must see the same function
    with torch.no_grad():
        for p in model.parameters():  # non-zero w1/w2 etc., so every cached field matters
            p.normal_(0, 0.05)
    cfg = pipe_cfg(data, extra={"feature_cache": data.root, "model_config": model.config})
    pipe = CachePipeline(cfg)
    pipe.set_epoch(1)
    batch = next(iter(pipe))
    # Live: the same clips, decoded and run through the backbone, with the view the cache chose.
    records, infos = load_dataset(cfg)
    ds = ClipDataset(records, infos, make_sampler(cfg), read_frames, train=True)
    views = train_views(cfg.seed, 1, len(pipe.records), VIEWS)
    keys = [(int(views[i]), int(i)) for i in batch.index]
    clips = thwc_uint8_to_bcthw(torch.cat([ds.load(k)[0] for k in keys]), "cpu")
    live_feats = attention_features(model.forward_features(clips))
    # Each field a contiguous tensor of its own: strided views made the decoder copy them.
    assert all(t.is_contiguous() for f in batch.features for t in f)
    for live, cached in zip(live_feats, batch.features):
        for a, b in zip(live, cached):
            torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)

    def loss_and_grads(**inputs):
        model.zero_grad()
        loss = F.cross_entropy(model(**inputs), batch.labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_live, grads_live = loss_and_grads(clips=clips)
    loss_cache, grads_cache = loss_and_grads(features=batch.features)
    torch.testing.assert_close(loss_cache, loss_live, atol=1e-3, rtol=1e-3)
    for gc, gl in zip(grads_cache, grads_live):
        torch.testing.assert_close(gc, gl, atol=2e-3, rtol=2e-2)
    assert any(g.abs().sum() > 0 for g in grads_cache)


def test_manifest_mismatch_names_the_fields(data):
    other = build_tiny(data.tiny_vit, num_classes=4, num_frames=FRAMES, decoder_num_layers=3)  # random backbone
    cfg = pipe_cfg(data, sampling_rate=4, extra={"feature_cache": data.root, "model_config": other.config})
    with pytest.raises(CacheMismatch) as e:
        CachePipeline(cfg)
    msg = str(e.value)
    for field in ("sampling_rate", "backbone_sha256", "decoder_num_layers"):
        assert field in msg
    assert "num_frames" not in msg
    with pytest.raises(CacheMismatch, match="num_temporal_views"):
        CachePipeline(pipe_cfg(data, train=False, num_temporal_views=3))


def test_random_backbone_cache_is_tied_to_its_seed(data, tmp_path):
    """Without a weights file the backbone is the seed's: another seed is another backbone."""
    out = tmp_path / "features"
    argv = build_argv(data, "train", out)
    i = argv.index("--backbone_path")
    cache_cli.main(argv[:i] + argv[i + 2:] + ["--seed", "5"])
    model = build_tiny(data.tiny_vit, seed=5, num_classes=4, num_frames=FRAMES, decoder_num_layers=LAYERS)
    cfg = dict(extra={"feature_cache": str(out), "model_config": model.config})
    CachePipeline(pipe_cfg(data, seed=5, **cfg))
    with pytest.raises(CacheMismatch, match="seed: cache 5, this run 0"):
        CachePipeline(pipe_cfg(data, seed=0, **cfg))


def test_sharding_padded_for_training_exact_for_eval(data):
    train = [CachePipeline(pipe_cfg(data, batch_size=2, rank=r, world_size=3)) for r in range(3)]
    assert len({len(p) for p in train}) == 1
    seen = []
    for r in range(3):
        p = CachePipeline(pipe_cfg(data, train=False, batch_size=1, rank=r, world_size=3))
        for b in p:
            assert b.features[0].out.shape == (2, FRAMES, 17, 64)  # two temporal views per video
            seen += b.index.tolist()
    assert sorted(seen) == sorted(list(range(4)) * 2)  # every video once, all its views
    mem = CachePipeline(pipe_cfg(data, extra={"feature_cache": data.root, "cache_in_memory": True}))
    assert not isinstance(mem.store.shards[0], np.memmap)


def test_training_views_and_checksums(data, monkeypatch):
    """Views: one draw per epoch, the same whatever the batch size or rank; every view gets used.
    Checksums: each row's CRC-32 is computed once however often the row is read."""
    import pipelines.cache as pc

    n = 8
    assert np.array_equal(train_views(0, 3, n, VIEWS), train_views(0, 3, n, VIEWS))
    assert set(np.concatenate([train_views(0, e, n, VIEWS) for e in range(8)]).tolist()) == set(range(VIEWS))
    assert not all(np.array_equal(train_views(0, 0, n, VIEWS), train_views(0, e, n, VIEWS)) for e in range(1, 8))

    def used(**kw):
        got = {}
        for rank in range(kw.get("world_size", 1)):
            pipe = CachePipeline(pipe_cfg(data, rank=rank, **kw))
            pipe.set_epoch(2)
            for b in pipe:
                rows = b.features[0].out.flatten(1)
                for i, r in zip(b.index.tolist(), rows):
                    got[i] = r
        return got

    one, two = used(batch_size=4), used(batch_size=2, world_size=2)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[i], two[i]) for i in one)

    calls = []
    crc32 = pc.zlib.crc32
    monkeypatch.setattr(pc.zlib, "crc32", lambda b: calls.append(1) or crc32(b))
    pipe = CachePipeline(pipe_cfg(data, batch_size=4))
    rows = set()
    for epoch in range(6):
        pipe.set_epoch(epoch)
        views = train_views(0, epoch, len(pipe.records), VIEWS)
        for b in pipe:
            rows.update((i, int(views[i])) for i in b.index.tolist())
    assert len(calls) == len(rows) < 6 * len(pipe) * 4


def test_read_ahead_thread_runs_no_torch(data, monkeypatch):
    """The read-ahead thread must stay numpy-only: a torch op there starts a second OpenMP team,
    and with more OpenMP threads than cores the training step ran at half speed."""
    import threading

    threads, from_numpy = [], torch.from_numpy

    def recording(array):
        threads.append(threading.current_thread())
        return from_numpy(array)

    monkeypatch.setattr(torch, "from_numpy", recording)
    batches = list(CachePipeline(pipe_cfg(data)))
    assert batches and threads
    assert all(t is threading.main_thread() for t in threads)


def test_interrupted_build_resumes_and_never_reads_a_partial_shard(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "features"
    replace, published = os.replace, []

    def crash_publishing_shard_1(src, dst):
        if os.path.basename(dst) == "shard-00001.npy":  # fully written under its temp name, never renamed
            raise RuntimeError("simulated crash")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_publishing_shard_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache_cli.main(build_argv(data, "train", out))
    split = out / "train"
    assert (split / "shard-00000.npy").exists() and (split / ".tmp-shard-00001.npy").exists()
    assert not (split / "manifest.json").exists()
    with pytest.raises(CacheError, match="interrupted build"):
        CachePipeline(pipe_cfg(data, extra={"feature_cache": str(out)}))
    first = os.stat(split / "shard-00000.npy")

    def publishing(src, dst):
        if os.path.basename(dst).startswith("shard-") and dst.endswith(".npy"):
            published.append(int(os.path.basename(dst)[6:11]))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", publishing)
    manifest = cache_cli.main(build_argv(data, "train", out))
    assert published == [1, 2]  # shard 0 was kept, not recomputed
    assert os.stat(split / "shard-00000.npy").st_mtime_ns == first.st_mtime_ns
    assert not any(n.startswith(".tmp-") for n in os.listdir(split))
    ref = CachePipeline(pipe_cfg(data)).store
    got = CachePipeline(pipe_cfg(data, extra={"feature_cache": str(out)})).store
    rows = np.arange(manifest["num_clips"] * VIEWS)
    np.testing.assert_allclose(got.read(rows).astype(np.float32), ref.read(rows).astype(np.float32), atol=1e-3)
    # A different setting on the same directory is refused, naming it.
    fails(capsys, "num_views", build_argv(data, "train", out) + ["--num_views", "3"])


def test_disk_filling_up_during_the_build_is_a_clear_error(data, tmp_path, monkeypatch, capsys):
    """The space check passed, then the disk filled up: the next shard's blocks cannot be
    reserved, which is an error naming the shard (not a SIGBUS on a memory-mapped store), and
    the shards already written are kept for the rerun."""
    import errno

    out = tmp_path / "features"
    reserve, shards = os.posix_fallocate, []

    def full_after_first(fd, offset, size):
        shards.append(size)
        if len(shards) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return reserve(fd, offset, size)

    monkeypatch.setattr(os, "posix_fallocate", full_after_first)
    fails(capsys, r"no disk space left for feature cache shard .*\.tmp-shard-00001\.npy",
          build_argv(data, "train", out))
    assert (out / "train" / "shard-00000.npy").exists()
    monkeypatch.setattr(os, "posix_fallocate", reserve)
    manifest = cache_cli.main(build_argv(data, "train", out))
    assert len(manifest["shards"]) == 3


def test_corrupted_shard_is_detected(data, tmp_path, capsys):
    root = tmp_path / "features"
    shutil.copytree(data.root, root)
    shard = root / "train" / "shard-00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 8] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 8])
    shard.write_bytes(bytes(raw))
    pipe = CachePipeline(pipe_cfg(data, extra={"feature_cache": str(root)}))
    with pytest.raises(CacheError, match="shard-00001.npy is corrupted"):
        for epoch in range(20):  # a training epoch reads one of each clip's views
            pipe.set_epoch(epoch)
            for _ in pipe:
                pass
    fails(capsys, "shard-00001.npy is corrupted", ["verify", str(root)])
    shard.write_bytes(bytes(raw[:-100]))  # truncated: caught when the cache is opened
    with pytest.raises(CacheError, match="shard-00001.npy"):
        CachePipeline(pipe_cfg(data, extra={"feature_cache": str(root)}))


def test_build_refuses_without_disk_space(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cache_cli.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    fails(capsys, r"not enough disk space .* bytes .* still to write, 1,000 bytes",
          build_argv(data, "val", tmp_path / "features"))


def test_train_main_from_the_cache(data, tmp_path):
    from evl.train import main

    argv = ["--pipeline", "cache", "--feature_cache", data.root, "--backbone", data.tiny_vit,
            "--backbone_path", data.weights, "--num_classes", "4", "--num_frames", str(FRAMES),
            "--decoder_num_layers", str(LAYERS), "--sampling_rate", str(STRIDE), "--num_temporal_views", "2",
            "--auto_augment", "none", "--crop_scale", "0.5", "1", "--train_list_path", data.demo.train_list,
            "--val_list_path", data.demo.val_list, "--data_root", data.demo.root, "--batch_size", "4",
            "--num_steps", "4", "--eval_freq", "4", "--save_freq", "4", "--print_freq", "2", "--lr", "1e-3",
            "--device", "cpu", "--output_dir", str(tmp_path / "run")]
    result = main(argv)
    assert result["step"] == 4 and np.isfinite(result["loss"]) and "best_top1" in result
    assert (tmp_path / "run" / "checkpoint-4.pth").exists()
    from evl.config import parse_config
    from evl.train import train

    argv[argv.index("--sampling_rate") + 1] = "3"
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "other")
    with pytest.raises(CacheMismatch, match="sampling_rate"):
        train(parse_config(argv))


@pytest.mark.slow
def test_build_under_torchrun_shares_the_shards(data, tmp_path):
    """Two processes build one cache: each writes its share of the shards, rank 0 the manifest;
    the cache equals the one-process build (fp16 features within rounding of the batches)."""
    import launch

    from pipelines.cache import read_manifest

    root = tmp_path / "two"
    codes, out, err = launch.run_ranks("evl.cache", build_argv(data, "train", root), tmp_path / "logs")
    log = out + err
    assert codes == [0, 0], log
    assert "rank 0: 2 shard(s) to write [0, 2]" in log and "rank 1: 1 shard(s) to write [1]" in log
    one, two = os.path.join(data.root, "train"), str(root / "train")
    m1, m2 = read_manifest(one), read_manifest(two)
    per_shard = ("sha256", "row_crc32")
    assert {k: v for k, v in m1.items() if k not in ("shards", "list_path")} == \
        {k: v for k, v in m2.items() if k not in ("shards", "list_path")}
    assert [{k: v for k, v in s.items() if k not in per_shard} for s in m1["shards"]] == \
        [{k: v for k, v in s.items() if k not in per_shard} for s in m2["shards"]]
    for s in m1["shards"]:
        a, b = np.load(os.path.join(one, s["file"])), np.load(os.path.join(two, s["file"]))
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-2, atol=1e-3)
    CachePipeline(pipe_cfg(data, extra={"feature_cache": str(root)}))  # it reads, checksums and all


def test_resume_from_the_cache_continues_exactly(data, tmp_path):
    """8 clips, batch 4: 2 steps an epoch, so a resume at step 3 is mid-epoch 1, with the views
    of epoch 1 (train_views) and the dropout stream of the checkpoint."""
    import shutil as sh

    from evl.train import main
    from evl.weights import safe_load

    def argv(out, *extra):
        return ["--pipeline", "cache", "--feature_cache", data.root, "--backbone", data.tiny_vit,
                "--backbone_path", data.weights, "--num_classes", "4", "--num_frames", str(FRAMES),
                "--decoder_num_layers", str(LAYERS), "--sampling_rate", str(STRIDE), "--num_temporal_views", "2",
                "--auto_augment", "none", "--crop_scale", "0.5", "1", "--train_list_path", data.demo.train_list,
                "--data_root", data.demo.root, "--batch_size", "4", "--num_steps", "6", "--eval_freq", "100",
                "--save_freq", "3", "--keep_last", "3", "--lr", "1e-3", "--device", "cpu", "--output_dir", str(out),
                *extra]

    main(argv(tmp_path / "full"))
    (tmp_path / "part").mkdir()
    sh.copy(tmp_path / "full" / "checkpoint-3.pth", tmp_path / "part" / "checkpoint-3.pth")
    main(argv(tmp_path / "part", "--auto_resume"))
    a, b = (safe_load(str(tmp_path / d / "checkpoint-6.pth"))["model"] for d in ("full", "part"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_json_write_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import errno

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_cli.os, "fsync", no_space)
    path = tmp_path / "manifest.json"
    with pytest.raises(CacheError, match=r"could not write .*manifest\.json \(No space left on device\)"):
        cache_cli._write_json_atomic(str(path), {"a": 1})
    assert os.listdir(tmp_path) == []


def test_undecodable_videos_past_the_limit_leave_the_cache_incomplete(data, tmp_path, monkeypatch, capsys):
    """The build applies --max_bad_fraction as live training does (it left 8% of the videos out
    with a warning and exit 0), and training refuses a cache with more bad clips than it allows."""
    import json

    from pipelines.base import TooManyBadVideos
    from pipelines.workers import ClipDataset

    load = ClipDataset.load

    def two_break(self, key, into=None):
        if key[1] in (2, 5):
            raise OSError("simulated decoding failure")
        return load(self, key, into)

    monkeypatch.setattr(ClipDataset, "load", two_break)
    out = tmp_path / "features"
    fails(capsys, r"2 of 8 videos could not be decoded, more than --max_bad_fraction \(10\.0%\)",
          build_argv(data, "train", out, "--max_bad_fraction", "0.1"))
    assert not (out / "train" / "manifest.json").exists()
    shards = sorted(p.name for p in (out / "train").glob("shard-*.npy"))
    assert len(shards) == 3  # every shard written is kept
    cache_cli.main(build_argv(data, "train", out, "--max_bad_fraction", "0.3"))  # completes from the kept shards
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert sorted(int(i) for sh in manifest["shards"] for i in sh["bad"]) == [2, 5]
    with pytest.raises(TooManyBadVideos, match="2 unreadable videos in one epoch of 8"):
        CachePipeline(pipe_cfg(data, extra={"feature_cache": str(out)}, max_bad_fraction=0.1))
    assert len(CachePipeline(pipe_cfg(data, extra={"feature_cache": str(out)}, max_bad_fraction=0.3)).valid) == 6


def test_a_full_disk_when_a_shard_is_created_names_the_shard(data, tmp_path, monkeypatch, capsys):
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_cli.np.lib.format, "open_memmap", no_space)
    fails(capsys, r"could not create feature cache shard .*\.tmp-shard-00000\.npy "
                  r"\(No space left on device\): the shards written so far are kept",
          build_argv(data, "train", tmp_path / "features"))
