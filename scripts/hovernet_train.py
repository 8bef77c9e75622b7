"""Train the downstream nuclei segmentation/classification network (HoVer-Net, from MONAI) on real
and synthetic patches, for a fixed number of steps.

Examples:
    # real data only, the CPU-sized network
    python scripts/hovernet_train.py --data_dir ../shared/data/consep256 --dataset_mode custom \\
        --num_classes 5 --out_dir runs/hover_real
    # real + DiffMix patches (image_sample.py run folders), 30 % of each batch synthetic
    python scripts/hovernet_train.py --data_dir datasets/consep --dataset_mode consep \\
        --synthetic_dirs RESULTS/balance_run,RESULTS/enlarge_run --synthetic_fraction 0.3 \\
        --out_dir runs/hover_mix
    # the full MONAI HoVer-Net (fast mode, 256 px, GPU, bf16)
    python scripts/hovernet_train.py --arch hovernet --crop_size 256 --lr 1e-4 --steps 20000 ...

Rerunning with the same --out_dir resumes from the last saved state; a finished run is left as it
is. The run folder holds config.json, train_state.pt, progress.csv, model.safetensors, train.json.
Predict with scripts/hovernet_predict.py.
"""

from __future__ import annotations

import argparse
import json

from guided_diffusion.infra.config import add_dataclass_args, dataclass_from_args
from guided_diffusion.infra.errors import run_cli


def main(argv=None) -> dict:
    from guided_diffusion.downstream.train import HoverTrainConfig, train_segmenter

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, HoverTrainConfig)
    cfg = dataclass_from_args(HoverTrainConfig, parser.parse_args(argv))
    record = train_segmenter(cfg)
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    run_cli(main)
