"""HoVer-Net training targets from label maps.

For a crop with instance map ``inst`` and class map ``type`` (int [H, W]), HoVer-Net learns

* NP (``nucleus_prediction``): one-hot nucleus / background, float [2, H, W];
* HV (``horizontal_vertical``): per nucleus, the horizontal and vertical distance of each pixel to
  the nucleus centroid, scaled to [-1, 1] separately on each side of the centroid, 0 on background,
  float [2, H, W] (channel 0 horizontal = x, channel 1 vertical = y) -- computed by
  ``monai.transforms.ComputeHoVerMaps``;
* NC (``type_prediction``): one-hot class, float [num_classes, H, W] (class 0 = background).

The targets are computed after cropping and augmenting, as HoVer-Net does, so a nucleus cut by the
crop border gets the centroid of its visible part.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from monai.data import set_track_meta
from monai.transforms import ComputeHoVerMaps
from monai.utils import convert_to_numpy
from monai.utils.enums import HoVerNetBranch

from ..infra.errors import DiffMixError

NP, HV, NC = HoVerNetBranch.NP.value, HoVerNetBranch.HV.value, HoVerNetBranch.NC.value

# MONAI transforms (the loss's Sobel filters, ComputeHoVerMaps) otherwise wrap results in MetaTensors,
# whose per-op dispatch slows training and inference; the downstream code uses no MONAI metadata.
set_track_meta(False)

_hover_maps = ComputeHoVerMaps(dtype="float32")


def hover_maps(inst_map: np.ndarray) -> np.ndarray:
    """Horizontal and vertical centroid-distance maps of an instance map.

    Args:
        inst_map: int [H, W] instance ids, 0 = background (ids need not be contiguous).

    Returns:
        float32 [2, H, W] in [-1, 1]: channel 0 horizontal (x), channel 1 vertical (y).
    """
    inst = np.asarray(inst_map)
    if inst.ndim != 2:
        raise ValueError(f"instance map must be [H, W], got shape {inst.shape}")
    return convert_to_numpy(_hover_maps(inst.astype(np.int64)[None])).astype(np.float32)


def hovernet_targets(inst: torch.Tensor, types: torch.Tensor, num_classes: int) -> Dict[str, torch.Tensor]:
    """The three branch targets of a batch, keyed like MONAI's HoVer-Net outputs.

    Args:
        inst: int64 [B, H, W] instance ids (0 = background).
        types: int64 [B, H, W] classes in ``0..num_classes-1``.
        num_classes: classes including background.

    Returns:
        ``{NP: float32 [B, 2, H, W], HV: float32 [B, 2, H, W], NC: float32 [B, num_classes, H, W]}``.
    """
    if inst.shape != types.shape or inst.dim() != 3:
        raise ValueError(f"inst {tuple(inst.shape)} and types {tuple(types.shape)} must both be [B, H, W]")
    if types.numel() and int(types.max()) >= num_classes:
        raise DiffMixError(f"type value {int(types.max())} outside 0..{num_classes - 1} (num_classes={num_classes})")
    fg = (inst > 0).long()
    hv = torch.from_numpy(np.stack([hover_maps(m) for m in inst.cpu().numpy()]))
    one_hot = torch.nn.functional.one_hot
    return {
        NP: one_hot(fg, 2).permute(0, 3, 1, 2).float(),
        HV: hv,
        # A pixel inside a nucleus but typed background (possible in hand-made labels) stays class 0.
        NC: one_hot(types.long(), num_classes).permute(0, 3, 1, 2).float(),
    }
