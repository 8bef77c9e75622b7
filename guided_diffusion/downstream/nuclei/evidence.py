"""Evidence that synthetic patches carry their label maps, measured with nucleus-type classifiers.

* **Label fidelity** (the "GAN-test" of Shmelkov et al., ECCV 2018, per class): a classifier trained
  on real nuclei predicts the type of every nucleus of the synthetic patches; recall and F1 of the
  map's class, divided by the same scores on real held-out nuclei, with bootstrap 95% intervals
  (nuclei resampled). Beside it the *control* -- the real source crop under the same virtual map, so
  only the label's position says the class -- and the nuclei GradMix placed or moved ("changed")
  apart from the unchanged ones.
* **KID** between real held-out and synthetic nuclei of each class on the classifier's penultimate
  features. These are domain features of a small CPU classifier, not Inception features (no
  Inception weights can be had here), so values compare settings with each other, not with
  published KIDs.
* **C2ST** (classifier two-sample test, Lopez-Paz & Oquab, ICLR 2017): a small CNN learns to tell
  real 128 px patches (the synthesis' own source crops) from the synthetic ones; its accuracy on
  patches of tiles it never saw, pooled over tile-grouped folds, with a Wilson interval. 0.5 means
  indistinguishable, 1.0 trivially separable.
* **Fine detail**: the synthetic patches' power per octave of spatial frequency over their real
  source crops' (:mod:`guided_diffusion.metrics.spectrum`); where C2ST says *that* patches differ,
  this says at which scale.
* **CAS** (Classification Accuracy Score, Ravuri & Vinyals, NeurIPS 2019): a classifier trained on
  synthetic nuclei only, tested on real held-out nuclei, beside one trained on the same number of
  real nuclei.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ...infra import fileio
from ...infra.config import SettingsCheck, flag
from ...infra.errors import DiffMixError
from ...infra.plotting import pyplot, save_figure
from ...metrics.classification import binomial_ci, bootstrap_ci, class_scores, kid
from ...metrics.spectrum import octave_power_ratio
from ..data import RealSplits, refuse_listed_twice, split_list
from ..study import command_line, machine
from . import crops as C
from .classifier import (HELDOUT, ClassifierConfig, check_classifier, check_classifier_folder, load_classifier, predict,
                         train_classifier, uses_masks)

RESULT_JSON, RESULT_MD, GRID, PREDICTIONS = "evidence.json", "evidence.md", "fidelity_grid.png", "predictions.csv"


@dataclasses.dataclass
class EvidenceConfig(RealSplits):
    """Settings of ``scripts/nucleus_evidence.py`` (the classifier's own settings: ClassifierConfig)."""

    synthetic_dirs: str = flag("", "image_sample.py run folders, comma-separated")
    classifier: str = flag("", "a finished classifier run (e.g. a nucleus study's runs/real/seed0); '' = train one "
                               "on the real train split into <out_dir>/classifier")
    crop_size: int = flag(32, "nucleus crop size in px")
    out_dir: str = flag("", "output folder (evidence.json, evidence.md, fidelity_grid.png, classifier runs)")
    c2st: bool = flag(True, "run the two-sample test")
    c2st_folds: int = flag(3, "C2ST: tile-grouped folds")
    c2st_steps: int = flag(1000, "C2ST: critic training steps per fold")
    c2st_groups: str = flag("tile", "C2ST: what a fold holds out whole: tile (source images named <tile>_<k>, "
                                    "as consep256's patches, grouped by <tile>) or image (each source image)")
    cas: bool = flag(True, "train on synthetic nuclei only, test on real (and the real-data baseline)")
    kid_subsets: int = flag(50, "KID: random subsets per class")
    n_boot: int = flag(1000, "bootstrap replicates of the intervals")
    grid_items: int = flag(8, "fidelity grid: best and worst changed nuclei of the rare class shown")
    num_threads: int = flag(0, "torch CPU threads (0: torch's default)")
    progress: bool = flag(True, "show progress bars")


def tile_of(image_name: str) -> str:
    """The tile a patch was cut from: ``train_3_7`` -> ``train_3`` (consep256 names patches of a
    tile ``<tile>_<k>``); any other name is its own tile."""
    stem = re.sub(r"\.[A-Za-z0-9]+$", "", image_name.replace("\\", "/").rsplit("/", 1)[-1])
    m = re.match(r"^(.*)_\d+$", stem)
    return m.group(1) if m else stem


def _labels(probs: np.ndarray) -> np.ndarray:
    return probs.argmax(1).astype(np.int64) + 1


def _recall(c: int):
    return lambda true, pred: class_scores(true, pred, [c])[c]["recall"]


def _f1(c: int):
    return lambda true, pred: class_scores(true, pred, [c])[c]["f1"]


def _ratio(metric):
    def stat(syn, real):
        a, b = metric(*syn), metric(*real)
        return None if a is None or not b else a / b
    return stat


def _brief(score: Dict[str, Any]) -> Dict[str, Any]:
    return {k: score[k] for k in ("n", "recall", "precision", "f1")}


def fidelity_scores(real_true, real_pred, syn_true, syn_pred, classes: Sequence[int], changed=None,
                    n_boot: int = 1000, seed: int = 0) -> Dict[int, Dict[str, Any]]:
    """Per class: scores on real and synthetic nuclei, the synthetic / real ratios of recall and F1
    with bootstrap intervals, and (with ``changed`` bool [N_syn]) recall of changed / unchanged nuclei.

    Arrays are int [N] class ids (true = the map's class for synthetic nuclei). A class without
    nuclei in a set reports n = 0 and None scores, never NaN.
    """
    real_true, real_pred = np.asarray(real_true), np.asarray(real_pred)
    syn_true, syn_pred = np.asarray(syn_true), np.asarray(syn_pred)
    real_s, syn_s = class_scores(real_true, real_pred, classes), class_scores(syn_true, syn_pred, classes)
    out = {}
    for k, c in enumerate(classes):
        entry = {"real": _brief(real_s[c]), "synthetic": _brief(syn_s[c])}
        for name, metric in (("recall", _recall(c)), ("f1", _f1(c))):
            entry[f"{name}_ratio"] = bootstrap_ci(_ratio(metric), [(syn_true, syn_pred), (real_true, real_pred)],
                                                  n_boot=n_boot, seed=seed + 7919 * k)
        if changed is not None:
            changed = np.asarray(changed, bool)
            for part, keep in (("changed", changed), ("unchanged", ~changed)):
                sc = class_scores(syn_true[keep], syn_pred[keep], [c])[c]
                r = real_s[c]["recall"]
                entry[part] = {"n": sc["n"], "recall": sc["recall"],
                               "recall_ratio": None if sc["recall"] is None or not r else sc["recall"] / r}
        out[c] = entry
    return out


def c2st(real: np.ndarray, synthetic: np.ndarray, real_groups: Sequence[str], synthetic_groups: Sequence[str],
         cfg: ClassifierConfig, folds: int = 3, seed: int = 0, progress: bool = False) -> Dict[str, Any]:
    """Classifier two-sample test of two sets of images.

    Args:
        real, synthetic: uint8 [N, S, S, 3] and [M, S, S, 3].
        real_groups, synthetic_groups: a group name per image (tiles); each fold holds out whole
            groups, so the critic is always tested on tiles it never saw.
        cfg: the critic's settings (its ``seed`` is varied per fold).

    Returns:
        ``{"accuracy", "low", "high" (Wilson 95%), "n_test", "fold_accuracy": [...], "groups"}``;
        accuracy is pooled over the held-out images of every fold.
    """
    groups = sorted(set(real_groups) | set(synthetic_groups))
    if len(groups) < 2:
        raise DiffMixError(f"C2ST needs images of at least 2 tiles (groups) to hold some out; got {groups}")
    folds = max(2, min(int(folds), len(groups)))
    order = np.random.default_rng(seed).permutation(len(groups))
    fold_of = {groups[g]: k % folds for k, g in enumerate(order)}
    images = np.concatenate([real, synthetic])
    labels = np.concatenate([np.zeros(len(real), np.int64), np.ones(len(synthetic), np.int64)])
    fold = np.array([fold_of[g] for g in list(real_groups) + list(synthetic_groups)])
    correct, total, per_fold = 0, 0, []
    for k in range(folds):
        train, test = fold != k, fold == k
        if not test.any() or len(np.unique(labels[train])) < 2:
            continue
        critic, _ = train_classifier(dataclasses.replace(cfg, seed=cfg.seed + k), images[train], labels[train], 2,
                                     progress=progress, desc=f"C2ST critic fold {k + 1}/{folds}")
        pred = predict(critic, images[test])[0].argmax(1)
        hits = int(np.count_nonzero(pred == labels[test]))
        correct, total = correct + hits, total + int(test.sum())
        per_fold.append(hits / int(test.sum()))
    low, high = binomial_ci(correct, total)
    return {"accuracy": correct / total if total else None, "low": low, "high": high, "n_test": total,
            "fold_accuracy": per_fold, "groups": len(groups), "folds": folds}


def cas(synthetic: C.NucleusSet, real_train: C.NucleusSet, real_test: C.NucleusSet, cfg: ClassifierConfig,
        classes: Sequence[int], out_dir: str = "", seed: int = 0, progress: bool = True,
        meta: Optional[dict] = None) -> Dict[str, Any]:
    """Train on synthetic nuclei only, and on as many real nuclei, test both on ``real_test``: the
    larger pool is cut to the smaller one's size by a seeded random subset. Returns per-class scores
    of both and the training size."""
    n = min(len(synthetic), len(real_train))
    rng = np.random.default_rng(seed)
    out: Dict[str, Any] = {"n_train": n}
    k = len(classes)
    for name, pool in (("synthetic", synthetic), ("real", real_train)):
        train_set = pool.subset(np.sort(rng.choice(len(pool), size=n, replace=False)))
        run_dir = fileio.join(out_dir, f"cas_{name}") if out_dir else ""
        model, _ = train_classifier(cfg, train_set.crops, train_set.labels - 1, k,
                                    masks=train_set.masks if cfg.mask_channel else None, out_dir=run_dir,
                                    meta={**(meta or {}), "cas": name}, progress=progress, desc=f"CAS: {name}")
        probs, _ = predict(model, real_test.crops, real_test.masks if cfg.mask_channel else None)
        sc = class_scores(real_test.labels, _labels(probs), classes)
        out[name] = {"train_counts": np.bincount(train_set.labels, minlength=k + 1)[1:].tolist(),
                     "scores": {c: _brief(sc[c]) for c in classes},
                     "macro_f1": _macro([sc[c]["f1"] for c in classes])}
    return out


def write_predictions(path: str, sets) -> None:
    """One CSV row per nucleus: set, image, class (the map's), changed, predicted class, p(class), p(predicted)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["set", "image", "class", "changed", "predicted", "p_class", "p_predicted"])
    for name, s, probs in sets:
        pred = probs.argmax(1)
        for i in range(len(s)):
            w.writerow([name, s.names[s.image[i]], int(s.labels[i]), int(s.changed[i]), int(pred[i]) + 1,
                        f"{probs[i, s.labels[i] - 1]:.4f}", f"{probs[i, pred[i]]:.4f}"])
    fileio.write_bytes(path, buf.getvalue().encode())


def _macro(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def plot_grid(synthetic: C.NucleusSet, control: C.NucleusSet, probs: np.ndarray, rare: int, names: Dict[int, str],
              items: int, path: str) -> Optional[str]:
    """Best and worst changed nuclei of class ``rare`` by the classifier's probability of that class:
    synthetic crop above the control crop (real image, same place), predicted class in the title."""
    pool = np.flatnonzero((synthetic.labels == rare) & synthetic.changed)
    if pool.size == 0:
        pool = np.flatnonzero(synthetic.labels == rare)
    if pool.size == 0 or items < 1:
        return None
    ranked = pool[np.argsort(-probs[pool, rare - 1], kind="stable")]
    n = min(items, (ranked.size + 1) // 2)
    picks = [("best", ranked[:n]), ("worst", ranked[::-1][:n])]
    plt = pyplot()
    fig, axes = plt.subplots(4, n, figsize=(1.3 * n, 6.0), squeeze=False)
    for row, (what, idx) in enumerate(picks):
        for j in range(n):
            for r, (img, label) in enumerate(((synthetic.crops, "synthetic"), (control.crops, "real image"))):
                ax = axes[2 * row + r, j]
                ax.axis("off")
                if j < len(idx):
                    i = idx[j]
                    ax.imshow(img[i], interpolation="nearest")
                    if r == 0:
                        pred = int(probs[i].argmax()) + 1
                        ax.set_title(f"p={probs[i, rare - 1]:.2f}\n-> {names[pred][:8]}", fontsize=7)
            axes[2 * row, 0].text(-0.1, 0.5, f"{what}\nsynthetic", transform=axes[2 * row, 0].transAxes,
                                  ha="right", va="center", fontsize=7)
            axes[2 * row + 1, 0].text(-0.1, 0.5, "control\n(real)", transform=axes[2 * row + 1, 0].transAxes,
                                      ha="right", va="center", fontsize=7)
    fig.suptitle(f"changed '{names[rare]}' nuclei: best and worst by p({names[rare]})", fontsize=9)
    return save_figure(fig, path)


def run_evidence(cfg: EvidenceConfig, ccfg: ClassifierConfig, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Fidelity (+ control, changed / unchanged), KID, C2ST and CAS of ``cfg.synthetic_dirs``;
    writes evidence.json, evidence.md and the grid into ``cfg.out_dir`` and returns the result."""
    import sys

    import torch

    runs_dirs = split_list(cfg.synthetic_dirs)
    check = SettingsCheck(cfg)
    check.rule(refuse_listed_twice, runs_dirs, "--synthetic_dirs")
    check.add(not cfg.out_dir or not cfg.data_dir or not runs_dirs, "--out_dir, --data_dir and --synthetic_dirs are required")
    for name in ("n_boot", "kid_subsets", "c2st_folds", "c2st_steps", "crop_size"):
        check.need(name, lambda v: v >= 1, ">= 1")
    check.need("grid_items", lambda v: v >= 0, ">= 0")
    check.add(cfg.c2st_groups not in ("tile", "image"), f"--c2st_groups {cfg.c2st_groups!r}: expected tile or image")
    check.rule(ccfg.validate)
    check.done()
    fileio.check_output_dir(cfg.out_dir, "--out_dir")
    for d in runs_dirs:
        fileio.check_not_input(cfg.out_dir, {"--data_dir": cfg.data_dir, "--synthetic_dirs": d,
                                             "--classifier": cfg.classifier}, "--out_dir")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    size = cfg.crop_size
    # Everything is read and checked before any training or output.
    real = C.read_real_nuclei(cfg, size, cfg.progress)
    table, classes, names, real_train, real_test = real.table, real.classes, real.names, real.train, real.test
    runs = []
    for d in runs_dirs:
        if not C.is_synthesis_run(d):
            raise DiffMixError(f"{d}: --synthetic_dirs takes image_sample.py run folders (npy_patch/ + records/)")
        runs.append(C.read_run(d, table, cfg.progress))
    synthetic = C.concat([C.run_nuclei(r, size) for r in runs], source=",".join(runs_dirs))
    control = C.concat([C.control_nuclei(r, size) for r in runs])
    if len(synthetic) == 0:
        raise DiffMixError(f"{cfg.synthetic_dirs}: the synthetic patches hold no typed nucleus")
    meta = {"data_dir": cfg.data_dir, "split": cfg.train_split, "class_table": table.to_json(),
            "train_counts": real_train.counts(table.num_classes)}

    fileio.makedirs(cfg.out_dir)
    if cfg.classifier:
        model, model_config = load_classifier(cfg.classifier)
        check_classifier(cfg.classifier, model_config, len(classes), size, f"the data ({table.name})")
        classifier_dir, masks_used = cfg.classifier, uses_masks(model_config)
    else:
        classifier_dir, masks_used = fileio.join(cfg.out_dir, "classifier"), ccfg.mask_channel
        model, _ = train_classifier(ccfg, real_train.crops, real_train.labels - 1, len(classes), masks=real_train.masks,
                                    out_dir=classifier_dir, meta=meta, progress=cfg.progress, desc="nucleus classifier")

    def run(s: C.NucleusSet):
        return predict(model, s.crops, s.masks if masks_used else None)

    (p_real, f_real), (p_syn, f_syn), (p_ctl, _) = run(real_test), run(synthetic), run(control)
    fid = fidelity_scores(real_test.labels, _labels(p_real), synthetic.labels, _labels(p_syn), classes,
                          synthetic.changed, cfg.n_boot, ccfg.seed)
    ctl = fidelity_scores(real_test.labels, _labels(p_real), control.labels, _labels(p_ctl), classes,
                          control.changed, cfg.n_boot, ccfg.seed)
    kids = {c: kid(f_real[real_test.labels == c], f_syn[synthetic.labels == c], subset_size=1000,
                   num_subsets=cfg.kid_subsets, seed=ccfg.seed + c) for c in classes}
    kids["all"] = kid(f_real, f_syn, subset_size=1000, num_subsets=cfg.kid_subsets, seed=ccfg.seed)
    counts = real_train.counts(table.num_classes)
    rare = C.rarest(counts, classes)
    grid = plot_grid(synthetic, control, p_syn, rare, names, cfg.grid_items, fileio.join(cfg.out_dir, GRID))

    result: Dict[str, Any] = {
        "classes": names, "rare_class": rare, "classifier": classifier_dir, "mask_channel": bool(masks_used),
        "nuclei": {"real_train": counts, "real_test": real_test.counts(table.num_classes),
                   "synthetic": synthetic.counts(table.num_classes),
                   "synthetic_changed": int(synthetic.changed.sum()), "synthetic_patches": sum(len(r.samples) for r in runs)},
        "fidelity": {str(c): v for c, v in fid.items()},
        "control": {str(c): v for c, v in ctl.items()},
        "kid": {str(c): v for c, v in kids.items()},
        "grid": grid,
    }
    real_p = np.stack([x for r in runs for x in r.real])
    syn_p = np.stack([s.image for r in runs for s in r.samples])
    result["spectrum"] = octave_power_ratio(real_p, syn_p)
    if cfg.c2st:
        critic = ClassifierConfig(width=8, stem_stride=2, steps=cfg.c2st_steps, batch_size=32, jitter=0.0,
                                  seed=ccfg.seed, lr=ccfg.lr, lr_drop_at=ccfg.lr_drop_at)
        group = tile_of if cfg.c2st_groups == "tile" else (lambda src: src)
        groups = [group(src) for r in runs for src in r.sources]
        result["c2st"] = c2st(real_p, syn_p, groups, groups, critic, cfg.c2st_folds, ccfg.seed, cfg.progress)
        result["c2st"]["critic"] = dataclasses.asdict(critic)
    if cfg.cas:
        result["cas"] = cas(synthetic, real_train, real_test, ccfg, classes, cfg.out_dir, ccfg.seed, cfg.progress,
                            meta={**meta, "synthetic": cfg.synthetic_dirs})
    result.update(settings=dataclasses.asdict(cfg), classifier_settings=dataclasses.asdict(ccfg),
                  command=command_line("scripts/nucleus_evidence.py", list(argv) if argv is not None else sys.argv[1:]),
                  machine=machine(), finished=datetime.datetime.now().isoformat(timespec="seconds"))
    write_predictions(fileio.join(cfg.out_dir, PREDICTIONS), [("real_test", real_test, p_real),
                                                               ("synthetic", synthetic, p_syn), ("control", control, p_ctl)])
    fileio.write_json(fileio.join(cfg.out_dir, RESULT_JSON), result)
    fileio.write_bytes(fileio.join(cfg.out_dir, RESULT_MD), render(result).encode())
    return result


def run_fidelity(run_dir: str, classifier_dir: str, table, n_boot: int = 1000, seed: int = 0,
                 progress: bool = False) -> Dict[str, Any]:
    """Label fidelity of one synthesis run with an exported classifier folder (``export_classifier``:
    its held-out predictions stand in for the real held-out data): per class, recall and F1 of the
    synthetic nuclei over the real held-out ones with bootstrap intervals, the nuclei GradMix placed
    or moved apart, and the control (the real source crop under the same map).

    Returns ``{"classifier", "rare_class", "classes", "nuclei", "fidelity", "control"}`` in the form of
    :func:`run_evidence`'s result (class ids as strings).
    """
    classes = list(range(1, table.num_classes))
    check_classifier_folder(classifier_dir, len(classes), "label fidelity")
    model, config = load_classifier(classifier_dir)
    heldout = fileio.read_json(fileio.join(classifier_dir, HELDOUT))
    size = int(config["crop_size"])
    run = C.read_run(run_dir, table, progress)
    synthetic, control = C.run_nuclei(run, size), C.control_nuclei(run, size)
    masks = uses_masks(config)
    p_syn = _labels(predict(model, synthetic.crops, synthetic.masks if masks else None)[0])
    p_ctl = _labels(predict(model, control.crops, control.masks if masks else None)[0])
    true, pred = np.asarray(heldout["true"]), np.asarray(heldout["pred"])
    # The classifier's training counts (a study's or the evidence's run records them), else the held-out ones.
    counts = config.get("counts") or config.get("train_counts") or np.bincount(true, minlength=table.num_classes)
    rare = C.rarest(counts, classes)
    return {
        "classifier": classifier_dir, "rare_class": rare, "classes": {c: str(table.names[c]) for c in classes},
        "heldout": heldout.get("source", ""),
        "nuclei": {"synthetic": synthetic.counts(table.num_classes), "synthetic_changed": int(synthetic.changed.sum()),
                   "synthetic_patches": len(run.samples)},
        "fidelity": {str(c): v for c, v in fidelity_scores(true, pred, synthetic.labels, p_syn, classes,
                                                              synthetic.changed, n_boot, seed).items()},
        "control": {str(c): v for c, v in fidelity_scores(true, pred, control.labels, p_ctl, classes,
                                                             control.changed, n_boot, seed).items()},
    }


def _f(v: Optional[float], digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(ci: Dict[str, Any]) -> str:
    if ci["value"] is None:
        return "n/a"
    return _f(ci["value"], 2) + ("" if ci["low"] is None else f" [{ci['low']:.2f}, {ci['high']:.2f}]")


def fidelity_lines(result: Dict[str, Any]) -> List[str]:
    """The label-fidelity table of a :func:`run_evidence` or :func:`run_fidelity` result (Markdown lines)."""
    lines = ["## Label fidelity (synthetic / real held-out, bootstrap 95% intervals)", "",
             "| class | n real | recall real | n synthetic | recall synthetic | recall ratio | F1 real | F1 synthetic | "
             "F1 ratio | recall changed (n) | recall unchanged (n) | control recall | control recall ratio |",
             "|" + "---|" * 13]
    names = result["classes"]
    for c, name in names.items():
        e, k = result["fidelity"][str(c)], result["control"][str(c)]
        ch, un = e.get("changed", {}), e.get("unchanged", {})
        lines.append(
            f"| {name} | {e['real']['n']} | {_f(e['real']['recall'])} | {e['synthetic']['n']} | "
            f"{_f(e['synthetic']['recall'])} | {_ci(e['recall_ratio'])} | {_f(e['real']['f1'])} | "
            f"{_f(e['synthetic']['f1'])} | {_ci(e['f1_ratio'])} | {_f(ch.get('recall'))} ({ch.get('n', 0)}) | "
            f"{_f(un.get('recall'))} ({un.get('n', 0)}) | {_f(k['synthetic']['recall'])} | {_ci(k['recall_ratio'])} |")
    return lines + ["", "Control: the real source crop under the same (virtual) map, no diffusion."]


def render(result: Dict[str, Any]) -> str:
    """The evidence as Markdown tables."""
    names = result["classes"]
    lines = ["# Nucleus-type evidence", "",
             f"Classifier: `{result['classifier']}` ({'RGB + mask' if result['mask_channel'] else 'RGB only'}); "
             f"nuclei: real held-out {sum(result['nuclei']['real_test'])}, synthetic {sum(result['nuclei']['synthetic'])} "
             f"({result['nuclei']['synthetic_changed']} changed by GradMix) in {result['nuclei']['synthetic_patches']} patches.",
             ""] + fidelity_lines(result)
    lines += ["", "## KID on the classifier's penultimate features (real held-out vs synthetic; domain features, "
              "not Inception)", "", "| class | KID | sd over subsets | n real | n synthetic |", "|---|---|---|---|---|"]
    for c, v in result["kid"].items():
        label = names.get(c, names.get(int(c), c)) if c != "all" else "all nuclei"
        lines.append(f"| {label} | {_f(v['kid'], 4)} | {_f(v['sd'], 4)} | {v['n_x']} | {v['n_y']} |")
    if "spectrum" in result:
        t = result["spectrum"]
        lines += ["", "## Fine detail: power per octave of spatial frequency, synthetic / real source crops", "",
                  "| wavelength (px) | " + " | ".join(f"{hi:g}-{lo:g}" for hi, lo in t["period_px"]) + " |",
                  "|---|" + "---|" * len(t["ratio"]),
                  "| power ratio | " + " | ".join(_f(r) for r in t["ratio"]) + " |", "",
                  "1 = as much detail as real at that scale, < 1 = smoother, > 1 = noisier."]
    if "c2st" in result:
        t = result["c2st"]
        lines += ["", "## C2ST (real source crops vs synthetic patches, held-out tiles)", "",
                  f"Accuracy {_f(t['accuracy'])} (95% {_f(t['low'])}-{_f(t['high'])}, n = {t['n_test']}, "
                  f"{t['folds']} tile-grouped folds over {t['groups']} tiles; per fold "
                  f"{', '.join(_f(a) for a in t['fold_accuracy'])}). 0.5 = indistinguishable."]
    if "cas" in result:
        t = result["cas"]
        lines += ["", f"## CAS (trained on {t['n_train']} nuclei, tested on real held-out)", "",
                  "| trained on | " + " | ".join(f"F1 {n}" for n in names.values()) + " | macro F1 |",
                  "|" + "---|" * (len(names) + 2)]
        for src in ("synthetic", "real"):
            sc = t[src]["scores"]
            lines.append(f"| {src} | " + " | ".join(_f(sc[c]["f1"] if c in sc else sc[str(c)]["f1"]) for c in names)
                         + f" | {_f(t[src]['macro_f1'])} |")
    lines += ["", f"Command: `{result.get('command', '')}`", f"Machine: {result.get('machine', '')}; "
              f"finished {result.get('finished', '')}."]
    return "\n".join(lines) + "\n"
