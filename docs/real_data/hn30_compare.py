"""Analysis of docs/REAL_DATA.md section 0f (a record, not part of the tool): the HoVer-Net `cpu` study's arms
compared paired by seed, from each run's result.json.

Usage (repository root): python docs/real_data/hn30_compare.py A_STUDY/A_ARM:B_STUDY/B_ARM ...
(B against A on seeds 0-2; one line "A:B {json}" each, a paired test per score)
"""

import json
import sys

from guided_diffusion.metrics.classification import paired_test

RARE, SEEDS = "1", range(3)
SCORES = {
    "f1_other": lambda r: r["f1_type"][RARE] or 0.0,  # instance F1 of the rare class (None: no such nucleus found)
    "pixel_f1_other": lambda r: r["pixel"]["f1_type"][RARE] or 0.0,
    "pixel_np_dice": lambda r: r["pixel"]["np_dice"],
    "dice": lambda r: r["dice"],
}


def rows(spec):
    study, arm = spec.rsplit("/", 1)
    return [json.load(open(f"{study}/runs/{arm}/seed{s}/result.json")) for s in SEEDS]


for pair in sys.argv[1:]:
    a, b = (rows(spec) for spec in pair.split(":"))
    print(pair, json.dumps({name: paired_test([f(r) for r in a], [f(r) for r in b]) for name, f in SCORES.items()}))
