"""Analysis of docs/REAL_DATA.md section 0e (a record, not part of the tool): the rare class's F1 of two type
studies' balance arms, paired by seed and by bootstrap over the same held-out nuclei.

Usage (repository root): python docs/real_data/study30_compare.py STUDY_A:STUDY_B ...
(B against A, seeds 0-4; one line "A:B {json}" each)
"""

import json
import sys

import numpy as np

from guided_diffusion.downstream.nuclei import crops as C
from guided_diffusion.downstream.nuclei.study import NucleusStudyConfig
from guided_diffusion.metrics.classification import bootstrap_mean_diff, class_scores, paired_test

RARE, SEEDS = 1, range(5)


def rare_f1(true, pred):
    return class_scores(true, pred, [RARE])[RARE]["f1"]


def predictions(study):
    return [np.load(f"{study}/runs/balance/seed{s}/test_pred.npy").astype(np.int64) for s in SEEDS]


cfg = NucleusStudyConfig(data_dir="../shared/data/consep256", dataset_mode="custom",
                         class_table="datasets/consep_merged.json")
labels = C.read_real_nuclei(cfg, 32, progress=False).test.labels
for pair in sys.argv[1:]:
    a, b = (predictions(d) for d in pair.split(":"))
    result = {"per_seed": paired_test([rare_f1(labels, p) for p in a], [rare_f1(labels, p) for p in b]),
              "bootstrap": bootstrap_mean_diff(rare_f1, labels, a, b, n_boot=1000, seed=0)}
    print(pair, json.dumps(result))
