"""The network's maps before post-processing: pixel scores, and where a segmenter loses its nuclei.

HoVer-Net's instance step (MONAI's ``HoVerNetInstanceMapPostProcessing``) keeps only nucleus-mask
components that contain a *marker*: a mask pixel whose instance-border energy (the min-max-normalised
Sobel gradient of the predicted HV maps, in [0, 1]) is below 0.4. When the HV branch is still flat --
an under-trained network -- the energy exceeds 0.4 everywhere and whole images lose every nucleus
although the nucleus-pixel (NP) branch finds them. The instance Dice then looks like a failed network.

:func:`diagnose` separates the stages per image of a labelled split:

* ``np_dice`` -- Dice of the NP branch's nucleus pixels (argmax) against the true nucleus pixels;
* ``instance_dice`` -- the same after post-processing (the Dice the metrics report);
* ``hv_corr`` -- Pearson correlation of predicted and true HV maps inside true nuclei (mean of the
  two channels; 1 = perfect);
* ``border_energy_median`` -- median border energy inside the predicted nucleus mask (markers need
  < 0.4);
* ``true_nuclei``, ``markers``, ``predicted_nuclei`` -- counts.

:func:`pixel_scores` pools nucleus-pixel Dice and per-class pixel F1 (NC argmax) over a split: scores
of what the network learnt that the marker step cannot erase (the utility study reports them beside
the instance metrics).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import numpy as np

from ..data.readers import read_dataset
from ..infra import fileio
from .nets import check_image_sizes, check_input_size
from .predict import default_tile, postprocess, predict_image
from .targets import HV, NC, NP, hover_maps
from .train import load_segmenter

FIELDS = ("np_dice", "instance_dice", "hv_corr", "border_energy_median", "true_nuclei", "markers", "predicted_nuclei")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.size > 1 and a.std() > 0 and b.std() > 0 else float("nan")


def stage_scores(outputs: Dict[str, Any], inst_map: np.ndarray) -> Dict[str, float]:
    """The stage numbers of one image (see the module docstring).

    Args:
        outputs: the network's ``{NP: [2, H, W] logits, HV: [2, H, W], ...}`` (float tensors).
        inst_map: int [H, W] true instance ids (0 = background).
    """
    from monai.apps.pathology.transforms import HoVerNetInstanceMapPostProcessing

    np_logits, hv = outputs[NP].float().cpu(), outputs[HV].float().cpu()
    truth = np.asarray(inst_map) > 0
    fg = (np_logits[1] > np_logits[0]).numpy()
    true_hv = hover_maps(inst_map)
    pred_hv = hv.numpy()
    hv_corr = np.nanmean([_corr(pred_hv[c][truth], true_hv[c][truth]) for c in (0, 1)]) if truth.any() else np.nan
    energy, markers = float("nan"), 0
    if fg.any():
        steps = HoVerNetInstanceMapPostProcessing()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Parameter `min_size` is deprecated", category=FutureWarning)
            mask = steps.generate_watershed_mask(np_logits)
            border = np.asarray(steps.generate_instance_border(mask, hv)).squeeze()
            marker_map = np.asarray(steps.generate_watershed_markers(mask, border[None]))
        inside = np.asarray(mask).squeeze() > 0
        energy = float(np.median(border[inside])) if inside.any() else float("nan")
        markers = int(len(np.unique(marker_map)) - 1)
    inst, _ = postprocess(outputs)
    return {
        "np_dice": _dice(fg, truth), "instance_dice": _dice(inst > 0, truth), "hv_corr": float(hv_corr),
        "border_energy_median": energy, "true_nuclei": int(len(np.unique(inst_map)) - 1), "markers": markers,
        "predicted_nuclei": int(inst.max()),
    }


def pixel_counts(outputs: Dict[str, Any], inst_map: np.ndarray, type_map: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel counts of the network's maps before post-processing: int64 [num_classes, 3] of
    (true positives, false positives, false negatives); row 0 is nucleus vs background (NP argmax
    against ``inst_map > 0``), row c >= 1 class c (NC argmax against ``type_map == c``).

    Args:
        outputs: ``{NP: [2, H, W] logits, NC: [num_classes, H, W] logits, ...}`` (float tensors).
        inst_map, type_map: int [H, W] truth (merged classes).
    """
    pred_fg = (outputs[NP][1] > outputs[NP][0]).cpu().numpy()
    pred_type = outputs[NC].argmax(0).cpu().numpy()
    out = np.zeros((num_classes, 3), np.int64)
    for c in range(num_classes):
        pred, true = (pred_fg, np.asarray(inst_map) > 0) if c == 0 else (pred_type == c, np.asarray(type_map) == c)
        out[c] = (np.logical_and(pred, true).sum(), np.logical_and(pred, ~true).sum(), np.logical_and(~pred, true).sum())
    return out


def pixel_f1(counts: np.ndarray) -> Dict[str, Any]:
    """Pooled pixel scores of summed :func:`pixel_counts` (int [num_classes, 3]): ``np_dice``
    (nucleus pixels, row 0) and ``f1_type`` ``{"c": F1 of class-c pixels}`` for c >= 1 (None where
    class c has no pixel in truth or prediction)."""

    def f1(tp, fp, fn):
        return float(2 * tp / (2 * tp + fp + fn)) if (2 * tp + fp + fn) else None

    return {"np_dice": f1(*counts[0]), "f1_type": {str(c): f1(*counts[c]) for c in range(1, len(counts))}}


def pixel_scores(model, net, samples, tile: int, device, dtype=None) -> Dict[str, Any]:
    """Pooled pixel scores (:func:`pixel_f1`) of ``model`` on labelled ``samples`` before
    post-processing. They do not depend on HoVer-Net's marker step, so they stay comparable between
    runs whose instance scores that step decides (see the module docstring)."""
    return pixel_f1(sum(pixel_counts(predict_image(model, net, s.image, tile, device, dtype), s.inst_map, s.type_map,
                                     net.num_classes) for s in samples))


def diagnose(run_dir: str, data_dir: str, split: str, table, tile: Optional[int] = None, device: str = "auto",
             max_images: int = 0, progress: bool = True, precision: str = "auto") -> Dict[str, Any]:
    """Stage numbers of the finished run ``run_dir`` on every labelled image of ``data_dir``/``split``
    (the first ``max_images`` when > 0): ``{"images": [{stem, **stage_scores}], "mean": {...}, ...}``."""
    from tqdm.auto import tqdm

    model, net, dev, dtype = load_segmenter(run_dir, device, precision, table)
    tile = default_tile(tile)
    check_input_size(net, tile, "--tile")
    samples = read_dataset(data_dir, table, split, progress=False)
    if max_images > 0:
        samples = samples[:max_images]
    check_image_sizes(((s.files.image, s.image.shape) for s in samples), f"dataset {data_dir}")
    rows: List[Dict[str, Any]] = []
    for s in tqdm(samples, desc="diagnose", unit="image", disable=not progress):
        rows.append({"stem": s.files.stem, **stage_scores(predict_image(model, net, s.image, tile, dev, dtype), s.inst_map)})
    mean = {}
    for k in FIELDS:  # NaN (undefined, e.g. no predicted mask) is left out; all NaN stays NaN
        v = np.array([r[k] for r in rows], np.float64)
        mean[k] = float(v[~np.isnan(v)].mean()) if (~np.isnan(v)).any() else float("nan")
    no_markers = sum(1 for r in rows if r["markers"] == 0 and r["true_nuclei"] > 0)
    return {"run_dir": run_dir, "data_dir": data_dir, "split": split, "tile": tile, "n_images": len(rows),
            "images_without_markers": no_markers, "mean": mean, "images": rows}


def render(result: Dict[str, Any]) -> str:
    """A one-table Markdown summary of :func:`diagnose`."""
    m = result["mean"]
    return "\n".join([
        f"Segmenter `{result['run_dir']}` on {result['n_images']} `{result['split']}` images of `{result['data_dir']}` "
        f"(means per image; {result['images_without_markers']} images with nuclei got no watershed marker):",
        "",
        "| NP pixel Dice | instance Dice | HV corr. | border energy (median, markers < 0.4) | true nuclei | markers "
        "| predicted nuclei |",
        "|---|---|---|---|---|---|---|",
        f"| {m['np_dice']:.3f} | {m['instance_dice']:.3f} | {m['hv_corr']:.3f} | {m['border_energy_median']:.3f} | "
        f"{m['true_nuclei']:.1f} | {m['markers']:.1f} | {m['predicted_nuclei']:.1f} |",
        "",
    ])


def write(result: Dict[str, Any], out_json: str) -> None:
    fileio.write_json(out_json, result)
