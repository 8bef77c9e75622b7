"""The end-to-end run report: a Markdown page with charts, sample grid, loss curve and timings.

Also draws the two README figures from real outputs of a run: ``pipeline.png`` (real patch and
its label -> GradMix virtual label -> synthetic patch) and ``demo_grid.png`` (the synthesis grid).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..data.classes import resolve_class_table
from ..data.labels import relabel_contiguous
from ..data.layouts import SynthesisLayout
from ..data.readers import read_label_file, resolve_labels_form
from ..infra import fileio
from ..infra.plotting import plot_loss_curve, pyplot, save_figure
from .pretrained import describe, stage_lines


def _records(synthesis_dir: str) -> List[Dict[str, Any]]:
    rec_dir = SynthesisLayout(synthesis_dir).folder(SynthesisLayout.RECORDS)
    if not fileio.exists(rec_dir):
        return []
    return [fileio.read_json(fileio.join(rec_dir, n)) for n in fileio.listdir(rec_dir) if n.endswith(".json")]


def _real_label_path(record: Dict[str, Any]) -> Optional[str]:
    """The real label file a GradMix map was made from (its GradMix record names it)."""
    from ..gradmix import read_map_record  # lazy: gradmix's pipeline imports scipy; the report is light

    label_source = record.get("label_source", "")
    gm = read_map_record(label_source)
    if gm is None:
        return label_source or None  # the dataset's own labels were used
    return gm.get("source_label")


def plot_pipeline(record: Dict[str, Any], class_table, path: str) -> Optional[str]:
    """One synthesis record drawn as the DiffMix pipeline: real patch + real label -> virtual label
    (GradMix) -> synthetic patch."""
    from ..synthesis import label_overlay  # lazy: synthesis imports torch; the report draws from files

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
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for i, (ax, (title, img)) in enumerate(zip(axes, panels)):
        ax.imshow(img)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
        if i + 1 < len(panels):
            ax.annotate("", xy=(1.12, 0.5), xytext=(1.0, 0.5), xycoords="axes fraction",
                        arrowprops=dict(arrowstyle="->", lw=2))
    fig.suptitle("DiffMix: real label -> virtual label (GradMix) -> SDM synthesis (SDEdit DDIM + guidance)", fontsize=10)
    return save_figure(fig, path)


def changed_nuclei(record: Dict[str, Any]) -> tuple:
    """``(kind, mask bool [S, S])``: the nuclei GradMix placed (balancing) or moved (enlarging) inside
    a synthesis record's crop; kind is None and the mask empty for the dataset's own labels."""
    from ..gradmix import changed_mask  # lazy: gradmix's pipeline imports scipy; the report is light

    crop = record["crop"]
    window = (crop["y0"], crop["x0"], crop["height"], crop["width"])
    kind, mask = changed_mask(record.get("label_source", ""), window)
    return (kind, mask) if kind is not None else (None, np.zeros(window[2:], bool))


def outline(image: np.ndarray, mask: np.ndarray, colour=(255, 230, 0)) -> np.ndarray:
    """uint8 ``[S, S, 3]``: ``image`` with the border of ``mask`` drawn 2 px wide in ``colour``."""
    from scipy import ndimage

    border = mask & ~ndimage.binary_erosion(mask)
    border = ndimage.binary_dilation(border) & ~ndimage.binary_erosion(mask, iterations=2)
    out = np.array(image, np.uint8, copy=True)
    out[border] = colour
    return out


def plot_changed_nuclei(records: Sequence[Dict[str, Any]], path: str, rows: int = 6) -> Optional[str]:
    """Grid of real patch | virtual label map | synthetic patch for the crops where GradMix placed
    rare nuclei (most placed first; enlarging maps fill remaining rows), changed nuclei outlined."""
    from ..synthesis import label_overlay, write_figure  # lazy: synthesis imports torch

    scored = []
    for r in records:
        kind, mask = changed_nuclei(r)
        if kind is not None and mask.any():
            npy = fileio.read_npy(r["hovernet_patch"])
            n = len(np.unique(npy[..., 3][mask]))
            scored.append(((kind != "balance", -n, r["name"]), r, kind, mask, n, npy))
    entries = []
    for _, r, kind, mask, n, npy in sorted(scored, key=lambda e: e[0])[:rows]:
        c = r["crop"]
        real = fileio.read_image(r["source_image"])[c["y0"] : c["y0"] + c["height"], c["x0"] : c["x0"] + c["width"]]
        what = f"{n} rare nuclei placed" if kind == "balance" else f"{n} nuclei moved"
        entries.append((real, outline(label_overlay(real, npy[..., 3], npy[..., 4]), mask),
                        outline(npy[..., :3].astype(np.uint8), mask), f"{r['name']}: {what}"))
    if not entries:
        return None
    write_figure(path, entries, "changed nuclei outlined in yellow", min_size=256)
    return path


def _rel(path: str, start: str) -> str:
    if fileio.is_remote(path) or fileio.is_remote(start):
        return path
    return os.path.relpath(path, start)


def _model_lines(record: Dict[str, Any], out_dir: str, fig_dir: str) -> tuple:
    """(Markdown lines describing the SDM, loss-curve path or None)."""
    m = record["model"]
    arch = (f"{m['image_size']} px, {m['num_channels']} channels (x {m['channel_mult']}), "
            f"{m['num_res_blocks']} residual block(s) per level, SPADE width {m['spade_hidden']}")
    checkpoint = record["outputs"]["checkpoint"]
    if record["pretrained"]:
        info = describe(checkpoint)
        lines = [f"Pretrained SDM `{_rel(checkpoint, out_dir)}` ({arch})."]
        loss = None
        if info:
            lines[0] += (f" Trained by us on `{info['data']['data_dir']}` ({info['data']['split']}), seed {info['seed']}, "
                         f"{info['parameters'] / 1e6:.1f} M parameters, {info['total_wall_time_s'] / 60:.0f} min on "
                         f"a {info['machine']['cpus']}-core CPU (`{info['command']}`):")
            lines += stage_lines(info)
            shipped = fileio.join(os.path.dirname(checkpoint), "loss.png")
            if fileio.exists(shipped):
                loss = fileio.join(fig_dir, "loss.png")
                fileio.write_bytes(loss, fileio.read_bytes(shipped))
        return lines, loss
    stages = record["training"]
    lines = [f"SDM trained here ({arch}):"]
    lines += [f"- {st['name']}: to step {st['max_steps']}, lr {st['lr']}, batch {st['batch_size']}, "
              f"drop rate {st['drop_rate']}, EMA {st['ema_rate']}" for st in stages]
    loss = plot_loss_curve([(st["name"], st["folder"]) for st in stages], fileio.join(fig_dir, "loss.png"))
    return lines, loss


def write_report(out_dir: str, record: Dict[str, Any], summary, figure_dir: str = "") -> str:
    """Write ``<out_dir>/report.md`` (+ ``report/*.png``); returns the report path.

    ``figure_dir`` also receives the README figures: ``pipeline.png`` (one patch through the pipeline)
    and ``demo_grid.png`` (real | virtual label | synthetic with the changed nuclei outlined).
    """
    fig_dir = fileio.join(out_dir, "report")
    fileio.makedirs(fig_dir)
    settings = record["settings"]
    table = resolve_class_table(settings["dataset_mode"], None, settings.get("num_classes") or None)
    records = sorted(_records(summary.out_dir), key=lambda r: r.get("name", ""))
    changed_png = plot_changed_nuclei(records, fileio.join(fig_dir, "changed_nuclei.png"))
    # The pipeline figure shows the balancing patch with the most nuclei (the most telling one).
    balance = [r for r in records if "__balance" in r.get("map_name", "")] or records
    best = max(balance, key=lambda r: r.get("num_instances", 0), default=None)
    pipeline_png = plot_pipeline(best, table, fileio.join(fig_dir, "pipeline.png")) if best else None
    counts = record.get("gradmix", {}).get("counts", {})
    counts_png = counts.get("png")
    model_lines, loss_png = _model_lines(record, out_dir, fig_dir)

    if figure_dir:
        fileio.makedirs(figure_dir)
        for name, png in (("pipeline.png", pipeline_png), ("demo_grid.png", changed_png or summary.figure)):
            if png:
                fileio.write_bytes(fileio.join(figure_dir, name), fileio.read_bytes(png))

    s = settings
    calls = f" ({s['solver_steps']} model calls)" if s.get("solver_steps") else ""
    lines = [
        "# DiffMix run report",
        "",
        f"Preset `{s['preset']}`, dataset `{record['outputs']['dataset']}` ({s['dataset_mode']}), seed {record['seed']}; "
        f"synthesis from the {s.get('start') or 'real'} start at ddim_percent {s['ddim_percent']} of {s['timestep_respacing']}, "
        f"sampler {s.get('sampler') or 'ddim'}{calls}, guidance s = {s['s']}.",
        "",
        *model_lines,
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
    if changed_png:
        start = "GradMix image (its donors pasted in)" if s.get("start") == "gradmix" else "real patch"
        lines += [
            "## Where GradMix placed rare nuclei: real | virtual label map | synthetic",
            "",
            "Each row: the real patch, the GradMix virtual label map over it (nuclei tinted by class), and the "
            f"patch the SDM synthesised from the noised {start} under that map. Nuclei that GradMix placed "
            "(balancing) or moved (enlarging) are outlined in yellow.",
            "",
            f"![changed nuclei]({_rel(changed_png, out_dir)})",
            "",
        ]
    fidelity = record.get("fidelity")
    if fidelity:
        from ..downstream.nuclei.evidence import fidelity_lines  # lazy: torch and MONAI; the report is light

        rare = fidelity["classes"][fidelity["rare_class"]]
        lines += [
            f"Do the synthesised nuclei read as their class? The nucleus-type classifier `{_rel(fidelity['classifier'], out_dir)}` "
            f"(RGB only, trained on real CoNSeP) names the type of every nucleus of the synthetic patches; recall of the "
            f"map's class over recall on real held-out nuclei ({fidelity['heldout']}) is the fidelity ratio "
            f"(1 = as recognisable as real). Rare class: {rare}; 'changed' are the nuclei GradMix placed or moved. "
            f"{fidelity['nuclei']['synthetic_patches']} patches: few nuclei, wide intervals.",
            "",
            *["#" + line if line.startswith("## ") else line for line in fidelity_lines(fidelity)],
            "",
        ]
    if pipeline_png:
        lines += ["## Pipeline on one patch", "", f"![pipeline]({_rel(pipeline_png, out_dir)})", ""]
    if summary.figure:
        lines += ["## All synthesised patches (first rows)", "", f"![grid]({_rel(summary.figure, out_dir)})", ""]
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
