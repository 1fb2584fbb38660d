#!/usr/bin/env bash
# Train on 8 GPUs: EVL ViT-L-14 32x8 on Kinetics-400; paper top-1 / top-5 87.3 / 97.7 (3x1 views).
# See k400_recipe.sh for the environment it reads; extra arguments go to evl.train.
NAME=vitl14_32f_dec4x1024 BACKBONE=ViT-L-14 WEIGHTS=ViT-L-14.pt FRAMES=32 STRIDE=8 SPATIAL=3 TEMPORAL=1 SPLIT8=4
source "$(dirname "${BASH_SOURCE[0]}")/k400_recipe.sh"
k400 train8 "$@"
