"""What the SDM U-Net is fed from data: the condition (one-hot classes plus the instance-edge
channel) and the image tensor.

These single functions are used by training, sampling and the demo alike, so the model always sees
the layout and value range it was trained on.
"""

from __future__ import annotations

import numpy as np
import torch


def instance_edges(inst_map: torch.Tensor) -> torch.Tensor:
    """Instance boundary map.

    A pixel is an edge where its instance id differs from its left, right, upper or lower
    neighbour (both sides of a boundary are marked; background counts as id 0; the image border
    itself is not an edge).

    Args:
        inst_map: integer tensor [..., H, W].

    Returns:
        bool tensor of the same shape.
    """
    edge = torch.zeros(inst_map.shape, dtype=torch.bool, device=inst_map.device)
    dx = inst_map[..., :, 1:] != inst_map[..., :, :-1]
    dy = inst_map[..., 1:, :] != inst_map[..., :-1, :]
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge


def build_condition(
    type_map,
    inst_map,
    num_classes: int,
    no_instance: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Build the U-Net condition ``y`` from (already merged) label maps.

    Args:
        type_map: integer array/tensor [N, H, W] or [H, W], values in [0, num_classes)
            (0 = background).
        inst_map: integer array/tensor of the same shape, instance ids (0 = background). Ignored
            when ``no_instance``.
        num_classes: number of classes including background.
        no_instance: if True, omit the instance-edge channel.

    Returns:
        float tensor [N, num_classes (+1), H, W] with values in {0, 1}: the one-hot class map,
        then (unless ``no_instance``) the instance-edge map. A 2-D input gives N = 1.
    """
    types = torch.as_tensor(np.asarray(type_map) if not torch.is_tensor(type_map) else type_map)
    if types.dim() == 2:
        types = types[None]
    types = types.long()
    if types.numel() and (int(types.min()) < 0 or int(types.max()) >= num_classes):
        raise ValueError(
            f"type map holds values in [{int(types.min())}, {int(types.max())}], "
            f"outside the class table 0..{num_classes - 1} (num_classes={num_classes})"
        )
    onehot = torch.nn.functional.one_hot(types, num_classes).permute(0, 3, 1, 2).to(dtype)
    if no_instance:
        return onehot.contiguous()
    inst = torch.as_tensor(np.asarray(inst_map) if not torch.is_tensor(inst_map) else inst_map)
    if inst.dim() == 2:
        inst = inst[None]
    inst = inst.to(types.device)
    edge = instance_edges(inst).to(dtype)[:, None]
    return torch.cat([onehot, edge], dim=1).contiguous()


def condition_channels(num_classes: int, no_instance: bool = False) -> int:
    """Width of the condition tensor: ``num_classes`` (+1 edge channel unless ``no_instance``)."""
    return num_classes + (0 if no_instance else 1)


def image_to_tensor(image) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` or ``[N, H, W, 3]`` -> float32 ``[3, H, W]`` or ``[N, 3, H, W]`` in [-1, 1]
    (``x / 127.5 - 1``, as the official loader; exact at 0 and 255)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] or [N, H, W, 3] images, got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
    return x.movedim(-1, -3).contiguous()
