"""Where a trained downstream segmenter loses its nuclei: its nucleus-pixel (NP) branch, or HoVer-Net's
marker-controlled watershed (which drops every nucleus of an image when the HV maps are too flat to
give markers). Per image of a labelled split: NP pixel Dice, instance Dice after post-processing, HV
correlation with the true maps, border energy, true nuclei / markers / predicted nuclei.

Example:
    python scripts/hovernet_diagnose.py --run_dir runs/utility/runs/real/seed0/train \\
        --data_dir ../shared/data/consep256 --split Test --dataset_mode custom \\
        --class_table datasets/consep_merged.json --out_json runs/utility/diagnosis.json

Prints a one-table summary; --out_json also keeps the per-image numbers.
"""

from __future__ import annotations

import argparse

from guided_diffusion.downstream.cli import add_class_flags, add_inference_flags, add_run_flags, apply_threads
from guided_diffusion.infra import fileio
from guided_diffusion.infra.config import HelpFormatter
from guided_diffusion.infra.errors import run_cli


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    add_run_flags(p, "labelled dataset root or split folder")
    add_class_flags(p)
    p.add_argument("--max_images", type=int, default=0, help="only the first N images (0: all)")
    p.add_argument("--out_json", default="", help="also write the per-image numbers here")
    add_inference_flags(p)
    args = p.parse_args(argv)
    if args.out_json:  # now, not after the whole diagnosis
        fileio.check_output_file(args.out_json, "--out_json")
    from guided_diffusion.downstream.data import refuse_distributed_format

    refuse_distributed_format(args.dataset_mode, "hovernet_diagnose.py")

    from guided_diffusion.data.classes import resolve_class_table
    from guided_diffusion.downstream import diagnose as dg

    apply_threads(args.num_threads)
    table = resolve_class_table(args.dataset_mode, args.class_table or None, args.num_classes)
    result = dg.diagnose(args.run_dir, args.data_dir, args.split, table, args.tile, args.device, args.max_images,
                         args.progress, args.precision)
    if args.out_json:
        dg.write(result, args.out_json)
    print(dg.render(result))
    return result


if __name__ == "__main__":
    run_cli(main)
