"""List files: the `<path> <label>` text format that names a dataset's videos.

One video per line, `<path> <label>` as in the reference implementation's `--train_list_path`
files (EVL spec section 2), or `<path> <label> <start_sec> <end_sec>` for a segment of an
untrimmed video. Blank lines and lines starting with `#` are ignored; paths are joined to
`data_root` unless absolute and, as in the reference, may not contain spaces. `read_list`
validates the whole file before any training starts and reports every problem with its
`file:line`, so a broken list fails in seconds instead of hours into an epoch.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

from .files import atomic_write

__all__ = ["ListFileError", "VideoRecord", "read_list", "write_list"]

# A list with thousands of bad lines (a wrong data_root) should still give a readable message.
_MAX_REPORTED = 20


class ListFileError(ValueError):
    """A list file that cannot be used; `problems` holds every `file:line: problem` found."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class VideoRecord:
    """One line of a list file: a video (or a segment of one) and its class."""

    path: str
    label: int
    start_sec: float | None = None
    end_sec: float | None = None
    source: str = ""


def _parse_seconds(name: str, text: str) -> tuple[float | None, str | None]:
    try:
        value = float(text)
    except ValueError:
        return None, f"{name} {text!r} is not a number"
    if not math.isfinite(value):
        return None, f"{name} {text!r} is not a finite number"
    if value < 0:
        return None, f"{name} {text} is negative"
    return value, None


def _parse_line(
    fields: list[str], num_classes: int | None
) -> tuple[tuple[str, int, float | None, float | None] | None, list[str]]:
    """Fields of one non-blank line -> (path, label, start, end) or the problems found."""
    if len(fields) not in (2, 4):
        hint = " (paths may not contain spaces)" if len(fields) > 2 else ""
        return None, [
            "expected '<path> <label>' or '<path> <label> <start_sec> <end_sec>', "
            f"got {len(fields)} field{'s' if len(fields) != 1 else ''}{hint}"
        ]
    problems = []
    path, label_text = fields[0], fields[1]
    label = None
    try:
        label = int(label_text)
    except ValueError:
        problems.append(f"label {label_text!r} is not an integer")
    if label is not None:
        if label < 0 or (num_classes is not None and label >= num_classes):
            upper = num_classes if num_classes is not None else "num_classes"
            problems.append(f"label {label} outside [0, {upper})")
    start = end = None
    if len(fields) == 4:
        start, start_problem = _parse_seconds("start_sec", fields[2])
        end, end_problem = _parse_seconds("end_sec", fields[3])
        problems += [p for p in (start_problem, end_problem) if p]
        if start is not None and end is not None and end <= start:
            problems.append(f"end_sec {fields[3]} is not after start_sec {fields[2]}")
    if problems:
        return None, problems
    return (path, label, start, end), []


def read_list(
    list_path: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    num_classes: int | None = None,
    check_files: bool = True,
) -> list[VideoRecord]:
    """Parse and validate a list file; raise `ListFileError` listing every problem found.

    Checks the field count, integer labels in `[0, num_classes)` (when given), the segment
    times of 4-field lines (numbers, not negative, end after start) and, with `check_files`,
    that every video exists. A list without any record is an error too.
    """
    name = os.fspath(list_path)
    if not os.path.isfile(name):
        raise FileNotFoundError(errno.ENOENT, "list file not found", name)
    with open(name, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors): not part of the first path
        raw = raw[3:]

    records: list[VideoRecord] = []
    problems: list[str] = []
    lines = []
    for line_no, data in enumerate(raw.splitlines(), start=1):
        try:
            lines.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append(f"{name}:{line_no}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start + 1}); "
                            "save the list as UTF-8")
            lines.append("")
    for line_no, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        source = f"{name}:{line_no}"
        fields = text.split()
        parsed, line_problems = _parse_line(fields, num_classes)
        if parsed is None:
            problems += [f"{source}: {p} ({fields[0]})" for p in line_problems]
            continue
        path, label, start, end = parsed
        if data_root is not None:
            # os.path.join keeps an absolute `path` as it is.
            path = os.path.join(os.fspath(data_root), path)
        if check_files and not os.path.isfile(path):
            problems.append(f"{source}: file not found ({path})")
            continue
        records.append(VideoRecord(path, label, start, end, source))

    if problems:
        shown = problems[:_MAX_REPORTED]
        total = len(problems)
        if total > len(shown):
            footer = f"... and {total - len(shown)} more; {total} problems in total"
        else:
            footer = f"{total} problem{'s' if total != 1 else ''} in total"
        message = "\n".join([f"invalid list file {name}:", *shown, footer])
        raise ListFileError(message, problems)
    if not records:
        raise ListFileError(f"list file {name} has no records", [f"{name}: no records"])
    return records


def _format_record(record: VideoRecord, data_root: str | None) -> str:
    path = record.path
    if data_root is not None and os.path.isabs(path):
        path = os.path.relpath(path, data_root)
    if not path or any(c.isspace() for c in path):
        raise ValueError(f"path {path!r} cannot be written to a list file (empty or has spaces)")
    if (record.start_sec is None) != (record.end_sec is None):
        raise ValueError(f"{path}: start_sec and end_sec must be given together")
    fields = [path, str(int(record.label))]
    if record.start_sec is not None:
        # repr() is the shortest text that reads back as the same float.
        fields += [repr(float(record.start_sec)), repr(float(record.end_sec))]
    return " ".join(fields)


def write_list(
    path: str | os.PathLike,
    records: Iterable[VideoRecord],
    *,
    data_root: str | os.PathLike | None = None,
) -> None:
    """Write records in the list format, atomically (a reader never sees half a file).

    With `data_root`, absolute record paths are written relative to it, so that
    `read_list(path, data_root=data_root)` gives the same paths back.
    """
    root = os.fspath(data_root) if data_root is not None else None
    text = "".join(_format_record(r, root) + "\n" for r in records)
    atomic_write(os.fspath(path), text.encode("utf-8"), what="list file")
