"""Per-nucleus geometry of a label map, computed once per map.

Every GradMix edit works inside one nucleus's bounding box, so the table below holds what the
edits need -- id, class, area, centroid and bounding-box slices -- computed in a few whole-image
passes (``np.bincount`` and one ``scipy.ndimage.find_objects``) instead of one pass per nucleus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..data.labels import instance_table
from ..infra.errors import DiffMixError


@dataclass
class NucleusTable:
    """Geometry of the N nuclei of one label map, in ascending-id order.

    Attributes:
        ids: int64 [N] instance ids (non-zero, not necessarily contiguous).
        classes: int64 [N] class of each nucleus (majority non-zero class of ``type_map``).
        areas: int64 [N] pixel counts.
        centroids: float64 [N, 2] mean (x, y) of each nucleus's pixels.
        boxes: N tuples ``(row_slice, col_slice)``, the tight bounding box of each nucleus.
        shape: (H, W) of the map.
    """

    ids: np.ndarray
    classes: np.ndarray
    areas: np.ndarray
    centroids: np.ndarray
    boxes: list
    shape: tuple

    def __len__(self) -> int:
        return int(self.ids.size)

    def mask(self, inst_map: np.ndarray, i: int) -> np.ndarray:
        """bool [h, w]: nucleus ``i``'s pixels inside its own bounding box ``boxes[i]``."""
        return inst_map[self.boxes[i]] == self.ids[i]

    def away_from_border(self, margin: float) -> np.ndarray:
        """bool [N]: centroid at least ``margin`` px from every image border.

        Same rule as the official GradMix code: a nucleus is excluded when its centroid x (or y)
        is below ``margin`` or above ``W - margin`` (``H - margin``).
        """
        h, w = self.shape
        cx, cy = self.centroids[:, 0], self.centroids[:, 1]
        return (cx >= margin) & (cx <= w - margin) & (cy >= margin) & (cy <= h - margin)


def check_label_maps(inst_map, type_map, where: str = "label map") -> tuple[np.ndarray, np.ndarray]:
    """Validate a label-map pair and return it as (int32 [H, W], int32 [H, W]).

    Raises:
        DiffMixError naming ``where`` when the maps are not 2-D integer arrays of one shape or
        hold negative values.
    """
    inst = np.asarray(inst_map)
    types = np.asarray(type_map)
    if inst.ndim != 2 or types.ndim != 2:
        raise DiffMixError(f"{where}: inst_map and type_map must be 2-D, got shapes {inst.shape} and {types.shape}")
    if inst.shape != types.shape:
        raise DiffMixError(f"{where}: inst_map {inst.shape} and type_map {types.shape} differ in shape")
    for name, arr in (("inst_map", inst), ("type_map", types)):
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            if not np.array_equal(arr, np.round(arr)):
                raise DiffMixError(f"{where}: {name} holds non-integer values")
        if arr.size and arr.min() < 0:
            raise DiffMixError(f"{where}: {name} holds negative values")
    return inst.astype(np.int32, copy=False), types.astype(np.int32, copy=False)


def nucleus_table(inst_map: np.ndarray, type_map: np.ndarray) -> NucleusTable:
    """Build the :class:`NucleusTable` of a label map.

    Args:
        inst_map: int [H, W] instance ids, 0 = background.
        type_map: int [H, W] class per pixel (already class-merged), 0 = background.
    """
    inst = np.asarray(inst_map)
    ids, classes, centroids = instance_table(inst, type_map)
    top = int(ids[-1]) if ids.size else 0
    if top <= 4 * ids.size + 4096:
        # Ids are small: index find_objects/bincount by id directly (no relabelled copy).
        by_id = ndimage.find_objects(inst, max_label=top)
        boxes = [by_id[i - 1] for i in ids]
        areas = np.bincount(inst.ravel(), minlength=top + 1)[ids].astype(np.int64)
    else:
        # Large sparse ids: find_objects would allocate one slot per id value, so go dense.
        dense = (np.searchsorted(ids, inst) + 1).astype(np.int32)
        dense[inst == 0] = 0
        boxes = ndimage.find_objects(dense, max_label=ids.size)
        areas = np.bincount(dense.ravel(), minlength=ids.size + 1)[1:].astype(np.int64)
    return NucleusTable(ids, classes, areas, centroids, list(boxes), tuple(inst.shape))


def class_counts(types: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """int64 [C]: how many nuclei of each class (index = class, 0 included) ``types`` holds."""
    types = np.asarray(types, dtype=np.int64)
    n = max(int(types.max()) + 1 if types.size else 1, num_classes or 0)
    return np.bincount(types, minlength=n)


def pad_box(box: tuple, pad: int, shape: tuple) -> tuple:
    """Grow a ``(row_slice, col_slice)`` box by ``pad`` px on every side, clipped to ``shape``."""
    rs, cs = box
    return (
        slice(max(rs.start - pad, 0), min(rs.stop + pad, shape[0])),
        slice(max(cs.start - pad, 0), min(cs.stop + pad, shape[1])),
    )


def union_box(a: tuple, b: tuple) -> tuple:
    """Smallest box holding boxes ``a`` and ``b`` (both ``(row_slice, col_slice)``)."""
    return (
        slice(min(a[0].start, b[0].start), max(a[0].stop, b[0].stop)),
        slice(min(a[1].start, b[1].start), max(a[1].stop, b[1].stop)),
    )


def paint_types(inst_map: np.ndarray, ids: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """int32 [H, W] type map holding ``classes[k]`` on every pixel of instance ``ids[k]``, 0 elsewhere.

    Recomputing the type map from the instance map (rather than editing it) guarantees the two
    agree after any edit. ``ids`` must be sorted and contain every non-zero id of ``inst_map``.
    """
    inst = np.asarray(inst_map)
    lut = np.concatenate([[0], np.asarray(classes, np.int32)]).astype(np.int32)
    pos = np.searchsorted(np.asarray(ids), inst) + 1
    pos[inst == 0] = 0
    return lut[pos]
