"""Shared I/O, label-map tables and the condition builder, checked on small hand-made maps."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from guided_diffusion.data.condition import build_condition, condition_channels, instance_edges
from guided_diffusion.data.labels import instance_table, relabel_contiguous, write_label_mat
from guided_diffusion.infra import fileio
from guided_diffusion.infra.errors import DiffMixError, run_cli


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    fileio.write_json(str(target), {"a": 1})
    with pytest.raises(RuntimeError):
        with fileio.atomic_open(str(target), "wb") as f:
            f.write(b"partial")
            raise RuntimeError("disk full")
    assert fileio.read_json(str(target)) == {"a": 1}  # old content intact
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary left behind


def test_read_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(DiffMixError, match="nope.png"):
        fileio.read_image(str(missing))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DiffMixError, match="bad.png.*not a readable image"):
        fileio.read_image(str(bad))
    badmat = tmp_path / "bad.mat"
    badmat.write_bytes(b"garbage")
    with pytest.raises(DiffMixError, match="bad.mat"):
        fileio.read_mat(str(badmat))


def test_run_cli_prints_user_errors_without_traceback(capsys):
    def main():
        raise DiffMixError("x.mat: missing key 'inst_map'")

    with pytest.raises(SystemExit) as exc:
        run_cli(main)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: x.mat: missing key 'inst_map'"


def test_png_npy_roundtrip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    fileio.write_png(str(tmp_path / "a.png"), img)
    np.testing.assert_array_equal(fileio.read_image(str(tmp_path / "a.png")), img)
    arr = np.arange(12, dtype=np.int32).reshape(3, 4)
    fileio.write_npy(str(tmp_path / "a.npy"), arr)
    np.testing.assert_array_equal(fileio.read_npy(str(tmp_path / "a.npy")), arr)


INST = np.array(
    [
        [0, 7, 7, 0, 0],
        [0, 7, 7, 0, 3],
        [0, 0, 0, 0, 3],
        [9, 9, 0, 0, 0],
    ]
)
TYPE = np.array(
    [
        [0, 2, 2, 0, 0],
        [0, 2, 1, 0, 4],
        [0, 0, 0, 0, 4],
        [1, 1, 0, 0, 0],
    ]
)


def test_instance_table_majority_type_and_centroid():
    ids, types, cents = instance_table(INST, TYPE)
    assert ids.tolist() == [3, 7, 9]
    assert types.tolist() == [4, 2, 1]  # instance 7: three pixels of 2, one of 1 -> 2
    np.testing.assert_allclose(cents, [[4.0, 1.5], [1.5, 0.5], [0.5, 3.0]])


def test_instance_table_empty():
    ids, types, cents = instance_table(np.zeros((4, 4), int), np.zeros((4, 4), int))
    assert ids.size == 0 and types.size == 0 and cents.shape == (0, 2)


def test_relabel_contiguous_keeps_order():
    out = relabel_contiguous(INST)
    assert out.dtype == np.int32
    assert sorted(np.unique(out).tolist()) == [0, 1, 2, 3]
    assert (out == 1).sum() == (INST == 3).sum() and (out == 3).sum() == (INST == 9).sum()


def test_write_label_mat_recomputes_derived_keys(tmp_path):
    path = str(tmp_path / "x.mat")
    write_label_mat(path, INST, TYPE, classes_merged=np.array(1))
    mat = fileio.read_mat(path)
    assert mat["inst_type"].shape == (3, 1) and mat["inst_type"].ravel().tolist() == [4, 2, 1]
    np.testing.assert_allclose(mat["inst_centroid"], [[4.0, 1.5], [1.5, 0.5], [0.5, 3.0]])
    assert int(mat["classes_merged"].item()) == 1
    np.testing.assert_array_equal(mat["inst_map"], INST)


def test_instance_edges_oracle():
    inst = torch.tensor(
        [
            [0, 0, 0, 0],
            [0, 1, 1, 0],
            [0, 1, 2, 2],
            [0, 0, 0, 0],
        ]
    )
    expected = torch.tensor(
        [
            [0, 1, 1, 0],
            [1, 1, 1, 1],
            [1, 1, 1, 1],
            [0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(instance_edges(inst), expected)
    # uniform map: no edges, and the image border is never an edge by itself
    assert not instance_edges(torch.full((3, 3), 5)).any()


def test_build_condition_one_hot_and_edge_channel():
    y = build_condition(TYPE, INST, num_classes=5)
    assert y.shape == (1, 6, 4, 5) and y.dtype == torch.float32
    assert torch.equal(y[0, :5].argmax(0), torch.as_tensor(TYPE))
    assert torch.equal(y[0, :5].sum(0), torch.ones(4, 5))
    assert torch.equal(y[0, 5].bool(), instance_edges(torch.as_tensor(INST)))
    y2 = build_condition(TYPE, None, num_classes=5, no_instance=True)
    assert y2.shape == (1, 5, 4, 5)
    assert condition_channels(5) == 6 and condition_channels(5, True) == 5


def test_build_condition_rejects_out_of_table_types():
    with pytest.raises(ValueError, match="outside the class table"):
        build_condition(TYPE, INST, num_classes=4)
