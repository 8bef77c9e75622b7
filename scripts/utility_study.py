"""The utility study: train the downstream HoVer-Net on real data alone and with DiffMix patches added
(same network, same step budget, several seeds), evaluate each on a held-out split, and report.

Arms: real (real only), balance (+ DiffMix patches from GradMix balancing maps), balance_enlarge
(+ balancing and enlarging patches), gradmix (optional: + GradMix images, no diffusion).

Producing the synthetic inputs (one folder per kind of map), e.g. for consep256:

    python scripts/gradmix.py --data_dir ../shared/data/consep256 --dataset_mode custom --num_classes 5 \\
        --kinds balance --write_images true --out_dir runs/gradmix_balance
    python scripts/gradmix.py --data_dir ../shared/data/consep256 --dataset_mode custom --num_classes 5 \\
        --kinds enlarge --out_dir runs/gradmix_enlarge
    python scripts/image_sample.py --data_dir ../shared/data/consep256 --dataset_mode custom \\
        --label_dir runs/gradmix_balance --model_path SDM_RUN/ema_0.9999_NNNNNN.pt \\
        --results_path runs/synth --run_name balance [sampling flags]
    python scripts/image_sample.py ... --label_dir runs/gradmix_enlarge --run_name enlarge

Then (the cpu preset: 3 arms x 3 seeds on 2 CPU cores, two runs at a time; rerun the same command to
resume):

    python scripts/utility_study.py --data_dir ../shared/data/consep256 --dataset_mode custom \\
        --num_classes 5 --balance_dirs runs/synth/balance --enlarge_dirs runs/synth/enlarge \\
        [--gradmix_dirs runs/gradmix_balance] --preset cpu --jobs 2 --out_dir runs/utility

Presets: quick (seconds; tests), cpu (small MONAI U-Net HoVer-Net variant, 2500 steps, ~20 min per arm x
seed on one free core: ~1.7 h for the 9 runs with --jobs 2 on 2 cores), paper (MONAI HoVerNet fast mode,
256 px, GPU). Explicit flags override the preset. --jobs N trains N arm x seed runs side by side in
their own processes (one torch thread each on a 2-core machine); results equal the sequential ones.
Outputs in --out_dir: report.md, table.md, results.csv, summary.json, f1_per_class.png, runs/<arm>/seed<k>/.
"""

from __future__ import annotations

import argparse

from guided_diffusion.infra.config import add_dataclass_args, dataclass_from_args
from guided_diffusion.infra.errors import run_cli


def main(argv=None) -> dict:
    from guided_diffusion.downstream.study import StudyConfig, format_table, run_study

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, StudyConfig)
    cfg = dataclass_from_args(StudyConfig, parser.parse_args(argv))
    result = run_study(cfg, argv)
    print(format_table(result["summary"], result["class_names"]))
    print(f"\nreport: {cfg.out_dir}/report.md")
    return result


if __name__ == "__main__":
    run_cli(main)
