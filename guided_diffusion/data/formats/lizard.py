"""Lizard as released: whole colon regions as ``.png`` images with ``.mat`` labels.

The release unpacks to ``lizard_images1/Lizard_Images1/*.png``, ``lizard_images2/Lizard_Images2/*.png``
and ``lizard_labels/Lizard_Labels/Labels/*.mat`` (+ ``info.csv``). ``data_dir`` may be any folder
above them: every ``.png`` and ``.mat`` below it is found and paired by stem (a stem found twice is
an error). A label ``.mat`` holds ``inst_map`` [H, W], ``id`` [N, 1] (the instance ids) and
``class`` [N, 1] (their classes, 1 neutrophil .. 6 connective, as in CoNIC); ``bbox`` and
``centroid`` are not needed (recomputed when maps are written). Regions are split by
``info.csv``'s Split column when one is found below ``data_dir``, else by a hash of the name (see
:mod:`guided_diffusion.data.formats`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Tuple

import numpy as np

from ...infra import fileio
from ...infra.errors import DiffMixError
from ..readers import IMAGE_EXTS, LABEL_EXT, Problems, SampleFiles, read_rgb
from . import keep_split, local_dir, source_folds
from .conic import TABLE as CONIC_TABLE

TABLE = dataclasses.replace(CONIC_TABLE, name="lizard")
REQUIRED_KEYS = ("inst_map", "id", "class")


def _walk(data_dir: str):
    images, labels, infos = {}, {}, []
    problems = Problems(f"Lizard folder {data_dir}")
    for folder, dirs, names in os.walk(data_dir):
        dirs.sort()
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            path = os.path.join(folder, name)
            if name.lower() == "info.csv":
                infos.append(path)
                continue
            table = images if ext.lower() in IMAGE_EXTS else labels if ext.lower() == LABEL_EXT else None
            if table is None:
                continue
            if stem in table:
                problems.add(path, f"stem {stem!r} found twice (also {table[stem]})")
            table[stem] = path
    for stem in sorted(set(images) - set(labels)):
        problems.add(images[stem], f"image without a label: no {stem}.mat below {data_dir}")
    for stem in sorted(set(labels) - set(images)):
        problems.add(labels[stem], f"label without an image: no {stem}.png below {data_dir}")
    if len(infos) > 1:
        problems.add(data_dir, f"several info.csv files below it ({', '.join(infos)})")
    problems.raise_if_any()
    return images, labels, infos[0] if infos else None


def has_folds(data_dir: str) -> bool:
    return True


def list_samples(data_dir: str, split: str = "Train") -> List[SampleFiles]:
    folder = local_dir(data_dir, "lizard")
    images, labels, info = _walk(folder)
    stems = sorted(images)
    if not stems:
        raise DiffMixError(f"{data_dir}: no Lizard images (.png) with labels (.mat) found below it")
    folds = source_folds(stems, info)
    samples = [SampleFiles(s, images[s], labels[s], format="lizard") for s in stems]
    return keep_split(samples, [folds[s] for s in stems], split, data_dir)


def read_image(files: SampleFiles) -> np.ndarray:
    return read_rgb(files.image)


def read_labels(files: SampleFiles) -> Tuple[np.ndarray, np.ndarray]:
    """``(inst [H, W], raw type [H, W])``: each instance's class from the ``id``/``class`` lists."""
    path = files.label
    mat = fileio.read_mat(path)
    missing = [k for k in REQUIRED_KEYS if k not in mat]
    if missing:
        raise DiffMixError(f"{path}: missing key(s) {', '.join(missing)} (a Lizard label holds "
                           f"{', '.join(REQUIRED_KEYS)}; found {', '.join(sorted(mat)) or 'none'})")
    inst = np.asarray(mat["inst_map"])
    ids = np.asarray(mat["id"]).astype(np.int64).ravel()
    classes = np.asarray(mat["class"]).astype(np.int64).ravel()
    if ids.size != classes.size:
        raise DiffMixError(f"{path}: {ids.size} ids but {classes.size} classes")
    if inst.ndim != 2 or inst.dtype.kind not in "uif":
        raise DiffMixError(f"{path}: inst_map has shape {inst.shape} and dtype {inst.dtype}, expected a 2-D integer map")
    if inst.size and inst.min() < 0:
        raise DiffMixError(f"{path}: inst_map holds negative values")
    if inst.dtype.kind == "f" and not np.array_equal(inst, np.round(inst)):
        raise DiffMixError(f"{path}: inst_map holds non-integer values")
    inst = inst.astype(np.int64)
    present = np.unique(inst)
    present = present[present != 0]
    unlisted = np.setdiff1d(present, ids)
    if unlisted.size:
        raise DiffMixError(f"{path}: instance ids {unlisted[:5].tolist()} of inst_map have no entry in 'id'/'class'")
    bad = sorted(set(classes.tolist()) - set(TABLE.raw_ids[1:]))
    if bad:
        raise DiffMixError(f"{path}: class values {bad} are not in the lizard class table "
                           f"(1..{TABLE.num_classes - 1}: {', '.join(TABLE.names[1:])})")
    if ids.size and ids.min() < 1:
        raise DiffMixError(f"{path}: 'id' holds ids < 1")
    lut = np.zeros(int(max(ids.max(initial=0), present.max(initial=0))) + 1, np.int64)
    lut[ids] = classes
    return inst, lut[inst]
