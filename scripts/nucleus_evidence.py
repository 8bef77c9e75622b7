"""Nucleus-type evidence for synthetic patches: label fidelity (per class, with the control and the
nuclei GradMix changed), KID on the classifier's features, a classifier two-sample test (C2ST) and
the Classification Accuracy Score (CAS), all from small nucleus-type classifiers trained here.

Example (consep256; synthesis runs from image_sample.py, ideally with --changed_only True):

    python scripts/nucleus_evidence.py --data_dir ../shared/data/consep256 --dataset_mode custom \\
        --class_table datasets/consep_merged.json --synthetic_dirs runs/synth/balance \\
        --out_dir runs/evidence

A nucleus classifier is trained on the real train split into <out_dir>/classifier (about 2 minutes
on one core with the defaults), or --classifier reuses a finished one (e.g. a nucleus study's
runs/real/seed0). Outputs: evidence.md, evidence.json, fidelity_grid.png, predictions.csv (one row
per nucleus), and the classifier runs. Rerunning reuses the finished classifiers.
"""

from __future__ import annotations

import argparse

from guided_diffusion.infra.config import HelpFormatter, add_dataclass_args, dataclass_from_args
from guided_diffusion.infra.errors import run_cli


def main(argv=None) -> dict:
    from guided_diffusion.downstream.nuclei.classifier import ClassifierConfig
    from guided_diffusion.downstream.nuclei.evidence import EvidenceConfig, render, run_evidence

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    add_dataclass_args(p, EvidenceConfig)
    add_dataclass_args(p, ClassifierConfig)
    args = p.parse_args(argv)
    result = run_evidence(dataclass_from_args(EvidenceConfig, args), dataclass_from_args(ClassifierConfig, args), argv)
    print(render(result))
    return result


if __name__ == "__main__":
    run_cli(main)
