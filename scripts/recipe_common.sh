# The launch the recipes share (k400_recipe.sh, ssv2_recipe.sh): evaluation of $CKPT, or training
# on 8 processes (train8) or on one (train1) with the global batch of 256, AdamW lr 4e-4, wd 0.05,
# cosine with no warmup, RandAugment rand-m7-n4-mstd0.5-inc1, evaluations and checkpoints every
# 5,000 steps (the reference's recipe, spec §3).
#
#   recipe_launch MODE RUN_PREFIX NUM_STEPS TRAIN_LIST [more evl flags...]
#
# The caller sets the array `model` (the model's, the data's and the views' flags), NAME and
# SPLIT8 (gradient accumulation with 8 GPUs x 32 clips). Environment: CKPT (eval), and optionally
# NPROC, RUN_DIR.
recipe_launch() {
  local mode=$1 prefix=$2 steps=$3 train_list=$4
  shift 4
  if [ "$mode" = eval ]; then
    : "${CKPT:?set CKPT to the checkpoint to evaluate (this project's, an evl.export folder or the reference's .pth)}"
    python -m torch.distributed.run --nproc_per_node "${NPROC:-1}" -m evl.eval "${model[@]}" \
      --batch_size 8 --checkpoint "$CKPT" --output_dir "${RUN_DIR:-runs/eval_${prefix}_$NAME}" "$@"
    return
  fi
  local run_dir="${RUN_DIR:-runs/${prefix}_$NAME}" launch
  # --batch_size is the global batch (the reference's meaning), shared among the processes.
  if [ "$mode" = train8 ]; then   # 8 processes x 32 clips
    launch=(python -m torch.distributed.run --nproc_per_node "${NPROC:-8}" -m evl.train --batch_size 256
            --batch_split "$SPLIT8")
  else                            # one process x 256 clips, in chunks of 32 or fewer as on 8 GPUs
    launch=(python -m evl.train --batch_size 256 --batch_split $((8 * SPLIT8)))
  fi
  mkdir -p "$run_dir"
  "${launch[@]}" "${model[@]}" --train_list_path "$train_list" \
    --lr 4e-4 --weight_decay 0.05 --num_steps "$steps" --warmup_steps 0 \
    --auto_augment rand-m7-n4-mstd0.5-inc1 \
    --eval_freq 5000 --save_freq 5000 --print_freq 10 \
    --output_dir "$run_dir" --auto_resume "$@" 2>&1 | tee -a "$run_dir/train.log"
}
