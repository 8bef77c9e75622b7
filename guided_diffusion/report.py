"""The end-to-end run report: a Markdown page with charts, sample grid, loss curve and timings.

Also draws the two README figures from real outputs of a run: ``pipeline.png`` (real patch and
its label -> GradMix virtual label -> synthetic patch) and ``demo_grid.png`` (the synthesis grid).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import fileio


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    fileio.write_bytes(path, buf.getvalue())
    return path


def read_progress(run_dir: str) -> List[Dict[str, float]]:
    """Rows of ``<run_dir>/progress.csv`` with numeric values (missing/blank cells dropped)."""
    path = fileio.join(run_dir, "progress.csv")
    if not fileio.exists(path):
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(fileio.read_bytes(path).decode())):
        parsed = {}
        for key, value in row.items():
            try:
                parsed[key] = float(value)
            except (TypeError, ValueError):
                pass
        rows.append(parsed)
    return rows


def plot_loss_curve(runs: Sequence[Tuple[str, str]], path: str) -> Optional[str]:
    """Training loss (and its mse / vb parts) against step for each ``(label, run_dir)``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    plotted = False
    for label, run_dir in runs:
        rows = [r for r in read_progress(run_dir) if "step" in r and "loss" in r]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["loss"] for r in rows], marker=".", label=f"{label}: loss")
        if all("mse" in r for r in rows):
            ax.plot(steps, [r["mse"] for r in rows], linestyle="--", alpha=0.7, label=f"{label}: mse")
        plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SDM training loss (pre-training, then classifier-free fine-tuning)")
    return _save(fig, path)


def _records(synthesis_dir: str) -> List[Dict[str, Any]]:
    rec_dir = fileio.join(synthesis_dir, "records")
    if not fileio.exists(rec_dir):
        return []
    return [fileio.read_json(fileio.join(rec_dir, n)) for n in fileio.listdir(rec_dir) if n.endswith(".json")]


def _real_label_path(record: Dict[str, Any]) -> Optional[str]:
    """The real label file a GradMix map was made from (its GradMix record names it)."""
    label_source = record.get("label_source", "")
    labels_dir = os.path.dirname(label_source)
    gm_record = fileio.join(os.path.dirname(labels_dir), "Records", record.get("map_name", "") + ".json")
    if not label_source or not fileio.exists(gm_record):
        return label_source or None  # the dataset's own labels were used
    return fileio.read_json(gm_record).get("source_label")


def plot_pipeline(record: Dict[str, Any], class_table, path: str) -> Optional[str]:
    """One synthesis record drawn as the DiffMix pipeline: real patch + real label -> virtual label
    (GradMix) -> synthetic patch."""
    from .data.labels import relabel_contiguous
    from .data.readers import read_label_file, resolve_labels_form
    from .synthesis import label_overlay

    crop = record["crop"]
    x0, y0, h, w = int(crop["x0"]), int(crop["y0"]), int(crop["height"]), int(crop["width"])
    npy = fileio.read_npy(record["hovernet_patch"])
    real = fileio.read_image(record["source_image"])[y0 : y0 + h, x0 : x0 + w]
    panels = [("real patch", real)]
    real_label = _real_label_path(record)
    if real_label and fileio.exists(real_label):
        # The figure's one label file decides its own form (a merged dataset must not be merged again).
        inst, types = read_label_file(real_label, resolve_labels_form(class_table, [real_label], notice=False))
        inst = relabel_contiguous(inst[y0 : y0 + h, x0 : x0 + w])
        panels.append(("real label map", label_overlay(real, inst, types[y0 : y0 + h, x0 : x0 + w])))
    panels += [
        ("GradMix virtual label map", label_overlay(real, npy[..., 3], npy[..., 4])),
        ("DiffMix synthetic patch", npy[..., :3].astype(np.uint8)),
    ]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for i, (ax, (title, img)) in enumerate(zip(axes, panels)):
        ax.imshow(img)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
        if i + 1 < len(panels):
            ax.annotate("", xy=(1.12, 0.5), xytext=(1.0, 0.5), xycoords="axes fraction",
                        arrowprops=dict(arrowstyle="->", lw=2))
    fig.suptitle("DiffMix: real label -> virtual label (GradMix) -> SDM synthesis (SDEdit DDIM + guidance)", fontsize=10)
    return _save(fig, path)


def _rel(path: str, start: str) -> str:
    if fileio.is_remote(path) or fileio.is_remote(start):
        return path
    return os.path.relpath(path, start)


def write_report(out_dir: str, record: Dict[str, Any], train_dir: str, finetune_dir: str, summary,
                 figure_dir: str = "") -> str:
    """Write ``<out_dir>/report.md`` (+ ``report/*.png``); returns the report path."""
    from .data.classes import resolve_class_table

    fig_dir = fileio.join(out_dir, "report")
    fileio.makedirs(fig_dir)
    settings = record["settings"]
    table = resolve_class_table(settings["dataset_mode"], None, settings.get("num_classes") or None)
    loss_png = plot_loss_curve([("pre-training", train_dir), ("fine-tuning", finetune_dir)],
                               fileio.join(fig_dir, "loss.png"))
    records = sorted(_records(summary.out_dir), key=lambda r: r.get("name", ""))
    # The pipeline figure shows the balancing patch with the most nuclei (the most telling one).
    balance = [r for r in records if "__balance" in r.get("map_name", "")] or records
    best = max(balance, key=lambda r: r.get("num_instances", 0), default=None)
    pipeline_png = plot_pipeline(best, table, fileio.join(fig_dir, "pipeline.png")) if best else None
    counts = record.get("gradmix", {}).get("counts", {})
    counts_png = counts.get("png")

    if figure_dir:
        fileio.makedirs(figure_dir)
        if pipeline_png:
            fileio.write_bytes(fileio.join(figure_dir, "pipeline.png"), fileio.read_bytes(pipeline_png))
        if summary.figure:
            fileio.write_bytes(fileio.join(figure_dir, "demo_grid.png"), fileio.read_bytes(summary.figure))

    lines = ["# DiffMix run report", ""]
    s = settings
    lines += [
        f"Preset `{s['preset']}`, dataset `{record['outputs']['dataset']}` ({s['dataset_mode']}), seed {record['seed']}. "
        f"SDM {s['image_size']} px, {s['num_channels']} channels; {s['train_steps']} pre-training + "
        f"{s['finetune_steps']} fine-tuning steps (drop rate {s['drop_rate']}); synthesis {s['timestep_respacing']}, "
        f"ddim_percent {s['ddim_percent']}, guidance s = {s['s']}.",
        "",
        "## Class balance before and after GradMix",
        "",
    ]
    if counts:
        before, after = np.asarray(counts["before"]), np.asarray(counts["after"])
        tb, ta = max(1, int(before[1:].sum())), max(1, int(after[1:].sum()))
        lines += ["| class | nuclei before | share | nuclei after | share |", "|---|---:|---:|---:|---:|"]
        for c in range(1, len(table.names)):
            lines.append(f"| {table.names[c]} | {before[c]} | {before[c] / tb:.3f} | {after[c]} | {after[c] / ta:.3f} |")
        lines.append("")
        lines.append("'before' counts the source maps the GradMix maps were made from (one per map).")
        lines.append("")
    if counts_png:
        lines += [f"![class counts]({_rel(counts_png, out_dir)})", ""]
    if pipeline_png:
        lines += ["## Pipeline on one patch", "", f"![pipeline]({_rel(pipeline_png, out_dir)})", ""]
    if summary.figure:
        lines += ["## Real / virtual label / synthetic patches", "", f"![grid]({_rel(summary.figure, out_dir)})", ""]
    if loss_png:
        lines += ["## Training loss", "", f"![loss]({_rel(loss_png, out_dir)})", ""]
    lines += ["## Timings", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in record["timings_s"].items()]
    lines += ["", "## Where everything went", "", "| output | path |", "|---|---|"]
    lines += [f"| {k} | `{_rel(v, out_dir)}` |" for k, v in record["outputs"].items()]
    lines += [
        "",
        f"{len(summary.written) + len(summary.skipped)} synthetic patches: PNG in `samples/`, HoVer-Net training "
        "patches (H x W x 5 int32: RGB, instance id, type) in `npy_patch/`, provenance JSON in `records/`.",
        "",
    ]
    path = fileio.join(out_dir, "report.md")
    fileio.write_bytes(path, "\n".join(lines).encode())
    return path
