#!/usr/bin/env bash
# The small real-data SDM shipped with the project (models/consep256_cpu/), trained on 2 CPU cores:
# the paper's two-stage recipe (pre-training, then classifier-free fine-tuning with drop rate 0.2)
# at a size one CPU core handles in about 1.5 hours (OMP_NUM_THREADS=1 beside other work).
#
#   data     ../shared/data/consep256/Train (352 real CoNSeP patches of 256 px, classes already merged
#            to 1 other, 2 inflammatory, 3 epithelial, 4 spindle), random 128 px crops, rot90/flips
#   model    128 px, 32 channels, channel_mult 1,2,2,2, 1 residual block per level, attention at 16 px,
#            SPADE hidden width 32 (official 128), learned sigma, 1000 linear diffusion steps (3.1 M params)
#   stage 1  pre-training              lr 2e-4, batch 4, steps 0 -> PRETRAIN_STEPS (default 1400)
#   stage 2  classifier-free fine-tune lr 1e-4, drop rate 0.2, PRETRAIN_STEPS -> FINETUNE_STEPS (1700)
#   EMA 0.995 (0.9999 averages over ~10k steps, far more than this run has), seed 0, fp32
#
# Usage (from the repository root; re-running resumes an interrupted stage):
#   OMP_NUM_THREADS=1 OUT=runs/sdm bash scripts/scripts_train/consep256_cpu.sh
#   python scripts/export_model.py --run_dir runs/sdm/consep256-cpu-FINETUNE --out_dir models/consep256_cpu
# Environment: DATA_DIR (default ../shared/data/consep256), OUT (default OUTPUT), PRETRAIN_STEPS,
# FINETUNE_STEPS, SAVE_INTERVAL, EXTRA as in consep.sh.
set -euo pipefail

DATASET=consep
source "$(dirname "${BASH_SOURCE[0]}")/consep256_cpu_model.sh"   # DATA_DIR, DATASET_MODE, NUM_CLASSES, MODEL_FLAGS
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1400}
FINETUNE_STEPS=${FINETUNE_STEPS:-1700}
SAVE_INTERVAL=${SAVE_INTERVAL:-200}
GLOBAL_BATCH=4
PRE_LR=2e-4
FT_LR=1e-4
EMA_RATE=0.995
RUN_NAME=consep256-cpu
KEEP=2
PRECISION=fp32
source "$(dirname "${BASH_SOURCE[0]}")/two_stage.sh"
