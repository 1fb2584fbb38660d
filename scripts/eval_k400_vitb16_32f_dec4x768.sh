#!/usr/bin/env bash
# Evaluate: EVL ViT-B-16 32x8 on Kinetics-400; paper top-1 / top-5 84.2 / 96.6 (3x1 views).
# See k400_recipe.sh for the environment it reads; extra arguments go to evl.eval.
NAME=vitb16_32f_dec4x768 BACKBONE=ViT-B-16 WEIGHTS=ViT-B-16.pt FRAMES=32 STRIDE=8 SPATIAL=3 TEMPORAL=1 SPLIT8=1
source "$(dirname "${BASH_SOURCE[0]}")/k400_recipe.sh"
k400 eval "$@"
