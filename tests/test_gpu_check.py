"""scripts/gpu_check.py, the one check a lent GPU runs, is known to work before it gets one: its
dry run (every section at CPU sizes, VP9 through DALI's CPU decoder) runs here."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("nvidia.dali")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


@pytest.mark.slow
def test_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(out), "--data", str(tmp_path / "videos")],
                          capture_output=True, text=True, timeout=600)
    results = json.loads((out / "results.json").read_text())
    failed = {k: v.get("error") for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    sections = {"environment", "capabilities", "frame_numbering", "decoder_reuse", "colour", "training_throughput",
                "eval_memory", "gpu_tests", "benchmarks", "decoder_threads", "decoder_cost", "gpu_decoders"}
    assert sections <= results.keys() and results["dry_run"] is True
    assert all(row["ok"] and row["aligned"] for row in results["capabilities"].values() if isinstance(row, dict))
    assert all(row["ok"] for name, row in results["frame_numbering"].items() if name != "seconds")
    throughput = results["training_throughput"]
    assert throughput["dali"]["clips"] == throughput["dali_reader"]["clips"] == throughput["pyav"]["clips"] == 16
    assert throughput["dali_reader"]["readers_built"] == 1 and throughput["dali_reader"]["graphs_built"] == 0
    assert results["eval_memory"]["rows"] == 12  # 4 videos x 3 views
    assert results["gpu_tests"]["returncode"] == 0 and "collected" in results["gpu_tests"]["summary"]
    bench = json.loads(open(results["benchmarks"]["operators_and_augment"]["json"]).read())
    rows = {(r["pipeline"], r["augment"]): r for r in bench["results"]}
    for pipeline in ("dali", "dali_reader"):  # the legacy reader is GPU only: unavailable here
        assert rows[pipeline, "rand-m7-n4-mstd0.5-inc1"]["clips_per_s"] > 0 and rows[pipeline, None]["clips_per_s"] > 0
    assert results["benchmarks"]["augment_agreement"]["returncode"] == 0
    threads = results["decoder_threads"]
    assert threads["pyav_2_threads"] > 0 and threads["dali_2_threads"] > 0
    decoders = results["gpu_decoders"]["demo_vp9"]  # PyNvVideoCodec is GPU only: DALI and PyAV here
    assert decoders["dali_graph"] > 0 and decoders["pyav_2_processes"] > 0 and decoders["frames_per_clip"] == [8]
    cost = results["decoder_cost"]
    assert all(cost[f"{case}_{n}_threads_ms_per_sample"] > 0
               for case in ("long_start", "long_end", "short") for n in (1, 2))
    # Results only (the lent machine gives back 8 files): the videos went to --data.
    assert sorted(os.listdir(out)) == sorted(["results.json", "pytest.txt", "bench_operators_and_augment.json",
                                              "bench_operators_and_augment.txt", "augment_agreement.txt",
                                              "bench_decoder_threads.json", "bench_decoder_threads.txt"])


@pytest.fixture(scope="module")
def gpu_check():
    """scripts/gpu_check.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_a_gpu_it_says_to_dry_run(tmp_path, gpu_check, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path)])
    assert e.value.code == 2 and "--dry-run" in capsys.readouterr().err


@pytest.mark.parametrize("separate", [True, False], ids=["own_process", "this_process"])
def test_a_tool_gives_its_status_and_output_in_either_process(tmp_path, gpu_check, separate):
    """On the GPU each benchmark runs in a process of its own; the dry run calls its main in the
    check's process. Either way the check gets its exit status and output, and keeps a log."""
    log = str(tmp_path / "tool.txt")
    status, out, err = gpu_check.run_tool("benchmarks/augment_agreement.py", ["--no_such_flag"], log,
                                          separate=separate)
    assert status == 2 and "unrecognized arguments: --no_such_flag" in err and open(log).read() == out + err
    if not separate:  # what a tool prints on stdout (one more interpreter start was not worth it)
        status, out, err = gpu_check.run_tool("benchmarks/augment_agreement.py", ["--help"], log, separate=False)
        assert status == 0 and out.startswith("usage: ") and "--parts" in out and open(log).read() == out + err


def test_a_tool_run_in_this_process_logs_to_its_own_log(tmp_path, gpu_check, monkeypatch):
    """A tool that configures logging (benchmarks/throughput.py does) writes its records to its
    own log, and the next tool's records go to the next log; its int return is its status."""
    import logging

    monkeypatch.setattr(logging.root, "handlers", [])  # as in the check's process: pytest's are not there
    monkeypatch.setattr(logging.root, "level", logging.WARNING)
    tool = tmp_path / "tool.py"
    tool.write_text("import logging\n\ndef main(argv):\n    logging.basicConfig(level=logging.ERROR)\n"
                    "    logging.error('run %s', argv[0])\n    return 3\n")
    before = logging.root.handlers[:]
    for run in ("first", "second"):
        log = tmp_path / f"{run}.txt"
        status, _, err = gpu_check.run_tool(str(tool), [run], str(log), separate=False)
        assert status == 3 and f"run {run}" in err and log.read_text().strip() == f"ERROR:root:run {run}"
    assert logging.root.handlers == before and logging.root.level == logging.WARNING


def test_a_script_loaded_by_file_runs_its_process_pool(tmp_path, gpu_check):
    """gpu_decoders writes its stock videos with benchmarks/stock_videos.py's process pool, from
    the script loaded by file: its function must pickle (it did not, and that part runs on a
    GPU only)."""
    stock_videos = gpu_check._script_module("benchmarks/stock_videos.py")
    list_path = stock_videos.write_stock_dataset(str(tmp_path), num_videos=2, num_frames=8, size=(64, 48), workers=2)
    assert sorted(os.listdir(tmp_path / "videos")) == ["000.mp4", "001.mp4"] and os.path.exists(list_path)
