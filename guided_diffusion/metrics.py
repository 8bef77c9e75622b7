"""Nuclei instance-segmentation and classification metrics, as HoVer-Net defines them.

The numbers match the definitions of HoVer-Net (Graham et al. 2019; its ``compute_stats.py`` and
``metrics/stats_utils.py``), so results compare with published CoNSeP/GLySAC tables:

Instance segmentation, per image, then averaged over images
    * ``dice``     -- binary foreground Dice, 2|T & P| / (|T| + |P|) (HoVer-Net ``get_dice_1``).
    * ``aji``      -- Aggregated Jaccard Index: every true instance is matched to the predicted
      instance of highest IoU (a prediction may serve several true instances); the summed
      intersections over the summed unions, where true instances without any overlap and
      predictions chosen by no true instance add their areas to the union (``get_fast_aji``).
    * ``aji_plus`` -- AJI+: the same sums over a one-to-one matching of maximal total IoU
      (Hungarian), so a merged prediction is not counted twice (``get_fast_aji_plus``).
    * ``dq``, ``sq``, ``pq`` -- a true/predicted pair is a match when IoU > 0.5 (then unique);
      DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the matches, PQ = DQ * SQ (``get_fast_pq``).

Classification, over the whole set of images
    Nuclei are paired one-to-one by centroid: a Hungarian assignment minimising the summed
    Euclidean distance between all true and all predicted centroids of an image, of which the
    pairs with distance <= ``radius`` (12 px by default) are kept (``pair_coordinates``). Then
    * ``f1_detection``  = 2 TP_d / (2 TP_d + FP_d + FN_d) (all pairs, all unpaired nuclei);
    * ``type_accuracy`` = fraction of paired nuclei whose types agree;
    * ``f1_type[c]``    = 2 TP_c / (2 TP_c + 2 FP_c + 2 FN_c + FP_d,c + FN_d,c), where among the
      pairs TP_c has true == pred == c, FP_c pred == c != true, FN_c true == c != pred, and FP_d,c /
      FN_d,c count the unpaired predicted / true nuclei of type c (``run_nuclei_type_stat`` with
      weights [2, 2, 1, 1]; its TN term is always 0 there).

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

Conventions where HoVer-Net is undefined or crashes (documented choices, never NaN):
    * an image with neither true nor predicted nuclei scores 1 on all six instance metrics
      (perfect agreement); an image where only one side has nuclei scores 0 on all six, which is
      what HoVer-Net's formulas give there. Per-image counts (``n_true``, ``n_pred``) are kept
      so such images can be filtered out afterwards.
    * SQ of an image with no match is 0 (HoVer-Net: 0 / (0 + 1e-6)). Where HoVer-Net divides by
      ``TP + 1e-6`` this module divides by TP exactly (a difference below 1e-6 relative).
    * a set-level ratio with a zero denominator (type accuracy with no pairs, F1 of a class seen
      on neither side, detection F1 with no nuclei at all) is ``None`` (JSON ``null``, "n/a").
    * an image without nuclei contributes nothing to the classification counts; HoVer-Net
      inserts a dummy nucleus of type 0 at (0, 0) there, which is not reproduced.
    * AJI/AJI+ choose matches by HoVer-Net's score inter / (union + 1e-6), which reproduces its
      choice between exactly tied candidates (the larger instance wins); reported IoUs are exact.

Pairwise intersections come from one ``bincount`` over joint (true, predicted) ids, never from
per-pair masks, and the AJI+ matching solves each connected group of overlapping instances
separately, so a 1000 x 1000 tile with ~1000 nuclei takes milliseconds.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from . import fileio
from .errors import DiffMixError

INSTANCE_KEYS = ("dice", "aji", "aji_plus", "dq", "sq", "pq")
LABEL_EXTENSIONS = (".mat", ".npy")

# Below this many (true+1) x (pred+1) cells the joint histogram is a dense bincount; above it,
# only the overlapping pixels are sorted, so memory stays bounded for maps with many instances.
_DENSE_JOINT_LIMIT = 1 << 24


# --------------------------------------------------------------------------------------------
# Instance overlap tables


def _dense_labels(inst: np.ndarray, what: str) -> tuple[np.ndarray, int]:
    """Renumber an instance map to 0..N (0 = background) in ascending order of the old ids.

    Args:
        inst: integer (or integral float) array [H, W], ids >= 0.
        what: name used in error messages (a file or argument name).

    Returns:
        ``(dense, n)``: int64 [H * W] flattened labels in 0..n, and the instance count n.
    """
    arr = np.asarray(inst)
    if arr.ndim != 2:
        raise DiffMixError(f"{what}: instance map must be 2-D [H, W], got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DiffMixError(f"{what}: instance map holds non-integer values")
    elif arr.dtype.kind not in "iub":
        raise DiffMixError(f"{what}: instance map must be integer, got dtype {arr.dtype}")
    flat = arr.astype(np.int64, copy=False).ravel()
    if flat.size == 0:
        return flat, 0
    if flat.min() < 0:
        raise DiffMixError(f"{what}: instance map holds negative ids (min {int(flat.min())})")
    top = int(flat.max())
    if top <= max(1 << 20, 4 * flat.size):
        # Lookup table: O(H*W), no sort; ids are usually small.
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        lut = np.zeros(top + 1, np.int64)
        lut[present] = np.arange(1, int(present.sum()) + 1)
        return lut[flat], int(present.sum())
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids[0] == 0:
        return inverse.astype(np.int64), ids.size - 1
    return inverse.astype(np.int64) + 1, ids.size


@dataclass
class Overlap:
    """Areas and pairwise intersections of two instance maps.

    Instances are indexed 0..n-1 in ascending order of their ids. Only overlapping pairs are
    stored (sparse): edge k joins true ``ti[k]`` and predicted ``pj[k]`` with ``inter[k]`` > 0
    common pixels.

    Attributes:
        true_area: int64 [Nt] pixel count of each true instance.
        pred_area: int64 [Np] pixel count of each predicted instance.
        ti, pj: int64 [E] instance indices of each overlapping pair.
        inter: int64 [E] intersection pixel counts (> 0).
        fg_inter: int pixel count where both maps are foreground (for binary Dice).
    """

    true_area: np.ndarray
    pred_area: np.ndarray
    ti: np.ndarray
    pj: np.ndarray
    inter: np.ndarray
    fg_inter: int

    @property
    def n_true(self) -> int:
        return int(self.true_area.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_area.size)

    @property
    def union(self) -> np.ndarray:
        """int64 [E] union pixel counts of the overlapping pairs."""
        return self.true_area[self.ti] + self.pred_area[self.pj] - self.inter

    @property
    def iou(self) -> np.ndarray:
        """float64 [E] exact IoU of the overlapping pairs, in (0, 1]."""
        return self.inter / self.union


def instance_overlap(true_inst: np.ndarray, pred_inst: np.ndarray) -> Overlap:
    """Build the :class:`Overlap` table of two instance maps of the same shape [H, W]."""
    t, nt = _dense_labels(true_inst, "true_inst")
    p, npred = _dense_labels(pred_inst, "pred_inst")
    if np.shape(true_inst) != np.shape(pred_inst):
        raise DiffMixError(
            f"instance maps differ in shape: true {np.shape(true_inst)}, pred {np.shape(pred_inst)}"
        )
    width = npred + 1
    if (nt + 1) * width <= _DENSE_JOINT_LIMIT:
        joint = np.bincount(t * width + p, minlength=(nt + 1) * width).reshape(nt + 1, width)
        true_area = joint[1:].sum(axis=1)
        pred_area = joint[:, 1:].sum(axis=0)
        ti, pj = np.nonzero(joint[1:, 1:])
        inter = joint[1:, 1:][ti, pj]
    else:
        true_area = np.bincount(t, minlength=nt + 1)[1:]
        pred_area = np.bincount(p, minlength=width)[1:]
        both = (t > 0) & (p > 0)
        keys, inter = np.unique(t[both] * width + p[both], return_counts=True)
        ti, pj = keys // width - 1, keys % width - 1
    return Overlap(
        true_area=true_area.astype(np.int64),
        pred_area=pred_area.astype(np.int64),
        ti=ti.astype(np.int64),
        pj=pj.astype(np.int64),
        inter=inter.astype(np.int64),
        fg_inter=int(inter.sum()),
    )


def _unique_matching(ov: Overlap, weight: np.ndarray) -> np.ndarray:
    """One-to-one matching of maximal total ``weight`` over the overlapping pairs.

    Equivalent to a Hungarian assignment over the full [Nt, Np] weight matrix (zero where
    instances do not overlap), solved per connected group of overlapping instances: most groups
    are a single pair, the rest are tiny.

    Args:
        ov: the overlap table.
        weight: float64 [E] positive weight of each overlapping pair.

    Returns:
        bool [E], True for the pairs in the matching.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_edges = ov.ti.size
    chosen = np.zeros(n_edges, bool)
    if n_edges == 0:
        return chosen
    nodes = ov.n_true + ov.n_pred
    graph = coo_matrix((np.ones(n_edges), (ov.ti, ov.n_true + ov.pj)), shape=(nodes, nodes))
    _, label = connected_components(graph, directed=False)
    comp = label[ov.ti]
    edges_in_comp = np.bincount(comp)
    chosen[edges_in_comp[comp] == 1] = True  # an isolated pair is always matched
    multi = np.flatnonzero(edges_in_comp[comp] > 1)
    if multi.size:
        multi = multi[np.argsort(comp[multi], kind="stable")]
        groups = np.split(multi, np.flatnonzero(np.diff(comp[multi])) + 1)
        for edges in groups:
            _, r = np.unique(ov.ti[edges], return_inverse=True)
            _, c = np.unique(ov.pj[edges], return_inverse=True)
            w = np.zeros((r.max() + 1, c.max() + 1))
            w[r, c] = weight[edges]
            edge_at = np.full(w.shape, -1, np.int64)
            edge_at[r, c] = edges
            rows, cols = linear_sum_assignment(w, maximize=True)
            ok = w[rows, cols] > 0
            chosen[edge_at[rows[ok], cols[ok]]] = True
    return chosen


def _hovernet_score(ov: Overlap) -> np.ndarray:
    # HoVer-Net ranks AJI candidates by inter / (union + 1e-6); using the same score keeps its
    # choice between exactly tied candidates (e.g. two halves of a nucleus).
    return ov.inter / (ov.union + 1e-6)


def _aji_from_pairs(ov: Overlap, pairs: np.ndarray) -> float:
    """AJI-style ratio: summed inter / (summed union + areas of instances in no pair).

    ``pairs`` are edge indices; a predicted instance used by several pairs counts once per pair.
    """
    union = ov.union
    used_t = np.zeros(ov.n_true, bool)
    used_p = np.zeros(ov.n_pred, bool)
    used_t[ov.ti[pairs]] = True
    used_p[ov.pj[pairs]] = True
    total_inter = float(ov.inter[pairs].sum())
    total_union = float(union[pairs].sum())
    total_union += float(ov.true_area[~used_t].sum() + ov.pred_area[~used_p].sum())
    if total_union == 0:  # no nuclei on either side
        return 1.0
    return total_inter / total_union


def aji_score(ov: Overlap) -> float:
    """AJI: each true instance with any overlap matched to its highest-IoU prediction."""
    if ov.ti.size == 0:
        return _aji_from_pairs(ov, np.zeros(0, np.int64))
    score = _hovernet_score(ov)
    # Sort by true instance, then best score, then lowest prediction index (argmax's tie rule).
    order = np.lexsort((ov.pj, -score, ov.ti))
    first = np.ones(order.size, bool)
    first[1:] = ov.ti[order][1:] != ov.ti[order][:-1]
    return _aji_from_pairs(ov, order[first])


def aji_plus_score(ov: Overlap) -> float:
    """AJI+: one-to-one matching of maximal total IoU."""
    return _aji_from_pairs(ov, np.flatnonzero(_unique_matching(ov, _hovernet_score(ov))))


def pq_scores(ov: Overlap, match_iou: float = 0.5) -> dict:
    """Detection, segmentation and panoptic quality.

    Args:
        ov: the overlap table.
        match_iou: a pair matches when IoU > match_iou. At >= 0.5 matches are unique by
            construction; below 0.5 a maximal-IoU one-to-one matching is taken first.

    Returns:
        dict with floats ``dq``, ``sq``, ``pq`` in [0, 1] and ints ``tp``, ``fp``, ``fn``.
    """
    iou = ov.iou
    if match_iou >= 0.5:
        matched = iou > match_iou
    else:
        matched = _unique_matching(ov, iou) & (iou > match_iou)
    tp = int(matched.sum())
    fp, fn = ov.n_pred - tp, ov.n_true - tp
    if ov.n_true == 0 and ov.n_pred == 0:
        dq = sq = 1.0
    else:
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = float(iou[matched].sum()) / tp if tp else 0.0
    return {"dq": dq, "sq": sq, "pq": dq * sq, "tp": tp, "fp": fp, "fn": fn}


def dice_score(ov: Overlap) -> float:
    """Binary foreground Dice (1 when both maps are all background)."""
    denom = float(ov.true_area.sum() + ov.pred_area.sum())
    return 1.0 if denom == 0 else 2.0 * ov.fg_inter / denom


def instance_metrics(true_inst: np.ndarray, pred_inst: np.ndarray, match_iou: float = 0.5) -> dict:
    """The six instance-segmentation metrics of one image.

    Args:
        true_inst: int [H, W] true instance ids, 0 = background (ids need not be contiguous).
        pred_inst: int [H, W] predicted instance ids, same shape.
        match_iou: IoU threshold of a PQ match (strictly greater), 0.5 as published.

    Returns:
        dict of floats in [0, 1]: ``dice``, ``aji``, ``aji_plus``, ``dq``, ``sq``, ``pq``.
    """
    ov = instance_overlap(true_inst, pred_inst)
    return _instance_scores(ov, pq_scores(ov, match_iou))


def _instance_scores(ov: "Overlap", pq: dict) -> dict:
    """The six instance metrics of one image from its overlap table and :func:`pq_scores`."""
    return {
        "dice": dice_score(ov),
        "aji": aji_score(ov),
        "aji_plus": aji_plus_score(ov),
        "dq": pq["dq"],
        "sq": pq["sq"],
        "pq": pq["pq"],
    }


# --------------------------------------------------------------------------------------------
# Centroid pairing and classification


def pair_by_centroid(true_xy, pred_xy, radius: float = 12.0):
    """Pair true and predicted nuclei one-to-one by centroid (HoVer-Net ``pair_coordinates``).

    A Hungarian assignment minimises the summed Euclidean distance over all true/predicted
    centroids; assigned pairs with distance <= ``radius`` are kept (exactly ``radius`` pairs).

    Args:
        true_xy: float [Nt, 2] centroids (x, y) in pixels.
        pred_xy: float [Np, 2] centroids.
        radius: maximal pairing distance in pixels, > 0.

    Returns:
        ``(paired, unpaired_true, unpaired_pred)``: int64 [K, 2] (true index, pred index) rows in
        ascending true index, int64 [Nt - K], int64 [Np - K].
    """
    from scipy.spatial.distance import cdist

    if not np.isfinite(radius) or radius <= 0:
        raise DiffMixError(f"pairing radius must be a positive number of pixels, got {radius}")
    a = np.asarray(true_xy, np.float64).reshape(-1, 2)
    b = np.asarray(pred_xy, np.float64).reshape(-1, 2)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((0, 2), np.int64), np.arange(a.shape[0]), np.arange(b.shape[0])
    dist = cdist(a, b)
    rows, cols = linear_sum_assignment(dist)
    keep = dist[rows, cols] <= radius
    paired = np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64)
    unpaired_true = np.setdiff1d(np.arange(a.shape[0]), paired[:, 0])
    unpaired_pred = np.setdiff1d(np.arange(b.shape[0]), paired[:, 1])
    return paired, unpaired_true, unpaired_pred


def _ratio(num: float, den: float) -> Optional[float]:
    return None if den == 0 else float(num) / float(den)


def type_metrics(
    paired_true_type,
    paired_pred_type,
    unpaired_true_type,
    unpaired_pred_type,
    classes: Optional[Sequence[int]] = None,
) -> dict:
    """Detection F1, type accuracy and per-type F1 from nuclei pooled over a whole set.

    Args:
        paired_true_type, paired_pred_type: int [K] types of the true / predicted nucleus of each
            centroid pair (all images concatenated).
        unpaired_true_type: int [FN_d] types of unpaired true nuclei.
        unpaired_pred_type: int [FP_d] types of unpaired predicted nuclei.
        classes: types to score; default the non-zero types among the true nuclei (HoVer-Net's
            default is the types present in the ground truth).

    Returns:
        dict: ``f1_detection``, ``type_accuracy`` (float or None when undefined), ``f1_type``
        ({class: float or None}), and ``counts`` ({``tp_d``, ``fp_d``, ``fn_d``,
        ``per_class``: {class: {tp, fp, fn, fp_d, fn_d}}}).
    """
    pt = np.asarray(paired_true_type, np.int64).ravel()
    pp = np.asarray(paired_pred_type, np.int64).ravel()
    ut = np.asarray(unpaired_true_type, np.int64).ravel()
    up = np.asarray(unpaired_pred_type, np.int64).ravel()
    if pt.shape != pp.shape:
        raise ValueError(f"paired type arrays differ in length: {pt.size} vs {pp.size}")
    tp_d, fp_d, fn_d = pt.size, up.size, ut.size
    if classes is None:
        every_true = np.concatenate([pt, ut])
        classes = [int(c) for c in np.unique(every_true[every_true != 0])]
    f1_type, per_class = {}, {}
    for c in classes:
        c = int(c)
        tp = int(np.sum((pt == c) & (pp == c)))
        fp = int(np.sum((pt != c) & (pp == c)))
        fn = int(np.sum((pt == c) & (pp != c)))
        fpd, fnd = int(np.sum(up == c)), int(np.sum(ut == c))
        f1_type[c] = _ratio(2 * tp, 2 * tp + 2 * fp + 2 * fn + fpd + fnd)
        per_class[c] = {"tp": tp, "fp": fp, "fn": fn, "fp_d": fpd, "fn_d": fnd}
    return {
        "f1_detection": _ratio(2 * tp_d, 2 * tp_d + fp_d + fn_d),
        "type_accuracy": _ratio(np.sum(pt == pp), tp_d),
        "f1_type": f1_type,
        "counts": {"tp_d": tp_d, "fp_d": fp_d, "fn_d": fn_d, "per_class": per_class},
    }


# --------------------------------------------------------------------------------------------
# Label files


@dataclass
class LabelFile:
    """One label map read for evaluation.

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


def _integral(arr: np.ndarray, what: str, path: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind == "f" and (
        not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr))
    ):
        raise DiffMixError(f"{path}: {what} holds non-integer values")
    if arr.dtype.kind not in "iubf":
        raise DiffMixError(f"{path}: {what} must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _maps_from_npy(arr: np.ndarray, path: str):
    """(inst_map, type_map or None) from a HoVer-Net ``.npy`` array."""
    if arr.ndim == 2:
        return arr, None
    if arr.ndim == 3 and arr.shape[-1] in (1, 2, 4, 5):
        channels = {1: (0, None), 2: (0, 1), 4: (3, None), 5: (3, 4)}[arr.shape[-1]]
        inst = arr[..., channels[0]]
        return inst, None if channels[1] is None else arr[..., channels[1]]
    raise DiffMixError(
        f"{path}: expected a HoVer-Net label array [H, W, 5] (RGB, instance, type), [H, W, 4] "
        f"(RGB, instance), [H, W, 2] (instance, type) or [H, W] (instance), got shape {arr.shape}"
    )


def _marked_merged(mat: dict, path: str) -> Optional[int]:
    """``num_classes`` of a ``.mat`` marked ``classes_merged`` = 1, else None (the data layer's rule)."""
    from .data.readers import MERGED_KEY, NUM_CLASSES_KEY, _scalar

    if MERGED_KEY not in mat or _scalar(mat[MERGED_KEY]) != 1:
        return None
    n = _scalar(mat.get(NUM_CLASSES_KEY))
    if n is None:
        raise DiffMixError(f"{path}: {MERGED_KEY}=1 but no readable {NUM_CLASSES_KEY}")
    return n


def _merge_types(values: np.ndarray, table, marked: Optional[int], what: str, path: str):
    """Raw type ids (int array, any shape) -> merged classes with ``table``.

    A file marked as already merged is only checked against ``0..num_classes-1``: merging it
    again would relabel its classes (with CoNSeP, merged 4 = spindle read as raw 4 would become
    3 = epithelial).
    """
    if marked is not None:
        if marked != table.num_classes:
            raise DiffMixError(
                f"{path}: written with num_classes={marked} (classes_merged=1), but the class "
                f"table {table.name!r} has {table.num_classes}"
            )
        bad = np.unique(values[(values < 0) | (values >= marked)])
        if bad.size:
            raise DiffMixError(
                f"{path}: {what} values {bad.tolist()} outside 0..{marked - 1} "
                f"(classes_merged=1, num_classes={marked})"
            )
        return values
    return table.merge(values, source=f"{path} ({what})").astype(np.int64)


def read_label_file(path: str, class_table=None) -> LabelFile:
    """Read a CoNSeP-layout ``.mat`` or a HoVer-Net ``.npy`` label file.

    ``.mat`` files need ``inst_map``; ``inst_centroid`` ([N, 2], x then y) and ``inst_type``
    ([N, 1]) are used as stored when present (as HoVer-Net's evaluation does, e.g. for its own
    output files, which have no ``type_map``) and otherwise recomputed from ``inst_map`` and
    ``type_map`` with :func:`guided_diffusion.data.labels.instance_table`. Types are None when
    neither ``inst_type`` nor a type map is available.

    Args:
        path: the file.
        class_table: optional :class:`guided_diffusion.data.classes.ClassTable`. When given, the
            raw ids of ``type_map`` (per pixel, before the per-instance majority vote, as the
            data layer does) and of a stored ``inst_type`` are merged with it; unknown raw ids
            raise. A ``.mat`` marked ``classes_merged`` = 1 is not merged again, only checked.
    """
    from .data.labels import instance_table

    stored_xy = stored_types = None
    marked = None
    if path.lower().endswith(".npy"):
        inst, type_map = _maps_from_npy(fileio.read_npy(path), path)
    else:
        mat = fileio.read_mat(path)
        if "inst_map" not in mat:
            keys = ", ".join(sorted(mat)) or "none"
            raise DiffMixError(f"{path}: no 'inst_map' key (keys: {keys})")
        inst, type_map = mat["inst_map"], mat.get("type_map")
        marked = _marked_merged(mat, path)
        if mat.get("inst_centroid") is not None:
            stored_xy = np.asarray(mat["inst_centroid"], np.float64)
            if stored_xy.size and stored_xy.shape[-1] != 2:
                raise DiffMixError(f"{path}: inst_centroid must be [N, 2], got {stored_xy.shape}")
            stored_xy = stored_xy.reshape(-1, 2)
        if mat.get("inst_type") is not None:
            stored_types = _integral(mat["inst_type"], "inst_type", path).reshape(-1)
    inst = np.asarray(inst)
    if inst.ndim != 2:
        raise DiffMixError(f"{path}: inst_map must be 2-D [H, W], got shape {inst.shape}")
    inst = _integral(inst, "inst_map", path)
    if inst.size and inst.min() < 0:
        raise DiffMixError(f"{path}: inst_map holds negative ids")
    if type_map is not None:
        type_map = _integral(type_map, "type_map", path)
        if type_map.shape != inst.shape:
            raise DiffMixError(
                f"{path}: type_map shape {type_map.shape} differs from inst_map shape {inst.shape}"
            )
    if class_table is not None:
        if type_map is not None:
            type_map = _merge_types(type_map, class_table, marked, "type_map", path)
        if stored_types is not None:
            stored_types = _merge_types(stored_types, class_table, marked, "inst_type", path)
    ids, table_types, table_xy = instance_table(inst, inst * 0 if type_map is None else type_map)
    centroids = table_xy if stored_xy is None else stored_xy
    types = stored_types
    if types is None and type_map is not None:
        types = table_types
    for what, arr in (("inst_centroid", stored_xy), ("inst_type", stored_types)):
        if arr is not None and arr.shape[0] != ids.size:
            raise DiffMixError(
                f"{path}: {what} has {arr.shape[0]} rows but inst_map has {ids.size} instances "
                "(stale keys? remove them to recompute from the maps)"
            )
    return LabelFile(
        path=path, inst_map=inst, centroids=centroids, types=types, marked_merged=marked
    )


def _label_files(folder: str) -> dict[str, str]:
    """{stem: path} of the ``.mat``/``.npy`` files in ``folder``."""
    try:
        names = fileio.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        raise DiffMixError(f"{folder}: folder not found") from None
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
    true_files, pred_files = _label_files(true_dir), _label_files(pred_dir)
    if not true_files:
        raise DiffMixError(f"{true_dir}: no .mat or .npy label files")
    only_true = sorted(set(true_files) - set(pred_files))
    only_pred = sorted(set(pred_files) - set(true_files))
    if only_true or only_pred:

        def show(stems):
            more = f" (+{len(stems) - 10} more)" if len(stems) > 10 else ""
            return ", ".join(stems[:10]) + more

        parts = []
        if only_true:
            parts.append(f"{len(only_true)} only in true_dir: {show(only_true)}")
        if only_pred:
            parts.append(f"{len(only_pred)} only in pred_dir: {show(only_pred)}")
        raise DiffMixError(
            f"label files of true_dir {true_dir} and pred_dir {pred_dir} do not pair up by "
            "name; " + "; ".join(parts)
        )
    return [(stem, true_files[stem], pred_files[stem]) for stem in sorted(true_files)]


# --------------------------------------------------------------------------------------------
# Folder evaluation and reports


def _check_types(label: LabelFile, num_classes: Optional[int], table, side: str) -> None:
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


def evaluate_folders(
    true_dir: str,
    pred_dir: str,
    radius: float = 12.0,
    num_classes: Optional[int] = None,
    out_dir: Optional[str] = None,
    match_iou: float = 0.5,
    progress: bool = True,
    class_table=None,
    true_source: Optional[str] = None,
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
        true_source: what the reports name as the ground truth (default ``true_dir``; e.g. the
            dataset a temporary ``true_dir`` was converted from).

    Returns:
        dict with ``settings``, ``instance`` (means of the six metrics over images),
        ``classification`` (:func:`type_metrics` result plus ``types_available``; with a class
        table also ``class_names`` {class: name} and ``f1_type_named`` {name: F1}; ``f1_type``
        stays keyed by the numeric class), ``per_image`` (a list of per-image dicts: name,
        counts, the six metrics, detection counts) and ``warnings`` (list of str).
    """
    import sys

    from tqdm import tqdm

    if num_classes is not None and num_classes < 2:
        raise DiffMixError(f"num_classes must be >= 2 (background + 1 class), got {num_classes}")
    if class_table is not None:
        if num_classes is not None and num_classes != class_table.num_classes:
            raise DiffMixError(
                f"num_classes={num_classes} does not match the {class_table.name} class table "
                f"({class_table.num_classes} classes including background)"
            )
        num_classes = class_table.num_classes
    triples = match_label_files(true_dir, pred_dir)
    per_image = []
    pooled = {"pt": [], "pp": [], "ut": [], "up": []}
    types_available = True
    true_values: set = set()
    pred_values: set = set()
    for stem, true_path, pred_path in tqdm(triples, desc="evaluate", disable=not progress):
        true = read_label_file(true_path, class_table)
        pred = read_label_file(pred_path)  # predictions are expected in merged classes already
        if true.inst_map.shape != pred.inst_map.shape:
            raise DiffMixError(
                f"{pred_path}: shape {pred.inst_map.shape} differs from {true_path} "
                f"shape {true.inst_map.shape}"
            )
        if class_table is not None and pred.marked_merged not in (None, num_classes):
            raise DiffMixError(
                f"{pred_path}: written with num_classes={pred.marked_merged} (classes_merged=1), "
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
    result = {
        "settings": {
            "true_dir": true_source or true_dir,
            "pred_dir": pred_dir,
            "radius": float(radius),
            "num_classes": num_classes,
            "class_table": None if class_table is None else class_table.to_json(),
            "match_iou": float(match_iou),
            "n_images": len(per_image),
            "definitions": "HoVer-Net compute_stats (see guided_diffusion/metrics.py)",
        },
        "instance": {k: float(np.mean([row[k] for row in per_image])) for k in INSTANCE_KEYS},
        "classification": cls,
        "per_image": per_image,
        "warnings": warnings,
    }
    if out_dir is not None:
        write_reports(result, out_dir)
    return result


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_table(result: dict) -> str:
    """Human-readable summary of an :func:`evaluate_folders` result."""
    inst, cls = result["instance"], result["classification"]
    heads = ["Dice", "AJI", "AJI+", "DQ", "SQ", "PQ"]
    lines = [
        f"instance segmentation (mean over {result['settings']['n_images']} images)",
        "  " + "  ".join(f"{h:>6}" for h in heads),
        "  " + "  ".join(f"{_fmt(inst[k]):>6}" for k in INSTANCE_KEYS),
        "",
        f"classification (centroid radius {result['settings']['radius']:g} px; "
        f"TP {cls['counts']['tp_d']}, FP {cls['counts']['fp_d']}, FN {cls['counts']['fn_d']})",
    ]
    names = cls.get("class_names") or {}
    heads = ["F1_d", "Acc"] + [f"F1_{names.get(c, c)}" for c in cls["f1_type"]]
    values = [cls["f1_detection"], cls["type_accuracy"]] + list(cls["f1_type"].values())
    widths = [max(6, len(h)) for h in heads]
    lines.append("  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
    lines.append("  " + "  ".join(f"{_fmt(v):>{w}}" for v, w in zip(values, widths)))
    if not cls["types_available"]:
        lines.append("  (no type information on one side: type metrics not computed)")
    table = result["settings"].get("class_table")
    if table:
        lines.append(f"  (ground truth merged with the {table['name']} class table)")
    return "\n".join(lines)


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue().encode()


def write_reports(result: dict, out_dir: str) -> dict[str, str]:
    """Write ``metrics.json``, ``metrics_per_image.csv`` and ``metrics_summary.csv``.

    Returns:
        {kind: path} of the files written.
    """
    fileio.makedirs(out_dir)
    paths = {
        "json": fileio.join(out_dir, "metrics.json"),
        "per_image": fileio.join(out_dir, "metrics_per_image.csv"),
        "summary": fileio.join(out_dir, "metrics_summary.csv"),
    }
    fileio.write_json(paths["json"], result)
    rows = result["per_image"]
    header = list(rows[0]) if rows else ["name"]
    table = [[r[k] for k in header] for r in rows]
    fileio.write_bytes(paths["per_image"], _csv_bytes(header, table))
    cls = result["classification"]
    summary = [[k, result["instance"][k]] for k in INSTANCE_KEYS]
    summary += [["f1_detection", cls["f1_detection"]], ["type_accuracy", cls["type_accuracy"]]]
    names = cls.get("class_names") or {}
    summary += [
        [f"f1_type_{c}" + (f"_{names[c]}" if c in names else ""), v]
        for c, v in cls["f1_type"].items()
    ]
    fileio.write_bytes(paths["summary"], _csv_bytes(["metric", "value"], summary))
    return paths
