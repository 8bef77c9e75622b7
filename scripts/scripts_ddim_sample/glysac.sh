#!/usr/bin/env bash
# DiffMix on GLySAC: synthesis with the paper's settings (hvcl/DiffMix scripts_ddim_sample/glysac.sh):
# DDIM over 100 respaced steps, starting 55 % of the way (the real patch noised to t = 540),
# classifier-free guidance s = 1.5, under GradMix's virtual label maps.
#
# Pipeline (from the repository root):
#   1. bash scripts/scripts_train/glysac.sh                     -> OUTPUT/glysac-SDM-256CH-FINETUNE/ema_0.9999_010200.pt
#   2. python scripts/gradmix.py --data_dir datasets/glysac --dataset_mode glysac --out_dir RESULTS/glysac-gradmix
#   3. bash scripts/scripts_ddim_sample/glysac.sh               -> RESULTS/glysac-grad_sdm/s1.5_ddim100_p55/
#        samples/*.png (synthetic patches), npy_patch/*.npy (HoVer-Net patches: RGB, instance, type),
#        records/*.json (provenance), figure.png, run.json
#
# Environment: DATA_DIR (dataset root with Train/Images; the real reference images), LABEL_DIR
# (GradMix output; empty = the dataset's own labels), MODEL (checkpoint), OUT (results root),
# NPROC (GPUs via torchrun; rank r takes patches r, r+N, ...), BATCH (patches per model call),
# PRECISION (auto = fp16 autocast on CUDA as --use_fp16 True; bf16 on recent GPUs), EXTRA (more flags).
# Re-running skips finished patches. The model flags repeat the training recipe so that an official
# checkpoint without config.json works too; with our checkpoints they match config.json.
set -euo pipefail

DATA_DIR=${DATA_DIR:-datasets/glysac}
LABEL_DIR=${LABEL_DIR-RESULTS/glysac-gradmix}
MODEL=${MODEL:-OUTPUT/glysac-SDM-256CH-FINETUNE/ema_0.9999_010200.pt}
OUT=${OUT:-RESULTS/glysac-grad_sdm}
NPROC=${NPROC:-1}
BATCH=${BATCH:-8}
PRECISION=${PRECISION:-auto}
EXTRA=${EXTRA:-}

if (( NPROC > 1 )); then
  LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC")
else
  LAUNCH=(python)
fi

MODEL_FLAGS=(
  --attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True
  --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2
  --resblock_updown True --use_fp16 True --use_scale_shift_norm True
  --num_classes 4 --class_cond True --no_instance False
)
SAMPLE_FLAGS=(
  --data_dir "$DATA_DIR" --dataset_mode glysac --split Train --label_dir "$LABEL_DIR"
  --model_path "$MODEL" --results_path "$OUT"
  --timestep_respacing ddim100 --ddim_percent 55 --s 1.5 --sampler ddim --eta 0
  --batch_size "$BATCH" --precision "$PRECISION" --seed 0
)

"${LAUNCH[@]}" scripts/image_sample.py "${MODEL_FLAGS[@]}" "${SAMPLE_FLAGS[@]}" $EXTRA
