"""Nuclei segmentation and classification metrics (HoVer-Net's definitions) and folder evaluation.

Rooms: :mod:`.scores` (the metric math on arrays), :mod:`.classification` (per-class scores of
predicted labels, bootstrap intervals, paired tests, KID; numpy only), :mod:`.labels` (label files as the metrics see
them, read through the data layer's one reader; pairing folders by stem), :mod:`.evaluate`
(:func:`evaluate_labels` over arrays, :func:`evaluate_folders` over label files), :mod:`.report` (terminal table, JSON and CSV files), :mod:`.spectrum` (power per octave, synthetic over real). The public
names are re-exported here.
"""

from .classification import binomial_ci, bootstrap_ci, bootstrap_mean_diff, class_scores, kid, paired_test  # noqa: F401
from .evaluate import evaluate_dataset, evaluate_folders, evaluate_labels  # noqa: F401
from .labels import LABEL_EXTENSIONS, InstanceLabels, labels_from_maps, match_label_files, read_instance_labels  # noqa: F401
from .report import format_table, write_reports  # noqa: F401
from .spectrum import octave_power_ratio, radial_power  # noqa: F401
from .scores import (  # noqa: F401
    INSTANCE_KEYS,
    Overlap,
    aji_plus_score,
    aji_score,
    dice_score,
    instance_metrics,
    instance_overlap,
    pair_by_centroid,
    pq_scores,
    type_metrics,
)
