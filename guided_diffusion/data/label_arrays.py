"""Label arrays as the data layer accepts them: integer checks and the one class-merge rule.

Below both :mod:`.readers` (label files) and :mod:`.formats` (PanNuke / CoNIC / Lizard arrays), so
neither needs the other to turn arrays into validated, merged label maps. No torch; ``ClassTable``
is used only through its attributes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import numpy as np

if TYPE_CHECKING:  # type hints only: classes imports formats, which imports this module
    from .classes import ClassTable

# Keys of a label .mat whose classes are already merged: classes_merged = 1 and their num_classes.
MERGED_KEY = "classes_merged"
NUM_CLASSES_KEY = "num_classes"


def int_map(arr, key: str, ndim: int = 2) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """Check a label array: ``ndim``-D, integral values, non-negative. Returns (int32 array, problem)."""
    a = np.asarray(arr)
    if ndim == 1:
        a = a.reshape(-1)
    if a.ndim != ndim:
        return None, f"{key} has shape {a.shape}, expected a {ndim}-D array"
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            return None, f"{key} holds non-integer values"
    elif a.dtype.kind not in "iub":
        return None, f"{key} has dtype {a.dtype}, expected integers"
    if a.size and a.min() < 0:
        return None, f"{key} holds negative values (min {a.min()})"
    if a.size and a.max() > np.iinfo(np.int32).max:
        return None, f"{key} holds values beyond int32"
    return a.astype(np.int32), None


def merge_types(
    values: np.ndarray, table: ClassTable, marked: Optional[int] = None
) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """Type ids (int array, any shape) -> merged classes (int32, same shape); the one merge rule.

    Raw ids are mapped with ``table`` (a table read as already merged, :meth:`ClassTable.as_merged`,
    only checks them). Maps marked ``classes_merged`` = 1 with ``marked`` = their ``num_classes``
    are only checked against ``0..marked-1``: merging them again would relabel classes (CoNSeP
    spindle 4, read as raw 4, would become epithelial 3).

    Returns:
        ``(merged or None, problem or None)``.
    """
    values = np.asarray(values)
    if marked is not None:
        if marked != table.num_classes:
            return None, (
                f"label map was written with num_classes={marked} ({MERGED_KEY}=1), but the class "
                f"table {table.name!r} has {table.num_classes}"
            )
        if values.size and values.max() >= marked:
            bad = sorted(int(v) for v in np.unique(values) if v >= marked)
            return None, (
                f"type values {bad} outside 0..{marked - 1} (classes already merged: "
                f"{MERGED_KEY}=1, {NUM_CLASSES_KEY}={marked})"
            )
        return values.astype(np.int32, copy=False), None
    unknown = table.unknown_raw_values(values)
    if unknown:
        return None, table.describe_unknown(unknown)
    return np.asarray(table.lut, dtype=np.int32)[values.astype(np.int64, copy=False)], None


def maps_from_arrays(
    inst, types, table: ClassTable, merged_num_classes: Optional[int] = None
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], List[str]]:
    """Validate label arrays and merge classes (see :func:`merge_types`).

    Args:
        inst: instance ids [H, W] (0 = background).
        types: type ids [H, W]; raw ids unless ``merged_num_classes`` is given.
        merged_num_classes: the ``num_classes`` recorded with already-merged maps.

    Returns:
        ``(inst int32 [H,W], type int32 [H,W] merged, problems)``; the maps are None on a problem.
    """
    inst_m, p1 = int_map(inst, "inst_map")
    type_m, p2 = int_map(types, "type_map")
    problems = [p for p in (p1, p2) if p]
    if problems:
        return None, None, problems
    if inst_m.shape != type_m.shape:
        return None, None, [f"inst_map {inst_m.shape} and type_map {type_m.shape} differ in size"]
    merged, problem = merge_types(type_m, table, merged_num_classes)
    return (None, None, [problem]) if problem else (inst_m, merged, [])
