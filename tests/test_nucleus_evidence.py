"""Nucleus-type evidence: crops, the classifier, fidelity, C2ST, KID, CAS and the type study (toy data)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from conftest import load_script  # noqa: E402
from guided_diffusion.data.classes import CONSEP  # noqa: E402
from guided_diffusion.data.readers import LabeledImage, SampleFiles, read_dataset, read_label_file  # noqa: E402
from guided_diffusion.data.toy import ToyConfig, make_toy_dataset  # noqa: E402
from guided_diffusion.downstream.nuclei import crops as C  # noqa: E402
from guided_diffusion.downstream.nuclei.classifier import (  # noqa: E402
    ClassifierConfig, balanced_indices, predict, train_classifier)
from guided_diffusion.downstream.nuclei.evidence import c2st, fidelity_scores, tile_of  # noqa: E402
from guided_diffusion.infra import fileio  # noqa: E402
from guided_diffusion.infra.errors import DiffMixError, run_cli  # noqa: E402
from guided_diffusion.synthesis.outputs import hovernet_patch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(width=8, steps=40, batch_size=16, save_interval=10)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nuclei") / "toy")
    # every class present in both splits (the rare class too), so that GradMix has donors
    make_toy_dataset(root, num_train=3, num_test=2, size=128, seed=3, progress=False,
                     config=ToyConfig(density=12.0, class_probs=(0.2, 0.3, 0.25, 0.25)))
    return root


def fake_run(folder, samples, images=None, label_sources=None, num_classes=5):
    """A folder laid out like an image_sample.py run: npy_patch/, records/ (source image, whole-image
    crop, label source) and run.json. ``images`` replace the synthetic pixels (default: the real ones)."""
    for k, s in enumerate(samples):
        image = s.image if images is None else images[k]
        fileio.write_npy(os.path.join(folder, "npy_patch", s.files.stem + ".npy"),
                         hovernet_patch(image, s.inst_map, s.type_map))
        h, w = s.inst_map.shape
        fileio.write_json(os.path.join(folder, "records", s.files.stem + ".json"), {
            "source_image": s.files.image, "crop": {"x0": 0, "y0": 0, "width": w, "height": h},
            "label_source": s.files.label if label_sources is None else label_sources[k]})
    fileio.write_json(os.path.join(folder, "run.json"), {"model_config": {"num_classes": num_classes}})
    return str(folder)


# ------------------------------------------------------------------------------------------ crops


def test_crops_are_centred_on_the_nucleus_and_zero_outside_the_image():
    image = np.full((20, 20, 3), 200, np.uint8)
    inst = np.zeros((20, 20), np.int32)
    types = np.zeros((20, 20), np.int32)
    inst[9:12, 9:12], types[9:12, 9:12] = 3, 2  # centroid (10, 10)
    inst[0:2, 0:2], types[0:2, 0:2] = 5, 1  # corner nucleus, centroid (0.5, 0.5) -> pixel (1, 1)
    inst[15:17, 15:17] = 8  # untyped: left out
    crops, masks, labels, changed = C.nucleus_crops(image, inst, types, 8, changed=inst == 5)
    assert crops.shape == (2, 8, 8, 3) and labels.tolist() == [2, 1] and changed.tolist() == [False, True]
    assert masks[0, 4, 4] and masks[0][3:6, 3:6].all() and masks[0].sum() == 9  # centred at index size // 2
    # the corner nucleus sits at (1, 1): its crop starts 3 px above/left of the image, which is zero
    assert (crops[1, :3] == 0).all() and (crops[1, :, :3] == 0).all() and (crops[1, 3:, 3:] == 200).all()
    assert masks[1, 3:5, 3:5].all() and masks[1].sum() == 4


def test_tiles_group_patches_cut_from_one_tile():
    assert tile_of("/d/Train/Images/train_13_7.jpg") == "train_13" and tile_of("img.png") == "img"


# ------------------------------------------------------------------------------------------ classifier


def two_class_toy(n, seed):
    """Dark round nuclei (class 1) and pale elongated ones (class 2) on pink, 16 px crops."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]
    crops = np.empty((n, 16, 16, 3), np.uint8)
    labels = rng.integers(1, 3, n)
    for i in range(n):
        bg = np.array([230, 170, 200]) + rng.normal(0, 8, 3)
        img = np.broadcast_to(bg, (16, 16, 3)).copy()
        cy, cx = 8 + rng.normal(0, 1, 2)
        if labels[i] == 1:
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9
            img[m] = [70, 40, 120]
        else:
            m = ((yy - cy) / 2) ** 2 + ((xx - cx) / 6) ** 2 <= 1
            img[m] = [150, 110, 170]
        crops[i] = np.clip(img + rng.normal(0, 6, img.shape), 0, 255)
    return crops, labels


def test_classifier_separates_two_distinguishable_classes():
    crops, labels = two_class_toy(200, 0)
    model, record = train_classifier(ClassifierConfig(**{**TINY, "steps": 60}), crops, labels - 1, 2, progress=False)
    test_crops, test_labels = two_class_toy(200, 1)
    pred = predict(model, test_crops)[0].argmax(1) + 1
    for c in (1, 2):
        assert np.mean(pred[test_labels == c] == c) > 0.9
    assert record["final_loss_mean_last_10pct"] < record["first_loss"]


def test_synthetic_share_caps_synthetic_draws_per_class_and_one_gives_the_plain_draw():
    # class 0: 10 real + 90 synthetic; class 1: 50 real only; class 2: 40 real + 10 synthetic (20 %)
    labels = np.repeat([0, 0, 1, 2, 2], [10, 90, 50, 40, 10])
    synthetic = np.repeat([False, True, False, False, True], [10, 90, 50, 40, 10])
    plain = balanced_indices(labels, 30000, np.random.default_rng(5))
    assert np.array_equal(plain, balanced_indices(labels, 30000, np.random.default_rng(5), synthetic, 1.0))
    idx = balanced_indices(labels, 30000, np.random.default_rng(5), synthetic, 0.3)
    share = {c: synthetic[idx][labels[idx] == c].mean() for c in (0, 2)}
    assert abs(share[0] - 0.3) < 0.015  # capped: 0.9 uncapped
    assert abs(share[2] - 0.2) < 0.015  # under the cap: drawn as without it
    assert not synthetic[idx][labels[idx] == 1].any()
    assert np.allclose(np.bincount(labels[idx]) / idx.size, 1 / 3, atol=0.015)  # still class-balanced
    assert abs(synthetic[plain][labels[plain] == 0].mean() - 0.9) < 0.015


def test_an_interrupted_classifier_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    from guided_diffusion.downstream.nuclei import classifier as K

    crops, labels = two_class_toy(64, 0)
    cfg = ClassifierConfig(**{**TINY, "steps": 20})
    straight, _ = train_classifier(cfg, crops, labels - 1, 2, out_dir=str(tmp_path / "a"), progress=False)
    real_batch = K.batch_at

    def failing(cfg_, c, m, y, step, *rest):
        if step == 15:
            raise KeyboardInterrupt
        return real_batch(cfg_, c, m, y, step, *rest)

    monkeypatch.setattr(K, "batch_at", failing)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(cfg, crops, labels - 1, 2, out_dir=str(tmp_path / "b"), progress=False)
    assert not (tmp_path / "b" / "train.json").exists() and (tmp_path / "b" / "train_state.pt").exists()
    monkeypatch.setattr(K, "batch_at", real_batch)
    resumed, _ = train_classifier(cfg, crops, labels - 1, 2, out_dir=str(tmp_path / "b"), progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(DiffMixError, match="other settings"):
        train_classifier(ClassifierConfig(**{**TINY, "steps": 21}), crops, labels - 1, 2, out_dir=str(tmp_path / "b"),
                         progress=False)


# ------------------------------------------------------------------------------------------ scores


def test_a_class_without_nuclei_is_reported_as_n_zero_without_nan():
    real_true, real_pred = np.array([1, 2, 2, 3]), np.array([1, 2, 3, 3])
    syn_true, syn_pred = np.array([2, 2, 3]), np.array([2, 3, 3])
    out = fidelity_scores(real_true, real_pred, syn_true, syn_pred, [1, 2, 3, 4], changed=np.array([1, 0, 0], bool),
                          n_boot=50)
    assert out[1]["synthetic"]["n"] == 0 and out[1]["synthetic"]["recall"] is None
    assert out[1]["recall_ratio"]["value"] is None and out[4]["real"]["n"] == 0 and out[4]["f1_ratio"]["value"] is None
    assert out[2]["recall_ratio"]["value"] == pytest.approx(1.0)  # 1/2 of each
    assert out[2]["changed"] == {"n": 1, "recall": 1.0, "recall_ratio": 2.0}
    assert "nan" not in json.dumps(out).lower()


def test_c2st_is_near_chance_for_two_real_samples_and_near_one_against_noise(toy):
    samples = read_dataset(toy, CONSEP, "Train", progress=False) + read_dataset(toy, CONSEP, "Test", progress=False)
    patches = np.stack([s.image[y : y + 32, x : x + 32] for s in samples for y in (0, 16, 32) for x in (0, 16, 32)])
    groups = [f"t{k}" for k in range(len(samples)) for _ in range(9)]
    critic = ClassifierConfig(width=8, stem_stride=2, steps=60, batch_size=16, jitter=0.0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(patches))
    a, b = order[: len(order) // 2], order[len(order) // 2 :]
    same = c2st(patches[a], patches[b], [groups[i] for i in a], [groups[i] for i in b], critic, folds=3)
    noise = rng.integers(0, 256, patches.shape, dtype=np.uint8)
    other = c2st(patches, noise, groups, groups, critic, folds=3)
    assert 0.3 <= same["accuracy"] <= 0.7 and same["low"] <= 0.5 <= same["high"]
    assert other["accuracy"] >= 0.95 and same["n_test"] == len(patches) and other["n_test"] == 2 * len(patches)


# ------------------------------------------------------------------------------------------ end to end


def evidence_argv(toy, synth, out, *extra):
    return ["--data_dir", toy, "--dataset_mode", "consep", "--synthetic_dirs", synth, "--out_dir", out,
            "--crop_size", "16", "--c2st_steps", "10", "--c2st_groups", "image", "--n_boot", "50", "--kid_subsets", "5", "--progress", "false",
            *[str(a) for a in extra], *sum(([f"--{k}", str(v)] for k, v in TINY.items()), [])]


def test_fidelity_of_synthetic_patches_equal_to_the_real_images_is_one(toy, tmp_path):
    test = read_dataset(toy, CONSEP, "Test", progress=False)
    synth = fake_run(tmp_path / "synth", test)  # "synthetic" = the real held-out images under their own labels
    out = str(tmp_path / "ev")
    result = load_script("nucleus_evidence").main(evidence_argv(toy, synth, out))
    for c, e in result["fidelity"].items():
        assert e["synthetic"] == e["real"]
        if e["real"]["recall"]:
            assert e["recall_ratio"]["value"] == pytest.approx(1.0) and e["f1_ratio"]["value"] == pytest.approx(1.0)
        assert result["control"][c]["synthetic"] == e["real"]  # the control is the same real pixels
        # identical feature sets: the unbiased MMD estimate is <= 0 (the cross term holds the diagonal)
        assert result["kid"][c]["kid"] is None or result["kid"][c]["kid"] <= 1e-9
    assert result["spectrum"]["ratio"] == pytest.approx([1.0] * len(result["spectrum"]["ratio"]))  # the same pixels
    for name in ("evidence.md", "evidence.json", "predictions.csv", "classifier/train.json", "cas_synthetic/train.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert result["cas"]["n_train"] > 0 and "nan" not in open(os.path.join(out, "evidence.md")).read().lower()
    rows = open(os.path.join(out, "predictions.csv")).read().splitlines()
    assert len(rows) == 1 + sum(sum(result["nuclei"][k]) for k in ("real_test", "synthetic")) * 2 - sum(
        result["nuclei"]["real_test"])  # real test + synthetic + control (= synthetic)


def test_an_exported_classifier_scores_a_run_as_the_evidence_does(toy, tmp_path):
    """export_classifier.py keeps the held-out predictions (heldout.json); run_fidelity (the demo's
    label fidelity) over a run of the real held-out images then finds synthetic == real, ratio 1.
    A folder without heldout.json, or for another number of classes, is refused in one line."""
    import shutil

    from guided_diffusion.data.classes import identity_table
    from guided_diffusion.downstream.nuclei.classifier import HELDOUT, check_classifier_folder, load_classifier
    from guided_diffusion.downstream.nuclei.evidence import run_fidelity

    train_set = C.read_source(toy, CONSEP, 16, split="Train", progress=False)
    run_dir = str(tmp_path / "clf")
    train_classifier(ClassifierConfig(**TINY), train_set.crops, train_set.labels - 1, 4, out_dir=run_dir,
                     meta={"counts": train_set.counts(5)}, progress=False)
    out = str(tmp_path / "exported")
    record = load_script("export_classifier").main(["--run_dir", run_dir, "--data_dir", toy, "--dataset_mode", "consep",
                                                    "--out_dir", out])
    test = read_dataset(toy, CONSEP, "Test", progress=False)
    test_set = C.from_samples(test, 16)
    model, _ = load_classifier(out)
    assert record["n"] == len(test_set) and record["true"] == test_set.labels.tolist()
    assert record["pred"] == (predict(model, test_set.crops)[0].argmax(1) + 1).tolist()

    result = run_fidelity(fake_run(tmp_path / "synth", test), out, CONSEP, n_boot=20)
    assert sum(result["nuclei"]["synthetic"]) == len(test_set)
    for c, e in result["fidelity"].items():
        assert e["synthetic"] == e["real"]
        if e["real"]["recall"]:
            assert e["recall_ratio"]["value"] == pytest.approx(1.0)

    with pytest.raises(DiffMixError, match="the classifier predicts 4 classes, --classifier's data has 3"):
        check_classifier_folder(out, 3, "--classifier")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    os.remove(broken / HELDOUT)
    with pytest.raises(DiffMixError, match=f"{broken}: label fidelity needs an exported classifier folder "
                                           f"\\({HELDOUT} missing"):
        run_fidelity(str(tmp_path / "synth"), str(broken), identity_table(5, CONSEP.names))


def test_changed_nuclei_of_gradmix_maps_are_flagged_and_the_control_keeps_the_real_pixels(toy, tmp_path):
    from guided_diffusion.gradmix import GradMixConfig, changed_ids, read_map_record, run_gradmix

    gm = str(tmp_path / "gm")
    run_gradmix(GradMixConfig(data_dir=toy, dataset_mode="consep", out_dir=gm, write_images=True, margin=4, stats=False, progress=False, verbose=False))
    names = sorted(n[:-4] for n in os.listdir(os.path.join(gm, "Labels")))
    labels = [os.path.join(gm, "Labels", n + ".mat") for n in names]
    placed = sum(len(changed_ids(read_map_record(p))) for p in labels)
    assert placed > 0, "toy GradMix placed no nucleus: the test needs some"
    train = {s.files.stem: s for s in read_dataset(toy, CONSEP, "Train", progress=False)}
    samples = []
    for n, p in zip(names, labels):  # the real source image under each GradMix map
        src = train[n.split("__")[0]]
        samples.append(LabeledImage(SampleFiles(n, src.files.image, p), src.image, *read_label_file(p, CONSEP)))
    noise = [np.random.default_rng(k).integers(0, 256, s.image.shape, dtype=np.uint8) for k, s in enumerate(samples)]
    run = C.read_run(fake_run(tmp_path / "synth", samples, images=noise, label_sources=labels), CONSEP, progress=False)
    nuc, ctl = C.run_nuclei(run, 16), C.control_nuclei(run, 16)
    assert nuc.changed.sum() == placed == ctl.changed.sum()
    assert np.array_equal(nuc.labels, ctl.labels) and np.all(nuc.labels[nuc.changed] == 1)
    real = C.from_samples([train[n.split("__")[0]] for n in names], 16)
    assert not np.array_equal(nuc.crops, ctl.crops) and ctl.crops.mean() == pytest.approx(real.crops.mean(), rel=0.2)
    gm_set = C.read_source(gm, CONSEP, 16, progress=False)  # GradMix images: a source with the same flags
    assert gm_set.changed.sum() == placed


def test_study_quick_preset_runs_end_to_end_and_resumes_without_recomputing(toy, tmp_path, monkeypatch):
    from guided_diffusion.downstream.nuclei import study as S

    train = read_dataset(toy, CONSEP, "Train", progress=False)
    balance = fake_run(tmp_path / "balance", train)
    enlarge = fake_run(tmp_path / "enlarge", train[:1])
    out = str(tmp_path / "study")
    argv = ["--data_dir", toy, "--dataset_mode", "consep", "--balance_dirs", balance, "--enlarge_dirs", enlarge,
            "--preset", "quick", "--crop_size", "16", "--n_boot", "50", "--out_dir", out, "--progress", "false"]
    script = load_script("nucleus_study")
    result = script.main(argv)
    assert result["arms"] == ["real", "balance", "balance_enlarge"] and result["seeds"] == [0, 1]
    assert len(result["runs"]) == 6 and result["classifier"]["steps"] == 20
    for name in ("report.md", "table.md", "results.csv", "summary.json", "f1_per_class.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert "nan" not in open(os.path.join(out, "table.md")).read().lower()
    assert set(result["comparison"]) == {"balance", "balance_enlarge"}
    comp = result["comparison"]["balance"]
    assert comp["seeds"] == [0, 1] and ("per_seed" in comp or "note" in comp)

    def no_training(*a, **k):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(S, "train_classifier", no_training)
    again = script.main(argv)
    assert again["runs"] == result["runs"]
    with pytest.raises(DiffMixError, match="other settings"):
        script.main(argv[:-4] + ["--crop_size", "24"] + argv[-4:])
    with pytest.raises(DiffMixError, match="synthetic_share"):
        script.main(argv + ["--synthetic_share", "0.5"])
    monkeypatch.undo()

    # Capping the synthetic share changes the synthetic arms only: real-only runs are the same runs.
    capped = str(tmp_path / "capped")
    argv_capped = [a if a != out else capped for a in argv] + ["--arms", "real,balance", "--synthetic_share", "0.5"]
    third = script.main(argv_capped)

    def real_scores(res):
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in res["runs"] if r["arm"] == "real"]

    assert real_scores(third) == real_scores(result)
    record = json.load(open(os.path.join(capped, "runs", "balance", "seed0", "config.json")))
    assert record["synthetic_share"] == 0.5
    assert "synthetic nuclei at most 0.5" in open(os.path.join(capped, "report.md")).read()


def test_bad_sources_give_one_line_errors_and_write_nothing(toy, tmp_path, capsys):
    train = read_dataset(toy, CONSEP, "Train", progress=False)
    wrong = fake_run(tmp_path / "wrong", train, num_classes=7)
    cases = [
        (load_script("nucleus_evidence"), evidence_argv(toy, wrong, str(tmp_path / "o1")), "num_classes=7"),
        (load_script("nucleus_evidence"), evidence_argv(toy, toy, str(tmp_path / "o2")), "run folders"),
        (load_script("nucleus_study"), ["--data_dir", toy, "--dataset_mode", "consep", "--balance_dirs", wrong,
                                        "--preset", "quick", "--out_dir", str(tmp_path / "o3")], "num_classes=7"),
        (load_script("nucleus_study"), ["--data_dir", toy, "--dataset_mode", "consep", "--arms", "balance",
                                        "--preset", "quick", "--out_dir", str(tmp_path / "o4")], "--balance_dirs"),
        (load_script("nucleus_evidence"), evidence_argv(toy, f"{wrong},{wrong}/", str(tmp_path / "o6")), "listed twice"),
        (load_script("nucleus_evidence"), evidence_argv(toy, wrong, f"{toy}/Test/out"), "inside the input folder"),
        (load_script("nucleus_evidence"), evidence_argv(toy, wrong, str(tmp_path / "o7"), "--test_split", "Train"),
         "also training data"),
        (load_script("nucleus_study"), ["--data_dir", toy, "--dataset_mode", "consep", "--test_split", "Train",
                                        "--preset", "quick", "--out_dir", str(tmp_path / "o8")], "also training data"),
        (load_script("nucleus_study"), ["--data_dir", toy, "--dataset_mode", "consep", "--seeds", "0,0",
                                        "--preset", "quick", "--out_dir", str(tmp_path / "o5")], "distinct"),
    ]
    for script, argv, expected in cases:
        with pytest.raises(SystemExit) as exc:
            run_cli(lambda: script.main(argv))
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and expected in err and len(err.splitlines()) == 1, err
        assert not os.path.exists(argv[argv.index("--out_dir") + 1]), argv
