"""What the entry points do with their output and their errors.

- A user's mistake (a bad list, checkpoint, flag or video, a used ``--output_dir``, a full
  disk) is one ``error:`` line and exit status 1; a traceback is for bugs. ``--debug`` or
  ``EVL_DEBUG=1`` shows the traceback anyway.
- stdout and stderr survive their reader: when a pipe (``| tee``) goes away first, as it does
  when a scheduler signals the whole process group, the output is dropped instead of raising
  ``BrokenPipeError`` in the middle of saving a checkpoint.
- A program ends as soon as its job is done (:func:`run_program`).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ["STOPPED", "SetupError", "exit_status", "run_program", "safe_stdio", "user_errors"]

STOPPED = 128  # + the signal's number: the exit status of a run stopped by SIGTERM / SIGINT


class SetupError(ValueError):
    """A ``ValueError`` raised while a job sets up (flags, model, data): the user's input."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from pipelines.base import TooManyBadVideos
    from pipelines.cache import CacheError
    from pipelines.lists import ListFileError
    from pipelines.index import VideoReadError
    from pipelines.randaugment import PolicyError

    from .checkpoint import RunDirectoryError
    from .weights import WeightsError

    return (SetupError, ListFileError, WeightsError, TooManyBadVideos, VideoReadError, PolicyError, CacheError,
            RunDirectoryError, FloatingPointError, OSError)



@contextlib.contextmanager
def user_errors(prog: str, debug: bool = False):
    """Turns the user's errors raised in the block into one line on stderr and exit status 1."""
    try:
        yield
    except _user_error_types() as e:
        if debug or os.environ.get("EVL_DEBUG"):
            raise
        message = str(e) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


class _SafeStream:
    """A text stream that drops what it cannot deliver once its reader is gone."""

    def __init__(self, stream):
        self._stream = stream
        self._gone = False

    def _lost(self) -> None:
        self._gone = True
        try:  # later writes, and the interpreter's flush at exit, go nowhere instead of failing
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, self._stream.fileno())
            os.close(fd)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except OSError as e:
                if not isinstance(e, BrokenPipeError) and e.errno != errno.EPIPE:
                    raise
                self._lost()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except OSError as e:
                if not isinstance(e, BrokenPipeError) and e.errno != errno.EPIPE:
                    raise
                self._lost()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def safe_stdio() -> None:
    """Makes ``sys.stdout`` and ``sys.stderr`` survive a reader that goes away (idempotent)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _SafeStream):
            setattr(sys, name, _SafeStream(stream))


def exit_status(result: object) -> int:
    """The exit status of an entry point's ``main`` that returned ``result``: an int as it is
    (not a bool), anything else 0."""
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def run_program(main: Callable[[], object]) -> NoReturn:
    """Runs an entry point's ``main`` as the program: an int it returns is the exit status
    (anything else is 0; ``SystemExit`` passes through).

    The objects alive at the end are frozen out of the garbage collector first. The interpreter's
    last collections otherwise walk every object torch, open_clip and their dependencies made at
    import, about 1.3 s on one core for each process (each torchrun rank, each short job) after
    its work is done. Nothing a job leaves behind waits for them: files are closed by the jobs,
    worker processes and process groups by the jobs and by atexit handlers, which still run.
    """
    try:
        status = main()
    finally:
        gc.freeze()
    sys.exit(exit_status(status))
