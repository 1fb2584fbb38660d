"""Where one training clip's CPU time goes, measured inside a DataLoader worker (one decoding
thread, as the PyAV pipeline's workers decode): setting up its decoder (opening the file, or
for an mp4 whose packets are read in place, the decoder alone), reading its frames (set-up,
seeks, decoding, RGB conversion: of the crop box alone for a clip without the policy), the RGB
conversion alone, the crop and resize, the RandAugment policy's decisions executed instead of
the plain crop, the batch's hand-over in shared memory (and the crop and resize made in it, as
the pipeline's workers make it), and what the training process then spends on the clip on a CPU
(normalising it to float). CPU time per clip, each part timed on its
own over the same clips, beside what decoding the clip's frames from its keyframe costs at the
rate of a decode from the start (the throughput benchmark's decode ceiling).

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
        from pipelines.base import thwc_uint8_to_bcthw
        from pipelines.dataset import clip_specs
        from pipelines.index import frame_index, open_video
        from pipelines.pyav import _ClipReader, _to_rgb, read_frames, read_stats
        from pipelines.transforms import crop_in_read, read_box
        from pipelines.workers import BatchSlots, cat_for_transfer

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

        def open_only(path, spec):  # as the reader sets up its decoder (FFmpeg opens it at the first packet)
            reader = _ClipReader(path, frame_index(path), {}, 0)
            reader.reopen()
            reader.ctx.open(strict=False)
            reader.close()

        def read(path, spec):  # as the pipeline reads: a clip without the policy, its crop box alone
            return read_frames(path, spec.frame_indices, crop=read_box(spec))

        before = read_stats()
        out = {"clips": len(clips), "read": cpu_ms(read)}
        cost = read_stats() - before
        out.update(decoded_frames=cost.frames / len(clips), packets=cost.packets / len(clips),
                   seeks=cost.seeks / len(clips), open=cpu_ms(open_only),
                   in_place=sum(frame_index(p).offset is not None for p, _ in clips) / len(clips))
        # Decoding from the start, as the decode ceiling of benchmarks/throughput.py does, and the
        # RGB conversion of those frames: the first videos, 512 frames.
        decoded, t0 = [], time.process_time()
        for path in dict.fromkeys(p for p, _ in clips):
            with open_video(path, frame_index(path).container_format) as c:
                c.streams.video[0].thread_type = "NONE"
                decoded += [f for _, f in zip(range(512 - len(decoded)), c.decode(video=0))]
            if len(decoded) >= 512:
                break
        out["sequential_frame"] = 1e3 * (time.process_time() - t0) / len(decoded)
        specs = [s for _, s in clips]
        boxes = [read_box(s) for s in specs]
        t0 = time.process_time()
        for i, f in enumerate(decoded):
            _to_rgb(f, boxes[i // a.num_frames % len(boxes)])
        out["rgb"] = 1e3 * (time.process_time() - t0) / len(decoded) * a.num_frames
        frames = [read(p, s) for p, s in clips]
        t0 = time.process_time()
        cropped = [crop_resize(f, crop_in_read(s), a.input_size, s.flip) for f, s in zip(frames, specs)]
        out["crop_resize"] = 1e3 * (time.process_time() - t0) / len(clips)
        # Handing batches of 8 clips over: into a new shared-memory segment each, as torch's
        # default collate does, or into one the training process gave back (BatchSlots).
        groups = [cropped[i:i + 8] for i in range(0, len(cropped) - 7, 8)] or [cropped]
        slots = BatchSlots(num_workers=1, per_worker=1)
        lent = []

        def hand_over(g, lender):
            batch, lease = cat_for_transfer(g, lender)
            lent.append(lease is not None)
            if lease is not None:
                slots.give_back(lease.slot, lease.token)  # as the training process does once it has read it

        for name, lender in (("handover_new", None), ("handover_reused", slots)):
            hand_over(groups[0], lender)  # warm: the reused segment exists
            t0 = time.process_time()
            for g in groups:
                hand_over(g, lender)
            out[name] = 1e3 * (time.process_time() - t0) / sum(len(g) for g in groups)
        assert all(lent[len(groups) + 1:]), "a batch was not handed over in the slot given back"
        # As the pipeline's workers make a batch: each clip resized straight into its rows of a
        # segment given back, nothing copied after.
        rows = torch.empty((8, *cropped[0].shape), dtype=torch.uint8).share_memory_()
        t0 = time.process_time()
        for i, (f, s) in enumerate(zip(frames, specs)):
            crop_resize(f, crop_in_read(s), a.input_size, s.flip, out=rows[i % 8])
        out["crop_resize_into_batch"] = 1e3 * (time.process_time() - t0) / len(clips)
        # The training process's part on a CPU: batches of 8 clips to normalised float.
        batches = [torch.stack(g) for g in groups]
        thwc_uint8_to_bcthw(batches[0], "cpu")  # warm: the reused float memory
        t0 = time.process_time()
        for b in batches:
            thwc_uint8_to_bcthw(b, "cpu")
        out["normalise"] = 1e3 * (time.process_time() - t0) / sum(len(b) for b in batches)
        if a.auto_augment:  # (the frames are whole: clips with the policy are read whole)
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
    print(f"  read (set-up, seeks, decoding, RGB) {r['read']:7.2f}   ({r['decoded_frames']:.1f} frames decoded, "
          f"{r['packets']:.1f} packets, {r['seeks']:.1f} seeks)")
    print(f"    of which setting up the decoder   {r['open']:7.2f}   ({r['in_place']:.0%} of the files' packets read "
          "in place, without the demuxer)")
    print(f"    of which the RGB conversion       {r['rgb']:7.2f}   (of the crop box, without the policy)")
    print(f"  against the same {r['packets']:.1f} frames decoded from the start (the decode ceiling's "
          f"rate, {r['sequential_frame']:.3f} ms a frame): {r['sequential_frame'] * r['packets']:.2f}")
    print(f"  crop and resize to {args.input_size}              {r['crop_resize']:7.2f}")
    if "augment" in r:
        print(f"  {args.auto_augment} instead   {r['augment']:7.2f}   "
              f"(+{r['augment'] - r['crop_resize']:.2f} for the policy)")
    print(f"  {'the batch into new shared memory':<35}{r['handover_new']:7.2f}   "
          f"(into a segment given back: {r['handover_reused']:.2f})")
    print(f"  crop and resize into the batch's shared memory, as the pipeline's workers do (nothing copied "
          f"after): {r['crop_resize_into_batch']:.2f}")
    print(f"then in the training process, on a CPU (on a GPU it runs on the device):\n"
          f"  normalising to float                {r['normalise']:7.2f}")
    return r


if __name__ == "__main__":
    from evl.cli import run_program

    run_program(main)
