"""Label files for evaluation: per-instance tables read through the data layer's one reader, and
pairing two folders of label files by stem.

Reading, integer checks and class merging are :mod:`guided_diffusion.data.readers`' (one rule in
one place); this module only derives what the metrics need per instance (centroids, types).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..data.labels import instance_table
from ..data.readers import load_label_file
from ..infra import fileio
from ..infra.errors import DiffMixError

LABEL_EXTENSIONS = (".mat", ".npy")


@dataclass
class InstanceLabels:
    """One label map as the metrics see it.

    Attributes:
        path: the file it came from.
        inst_map: int64 [H, W] instance ids, 0 = background.
        centroids: float64 [N, 2] (x, y) per instance, ascending-id order (or as stored).
        types: int64 [N] class per instance, or None when the file holds no type information.
            With a class table these are merged classes, otherwise the values as stored.
        marked_merged: the ``num_classes`` of a ``.mat`` marked ``classes_merged`` = 1 (written
            by this project after merging, e.g. GradMix outputs), else None.
    """

    path: str
    inst_map: np.ndarray
    centroids: np.ndarray
    types: Optional[np.ndarray]
    marked_merged: Optional[int] = None


def labels_from_maps(inst_map: np.ndarray, type_map: Optional[np.ndarray], name: str = "") -> InstanceLabels:
    """Label maps held in memory as the metrics see them (for :func:`~guided_diffusion.metrics.evaluate.evaluate_labels`).

    Args:
        inst_map: int [H, W] instance ids, 0 = background.
        type_map: int [H, W] per-pixel classes (already in the classes to compare), or None for
            detection-only scoring. Each instance takes its majority class (as in the files).
        name: what errors call this map.
    """
    inst = np.asarray(inst_map).astype(np.int64)
    types = np.zeros_like(inst) if type_map is None else np.asarray(type_map)
    _, table_types, table_xy = instance_table(inst, types)
    return InstanceLabels(path=name, inst_map=inst, centroids=table_xy,
                          types=None if type_map is None else np.asarray(table_types, np.int64))


def read_instance_labels(path: str, class_table=None) -> InstanceLabels:
    """Read a CoNSeP-layout ``.mat`` or a HoVer-Net ``.npy`` label file for evaluation.

    ``.mat`` files need ``inst_map``; ``inst_centroid`` ([N, 2], x then y) and ``inst_type``
    ([N, 1]) are used as stored when present (as HoVer-Net's evaluation does, e.g. for its own
    output files, which have no ``type_map``) and otherwise recomputed from ``inst_map`` and
    ``type_map`` with :func:`guided_diffusion.data.labels.instance_table`. Types are None when
    neither ``inst_type`` nor a type map is available.

    Args:
        path: the file.
        class_table: optional :class:`guided_diffusion.data.classes.ClassTable`; when given, the
            ids of ``type_map`` (per pixel, before the per-instance majority vote) and of a stored
            ``inst_type`` are merged with it by the data layer (:func:`~guided_diffusion.data.label_arrays.merge_types`).
    """
    label = load_label_file(path, class_table, require_types=False, instance_keys=True)
    inst = label.inst_map.astype(np.int64)
    type_map = label.type_map
    ids, table_types, table_xy = instance_table(inst, np.zeros_like(inst) if type_map is None else type_map)
    stored_xy, stored_types = label.inst_centroid, label.inst_type
    for what, arr in (("inst_centroid", stored_xy), ("inst_type", stored_types)):
        if arr is not None and arr.shape[0] != ids.size:
            raise DiffMixError(
                f"{path}: {what} has {arr.shape[0]} rows but inst_map has {ids.size} instances "
                "(stale keys? remove them to recompute from the maps)"
            )
    types = stored_types if stored_types is not None else (table_types if type_map is not None else None)
    return InstanceLabels(
        path=path,
        inst_map=inst,
        centroids=table_xy if stored_xy is None else stored_xy,
        types=None if types is None else np.asarray(types, np.int64),
        marked_merged=label.marked_merged,
    )


def _label_files(folder: str) -> dict[str, str]:
    """{stem: path} of the ``.mat``/``.npy`` files in ``folder``."""
    try:
        names = fileio.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        raise DiffMixError(f"{folder}: folder not found") from None
    except OSError as err:
        raise DiffMixError(f"{folder}: cannot list the folder ({err.strerror or err})") from None
    found: dict[str, str] = {}
    for name in names:
        stem, dot, ext = name.rpartition(".")
        if not dot or "." + ext.lower() not in LABEL_EXTENSIONS or name.startswith("."):
            continue
        if stem in found:
            raise DiffMixError(f"{folder}: both {found[stem]} and {name} hold labels for '{stem}'")
        found[stem] = name
    return {stem: fileio.join(folder, name) for stem, name in found.items()}


def match_label_files(true_dir: str, pred_dir: str) -> list[tuple[str, str, str]]:
    """Pair the label files of two folders by file stem.

    Returns:
        ``[(stem, true_path, pred_path)]`` sorted by stem.

    Raises:
        DiffMixError: a folder is missing or empty, or a stem is present in only one folder.
    """
    true_files = _label_files(true_dir)
    if not true_files:
        raise DiffMixError(f"{true_dir}: no .mat or .npy label files")
    pred_files = pair_stems(true_files, pred_dir, f"true_dir {true_dir}", "true_dir")
    return [(stem, true_files[stem], pred_files[stem]) for stem in sorted(true_files)]


def pair_stems(true_stems, pred_dir: str, true_name: str, true_short: str) -> dict[str, str]:
    """``{stem: prediction file}`` of ``pred_dir`` for exactly the stems of ``true_stems`` (any
    collection of stems); a stem on one side only is an error naming both sides (``true_name``,
    ``true_short`` say what the ground truth is)."""
    pred_files = _label_files(pred_dir)
    only_true = sorted(set(true_stems) - set(pred_files))
    only_pred = sorted(set(pred_files) - set(true_stems))
    if only_true or only_pred:

        def show(stems):
            more = f" (+{len(stems) - 10} more)" if len(stems) > 10 else ""
            return ", ".join(stems[:10]) + more

        parts = []
        if only_true:
            parts.append(f"{len(only_true)} only in {true_short}: {show(only_true)}")
        if only_pred:
            parts.append(f"{len(only_pred)} only in pred_dir: {show(only_pred)}")
        raise DiffMixError(
            f"label files of {true_name} and pred_dir {pred_dir} do not pair up by "
            "name; " + "; ".join(parts)
        )
    return pred_files
