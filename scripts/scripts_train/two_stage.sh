#!/usr/bin/env bash
# The paper's two-stage SDM recipe, shared by consep.sh and glysac.sh (which set DATASET, NUM_CLASSES,
# PRETRAIN_STEPS, FINETUNE_STEPS and SAVE_INTERVAL, then source this file). See consep.sh for usage.
set -euo pipefail

DATA_DIR=${DATA_DIR:-datasets/$DATASET}
OUT=${OUT:-OUTPUT}
NPROC=${NPROC:-1}
PRECISION=${PRECISION:-auto}
EXTRA=${EXTRA:-}
GLOBAL_BATCH=16

if (( GLOBAL_BATCH % NPROC != 0 )); then
  echo "NPROC=$NPROC must divide the global batch $GLOBAL_BATCH" >&2; exit 2
fi
BATCH=$(( GLOBAL_BATCH / NPROC ))
if (( NPROC > 1 )); then
  LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC")
else
  LAUNCH=("${PYTHON:-python}")
fi

MODEL_FLAGS=(
  --attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True
  --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2
  --resblock_updown True --use_fp16 True --use_scale_shift_norm True --use_checkpoint True
  --num_classes "$NUM_CLASSES" --class_cond True --no_instance False
)
TRAIN_FLAGS=(
  --data_dir "$DATA_DIR" --dataset_mode "$DATASET" --batch_size "$BATCH" --ema_rate 0.9999
  --save_interval "$SAVE_INTERVAL" --log_interval 10 --keep_checkpoints 3 --precision "$PRECISION" --seed 0
)

PRE_DIR="$OUT/$DATASET-SDM-256CH"
FT_DIR="$OUT/$DATASET-SDM-256CH-FINETUNE"

# Stage 1: pre-training (resumes itself when re-run).
"${LAUNCH[@]}" scripts/image_train.py "${MODEL_FLAGS[@]}" "${TRAIN_FLAGS[@]}" \
  --lr 1e-4 --drop_rate 0.0 --max_steps "$PRETRAIN_STEPS" \
  --log_dir "$PRE_DIR" --resume_checkpoint latest $EXTRA

# Stage 2: classifier-free fine-tuning from stage 1's last checkpoint (or its own, when re-run).
if compgen -G "$FT_DIR/checkpoint*.json" > /dev/null; then
  RESUME=latest
else
  RESUME=$(printf '%s/model%06d.pt' "$PRE_DIR" "$PRETRAIN_STEPS")
fi
"${LAUNCH[@]}" scripts/image_train.py "${MODEL_FLAGS[@]}" "${TRAIN_FLAGS[@]}" \
  --lr 2e-5 --drop_rate 0.2 --max_steps "$FINETUNE_STEPS" \
  --log_dir "$FT_DIR" --resume_checkpoint "$RESUME" $EXTRA
