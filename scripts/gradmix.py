"""Make GradMix label maps (balancing and enlarging) for a dataset split, as DiffMix uses them.

Examples:
    python scripts/gradmix.py --data_dir datasets/consep --dataset_mode consep --out_dir runs/gradmix
    python scripts/gradmix.py --data_dir datasets/glysac --dataset_mode glysac --out_dir runs/gradmix \\
        --num_maps 2 --kinds balance,enlarge --write_images true
    python scripts/gradmix.py --data_dir my_data --dataset_mode custom --num_classes 4 \\
        --minor 1,2 --major 3 --out_dir runs/gradmix

Outputs: <out_dir>/Labels/<stem>__balance000.mat (and __enlarge000.mat), one JSON record per map in
<out_dir>/Records/, optional GradMix images in <out_dir>/Images/, and class counts before/after
(class_counts.csv, class_counts.png). Rerunning skips maps that are complete.
"""

from __future__ import annotations

import argparse

from guided_diffusion import gradmix  # its modules load at first use: --help stays fast
from guided_diffusion.gradmix.settings import GradMixConfig
from guided_diffusion.infra.config import HelpFormatter, add_dataclass_args, dataclass_from_args
from guided_diffusion.infra.errors import run_cli


def parse_args(argv=None) -> GradMixConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=HelpFormatter)
    return dataclass_from_args(GradMixConfig, add_dataclass_args(p, GradMixConfig).parse_args(argv))


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    summary = gradmix.run_gradmix(cfg)
    n_written, n_skipped = len(summary["written"]), len(summary["skipped"])
    print(f"{n_written} map{'' if n_written == 1 else 's'} written, {n_skipped} already complete, in {cfg.out_dir}")
    return summary


if __name__ == "__main__":
    run_cli(main)
