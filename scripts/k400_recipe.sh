# Shared body of the Kinetics-400 recipes (scripts/train_k400_*.sh, scripts/eval_k400_*.sh).
# The calling script sets NAME, BACKBONE, WEIGHTS, FRAMES, STRIDE, SPATIAL, TEMPORAL and SPLIT8
# (gradient accumulation with 8 GPUs x 32 clips), then calls `k400 train8|train1|eval "$@"`.
# Reference recipe (evl-spec.md §3): AdamW lr 4e-4, wd 0.05, cosine over 50,000 steps, no
# warmup, global batch 256, RandAugment rand-m7-n4-mstd0.5-inc1, no flip (recipe_common.sh).
# Environment: CLIP_DIR (OpenAI CLIP .pt files), K400 (train.txt, val.txt and the videos),
# CKPT (eval), and optionally PIPELINE (pyav, the default, or dali), NPROC, RUN_DIR.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/recipe_common.sh"

k400() {
  local mode=$1; shift
  : "${CLIP_DIR:?set CLIP_DIR to the folder holding $WEIGHTS}"
  : "${K400:?set K400 to the folder holding train.txt, val.txt and the videos}"
  local model=(--backbone "$BACKBONE" --backbone_path "$CLIP_DIR/$WEIGHTS" --num_classes 400
               --num_frames "$FRAMES" --sampling_rate "$STRIDE" --decoder_num_layers 4
               --val_list_path "$K400/val.txt" --data_root "$K400"
               --num_spatial_views "$SPATIAL" --num_temporal_views "$TEMPORAL"
               --pipeline "${PIPELINE:-pyav}" --num_workers 12)
  recipe_launch "$mode" k400 50000 "$K400/train.txt" "$@"
}
