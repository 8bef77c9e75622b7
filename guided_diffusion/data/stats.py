"""Dataset statistics: nuclei per class, nucleus areas and pixel fractions; before/after tables.

Works on a dataset (through the readers, so classes are merged once), on a folder or list of label
map files (GradMix output), or on in-memory ``(inst_map, type_map)`` pairs. Outputs (CSV, PNG bar
charts with the matplotlib Agg backend) are written atomically.
"""

from __future__ import annotations

import csv
import io
import posixpath
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..infra import fileio
from ..infra.errors import DiffMixError
from ..infra.plotting import figure_bytes, pyplot
from .classes import ClassTable, resolve_class_table
from .labels import instance_table
from .layouts import GradMixLayout
from .readers import find_folder, is_dir, list_samples, read_label_file, read_samples, resolve_labels_form

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class LabelStats:
    """Statistics over a set of label maps (classes already merged).

    Attributes:
        class_names: ``num_classes`` names, index 0 = background.
        counts: int64 [num_classes] nuclei per class (index 0: instances whose pixels are all
            background in the type map -- normally 0).
        areas: per class, a list of nucleus areas in pixels.
        pixels: int64 [num_classes] pixels per class (index 0 = background).
        num_maps: number of label maps.
        sources: the label files read (when read from files).
        incomplete: label files left out because they are unfinished GradMix maps (no record).
    """

    class_names: Sequence[str]
    counts: np.ndarray
    areas: List[List[int]]
    pixels: np.ndarray
    num_maps: int = 0
    sources: List[str] = field(default_factory=list)
    incomplete: List[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def pixel_fractions(self) -> np.ndarray:
        """float64 [num_classes]: share of all pixels per class (sums to 1)."""
        total = self.pixels.sum()
        return self.pixels / total if total else np.zeros_like(self.pixels, dtype=np.float64)

    def rows(self) -> List[dict]:
        """One CSV row per class (background included for the pixel fraction)."""
        out = []
        fractions = self.pixel_fractions
        total = max(1, int(self.counts[1:].sum()))
        for c, name in enumerate(self.class_names):
            a = np.asarray(self.areas[c], np.float64)
            row = {
                "class_id": c,
                "class_name": name,
                "nuclei": int(self.counts[c]),
                "nuclei_share": round(float(self.counts[c]) / total, 6) if c else "",
                "pixel_fraction": round(float(fractions[c]), 6),
                "area_mean": round(float(a.mean()), 3) if a.size else "",
            }
            for q in QUANTILES:
                row[f"area_q{int(q * 100):02d}"] = round(float(np.quantile(a, q)), 3) if a.size else ""
            out.append(row)
        return out


def _empty(names: Sequence[str]) -> LabelStats:
    n = len(names)
    return LabelStats(list(names), np.zeros(n, np.int64), [[] for _ in range(n)], np.zeros(n, np.int64))


def add_map(stats: LabelStats, inst_map: np.ndarray, type_map: np.ndarray, source: str = "") -> None:
    """Accumulate one label map (int [H, W] each; type values < num_classes) into ``stats``."""
    n = stats.num_classes
    types_px = np.asarray(type_map).astype(np.int64, copy=False)
    if types_px.size and (types_px.min() < 0 or types_px.max() >= n):
        raise DiffMixError(f"{source or 'label map'}: type values outside 0..{n - 1}")
    ids, types, _ = instance_table(inst_map, types_px)
    inst = np.asarray(inst_map).astype(np.int64, copy=False)
    fg = inst[inst != 0]
    areas = np.bincount(np.searchsorted(ids, fg), minlength=ids.size) if ids.size else np.zeros(0, np.int64)
    stats.counts += np.bincount(types, minlength=n)[:n]
    for c in range(n):
        stats.areas[c].extend(int(a) for a in areas[types == c])
    stats.pixels += np.bincount(types_px.ravel(), minlength=n)[:n]
    stats.num_maps += 1
    if source:
        stats.sources.append(source)


def label_statistics(
    items: Iterable[Union[str, Tuple[np.ndarray, np.ndarray]]],
    class_table: Optional[ClassTable] = None,
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
) -> LabelStats:
    """Statistics of label maps given as ``(inst_map, type_map)`` pairs (already merged) or as
    ``.mat`` paths (read with ``class_table``: raw maps merged, GradMix maps only validated).

    Give ``class_table`` (needed for paths), or ``num_classes`` / ``class_names`` for arrays.
    """
    if class_table is not None:
        names = list(class_table.names)
    elif class_names is not None:
        names = list(class_names)
    elif num_classes is not None:
        names = ["background"] + [f"class{k}" for k in range(1, int(num_classes))]
    else:
        raise DiffMixError("label_statistics needs class_table, class_names or num_classes")
    stats = _empty(names)
    for item in items:
        if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__"):
            if class_table is None:
                raise DiffMixError(f"{item}: reading label files needs a class_table")
            inst, types = read_label_file(str(item), class_table)
            add_map(stats, inst, types, str(item))
        else:
            inst, types = item
            add_map(stats, inst, types)
    return stats


def label_dir_statistics(label_dir: str, class_table: ClassTable, labels_merged: str = "auto") -> LabelStats:
    """Statistics of every ``.mat`` in ``label_dir`` (or its ``Labels/`` subfolder).

    A GradMix output (the label folder has a sibling ``Records/`` folder) counts only complete
    maps: a ``.mat`` without its ``Records/<name>.json`` is an unfinished map (an interrupted or
    failed run) and is left out; the names left out are in the result's ``incomplete``.
    """
    if not is_dir(label_dir):
        raise DiffMixError(f"{label_dir}: label folder not found")
    folder = find_folder(label_dir, GradMixLayout.LABELS) or label_dir
    names = [n for n in fileio.listdir(folder) if n.lower().endswith(".mat")]
    # posixpath: local paths here are POSIX and remote ones (gs://, az://) use "/" too.
    records = GradMixLayout(posixpath.dirname(str(folder).rstrip("/"))).folder(GradMixLayout.RECORDS)
    incomplete = []
    if is_dir(records):
        have = {n[: -len(".json")] for n in fileio.listdir(records) if n.endswith(".json")}
        incomplete = [n for n in names if n[: -len(".mat")] not in have]
        names = [n for n in names if n[: -len(".mat")] in have]
    if not names:
        extra = f" ({len(incomplete)} incomplete GradMix maps without a record left out)" if incomplete else ""
        raise DiffMixError(f"{folder}: no .mat label maps{extra}")
    paths = [fileio.join(folder, n) for n in names]
    table = resolve_labels_form(class_table, paths, labels_merged, f"label maps {folder}")
    stats = label_statistics(paths, table)
    stats.incomplete = [fileio.join(folder, n) for n in incomplete]
    return stats


def dataset_statistics(
    *,
    data_dir: str,
    dataset_mode: str,
    split: str = "Train",
    class_table=None,
    num_classes: Optional[int] = None,
    image_folder: str = "Images",
    label_folder: str = "Labels",
    progress: bool = True,
    labels_merged: str = "auto",
) -> LabelStats:
    """Statistics of a dataset split (labels merged with the dataset's class table; ``labels_merged``
    as in :func:`guided_diffusion.data.readers.resolve_labels_form`)."""
    table = resolve_class_table(dataset_mode, class_table, num_classes)
    files = list_samples(data_dir, split, image_folder, label_folder, dataset_mode=dataset_mode)
    table = resolve_labels_form(table, [f.label for f in files], labels_merged, f"dataset {data_dir}")
    stats = _empty(table.names)
    for sample in read_samples(files, table, what=f"dataset {data_dir}", progress=progress):
        add_map(stats, sample.inst_map, sample.type_map, sample.files.label)
    return stats


def _csv_bytes(rows: List[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def write_statistics(stats: LabelStats, out_dir: str, prefix: str = "stats", title: str = "") -> Tuple[str, str]:
    """Write ``<prefix>.csv`` (one row per class) and ``<prefix>.png`` (nuclei per class and mean
    area bar charts). Returns the two paths."""
    plt = pyplot()
    csv_path = fileio.join(out_dir, prefix + ".csv")
    png_path = fileio.join(out_dir, prefix + ".png")
    fileio.write_bytes(csv_path, _csv_bytes(stats.rows()))
    names = stats.class_names[1:]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(names, stats.counts[1:], color="tab:purple")
    axes[0].set_ylabel("nuclei")
    means = [np.mean(a) if a else 0 for a in stats.areas[1:]]
    axes[1].bar(names, means, color="tab:pink")
    axes[1].set_ylabel("mean area (px)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title or f"{stats.num_maps} label maps")
    fileio.write_bytes(png_path, figure_bytes(fig))
    return csv_path, png_path


def write_comparison(
    before: Union[LabelStats, Sequence[int]],
    after: Union[LabelStats, Sequence[int]],
    out_dir: str,
    class_names: Optional[Sequence[str]] = None,
    labels: Tuple[str, str] = ("before", "after"),
    prefix: str = "balance",
) -> Tuple[str, str]:
    """Before/after nuclei counts per class: ``<prefix>.csv`` and a grouped bar chart ``<prefix>.png``.

    ``before``/``after`` are :class:`LabelStats` or count tables int [num_classes] (index 0 =
    background, not plotted). Returns the two paths.
    """
    plt = pyplot()
    if class_names is None:
        class_names = before.class_names if isinstance(before, LabelStats) else None
    b = np.asarray(before.counts if isinstance(before, LabelStats) else before, np.int64)
    a = np.asarray(after.counts if isinstance(after, LabelStats) else after, np.int64)
    if b.shape != a.shape:
        raise DiffMixError(f"count tables differ in length ({b.size} vs {a.size})")
    if class_names is None:
        class_names = ["background"] + [f"class{k}" for k in range(1, b.size)]
    rows = []
    for c in range(1, b.size):
        rows.append(
            {
                "class_id": c,
                "class_name": class_names[c],
                labels[0]: int(b[c]),
                labels[1]: int(a[c]),
                f"{labels[0]}_share": round(float(b[c]) / max(1, b[1:].sum()), 6),
                f"{labels[1]}_share": round(float(a[c]) / max(1, a[1:].sum()), 6),
            }
        )
    csv_path = fileio.join(out_dir, prefix + ".csv")
    png_path = fileio.join(out_dir, prefix + ".png")
    fileio.write_bytes(csv_path, _csv_bytes(rows))
    x = np.arange(b.size - 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(x - 0.2, b[1:], 0.4, label=labels[0], color="tab:gray")
    ax.bar(x + 0.2, a[1:], 0.4, label=labels[1], color="tab:purple")
    ax.set_xticks(x, list(class_names[1:]), rotation=30)
    ax.set_ylabel("nuclei")
    ax.legend()
    fileio.write_bytes(png_path, figure_bytes(fig))
    return csv_path, png_path


def format_table(stats: LabelStats) -> str:
    """A plain-text table for printing."""
    lines = [f"{'class':<16}{'nuclei':>8}{'share':>8}{'px frac':>9}{'area mean':>11}{'median':>8}"]
    for row in stats.rows():
        share = f"{row['nuclei_share']:.3f}" if row["nuclei_share"] != "" else "-"
        mean = f"{row['area_mean']:.1f}" if row["area_mean"] != "" else "-"
        med = f"{row['area_q50']:.0f}" if row["area_q50"] != "" else "-"
        lines.append(
            f"{row['class_name']:<16}{row['nuclei']:>8}{share:>8}{row['pixel_fraction']:>9.4f}{mean:>11}{med:>8}"
        )
    return "\n".join(lines)
