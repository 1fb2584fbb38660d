"""How close our RandAugment is to the reference's, in PSNR, on natural frames.

    python benchmarks/augment_agreement.py [--clips 200] [--parts 1,2,3] [--dali_device_id 0]

Prints, on 8 frames of a Kinetics-like 340x256 stock video (benchmarks/stock_videos.py):

1. per op and magnitude, our CPU execution (pipelines/augment.py) against timm's PIL op in the
   reference's order (the op on whole frames, then crop and resize to 224), over 4 crops;
2. whole decisions of a policy (default the K400 recipe's), the same comparison;
3. the DALI graph (DALI's CPU operators) against our CPU execution on the same frames and
   decisions.

tests/test_augment.py and tests/test_dali.py hold floors under these numbers.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CROPS = [(0, 0, 256, 340), (40, 60, 180, 200), (100, 150, 120, 100), (0, 58, 256, 224)]


def psnr(a, b) -> float:
    mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def summary(values) -> str:
    v = np.array(values)
    finite = v[np.isfinite(v)]
    if not len(finite):
        return "exact"
    exact = f", {np.mean(~np.isfinite(v)):.0%} exact" if not np.isfinite(v).all() else ""
    return f"min {v.min():5.1f}  10th pct {np.percentile(v, 10):5.1f}  median {np.median(v):5.1f} dB{exact}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="rand-m7-n4-mstd0.5-inc1")
    p.add_argument("--clips", type=int, default=200, help="decisions compared in part 2")
    p.add_argument("--parts", default="1,2,3",
                   help="parts to run, comma-separated (default: all); 1 and 2 run on the CPU alone")
    p.add_argument("--dali_device_id", type=int, help="run part 3 on this GPU (default: DALI's CPU operators)")
    p.add_argument("--magnitudes", default="1,4,7,10", help="magnitudes of part 1, comma-separated")
    p.add_argument("--crops", type=int, default=len(CROPS), choices=range(1, len(CROPS) + 1),
                   help="crops of part 1, the first N of its %(default)s")
    args = p.parse_args(argv)

    from pipelines.augment import augment_clip, reference_clip
    from pipelines.randaugment import INCREASING_TRANSFORMS, TRANSFORMS, AugOp, _arg, parse_policy
    from pipelines.sampling import ClipSampler
    from stock_videos import stock_frames

    parts = {int(x) for x in args.parts.split(",") if x}
    if not parts or parts - {1, 2, 3}:
        p.error(f"--parts: some of 1, 2 and 3, not {args.parts!r}")
    frames = np.stack(list(stock_frames(0, 8)))
    size = 224
    crops = CROPS[:args.crops]
    if 1 in parts:
        print(f"1. one op, ours vs timm's in the reference order: 8 frames 340x256, {len(crops)} crops to {size}")
        for name in dict.fromkeys(INCREASING_TRANSFORMS + TRANSFORMS):
            row = []
            for magnitude in (float(m) for m in args.magnitudes.split(",")):
                op = AugOp(name, magnitude, _arg(name, magnitude, random.Random(magnitude)))
                values = [psnr(reference_clip(frames, [op], c, size), augment_clip(frames, [op], c, size).numpy())
                          for c in crops]
                row.append(f"m{magnitude:g} {min(values):5.1f}")
            print(f"   {name:<21} " + "  ".join(row).replace("  inf", "exact"))

    policy = parse_policy(args.policy)
    sampler = ClipSampler(num_frames=8, sampling_rate=1, size=size, augment=policy)
    specs = [sampler.train_clip(i, 0, num_frames_in_video=8, height=256, width=340) for i in range(args.clips)]
    if 2 in parts:
        values = [psnr(reference_clip(frames, s.augment, s.crop, size),
                       augment_clip(frames, s.augment, s.crop, size).numpy()) for s in specs]
        print(f"2. {args.policy}, {len(specs)} clips' decisions, ours vs the reference order: {summary(values)}")
        worst = sorted(zip(values, (tuple(o.name for o in s.augment) for s in specs)))[:3]
        print("   lowest: " + "; ".join(f"{v:.1f} {', '.join(n)}" for v, n in worst))

    if 3 in parts:
        from pipelines.dali_augment import augment_frames

        n = min(len(specs), 64)
        got = augment_frames([frames] * n, [s.augment for s in specs[:n]], [s.crop for s in specs[:n]], size,
                             num_slots=policy.num_layers, device_id=args.dali_device_id)
        values = [psnr(g, augment_clip(frames, s.augment, s.crop, size).numpy()) for g, s in zip(got, specs)]
        where = "CPU operators" if args.dali_device_id is None else f"GPU {args.dali_device_id}"
        print(f"3. DALI graph ({where}) vs ours, same frames, {n} clips' decisions: {summary(values)}")


if __name__ == "__main__":
    from evl.cli import run_program

    run_program(main)
