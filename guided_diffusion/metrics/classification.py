"""Statistics for comparing classifiers and feature distributions: per-class scores, bootstrap
intervals, Kernel Inception Distance, paired seed-level tests and binomial intervals.

These sit next to :mod:`.scores` (HoVer-Net's nuclei metrics) and serve the experiment reports:
is arm B (e.g. a classifier trained with DiffMix synthetic nuclei) better than arm A, by how much,
and how sure are we. Everything works on plain numpy arrays; no torch is imported, and scipy.stats
(slow to import) is loaded only inside :func:`paired_test`, so importing this module stays cheap.

Conventions, shared with :mod:`.scores`:
    * an undefined ratio (zero denominator) is ``None``, never NaN and never a division by zero;
    * bootstrap intervals are percentile intervals of the valid (non-``None``) replicates, and are
      ``None`` when fewer than :data:`MIN_VALID_REPLICATES` replicates are valid;
    * every random draw comes from ``numpy.random.default_rng(seed)``, so results are reproducible;
    * bad input raises :class:`~guided_diffusion.infra.errors.DiffMixError` with a one-line message.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..infra.errors import DiffMixError

# Below this many valid replicates the 2.5th/97.5th percentiles are little more than the extreme
# values, so no interval is reported rather than a misleading one.
MIN_VALID_REPLICATES = 10

# Beyond this many seeds, enumerating all 2**S sign patterns (65536 at S = 16) gets expensive.
_EXACT_SIGN_FLIP_MAX = 16
_RANDOM_SIGN_FLIPS = 20000


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _class_ids(values, name: str) -> np.ndarray:
    """``values`` as a 1-D int64 array; whole-valued floats are accepted (labels read from JSON)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DiffMixError(f"{name}: expected a 1-D array of class ids, got shape {arr.shape}")
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DiffMixError(f"{name}: class ids must be whole numbers")
        return arr.astype(np.int64)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    raise DiffMixError(f"{name}: class ids must be integers, got dtype {arr.dtype}")


def _check_level(level: float) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise DiffMixError(f"level must lie strictly between 0 and 1, got {level}")
    return level


def _check_n_boot(n_boot: int) -> int:
    if int(n_boot) != n_boot or n_boot < 1:
        raise DiffMixError(f"n_boot must be a positive integer, got {n_boot!r}")
    return int(n_boot)


def _as_value(result) -> Optional[float]:
    """A statistic's result as a float, with ``None`` (and NaN, which means the same) as ``None``."""
    if result is None:
        return None
    value = float(result)
    return None if math.isnan(value) else value


# --------------------------------------------------------------------------------------------
# Per-class scores
# --------------------------------------------------------------------------------------------


def class_scores(true, pred, classes: Sequence[int]) -> Dict[int, dict]:
    """Per-class counts, recall, precision and F1 of a classification.

    Args:
        true: int array [N], the true class id of each item (any ints; 0 is an ordinary class).
        pred: int array [N], the predicted class id of each item, aligned with ``true``.
        classes: the class ids to report (ints); a class absent from both arrays is still reported.

    Returns:
        ``{c: {"n", "predicted", "correct", "recall", "precision", "f1"}}`` keyed by int class id:
        ``n`` = #(true == c), ``predicted`` = #(pred == c), ``correct`` = #(true == pred == c)
        (ints >= 0); ``recall`` = correct / n, ``precision`` = correct / predicted,
        ``f1`` = 2 correct / (n + predicted), floats in [0, 1] or ``None`` where the denominator
        is 0.

    Raises:
        DiffMixError: when ``true``/``pred`` are not 1-D integer arrays of the same shape, or a
        class id is not an integer.
    """
    t = _class_ids(true, "true")
    p = _class_ids(pred, "pred")
    if t.shape != p.shape:
        raise DiffMixError(f"true and pred must have the same shape, got {t.shape} and {p.shape}")
    out: Dict[int, dict] = {}
    for c in classes:
        try:
            whole = not isinstance(c, (bool, np.bool_)) and int(c) == c
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise DiffMixError(f"classes: class ids must be integers, got {c!r}")
        c = int(c)
        is_true, is_pred = t == c, p == c
        n, predicted = int(is_true.sum()), int(is_pred.sum())
        correct = int(np.count_nonzero(is_true & is_pred))
        out[c] = {
            "n": n,
            "predicted": predicted,
            "correct": correct,
            "recall": correct / n if n else None,
            "precision": correct / predicted if predicted else None,
            "f1": 2 * correct / (n + predicted) if n + predicted else None,
        }
    return out


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def _check_sets(samples) -> List[Tuple[np.ndarray, ...]]:
    """Each sample set as a tuple of arrays sharing their first dimension (>= 1 rows)."""
    if not isinstance(samples, np.ndarray):
        samples = list(samples)
    if isinstance(samples, np.ndarray) or len(samples) == 0:
        raise DiffMixError("samples must be a non-empty sequence of tuples of aligned arrays")
    sets = []
    for i, group in enumerate(samples):
        if isinstance(group, np.ndarray) or not isinstance(group, (tuple, list)) or len(group) == 0:
            raise DiffMixError(f"samples[{i}] must be a non-empty tuple of aligned arrays")
        arrays = tuple(np.asarray(a) for a in group)
        lengths = {a.shape[0] if a.ndim else None for a in arrays}
        if None in lengths:
            raise DiffMixError(f"samples[{i}] holds a 0-d array; rows cannot be resampled")
        if len(lengths) != 1:
            raise DiffMixError(
                f"samples[{i}]: arrays must have the same number of rows, got {sorted(lengths)}")
        if lengths.pop() == 0:
            raise DiffMixError(f"samples[{i}] has no rows")
        sets.append(arrays)
    return sets


def _replicates(statistic: Callable, sets, n_boot: int, seed: int) -> List[float]:
    """The valid (non-None) values of ``statistic`` over ``n_boot`` row resamples of ``sets``.

    Every set is resampled independently within a replicate, each in the order given, so a
    replicate's draws do not depend on what the statistic does with them.
    """
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        resampled = []
        for arrays in sets:
            n = arrays[0].shape[0]
            idx = rng.integers(0, n, size=n)
            resampled.append(tuple(a[idx] for a in arrays))
        value = _as_value(statistic(*resampled))
        if value is not None:
            values.append(value)
    return values


def _interval(values: List[float], level: float) -> Tuple[Optional[float], Optional[float]]:
    if len(values) < MIN_VALID_REPLICATES:
        return None, None
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_ci(statistic: Callable, samples, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Percentile bootstrap interval of a statistic of one or more independent sample sets.

    Args:
        statistic: called as ``statistic(set_1, set_2, ...)`` where each ``set_k`` is a tuple of
            arrays (the rows of sample set k); returns a float or ``None`` (undefined; NaN counts
            as ``None``).
        samples: sequence of tuples of arrays, one tuple per independent sample set, e.g.
            ``[(true_syn, pred_syn), (true_real, pred_real)]``; the arrays of one tuple are
            aligned along their first axis (same number of rows, >= 1) and any dtype/shape beyond.
        n_boot: number of bootstrap replicates (>= 1).
        seed: seed of the ``numpy.random.Generator`` drawing the resamples.
        level: coverage of the interval, in (0, 1).

    Returns:
        ``{"value", "low", "high", "n_boot"}``: ``value`` = statistic on the original data (float
        or ``None``); ``low``/``high`` = the (1-level)/2 and (1+level)/2 percentiles of the valid
        replicates (``None`` when fewer than 10 are valid); ``n_boot`` = number of valid
        replicates (int).

    Each replicate resamples the rows of every set with replacement, independently per set and
    keeping the arrays of a set aligned (rows stay together, e.g. a nucleus's true and predicted
    class).
    """
    level = _check_level(level)
    n_boot = _check_n_boot(n_boot)
    sets = _check_sets(samples)
    value = _as_value(statistic(*sets))
    values = _replicates(statistic, sets, n_boot, seed)
    low, high = _interval(values, level)
    return {"value": value, "low": low, "high": high, "n_boot": len(values)}


def bootstrap_mean_diff(metric: Callable, true, preds_a: Sequence, preds_b: Sequence,
                        n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Bootstrap over test items of (mean over seeds of arm B) - (mean over seeds of arm A).

    All predictions are made on the same test items, so one index resample is shared by ``true``
    and every prediction of both arms: the interval reflects which items happened to be in the test
    set, while seed-to-seed variation is averaged out within each arm.

    Args:
        metric: ``metric(true, pred) -> float | None`` on int arrays [n] (e.g. macro F1).
        true: int array [N], the true class of each test item (N >= 1).
        preds_a: non-empty list of int arrays [N], one per seed of arm A.
        preds_b: non-empty list of int arrays [N], one per seed of arm B (may hold a different
            number of seeds than ``preds_a``).
        n_boot: number of replicates (>= 1); seed: seed of the resampling Generator;
        level: interval coverage in (0, 1).

    Returns:
        ``{"diff", "low", "high", "p_le_0", "n_boot"}``: ``diff`` = the difference on the original
        items (float, ``None`` if any metric value is ``None``); ``low``/``high`` = percentile
        interval of the valid replicates (``None`` under 10 valid); ``p_le_0`` = fraction in [0, 1]
        of valid replicates with difference <= 0 (a one-sided bootstrap p for "B is better",
        ``None`` with no valid replicate); ``n_boot`` = valid replicates (those where every metric
        value is defined).
    """
    level = _check_level(level)
    n_boot = _check_n_boot(n_boot)
    t = _class_ids(true, "true")
    if t.size == 0:
        raise DiffMixError("true is empty; there are no test items to resample")
    arms = []
    for name, preds in (("preds_a", preds_a), ("preds_b", preds_b)):
        if isinstance(preds, np.ndarray) or len(preds) == 0:
            raise DiffMixError(f"{name} must be a non-empty list of prediction arrays, one per seed")
        arm = [_class_ids(p, f"{name}[{i}]") for i, p in enumerate(preds)]
        for i, p in enumerate(arm):
            if p.shape != t.shape:
                raise DiffMixError(f"{name}[{i}] has shape {p.shape}, true has {t.shape}")
        arms.append(arm)
    n_a = len(arms[0])

    def statistic(rows):
        t_rows, preds = rows[0], rows[1:]
        means = []
        for arm_preds in (preds[:n_a], preds[n_a:]):
            scores = [_as_value(metric(t_rows, p)) for p in arm_preds]
            if any(s is None for s in scores):
                return None
            means.append(sum(scores) / len(scores))
        return means[1] - means[0]

    # One sample set holding true and every prediction, so all share each replicate's resample.
    sets = [(t, *arms[0], *arms[1])]
    diff = statistic(sets[0])
    values = _replicates(statistic, sets, n_boot, seed)
    low, high = _interval(values, level)
    p_le_0 = sum(v <= 0 for v in values) / len(values) if values else None
    return {"diff": diff, "low": low, "high": high, "p_le_0": p_le_0, "n_boot": len(values)}


# --------------------------------------------------------------------------------------------
# Kernel Inception Distance
# --------------------------------------------------------------------------------------------


def _finite_float(arr: np.ndarray, name: str, what: str) -> np.ndarray:
    """``arr`` as float64, or a DiffMixError when it is not numeric or holds NaN / inf."""
    if arr.dtype.kind not in "iuf":
        raise DiffMixError(f"{name}: {what} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise DiffMixError(f"{name}: {what} contain NaN or infinite values")
    return arr


def _features(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise DiffMixError(f"{name}: expected a 2-D feature array [N, D], got shape {arr.shape}")
    return _finite_float(arr, name, "features")


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size row sets [m, D] under the cubic polynomial kernel."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    # k(a, a) terms would bias the within-set means upwards; the cross term has no such pairs.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(x, y, subset_size: int = 1000, num_subsets: int = 100, seed: int = 0) -> dict:
    """Kernel Inception Distance (Binkowski et al. 2018) between two sets of feature vectors.

    Args:
        x: float array [N, D], features of one set (e.g. real nuclei crops).
        y: float array [M, D], features of the other set (e.g. synthetic ones), same D.
        subset_size: rows drawn from each set per subset (>= 2); capped at min(N, M).
        num_subsets: number of subsets averaged (>= 1).
        seed: seed of the ``numpy.random.Generator`` choosing the subsets.

    Returns:
        ``{"kid", "sd", "n_x", "n_y", "subset_size", "num_subsets"}``: ``kid`` = mean over subsets
        of the unbiased MMD^2 with kernel k(a, b) = (a.b / D + 1)^3 (float; about 0 for equal
        distributions and may be slightly negative); ``sd`` = its standard deviation over subsets
        (ddof=1; ``None`` with one subset); ``n_x`` = N, ``n_y`` = M, ``subset_size`` =
        m = min(subset_size, N, M), ``num_subsets`` as given. With N < 2 or M < 2 the unbiased
        estimate is undefined and ``kid`` and ``sd`` are ``None``.

    Each subset draws m rows of x and m rows of y without replacement. Computation is in float64.
    """
    x = _features(x, "x")
    y = _features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise DiffMixError(f"x and y must have the same feature size, got D={x.shape[1]} and D={y.shape[1]}")
    if int(subset_size) != subset_size or subset_size < 2:
        raise DiffMixError(f"subset_size must be an integer >= 2, got {subset_size!r}")
    if int(num_subsets) != num_subsets or num_subsets < 1:
        raise DiffMixError(f"num_subsets must be a positive integer, got {num_subsets!r}")
    n, m_rows = x.shape[0], y.shape[0]
    m = min(int(subset_size), n, m_rows)
    out = {"kid": None, "sd": None, "n_x": n, "n_y": m_rows, "subset_size": m,
           "num_subsets": int(num_subsets)}
    if n < 2 or m_rows < 2:
        return out
    rng = np.random.default_rng(seed)
    estimates = np.empty(int(num_subsets), dtype=np.float64)
    for s in range(int(num_subsets)):
        xi = rng.choice(n, size=m, replace=False)
        yi = rng.choice(m_rows, size=m, replace=False)
        estimates[s] = _mmd2_unbiased(x[xi], y[yi])
    out["kid"] = float(estimates.mean())
    out["sd"] = float(estimates.std(ddof=1)) if num_subsets > 1 else None
    return out


# --------------------------------------------------------------------------------------------
# Seed-level paired test
# --------------------------------------------------------------------------------------------


def _seed_values(values, name: str) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
        arr = values
    else:
        if np.ndim(values) == 0:
            raise DiffMixError(f"{name}: expected one value per seed, got a single {values!r}")
        values = list(values)
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise DiffMixError(f"{name}: entries {missing} are None; every seed needs a value")
        arr = np.asarray(values)
    if arr.ndim != 1:
        raise DiffMixError(f"{name}: expected a 1-D array with one value per seed, got shape {arr.shape}")
    return _finite_float(arr, name, "values")


def paired_test(a, b) -> dict:
    """Paired comparison of two arms run on the same seeds: is B better than A?

    Args:
        a: float array [S], one value per seed of arm A (S >= 1; no ``None``/NaN).
        b: float array [S], arm B on the same seeds in the same order.

    Returns:
        ``{"n", "mean_diff", "sd_diff", "t", "p_t", "p_sign_flip", "b_wins"}``:
        ``n`` = S; ``mean_diff`` = mean(b - a); ``sd_diff`` = sample sd of b - a (ddof=1,
        ``None`` for S < 2, 0.0 when the differences are equal up to float rounding);
        ``t`` = paired t statistic of b - a and ``p_t`` its two-sided p (``scipy.stats.ttest_rel``),
        both ``None`` for S < 2 or zero sd; ``p_sign_flip`` = two-sided sign-flip permutation p in
        (0, 1]: the fraction of sign patterns of the differences whose |sum| is at least the
        observed one, over all 2^S patterns for S <= 16, else over 20000 random patterns (seed 0,
        counting the observed one, i.e. (1 + hits) / (1 + 20000)); ``b_wins`` = number of seeds
        with b > a.
    """
    a = _seed_values(a, "a")
    b = _seed_values(b, "b")
    if a.shape != b.shape:
        raise DiffMixError(f"a and b must have one value per seed each, got {a.shape[0]} and {b.shape[0]}")
    s = a.shape[0]
    if s == 0:
        raise DiffMixError("a and b are empty; at least one seed is needed")
    d = b - a
    out = {"n": s, "mean_diff": float(d.mean()), "sd_diff": None, "t": None, "p_t": None,
           "p_sign_flip": _sign_flip_p(d), "b_wins": int(np.count_nonzero(b > a))}
    if s >= 2:
        # b - a rounds at about one ulp of the inputs, so differences that are equal in exact
        # arithmetic (0.2-0.1 vs 0.3-0.2) can disagree in the last bits: a spread within a few
        # ulps is zero spread, otherwise t would be a huge number made of rounding noise.
        scale = max(float(np.abs(a).max()), float(np.abs(b).max()))
        if np.ptp(d) <= 64 * np.finfo(np.float64).eps * scale:
            out["sd_diff"] = 0.0
            return out
        out["sd_diff"] = float(d.std(ddof=1))
        from scipy import stats  # slow to import; only this function needs it

        res = stats.ttest_rel(b, a)
        out["t"] = float(res.statistic)
        out["p_t"] = float(res.pvalue)
    return out


def _sign_flip_p(d: np.ndarray) -> float:
    s = d.shape[0]
    observed = abs(d.sum())
    # Patterns whose sum equals the observed one up to rounding must count as ties, not misses.
    tol = 1e-12 * float(np.abs(d).sum())
    if s <= _EXACT_SIGN_FLIP_MAX:
        bits = (np.arange(2 ** s, dtype=np.int64)[:, None] >> np.arange(s)) & 1
        sums = np.abs((1 - 2 * bits) @ d)
        return float(np.count_nonzero(sums >= observed - tol) / (2 ** s))
    rng = np.random.default_rng(0)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(_RANDOM_SIGN_FLIPS, s))
    hits = int(np.count_nonzero(np.abs(signs @ d) >= observed - tol))
    return (1 + hits) / (1 + _RANDOM_SIGN_FLIPS)


# --------------------------------------------------------------------------------------------
# Proportions
# --------------------------------------------------------------------------------------------


def binomial_ci(k: int, n: int, level: float = 0.95) -> Tuple[Optional[float], Optional[float]]:
    """Wilson score interval for a proportion of ``k`` successes in ``n`` trials.

    Args:
        k: successes, int with 0 <= k <= n.
        n: trials, int >= 0.
        level: coverage in (0, 1).

    Returns:
        ``(low, high)`` floats in [0, 1], or ``(None, None)`` when n == 0 (no data).
        Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at k = 0 or
        k = n.
    """
    level = _check_level(level)
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, (bool, np.bool_)) or int(v) != v:
            raise DiffMixError(f"binomial_ci: {name} must be an integer, got {v!r}")
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= n:
        raise DiffMixError(f"binomial_ci: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return None, None
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = k / n
    z2n = z * z / n
    center = (p + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n)) / (1.0 + z2n)
    # At k = 0 (k = n) the bound is 0 (1) exactly; the formula only reaches it up to rounding.
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high
