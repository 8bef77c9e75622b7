"""Datasets whose labels already hold the merged classes (--labels_merged auto|yes|no).

Hand-made label files in both forms: raw CoNSeP ids 1..7 vs merged 1..4, raw GLySAC 1..10 vs
merged 1..3. A merged dataset read as raw would be merged a second time (CoNSeP spindle 4 ->
epithelial 3), silently.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from data_helpers import write_image, write_mat
from guided_diffusion.data.classes import CONSEP, GLYSAC, identity_table
from guided_diffusion.data.readers import read_dataset, resolve_labels_form
from guided_diffusion.data.stats import dataset_statistics
from guided_diffusion.infra.errors import DiffMixError
from guided_diffusion.metrics import evaluate_folders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nuclei(types, size=32):
    """(inst, type) int32 [size, size]: one 3x3 nucleus per entry of ``types`` on a grid, ids 1..N."""
    inst = np.zeros((size, size), np.int32)
    tmap = np.zeros((size, size), np.int32)
    for k, t in enumerate(types):
        r, c = 2 + 5 * (k // 6), 2 + 5 * (k % 6)
        inst[r : r + 3, c : c + 3] = k + 1
        tmap[r : r + 3, c : c + 3] = t
    return inst, tmap


def write_dataset(root, per_image_types):
    """A dataset root with Train/Images/*.png and Train/Labels/*.mat, one image per type list."""
    for i, types in enumerate(per_image_types):
        inst, tmap = nuclei(types)
        stem = f"img{i}"
        write_image(os.path.join(root, "Train", "Images", stem + ".png"), np.full((32, 32, 3), 128, np.uint8))
        write_mat(os.path.join(root, "Train", "Labels", stem + ".mat"), inst_map=inst, type_map=tmap)
    return str(root)


def class_counts(samples, num_classes):
    counts = np.zeros(num_classes, int)
    for s in samples:
        for i in np.unique(s.inst_map[s.inst_map > 0]):
            counts[int(np.bincount(s.type_map[s.inst_map == i]).argmax())] += 1
    return counts.tolist()


RAW_CONSEP = [[1, 2, 3, 4, 5], [6, 7, 2, 2]]  # raw ids: 5..7 present
# The same kind of data, merged: 4 = spindle; 35 spindle nuclei (>= MERGED_EVIDENCE) and no 5..7.
MERGED_CONSEP = [[1, 2, 3] + [4] * 20, [4] * 15 + [2, 2]]


def test_raw_consep_is_merged_once(tmp_path, capsys):
    root = write_dataset(tmp_path / "raw", RAW_CONSEP)
    samples = read_dataset(root, CONSEP, progress=False)
    # raw 1 other, 2 inflammatory x3, 3+4 epithelial, 5+6+7 spindle
    assert class_counts(samples, 5) == [0, 1, 3, 2, 3]
    assert "note:" not in capsys.readouterr().err


def test_merged_consep_auto_reads_as_merged_with_one_line_notice(tmp_path, capsys):
    root = write_dataset(tmp_path / "merged", MERGED_CONSEP)
    samples = read_dataset(root, CONSEP, progress=False)
    assert class_counts(samples, 5) == [0, 1, 3, 1, 35]  # spindle kept as spindle
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note:") and "already-merged consep" in err[0]
    assert "--labels_merged no" in err[0]
    # "no" forces the raw reading: merged 4 (spindle) becomes 3 (epithelial) -- the old silent bug.
    forced = read_dataset(root, CONSEP, progress=False, labels_merged="no")
    assert class_counts(forced, 5) == [0, 1, 3, 36, 0]
    # "yes" on raw data: ids 5..7 do not fit the merged classes, an error naming the file and flag.
    raw = write_dataset(tmp_path / "raw", RAW_CONSEP)
    with pytest.raises(DiffMixError, match=r"img0\.mat.*\[5\].*--labels_merged"):
        read_dataset(raw, CONSEP, progress=False, labels_merged="yes")
    with pytest.raises(DiffMixError, match="--labels_merged 'maybe'"):
        read_dataset(raw, CONSEP, progress=False, labels_merged="maybe")


def test_glysac_raw_and_merged(tmp_path, capsys):
    raw = write_dataset(tmp_path / "raw", [[1, 2, 3, 4, 9, 10], [5, 8]])
    merged = write_dataset(tmp_path / "merged", [[1, 3] + [2] * 20, [2] * 12 + [3]])
    assert class_counts(read_dataset(raw, GLYSAC, progress=False), 4) == [0, 4, 2, 2]  # {1,2,9,10} {4,5} {3,8}
    assert capsys.readouterr().err == ""
    # Merged GLySAC: 2 = epithelial; read as raw, 2 would become 1 (other).
    assert class_counts(read_dataset(merged, GLYSAC, progress=False), 4) == [0, 1, 32, 2]
    assert "already-merged glysac" in capsys.readouterr().err
    assert class_counts(read_dataset(merged, GLYSAC, progress=False, labels_merged="no"), 4) == [0, 33, 0, 2]


def test_form_rule_and_undecidable_cases(tmp_path, capsys):
    # Ids where both readings agree (CoNSeP 1..3) need no decision: the raw table is kept.
    assert CONSEP.label_form({0: 9, 1: 5, 2: 5, 3: 5}) == "same"
    assert CONSEP.label_form({1: 3, 4: 30}) == "merged" and CONSEP.label_form({4: 300, 5: 1}) == "raw"
    assert CONSEP.label_form({1: 3, 4: 29}) == "unsure"
    assert GLYSAC.label_form({1: 9, 3: 9}) == "same" and GLYSAC.label_form({2: 40}) == "merged"
    # Too few nuclei to tell (a tiny raw subset without 5..7 looks merged): read as raw, with a note.
    few = write_dataset(tmp_path / "few", [[1, 3, 4, 4]])
    assert class_counts(read_dataset(few, CONSEP, progress=False), 5) == [0, 1, 0, 3, 0]
    assert "too few nuclei" in capsys.readouterr().err
    root = write_dataset(tmp_path / "low", [[1, 2, 3]])
    paths = [os.path.join(root, "Train", "Labels", "img0.mat")]
    assert resolve_labels_form(CONSEP, paths) is CONSEP
    # Custom tables are not guessed about; identity tables have nothing to decide.
    custom = identity_table(5)
    assert resolve_labels_form(custom, paths) is custom
    merged = CONSEP.as_merged()
    assert merged.labels_merged and merged.names == CONSEP.names and merged.to_json()["labels_merged"]


def test_marked_gradmix_maps_do_not_vote(tmp_path):
    # A GradMix map (classes_merged=1) is self-describing and never merged again, whatever the mode.
    inst, tmap = nuclei([1, 4, 4])
    path = str(tmp_path / "a__balance000.mat")
    write_mat(path, inst_map=inst, type_map=tmap, classes_merged=np.array(1), num_classes=np.array(5))
    assert resolve_labels_form(CONSEP, [path]) is CONSEP


def test_statistics_of_merged_dataset(tmp_path, capsys):
    root = write_dataset(tmp_path / "merged", MERGED_CONSEP)
    stats = dataset_statistics(data_dir=root, dataset_mode="consep", progress=False)
    assert stats.counts[4] == 35 and stats.counts[3] == 1


def test_evaluation_ground_truth_already_merged(tmp_path, capsys):
    # An already-merged ground truth (no classes_merged mark) against the same predictions scores 1.
    true_dir, pred_dir = tmp_path / "true", tmp_path / "pred"
    inst, tmap = nuclei([1, 2, 3] + [4] * 30)
    write_mat(str(true_dir / "a.mat"), inst_map=inst, type_map=tmap)
    write_mat(str(pred_dir / "a.mat"), inst_map=inst, type_map=tmap)
    res = evaluate_folders(str(true_dir), str(pred_dir), progress=False, class_table=CONSEP)
    assert res["classification"]["type_accuracy"] == 1.0
    assert res["settings"]["class_table"]["labels_merged"] is True
    assert "already-merged consep" in capsys.readouterr().err
    res = evaluate_folders(str(true_dir), str(pred_dir), progress=False, class_table=CONSEP, labels_merged="no")
    assert res["classification"]["f1_type"][4] == 0.0  # the double merge, when asked for explicitly


def test_dataset_stats_cli_flag(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("dataset_stats_cli", os.path.join(REPO, "scripts", "dataset_stats.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    root = write_dataset(tmp_path / "merged", MERGED_CONSEP)
    cli.main(["--data_dir", root, "--dataset_mode", "consep", "--out_dir", str(tmp_path / "s1")])
    out = capsys.readouterr()
    spindle = [line for line in out.out.splitlines() if line.startswith("spindle")][0]
    assert spindle.split()[1] == "35" and "note:" in out.err
    cli.main(["--data_dir", root, "--dataset_mode", "consep", "--labels_merged", "no", "--out_dir", str(tmp_path / "s2")])
    spindle = [line for line in capsys.readouterr().out.splitlines() if line.startswith("spindle")][0]
    assert spindle.split()[1] == "0"
