# The CPU SDM's architecture and data, shared by the recipes that train it (consep256_cpu.sh,
# consep256_cpu_ablation.sh, consep256_cpu_continue.sh): source this file, then pass "${MODEL_FLAGS[@]}".
# 128 px, 32 channels x (1,2,2,2), 1 residual block per level, attention at 16 px, SPADE hidden width 32
# (official 128), learned sigma, 1000 linear diffusion steps: 3.1 M parameters.
DATA_DIR=${DATA_DIR:-../shared/data/consep256}
DATASET_MODE=custom          # consep256 carries the 4 merged classes already
NUM_CLASSES=5
MODEL_FLAGS=(
  --image_size 128 --num_channels 32 --channel_mult 1,2,2,2 --num_res_blocks 1
  --attention_resolutions 16 --num_head_channels 32 --spade_hidden 32
  --diffusion_steps 1000 --learn_sigma True --noise_schedule linear
  --resblock_updown True --use_scale_shift_norm True
  --num_classes "$NUM_CLASSES" --class_cond True --no_instance False
)
