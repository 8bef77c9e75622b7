"""The one plotting set-up: headless matplotlib, figures saved as PNG at one resolution (atomically)."""

from __future__ import annotations

import csv
import io
from typing import Dict, List, Optional, Sequence, Tuple

from . import fileio

DPI = 110


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use: label-only
    commands never load matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_bytes(fig) -> bytes:
    """``fig`` as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def save_figure(fig, path: str) -> str:
    """Write ``fig`` to ``path`` as PNG (temporary name, then rename), close it, return ``path``."""
    fileio.write_bytes(path, figure_bytes(fig))
    return path


def bar_chart(groups, series, path: str, ylabel: str, ylim=(0, 1)) -> str:
    """Grouped bars with error bars, saved to ``path``.

    Args:
        groups: the x-axis labels (G of them).
        series: ``{legend label: (means [G], sds [G])}``; a None mean is drawn as no bar, a None sd
            as no error bar.
    """
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups), 3.6))
    width = 0.8 / max(1, len(series))
    for i, (label, (means, sds)) in enumerate(series.items()):
        xs = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        ax.bar(xs, [np.nan if m is None else m for m in means], width,
               yerr=[0.0 if s is None else s for s in sds], capsize=3, label=label)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


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
    plt = pyplot()
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
    return save_figure(fig, path)
