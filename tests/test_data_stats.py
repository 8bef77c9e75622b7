"""Statistics: exact counts/areas/fractions on hand-made maps, CSV/PNG outputs, the CLI."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from guided_diffusion.data.classes import CONSEP
from guided_diffusion.data.labels import write_label_mat
from guided_diffusion.data.stats import (
    dataset_statistics,
    label_dir_statistics,
    label_statistics,
    write_comparison,
    write_statistics,
)
from guided_diffusion.data.toy import make_toy_dataset
from guided_diffusion.infra.errors import DiffMixError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def _maps():
    inst = np.zeros((10, 10), np.int32)
    types = np.zeros((10, 10), np.int32)
    inst[0:2, 0:2], types[0:2, 0:2] = 5, 1  # area 4, class 1
    inst[5:8, 5:8], types[5:8, 5:8] = 9, 2  # area 9, class 2
    inst[0:1, 5:10], types[0:1, 5:10] = 3, 2  # area 5, class 2
    return inst, types


def test_counts_areas_fractions_by_hand():
    stats = label_statistics([_maps(), _maps()], num_classes=4)
    assert stats.counts.tolist() == [0, 2, 4, 0]
    assert sorted(stats.areas[2]) == [5, 5, 9, 9] and stats.areas[1] == [4, 4]
    assert np.allclose(stats.pixel_fractions, [82 / 100, 4 / 100, 14 / 100, 0])
    rows = {r["class_name"]: r for r in stats.rows()}
    assert rows["class2"]["area_mean"] == 7.0 and rows["class2"]["area_q50"] == 7.0
    assert rows["class1"]["nuclei_share"] == pytest.approx(1 / 3, abs=1e-6)
    assert rows["class3"]["area_mean"] == ""  # no nuclei: empty, not NaN


def test_label_files_merged_once(tmp_path):
    inst, types = _maps()
    raw = types.copy()
    raw[types == 2] = 7  # raw CoNSeP 7 -> spindle (4)
    write_label_mat(str(tmp_path / "Labels" / "a.mat"), inst, raw)
    merged = types.copy()
    merged[types == 2] = 4
    write_label_mat(
        str(tmp_path / "Labels" / "a__balance000.mat"), inst, merged, classes_merged=np.array(1), num_classes=np.array(5)
    )
    stats = label_dir_statistics(str(tmp_path), CONSEP)
    assert stats.num_maps == 2 and stats.counts.tolist() == [0, 2, 0, 0, 4]


def test_outputs(tmp_path):
    stats = label_statistics([_maps()], num_classes=4)
    csv_path, png_path = write_statistics(stats, str(tmp_path), "s")
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["nuclei"] for r in rows] == ["0", "1", "2", "0"]
    assert Path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    c, p = write_comparison([0, 10, 2], [0, 10, 8], str(tmp_path), class_names=["bg", "major", "minor"])
    rows = list(csv.DictReader(open(c)))
    assert rows == [
        {"class_id": "1", "class_name": "major", "before": "10", "after": "10", "before_share": "0.833333", "after_share": "0.555556"},
        {"class_id": "2", "class_name": "minor", "before": "2", "after": "8", "before_share": "0.166667", "after_share": "0.444444"},
    ]
    assert Path(p).stat().st_size > 1000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_dataset_statistics_and_cli(tmp_path, capsys):
    import dataset_stats

    root = tmp_path / "toy"
    make_toy_dataset(str(root), num_train=2, num_test=1, size=96, seed=0, progress=False)
    stats = dataset_statistics(data_dir=str(root), dataset_mode="consep", progress=False)
    assert stats.num_maps == 2 and stats.counts[1:].sum() > 5 and len(stats.class_names) == 5
    out = tmp_path / "out"
    dataset_stats.main(["--data_dir", str(root), "--out_dir", str(out)])
    dataset_stats.main(["--label_dir", str(root / "Test"), "--before_dir", str(root), "--out_dir", str(out)])
    printed = capsys.readouterr().out
    assert "epithelial" in printed and "balance.csv" in printed
    for name in ("dataset_stats.csv", "dataset_stats.png", "label_stats.csv", "balance.csv", "balance.png", "stats_settings.json"):
        assert (out / name).exists(), name
    # --data_dir with --label_dir used to ignore one of them silently; --before_dir needs --label_dir.
    with pytest.raises(DiffMixError, match="exactly one of --data_dir"):
        dataset_stats.main(["--data_dir", str(root), "--label_dir", str(root / "Test"), "--out_dir", str(out)])
    with pytest.raises(DiffMixError, match="--before_dir needs --label_dir"):
        dataset_stats.main(["--data_dir", str(root), "--before_dir", str(root), "--out_dir", str(out)])


def test_gradmix_label_dir_counts_complete_maps_only(tmp_path, capsys):
    """A GradMix map whose record is missing (a run stopped midway) is left out and reported."""
    import dataset_stats

    inst, types = _maps()
    merged = dict(classes_merged=np.array(1), num_classes=np.array(5))
    for name in ("a__balance000", "b__balance000"):
        write_label_mat(str(tmp_path / "Labels" / f"{name}.mat"), inst, types, **merged)
    (tmp_path / "Records").mkdir()
    (tmp_path / "Records" / "a__balance000.json").write_text("{}")
    for label_dir in (tmp_path, tmp_path / "Labels"):  # the out_dir or its Labels/ folder
        stats = label_dir_statistics(str(label_dir), CONSEP)
        assert stats.num_maps == 1 and stats.counts.tolist() == [0, 1, 2, 0, 0]
        assert [Path(p).name for p in stats.incomplete] == ["b__balance000.mat"]
    dataset_stats.main(["--label_dir", str(tmp_path), "--out_dir", str(tmp_path / "out")])
    assert "skipped 1 incomplete GradMix map " in capsys.readouterr().out
    (tmp_path / "Records" / "a__balance000.json").unlink()
    with pytest.raises(DiffMixError, match="no .mat label maps \\(2 incomplete"):
        label_dir_statistics(str(tmp_path), CONSEP)
