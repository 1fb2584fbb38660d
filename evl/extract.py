"""``python -m evl.extract``: per-video features of a trained EVL checkpoint, as ``.npy`` files.

For every video of a list file it writes the decoder's final query embedding (the input of the
classification head, ``[C]`` float32, averaged over the evaluation views) and, with ``--cls``,
the last backbone block's CLS token of every frame of the first view (``[T, C]``), plus
``DIR/index.jsonl`` (one line per extracted video: list line, path, label, npy paths). Files
are written under temporary names and renamed when complete, so an interrupted run resumes
where it stopped; ``DIR/extract.json`` records the checkpoint and sampling, and a rerun with
another one is refused rather than mixing features. Unreadable videos are reported at the end
(the exit status is then 1) and left out of the index. Under ``torchrun`` each process extracts
every ``world_size``-th remaining video on its own GPU, and rank 0 writes the index and the
report once all are done. Videos are read by the training pipelines' factory
(``--pipeline pyav``, or ``dali``: NVDEC on a GPU, and the colours a model trained on
``--pipeline dali`` saw), as evaluation reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

from pipelines import PipelineConfig, build_pipeline, cpu_workers
from pipelines.dataset import probe_dataset
from pipelines.files import atomic_write
from pipelines.lists import ListFileError, VideoRecord, read_list

from .distributed import PatientGroup, all_gather_object, process_group, resolve_device, threads_beside_decoders
from .inference import Predictor, add_model_arguments, predictor_from_args
from .weights import WeightsError, file_sha256

__all__ = ["main", "feature_paths"]

MANIFEST = "extract.json"
INDEX = "index.jsonl"


def feature_paths(output: str, i: int, record: VideoRecord) -> tuple[str, str]:
    """(embedding, cls) paths of record ``i``: numbered, since one video may be several segments."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(record.path))[0])[:80]
    base = os.path.join(output, "features", f"{i:07d}-{stem}")
    return base + ".npy", base + ".cls.npy"


_KEPT = "the features written so far are kept and a rerun continues from them"


def _save_npy(path: str, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array), what="features", keeps=_KEPT)


def _write_text_atomic(path: str, text: str) -> None:
    atomic_write(path, text.encode("utf-8"), keeps=_KEPT)


def _check_manifest(output: str, manifest: dict, write: bool = True) -> None:
    """Refuse an output directory of another extraction; record this one's (when ``write``)."""
    path = os.path.join(output, MANIFEST)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != manifest:
            diff = sorted(k for k in manifest.keys() | old.keys() if old.get(k) != manifest.get(k))
            raise SystemExit(f"error: {output} holds features of another extraction (differs in: {', '.join(diff)}; "
                             f"see {path}); use another --output or delete it")
    elif write:
        _write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")


def _line_number(record: VideoRecord) -> int | None:
    tail = record.source.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evl.extract", description="Per-video EVL features (.npy) of a list file: the final query "
        "embedding averaged over the evaluation views, and with --cls the last backbone block's per-frame CLS "
        "tokens. Resumable.")
    p.add_argument("--list", required=True, dest="list_path", metavar="LIST",
                   help="list file, '<path> <label>' per line")
    p.add_argument("--data_root", metavar="DIR", help="directory the list's paths are relative to")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="output directory (features/, index.jsonl, extract.json)")
    p.add_argument("--cls", action="store_true", help="also save the per-frame CLS tokens [T, C] of the first view")
    p.add_argument("--batch_size", type=int, default=8, metavar="N", help="videos per forward pass (all their views)")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                   help="decoding processes, or DALI's threads (default: %(default)s)")
    p.add_argument("--pipeline", default="pyav", choices=["pyav", "dali"],
                   help="how videos are decoded, as in training (dali: on the GPU with NVDEC; on the CPU "
                   "VP8/VP9/MJPEG)")
    add_model_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0, or 1 when some video could not be read."""
    ns = build_parser().parse_args(argv)
    if ns.batch_size < 1 or ns.num_workers < 0:
        raise SystemExit("error: --batch_size must be positive and --num_workers not negative")
    try:
        resolve_device(ns.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    with threads_beside_decoders(cpu_workers(ns.pipeline, ns.num_workers)), process_group(ns.device) as world:
        if world.world_size > 1:  # under torchrun: this process's share, on its own GPU
            ns.device = str(world.device)
        group = PatientGroup()  # processes finish their shares at different times
        try:
            return _extract(ns, world, group)
        finally:
            group.close()


def _read_share(ns: argparse.Namespace, predictor: Predictor, share: list[tuple[int, VideoRecord]], failures: list):
    """Batches of the readable videos of ``share``, read by ``--pipeline`` as evaluation reads
    them: ``(clips [N, 3, T, S, S], [(list position, the video's rows, views in order)])``;
    the unreadable ones are added to ``failures``."""
    s = predictor.settings
    cfg = PipelineConfig(
        list_path=ns.list_path, data_root=ns.data_root, num_classes=None, num_frames=s["num_frames"],
        sampling_rate=s["sampling_rate"], sampling=s["sampling"], input_size=s["input_size"],
        batch_size=ns.batch_size, train=False, num_workers=ns.num_workers, num_spatial_views=s["num_spatial_views"],
        num_temporal_views=s["num_temporal_views"], device=str(predictor.device), max_bad_fraction=1.0,
        missing_ok=True)
    cfg.probed = probe_dataset(cfg)  # the pipeline takes it: the list and probe cache are read once
    records, infos, unreadable, _ = cfg.probed
    reasons = dict(unreadable)
    readable = [r.source for r, info in zip(records, infos) if info is not None]
    position = {source: j for j, source in enumerate(readable)}  # the pipeline's index of a record
    wanted = {}
    for i, record in share:
        if record.source in position:
            wanted[position[record.source]] = i
        else:
            failures.append((record.path, reasons.get(record.path, "unreadable")))
    if not wanted:
        return
    cfg.keys = [(0, j) for j in wanted]
    pipe = build_pipeline(ns.pipeline, cfg)
    for batch in pipe:
        index = batch.index.cpu()
        yield batch.clips, [(wanted[j], index == j) for j in dict.fromkeys(index.tolist())]
    failures += pipe.bad


def _extract(ns: argparse.Namespace, world, group: PatientGroup) -> int:
    from tqdm import tqdm

    try:
        # Missing files are reported with the other unreadable videos, not fatal.
        records = read_list(ns.list_path, data_root=ns.data_root, check_files=False)
        predictor = predictor_from_args(ns)
    except (WeightsError, ListFileError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    output = ns.output
    os.makedirs(os.path.join(output, "features"), exist_ok=True)
    s = predictor.settings
    manifest = {
        "checkpoint_sha256": file_sha256(ns.checkpoint), "backbone_id": s["backbone_id"],
        "backbone_sha256": predictor.model.config.get("backbone_sha256"),
        **{k: s[k] for k in ("num_frames", "sampling_rate", "sampling", "num_spatial_views", "num_temporal_views",
                             "input_size")}}
    _check_manifest(output, manifest, write=False)  # every rank: the same file, the same verdict

    def done(i: int, record: VideoRecord) -> bool:
        emb, cls = feature_paths(output, i, record)
        return os.path.exists(emb) and (not ns.cls or os.path.exists(cls))

    todo = [(i, r) for i, r in enumerate(records) if not done(i, r)]
    skipped = len(records) - len(todo)
    # Every rank has listed what is left before any rank writes: the shares are cut from one
    # list (a rank that listed late, after others had written, skipped videos).
    group.barrier()
    if world.is_primary:
        _check_manifest(output, manifest)
    todo = todo[world.rank::world.world_size]
    failures: list[tuple[str, str]] = []
    desc = f"extract (rank 0 of {world.world_size})" if world.world_size > 1 else "extract"
    try:
        with tqdm(total=len(todo), desc=desc, unit="video", dynamic_ncols=True,
                  disable=None if world.is_primary else True) as bar:
            for clips, videos in _read_share(ns, predictor, todo, failures):
                out = predictor.run_normalised(clips, want_cls=ns.cls)
                for i, rows in videos:
                    emb_path, cls_path = feature_paths(output, i, records[i])
                    if ns.cls:  # written first: the embedding file's existence marks the video done
                        _save_npy(cls_path, out["cls"][rows][0].numpy().astype(np.float32))
                    _save_npy(emb_path, out["embedding"][rows].mean(0).numpy().astype(np.float32))
                bar.update(len(videos))
    except ValueError as e:  # the pipeline refuses what it cannot read (a codec DALI cannot decode here)
        raise SystemExit(f"error: {e}") from None

    # Every share done: rank 0 writes the index of all of them and reports everyone's failures.
    group.barrier()
    shares = all_gather_object((len(todo), failures))
    extracted = sum(n - len(f) for n, f in shares)
    failures = [f for _, fs in shares for f in fs]
    if not world.is_primary:
        return 1 if failures else 0
    lines = []
    for i, r in enumerate(records):
        if not done(i, r):
            continue
        emb, cls = feature_paths(output, i, r)
        entry = {"line": _line_number(r), "path": r.path, "label": r.label,
                 "embedding": os.path.relpath(emb, output),
                 "cls": os.path.relpath(cls, output) if os.path.exists(cls) else None}
        if r.start_sec is not None:
            entry.update(start_sec=r.start_sec, end_sec=r.end_sec)
        lines.append(json.dumps(entry) + "\n")
    _write_text_atomic(os.path.join(output, INDEX), "".join(lines))
    print(f"extract: {extracted} extracted, {skipped} already done, {len(failures)} unreadable; "
          f"{len(lines)} of {len(records)} videos in {os.path.join(output, INDEX)}", flush=True)
    if failures:
        print(f"{len(failures)} unreadable video(s):", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
        print("", file=sys.stderr, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    from .cli import run_program

    run_program(main)
