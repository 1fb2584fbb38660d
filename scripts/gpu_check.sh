#!/usr/bin/env bash
# GPU checks of the DALI pipeline, in a few minutes on one GPU:
#   1. the `gpu`-marked tests (NVDEC H.264/VP9 decode vs PyAV, batches on cuda vs the PyAV pipeline);
#   2. data throughput, DALI (GPU) vs PyAV (CPU workers), on the same videos: clips/s of training
#      batches, a few hundred clips each, with the videos written here (H.264 and VP9, 256 px);
#   3. the DALI operator comparison of benchmarks/throughput.py (our fn.decoders.video graph vs
#      DALI's two video readers) on 300-frame videos;
#   4. the K400 recipe's RandAugment inside the DALI graph: the DALI data stage with and without
#      it, side by side (the policy should cost under 10% of it), and the graph against the CPU
#      execution on the same frames (benchmarks/augment_agreement.py on the GPU).
# Results go to $OUT (pytest.txt, throughput.json) when it is set, else to runs/gpu_check.
# Usage: scripts/gpu_check.sh [python]     (default: .venv/bin/python if present, else python3)
# GPU_CHECK_DEVICE / GPU_CHECK_SIZE / GPU_CHECK_CLIPS change the device, frame size and clips per
# dataset (a CPU dry run of the script: GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=64 GPU_CHECK_CLIPS=64).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT_DIR=${OUT:-runs/gpu_check}
DATA=${GPU_CHECK_DATA:-/tmp/evl_gpu_check}
mkdir -p "$OUT_DIR" "$DATA"
export PYTHONUNBUFFERED=1
status=0

echo "== environment"
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/env.txt"
import torch, nvidia.dali, av
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("dali", nvidia.dali.__version__, "av", av.__version__)
EOF

echo "== gpu tests"
"$PY" -m pytest -m gpu -q -rs -s tests 2>&1 | tee "$OUT_DIR/pytest.txt" || status=1

echo "== throughput"
# A file, not stdin: the dataset writer's worker processes (spawn) re-import the main module.
BENCH=$(mktemp --suffix .py)
cat > "$BENCH" <<'EOF'
import json, os, sys, time

import torch

from evl.demo import write_demo_dataset
from pipelines import PipelineConfig, build_pipeline


def main(data: str, out_path: str, device: str, size: int, num_clips: int) -> None:
    workers = min(16, os.cpu_count() or 1)
    cuda = device.startswith("cuda")
    results = []
    for codec in ("h264", "vp9"):
        t0 = time.perf_counter()
        # 64 frames, keyframes every 8, 256 px by default: short videos of a realistic frame size.
        ds = write_demo_dataset(os.path.join(data, codec), codec=codec, num_train=num_clips, num_val=32, size=size,
                                num_frames=64, workers=workers)
        print(f"{codec}: dataset in {time.perf_counter() - t0:.0f} s", flush=True)
        for name in ("pyav", "dali"):
            cfg = PipelineConfig(list_path=ds.train_list, data_root=ds.root, num_classes=4, num_frames=8,
                                 sampling_rate=8, input_size=min(224, size), batch_size=32, train=True,
                                 num_workers=workers, device=device, crop_scale=(0.08, 1.0))
            try:
                pipe = build_pipeline(name, cfg)
                pipe.set_epoch(0)
                it = iter(pipe)
                next(it)  # start-up (workers, pipeline build) excluded
                if cuda:
                    torch.cuda.synchronize()
                t, clips = time.perf_counter(), 0
                for batch in it:
                    clips += len(batch.index)
                if cuda:
                    torch.cuda.synchronize()
                rate = clips / (time.perf_counter() - t)
                row = {"codec": codec, "pipeline": name, "clips": clips, "clips_per_s": round(rate, 1),
                       "workers": workers, "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
            except Exception as e:  # noqa: BLE001 -- report and go on with the other measurements
                row = {"codec": codec, "pipeline": name, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(row), flush=True)
            results.append(row)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
EOF
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} "$PY" "$BENCH" "$DATA" "$OUT_DIR/throughput.json" \
    "${GPU_CHECK_DEVICE:-cuda:0}" "${GPU_CHECK_SIZE:-256}" "${GPU_CHECK_CLIPS:-320}" 2>&1 | tee "$OUT_DIR/throughput.txt" || status=1
rm -f "$BENCH"

echo "== DALI operators"
# Which DALI operator to decode with (the DALI issue asks for a measurement): our
# fn.decoders.video graph (dali) against fn.experimental.readers.video and fn.readers.video fed
# the sampler's frame ranges, on 300-frame 256 px H.264 videos (8 frames at stride 16).
"$PY" benchmarks/throughput.py --stages data --pipelines pyav,dali,dali_reader,dali_legacy_reader \
    --video_frames 300 --device "${GPU_CHECK_DEVICE:-cuda:0}" --num_workers "$(nproc)" --iters 5 --repeats 2 \
    --work_dir "$DATA/bench" --json "$OUT_DIR/dali_operators.json" 2>&1 | tee "$OUT_DIR/dali_operators.txt" || status=1

echo "== RandAugment in the DALI graph"
"$PY" benchmarks/throughput.py --stages data --pipelines dali,pyav --compare_augment \
    --auto_augment rand-m7-n4-mstd0.5-inc1 --video_frames 300 --device "${GPU_CHECK_DEVICE:-cuda:0}" \
    --num_workers "$(nproc)" --iters 5 --repeats 2 --work_dir "$DATA/bench" --json "$OUT_DIR/augment.json" 2>&1 \
    | tee "$OUT_DIR/augment.txt" || status=1
"$PY" benchmarks/augment_agreement.py --clips 64 $([ "${GPU_CHECK_DEVICE:-cuda:0}" = cpu ] || echo --dali_device_id 0) \
    2>&1 | tee "$OUT_DIR/augment_agreement.txt" || status=1

echo "== done (status $status); results in $OUT_DIR"
exit $status
