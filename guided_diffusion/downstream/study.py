"""The utility study: does adding DiffMix patches to the training data help a nuclei network?

Arms (same network, same step budget, same batch size, several seeds each):

* ``real`` -- real training patches only;
* ``balance`` -- real + DiffMix patches synthesised from GradMix *balancing* maps;
* ``balance_enlarge`` -- real + balancing + *enlarging* patches;
* ``gradmix`` (optional) -- real + GradMix images (cut-and-paste, no diffusion).

Each arm x seed is trained (:func:`.train.train_segmenter`), predicts the held-out split once
(the files :func:`.predict.predict_folder` writes) and is scored from those in-memory predictions
with the project's metrics (:func:`guided_diffusion.metrics.evaluate_folders`) and the pixel scores
before post-processing (:func:`.diagnose.pixel_f1`). Its ``result.json`` is written last; a rerun
skips every arm x seed that has one (and resumes an interrupted training from its saved state).
Then come ``results.csv`` (one row per run), ``summary.json`` and ``table.md`` (mean +- sample sd
over seeds of Dice, AJI, PQ, detection F1 and F1 per class), ``f1_per_class.png`` (bars with sd
error bars) and ``report.md`` (settings, data, table, figure, timings and every command).
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..data.readers import find_folder, read_dataset, resolve_split_dir
from ..infra import fileio
from ..infra.config import SettingsCheck, dataclass_to_argv, flag
from ..infra.errors import DiffMixError, run_cli
from ..infra.plotting import bar_chart
from ..metrics import evaluate_folders, labels_from_maps
from . import data as ddata
from .diagnose import pixel_counts, pixel_f1, pixel_scores
from .nets import check_image_sizes
from .predict import default_tile, predict_outputs, write_prediction, write_record
from .train import HoverTrainConfig, Pools, load_segmenter, resolve_table, train_segmenter, validate

ARMS = {
    "real": ("real only", ()),
    "balance": ("real + DiffMix balancing", ("balance",)),
    "balance_enlarge": ("real + DiffMix balancing + enlarging", ("balance", "enlarge")),
    "gradmix": ("real + GradMix images", ("gradmix",)),
}
DEFAULT_ARMS = ("real", "balance", "balance_enlarge")

# One row per preset: the network, the budget, the seeds. cpu: sized for 2 CPU cores: a training step
# costs ~0.47 CPU-seconds, so a run of 2500 steps takes ~20 min on one free core and the 9 runs ~1.7 h
# with --jobs 2 (docs/REAL_DATA.md). 1000 steps were too few: the HV branch stayed so
# flat that HoVer-Net's marker step found no nucleus in some images. paper: MONAI's HoVer-Net on a GPU.
PRESETS: Dict[str, Dict[str, Any]] = {
    "quick": dict(arch="small", width=4, crop_size=32, batch_size=2, steps=3, lr=1e-3, lr_drop_at=0.75,
                  seeds="0,1", tile=64),
    "cpu": dict(arch="small", width=16, crop_size=128, batch_size=8, steps=2500, lr=1e-3, lr_drop_at=0.75,
                seeds="0,1,2", tile=256),
    "paper": dict(arch="hovernet", width=16, crop_size=256, batch_size=8, steps=20000, lr=1e-4, lr_drop_at=0.5,
                  seeds="0,1,2", tile=256),
}
METRIC_KEYS = ("dice", "aji", "pq", "f1_detection")
METRIC_NAMES = {"dice": "Dice", "aji": "AJI", "pq": "PQ", "f1_detection": "F_d"}
RESULT = "result.json"
# Settings that do not change any result: a rerun may use other values.
# allow_test_overlap only permits a run (its report says what overlaps), so it is listed here too.
_RUNTIME_FIELDS = ("out_dir", "progress", "num_threads", "device", "jobs", "allow_test_overlap")


@dataclasses.dataclass
class StudyConfig(ddata.RealSplits):
    """Settings of ``scripts/utility_study.py``; preset-controlled fields default to None (= preset)."""

    balance_dirs: str = flag("", "synthetic sources from balancing maps (image_sample.py run folders), comma-separated")
    enlarge_dirs: str = flag("", "synthetic sources from enlarging maps, comma-separated")
    gradmix_dirs: str = flag("", "GradMix image folders (gradmix.py --write_images true output), comma-separated")
    arms: str = flag("", f"arms to run, comma-separated from {', '.join(ARMS)} "
                       f"(default: {', '.join(DEFAULT_ARMS)}, plus gradmix when --gradmix_dirs is given)")
    out_dir: str = flag("", "study folder (runs/, tables, figure, report.md); rerun it to resume")
    preset: str = flag("cpu", f"settings preset: {', '.join(PRESETS)}")
    seeds: Optional[str] = flag(None, "comma-separated seeds (preset: 0,1,2)")
    steps: Optional[int] = flag(None, "training steps per run (preset)")
    batch_size: Optional[int] = flag(None, "crops per step (preset)")
    crop_size: Optional[int] = flag(None, "training crop size (preset)")
    arch: Optional[str] = flag(None, "small or hovernet (preset)")
    width: Optional[int] = flag(None, "small network width (preset)")
    lr: Optional[float] = flag(None, "Adam learning rate (preset)")
    lr_drop_at: Optional[float] = flag(None, "fraction of steps after which lr x 0.1 (preset)")
    tile: Optional[int] = flag(None, "inference window in pixels (preset)")
    synthetic_fraction: Optional[float] = flag(None, "share of each batch from synthetic sources in the synthetic "
                                                   "arms (default: by pool size)")
    device: str = flag("auto", "cpu, cuda, cuda:N; auto: cuda if available")
    precision: str = flag("auto", "fp32 or bf16; auto: bf16 on a capable GPU")
    num_threads: int = flag(0, "torch CPU threads per run (0: torch's default, or CPU cores / --jobs with --jobs > 1)")
    jobs: int = flag(1, "arm x seed runs trained side by side, each in its own process (CPU: up to one per core; "
                      "logs in runs/<arm>/seed<k>/worker.log)")
    progress: bool = flag(True, "show progress bars")
    allow_test_overlap: bool = flag(False, "evaluate on a --test_split that is also training data (e.g. --test_split "
                                           "Train); refused otherwise. The report then says it is not held out")


def _source_groups(cfg: StudyConfig) -> Dict[str, str]:
    """Synthetic source group -> its comma-separated folders."""
    return {"balance": cfg.balance_dirs, "enlarge": cfg.enlarge_dirs, "gradmix": cfg.gradmix_dirs}


def resolve(cfg: StudyConfig) -> Dict[str, Any]:
    """The preset with the explicitly given fields on top, plus the arm list and seed list; raises
    :class:`DiffMixError` naming every flag that cannot work."""
    if cfg.preset not in PRESETS:  # every other setting is read on top of the preset
        raise DiffMixError(f"--preset {cfg.preset!r}: expected one of {', '.join(PRESETS)}")
    check = SettingsCheck(cfg)
    check.add(not cfg.out_dir, "--out_dir is required")
    check.add(not cfg.data_dir, "--data_dir is required (the real dataset root)")
    check.need("jobs", lambda v: v >= 1, ">= 1")
    out = dict(PRESETS[cfg.preset])
    for key in out:
        value = getattr(cfg, key)
        if value is not None:
            out[key] = value
    try:
        out["seeds"] = [int(s) for s in ddata.split_list(out["seeds"])]
    except ValueError:
        check.add(True, f"--seeds {out['seeds']!r}: expected comma-separated integers")
    else:
        check.add(not out["seeds"] or len(set(out["seeds"])) != len(out["seeds"]),
                  f"--seeds {out['seeds']!r}: expected distinct seeds")
        check.add(out["seeds"] and min(out["seeds"]) < 0,
                  f"--seeds {','.join(map(str, out['seeds']))}: seeds must be >= 0")
    arms = ddata.split_list(cfg.arms) or list(DEFAULT_ARMS) + (["gradmix"] if cfg.gradmix_dirs else [])
    unknown = [a for a in arms if a not in ARMS]
    check.add(unknown, f"--arms: unknown arm(s) {unknown}; expected {', '.join(ARMS)}")
    groups = _source_groups(cfg)
    for arm in [a for a in arms if a in ARMS]:
        for g in ARMS[arm][1]:
            check.add(not ddata.split_list(groups[g]), f"arm {arm} needs --{g}_dirs (synthetic sources); or choose --arms")
        # the arm's pool is the union of its groups: a folder in two of them would count twice
        check.rule(ddata.refuse_listed_twice, [d for g in ARMS[arm][1] for d in ddata.split_list(groups[g])],
                   " / ".join(f"--{g}_dirs" for g in ARMS[arm][1]))
    check.done()
    out["arms"] = arms
    return out


def train_config(cfg: StudyConfig, settings: Dict[str, Any], arm: str, seed: int, run_dir: str) -> HoverTrainConfig:
    """The training settings of one arm x seed."""
    groups = _source_groups(cfg)
    synthetic = [d for g in ARMS[arm][1] for d in ddata.split_list(groups[g])]
    return HoverTrainConfig(
        data_dir=cfg.data_dir, synthetic_dirs=",".join(synthetic), dataset_mode=cfg.dataset_mode,
        num_classes=cfg.num_classes, class_table=cfg.class_table, split=cfg.train_split,
        out_dir=fileio.join(run_dir, "train"), arch=settings["arch"], width=settings["width"],
        crop_size=settings["crop_size"], batch_size=settings["batch_size"], steps=settings["steps"],
        lr=settings["lr"], lr_drop_at=settings["lr_drop_at"],
        synthetic_fraction=cfg.synthetic_fraction if synthetic else None, seed=seed,
        precision=cfg.precision, device=cfg.device, num_threads=cfg.num_threads, progress=cfg.progress,
    )


def _test_labels(cfg: StudyConfig) -> str:
    folder, layout = resolve_split_dir(cfg.data_dir, cfg.test_split)
    return folder if layout == "npy" else find_folder(folder, "Labels")


def _mean_sd(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "n": len(vals)}


def summarise(rows: List[dict], arms: Sequence[str], class_names: Dict[int, str]) -> Dict[str, Any]:
    """Mean and sample sd over seeds, per arm, of every metric and of F1 per class."""
    out = {}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        entry = {k: _mean_sd([r[k] for r in mine]) for k in METRIC_KEYS}
        entry["f1_type"] = {c: _mean_sd([r["f1_type"].get(str(c)) for r in mine]) for c in class_names}
        entry["pixel_np_dice"] = _mean_sd([r["pixel"]["np_dice"] for r in mine])
        entry["pixel_f1_type"] = {c: _mean_sd([r["pixel"]["f1_type"].get(str(c)) for r in mine]) for c in class_names}
        entry["seeds"] = [r["seed"] for r in mine]
        out[arm] = entry
    return out


def _fmt(ms: Dict[str, Optional[float]]) -> str:
    if ms["mean"] is None:
        return "n/a"
    return f"{ms['mean']:.3f}" + ("" if ms["sd"] is None else f" ± {ms['sd']:.3f}")


def format_table(summary: Dict[str, Any], class_names: Dict[int, str]) -> str:
    """Markdown table: one row per arm, mean ± sd over seeds."""
    heads = ["arm", "seeds"] + [METRIC_NAMES[k] for k in METRIC_KEYS] + [f"F1 {n}" for n in class_names.values()]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for arm, e in summary.items():
        cells = [ARMS[arm][0], str(len(e["seeds"]))] + [_fmt(e[k]) for k in METRIC_KEYS]
        cells += [_fmt(e["f1_type"][c]) for c in class_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_pixel_table(summary: Dict[str, Any], class_names: Dict[int, str]) -> str:
    """Markdown table of the pixel scores before post-processing: one row per arm, mean ± sd over seeds."""
    heads = ["arm", "seeds", "nucleus-pixel Dice"] + [f"pixel F1 {n}" for n in class_names.values()]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for arm, e in summary.items():
        cells = [ARMS[arm][0], str(len(e["seeds"])), _fmt(e["pixel_np_dice"])]
        cells += [_fmt(e["pixel_f1_type"][c]) for c in class_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_f1(summary: Dict[str, Any], class_names: Dict[int, str], path: str) -> str:
    """Grouped bars of F1 per class (and detection F1), one bar per arm, sd error bars."""
    series = {}
    for arm, e in summary.items():
        cells = [e["f1_detection"]] + [e["f1_type"][c] for c in class_names]
        series[ARMS[arm][0]] = ([c["mean"] for c in cells], [c["sd"] for c in cells])
    return bar_chart(["detection"] + list(class_names.values()), series, path, "F1 (mean ± sd over seeds)")


def command_line(script: str, argv: Sequence[str]) -> str:
    import shlex

    return " ".join(["python", script] + [shlex.quote(a) for a in argv])


def machine() -> str:
    import os

    import monai
    import torch

    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
            f"MONAI {monai.__version__}, CUDA {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")


def _run_dir(cfg: StudyConfig, arm: str, seed: int) -> str:
    return fileio.join(cfg.out_dir, "runs", arm, f"seed{seed}")


def _read_sources(cfg: StudyConfig, settings: Dict[str, Any], table, arms: Sequence[str], progress: bool):
    """The real training images and, per synthetic group the ``arms`` need, its patches."""
    real = ddata.read_real([cfg.data_dir], table, cfg.train_split, settings["crop_size"], progress)
    groups = _source_groups(cfg)
    needed = sorted({g for a in arms for g in ARMS[a][1]})
    synthetic = {g: ddata.read_synthetic(ddata.split_list(groups[g]), table, settings["crop_size"], progress)
                 for g in needed}
    return real, synthetic


def _arm_pools(table, real, synthetic: Dict[str, list], arm: str) -> Pools:
    return Pools(table, real, [s for g in ARMS[arm][1] for s in synthetic[g]])


def run_parallel(cfg: StudyConfig, pending: Sequence[tuple]) -> None:
    """Run the ``(arm, seed)`` pairs ``pending`` in up to ``cfg.jobs`` worker processes at a time.

    Each worker (``python -m guided_diffusion.downstream.study``) reads the sources again and runs
    :func:`run_arm_seed` with ``cfg.num_threads`` torch threads (default: CPU cores / jobs, at least
    1), so its result equals the sequential one; its output goes to ``runs/<arm>/seed<k>/worker.log``.
    A failed worker does not stop the others; the failures are reported together at the end (their
    training resumes on the next run). Interrupting the study stops the workers.
    """
    import json
    import os
    import subprocess

    from tqdm.auto import tqdm

    threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // cfg.jobs)
    spec = json.dumps(dataclasses.asdict(dataclasses.replace(cfg, jobs=1, num_threads=threads, progress=False)))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds the package
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    queue, running, failed = list(pending), {}, []
    bar = tqdm(total=len(queue), desc=f"study runs, {cfg.jobs} at a time", unit="run", disable=not cfg.progress)
    try:
        while queue or running:
            while queue and len(running) < cfg.jobs:
                arm, seed = queue.pop(0)
                log_path = fileio.join(_run_dir(cfg, arm, seed), "worker.log")
                fileio.makedirs(_run_dir(cfg, arm, seed))
                log = open(log_path, "wb")
                proc = subprocess.Popen([sys.executable, "-m", __name__, spec, arm, str(seed)], stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
                running[proc] = (arm, seed, log, log_path)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                arm, seed, log, log_path = running.pop(proc)
                log.close()
                bar.update(1)
                if proc.returncode != 0:
                    lines = fileio.read_bytes(log_path).decode(errors="replace").strip().splitlines()
                    failed.append((list(pending).index((arm, seed)),
                                   f"{arm} seed {seed} (exit {proc.returncode}, {log_path}: {lines[-1] if lines else ''})"))
    finally:
        for proc, (_, _, log, _) in running.items():
            proc.terminate()
            proc.wait()
            log.close()
        bar.close()
    if failed:
        raise DiffMixError(f"{len(failed)} of {len(pending)} runs failed: " + "; ".join(m for _, m in sorted(failed)))


def _worker(spec: str, arm: str, seed: str) -> None:
    """One arm x seed of :func:`run_parallel` (``python -m guided_diffusion.downstream.study SPEC ARM SEED``)."""
    import json

    import torch

    cfg = StudyConfig(**json.loads(spec))
    settings = resolve(cfg)
    table = resolve_table(cfg)
    torch.set_num_threads(cfg.num_threads)
    real, synthetic = _read_sources(cfg, settings, table, [arm], progress=False)
    test = read_dataset(cfg.data_dir, table, cfg.test_split, progress=False, dataset_mode=cfg.dataset_mode)
    run_arm_seed(cfg, settings, arm, int(seed), _arm_pools(table, real, synthetic, arm), _test_labels(cfg), test)


def _pixel_scores(cfg: StudyConfig, settings: Dict[str, Any], run_dir: str, test_samples) -> Dict[str, Any]:
    # Only for a result.json written before the study reported pixel scores (nothing else to compute).
    model, net, dev, dtype = load_segmenter(fileio.join(run_dir, "train"), cfg.device, cfg.precision)
    return pixel_scores(model, net, test_samples, settings["tile"], dev, dtype)


def _predict(cfg: StudyConfig, settings: Dict[str, Any], train_dir: str, pred_dir: str, test_samples) -> tuple:
    """Predict the held-out split once with the run's network: ``({stem: InstanceLabels}, pixel scores)``.

    Each image's network outputs give its pixel counts (before post-processing) and its labels; the
    labels are written to ``pred_dir`` as ``scripts/hovernet_predict.py`` writes them (with its
    ``prediction.json``) and kept in memory for the instance scores."""
    model, net, dev, dtype = load_segmenter(train_dir, cfg.device, cfg.precision)
    tile = default_tile(settings["tile"])
    counts = np.zeros((net.num_classes, 3), np.int64)
    predicted = {}
    images = ((s.files.stem, s.image) for s in test_samples)
    outputs = predict_outputs(model, net, images, tile, dev, dtype, cfg.progress, len(test_samples))
    for sample, (stem, out, inst, types) in zip(test_samples, outputs):
        counts += pixel_counts(out, sample.inst_map, sample.type_map, net.num_classes)
        path = write_prediction(pred_dir, stem, inst, types, net.num_classes)
        # As read back from the file: marked with the model's classes.
        predicted[stem] = dataclasses.replace(labels_from_maps(inst, types, path), marked_merged=net.num_classes)
    write_record(pred_dir, train_dir, cfg.data_dir, cfg.test_split, tile, len(predicted), net)
    return predicted, pixel_f1(counts)


def run_arm_seed(cfg: StudyConfig, settings: Dict[str, Any], arm: str, seed: int, pools: Pools, test_labels: str,
                 test_samples) -> dict:
    """Train, predict and evaluate one arm x seed (or read its finished result).

    ``test_samples``: the held-out split's labelled images (predicted once, for every score)."""
    run_dir = _run_dir(cfg, arm, seed)
    result_path = fileio.join(run_dir, RESULT)
    tcfg = train_config(cfg, settings, arm, seed, run_dir)
    if fileio.exists(result_path):
        row = fileio.read_json(result_path)
        if "pixel" not in row:  # finished before the study reported pixel scores: add them, nothing retrained
            row["pixel"] = _pixel_scores(cfg, settings, run_dir, test_samples)
            fileio.write_json(result_path, row)
        return row
    t0 = time.perf_counter()
    record = train_segmenter(tcfg, pools)
    t1 = time.perf_counter()
    pred_dir = fileio.join(run_dir, "pred")
    predicted, pixel = _predict(cfg, settings, tcfg.out_dir, pred_dir, test_samples)
    t2 = time.perf_counter()
    ev = evaluate_folders(test_labels, pred_dir, class_table=pools.table, out_dir=fileio.join(run_dir, "eval"),
                          progress=False, predictions=predicted)
    cls = ev["classification"]
    # Every setting spelled out (not only those that differ from today's defaults); "" means unset.
    argv = dataclass_to_argv(dataclasses.replace(tcfg, progress=True), skip_defaults=False)
    train_argv = [a for flag, value in zip(argv[::2], argv[1::2]) if value != "" for a in (flag, value)]
    table_argv = (["--dataset_mode", cfg.dataset_mode] + (["--num_classes", str(cfg.num_classes)] if cfg.num_classes
                  else []) + (["--class_table", cfg.class_table] if cfg.class_table else []))
    row = {
        "arm": arm, "seed": seed,
        **{k: ev["instance"][k] for k in ("dice", "aji", "pq")},
        "f1_detection": cls["f1_detection"], "type_accuracy": cls["type_accuracy"],
        "f1_type": {str(c): v for c, v in cls["f1_type"].items()},
        "pixel": pixel,
        "train_seconds": record["seconds"], "train_wall_seconds": t1 - t0, "predict_seconds": t2 - t1,
        "final_loss": record["final_loss_mean_last_10pct"], "synthetic_items": record["synthetic_items"],
        "items": record["items"],
        "commands": [
            command_line("scripts/hovernet_train.py", train_argv),
            command_line("scripts/hovernet_predict.py", ["--run_dir", tcfg.out_dir, "--data_dir", cfg.data_dir, "--split",
                                                     cfg.test_split, "--out_dir", pred_dir, "--tile", str(settings["tile"])]),
            command_line("scripts/evaluate.py", ["--true_dir", test_labels, "--pred_dir", pred_dir, "--out_dir",
                                             fileio.join(run_dir, "eval")] + table_argv),
        ],
    }
    fileio.write_json(result_path, row)
    return row


_SOURCE_FIELDS = ("balance_dirs", "enlarge_dirs", "gradmix_dirs")


def _check_study_folder(cfg: StudyConfig, settings: Dict[str, Any]) -> Dict[str, Any]:
    # Arms and seeds may be added later, and with them the synthetic sources of the new arms (a source
    # list that was empty may be filled in); everything else must match the finished runs.
    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUNTIME_FIELDS + ("arms", "seeds")}
    identity["resolved"] = {k: v for k, v in settings.items() if k not in ("arms", "seeds")}
    path = fileio.join(cfg.out_dir, "study.json")
    if fileio.exists(path):
        saved = fileio.read_json(path).get("identity", {})
        for key in _SOURCE_FIELDS:
            if not saved.get(key) and not identity.get(key):
                continue
            if not saved.get(key):
                saved[key] = identity[key]
            elif not identity.get(key):
                identity[key] = saved[key]  # a rerun of fewer arms keeps the recorded sources
        changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {identity.get(k)!r}" for k in changed[:3])
            raise DiffMixError(f"{cfg.out_dir}: holds a study with other settings ({detail}); use another --out_dir")
    return identity


def run_study(cfg: StudyConfig, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run (or resume) the study of ``cfg``; returns the summary. Every source is read and validated
    before anything is written."""
    import torch

    settings = resolve(cfg)
    ddata.refuse_distributed_format(cfg.dataset_mode, "utility_study.py")  # scores a CoNSeP-layout Test split
    fileio.check_output_dir(cfg.out_dir, "--out_dir")
    identity = _check_study_folder(cfg, settings)
    table = resolve_table(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # Validate the held-out split now, not after hours of training.
    test = read_dataset(cfg.data_dir, table, cfg.test_split, progress=False, dataset_mode=cfg.dataset_mode)
    check_image_sizes(((s.files.image, s.image.shape) for s in test), f"dataset {cfg.data_dir}")
    groups = _source_groups(cfg)
    overlap = ddata.split_overlap(cfg, {f"--{g}_dirs": ddata.split_list(groups[g])
                                       for g in sorted({g for a in settings["arms"] for g in ARMS[a][1]})})
    if overlap and not cfg.allow_test_overlap:
        raise DiffMixError(f"{overlap}; its scores would not be held out: choose another --test_split, or pass "
                           "--allow_test_overlap True to evaluate on it anyway")
    test_labels = _test_labels(cfg)
    real, synthetic = _read_sources(cfg, settings, table, settings["arms"], cfg.progress)
    for arm in settings["arms"]:  # fails before any output if a run's settings cannot work
        validate(train_config(cfg, settings, arm, settings["seeds"][0], cfg.out_dir))
    command = command_line("scripts/utility_study.py", list(argv) if argv is not None else sys.argv[1:])
    fileio.makedirs(cfg.out_dir)
    fileio.write_json(fileio.join(cfg.out_dir, "study.json"), {"identity": identity, "command": command})

    class_names = {c: str(table.names[c]) for c in range(1, table.num_classes)}
    data_summary = {"real": ddata.pool_summary(real, table.num_classes)}
    data_summary.update({g: ddata.pool_summary(s, table.num_classes) for g, s in synthetic.items()})
    t0 = time.perf_counter()
    pending = [(a, k) for a in settings["arms"] for k in settings["seeds"]
               if not fileio.exists(fileio.join(_run_dir(cfg, a, k), RESULT))]
    if cfg.jobs > 1 and len(pending) > 1:
        run_parallel(cfg, pending)
    rows = []
    for arm in settings["arms"]:
        pools = _arm_pools(table, real, synthetic, arm)
        for seed in settings["seeds"]:
            rows.append(run_arm_seed(cfg, settings, arm, seed, pools, test_labels, test))
    summary = summarise(rows, settings["arms"], class_names)
    result = {"settings": settings, "class_names": class_names, "data": data_summary, "summary": summary,
              "runs": rows, "test_overlap": overlap, "command": command, "machine": machine(),
              "finished": datetime.datetime.now().isoformat(timespec="seconds"),
              "wall_seconds_this_invocation": time.perf_counter() - t0}
    write_outputs(cfg, result)
    return result


def write_outputs(cfg: StudyConfig, result: Dict[str, Any]) -> None:
    """``summary.json``, ``results.csv``, ``table.md``, ``f1_per_class.png`` and ``report.md``."""
    import csv
    import io

    class_names = result["class_names"]
    out = cfg.out_dir
    fileio.write_json(fileio.join(out, "summary.json"), result)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arm", "seed", *METRIC_KEYS, *[f"f1_{n}" for n in class_names.values()], "pixel_np_dice",
                *[f"pixel_f1_{n}" for n in class_names.values()], "train_seconds", "predict_seconds"])
    for r in result["runs"]:
        w.writerow([r["arm"], r["seed"], *[r[k] for k in METRIC_KEYS],
                    *[r["f1_type"].get(str(c)) for c in class_names], r["pixel"]["np_dice"],
                    *[r["pixel"]["f1_type"].get(str(c)) for c in class_names], f"{r['train_seconds']:.1f}",
                    f"{r['predict_seconds']:.1f}"])
    fileio.write_bytes(fileio.join(out, "results.csv"), buf.getvalue().encode())
    table = format_table(result["summary"], class_names)
    fileio.write_bytes(fileio.join(out, "table.md"), (table + "\n\n" + format_pixel_table(result["summary"], class_names)
                                                      + "\n").encode())
    plot_f1(result["summary"], class_names, fileio.join(out, "f1_per_class.png"))
    fileio.write_bytes(fileio.join(out, "report.md"), render_report(cfg, result, table).encode())


def render_report(cfg: StudyConfig, result: Dict[str, Any], table: str) -> str:
    s = result["settings"]
    names = list(result["class_names"].values())
    overlap = result.get("test_overlap")  # set only under --allow_test_overlap True
    tested = f"tested on `{cfg.test_split}`, NOT held out: {overlap}" if overlap else f"held-out `{cfg.test_split}`"
    lines = [
        "# DiffMix utility study", "",
        f"Finished {result['finished']} on {result['machine']}.", "",
        "Study command (rerun it to resume; finished arm x seed runs are kept):", "",
        "```bash", result["command"], "```", "",
        "## Settings", "",
        f"- preset `{cfg.preset}`: network `{s['arch']}`" + (f" (width {s['width']})" if s["arch"] == "small" else "")
        + f", {s['steps']} steps of {s['batch_size']} crops of {s['crop_size']} px, Adam lr {s['lr']:g} "
        f"(x0.1 after {s['lr_drop_at']:g} of the steps), seeds {', '.join(map(str, s['seeds']))}, inference "
        f"window {s['tile']} px",
        f"- synthetic share of each batch: {'by pool size' if cfg.synthetic_fraction is None else cfg.synthetic_fraction}",
        f"- real data: `{cfg.data_dir}` (train `{cfg.train_split}`, {tested}), "
        f"dataset mode `{cfg.dataset_mode}`" + (f", {cfg.num_classes} classes" if cfg.num_classes else ""),
        "- loss: MONAI `HoVerNetLoss` (default weights); post-processing: MONAI HoVer-Net instance-map and "
        "nuclear-type post-processing (default thresholds); metrics: `guided_diffusion/metrics/` "
        "(HoVer-Net definitions, 12 px centroid radius)", "",
        "## Training data", "",
        "| pool | images | " + " | ".join(f"{n} nuclei" for n in names) + " |",
        "|" + "---|" * (2 + len(names)),
    ]
    for pool, d in result["data"].items():
        lines.append(f"| {pool} | {d['images']} | " + " | ".join(str(v) for v in d["nuclei_per_class"][1:]) + " |")
    lines += ["", f"## Results ({'test split, NOT held out' if overlap else 'held-out split'}, mean ± sd over seeds)",
              "", table, "",
              "![F1 per class](f1_per_class.png)", "",
              "Pixel scores of the network's maps before post-processing (nucleus pixels: NP branch; class "
              "pixels: NC argmax; pooled over the split). HoVer-Net's marker step can drop every nucleus of an "
              "image when the HV maps are still flat, which decides the instance scores above; these do not "
              "depend on it (`scripts/hovernet_diagnose.py` shows that step per run).", "",
              format_pixel_table(result["summary"], result["class_names"]), "",
              "## Runs", "", "| arm | seed | train s | predict s | final loss | synthetic crops |", "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['train_seconds']:.0f} | {r['predict_seconds']:.0f} | "
                     f"{r['final_loss']:.3f} | {r['synthetic_items']} / {r['items']} |")
    lines += ["", "## Commands of every run", ""]
    for r in result["runs"]:
        lines += [f"{r['arm']}, seed {r['seed']}:", "", "```bash", *r["commands"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(lambda: _worker(*sys.argv[1:4]))
