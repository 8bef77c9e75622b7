"""Class tables: the paper's CoNSeP/GLySAC merges, identity and mapping-file tables."""

import json

import numpy as np
import pytest

from guided_diffusion.data.classes import (
    CONSEP,
    GLYSAC,
    identity_table,
    load_class_table,
    resolve_class_table,
)
from guided_diffusion.infra.errors import DiffMixError


def test_consep_merge_7_to_4():
    raw = np.arange(8).reshape(2, 4)
    merged = CONSEP.merge(raw)
    assert merged.tolist() == [[0, 1, 2, 3], [3, 4, 4, 4]]
    assert merged.dtype == np.int32
    assert CONSEP.num_classes == 5 and len(CONSEP.names) == 5


def test_glysac_merge_10_to_3():
    merged = GLYSAC.merge(np.arange(11))
    #               0  1  2  3  4  5  6  7  8  9  10
    assert merged.tolist() == [0, 1, 1, 3, 2, 2, 2, 2, 3, 1, 1]
    assert GLYSAC.num_classes == 4


def test_unknown_raw_value_is_an_error_naming_the_source():
    with pytest.raises(DiffMixError, match=r"lab\.mat.*\[8\]"):
        CONSEP.merge(np.array([[0, 8]]), source="lab.mat")
    assert CONSEP.unknown_raw_values(np.array([0, 3, 11, 8])) == [8, 11]


def test_identity_and_mapping_file(tmp_path):
    ident = identity_table(6)
    assert ident.merge(np.arange(6)).tolist() == list(range(6))
    assert ident.unknown_raw_values(np.array([6])) == [6]

    path = tmp_path / "table.json"
    path.write_text(json.dumps({"num_classes": 3, "map": {"1": 1, "2": 1, "7": 2}, "names": ["bg", "a", "b"]}))
    table = load_class_table(str(path))
    assert table.merge(np.array([0, 1, 2, 7])).tolist() == [0, 1, 1, 2]
    assert table.unknown_raw_values(np.array([3, 7])) == [3]
    assert table.names == ("bg", "a", "b")
    # round trip through the JSON form
    path2 = tmp_path / "t2.json"
    path2.write_text(json.dumps(table.to_json()))
    assert load_class_table(str(path2)) == table


@pytest.mark.parametrize(
    "obj, msg",
    [
        ({"map": {"1": 1}}, "num_classes"),
        ({"num_classes": 3, "map": {"1": 3}}, "outside 0..2"),
        ({"num_classes": 3, "map": {"0": 1}}, "background"),
        ({"num_classes": 3, "names": ["a"]}, "names"),
    ],
)
def test_bad_mapping_files(tmp_path, obj, msg):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(DiffMixError, match=msg) as err:
        load_class_table(str(path))
    assert "bad.json" in str(err.value)


def test_resolve_class_table():
    assert resolve_class_table("consep") is CONSEP
    assert resolve_class_table("GLySAC", num_classes=4) is GLYSAC
    assert resolve_class_table("custom", num_classes=6).num_classes == 6
    with pytest.raises(DiffMixError, match="num_classes=4"):
        resolve_class_table("consep", num_classes=4)
    with pytest.raises(DiffMixError, match="custom needs"):
        resolve_class_table("custom")
    with pytest.raises(DiffMixError, match="dataset_mode"):
        resolve_class_table("monuseg")
    with pytest.raises(DiffMixError, match="only used with dataset_mode custom"):
        resolve_class_table("consep", class_table=identity_table(5))
