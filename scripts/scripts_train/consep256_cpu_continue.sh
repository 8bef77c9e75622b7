#!/usr/bin/env bash
# Stage 3 of the CPU model (docs/REAL_DATA.md section 0d): continue an exported SDM folder (INIT) for
# MORE steps with the classifier-free fine-tuning settings (lr 1e-4, label drop 0.2, batch 4 of 128 px
# crops, EMA 0.995, seed 0), plus the recipe options given as arguments, so that each option is compared
# at equal steps. The shipped models/consep256_cpu is stage 3 of the step-1700 model of consep256_cpu.sh
# (exported to a folder, e.g. runs/sdm/step1700) with --snr_gamma 5 --rare_crop_share 0.3, MORE 1100.
#
# Usage (from the repository root; re-running resumes from the newest complete checkpoint):
#   INIT=runs/sdm/step1700/model.safetensors OMP_NUM_THREADS=1 bash scripts/scripts_train/consep256_cpu_continue.sh cont_plain
#   INIT=runs/sdm/step1700/model.safetensors OMP_NUM_THREADS=1 bash scripts/scripts_train/consep256_cpu_continue.sh cont_b --snr_gamma 5 --rare_crop_share 0.3
# Environment: DATA_DIR (default ../shared/data/consep256), OUT (default runs/sdm), INIT (the weights
# of an exported model folder, default models/consep256_cpu/model.safetensors; its training.json gives
# the step counted from), MORE (steps beyond INIT's, default 1100), SAVE_INTERVAL (200).
set -euo pipefail

NAME=${1:?usage: consep256_cpu_continue.sh NAME [image_train.py flags...]}
shift
source "$(dirname "${BASH_SOURCE[0]}")/consep256_cpu_model.sh"   # DATA_DIR, DATASET_MODE, MODEL_FLAGS
OUT=${OUT:-runs/sdm}
INIT=${INIT:-models/consep256_cpu/model.safetensors}
INIT_STEP=$("${PYTHON:-python}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["step"])' "$(dirname "$INIT")/training.json")

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

"${PYTHON:-python}" scripts/image_train.py --data_dir "$DATA_DIR" --dataset_mode "$DATASET_MODE" "${MODEL_FLAGS[@]}" \
  --batch_size 4 --lr 1e-4 --drop_rate 0.2 --ema_rate 0.995 --save_interval "${SAVE_INTERVAL:-200}" \
  --log_interval 10 --precision fp32 --seed 0 --max_steps "$((INIT_STEP + ${MORE:-1100}))" --progress False \
  --log_dir "$OUT/$NAME" --resume_checkpoint "$RESUME" "$@"
