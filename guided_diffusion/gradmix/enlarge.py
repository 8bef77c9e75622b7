"""Enlarging maps: small random shifts of nuclei, to add label-map variety (DiffMix's second edit).

The DiffMix paper describes this edit in one sentence (nuclei are moved by a few pixels). Choices
made here, all configurable or recorded:

* A random ``floor(fraction * n)`` of the *movable* nuclei are picked (movable = not touching the
  image border: moving a border-cut nucleus inwards would leave a straight cut edge in the middle
  of the tissue). They are processed in the random pick order.
* Each picked nucleus gets an integer shift ``(dx, dy)``, each drawn uniformly from
  ``[-max_shift, max_shift]`` (0 included, so some picks stay put; the record says so).
* A move is not made when the shifted shape would leave the image or cover a pixel of another
  nucleus at its current position (earlier moves included). Touching is allowed.
* Ids and classes are kept; ``type_map`` is recomputed from the new instance map.
"""

from __future__ import annotations

import numpy as np

from ..infra.errors import DiffMixError
from . import ENLARGE_DEFAULTS
from .nuclei import check_label_maps, nucleus_table, paint_types


def enlarge_map(
    inst_map: np.ndarray,
    type_map: np.ndarray,
    rng: np.random.Generator,
    *,
    fraction: float = ENLARGE_DEFAULTS["enlarge_fraction"],
    max_shift: int = ENLARGE_DEFAULTS["max_shift"],
    where: str = "label map",
):
    """Shift a random subset of nuclei by small integer offsets.

    Args:
        inst_map: int [H, W] instance ids (0 = background); not modified.
        type_map: int [H, W] merged classes; not modified.
        rng: the only source of randomness (the pick, then one ``(dx, dy)`` per picked nucleus).
        fraction: share of movable nuclei picked, in [0, 1].
        max_shift: shifts are drawn from ``[-max_shift, max_shift]`` px in x and in y.

    Returns:
        ``(new_inst int32 [H, W], new_type int32 [H, W], edits)``; ``edits`` has one dict per
        picked nucleus in processing order: ``id``, ``dx``, ``dy``, ``moved`` (bool) and, when not
        moved, ``reason`` ("zero shift", "leaves the image", "overlaps another nucleus").
    """
    inst, types = check_label_maps(inst_map, type_map, where=where)
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise DiffMixError(f"enlarge fraction must be in [0, 1], got {fraction}")
    if int(max_shift) != max_shift or max_shift < 0:
        raise DiffMixError(f"max_shift must be a non-negative integer, got {max_shift}")
    max_shift = int(max_shift)
    table = nucleus_table(inst, types)
    h, w = inst.shape
    touches = np.array(
        [b[0].start == 0 or b[1].start == 0 or b[0].stop == h or b[1].stop == w for b in table.boxes], bool
    )
    movable = np.flatnonzero(~touches)
    n_pick = int(fraction * movable.size)
    picked = rng.choice(movable, size=n_pick, replace=False) if n_pick else movable[:0]
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n_pick, 2))

    new_inst = inst.copy()
    edits = []
    for i, (dx, dy) in zip(picked, shifts):
        nid = int(table.ids[i])
        edit = {"id": nid, "dx": int(dx), "dy": int(dy), "moved": False}
        edits.append(edit)
        if dx == 0 and dy == 0:
            edit["reason"] = "zero shift"
            continue
        rs, cs = table.boxes[i]
        r0, c0 = rs.start + dy, cs.start + dx
        r1, c1 = rs.stop + dy, cs.stop + dx
        if r0 < 0 or c0 < 0 or r1 > h or c1 > w:
            edit["reason"] = "leaves the image"
            continue
        src = new_inst[rs, cs]
        mask = src == nid
        dst = new_inst[r0:r1, c0:c1]
        if np.any(mask & (dst != 0) & (dst != nid)):
            edit["reason"] = "overlaps another nucleus"
            continue
        src[mask] = 0
        dst[mask] = nid
        edit["moved"] = True
    new_type = paint_types(new_inst, table.ids, table.classes)
    return new_inst, new_type, edits
