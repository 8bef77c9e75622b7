"""Print and save per-class nucleus statistics of a dataset split or a folder of label maps.

Examples:
    python scripts/dataset_stats.py --data_dir datasets/toy --dataset_mode consep --out_dir runs/stats
    python scripts/dataset_stats.py --label_dir runs/gradmix --dataset_mode consep --out_dir runs/stats
    python scripts/dataset_stats.py --label_dir runs/gradmix --before_dir datasets/toy --dataset_mode consep \\
        --out_dir runs/stats      # adds a before/after comparison (balance.csv, balance.png)
"""

from __future__ import annotations

import argparse

from guided_diffusion import fileio
from guided_diffusion.data.classes import resolve_class_table
from guided_diffusion.data.stats import (
    dataset_statistics,
    format_table,
    label_dir_statistics,
    write_comparison,
    write_statistics,
)
from guided_diffusion.errors import DiffMixError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=None, help="dataset root or split folder")
    p.add_argument("--label_dir", default=None, help="folder of label maps (.mat, e.g. GradMix output)")
    p.add_argument("--before_dir", default=None, help="dataset to compare --label_dir against (before/after)")
    p.add_argument("--dataset_mode", default="consep", choices=["consep", "glysac", "custom"])
    p.add_argument("--class_table", default=None, help="custom mode: class table JSON")
    p.add_argument("--num_classes", type=int, default=None, help="custom mode: identity table size")
    p.add_argument("--split", default="Train")
    p.add_argument("--image_folder", default="Images")
    p.add_argument("--label_folder", default="Labels")
    p.add_argument("--out_dir", required=True)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.data_dir and not args.label_dir:
        raise DiffMixError("give --data_dir (a dataset) or --label_dir (a folder of label maps)")
    table = resolve_class_table(args.dataset_mode, args.class_table, args.num_classes)
    common = dict(
        dataset_mode=args.dataset_mode,
        class_table=table if args.dataset_mode == "custom" else None,
        split=args.split,
        image_folder=args.image_folder,
        label_folder=args.label_folder,
    )
    outputs = []
    if args.data_dir:
        stats = dataset_statistics(data_dir=args.data_dir, **common)
        print(f"dataset {args.data_dir} ({args.split}, {stats.num_maps} label maps)\n{format_table(stats)}")
        outputs += write_statistics(stats, args.out_dir, "dataset_stats", f"{args.data_dir} ({args.split})")
    if args.label_dir:
        after = label_dir_statistics(args.label_dir, table)
        print(f"label maps {args.label_dir} ({after.num_maps} maps)\n{format_table(after)}")
        outputs += write_statistics(after, args.out_dir, "label_stats", args.label_dir)
        if args.before_dir:
            before = dataset_statistics(data_dir=args.before_dir, **common)
            outputs += write_comparison(before, after, args.out_dir, labels=("before", "after"))
    fileio.write_json(fileio.join(args.out_dir, "stats_settings.json"), vars(args))
    print("wrote " + ", ".join(outputs))


if __name__ == "__main__":
    run_cli(main)
