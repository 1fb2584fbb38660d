#!/usr/bin/env bash
# Train on one GPU (same global batch): EVL ViT-B-16 on Something-Something v2, 8 frames by segment sampling,
# 12 decoder layers, 3x1 evaluation views. ssv2_recipe.sh says what is from the spec and what
# is our choice, and which environment it reads; extra arguments go to evl.train.
NAME=vitb16_8f_dec12x768 BACKBONE=ViT-B-16 WEIGHTS=ViT-B-16.pt FRAMES=8 LAYERS=12 SPATIAL=3 TEMPORAL=1 SPLIT8=1
source "$(dirname "${BASH_SOURCE[0]}")/ssv2_recipe.sh"
ssv2 train1 "$@"
