"""python -m evl.train: the loop, exact resume, signals, DDP with gloo, bad input (trainer issue)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from evl import train as train_mod
from evl.config import parse_config
from evl.eval import main as eval_main
from evl.cli import SetupError
from evl.weights import WeightsError, safe_load
from pipelines.base import TooManyBadVideos
from pipelines.lists import ListFileError

import launch
from conftest import TINY_VIT, train_argv


def run(argv):
    """The library call under ``python -m evl.train``: errors come out as their own exceptions."""
    return train_mod.train(parse_config(argv))


def events(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_writes_run_directory(tiny_vit, demo_data, tmp_path):
    out = tmp_path / "run"
    result = train_mod.main(train_argv(tiny_vit, demo_data, out, "--num_steps", "6", "--eval_freq", "3"))
    assert result["step"] == 6
    ev = events(out)
    assert [e["step"] for e in ev if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert all(set(e) == {"step", "loss", "lr", "clips_per_s", "data_wait"} for e in ev if "loss" in e)
    evals = [e for e in ev if "top1" in e]
    assert [e["step"] for e in evals] == [3, 6] and all(e["num_videos"] == 12 for e in evals)
    assert ev[-2]["lr"] == 0.0  # cosine to zero at num_steps
    files = set(os.listdir(out))
    assert {"config.json", "metrics.jsonl", "curves.png", "checkpoint-6.pth", "best.pth"} <= files
    ckpt = safe_load(str(out / "checkpoint-6.pth"))  # weights_only=True
    assert ckpt["next_step"] == 6 and ckpt["config"]["num_steps"] == 6
    assert ckpt["model_config"]["backbone_id"].startswith("tiny-vit")
    assert not any(k.startswith("backbone") for k in ckpt["model"])
    assert ev[0] == {"event": "start", "step": 0}


def test_a_used_output_dir_is_never_mixed(tiny_vit, demo_data, tmp_path, capsys):
    """A new run into a directory that holds one is refused (its files untouched), naming
    --auto_resume and --overwrite_output_dir; the latter deletes the old run and starts over."""
    out = tmp_path / "run"
    train_mod.main(train_argv(tiny_vit, demo_data, out, "--num_steps", "6", "--eval_freq", "3", "--save_freq", "6"))
    before = {name: (out / name).read_bytes() for name in os.listdir(out) if name != ".lock"}
    with pytest.raises(SystemExit) as e:
        train_mod.main(train_argv(tiny_vit, demo_data, out, "--num_steps", "3", "--eval_freq", "3"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "holds an earlier run (checkpoint-6.pth" in err and "--auto_resume" in err and "--overwrite_output_dir" in err
    assert {name: (out / name).read_bytes() for name in os.listdir(out) if name != ".lock"} == before
    train_mod.main(train_argv(tiny_vit, demo_data, out, "--num_steps", "3", "--eval_freq", "3", "--save_freq", "3",
                              "--overwrite_output_dir"))
    assert sorted(n for n in os.listdir(out) if n.endswith(".pth")) == ["best.pth", "checkpoint-3.pth"]
    assert [e["step"] for e in events(out) if "loss" in e] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["num_steps"] == 3


def test_curves_after_a_resume_replace_the_repeated_steps():
    loss = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]
    resumed = [{"step": s, "loss": 2.0 / s} for s in range(5, 9)]
    ev = [{"event": "start", "step": 0}, *loss, {"step": 4, "top1": 50.0}, {"event": "start", "step": 4},
          *resumed, {"step": 8, "top1": 60.0}]
    train, evals = train_mod.curves(ev)
    # Resumed from the checkpoint of step 4: the first run's steps 5-6 are replaced.
    assert [(e["step"], e["loss"]) for e in train] == [(s, 1.0 / s) for s in range(1, 5)] + \
        [(s, 2.0 / s) for s in range(5, 9)]
    assert [e["step"] for e in evals] == [4, 8]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_metrics_on_a_full_disk_name_the_file(tmp_path):
    log = train_mod.MetricsLog(str(tmp_path), True)
    log.path = "/dev/full"  # every write fails with ENOSPC
    with pytest.raises(OSError, match=r"could not append to /dev/full \(No space left on device\); checkpoints"):
        log.write(step=1, loss=0.5)


def test_config_on_a_full_disk_names_the_file(tiny_vit, demo_data, tmp_path, monkeypatch):
    import errno

    import pipelines.files

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipelines.files.os, "fsync", no_space)
    with pytest.raises(OSError, match=r"could not write run configuration .*config\.json \(No space left on device\)"):
        run(train_argv(tiny_vit, demo_data, tmp_path / "run", "--num_steps", "1"))
    assert os.listdir(tmp_path / "run") == [".lock"]  # no half-written config, no temporary file


def test_resume_after_a_cut_metrics_line(tiny_vit, demo_data, tmp_path, caplog):
    """A crash or a full disk can leave a half-written last line in metrics.jsonl: the resumed
    run skips it (with a warning) instead of failing when it draws the curves."""
    out = tmp_path / "cut"
    flags = ("--num_steps", "4", "--save_freq", "2", "--eval_freq", "2")
    train_mod.main(train_argv(tiny_vit, demo_data, out, *flags))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    (out / "curves.png").unlink()
    result = train_mod.main(train_argv(tiny_vit, demo_data, out, "--num_steps", "6", "--save_freq", "2",
                                       "--eval_freq", "2", "--auto_resume"))
    assert result["step"] == 6 and (out / "curves.png").exists()
    assert "skipped 1 unreadable line(s)" in caplog.text
    logged = train_mod.MetricsLog(str(out), True).events()
    assert {"event": "start", "step": 4} in logged  # on a line of its own, after the cut one
    assert [e["step"] for e in train_mod.curves(logged)[0]] == list(range(1, 7))


def test_resume_continues_exactly(tiny_vit, demo_data, tmp_path):
    # 32 clips / batch 8 = 4 steps per epoch: resuming at step 5 is mid-epoch 1.
    flags = ("--num_steps", "10", "--save_freq", "5", "--keep_last", "3", "--cls_dropout", "0.5")
    full = tmp_path / "full"
    train_mod.main(train_argv(tiny_vit, demo_data, full, *flags))
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "checkpoint-5.pth", part / "checkpoint-5.pth")
    train_mod.main(train_argv(tiny_vit, demo_data, part, *flags, "--auto_resume"))
    a, b = safe_load(str(full / "checkpoint-10.pth")), safe_load(str(part / "checkpoint-10.pth"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [e for e in events(part) if "loss" in e][0]["step"] == 6


@pytest.mark.slow
def test_resume_under_ddp_continues_every_ranks_dropout(tiny_vit, demo_data, tmp_path):
    """Each rank draws its own dropout masks; a resumed 2-process run continues both ranks'
    streams (checkpoints hold every rank's) and ends with the uninterrupted run's weights."""
    flags = ("--num_steps", "6", "--save_freq", "3", "--keep_last", "3", "--cls_dropout", "0.5")

    def ddp(out, *extra):
        codes, log, err = launch.run_ranks("evl.train", train_argv(tiny_vit, demo_data, out, *flags, *extra),
                                          tmp_path / "logs" / out.name)
        assert codes == [0, 0], log + err
        return log + err

    full, part = tmp_path / "full", tmp_path / "part"
    ddp(full)
    part.mkdir()
    shutil.copy(full / "checkpoint-3.pth", part / "checkpoint-3.pth")
    assert len(safe_load(str(part / "checkpoint-3.pth"))["rng_per_rank"]) == 2
    assert "dropout streams restart" not in ddp(part, "--auto_resume")
    a, b = safe_load(str(full / "checkpoint-6.pth")), safe_load(str(part / "checkpoint-6.pth"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_warmup_and_accumulation(tiny_vit, demo_data, tmp_path):
    out = tmp_path / "acc"
    train_mod.main(train_argv(tiny_vit, demo_data, out, "--num_steps", "4", "--warmup_steps", "2",
                              "--batch_split", "2"))
    lrs = [e["lr"] for e in events(out) if "loss" in e]
    # The lr logged after step s is the one step s + 1 uses (evl-spec §3): linear warmup to the
    # peak over 2 steps, then a cosine to 0 over the remaining 2 (at 0, 1/2 and all of the way).
    assert lrs == pytest.approx([1e-3, 1e-3, 0.5e-3, 0.0], abs=1e-12)


def assert_same_run(a, b):
    """Two runs over the same global batches: the same losses, and weights equal up to what Adam's
    sign-like first steps make of rounding differences in near-zero gradients (<= 2 lr a step)."""
    la = [e["loss"] for e in events(a) if "loss" in e]
    lb = [e["loss"] for e in events(b) if "loss" in e]
    assert len(la) == len(lb) and la == pytest.approx(lb, rel=1e-4)
    wa, wb = safe_load(str(a / "checkpoint-3.pth"))["model"], safe_load(str(b / "checkpoint-3.pth"))["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=6e-3, rtol=0)
        if not k.endswith("k_proj.bias"):  # its gradient is 0 in theory (softmax shift), noise in practice
            assert (wa[k] - wb[k]).abs().le(1e-5).float().mean() > 0.9, k


NO_DROPOUT = ("--num_steps", "3", "--save_freq", "3", "--eval_freq", "3", "--cls_dropout", "0",
              "--decoder_mlp_dropout", "0")


def test_accumulation_equals_full_batch(tiny_vit, demo_data, tmp_path):
    train_mod.main(train_argv(tiny_vit, demo_data, tmp_path / "a", *NO_DROPOUT))
    train_mod.main(train_argv(tiny_vit, demo_data, tmp_path / "b", *NO_DROPOUT, "--batch_split", "4"))
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_evaluations_do_not_change_the_training_batches(tiny_vit, demo_data, tmp_path):
    """The training pipeline is let go for each evaluation and restarts mid-epoch after it: the
    run sees the batches, and takes the steps, that it would without the evaluations."""
    argv = ("--num_steps", "6", "--save_freq", "6", "--print_freq", "1")
    train_mod.main(train_argv(tiny_vit, demo_data, tmp_path / "evals", *argv, "--eval_freq", "2"))
    train_mod.main(train_argv(tiny_vit, demo_data, tmp_path / "none", *argv, "--eval_freq", "6"))
    losses = [[e["loss"] for e in events(tmp_path / run) if "loss" in e] for run in ("evals", "none")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    assert len([e for e in events(tmp_path / "evals") if "top1" in e]) == 3


def test_eval_only_writes_each_video_once(tiny_vit, demo_data, tmp_path):
    out = tmp_path / "run"
    train_mod.main(train_argv(tiny_vit, demo_data, out, "--num_steps", "2", "--save_freq", "2"))
    pred = tmp_path / "pred.jsonl"
    res = eval_main(train_argv(tiny_vit, demo_data, tmp_path / "ev", "--checkpoint", str(out / "checkpoint-2.pth"),
                               "--predictions_path", str(pred), "--batch_size", "5", "--num_spatial_views", "3"))
    lines = [json.loads(x) for x in pred.read_text().splitlines()]
    assert len(lines) == 12 and len({x["path"] for x in lines}) == 12
    assert all(len(x["top5"]) == 4 and abs(sum(x["top5_prob"]) - 1) < 1e-4 for x in lines)
    top1 = sum(x["top5"][0] == x["label"] for x in lines) / 12 * 100
    assert res["top1"] == pytest.approx(top1)


def test_bad_flags_fail_before_training(tiny_vit, demo_data, tmp_path):
    with pytest.raises(SetupError, match="nope.txt: file not found"):
        run(train_argv(tiny_vit, demo_data, tmp_path, "--train_list_path", str(tmp_path / "nope.txt")))
    with pytest.raises(ListFileError, match=r"\.txt:\d+: label 3 outside \[0, 3\)"):
        run(train_argv(tiny_vit, demo_data, tmp_path, "--num_classes", "3"))
    with pytest.raises(SetupError, match="not divisible"):
        run(train_argv(tiny_vit, demo_data, tmp_path, "--batch_split", "3"))


def test_resume_from_another_model_or_backbone_is_refused(tiny_vit, demo_data, tmp_path):
    out = tmp_path / "run"
    train_mod.main(train_argv(tiny_vit, demo_data, out, "--num_steps", "1", "--save_freq", "1"))
    ck = str(out / "checkpoint-1.pth")
    with pytest.raises(WeightsError, match="another model.*8 frames"):
        run(train_argv(tiny_vit, demo_data, tmp_path / "x", "--resume_path", ck, "--num_frames", "8"))
    other = tmp_path / "other-vit.json"
    cfg = json.loads(json.dumps(TINY_VIT))
    cfg["vision_cfg"]["layers"] = 5
    other.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="trained with backbone tiny-vit"):
        run(train_argv(str(other), demo_data, tmp_path / "y", "--resume_path", ck))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_vit, demo_data, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="non-finite loss") as e:
        run(train_argv(tiny_vit, demo_data, out, "--num_steps", "20", "--save_freq", "1", "--lr", "1e36",
                       "--weight_decay", "0"))
    kept = sorted(os.listdir(out))
    assert any(k.startswith("checkpoint-") for k in kept) and "checkpoint-" in str(e.value)
    last = max((int(k[11:-4]), k) for k in kept if k.startswith("checkpoint-"))[1]
    assert last in str(e.value)
    assert all(torch.isfinite(v).all() for v in safe_load(str(out / last))["model"].values())


def test_non_finite_loss_between_checks_is_caught_before_anything_is_written(tiny_vit, demo_data, tmp_path,
                                                                            monkeypatch):
    """The loss is tested on the device every step and read only where the run logs, evaluates
    or saves: the step it went bad is named, and no checkpoint or metric comes after it."""
    calls = []
    cross_entropy = train_mod.F.cross_entropy

    def from_step_7_nan(*args, **kw):
        calls.append(1)
        loss = cross_entropy(*args, **kw)
        return loss * float("nan") if len(calls) >= 7 else loss

    monkeypatch.setattr(train_mod.F, "cross_entropy", from_step_7_nan)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 7 \(found at step 8\)") as e:
        run(train_argv(tiny_vit, demo_data, out, "--num_steps", "40", "--save_freq", "6", "--print_freq", "4",
                       "--eval_freq", "100"))
    assert "checkpoint-6.pth" in str(e.value)
    assert [ev["step"] for ev in events(out) if "loss" in ev] == [4]  # step 8 was never logged
    assert sorted(k for k in os.listdir(out) if k.startswith("checkpoint-")) == ["checkpoint-6.pth"]
    assert all(torch.isfinite(v).all() for v in safe_load(str(out / "checkpoint-6.pth"))["model"].values())


def wait_for_training(out, timeout=120):
    """Until the run has logged a step: every rank is then in the loop, its signal handler set
    (the "start" event comes before that)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and '"loss"' in (out / "metrics.jsonl").read_text():
            return
        time.sleep(0.2)
    pytest.fail(f"no training step logged in {out} within {timeout} s")


def run_cli(args, env=None, **kw):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def test_sigterm_to_the_process_group_saves_with_decoding_workers(tiny_vit, demo_data, tmp_path):
    """A scheduler signals the whole process group: the DataLoader workers must not die of it
    while the training process finishes its step and saves (it then failed with "DataLoader
    worker exited unexpectedly" and no checkpoint), and they must be gone after it exits. A
    stopped run is not a finished one: it exits with 128 + the signal (143; it exited 0), so
    that `train && eval` and schedulers can tell."""
    out = tmp_path / "sig_pg"
    proc = launch.start("evl.train", train_argv(tiny_vit, demo_data, out, "--num_steps", "100000", "--num_workers", "2"),
                       tmp_path / "logs", new_session=True)
    try:
        wait_for_training(out)
        time.sleep(1)  # well into the loop, workers busy
        os.killpg(proc.pid, signal.SIGTERM)
    except BaseException:
        proc.kill()
        raise
    launch.wait_all([proc], timeout=120)
    log = proc.output
    assert proc.returncode == 128 + signal.SIGTERM, log
    assert "stopped by signal 15" in log and "exited unexpectedly" not in log
    saved = [f for f in os.listdir(out) if f.startswith("checkpoint-")]
    assert len(saved) == 1 and 0 < safe_load(str(out / saved[0]))["next_step"] < 100000
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("DataLoader workers outlived the training process")


@pytest.mark.slow
def test_two_gloo_processes_match_one(tiny_vit, demo_data, tmp_path):
    # The same --batch_size is the same global batches (8 = 1 x 8 = 2 x 4), no dropout: the same
    # steps and the same metrics.
    train_mod.main(train_argv(tiny_vit, demo_data, tmp_path / "one", *NO_DROPOUT))
    proc = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "evl.train", *train_argv(tiny_vit, demo_data, tmp_path / "two", *NO_DROPOUT)])
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert_same_run(tmp_path / "one", tmp_path / "two")
    ea = [e for e in events(tmp_path / "one") if "top1" in e]
    eb = [e for e in events(tmp_path / "two") if "top1" in e]
    assert ea[0]["num_videos"] == eb[0]["num_videos"] == 12
    assert ea[0]["top1"] == pytest.approx(eb[0]["top1"]) and ea[0]["top5"] == pytest.approx(eb[0]["top5"])


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tiny_vit, demo_data, tmp_path):
    """``scancel`` of one task, a drained node: only rank 1 gets the signal. Every rank stops
    after the same step and rank 0 saves it; a rank that stopped alone left the others hanging
    in the next gradient all-reduce, without a checkpoint."""
    out = tmp_path / "ddp_sig"
    procs = launch.start_ranks("evl.train", train_argv(tiny_vit, demo_data, out, "--num_steps", "100000"),
                              tmp_path / "logs")
    try:
        wait_for_training(out)
        procs[1].send_signal(signal.SIGTERM)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    codes = launch.wait_all(procs, timeout=120)
    logs = [p.output for p in procs]
    assert codes == [128 + signal.SIGTERM] * 2, logs
    saved = [f for f in os.listdir(out) if f.startswith("checkpoint-")]
    assert len(saved) == 1 and f"stopped by a signal to another rank after step {saved[0][11:-4]};" in logs[0]
    assert 0 < safe_load(str(out / saved[0]))["next_step"] < 100000


def _agreement_rank(rank: int, init_file: str, out_dir: str, gloo_fails: bool) -> None:
    import torch.distributed as dist

    from evl.distributed import StopAgreement

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if gloo_fails:
        def refuse(*a, **k):
            raise RuntimeError("no gloo here")
        dist.new_group = refuse
    agreement = StopAgreement()
    seen = [agreement.should_stop(rank == 1 and i >= 2) for i in range(5)]  # only rank 1, from step 2
    agreement.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"seen": seen, "own_group": agreement.distributed and not gloo_fails}, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("gloo_fails", [False, True])
def test_stop_agreement_is_the_same_on_every_rank(tmp_path, gloo_fails):
    """Rank 1 alone asks to stop at step 2: both ranks stop at step 3 (the flag of step 2, read
    a step later without waiting on it), or at step 2 where no gloo group could be made and
    the flag is reduced in step."""
    launch.spawn(_agreement_rank, args=(str(tmp_path / "init"), str(tmp_path), gloo_fails), nprocs=2)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    first = 2 if gloo_fails else 3
    assert ranks[0]["seen"] == ranks[1]["seen"] == [i >= first for i in range(5)]


def test_compute_threads_leave_a_core_to_each_decoder(tiny_vit, demo_data, tmp_path, monkeypatch):
    from evl import distributed
    from evl.config import parse_config

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's, of which this process may use 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert distributed.compute_threads(4) == 12
    assert distributed.compute_threads(0) == 16
    assert distributed.compute_threads(32) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks share the node's cores
    assert distributed.compute_threads(1) == 1 and distributed.compute_threads(0) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert distributed.compute_threads(1) is None

    # evl.train runs with them and puts the previous setting back.
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    seen = []

    class Seen(Exception):
        pass

    def note_threads(cfg, world):  # where the run starts, with the threads it trains with
        seen.append(torch.get_num_threads())
        raise Seen

    monkeypatch.setattr(train_mod, "open_run_directory", note_threads)
    before = torch.get_num_threads()
    # The cache: a core for its read-ahead thread, whatever --num_workers says.
    for pipeline, workers, want in (("pyav", 6, 10), ("cache", 6, 15), ("dummy", 2, 16)):
        argv = train_argv(tiny_vit, demo_data, tmp_path / pipeline, "--pipeline", pipeline, "--num_workers",
                          str(workers))
        if pipeline == "cache":
            argv += ["--feature_cache", str(tmp_path)]
        with pytest.raises(Seen):
            train_mod.train(parse_config(argv))
        assert seen[-1] == want and torch.get_num_threads() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    """--device cuda where there is none: one clear message (it was a ZeroDivisionError in the
    process-group set-up), and an error line from the cache and extract CLIs."""
    from evl.cache import main as cache_main
    from evl.distributed import init_distributed
    from evl.extract import main as extract_main

    with pytest.raises(ValueError, match="--device cuda: no CUDA device is available here; use --device cpu"):
        init_distributed("cuda")
    with pytest.raises(SystemExit) as e:
        cache_main(["build", "--list_path", "x.txt", "--output", str(tmp_path / "c"), "--device", "cuda"])
    assert e.value.code == 1 and "error: --device cuda: no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="error: --device cuda: no CUDA device"):
        extract_main(["--list", "x.txt", "--checkpoint", "y.pth", "--output", str(tmp_path / "e"), "--device", "cuda"])


# -- a run never loses or mixes work ------------------------------------------------------------


def test_a_second_writer_is_refused_and_a_killed_runs_lock_is_not_stale(tiny_vit, demo_data, tmp_path):
    from evl.checkpoint import RunDirectory, RunDirectoryError

    out = tmp_path / "locked"
    run(train_argv(tiny_vit, demo_data, out, "--num_steps", "2", "--save_freq", "2"))
    holder = RunDirectory(str(out))
    holder.lock()  # a run in progress
    try:
        with pytest.raises(RunDirectoryError, match=rf"is in use by another run \(pid {os.getpid()} on"):
            run(train_argv(tiny_vit, demo_data, out, "--num_steps", "4", "--auto_resume"))
    finally:
        holder.unlock()
    # A run killed with -9 holds the flock until the kernel drops it with the process.
    killed = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirectoryError, match="is in use by another run"):
        run(train_argv(tiny_vit, demo_data, out, "--num_steps", "4", "--auto_resume"))
    killed.kill()
    killed.wait()
    assert run(train_argv(tiny_vit, demo_data, out, "--num_steps", "4", "--auto_resume"))["step"] == 4


def _saved_step(out) -> int:
    return max(int(name[11:-4]) for name in os.listdir(out) if name.startswith("checkpoint-"))


def test_evaluating_a_training_directory_leaves_its_files_alone(tiny_vit, demo_data, tmp_path):
    out = tmp_path / "run"
    run(train_argv(tiny_vit, demo_data, out, "--num_steps", "2", "--save_freq", "2"))
    config = (out / "config.json").read_bytes()
    eval_main(train_argv(tiny_vit, demo_data, out, "--checkpoint", str(out / "checkpoint-2.pth")))
    assert (out / "config.json").read_bytes() == config
    assert (out / "predictions.jsonl").exists()


def test_an_evaluation_that_fails_costs_no_steps(tiny_vit, demo_data, tmp_path, monkeypatch):
    """Val videos that fail to decode stop the run at its evaluation (the bad-video limit), but
    the checkpoint of that step is saved first."""
    from pipelines.workers import ClipDataset

    load = ClipDataset.load

    def val_breaks(self, key, into=None):
        if not self.train:
            raise OSError("simulated decoding failure")
        return load(self, key, into)

    monkeypatch.setattr(ClipDataset, "load", val_breaks)
    out = tmp_path / "run"
    with pytest.raises(TooManyBadVideos, match="unreadable videos in one epoch of 12"):
        run(train_argv(tiny_vit, demo_data, out, "--num_steps", "8", "--save_freq", "4", "--eval_freq", "4",
                       "--max_bad_fraction", "0.1"))
    assert safe_load(str(out / "checkpoint-4.pth"))["next_step"] == 4


def test_a_pipe_that_goes_away_does_not_cost_the_stop_checkpoint(tiny_vit, demo_data, tmp_path):
    """`... | tee log` with a group-wide SIGTERM: tee dies first, then the trainer's next line
    hits a closed pipe. It must still save its checkpoint and exit with the stop status."""
    out = tmp_path / "piped"
    proc = run_cli(["-m", "evl.train", *train_argv(tiny_vit, demo_data, out, "--num_steps", "100000")])
    wait_for_training(out)
    proc.stdout.close()  # the reader is gone: every later write to the pipe fails
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert len([f for f in os.listdir(out) if f.startswith("checkpoint-")]) == 1


def test_resuming_with_other_flags_is_refused_or_said(tiny_vit, demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    run(train_argv(tiny_vit, demo_data, out, "--num_steps", "2", "--save_freq", "2"))
    with pytest.raises(SetupError, match=r"--lr 0\.001 -> 0\.002.*--seed 0 -> 1.*start a new run"):
        run(train_argv(tiny_vit, demo_data, out, "--num_steps", "4", "--auto_resume", "--lr", "2e-3", "--seed", "1"))
    with pytest.raises(SetupError, match=r"global batch \(--batch_size\) 8 -> 4"):
        run(train_argv(tiny_vit, demo_data, out, "--num_steps", "4", "--auto_resume", "--batch_size", "4"))
    capsys.readouterr()
    result = run(train_argv(tiny_vit, demo_data, out, "--num_steps", "4", "--auto_resume", "--eval_freq", "2"))
    assert result["step"] == 4
    said = capsys.readouterr().out
    assert "in effect from here on: --num_steps 2 -> 4; --eval_freq 1000 -> 2" in said


def test_a_save_interrupted_by_a_kill_leaves_no_litter(tiny_vit, demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    run(train_argv(tiny_vit, demo_data, out, "--num_steps", "2", "--save_freq", "2"))
    (out / ".tmp-k9x2a.pth").write_bytes(b"half a checkpoint")
    run(train_argv(tiny_vit, demo_data, out, "--num_steps", "3", "--auto_resume"))
    assert not (out / ".tmp-k9x2a.pth").exists()
    assert "removed 1 unfinished file(s) of a save that was interrupted: .tmp-k9x2a.pth" in capsys.readouterr().out


def test_a_full_disk_while_saving_names_the_checkpoint_and_keeps_the_last(tiny_vit, demo_data, tmp_path,
                                                                          monkeypatch):
    import shutil as sh

    import evl.checkpoint

    out = tmp_path / "run"
    run(train_argv(tiny_vit, demo_data, out, "--num_steps", "2", "--save_freq", "2"))
    real_save = evl.checkpoint.torch.save

    def disk_fills(obj, f):  # what torch.save says on a full disk (seen on a 600 KiB tmpfs)
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(evl.checkpoint.torch, "save", disk_fills)
    monkeypatch.setattr("pipelines.files.shutil.disk_usage", lambda d: sh._ntuple_diskusage(100, 100, 0))
    with pytest.raises(OSError, match=r"could not write checkpoint .*checkpoint-4\.pth \(no space left on device\); "
                                      "earlier checkpoints are untouched"):
        run(train_argv(tiny_vit, demo_data, out, "--num_steps", "4", "--save_freq", "2", "--auto_resume"))
    monkeypatch.setattr(evl.checkpoint.torch, "save", real_save)
    assert sorted(n for n in os.listdir(out) if n.startswith(("checkpoint-", ".tmp"))) == ["checkpoint-2.pth"]
    assert safe_load(str(out / "checkpoint-2.pth"))["next_step"] == 2


@pytest.mark.parametrize("flags, words", [
    (["--batch_size", "0"], "--batch_size 0 must be at least 1"),
    (["--batch_split", "0"], "--batch_split 0 must be at least 1"),
    (["--save_freq", "0", "--eval_freq", "0", "--print_freq", "0"], "--save_freq 0 must be at least 1"),
    (["--num_steps", "-3"], "--num_steps -3 must be at least 1"),
    (["--warmup_steps", "-1"], "--warmup_steps -1 must be at least 0"),
    (["--keep_last", "0"], "--keep_last 0 must be at least 1"),
    (["--max_bad_fraction", "-0.1"], "--max_bad_fraction -0.1 must be in [0, 1]"),
    (["--overwrite_output_dir", "--auto_resume"], "cannot go with --auto_resume"),
])
def test_bad_numbers_in_flags_are_refused_up_front(tiny_vit, demo_data, tmp_path, flags, words):
    with pytest.raises(SetupError) as e:
        run(train_argv(tiny_vit, demo_data, tmp_path / "run", *flags))
    assert words in str(e.value)
    assert not (tmp_path / "run").exists()  # before anything is written


def test_a_program_exits_with_its_mains_status_and_freezes_what_is_left():
    """``python -m evl.JOB`` runs ``run_program(main)``: an int main returns is the exit status,
    a result (a dict) or None is 0, a SystemExit (a stopped run's 143) passes through; what is
    alive is then out of the interpreter's last garbage collections."""
    import gc

    from evl.cli import run_program

    def stopped():
        raise SystemExit(143)

    try:
        for main, status in ((lambda: 3, 3), (lambda: {"top1": 1.0}, 0), (lambda: None, 0), (stopped, 143)):
            gc.unfreeze()
            with pytest.raises(SystemExit) as exit_:
                run_program(main)
            assert exit_.value.code == status and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # the rest of the suite collects as usual


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tiny_vit, demo_data, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("clip.mp4 1\nclip.mp4 x\n")
    argv = train_argv(tiny_vit, demo_data, tmp_path / "run", "--train_list_path", str(bad))
    with pytest.raises(SystemExit) as e:
        train_mod.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert err.startswith("python -m evl.train: error: invalid list file") and "bad.txt:2" in err, err
    with pytest.raises(ListFileError):  # --debug: the exception itself, with its traceback
        train_mod.main(argv + ["--debug"])
    # A start that failed leaves no run behind: the corrected command needs no extra flag.
    assert run(train_argv(tiny_vit, demo_data, tmp_path / "run", "--num_steps", "1"))["step"] == 1
    with pytest.raises(SystemExit) as e:
        eval_main(train_argv(tiny_vit, demo_data, tmp_path / "e", "--checkpoint", str(tmp_path / "none.pth")))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and "none.pth: file not found" in err, err


def test_log_lines_without_a_terminal(tiny_vit, demo_data, tmp_path, capsys):
    """nohup, SLURM, `| tee`: no progress bar, and a line per logged step instead."""
    run(train_argv(tiny_vit, demo_data, tmp_path / "run", "--num_steps", "3"))  # stderr here is not a terminal
    out = capsys.readouterr().out
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("step ") and "loss" in ln] == ["1/3", "2/3", "3/3"]
