"""benchmarks/throughput.py runs and reports what it promises (no timing assertions: numbers are
for people, not for tests)."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput", os.path.join(ROOT, "benchmarks", "throughput.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vit_b16_macs_match_the_paper():
    from evl.backbone import resolve_backbone

    macs = load_benchmark().vit_macs_per_frame(resolve_backbone("ViT-B-16"))
    assert macs / 1e9 == pytest.approx(17.6, abs=0.05)  # evl-spec §1.5
    assert load_benchmark().vit_macs_per_frame(resolve_backbone("ViT-L-14")) / 1e9 == pytest.approx(81.1, abs=0.1)


def small_run(tiny_vit, demo_data) -> list[str]:
    """The benchmark on the tests' small demo set and tiny backbone (4 frames at stride 2)."""
    return ["--train_list", demo_data.train_list, "--data_root", demo_data.root, "--backbone", tiny_vit,
            "--num_classes", "4", "--num_frames", "4", "--sampling_rate", "2", "--device", "cpu"]


def test_benchmark_reports_every_stage(tmp_path, capsys, tiny_vit, demo_data):
    report = load_benchmark().main([
        "--stages", "data,model,train,cache", "--pipelines", "dummy,pyav,cache", "--iters", "1", "--repeats", "1",
        "--warmup", "1", "--min_seconds", "0", "--batch_size", "4", "--num_workers", "0", "--cache_views", "1",
        "--work_dir", str(tmp_path), *small_run(tiny_vit, demo_data),
        "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    rows = {(r["stage"], r.get("pipeline")): r for r in report["results"]}
    for key in (("data", "dummy"), ("data", "pyav"), ("model", "synthetic"), ("train", "pyav"), ("cache", "cache")):
        assert rows[key]["clips_per_s"] > 0, key
    assert "x live PyAV" in out
    assert len(os.listdir(tmp_path / "feature_cache")) == 1  # built under --work_dir, nowhere else
    pyav = rows["data", "pyav"]
    assert pyav["frames_per_clip"] >= 4 and pyav["ceiling_clips_per_s"] > 0
    # The ceiling is the faster of its measurements on either side of the pass.
    before, after = pyav["decode_fps_before_after"]
    assert min(before, after) > 0 and pyav["decode_fps"] == max(before, after)
    assert pyav["ceiling_clips_per_s"] == pytest.approx(pyav["decode_fps"] / pyav["frames_per_clip"])
    assert "before and" in out and "after the pass" in out
    # The reader decodes each clip's 4 frames at least; never more than the frames it needs.
    assert 4 <= pyav["pyav_decoded_frames_per_clip"] <= pyav["frames_per_clip"]
    assert pyav["main_cpu_ms_per_clip"] > 0  # no worker processes here (--num_workers 0)
    mem = rows["memory", None]
    # What no_grad saves: a trainable tower keeps its activations and gets gradients.
    assert mem["trainable_backbone"]["activations_mb"] > 2 * mem["frozen_backbone"]["activations_mb"]
    assert mem["trainable_backbone"]["grads_mb"] > mem["frozen_backbone"]["grads_mb"]
    assert "decode ceiling" in out and "memory" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["versions"]["torch"] and saved["config"]["num_frames"] == 4


def test_train_flags_reach_the_model_config(tmp_path, tiny_vit, demo_data):
    """``--train_flags``: a decoder variant measured by the same harness."""
    bench = load_benchmark()
    args = bench.build_parser().parse_args([
        "--work_dir", str(tmp_path), "--device", "cpu", "--train_list", demo_data.train_list, "--data_root",
        demo_data.root, "--backbone", tiny_vit, "--num_classes", "4",
        "--train_flags", "--no_temporal_conv --decoder_num_layers 2"])
    cfg = bench.setup(args)
    assert not cfg.enable_temporal_conv and cfg.decoder_num_layers == 2 and cfg.enable_temporal_cross_attention
    assert bench.make_model(cfg, "cpu").decoder.num_layers == 2


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")
def test_children_cpu_counts_a_busy_child():
    """The data stage's per-clip CPU of the worker processes: a child that spins for 0.4 s of
    CPU shows up while it lives; the parent's own CPU does not."""
    import subprocess
    import sys
    import time

    bench = load_benchmark()
    before = bench.children_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", "import time, sys\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.4: pass\nprint(1, flush=True)\nsys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "1"  # it has spun, and waits
        t = time.process_time()
        while time.process_time() - t < 0.2:  # the parent spinning must not count
            pass
        spent = bench.children_cpu_seconds() - before
    finally:
        child.communicate("")
    assert 0.35 <= spent < 0.6


# The flags the reference's create_train_loader and VideoDataset read (its video_dataset/dataloader.py).
REFERENCE_FLAGS = {"train_list_path", "train_data_root", "data_root", "batch_size", "num_steps", "num_workers",
                   "dummy_dataset", "auto_augment", "interpolation", "mirror", "num_frames", "sampling_rate",
                   "tsn_sampling", "spatial_size", "mean", "std"}

FAKE_REFERENCE = '''
import json, os, torch

def create_train_loader(args):
    with open(os.path.join(os.path.dirname(__file__), "args.json"), "w") as f:
        json.dump(vars(args), f)
    data = [(torch.zeros(3, args.num_frames, args.spatial_size, args.spatial_size), 0)] * (args.num_steps * args.batch_size)
    return torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=args.num_workers, drop_last=True)
'''


def test_reference_loader_adapter(tmp_path, capsys, tiny_vit, demo_data):
    """`--pipelines reference` runs the reference's own create_train_loader from a checkout, with
    the flags it reads; a stand-in checkout here (the reference is not shipped)."""
    ref = tmp_path / "reference" / "video_dataset"
    ref.mkdir(parents=True)
    (ref / "__init__.py").write_text("")
    (ref / "dataloader.py").write_text(FAKE_REFERENCE)
    report = load_benchmark().main([
        "--stages", "data", "--pipelines", "pyav,reference", "--iters", "1", "--repeats", "1", "--warmup", "1",
        "--min_seconds", "0",
        "--batch_size", "4", "--num_workers", "0", "--work_dir", str(tmp_path), "--reference_repo", str(ref.parent),
        *small_run(tiny_vit, demo_data)])
    rows = {r["pipeline"]: r for r in report["results"]}
    assert rows["reference"]["clips_per_s"] > 0 and "error" not in rows["reference"]
    args = json.loads((ref / "args.json").read_text())
    assert REFERENCE_FLAGS <= set(args)
    assert args["num_frames"] == 4 and args["spatial_size"] == 64 and args["batch_size"] == 4
    assert "x the reference's own loader" in capsys.readouterr().out


def test_operator_comparison_runs_the_pipeline_with_each_decoder(tmp_path, capsys):
    """``--pipelines dali,dali_reader`` (CPU, VP9): the DALI pipeline with fn.decoders.video and
    with fn.experimental.readers.video, side by side; the graph is built once, and the first
    batch, which pays for it, is reported apart."""
    pytest.importorskip("nvidia.dali")
    from evl.demo import DEMO_BACKBONE, write_demo_dataset

    ds = write_demo_dataset(str(tmp_path / "demo"), codec="vp9", num_train=8, num_val=4, num_frames=8)
    bb = tmp_path / "tiny-vit.json"
    bb.write_text(json.dumps(DEMO_BACKBONE))
    report = load_benchmark().main([
        "--stages", "data", "--pipelines", "dali,dali_reader", "--backbone", str(bb), "--train_list", ds.train_list,
        "--data_root", ds.root, "--num_classes", "4", "--num_frames", "4", "--sampling_rate", "2", "--device", "cpu",
        "--iters", "3", "--repeats", "1", "--warmup", "1", "--min_seconds", "0", "--batch_size", "4",
        "--num_workers", "1", "--work_dir", str(tmp_path)])
    rows = {r["pipeline"]: r for r in report["results"]}
    assert rows["dali"]["clips_per_s"] > 0 and rows["dali_reader"]["clips_per_s"] > 0
    assert rows["dali"]["graphs_built"] == 1 and rows["dali"]["first_batch_s"] > 0  # 2 batches an epoch, 4 read
    out = capsys.readouterr().out
    assert "x our fn.decoders.video graph (dali)" in out and "first batch" in out


@pytest.mark.gpu
def test_legacy_reader_harness_reads_the_sampler_ranges(tmp_path):
    import torch

    from evl.config import parse_config
    from evl.demo import DEMO_BACKBONE, demo_argv, write_demo_dataset

    ds = write_demo_dataset(str(tmp_path / "demo"), codec="h264", num_train=8, num_val=4, num_frames=8, size=160)
    bb = tmp_path / "tiny-vit.json"
    bb.write_text(json.dumps(DEMO_BACKBONE))
    cfg = parse_config(demo_argv(ds, str(bb), str(tmp_path / "run")) + ["--batch_size", "4", "--sampling_rate", "1"])
    pipe = load_benchmark().LegacyReaderPipeline(cfg, torch.device("cuda"), work_dir=str(tmp_path))
    lines = open(pipe.list_path).read().split("\n")[:-1]
    assert len(lines) == 8 and all(line.split()[2:] == ["0", "8"] for line in lines)
    batch = next(iter(pipe))
    assert batch.clips.shape == (4, 3, 8, 64, 64) and batch.labels.tolist() == [int(ln.split()[1]) for ln in lines[:4]]


def test_compare_augment_measures_each_pipeline_with_and_without_the_policy(tmp_path, tiny_vit, demo_data, capsys):
    report = load_benchmark().main([
        "--stages", "data", "--pipelines", "pyav", "--compare_augment", "--auto_augment", "rand-m7-n4-mstd0.5-inc1",
        "--iters", "1", "--repeats", "1", "--warmup", "1", "--min_seconds", "0", "--batch_size", "4",
        "--num_workers", "0", "--passes", "3", "--work_dir", str(tmp_path), *small_run(tiny_vit, demo_data)])
    rows = {(r["pipeline"], r["augment"]): r for r in report["results"]}
    assert len(rows) == len(report["results"]) == 2  # one record per job, whatever the passes
    assert rows["pyav", "rand-m7-n4-mstd0.5-inc1"]["clips_per_s"] > 0 and rows["pyav", None]["clips_per_s"] > 0
    assert rows["pyav", None]["frames_per_clip"] == rows["pyav", "rand-m7-n4-mstd0.5-inc1"]["frames_per_clip"]
    for r in rows.values():  # each job ran 3 times, and the median pass is reported
        assert len(r["clips_per_s_passes"]) == 3
        assert r["clips_per_s"] == sorted(r["clips_per_s_passes"])[1]
        # each pass beside its own decode ceiling, measured after it: the median share
        assert len(r["ceiling_fraction_passes"]) == 3 and all(x > 0 for x in r["ceiling_fraction_passes"])
        assert r["ceiling_fraction"] == sorted(r["ceiling_fraction_passes"])[1]
    out = capsys.readouterr().out
    assert "x without RandAugment" in out and "median of 3 passes" in out


def test_stock_videos_are_long_gop_natural_and_listed(tmp_path):
    """benchmarks/stock_videos.py: x264's defaults (one keyframe in 40 frames, B-frames), a list."""
    spec = importlib.util.spec_from_file_location("stock_videos", os.path.join(ROOT, "benchmarks", "stock_videos.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    list_path = mod.write_stock_dataset(str(tmp_path), num_videos=2, num_frames=40, size=(96, 64), workers=1)
    lines = open(list_path).read().split("\n")[:-1]
    assert lines == ["videos/000.mp4 0", "videos/001.mp4 1"]
    import numpy as np

    from pipelines.index import frame_index

    index = frame_index(str(tmp_path / "videos" / "000.mp4"))
    assert (index.num_frames, index.width, index.height) == (40, 96, 64)
    assert np.flatnonzero(index.keyframe).tolist() == [0]
    assert (index.decode_pos != np.arange(40)).any()  # B-frames: decode order differs from display order
    frames = np.stack(list(mod.stock_frames(0, 2, (96, 64))))
    assert frames.std() > 20 and not np.array_equal(frames[0], frames[1])  # textured, moving


def test_clip_cost_times_each_part_of_a_clip_in_a_worker(demo_data, capsys):
    spec = importlib.util.spec_from_file_location("clip_cost", os.path.join(ROOT, "benchmarks", "clip_cost.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(["--train_list", demo_data.train_list, "--data_root", demo_data.root, "--num_frames", "4",
                  "--sampling_rate", "2", "--input_size", "48", "--epochs", "1",
                  "--auto_augment", "rand-m7-n4-mstd0.5-inc1"])
    assert r["clips"] == 32
    # Every sampled frame; a frame comes from one packet, and skipped B-frames give none.
    assert r["decoded_frames"] >= 4 and r["packets"] >= r["decoded_frames"]
    assert r["read"] > r["open"] > 0 and r["read"] > r["rgb"] > 0 and r["sequential_frame"] > 0
    assert r["crop_resize"] > 0 and r["augment"] > 0 and r["normalise"] > 0
    assert r["handover_new"] > 0 and r["handover_reused"] > 0  # the benchmark checks the slot was reused
    assert r["crop_resize_into_batch"] > 0
    out = capsys.readouterr().out
    assert "for the policy" in out and "the RGB conversion" in out and "normalising to float" in out
    assert "new shared memory" in out and "into the batch's shared memory" in out


def test_encodings_compares_decode_cost_size_and_fidelity(tmp_path, capsys):
    """benchmarks/encodings.py on the same videos written twice by evl.prepare (x264's defaults
    and the fastdecode tune) and on their source: per directory the bytes, a decode cost and
    the PSNR against the source, with frames aligned (the source against itself is exact)."""
    from evl.prepare import main as prepare

    from videos import write_video

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        write_video(str(src / f"v{i}.mp4"), 24, size=(96, 64), gop=24, bframes=2, pattern="bars")
    (src / "list.txt").write_text("v0.mp4 0\nv1.mp4 1\n")
    for tune in ("none", "fastdecode"):
        assert prepare(["--list", str(src / "list.txt"), "--data_root", str(src), "--output", str(tmp_path / tune),
                        "--short_side", "64", "--workers", "1", "--tune", tune]) == 0
    spec = importlib.util.spec_from_file_location("encodings", os.path.join(ROOT, "benchmarks", "encodings.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main([str(tmp_path / "none"), str(tmp_path / "fastdecode"), str(src), "--source", str(src),
                     "--rounds", "2"])
    assert [r["videos"] for r in rows] == [2, 2, 2] and all(len(r["rounds_ms"]) == 2 for r in rows)
    assert all(r["bytes"] > 0 and r["decode_ms_per_frame"] > 0 for r in rows)
    assert rows[2]["psnr_db"] == float("inf")  # the source against itself
    assert 25 < rows[1]["psnr_db"] < float("inf") and 25 < rows[0]["psnr_db"] < float("inf")
    assert "ms/frame" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no video under the same relative path"):
        mod.main([str(src), str(tmp_path / "empty_dir_that_is_missing")])
