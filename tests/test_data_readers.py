"""Readers: pairing by stem, layouts, the merged-classes marker, validation reported all at once."""

import os
import time

import numpy as np
import pytest
from data_helpers import write_image, write_mat, write_pair

from guided_diffusion.data.classes import CONSEP, identity_table
from guided_diffusion.data.labels import write_label_mat
from guided_diffusion.data.readers import list_samples, read_dataset, read_label_file, resolve_split_dir
from guided_diffusion.data.toy import make_toy_tile
from guided_diffusion.infra.errors import DiffMixError


def test_pairs_by_stem_when_sorted_orders_differ(tmp_path):
    # Sorted image names: tile.orig.png < tile.png; sorted label names: tile.mat < tile.orig.mat.
    # Pairing two sorted globs would swap them; pairing by stem must not.
    root = str(tmp_path)
    a = write_pair(root, "Train", "tile", h=24, w=24, seed=1)
    b = write_pair(root, "Train", "tile.orig", h=32, w=40, seed=2)
    assert sorted(os.listdir(tmp_path / "Train/Images")) == ["tile.orig.png", "tile.png"]
    assert sorted(os.listdir(tmp_path / "Train/Labels")) == ["tile.mat", "tile.orig.mat"]
    samples = read_dataset(root, CONSEP, progress=False)
    by_stem = {s.files.stem: s for s in samples}
    for stem, (image, inst, types) in (("tile", a), ("tile.orig", b)):
        s = by_stem[stem]
        assert np.array_equal(s.image, image)
        assert np.array_equal(s.inst_map, inst)
        assert np.array_equal(s.type_map, CONSEP.merge(types))


def test_mixed_image_formats(tmp_path):
    root = str(tmp_path)
    png = write_pair(root, "Train", "a", ext=".png", seed=1)
    tif = write_pair(root, "Train", "b", ext=".tif", seed=2)
    write_pair(root, "Train", "c", ext=".jpg", seed=3)
    samples = read_dataset(root, CONSEP, progress=False)
    assert [s.files.stem for s in samples] == ["a", "b", "c"]
    assert np.array_equal(samples[0].image, png[0]) and np.array_equal(samples[1].image, tif[0])
    assert samples[2].image.shape == (32, 32, 3) and samples[2].image.dtype == np.uint8


@pytest.mark.parametrize("missing", ["label", "image"])
def test_missing_partner_names_both_folders_and_stem(tmp_path, missing):
    root = str(tmp_path)
    write_pair(root, "Train", "ok")
    write_pair(root, "Train", "lonely_7")
    os.remove(tmp_path / "Train" / ("Labels/lonely_7.mat" if missing == "label" else "Images/lonely_7.png"))
    with pytest.raises(DiffMixError) as err:
        list_samples(root)
    msg = str(err.value)
    assert "'lonely_7'" in msg
    assert str(tmp_path / "Train" / "Images") in msg and str(tmp_path / "Train" / "Labels") in msg
    assert ("without a label" if missing == "label" else "without an image") in msg


def test_root_or_split_folder_and_case(tmp_path):
    root = str(tmp_path)
    write_pair(root, "train", "x")  # lower-case split name
    write_pair(root, "Test", "y")
    assert [s.stem for s in list_samples(root, "Train")] == ["x"]
    assert [s.stem for s in list_samples(root, "Test")] == ["y"]
    assert [s.stem for s in list_samples(str(tmp_path / "Test"))] == ["y"]  # split folder given directly
    assert resolve_split_dir(str(tmp_path / "Test"))[1] == "pairs"
    with pytest.raises(DiffMixError, match="not a dataset"):
        list_samples(str(tmp_path / "Test" / "Images"))


def test_merged_marker_is_not_merged_twice(tmp_path):
    inst = np.array([[1, 1, 2, 2], [0, 3, 3, 0]], np.int32)
    merged = np.array([[4, 4, 3, 3], [0, 1, 1, 0]], np.int32)  # already merged CoNSeP classes
    marked = str(tmp_path / "img_1__balance000.mat")
    write_label_mat(marked, inst, merged, classes_merged=np.array(1), num_classes=np.array(5))
    i, t = read_label_file(marked, CONSEP)
    assert np.array_equal(t, merged)  # merging again would turn spindle (4) into epithelial (3)
    assert np.array_equal(i, inst)
    raw = str(tmp_path / "raw.mat")
    write_label_mat(raw, inst, merged)  # no marker: these are raw ids, merged once
    assert np.array_equal(read_label_file(raw, CONSEP)[1], CONSEP.merge(merged))
    assert not np.array_equal(CONSEP.merge(merged), merged)
    # marker values are validated against 0..num_classes-1, and num_classes must match the table
    bad = str(tmp_path / "bad.mat")
    write_label_mat(bad, inst, merged + 1, classes_merged=np.array(1), num_classes=np.array(5))
    with pytest.raises(DiffMixError, match=r"bad\.mat.*\[5\].*0\.\.4"):
        read_label_file(bad, CONSEP)
    other = str(tmp_path / "other.mat")
    write_label_mat(other, inst, merged, classes_merged=np.array(1), num_classes=np.array(6))
    with pytest.raises(DiffMixError, match=r"other\.mat.*num_classes=6"):
        read_label_file(other, CONSEP)


def test_every_validation_error_reported_at_once(tmp_path):
    root = str(tmp_path)
    split = tmp_path / "Train"
    write_pair(root, "Train", "good", h=40, w=40)
    # 1: .mat without type_map
    write_pair(root, "Train", "nokey", h=40, w=40)
    write_mat(str(split / "Labels/nokey.mat"), inst_map=np.zeros((40, 40), np.int32), extra=np.ones(3))
    # 2: label size differs from the image
    write_pair(root, "Train", "size", h=40, w=40)
    write_mat(str(split / "Labels/size.mat"), inst_map=np.zeros((40, 48), np.int32), type_map=np.zeros((40, 48), np.int32))
    # 3: raw type 9 is not a CoNSeP id
    write_pair(root, "Train", "types", h=40, w=40)
    t = np.zeros((40, 40), np.int32)
    t[3, 3] = 9
    write_mat(str(split / "Labels/types.mat"), inst_map=(t > 0).astype(np.int32), type_map=t)
    # 4: image smaller than the crop
    write_pair(root, "Train", "small", h=40, w=20)
    # 5: unreadable image, 6: unreadable .mat
    write_pair(root, "Train", "badimg", h=40, w=40)
    (split / "Images/badimg.png").write_bytes(b"not a png at all")
    write_pair(root, "Train", "badmat", h=40, w=40)
    (split / "Labels/badmat.mat").write_bytes(b"garbage" * 20)
    # exactly the crop size is fine
    write_pair(root, "Train", "exact", h=32, w=32)
    with pytest.raises(DiffMixError) as err:
        read_dataset(root, CONSEP, min_size=32, progress=False)
    msg = str(err.value)
    assert msg.startswith("6 problems")
    assert "nokey.mat: missing key type_map" in msg
    assert "size.mat: label size 48x40" in msg and "size.png" in msg
    assert "types.mat: type values [9]" in msg
    assert "small.png: image 20x40 (WxH) is smaller than the crop size 32" in msg
    assert "badimg.png: not a readable image" in msg
    assert "badmat.mat: not a readable .mat" in msg
    assert "good" not in msg and "exact" not in msg


def test_bad_label_arrays(tmp_path):
    path = str(tmp_path / "neg.mat")
    write_mat(path, inst_map=-np.ones((4, 4), np.int32), type_map=np.zeros((4, 4), np.int32))
    with pytest.raises(DiffMixError, match="negative"):
        read_label_file(path, CONSEP)
    write_mat(path, inst_map=np.full((4, 4), 0.5), type_map=np.zeros((4, 4)))
    with pytest.raises(DiffMixError, match="non-integer"):
        read_label_file(path, CONSEP)
    write_mat(path, inst_map=np.ones((4, 4), np.float64), type_map=np.ones((4, 4), np.float64))
    i, t = read_label_file(path, CONSEP)  # integral floats (MATLAB doubles) are fine
    assert i.dtype == np.int32 and t.tolist() == np.ones((4, 4), int).tolist()


def test_hovernet_npy_folder(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for stem in ("p1", "p0"):
        arr = np.zeros((24, 24, 5), np.int32)
        arr[..., :3] = rng.integers(0, 256, (24, 24, 3))
        arr[4:9, 4:9, 3], arr[4:9, 4:9, 4] = 300, 7  # id > 255 survives, raw type 7 -> spindle (4)
        np.save(tmp_path / f"{stem}.npy", arr)
        arrays[stem] = arr
    samples = read_dataset(str(tmp_path), CONSEP, progress=False)
    assert [s.files.stem for s in samples] == ["p0", "p1"]
    s = samples[0]
    assert np.array_equal(s.image, arrays["p0"][..., :3].astype(np.uint8))
    assert s.inst_map.max() == 300 and set(np.unique(s.type_map)) == {0, 4}
    np.save(tmp_path / "bad.npy", np.zeros((24, 24, 4)))
    with pytest.raises(DiffMixError, match=r"bad\.npy.*\[H, W, 5\]"):
        read_dataset(str(tmp_path), CONSEP, progress=False)


def test_real_fixtures_custom_six_classes(fixtures_dir):
    root = str(fixtures_dir / "real_he_patches")
    table = identity_table(6)
    samples = read_dataset(root, table, image_folder="imgs", label_folder="masks", min_size=256, progress=False)
    assert [s.files.stem for s in samples] == ["patch1", "patch2", "patch3"]
    n_nuclei = [np.unique(s.inst_map).size - 1 for s in samples]
    assert n_nuclei == [20, 47, 58]
    assert set(np.unique(samples[2].type_map)) == {0, 1, 2, 3, 5}
    assert all(s.image.shape == (256, 256, 3) for s in samples)
    # the raw ids are not contiguous: the reader keeps them as stored
    assert samples[0].inst_map.max() > n_nuclei[0]
    # the CoNSeP table would accept these ids too, but a 4-class identity table must not
    with pytest.raises(DiffMixError, match=r"patch3\.mat.*\[5\]"):
        read_dataset(root, identity_table(4), image_folder="imgs", label_folder="masks", progress=False)


@pytest.mark.parametrize("size", [256, 1000])
def test_large_and_small_tiles(tmp_path, size):
    image, inst, types = make_toy_tile(size, seed=size)
    write_image(str(tmp_path / "Train/Images/t.png"), image)
    write_label_mat(str(tmp_path / "Train/Labels/t.mat"), inst, types)
    t0 = time.perf_counter()
    (s,) = read_dataset(str(tmp_path), CONSEP, min_size=256, progress=False)
    elapsed = time.perf_counter() - t0
    assert s.image.shape == (size, size, 3)
    assert np.array_equal(s.inst_map, inst) and np.array_equal(s.type_map, CONSEP.merge(types))
    assert elapsed < 10
