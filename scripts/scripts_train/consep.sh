#!/usr/bin/env bash
# DiffMix on CoNSeP: the paper's two-stage training recipe (hvcl/DiffMix scripts_train/consep_multi.sh).
#
#   Stage 1  pre-training              lr 1e-4, steps 0 -> 5900
#   Stage 2  classifier-free fine-tune lr 2e-5, --drop_rate 0.2, steps 5900 -> 10000,
#            starting from stage 1's model005900.pt (weights, EMA, optimizer, random streams)
# Both: global batch 16, 256 px crops, 256 channels, EMA 0.9999, fp16 autocast, gradient checkpointing.
# Synthesis then uses OUT/consep-SDM-256CH-FINETUNE/ema_0.9999_010000.pt (scripts_ddim_sample/consep.sh).
#
# Usage (from the repository root):
#   DATA_DIR=datasets/consep bash scripts/scripts_train/consep.sh
#   NPROC=8 DATA_DIR=... bash scripts/scripts_train/consep.sh      # 8 GPUs via torchrun (batch 2 per GPU)
# Re-running the script continues an interrupted stage from its newest complete checkpoint.
# Environment: DATA_DIR (dataset root with Train/Images, Train/Labels), OUT (default OUTPUT),
# NPROC (processes, default 1), PRECISION (auto = fp16 as in the paper; bf16 on recent GPUs),
# PRETRAIN_STEPS / FINETUNE_STEPS / SAVE_INTERVAL (the paper's values by default),
# EXTRA (flags appended to both stages; they override the ones above, e.g. for a smoke test).
set -euo pipefail

DATA_DIR=${DATA_DIR:-datasets/consep}
OUT=${OUT:-OUTPUT}
NPROC=${NPROC:-1}
PRECISION=${PRECISION:-auto}
EXTRA=${EXTRA:-}
GLOBAL_BATCH=16
PRETRAIN_STEPS=${PRETRAIN_STEPS:-5900}
FINETUNE_STEPS=${FINETUNE_STEPS:-10000}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}

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
  --num_classes 5 --class_cond True --no_instance False
)
TRAIN_FLAGS=(
  --data_dir "$DATA_DIR" --dataset_mode consep --batch_size "$BATCH" --ema_rate 0.9999
  --save_interval "$SAVE_INTERVAL" --log_interval 10 --keep_checkpoints 3 --precision "$PRECISION" --seed 0
)

PRE_DIR="$OUT/consep-SDM-256CH"
FT_DIR="$OUT/consep-SDM-256CH-FINETUNE"

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
