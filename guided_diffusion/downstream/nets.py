"""The downstream networks. Both map an image batch float32 [B, 3, H, W] (RGB scaled to [-1, 1])
to MONAI's HoVer-Net output dict ``{"nucleus_prediction": [B, 2, H, W], "horizontal_vertical":
[B, 2, H, W], "type_prediction": [B, num_classes, H, W]}`` of logits (NP, NC) and HV values, so
``monai.apps.pathology.losses.HoVerNetLoss`` and MONAI's HoVer-Net post-processing apply unchanged.

``hovernet`` (the paper/GPU preset)
    ``monai.networks.nets.HoVerNet(mode="fast")``: a pre-activation ResNet-50 encoder and three
    dense decoders, 37.6 M parameters, input exactly 256 x 256. We build it with
    ``decoder_padding=True`` so the output is 256 x 256 too and the targets are the whole crop; the
    original HoVer-Net (and MONAI without padding) predicts the central 164 x 164 and is trained on
    the centre-cropped targets. No pretrained weights are downloaded: it trains from scratch, or
    ``encoder_checkpoint`` loads a local encoder (MONAI parameter names, ``.pt`` or
    ``.safetensors``).

``small`` (the CPU preset)
    A ``monai.networks.nets.BasicUNet`` trunk (4 down/up levels, features ``(w, w, 2w, 4w, 8w, w)``,
    batch norm, ReLU) whose ``w``-channel output feeds three heads (3x3 conv + BN + ReLU, then a
    1x1 conv) for NP (2), HV (2) and NC (num_classes). What differs from HoVer-Net: the encoder is
    a plain U-Net encoder instead of a pre-activation ResNet-50, the three branches share one
    decoder and differ only in their heads (HoVer-Net has three full dense decoders), it is ~75x
    narrower (w=16: 0.5 M parameters), and any input size works (not only 256).

The loss (NP: Dice + cross-entropy; HV: MSE + MSE of Sobel gradients inside nuclei; NC: Dice +
cross-entropy) and the post-processing (marker-controlled watershed on the HV gradients, majority
type per instance) are the same for both.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Dict, Iterable, Tuple

import torch
from torch import nn

from ..data.readers import Problems
from ..infra.checkpoints import load_state_dict
from ..infra.errors import DiffMixError
from .targets import HV, NC, NP

ARCHS = ("small", "hovernet")
HOVERNET_SIZE = 256  # MONAI's fast-mode HoVer-Net takes exactly 256 x 256 inputs
# The smallest crop, tile or image side: the small network's four 2x down-samplings need 16 px, and
# MONAI's HoVer-Net post-processing (Sobel and watershed steps) fails on maps of a few pixels.
MIN_SIZE = 16
_ENCODER_PREFIXES = ("conv0.", "res_blocks.", "bottleneck.")


@dataclass(frozen=True)
class NetConfig:
    """What builds a network: ``arch`` (small | hovernet), ``num_classes`` (incl. background),
    ``width`` (small only: base feature width w)."""

    arch: str
    num_classes: int
    width: int = 16

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self, where: str = "") -> None:
        """Raise DiffMixError if these settings build no network (``where`` prefixes the message)."""
        lead = f"{where}: " if where else ""
        if self.arch not in ARCHS:
            raise DiffMixError(f"{lead}arch {self.arch!r}: expected one of {', '.join(ARCHS)}")
        if self.num_classes < 2:
            raise DiffMixError(f"{lead}num_classes must be >= 2 (background + 1 class), got {self.num_classes}")
        if self.arch == "small" and self.width < 2:
            raise DiffMixError(f"{lead}width must be >= 2, got {self.width}")

    @classmethod
    def from_dict(cls, values: Any, source: str) -> "NetConfig":
        """The ``"net"`` entry of a run's ``config.json`` (file ``source``), checked field by field.

        Stricter than :meth:`guided_diffusion.infra.config.ModelConfig.from_dict`: training writes this
        entry with JSON types, so a key it never writes, a missing key, a quoted number
        (``"width": "4"``) or a non-object is a hand edit and is refused, naming the field.
        """
        if not isinstance(values, dict):
            raise DiffMixError(f'{source}: "net": expected a JSON object of network settings, got {type(values).__name__}')
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise DiffMixError(f"{source}: net.{unknown[0]}: unknown setting (expected {', '.join(names)})")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
        if missing:
            raise DiffMixError(f"{source}: net.{missing[0]}: missing")
        for name, value in values.items():
            want = str if name == "arch" else int
            if type(value) is not want:  # exact type: JSON true would pass isinstance(..., int)
                kind = "a string" if want is str else "an integer"
                raise DiffMixError(f"{source}: net.{name}: expected {kind}, got {json.dumps(value)}")
        cfg = cls(**values)
        cfg.check(f"{source}: net")
        return cfg


class SmallHoVerNet(nn.Module):
    """CPU-sized HoVer-Net: a MONAI BasicUNet trunk and the three HoVer-Net heads (see module doc)."""

    def __init__(self, num_classes: int, width: int = 16, in_channels: int = 3):
        super().__init__()
        from monai.networks.blocks import Convolution
        from monai.networks.nets import BasicUNet

        w = int(width)
        self.trunk = BasicUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=w, features=(w, w, 2 * w, 4 * w, 8 * w, w),
            act=("relu", {"inplace": True}), norm=("batch", {}), dropout=0.0,
        )

        def head(out: int) -> nn.Module:
            return nn.Sequential(
                Convolution(2, w, w, kernel_size=3, act=("relu", {"inplace": True}), norm=("batch", {})),
                nn.Conv2d(w, out, kernel_size=1),
            )

        self.heads = nn.ModuleDict({NP: head(2), HV: head(2), NC: head(num_classes)})

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = torch.relu(self.trunk(x))
        return {name: h(features) for name, h in self.heads.items()}


def build_network(cfg: NetConfig) -> nn.Module:
    """The network of ``cfg`` with freshly initialised weights (seed torch first for determinism)."""
    cfg.check()
    if cfg.arch == "small":
        return SmallHoVerNet(cfg.num_classes, cfg.width)
    from monai.networks.nets import HoVerNet

    return HoVerNet(mode="fast", out_classes=cfg.num_classes, decoder_padding=True)


def check_input_size(cfg: NetConfig, size: int, what: str) -> None:
    """Raise if a crop/tile ``size`` does not suit the architecture (HoVer-Net fast: exactly 256)."""
    if cfg.arch == "hovernet" and size != HOVERNET_SIZE:
        raise DiffMixError(f"{what} {size}: MONAI's fast-mode HoVer-Net takes exactly {HOVERNET_SIZE} px inputs")
    if size < MIN_SIZE:
        raise DiffMixError(f"{what} {size}: must be at least {MIN_SIZE} px (four 2x down-samplings)")


def check_image_sizes(images: Iterable[Tuple[str, Tuple[int, ...]]], what: str) -> None:
    """Refuse images a segmenter cannot predict: any side below :data:`MIN_SIZE` (larger images are
    windowed, smaller-than-tile ones padded). ``images``: ``(path or name, shape [H, W, ...])``
    pairs; every offender is listed (one line when there is one), ``what`` names the set."""
    problems = Problems(what)
    for path, shape in images:
        h, w = shape[:2]
        if h < MIN_SIZE or w < MIN_SIZE:
            problems.add(path, f"image {w}x{h} (WxH) is smaller than the segmenter's minimum of {MIN_SIZE} px per side")
    problems.raise_if_any()


def check_net_classes(net: NetConfig, table, where: str = "") -> None:
    """Raise if the network's classes differ from the data's class table (``where`` prefixes the message)."""
    if net.num_classes != table.num_classes:
        raise DiffMixError(f"{where + ': ' if where else ''}the segmenter predicts {net.num_classes} classes, but the "
                           f"data has {table.num_classes} ({table.name})")


def load_encoder(model: nn.Module, path: str) -> int:
    """Copy the encoder weights of a local checkpoint into a MONAI HoVerNet.

    ``path`` holds a state dict (``.pt`` read weights-only, or ``.safetensors``) with MONAI HoVerNet
    parameter names; only ``conv0.*``, ``res_blocks.*`` and ``bottleneck.*`` are taken, and each
    must match in shape. Returns the number of tensors loaded.
    """
    sd = load_state_dict(path)
    own = model.state_dict()
    taken = {k: v for k, v in sd.items() if k.startswith(_ENCODER_PREFIXES)}
    bad = [k for k, v in taken.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise DiffMixError(f"{path}: {len(bad)} encoder tensors do not fit MONAI's HoVerNet (e.g. {bad[0]})")
    if not taken:
        raise DiffMixError(f"{path}: no encoder tensors (names starting with {', '.join(_ENCODER_PREFIXES)})")
    model.load_state_dict(taken, strict=False)
    return len(taken)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
