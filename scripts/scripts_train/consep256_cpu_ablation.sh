#!/usr/bin/env bash
# One arm of the CPU recipe ablation (docs/REAL_DATA.md section 0c): stage 1 of consep256_cpu.sh
# (same model, data, lr 2e-4, batch 4 of 128 px crops, EMA 0.995, seed 0, no label dropout) for STEPS
# steps, plus the recipe options given as arguments, so that each option is compared at equal steps.
#
# Usage (from the repository root; re-running resumes from the newest complete checkpoint):
#   OMP_NUM_THREADS=1 bash scripts/scripts_train/consep256_cpu_ablation.sh base600
#   OMP_NUM_THREADS=1 bash scripts/scripts_train/consep256_cpu_ablation.sh tmax600 --t_max 540
#   OMP_NUM_THREADS=1 bash scripts/scripts_train/consep256_cpu_ablation.sh rare600 --rare_crop_share 0.3
#   OMP_NUM_THREADS=1 bash scripts/scripts_train/consep256_cpu_ablation.sh snr600 --snr_gamma 5
#   OMP_NUM_THREADS=1 bash scripts/scripts_train/consep256_cpu_ablation.sh crop64x16 --crop_size 64 --batch_size 16
#       # the same pixels per step; the model stays 128 px (docs/REAL_DATA.md 0g ran this as --image_size 64
#       # --attention_resolutions 8, the same U-Net, validated and sampled with --patch_size 128)
#   OMP_NUM_THREADS=1 bash scripts/scripts_train/consep256_cpu_ablation.sh lr4e4 --lr 4e-4
#   OMP_NUM_THREADS=1 STEPS=1700 bash scripts/scripts_train/consep256_cpu_ablation.sh c64_all --crop_size 64 \
#       --batch_size 16 --lr 8e-4 --drop_rate 0.2 --snr_gamma 5 --rare_crop_share 0.3 \
#       --resume_checkpoint runs/sdm/crop64x16_lr8e4/model000600.pt   # an arm branching from another (0h);
#       # to resume it later, re-run without --resume_checkpoint
# Environment: DATA_DIR (default ../shared/data/consep256), OUT (default runs/sdm), STEPS (600),
# SAVE_INTERVAL (200). Later flags override earlier ones (argparse), so an argument may replace a
# setting of the base recipe (e.g. --image_size, --batch_size).
set -euo pipefail

NAME=${1:?usage: consep256_cpu_ablation.sh NAME [image_train.py flags...]}
shift
source "$(dirname "${BASH_SOURCE[0]}")/consep256_cpu_model.sh"   # DATA_DIR, DATASET_MODE, MODEL_FLAGS
OUT=${OUT:-runs/sdm}

"${PYTHON:-python}" scripts/image_train.py --data_dir "$DATA_DIR" --dataset_mode "$DATASET_MODE" "${MODEL_FLAGS[@]}" \
  --batch_size 4 --lr 2e-4 --drop_rate 0.0 --ema_rate 0.995 --save_interval "${SAVE_INTERVAL:-200}" \
  --log_interval 10 --precision fp32 --seed 0 --max_steps "${STEPS:-600}" --progress False \
  --log_dir "$OUT/$NAME" --resume_checkpoint latest "$@"  # latest: the newest complete checkpoint, if any
