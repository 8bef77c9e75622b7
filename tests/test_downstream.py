"""Downstream HoVer-Net (MONAI): targets, post-processing, training, predictions, fidelity, the study."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("skimage")

from conftest import load_script  # noqa: E402
from guided_diffusion.data.classes import CONSEP, identity_table  # noqa: E402
from guided_diffusion.data.readers import read_dataset  # noqa: E402
from guided_diffusion.data.toy import make_toy_dataset  # noqa: E402
from guided_diffusion.downstream.nets import NetConfig, build_network  # noqa: E402
from guided_diffusion.downstream.targets import HV, NC, NP, hover_maps, hovernet_targets  # noqa: E402
from guided_diffusion.infra import fileio  # noqa: E402
from guided_diffusion.infra.errors import DiffMixError, run_cli  # noqa: E402
from guided_diffusion.synthesis.outputs import hovernet_patch  # noqa: E402


def disks(size, spec):
    """inst/type int64 [size, size] from (cy, cx, r, id, type) disks; later disks cover earlier ones."""
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int64)
    types = np.zeros((size, size), np.int64)
    for cy, cx, r, i, t in spec:
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        inst[m], types[m] = i, t
    return inst, types


def clean_outputs(inst, types, num_classes):
    """Network-like outputs that are the targets themselves (logits +-10 for the one-hot maps)."""
    t = hovernet_targets(torch.from_numpy(inst)[None], torch.from_numpy(types)[None], num_classes)
    return {NP: t[NP][0] * 20 - 10, HV: t[HV][0], NC: t[NC][0] * 20 - 10}


# ------------------------------------------------------------------------------------------ targets


def test_hover_maps_of_a_hand_made_instance_map():
    inst = np.zeros((12, 12), np.int64)
    inst[2:5, 3:8] = 40  # 3 rows x 5 columns, centroid (y 3, x 5); ids need not be contiguous
    inst[8:10, 8:10] = 7  # 2 x 2, centroid (8.5, 8.5)
    hv = hover_maps(inst)
    assert hv.shape == (2, 12, 12) and hv.dtype == np.float32
    np.testing.assert_allclose(hv[0, 3, 3:8], [-1, -0.5, 0, 0.5, 1])  # horizontal: x distance, scaled per side
    np.testing.assert_allclose(hv[1, 2:5, 5], [-1, 0, 1])  # vertical: y distance
    np.testing.assert_allclose(hv[:, 8:10, 8:10], [[[-1, 1], [-1, 1]], [[-1, -1], [1, 1]]])
    assert np.all(hv[:, inst == 0] == 0)

    types = np.where(inst == 40, 3, np.where(inst == 7, 1, 0))
    t = hovernet_targets(torch.from_numpy(inst)[None], torch.from_numpy(types)[None], 5)
    assert t[NP].shape == (1, 2, 12, 12) and t[NC].shape == (1, 5, 12, 12)
    assert torch.equal(t[NP][0, 1], torch.from_numpy(inst > 0).float())
    assert torch.equal(t[NC][0].argmax(0), torch.from_numpy(types))
    assert torch.equal(t[HV][0], torch.from_numpy(hv))


def test_postprocessing_of_a_clean_prediction_recovers_its_instances():
    from guided_diffusion.downstream.predict import postprocess
    from guided_diffusion.metrics import instance_metrics

    # two touching nuclei (must be split by the HV gradients) and a separate one
    inst, types = disks(64, [(15, 15, 7, 10, 1), (15, 29, 7, 20, 2), (45, 40, 9, 30, 4)])
    pred_inst, pred_types = postprocess(clean_outputs(inst, types, 5))
    assert pred_inst.dtype == np.int32 and sorted(np.unique(pred_inst)) == [0, 1, 2, 3]
    assert instance_metrics(inst, pred_inst) == pytest.approx(dict(dice=1, aji=1, aji_plus=1, dq=1, sq=1, pq=1))
    for k in (1, 2, 3):
        (true_id,) = np.unique(inst[pred_inst == k])
        assert set(np.unique(pred_types[pred_inst == k])) == set(np.unique(types[inst == true_id]))

    empty = np.zeros((32, 32), np.int64)
    e_inst, e_types = postprocess(clean_outputs(empty, empty, 5))
    assert not e_inst.any() and not e_types.any()


def test_diagnosis_tells_a_flat_hv_branch_from_a_failed_nucleus_mask():
    from guided_diffusion.downstream.diagnose import stage_scores

    inst, types = disks(64, [(15, 15, 7, 10, 1), (15, 29, 7, 20, 2), (45, 40, 9, 30, 4)])
    clean = stage_scores(clean_outputs(inst, types, 5), inst)
    assert clean["np_dice"] == 1 and clean["instance_dice"] == 1 and clean["hv_corr"] > 0.99
    assert clean["true_nuclei"] == clean["markers"] == clean["predicted_nuclei"] == 3
    assert clean["border_energy_median"] < 0.4

    # the NP branch still right, the HV maps no longer pointing to centroids: the watershed loses nuclei
    flat = clean_outputs(inst, types, 5)
    flat[HV] = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (2, 64, 64)).astype(np.float32))
    bad = stage_scores(flat, inst)
    assert bad["np_dice"] == 1 and abs(bad["hv_corr"]) < 0.2
    assert bad["markers"] == bad["predicted_nuclei"] == 0 and bad["instance_dice"] == 0 and bad["border_energy_median"] > 0.4


def test_pixel_counts_of_clean_and_mistyped_maps():
    from guided_diffusion.downstream.diagnose import pixel_counts

    inst, types = disks(32, [(8, 8, 5, 1, 1), (22, 22, 6, 2, 3)])
    clean = pixel_counts(clean_outputs(inst, types, 5), inst, types, 5)
    n1, n3 = int((types == 1).sum()), int((types == 3).sum())
    assert clean.tolist() == [[n1 + n3, 0, 0], [n1, 0, 0], [0, 0, 0], [n3, 0, 0], [0, 0, 0]]
    wrong = pixel_counts(clean_outputs(inst, np.where(types == 3, 4, types), 5), inst, types, 5)
    assert wrong[0].tolist() == [n1 + n3, 0, 0] and wrong[3].tolist() == [0, 0, n3] and wrong[4].tolist() == [0, n3, 0]


# ------------------------------------------------------------------------------------------ training


def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch():
    from monai.apps.pathology.losses import HoVerNetLoss

    torch.manual_seed(0)
    inst, types = disks(32, [(8, 8, 5, 1, 1), (8, 19, 5, 2, 2), (22, 20, 6, 3, 3)])
    x = torch.from_numpy(np.where(inst > 0, -0.6, 0.6)).float()[None, None].repeat(2, 3, 1, 1)
    x += 0.05 * torch.randn_like(x)
    targets = hovernet_targets(torch.from_numpy(inst)[None].repeat(2, 1, 1), torch.from_numpy(types)[None].repeat(2, 1, 1), 4)
    model = build_network(NetConfig("small", 4, width=4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = HoVerNetLoss()
    losses = []
    for _ in range(12):
        loss = loss_fn(model(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


def test_batches_mix_the_requested_synthetic_share_deterministically(toy):
    from guided_diffusion.data.training import TrainCropDataset
    from guided_diffusion.downstream.data import MixedBatches

    real = read_dataset(toy, CONSEP, "Train", progress=False)
    pool = TrainCropDataset(real, 32)
    mix = MixedBatches(pool, pool, batch_size=4, fraction=0.3, seed=5, num_classes=5)
    counts = [mix.n_synthetic(k) for k in range(10)]
    assert sum(counts) == 12 and set(counts) <= {1, 2}
    x1, t1, n1 = mix.batch(3)
    x2, t2, n2 = mix.batch(3)
    assert n1 == n2 == counts[3] and torch.equal(x1, x2) and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert x1.shape == (4, 3, 32, 32) and t1[NC].shape == (4, 5, 32, 32)
    assert not torch.equal(mix.batch(4)[0], x1)


# ------------------------------------------------------------------------------------------ data


@pytest.fixture
def toy(tmp_path):
    root = str(tmp_path / "toy")
    make_toy_dataset(root, num_train=3, num_test=2, size=64, seed=0, progress=False)
    return root


def write_npy_folder(folder, samples, type_fn=None):
    """HoVer-Net .npy patches (merged classes) of labelled images; ``type_fn`` may alter the types."""
    os.makedirs(folder, exist_ok=True)
    for s in samples:
        types = s.type_map if type_fn is None else type_fn(s.type_map)
        np.save(os.path.join(folder, s.files.stem + ".npy"), hovernet_patch(s.image, s.inst_map, types))
    return str(folder)


class Oracle(torch.nn.Module):
    """A 'network' that returns stored outputs for known images (looked up by pixel sum): lets the
    prediction, evaluation and fidelity code run on non-trivial predictions without training."""

    def __init__(self, outputs_by_image):
        super().__init__()
        self.table = {self.key(x): out for x, out in outputs_by_image}

    @staticmethod
    def key(x):
        return round(float(x.double().sum()), 2)

    def forward(self, x):
        outs = [self.table[self.key(xi)] for xi in x]
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}


def imperfect_oracle(samples):
    """Predicts each image's true nuclei, except that odd instances get the wrong class."""
    from guided_diffusion.data.training import image_to_tensor

    pairs = []
    for s in samples:
        types = np.where(s.inst_map % 2 == 1, s.type_map % 4 + (s.type_map > 0), s.type_map)
        pairs.append((image_to_tensor(s.image), clean_outputs(s.inst_map.astype(np.int64), types.astype(np.int64), 5)))
    return Oracle(pairs)


def test_predictions_round_trip_through_evaluate(toy, tmp_path):
    import importlib.util

    from guided_diffusion.downstream.predict import predict_arrays, write_predictions
    from guided_diffusion.metrics import instance_metrics

    test = read_dataset(toy, CONSEP, "Test", progress=False)
    model, net = imperfect_oracle(test), NetConfig("small", 5)
    out = str(tmp_path / "pred")
    written = write_predictions(model, net, toy, out, "Test", 256, torch.device("cpu"), progress=False)
    assert [os.path.basename(p) for p in written] == [s.files.stem + ".mat" for s in test]
    mat = fileio.read_mat(written[0])
    assert {"inst_map", "type_map", "inst_type", "inst_centroid"} <= set(mat)

    spec = importlib.util.spec_from_file_location("evaluate_cli", "scripts/evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    result = cli.main(["--true_dir", os.path.join(toy, "Test", "Labels"), "--pred_dir", out,
                       "--dataset_mode", "consep", "--no_progress"])
    in_memory = [instance_metrics(s.inst_map, inst) for s, (_, inst, _) in
                 zip(test, predict_arrays(model, net, [(s.files.stem, s.image) for s in test], 256, torch.device("cpu")))]
    for k in ("dice", "aji", "pq"):
        assert result["instance"][k] == pytest.approx(np.mean([m[k] for m in in_memory]))
    assert result["instance"]["pq"] > 0.7  # the post-processing recovers most toy nuclei
    cls = result["classification"]
    assert cls["f1_detection"] > 0.8 and 0.2 < cls["type_accuracy"] < 0.9  # odd instances were mistyped


# ------------------------------------------------------------------------------------------ fidelity


def test_fidelity_of_synthetic_patches_equal_to_the_real_images_is_one(toy, tmp_path):
    from guided_diffusion.downstream.fidelity import measure_fidelity

    test = read_dataset(toy, CONSEP, "Test", progress=False)
    same = write_npy_folder(tmp_path / "same", test)
    model, net = imperfect_oracle(test), NetConfig("small", 5)
    out = str(tmp_path / "fid")
    r = measure_fidelity(model, net, CONSEP, [same], toy, out, "Test", 256, torch.device("cpu"), progress=False)
    assert r["synthetic"] == r["real"]
    assert 0.3 < r["real"]["pq"] < 1 and r["real"]["f1_type"]["3"] < 1  # a non-trivial score
    defined = [v for v in [r["fidelity"][k] for k in ("dice", "aji", "pq", "f1_detection")]
               + list(r["fidelity"]["f1_type"].values()) if v is not None]
    assert len(defined) >= 6 and all(v == pytest.approx(1.0) for v in defined)
    for name in ("fidelity.json", "fidelity.md", "fidelity_grid.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert r["figure"] == "fidelity_grid.png" and "(fidelity_grid.png)" in open(os.path.join(out, "fidelity.md")).read()

    # intended maps that disagree with the images (every epithelial nucleus relabelled spindle)
    wrong = write_npy_folder(tmp_path / "wrong", test, lambda t: np.where(t == 3, 4, t))
    r2 = measure_fidelity(model, net, CONSEP, [wrong], toy, str(tmp_path / "fid2"), "Test", 256, torch.device("cpu"),
                          progress=False)
    assert r2["synthetic"]["dice"] == r["synthetic"]["dice"]  # same nuclei, other classes
    assert r2["fidelity"]["f1_type"]["3"] in (None, 0.0) and r2["fidelity"]["f1_type"]["4"] < 1


def test_fidelity_with_grid_rows_zero_writes_and_mentions_no_figure(toy, tmp_path):
    from guided_diffusion.downstream.fidelity import measure_fidelity

    test = read_dataset(toy, CONSEP, "Test", progress=False)
    model, net = imperfect_oracle(test), NetConfig("small", 5)
    args = (model, net, CONSEP, [write_npy_folder(tmp_path / "same", test)], toy)
    out = tmp_path / "fid"
    r = measure_fidelity(*args, str(out), "Test", 256, torch.device("cpu"), grid_rows=0, progress=False)
    assert r["figure"] is None and not (out / "fidelity_grid.png").exists()
    for name in ("fidelity.md", "fidelity.json"):
        assert "fidelity_grid" not in (out / name).read_text()
    with pytest.raises(DiffMixError, match="--grid_rows -2"):  # would slice patches from the end
        measure_fidelity(*args, str(tmp_path / "neg"), "Test", 256, torch.device("cpu"), grid_rows=-2, progress=False)
    assert not (tmp_path / "neg").exists()


def test_in_memory_patch_scorer_scores_as_the_fidelity_check(toy, tmp_path):
    from guided_diffusion.downstream.fidelity import measure_fidelity, patch_scorer

    test = read_dataset(toy, CONSEP, "Test", progress=False)
    model, net = imperfect_oracle(test), NetConfig("small", 5)
    r = measure_fidelity(model, net, CONSEP, [write_npy_folder(tmp_path / "same", test)], toy, str(tmp_path / "fid"),
                         "Test", 256, torch.device("cpu"), progress=False)
    score = patch_scorer(model, net, CONSEP, 256, torch.device("cpu"))
    got = score(np.stack([s.image for s in test]), np.stack([s.inst_map for s in test]),
                np.stack([s.type_map for s in test]))
    for k in ("dice", "aji", "pq", "f1_detection"):
        assert got[k] == pytest.approx(r["synthetic"][k])
    for c, name in enumerate(CONSEP.names):
        if c and r["synthetic"]["f1_type"].get(str(c)) is not None:
            assert got[f"f1_{name}"] == pytest.approx(r["synthetic"]["f1_type"][str(c)])
    assert got["f1_detection"] > 0.8
    with pytest.raises(DiffMixError, match="predicts 3 classes"):
        patch_scorer(model, NetConfig("small", 3), CONSEP, 256, torch.device("cpu"))


# ------------------------------------------------------------------------------------------ the study


def study_argv(toy, balance, enlarge, out):
    return ["--data_dir", toy, "--dataset_mode", "consep", "--balance_dirs", balance, "--enlarge_dirs", enlarge,
            "--preset", "quick", "--out_dir", out, "--num_threads", "1", "--progress", "false"]


def synthetic_sources(toy, tmp_path):
    train = read_dataset(toy, CONSEP, "Train", progress=False)
    balance = tmp_path / "synth" / "balance"  # laid out like an image_sample.py run folder
    write_npy_folder(balance / "npy_patch", train, lambda t: np.where(t == 2, 1, t))
    fileio.write_json(str(balance / "run.json"), {"model_config": {"num_classes": 5}})
    enlarge = write_npy_folder(tmp_path / "synth" / "enlarge", train[:2])
    return str(balance), enlarge


def test_study_quick_preset_runs_end_to_end_and_resumes_without_recomputing(toy, tmp_path):
    study = load_script("utility_study")
    balance, enlarge = synthetic_sources(toy, tmp_path)
    out = str(tmp_path / "study")
    result = study.main(study_argv(toy, balance, enlarge, out))
    runs = result["runs"]
    assert [(r["arm"], r["seed"]) for r in runs] == [(a, s) for a in ("real", "balance", "balance_enlarge") for s in (0, 1)]
    assert all(r["synthetic_items"] == 0 for r in runs if r["arm"] == "real")
    assert all(r["synthetic_items"] > 0 for r in runs if r["arm"] != "real")
    for name in ("report.md", "table.md", "results.csv", "summary.json", "f1_per_class.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    report = open(os.path.join(out, "report.md")).read()
    assert "scripts/hovernet_train.py" in report and "real + DiffMix balancing + enlarging" in report
    assert "pixel F1 other" in report and all(0 <= r["pixel"]["np_dice"] <= 1 for r in runs)
    assert "--seed 1" in report and "F1 other" in report
    # the recorded training command reproduces the run's settings
    import argparse
    import shlex

    from guided_diffusion.infra.config import add_dataclass_args, dataclass_from_args
    from guided_diffusion.downstream.train import HoverTrainConfig

    r = runs[-1]
    parser = add_dataclass_args(argparse.ArgumentParser(), HoverTrainConfig)
    replayed = dataclass_from_args(HoverTrainConfig, parser.parse_args(shlex.split(r["commands"][0])[2:]))
    saved = fileio.read_json(os.path.join(out, "runs", r["arm"], f"seed{r['seed']}", "train", "config.json"))
    assert replayed.identity() == saved["settings"]

    finished = [os.path.join(out, "runs", r["arm"], f"seed{r['seed']}", p) for r in runs
                for p in ("result.json", "train/model.safetensors", "train/train_state.pt", "pred")]
    before = {p: os.stat(p).st_mtime_ns for p in finished}
    again = study.main(study_argv(toy, balance, enlarge, out))
    assert {p: os.stat(p).st_mtime_ns for p in finished} == before
    assert again["summary"] == result["summary"]

    # a result from before the pixel scores gets them added; nothing is retrained or predicted again
    old_result = os.path.join(out, "runs", "real", "seed0", "result.json")
    row = fileio.read_json(old_result)
    fileio.write_json(old_result, {k: v for k, v in row.items() if k != "pixel"})
    third = study.main(study_argv(toy, balance, enlarge, out))
    assert fileio.read_json(old_result)["pixel"] == row["pixel"] and third["summary"] == result["summary"]
    assert {p: os.stat(p).st_mtime_ns for p in finished if "result.json" not in p} == \
           {p: t for p, t in before.items() if "result.json" not in p}

    # the diagnosis of a finished run: its instance Dice is the one the study measured
    diag = load_script("hovernet_diagnose").main(
        ["--run_dir", os.path.join(out, "runs", "real", "seed0", "train"), "--data_dir", toy, "--split", "Test",
         "--tile", "64", "--progress", "false", "--out_json", str(tmp_path / "diag.json")])
    assert diag["n_images"] == 2 and len(fileio.read_json(str(tmp_path / "diag.json"))["images"]) == 2
    assert diag["mean"]["instance_dice"] == pytest.approx(runs[0]["dice"])


def test_study_runs_in_parallel_worker_processes_with_the_sequential_results(toy, tmp_path):
    from guided_diffusion.downstream.study import StudyConfig, run_parallel

    study = load_script("utility_study")
    picks = ["--arms", "real", "--seeds", "0,1"]
    one = study.main(study_argv(toy, "", "", str(tmp_path / "one")) + picks)
    two = study.main(study_argv(toy, "", "", str(tmp_path / "two")) + picks + ["--jobs", "2"])
    assert [(r["arm"], r["seed"]) for r in two["runs"]] == [("real", 0), ("real", 1)]
    keys = ("dice", "aji", "pq", "f1_detection", "f1_type", "final_loss")
    assert [{k: r[k] for k in keys} for r in one["runs"]] == [{k: r[k] for k in keys} for r in two["runs"]]
    assert all(os.path.exists(tmp_path / "two" / "runs" / "real" / f"seed{k}" / "worker.log") for k in (0, 1))
    # a failing worker is reported with the last line of its log; the others still finish
    cfg = StudyConfig(data_dir=str(tmp_path / "gone"), preset="quick", arms="real", out_dir=str(tmp_path / "three"),
                      jobs=2)
    with pytest.raises(DiffMixError, match=r"2 of 2 runs failed: real seed 0 \(exit 2, .*worker.log: error: .*gone"):
        run_parallel(cfg, [("real", 0), ("real", 1)])


def test_study_adds_synthetic_arms_to_a_real_only_study_without_recomputing(toy, tmp_path):
    """A study begun with the real arm alone (no synthetic sources yet) takes the synthetic arms and
    their sources later; the finished real runs are kept, a changed source is still refused."""
    study = load_script("utility_study")
    balance, enlarge = synthetic_sources(toy, tmp_path)
    out = str(tmp_path / "study")
    real_only = study_argv(toy, "", "", out) + ["--arms", "real", "--seeds", "0"]
    study.main(real_only)
    result_path = os.path.join(out, "runs", "real", "seed0", "result.json")
    before = os.stat(result_path).st_mtime_ns
    result = study.main(study_argv(toy, balance, "", out) + ["--arms", "real,balance", "--seeds", "0"])
    assert [(r["arm"], r["seed"]) for r in result["runs"]] == [("real", 0), ("balance", 0)]
    assert os.stat(result_path).st_mtime_ns == before
    with pytest.raises(DiffMixError, match="other settings"):
        study.main(study_argv(toy, enlarge, "", out) + ["--arms", "real,balance", "--seeds", "0"])


# ------------------------------------------------------------------------------------------ bad input


def cli_error(capsys, fn):
    with pytest.raises(SystemExit) as exc:
        run_cli(fn)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_bad_sources_give_one_line_errors_and_write_nothing(toy, tmp_path, capsys):
    study = load_script("utility_study")
    train_cli = load_script("hovernet_train")
    balance, enlarge = synthetic_sources(toy, tmp_path)
    out = str(tmp_path / "out")

    err = cli_error(capsys, lambda: study.main(study_argv(toy, str(tmp_path / "nowhere"), enlarge, out)))
    assert "nowhere" in err and "not found" in err and len(err.splitlines()) == 1

    empty = tmp_path / "empty_run"
    (empty / "npy_patch").mkdir(parents=True)
    err = cli_error(capsys, lambda: study.main(study_argv(toy, str(empty), enlarge, out)))
    assert "no .npy patches" in err and str(empty) in err and len(err.splitlines()) == 1

    other = tmp_path / "other_run"  # synthesised by a model with another class count
    write_npy_folder(other / "npy_patch", read_dataset(toy, CONSEP, "Train", progress=False)[:1])
    fileio.write_json(str(other / "run.json"), {"model_config": {"num_classes": 4}})
    err = cli_error(capsys, lambda: study.main(study_argv(toy, str(other), enlarge, out)))
    assert "run.json" in err and "num_classes=4" in err and "num_classes=5" in err

    err = cli_error(capsys, lambda: study.main(study_argv(toy, balance, "", out)))
    assert "--enlarge_dirs" in err

    err = cli_error(capsys, lambda: train_cli.main(["--data_dir", str(tmp_path / "missing"), "--out_dir", out]))
    assert "missing" in err and "not found" in err

    assert not os.path.exists(out)


def test_study_on_a_training_split_runs_only_when_allowed_and_says_so(toy, tmp_path):
    """--test_split Train is refused (tests/test_bad_input.py); --allow_test_overlap True runs it, and
    the report does not call the split held out."""
    study = load_script("utility_study")
    out = str(tmp_path / "study")
    study.main(["--data_dir", toy, "--dataset_mode", "consep", "--arms", "real", "--seeds", "0", "--preset", "quick",
                "--test_split", "Train", "--allow_test_overlap", "True", "--out_dir", out, "--num_threads", "1",
                "--progress", "false"])
    report = open(os.path.join(out, "report.md")).read()
    assert "NOT held out" in report and "held-out `Train`" not in report
    assert "is also training data (--train_split Train" in fileio.read_json(os.path.join(out, "summary.json"))["test_overlap"]


def test_synthetic_types_outside_the_classes_are_rejected(toy, tmp_path, capsys):
    from guided_diffusion.downstream.data import read_synthetic

    train = read_dataset(toy, CONSEP, "Train", progress=False)
    folder = write_npy_folder(tmp_path / "seven", train[:1], lambda t: np.where(t > 0, 7, 0))
    with pytest.raises(Exception) as exc:
        read_synthetic([folder], CONSEP, min_size=32, progress=False)
    assert "type values [7]" in str(exc.value) and "seven" in str(exc.value)
    ok = read_synthetic([write_npy_folder(tmp_path / "fine", train[:1])], identity_table(5), 32, progress=False)
    assert len(ok) == 1 and ok[0].type_map.max() <= 4


def test_hovernet_preset_needs_256_px_crops():
    from guided_diffusion.downstream.train import HoverTrainConfig, validate
    from guided_diffusion.infra.errors import DiffMixError

    with pytest.raises(DiffMixError, match="exactly 256"):
        validate(HoverTrainConfig(data_dir="x", out_dir="y", arch="hovernet", crop_size=128))


def test_an_interrupted_training_resumes_to_the_uninterrupted_weights(toy, tmp_path, monkeypatch):
    from guided_diffusion.infra.checkpoints import load_state_dict
    from guided_diffusion.downstream import data as ddata
    from guided_diffusion.downstream.train import HoverTrainConfig, train_segmenter

    def cfg(out):
        return HoverTrainConfig(data_dir=toy, out_dir=str(out), width=4, crop_size=32, batch_size=2, steps=4,
                                save_interval=2, progress=False)

    train_segmenter(cfg(tmp_path / "straight"))
    original = ddata.MixedBatches.batch

    def interrupt_at_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(ddata.MixedBatches, "batch", interrupt_at_3)
    with pytest.raises(KeyboardInterrupt):
        train_segmenter(cfg(tmp_path / "resumed"))
    assert not os.path.exists(tmp_path / "resumed" / "train.json")
    monkeypatch.setattr(ddata.MixedBatches, "batch", original)
    record = train_segmenter(cfg(tmp_path / "resumed"))
    assert record["steps"] == 4
    a = load_state_dict(str(tmp_path / "straight" / "model.safetensors"))
    b = load_state_dict(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="other settings"):
        train_segmenter(dataclasses.replace(cfg(tmp_path / "resumed"), lr=0.5))
    assert not os.path.exists(tmp_path / "resumed" / ".lock")  # released after training

    # a run folder another live process (pid 1) is training is refused, and left as it is
    import socket
    import time

    busy = tmp_path / "busy"
    os.makedirs(busy)
    fileio.write_json(str(busy / ".lock"), {"pid": 1, "host": socket.gethostname(), "what": "downstream training",
                                            "started": time.time(), "heartbeat": time.time(), "token": "t"})
    with pytest.raises(DiffMixError, match=r"in use by downstream training \(pid 1"):
        train_segmenter(cfg(busy))
    assert sorted(os.listdir(busy)) == [".lock"]


def test_gradmix_image_folders_are_a_synthetic_source(toy, tmp_path):
    """Images/ + Labels/ as gradmix.py --write_images writes them: labels without an image (enlarging
    maps) are not used; labels marked classes_merged are read as merged classes."""
    from guided_diffusion.data.labels import write_label_mat
    from guided_diffusion.downstream.data import read_synthetic

    train = read_dataset(toy, CONSEP, "Train", progress=False)
    root = tmp_path / "gradmix"
    for k, s in enumerate(train):
        name = f"{s.files.stem}__{'balance' if k < 2 else 'enlarge'}000"
        write_label_mat(str(root / "Labels" / (name + ".mat")), s.inst_map, s.type_map,
                        classes_merged=np.array(1), num_classes=np.array(5))
        if k < 2:
            fileio.write_png(str(root / "Images" / (name + ".png")), s.image)
    got = read_synthetic([str(root)], CONSEP, min_size=32, progress=False)
    assert [g.files.stem for g in got] == [f"{s.files.stem}__balance000" for s in train[:2]]
    assert all(np.array_equal(g.type_map, s.type_map) for g, s in zip(got, train))  # not merged twice
