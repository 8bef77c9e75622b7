"""Every command on PanNuke, CoNIC and Lizard as distributed: statistics, GradMix, training (2 CPU
steps of a tiny U-Net), synthesis with source-format output, and evaluation."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO
from format_helpers import write_conic, write_lizard, write_pannuke
from guided_diffusion.data.classes import resolve_class_table
from guided_diffusion.data.formats.export import convert_to_consep
from guided_diffusion.data.readers import read_dataset

WRITERS = {"pannuke": write_pannuke, "conic": write_conic, "lizard": write_lizard}
MODES = list(WRITERS)


def _script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_cli_formats", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=MODES)
def dataset(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    WRITERS[request.param](str(root))
    return request.param, str(root)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_dataset_stats_cli(dataset, tmp_path, capsys):
    mode, root = dataset
    _script("dataset_stats").main(["--data_dir", root, "--dataset_mode", mode, "--split", "all", "--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    table = resolve_class_table(mode)
    assert all(name in out for name in table.names[1:])
    rows = (tmp_path / "dataset_stats.csv").read_text().splitlines()
    assert len(rows) == 1 + table.num_classes
    total = sum(int(r.split(",")[2]) for r in rows[1:])
    assert total == {"pannuke": 12, "conic": 11, "lizard": 9}[mode]


def test_gradmix_cli_defaults_to_the_rare_classes(dataset, tmp_path):
    mode, root = dataset
    summary = _script("gradmix").main(["--data_dir", root, "--dataset_mode", mode, "--out_dir", str(tmp_path),
                                        "--margin", "0", "--kinds", "balance,enlarge", "--write_images", "True",
                                        "--progress", "False"])
    assert summary["settings"]["minor"] == list(resolve_class_table(mode).minor)
    train = [s.files.stem for s in read_dataset(root, resolve_class_table(mode), "Train", progress=False, dataset_mode=mode)]
    assert sorted(summary["written"]) == sorted(f"{s}__{k}000" for s in train for k in ("balance", "enlarge"))
    record = json.loads((tmp_path / "Records" / f"{train[0]}__balance000.json").read_text())
    assert record["source_label"].endswith("]" if mode != "lizard" else ".mat")
    assert sorted(os.listdir(tmp_path / "Images")) == sorted(f"{s}__balance000.png" for s in train)
    # the maps read back through the data layer (classes already merged)
    from guided_diffusion.data.stats import label_dir_statistics

    stats = label_dir_statistics(str(tmp_path), resolve_class_table(mode))
    assert stats.num_maps == 2 * len(train)


def test_image_train_cli_two_steps(dataset, tmp_path):
    mode, root = dataset
    table = resolve_class_table(mode)
    run = tmp_path / "run"
    _script("image_train").main([
        "--data_dir", root, "--dataset_mode", mode, "--num_classes", str(table.num_classes), "--class_cond", "True",
        "--image_size", "32", "--num_channels", "32", "--channel_mult", "1,2", "--num_res_blocks", "1",
        "--attention_resolutions", "16", "--num_head_channels", "16", "--learn_sigma", "True", "--diffusion_steps", "50",
        "--batch_size", "2", "--max_steps", "2", "--save_interval", "100", "--log_dir", str(run), "--progress", "False",
    ])
    assert (run / "model000002.pt").exists() and (run / "checkpoint000002.json").exists()


# ----------------------------------------------------------------------------- synthesis -> source format


def _tiny(num_classes):
    from guided_diffusion.infra.config import ModelConfig
    from guided_diffusion.script_util import create_model_and_diffusion

    cfg = ModelConfig(image_size=32, num_classes=num_classes, num_channels=32, num_res_blocks=1, num_head_channels=16,
                      attention_resolutions="16", channel_mult="1,2", class_cond=True, learn_sigma=True,
                      diffusion_steps=40, timestep_respacing="ddim4").to_dict()
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**cfg)
    return cfg, model.eval(), diffusion


@pytest.mark.parametrize("mode", ["pannuke", "conic"])
def test_synthesis_source_format_appends_to_the_dataset(mode, tmp_path):
    from guided_diffusion import synthesis as syn
    from guided_diffusion.data.formats import open_array

    root = tmp_path / "data"
    WRITERS[mode](str(root))
    table = resolve_class_table(mode)
    label_dir = ""
    if mode == "conic":  # synthesise from GradMix maps (PanNuke: from the dataset's own labels)
        label_dir = str(tmp_path / "gradmix")
        _script("gradmix").main(["--data_dir", str(root), "--dataset_mode", mode, "--out_dir", label_dir,
                                 "--margin", "0", "--progress", "False", "--stats", "False"])
    cfg_model, model, diffusion = _tiny(table.num_classes)
    cfg = syn.SampleConfig(data_dir=str(root), dataset_mode=mode, label_dir=label_dir, results_path=str(tmp_path / "out"),
                           ddim_percent=50, progress=False, figure_rows=0, source_format=True, run_name="run")
    summary = syn.run_synthesis(cfg, cfg_model, model=model, diffusion=diffusion, rank=0, world_size=1)
    export = tmp_path / "out" / "run" / "source_format"
    assert summary.source_format == str(export)
    names = sorted(n[:-4] for n in os.listdir(tmp_path / "out" / "run" / "npy_patch"))
    if mode == "conic":
        assert names == ["consep_1-0000__balance000_000", "consep_1-0001__balance000_000", "crag_2-0000__balance000_000"]
    assert json.loads((export / "export.json").read_text())["names"] == names
    # The exported folder is itself a dataset of that format; its maps are the HoVer-Net patches'.
    if mode == "pannuke":
        assert open_array(str(export / "masks.npy")).shape == (len(names), 32, 32, 6)
        assert open_array(str(export / "types.npy")).tolist() == ["Tissue10", "Tissue11", "Tissue20"]  # Train folds
    else:
        assert open_array(str(export / "labels.npy")).shape == (len(names), 32, 32, 2)
    back = read_dataset(str(export), table, "all", progress=False, dataset_mode=mode)
    for sample, name in zip(back, names):
        patch = np.load(tmp_path / "out" / "run" / "npy_patch" / f"{name}.npy")
        np.testing.assert_array_equal(sample.image, patch[..., :3])
        np.testing.assert_array_equal(sample.inst_map, patch[..., 3])
        np.testing.assert_array_equal(sample.type_map, patch[..., 4])
    # Appending to the user's arrays keeps a valid dataset (CoNIC: synthetic patches keep their source's fold).
    if mode == "conic":
        for name in ("images.npy", "labels.npy"):
            np.save(root / name, np.concatenate([np.load(root / name), np.load(export / name)]))
        rows = (root / "patch_info.csv").read_text() + "".join(n + "\n" for n in names)
        (root / "patch_info.csv").write_text(rows)
        test = read_dataset(str(root), table, "Test", progress=False, dataset_mode=mode)
        assert [s.files.stem for s in test] == ["glas_3-0000"]  # no synthetic patch of a training source leaks


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_cli_reads_ground_truth_as_distributed(tmp_path, capsys):
    root = tmp_path / "conic"
    write_conic(str(root))
    pred = tmp_path / "pred"
    convert_to_consep(str(root), "conic", str(pred), ["Train", "Test"], progress=False, images=False)
    result = _script("evaluate").main(["--true_dir", str(root), "--pred_dir", str(pred / "Test" / "Labels"),
                                       "--dataset_mode", "conic", "--no_progress"])
    assert [r["name"] for r in result["per_image"]] == ["glas_3-0000"]
    assert result["instance"]["pq"] == pytest.approx(1.0)
    assert result["classification"]["f1_type_named"]["eosinophil"] == pytest.approx(1.0)
    assert result["settings"]["true_dir"] == f"{root} (conic, split Test)"
    # a missing prediction is reported against the dataset, not the temporary ground-truth folder
    os.remove(pred / "Test" / "Labels" / "glas_3-0000.mat")
    (pred / "Test" / "Labels" / "other.mat").write_bytes((pred / "Train" / "Labels" / "crag_2-0000.mat").read_bytes())
    from guided_diffusion.infra.errors import DiffMixError

    with pytest.raises(DiffMixError, match=r"conic, split Test"):
        _script("evaluate").main(["--true_dir", str(root), "--pred_dir", str(pred / "Test" / "Labels"),
                                  "--dataset_mode", "conic", "--no_progress"])


def test_convert_dataset_cli(tmp_path, capsys):
    import subprocess
    import sys

    write_lizard(str(tmp_path / "lizard"))
    summary = _script("convert_dataset").main(["--data_dir", str(tmp_path / "lizard"), "--dataset_mode", "lizard",
                                               "--out_dir", str(tmp_path / "out"), "--splits", "fold1,fold2,fold3",
                                               "--progress", "False"])
    assert {s: v["stems"] for s, v in summary["splits"].items()} == {"fold1": ["consep_1"], "fold2": ["crag_2"],
                                                                     "fold3": ["glas_3"]}
    assert (tmp_path / "out" / "fold2" / "Images" / "crag_2.png").exists()
    # bad input: one line on stderr naming the file, exit code 2, nothing converted
    write_pannuke(str(tmp_path / "pannuke"), {1: [[1, 2]]})
    masks = tmp_path / "pannuke" / "Fold 1" / "masks" / "fold1" / "masks.npy"
    np.save(masks, np.load(masks)[..., :4])
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_dataset.py"), "--data_dir",
                           str(tmp_path / "pannuke"), "--dataset_mode", "pannuke", "--out_dir", str(tmp_path / "bad")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{masks}: shape (1, 32, 32, 4), expected [N, H, W, 6]" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_hovernet_train_reads_the_formats_as_distributed(dataset, tmp_path):
    """issue 22 #15: hovernet_train.py --dataset_mode pannuke|conic|lizard trains on the dataset as
    distributed (1 CPU step of the small network; Train = folds 1 and 2)."""
    mode, root = dataset
    record = _script("hovernet_train").main(["--data_dir", root, "--dataset_mode", mode, "--out_dir", str(tmp_path / "run"),
                                             "--arch", "small", "--width", "4", "--crop_size", "32", "--batch_size", "1",
                                             "--steps", "1", "--progress", "false"])
    assert record["steps"] == 1 and (tmp_path / "run" / "model.safetensors").exists()


def test_split_overlap_of_a_dataset_read_as_distributed(tmp_path):
    """The held-out check of the nucleus commands compares folds for pannuke/conic/lizard."""
    from guided_diffusion.downstream.data import RealSplits, split_overlap

    write_pannuke(str(tmp_path))
    assert split_overlap(RealSplits(data_dir=str(tmp_path), dataset_mode="pannuke"), {}) is None
    clash = RealSplits(data_dir=str(tmp_path), dataset_mode="pannuke", train_split="fold1,fold3")
    assert "--test_split Test: its folds of" in split_overlap(clash, {})
    whole = RealSplits(data_dir=str(tmp_path / "Fold 1"), dataset_mode="pannuke")
    assert "also training data" in split_overlap(whole, {})
