"""Print and save per-class nucleus statistics of a dataset split or a folder of label maps.

Examples:
    python scripts/dataset_stats.py --data_dir datasets/toy --dataset_mode consep --out_dir runs/stats
    python scripts/dataset_stats.py --label_dir runs/gradmix --dataset_mode consep --out_dir runs/stats
    python scripts/dataset_stats.py --label_dir runs/gradmix --before_dir datasets/toy --dataset_mode consep \\
        --out_dir runs/stats      # adds a before/after comparison (balance.csv, balance.png)
"""

from __future__ import annotations

import argparse

from guided_diffusion.data.classes import DATASET_MODES, LABELS_MERGED, LABELS_MERGED_HELP, resolve_class_table
from guided_diffusion.data.stats import (
    dataset_statistics,
    format_table,
    label_dir_statistics,
    write_comparison,
    write_statistics,
)
from guided_diffusion.infra import fileio
from guided_diffusion.infra.config import HelpFormatter
from guided_diffusion.infra.errors import DiffMixError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    what = p.add_argument_group("what to measure (give exactly one of --data_dir and --label_dir)")
    what.add_argument("--data_dir", default=None, help="dataset root (holding --split) or a split folder")
    what.add_argument(
        "--label_dir",
        default=None,
        help="folder of label maps (.mat), or a folder with a Labels/ subfolder (e.g. GradMix --out_dir); "
        "for GradMix output only complete maps (with a Records/<name>.json) are counted",
    )
    what.add_argument(
        "--before_dir",
        default=None,
        help="with --label_dir: the source dataset to compare against (writes balance.csv/png, before/after)",
    )
    data = p.add_argument_group("dataset reading (for --data_dir and --before_dir)")
    data.add_argument("--dataset_mode", default="consep", choices=DATASET_MODES,
                      help="class table that merges raw type ids (also validates --label_dir maps)")
    data.add_argument("--labels_merged", default="auto", choices=LABELS_MERGED, help=LABELS_MERGED_HELP)
    data.add_argument("--class_table", default=None, help="custom mode: class table JSON (raw id -> class)")
    data.add_argument("--num_classes", type=int, default=None, help="custom mode: identity table size incl. background")
    data.add_argument("--split", default="Train", help="split folder under the dataset root "
                      "(pannuke/conic/lizard: Train = folds 1,2, Test = fold 3, all, or fold1,fold3)")
    data.add_argument("--image_folder", default="Images", help="image subfolder of the split")
    data.add_argument("--label_folder", default="Labels", help="label subfolder of the split")
    p.add_argument("--out_dir", required=True, help="where the CSV/PNG tables and stats_settings.json go")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if bool(args.data_dir) == bool(args.label_dir):
        raise DiffMixError(
            "give exactly one of --data_dir (a dataset) and --label_dir (a folder of label maps); "
            "to compare label maps with their dataset use --label_dir with --before_dir"
        )
    if args.before_dir and not args.label_dir:
        raise DiffMixError("--before_dir needs --label_dir (the label maps to compare with the dataset)")
    fileio.check_output_dir(args.out_dir, "--out_dir")
    table = resolve_class_table(args.dataset_mode, args.class_table, args.num_classes)
    common = dict(
        dataset_mode=args.dataset_mode,
        class_table=table if args.dataset_mode == "custom" else None,
        split=args.split,
        image_folder=args.image_folder,
        label_folder=args.label_folder,
        labels_merged=args.labels_merged,
    )
    outputs = []
    if args.data_dir:
        stats = dataset_statistics(data_dir=args.data_dir, **common)
        print(f"dataset {args.data_dir} ({args.split}, {stats.num_maps} label maps)\n{format_table(stats)}")
        outputs += write_statistics(stats, args.out_dir, "dataset_stats", f"{args.data_dir} ({args.split})")
    else:
        after = label_dir_statistics(args.label_dir, table, args.labels_merged)
        if after.incomplete:
            n = len(after.incomplete)
            print(f"skipped {n} incomplete GradMix map{'' if n == 1 else 's'} (label map without a record), "
                  f"e.g. {after.incomplete[0]}")
        print(f"label maps {args.label_dir} ({after.num_maps} maps)\n{format_table(after)}")
        outputs += write_statistics(after, args.out_dir, "label_stats", args.label_dir)
        if args.before_dir:
            before = dataset_statistics(data_dir=args.before_dir, **common)
            outputs += write_comparison(before, after, args.out_dir, labels=("before", "after"))
    fileio.write_json(fileio.join(args.out_dir, "stats_settings.json"), vars(args))
    print("wrote " + ", ".join(outputs))


if __name__ == "__main__":
    run_cli(main)
