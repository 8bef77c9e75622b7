"""Dataset readers: listing, pairing by stem, reading and validating labelled images.

Supported layouts (paths local or remote through :mod:`guided_diffusion.infra.fileio`):

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
:class:`~guided_diffusion.infra.errors.DiffMixError`, each line naming its file.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..infra import fileio
from ..infra.errors import DiffMixError
from .classes import CONSEP, GLYSAC, LABELS_MERGED, ClassTable
from .formats import ArrayPatch, check_labels, get_format, is_format
from .formats import read_image as format_image
from .image_arrays import rgb_uint8
from .label_arrays import MERGED_KEY, NUM_CLASSES_KEY, maps_from_arrays, merge_types  # noqa: F401 (public here too)
from .label_arrays import int_map as _int_map

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LABEL_EXT = ".mat"
NPY_EXT = ".npy"
SPLITS = ("Train", "Test")
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
        self._seen: set = set()

    def add(self, path: str, message: str) -> None:
        self.extend([f"{path}: {message}"])

    def extend(self, lines: Iterable[str]) -> None:
        for line in lines:
            # a problem of a shared file (an array dataset's images.npy) comes back from every patch: once
            if line not in self._seen:
                self._seen.add(line)
                self.items.append(line)

    def raise_if_any(self) -> None:
        if len(self.items) == 1:  # one line, as every single error
            raise DiffMixError(f"{self.items[0]} (in {self.what})")
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
    if is_format(dataset_mode):
        return str(data_dir), {s.stem: s for s in list_samples(data_dir, split, dataset_mode=dataset_mode)}
    folder, images = list_images(data_dir, split, image_folder)
    return folder, {stem: SampleFiles(stem, path, path) for stem, path in images.items()}


# ----------------------------------------------------------------------------- label files
#
# The package's one label-file reader. read_label_arrays reads and validates a file as stored;
# merge_types is the one place where raw type ids become merged classes (or, for maps marked
# classes_merged=1 and for datasets read as already merged, are only checked). Training,
# synthesis, GradMix, statistics and evaluation all read labels through these two functions.


@dataclass
class LabelFile:
    """One label file, validated; types are merged classes once passed through :func:`merge_label_file`.

    Attributes:
        path: the file.
        inst_map: int32 [H, W] instance ids as stored (0 = background; not necessarily contiguous).
        type_map: int32 [H, W] per-pixel types, or None when the file has none (e.g. a HoVer-Net
            output ``.mat``, which holds only ``inst_type``).
        inst_type: int32 [N] stored per-instance types (``.mat`` key ``inst_type``), or None (only
            read with ``instance_keys=True``).
        inst_centroid: float64 [N, 2] stored (x, y) centroids, or None (as ``inst_type``).
        marked_merged: ``num_classes`` of a ``.mat`` marked ``classes_merged`` = 1, else None.
    """

    path: str
    inst_map: np.ndarray
    type_map: Optional[np.ndarray]
    inst_type: Optional[np.ndarray] = None
    inst_centroid: Optional[np.ndarray] = None
    marked_merged: Optional[int] = None


def _scalar(value) -> Optional[int]:
    try:
        return int(np.asarray(value).ravel()[0])
    except (IndexError, TypeError, ValueError):
        return None


# HoVer-Net .npy label layouts: channels -> (instance channel, type channel or None).
_NPY_CHANNELS = {1: (0, None), 2: (0, 1), 4: (3, None), 5: (3, 4)}


def _npy_maps(arr: np.ndarray):
    """``(inst, types or None, problem)`` of a HoVer-Net ``.npy`` label array."""
    if arr.ndim == 2:
        return arr, None, None
    if arr.ndim == 3 and (arr.shape[2] in _NPY_CHANNELS or arr.shape[2] > 5):
        inst_c, type_c = _NPY_CHANNELS[min(arr.shape[2], 5)]
        return arr[..., inst_c], None if type_c is None else arr[..., type_c], None
    return None, None, (
        f"expected a HoVer-Net array [H, W, 5] (RGB, instance, type), [H, W, 4] (RGB, instance), "
        f"[H, W, 2] (instance, type) or [H, W] (instance), got shape {arr.shape}"
    )


def read_label_arrays(
    path: str, require_types: bool = True, instance_keys: bool = False
) -> Tuple[Optional[LabelFile], List[str]]:
    """Read and validate a ``.mat`` (CoNSeP layout) or HoVer-Net ``.npy`` label file, types as stored.

    Args:
        require_types: a file without per-pixel types is a problem (training, GradMix, synthesis).
        instance_keys: also read a ``.mat``'s stored ``inst_type`` / ``inst_centroid`` (evaluation).

    Returns:
        ``(LabelFile or None, problems)``, each problem naming ``path``; never raises for bad files.
    """
    stored_types = stored_xy = marked = None
    try:
        if path.lower().endswith(NPY_EXT):
            inst, types, problem = _npy_maps(fileio.read_npy(path))
            if problem:
                return None, [f"{path}: {problem}"]
        else:
            mat = fileio.read_mat(path)
            need = REQUIRED_MAT_KEYS if require_types else REQUIRED_MAT_KEYS[:1]
            missing = [k for k in need if k not in mat]
            if missing:
                return None, [
                    f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                    f"(a label .mat needs {', '.join(need)}; found {', '.join(sorted(mat)) or 'none'})"
                ]
            inst, types = mat["inst_map"], mat.get("type_map")
            if MERGED_KEY in mat and _scalar(mat[MERGED_KEY]) == 1:
                marked = _scalar(mat.get(NUM_CLASSES_KEY))
                if marked is None:
                    return None, [f"{path}: {MERGED_KEY}=1 but no readable {NUM_CLASSES_KEY}"]
            if instance_keys:
                stored_types = mat.get("inst_type")
                stored_xy = mat.get("inst_centroid")
    except DiffMixError as err:
        return None, [str(err)]
    except Exception as err:  # scipy/numpy raise assorted errors on corrupt files
        return None, [f"{path}: not a readable label file ({type(err).__name__}: {err})"]
    if types is None and require_types:
        return None, [f"{path}: no per-pixel types (a HoVer-Net [H, W, 5] or [H, W, 2] array is needed)"]
    problems = []
    inst_m, p = _int_map(inst, "inst_map")
    problems += [p] if p else []
    type_m = None
    if types is not None:
        type_m, p = _int_map(types, "type_map")
        problems += [p] if p else []
    if stored_types is not None:
        stored_types, p = _int_map(stored_types, "inst_type", ndim=1)
        problems += [p] if p else []
    if stored_xy is not None:
        stored_xy = np.asarray(stored_xy, np.float64)
        if stored_xy.size and stored_xy.shape[-1] != 2:
            problems.append(f"inst_centroid must be [N, 2], got {stored_xy.shape}")
        else:
            stored_xy = stored_xy.reshape(-1, 2)
    if not problems and type_m is not None and inst_m.shape != type_m.shape:
        problems.append(f"inst_map {inst_m.shape} and type_map {type_m.shape} differ in size")
    if problems:
        return None, [f"{path}: {p}" for p in problems]
    return LabelFile(path, inst_m, type_m, stored_types, stored_xy, marked), []


def merge_label_file(label: LabelFile, table: ClassTable) -> Tuple[Optional[LabelFile], List[str]]:
    """The label file with its ``type_map`` and stored ``inst_type`` merged (see :func:`merge_types`)."""
    out = dataclasses.replace(label)
    problems = []
    for key in ("type_map", "inst_type"):
        values = getattr(label, key)
        if values is not None:
            merged, problem = merge_types(values, table, label.marked_merged)
            if problem:
                problems.append(f"{label.path}: {problem}" if key == "type_map" else f"{label.path}: {key} {problem}")
            setattr(out, key, merged)
    return (None, problems) if problems else (out, [])


def load_label_file(
    path: str, table: Optional[ClassTable] = None, require_types: bool = True, instance_keys: bool = False
) -> LabelFile:
    """Read, validate and (with ``table``) merge a label file; raises DiffMixError naming ``path``.

    Without ``table`` the types stay as stored. See :func:`read_label_arrays` for the flags.
    """
    label, problems = read_label_arrays(path, require_types, instance_keys)
    if label is not None and table is not None:
        label, problems = merge_label_file(label, table)
    if problems:
        raise DiffMixError("; ".join(problems))
    return label


def check_label_file(path: str, table: ClassTable) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], List[str]]:
    """Read, validate and merge a label file without raising.

    Returns ``(inst int32 [H,W], type int32 [H,W] merged, problems)``; maps are None on a problem,
    each problem string names ``path``.
    """
    label, problems = read_label_arrays(path)
    if label is not None:
        label, problems = merge_label_file(label, table)
    if problems:
        return None, None, problems
    return label.inst_map, label.type_map, []


def read_label_file(path: str, table: ClassTable) -> Tuple[np.ndarray, np.ndarray]:
    """Read a label file: ``(inst_map int32 [H,W], type_map int32 [H,W] merged)``.

    Raw files are merged with ``table``; files marked ``classes_merged=1`` are only validated.
    """
    label = load_label_file(path, table)
    return label.inst_map, label.type_map


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
    try:
        image = rgb_uint8(arr[..., :3], path)
    except DiffMixError as err:
        return None, None, None, [str(err)]
    inst, types, problems = maps_from_arrays(arr[..., 3], arr[..., 4], table)
    return image, inst, types, [f"{path}: {p}" for p in problems]


def dataset_type_counts(label_paths: Sequence[str], stop_at: Optional[int] = None) -> dict:
    """Nuclei per type id in the unmarked label files of a dataset: ``{id: count}`` (a nucleus
    counts once per id among its pixels). Marked GradMix maps and unreadable files are skipped
    (the real read reports those). Stops early once an id >= ``stop_at`` is seen (that alone
    decides the form)."""
    def one(path):
        label, _ = read_label_arrays(path, require_types=False, instance_keys=True)
        if label is None or label.marked_merged is not None:
            return {}
        if label.type_map is not None:
            fg = label.inst_map > 0
            width = int(label.type_map.max()) + 1 if label.type_map.size else 1
            pairs = np.unique(label.inst_map[fg].astype(np.int64) * width + label.type_map[fg])
            ids, n = np.unique(pairs % width, return_counts=True)
        elif label.inst_type is not None:
            ids, n = np.unique(label.inst_type, return_counts=True)
        else:
            return {}
        return dict(zip(ids.tolist(), n.tolist()))

    counts: dict = {}
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, len(label_paths))))
    try:
        for found in pool.map(one, label_paths):
            for v, k in found.items():
                counts[v] = counts.get(v, 0) + k
            if stop_at is not None and counts and max(counts) >= stop_at:
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a raw dataset is decided by its first files
    return counts


def resolve_labels_form(
    table: ClassTable, label_paths: Sequence[str], labels_merged: str = "auto", what: str = "dataset",
    notice: bool = True,
) -> ClassTable:
    """The table to read a dataset's label files with: ``table`` for raw ids, ``table.as_merged()``
    when they already hold the merged classes.

    Args:
        label_paths: the dataset's label files (``.mat`` / ``.npy``).
        labels_merged: ``"no"`` (merge with ``table``), ``"yes"`` (already merged) or ``"auto"``:
            for the CoNSeP and GLySAC tables, decided from the nuclei per id
            (:meth:`ClassTable.label_form`), with a one-line notice on stderr when it decides
            "merged" or cannot tell (too few nuclei; then read as raw); other tables (custom
            mappings) are taken as raw.
        what: names the dataset in the notice.
    """
    option = str(labels_merged).lower()
    if option not in LABELS_MERGED:
        raise DiffMixError(f"--labels_merged {labels_merged!r}: expected one of {', '.join(LABELS_MERGED)}")
    if option == "no":
        return table
    if option == "yes":
        return table.as_merged()
    if table not in (CONSEP, GLYSAC):
        return table
    counts = dataset_type_counts(label_paths, stop_at=table.num_classes)
    form = table.label_form(counts)
    if form in ("raw", "same"):
        return table
    raw_only = [r for r in table.raw_ids if r >= table.num_classes]
    found = f"type ids {sorted(v for v in counts if v)} and none of the raw {table.name} ids {raw_only[0]}..{raw_only[-1]}"
    if notice:
        import sys

        if form == "merged":
            line = (f"reading the labels as already-merged {table.name} classes (--labels_merged auto; "
                    "pass --labels_merged no to merge them)")
        else:
            line = ("too few nuclei to tell whether they are already merged: reading them as raw ids "
                    "(pass --labels_merged yes if they are merged)")
        print(f"note: {what}: {found}: {line}", file=sys.stderr)
    return table.as_merged() if form == "merged" else table


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
        return rgb_uint8(arr[..., :3], path)
    try:
        return fileio.read_image(path)
    except DiffMixError:
        raise
    except Exception as err:  # PIL decoders raise assorted errors on corrupt files
        raise DiffMixError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def sample_image(files: SampleFiles) -> np.ndarray:
    """The RGB image of any sample (image file, HoVer-Net patch or distributed format): uint8 [H, W, 3]."""
    if files.format:
        return format_image(files)
    return read_rgb(files.image)


def check_sample_labels(files: SampleFiles, table: ClassTable):
    """A sample's label maps without raising: ``(inst int32 [H,W], type int32 [H,W] merged,
    problems)`` (maps None on a problem), whatever its layout."""
    if files.format:
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
    labels_merged: str = "auto",
) -> List[LabeledImage]:
    """List, pair, read and validate a whole split (see :func:`list_samples`, :func:`read_samples`);
    ``labels_merged`` as in :func:`resolve_labels_form`."""
    files = list_samples(data_dir, split, image_folder, label_folder, stems=stems, dataset_mode=dataset_mode)
    table = resolve_labels_form(table, [f.label for f in files], labels_merged, f"dataset {data_dir}")
    return read_samples(files, table, min_size=min_size, what=f"dataset {data_dir}", progress=progress)
