"""The one plotting set-up: headless matplotlib, figures saved as PNG at one resolution (atomically)."""

from __future__ import annotations

import io

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
