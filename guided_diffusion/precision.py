"""The precision policy shared by training, synthesis and the demo.

Parameters, optimizer state and EMA always stay float32; a precision only chooses the
``torch.autocast`` dtype of the network's forward pass (the sampler arithmetic stays float32).

``auto`` means one thing everywhere: fp16 when the model was configured ``use_fp16`` (the official
flag) *and* runs on a CUDA device, else fp32. An explicit fp32 / bf16 / fp16 is used as given.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from .errors import DiffMixError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> None:
    """Raise :class:`DiffMixError` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise DiffMixError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")


def resolve_precision(precision: str, use_fp16: bool, device: Any) -> str:
    """``precision`` with ``auto`` replaced (see the module doc); ``device`` a torch.device or its type."""
    check_precision(precision)
    if precision != "auto":
        return precision
    device_type = device if isinstance(device, str) else torch.device(device).type
    return "fp16" if use_fp16 and device_type == "cuda" else "fp32"


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved precision (None for fp32: no autocast)."""
    return _AUTOCAST_DTYPES.get(precision)


def autocast_context(precision: str, device: torch.device):
    """``torch.autocast`` for "bf16" / "fp16" on ``device``; a no-op context for "fp32"."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
