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

DATASET=consep
NUM_CLASSES=5
PRETRAIN_STEPS=${PRETRAIN_STEPS:-5900}
FINETUNE_STEPS=${FINETUNE_STEPS:-10000}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
source "$(dirname "${BASH_SOURCE[0]}")/two_stage.sh"
