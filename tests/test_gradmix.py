"""GradMix label edits on small hand-made maps: balancing rule, overlap rule, enlarging, images."""

from __future__ import annotations

import numpy as np
import pytest

from guided_diffusion.data.labels import instance_table
from guided_diffusion.gradmix import (
    balance_map,
    collect_donors,
    compose_gradmix_image,
    enlarge_map,
    map_rng,
)
from guided_diffusion.gradmix.balance import dilated_area
from guided_diffusion.gradmix.image import disk
from guided_diffusion.infra.errors import DiffMixError


def put(inst, typ, nid, cls, r0, c0, h, w):
    """Paint an h x w rectangle nucleus with id ``nid`` and class ``cls``."""
    inst[r0 : r0 + h, c0 : c0 + w] = nid
    typ[r0 : r0 + h, c0 : c0 + w] = cls


def blank(size=80):
    return np.zeros((size, size), np.int32), np.zeros((size, size), np.int32)


def donor_map(*rects, size=80):
    """A map holding only minor-class (1) donors: rects are (id, r0, c0, h, w)."""
    inst, typ = blank(size)
    for nid, r0, c0, h, w in rects:
        put(inst, typ, nid, 1, r0, c0, h, w)
    return inst, typ


def rng(seed=0):
    return np.random.default_rng(seed)


def replaced(edits):
    return [e for e in edits if e["donor_image"] is not None]


# ----------------------------------------------------------------------------- size rule


@pytest.mark.parametrize("side", [1, 4, 6])
def test_dilated_area_matches_closed_form(side):
    # A side x side square grown twice by the 4-connected cross is the square plus a diamond of
    # radius 2: (side + 4)^2 minus 3 missing pixels per corner.
    inst, typ = blank(40)
    put(inst, typ, 5, 2, 15, 15, side, side)
    box = (slice(15, 15 + side), slice(15, 15 + side))
    assert dilated_area(inst, box, 5, 2) == (side + 4) ** 2 - 12


def test_size_rule_picks_first_donor_within_limit():
    # Target 4x4: dilated area 52, so a donor fits when 2.3 * area <= 52, i.e. area <= 22.
    inst, typ = blank()
    put(inst, typ, 7, 2, 38, 38, 4, 4)
    # Donor 23 px (4x6 minus a corner) comes first in id order but is too big; 22 px (2x11) fits.
    d_inst, d_typ = donor_map((1, 10, 10, 4, 6), (2, 50, 20, 2, 11))
    d_inst[10, 10] = 0
    d_typ[10, 10] = 0
    bank = collect_donors({"donors": (d_inst, d_typ)}, margin=5)
    assert sorted(bank.areas.tolist()) == [22, 23]
    _, new_type, edits = balance_map(inst, typ, bank, rng(), margin=5, fraction=1.0)
    assert len(edits) == 1 and edits[0]["dilated_area"] == 52
    assert edits[0]["donor_id"] == 2 and edits[0]["donor_area"] == 22


def test_no_fitting_donor_leaves_target_unchanged():
    inst, typ = blank()
    put(inst, typ, 7, 2, 38, 38, 4, 4)
    bank = collect_donors({"donors": donor_map((1, 10, 10, 5, 5))}, margin=5)  # 25 px > 22
    new_inst, new_type, edits = balance_map(inst, typ, bank, rng(), margin=5, fraction=1.0)
    assert edits[0]["donor_image"] is None and edits[0]["reason"] == "no fitting donor"
    np.testing.assert_array_equal(new_inst, inst)
    np.testing.assert_array_equal(new_type, typ)


# ----------------------------------------------------------------------------- targets


def test_border_rule_for_targets_and_donors():
    inst, typ = blank()
    put(inst, typ, 1, 2, 2, 30, 6, 6)  # centroid y = 4.5 < margin 10: never a target
    put(inst, typ, 2, 3, 40, 40, 6, 6)  # eligible
    put(inst, typ, 3, 1, 70, 70, 3, 3)  # minor, centroid 71 > 80 - 10: not a donor
    put(inst, typ, 4, 1, 20, 60, 3, 3)  # minor, eligible donor
    bank = collect_donors({"self": (inst, typ)}, margin=10)
    assert bank.ids.tolist() == [4]
    for seed in range(5):
        _, _, edits = balance_map(inst, typ, bank, rng(seed), source_stem="self", margin=10, fraction=1.0)
        assert [e["target_id"] for e in edits] == [2]


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (0.5, 3), (0.8, 5), (1.0, 7)])
def test_fraction_picks_floor_of_eligible(fraction, expected):
    inst, typ = blank(120)
    for k in range(7):
        put(inst, typ, 10 + k, 2 + k % 2, 15 + 12 * k, 20, 5, 5)
    bank = collect_donors({}, margin=5)
    _, _, edits = balance_map(inst, typ, bank, rng(3), margin=5, fraction=fraction, major=(2, 3))
    assert len(edits) == expected
    assert len({e["target_id"] for e in edits}) == expected


def test_targets_processed_smallest_first_and_donors_used_once():
    inst, typ = blank(120)
    sizes = [7, 4, 6, 5, 8]
    for k, s in enumerate(sizes):
        put(inst, typ, 20 + k, 2, 15 + 20 * k, 15, s, s)
    # Three identical 2x2 donors: enough for three targets only.
    bank = collect_donors({"d": donor_map((1, 20, 20, 2, 2), (2, 30, 30, 2, 2), (3, 40, 40, 2, 2))}, margin=5)
    new_inst, new_type, edits = balance_map(inst, typ, bank, rng(), margin=5, fraction=1.0)
    assert [e["target_area"] for e in edits] == sorted(s * s for s in sizes)
    used = [(e["donor_image"], e["donor_id"]) for e in replaced(edits)]
    assert len(used) == 3 and len(set(used)) == 3  # each donor at most once in this map
    assert [e["target_area"] for e in replaced(edits)] == [16, 25, 36]  # the smallest got them
    assert all(e["reason"] == "no fitting donor" for e in edits if e["donor_image"] is None)
    # A new map starts with every donor available again.
    _, _, again = balance_map(inst, typ, bank, rng(1), margin=5, fraction=1.0)
    assert len(replaced(again)) == 3


def test_same_image_donors_first_then_other_maps_in_seeded_order():
    inst, typ = blank()
    put(inst, typ, 1, 2, 30, 30, 6, 6)
    put(inst, typ, 2, 1, 60, 60, 2, 2)  # a donor inside the source map itself
    bank = collect_donors(
        {"a": donor_map((1, 20, 20, 2, 2)), "src": (inst, typ), "b": donor_map((1, 20, 20, 2, 2))}, margin=5
    )
    _, _, edits = balance_map(inst, typ, bank, rng(), source_stem="src", margin=5, fraction=1.0)
    assert edits[0]["donor_image"] == "src" and edits[0]["donor_id"] == 2
    # Without the source's own donor, the other maps' order depends on the seed only.
    inst[inst == 2] = 0
    typ[inst == 0] = 0
    bank = collect_donors({"a": donor_map((1, 20, 20, 2, 2)), "src": (inst, typ), "b": donor_map((1, 20, 20, 2, 2))}, margin=5)
    firsts = {balance_map(inst, typ, bank, rng(s), source_stem="src", margin=5, fraction=1.0)[2][0]["donor_image"] for s in range(20)}
    assert firsts == {"a", "b"}


# ----------------------------------------------------------------------------- pasting


def test_donor_pasted_on_target_centroid_with_target_id_and_minor_class():
    inst, typ = blank()
    put(inst, typ, 9, 3, 40, 40, 6, 6)  # centroid (42.5, 42.5)
    put(inst, typ, 4, 2, 10, 60, 3, 3)  # untouched neighbour (centroid y=11 >= margin 5)
    d_inst, d_typ = donor_map((5, 10, 10, 3, 5))  # centroid (12, 11)
    bank = collect_donors({"d": (d_inst, d_typ)}, margin=5)
    new_inst, new_type, edits = balance_map(inst, typ, bank, rng(), margin=5, fraction=1.0, major=(3,))
    (edit,) = edits
    assert edit["shift"] == [31, 32]
    expected = np.zeros_like(inst)
    expected[42:45, 41:46] = 9
    np.testing.assert_array_equal(new_inst == 9, expected == 9)
    ids, types, cents = instance_table(new_inst, new_type)
    assert ids.tolist() == [4, 9] and types.tolist() == [2, 1]
    assert np.all(np.abs(cents[1] - [42.5, 42.5]) <= 0.5)
    # type_map agrees with inst_map everywhere: background 0, each nucleus one class.
    np.testing.assert_array_equal(new_type, np.select([new_inst == 9, new_inst == 4], [1, 2], 0))


def test_pasted_donor_never_overwrites_a_neighbour():
    inst, typ = blank()
    put(inst, typ, 1, 2, 38, 38, 5, 5)  # target, centroid (40, 40)
    put(inst, typ, 2, 3, 39, 44, 3, 6)  # neighbour 2 px right of the target
    # First donor: a 1x13 bar, would reach the neighbour; second: a compact 3x3 that fits.
    bank = collect_donors({"d": donor_map((1, 10, 10, 1, 13), (2, 30, 10, 3, 3))}, margin=5)
    new_inst, _, edits = balance_map(inst, typ, bank, rng(), margin=5, fraction=1.0, major=(2,))
    (edit,) = edits
    assert edit["donor_id"] == 2
    assert edit["rejected"] == [{"donor_image": "d", "donor_id": 1, "why": "overlaps another nucleus"}]
    np.testing.assert_array_equal(new_inst == 2, inst == 2)  # neighbour intact
    # With only the bar available the target stays as it was.
    bank = collect_donors({"d": donor_map((1, 10, 10, 1, 13))}, margin=5)
    new_inst, _, edits = balance_map(inst, typ, bank, rng(), margin=5, fraction=1.0, major=(2,))
    assert edits[0]["donor_image"] is None and edits[0]["reason"] == "every tried donor was rejected"
    np.testing.assert_array_equal(new_inst, inst)


def test_balance_is_deterministic_and_rejects_bad_classes():
    inst, typ = blank(120)
    for k in range(12):
        put(inst, typ, 3 * k + 1, 2 + k % 3, 10 + 8 * (k % 6), 20 + 40 * (k // 6), 4 + k % 3, 5)
    bank = collect_donors({"d": donor_map((1, 20, 20, 2, 3), (2, 30, 30, 3, 3), (3, 50, 50, 2, 2))}, margin=5)
    a = balance_map(inst, typ, bank, map_rng(7, "x", "balance", 0), margin=5)
    b = balance_map(inst, typ, bank, map_rng(7, "x", "balance", 0), margin=5)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2]
    with pytest.raises(DiffMixError, match="both minor and major"):
        balance_map(inst, typ, bank, rng(), minor=(1, 2), major=(2, 3))
    with pytest.raises(DiffMixError, match="fraction"):
        balance_map(inst, typ, bank, rng(), fraction=1.5)
    with pytest.raises(DiffMixError, match="differ in shape"):
        balance_map(inst, typ[:10], bank, rng())


def test_map_rng_streams_differ_by_stem_kind_and_index():
    draws = {(s, kd, k): map_rng(0, s, kd, k).integers(1 << 30) for s in ("a", "b") for kd in ("balance", "enlarge") for k in (0, 1)}
    assert len(set(draws.values())) == len(draws)
    assert map_rng(0, "a", "balance", 1).integers(1 << 30) == draws[("a", "balance", 1)]


# ----------------------------------------------------------------------------- enlarge


def packed_map(size=64, seed=0):
    """Many small nuclei, some touching, so that overlap checks matter."""
    r = np.random.default_rng(seed)
    inst, typ = blank(size)
    nid = 0
    for r0 in range(2, size - 6, 7):
        for c0 in range(2, size - 6, 6):
            nid += 1
            h, w = r.integers(3, 6, size=2)
            put(inst, typ, nid * 2, 1 + nid % 3, r0, c0, h, w)
    return inst, typ


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_enlarge_shifts_within_range_without_overlap(seed):
    inst, typ = packed_map(seed=seed)
    new_inst, new_type, edits = enlarge_map(inst, typ, rng(seed), fraction=0.7, max_shift=3)
    ids, types, _ = instance_table(inst, typ)
    new_ids, new_types, _ = instance_table(new_inst, new_type)
    assert new_ids.tolist() == ids.tolist() and new_types.tolist() == types.tolist()  # ids, classes kept
    moved = {e["id"]: (e["dx"], e["dy"]) for e in edits if e["moved"]}
    assert moved and any(not e["moved"] for e in edits)
    for nid in ids:
        dx, dy = moved.get(int(nid), (0, 0))
        assert abs(dx) <= 3 and abs(dy) <= 3
        ys, xs = np.nonzero(inst == nid)
        ys2, xs2 = np.nonzero(new_inst == nid)
        # Same shape shifted exactly by (dx, dy): no pixel lost to or taken from another nucleus.
        np.testing.assert_array_equal(ys + dy, ys2)
        np.testing.assert_array_equal(xs + dx, xs2)
    assert all(e["reason"] in ("zero shift", "leaves the image", "overlaps another nucleus") for e in edits if not e["moved"])
    np.testing.assert_array_equal(new_type, np.where(new_inst > 0, new_type, 0))


def test_enlarge_never_moves_border_nuclei_and_respects_fraction():
    inst, typ = blank(40)
    put(inst, typ, 1, 1, 0, 10, 4, 4)  # touches the top border
    put(inst, typ, 2, 2, 20, 20, 4, 4)
    put(inst, typ, 3, 2, 10, 30, 4, 4)
    for seed in range(10):
        _, _, edits = enlarge_map(inst, typ, rng(seed), fraction=1.0, max_shift=2)
        assert sorted(e["id"] for e in edits) == [2, 3]
        _, _, half = enlarge_map(inst, typ, rng(seed), fraction=0.5, max_shift=2)
        assert len(half) == 1
    with pytest.raises(DiffMixError, match="max_shift"):
        enlarge_map(inst, typ, rng(), max_shift=-1)


def test_enlarge_blocked_move_is_not_made():
    inst, typ = blank(20)
    put(inst, typ, 1, 1, 8, 5, 4, 4)
    put(inst, typ, 2, 2, 8, 9, 4, 4)  # directly touching on the right
    hits = 0
    for seed in range(40):
        new_inst, _, edits = enlarge_map(inst, typ, rng(seed), fraction=1.0, max_shift=1)
        hits += sum(1 for e in edits if e.get("reason") == "overlaps another nucleus")
        assert (new_inst == 1).sum() == 16 and (new_inst == 2).sum() == 16
    assert hits > 0


# ----------------------------------------------------------------------------- images


def test_gradmix_image_paints_donor_and_keeps_the_rest():
    size = 60
    inst, typ = blank(size)
    put(inst, typ, 1, 2, 26, 26, 6, 6)  # target
    put(inst, typ, 2, 3, 26, 33, 6, 6)  # neighbour 1 px away: partly inside the dilated target
    image = np.full((size, size, 3), 200, np.uint8)
    image[inst > 0] = (80, 40, 120)
    d_inst, d_typ = donor_map((1, 10, 10, 3, 3), size=size)
    donor_img = np.full((size, size, 3), 150, np.uint8)
    donor_img[d_inst > 0] = (20, 60, 100)
    bank = collect_donors({"d": (d_inst, d_typ)}, margin=5, image_loader={"d": donor_img}.__getitem__)
    new_inst, _, edits = balance_map(inst, typ, bank, rng(), margin=5, fraction=1.0, major=(2,))
    out = compose_gradmix_image(image, inst, new_inst, edits, bank)
    mean = np.array([80, 40, 120], float)  # mean nuclear colour of the source
    np.testing.assert_array_equal(out[new_inst == 1], np.tile(np.rint(([20, 60, 100] + mean) / 2), (9, 1)))
    np.testing.assert_array_equal(out[inst == 2], image[inst == 2])  # neighbour untouched
    far = np.ones_like(inst, bool)
    far[19:40, 19:40] = False  # everything beyond dilated target + largest median radius
    np.testing.assert_array_equal(out[far], image[far])
    ring = (inst == 1) & (new_inst == 0)
    assert np.any(out[ring] != image[ring], axis=1).all()  # the old nucleus is blended away


def test_disk_footprint():
    assert disk(1).sum() == 5 and disk(5).sum() == 81


@pytest.mark.parametrize("radius", [1, 5])
def test_ring_median_equals_whole_window_median_filter(radius):
    from scipy import ndimage

    from guided_diffusion.gradmix.image import ring_median

    r = np.random.default_rng(radius)
    channel = r.integers(0, 256, (23, 31), dtype=np.uint8)
    ring = r.random((23, 31)) < 0.4
    ring[0, :] = ring[:, -1] = True  # edge pixels use replicated borders, like mode="nearest"
    expected = ndimage.median_filter(channel, footprint=disk(radius), mode="nearest")[ring]
    np.testing.assert_array_equal(ring_median(channel, ring, disk(radius)), expected)


def test_nucleus_table_same_for_small_and_huge_ids():
    from guided_diffusion.gradmix import nucleus_table

    inst, typ = blank(30)
    put(inst, typ, 1, 2, 3, 4, 5, 6)
    put(inst, typ, 2, 1, 15, 10, 2, 9)
    sparse = np.where(inst == 2, 10**8, inst * 7).astype(np.int32)  # forces the dense-relabel path
    a, b = nucleus_table(inst, typ), nucleus_table(sparse, typ)
    assert b.ids.tolist() == [7, 10**8]
    assert a.boxes == b.boxes == [(slice(3, 8), slice(4, 10)), (slice(15, 17), slice(10, 19))]
    assert a.areas.tolist() == b.areas.tolist() == [30, 18]
    assert a.classes.tolist() == b.classes.tolist() == [2, 1]
