"""Toy generator: determinism, class imbalance and visible class differences, dataset layout, CLI."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from guided_diffusion.data.classes import CONSEP
from guided_diffusion.data.condition import instance_edges
from guided_diffusion.data.labels import instance_table
from guided_diffusion.data.readers import read_dataset
from guided_diffusion.data.toy import ToyConfig, make_toy_dataset, make_toy_tile
from guided_diffusion.infra.errors import DiffMixError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))


@pytest.fixture(scope="module")
def tile():
    return make_toy_tile(400, seed=11)



def class_shares(type_maps, inst_maps) -> np.ndarray:
    """Share of nuclei per merged toy class (other, inflammatory, epithelial, spindle) -> float [4]."""
    counts = np.zeros(5, np.int64)
    for t, i in zip(type_maps, inst_maps):
        _, raw, _ = instance_table(i, t)
        counts += np.bincount(np.asarray(CONSEP.lut)[raw], minlength=5)
    return counts[1:] / max(1, counts[1:].sum())

def test_same_seed_same_arrays_different_seed_differs(tile):
    again = make_toy_tile(400, seed=11)
    assert all(np.array_equal(a, b) for a, b in zip(tile, again))
    other = make_toy_tile(400, seed=12)
    assert not np.array_equal(tile[0], other[0]) and not np.array_equal(tile[1], other[1])


def test_tile_layout_and_raw_consep_ids(tile):
    image, inst, types = tile
    assert image.shape == (400, 400, 3) and image.dtype == np.uint8
    assert inst.dtype == np.int32 and types.dtype == np.int32
    assert set(np.unique(types)) <= set(range(8)) and {3, 4} <= set(np.unique(types))
    assert np.array_equal(inst > 0, types > 0)
    # H&E gamut: background pink/purple (green lowest), nuclei darker than stroma
    assert image[..., 1].mean() < image[..., 0].mean() and image[..., 1].mean() < image[..., 2].mean()
    assert image[inst > 0].mean() < image[inst == 0].mean() - 30


def test_classes_differ_in_size_and_darkness(tile):
    image, inst, types = tile
    ids, raw, _ = instance_table(inst, types)
    merged = np.asarray(CONSEP.lut)[raw]
    areas = np.bincount(np.searchsorted(ids, inst[inst > 0]), minlength=ids.size)
    grey = image.mean(-1)
    dark = np.bincount(np.searchsorted(ids, inst[inst > 0]), weights=grey[inst > 0], minlength=ids.size) / areas
    area_of = {c: np.median(areas[merged == c]) for c in (2, 3, 4)}
    assert area_of[3] > 2 * area_of[2]  # epithelial nuclei are large, inflammatory small
    assert dark[merged == 2].mean() < dark[merged == 3].mean() - 15  # inflammatory darker than epithelial
    # touching/overlapping nuclei exist: some edge pixel separates two different nuclei
    edges = instance_edges(__import__("torch").from_numpy(inst)).numpy()
    right = np.zeros_like(inst)
    right[:, :-1] = inst[:, 1:]
    assert np.any(edges & (inst > 0) & (right > 0) & (right != inst))


def test_class_imbalance_default_and_configurable():
    tiles = [make_toy_tile(320, seed=s) for s in range(4)]
    shares = class_shares([t[2] for t in tiles], [t[1] for t in tiles])
    assert 0 < shares[0] < 0.08  # "other" is rare (a few %)
    assert shares[2] == shares.max()  # epithelial the majority
    flat = [make_toy_tile(320, seed=s, config=ToyConfig(class_probs=(1, 1, 1, 1))) for s in range(2)]
    assert class_shares([t[2] for t in flat], [t[1] for t in flat])[0] > 0.12


def test_dataset_is_readable_and_records_settings(tmp_path):
    rec = make_toy_dataset(str(tmp_path), num_train=2, num_test=1, size=64, seed=4, progress=False)
    info = json.loads((tmp_path / "toy_dataset.json").read_text())
    assert info["seed"] == 4 and info["files"] == rec["files"] and info["config"]["density"] == ToyConfig().density
    train = read_dataset(str(tmp_path), CONSEP, progress=False)
    test = read_dataset(str(tmp_path), CONSEP, split="Test", progress=False)
    assert [s.files.stem for s in train] == ["toy_train_000", "toy_train_001"] and len(test) == 1
    assert max(int(s.type_map.max()) for s in train + test) <= 4
    # adding tiles leaves the existing ones unchanged
    more = tmp_path / "more"
    make_toy_dataset(str(more), num_train=3, num_test=0, size=64, seed=4, progress=False)
    assert (more / "Train/Images/toy_train_001.png").read_bytes() == (tmp_path / "Train/Images/toy_train_001.png").read_bytes()


def test_make_toy_cli(tmp_path, capsys):
    import make_toy

    make_toy.main(["--root", str(tmp_path), "--num_train", "1", "--num_test", "1", "--size", "48"])
    assert (tmp_path / "Train/Labels/toy_train_000.mat").exists()
    assert "wrote 2 toy tiles" in capsys.readouterr().out
    make_toy.main(["--root", str(tmp_path), "--num_train", "1", "--num_test", "1", "--size", "48"])
    assert "already holds these 2 toy tiles" in capsys.readouterr().out
    with pytest.raises(DiffMixError, match="other settings"):
        make_toy.main(["--root", str(tmp_path), "--num_train", "1", "--num_test", "1", "--size", "64"])
    with pytest.raises(Exception, match="class_probs"):
        make_toy.main(["--root", str(tmp_path), "--class_probs", "1,2"])


def test_existing_root_refused_unless_same_complete_dataset(tmp_path):
    root = tmp_path / "toy"
    rec = make_toy_dataset(str(root), num_train=2, num_test=0, size=32, seed=1, progress=False)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    # Same settings, complete: a no-op returning the record (nothing rewritten).
    assert make_toy_dataset(str(root), num_train=2, num_test=0, size=32, seed=1, progress=False) == rec
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    # Other settings (the old bug: 48 px tiles written over 32 px ones, stale tiles kept).
    with pytest.raises(DiffMixError, match=r"toy: its toy_dataset.json records other settings \(num_train, size"):
        make_toy_dataset(str(root), num_train=1, num_test=0, size=48, seed=1, progress=False)
    with pytest.raises(DiffMixError, match="Choose a new --root or delete"):
        make_toy_dataset(str(root), num_train=2, num_test=0, size=32, seed=2, progress=False)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before  # untouched
    # Same settings but a file lost: refused too (it is not the recorded dataset any more).
    (root / "Train/Labels/toy_train_001.mat").unlink()
    with pytest.raises(DiffMixError, match="1 of its files are missing"):
        make_toy_dataset(str(root), num_train=2, num_test=0, size=32, seed=1, progress=False)
    # Train/ content without a record (an interrupted run or another dataset): refused.
    other = tmp_path / "other"
    (other / "Train" / "Images").mkdir(parents=True)
    with pytest.raises(DiffMixError, match=r"other: it already holds Train/ content but no toy_dataset.json"):
        make_toy_dataset(str(other), num_train=1, num_test=0, size=32, progress=False)
    # An existing but empty root (or empty split folders) is fine.
    empty = tmp_path / "empty"
    (empty / "Test").mkdir(parents=True)
    assert make_toy_dataset(str(empty), num_train=1, num_test=0, size=32, progress=False)["files"] == {
        "Train": ["toy_train_000"]
    }
