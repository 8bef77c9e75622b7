"""Balancing maps: GradMix's replacement of major-class nuclei by minor-class donors (label maps only).

The rule, as in the official GradMix code (hvcl/DiffMix, ``GradMix/grad_mix.py``):

1. Targets are the major-class nuclei whose centroid is at least ``margin`` px from the border; a
   random ``floor(fraction * n)`` of them are processed, smallest (pixel area) first.
2. Donors are the minor-class nuclei of the donor bank (same border rule): those of the source map
   first, then those of the other maps, map by map in a seeded random order.
3. A donor fits a target when ``size_ratio * donor_area <= area(target dilated by `dilate` px)``
   (GradMix: 2.3 and 2 px, dilation by the 4-connected cross, i.e. a diamond of radius 2).
   The first fitting donor in search order is used, and each donor at most once per output map.
4. The target is removed (its pixels become background) and the donor's shape is pasted with its
   centroid on the target's centroid (integer shift, rounded half up); the pasted nucleus keeps the
   target's instance id and takes the donor's (minor) class.
5. A target without a fitting donor stays unchanged.

Fixes over the official code:

* Overlap rule (chosen: *reject*): a donor whose pasted shape would cover a pixel of another
  nucleus, or leave the image, is skipped for this target (it stays available for later targets)
  and the next fitting donor is tried, up to ``max_tries`` donors; neighbours are never
  overwritten and pasted shapes are never clipped, so every pasted nucleus keeps its real shape.
* ``type_map`` is recomputed from the new instance map and the per-nucleus classes, so it always
  agrees with it; ``inst_type``/``inst_centroid`` are recomputed when the map is written.
* Instance ids are looked up, not assumed to be ``index + 1``; all randomness comes from ``rng``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..infra.errors import DiffMixError
from . import BALANCE_DEFAULTS
from .donors import DonorBank
from .nuclei import check_label_maps, nucleus_table, pad_box, paint_types


def check_minor_major(minor: Sequence[int], major: Sequence[int]) -> tuple[tuple, tuple]:
    """Validate the minor/major class sets (non-empty, disjoint, no background 0); sorted tuples."""
    minor_t = tuple(sorted(set(int(c) for c in minor)))
    major_t = tuple(sorted(set(int(c) for c in major)))
    if not minor_t or not major_t:
        raise DiffMixError(f"GradMix needs at least one minor and one major class (minor={minor_t}, major={major_t})")
    if 0 in minor_t or 0 in major_t:
        raise DiffMixError("class 0 is background and cannot be a minor or major class")
    both = set(minor_t) & set(major_t)
    if both:
        raise DiffMixError(f"classes {sorted(both)} are both minor and major")
    return minor_t, major_t


def _check_fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise DiffMixError(f"{name} must be in [0, 1], got {value}")
    return value


def dilated_area(inst_map: np.ndarray, box: tuple, inst_id: int, dilate: int) -> int:
    """Pixel count of nucleus ``inst_id`` dilated ``dilate`` times by the 4-connected cross.

    Computed on the nucleus's box grown by ``dilate`` px (clipped to the image), which gives the
    same count as dilating the whole image.
    """
    big = pad_box(box, dilate, inst_map.shape)
    mask = inst_map[big] == inst_id
    if dilate > 0:
        mask = ndimage.binary_dilation(mask, iterations=dilate)
    return int(mask.sum())


def balance_map(
    inst_map: np.ndarray,
    type_map: np.ndarray,
    donors: DonorBank,
    rng: np.random.Generator,
    *,
    source_stem: Optional[str] = None,
    minor: Sequence[int] = (1,),
    major: Sequence[int] = (2, 3, 4),
    margin: float = BALANCE_DEFAULTS["margin"],
    fraction: float = BALANCE_DEFAULTS["fraction"],
    size_ratio: float = BALANCE_DEFAULTS["size_ratio"],
    dilate: int = BALANCE_DEFAULTS["dilate"],
    max_tries: int = BALANCE_DEFAULTS["max_tries"],
):
    """Make one balancing map from a label map (see the module docstring for the rule).

    Args:
        inst_map: int [H, W] instance ids (0 = background); not modified.
        type_map: int [H, W] classes, already merged (0 = background); not modified.
        donors: the donor bank (see :func:`~guided_diffusion.gradmix.donors.collect_donors`);
            donors whose class is not in ``minor`` are ignored.
        rng: the only source of randomness (target pick, then the order of the other maps).
        source_stem: name of this map in the bank; its donors are tried first.
        minor, major: class sets (disjoint, no 0).
        margin: border rule in px for targets (the bank applies it to donors).
        fraction: share of eligible targets processed, ``floor(fraction * n)``.
        size_ratio, dilate: the fit rule ``size_ratio * donor_area <= dilated target area``.
        max_tries: fitting donors tried per target before it is left unchanged (bounds the time
            spent where every fitting donor would overlap a neighbour).

    Returns:
        ``(new_inst int32 [H, W], new_type int32 [H, W], edits)``; ``edits`` has one dict per
        processed target, in processing order: ``target_id``, ``target_class``, ``target_area``,
        ``target_box`` ([row0, row1, col0, col1), end-exclusive), ``dilated_area`` and either ``donor_image``, ``donor_id``, ``donor_class``,
        ``donor_area``, ``shift`` ([dx, dy] px applied to the donor), ``rejected`` (donors skipped
        for overlap or leaving the image) or ``donor_image`` = None and ``reason``.
    """
    inst, types = check_label_maps(inst_map, type_map, where=source_stem or "label map")
    minor_t, major_t = check_minor_major(minor, major)
    fraction = _check_fraction(fraction, "fraction")
    if dilate < 0 or max_tries < 1 or size_ratio <= 0:
        raise DiffMixError(f"need dilate >= 0, max_tries >= 1, size_ratio > 0 (got {dilate}, {max_tries}, {size_ratio})")
    table = nucleus_table(inst, types)
    h, w = inst.shape

    eligible = np.flatnonzero(np.isin(table.classes, major_t) & table.away_from_border(margin))
    n_pick = int(fraction * eligible.size)
    picked = rng.choice(eligible, size=n_pick, replace=False) if n_pick else eligible[:0]
    picked = picked[np.lexsort((table.ids[picked], table.areas[picked]))]  # smallest first, ties by id

    order = donors.search_order(source_stem, rng)
    order = order[np.isin(donors.classes[order], minor_t)]
    order_areas = donors.areas[order]
    available = np.ones(order.size, bool)  # per search position: donor not used yet in this map

    new_inst = inst.copy()
    new_classes = table.classes.copy()
    edits = []
    for i in picked:
        tid = int(table.ids[i])
        grown = dilated_area(inst, table.boxes[i], tid, dilate)
        rs, cs = table.boxes[i]
        edit = {
            "target_id": tid,
            "target_class": int(table.classes[i]),
            "target_area": int(table.areas[i]),
            "target_box": [rs.start, rs.stop, cs.start, cs.stop],
            "dilated_area": grown,
        }
        cand = np.flatnonzero(available & (size_ratio * order_areas <= grown))
        tx, ty = table.centroids[i]
        rejected = []
        chosen = None
        for pos in cand[:max_tries]:
            d = int(order[pos])
            dcx, dcy = donors.centroids[d]
            dx, dy = int(np.floor(tx - dcx + 0.5)), int(np.floor(ty - dcy + 0.5))
            mask = donors.masks[d]
            r0, c0 = int(donors.origins[d, 0]) + dy, int(donors.origins[d, 1]) + dx
            if r0 < 0 or c0 < 0 or r0 + mask.shape[0] > h or c0 + mask.shape[1] > w:
                rejected.append(_donor_ref(donors, d, "leaves the image"))
                continue
            region = new_inst[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]]
            if np.any(mask & (region != 0) & (region != tid)):
                rejected.append(_donor_ref(donors, d, "overlaps another nucleus"))
                continue
            chosen = (pos, d, dx, dy, region, mask)
            break
        if chosen is None:
            edit.update(donor_image=None, reason="no fitting donor" if not rejected else "every tried donor was rejected")
            if rejected:
                edit["rejected"] = rejected
            edits.append(edit)
            continue
        pos, d, dx, dy, region, mask = chosen
        box = table.boxes[i]
        old = new_inst[box]
        old[old == tid] = 0  # the removed nucleus's pixels not covered by the donor become background
        region[mask] = tid
        available[pos] = False
        new_classes[i] = donors.classes[d]
        edit.update(
            donor_image=donors.stems[donors.stem_index[d]],
            donor_id=int(donors.ids[d]),
            donor_class=int(donors.classes[d]),
            donor_area=int(donors.areas[d]),
            shift=[dx, dy],
        )
        if rejected:
            edit["rejected"] = rejected
        edits.append(edit)
    new_type = paint_types(new_inst, table.ids, new_classes)
    return new_inst, new_type, edits


def _donor_ref(donors: DonorBank, d: int, why: str) -> dict:
    return {"donor_image": donors.stems[donors.stem_index[d]], "donor_id": int(donors.ids[d]), "why": why}
