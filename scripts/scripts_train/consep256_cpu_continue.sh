#!/usr/bin/env bash
# Stage 3 of the CPU model (docs/REAL_DATA.md section 0d): continue the shipped SDM
# (models/consep256_cpu, step 1700, stages 1-2 of consep256_cpu.sh) for more steps with the
# classifier-free fine-tuning settings (lr 1e-4, label drop 0.2, batch 4 of 128 px crops, EMA 0.995,
# seed 0), plus the recipe options given as arguments, so that each option is compared at equal steps.
#
# Usage (from the repository root; re-running resumes from the newest complete checkpoint):
#   OMP_NUM_THREADS=1 bash scripts/scripts_train/consep256_cpu_continue.sh cont_plain
#   OMP_NUM_THREADS=1 bash scripts/scripts_train/consep256_cpu_continue.sh cont_b --snr_gamma 5 --rare_crop_share 0.3
# Environment: DATA_DIR (default ../shared/data/consep256), OUT (default runs/sdm), INIT (the weights
# to start from, default models/consep256_cpu/model.safetensors, counted as step INIT_STEP = 1700),
# STEPS (total steps, default 3700), SAVE_INTERVAL (200).
set -euo pipefail

NAME=${1:?usage: consep256_cpu_continue.sh NAME [image_train.py flags...]}
shift
DATA_DIR=${DATA_DIR:-../shared/data/consep256}
OUT=${OUT:-runs/sdm}
INIT=${INIT:-models/consep256_cpu/model.safetensors}
INIT_STEP=${INIT_STEP:-1700}

# The first run starts from INIT (weights only: fresh optimizer, EMA from the weights), named with
# its step so that the step count goes on, with INIT's training.json beside it (export_model.py puts
# those earlier stages into the new record); later runs resume the run's newest complete checkpoint.
RESUME=latest
if ! compgen -G "$OUT/$NAME/model*.pt" >/dev/null; then
  mkdir -p "$OUT/$NAME.init"
  RESUME="$OUT/$NAME.init/model$(printf %06d "$INIT_STEP").safetensors"
  cp "$INIT" "$RESUME"
  cp "$(dirname "$INIT")/training.json" "$OUT/$NAME.init/"
fi

"${PYTHON:-python}" scripts/image_train.py --data_dir "$DATA_DIR" --dataset_mode custom \
  --image_size 128 --num_channels 32 --channel_mult 1,2,2,2 --num_res_blocks 1 \
  --attention_resolutions 16 --num_head_channels 32 --spade_hidden 32 \
  --diffusion_steps 1000 --learn_sigma True --noise_schedule linear \
  --resblock_updown True --use_scale_shift_norm True --num_classes 5 --class_cond True --no_instance False \
  --batch_size 4 --lr 1e-4 --drop_rate 0.2 --ema_rate 0.995 --save_interval "${SAVE_INTERVAL:-200}" \
  --log_interval 10 --precision fp32 --seed 0 --max_steps "${STEPS:-3700}" --progress False \
  --log_dir "$OUT/$NAME" --resume_checkpoint "$RESUME" "$@"
