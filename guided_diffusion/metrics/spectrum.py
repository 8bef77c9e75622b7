"""How much fine detail synthetic patches keep: their power spectrum against the real patches'.

A diffusion model that is short of training paints smooth tissue: its patches carry less power at the
finest scales than real H&E, and a two-sample critic (C2ST) can tell them apart from that alone (a
0.5 px Gaussian blur of real patches is enough, docs/REAL_DATA.md 0i). The ratio of the two sets'
power per octave of spatial frequency says where detail is missing: 1 = as much as real, < 1 =
smoother, > 1 = noisier. numpy only.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np


def _gray(images: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 4 and arr.shape[-1] in (1, 3):
        arr = arr.mean(-1)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2] or arr.shape[1] < 8:
        raise ValueError(f"{name}: expected square images [N, S, S] or [N, S, S, 3] with S >= 8, "
                         f"got shape {tuple(np.shape(images))}")
    if len(arr) == 0:
        raise ValueError(f"{name}: no images")
    return arr


def _ring_power(gray: np.ndarray) -> np.ndarray:
    """:func:`radial_power` of images already checked and made single-channel float64 ``[N, S, S]``."""
    size = gray.shape[1]
    window = np.outer(np.hanning(size), np.hanning(size))
    centred = (gray - gray.mean(axis=(1, 2), keepdims=True)) * window
    power = (np.abs(np.fft.fftshift(np.fft.fft2(centred), axes=(1, 2))) ** 2).mean(0)
    yy, xx = np.indices(power.shape)
    radius = np.hypot(yy - size // 2, xx - size // 2).astype(np.int64).ravel()
    total = np.bincount(radius, power.ravel())[: size // 2]
    count = np.bincount(radius)[: size // 2]
    return total / count


def radial_power(images: np.ndarray) -> np.ndarray:
    """Mean radially averaged power spectrum of a set of images.

    Args:
        images: ``[N, S, S, 3]`` or ``[N, S, S]``, any real dtype and range (RGB is averaged to
            one channel first; the same scale must be used for sets that are compared).

    Returns:
        float64 ``[S // 2]``: entry r is the mean power at spatial frequency r / S cycles per pixel
        (rings of integer radius r around the centre of the shifted 2-D FFT), averaged over the
        images. Each image has its mean removed and a Hann window applied, so the borders of a crop
        do not add power at every frequency.
    """
    return _ring_power(_gray(images, "images"))


def octave_power_ratio(real: np.ndarray, synthetic: np.ndarray) -> Dict[str, List]:
    """Synthetic over real power per octave of spatial frequency.

    Args:
        real, synthetic: two sets of images of the same size, ``[N, S, S, 3]`` / ``[M, S, S, 3]``
            (or single-channel ``[N, S, S]``) on the same scale (e.g. both uint8).

    Returns:
        ``{"period_px": [[hi, lo], ...], "ratio": [...]}``: one entry per octave of ring radius
        [1, 2), [2, 4), ..., [S/4, S/2), finest last; ``period_px`` is the octave's range of
        wavelengths in pixels (S/1 to S/2 px, ..., 4 to 2 px), ``ratio`` the synthetic set's summed
        power over the real set's in that octave.
    """
    a, b = _gray(real, "real"), _gray(synthetic, "synthetic")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"real images {a.shape[1:]} and synthetic images {b.shape[1:]} differ in size")
    pr, ps = _ring_power(a), _ring_power(b)
    size = a.shape[1]
    periods, ratios = [], []
    lo = 1
    while lo < size // 2:
        hi = min(2 * lo, size // 2)
        periods.append([size / lo, size / hi])
        den = pr[lo:hi].sum()
        ratios.append(float(ps[lo:hi].sum() / den) if den > 0 else None)
        lo = hi
    return {"period_px": periods, "ratio": ratios}
