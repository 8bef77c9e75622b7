"""The precision policy shared by training, synthesis, the demo and the downstream segmenter.

Parameters, optimizer state and EMA always stay float32; a precision only chooses the
``torch.autocast`` dtype of the network's forward pass (the sampler arithmetic stays float32).

``auto`` means one thing everywhere: the model's half precision on a CUDA device that supports it,
fp32 elsewhere. The SDM's half precision is fp16 when it was configured ``use_fp16`` (the official
flag; none otherwise); HoVer-Net's is bf16 (it trains without a loss scaler, so fp16 is not offered
there). An explicit precision is used as given.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import torch

from .errors import DiffMixError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, allowed: Sequence[str] = PRECISIONS) -> None:
    """Raise :class:`DiffMixError` unless ``precision`` is one of ``allowed``."""
    if precision not in allowed:
        raise DiffMixError(f"--precision {precision!r}: expected one of {', '.join(allowed)}")


def sdm_half(use_fp16: bool) -> Optional[str]:
    """The SDM's half precision: fp16 when configured ``use_fp16``, else none (``auto`` gives fp32)."""
    return "fp16" if use_fp16 else None


def resolve_precision(precision: str, device: Any, half: Optional[str] = None,
                      allowed: Sequence[str] = PRECISIONS) -> str:
    """``precision`` with ``auto`` replaced: ``half`` ("fp16" / "bf16" / None, the model's half
    precision) on a CUDA device that supports it, else "fp32". ``device``: a torch.device or its type."""
    check_precision(precision, allowed)
    if precision != "auto":
        return precision
    device_type = device if isinstance(device, str) else torch.device(device).type
    if half is None or device_type != "cuda" or (half == "bf16" and not torch.cuda.is_bf16_supported()):
        return "fp32"
    return half


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved precision (None for fp32: no autocast)."""
    return _AUTOCAST_DTYPES.get(precision)


def autocast_context(precision: str, device: torch.device):
    """``torch.autocast`` for "bf16" / "fp16" on ``device``; a no-op context for "fp32"."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
