# Shared body of the Something-Something v2 recipes (scripts/train_ssv2_*.sh, scripts/eval_ssv2_*.sh).
# The calling script sets NAME, BACKBONE, WEIGHTS, FRAMES, LAYERS, SPATIAL, TEMPORAL and SPLIT8
# (gradient accumulation with 8 GPUs x 32 clips), then calls `ssv2 train8|train1|eval "$@"`.
#
# From the spec (evl-spec.md §2, §5): segment ("TSN") sampling, one frame from each of FRAMES equal
# segments (--sampling segment; --sampling_rate is unused then); 12 decoder layers, which on
# ViT-B/16 read all 12 blocks; 174 classes. No horizontal flip: SSv2 has left/right classes
# ("Pushing something from left to right"), and the default has none (no --mirror).
# From the reference's Kinetics-400 recipe (spec §3), kept for SSv2 by our choice: AdamW lr 4e-4,
# wd 0.05, cosine to 0 with no warmup, global batch 256, RandAugment rand-m7-n4-mstd0.5-inc1 (no
# flip among its ops), random-resized crop scale 0.08-1, evaluation and checkpoints every 5,000 steps.
# Our choices, which neither the spec nor the reference fixes for SSv2: 40,000 steps (about 60
# epochs of the 168,913 training videos), and 3 spatial x 1 temporal evaluation views (each
# segment's middle frame, left/centre/right crops).
#
# Environment: CLIP_DIR (OpenAI CLIP .pt files); SSV2, the folder `python -m evl.ssv2` writes
# train.txt, val.txt and class_names.json to, and the data root of their paths; CKPT (eval);
# optionally PIPELINE (pyav, the default, or dali), NPROC, RUN_DIR. When $SSV2 has no train.txt / val.txt yet,
# SSV2_ANNOTATIONS (the official something-something-v2-*.json files) and SSV2_VIDEOS (the <id>.webm
# files) are converted into it first, so one command goes from the official files to a run.
set -euo pipefail

ssv2_lists() {
  : "${SSV2:?set SSV2 to the folder for train.txt, val.txt and class_names.json (python -m evl.ssv2 --output)}"
  if [ -f "$SSV2/train.txt" ] && [ -f "$SSV2/val.txt" ]; then
    return
  fi
  local todo="$SSV2 has no train.txt / val.txt yet: set SSV2_ANNOTATIONS and SSV2_VIDEOS to convert them"
  : "${SSV2_ANNOTATIONS:?$todo (SSV2_ANNOTATIONS: the folder of the official something-something-v2-*.json)}"
  : "${SSV2_VIDEOS:?$todo (SSV2_VIDEOS: the folder of the <id>.webm videos)}"
  python -m evl.ssv2 --annotations "$SSV2_ANNOTATIONS" --videos "$SSV2_VIDEOS" --output "$SSV2"
}

source "$(dirname "${BASH_SOURCE[0]}")/recipe_common.sh"

ssv2() {
  local mode=$1; shift
  : "${CLIP_DIR:?set CLIP_DIR to the folder holding $WEIGHTS}"
  ssv2_lists
  local model=(--backbone "$BACKBONE" --backbone_path "$CLIP_DIR/$WEIGHTS" --num_classes 174
               --num_frames "$FRAMES" --sampling segment --decoder_num_layers "$LAYERS"
               --val_list_path "$SSV2/val.txt" --data_root "$SSV2"
               --num_spatial_views "$SPATIAL" --num_temporal_views "$TEMPORAL"
               --pipeline "${PIPELINE:-pyav}" --num_workers 12)
  recipe_launch "$mode" ssv2 40000 "$SSV2/train.txt" "$@"
}
