"""Sampling pipeline: grid coverage, patch contents, GradMix label maps beside real images."""

import os

import numpy as np
import pytest
from data_helpers import write_pair

from guided_diffusion.data.classes import CONSEP
from guided_diffusion.data.labels import instance_ids, write_label_mat
from guided_diffusion.data.patches import grid_starts, patch_grid, sampling_patches
from guided_diffusion.infra.errors import DiffMixError


def test_grid_starts_examples():
    assert grid_starts(100, 32) == [0, 32, 64, 68]  # last window snapped to the edge
    assert grid_starts(96, 32) == [0, 32, 64]
    assert grid_starts(64, 64) == [0]  # image == patch size: one patch
    assert grid_starts(100, 32, stride=24) == [0, 24, 48, 68]
    with pytest.raises(DiffMixError):
        grid_starts(20, 32)
    with pytest.raises(DiffMixError, match="no gaps"):
        grid_starts(100, 32, stride=40)


@pytest.mark.parametrize("h, w, s, stride", [(37, 53, 16, None), (64, 64, 64, None), (50, 41, 13, 7), (90, 33, 32, 31)])
def test_grid_covers_every_pixel(h, w, s, stride):
    covered = np.zeros((h, w), np.int32)
    for y0, x0 in patch_grid(h, w, s, stride):
        assert 0 <= y0 <= h - s and 0 <= x0 <= w - s
        covered[y0 : y0 + s, x0 : x0 + s] += 1
    assert covered.min() >= 1


def test_patches_from_dataset_labels(tmp_path):
    root = str(tmp_path)
    image, inst, types = write_pair(root, "Train", "img_1", h=40, w=56, seed=3)
    patches = sampling_patches(data_dir=root, dataset_mode="consep", image_size=32, progress=False)
    assert len(patches) == 4  # rows [0, 8] x cols [0, 24]
    assert [(p.y0, p.x0) for p in patches] == [(0, 0), (0, 24), (8, 0), (8, 24)]
    merged = CONSEP.merge(types)
    for k, p in enumerate(patches):
        win = (slice(p.y0, p.y0 + 32), slice(p.x0, p.x0 + 32))
        assert p.index == k and p.map_name == "img_1"
        assert p.image.dtype == np.uint8 and np.array_equal(p.image, image[win])
        assert np.array_equal(p.type_map, merged[win]) and p.type_map.dtype == np.int32
        ids = instance_ids(p.inst_map)
        assert ids.tolist() == list(range(1, ids.size + 1))  # contiguous
        assert np.array_equal(p.inst_map > 0, inst[win] > 0)
        assert p.source_image.endswith("img_1.png") and p.label_source.endswith("img_1.mat")
    assert len({p.name for p in patches}) == 4


def test_image_equal_to_patch_size_gives_one_patch(tmp_path):
    write_pair(str(tmp_path), "Test", "sq", h=32, w=32)
    patches = sampling_patches(data_dir=str(tmp_path), dataset_mode="consep", image_size=32, split="Test")
    assert len(patches) == 1 and (patches[0].x0, patches[0].y0) == (0, 0)


def _gradmix_map(path, h, w, value):
    inst = np.zeros((h, w), np.int32)
    inst[2:6, 2:6], inst[10:14, 10:14] = 7, 9
    types = np.where(inst == 7, value, np.where(inst == 9, 3, 0)).astype(np.int32)
    write_label_mat(path, inst, types, classes_merged=np.array(1), num_classes=np.array(5))
    return inst, types


def test_patches_from_gradmix_maps(tmp_path):
    root = str(tmp_path / "data")
    image, _, _ = write_pair(root, "Train", "img_1", h=32, w=32, seed=1)
    write_pair(root, "Train", "img_2", h=32, w=32, seed=2)
    maps = tmp_path / "gradmix" / "Labels"
    os.makedirs(maps)
    _, t_bal = _gradmix_map(str(maps / "img_1__balance000.mat"), 32, 32, value=4)
    _gradmix_map(str(maps / "img_1__enlarge001.mat"), 32, 32, value=1)
    _gradmix_map(str(maps / "img_2__enlarge000.mat"), 32, 32, value=2)
    patches = sampling_patches(
        data_dir=root, dataset_mode="consep", image_size=32, label_dir=str(tmp_path / "gradmix"), progress=False
    )
    assert [p.map_name for p in patches] == ["img_1__balance000", "img_1__enlarge001", "img_2__enlarge000"]
    p = patches[0]
    assert np.array_equal(p.image, image) and p.source_image.endswith("img_1.png")
    assert p.label_source.endswith("img_1__balance000.mat")
    assert np.array_equal(p.type_map, t_bal)  # merged maps are not merged again (4 stays 4)
    assert p.inst_map.max() == 2  # ids 7, 9 renumbered 1, 2
    only = sampling_patches(
        data_dir=root, dataset_mode="consep", image_size=32, label_dir=str(maps), stems=["img_2"], progress=False
    )
    assert [p.map_name for p in only] == ["img_2__enlarge000"]


def test_gradmix_map_errors(tmp_path):
    root = str(tmp_path / "data")
    write_pair(root, "Train", "img_1", h=32, w=32)
    maps = tmp_path / "maps"
    os.makedirs(maps)
    _gradmix_map(str(maps / "img_9__balance000.mat"), 32, 32, value=1)
    with pytest.raises(DiffMixError) as err:
        sampling_patches(data_dir=root, dataset_mode="consep", image_size=32, label_dir=str(maps))
    msg = str(err.value)
    assert "img_9__balance000.mat" in msg and "'img_9'" in msg and os.path.join(root, "Train", "Images") in msg
    os.remove(maps / "img_9__balance000.mat")
    _gradmix_map(str(maps / "img_1_balance000.mat"), 32, 32, value=1)  # single underscore
    with pytest.raises(DiffMixError, match=r"img_1_balance000\.mat: not a GradMix label map name"):
        sampling_patches(data_dir=root, dataset_mode="consep", image_size=32, label_dir=str(maps))
    os.remove(maps / "img_1_balance000.mat")
    _gradmix_map(str(maps / "img_1__balance000.mat"), 24, 32, value=1)  # wrong size
    _gradmix_map(str(maps / "img_1__balance001.mat"), 32, 32, value=6)  # outside 0..4
    with pytest.raises(DiffMixError) as err:
        sampling_patches(data_dir=root, dataset_mode="consep", image_size=32, label_dir=str(maps))
    msg = str(err.value)
    assert msg.startswith("2 problems") and "balance000.mat: label map size 32x24" in msg
    assert "balance001.mat: type values [6]" in msg


def test_fixture_patches(fixtures_dir):
    patches = sampling_patches(
        data_dir=str(fixtures_dir / "real_he_patches"),
        dataset_mode="custom",
        num_classes=6,
        image_size=128,
        image_folder="imgs",
        label_folder="masks",
        progress=False,
    )
    assert len(patches) == 3 * 4
    for p in patches:
        ids = instance_ids(p.inst_map)
        assert ids.tolist() == list(range(1, ids.size + 1))
        assert p.image.shape == (128, 128, 3) and p.type_map.max() <= 5
