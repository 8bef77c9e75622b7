"""DiffMix end to end on the built-in toy dataset (the README's main command), or on real data.

    python scripts/demo.py                      # toy data, CPU, a few minutes -> runs/demo/report.md
    python scripts/demo.py --preset quick       # tiny sizes (seconds)
    python scripts/demo.py --preset paper --data_dir /data/consep --dataset_mode consep   # GPU, paper settings

Flags shown without a default take the value of the chosen --preset.
"""

from __future__ import annotations

import argparse

from guided_diffusion.app.demo_settings import DemoConfig
from guided_diffusion.infra.config import add_dataclass_args, dataclass_from_args
from guided_diffusion.infra.errors import run_cli


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, DemoConfig)
    cfg = dataclass_from_args(DemoConfig, parser.parse_args(argv))
    from guided_diffusion.app.demo import run_demo  # after the flags: the run loads torch, --help does not

    run_demo(cfg)


if __name__ == "__main__":
    run_cli(main)
