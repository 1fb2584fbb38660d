#!/usr/bin/env bash
# Train EVL vitl14_32f_dec4x1024 on Kinetics-400 (paper top-1 / top-5, 3 views: 87.3 / 97.7).
# Reference recipe (evl-spec.md §3): AdamW lr 4e-4, wd 0.05, cosine over 50,000 steps, global
# batch 256, RandAugment rand-m7-n4-mstd0.5-inc1, 3 spatial x 1 temporal eval views.
# Set CLIP_DIR (OpenAI CLIP .pt files), K400 (train.txt / val.txt / videos), and optionally
# PIPELINE (dali | pyav), RUN_DIR. Extra arguments are passed on to evl.train.
set -euo pipefail
CLIP_DIR="${CLIP_DIR:?set CLIP_DIR to the folder holding ViT-L-14.pt}"
K400="${K400:?set K400 to the folder holding train.txt, val.txt and the videos}"
RUN_DIR="${RUN_DIR:-runs/k400_vitl14_32f_dec4x1024}"
mkdir -p "$RUN_DIR"
python -m torch.distributed.run --nproc_per_node "${NPROC:-8}" -m evl.train \
    --backbone ViT-L-14 --backbone_path "$CLIP_DIR/ViT-L-14.pt" \
    --num_classes 400 --num_frames 32 --sampling_rate 8 \
    --decoder_num_layers 4 \
    --val_list_path "$K400/val.txt" --data_root "$K400" \
    --num_spatial_views 3 --num_temporal_views 1 \
    --train_list_path "$K400/train.txt" --pipeline "${PIPELINE:-dali}" \
    --batch_size 32 --batch_split 4 \
    --lr 4e-4 --weight_decay 0.05 --num_steps 50000 --warmup_steps 0 \
    --auto_augment rand-m7-n4-mstd0.5-inc1 --num_workers 12 \
    --eval_freq 5000 --save_freq 5000 --print_freq 10 \
    --output_dir "$RUN_DIR" --auto_resume "$@" 2>&1 | tee -a "$RUN_DIR/train.log"
