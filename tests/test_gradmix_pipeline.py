"""GradMix over a tiny toy dataset: CLI end to end, output layout, resume, seeds, class counts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from guided_diffusion.data.classes import CONSEP
from guided_diffusion.data.labels import instance_table
from guided_diffusion.data.patches import list_virtual_maps
from guided_diffusion.data.readers import read_label_file
from guided_diffusion.data.toy import ToyConfig, make_toy_dataset
from guided_diffusion.gradmix import GradMixConfig, run_gradmix
from guided_diffusion.infra import fileio
from guided_diffusion.infra.errors import DiffMixError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gradmix.py"
FAST = dict(margin=10, progress=False, verbose=False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    """Three 128 px toy tiles (CoNSeP raw ids) with enough 'other' (class 1) nuclei to act as donors."""
    root = tmp_path_factory.mktemp("toy")
    cfg = ToyConfig(density=12.0, class_probs=(0.2, 0.3, 0.25, 0.25))
    make_toy_dataset(str(root), num_train=3, num_test=0, size=128, seed=3, config=cfg, progress=False)
    return str(root)


def load_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gradmix_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_cli_end_to_end_and_resume(toy, tmp_path, capsys):
    cli = load_cli()
    out = tmp_path / "out"
    argv = ["--data_dir", toy, "--dataset_mode", "consep", "--out_dir", str(out), "--margin", "10",
            "--kinds", "balance,enlarge", "--num_maps", "2", "--write_images", "true", "--progress", "false"]
    summary = cli.main(argv)
    assert len(summary["written"]) == 12 and not summary["skipped"]
    stems = ["toy_train_000", "toy_train_001", "toy_train_002"]
    names = {f"{s}__{k}{i:03d}" for s in stems for k in ("balance", "enlarge") for i in range(2)}
    assert {p.stem for p in (out / "Labels").iterdir()} == names
    assert {p.stem for p in (out / "Records").iterdir()} == names
    assert {p.stem for p in (out / "Images").iterdir()} == {n for n in names if "balance" in n}
    # The sampler's listing accepts every name.
    assert {m[0] for m in list_virtual_maps(str(out))} == names
    printed = capsys.readouterr().out
    assert "before" in printed and "12 maps written" in printed
    assert (out / "class_counts.csv").read_text().startswith("class_id,class_name,before,after")
    assert (out / "class_counts.png").stat().st_size > 1000

    for name in names:
        rec = fileio.read_json(str(out / "Records" / f"{name}.json"))
        assert rec["source_stem"] == name.split("__")[0] and rec["seed"] == 0
        assert rec["source_image"].endswith(".png") and rec["source_label"].endswith(".mat")
        assert rec["kind"] in name and rec["settings"]["margin"] == 10
        mat = fileio.read_mat(str(out / "Labels" / f"{name}.mat"))
        assert int(mat["classes_merged"].ravel()[0]) == 1 and int(mat["num_classes"].ravel()[0]) == 5
        # Derived keys agree with the maps they were written with.
        ids, types, cents = instance_table(mat["inst_map"], mat["type_map"])
        np.testing.assert_array_equal(mat["inst_type"].ravel(), types)
        np.testing.assert_allclose(mat["inst_centroid"], cents)
        # The record's class counts are those of the written map.
        np.testing.assert_array_equal(rec["class_counts"]["output"], np.bincount(types, minlength=5))
        # Readers see already-merged classes and do not merge them again.
        inst, typ = read_label_file(str(out / "Labels" / f"{name}.mat"), CONSEP)
        np.testing.assert_array_equal(typ, mat["type_map"])
        assert typ.max() <= 4

    before = mtimes(out)
    again = cli.main(argv)
    assert again["written"] == [] and len(again["skipped"]) == 12
    assert {p: t for p, t in mtimes(out).items() if "class_counts" not in p.name} == {
        p: t for p, t in before.items() if "class_counts" not in p.name
    }


def test_incomplete_map_is_redone_and_results_do_not_depend_on_order(toy, tmp_path):
    full = tmp_path / "full"
    run_gradmix(GradMixConfig(data_dir=toy, dataset_mode="consep", out_dir=str(full), num_balance=2, **FAST))
    # A map whose record is missing counts as not done: remove one record, rerun, same bytes back.
    name = "toy_train_001__balance001"
    label = full / "Labels" / f"{name}.mat"
    kept = fileio.read_mat(str(label))
    os.remove(full / "Records" / f"{name}.json")
    redo = run_gradmix(GradMixConfig(data_dir=toy, dataset_mode="consep", out_dir=str(full), num_balance=2, **FAST))
    assert redo["written"] == [name] and len(redo["skipped"]) == 5
    np.testing.assert_array_equal(fileio.read_mat(str(label))["inst_map"], kept["inst_map"])
    # Only one stem, in a fresh folder: its maps are identical (per-map seeds, donors from the split).
    one = tmp_path / "one"
    run_gradmix(GradMixConfig(data_dir=toy, dataset_mode="consep", out_dir=str(one), num_balance=2, stems="toy_train_001", **FAST))
    for k in range(2):
        a = fileio.read_mat(str(full / "Labels" / f"toy_train_001__balance{k:03d}.mat"))
        b = fileio.read_mat(str(one / "Labels" / f"toy_train_001__balance{k:03d}.mat"))
        np.testing.assert_array_equal(a["inst_map"], b["inst_map"])
        np.testing.assert_array_equal(a["type_map"], b["type_map"])
    # A different seed gives a different map.
    other = tmp_path / "other"
    run_gradmix(GradMixConfig(data_dir=toy, dataset_mode="consep", out_dir=str(other), num_balance=1, seed=1, stems="toy_train_001", **FAST))
    a = fileio.read_json(str(full / "Records" / "toy_train_001__balance000.json"))["edits"]
    b = fileio.read_json(str(other / "Records" / "toy_train_001__balance000.json"))["edits"]
    assert a != b


def test_balancing_raises_the_minor_class_count_on_toy_data(toy, tmp_path):
    summary = run_gradmix(GradMixConfig(data_dir=toy, dataset_mode="consep", out_dir=str(tmp_path / "out"), num_balance=2, **FAST))
    before, after = summary["counts"]["before"], summary["counts"]["after"]
    replaced = 0
    for name in summary["written"]:
        rec = fileio.read_json(str(tmp_path / "out" / "Records" / f"{name}.json"))
        replaced += rec["summary"]["replaced"]
        for e in rec["edits"]:
            assert e["target_class"] in (2, 3, 4)
            if e["donor_image"] is not None:
                assert e["donor_class"] == 1 and 2.3 * e["donor_area"] <= e["dilated_area"]
    assert replaced > 0
    assert after[1] - before[1] == replaced  # every replacement adds one minor nucleus ...
    assert before[2:].sum() - after[2:].sum() == replaced  # ... and removes one major one
    assert after.sum() == before.sum()


def test_bad_input_is_a_clear_error(toy, tmp_path, capsys):
    with pytest.raises(DiffMixError, match="classes \\[7\\] do not exist"):
        run_gradmix(GradMixConfig(data_dir=toy, dataset_mode="consep", out_dir=str(tmp_path / "a"), minor="7", **FAST))
    with pytest.raises(DiffMixError, match="both minor and major"):
        run_gradmix(GradMixConfig(data_dir=toy, dataset_mode="consep", out_dir=str(tmp_path / "a"), minor="1,2", major="2,3", **FAST))
    with pytest.raises(DiffMixError, match="stems not found"):
        run_gradmix(GradMixConfig(data_dir=toy, dataset_mode="consep", out_dir=str(tmp_path / "a"), stems="nope", **FAST))
    run_gradmix(GradMixConfig(data_dir=toy, dataset_mode="consep", out_dir=str(tmp_path / "b"), stems="toy_train_000", **FAST))
    with pytest.raises(DiffMixError, match="other settings \\(fraction"):
        run_gradmix(GradMixConfig(data_dir=toy, dataset_mode="consep", out_dir=str(tmp_path / "b"), stems="toy_train_000", fraction=0.5, **FAST))
    # The CLI reports user errors in one line, without a traceback (in-process: run_cli is what
    # the script's __main__ calls).
    from guided_diffusion.infra.errors import run_cli

    cli = load_cli()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: cli.main(["--data_dir", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "c")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        run_cli(lambda: cli.main(["--data_dir", toy, "--out_dir", str(tmp_path / "c"), "--kinds", "mix"]))
    assert "--kinds 'mix'" in capsys.readouterr().err
    assert 'run_cli(main)' in SCRIPT.read_text()


def test_real_patches_custom_mode(fixtures_dir, tmp_path):
    """Real H&E patches: non-contiguous ids, imgs/masks folders, a custom 6-class table."""
    out = tmp_path / "real"
    summary = run_gradmix(GradMixConfig(data_dir=str(fixtures_dir / "real_he_patches"), dataset_mode="custom", out_dir=str(out), num_classes=6, image_folder="imgs", label_folder="masks", write_images=True, **FAST))
    assert summary["settings"]["major"] == [2, 3, 4, 5]
    before, after = summary["counts"]["before"], summary["counts"]["after"]
    assert after[1] > before[1] and after.sum() == before.sum()
    for stem in ("patch1", "patch2", "patch3"):
        mat = fileio.read_mat(str(out / "Labels" / f"{stem}__balance000.mat"))
        src = fileio.read_mat(str(fixtures_dir / "real_he_patches" / "masks" / f"{stem}.mat"))
        ids, types, _ = instance_table(mat["inst_map"], mat["type_map"])
        # Ids are kept (a replaced nucleus keeps its target's id), none invented or lost.
        np.testing.assert_array_equal(ids, instance_table(src["inst_map"], src["type_map"])[0])
        np.testing.assert_array_equal(mat["inst_type"].ravel(), types)
        image = fileio.read_image(str(out / "Images" / f"{stem}__balance000.png"))
        assert image.shape == (256, 256, 3)


def test_unreadable_image_leaves_no_half_written_map(toy, tmp_path, capsys):
    """A truncated PNG stops the run before any file of the failing map is written, and the
    statistics of the output count only complete maps."""
    import shutil
    import sys

    data = tmp_path / "data"
    shutil.copytree(toy, data)
    png = data / "Train" / "Images" / "toy_train_002.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(DiffMixError, match="toy_train_002.png"):
        run_gradmix(GradMixConfig(data_dir=str(data), dataset_mode="consep", out_dir=str(out), num_balance=1, write_images=True, **FAST))
    labels = {p.stem for p in (out / "Labels").glob("*.mat")}
    records = {p.stem for p in (out / "Records").glob("*.json")}
    assert labels == records
    assert {p.stem for p in (out / "Images").glob("*.png")} == records
    # Without write_images the images are never read: the same data then runs through.
    done = run_gradmix(GradMixConfig(data_dir=str(data), dataset_mode="consep", out_dir=str(out), num_balance=1, **FAST))
    assert len(done["written"]) + len(done["skipped"]) == 3
    # An unfinished map (e.g. a run killed between its files) is not counted by the statistics.
    from guided_diffusion.data.labels import write_label_mat

    inst = np.zeros((8, 8), np.int32)
    inst[2:4, 2:4] = 1
    write_label_mat(str(out / "Labels" / "toy_train_002__balance001.mat"), inst, (inst > 0).astype(np.int32) * 2,
                    classes_merged=np.array(1), num_classes=np.array(5))
    sys.path.insert(0, str(REPO / "scripts"))
    import dataset_stats

    capsys.readouterr()
    dataset_stats.main(["--label_dir", str(out), "--out_dir", str(tmp_path / "stats")])
    printed = capsys.readouterr().out
    assert "skipped 1 incomplete GradMix map " in printed and "(3 maps)" in printed


def test_cli_messages_name_the_flag_and_count_properly(toy, tmp_path, capsys):
    cli = load_cli()
    with pytest.raises(DiffMixError, match="^--num_maps must be >= 0, got -1$"):
        cli.main(["--data_dir", toy, "--out_dir", str(tmp_path / "a"), "--num_maps", "-1"])
    cli.main(["--data_dir", toy, "--out_dir", str(tmp_path / "a"), "--stems", "toy_train_000", "--margin", "10",
              "--stats", "false", "--progress", "false"])
    assert "1 map written, 0 already complete" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in shown and "default 1)" not in shown
    assert "minor classes, e.g. 1 or 1,2; default: the dataset's rare classes" in shown and "--split SPLIT split folder" in shown
