"""Where one training clip's CPU time goes, measured inside a DataLoader worker (one decoding
thread, as the PyAV pipeline's workers decode): opening its file, reading its frames (open,
seeks, decoding, RGB conversion), the crop and resize, and the RandAugment policy's decisions
executed instead of the plain crop. CPU time per clip, each part timed on its own over the same
clips.

    python benchmarks/clip_cost.py --train_list runs/stock_k1/train.txt --data_root runs/stock_k1 \\
        --sampling_rate 16 [--auto_augment rand-m7-n4-mstd0.5-inc1] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Measure(torch.utils.data.Dataset):
    """One item: the whole measurement, run in the worker process."""

    def __init__(self, args):
        self.args = args

    def __len__(self) -> int:
        return 1

    def __getitem__(self, _) -> dict:
        from pipelines import PipelineConfig, build_pipeline
        from pipelines.augment import augment_clip, crop_resize
        from pipelines.dataset import clip_specs
        from pipelines.index import frame_index, open_video
        from pipelines.pyav import read_frames, read_stats

        a = self.args
        torch.set_num_threads(1)
        cfg = PipelineConfig(list_path=a.train_list, data_root=a.data_root, num_classes=None, num_frames=a.num_frames,
                             sampling_rate=a.sampling_rate, input_size=a.input_size, batch_size=1, num_workers=0,
                             auto_augment=a.auto_augment, seed=0)
        ds = build_pipeline("pyav", cfg).dataset
        clips = [(ds.records[i].path, clip_specs(ds.sampler, True, (e, i), ds.records[i], ds.infos[i])[0])
                 for e in range(a.epochs) for i in range(len(ds))]
        for path, spec in clips[:len(ds)]:  # warm: file cache, indexes, code paths
            read_frames(path, spec.frame_indices)

        def cpu_ms(fn) -> float:
            t0 = time.process_time()
            for clip in clips:
                fn(*clip)
            return 1e3 * (time.process_time() - t0) / len(clips)

        def open_only(path, spec):  # as the reader opens a file it reads by pts
            index = frame_index(path)
            with open_video(path, index.container_format, probe=not index.matched_by_pts):
                pass

        before = read_stats()
        out = {"clips": len(clips), "read": cpu_ms(lambda p, s: read_frames(p, s.frame_indices))}
        cost = read_stats() - before
        out.update(decoded_frames=cost.frames / len(clips), packets=cost.packets / len(clips),
                   seeks=cost.seeks / len(clips), open=cpu_ms(open_only))
        frames = [read_frames(p, s.frame_indices) for p, s in clips]
        specs = [s for _, s in clips]
        t0 = time.process_time()
        for f, s in zip(frames, specs):
            crop_resize(f, s.crop, a.input_size, s.flip)
        out["crop_resize"] = 1e3 * (time.process_time() - t0) / len(clips)
        if a.auto_augment:
            t0 = time.process_time()
            for f, s in zip(frames, specs):
                augment_clip(f, s.augment, s.crop, a.input_size, s.flip)
            out["augment"] = 1e3 * (time.process_time() - t0) / len(clips)
        return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train_list", required=True)
    p.add_argument("--data_root", default="")
    p.add_argument("--num_frames", type=int, default=8)
    p.add_argument("--sampling_rate", type=int, default=16)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--auto_augment", default=None, help="a timm policy (default: none)")
    p.add_argument("--epochs", type=int, default=3, help="clips per video measured (default: %(default)s)")
    args = p.parse_args(argv)
    loader = torch.utils.data.DataLoader(_Measure(args), batch_size=None, num_workers=1)
    r = next(iter(loader))
    print(f"{r['clips']} clips of {args.num_frames} frames at stride {args.sampling_rate}, CPU ms per clip "
          f"in a DataLoader worker:")
    print(f"  read (open, seeks, decoding, RGB)   {r['read']:7.2f}   ({r['decoded_frames']:.1f} frames decoded, "
          f"{r['packets']:.1f} packets, {r['seeks']:.1f} seeks)")
    print(f"    of which opening the file         {r['open']:7.2f}")
    print(f"  crop and resize to {args.input_size}              {r['crop_resize']:7.2f}")
    if "augment" in r:
        print(f"  {args.auto_augment} instead   {r['augment']:7.2f}   "
              f"(+{r['augment'] - r['crop_resize']:.2f} for the policy)")
    return r


if __name__ == "__main__":
    from evl.cli import run_program

    run_program(main)
