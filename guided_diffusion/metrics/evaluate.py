"""Evaluation (HoVer-Net's metrics): :func:`evaluate_labels` pools scores over in-memory label pairs;
:func:`evaluate_folders` reads label files paired by stem and :func:`evaluate_dataset` a dataset as
distributed (PanNuke / CoNIC / Lizard, through the data layer) and evaluate them through it.

Class merging (``class_table``, CLI ``--dataset_mode``)
    Raw CoNSeP (types 1..7) and GLySAC (1..10) ground truth must be merged into the classes the
    models predict (CoNSeP 4 + background, GLySAC 3 + background) before types are compared,
    as HoVer-Net's ``compute_stats`` does. With a :class:`~guided_diffusion.data.classes.ClassTable`
    the *true* labels are merged (per-pixel ``type_map`` before the per-instance majority vote,
    and a stored ``inst_type``), except ``.mat`` files marked ``classes_merged`` = 1 (written
    by this project after merging), which are only checked, following the data layer's rule.
    Predictions are taken as already merged; a predicted type >= ``num_classes`` is an error.
    Without a table types are compared as stored, and a ground truth with types above every
    predicted type triggers a warning (it usually means raw vs merged ids).
    The ground truth may itself already hold merged classes (many public CoNSeP copies do):
    ``labels_merged`` (``auto``/``yes``/``no``) decides how it is read, as everywhere in the
    data layer (:func:`guided_diffusion.data.readers.resolve_labels_form`).
"""

from __future__ import annotations

import sys
from typing import Iterable, Mapping, Optional, Tuple

import numpy as np

from ..data.readers import list_samples, read_sample_labels, resolve_labels_form
from ..infra.errors import DiffMixError
from .labels import InstanceLabels, labels_from_maps, match_label_files, pair_stems, read_instance_labels
from .report import write_reports
from .scores import INSTANCE_KEYS, _instance_scores, instance_overlap, pair_by_centroid, pq_scores, type_metrics


def _check_types(label: InstanceLabels, num_classes: Optional[int], table, side: str) -> None:
    """Reject nucleus types outside ``0..num_classes-1``, with a hint about class merging."""
    if label.types is None or num_classes is None or label.types.size == 0:
        return
    bad = label.types[(label.types < 0) | (label.types >= num_classes)]
    if not bad.size:
        return
    if table is not None:
        # True labels were merged already (a bad value there is caught by the merge), so this
        # is a prediction that still carries raw dataset ids.
        raise DiffMixError(
            f"{label.path}: predicted nucleus type {int(bad.max())} outside 0..{num_classes - 1} "
            f"of the {table.name} class table; predictions must use merged classes "
            f"({', '.join(f'{k} {n}' for k, n in enumerate(table.names))}) -- this prediction "
            "seems to use raw dataset ids"
        )
    hint = (
        "if the ground truth holds raw CoNSeP/GLySAC ids, pass --dataset_mode consep or "
        "glysac (API: class_table=resolve_class_table(...)) to merge them"
        if side == "true"
        else "merge classes first"
    )
    raise DiffMixError(
        f"{label.path}: nucleus type {int(bad[0])} outside 0..{num_classes - 1} "
        f"(num_classes={num_classes} includes background; {hint})"
    )


def _raw_id_warning(true_values: set, pred_values: set) -> Optional[str]:
    """A hint when the ground truth seems to hold raw dataset ids and predictions merged ones.

    Fires when the predictions use some non-zero type but none above ``max(pred)``, while the
    ground truth has types above it (e.g. true 1..7, predicted 1..4).
    """
    true_nz = {v for v in true_values if v > 0}
    pred_nz = {v for v in pred_values if v > 0}
    if not true_nz or not pred_nz or max(true_nz) <= max(pred_nz):
        return None
    top = max(pred_nz)
    unused = sorted(v for v in true_nz if v > top)
    guess = "consep" if max(true_nz) <= 7 else "glysac"
    return (
        f"warning: the ground truth holds nucleus types {unused} that no prediction uses "
        f"(predicted types stay within 1..{top}). If the ground truth has raw dataset ids "
        f"(CoNSeP 1..7, GLySAC 1..10) and the predictions merged classes, per-type F1 and type "
        f"accuracy are wrong: pass --dataset_mode {guess} (or --dataset_mode custom "
        "--class_table FILE) to merge the ground truth."
    )


def _resolve_num_classes(num_classes: Optional[int], class_table) -> Optional[int]:
    """``num_classes`` (including background) checked against ``class_table``, or the table's count."""
    if num_classes is not None and num_classes < 2:
        raise DiffMixError(f"num_classes must be >= 2 (background + 1 class), got {num_classes}")
    if class_table is None:
        return num_classes
    if num_classes is not None and num_classes != class_table.num_classes:
        raise DiffMixError(
            f"num_classes={num_classes} does not match the {class_table.name} class table "
            f"({class_table.num_classes} classes including background)"
        )
    return class_table.num_classes


def evaluate_labels(
    pairs: Iterable[Tuple[str, InstanceLabels, InstanceLabels]],
    radius: float = 12.0,
    num_classes: Optional[int] = None,
    match_iou: float = 0.5,
    class_table=None,
) -> dict:
    """Score predicted label maps against true ones, pooled over all pairs (no files involved).

    Args:
        pairs: ``(name, true, pred)`` per image; each side an :class:`InstanceLabels` (from
            :func:`~guided_diffusion.metrics.labels.read_instance_labels` or, for arrays in memory,
            :func:`~guided_diffusion.metrics.labels.labels_from_maps`), with types in the classes
            that are compared (merged ones when ``class_table`` is given) and equal map shapes.
        radius, num_classes, match_iou, class_table: as in :func:`evaluate_folders`.

    Returns:
        dict with ``settings``, ``instance``, ``classification``, ``per_image`` and ``warnings``,
        as :func:`evaluate_folders` (whose settings add the two folders).
    """
    num_classes = _resolve_num_classes(num_classes, class_table)
    per_image = []
    pooled = {"pt": [], "pp": [], "ut": [], "up": []}
    types_available = True
    true_values: set = set()
    pred_values: set = set()
    for stem, true, pred in pairs:
        if true.inst_map.shape != pred.inst_map.shape:
            raise DiffMixError(
                f"{pred.path}: shape {pred.inst_map.shape} differs from {true.path} "
                f"shape {true.inst_map.shape}"
            )
        if class_table is not None and pred.marked_merged not in (None, num_classes):
            raise DiffMixError(
                f"{pred.path}: written with num_classes={pred.marked_merged} (classes_merged=1), "
                f"but the {class_table.name} class table has {num_classes}"
            )
        _check_types(true, num_classes, class_table, "true")
        _check_types(pred, num_classes, class_table, "pred")
        ov = instance_overlap(true.inst_map, pred.inst_map)
        pq = pq_scores(ov, match_iou)
        paired, un_t, un_p = pair_by_centroid(true.centroids, pred.centroids, radius)
        if true.types is None or pred.types is None:
            types_available = False
        else:
            true_values.update(np.unique(true.types).tolist())
            pred_values.update(np.unique(pred.types).tolist())
        t_types = true.types if true.types is not None else np.zeros(len(true.centroids), np.int64)
        p_types = pred.types if pred.types is not None else np.zeros(len(pred.centroids), np.int64)
        pooled["pt"].append(t_types[paired[:, 0]])
        pooled["pp"].append(p_types[paired[:, 1]])
        pooled["ut"].append(t_types[un_t])
        pooled["up"].append(p_types[un_p])
        per_image.append(
            {
                "name": stem,
                "n_true": ov.n_true,
                "n_pred": ov.n_pred,
                **_instance_scores(ov, pq),
                "pq_tp": pq["tp"],
                "pq_fp": pq["fp"],
                "pq_fn": pq["fn"],
                "det_tp": int(paired.shape[0]),
                "det_fp": int(un_p.size),
                "det_fn": int(un_t.size),
            }
        )
    if not per_image:
        raise DiffMixError("nothing to evaluate: no (true, predicted) label pairs")
    classes = None if num_classes is None else list(range(1, num_classes))
    cls = type_metrics(*(np.concatenate(pooled[k]) for k in ("pt", "pp", "ut", "up")), classes)
    if not types_available:
        # Without types on one side only detection is meaningful.
        cls["type_accuracy"] = None
        cls["f1_type"] = {}
        cls["counts"]["per_class"] = {}
    cls["types_available"] = types_available
    if class_table is not None:
        names = {c: str(class_table.names[c]) for c in range(1, num_classes)}
        cls["class_names"] = names
        unique = len(set(names.values())) == len(names)
        cls["f1_type_named"] = {
            (names[c] if unique else f"{c}_{names[c]}"): v for c, v in cls["f1_type"].items()
        }
    warnings = []
    if class_table is None and types_available:
        message = _raw_id_warning(true_values, pred_values)
        if message:
            warnings.append(message)
            print(message, file=sys.stderr)
    return {
        "settings": {
            "radius": float(radius),
            "num_classes": num_classes,
            "class_table": None if class_table is None else class_table.to_json(),
            "match_iou": float(match_iou),
            "n_images": len(per_image),
            "definitions": "HoVer-Net compute_stats (see guided_diffusion/metrics/scores.py)",
        },
        "instance": {k: float(np.mean([row[k] for row in per_image])) for k in INSTANCE_KEYS},
        "classification": cls,
        "per_image": per_image,
        "warnings": warnings,
    }


def evaluate_folders(
    true_dir: str,
    pred_dir: str,
    radius: float = 12.0,
    num_classes: Optional[int] = None,
    out_dir: Optional[str] = None,
    match_iou: float = 0.5,
    progress: bool = True,
    class_table=None,
    labels_merged: str = "auto",
    predictions: Optional[Mapping[str, InstanceLabels]] = None,
) -> dict:
    """Evaluate predicted label files against true ones, paired by file stem.

    Args:
        true_dir, pred_dir: folders of ``.mat`` (CoNSeP layout) or HoVer-Net ``.npy`` labels.
        radius: centroid pairing radius in pixels for the classification metrics.
        num_classes: number of classes **including background** (the project's convention, as
            in ``build_condition``); per-type F1 is then reported for types 1..num_classes-1 and
            larger types are rejected. None: the table's count with ``class_table``, otherwise
            the non-zero types found in the ground truth.
        out_dir: if given, ``metrics.json``, ``metrics_per_image.csv`` and
            ``metrics_summary.csv`` are written there (atomically).
        match_iou: PQ match threshold (IoU strictly greater).
        progress: show a progress bar.
        class_table: optional :class:`guided_diffusion.data.classes.ClassTable` (e.g. from
            ``resolve_class_table("consep")``). The ground truth is then read as raw dataset ids
            and merged with it (``type_map`` and ``inst_type``; a ``.mat`` marked
            ``classes_merged`` = 1 is only checked), predictions must already be in merged
            classes (a type >= ``num_classes`` raises), and per-type F1 also gets class names.
            None: types are compared as stored; if the ground truth then has types above every
            predicted one (raw vs merged ids, likely), a warning goes to stderr and into
            ``result["warnings"]``.
        labels_merged: with ``class_table``: is the ground truth already merged? "auto" (decided
            from the ids present, with a notice), "yes" or "no".
        predictions: ``{stem: InstanceLabels}`` of the files of ``pred_dir`` already held in memory
            (e.g. by the caller that just wrote them, :func:`~guided_diffusion.metrics.labels.labels_from_maps`):
            scored instead of reading those files again; the folders are paired all the same.

    Returns:
        dict with ``settings``, ``instance`` (means of the six metrics over images),
        ``classification`` (:func:`type_metrics` result plus ``types_available``; with a class
        table also ``class_names`` {class: name} and ``f1_type_named`` {name: F1}; ``f1_type``
        stays keyed by the numeric class), ``per_image`` (a list of per-image dicts: name,
        counts, the six metrics, detection counts) and ``warnings`` (list of str).
    """
    from tqdm import tqdm

    num_classes = _resolve_num_classes(num_classes, class_table)
    triples = match_label_files(true_dir, pred_dir)
    if class_table is not None:
        class_table = resolve_labels_form(
            class_table, [t for _, t, _ in triples], labels_merged, f"ground truth {true_dir}"
        )
    pairs = (
        # Predictions are expected in merged classes already: read without the table.
        (stem, read_instance_labels(true_path, class_table),
         predictions[stem] if predictions is not None else read_instance_labels(pred_path))
        for stem, true_path, pred_path in tqdm(triples, desc="evaluate", disable=not progress)
    )
    return _reported(evaluate_labels(pairs, radius, num_classes, match_iou, class_table), true_dir, pred_dir, out_dir)


def _reported(result: dict, true_name: str, pred_dir: str, out_dir: Optional[str]) -> dict:
    """``result`` with the ground truth and predictions named first in its settings, reports written
    to ``out_dir`` when given."""
    result["settings"] = {"true_dir": true_name, "pred_dir": pred_dir, **result["settings"]}
    if out_dir is not None:
        write_reports(result, out_dir)
    return result


def evaluate_dataset(
    data_dir: str,
    dataset_mode: str,
    split: str,
    pred_dir: str,
    class_table,
    radius: float = 12.0,
    num_classes: Optional[int] = None,
    out_dir: Optional[str] = None,
    match_iou: float = 0.5,
    progress: bool = True,
) -> dict:
    """Predicted label files against a dataset read through the data layer (PanNuke, CoNIC,
    Lizard as distributed), paired by the data layer's stems (``fold3_00012``, ...).

    The ground truth of ``split`` is read and merged with ``class_table`` by the data layer;
    predictions are files of ``pred_dir`` named by stem, in merged classes. Other arguments and the
    result as :func:`evaluate_folders` (its ``true_dir`` setting names the dataset and split).
    """
    from tqdm import tqdm

    num_classes = _resolve_num_classes(num_classes, class_table)
    samples = list_samples(data_dir, split, dataset_mode=dataset_mode)
    source = f"{data_dir} ({dataset_mode}, split {split})"
    pred_files = pair_stems([s.stem for s in samples], pred_dir, source, "the dataset")

    def pairs():
        for files in tqdm(samples, desc="evaluate", disable=not progress):
            inst, types = read_sample_labels(files, class_table)
            yield files.stem, labels_from_maps(inst, types, files.label), read_instance_labels(pred_files[files.stem])

    return _reported(evaluate_labels(pairs(), radius, num_classes, match_iou, class_table), source, pred_dir, out_dir)
