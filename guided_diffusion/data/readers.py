"""Dataset readers: listing, pairing by stem, reading and validating labelled images.

Supported layouts (paths local or remote through :mod:`guided_diffusion.fileio`):

* CoNSeP / GLySAC / custom: ``<root>/{Train,Test}/Images/*.{png,tif,tiff,jpg,jpeg}`` and
  ``<root>/{Train,Test}/Labels/*.mat`` (keys ``inst_map``, ``type_map``; ``inst_type`` and
  ``inst_centroid`` may be present but are not needed: they are recomputed whenever a label map is
  written). ``data_dir`` may be the root (a split is then chosen) or the split folder itself. Other
  folder names (e.g. ``imgs``/``masks``) are given with ``image_folder``/``label_folder``.
* HoVer-Net patches: a folder of ``.npy`` arrays [H, W, 5] (RGB, instance id, raw type).
* PanNuke, CoNIC and Lizard as distributed (``dataset_mode`` pannuke, conic, lizard): listed and
  read by :mod:`guided_diffusion.data.formats`; their :class:`SampleFiles` carry ``format``.

Images and labels are paired by file stem, never by the sort order of two listings. Every problem
of a dataset (unpaired files, unreadable files, missing keys, size mismatches, type values outside
the class table, images smaller than the crop) is collected and reported in one
:class:`~guided_diffusion.errors.DiffMixError`, each line naming its file.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .. import fileio
from ..errors import DiffMixError
from .classes import ClassTable

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LABEL_EXT = ".mat"
NPY_EXT = ".npy"
SPLITS = ("Train", "Test")
MERGED_KEY = "classes_merged"
NUM_CLASSES_KEY = "num_classes"
REQUIRED_MAT_KEYS = ("inst_map", "type_map")


@dataclass(frozen=True)
class SampleFiles:
    """The files of one labelled image.

    Attributes:
        stem: file name without extension, the pairing key.
        image: path of the image (for HoVer-Net patches, the ``.npy`` path; for a patch of an
            array dataset, ``<array path>[<index>]``).
        label: path of the ``.mat`` label (for HoVer-Net patches, the same ``.npy`` path).
        format: the distributed-format dataset mode that reads this sample ('' = CoNSeP layout
            or HoVer-Net patch).
        member: where the format finds the sample inside its files (format-specific tuple).
    """

    stem: str
    image: str
    label: str
    format: str = ""
    member: tuple = ()

    @property
    def is_npy(self) -> bool:
        return self.image.endswith(NPY_EXT)


@dataclass
class LabeledImage:
    """One labelled image held in memory.

    Attributes:
        files: where it came from.
        image: uint8 [H, W, 3] RGB.
        inst_map: int32 [H, W] instance ids as stored (0 = background; not necessarily contiguous).
        type_map: int32 [H, W] merged classes in ``0..num_classes-1``.
    """

    files: SampleFiles
    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.image.shape[:2])


class Problems:
    """Collects per-file problems and raises them together."""

    def __init__(self, what: str):
        self.what = what
        self.items: List[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")

    def extend(self, lines: Iterable[str]) -> None:
        self.items.extend(lines)

    def raise_if_any(self) -> None:
        if self.items:
            n = len(self.items)
            lines = "\n".join(f"  - {line}" for line in self.items)
            raise DiffMixError(f"{n} problem{'s' if n != 1 else ''} in {self.what}:\n{lines}")


# ----------------------------------------------------------------------------- folders


def is_dir(path: str) -> bool:
    """Whether ``path`` is a folder (local or remote)."""
    if fileio.is_remote(path):
        import blobfile

        return blobfile.isdir(path)
    return os.path.isdir(path)


def _stem_ext(name: str) -> Tuple[str, str]:
    stem, ext = os.path.splitext(name)
    return stem, ext.lower()


def find_folder(folder: str, name: str) -> Optional[str]:
    """``folder/name`` if it is a folder, matching the name case-insensitively (train vs Train)."""
    exact = fileio.join(folder, name)
    if is_dir(exact):
        return exact
    try:
        for entry in fileio.listdir(folder):
            if entry.lower() == name.lower() and is_dir(fileio.join(folder, entry)):
                return fileio.join(folder, entry)
    except OSError:
        pass
    return None


def _has_npy(folder: str) -> bool:
    try:
        return any(_stem_ext(n)[1] == NPY_EXT for n in fileio.listdir(folder))
    except OSError:
        return False


def resolve_split_dir(
    data_dir: str,
    split: str = "Train",
    image_folder: str = "Images",
    label_folder: str = "Labels",
    need_labels: bool = True,
) -> Tuple[str, str]:
    """Find the folder that holds one split.

    ``data_dir`` may be a split folder (holding ``image_folder`` and ``label_folder``, or ``.npy``
    patches) or a dataset root holding ``split`` (matched case-insensitively). With
    ``need_labels=False`` an ``image_folder`` alone suffices.

    Returns:
        ``(folder, layout)`` with layout ``"pairs"`` (image + .mat folders) or ``"npy"``.
    """
    data_dir = str(data_dir)
    if not is_dir(data_dir):
        raise DiffMixError(f"{data_dir}: data_dir not found (expected a dataset root or a split folder)")
    candidates = [data_dir]
    split_dir = find_folder(data_dir, split) if split else None
    if split_dir is not None:
        candidates.append(split_dir)
    for folder in candidates:
        if find_folder(folder, image_folder) and (not need_labels or find_folder(folder, label_folder)):
            return folder, "pairs"
        if _has_npy(folder):
            return folder, "npy"
    raise DiffMixError(
        f"{data_dir}: not a dataset: expected {image_folder}/ and {label_folder}/ (or .npy patches) either "
        f"in this folder or in its {split}/ subfolder"
    )


def list_samples(
    data_dir: str,
    split: str = "Train",
    image_folder: str = "Images",
    label_folder: str = "Labels",
    stems: Optional[Sequence[str]] = None,
    dataset_mode: str = "",
) -> List[SampleFiles]:
    """List a split's labelled images, paired by stem, sorted by stem.

    Args:
        stems: if given, keep only these stems (a stem that does not exist is an error).
        dataset_mode: a distributed format (pannuke, conic, lizard) is listed by its reader (which
            interprets ``split`` as folds); other modes read the CoNSeP layout.

    Raises:
        DiffMixError listing every image without a label, label without an image, or stem present
        twice (e.g. ``a.png`` and ``a.tif``), each naming both folders and the stem.
    """
    from .formats import get_format, is_format

    folder, layout = (str(data_dir), "format") if is_format(dataset_mode) else resolve_split_dir(
        data_dir, split, image_folder, label_folder)
    problems = Problems(f"dataset {folder}")
    if layout == "format":
        samples = get_format(dataset_mode).list_samples(folder, split)
    elif layout == "npy":
        samples = [
            SampleFiles(stem, fileio.join(folder, n), fileio.join(folder, n))
            for n in fileio.listdir(folder)
            for stem, ext in [_stem_ext(n)]
            if ext == NPY_EXT
        ]
    else:
        img_dir = find_folder(folder, image_folder)
        lab_dir = find_folder(folder, label_folder)
        images, labels = {}, {}
        for name in fileio.listdir(img_dir):
            stem, ext = _stem_ext(name)
            if ext in IMAGE_EXTS:
                if stem in images:
                    problems.add(
                        fileio.join(img_dir, name),
                        f"stem {stem!r} has two images ({os.path.basename(images[stem])} and {name})",
                    )
                images[stem] = fileio.join(img_dir, name)
        for name in fileio.listdir(lab_dir):
            stem, ext = _stem_ext(name)
            if ext == LABEL_EXT:
                labels[stem] = fileio.join(lab_dir, name)
        for stem in sorted(set(images) - set(labels)):
            problems.add(images[stem], f"image without a label: stem {stem!r} is in {img_dir} but has no {stem}.mat in {lab_dir}")
        for stem in sorted(set(labels) - set(images)):
            problems.add(
                labels[stem],
                f"label without an image: stem {stem!r} is in {lab_dir} but has no image "
                f"({'/'.join(IMAGE_EXTS)}) in {img_dir}",
            )
        samples = [SampleFiles(s, images[s], labels[s]) for s in sorted(set(images) & set(labels))]
    problems.raise_if_any()
    if stems is not None:
        wanted = [str(s) for s in stems]
        have = {s.stem for s in samples}
        missing = [s for s in wanted if s not in have]
        if missing:
            raise DiffMixError(f"{folder}: stems not found: {missing}")
        keep = set(wanted)
        samples = [s for s in samples if s.stem in keep]
    if not samples:
        raise DiffMixError(f"{folder}: no labelled images found")
    return samples


def list_images(
    data_dir: str, split: str = "Train", image_folder: str = "Images"
) -> Tuple[str, dict]:
    """Images of a split by stem, labels not needed: ``(images folder, {stem: path})``.

    For a folder of HoVer-Net ``.npy`` patches the paths are the ``.npy`` files.
    """
    folder, layout = resolve_split_dir(data_dir, split, image_folder, need_labels=False)
    if layout == "npy":
        names = [n for n in fileio.listdir(folder) if _stem_ext(n)[1] == NPY_EXT]
        return folder, {_stem_ext(n)[0]: fileio.join(folder, n) for n in names}
    img_dir = find_folder(folder, image_folder)
    images, problems = {}, Problems(f"images folder {img_dir}")
    for name in fileio.listdir(img_dir):
        stem, ext = _stem_ext(name)
        if ext in IMAGE_EXTS:
            if stem in images:
                problems.add(fileio.join(img_dir, name), f"stem {stem!r} has two images")
            images[stem] = fileio.join(img_dir, name)
    problems.raise_if_any()
    return img_dir, images


def image_sources(
    data_dir: str, split: str = "Train", image_folder: str = "Images", dataset_mode: str = ""
) -> Tuple[str, dict]:
    """Images of a split by stem as :class:`SampleFiles` (labels not needed; read the pixels with
    :func:`sample_image`): ``(folder, {stem: SampleFiles})``."""
    from .formats import is_format

    if is_format(dataset_mode):
        return str(data_dir), {s.stem: s for s in list_samples(data_dir, split, dataset_mode=dataset_mode)}
    folder, images = list_images(data_dir, split, image_folder)
    return folder, {stem: SampleFiles(stem, path, path) for stem, path in images.items()}


# ----------------------------------------------------------------------------- label files


def _int_map(arr, key: str) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """Check a label array: 2-D, integral values, non-negative. Returns (int32 array, problem)."""
    a = np.asarray(arr)
    if a.ndim != 2:
        return None, f"{key} has shape {a.shape}, expected a 2-D array"
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            return None, f"{key} holds non-integer values"
    elif a.dtype.kind not in "iub":
        return None, f"{key} has dtype {a.dtype}, expected integers"
    if a.size and a.min() < 0:
        return None, f"{key} holds negative values (min {a.min()})"
    if a.size and a.max() > np.iinfo(np.int32).max:
        return None, f"{key} holds values beyond int32"
    return a.astype(np.int32), None


def _scalar(value) -> Optional[int]:
    try:
        return int(np.asarray(value).ravel()[0])
    except (IndexError, TypeError, ValueError):
        return None


def maps_from_arrays(
    inst, types, table: ClassTable, merged_num_classes: Optional[int] = None
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], List[str]]:
    """Validate raw label arrays and merge classes.

    Args:
        inst: instance ids [H, W] (0 = background).
        types: type ids [H, W]; raw ids unless ``merged_num_classes`` is given.
        merged_num_classes: the ``num_classes`` recorded with already-merged maps; then the table is
            not applied, values are checked against ``0..merged_num_classes-1`` instead.

    Returns:
        ``(inst int32 [H,W], type int32 [H,W] merged, problems)``; the maps are None on a problem.
    """
    problems = []
    inst_m, p1 = _int_map(inst, "inst_map")
    type_m, p2 = _int_map(types, "type_map")
    problems += [p for p in (p1, p2) if p]
    if problems:
        return None, None, problems
    if inst_m.shape != type_m.shape:
        return None, None, [f"inst_map {inst_m.shape} and type_map {type_m.shape} differ in size"]
    if merged_num_classes is not None:
        if merged_num_classes != table.num_classes:
            return None, None, [
                f"label map was written with num_classes={merged_num_classes}, but the class table "
                f"{table.name!r} has {table.num_classes}"
            ]
        if type_m.size and type_m.max() >= merged_num_classes:
            bad = sorted(int(v) for v in np.unique(type_m) if v >= merged_num_classes)
            return None, None, [
                f"type values {bad} outside 0..{merged_num_classes - 1} (classes already merged: "
                f"{MERGED_KEY}=1, {NUM_CLASSES_KEY}={merged_num_classes})"
            ]
        return inst_m, type_m, []
    unknown = table.unknown_raw_values(type_m)
    if unknown:
        return None, None, [table.describe_unknown(unknown)]
    return inst_m, table.merge(type_m), []


def check_label_file(path: str, table: ClassTable) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], List[str]]:
    """Read and validate a ``.mat`` label map without raising.

    Returns ``(inst int32 [H,W], type int32 [H,W] merged, problems)``; maps are None on a problem,
    each problem string names ``path``.
    """
    try:
        mat = fileio.read_mat(path)
    except DiffMixError as err:
        return None, None, [str(err)]
    except Exception as err:  # scipy raises assorted errors on corrupt files (IndexError, MatReadError)
        return None, None, [f"{path}: not a readable .mat file ({type(err).__name__}: {err})"]
    missing = [k for k in REQUIRED_MAT_KEYS if k not in mat]
    if missing:
        return None, None, [
            f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(a label .mat needs {', '.join(REQUIRED_MAT_KEYS)}; found {', '.join(sorted(mat)) or 'none'})"
        ]
    merged_n = None
    if MERGED_KEY in mat and _scalar(mat[MERGED_KEY]) == 1:
        merged_n = _scalar(mat.get(NUM_CLASSES_KEY))
        if merged_n is None:
            return None, None, [f"{path}: {MERGED_KEY}=1 but no readable {NUM_CLASSES_KEY}"]
    inst, types, problems = maps_from_arrays(mat["inst_map"], mat["type_map"], table, merged_n)
    return inst, types, [f"{path}: {p}" for p in problems]


def read_label_file(path: str, table: ClassTable) -> Tuple[np.ndarray, np.ndarray]:
    """Read a ``.mat`` label map: ``(inst_map int32 [H,W], type_map int32 [H,W] merged)``.

    Raw files are merged with ``table``; files marked ``classes_merged=1`` are only validated.
    """
    inst, types, problems = check_label_file(path, table)
    if problems:
        raise DiffMixError("; ".join(problems))
    return inst, types


def check_npy_sample(path: str, table: ClassTable):
    """Read and validate a HoVer-Net ``.npy`` patch [H, W, 5] without raising.

    Returns ``(image uint8 [H,W,3], inst int32, type int32 merged, problems)``.
    """
    try:
        arr = fileio.read_npy(path)
    except DiffMixError as err:
        return None, None, None, [str(err)]
    except Exception as err:  # numpy raises assorted errors on corrupt headers
        return None, None, None, [f"{path}: not a readable .npy array ({type(err).__name__}: {err})"]
    if arr.ndim != 3 or arr.shape[2] < 5:
        return None, None, None, [
            f"{path}: HoVer-Net patch has shape {arr.shape}, expected [H, W, 5] (RGB, instance, type)"
        ]
    rgb = arr[..., :3]
    if rgb.size and (rgb.min() < 0 or rgb.max() > 255):
        return None, None, None, [f"{path}: RGB channels outside 0..255"]
    image = np.ascontiguousarray(rgb.astype(np.uint8))
    inst, types, problems = maps_from_arrays(arr[..., 3], arr[..., 4], table)
    return image, inst, types, [f"{path}: {p}" for p in problems]


def _read_one(files: SampleFiles, table: ClassTable, min_size: Optional[int]):
    """Read and validate one sample. Returns (LabeledImage or None, problems).

    A patch of an array dataset (PanNuke, CoNIC) comes back as a
    :class:`~guided_diffusion.data.formats.ArrayPatch`, which reads its pixels again when used.
    """
    if files.is_npy and not files.format:
        image, inst, types, problems = check_npy_sample(files.image, table)
    else:
        problems = []
        image = None
        try:
            image = sample_image(files)
        except DiffMixError as err:
            problems.append(str(err))
        inst, types, label_problems = check_sample_labels(files, table)
        problems += label_problems
        if image is not None and inst is not None and image.shape[:2] != inst.shape:
            problems.append(
                f"{files.label}: label size {inst.shape[1]}x{inst.shape[0]} (WxH) differs from image "
                f"{files.image} size {image.shape[1]}x{image.shape[0]}"
            )
    if image is not None and min_size is not None:
        h, w = image.shape[:2]
        if h < min_size or w < min_size:
            problems.append(f"{files.image}: image {w}x{h} (WxH) is smaller than the crop size {min_size}")
    if problems:
        return None, problems
    if files.member:  # a patch of a memory-mapped array: hand out a view that reads it when used
        from .formats import ArrayPatch

        return ArrayPatch(files, table, image.shape[:2]), []
    return LabeledImage(files, image, inst, types), []


def read_rgb(path: str) -> np.ndarray:
    """The RGB image of a sample: an image file, or the first 3 channels of a ``.npy`` patch.

    Returns uint8 [H, W, 3]. Raises DiffMixError naming ``path`` if unreadable.
    """
    if path.endswith(NPY_EXT):
        arr = fileio.read_npy(path)
        if arr.ndim != 3 or arr.shape[2] < 3:
            raise DiffMixError(f"{path}: HoVer-Net patch has shape {arr.shape}, expected [H, W, 5]")
        return np.ascontiguousarray(np.clip(arr[..., :3], 0, 255).astype(np.uint8))
    try:
        return fileio.read_image(path)
    except DiffMixError:
        raise
    except Exception as err:  # PIL decoders raise assorted errors on corrupt files
        raise DiffMixError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def sample_image(files: SampleFiles) -> np.ndarray:
    """The RGB image of any sample (image file, HoVer-Net patch or distributed format): uint8 [H, W, 3]."""
    if files.format:
        from .formats import read_image

        return read_image(files)
    return read_rgb(files.image)


def check_sample_labels(files: SampleFiles, table: ClassTable):
    """A sample's label maps without raising: ``(inst int32 [H,W], type int32 [H,W] merged,
    problems)`` (maps None on a problem), whatever its layout."""
    if files.format:
        from .formats import check_labels

        return check_labels(files, table)
    if files.is_npy:
        _, inst, types, problems = check_npy_sample(files.label, table)
        return inst, types, problems
    return check_label_file(files.label, table)


def read_sample_labels(files: SampleFiles, table: ClassTable) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`check_sample_labels`, raising a DiffMixError naming the file on a problem."""
    inst, types, problems = check_sample_labels(files, table)
    if problems:
        raise DiffMixError("; ".join(problems))
    return inst, types


def read_samples(
    samples: Sequence[SampleFiles],
    table: ClassTable,
    min_size: Optional[int] = None,
    what: str = "dataset",
    progress: bool = True,
    max_threads: int = 4,
) -> List[LabeledImage]:
    """Read every file once (a few threads: decoding and remote reads overlap) and validate.

    Args:
        min_size: the crop size; an image with a side below it is an error (equal is fine).

    Raises:
        DiffMixError listing every problem of every file.
    """
    from tqdm.auto import tqdm

    problems = Problems(what)
    out: List[Optional[LabeledImage]] = [None] * len(samples)
    bar = tqdm(total=len(samples), desc=f"reading {what}", unit="file", disable=not progress or len(samples) < 8)
    with ThreadPoolExecutor(max_workers=max(1, min(max_threads, len(samples)))) as pool:
        for i, (item, errs) in enumerate(pool.map(lambda f: _read_one(f, table, min_size), samples)):
            out[i] = item
            problems.extend(errs)
            bar.update(1)
    bar.close()
    problems.raise_if_any()
    return out  # type: ignore[return-value]


def read_dataset(
    data_dir: str,
    table: ClassTable,
    split: str = "Train",
    image_folder: str = "Images",
    label_folder: str = "Labels",
    min_size: Optional[int] = None,
    stems: Optional[Sequence[str]] = None,
    progress: bool = True,
    dataset_mode: str = "",
) -> List[LabeledImage]:
    """List, pair, read and validate a whole split (see :func:`list_samples`, :func:`read_samples`)."""
    files = list_samples(data_dir, split, image_folder, label_folder, stems=stems, dataset_mode=dataset_mode)
    return read_samples(files, table, min_size=min_size, what=f"dataset {data_dir}", progress=progress)
