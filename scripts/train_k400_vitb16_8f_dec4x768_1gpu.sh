#!/usr/bin/env bash
# Train on one GPU (same global batch): EVL ViT-B-16 8x16 on Kinetics-400; paper top-1 / top-5 82.9 / 95.7 (1x3 views).
# See k400_recipe.sh for the environment it reads; extra arguments go to evl.train.
NAME=vitb16_8f_dec4x768 BACKBONE=ViT-B-16 WEIGHTS=ViT-B-16.pt FRAMES=8 STRIDE=16 SPATIAL=1 TEMPORAL=3 SPLIT8=1
source "$(dirname "${BASH_SOURCE[0]}")/k400_recipe.sh"
k400 train1 "$@"
