#!/usr/bin/env bash
# The paper's two-stage SDM recipe, shared by consep.sh and glysac.sh (which set DATASET, NUM_CLASSES,
# PRETRAIN_STEPS, FINETUNE_STEPS and SAVE_INTERVAL, then source this file). See consep.sh for usage.
# A recipe may also set MODEL_FLAGS (array), GLOBAL_BATCH, PRE_LR, FT_LR, EMA_RATE, DATASET_MODE,
# RUN_NAME and KEEP before sourcing (consep256_cpu.sh does); unset, they are the paper's.
set -euo pipefail

DATA_DIR=${DATA_DIR:-datasets/$DATASET}
OUT=${OUT:-OUTPUT}
NPROC=${NPROC:-1}
PRECISION=${PRECISION:-auto}
EXTRA=${EXTRA:-}
GLOBAL_BATCH=${GLOBAL_BATCH:-16}
PRE_LR=${PRE_LR:-1e-4}
FT_LR=${FT_LR:-2e-5}
EMA_RATE=${EMA_RATE:-0.9999}
DATASET_MODE=${DATASET_MODE:-$DATASET}
RUN_NAME=${RUN_NAME:-$DATASET-SDM-256CH}
KEEP=${KEEP:-3}

if (( GLOBAL_BATCH % NPROC != 0 )); then
  echo "NPROC=$NPROC must divide the global batch $GLOBAL_BATCH" >&2; exit 2
fi
BATCH=$(( GLOBAL_BATCH / NPROC ))
if (( NPROC > 1 )); then
  # "--" ends torchrun's own options: it would otherwise take --s (guidance) as an abbreviation of its flags.
  LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC" --)
else
  LAUNCH=("${PYTHON:-python}")
fi

if [[ -z "${MODEL_FLAGS+set}" ]]; then MODEL_FLAGS=(
  --attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True
  --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2
  --resblock_updown True --use_fp16 True --use_scale_shift_norm True --use_checkpoint True
  --num_classes "$NUM_CLASSES" --class_cond True --no_instance False
); fi
TRAIN_FLAGS=(
  --data_dir "$DATA_DIR" --dataset_mode "$DATASET_MODE" --batch_size "$BATCH" --ema_rate "$EMA_RATE"
  --save_interval "$SAVE_INTERVAL" --log_interval 10 --keep_checkpoints "$KEEP" --precision "$PRECISION" --seed 0
)

PRE_DIR="$OUT/$RUN_NAME"
FT_DIR="$OUT/$RUN_NAME-FINETUNE"

# Stage 1: pre-training (resumes itself when re-run).
"${LAUNCH[@]}" scripts/image_train.py "${MODEL_FLAGS[@]}" "${TRAIN_FLAGS[@]}" \
  --lr "$PRE_LR" --drop_rate 0.0 --max_steps "$PRETRAIN_STEPS" \
  --log_dir "$PRE_DIR" --resume_checkpoint latest $EXTRA

# Stage 2: classifier-free fine-tuning from stage 1's last checkpoint (or its own, when re-run).
if compgen -G "$FT_DIR/checkpoint*.json" > /dev/null; then
  RESUME=latest
else
  RESUME=$(printf '%s/model%06d.pt' "$PRE_DIR" "$PRETRAIN_STEPS")
fi
"${LAUNCH[@]}" scripts/image_train.py "${MODEL_FLAGS[@]}" "${TRAIN_FLAGS[@]}" \
  --lr "$FT_LR" --drop_rate 0.2 --max_steps "$FINETUNE_STEPS" \
  --log_dir "$FT_DIR" --resume_checkpoint "$RESUME" $EXTRA
