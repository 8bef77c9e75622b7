"""Convert PanNuke / CoNIC / Lizard to the CoNSeP layout, or a synthesis run back to PanNuke / CoNIC arrays.

Examples:
    # dataset as distributed -> <out>/Train, <out>/Test with Images/*.png and Labels/*.mat (+ class_table.json)
    python scripts/convert_dataset.py --data_dir /data/pannuke --dataset_mode pannuke --out_dir /data/pannuke_consep
    python scripts/convert_dataset.py --data_dir /data/conic --dataset_mode conic --out_dir /data/conic_consep \\
        --splits Train,Test

    # a synthesis run made with --dataset_mode pannuke or conic -> arrays to append to the dataset's own
    python scripts/convert_dataset.py --from_run RESULTS/pannuke-grad_sdm/s1.5_ddim100_p55
"""

from __future__ import annotations

import argparse

from guided_diffusion.data.formats import FORMAT_MODES
from guided_diffusion.infra import fileio
from guided_diffusion.infra.config import HelpFormatter, str2bool
from guided_diffusion.infra.errors import DiffMixError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    to_consep = p.add_argument_group("dataset -> CoNSeP layout")
    to_consep.add_argument("--data_dir", default=None, help="the dataset as distributed")
    to_consep.add_argument("--dataset_mode", default=None, choices=FORMAT_MODES, help="its format")
    to_consep.add_argument("--splits", default="Train,Test",
                           help="splits to write, one folder each (Train = folds 1,2, Test = fold 3, all, fold1, ...); "
                           "a single PanNuke fold is written whole as one split folder")
    from_run = p.add_argument_group("synthesis run -> source format")
    from_run.add_argument("--from_run", default=None,
                          help="a synthesis run folder (run.json, records/, npy_patch/) made with pannuke or conic")
    p.add_argument("--out_dir", default=None,
                   help="output folder (required for a dataset; for --from_run default <run>/source_format)")
    p.add_argument("--progress", type=str2bool, default=True, help="show progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from guided_diffusion.data.formats.export import convert_to_consep, export_source_format

    args = parse_args(argv)
    if bool(args.data_dir) == bool(args.from_run):
        raise DiffMixError("give either --data_dir with --dataset_mode (dataset -> CoNSeP layout) or --from_run")
    if args.from_run:
        summary = export_source_format(args.from_run, args.out_dir, progress=args.progress)
        print(f"{summary['count']} patches -> {', '.join(summary['files'])} in {args.out_dir or args.from_run + '/source_format'}")
        return summary
    if not args.dataset_mode or not args.out_dir:
        raise DiffMixError("--data_dir needs --dataset_mode (pannuke, conic or lizard) and --out_dir")
    fileio.check_not_input(args.out_dir, {"--data_dir": args.data_dir}, "--out_dir")
    splits = [s for s in args.splits.replace(" ", "").split(",") if s]
    summary = convert_to_consep(args.data_dir, args.dataset_mode, args.out_dir, splits, progress=args.progress)
    counts = ", ".join(f"{s}: {len(v['stems'])}" for s, v in summary["splits"].items())
    print(f"converted {args.data_dir} ({args.dataset_mode}) -> {args.out_dir} ({counts}); "
          f"class table {args.out_dir}/class_table.json")
    return summary


if __name__ == "__main__":
    run_cli(main)
