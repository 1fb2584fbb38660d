"""--report_to tensorboard,wandb: what the reporters write, read back, against metrics.jsonl;
the data-wait share; missing packages and failing reporters (issue 18)."""

import glob
import json
import os
import re
import struct
import sys

import pytest

from evl import reporting
from evl import train as train_mod
from evl.cli import SetupError
from evl.config import parse_config

from conftest import train_argv


def run(argv):
    return train_mod.train(parse_config(argv))


def metrics_events(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's own reader: what its dashboard shows, earlier runs' repeated steps purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path):
    """The records of a ``.wandb`` file (wandb-core's transaction log, which ``wandb sync``
    uploads), parsed with wandb's own protobuf messages. Its framing is LevelDB's log format: a
    7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a
    7-byte header (CRC-32, length, type: 1 whole record, 2/3/4 its first/middle/last part); a
    block's tail shorter than a header is padding. wandb 0.31 ships no Python reader of it."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), path
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_run(run_dir) -> tuple[dict, list[dict]]:
    """(the run's config, its history rows without W&B's own ``_`` keys) of an offline run."""
    [path] = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    config, rows = {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return config, rows


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, every file of it under tmp_path; returns its WANDB_DIR."""
    wandb_dir = tmp_path / "wandb-dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    for name in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    return wandb_dir


def test_tensorboard_and_wandb_hold_what_metrics_jsonl_holds_across_a_resume(tiny_vit, demo_data, tmp_path,
                                                                             wandb_offline, capsys):
    """A run to step 4, then a resume from its step-2 checkpoint to step 6, which repeats steps
    3 and 4: TensorBoard shows each step once, with the resumed run's values, as metrics.jsonl's
    curves do; W&B holds both runs under one run id, each logging what it wrote to metrics.jsonl."""
    out = tmp_path / "run"
    flags = ("--eval_freq", "2", "--save_freq", "2", "--num_temporal_views", "1", "--report_to", "tensorboard,wandb")
    run(train_argv(tiny_vit, demo_data, out, "--num_steps", "4", *flags))
    first_out = capsys.readouterr().out
    run(train_argv(tiny_vit, demo_data, out, "--num_steps", "6", "--resume_path", str(out / "checkpoint-2.pth"),
                   *flags))
    console = first_out + capsys.readouterr().out

    events = metrics_events(out)
    steps = [e for e in events if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert all(set(e) == {"step", "loss", "lr", "clips_per_s", "data_wait"} and 0 <= e["data_wait"] <= 1
               for e in steps)
    # The console lines show the same share, rounded.
    lines = [ln for ln in console.splitlines() if re.match(r"step \d+/\d+ loss", ln)]
    assert [f"data wait {e['data_wait']:.0%}" in ln for ln, e in zip(lines, steps)] == [True] * 8, lines

    train, evals = train_mod.curves(events)
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6] and [e["step"] for e in evals] == [2, 4, 6]
    scalars = tensorboard_scalars(str(out / "tensorboard"))
    assert set(scalars) == {"train/loss", "train/lr", "train/clips_per_s", "train/data_wait", "val/top1", "val/top5"}
    for key, name in reporting.SCALARS.items():
        current = evals if name.startswith("val/") else train
        assert [s for s, _ in scalars[name]] == [e["step"] for e in current], name
        assert [v for _, v in scalars[name]] == pytest.approx([e[key] for e in current], rel=1e-6), name
    # The repeated steps show the resumed run's timings, not the first run's.
    assert scalars["train/clips_per_s"][2][1] == pytest.approx(steps[4]["clips_per_s"], rel=1e-6)

    run_id = (out / "wandb_run_id").read_text().strip()
    run_dirs = sorted(glob.glob(str(wandb_offline / "wandb" / "offline-run-*")))
    assert [os.path.basename(d).rsplit("-", 1)[1] for d in run_dirs] == [run_id, run_id]
    logged = [e for e in events if "step" in e and "event" not in e]
    expected = [{"step": e["step"], **{reporting.SCALARS[k]: v for k, v in e.items() if k in reporting.SCALARS}}
                for e in logged]
    rows = []
    for d in run_dirs:
        config, run_rows = wandb_run(d)
        assert config["batch_size"] == 8 and config["report_to"] == ["tensorboard", "wandb"]
        rows += run_rows
    assert [r["step"] for r in rows] == [e["step"] for e in expected]
    for row, want in zip(rows, expected):
        assert row == pytest.approx(want, rel=1e-12), (row, want)
    assert config["num_steps"] == 6  # the resumed run's config


def test_data_wait_is_the_time_blocked_waiting_for_batches(tiny_vit, demo_data, tmp_path, monkeypatch):
    """A loader that takes 0.3 s per batch: each logged interval counts at least that much
    waiting (interval = clips / clips_per_s), whatever the machine's speed."""
    forever = train_mod.batches_forever

    def slow(*args):
        import time

        for item in forever(*args):
            time.sleep(0.3)
            yield item

    monkeypatch.setattr(train_mod, "batches_forever", slow)
    out = tmp_path / "run"
    run(train_argv(tiny_vit, demo_data, out, "--num_steps", "3", "--num_temporal_views", "1"))
    steps = [e for e in metrics_events(out) if "loss" in e]
    assert len(steps) == 3
    for e in steps:
        interval = 8 / e["clips_per_s"]
        assert 0.3 <= e["data_wait"] * interval <= interval * (1 + 1e-9), e


def test_a_reporter_that_fails_mid_run_is_turned_off_with_one_warning(tiny_vit, demo_data, tmp_path, monkeypatch,
                                                                      caplog):
    calls = []

    def log(self, step, scalars):
        calls.append(step)
        if len(calls) >= 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(reporting.TensorBoardReporter, "log", log)
    out = tmp_path / "run"
    result = run(train_argv(tiny_vit, demo_data, out, "--num_steps", "3", "--num_temporal_views", "1",
                            "--report_to", "tensorboard"))
    assert result["step"] == 3 and (out / "checkpoint-3.pth").exists() and (out / "best.pth").exists()
    assert calls == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if "--report_to" in r.getMessage()]
    assert len(warnings) == 1 and "tensorboard failed at step 2" in warnings[0], warnings
    assert [e["step"] for e in metrics_events(out) if "loss" in e] == [1, 2, 3]


@pytest.mark.parametrize("name,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_is_one_line_before_anything_runs(tiny_vit, demo_data, tmp_path, monkeypatch, capsys,
                                                            name, module):
    monkeypatch.setitem(sys.modules, module, None)  # what an interpreter without the package does on import
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_mod.main(train_argv(tiny_vit, demo_data, out, "--num_steps", "2", "--report_to", f"{name},"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert f"error: --report_to {name} needs the {name} package (pip install {name})\n" in err, err
    assert not out.exists()  # nothing built, nothing written


def test_report_to_flag(tiny_vit, demo_data, tmp_path, capsys):
    argv = train_argv(tiny_vit, demo_data, tmp_path / "run")
    assert parse_config(argv).report_to == ()
    assert parse_config(argv + ["--report_to", "none"]).report_to == ()
    assert parse_config(argv + ["--report_to", "wandb, tensorboard,wandb"]).report_to == ("wandb", "tensorboard")
    with pytest.raises(SystemExit):
        parse_config(argv + ["--report_to", "tensorbord"])
    assert "unknown reporter tensorbord: choose from tensorboard, wandb" in capsys.readouterr().err
    no_dir = argv[:argv.index("--output_dir")] + ["--report_to", "tensorboard"]
    with pytest.raises(SetupError, match="needs --output_dir"):
        run(no_dir)


def test_a_reporter_that_cannot_start_stops_the_run_before_training(tiny_vit, demo_data, tmp_path, wandb_offline,
                                                                    monkeypatch):
    import wandb

    def init(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "run"
    with pytest.raises(SetupError, match=r"--report_to wandb could not start \(UsageError: api_key"):
        run(train_argv(tiny_vit, demo_data, out, "--num_steps", "2", "--report_to", "tensorboard,wandb"))
    assert not list(out.glob("checkpoint-*.pth")) and not (out / "metrics.jsonl").exists()


def test_overwrite_output_dir_deletes_the_earlier_runs_reports(tmp_path):
    """--overwrite_output_dir starts the curves over: the earlier run's TensorBoard events and
    W&B run id go with its checkpoints; W&B's own (maybe not uploaded) files stay."""
    from evl.checkpoint import RunDirectory

    run = RunDirectory(str(tmp_path))
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    (tmp_path / "wandb_run_id").write_text("abc123\n")
    (tmp_path / "wandb").mkdir()
    assert {"tensorboard", "wandb_run_id"} <= set(run.run_files())
    run.start_over()
    assert sorted(os.listdir(tmp_path)) == ["wandb"]
