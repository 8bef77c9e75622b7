"""Label fidelity of synthetic patches: a segmenter trained on real data predicts on the synthetic
patches, scored against the label maps they were synthesised from, beside its score on real held-out
images; fidelity = synthetic / real, per metric and per class.

Example (a segmenter from scripts/hovernet_train.py or a utility-study run trained on real data only):

    python scripts/label_fidelity.py --run_dir runs/utility/runs/real/seed0/train \\
        --synthetic_dirs runs/synth/balance,runs/synth/enlarge --real_dir ../shared/data/consep256 \\
        --split Test --dataset_mode custom --num_classes 5 --out_dir runs/fidelity

--synthetic_dirs takes image_sample.py run folders (npy_patch/), folders of .npy patches, or
Images/ + Labels/ folders. Outputs: fidelity.json, fidelity.md, fidelity_grid.png and the
predictions and metric reports behind them.
"""

from __future__ import annotations

import argparse

from guided_diffusion.downstream.cli import add_class_flags, add_inference_flags, apply_threads
from guided_diffusion.infra import fileio
from guided_diffusion.infra.config import HelpFormatter
from guided_diffusion.infra.errors import run_cli


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--run_dir", required=True, help="a finished scripts/hovernet_train.py run (trained on real data)")
    p.add_argument("--synthetic_dirs", required=True, help="synthetic sources, comma-separated")
    p.add_argument("--real_dir", required=True, help="real dataset root (or split folder) with labels")
    p.add_argument("--split", default="Test", help="real split to score on")
    p.add_argument("--out_dir", required=True, help="output folder")
    add_class_flags(p)
    p.add_argument("--grid_rows", type=int, default=6, help="patches shown in fidelity_grid.png (0 = no figure)")
    add_inference_flags(p)
    args = p.parse_args(argv)
    fileio.check_output_dir(args.out_dir, "--out_dir")

    from guided_diffusion.downstream.data import refuse_distributed_format, split_list

    refuse_distributed_format(args.dataset_mode, "label_fidelity.py")
    from guided_diffusion.downstream.fidelity import label_fidelity, render

    apply_threads(args.num_threads)
    result = label_fidelity(args.run_dir, split_list(args.synthetic_dirs), args.real_dir, args.out_dir, args.split,
                            args.dataset_mode, args.num_classes, args.class_table, args.tile, args.device,
                            args.precision, args.grid_rows, args.progress)
    print(render(result))
    return result


if __name__ == "__main__":
    run_cli(main)
