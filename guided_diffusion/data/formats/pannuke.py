"""PanNuke as released: three folds of 256x256 patches in ``.npy`` arrays.

Per fold: ``images.npy`` float [N, 256, 256, 3] (values 0..255; a copy divided by 255, floats in
[0, 1], is read as such, see :func:`~guided_diffusion.data.formats.array_rgb`), ``masks.npy`` [N, 256, 256, 6]
whose channels are neoplastic, inflammatory, connective/soft tissue, dead, epithelial (instance
ids, 0 = none) and background, and ``types.npy`` [N] (the tissue of each patch). The release
unpacks to ``Fold 1/images/fold1/{images,types}.npy`` and ``Fold 1/masks/fold1/masks.npy``.

``data_dir`` may be a folder holding ``images.npy`` and ``masks.npy``, a fold folder as released
(``Fold 1``), or a root holding fold folders (``Fold 1``, ``Fold 2``, ``Fold 3``; the fold number is
the number in the folder's name). A root is split by fold (see :mod:`guided_diffusion.data.formats`);
a single fold is read whole.

Raw type id = mask channel + 1 (1 neoplastic .. 5 epithelial); the classes are not merged.
Nuclei of the five channels must not share pixels, and an instance id must not appear in two
channels (the channels would otherwise merge two nuclei into one); either is an error naming the
patch. Stems are ``fold<k>_<index:05d>`` (``<index:05d>`` when the fold is unknown).
"""

from __future__ import annotations

import glob
import os
import re
from typing import List, Optional, Tuple

import numpy as np

from ...infra.errors import DiffMixError
from ..classes import _table
from ..readers import SampleFiles
from . import array_rgb, check_array, keep_split, local_dir, member_ref, open_array

CHANNELS = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")
# 'dead' nuclei are by far the rarest PanNuke class (a few % of nuclei in every fold).
TABLE = _table("pannuke", {k: [k] for k in range(1, 6)}, ("background",) + CHANNELS, minor=(4,))
MASK_CHANNELS = len(CHANNELS) + 1  # + background


def _one(folder: str, name: str) -> List[str]:
    """``name`` in ``folder`` itself, or one or two levels down (``images/fold1/images.npy``)."""
    found = []
    for pattern in (name, os.path.join("*", name), os.path.join("*", "*", name)):
        found += sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
        if found:
            return found
    return found


def _fold_number(*names: str) -> Optional[int]:
    for name in names:
        m = re.search(r"(\d+)\s*$", os.path.basename(os.path.normpath(name)))
        if m:
            return int(m.group(1))
    return None


def _fold_files(folder: str) -> Optional[Tuple[str, str, Optional[str]]]:
    """``(images.npy, masks.npy, types.npy or None)`` of a fold folder; None if it is not one (no
    arrays, or several: a root holding fold folders)."""
    images, masks = _one(folder, "images.npy"), _one(folder, "masks.npy")
    if len(images) > 1 or len(masks) > 1 or not (images or masks):
        return None
    if len(images) != 1 or len(masks) != 1:
        raise DiffMixError(f"{folder}: a PanNuke fold needs images.npy and masks.npy; only "
                           f"{os.path.basename((images or masks)[0])} found ({(images or masks)[0]})")
    types = os.path.join(os.path.dirname(images[0]), "types.npy")
    return images[0], masks[0], types if os.path.isfile(types) else None


def find_folds(data_dir: str) -> List[Tuple[Optional[int], Tuple[str, str, Optional[str]]]]:
    """``[(fold number or None, (images, masks, types))]``: one entry for a fold folder, one per
    fold folder (numbered) for a root."""
    data_dir = local_dir(data_dir, "pannuke")
    files = _fold_files(data_dir)
    if files is not None:
        return [(_fold_number(data_dir, os.path.dirname(files[0])), files)]
    folds = []
    for entry in sorted(os.listdir(data_dir)):
        sub = os.path.join(data_dir, entry)
        if os.path.isdir(sub):
            files = _fold_files(sub)
            if files is not None:
                number = _fold_number(entry)
                if number is None:
                    raise DiffMixError(f"{sub}: a fold folder's name must end in its fold number (e.g. 'Fold 1')")
                folds.append((number, files))
    if not folds:
        raise DiffMixError(f"{data_dir}: no PanNuke fold found (images.npy + masks.npy, here or in fold folders)")
    numbers = [n for n, _ in folds]
    if len(set(numbers)) != len(numbers):
        raise DiffMixError(f"{data_dir}: two fold folders share a fold number ({numbers})")
    return folds


def has_folds(data_dir: str) -> bool:
    """True for a root holding fold folders (splits apply), False for a single fold (read whole)."""
    return _fold_files(local_dir(data_dir, "pannuke")) is None


def check_fold(images: str, masks: str, types: Optional[str]) -> int:
    """Validate a fold's array shapes (headers only); returns N."""
    img = open_array(images)
    check_array(images, img, 3, "RGB")
    n = img.shape[0]
    check_array(masks, open_array(masks), MASK_CHANNELS, "channels " + ", ".join(CHANNELS) + ", background",
                n=n, size=img.shape[1:3])
    if types is not None:
        t = open_array(types)
        if t.shape != (n,):
            raise DiffMixError(f"{types}: shape {tuple(t.shape)}, expected [{n}] (one tissue type per image)")
    return n


def list_samples(data_dir: str, split: str = "Train") -> List[SampleFiles]:
    folds = find_folds(data_dir)
    samples, fold_of = [], []
    for number, (images, masks, types) in folds:
        n = check_fold(images, masks, types)
        prefix = f"fold{number}_" if number is not None else ""
        for i in range(n):
            samples.append(SampleFiles(f"{prefix}{i:05d}", member_ref(images, i), member_ref(masks, i),
                                       format="pannuke", member=(images, masks, i, types or "")))
            fold_of.append(number)
    if not has_folds(data_dir):
        return samples  # a fold folder given directly: read whole, like a split folder
    return keep_split(samples, fold_of, split, data_dir)


def read_image(files: SampleFiles) -> np.ndarray:
    images, _, i, _ = files.member
    return array_rgb(images, i, files.image)


def read_labels(files: SampleFiles) -> Tuple[np.ndarray, np.ndarray]:
    """``(inst int64 [H, W], raw type int64 [H, W])`` from the five nucleus channels."""
    _, masks, i, _ = files.member
    # channel-first planes: the per-pixel reductions below become fast whole-plane operations
    ch = np.moveaxis(open_array(masks)[i][..., : len(CHANNELS)], -1, 0)
    where = files.label
    with np.errstate(invalid="ignore"):  # NaN / inf fail the equality check below
        ids = ch.astype(np.int64, order="C")
    if ch.dtype.kind == "f" and not np.array_equal(ids, ch):
        raise DiffMixError(f"{where}: instance ids are not integers")
    if ids.size and ids.min() < 0:
        raise DiffMixError(f"{where}: negative instance ids")
    nz = ids > 0
    per_pixel = nz.sum(axis=0, dtype=np.int8)
    shared_px = int(np.count_nonzero(per_pixel > 1))
    if shared_px:
        raise DiffMixError(f"{where}: {shared_px} pixels belong to nuclei of two channels (each pixel has one class)")
    fg = per_pixel > 0
    # at most one channel is non-zero per pixel, so sums pick that channel's id and number
    inst = ids.sum(axis=0)
    raw = (nz * np.arange(1, len(CHANNELS) + 1, dtype=np.int8)[:, None, None]).sum(axis=0, dtype=np.int64)
    # (id, channel) pairs of the nuclei; an id with two channels would merge two nuclei into one
    pairs = np.unique(inst[fg] * 8 + raw[fg] - 1)
    pair_ids, counts = np.unique(pairs // 8, return_counts=True)
    if (counts > 1).any():
        dup = pair_ids[counts > 1][:3]
        shared = {int(d): [CHANNELS[int(p % 8)] for p in pairs[pairs // 8 == d]] for d in dup}
        raise DiffMixError(f"{where}: instance ids shared across channels {shared} (ids must be unique per patch)")
    return inst, raw


def tissue(files: SampleFiles) -> str:
    """The tissue type of the patch (``types.npy``), '' when the fold has none."""
    _, _, i, types = files.member
    return str(open_array(types)[i]) if types else ""


def encode(image: np.ndarray, inst: np.ndarray, types: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One patch in the release's arrays: ``(image float64 [H, W, 3], mask float64 [H, W, 6])``;
    nucleus ``k`` of class ``c`` is id ``k`` in channel ``c - 1``; the background channel is 1
    where no nucleus is."""
    mask = np.zeros(inst.shape + (MASK_CHANNELS,), np.float64)
    fg = inst > 0
    if fg.any() and (types[fg].min() < 1 or types[fg].max() > len(CHANNELS)):
        raise DiffMixError(f"type values outside 1..{len(CHANNELS)} under nuclei; not PanNuke classes")
    ys, xs = np.nonzero(fg)
    mask[ys, xs, types[fg] - 1] = inst[fg]
    mask[..., -1] = ~fg
    return image.astype(np.float64), mask
