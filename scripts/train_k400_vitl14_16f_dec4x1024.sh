#!/usr/bin/env bash
# Train on 8 GPUs: EVL ViT-L-14 16x16 on Kinetics-400; paper top-1 / top-5 87.0 / 97.6 (3x1 views).
# See k400_recipe.sh for the environment it reads; extra arguments go to evl.train.
NAME=vitl14_16f_dec4x1024 BACKBONE=ViT-L-14 WEIGHTS=ViT-L-14.pt FRAMES=16 STRIDE=16 SPATIAL=3 TEMPORAL=1 SPLIT8=2
source "$(dirname "${BASH_SOURCE[0]}")/k400_recipe.sh"
k400 train8 "$@"
