"""Datasets read as they are distributed: PanNuke, CoNIC (Lizard patches) and Lizard.

Each is a dataset mode (``--dataset_mode pannuke|conic|lizard``) of every command. The data layer
(:mod:`guided_diffusion.data.readers`) dispatches here through :class:`SampleFiles` ``.format``;
everything downstream (statistics, GradMix, training, synthesis) sees the same labelled images as
for CoNSeP. A format module provides:

* ``TABLE``: its :class:`~guided_diffusion.data.classes.ClassTable` (raw ids = merged ids, class
  names, ``minor`` = the rare classes GradMix balances by default);
* ``list_samples(data_dir, split) -> [SampleFiles]`` and ``has_folds(data_dir) -> bool``;
* ``read_image(files) -> uint8 [H, W, 3]`` (array formats through :func:`array_rgb`) and ``read_labels(files) -> (inst, raw type)``
  (int [H, W] each; both raise :class:`DiffMixError` naming the file);
* for array formats, ``encode``/``write_arrays`` (the source-format writer, see :mod:`.export`).

Splits never leak: a split is a set of folds, and a fold holds whole source images. PanNuke's folds
are its three released folds; CoNIC patches and Lizard regions take the fold of their source image,
from Lizard's ``info.csv`` (column ``Split``) when one is found, else from a fixed hash of the
source image's name. ``Train`` = folds 1 and 2, ``Test`` = fold 3, ``all`` = every fold, or name
folds: ``fold1,fold3`` / ``1,3``. A PanNuke fold folder given directly is read whole (like a
CoNSeP split folder).

Arrays are memory-mapped (``np.load(mmap_mode="r")``) and read one patch at a time; validated
patches of array datasets are handed out as :class:`ArrayPatch` objects that read their pixels
when used, so a PanNuke fold (several GB) is never held in memory. These modes read local files.

This package does not import torch.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib
import io
import os
import threading
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from ...infra import fileio
from ...infra.errors import DiffMixError
from ..image_arrays import rgb_scale, rgb_uint8
from ..label_arrays import maps_from_arrays

FORMAT_MODES = ("pannuke", "conic", "lizard")
TRAIN_FOLDS = (1, 2)
TEST_FOLDS = (3,)
NUM_FOLDS = 3


def is_format(mode) -> bool:
    """Whether ``mode`` is one of the distributed-format dataset modes."""
    return str(mode or "").lower() in FORMAT_MODES


def get_format(mode):
    """The module reading dataset mode ``mode`` (``pannuke``, ``conic`` or ``lizard``)."""
    mode = str(mode).lower()
    if mode not in FORMAT_MODES:
        raise DiffMixError(f"dataset_mode {mode!r} is not a distributed dataset format ({', '.join(FORMAT_MODES)})")
    return importlib.import_module(f"{__name__}.{mode}")


# ----------------------------------------------------------------------------- splits


def parse_split(split: str) -> Optional[frozenset]:
    """The folds a split names: ``Train`` -> {1, 2}, ``Test`` -> {3}, ``all`` -> None (every fold),
    ``fold1,fold3``, ``fold1+fold3`` or ``1,3`` -> {1, 3}."""
    text = str(split or "all").strip().lower()
    if text == "all":
        return None
    if text == "train":
        return frozenset(TRAIN_FOLDS)
    if text == "test":
        return frozenset(TEST_FOLDS)
    folds = set()
    for part in text.replace(" ", "").replace("+", ",").split(","):
        digits = part[4:] if part.startswith("fold") else part
        if not digits.isdigit() or int(digits) < 1:
            raise DiffMixError(
                f"split {split!r}: expected Train (folds {','.join(map(str, TRAIN_FOLDS))}), Test (fold "
                f"{','.join(map(str, TEST_FOLDS))}), all, or folds such as fold1,fold3"
            )
        folds.add(int(digits))
    return frozenset(folds)


def hash_fold(source: str) -> int:
    """Fold 1..3 of a source image without an ``info.csv``: a fixed hash of its name."""
    return 1 + int.from_bytes(hashlib.sha256(source.encode("utf-8")).digest()[:8], "little") % NUM_FOLDS


def read_info_folds(path: str) -> Dict[str, int]:
    """Lizard's ``info.csv``: ``{source image name (no extension): fold}`` from its Filename and
    Split columns (matched case-insensitively)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "filename" not in header or "split" not in header:
        raise DiffMixError(f"{path}: expected the columns Filename and Split (found {', '.join(rows[0]) if rows else 'none'})")
    i_name, i_split = header.index("filename"), header.index("split")
    folds = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        try:
            folds[os.path.splitext(row[i_name].strip())[0]] = int(float(row[i_split]))
        except (IndexError, ValueError):
            raise DiffMixError(f"{path}: line {n}: expected a file name and an integer split, got {row}") from None
    return folds


def source_folds(sources: Iterable[str], info_csv: Optional[str]) -> Dict[str, int]:
    """The fold of every source image: from ``info_csv`` if given (a source missing there is an
    error), else :func:`hash_fold`."""
    sources = sorted(set(sources))
    if info_csv is None:
        return {s: hash_fold(s) for s in sources}
    table = read_info_folds(info_csv)
    missing = [s for s in sources if s not in table]
    if missing:
        raise DiffMixError(f"{info_csv}: no Split for source image(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {s: table[s] for s in sources}


def keep_split(items: List, folds_of: List[int], split: str, where: str) -> List:
    """The items whose fold is in ``split`` (see :func:`parse_split`); none left is an error."""
    wanted = parse_split(split)
    if wanted is None:
        kept = list(items)
    else:
        kept = [it for it, fold in zip(items, folds_of) if fold in wanted]
    if not kept:
        have = sorted(set(folds_of))
        raise DiffMixError(f"{where}: split {split!r} selects no images (folds present: {have})")
    return kept


# ----------------------------------------------------------------------------- arrays


def local_dir(data_dir: str, mode: str) -> str:
    """``data_dir`` as a local folder (these modes memory-map local files)."""
    data_dir = str(data_dir)
    if fileio.is_remote(data_dir):
        raise DiffMixError(f"{data_dir}: dataset_mode {mode} reads local files (memory-mapped); copy the dataset to a local disk")
    if not os.path.isdir(data_dir):
        raise DiffMixError(f"{data_dir}: data_dir not found")
    return data_dir


@functools.lru_cache(maxsize=32)
def _open(path: str, mtime_ns: int, size: int) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DiffMixError(f"{path}: not a readable .npy array ({err})") from None


def open_array(path: str) -> np.ndarray:
    """A read-only memory map of a ``.npy`` file (cached per process; reopened if the file changes)."""
    try:
        st = os.stat(path)
    except OSError:
        raise DiffMixError(f"{path}: file not found") from None
    return _open(path, st.st_mtime_ns, st.st_size)


def check_array(path: str, arr: np.ndarray, channels: int, what: str, n: Optional[int] = None,
                size: Optional[Tuple[int, int]] = None) -> None:
    """Raise naming ``path`` unless ``arr`` is [N, H, W, channels] (with N = ``n``, [H, W] = ``size``
    when given)."""
    if arr.ndim != 4 or arr.shape[3] != channels:
        raise DiffMixError(f"{path}: shape {tuple(arr.shape)}, expected [N, H, W, {channels}] ({what})")
    if n is not None and arr.shape[0] != n:
        raise DiffMixError(f"{path}: {arr.shape[0]} patches, but the images array holds {n}")
    if size is not None and tuple(arr.shape[1:3]) != tuple(size):
        raise DiffMixError(f"{path}: patches of {arr.shape[1]}x{arr.shape[2]}, but the images are {size[0]}x{size[1]}")
    if arr.dtype.kind not in "uif":
        raise DiffMixError(f"{path}: dtype {arr.dtype}, expected numbers ({what})")


def member_ref(path: str, index: int) -> str:
    """How a patch of an array file is named in messages and records: ``<path>[<index>]``."""
    return f"{path}[{index}]"


_SCALE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=32)
def _file_scale(path: str, mtime_ns: int, size: int):
    """:func:`rgb_scale` of a file, or its error message: a refused file is scanned once, not once
    per patch."""
    try:
        return rgb_scale(open_array(path), path)
    except DiffMixError as err:
        return str(err)


def array_rgb(path: str, index: int, where: str) -> np.ndarray:
    """Patch ``index`` of the RGB array file ``path`` as uint8 [H, W, 3].

    The value range is decided once for the whole file (:func:`~guided_diffusion.data.image_arrays.rgb_scale`:
    0..255, or floats in [0, 1] scaled; NaN / inf or other ranges refused naming ``path``), so
    every patch of one file is read the same way. ``where`` names the patch in other errors.
    """
    arr = open_array(path)  # raises naming the file when it is gone or unreadable
    st = os.stat(path)
    with _SCALE_LOCK:  # the readers' threads would otherwise each scan a large file at once
        scale = _file_scale(path, st.st_mtime_ns, st.st_size)
    if isinstance(scale, str):
        raise DiffMixError(scale)
    return rgb_uint8(arr[index], where, scale=scale)


# ----------------------------------------------------------------------------- reading


def read_image(files) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a sample of a format dataset."""
    return get_format(files.format).read_image(files)


def check_labels(files, table) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], List[str]]:
    """Read and validate a sample's label maps without raising: ``(inst int32, type int32 merged,
    problems)`` (maps None on a problem; each problem names the file)."""
    try:
        inst, raw = get_format(files.format).read_labels(files)
    except DiffMixError as err:
        return None, None, [str(err)]
    inst, types, problems = maps_from_arrays(inst, raw, table)
    return inst, types, [f"{files.label}: {p}" for p in problems]


@functools.lru_cache(maxsize=8)
def _decoded(files, table):
    """``(image, inst, type)`` of an already validated patch (see :class:`ArrayPatch`)."""
    inst, types, problems = check_labels(files, table)
    if problems:
        raise DiffMixError("; ".join(problems))
    return read_image(files), inst, types


class ArrayPatch:
    """A validated patch of an array dataset whose pixels are read (memory-mapped) when used.

    Same attributes as :class:`~guided_diffusion.data.readers.LabeledImage`: ``files``, ``image``
    (uint8 [H, W, 3]), ``inst_map`` (int32 [H, W]), ``type_map`` (int32 [H, W], merged classes),
    ``shape``. The last few decoded patches are cached per process, so reading the three maps of
    one patch decodes it once.
    """

    def __init__(self, files, table, shape: Tuple[int, int]):
        self.files = files
        self.table = table
        self._shape = tuple(shape)

    @property
    def shape(self) -> Tuple[int, int]:
        return self._shape

    @property
    def image(self) -> np.ndarray:
        return _decoded(self.files, self.table)[0]

    @property
    def inst_map(self) -> np.ndarray:
        return _decoded(self.files, self.table)[1]

    @property
    def type_map(self) -> np.ndarray:
        return _decoded(self.files, self.table)[2]


def csv_column(path: str, column: str) -> List[str]:
    """One column of a CSV file with a header row holding ``column`` (case-insensitive), or the
    first column of a CSV file without it."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    if column.lower() in header:
        i = header.index(column.lower())
        return [r[i].strip() if i < len(r) else "" for r in rows[1:]]
    return [r[0].strip() for r in rows]


def csv_text(column: str, values: Iterable[str]) -> bytes:
    """A one-column CSV file with a header, as bytes."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([column])
    writer.writerows([v] for v in values)
    return buf.getvalue().encode()
