"""Export a finished training run as a model folder (safetensors EMA weights, config.json, training
record, loss curve) — how ``models/consep256_cpu/`` was made.

    python scripts/export_model.py --run_dirs runs/sdm/consep256-cpu,runs/sdm/consep256-cpu-FINETUNE \\
        --out_dir models/consep256_cpu --recipe scripts/scripts_train/consep256_cpu.sh
"""

from __future__ import annotations

import argparse
import shlex
import sys

from guided_diffusion.app.pretrained import export_model
from guided_diffusion.infra import fileio
from guided_diffusion.infra.config import HelpFormatter
from guided_diffusion.infra.errors import run_cli


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--run_dirs", required=True, help="comma list of training run folders, first stage first")
    parser.add_argument("--out_dir", required=True, help="model folder to write")
    parser.add_argument("--recipe", default="", help="the script that trained the runs (recorded)")
    parser.add_argument("--command", default="", help="the command that ran the recipe (recorded)")
    args = parser.parse_args(argv)
    runs = [d for d in args.run_dirs.split(",") if d]
    fileio.check_output_dir(args.out_dir, "--out_dir")
    record = export_model(runs, args.out_dir, recipe=args.recipe,
                          command=args.command or " ".join(shlex.quote(a) for a in sys.argv))
    print(f"exported step {record['step']} ({record['parameters'] / 1e6:.2f} M parameters, "
          f"{record['total_wall_time_s'] / 60:.0f} min of training) to {args.out_dir}")


if __name__ == "__main__":
    run_cli(main)
