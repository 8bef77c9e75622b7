"""Evaluation reports: the terminal table and the JSON/CSV files of an evaluation result."""

from __future__ import annotations

import csv
import io
from typing import Sequence

from ..infra import fileio
from .scores import INSTANCE_KEYS


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_table(result: dict) -> str:
    """Human-readable summary of an :func:`evaluate_folders` result."""
    inst, cls = result["instance"], result["classification"]
    heads = ["Dice", "AJI", "AJI+", "DQ", "SQ", "PQ"]
    lines = [
        f"instance segmentation (mean over {result['settings']['n_images']} images)",
        "  " + "  ".join(f"{h:>6}" for h in heads),
        "  " + "  ".join(f"{_fmt(inst[k]):>6}" for k in INSTANCE_KEYS),
        "",
        f"classification (centroid radius {result['settings']['radius']:g} px; "
        f"TP {cls['counts']['tp_d']}, FP {cls['counts']['fp_d']}, FN {cls['counts']['fn_d']})",
    ]
    names = cls.get("class_names") or {}
    heads = ["F1_d", "Acc"] + [f"F1_{names.get(c, c)}" for c in cls["f1_type"]]
    values = [cls["f1_detection"], cls["type_accuracy"]] + list(cls["f1_type"].values())
    widths = [max(6, len(h)) for h in heads]
    lines.append("  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
    lines.append("  " + "  ".join(f"{_fmt(v):>{w}}" for v, w in zip(values, widths)))
    if not cls["types_available"]:
        lines.append("  (no type information on one side: type metrics not computed)")
    table = result["settings"].get("class_table")
    if table:
        lines.append(f"  (ground truth merged with the {table['name']} class table)")
    return "\n".join(lines)


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue().encode()


def write_reports(result: dict, out_dir: str) -> dict[str, str]:
    """Write ``metrics.json``, ``metrics_per_image.csv`` and ``metrics_summary.csv``.

    Returns:
        {kind: path} of the files written.
    """
    fileio.makedirs(out_dir)
    paths = {
        "json": fileio.join(out_dir, "metrics.json"),
        "per_image": fileio.join(out_dir, "metrics_per_image.csv"),
        "summary": fileio.join(out_dir, "metrics_summary.csv"),
    }
    fileio.write_json(paths["json"], result)
    rows = result["per_image"]
    header = list(rows[0]) if rows else ["name"]
    table = [[r[k] for k in header] for r in rows]
    fileio.write_bytes(paths["per_image"], _csv_bytes(header, table))
    cls = result["classification"]
    summary = [[k, result["instance"][k]] for k in INSTANCE_KEYS]
    summary += [["f1_detection", cls["f1_detection"]], ["type_accuracy", cls["type_accuracy"]]]
    names = cls.get("class_names") or {}
    summary += [
        [f"f1_type_{c}" + (f"_{names[c]}" if c in names else ""), v]
        for c, v in cls["f1_type"].items()
    ]
    fileio.write_bytes(paths["summary"], _csv_bytes(["metric", "value"], summary))
    return paths
