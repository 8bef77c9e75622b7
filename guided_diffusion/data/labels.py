"""Label maps: per-instance tables, contiguous renumbering and the ``.mat`` label layout.

A label map is a pair of integer arrays of shape [H, W]:

* ``inst_map`` -- instance ids, 0 = background (ids need not be contiguous);
* ``type_map`` -- nucleus class per pixel, 0 = background.

The CoNSeP/GLySAC ``.mat`` layout adds ``inst_type`` ([N, 1], the class of each instance in
ascending-id order) and ``inst_centroid`` ([N, 2], x then y). Whenever this project writes a label
map it recomputes both from the maps, so the four keys always agree.
"""

from __future__ import annotations

import numpy as np

from ..infra import fileio


def instance_ids(inst_map: np.ndarray) -> np.ndarray:
    """Sorted non-zero instance ids of ``inst_map`` (int64 [N])."""
    ids = np.unique(inst_map)
    return ids[ids != 0].astype(np.int64)


def instance_table(inst_map: np.ndarray, type_map: np.ndarray):
    """Per-instance id, class and centroid, in ascending id order.

    Args:
        inst_map: int [H, W] instance ids, 0 = background.
        type_map: int [H, W] class per pixel.

    Returns:
        ``(ids, types, centroids)``: int64 [N], int64 [N] (majority non-zero class under the
        instance; 0 only if every pixel of it is background in ``type_map``), float64 [N, 2]
        (mean x, mean y of the instance's pixels).
    """
    inst = np.asarray(inst_map).astype(np.int64, copy=False)
    types_px = np.asarray(type_map).astype(np.int64, copy=False)
    ids = instance_ids(inst)
    if ids.size == 0:
        return ids, np.zeros(0, np.int64), np.zeros((0, 2), np.float64)
    fg = inst != 0
    idx = np.searchsorted(ids, inst[fg])  # dense 0..N-1 per foreground pixel
    ys, xs = np.nonzero(fg)
    counts = np.bincount(idx, minlength=ids.size).astype(np.float64)
    cx = np.bincount(idx, weights=xs, minlength=ids.size) / counts
    cy = np.bincount(idx, weights=ys, minlength=ids.size) / counts
    t = types_px[fg]
    n_cls = int(t.max()) + 1 if t.size else 1
    votes = np.bincount(idx * n_cls + t, minlength=ids.size * n_cls).reshape(ids.size, n_cls)
    if n_cls > 1:
        nonzero_votes = votes[:, 1:]
        types = np.where(nonzero_votes.max(1) > 0, nonzero_votes.argmax(1) + 1, 0)
    else:
        types = np.zeros(ids.size, np.int64)
    return ids, types.astype(np.int64), np.stack([cx, cy], axis=1)


def relabel_contiguous(inst_map: np.ndarray) -> np.ndarray:
    """Renumber instance ids to 1..N in ascending order of the old ids (0 stays 0). int32."""
    inst = np.asarray(inst_map)
    ids = instance_ids(inst)
    lut_keys = np.concatenate([[0], ids])
    pos = np.searchsorted(lut_keys, inst)
    return pos.astype(np.int32)


def label_mat_dict(inst_map: np.ndarray, type_map: np.ndarray) -> dict:
    """The four CoNSeP ``.mat`` keys, with ``inst_type``/``inst_centroid`` recomputed."""
    _, types, centroids = instance_table(inst_map, type_map)
    return {
        "inst_map": np.asarray(inst_map).astype(np.int32),
        "type_map": np.asarray(type_map).astype(np.int32),
        "inst_type": types.reshape(-1, 1).astype(np.int32),
        "inst_centroid": centroids.reshape(-1, 2).astype(np.float64),
    }


def write_label_mat(path: str, inst_map: np.ndarray, type_map: np.ndarray, **extra) -> None:
    """Atomically write a label map in the CoNSeP ``.mat`` layout (derived keys recomputed).

    ``extra`` arrays (e.g. provenance) are stored beside the four standard keys.
    """
    arrays = label_mat_dict(inst_map, type_map)
    arrays.update(extra)
    fileio.write_mat(path, arrays)
