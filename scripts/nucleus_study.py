"""The type-classification utility study: a nucleus-type classifier trained on real nuclei alone and
with DiffMix (or GradMix) nuclei added, the same step budget and seeds in every arm, tested on every
nucleus of the real held-out split; per-class F1 mean ± sd over seeds and a paired test of the rare
class against real only.

Example (consep256, 4 arms x 5 seeds, about 2 minutes a run on one core):

    python scripts/nucleus_study.py --data_dir ../shared/data/consep256 --dataset_mode custom \\
        --class_table datasets/consep_merged.json --balance_dirs runs/synth/balance \\
        --enlarge_dirs runs/synth/enlarge --gradmix_dirs runs/gradmix_balance --out_dir runs/nucleus_study

Arms: real, balance, balance_enlarge, gradmix (each run when its sources are given; --arms picks).
Rerun the same command to resume: finished arm x seed runs are kept, an interrupted one resumes from
its saved state; two invocations with disjoint --seeds may run side by side. Outputs in --out_dir:
report.md, table.md, results.csv, summary.json, f1_per_class.png, runs/<arm>/seed<k>/.
"""

from __future__ import annotations

import argparse

from guided_diffusion.infra.config import HelpFormatter, add_dataclass_args, dataclass_from_args
from guided_diffusion.infra.errors import run_cli


def main(argv=None) -> dict:
    from guided_diffusion.downstream.nuclei.classifier import ClassifierConfig
    from guided_diffusion.downstream.nuclei.study import NucleusStudyConfig, format_comparison, format_table, run_study

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    add_dataclass_args(p, NucleusStudyConfig)
    add_dataclass_args(p, ClassifierConfig)
    args = p.parse_args(argv)
    result = run_study(dataclass_from_args(NucleusStudyConfig, args), dataclass_from_args(ClassifierConfig, args), argv)
    print(format_table(result))
    print()
    print(format_comparison(result))
    print(f"\nreport: {args.out_dir}/report.md")
    return result


if __name__ == "__main__":
    run_cli(main)
