"""RGB stored as numbers (HoVer-Net ``.npy`` patches, PanNuke / CoNIC arrays): the package's one rule
for their value range. Below both :mod:`.readers` and :mod:`.formats` (as :mod:`.label_arrays` is for
labels); image files (PNG, TIFF, JPEG) are decoded by ``fileio.read_image``. numpy only.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..infra.errors import DiffMixError

# Pixels scanned per step when finding the range of a large (memory-mapped) array: bounds memory.
_SCAN_VALUES = 1 << 24


def rgb_scale(values: np.ndarray, where: str) -> int:
    """How stored RGB values map to 0..255: ``1`` (they are 0..255) or ``255`` (floats in [0, 1]).

    ``values`` is any numeric array ([H, W, 3] of one image, or [N, H, W, 3] of a whole array
    file: the file is then read one way throughout). Integers must lie in 0..255. Floats whose
    values all lie in [0, 1] are images saved as fractions (PanNuke divided by 255, say) and are
    scaled; floats with a value above 1 and none outside [0, 255] are 0..255. A large array is
    scanned in steps (memory-mapped files are never loaded whole).

    Raises:
        DiffMixError naming ``where``: NaN or infinite values, non-numeric dtype, or values outside
        both readings (the found range is named).
    """
    a = values if isinstance(values, np.ndarray) else np.asarray(values)  # keeps a memory map lazy
    if a.dtype == np.uint8 or a.size == 0:
        return 1
    if a.dtype.kind not in "uif":
        raise DiffMixError(f"{where}: image values of dtype {a.dtype}, expected numbers 0..255")
    a = a.reshape(1, -1) if a.ndim < 2 else a
    lo, hi, finite = np.inf, -np.inf, True
    rows = max(1, _SCAN_VALUES // a[0].size)
    for start in range(0, len(a), rows):
        chunk = np.asarray(a[start : start + rows])
        if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            finite = False
            break
        lo, hi = min(lo, chunk.min().item()), max(hi, chunk.max().item())
    if not finite:
        raise DiffMixError(f"{where}: image values include NaN or infinity ({a.dtype}); every pixel must be a "
                           "finite number in 0..255 (or 0..1 for floats)")
    if a.dtype.kind != "f":
        if lo < 0 or hi > 255:
            raise DiffMixError(f"{where}: image values {lo}..{hi} ({a.dtype}) outside 0..255")
        return 1
    if lo >= 0 and hi <= 1:
        return 255
    if lo >= 0 and hi <= 255:
        return 1
    raise DiffMixError(f"{where}: image values {lo:g}..{hi:g} ({a.dtype}) are neither 0..255 nor floats in [0, 1]; "
                       "save the images as 0..255 (uint8) or as floats in [0, 1]")


def rgb_uint8(values: np.ndarray, where: str, scale: Optional[int] = None) -> np.ndarray:
    """Stored RGB as uint8 [..., 3] (a new array): 0..255 as is, floats in [0, 1] times 255, rounded.

    ``scale`` is :func:`rgb_scale` of the file ``values`` comes from (decided once per file for
    array datasets); by default it is decided from ``values`` itself. Raises as :func:`rgb_scale`.
    """
    a = np.asarray(values)
    if scale is None:
        scale = rgb_scale(a, where)
    if a.dtype == np.uint8:
        return np.array(a)  # a copy: callers may write into it, a memory map is read-only
    if scale == 1 and a.dtype.kind != "f":
        return np.ascontiguousarray(a.astype(np.uint8))
    return np.ascontiguousarray(np.rint(a.astype(np.float64) * scale).astype(np.uint8))
