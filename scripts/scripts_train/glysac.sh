#!/usr/bin/env bash
# DiffMix on GLySAC: the paper's two-stage training recipe (hvcl/DiffMix scripts_train/glysac_multi.sh).
#
#   Stage 1  pre-training              lr 1e-4, steps 0 -> 9480
#   Stage 2  classifier-free fine-tune lr 2e-5, --drop_rate 0.2, steps 9480 -> 10200,
#            starting from stage 1's model009480.pt (weights, EMA, optimizer, random streams)
# Both: global batch 16, 256 px crops, 256 channels, EMA 0.9999, fp16 autocast, gradient checkpointing.
# Synthesis then uses OUT/glysac-SDM-256CH-FINETUNE/ema_0.9999_010200.pt (scripts_ddim_sample/glysac.sh).
#
# Usage (from the repository root):
#   DATA_DIR=datasets/glysac bash scripts/scripts_train/glysac.sh
#   NPROC=8 DATA_DIR=... bash scripts/scripts_train/glysac.sh      # 8 GPUs via torchrun (batch 2 per GPU)
# Re-running the script continues an interrupted stage from its newest complete checkpoint.
# Environment: DATA_DIR (dataset root with Train/Images, Train/Labels), OUT (default OUTPUT),
# NPROC (processes, default 1), PRECISION (auto = fp16 as in the paper; bf16 on recent GPUs),
# PRETRAIN_STEPS / FINETUNE_STEPS / SAVE_INTERVAL (the paper's values by default),
# EXTRA (flags appended to both stages; they override the ones above, e.g. for a smoke test).
set -euo pipefail

DATASET=glysac
NUM_CLASSES=4
PRETRAIN_STEPS=${PRETRAIN_STEPS:-9480}
FINETUNE_STEPS=${FINETUNE_STEPS:-10200}
SAVE_INTERVAL=${SAVE_INTERVAL:-120}
source "$(dirname "${BASH_SOURCE[0]}")/two_stage.sh"
