#!/usr/bin/env bash
# The paper's synthesis settings, shared by consep.sh and glysac.sh (which set DATASET, NUM_CLASSES and
# CHECKPOINT, then source this file). See consep.sh for usage.
set -euo pipefail

DATA_DIR=${DATA_DIR:-datasets/$DATASET}
LABEL_DIR=${LABEL_DIR-RESULTS/$DATASET-gradmix}
MODEL=${MODEL:-OUTPUT/$DATASET-SDM-256CH-FINETUNE/$CHECKPOINT}
OUT=${OUT:-RESULTS/$DATASET-grad_sdm}
NPROC=${NPROC:-1}
BATCH=${BATCH:-8}
PRECISION=${PRECISION:-auto}
EXTRA=${EXTRA:-}
# FAST=1: the fast preset, DPM-Solver++(2M) with 10 model calls from the same SDEdit start instead of
# DDIM's 55 (benchmarks/RESULTS.md, "Fewer sampling steps": within the noise floor of DDIM-55 on
# PSNR/SSIM and label fidelity, 5.6x faster on CPU).
if [[ "${FAST:-0}" == 1 ]]; then
  SAMPLER=(--sampler dpmpp2m --solver_steps 10)
else
  SAMPLER=(--sampler ddim --eta 0)
fi

if (( NPROC > 1 )); then
  # "--" ends torchrun's own options: it would otherwise take --s (guidance) as an abbreviation of its flags.
  LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC" --)
else
  LAUNCH=(python)
fi

MODEL_FLAGS=(
  --attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True
  --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2
  --resblock_updown True --use_fp16 True --use_scale_shift_norm True
  --num_classes "$NUM_CLASSES" --class_cond True --no_instance False
)
SAMPLE_FLAGS=(
  --data_dir "$DATA_DIR" --dataset_mode "$DATASET" --split Train --label_dir "$LABEL_DIR"
  --model_path "$MODEL" --results_path "$OUT"
  --timestep_respacing ddim100 --ddim_percent 55 --s 1.5 "${SAMPLER[@]}"
  --batch_size "$BATCH" --precision "$PRECISION" --seed 0
)

"${LAUNCH[@]}" scripts/image_sample.py "${MODEL_FLAGS[@]}" "${SAMPLE_FLAGS[@]}" $EXTRA
