"""Inference with a trained downstream network and HoVer-Net post-processing from MONAI.

An image (uint8 [H, W, 3]) is scaled to [-1, 1] and run through the network in ``tile`` x ``tile``
windows (``monai.inferers.sliding_window_inference``, 25 % overlap, Gaussian blending; an image
smaller than a tile is padded; one with a side below ``nets.MIN_SIZE`` is refused). The three maps then go through
``HoVerNetInstanceMapPostProcessing`` (watershed on the HV-map gradients, MONAI's default
thresholds) and ``HoVerNetNuclearTypePostProcessing`` (majority type per instance). Instances that
MONAI drops from its instance table (no contour of >= 3 points) are removed from the map too.

Predictions are written in the CoNSeP ``.mat`` layout that ``scripts/evaluate.py`` reads:
``inst_map`` (contiguous ids), ``type_map``, ``inst_type``, ``inst_centroid`` (x, y), plus
``classes_merged`` = 1 and ``num_classes`` (the classes are the model's merged ones).
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from ..data.condition import image_to_tensor
from ..data.labels import relabel_contiguous, write_label_mat
from ..data.readers import list_images, read_rgb
from ..infra import fileio
from ..infra.errors import DiffMixError
from .nets import HOVERNET_SIZE, NetConfig, check_image_sizes, check_input_size
from .targets import HV, NC, NP
from .train import forward, load_segmenter

RECORD = "prediction.json"


def postprocess(outputs: Dict[str, torch.Tensor]) -> Tuple[np.ndarray, np.ndarray]:
    """HoVer-Net post-processing of one image's network outputs.

    Args:
        outputs: ``{NP: [2, H, W] logits, HV: [2, H, W], NC: [C, H, W] logits}`` (float tensors).

    Returns:
        ``(inst_map int32 [H, W] ids 1..N, type_map int32 [H, W])``.
    """
    from monai.apps.pathology.transforms import HoVerNetInstanceMapPostProcessing, HoVerNetNuclearTypePostProcessing

    np_map, hv_map = outputs[NP].float().cpu(), outputs[HV].float().cpu()
    if not bool((np_map[1] > np_map[0]).any()):  # no nucleus pixel: MONAI's border step needs some
        empty = np.zeros(np_map.shape[-2:], np.int32)
        return empty, empty.copy()
    with warnings.catch_warnings():
        # MONAI 1.6 passes scikit-image 0.26's deprecated min_size (same meaning here); not ours to fix.
        warnings.filterwarnings("ignore", message="Parameter `min_size` is deprecated", category=FutureWarning)
        info, inst = HoVerNetInstanceMapPostProcessing()(np_map, hv_map)
    inst = np.asarray(inst).reshape(np_map.shape[-2:]).astype(np.int64)
    inst = np.where(np.isin(inst, np.fromiter(info.keys(), np.int64, len(info))), inst, 0)
    if NC in outputs:
        _, type_map = HoVerNetNuclearTypePostProcessing()(outputs[NC].float().cpu(), info, torch.from_numpy(inst)[None])
        types = np.asarray(type_map).reshape(inst.shape).astype(np.int32)
    else:
        types = (inst > 0).astype(np.int32)
    return relabel_contiguous(inst), np.where(inst > 0, types, 0).astype(np.int32)


@torch.no_grad()
def predict_image(model: torch.nn.Module, net: NetConfig, image: np.ndarray, tile: int, device: torch.device,
                  dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Network outputs of one image uint8 [H, W, 3]: ``{NP: [2,H,W], HV: [2,H,W], NC: [C,H,W]}`` float32.

    The small network takes any size, so its windows shrink to an image smaller than ``tile``
    (no padding); MONAI's HoVer-Net needs exactly 256 px windows (smaller images are padded).
    """
    from monai.inferers import sliding_window_inference

    x = image_to_tensor(np.asarray(image))[None].to(device)
    h, w = x.shape[-2:]
    roi = (tile, tile) if net.arch == "hovernet" else (min(tile, h), min(tile, w))
    out = sliding_window_inference(
        x, roi_size=roi, sw_batch_size=4, predictor=lambda t: forward(model, t, dtype),
        overlap=0.25, mode="gaussian",
    )
    return {k: v[0] for k, v in out.items()}


def predict_outputs(model: torch.nn.Module, net: NetConfig, images: Iterable[Tuple[str, np.ndarray]], tile: int,
                    device: torch.device, dtype: Optional[torch.dtype] = None, progress: bool = False,
                    total: Optional[int] = None):
    """Yield ``(stem, outputs, inst_map int32 [H, W], type_map int32 [H, W])`` for ``(stem, image)``
    pairs: the network runs once per image, and its raw maps (``outputs``, as :func:`predict_image`)
    come with their post-processed labels, so a caller that scores both predicts once. An image below
    the minimum size raises when its turn comes (callers that write files check them all first)."""
    from tqdm.auto import tqdm

    check_input_size(net, tile, "--tile")
    for stem, image in tqdm(images, total=total, desc="predict", unit="image", disable=not progress):
        check_image_sizes([(stem, np.shape(image))], "the images to predict")
        outputs = predict_image(model, net, image, tile, device, dtype)
        yield (stem, outputs, *postprocess(outputs))


def predict_arrays(model: torch.nn.Module, net: NetConfig, images: Iterable[Tuple[str, np.ndarray]], tile: int,
                   device: torch.device, dtype: Optional[torch.dtype] = None, progress: bool = False,
                   total: Optional[int] = None):
    """Yield ``(stem, inst_map int32 [H, W], type_map int32 [H, W])`` for ``(stem, image)`` pairs
    (:func:`predict_outputs` without the raw maps)."""
    for stem, _, inst, types in predict_outputs(model, net, images, tile, device, dtype, progress, total):
        yield stem, inst, types


def write_prediction(out_dir: str, stem: str, inst_map: np.ndarray, type_map: np.ndarray, num_classes: int) -> str:
    """Write one predicted label map as ``out_dir/<stem>.mat`` (atomically; the CoNSeP layout marked
    ``classes_merged`` = 1 with the model's ``num_classes``). Returns the path."""
    path = fileio.join(out_dir, stem + ".mat")
    write_label_mat(path, inst_map, type_map, classes_merged=np.array(1), num_classes=np.array(num_classes))
    return path


def write_predictions(model: torch.nn.Module, net: NetConfig, data_dir: str, out_dir: str, split: str, tile: int,
                      device: torch.device, dtype: Optional[torch.dtype] = None, progress: bool = True) -> List[str]:
    """Predict every image of a dataset split (or a folder of ``.npy`` patches) into ``out_dir/<stem>.mat``
    (each written atomically). Returns the written paths, sorted by stem."""
    folder, images = list_images(data_dir, split)
    if not images:
        raise DiffMixError(f"{folder}: no images to predict")
    stems = sorted(images)
    # Every image is read and its size checked before the first prediction is written, so a bad one
    # late in the split leaves no partial output (reading twice costs little beside the network).
    check_image_sizes(((images[s], read_rgb(images[s]).shape) for s in stems), f"images folder {folder}")
    pairs = ((s, read_rgb(images[s])) for s in stems)
    return [write_prediction(out_dir, stem, inst, types, net.num_classes)
            for stem, inst, types in predict_arrays(model, net, pairs, tile, device, dtype, progress, len(stems))]


def default_tile(tile: Optional[int]) -> int:
    """The inference window: ``tile``, or 256 px (HoVer-Net's input size) when None/0."""
    return int(tile or HOVERNET_SIZE)


def write_record(out_dir: str, run_dir: str, data_dir: str, split: str, tile: int, n_images: int, net: NetConfig) -> None:
    """``out_dir/prediction.json``: what made the predictions of ``out_dir`` (written after them)."""
    fileio.write_json(fileio.join(out_dir, RECORD), {
        "run_dir": run_dir, "data_dir": data_dir, "split": split, "tile": tile, "n_images": n_images,
        "net": net.to_dict(),
    })


def predict_folder(run_dir: str, data_dir: str, out_dir: str, split: str = "Test", tile: Optional[int] = None,
                   device: str = "auto", precision: str = "auto", progress: bool = True) -> List[str]:
    """:func:`write_predictions` with the network of a finished training run; ``out_dir/prediction.json``
    (:func:`write_record`) is written last."""
    model, net, dev, dtype = load_segmenter(run_dir, device, precision)
    tile = default_tile(tile)
    written = write_predictions(model, net, data_dir, out_dir, split, tile, dev, dtype, progress)
    write_record(out_dir, run_dir, data_dir, split, tile, len(written), net)
    return written
