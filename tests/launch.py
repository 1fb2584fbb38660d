"""The project's CLIs as separate processes, for the multi-process tests, without an interpreter
start for each.

A process of ``torchrun`` or ``python -m evl.train`` imports torch and open_clip before it does
anything: several seconds of CPU, which were most of what the suite's distributed tests cost. Here
a multiprocessing forkserver imports them once, and every process is forked from it: a process
as a fresh interpreter is after its imports (no thread started, nothing run), which then runs
the module as ``python -m`` does (``runpy``, as ``__main__``), with the environment ``torchrun``
gives its ranks, its output in files, and its exit hooks run at the end. The launch through
``torchrun`` itself is tested once, in test_train.py.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from dataclasses import dataclass

# What every process here imports: torch, open_clip (building the model) and the entry points.
PRELOAD = ["torch", "open_clip", "av", "evl.train", "evl.cache", "evl.extract", "pipelines.pyav"]

_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _run(module: str, argv: list[str], env: dict[str, str], out: str, err: str, new_session: bool) -> None:
    """In the forked process: ``python -m module argv`` with ``env``, stdout and stderr to files."""
    import atexit
    import runpy
    import sys
    import threading
    import warnings

    if new_session:
        os.setsid()
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(env)
    if env.get("PYTHONWARNINGS") == "ignore":
        warnings.simplefilter("ignore")
    if "OMP_NUM_THREADS" in env:  # read by OpenMP when torch loads, which here was in the server
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [module, *argv]
    status = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: BLE001 -- a traceback and status 1, as the interpreter does
        import traceback

        traceback.print_exc()
        status = 1
    finally:  # as the interpreter ends: its threads joined, then its exit hooks
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


@dataclass
class Proc:
    """One started process: its pid, and once it ended, its exit status and output."""

    process: multiprocessing.Process
    out_path: str
    err_path: str
    returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        """The exit status (``128 + n``, as a shell reports it, for a process killed by signal
        ``n``); kills the process and fails after ``timeout`` seconds."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            raise TimeoutError(f"process {self.pid} still running after {timeout} s:\n{self.output}")
        code = self.process.exitcode
        self.returncode = code if code >= 0 else 128 - code
        return self.returncode

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(10)

    @property
    def stdout(self) -> str:
        with open(self.out_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    @property
    def stderr(self) -> str:
        with open(self.err_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def start(module: str, argv, log_dir, env: dict[str, str] | None = None, *, name: str = "proc",
          new_session: bool = False) -> Proc:
    """``python -m module argv`` as a separate process; its output goes to ``log_dir/name.out``
    and ``.err``. ``env`` is added to this process's environment."""
    os.makedirs(log_dir, exist_ok=True)
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    out, err = os.path.join(log_dir, f"{name}.out"), os.path.join(log_dir, f"{name}.err")
    process = _forkserver().Process(target=_run, args=(module, [str(a) for a in argv], full_env, out, err,
                                                       new_session))
    process.start()
    return Proc(process, out, err)


def start_ranks(module: str, argv, log_dir, nprocs: int = 2, env: dict[str, str] | None = None) -> list[Proc]:
    """``torchrun --standalone --nproc_per_node nprocs -m module argv``: one process per rank,
    with the rendezvous variables torchrun sets."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [start(module, argv, log_dir, name=f"rank{rank}",
                  env=dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nprocs), RANK=str(rank),
                           LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs), **(env or {})))
            for rank in range(nprocs)]


def wait_all(procs: list[Proc], timeout: float = 300) -> list[int]:
    """Every process's exit status; a process left after ``timeout`` seconds in all is killed,
    and so are the others, before the error."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            p.kill()


def run_ranks(module: str, argv, log_dir, nprocs: int = 2, env: dict[str, str] | None = None,
              timeout: float = 300) -> tuple[list[int], str, str]:
    """Runs :func:`start_ranks` to the end: every rank's status, and all ranks' stdout and
    stderr, each joined in rank order (what torchrun prints, without its own lines)."""
    procs = start_ranks(module, argv, log_dir, nprocs, env)
    codes = wait_all(procs, timeout)
    return codes, "".join(p.stdout for p in procs), "".join(p.stderr for p in procs)


def spawn(fn, args: tuple, nprocs: int = 2) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)``, the processes forked from the server:
    ``fn`` (a module-level function) runs as ``fn(rank, *args)`` in each; an error in one is
    raised here."""
    import torch.multiprocessing as mp

    _forkserver()
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver")
