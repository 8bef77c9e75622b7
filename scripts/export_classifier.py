"""Export a finished nucleus-type classifier run as a model folder with its held-out predictions —
how ``models/consep256_nuclei/`` was made (the classifier the demo report's label fidelity uses).

    python scripts/export_classifier.py --run_dir runs/real/nucleus_study/runs/real/seed0 \\
        --data_dir ../shared/data/consep256 --dataset_mode custom --class_table datasets/consep_merged.json \\
        --out_dir models/consep256_nuclei

The folder holds the run's config.json, model.safetensors and train.json, and heldout.json: the
classifier's prediction for every nucleus of --test_split (true and predicted class), so label
fidelity (scripts/nucleus_evidence.py's ratio of synthetic to real recall) can be computed from a
synthesis run alone.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from guided_diffusion.infra.config import HelpFormatter, add_dataclass_args, dataclass_from_args
from guided_diffusion.infra.errors import run_cli


def main(argv=None) -> dict:
    from guided_diffusion.infra import fileio
    from guided_diffusion.downstream.data import RealSplits
    from guided_diffusion.downstream.nuclei import crops as C
    from guided_diffusion.downstream.nuclei.classifier import export_classifier, load_classifier

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--run_dir", required=True, help="a finished classifier run (nucleus_study.py or nucleus_evidence.py)")
    p.add_argument("--out_dir", required=True, help="model folder to write")
    add_dataclass_args(p, RealSplits)
    args = p.parse_args(argv)
    cfg = dataclass_from_args(RealSplits, args)
    fileio.check_output_dir(args.out_dir, "--out_dir")
    _, config = load_classifier(args.run_dir)  # a bad run folder fails before the data is read
    real = C.read_real_nuclei(cfg, int(config.get("crop_size", 32)), progress=True)
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/export_classifier.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    record = export_classifier(args.run_dir, real.test.crops, real.test.labels, len(real.classes), args.out_dir,
                               f"{cfg.data_dir} ({cfg.test_split})", command)
    print(f"exported {args.run_dir} to {args.out_dir}: {record['n']} held-out nuclei, accuracy {record['accuracy']:.3f}")
    return record


if __name__ == "__main__":
    run_cli(main)
