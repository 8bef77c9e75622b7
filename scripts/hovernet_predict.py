"""Predict nuclei with a trained downstream network: one CoNSeP-style .mat per image.

Example:
    python scripts/hovernet_predict.py --run_dir runs/hover_real --data_dir ../shared/data/consep256 \\
        --split Test --out_dir runs/hover_real/pred
    python scripts/evaluate.py --true_dir ../shared/data/consep256/Test/Labels \\
        --pred_dir runs/hover_real/pred --dataset_mode custom --num_classes 5

--data_dir is a dataset root (the --split folder is used), a split folder, or a folder of HoVer-Net
.npy patches. Each <out_dir>/<stem>.mat holds inst_map, type_map, inst_type, inst_centroid (merged
classes, marked classes_merged=1), as scripts/evaluate.py reads them.
"""

from __future__ import annotations

import argparse

from guided_diffusion.downstream.cli import add_inference_flags, add_run_flags, apply_threads
from guided_diffusion.infra import fileio
from guided_diffusion.infra.config import HelpFormatter
from guided_diffusion.infra.errors import run_cli


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    add_run_flags(p, "dataset root, split folder or .npy folder")
    p.add_argument("--out_dir", required=True, help="folder for the .mat predictions")
    add_inference_flags(p)
    args = p.parse_args(argv)
    # Predictions into the data (e.g. --out_dir D/Test/Labels) would replace the ground truth.
    fileio.check_not_input(args.out_dir, {"--data_dir": args.data_dir}, "--out_dir")
    fileio.check_output_dir(args.out_dir, "--out_dir")

    from guided_diffusion.downstream.predict import predict_folder

    apply_threads(args.num_threads)
    written = predict_folder(args.run_dir, args.data_dir, args.out_dir, args.split, args.tile, args.device,
                             args.precision, args.progress)
    print(f"{len(written)} predictions written to {args.out_dir}")
    return written


if __name__ == "__main__":
    run_cli(main)
