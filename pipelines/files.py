"""Files written whole, and their hashes.

:func:`atomic_write` writes to a temporary file beside the target (``.tmp-*``), fsyncs it and
renames it over the target: the old file stays whole until the new one is complete. On any
failure the temporary file is removed and, for a disk that is full or failing, the error is an
``OSError`` that names the target, whatever the writer raised (``torch.save`` reports a short
write as ``RuntimeError: ... unexpected pos``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "file_sha256"]

_FULL = 1 << 20  # bytes free below which a failed write is taken for a full disk


def atomic_write(path: str, data: bytes | Callable[[BinaryIO], None], *, what: str = "file",
                 keeps: str = "the previous file is untouched") -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    ``what`` names the file in errors ("checkpoint", "list file", ...); ``keeps`` says what a
    failure leaves intact. The file gets the permissions ``open()`` would give it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not write {what} {path} ({e.strerror or e}); {keeps}") from e
        if isinstance(e, RuntimeError) and shutil.disk_usage(directory).free < _FULL:
            raise OSError(errno.ENOSPC, f"could not write {what} {path} (no space left on device); {keeps}") from e
        raise


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
