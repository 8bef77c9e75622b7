"""The metric math: nuclei instance-segmentation and classification scores, as HoVer-Net defines them.

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

Class merging (``--dataset_mode``) is described in :mod:`guided_diffusion.metrics.evaluate`.

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

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..infra.errors import DiffMixError

INSTANCE_KEYS = ("dice", "aji", "aji_plus", "dq", "sq", "pq")

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
