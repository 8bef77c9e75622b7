"""Nuclei metrics against hand-computed oracles and a naive per-pair reference on real labels."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from guided_diffusion.data.classes import CONSEP, resolve_class_table
from guided_diffusion.data.labels import write_label_mat
from guided_diffusion.infra import fileio
from guided_diffusion.infra.errors import DiffMixError
from guided_diffusion.metrics import (
    INSTANCE_KEYS,
    evaluate_folders,
    instance_metrics,
    pair_by_centroid,
    read_instance_labels,
    type_metrics,
)

REPO = Path(__file__).resolve().parents[1]


def square(shape=(20, 20), **boxes):
    """Instance map with id k filling box (r0, r1, c0, c1) for each keyword ``i<k>``."""
    inst = np.zeros(shape, np.int32)
    for key, (r0, r1, c0, c1) in boxes.items():
        inst[r0:r1, c0:c1] = int(key[1:])
    return inst


# ---------------------------------------------------------------- instance metrics, by hand


def test_identical_maps_score_one(fixtures_dir):
    inst = fileio.read_mat(str(fixtures_dir / "real_he_patches/masks/patch3.mat"))["inst_map"]
    assert instance_metrics(inst, inst) == {k: 1.0 for k in INSTANCE_KEYS}


def test_shifted_square():
    # True [0:10, 0:10], pred [0:10, 5:15]: intersection 50, union 150.
    true = square(i1=(0, 10, 0, 10))
    pred = square(i9=(0, 10, 5, 15))
    m = instance_metrics(true, pred)
    assert m["aji"] == pytest.approx(1 / 3)
    assert m["aji_plus"] == pytest.approx(1 / 3)
    assert m["dice"] == pytest.approx(0.5)  # 2 * 50 / (100 + 100)
    assert m["dq"] == m["sq"] == m["pq"] == 0.0  # IoU 1/3 is no match


def test_square_split_in_halves():
    # The true 10x10 nucleus is predicted as two 10x5 halves: IoU 0.5 each, not > 0.5.
    true = square(i1=(0, 10, 0, 10))
    pred = square(i3=(0, 10, 0, 5), i7=(0, 10, 5, 10))
    m = instance_metrics(true, pred)
    # AJI: best half gives inter 50 / union 100; the other half (50 px) joins the union.
    assert m["aji"] == pytest.approx(50 / 150)
    assert m["aji_plus"] == pytest.approx(50 / 150)
    assert m["dq"] == 0.0 and m["pq"] == 0.0
    assert m["dice"] == 1.0


def test_merged_prediction_penalised_twice_by_aji_only():
    # Two true halves predicted as one 10x10 nucleus. AJI reuses the prediction for both
    # halves: (50 + 50) / (100 + 100). AJI+ pairs it once: 50 / (100 + 50 unmatched half).
    true = square(i1=(0, 10, 0, 5), i2=(0, 10, 5, 10))
    pred = square(i5=(0, 10, 0, 10))
    m = instance_metrics(true, pred)
    assert m["aji"] == pytest.approx(0.5)
    assert m["aji_plus"] == pytest.approx(1 / 3)


def test_pq_counts_by_hand():
    # A: exact match (IoU 1). B: true 10x10 vs pred 10x8 inside it (IoU 0.8). C: missed.
    # D: a spurious prediction. TP 2, FP 1, FN 1 -> DQ = 2 / 3, SQ = 0.9.
    true = square((40, 40), i1=(0, 10, 0, 10), i2=(20, 30, 0, 10), i3=(0, 10, 25, 35))
    pred = square((40, 40), i4=(0, 10, 0, 10), i5=(20, 30, 0, 8), i6=(30, 38, 30, 38))
    m = instance_metrics(true, pred)
    assert m["dq"] == pytest.approx(2 / 3)
    assert m["sq"] == pytest.approx(0.9)
    assert m["pq"] == pytest.approx(0.6)
    # Dice: overlap 180; |T| 300, |P| 244.
    assert m["dice"] == pytest.approx(2 * 180 / 544)
    # AJI: (100 + 80) / (100 + 100 + 100 [missed] + 64 [spurious]).
    assert m["aji"] == pytest.approx(180 / 364)


@pytest.mark.parametrize(
    "true_empty,pred_empty,expected", [(True, True, 1.0), (False, True, 0.0), (True, False, 0.0)]
)
def test_empty_maps(true_empty, pred_empty, expected):
    full = square(i4=(2, 8, 2, 8))
    empty = np.zeros_like(full)
    m = instance_metrics(empty if true_empty else full, empty if pred_empty else full)
    assert m == {k: expected for k in INSTANCE_KEYS}


def test_bad_maps_raise():
    with pytest.raises(DiffMixError, match="shape"):
        instance_metrics(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(DiffMixError, match="negative"):
        instance_metrics(-np.ones((4, 4), int), np.zeros((4, 4), int))


# ---------------------------------------------------------------- reference on real labels


def naive_metrics(true, pred):
    """Straightforward per-pair-mask version of HoVer-Net's definitions (slow, for checking)."""
    t_ids = [i for i in np.unique(true) if i]
    p_ids = [i for i in np.unique(pred) if i]
    t_masks = [true == i for i in t_ids]
    p_masks = [pred == i for i in p_ids]
    inter = np.array([[np.sum(a & b) for b in p_masks] for a in t_masks], float).reshape(
        len(t_ids), len(p_ids)
    )
    t_area = np.array([m.sum() for m in t_masks], float)
    p_area = np.array([m.sum() for m in p_masks], float)
    union = t_area[:, None] + p_area[None, :] - inter
    score = inter / (union + 1e-6)

    def aji(rows, cols):
        rows, cols = np.asarray(rows, int), np.asarray(cols, int)
        total = union[rows, cols].sum()
        total += t_area[np.setdiff1d(np.arange(len(t_ids)), rows)].sum()
        total += p_area[np.setdiff1d(np.arange(len(p_ids)), cols)].sum()
        return inter[rows, cols].sum() / total

    best = score.argmax(axis=1)
    rows = np.flatnonzero(score.max(axis=1) > 0)
    r, c = linear_sum_assignment(-score)
    keep = score[r, c] > 0
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0)
    tp = int((iou > 0.5).sum())
    dq = tp / (tp + 0.5 * (len(p_ids) - tp) + 0.5 * (len(t_ids) - tp))
    sq = iou[iou > 0.5].sum() / tp
    fg_t, fg_p = true > 0, pred > 0
    return {
        "dice": 2 * np.sum(fg_t & fg_p) / (fg_t.sum() + fg_p.sum()),
        "aji": aji(rows, best[rows]),
        "aji_plus": aji(r[keep], c[keep]),
        "dq": dq,
        "sq": sq,
        "pq": dq * sq,
    }


def perturbed(inst, seed):
    """A plausible 'prediction' from a true map: shifted, some nuclei dropped, two merged,
    one split, one spurious blob. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    pred = np.roll(inst, shift=tuple(rng.integers(-3, 4, size=2)), axis=(0, 1)).astype(np.int64)
    ids = [i for i in np.unique(pred) if i]
    for i in rng.choice(ids, size=3, replace=False):
        pred[pred == i] = 0
    a, b = rng.choice([i for i in np.unique(pred) if i], size=2, replace=False)
    pred[pred == b] = a
    c = rng.choice([i for i in np.unique(pred) if i and i != a])
    ys, xs = np.nonzero(pred == c)
    pred[ys[xs > np.median(xs)], xs[xs > np.median(xs)]] = 10_000
    pred[0:6, 0:6] = 20_000
    return pred


@pytest.mark.parametrize("name", ["patch1", "patch2", "patch3"])
def test_matches_naive_reference_on_real_labels(fixtures_dir, name):
    true = fileio.read_mat(str(fixtures_dir / f"real_he_patches/masks/{name}.mat"))["inst_map"]
    for seed in range(2):
        pred = perturbed(true, seed)
        fast, slow = instance_metrics(true, pred), naive_metrics(true, pred)
        for key in INSTANCE_KEYS:
            assert fast[key] == pytest.approx(slow[key], rel=1e-12, abs=1e-12), (name, seed, key)
        assert 0 < fast["pq"] < 1 and fast["aji_plus"] >= fast["aji"]


def test_sparse_paths_agree_with_dense(fixtures_dir, monkeypatch):
    # Huge ids (no lookup table) and a forced sparse joint histogram give the same numbers.
    import guided_diffusion.metrics.scores as metrics

    true = fileio.read_mat(str(fixtures_dir / "real_he_patches/masks/patch2.mat"))["inst_map"]
    pred = perturbed(true, 5)
    dense = instance_metrics(true, pred)
    monkeypatch.setattr(metrics, "_DENSE_JOINT_LIMIT", 0)
    big_true = np.where(true > 0, true.astype(np.int64) + 10**12, 0)
    big_pred = np.where(pred > 0, pred * 7 + 10**12, 0)
    assert instance_metrics(big_true, big_pred) == pytest.approx(dense, rel=1e-15)


# ---------------------------------------------------------------- pairing and classification


def test_centroid_radius_is_inclusive():
    paired, un_t, un_p = pair_by_centroid([[0.0, 0.0]], [[12.0, 0.0]], radius=12)
    assert paired.tolist() == [[0, 0]] and un_t.size == 0 and un_p.size == 0
    paired, un_t, un_p = pair_by_centroid([[0.0, 0.0]], [[0.0, 12.01]], radius=12)
    assert paired.shape == (0, 2) and un_t.tolist() == [0] and un_p.tolist() == [0]


def test_centroid_pairing_is_one_to_one_and_optimal():
    # Greedy nearest-first would pair pred 0 with true 1 (distance 1) and leave true 0
    # unpaired; the assignment pairs both within the radius.
    true_xy = [[0.0, 0.0], [10.0, 0.0]]
    pred_xy = [[9.0, 0.0], [19.0, 0.0]]
    paired, un_t, un_p = pair_by_centroid(true_xy, pred_xy, radius=12)
    assert paired.tolist() == [[0, 0], [1, 1]]
    paired, un_t, un_p = pair_by_centroid(np.zeros((0, 2)), pred_xy, radius=12)
    assert paired.shape == (0, 2) and un_p.tolist() == [0, 1]
    with pytest.raises(DiffMixError, match="radius"):
        pair_by_centroid(true_xy, pred_xy, radius=0)


def test_type_metrics_worked_example():
    # Pairs (true, pred): (1,1) (1,1) (1,2) (2,2) (2,1) (3,3); unpaired true [1, 3];
    # unpaired pred [2, 2, 3].
    pt, pp = [1, 1, 1, 2, 2, 3], [1, 1, 2, 2, 1, 3]
    m = type_metrics(pt, pp, [1, 3], [2, 2, 3])
    assert m["f1_detection"] == pytest.approx(12 / 17)  # 2*6 / (2*6 + 3 + 2)
    assert m["type_accuracy"] == pytest.approx(4 / 6)
    # Class 1: TP 2, FP 1 (2->1), FN 1 (1->2), FP_d 0, FN_d 1: 4 / (4 + 2 + 2 + 0 + 1).
    # Class 2: TP 1, FP 1, FN 1, FP_d 2, FN_d 0: 2 / (2 + 2 + 2 + 2).
    # Class 3: TP 1, FP 0, FN 0, FP_d 1, FN_d 1: 2 / (2 + 1 + 1).
    assert m["f1_type"] == pytest.approx({1: 4 / 9, 2: 1 / 4, 3: 1 / 2})
    assert m["counts"]["per_class"][2] == {"tp": 1, "fp": 1, "fn": 1, "fp_d": 2, "fn_d": 0}
    # A class seen nowhere is undefined, not NaN; no nuclei at all: everything undefined.
    assert type_metrics(pt, pp, [1, 3], [2, 2, 3], classes=[4])["f1_type"] == {4: None}
    empty = type_metrics([], [], [], [])
    assert empty["f1_detection"] is None and empty["type_accuracy"] is None


# ---------------------------------------------------------------- folders and CLI


def blob_map(centres, types, shape=(64, 64)):
    """Label maps with a 5x5 nucleus centred at each (x, y) centre, ids 1..N."""
    inst = np.zeros(shape, np.int32)
    type_map = np.zeros(shape, np.int32)
    for k, ((x, y), t) in enumerate(zip(centres, types), start=1):
        inst[y - 2 : y + 3, x - 2 : x + 3] = k
        type_map[y - 2 : y + 3, x - 2 : x + 3] = t
    return inst, type_map


CENTRES = [(5, 5), (20, 5), (35, 5), (50, 50)]


def make_worked_folders(tmp_path):
    """The worked type example spread over two images, plus an image with no nuclei at all."""
    true_dir, pred_dir = tmp_path / "true", tmp_path / "pred"
    zeros = np.zeros((64, 64), np.int32)
    # Image a: pairs (1,1) (1,1) (1,2), unpaired true of type 1, unpaired pred of type 2.
    write_label_mat(str(true_dir / "a.mat"), *blob_map(CENTRES, [1, 1, 1, 1]))
    pred_a = blob_map([(5, 6), (21, 5), (35, 5), (5, 50)], [1, 1, 2, 2])
    write_label_mat(str(pred_dir / "a.mat"), *pred_a)
    # Image b: pairs (2,2) (2,1) (3,3), unpaired true type 3, unpaired preds of types 2 and 3,
    # given to the reader as a HoVer-Net [H, W, 5] array (RGB, instance, type).
    write_label_mat(str(true_dir / "b.mat"), *blob_map(CENTRES, [2, 2, 3, 3]))
    inst, types = blob_map([(5, 5), (20, 5), (35, 5), (5, 50), (30, 30)], [2, 1, 3, 2, 3])
    rgb = np.zeros(inst.shape + (3,), np.int32)
    fileio.write_npy(str(pred_dir / "b.npy"), np.dstack([rgb, inst, types]))
    write_label_mat(str(true_dir / "c.mat"), zeros, zeros)
    write_label_mat(str(pred_dir / "c.mat"), zeros, zeros)
    return true_dir, pred_dir


def test_evaluate_folders_worked_example(tmp_path):
    true_dir, pred_dir = make_worked_folders(tmp_path)
    res = evaluate_folders(str(true_dir), str(pred_dir), num_classes=4, progress=False)
    cls = res["classification"]
    assert cls["f1_detection"] == pytest.approx(12 / 17)
    assert cls["type_accuracy"] == pytest.approx(4 / 6)
    assert cls["f1_type"] == pytest.approx({1: 4 / 9, 2: 1 / 4, 3: 1 / 2})
    rows = {r["name"]: r for r in res["per_image"]}
    assert rows["c"]["pq"] == 1.0 and rows["c"]["n_true"] == 0  # empty vs empty
    # Image a: three 5x5 pairs with IoU 20/30, 20/30 and 1 (all PQ matches), one missed
    # and one spurious nucleus: DQ 3 / (3 + 0.5 + 0.5), SQ (2/3 + 2/3 + 1) / 3.
    assert (rows["a"]["pq_tp"], rows["a"]["pq_fp"], rows["a"]["pq_fn"]) == (3, 1, 1)
    assert rows["a"]["pq"] == pytest.approx(0.75 * (7 / 9))
    assert rows["a"]["det_tp"] == 3
    assert res["instance"]["pq"] == pytest.approx(np.mean([r["pq"] for r in res["per_image"]]))



def test_evaluate_labels_over_arrays_equals_the_folder_evaluation(tmp_path):
    """The worked example held in memory: the same scores with no files, and shape mismatches named."""
    from guided_diffusion.metrics import evaluate_labels, labels_from_maps

    zeros = np.zeros((64, 64), np.int32)
    pairs = [
        ("a", labels_from_maps(*blob_map(CENTRES, [1, 1, 1, 1]), "a"),
         labels_from_maps(*blob_map([(5, 6), (21, 5), (35, 5), (5, 50)], [1, 1, 2, 2]), "a pred")),
        ("b", labels_from_maps(*blob_map(CENTRES, [2, 2, 3, 3]), "b"),
         labels_from_maps(*blob_map([(5, 5), (20, 5), (35, 5), (5, 50), (30, 30)], [2, 1, 3, 2, 3]), "b pred")),
        ("c", labels_from_maps(zeros, zeros, "c"), labels_from_maps(zeros, zeros, "c pred")),
    ]
    res = evaluate_labels(iter(pairs), num_classes=4)
    folders = evaluate_folders(*map(str, make_worked_folders(tmp_path)), num_classes=4, progress=False)
    assert res["classification"] == folders["classification"]
    assert res["per_image"] == folders["per_image"] and res["instance"] == folders["instance"]
    assert "true_dir" not in res["settings"] and folders["settings"]["n_images"] == res["settings"]["n_images"] == 3
    # Detection only without types; a shape mismatch names the predicted map.
    assert evaluate_labels([("a", labels_from_maps(pairs[0][1].inst_map, None), pairs[0][2])])["classification"]["f1_type"] == {}
    with pytest.raises(DiffMixError, match="a pred: shape"):
        evaluate_labels([("a", labels_from_maps(np.zeros((8, 8), np.int32), None, "a"), pairs[0][2])])
    with pytest.raises(DiffMixError, match="nothing to evaluate"):
        evaluate_labels([])


def test_evaluate_folders_scores_predictions_held_in_memory_as_their_files(tmp_path):
    """A caller that just wrote its predictions passes them in memory: same scores, same pairing check."""
    from guided_diffusion.metrics import labels_from_maps

    true_dir, pred_dir = make_worked_folders(tmp_path)
    held = {"a": labels_from_maps(*blob_map([(5, 6), (21, 5), (35, 5), (5, 50)], [1, 1, 2, 2]), "a pred"),
            "b": labels_from_maps(*blob_map([(5, 5), (20, 5), (35, 5), (5, 50), (30, 30)], [2, 1, 3, 2, 3]), "b pred"),
            "c": labels_from_maps(np.zeros((64, 64), np.int32), np.zeros((64, 64), np.int32), "c pred")}
    files = evaluate_folders(str(true_dir), str(pred_dir), num_classes=4, progress=False)
    memory = evaluate_folders(str(true_dir), str(pred_dir), num_classes=4, progress=False, predictions=held)
    assert memory == files
    os.remove(pred_dir / "c.mat")
    with pytest.raises(DiffMixError, match="do not pair up"):
        evaluate_folders(str(true_dir), str(pred_dir), num_classes=4, progress=False, predictions=held)


def load_cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_json_and_csv(tmp_path, capsys):
    true_dir, pred_dir = make_worked_folders(tmp_path)
    out = tmp_path / "eval"
    load_cli().main(
        ["--true_dir", str(true_dir), "--pred_dir", str(pred_dir), "--out_dir", str(out),
         "--radius", "12", "--num_classes", "4", "--no_progress"]
    )
    printed = capsys.readouterr().out
    assert "AJI+" in printed and "F1_3" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["radius"] == 12.0 and report["settings"]["n_images"] == 3
    assert report["classification"]["f1_type"]["2"] == pytest.approx(0.25)
    with open(out / "metrics_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    with open(out / "metrics_summary.csv") as f:
        summary = {r["metric"]: r["value"] for r in csv.DictReader(f)}
    assert float(summary["f1_detection"]) == pytest.approx(12 / 17)
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json", "metrics_per_image.csv", "metrics_summary.csv"
    ]  # no temporary files left


def test_cli_reports_unpaired_files_without_traceback(tmp_path):
    true_dir, pred_dir = make_worked_folders(tmp_path)
    (pred_dir / "c.mat").unlink()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--true_dir", str(true_dir),
         "--pred_dir", str(pred_dir)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert str(true_dir) in proc.stderr and str(pred_dir) in proc.stderr
    assert "1 only in true_dir: c" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reader_checks_and_stored_keys(tmp_path):
    inst, types = blob_map([(5, 5), (20, 20)], [1, 2])
    # Stored inst_type/inst_centroid (HoVer-Net output files, no type_map) are used as given.
    path = str(tmp_path / "hv.mat")
    fileio.write_mat(path, {"inst_map": inst, "inst_type": np.array([[3], [1]]),
                            "inst_centroid": np.array([[5.0, 5.0], [20.0, 20.0]])})
    label = read_instance_labels(path)
    assert label.types.tolist() == [3, 1] and label.centroids.shape == (2, 2)
    fileio.write_mat(path, {"inst_map": inst, "inst_type": np.array([[3]])})
    with pytest.raises(DiffMixError, match="hv.mat.*inst_type has 1 rows"):
        read_instance_labels(path)
    fileio.write_mat(path, {"type_map": types})
    with pytest.raises(DiffMixError, match="hv.mat.*missing key inst_map"):
        read_instance_labels(path)
    bad = str(tmp_path / "bad.npy")
    fileio.write_npy(bad, np.zeros((8, 8, 3), np.int32))
    with pytest.raises(DiffMixError, match="bad.npy.*shape"):
        read_instance_labels(bad)
    # Types beyond num_classes are a user mistake named with the file.
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    write_label_mat(str(tmp_path / "t" / "x.mat"), inst, types)
    write_label_mat(str(tmp_path / "p" / "x.mat"), inst, types * 3)
    with pytest.raises(DiffMixError, match="x.mat.*type 6 outside"):
        evaluate_folders(str(tmp_path / "t"), str(tmp_path / "p"), num_classes=4, progress=False)


# ---------------------------------------------------------------- class merging (dataset_mode)

RAW_CONSEP = [1, 2, 3, 4, 5, 6, 7]  # every raw CoNSeP id once
MERGED_CONSEP = [1, 2, 3, 3, 4, 4, 4]  # HoVer-Net/DiffMix merge of the same nuclei
SEVEN = [(5, 5), (20, 5), (35, 5), (50, 5), (5, 30), (20, 30), (35, 30)]


def make_raw_vs_merged(tmp_path, true_types=RAW_CONSEP, pred_types=MERGED_CONSEP, **extra):
    true_dir, pred_dir = tmp_path / "true", tmp_path / "pred"
    write_label_mat(str(true_dir / "a.mat"), *blob_map(SEVEN, true_types), **extra)
    write_label_mat(str(pred_dir / "a.mat"), *blob_map(SEVEN, pred_types))
    return true_dir, pred_dir


def test_dataset_mode_consep_merges_raw_truth(tmp_path, capsys):
    true_dir, pred_dir = make_raw_vs_merged(tmp_path)
    out = tmp_path / "eval"
    res = load_cli().main(
        ["--true_dir", str(true_dir), "--pred_dir", str(pred_dir), "--out_dir", str(out),
         "--dataset_mode", "consep", "--no_progress"]
    )
    captured = capsys.readouterr()
    cls = res["classification"]
    assert res["instance"] == {k: 1.0 for k in INSTANCE_KEYS}
    assert cls["f1_detection"] == 1.0 and cls["type_accuracy"] == 1.0
    assert cls["f1_type"] == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert cls["f1_type_named"] == {"other": 1.0, "inflammatory": 1.0, "epithelial": 1.0,
                                    "spindle": 1.0}
    assert "F1_inflammatory" in captured.out and "F1_spindle" in captured.out
    assert captured.err == "" and res["warnings"] == []
    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["class_table"]["name"] == "consep"
    assert report["classification"]["f1_type"]["4"] == 1.0  # numeric keys kept in JSON
    with open(out / "metrics_summary.csv") as f:
        summary = {r["metric"]: r["value"] for r in csv.DictReader(f)}
    assert float(summary["f1_type_3_epithelial"]) == 1.0
    # A HoVer-Net .npy truth (no stored inst_type): the raw type map itself is merged.
    (true_dir / "a.mat").unlink()
    inst, types = blob_map(SEVEN, RAW_CONSEP)
    fileio.write_npy(str(true_dir / "a.npy"), np.dstack([inst, types]))
    res = evaluate_folders(str(true_dir), str(pred_dir), progress=False, class_table=CONSEP)
    assert res["classification"]["type_accuracy"] == 1.0


def test_raw_truth_without_dataset_mode_warns(tmp_path, capsys):
    true_dir, pred_dir = make_raw_vs_merged(tmp_path)
    res = evaluate_folders(str(true_dir), str(pred_dir), progress=False)
    err = capsys.readouterr().err
    assert "--dataset_mode consep" in err and "[5, 6, 7]" in err
    assert res["warnings"] and "--dataset_mode consep" in res["warnings"][0]
    # The silently wrong numbers the warning is about: raw 4..7 never match merged 3/4.
    assert res["instance"]["pq"] == 1.0
    assert res["classification"]["type_accuracy"] == pytest.approx(3 / 7)
    # Types in agreement (worked example: 1..3 on both sides) give no warning.
    true_w, pred_w = make_worked_folders(tmp_path / "w")
    assert evaluate_folders(str(true_w), str(pred_w), progress=False)["warnings"] == []
    assert capsys.readouterr().err == ""


def test_truth_marked_merged_is_not_merged_again(tmp_path):
    # A GradMix output: already merged (4 = spindle), marked classes_merged=1. Merging it again
    # would turn spindle (read as raw 4) into epithelial and score spindle F1 0.
    true_dir, pred_dir = make_raw_vs_merged(
        tmp_path, true_types=MERGED_CONSEP,
        classes_merged=np.array(1), num_classes=np.array(5),
    )
    res = evaluate_folders(str(true_dir), str(pred_dir), progress=False, class_table=CONSEP)
    assert res["classification"]["f1_type"] == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert res["classification"]["type_accuracy"] == 1.0
    # A marked file written for another class count is refused, naming it.
    write_label_mat(str(true_dir / "a.mat"), *blob_map(SEVEN, MERGED_CONSEP),
                    classes_merged=np.array(1), num_classes=np.array(4))
    with pytest.raises(DiffMixError, match=r"a\.mat.*num_classes=4"):
        evaluate_folders(str(true_dir), str(pred_dir), progress=False, class_table=CONSEP)


def test_prediction_with_raw_ids_under_table_raises(tmp_path):
    true_dir, pred_dir = make_raw_vs_merged(tmp_path, pred_types=RAW_CONSEP)
    table = resolve_class_table("consep")
    with pytest.raises(DiffMixError, match=r"pred[/\\]a\.mat.*type 7 outside 0\.\.4.*raw dataset ids"):
        evaluate_folders(str(true_dir), str(pred_dir), progress=False, class_table=table)
    # A raw id the table does not know, in the ground truth, is named with its file.
    true_dir, pred_dir = make_raw_vs_merged(tmp_path / "u", true_types=[1, 2, 3, 4, 5, 6, 8])
    with pytest.raises(DiffMixError, match=r"true[/\\]a\.mat.*\[8\]"):
        evaluate_folders(str(true_dir), str(pred_dir), progress=False, class_table=table)
    with pytest.raises(DiffMixError, match="num_classes=4 does not match"):
        evaluate_folders(str(true_dir), str(pred_dir), num_classes=4, progress=False,
                         class_table=table)


# ----------------------------------------------------------------------------- power spectrum


def test_radial_power_finds_a_sinusoid_and_white_noise_is_flat():
    from guided_diffusion.metrics.spectrum import radial_power

    size = 64
    xx = np.arange(size)[None, :].repeat(size, 0)
    wave = np.sin(2 * np.pi * xx / 8.0)[None]  # 8 px wavelength -> radius 64 / 8 = 8
    assert int(np.argmax(radial_power(wave))) == 8
    noise = np.random.default_rng(0).normal(size=(16, size, size, 3))
    p = radial_power(noise)
    assert p.shape == (size // 2,)
    assert 0.8 < p[4:8].mean() / p[16:32].mean() < 1.25


def test_octave_power_ratio_is_one_for_the_same_set_and_low_at_fine_scales_after_a_blur():
    from scipy.ndimage import gaussian_filter

    from guided_diffusion.metrics.spectrum import octave_power_ratio

    real = np.random.default_rng(1).integers(0, 256, size=(6, 64, 64, 3)).astype(np.uint8)
    same = octave_power_ratio(real, real.copy())
    assert same["ratio"] == pytest.approx([1.0] * 5) and same["period_px"][0] == [64, 32] and same["period_px"][-1] == [4, 2]
    blurred = np.stack([gaussian_filter(x.astype(float), (1.0, 1.0, 0)) for x in real])
    r = octave_power_ratio(real, blurred)["ratio"]
    assert r[-1] < 0.05 and 0.8 < r[0] <= 1.0 and r == sorted(r, reverse=True)  # detail lost finest first
    with pytest.raises(ValueError, match=r"differ in size"):
        octave_power_ratio(real, real[:, :32, :32])
    with pytest.raises(ValueError, match=r"synthetic: expected square images"):
        octave_power_ratio(real, real[:, :, :40])
