#!/usr/bin/env bash
# Train on 8 GPUs: EVL ViT-B-16 16x16 on Kinetics-400; paper top-1 / top-5 83.6 / 96.3 (3x1 views).
# See k400_recipe.sh for the environment it reads; extra arguments go to evl.train.
NAME=vitb16_16f_dec4x768 BACKBONE=ViT-B-16 WEIGHTS=ViT-B-16.pt FRAMES=16 STRIDE=16 SPATIAL=3 TEMPORAL=1 SPLIT8=1
source "$(dirname "${BASH_SOURCE[0]}")/k400_recipe.sh"
k400 train8 "$@"
