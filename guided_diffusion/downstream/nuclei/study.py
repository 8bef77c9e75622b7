"""The type-classification utility study: does adding DiffMix nuclei help a nucleus-type classifier?

The paper's question at a scale two CPU cores can answer with many seeds. Arms (the HoVer-Net
study's, :data:`guided_diffusion.downstream.study.ARMS`): ``real``, ``balance`` (+ nuclei of DiffMix
patches from balancing maps), ``balance_enlarge`` (+ balancing and enlarging patches) and
``gradmix`` (+ nuclei of GradMix's composed images: the paper's comparator). Every arm x seed trains
the same classifier (:mod:`.classifier`: same steps, batch, class-balanced sampling over the union of
its real and synthetic nuclei; ``synthetic_share`` < 1 caps the synthetic nuclei's share of each
class's draws, since 6000 synthetic beside 300 real rare nuclei would otherwise define the class) and
predicts every nucleus of the real held-out split.

A run's folder ``runs/<arm>/seed<k>/`` holds the classifier run, ``test_pred.npy`` (int8 [N]
predicted class per held-out nucleus) and ``result.json`` (written last: a rerun skips the run).
The study writes ``summary.json``, ``results.csv``, ``table.md``, ``f1_per_class.png`` (mean ± sd over
seeds) and ``report.md``, with a paired test of the rare class's F1 for every arm against ``real``:
per seed (paired t-test and exact sign-flip test) and by bootstrap over held-out nuclei.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ...infra import fileio
from ...infra.config import SettingsCheck, flag
from ...infra.errors import DiffMixError
from ...infra.plotting import bar_chart
from ...metrics.classification import bootstrap_mean_diff, class_scores, paired_test
from ..data import RealSplits, refuse_listed_twice, split_list
from ..study import ARMS, command_line, machine
from . import crops as C
from .classifier import ClassifierConfig, predict, train_classifier

RESULT, PRED = "result.json", "test_pred.npy"
# quick: seconds (tests and a first look); cpu: the classifier's defaults (~1-2 min per run on one core).
PRESETS: Dict[str, Dict[str, Any]] = {
    "quick": dict(steps=20, batch_size=16, width=8, seeds="0,1"),
    "cpu": dict(seeds="0,1,2,3,4"),
}
_RUNTIME_FIELDS = ("out_dir", "progress", "num_threads", "arms", "seeds")


@dataclasses.dataclass
class NucleusStudyConfig(RealSplits):
    """Settings of ``scripts/nucleus_study.py`` (the classifier's: ClassifierConfig's flags)."""

    balance_dirs: str = flag("", "image_sample.py run folders from balancing maps, comma-separated")
    enlarge_dirs: str = flag("", "image_sample.py run folders from enlarging maps, comma-separated")
    gradmix_dirs: str = flag("", "GradMix output folders written with --write_images true, comma-separated")
    arms: str = flag("", f"arms, comma-separated from {', '.join(ARMS)} (default: every arm whose sources are given)")
    seeds: Optional[str] = flag(None, "comma-separated seeds, the same for every arm (preset: quick 0,1; cpu 0..4)")
    preset: str = flag("cpu", f"{' or '.join(PRESETS)}: quick = 20 steps of 16 crops, width 8 (seconds)")
    synthetic_share: float = flag(1.0, "largest share of a class's training draws taken by synthetic nuclei "
                                  "(1: drawn uniformly with the real ones of their class, so 6000 synthetic "
                                  "beside 300 real nuclei make up 95 % of that class's draws)")
    crop_size: int = flag(32, "nucleus crop size in px")
    n_boot: int = flag(1000, "bootstrap replicates over held-out nuclei")
    out_dir: str = flag("", "study folder (runs/, tables, figure, report.md); rerun it to resume")
    num_threads: int = flag(0, "torch CPU threads (0: torch's default)")
    progress: bool = flag(True, "show progress bars")


def _sources(cfg: NucleusStudyConfig) -> Dict[str, List[str]]:
    return {g: split_list(getattr(cfg, f"{g}_dirs")) for g in ("balance", "enlarge", "gradmix")}


def resolve(cfg: NucleusStudyConfig, ccfg: ClassifierConfig):
    """``(arms, seeds, classifier settings)`` after the preset; raises :class:`DiffMixError` naming
    every flag that cannot work."""
    if cfg.preset not in PRESETS:  # the classifier settings are read on top of the preset
        raise DiffMixError(f"--preset {cfg.preset!r}: expected one of {', '.join(PRESETS)}")
    check = SettingsCheck(cfg)
    check.add(not cfg.out_dir or not cfg.data_dir, "--out_dir and --data_dir are required")
    check.add(cfg.n_boot < 1 or cfg.crop_size < 4, "--n_boot must be >= 1 and --crop_size >= 4")
    check.need("synthetic_share", lambda v: 0 < v <= 1, "in (0, 1]")
    preset = dict(PRESETS[cfg.preset])
    seeds_text = cfg.seeds if cfg.seeds is not None else preset.pop("seeds")
    preset.pop("seeds", None)
    ccfg = dataclasses.replace(ccfg, **preset)
    try:
        seeds = [int(s) for s in str(seeds_text).split(",") if s.strip()]
    except ValueError:
        seeds = None
        check.add(True, f"--seeds {seeds_text!r}: expected comma-separated integers")
    check.add(seeds is not None and (not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0),
              f"--seeds {seeds_text!r}: expected distinct non-negative integers")
    sources = _sources(cfg)
    check.rule(refuse_listed_twice, [cfg.data_dir] + [d for g in sources.values() for d in g], "--data_dir / --*_dirs")
    arms = [a.strip() for a in cfg.arms.split(",") if a.strip()] or [
        a for a, (_, groups) in ARMS.items() if all(sources[g] for g in groups)]
    unknown = [a for a in arms if a not in ARMS]
    check.add(unknown, f"--arms: unknown arm(s) {unknown}; expected {', '.join(ARMS)}")
    for arm in [a for a in arms if a in ARMS]:
        missing = [g for g in ARMS[arm][1] if not sources[g]]
        check.add(missing, f"arm {arm} needs --{missing[0] if missing else ''}_dirs; or choose --arms")
    check.rule(ccfg.validate)
    check.done()
    return arms, seeds, ccfg


def _run_dir(cfg: NucleusStudyConfig, arm: str, seed: int) -> str:
    return fileio.join(cfg.out_dir, "runs", arm, f"seed{seed}")


def _check_folder(cfg: NucleusStudyConfig, ccfg: ClassifierConfig) -> Dict[str, Any]:
    """The study's identity; a folder holding a study with other settings is refused (arms, seeds and
    the sources of arms not run before may be added)."""
    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUNTIME_FIELDS}
    if cfg.synthetic_share == 1:  # the plain draw: folders of studies made before the option stay valid
        del identity["synthetic_share"]
    identity["classifier"] = {k: v for k, v in dataclasses.asdict(ccfg).items() if k not in ("seed", "save_interval")}
    path = fileio.join(cfg.out_dir, "study.json")
    if fileio.exists(path):
        saved = fileio.read_json(path).get("identity", {})
        for key in ("balance_dirs", "enlarge_dirs", "gradmix_dirs"):
            if not saved.get(key) or not identity.get(key):
                saved[key] = identity[key] = saved.get(key) or identity.get(key)
        changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        if changed:
            raise DiffMixError(f"{cfg.out_dir}: holds a nucleus study with other settings ({', '.join(changed)}); "
                               "use another --out_dir")
    return identity


def run_arm_seed(cfg: NucleusStudyConfig, ccfg: ClassifierConfig, arm: str, seed: int, train_set: C.NucleusSet,
                 synthetic: np.ndarray, test_set: C.NucleusSet, classes: Sequence[int],
                 meta: Dict[str, Any]) -> Dict[str, Any]:
    """Train (or resume, or read the finished result of) one arm x seed and score it; ``synthetic``
    (bool [N]) marks the nuclei of ``train_set`` that are not real."""
    run_dir = _run_dir(cfg, arm, seed)
    result_path = fileio.join(run_dir, RESULT)
    if fileio.exists(result_path):
        return fileio.read_json(result_path)
    run_cfg = dataclasses.replace(ccfg, seed=seed)
    t0 = time.perf_counter()
    model, record = train_classifier(run_cfg, train_set.crops, train_set.labels - 1, len(classes),
                                     masks=train_set.masks if ccfg.mask_channel else None, synthetic=synthetic,
                                     synthetic_share=cfg.synthetic_share, out_dir=run_dir,
                                     meta={**meta, "arm": arm}, progress=cfg.progress, desc=f"{arm} seed {seed}")
    probs, _ = predict(model, test_set.crops, test_set.masks if ccfg.mask_channel else None)
    pred = (probs.argmax(1) + 1).astype(np.int8)
    fileio.write_npy(fileio.join(run_dir, PRED), pred)
    sc = class_scores(test_set.labels, pred, classes)
    row = {"arm": arm, "seed": seed, "f1": {str(c): sc[c]["f1"] for c in classes},
           "recall": {str(c): sc[c]["recall"] for c in classes},
           "precision": {str(c): sc[c]["precision"] for c in classes},
           "accuracy": float(np.mean(pred == test_set.labels)) if len(pred) else None,
           "macro_f1": _mean([sc[c]["f1"] for c in classes]),
           "train_counts": np.bincount(train_set.labels, minlength=len(classes) + 1)[1:].tolist(),
           "train_seconds": record["seconds"], "wall_seconds": time.perf_counter() - t0,
           "final_loss": record["final_loss_mean_last_10pct"]}
    fileio.write_json(result_path, row)
    return row


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _mean_sd(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    vals = [v for v in values if v is not None]
    return {"mean": _mean(vals), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "n": len(vals)}


def summarise(rows: List[dict], arms: Sequence[str], classes: Sequence[int]) -> Dict[str, Any]:
    out = {}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        out[arm] = {"seeds": [r["seed"] for r in mine], "macro_f1": _mean_sd([r["macro_f1"] for r in mine]),
                    "accuracy": _mean_sd([r["accuracy"] for r in mine]),
                    "f1": {str(c): _mean_sd([r["f1"][str(c)] for r in mine]) for c in classes},
                    "recall": {str(c): _mean_sd([r["recall"][str(c)] for r in mine]) for c in classes}}
    return out


def compare_to_real(cfg: NucleusStudyConfig, rows: List[dict], arms: Sequence[str], rare: int,
                    test_labels: np.ndarray) -> Dict[str, Any]:
    """For every arm but ``real``: the rare class's F1 against ``real``, paired by seed (t-test and
    sign-flip test) and by bootstrap over held-out nuclei (difference of the seed means)."""
    if "real" not in arms:
        return {}
    by = {(r["arm"], r["seed"]): r for r in rows}
    out = {}
    for arm in arms:
        if arm == "real":
            continue
        seeds = sorted(s for (a, s) in by if a == arm and ("real", s) in by)
        base = [by[("real", s)]["f1"][str(rare)] for s in seeds]
        mine = [by[(arm, s)]["f1"][str(rare)] for s in seeds]
        if len(seeds) < 2 or any(v is None for v in base + mine):
            out[arm] = {"seeds": seeds, "note": "needs two or more seeds with a defined rare-class F1 in both arms"}
            continue
        preds = {a: [fileio.read_npy(fileio.join(_run_dir(cfg, a, s), PRED)).astype(np.int64) for s in seeds]
                 for a in ("real", arm)}
        boot = bootstrap_mean_diff(lambda t, p: class_scores(t, p, [rare])[rare]["f1"], test_labels, preds["real"],
                                   preds[arm], n_boot=cfg.n_boot, seed=0)
        out[arm] = {"seeds": seeds, "per_seed": paired_test(base, mine), "bootstrap": boot}
    return out


def run_study(cfg: NucleusStudyConfig, ccfg: ClassifierConfig, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run (or resume) the study; every source is read and checked before anything is written."""
    import torch

    arms, seeds, ccfg = resolve(cfg, ccfg)
    identity = _check_folder(cfg, ccfg)
    fileio.check_output_dir(cfg.out_dir, "--out_dir")
    for group, dirs in _sources(cfg).items():
        for d in [cfg.data_dir] + dirs:
            fileio.check_not_input(cfg.out_dir, {"--data_dir" if d == cfg.data_dir else f"--{group}_dirs": d}, "--out_dir")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    size = cfg.crop_size
    nuclei = C.read_real_nuclei(cfg, size, cfg.progress)
    table, classes, names, real, test = nuclei.table, nuclei.classes, nuclei.names, nuclei.train, nuclei.test
    sources = _sources(cfg)
    needed = sorted({g for a in arms for g in ARMS[a][1]})
    synthetic = {g: C.concat([C.read_source(d, table, size, progress=cfg.progress) for d in sources[g]]) for g in needed}
    if len(test) == 0 or len(real) == 0:
        raise DiffMixError(f"{cfg.data_dir}: no typed nucleus in split {cfg.test_split if len(test) == 0 else cfg.train_split}")
    command = command_line("scripts/nucleus_study.py", list(argv) if argv is not None else sys.argv[1:])
    fileio.makedirs(cfg.out_dir)
    fileio.write_json(fileio.join(cfg.out_dir, "study.json"), {"identity": identity, "command": command})

    counts = real.counts(table.num_classes)
    rare = C.rarest(counts, classes)
    data = {"real": counts, "test": test.counts(table.num_classes),
            **{g: s.counts(table.num_classes) for g, s in synthetic.items()}}
    t0 = time.perf_counter()
    rows = []
    for arm in arms:
        parts = [real] + [synthetic[g] for g in ARMS[arm][1]]
        train_set = C.concat(parts) if len(parts) > 1 else real
        is_synthetic = np.arange(len(train_set)) >= len(real)
        meta = {"class_table": table.to_json(), "sources": [p.source for p in parts],
                "counts": train_set.counts(table.num_classes)}
        for seed in seeds:
            rows.append(run_arm_seed(cfg, ccfg, arm, seed, train_set, is_synthetic, test, classes, meta))
    result = {"arms": arms, "seeds": seeds, "classes": names, "rare_class": rare, "data": data,
              "classifier": dataclasses.asdict(ccfg), "summary": summarise(rows, arms, classes),
              "comparison": compare_to_real(cfg, rows, arms, rare, test.labels), "runs": rows,
              "command": command, "machine": machine(),
              "finished": datetime.datetime.now().isoformat(timespec="seconds"),
              "wall_seconds_this_invocation": time.perf_counter() - t0}
    write_outputs(cfg, result)
    return result


def _fmt(ms: Dict[str, Any]) -> str:
    if ms["mean"] is None:
        return "n/a"
    return f"{ms['mean']:.3f}" + ("" if ms["sd"] is None else f" ± {ms['sd']:.3f}")


def format_table(result: Dict[str, Any]) -> str:
    names = result["classes"]
    heads = ["arm", "seeds"] + [f"F1 {n}" for n in names.values()] + ["macro F1", "accuracy"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for arm, e in result["summary"].items():
        cells = [ARMS[arm][0], str(len(e["seeds"]))] + [_fmt(e["f1"][str(c)]) for c in names]
        lines.append("| " + " | ".join(cells + [_fmt(e["macro_f1"]), _fmt(e["accuracy"])]) + " |")
    return "\n".join(lines)


def format_comparison(result: Dict[str, Any]) -> str:
    rare = result["classes"][result["rare_class"]]
    lines = [f"| arm vs real only | seeds | mean ΔF1 {rare} (per seed) | arm better in | paired t p | sign-flip p | "
             "bootstrap ΔF1 [95%] | bootstrap P(Δ <= 0) |", "|" + "---|" * 8]
    for arm, c in result["comparison"].items():
        if "per_seed" not in c:
            lines.append(f"| {ARMS[arm][0]} | {len(c['seeds'])} | {c['note']} | | | | | |")
            continue
        t, b = c["per_seed"], c["bootstrap"]

        def f(v, d=3):
            return "n/a" if v is None else f"{v:+.{d}f}" if d == 3 else f"{v:.{d}f}"
        lines.append(f"| {ARMS[arm][0]} | {t['n']} | {f(t['mean_diff'])} | {t['b_wins']} of {t['n']} | "
                     f"{f(t['p_t'], 2)} | {f(t['p_sign_flip'], 2)} | {f(b['diff'])} [{f(b['low'])}, {f(b['high'])}] | "
                     f"{f(b['p_le_0'], 2)} |")
    return "\n".join(lines)


def write_outputs(cfg: NucleusStudyConfig, result: Dict[str, Any]) -> None:
    import csv
    import io

    out, names = cfg.out_dir, result["classes"]
    fileio.write_json(fileio.join(out, "summary.json"), result)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arm", "seed", *[f"f1_{n}" for n in names.values()], "macro_f1", "accuracy", "train_seconds"])
    for r in result["runs"]:
        w.writerow([r["arm"], r["seed"], *[r["f1"][str(c)] for c in names], r["macro_f1"], r["accuracy"],
                    f"{r['train_seconds']:.1f}"])
    fileio.write_bytes(fileio.join(out, "results.csv"), buf.getvalue().encode())
    table, comparison = format_table(result), format_comparison(result)
    fileio.write_bytes(fileio.join(out, "table.md"), (table + "\n\n" + comparison + "\n").encode())
    series = {ARMS[a][0]: ([e["f1"][str(c)]["mean"] for c in names] + [e["macro_f1"]["mean"]],
                           [e["f1"][str(c)]["sd"] for c in names] + [e["macro_f1"]["sd"]])
              for a, e in result["summary"].items()}
    bar_chart(list(names.values()) + ["macro"], series, fileio.join(out, "f1_per_class.png"),
              "nucleus-type F1 (mean ± sd over seeds)")
    c = result["classifier"]
    lines = ["# Type-classification utility study", "",
             f"Finished {result['finished']} on {result['machine']}.", "", "```bash", result["command"], "```", "",
             f"Classifier: MONAI ResNet trunk (width {c['width']}, {'RGB + mask' if c['mask_channel'] else 'RGB'} "
             f"crops of {cfg.crop_size} px), {c['steps']} steps of {c['batch_size']} class-balanced crops, Adam lr "
             f"{c['lr']:g} (x0.1 after {c['lr_drop_at']:g}), seeds {', '.join(map(str, result['seeds']))}; "
             + (f"synthetic nuclei at most {cfg.synthetic_share:g} of their class's draws; "
                if cfg.synthetic_share < 1 else "") +
             f"tested on every nucleus of `{cfg.data_dir}` split `{cfg.test_split}`.", "",
             "Nuclei per class (" + ", ".join(names.values()) + "): " +
             "; ".join(f"{k} {v[1:]}" for k, v in result["data"].items()), "",
             "## F1 per class on real held-out nuclei (mean ± sd over seeds)", "", table, "",
             "![F1 per class](f1_per_class.png)", "", "## Rare class against real only", "", comparison, "",
             "## Runs", "", "| arm | seed | macro F1 | train s |", "|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['seed']} | {r['macro_f1']:.3f} | {r['train_seconds']:.0f} |" for r in result["runs"]]
    fileio.write_bytes(fileio.join(out, "report.md"), ("\n".join(lines) + "\n").encode())
