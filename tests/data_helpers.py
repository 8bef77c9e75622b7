"""Helpers for the data-layer tests: write tiny datasets in the CoNSeP layout."""

from __future__ import annotations

import os

import numpy as np
import scipy.io
from PIL import Image


def write_image(path, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)


def write_mat(path, **arrays) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scipy.io.savemat(path, arrays)


def blobs(h: int, w: int, n: int, seed: int, max_type: int = 7):
    """(inst int32 [h,w], type int32 [h,w]) with n square nuclei, raw types 1..max_type."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((h, w), np.int32)
    types = np.zeros((h, w), np.int32)
    for k in range(n):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        s = int(rng.integers(2, 5))
        inst[y : y + s, x : x + s] = 10 * (k + 1)  # non-contiguous ids on purpose
        types[y : y + s, x : x + s] = int(rng.integers(1, max_type + 1))
    return inst, types


def write_pair(root, split, stem, h=32, w=32, seed=0, ext=".png", max_type=7, **extra):
    """Write Images/<stem><ext> and Labels/<stem>.mat under root/split; returns (image, inst, type)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    inst, types = blobs(h, w, 4, seed, max_type)
    write_image(os.path.join(root, split, "Images", stem + ext), image)
    write_mat(os.path.join(root, split, "Labels", stem + ".mat"), inst_map=inst, type_map=types, **extra)
    return image, inst, types
