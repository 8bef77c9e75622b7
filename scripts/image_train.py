"""Train the SDM/DiffMix semantic diffusion model on a labelled nuclei dataset.

The flags are the official ``image_train.py`` ones (model/diffusion settings from
``guided_diffusion.infra.config.ModelConfig``, training settings from ``guided_diffusion.train_util.TrainConfig``),
so the official command lines work; see ``python scripts/image_train.py --help``.

Examples:
    # one process (CPU or one GPU); the run folder comes from --log_dir or $OPENAI_LOGDIR
    python scripts/image_train.py --data_dir datasets/consep --dataset_mode consep --num_classes 5 \\
        --class_cond True --learn_sigma True --image_size 256 --max_steps 6000 --log_dir runs/consep

    # 8 GPUs on one node (torchrun), or through MPI
    torchrun --nproc_per_node 8 -- scripts/image_train.py ...
    mpiexec -n 8 python scripts/image_train.py ...

    # continue an interrupted run exactly where its newest complete checkpoint left off
    python scripts/image_train.py ... --log_dir runs/consep --resume_checkpoint latest

The paper's two-stage recipes are scripts/scripts_train/consep.sh and glysac.sh.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from guided_diffusion import dist_util
from guided_diffusion.infra.config import ModelConfig, add_dataclass_args, dataclass_from_args
from guided_diffusion.infra.errors import run_cli
from guided_diffusion.train_util import TrainConfig, train


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the DiffMix (SDM) diffusion model.",
        epilog="Boolean flags take a value: --learn_sigma True.",
    )
    add_dataclass_args(parser.add_argument_group("model and diffusion"), ModelConfig)
    add_dataclass_args(parser.add_argument_group("training"), TrainConfig)
    return parser


def _apply_gpu_flag(gpu: str) -> None:
    """The official ``--gpu`` flag, kept for old command lines: outside a distributed launcher it
    exports CUDA_VISIBLE_DEVICES before CUDA starts; under torchrun/mpiexec devices come from the
    local rank and the flag is ignored."""
    if not gpu:
        return
    if dist_util.under_launcher():
        print("warning: --gpu is ignored under torchrun/mpiexec (each rank uses its local rank's GPU)", file=sys.stderr)
    elif os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, "", gpu):
        print(f"warning: --gpu {gpu} ignored: CUDA_VISIBLE_DEVICES is already set", file=sys.stderr)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = create_argparser().parse_args(argv)
    model_cfg = dataclass_from_args(ModelConfig, args)
    train_cfg = dataclass_from_args(TrainConfig, args)
    _apply_gpu_flag(train_cfg.gpu)
    try:
        train(model_cfg, train_cfg)
    finally:
        dist_util.cleanup()


if __name__ == "__main__":
    run_cli(main)
