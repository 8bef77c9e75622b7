"""PanNuke, CoNIC and Lizard read as distributed (dataset modes pannuke, conic, lizard).

Tiny datasets in each exact layout with hand-made nuclei (tests/format_helpers.py): per-class
counts, instance maps, centroids, fold splits, bad input, and round trips through the converter.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from format_helpers import (
    CONIC_PATCHES,
    LIZARD_REGIONS,
    PANNUKE_FOLDS,
    corner,
    nuclei_maps,
    pannuke_mask,
    write_conic,
    write_lizard,
    write_pannuke,
)
from guided_diffusion.data.classes import resolve_class_table
from guided_diffusion.data.formats import ArrayPatch, open_array, parse_split
from guided_diffusion.data.formats.export import convert_to_consep
from guided_diffusion.data.labels import instance_table
from guided_diffusion.data.readers import list_samples, read_dataset
from guided_diffusion.data.stats import dataset_statistics
from guided_diffusion.infra.errors import DiffMixError


def _read(root, mode, split="all"):
    return read_dataset(str(root), resolve_class_table(mode), split, progress=False, dataset_mode=mode)


def _check_maps(sample, image, inst, types):
    np.testing.assert_array_equal(sample.image, image)
    np.testing.assert_array_equal(sample.inst_map > 0, inst > 0)
    # one instance id per nucleus, none shared: the stored map equals the truth up to renumbering
    pairs = set(zip(sample.inst_map[inst > 0].tolist(), inst[inst > 0].tolist()))
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(np.unique(inst)) - 1
    np.testing.assert_array_equal(sample.type_map, types)


def _centroids(classes):
    return np.array([[corner(j)[1] + 1.5, corner(j)[0] + 1.5] for j in range(len(classes))])


# ----------------------------------------------------------------------------- PanNuke


def test_class_tables_name_the_rare_classes():
    pannuke, conic, lizard = (resolve_class_table(m) for m in ("pannuke", "conic", "lizard"))
    assert pannuke.names == ("background", "neoplastic", "inflammatory", "connective", "dead", "epithelial")
    assert [pannuke.names[c] for c in pannuke.minor] == ["dead"]
    assert conic.names[1:] == ("neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective")
    assert [conic.names[c] for c in conic.minor] == ["neutrophil", "eosinophil"] == [lizard.names[c] for c in lizard.minor]


def test_pannuke_maps_counts_centroids_and_folds(tmp_path):
    truth = write_pannuke(str(tmp_path))
    samples = _read(tmp_path, "pannuke")
    assert [s.files.stem for s in samples] == ["fold1_00000", "fold1_00001", "fold2_00000", "fold3_00000"]
    assert all(isinstance(s, ArrayPatch) for s in samples)  # pixels stay in the memory-mapped files
    expected = [t for k in (1, 2, 3) for t in truth[k]]
    classes = [c for k in (1, 2, 3) for c in PANNUKE_FOLDS[k]]
    for s, (image, inst, types), cls in zip(samples, expected, classes):
        _check_maps(s, image, inst, types)
        ids, kinds, cents = instance_table(s.inst_map, s.type_map)
        assert kinds.tolist() == cls
        np.testing.assert_allclose(cents, _centroids(cls))
    stats = dataset_statistics(data_dir=str(tmp_path), dataset_mode="pannuke", split="all", progress=False)
    assert stats.counts.tolist() == [0, 4, 2, 2, 2, 2]  # neoplastic 4, inflammatory 2, connective 2, dead 2, epithelial 2
    assert stats.areas[4] == [16, 16]
    # Train = folds 1, 2; Test = fold 3; a fold folder given directly is read whole
    assert [s.stem for s in list_samples(str(tmp_path), "Train", dataset_mode="pannuke")] == [
        "fold1_00000", "fold1_00001", "fold2_00000"]
    assert [s.stem for s in list_samples(str(tmp_path), "Test", dataset_mode="pannuke")] == ["fold3_00000"]
    assert [s.stem for s in list_samples(str(tmp_path), "fold1+fold3", dataset_mode="pannuke")] == [
        "fold1_00000", "fold1_00001", "fold3_00000"]
    assert [s.stem for s in list_samples(str(tmp_path / "Fold 2"), "Test", dataset_mode="pannuke")] == ["fold2_00000"]
    assert isinstance(open_array(str(tmp_path / "Fold 1" / "masks" / "fold1" / "masks.npy")), np.memmap)


def test_pannuke_flat_folders_holding_the_arrays(tmp_path):
    write_pannuke(str(tmp_path), official=False)  # root/fold<k>/{images,masks,types}.npy
    samples = _read(tmp_path / "fold2", "pannuke", split="Test")  # a fold folder: read whole
    assert [s.files.stem for s in samples] == ["fold2_00000"]
    assert samples[0].type_map.max() == 4
    assert [s.stem for s in list_samples(str(tmp_path), "Test", dataset_mode="pannuke")] == ["fold3_00000"]
    os.remove(tmp_path / "fold1" / "masks.npy")
    with pytest.raises(DiffMixError, match=r"fold1: a PanNuke fold needs images\.npy and masks\.npy; only images\.npy"):
        list_samples(str(tmp_path), "Train", dataset_mode="pannuke")


def _pannuke_fold(tmp_path, images, masks):
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "masks.npy", masks)
    return str(tmp_path)


@pytest.mark.parametrize("case", ["channels", "count", "shared_id", "shared_pixel", "image_range"])
def test_pannuke_bad_input_names_the_file(tmp_path, case):
    images = np.zeros((2, 32, 32, 3))
    masks = np.stack([pannuke_mask([1, 2]), pannuke_mask([3])])
    if case == "channels":
        masks, match = masks[..., :5], r"masks\.npy: shape \(2, 32, 32, 5\), expected \[N, H, W, 6\]"
    elif case == "count":
        masks, match = masks[:1], r"masks\.npy: 1 patches, but the images array holds 2"
    elif case == "shared_id":
        masks[1, 20:24, 20:24, 3] = 1  # id 1 of channel 'connective' reused in channel 'dead'
        match = r"masks\.npy\[1\]: instance ids shared across channels \{1: \['connective', 'dead'\]\}"
    elif case == "shared_pixel":
        masks[0, 2:4, 2:4, 4] = 7
        match = r"masks\.npy\[0\]: 4 pixels belong to nuclei of two channels"
    else:
        images[1, 0, 0, 0], match = 300.0, r"images\.npy: image values 0\.\.300 \(float64\) are neither 0\.\.255 nor"
    with pytest.raises(DiffMixError, match=match):
        _read(_pannuke_fold(tmp_path, images, masks), "pannuke")


def test_pannuke_split_errors(tmp_path):
    write_pannuke(str(tmp_path), {1: PANNUKE_FOLDS[1]})
    write_pannuke(str(tmp_path / "other"), {1: PANNUKE_FOLDS[1]})
    os.rename(tmp_path / "other" / "Fold 1", tmp_path / "Fold 4")
    with pytest.raises(DiffMixError, match=r"split 'Test' selects no images \(folds present: \[1, 4\]\)"):
        list_samples(str(tmp_path), "Test", dataset_mode="pannuke")
    with pytest.raises(DiffMixError, match="expected Train"):
        parse_split("validation")


# ----------------------------------------------------------------------------- CoNIC


def test_conic_maps_counts_and_source_folds(tmp_path):
    truth = write_conic(str(tmp_path), label_dtype=np.uint16)
    samples = _read(tmp_path, "conic")
    assert [s.files.stem for s in samples] == [n for n, _ in CONIC_PATCHES]
    for s, (name, image, inst, types), (_, cls) in zip(samples, truth, CONIC_PATCHES):
        _check_maps(s, image, inst, types)
        np.testing.assert_allclose(instance_table(s.inst_map, s.type_map)[2], _centroids(cls))
    stats = dataset_statistics(data_dir=str(tmp_path), dataset_mode="conic", split="all", progress=False)
    assert stats.counts.tolist() == [0, 2, 3, 2, 1, 2, 1]
    # info.csv: consep_1 fold 1, crag_2 fold 2, glas_3 fold 3; a source's patches never straddle splits
    assert [s.stem for s in list_samples(str(tmp_path), "Train", dataset_mode="conic")] == [
        "consep_1-0000", "consep_1-0001", "crag_2-0000"]
    assert [s.stem for s in list_samples(str(tmp_path), "Test", dataset_mode="conic")] == ["glas_3-0000"]


def test_conic_without_info_csv_splits_by_hashed_source(tmp_path):
    patches = [(f"src{k}-{i:04d}", [1 + (k + i) % 6]) for k in range(12) for i in range(3)]
    write_conic(str(tmp_path), patches, info=False, header=False)
    train = {s.stem for s in list_samples(str(tmp_path), "Train", dataset_mode="conic")}
    test = {s.stem for s in list_samples(str(tmp_path), "Test", dataset_mode="conic")}
    assert train and test and not train & test and len(train | test) == len(patches)
    src = lambda names: {n.rsplit("-", 1)[0] for n in names}  # noqa: E731
    assert not src(train) & src(test)


@pytest.mark.parametrize("case", ["channels", "count", "class", "names"])
def test_conic_bad_input_names_the_file(tmp_path, case):
    write_conic(str(tmp_path))
    labels = np.load(tmp_path / "labels.npy")
    if case == "channels":
        np.save(tmp_path / "labels.npy", labels[..., :1])
        match = r"labels\.npy: shape \(4, 32, 32, 1\), expected \[N, H, W, 2\]"
    elif case == "count":
        np.save(tmp_path / "labels.npy", labels[:3])
        match = r"labels\.npy: 3 patches, but the images array holds 4"
    elif case == "class":
        labels[2, 2, 2, 1] = 7
        np.save(tmp_path / "labels.npy", labels)
        match = r"labels\.npy\[2\]: type values \[7\] are not in the conic class table"
    else:
        (tmp_path / "patch_info.csv").write_text("patch_info\na-1\nb-1\n")
        match = r"patch_info\.csv: 2 patch names, but .*images\.npy holds 4 patches"
    with pytest.raises(DiffMixError, match=match):
        _read(tmp_path, "conic")


# ----------------------------------------------------------------------------- Lizard


def test_lizard_release_layout_maps_and_folds(tmp_path):
    truth = write_lizard(str(tmp_path))
    samples = _read(tmp_path, "lizard")
    assert [s.files.stem for s in samples] == sorted(LIZARD_REGIONS)
    for s in samples:
        image, inst, types = truth[s.files.stem]
        _check_maps(s, image, inst, types)
        np.testing.assert_array_equal(s.inst_map, inst)  # Lizard ids kept as stored (10, 20, ...)
        np.testing.assert_allclose(instance_table(s.inst_map, s.type_map)[2], _centroids(LIZARD_REGIONS[s.files.stem]))
    assert [s.stem for s in list_samples(str(tmp_path), "Train", dataset_mode="lizard")] == ["consep_1", "crag_2"]
    stats = dataset_statistics(data_dir=str(tmp_path), dataset_mode="lizard", split="Test", progress=False)
    assert stats.counts.tolist() == [0, 1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("case", ["class", "unlisted", "keys", "unpaired"])
def test_lizard_bad_input_names_the_file(tmp_path, case):
    write_lizard(str(tmp_path))
    path = tmp_path / "lizard_labels" / "Lizard_Labels" / "Labels" / "crag_2.mat"
    import scipy.io

    mat = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    if case == "class":
        mat["class"][1, 0], match = 9, r"crag_2\.mat: class values \[9\] are not in the lizard class table"
    elif case == "unlisted":
        mat["inst_map"][0, 0], match = 77, r"crag_2\.mat: instance ids \[77\] of inst_map have no entry"
    elif case == "keys":
        del mat["class"]
        match = r"crag_2\.mat: missing key\(s\) class"
    else:
        os.remove(tmp_path / "lizard_images2" / "Lizard_Images2" / "crag_2.png")
        match = r"crag_2\.mat: label without an image"
    scipy.io.savemat(path, mat)
    with pytest.raises(DiffMixError, match=match):
        _read(tmp_path, "lizard")


# ----------------------------------------------------------------------------- converter round trips


@pytest.mark.parametrize("mode", ["pannuke", "conic", "lizard"])
def test_converter_round_trip(tmp_path, mode):
    src = tmp_path / "src"
    {"pannuke": write_pannuke, "conic": write_conic, "lizard": write_lizard}[mode](str(src))
    out = tmp_path / "consep"
    summary = convert_to_consep(str(src), mode, str(out), ["Train", "Test"], progress=False)
    assert set(summary["splits"]) == {"Train", "Test"}
    for split in ("Train", "Test"):
        original = _read(src, mode, split)
        back = read_dataset(str(out), resolve_class_table("custom", str(out / "class_table.json")), split, progress=False)
        assert [s.files.stem for s in back] == [s.files.stem for s in original]
        for a, b in zip(original, back):
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.inst_map, b.inst_map)
            np.testing.assert_array_equal(a.type_map, b.type_map)
    assert resolve_class_table("custom", str(out / "class_table.json")).minor == resolve_class_table(mode).minor


def test_converter_single_pannuke_fold_is_one_split_folder(tmp_path):
    write_pannuke(str(tmp_path / "src"), {3: PANNUKE_FOLDS[3]})
    summary = convert_to_consep(str(tmp_path / "src" / "Fold 3"), "pannuke", str(tmp_path / "out"), progress=False)
    assert summary["splits"] == {"all": {"folder": ".", "stems": ["fold3_00000"]}}
    assert os.listdir(tmp_path / "out" / "Labels") == ["fold3_00000.mat"]


def test_nuclei_helper_is_what_the_tests_assume():
    inst, types = nuclei_maps([2, 3])
    assert inst[2:6, 2:6].tolist() == [[1] * 4] * 4 and types[2:6, 11:15].tolist() == [[3] * 4] * 4


# ----------------------------------------------------------------------------- value range (issue 22 #3)


def _as_unit_floats(path):
    np.save(path, np.load(path).astype(np.float64) / 255.0)


def test_unit_float_images_read_as_0_255(tmp_path):
    """PanNuke divided by 255, CoNIC saved as floats in [0, 1] and a HoVer-Net .npy patch in [0, 1]
    read as the uint8 images they came from (not as black images)."""
    truth = write_pannuke(str(tmp_path / "pannuke"), {1: PANNUKE_FOLDS[1]})
    _as_unit_floats(tmp_path / "pannuke" / "Fold 1" / "images" / "fold1" / "images.npy")
    for s, (image, _, _) in zip(_read(tmp_path / "pannuke", "pannuke"), truth[1]):
        np.testing.assert_array_equal(s.image, image)
    conic = write_conic(str(tmp_path / "conic"))
    _as_unit_floats(tmp_path / "conic" / "images.npy")
    for s, (_, image, _, _) in zip(_read(tmp_path / "conic", "conic"), conic):
        np.testing.assert_array_equal(s.image, image)
    # floats 0..255 (a value above 1) stay 0..255, whole-valued or not
    (tmp_path / "npy").mkdir()
    _, image, inst, types = conic[0]
    for name, rgb in (("unit", image / 255.0), ("byte", np.minimum(image + 0.2, 255))):
        np.save(tmp_path / "npy" / f"{name}.npy", np.dstack([rgb, inst, types]).astype(np.float32))
    for s in read_dataset(str(tmp_path / "npy"), resolve_class_table("conic"), progress=False):
        np.testing.assert_array_equal(s.image, image)


@pytest.mark.parametrize("value, match", [(np.nan, r"image values include NaN or infinity \(float32\)"),
                                          (np.inf, r"image values include NaN or infinity"),
                                          (-1.0, r"image values -1\.\.1 \(float32\) are neither 0\.\.255 nor floats in \[0, 1\]")])
def test_non_finite_or_unknown_range_refused_naming_the_file(tmp_path, value, match):
    """One rule for every stored RGB (image_arrays.rgb_scale): a .npy patch and a CoNIC images.npy alike."""
    conic = write_conic(str(tmp_path / "conic"))
    images = np.load(tmp_path / "conic" / "images.npy").astype(np.float32) / 255.0
    images[2, 5, 5, 1] = value
    np.save(tmp_path / "conic" / "images.npy", images)
    with pytest.raises(DiffMixError, match=r"conic/images\.npy: " + match):
        _read(tmp_path / "conic", "conic")
    (tmp_path / "npy").mkdir()
    _, image, inst, types = conic[0]
    rgb = image / 255.0
    rgb[0, 0, 0] = value
    np.save(tmp_path / "npy" / "p.npy", np.dstack([rgb, inst, types]).astype(np.float32))
    with pytest.raises(DiffMixError, match=r"npy/p\.npy: " + match):
        read_dataset(str(tmp_path / "npy"), resolve_class_table("conic"), progress=False)


def test_converter_refuses_a_foreign_output_folder(tmp_path):
    """convert_dataset never mixes two datasets in one --out_dir; a rerun of the same conversion is fine."""
    write_pannuke(str(tmp_path / "pannuke"))
    write_conic(str(tmp_path / "conic"))
    out = tmp_path / "out"
    convert_to_consep(str(tmp_path / "pannuke"), "pannuke", str(out), ["Train"], progress=False)
    before = sorted(os.listdir(out / "Train" / "Images"))
    convert_to_consep(str(tmp_path / "pannuke"), "pannuke", str(out), ["Train"], progress=False)  # resumable
    with pytest.raises(DiffMixError, match=r"out: --out_dir holds another conversion \(source .*pannuke.*, here "
                                           r".*conic.*; dataset_mode 'pannuke', here 'conic'"):
        convert_to_consep(str(tmp_path / "conic"), "conic", str(out), ["Train"], progress=False)
    with pytest.raises(DiffMixError, match=r"--out_dir holds another conversion \(splits \['Train'\], here "):
        convert_to_consep(str(tmp_path / "pannuke"), "pannuke", str(out), ["Train", "Test"], progress=False)
    assert sorted(os.listdir(out / "Train" / "Images")) == before and not (out / "Test").exists()
    assert "pannuke" in (out / "class_table.json").read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DiffMixError, match=r"other: --out_dir is not empty and holds no conversion \(found notes\.txt\)"):
        convert_to_consep(str(tmp_path / "conic"), "conic", str(tmp_path / "other"), ["Train"], progress=False)
    assert os.listdir(tmp_path / "other") == ["notes.txt"]
