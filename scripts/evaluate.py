"""Evaluate predicted nuclei label maps against ground truth (HoVer-Net's metric definitions).

Pairs the ``.mat`` (CoNSeP layout) or HoVer-Net ``.npy`` files of two folders by file name,
prints Dice, AJI, AJI+, DQ, SQ, PQ (mean over images) and detection F1, type accuracy and
per-type F1 (pooled over the set), and, with --out_dir, writes metrics.json,
metrics_per_image.csv and metrics_summary.csv there.

Raw dataset ground truth (CoNSeP ``Labels/`` types 1..7, GLySAC 1..10) must be merged into the
classes the predictions use: pass ``--dataset_mode consep`` or ``glysac`` (or ``custom`` with
``--class_table mapping.json`` or ``--num_classes N``). The merge is applied to the ground
truth only (``.mat`` files marked ``classes_merged=1`` are not merged again); predictions must
already be in merged classes. Without ``--dataset_mode`` types are compared as stored.

With ``--dataset_mode pannuke``, ``conic`` or ``lizard``, ``--true_dir`` is the dataset as
distributed and ``--split`` (default Test = fold 3) picks the ground truth; predictions are named by
the data layer's stems (``fold3_00012``, ``consep_1-0003``, Lizard image names). Ground truth
converted with scripts/convert_dataset.py is evaluated with ``--dataset_mode custom --class_table
<converted>/class_table.json``.

    python scripts/evaluate.py --true_dir datasets/consep/Test/Labels --pred_dir out/pred \
        --out_dir out/eval --dataset_mode consep
"""

from __future__ import annotations

import argparse

from guided_diffusion import metrics
from guided_diffusion.data.classes import DATASET_MODES, LABELS_MERGED, LABELS_MERGED_HELP, resolve_class_table
from guided_diffusion.data.formats import is_format
from guided_diffusion.infra import fileio
from guided_diffusion.infra.errors import DiffMixError, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--true_dir", required=True, help="folder of ground-truth .mat/.npy labels")
    parser.add_argument("--pred_dir", required=True, help="folder of predicted .mat/.npy labels")
    parser.add_argument("--out_dir", default=None, help="folder for JSON/CSV reports (optional)")
    parser.add_argument(
        "--radius", type=float, default=12.0, help="centroid pairing radius in pixels (default 12)"
    )
    parser.add_argument(
        "--dataset_mode",
        choices=DATASET_MODES,
        default=None,
        help="merge raw ground-truth type ids with this dataset's class table (consep: 7 raw "
        "-> 4 classes, glysac: 10 raw -> 3, custom: --class_table or --num_classes); "
        "default: compare types as stored",
    )
    parser.add_argument(
        "--labels_merged", default="auto", choices=LABELS_MERGED,
        help="with --dataset_mode, for the ground truth: " + LABELS_MERGED_HELP,
    )
    parser.add_argument(
        "--class_table",
        default=None,
        help="JSON mapping file for --dataset_mode custom (implies custom when given alone)",
    )
    parser.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="classes including background (per-type F1 for 1..num_classes-1); "
        "default: the class table's, or the types present in the ground truth",
    )
    parser.add_argument(
        "--match_iou", type=float, default=0.5, help="PQ match threshold, IoU > this (default 0.5)"
    )
    parser.add_argument(
        "--split", default="Test",
        help="pannuke/conic/lizard: the ground-truth split of --true_dir (Test = fold 3, fold1, all, ...)",
    )
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.match_iou < 1.0:
        raise DiffMixError(f"--match_iou must be in [0, 1), got {args.match_iou}")
    if not args.radius > 0:
        raise DiffMixError(f"--radius must be a positive number of pixels, got {args.radius}")
    if args.out_dir:
        fileio.check_output_dir(args.out_dir, "--out_dir")
        fileio.check_not_input(args.out_dir, {"--true_dir": args.true_dir, "--pred_dir": args.pred_dir}, "--out_dir")
    # A class table alone implies custom; no mode and no table: types are compared as stored.
    mode = args.dataset_mode or ("custom" if args.class_table else None)
    table = resolve_class_table(mode, args.class_table, args.num_classes) if mode else None
    common = dict(radius=args.radius, num_classes=args.num_classes, out_dir=args.out_dir, match_iou=args.match_iou,
                  progress=not args.no_progress)
    if is_format(mode):  # the dataset as distributed, read through the data layer
        result = metrics.evaluate_dataset(args.true_dir, mode, args.split, args.pred_dir, table, **common)
    else:
        result = metrics.evaluate_folders(args.true_dir, args.pred_dir, class_table=table,
                                          labels_merged=args.labels_merged, **common)
    print(metrics.format_table(result))
    if args.out_dir:
        print(f"\nreports written to {args.out_dir} (metrics.json, metrics_per_image.csv, "
              "metrics_summary.csv)")
    return result


if __name__ == "__main__":
    run_cli(main)
