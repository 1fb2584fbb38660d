#!/usr/bin/env bash
# Evaluate EVL vitb16_8f_dec4x768 on Kinetics-400 (paper top-1 / top-5, 3 views: 82.9 / 95.7).
# Reference recipe (evl-spec.md §3): AdamW lr 4e-4, wd 0.05, cosine over 50,000 steps, global
# batch 256, RandAugment rand-m7-n4-mstd0.5-inc1, 1 spatial x 3 temporal eval views.
# CKPT: this project's checkpoint or the reference's released .pth.
# Set CLIP_DIR (OpenAI CLIP .pt files), K400 (train.txt / val.txt / videos), and optionally
# PIPELINE (dali | pyav), RUN_DIR. Extra arguments are passed on to evl.train.
set -euo pipefail
CLIP_DIR="${CLIP_DIR:?set CLIP_DIR to the folder holding ViT-B-16.pt}"
K400="${K400:?set K400 to the folder holding train.txt, val.txt and the videos}"
CKPT="${CKPT:?set CKPT to the checkpoint to evaluate}"
python -m torch.distributed.run --nproc_per_node "${NPROC:-1}" -m evl.eval \
    --backbone ViT-B-16 --backbone_path "$CLIP_DIR/ViT-B-16.pt" \
    --num_classes 400 --num_frames 8 --sampling_rate 16 \
    --decoder_num_layers 4 \
    --val_list_path "$K400/val.txt" --data_root "$K400" \
    --num_spatial_views 1 --num_temporal_views 3 \
    --pipeline "${PIPELINE:-dali}" --batch_size 8 --num_workers 12 \
    --checkpoint "$CKPT" --output_dir "${RUN_DIR:-runs/eval_k400_vitb16_8f_dec4x768}" "$@"
