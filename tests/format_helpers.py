"""Tiny PanNuke / CoNIC / Lizard datasets in their exact distributed layouts, with hand-made nuclei.

Every patch holds square 4x4 nuclei on a 3x3 grid (top-left corners at 2 + 9 * k), so the expected
instance maps, classes and centroids are known exactly: nucleus ``j`` of a patch sits at
``(y0, x0) = (2 + 9 * (j // 3), 2 + 9 * (j % 3))`` with centroid ``(x0 + 1.5, y0 + 1.5)``.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import scipy.io
from PIL import Image

SIZE = 32


def corner(j: int):
    return 2 + 9 * (j // 3), 2 + 9 * (j % 3)


def nuclei_maps(classes, ids=None, size: int = SIZE):
    """``(inst int32 [S,S], type int32 [S,S])`` with nucleus j of class ``classes[j]`` and id ``ids[j]``."""
    ids = list(range(1, len(classes) + 1)) if ids is None else list(ids)
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.int32)
    for j, (c, i) in enumerate(zip(classes, ids)):
        y, x = corner(j)
        inst[y : y + 4, x : x + 4] = i
        types[y : y + 4, x : x + 4] = c
    return inst, types


def image(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def pannuke_mask(classes, ids=None, size: int = SIZE) -> np.ndarray:
    """float64 [S, S, 6]: nucleus j's id in channel ``classes[j] - 1``; channel 5 = background (1)."""
    inst, types = nuclei_maps(classes, ids, size)
    mask = np.zeros((size, size, 6), np.float64)
    for c in range(1, 6):
        mask[..., c - 1] = np.where(types == c, inst, 0)
    mask[..., 5] = inst == 0
    return mask


# patch classes per fold: fold k, patch i
PANNUKE_FOLDS = {
    1: [[1, 2, 3], [4, 5]],
    2: [[1, 1, 4]],
    3: [[5, 3, 2, 1]],
}


def write_pannuke(root, folds=PANNUKE_FOLDS, official: bool = True):
    """PanNuke folds under ``root`` (``Fold k/images/foldk/{images,types}.npy``, ``Fold
    k/masks/foldk/masks.npy`` when ``official``, else ``foldk/{images,masks,types}.npy``).
    Returns ``{fold: [(image uint8, inst, type), ...]}``."""
    truth = {}
    for k, patches in folds.items():
        if official:
            img_dir = os.path.join(root, f"Fold {k}", "images", f"fold{k}")
            mask_dir = os.path.join(root, f"Fold {k}", "masks", f"fold{k}")
        else:
            img_dir = mask_dir = os.path.join(root, f"fold{k}")
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(mask_dir, exist_ok=True)
        imgs = [image(100 * k + i) for i in range(len(patches))]
        np.save(os.path.join(img_dir, "images.npy"), np.stack(imgs).astype(np.float64))
        np.save(os.path.join(img_dir, "types.npy"), np.array([f"Tissue{k}{i}" for i in range(len(patches))]))
        np.save(os.path.join(mask_dir, "masks.npy"), np.stack([pannuke_mask(c) for c in patches]))
        truth[k] = [(im, *nuclei_maps(c)) for im, c in zip(imgs, patches)]
    return truth


# CoNIC patches: (patch_info name, classes); sources consep_1 (fold 1), crag_2 (fold 2), glas_3 (fold 3)
CONIC_PATCHES = [
    ("consep_1-0000", [1, 2, 3]),
    ("consep_1-0001", [5, 6]),
    ("crag_2-0000", [2, 2, 4, 1]),
    ("glas_3-0000", [3, 5]),
]
LIZARD_FOLDS = {"consep_1": 1, "crag_2": 2, "glas_3": 3}


def write_info_csv(path, folds=LIZARD_FOLDS):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Filename", "Source", "Split"])
        for name, fold in folds.items():
            w.writerow([name, name.split("_")[0], fold])


def write_conic(root, patches=CONIC_PATCHES, info: bool = True, header: bool = True, label_dtype=np.int32):
    """``images.npy``, ``labels.npy``, ``patch_info.csv`` (and Lizard's ``info.csv``) in ``root``.
    Returns ``[(name, image, inst, type)]``."""
    os.makedirs(root, exist_ok=True)
    imgs = [image(i) for i in range(len(patches))]
    maps = [nuclei_maps(c) for _, c in patches]
    np.save(os.path.join(root, "images.npy"), np.stack(imgs))
    np.save(os.path.join(root, "labels.npy"), np.stack([np.stack(m, -1) for m in maps]).astype(label_dtype))
    with open(os.path.join(root, "patch_info.csv"), "w") as f:
        f.write(("patch_info\n" if header else "") + "".join(n + "\n" for n, _ in patches))
    if info:
        write_info_csv(os.path.join(root, "info.csv"))
    return [(n, im, *m) for (n, _), im, m in zip(patches, imgs, maps)]


# Lizard regions: name -> classes (ids are non-contiguous on purpose)
LIZARD_REGIONS = {"consep_1": [1, 5, 2], "crag_2": [3, 3, 6, 4], "glas_3": [2, 1]}


def write_lizard(root, regions=LIZARD_REGIONS, info: bool = True):
    """The release layout: ``lizard_images1/Lizard_Images1/*.png`` (first half),
    ``lizard_images2/Lizard_Images2/*.png``, ``lizard_labels/Lizard_Labels/Labels/*.mat`` and
    ``.../Lizard_Labels/info.csv``. Returns ``{name: (image, inst, type)}``."""
    truth = {}
    for n, (name, classes) in enumerate(regions.items()):
        folder = os.path.join(root, f"lizard_images{1 + n % 2}", f"Lizard_Images{1 + n % 2}")
        os.makedirs(folder, exist_ok=True)
        im = image(50 + n)
        Image.fromarray(im).save(os.path.join(folder, name + ".png"))
        ids = [10 * (j + 1) for j in range(len(classes))]
        inst, types = nuclei_maps(classes, ids)
        lab_dir = os.path.join(root, "lizard_labels", "Lizard_Labels", "Labels")
        os.makedirs(lab_dir, exist_ok=True)
        cents = np.array([[corner(j)[1] + 1.5, corner(j)[0] + 1.5] for j in range(len(classes))])
        scipy.io.savemat(os.path.join(lab_dir, name + ".mat"), {
            "inst_map": inst, "id": np.array(ids).reshape(-1, 1), "class": np.array(classes).reshape(-1, 1),
            "bbox": np.zeros((len(classes), 4)), "centroid": cents,
        })
        truth[name] = (im, inst, types)
    if info:
        write_info_csv(os.path.join(root, "lizard_labels", "Lizard_Labels", "info.csv"), {k: LIZARD_FOLDS[k] for k in regions})
    return truth
