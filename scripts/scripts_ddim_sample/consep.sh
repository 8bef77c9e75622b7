#!/usr/bin/env bash
# DiffMix on CoNSeP: synthesis with the paper's settings (hvcl/DiffMix scripts_ddim_sample/consep.sh):
# DDIM over 100 respaced steps, starting 55 % of the way (the real patch noised to t = 540),
# classifier-free guidance s = 1.5, under GradMix's virtual label maps.
#
# Pipeline (from the repository root):
#   1. bash scripts/scripts_train/consep.sh                     -> OUTPUT/consep-SDM-256CH-FINETUNE/ema_0.9999_010000.pt
#   2. python scripts/gradmix.py --data_dir datasets/consep --dataset_mode consep --out_dir RESULTS/consep-gradmix
#   3. bash scripts/scripts_ddim_sample/consep.sh               -> RESULTS/consep-grad_sdm/s1.5_ddim100_p55/
#        samples/*.png (synthetic patches), npy_patch/*.npy (HoVer-Net patches: RGB, instance, type),
#        records/*.json (provenance), figure.png, run.json
#
# Environment: DATA_DIR (dataset root with Train/Images; the real reference images), LABEL_DIR
# (GradMix output; empty = the dataset's own labels), MODEL (checkpoint), OUT (results root),
# NPROC (GPUs via torchrun; rank r takes patches r, r+N, ...), BATCH (patches per model call),
# PRECISION (auto = fp16 autocast on CUDA as --use_fp16 True; bf16 on recent GPUs), FAST (1 = the fast
# preset: DPM-Solver++ with 10 model calls instead of DDIM's 55), EXTRA (more flags).
# Re-running skips finished patches. The model flags repeat the training recipe so that an official
# checkpoint without config.json works too; with our checkpoints they match config.json.
set -euo pipefail

DATASET=consep
NUM_CLASSES=5
CHECKPOINT=ema_0.9999_010000.pt
source "$(dirname "${BASH_SOURCE[0]}")/synthesize.sh"
