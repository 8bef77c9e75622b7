"""Classification statistics against hand-computed values, scipy and brute-force references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from guided_diffusion.infra.errors import DiffMixError
from guided_diffusion.metrics.classification import (
    binomial_ci,
    bootstrap_ci,
    bootstrap_mean_diff,
    class_scores,
    kid,
    paired_test,
)


def _accuracy(true, pred):
    return float(np.mean(true == pred)) if len(true) else None


def _no_nan(value):
    return value is None or not math.isnan(value)


# --- class_scores ---------------------------------------------------------------------------


def test_class_scores_hand_computed():
    true = np.array([0, 0, 1, 1, 1, 2, 3])
    pred = np.array([0, 1, 1, 1, 0, 1, 5])
    s = class_scores(true, pred, [0, 1, 2, 3, 4, 5])
    assert set(s) == {0, 1, 2, 3, 4, 5}
    assert s[0] == {"n": 2, "predicted": 2, "correct": 1, "recall": 0.5, "precision": 0.5, "f1": 0.5}
    assert (s[1]["n"], s[1]["predicted"], s[1]["correct"]) == (3, 4, 2)
    assert s[1]["recall"] == pytest.approx(2 / 3)
    assert s[1]["precision"] == pytest.approx(0.5)
    assert s[1]["f1"] == pytest.approx(4 / 7)
    # Never predicted: precision undefined, recall and F1 are a genuine 0.
    assert s[3] == {"n": 1, "predicted": 0, "correct": 0, "recall": 0.0, "precision": None, "f1": 0.0}
    # Predicted but absent from the truth: recall undefined.
    assert s[5] == {"n": 0, "predicted": 1, "correct": 0, "recall": None, "precision": 0.0, "f1": 0.0}
    # On neither side: nothing is defined.
    assert s[4] == {"n": 0, "predicted": 0, "correct": 0, "recall": None, "precision": None, "f1": None}
    assert all(_no_nan(v) for c in s.values() for v in c.values())
    assert all(isinstance(k, int) for k in s)


def test_class_scores_rejects_bad_input():
    with pytest.raises(DiffMixError, match="same shape"):
        class_scores(np.array([0, 1, 2]), np.array([0, 1]), [0, 1])
    with pytest.raises(DiffMixError, match="1-D"):
        class_scores(np.zeros((2, 2), int), np.zeros((2, 2), int), [0])
    with pytest.raises(DiffMixError, match="whole numbers"):
        class_scores(np.array([0.5]), np.array([0]), [0])
    with pytest.raises(DiffMixError, match="classes"):
        class_scores(np.array([0]), np.array([0]), [1.5])


# --- bootstrap_ci ---------------------------------------------------------------------------


def _mean(rows):
    return float(rows[0].mean())


def test_bootstrap_ci_brackets_true_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(_mean, [(rng.normal(3.0, 1.0, 100),)], n_boot=400, seed=0)
    large = bootstrap_ci(_mean, [(rng.normal(3.0, 1.0, 5000),)], n_boot=400, seed=0)
    for r in (small, large):
        assert r["n_boot"] == 400
        assert r["low"] < r["value"] < r["high"]
        assert r["low"] < 3.0 < r["high"]
    # Width scales like 1/sqrt(n): 50x the rows gives about 1/7 of the width.
    assert (large["high"] - large["low"]) < 0.3 * (small["high"] - small["low"])


def test_bootstrap_ci_is_reproducible_and_resamples_sets_independently():
    rng = np.random.default_rng(2)
    x, y = rng.normal(0.0, 1.0, 300), rng.normal(1.0, 1.0, 400)

    def diff(sx, sy):
        return float(sy[0].mean() - sx[0].mean())

    r1 = bootstrap_ci(diff, [(x,), (y,)], n_boot=300, seed=5)
    r2 = bootstrap_ci(diff, [(x,), (y,)], n_boot=300, seed=5)
    assert r1 == r2
    assert r1["value"] == pytest.approx(y.mean() - x.mean())
    assert r1["low"] < r1["value"] < r1["high"] and r1["low"] > 0.5


def test_bootstrap_ci_drops_none_replicates_and_keeps_rows_aligned():
    true = np.array([0, 1, 1, 1])
    pred = np.array([0, 1, 1, 1])

    # Rows stay aligned, so resampled predictions always equal resampled truth.
    r = bootstrap_ci(lambda s: _accuracy(*s), [(true, pred)], n_boot=100, seed=0)
    assert r == {"value": 1.0, "low": 1.0, "high": 1.0, "n_boot": 100}

    # Recall of class 0 is undefined whenever the resample misses row 0 (~(3/4)^4 of the time).
    def recall0(s):
        return class_scores(s[0], s[1], [0])[0]["recall"]

    r = bootstrap_ci(recall0, [(true, pred)], n_boot=200, seed=0)
    assert 100 < r["n_boot"] < 200

    r = bootstrap_ci(lambda s: None, [(true, pred)], n_boot=50)
    assert r == {"value": None, "low": None, "high": None, "n_boot": 0}


def test_bootstrap_ci_rejects_bad_input():
    with pytest.raises(DiffMixError, match="same number of rows"):
        bootstrap_ci(_mean, [(np.zeros(3), np.zeros(4))])
    with pytest.raises(DiffMixError, match="non-empty"):
        bootstrap_ci(_mean, [])
    with pytest.raises(DiffMixError, match="level"):
        bootstrap_ci(_mean, [(np.zeros(3),)], level=95)


# --- kid ------------------------------------------------------------------------------------


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same = kid(x, y, subset_size=200, num_subsets=20, seed=0)
    shifted = kid(x, y + 1.0, subset_size=200, num_subsets=20, seed=0)
    assert abs(same["kid"]) < 0.05
    assert shifted["kid"] > 1.0
    assert shifted["kid"] > 10 * (abs(same["kid"]) + same["sd"])
    assert same["sd"] > 0
    assert (same["n_x"], same["n_y"], same["subset_size"], same["num_subsets"]) == (400, 400, 200, 20)


def test_kid_matches_brute_force_unbiased_mmd():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 3)), rng.normal(0.5, 1.0, size=(6, 3))
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    n = len(x)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    r = kid(x, y, subset_size=50, num_subsets=1, seed=9)
    assert r["kid"] == pytest.approx(xx + yy - 2 * xy, rel=1e-12, abs=1e-12)
    assert r["sd"] is None and r["subset_size"] == 6


def test_kid_undefined_for_tiny_sets_and_rejects_mismatched_features():
    r = kid(np.ones((1, 4)), np.ones((10, 4)))
    assert r["kid"] is None and r["sd"] is None and r["n_x"] == 1 and r["n_y"] == 10
    with pytest.raises(DiffMixError, match="feature size"):
        kid(np.ones((5, 4)), np.ones((5, 3)))
    with pytest.raises(DiffMixError, match="2-D"):
        kid(np.ones(5), np.ones((5, 1)))


# --- paired_test ----------------------------------------------------------------------------


def test_paired_test_exact_sign_flip_and_t_match_scipy():
    a = np.array([0.70, 0.72, 0.69])
    b = np.array([0.75, 0.74, 0.78])
    r = paired_test(a, b)
    # Of the 8 sign patterns only all-plus and all-minus reach the observed |sum|.
    assert r["p_sign_flip"] == pytest.approx(2 / 8)
    ref = stats.ttest_rel(b, a)
    assert r["t"] == pytest.approx(ref.statistic) and r["t"] > 0
    assert r["p_t"] == pytest.approx(ref.pvalue)
    assert r["mean_diff"] == pytest.approx(np.mean(b - a))
    assert r["sd_diff"] == pytest.approx(np.std(b - a, ddof=1))
    assert r["n"] == 3 and r["b_wins"] == 3


def test_paired_test_sign_flip_against_enumeration_and_edge_cases():
    rng = np.random.default_rng(5)
    d = rng.normal(0.2, 1.0, 7)
    r = paired_test(np.zeros(7), d)
    sums = [abs(sum(s * v for s, v in zip(signs, d))) for signs in itertools.product([-1, 1], repeat=7)]
    assert r["p_sign_flip"] == pytest.approx(sum(v >= abs(d.sum()) - 1e-12 for v in sums) / 128)

    one = paired_test([0.5], [0.6])
    assert one["sd_diff"] is None and one["t"] is None and one["p_t"] is None
    assert one["p_sign_flip"] == 1.0 and one["b_wins"] == 1

    constant = paired_test([0.1, 0.2, 0.3], [0.2, 0.3, 0.4])
    # 0.2-0.1, 0.3-0.2, 0.4-0.3 differ in their last bits; that is no spread, not a huge t.
    assert constant["sd_diff"] == 0.0 and constant["t"] is None and constant["p_t"] is None
    assert constant["p_sign_flip"] == pytest.approx(2 / 8)

    many = paired_test(np.zeros(20), np.full(20, 0.1) + rng.normal(0, 0.01, 20))
    assert 0 < many["p_sign_flip"] < 0.001 and many["b_wins"] == 20


def test_paired_test_rejects_bad_input():
    with pytest.raises(DiffMixError, match="None"):
        paired_test([0.1, None, 0.3], [0.2, 0.3, 0.4])
    with pytest.raises(DiffMixError, match="one value per seed"):
        paired_test([0.1, 0.2], [0.2, 0.3, 0.4])
    with pytest.raises(DiffMixError, match="NaN"):
        paired_test([0.1, float("nan")], [0.2, 0.3])


# --- bootstrap_mean_diff --------------------------------------------------------------------


def _noisy(true, rate, rng):
    pred = true.copy()
    flip = rng.random(true.shape) < rate
    pred[flip] = rng.integers(0, 3, flip.sum())
    return pred


def test_bootstrap_mean_diff_identical_and_better_arms():
    rng = np.random.default_rng(6)
    true = rng.integers(0, 3, 300)
    weak = [_noisy(true, 0.6, rng) for _ in range(3)]
    strong = [_noisy(true, 0.15, rng) for _ in range(2)]

    same = bootstrap_mean_diff(_accuracy, true, weak, weak, n_boot=200, seed=0)
    assert same["diff"] == 0.0 and same["low"] <= 0.0 <= same["high"] and same["n_boot"] == 200

    better = bootstrap_mean_diff(_accuracy, true, weak, strong, n_boot=200, seed=0)
    expected = np.mean([_accuracy(true, p) for p in strong]) - np.mean([_accuracy(true, p) for p in weak])
    assert better["diff"] == pytest.approx(expected)
    assert better["low"] > 0 and better["p_le_0"] == 0.0
    assert better["low"] < better["diff"] < better["high"]

    # Reversed arms mirror the sign.
    worse = bootstrap_mean_diff(_accuracy, true, strong, weak, n_boot=200, seed=0)
    assert worse["high"] < 0 and worse["p_le_0"] == 1.0


def test_bootstrap_mean_diff_drops_undefined_replicates_and_rejects_bad_shapes():
    true = np.array([0, 1, 1, 1, 1])
    pred = [true.copy()]

    def recall0(t, p):
        return class_scores(t, p, [0])[0]["recall"]

    r = bootstrap_mean_diff(recall0, true, pred, pred, n_boot=200, seed=0)
    assert r["diff"] == 0.0 and 0 < r["n_boot"] < 200

    with pytest.raises(DiffMixError, match=r"preds_b\[1\]"):
        bootstrap_mean_diff(_accuracy, true, pred, [true, true[:4]])
    with pytest.raises(DiffMixError, match="non-empty"):
        bootstrap_mean_diff(_accuracy, true, [], pred)


# --- binomial_ci ----------------------------------------------------------------------------


def test_binomial_ci_wilson():
    low, high = binomial_ci(50, 100)
    assert low < 0.5 < high
    # Reference values of the 95% Wilson interval for 50/100.
    assert (low, high) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert binomial_ci(0, 0) == (None, None)
    low, high = binomial_ci(0, 10)
    assert low == 0.0 and 0 < high < 0.35
    low, high = binomial_ci(10, 10)
    assert high == 1.0 and 0.65 < low < 1
    assert binomial_ci(50, 100, level=0.99)[0] < binomial_ci(50, 100)[0]
    with pytest.raises(DiffMixError, match="k <= n"):
        binomial_ci(5, 3)
