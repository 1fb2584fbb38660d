# Shared body of the Kinetics-400 recipes (scripts/train_k400_*.sh, scripts/eval_k400_*.sh).
# The calling script sets NAME, BACKBONE, WEIGHTS, FRAMES, STRIDE, SPATIAL, TEMPORAL and SPLIT8
# (gradient accumulation with 8 GPUs x 32 clips), then calls `k400 train8|train1|eval "$@"`.
# Reference recipe (evl-spec.md §3): AdamW lr 4e-4, wd 0.05, cosine over 50,000 steps, no
# warmup, global batch 256, RandAugment rand-m7-n4-mstd0.5-inc1, no flip.
# Environment: CLIP_DIR (OpenAI CLIP .pt files), K400 (train.txt, val.txt and the videos),
# CKPT (eval), and optionally PIPELINE (dali | pyav), NPROC, RUN_DIR.
set -euo pipefail

k400() {
  local mode=$1; shift
  : "${CLIP_DIR:?set CLIP_DIR to the folder holding $WEIGHTS}"
  : "${K400:?set K400 to the folder holding train.txt, val.txt and the videos}"
  local model=(--backbone "$BACKBONE" --backbone_path "$CLIP_DIR/$WEIGHTS" --num_classes 400
               --num_frames "$FRAMES" --sampling_rate "$STRIDE" --decoder_num_layers 4
               --val_list_path "$K400/val.txt" --data_root "$K400"
               --num_spatial_views "$SPATIAL" --num_temporal_views "$TEMPORAL"
               --pipeline "${PIPELINE:-dali}" --num_workers 12)
  if [ "$mode" = eval ]; then
    : "${CKPT:?set CKPT to the checkpoint to evaluate (this project's or the reference's released .pth)}"
    python -m torch.distributed.run --nproc_per_node "${NPROC:-1}" -m evl.eval "${model[@]}" \
      --batch_size 8 --checkpoint "$CKPT" --output_dir "${RUN_DIR:-runs/eval_k400_$NAME}" "$@"
    return
  fi
  local run_dir="${RUN_DIR:-runs/k400_$NAME}" launch
  # --batch_size is the global batch (the reference's meaning), shared among the processes.
  if [ "$mode" = train8 ]; then   # 8 processes x 32 clips
    launch=(python -m torch.distributed.run --nproc_per_node "${NPROC:-8}" -m evl.train --batch_size 256
            --batch_split "$SPLIT8")
  else                            # one process x 256 clips, in chunks of 32 or fewer as on 8 GPUs
    launch=(python -m evl.train --batch_size 256 --batch_split $((8 * SPLIT8)))
  fi
  mkdir -p "$run_dir"
  "${launch[@]}" "${model[@]}" --train_list_path "$K400/train.txt" \
    --lr 4e-4 --weight_decay 0.05 --num_steps 50000 --warmup_steps 0 \
    --auto_augment rand-m7-n4-mstd0.5-inc1 \
    --eval_freq 5000 --save_freq 5000 --print_freq 10 \
    --output_dir "$run_dir" --auto_resume "$@" 2>&1 | tee -a "$run_dir/train.log"
}
