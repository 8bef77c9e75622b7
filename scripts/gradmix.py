"""Make GradMix label maps (balancing and enlarging) for a dataset split, as DiffMix uses them.

Examples:
    python scripts/gradmix.py --data_dir datasets/consep --dataset_mode consep --out_dir runs/gradmix
    python scripts/gradmix.py --data_dir datasets/glysac --dataset_mode glysac --out_dir runs/gradmix \\
        --num_maps 2 --kinds balance,enlarge --write_images true
    python scripts/gradmix.py --data_dir my_data --dataset_mode custom --num_classes 4 \\
        --minor 1,2 --major 3 --out_dir runs/gradmix

Outputs: <out_dir>/Labels/<stem>__balance000.mat (and __enlarge000.mat), one JSON record per map in
<out_dir>/Records/, optional GradMix images in <out_dir>/Images/, and class counts before/after
(class_counts.csv, class_counts.png). Rerunning skips maps that are complete.
"""

from __future__ import annotations

import argparse

from guided_diffusion import fileio
from guided_diffusion.config import HelpFormatter, str2bool
from guided_diffusion.data.classes import DATASET_MODES, LABELS_MERGED, LABELS_MERGED_HELP
from guided_diffusion.errors import DiffMixError, run_cli
from guided_diffusion import gradmix  # its modules load at first use: --help stays fast


def _radii(value: str) -> tuple:
    try:
        radii = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three integers like 1,1,5, got {value!r}") from None
    if len(radii) != 3:
        raise argparse.ArgumentTypeError(f"expected three integers like 1,1,5, got {value!r}")
    return radii


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    io_ = p.add_argument_group("data")
    io_.add_argument("--data_dir", required=True, help="dataset root (holding --split) or the split folder")
    io_.add_argument("--dataset_mode", default="consep", choices=DATASET_MODES,
                     help="class table that merges the raw type ids (custom: see --class_table/--num_classes)")
    io_.add_argument("--labels_merged", default="auto", choices=LABELS_MERGED, help=LABELS_MERGED_HELP)
    io_.add_argument("--class_table", default=None, help="custom mode: class table JSON (raw id -> class)")
    io_.add_argument("--num_classes", type=int, default=None, help="custom mode: classes incl. background")
    io_.add_argument("--split", default="Train", help="split folder under --data_dir (ignored if it is the split; "
                     "pannuke/conic/lizard: Train = folds 1,2, Test = fold 3, all, or fold1,fold3)")
    io_.add_argument("--image_folder", default="Images", help="image subfolder of the split")
    io_.add_argument("--label_folder", default="Labels", help="label subfolder of the split")
    io_.add_argument("--stems", default=None, help="comma-separated source stems; default: every stem of the split")
    io_.add_argument("--out_dir", required=True,
                     help="output folder (Labels/, Records/, Images/); rerunning skips complete maps")

    what = p.add_argument_group("maps")
    what.add_argument("--num_maps", type=int, default=1, help="maps per source image for each kind in --kinds")
    what.add_argument("--kinds", default="balance", help=f"comma-separated subset of {','.join(gradmix.KINDS)}")
    what.add_argument("--num_balance", type=int, default=None, help="overrides --num_maps for balancing maps")
    what.add_argument("--num_enlarge", type=int, default=None, help="overrides --num_maps for enlarging maps")
    what.add_argument("--seed", type=int, default=0, help="base seed; each map's generator is (seed, stem, kind, k)")
    what.add_argument("--write_images", type=str2bool, default=False,
                      help="also write GradMix images (balance maps); without it the dataset's images are "
                      "never read, so a broken image file goes unnoticed")

    bal = p.add_argument_group("balancing (GradMix)")
    bal.add_argument("--minor", default=None, help="minor classes, e.g. 1 or 1,2; default: the dataset's rare "
                     "classes (pannuke 4 dead; conic/lizard 1,5 neutrophil, eosinophil), else 1")
    bal.add_argument("--major", default=None, help="major classes; default: every class not in --minor")
    bal.add_argument("--margin", type=float, default=gradmix.BALANCE_DEFAULTS["margin"], help="border exclusion (px) for targets and donors")
    bal.add_argument("--fraction", type=float, default=gradmix.BALANCE_DEFAULTS["fraction"], help="share of eligible major nuclei replaced")
    bal.add_argument("--size_ratio", type=float, default=gradmix.BALANCE_DEFAULTS["size_ratio"], help="donor fits if ratio * area <= dilated target area")
    bal.add_argument("--dilate", type=int, default=gradmix.BALANCE_DEFAULTS["dilate"], help="target dilation (px) for the fit rule and blend region")
    bal.add_argument("--max_tries", type=int, default=gradmix.BALANCE_DEFAULTS["max_tries"], help="fitting donors tried per target")
    bal.add_argument("--median_radii", type=_radii, default="1,1,5", help="R,G,B median radii for images")

    enl = p.add_argument_group("enlarging")
    enl.add_argument("--enlarge_fraction", type=float, default=gradmix.ENLARGE_DEFAULTS["enlarge_fraction"], help="share of movable nuclei shifted")
    enl.add_argument("--max_shift", type=int, default=gradmix.ENLARGE_DEFAULTS["max_shift"], help="shifts drawn from [-max_shift, max_shift] px")

    p.add_argument("--stats", type=str2bool, default=True, help="print and save class counts before/after")
    p.add_argument("--progress", type=str2bool, default=True, help="show progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    fileio.check_output_dir(args.out_dir, "--out_dir")
    kinds = [k for k in args.kinds.replace(" ", "").split(",") if k]
    unknown = [k for k in kinds if k not in gradmix.KINDS]
    if unknown or not kinds:
        raise DiffMixError(f"--kinds {args.kinds!r}: expected a comma-separated subset of {', '.join(gradmix.KINDS)}")
    for flag in ("num_maps", "num_balance", "num_enlarge"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise DiffMixError(f"--{flag} must be >= 0, got {value}")
    counts = {k: (args.num_maps if k in kinds else 0) for k in gradmix.KINDS}
    if args.num_balance is not None:
        counts["balance"] = args.num_balance
    if args.num_enlarge is not None:
        counts["enlarge"] = args.num_enlarge
    summary = gradmix.run_gradmix(
        args.data_dir,
        args.dataset_mode,
        args.out_dir,
        split=args.split,
        class_table=args.class_table,
        num_classes=args.num_classes,
        image_folder=args.image_folder,
        label_folder=args.label_folder,
        stems=[s for s in args.stems.split(",") if s] if args.stems else None,
        num_balance=counts["balance"],
        num_enlarge=counts["enlarge"],
        minor=args.minor,
        major=args.major,
        margin=args.margin,
        fraction=args.fraction,
        size_ratio=args.size_ratio,
        dilate=args.dilate,
        max_tries=args.max_tries,
        enlarge_fraction=args.enlarge_fraction,
        max_shift=args.max_shift,
        seed=args.seed,
        write_images=args.write_images,
        median_radii=args.median_radii,
        stats=args.stats,
        progress=args.progress,
        labels_merged=args.labels_merged,
    )
    n_written, n_skipped = len(summary["written"]), len(summary["skipped"])
    print(f"{n_written} map{'' if n_written == 1 else 's'} written, {n_skipped} already complete, in {args.out_dir}")
    return summary


if __name__ == "__main__":
    run_cli(main)
