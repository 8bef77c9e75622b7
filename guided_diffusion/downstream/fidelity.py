"""Label fidelity: does a synthetic patch show the nuclei of the label map it was made from?

A segmenter trained on real data (a :mod:`.train` run) predicts on the synthetic patches; its
predictions are scored against the *intended* label maps (the ``.npy`` channels 3-4, or the GradMix
``.mat``) with the project's metrics, and beside that against the real labels of a held-out real
split. ``fidelity = synthetic score / real score`` per metric and per class: 1 means the segmenter
finds the intended nuclei in synthetic patches as well as real nuclei in real images (the nuclei
analogue of the label-fidelity mIoU of semantic image synthesis papers); a low rare-class ratio
means rare-class nuclei in the map do not come out as rare-class nuclei in the image.

Outputs in ``out_dir``: ``intended/`` and ``pred_synthetic/`` (``.mat``), ``pred_real/``,
``eval_synthetic/`` and ``eval_real/`` (metrics reports), ``fidelity.json``, ``fidelity.md`` and
``fidelity_grid.png`` (synthetic patches with intended vs predicted nuclei, patches with the most
rare-class nuclei first; none with ``grid_rows`` 0).
"""

from __future__ import annotations

import datetime
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..data.classes import DEFAULT_DATASET_MODE, resolve_class_table
from ..data.labels import instance_table
from ..data.readers import LabeledImage, find_folder, read_dataset, resolve_split_dir
from ..infra import fileio
from ..infra.errors import DiffMixError
from ..infra.plotting import pyplot, save_figure
from ..metrics import evaluate_folders, evaluate_labels, labels_from_maps
from ..synthesis.outputs import _PALETTE, label_overlay
from . import data as ddata
from .nets import check_image_sizes, check_net_classes
from .predict import default_tile, predict_arrays, write_prediction, write_predictions
from .train import load_segmenter

METRICS = ("dice", "aji", "pq", "f1_detection")
GRID = "fidelity_grid.png"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def scores(ev: Dict[str, Any]) -> Dict[str, Any]:
    """The compared numbers of an :func:`~guided_diffusion.metrics.evaluate_folders` result."""
    cls = ev["classification"]
    return {"dice": ev["instance"]["dice"], "aji": ev["instance"]["aji"], "pq": ev["instance"]["pq"],
            "f1_detection": cls["f1_detection"], "f1_type": {str(c): v for c, v in cls["f1_type"].items()}}


def compare(synthetic: Dict[str, Any], real: Dict[str, Any]) -> Dict[str, Any]:
    """Per-metric and per-class ratios synthetic / real (None where undefined)."""
    out = {k: _ratio(synthetic[k], real[k]) for k in METRICS}
    out["f1_type"] = {c: _ratio(synthetic["f1_type"].get(c), real["f1_type"].get(c)) for c in real["f1_type"]}
    return out


def check_grid_rows(rows: int) -> None:
    """``--grid_rows``: patches in ``fidelity_grid.png``; 0 = no figure (a negative count is refused)."""
    if rows < 0:
        raise DiffMixError(f"--grid_rows {rows}: must be >= 0 (0 = no figure)")


def _unique_stems(samples: Sequence[LabeledImage]) -> None:
    seen: Dict[str, str] = {}
    for s in samples:
        if s.files.stem in seen:
            raise DiffMixError(f"two synthetic patches are named {s.files.stem!r}: {seen[s.files.stem]} and {s.files.image}")
        seen[s.files.stem] = s.files.image


def plot_grid(samples: Sequence[LabeledImage], predictions: Dict[str, tuple], rows: int, path: str,
              class_names: Sequence[str]) -> Optional[str]:
    """Rows of (synthetic patch | intended label map | predicted nuclei), patches with the most
    nuclei of class 1 (the rare class in CoNSeP/GLySAC) first; classes tinted, outlines black."""
    from matplotlib.patches import Patch

    def rare(s: LabeledImage) -> int:
        _, types, _ = instance_table(s.inst_map, s.type_map)
        return int((types == 1).sum())

    chosen = sorted(samples, key=lambda s: (-rare(s), s.files.stem))[:rows]
    if not chosen:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(chosen), 3, figsize=(7.5, 2.6 * len(chosen)), squeeze=False)
    for r, s in enumerate(chosen):
        inst, types = predictions[s.files.stem]
        panels = (s.image, label_overlay(s.image, s.inst_map, s.type_map), label_overlay(s.image, inst, types))
        for c, (img, title) in enumerate(zip(panels, ("synthetic patch", "intended (label map)", "predicted"))):
            ax = axes[r, c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r, 0].set_ylabel(s.files.stem, fontsize=7)
    handles = [Patch(color=_PALETTE[k] / 255, label=n) for k, n in enumerate(class_names) if k > 0]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, path)


def label_fidelity(run_dir: str, synthetic_dirs: Sequence[str], real_dir: str, out_dir: str, split: str = "Test",
                   dataset_mode: str = DEFAULT_DATASET_MODE, num_classes: Optional[int] = None, class_table: str = "",
                   tile: Optional[int] = None, device: str = "auto", precision: str = "auto", grid_rows: int = 6,
                   progress: bool = True) -> Dict[str, Any]:
    """:func:`measure_fidelity` with the network of a finished training run (``run_dir``)."""
    check_grid_rows(grid_rows)
    table = resolve_class_table(dataset_mode, class_table or None, num_classes)
    model, net, dev, dtype = load_segmenter(run_dir, device, precision)
    return measure_fidelity(model, net, table, synthetic_dirs, real_dir, out_dir, split, default_tile(tile), dev,
                            dtype, grid_rows, progress, extra={"run_dir": run_dir})


def measure_fidelity(model, net, table, synthetic_dirs: Sequence[str], real_dir: str, out_dir: str, split: str,
                     tile: int, device, dtype=None, grid_rows: int = 6, progress: bool = True,
                     extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Score ``model`` on synthetic patches against their intended maps and on a real split.

    Every input is read and checked before anything is written. Returns the ``fidelity.json``
    content: ``synthetic`` and ``real`` scores, their ratios ``fidelity``, true nuclei per class of
    both sets, image counts and the settings.
    """
    check_net_classes(net, table)
    check_grid_rows(grid_rows)
    if not synthetic_dirs:
        raise DiffMixError("no synthetic sources given")
    synthetic = ddata.read_synthetic(synthetic_dirs, table, min_size=None, progress=progress)
    _unique_stems(synthetic)
    real = read_dataset(real_dir, table, split, progress=False)  # validated now, not after the synthetic predictions
    check_image_sizes(((s.files.image, s.image.shape) for s in synthetic + real), "the synthetic and real images")
    del real  # write_predictions reads the split again, one image at a time
    real_folder, layout = resolve_split_dir(real_dir, split)
    real_labels = real_folder if layout == "npy" else find_folder(real_folder, "Labels")

    intended_dir, pred_syn = fileio.join(out_dir, "intended"), fileio.join(out_dir, "pred_synthetic")
    pred_real = fileio.join(out_dir, "pred_real")
    predictions = {}
    images = ((s.files.stem, s.image) for s in synthetic)
    for stem, inst, types in predict_arrays(model, net, images, tile, device, dtype, progress, len(synthetic)):
        predictions[stem] = (inst, types)
        write_prediction(pred_syn, stem, inst, types, table.num_classes)
    for s in synthetic:  # the intended maps in the same merged form, so both sides are read alike
        write_prediction(intended_dir, s.files.stem, s.inst_map, s.type_map, table.num_classes)
    write_predictions(model, net, real_dir, pred_real, split, tile, device, dtype, progress)

    ev_syn = evaluate_folders(intended_dir, pred_syn, class_table=table, out_dir=fileio.join(out_dir, "eval_synthetic"),
                              progress=False)
    ev_real = evaluate_folders(real_labels, pred_real, class_table=table, out_dir=fileio.join(out_dir, "eval_real"),
                               progress=False)
    syn, real = scores(ev_syn), scores(ev_real)
    class_names = {str(c): str(table.names[c]) for c in range(1, table.num_classes)}

    def counts(ev):
        per = ev["classification"]["counts"]["per_class"]
        return {str(c): v["tp"] + v["fn"] + v["fn_d"] for c, v in per.items()}

    result = {
        **(extra or {}), "synthetic_dirs": list(synthetic_dirs), "real_dir": real_dir, "split": split, "tile": tile,
        "class_names": class_names, "synthetic": syn, "real": real, "fidelity": compare(syn, real),
        "true_nuclei_per_class": {"synthetic": counts(ev_syn), "real": counts(ev_real)},
        "n_images": {"synthetic": len(synthetic), "real": ev_real["settings"]["n_images"]},
        "figure": None,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if grid_rows and plot_grid(synthetic, predictions, grid_rows, fileio.join(out_dir, GRID), list(table.names)):
        result["figure"] = GRID
    fileio.write_json(fileio.join(out_dir, "fidelity.json"), result)
    fileio.write_bytes(fileio.join(out_dir, "fidelity.md"), render(result).encode())
    return result


def render(result: Dict[str, Any]) -> str:
    """The Markdown summary of a fidelity result."""

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    names = result["class_names"]
    rows: List[tuple] = [(n, result["synthetic"][k], result["real"][k], result["fidelity"][k])
                         for k, n in (("dice", "Dice"), ("aji", "AJI"), ("pq", "PQ"), ("f1_detection", "F_d"))]
    rows += [(f"F1 {names[c]}", result["synthetic"]["f1_type"].get(c), result["real"]["f1_type"].get(c),
              result["fidelity"]["f1_type"].get(c)) for c in names]
    lines = [
        "# Label fidelity", "",
        f"Segmenter `{result.get('run_dir', 'in memory')}` (trained on real data) on {result['n_images']['synthetic']} synthetic "
        f"patches (scored against the label maps they were synthesised from) and on "
        f"{result['n_images']['real']} real `{result['split']}` images of `{result['real_dir']}`.",
        "Fidelity = synthetic / real.", "",
        "| metric | synthetic | real | fidelity |", "|---|---|---|---|",
        *[f"| {n} | {f(a)} | {f(b)} | {f(c)} |" for n, a, b, c in rows], "",
        "Nuclei per class (intended in synthetic / real ground truth): "
        + ", ".join(f"{names[c]} {result['true_nuclei_per_class']['synthetic'].get(c, 0)} / "
                    f"{result['true_nuclei_per_class']['real'].get(c, 0)}" for c in names), "",
    ]
    if result.get("figure"):
        lines += [f"![synthetic patches: intended vs predicted]({result['figure']})", ""]
    return "\n".join(lines)


def patch_scorer(model, net, table, tile: int, device, dtype=None):
    """A label-fidelity scorer over in-memory patches, for comparisons such as ``benchmarks/bench_steps.py``.

    Returns ``score(images, inst_maps, type_maps) -> dict[str, float]`` where ``images`` is uint8
    [N, H, W, 3], ``inst_maps`` int [N, H, W] (0 = background) and ``type_maps`` int [N, H, W] in the
    merged classes of ``table``: ``model`` (a ``net`` network) predicts every image, and the
    predictions are scored against the given maps exactly as :func:`measure_fidelity` scores
    synthetic patches (pooled over the patches): ``dice``, ``aji``, ``pq``, ``f1_detection`` and
    ``f1_<class name>`` (NaN where undefined, e.g. a class with no nucleus on either side).
    """
    check_net_classes(net, table)

    def score(images: np.ndarray, inst_maps: np.ndarray, type_maps: np.ndarray) -> Dict[str, float]:
        names = [f"patch{i:05d}" for i in range(len(images))]
        predicted = predict_arrays(model, net, zip(names, images), tile, device, dtype)
        pairs = ((name, labels_from_maps(true_inst, true_types, name), labels_from_maps(inst, types, name + " (predicted)"))
                 for (name, inst, types), true_inst, true_types in zip(predicted, inst_maps, type_maps))
        s = scores(evaluate_labels(pairs, class_table=table))
        out = {k: s[k] for k in METRICS}
        out.update({f"f1_{table.names[int(c)]}": v for c, v in s["f1_type"].items()})
        return {k: float("nan") if v is None else float(v) for k, v in out.items()}

    return score


def segmenter_scorer(run_dir: str, table, tile: Optional[int] = None, device: str = "auto", precision: str = "auto"):
    """:func:`patch_scorer` with the network of a finished training run (``run_dir``)."""
    model, net, dev, dtype = load_segmenter(run_dir, device, precision, table)
    return patch_scorer(model, net, table, default_tile(tile), dev, dtype)
