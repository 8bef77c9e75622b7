"""CoNIC as released: Lizard cut into 256x256 patches, in ``.npy`` arrays.

``data_dir`` holds ``images.npy`` uint8 [N, 256, 256, 3] (float copies: 0..255, or [0, 1] scaled),
``labels.npy`` [N, 256, 256, 2] (instance map, class map) and ``patch_info.csv`` (one row per patch, ``<source image>-<k>``, e.g.
``consep_1-0003``; a header row ``patch_info`` is optional). Classes: 1 neutrophil, 2 epithelial,
3 lymphocyte, 4 plasma, 5 eosinophil, 6 connective (not merged). Patches of one source image go to
the same fold (see :mod:`guided_diffusion.data.formats`); a Lizard ``info.csv`` placed in
``data_dir`` gives the official folds. Stems are the patch_info names.
"""

from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

from ...infra.errors import DiffMixError
from ..classes import _table
from ..readers import SampleFiles
from . import array_rgb, check_array, csv_column, keep_split, local_dir, member_ref, open_array, source_folds

CLASS_NAMES = ("background", "neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective")
# Neutrophils and eosinophils are each about 1-2 % of Lizard's nuclei.
MINOR = (1, 5)
TABLE = _table("conic", {k: [k] for k in range(1, 7)}, CLASS_NAMES, minor=MINOR)
INFO_COLUMN = "patch_info"


def source_of(name: str) -> str:
    """The source image of a patch name: the part before its last '-' (``consep_1-0003`` -> ``consep_1``)."""
    return name.rsplit("-", 1)[0] if "-" in name else name


def _paths(data_dir: str) -> Tuple[str, str, str]:
    folder = local_dir(data_dir, "conic")
    paths = tuple(os.path.join(folder, n) for n in ("images.npy", "labels.npy", "patch_info.csv"))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DiffMixError(f"{data_dir}: not a CoNIC folder: missing {', '.join(os.path.basename(p) for p in missing)} "
                           "(expected images.npy, labels.npy, patch_info.csv)")
    return paths  # type: ignore[return-value]


def has_folds(data_dir: str) -> bool:
    return True


def list_samples(data_dir: str, split: str = "Train") -> List[SampleFiles]:
    images, labels, info = _paths(data_dir)
    img = open_array(images)
    check_array(images, img, 3, "RGB")
    n = img.shape[0]
    check_array(labels, open_array(labels), 2, "instance map, class map", n=n, size=img.shape[1:3])
    names = csv_column(info, INFO_COLUMN)
    if len(names) != n:
        raise DiffMixError(f"{info}: {len(names)} patch names, but {images} holds {n} patches")
    seen = set()
    for name in names:
        if not name or name in seen or os.sep in name or "/" in name:
            raise DiffMixError(f"{info}: patch name {name!r} is empty, repeated or not a file name")
        seen.add(name)
    info_csv = os.path.join(os.path.dirname(info), "info.csv")
    folds = source_folds([source_of(n) for n in names], info_csv if os.path.isfile(info_csv) else None)
    samples = [SampleFiles(name, member_ref(images, i), member_ref(labels, i), format="conic",
                           member=(images, labels, i)) for i, name in enumerate(names)]
    return keep_split(samples, [folds[source_of(n)] for n in names], split, data_dir)


def read_image(files: SampleFiles) -> np.ndarray:
    images, _, i = files.member
    return array_rgb(images, i, files.image)


def read_labels(files: SampleFiles) -> Tuple[np.ndarray, np.ndarray]:
    _, labels, i = files.member
    lab = np.asarray(open_array(labels)[i])
    return lab[..., 0], lab[..., 1]


def encode(image: np.ndarray, inst: np.ndarray, types: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One patch in the release's arrays: ``(image uint8 [H, W, 3], labels int32 [H, W, 2])``."""
    if types.size and types.max() >= len(CLASS_NAMES):
        raise DiffMixError(f"type values outside 0..{len(CLASS_NAMES) - 1}; not CoNIC classes")
    return image.astype(np.uint8), np.stack([inst, types], axis=-1).astype(np.int32)
