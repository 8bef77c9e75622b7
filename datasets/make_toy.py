"""Write the built-in toy dataset (procedural H&E-like tiles, CoNSeP layout, raw CoNSeP type ids).

Example:
    python datasets/make_toy.py --root datasets/toy --num_train 8 --num_test 2 --size 256 --seed 0
"""

from __future__ import annotations

import argparse

from guided_diffusion.data.toy import DEFAULT_CLASS_PROBS, ToyConfig, make_toy_dataset
from guided_diffusion.infra import fileio
from guided_diffusion.infra.config import HelpFormatter
from guided_diffusion.infra.errors import DiffMixError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    d = ToyConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--root",
        required=True,
        help="output dataset root, new or empty (Train/ and Test/ are created); a root holding another "
        "dataset is refused, rerunning with the same settings on a finished one does nothing",
    )
    p.add_argument("--num_train", type=int, default=8, help="tiles in Train/")
    p.add_argument("--num_test", type=int, default=2, help="tiles in Test/")
    p.add_argument("--size", type=int, default=256, help="tile side in pixels")
    p.add_argument("--seed", type=int, default=0, help="base seed (tile i of a split is seeded from seed, split, i)")
    p.add_argument("--density", type=float, default=d.density, help="nuclei per 10,000 pixels")
    p.add_argument(
        "--class_probs",
        type=str,
        default=",".join(str(x) for x in DEFAULT_CLASS_PROBS),
        help="shares of other,inflammatory,epithelial,spindle (the first is the rare class)",
    )
    p.add_argument("--scale", type=float, default=d.scale, help="nucleus size multiplier")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    fileio.check_output_dir(args.root, "--root")
    try:
        probs = tuple(float(x) for x in args.class_probs.split(","))
    except ValueError:
        raise DiffMixError(f"--class_probs {args.class_probs!r}: expected 4 comma-separated numbers") from None
    if len(probs) != 4:
        raise DiffMixError(f"--class_probs {args.class_probs!r}: expected 4 comma-separated numbers")
    config = ToyConfig(density=args.density, class_probs=probs, scale=args.scale)
    existed = fileio.exists(fileio.join(args.root, "toy_dataset.json"))
    record = make_toy_dataset(args.root, args.num_train, args.num_test, args.size, args.seed, config)
    n = sum(len(v) for v in record["files"].values())
    tiles = f"{n} toy tile{'' if n == 1 else 's'}"
    if existed:  # make_toy_dataset returned without raising: the same dataset, already complete
        print(f"{args.root} already holds these {tiles} (seed {args.seed}); nothing written")
    else:
        print(f"wrote {tiles} to {args.root} (seed {args.seed}); use --dataset_mode consep")


if __name__ == "__main__":
    run_cli(main)
