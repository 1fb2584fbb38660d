"""``python -m evl.ssv2``: Something-Something v2's official annotation files as list files.

The official release has ``something-something-v2-labels.json`` (class name -> class id, as a
string), ``something-something-v2-train.json`` and ``something-something-v2-validation.json``
(lists of ``{"id", "label", "template", "placeholders"}``) and the videos as ``<id>.webm`` (VP9)
in one directory. An entry's class is its ``template`` with the square brackets removed
("Holding [something] next to [something]" -> "Holding something next to something"), which is
a key of the labels file. This writes ``train.txt`` and ``val.txt`` in the list format of
:mod:`pipelines.lists` (``<path> <class id>``, paths relative to the data root) and
``class_names.json`` (a JSON list, index = class id), each atomically. The test split
(``something-something-v2-test.json``) has no labels, so it has no list file here.

Every file is validated before anything is written: a missing file, invalid JSON, a malformed
entry, a template that is not a class, an id given twice (within a split or across the two) is
one error that names the file and the entry. Videos that are not on disk are refused, with
their count and first ids, unless ``--skip_missing`` leaves them out of the lists with a report:
a benchmark number from a partial validation set is not the benchmark's.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field

from pipelines.files import atomic_write
from pipelines.lists import VideoRecord, write_list

from .cli import SetupError, safe_stdio, user_errors

__all__ = ["AnnotationError", "Conversion", "LABELS_FILE", "SPLIT_FILES", "class_of", "convert", "main",
           "read_labels", "read_split"]

LABELS_FILE = "something-something-v2-labels.json"
# Our split name -> the official file; the list file is ``<split>.txt``.
SPLIT_FILES = {"train": "something-something-v2-train.json", "val": "something-something-v2-validation.json"}
_ID = re.compile(r"^[A-Za-z0-9_-]+$")  # ids become file names: no separators, no spaces
_SHOWN = 5  # missing ids named in a report


class AnnotationError(SetupError):
    """An annotation file, or the videos directory, that cannot be converted; the message names
    the file and the entry."""


@dataclass
class Conversion:
    """What :func:`convert` wrote: class names, per split its records and the ids left out
    because their video is not on disk (only with ``skip_missing``)."""

    class_names: list[str]
    records: dict[str, list[VideoRecord]]
    missing: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    data_root: str = ""


def class_of(template: str) -> str:
    """An entry's class name: its template without the square brackets around placeholders."""
    return template.replace("[", "").replace("]", "")


def _load_json(path: str):
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: file not found (the official annotation files are {LABELS_FILE}, "
                              f"{', '.join(SPLIT_FILES.values())})")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def read_labels(path: str) -> list[str]:
    """The class names of a labels file, index = class id; the ids must be 0..N-1, each once."""
    labels = _load_json(path)
    if not isinstance(labels, dict) or not labels:
        raise AnnotationError(f"{path}: expected a JSON object of class name -> class id, "
                              f"got {type(labels).__name__ if labels else 'an empty one'}")
    names: dict[int, str] = {}
    for name, value in labels.items():
        text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
        if text is None or not re.fullmatch(r"[0-9]+", text.strip()):
            raise AnnotationError(f"{path}: entry {name!r}: class id {value!r} is not a non-negative integer")
        cid = int(text)
        if cid in names:
            raise AnnotationError(f"{path}: entry {name!r}: class id {cid} is also the id of {names[cid]!r}")
        names[cid] = name
    gaps = sorted(set(range(len(names))) - set(names))
    if gaps:
        raise AnnotationError(f"{path}: class ids are not 0..{len(names) - 1}: {len(gaps)} missing (first: {gaps[0]}), "
                              f"largest is {max(names)}")
    return [names[i] for i in range(len(names))]


def _entry_problem(entry, class_ids: dict[str, int]) -> tuple[str | None, int | None, str | None]:
    """(id, class id, problem) of one split entry; id is None when there is none to name."""
    if not isinstance(entry, dict):
        return None, None, f"expected an object with 'id' and 'template', got {type(entry).__name__}"
    vid = entry.get("id")
    if isinstance(vid, int) and not isinstance(vid, bool):
        vid = str(vid)
    if not isinstance(vid, str) or not _ID.match(vid):
        return None, None, "'id' missing" if "id" not in entry else f"'id' {entry['id']!r} is not a video id"
    template = entry.get("template")
    if not isinstance(template, str):
        return vid, None, "'template' missing" if "template" not in entry else \
            f"'template' {template!r} is not a string"
    name = class_of(template)
    if name not in class_ids:
        close = difflib.get_close_matches(name, class_ids, n=1)
        hint = f" (closest class: {close[0]!r})" if close else ""
        return vid, None, f"template {template!r} is not a class of {LABELS_FILE}{hint}"
    return vid, class_ids[name], None


def read_split(path: str, class_ids: dict[str, int]) -> list[tuple[str, int]]:
    """``(video id, class id)`` of every entry of a train or validation file, in file order."""
    entries = _load_json(path)
    if not isinstance(entries, list) or not entries:
        raise AnnotationError(f"{path}: expected a JSON list of entries, "
                              f"got {type(entries).__name__ if entries else 'an empty one'}")
    items: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    problems: list[str] = []
    for i, entry in enumerate(entries):
        vid, cid, problem = _entry_problem(entry, class_ids)
        if problem is None and vid in seen:
            problem = f"id given twice (also entry {seen[vid]})"
        if problem is not None:
            problems.append(f"entry {i}{f' (id {vid})' if vid is not None else ''}: {problem}")
            continue
        seen[vid] = i
        items.append((vid, cid))
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''} in this file)" \
            if len(problems) > 1 else ""
        raise AnnotationError(f"{path}: {problems[0]}{more}")
    return items


def _video_names(videos: str) -> set[str]:
    if not os.path.isdir(videos):
        raise AnnotationError(f"{videos}: videos directory not found (the official <id>.webm files)")
    try:
        return {entry.name for entry in os.scandir(videos)}
    except OSError as e:
        raise AnnotationError(f"{videos}: cannot list the videos directory ({e.strerror or e})") from None


def convert(annotations: str, videos: str, output: str, *, data_root: str | None = None, extension: str = "webm",
            skip_missing: bool = False) -> Conversion:
    """Read the official files in ``annotations``, write ``output/{train,val}.txt`` and
    ``output/class_names.json``; list paths are relative to ``data_root`` (default: ``output``).

    Raises :class:`AnnotationError` before writing anything when an input is bad, or when
    videos are missing and not ``skip_missing``.
    """
    root = os.path.abspath(data_root if data_root is not None else output)
    labels_path = os.path.join(annotations, LABELS_FILE)
    class_names = read_labels(labels_path)
    class_ids = {name: i for i, name in enumerate(class_names)}
    splits = {split: read_split(os.path.join(annotations, name), class_ids) for split, name in SPLIT_FILES.items()}
    train_ids = {vid: i for i, (vid, _) in enumerate(splits["train"])}
    for j, (vid, _) in enumerate(splits["val"]):
        if vid in train_ids:
            raise AnnotationError(f"{os.path.join(annotations, SPLIT_FILES['val'])}: entry {j} (id {vid}): also in "
                                  f"{SPLIT_FILES['train']} (entry {train_ids[vid]}); the splits must not share videos")

    on_disk = _video_names(videos)
    suffix = "." + extension.lstrip(".")
    missing = {split: [vid for vid, _ in items if vid + suffix not in on_disk] for split, items in splits.items()}
    if any(missing.values()) and not skip_missing:
        counts = "; ".join(f"{split} {len(ids)} of {len(splits[split])} (ids {', '.join(ids[:_SHOWN])}"
                           f"{', ...' if len(ids) > _SHOWN else ''})" for split, ids in missing.items() if ids)
        raise AnnotationError(f"{videos}: videos not found as <id>{suffix}: {counts}; check --videos and --extension, "
                              "or pass --skip_missing to write the lists without them")

    prefix = os.path.relpath(os.path.abspath(videos), root)
    if any(c.isspace() for c in prefix) or prefix.startswith("#"):
        # A list file's paths have no spaces, and a line that starts with '#' is a comment.
        raise AnnotationError(f"{videos}: the videos' path relative to the data root {root} is {prefix!r}, which a "
                              "list file cannot hold (spaces, or a leading '#'); choose another --data_root or move "
                              "the videos")
    records = {}
    for split, items in splits.items():
        gone = set(missing[split])
        records[split] = [VideoRecord(os.path.normpath(os.path.join(prefix, vid + suffix)), cid)
                          for vid, cid in items if vid not in gone]
        if not records[split]:
            raise AnnotationError(f"{videos}: none of the {len(items)} videos of {SPLIT_FILES[split]} is there")

    files = {split: os.path.join(output, f"{split}.txt") for split in splits}
    files["class_names"] = os.path.join(output, "class_names.json")
    os.makedirs(output, exist_ok=True)
    atomic_write(files["class_names"], (json.dumps(class_names, indent=1, ensure_ascii=False) + "\n").encode("utf-8"),
                 what="class names")
    for split in splits:
        write_list(files[split], records[split])
    return Conversion(class_names, records, {s: ids for s, ids in missing.items() if ids}, files, root)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evl.ssv2", description="Write Something-Something v2's train.txt, val.txt and "
        "class_names.json from the official annotation files.")
    p.add_argument("--annotations", required=True, metavar="DIR",
                   help=f"directory holding {LABELS_FILE} and {' and '.join(SPLIT_FILES.values())}")
    p.add_argument("--videos", required=True, metavar="DIR", help="directory holding the <id>.webm videos")
    p.add_argument("--output", required=True, metavar="DIR", help="where train.txt, val.txt and class_names.json go")
    p.add_argument("--data_root", metavar="DIR", help="directory the lists' paths are relative to, the --data_root "
                   "of evl.train (default: --output)")
    p.add_argument("--extension", default="webm", metavar="EXT",
                   help="video file extension (default: %(default)s, the official files)")
    p.add_argument("--skip_missing", action="store_true", help="leave videos that are not on disk out of the lists, "
                   "with a report (default: refuse)")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors in the input too")
    return p


def main(argv: list[str] | None = None) -> int:
    """Returns 0; errors in the input are one ``error:`` line and status 1."""
    safe_stdio()
    prog = "python -m evl.ssv2"
    ns = build_parser().parse_args(argv)
    with user_errors(prog, ns.debug):
        done = convert(ns.annotations, ns.videos, ns.output, data_root=ns.data_root, extension=ns.extension,
                       skip_missing=ns.skip_missing)
    for split, ids in done.missing.items():
        print(f"{prog}: warning: {len(ids)} {split} video(s) not found in {ns.videos}, left out of "
              f"{done.files[split]} (ids {', '.join(ids[:_SHOWN])}{', ...' if len(ids) > _SHOWN else ''})",
              file=sys.stderr, flush=True)
    print(f"ssv2: {len(done.class_names)} classes -> {done.files['class_names']}", flush=True)
    for split in SPLIT_FILES:
        print(f"ssv2: {split} {len(done.records[split])} videos -> {done.files[split]}", flush=True)
    print(f"ssv2: paths relative to {done.data_root}: train with --data_root {done.data_root} "
          f"--num_classes {len(done.class_names)} --sampling segment", flush=True)
    return 0


if __name__ == "__main__":
    from .cli import run_program

    run_program(main)
