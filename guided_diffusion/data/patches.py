"""Synthesis patches: deterministic windows of image_size on a grid over each image.

Each :class:`Patch` carries the real image window (the reference the sampler noises), the label
maps it is synthesised from (the dataset's own labels, or GradMix's virtual maps named
``<stem>__<kind><k:03d>.mat``), and where it came from.

The default split is ``"Train"``: DiffMix synthesises extra *training* data from label maps derived
from the training labels, with the training images as references; drawing references from the test
split would leak test images into the augmented training set.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..infra import fileio
from ..infra.errors import DiffMixError
from .classes import ClassTable, resolve_class_table
from .labels import relabel_contiguous
from .readers import (
    LABEL_EXT,
    Problems,
    SampleFiles,
    check_label_file,
    check_sample_labels,
    find_folder,
    image_sources,
    is_dir,
    list_samples,
    sample_image,
    resolve_labels_form,
)

VIRTUAL_MAP_RE = re.compile(r"^(?P<stem>.+)__(?P<kind>balance|enlarge)(?P<k>\d{3,})$")


@dataclass
class Patch:
    """One sampling patch.

    Attributes:
        image: uint8 [S, S, 3] real image window.
        inst_map: int32 [S, S] instance ids renumbered 1..N (0 = background).
        type_map: int32 [S, S] merged classes.
        source_image: path of the real image.
        label_source: path of the label map (the dataset's .mat, a GradMix map, or the .npy patch).
        x0, y0: top-left corner of the window in the source image (pixels).
        map_name: the label map's stem (``img_1`` or ``img_1__balance000``).
        index: the patch's index on its map's grid (row-major).
        known: optional ``(image uint8 [S, S, 3], mask bool [S, S])`` kept during sampling
            (the placed GradMix donors; see ``image_sample.py --keep_donors``).
    """

    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray
    source_image: str
    label_source: str
    x0: int
    y0: int
    map_name: str
    index: int = 0
    known: Optional[Tuple[np.ndarray, np.ndarray]] = None

    @property
    def name(self) -> str:
        """A file-name-safe unique name: ``<map_name>_y<y0>_x<x0>``."""
        return f"{self.map_name}_y{self.y0:05d}_x{self.x0:05d}"


def grid_starts(length: int, size: int, stride: Optional[int] = None) -> List[int]:
    """Window starts along one axis covering ``0..length-1``: 0, stride, 2*stride, ..., with the
    last window snapped to ``length - size`` so the far edge is covered. ``stride`` defaults to
    ``size`` (no overlap except at the snapped edge)."""
    stride = int(stride or size)
    if not 1 <= stride <= size:
        raise DiffMixError(f"stride {stride} must be in 1..{size} (the patch size) so the grid leaves no gaps")
    if length < size:
        raise DiffMixError(f"length {length} is smaller than the patch size {size}")
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def patch_grid(height: int, width: int, size: int, stride: Optional[int] = None) -> List[Tuple[int, int]]:
    """Row-major ``(y0, x0)`` of every window of the grid over a ``height x width`` image."""
    return [(y, x) for y in grid_starts(height, size, stride) for x in grid_starts(width, size, stride)]


def list_virtual_maps(label_dir: str) -> List[Tuple[str, str, str]]:
    """GradMix label maps in ``label_dir`` (or its ``Labels/`` subfolder).

    Returns:
        sorted ``(map_name, source stem, path)``; a ``.mat`` whose name does not follow
        ``<stem>__<balance|enlarge><k:03d>.mat`` is an error.
    """
    if not is_dir(label_dir):
        raise DiffMixError(f"{label_dir}: label_dir not found")
    folder = find_folder(label_dir, "Labels") or label_dir
    problems = Problems(f"label maps {folder}")
    maps = []
    for name in fileio.listdir(folder):
        if not name.lower().endswith(LABEL_EXT):
            continue
        map_name = name[: -len(LABEL_EXT)]
        m = VIRTUAL_MAP_RE.match(map_name)
        if not m:
            problems.add(
                fileio.join(folder, name),
                "not a GradMix label map name (expected <stem>__balance000.mat or <stem>__enlarge000.mat)",
            )
            continue
        maps.append((map_name, m.group("stem"), fileio.join(folder, name)))
    problems.raise_if_any()
    if not maps:
        raise DiffMixError(f"{folder}: no GradMix label maps (<stem>__<kind><k>.mat) found")
    return sorted(maps, key=lambda t: (t[1], t[0]))


def _jobs(data_dir, split, image_folder, label_folder, label_dir, stems, dataset_mode) -> List[Tuple]:
    """(map_name, stem, image SampleFiles, label: SampleFiles or GradMix map path) per label map."""
    if label_dir is None:
        files = list_samples(data_dir, split, image_folder, label_folder, stems=stems, dataset_mode=dataset_mode)
        return [(f.stem, f.stem, f, f) for f in files]
    img_dir, images = image_sources(data_dir, split, image_folder, dataset_mode)
    keep = None if stems is None else {str(s) for s in stems}
    problems = Problems(f"label maps {label_dir}")
    jobs = []
    for map_name, stem, path in list_virtual_maps(label_dir):
        if keep is not None and stem not in keep:
            continue
        if stem not in images:
            problems.add(path, f"no real image with stem {stem!r} in {img_dir}")
            continue
        jobs.append((map_name, stem, images[stem], path))
    problems.raise_if_any()
    if not jobs:
        raise DiffMixError(f"{label_dir}: no label maps left for stems {sorted(keep or [])}")
    return jobs


def _read_label(label, table: ClassTable):
    """A job's label maps without raising: the dataset's own (SampleFiles) or a GradMix map (path)."""
    if isinstance(label, SampleFiles):
        return check_sample_labels(label, table)
    return check_label_file(label, table)


def sampling_patches(
    *,
    data_dir: str,
    dataset_mode: str,
    image_size: int,
    label_dir: Optional[str] = None,
    stride: Optional[int] = None,
    split: str = "Train",
    class_table=None,
    num_classes: Optional[int] = None,
    stems: Optional[Sequence[str]] = None,
    image_folder: str = "Images",
    label_folder: str = "Labels",
    progress: bool = True,
    labels_merged: str = "auto",
) -> List[Patch]:
    """Every grid patch of every label map, in (source stem, map name, row-major grid) order.

    Args:
        data_dir: dataset root or split folder (the real reference images).
        label_dir: folder of GradMix maps (``<stem>__<kind><k:03d>.mat``, optionally in ``Labels/``);
            None uses the dataset's own labels (map_name = stem).
        stride: grid stride (default ``image_size``); the last row/column is snapped to the edge.
        split: "Train" by default (see module docstring).
        stems: keep only maps whose source image has one of these stems.
        labels_merged: "auto", "yes" or "no" for label maps without a ``classes_merged`` mark
            (see :func:`guided_diffusion.data.readers.resolve_labels_form`).

    Every image and label file is read once; all problems (unreadable files, bad label maps, size
    mismatches, images smaller than ``image_size``) are reported together.
    """
    from tqdm.auto import tqdm  # lazy: label-only commands import this module

    table = resolve_class_table(dataset_mode, class_table, num_classes)
    jobs = _jobs(data_dir, split, image_folder, label_folder, label_dir, stems, dataset_mode)
    label_paths = [j[3].label if isinstance(j[3], SampleFiles) else j[3] for j in jobs]
    table = resolve_labels_form(table, label_paths, labels_merged, f"label maps of {label_dir or data_dir}")
    sources = {j[2].image: j[2] for j in jobs}
    image_paths = sorted(sources)

    def read_image(path):
        try:
            return sample_image(sources[path]), None
        except DiffMixError as err:
            return None, str(err)

    problems = Problems(f"sampling inputs ({data_dir}{', ' + label_dir if label_dir else ''})")
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(jobs)))) as pool:
        images: Dict[str, np.ndarray] = {}
        for path, (img, err) in zip(image_paths, pool.map(read_image, image_paths)):
            if err:
                problems.items.append(err)
            else:
                images[path] = img
        labels = list(
            tqdm(
                pool.map(lambda j: _read_label(j[3], table), jobs),
                total=len(jobs),
                desc="reading label maps",
                disable=not progress or len(jobs) < 8,
            )
        )
    # From here on a job names its image and label by path (``<array>[<index>]`` for array datasets).
    jobs = [(m, s, img.image, lab.label if isinstance(lab, SampleFiles) else lab) for m, s, img, lab in jobs]
    for path, img in images.items():
        h, w = img.shape[:2]
        if h < image_size or w < image_size:
            problems.add(path, f"image {w}x{h} (WxH) is smaller than the patch size {image_size}")
    for (map_name, stem, img_path, lab_path), (inst, types, errs) in zip(jobs, labels):
        problems.extend(errs)
        img = images.get(img_path)
        if inst is not None and img is not None and inst.shape != img.shape[:2]:
            problems.add(
                lab_path,
                f"label map size {inst.shape[1]}x{inst.shape[0]} (WxH) differs from image {img_path} "
                f"size {img.shape[1]}x{img.shape[0]}",
            )
    problems.raise_if_any()

    patches = []
    for (map_name, stem, img_path, lab_path), (inst, types, _) in zip(jobs, labels):
        img = images[img_path]
        s = image_size
        for index, (y0, x0) in enumerate(patch_grid(img.shape[0], img.shape[1], s, stride)):
            window = (slice(y0, y0 + s), slice(x0, x0 + s))
            patches.append(
                Patch(
                    image=np.ascontiguousarray(img[window]),
                    inst_map=relabel_contiguous(inst[window]),
                    type_map=np.ascontiguousarray(types[window]),
                    source_image=img_path,
                    label_source=lab_path,
                    x0=x0,
                    y0=y0,
                    map_name=map_name,
                    index=index,
                )
            )
    return patches
