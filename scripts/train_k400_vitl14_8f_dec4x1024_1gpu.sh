#!/usr/bin/env bash
# Train on one GPU (same global batch): EVL ViT-L-14 8x16 on Kinetics-400; paper top-1 / top-5 86.3 / 97.2 (1x3 views).
# See k400_recipe.sh for the environment it reads; extra arguments go to evl.train.
NAME=vitl14_8f_dec4x1024 BACKBONE=ViT-L-14 WEIGHTS=ViT-L-14.pt FRAMES=8 STRIDE=16 SPATIAL=1 TEMPORAL=3 SPLIT8=1
source "$(dirname "${BASH_SOURCE[0]}")/k400_recipe.sh"
k400 train1 "$@"
