"""Nucleus crops: one small RGB window centred on each nucleus, with its class and provenance.

A crop of ``size`` px is centred on the nucleus' centroid (mean pixel position from the instance
map), rounded to the pixel grid; pixels outside the image are zero (black), so every nucleus gives a
crop, border nuclei included. The nucleus' class is its majority type (``instance_table``); nuclei
of class 0 (no typed pixel) are left out.

Sources (:func:`read_source`):

* a dataset root or split folder in any supported mode (``dataset:<path>`` or a plain path holding
  the split), read with the dataset's class table;
* a synthesis run folder (``image_sample.py`` output: ``npy_patch/`` + ``records/``): the class is
  the label map's, and every nucleus GradMix placed or moved is flagged ``changed``;
* a GradMix output folder written with ``--write_images true`` (``Images/`` + ``Labels/`` +
  ``Records/``): GradMix's composed images under their maps, changed nuclei flagged as above.

For a synthesis run, :func:`control_nuclei` gives the *control*: the same crops of the real source
image under the same (virtual) map, i.e. what a classifier says when only the label's position, not
the pixels, carries the class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from ...data.classes import ClassTable, identity_table
from ...data.labels import instance_table
from ...data.layouts import GradMixLayout, SynthesisLayout
from ...data.readers import LabeledImage, find_folder, read_dataset, read_samples
from ...infra import fileio
from ...infra.errors import DiffMixError


@dataclass
class NucleusSet:
    """Nuclei of one source as arrays (N nuclei, crops of S px).

    Attributes:
        crops: uint8 [N, S, S, 3] RGB, zero outside the source image.
        masks: bool [N, S, S] the nucleus' own pixels in its crop (the optional mask channel).
        labels: int64 [N] merged class (1..C-1) of each nucleus.
        changed: bool [N] the nucleus was placed (balancing) or moved (enlarging) by GradMix.
        image: int64 [N] index into ``names`` of the image each nucleus comes from.
        names: the images' names (file stems).
        source: what was read (a path, or a description).
    """

    crops: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    changed: np.ndarray
    image: np.ndarray
    names: List[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.size)

    def subset(self, keep: np.ndarray) -> "NucleusSet":
        """The nuclei where ``keep`` (bool [N] or int indices) holds, same names."""
        return NucleusSet(self.crops[keep], self.masks[keep], self.labels[keep], self.changed[keep],
                          self.image[keep], self.names, self.source)

    def counts(self, num_classes: int) -> List[int]:
        """Nuclei per class 0..num_classes-1 (index 0 is always 0)."""
        return np.bincount(self.labels, minlength=num_classes)[:num_classes].tolist()


def rarest(counts: Sequence[int], classes: Sequence[int]) -> int:
    """The rare class of a study: the one of ``classes`` with the fewest nuclei (``counts`` indexed by
    class id)."""
    return min(classes, key=lambda c: counts[c])


def empty_set(size: int, source: str = "") -> NucleusSet:
    return NucleusSet(np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), bool), np.zeros(0, np.int64),
                      np.zeros(0, bool), np.zeros(0, np.int64), [], source)


def concat(sets: Sequence[NucleusSet], source: str = "") -> NucleusSet:
    """One set holding every nucleus of ``sets`` (image indices renumbered)."""
    sets = [s for s in sets if s is not None]
    if not sets:
        raise DiffMixError("no nucleus source given")
    offsets = np.cumsum([0] + [len(s.names) for s in sets[:-1]])
    return NucleusSet(
        np.concatenate([s.crops for s in sets]), np.concatenate([s.masks for s in sets]),
        np.concatenate([s.labels for s in sets]), np.concatenate([s.changed for s in sets]),
        np.concatenate([s.image + o for s, o in zip(sets, offsets)]), [n for s in sets for n in s.names],
        source or ",".join(s.source for s in sets),
    )


def _window(array: np.ndarray, cy: int, cx: int, size: int) -> np.ndarray:
    """``array[cy - size//2 : ..., cx - size//2 : ...]`` of ``size`` x ``size``, zero outside."""
    h, w = array.shape[:2]
    y0, x0 = cy - size // 2, cx - size // 2
    out = np.zeros((size, size) + array.shape[2:], array.dtype)
    ys, xs = slice(max(0, y0), min(h, y0 + size)), slice(max(0, x0), min(w, x0 + size))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = array[ys, xs]
    return out


def nucleus_crops(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray, size: int,
                  changed: Optional[np.ndarray] = None):
    """Every typed nucleus of one image as a centred crop.

    Args:
        image: uint8 [H, W, 3].
        inst_map, type_map: int [H, W] instance ids (0 = background) and merged classes.
        size: crop side in px (>= 4).
        changed: optional bool [H, W]; a nucleus counts as changed when most of its pixels are in it.

    Returns:
        ``(crops uint8 [N, size, size, 3], masks bool [N, size, size], labels int64 [N], changed bool [N])``.
    """
    if image.shape[:2] != inst_map.shape or inst_map.shape != type_map.shape:
        raise DiffMixError(f"image {image.shape[:2]} and label maps {inst_map.shape}/{type_map.shape} differ in size")
    ids, types, centroids = instance_table(inst_map, type_map)
    keep = types > 0
    ids, types, centroids = ids[keep], types[keep], centroids[keep]
    n = ids.size
    crops = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), bool)
    flags = np.zeros(n, bool)
    for i, (nid, (cx, cy)) in enumerate(zip(ids, centroids)):
        y, x = int(np.floor(cy + 0.5)), int(np.floor(cx + 0.5))
        crops[i] = _window(image, y, x, size)
        masks[i] = _window(inst_map == nid, y, x, size)
        if changed is not None:
            own = inst_map == nid
            flags[i] = 2 * int(np.count_nonzero(changed & own)) > int(np.count_nonzero(own))
    return crops, masks, types.astype(np.int64), flags


def from_images(images: Sequence[np.ndarray], inst_maps: Sequence[np.ndarray], type_maps: Sequence[np.ndarray],
                names: Sequence[str], size: int, changed: Optional[Sequence[Optional[np.ndarray]]] = None,
                source: str = "") -> NucleusSet:
    """A :class:`NucleusSet` of every typed nucleus of the given images (arrays as in :func:`nucleus_crops`)."""
    parts = []
    for k, (img, inst, types) in enumerate(zip(images, inst_maps, type_maps)):
        c = nucleus_crops(img, inst, types, size, None if changed is None else changed[k])
        parts.append(c + (np.full(c[2].size, k, np.int64),))
    if not parts:
        return empty_set(size, source)
    return NucleusSet(*(np.concatenate([p[j] for p in parts]) for j in range(5)), names=list(names), source=source)


def from_samples(samples: Sequence[LabeledImage], size: int, changed=None, source: str = "") -> NucleusSet:
    return from_images([s.image for s in samples], [s.inst_map for s in samples], [s.type_map for s in samples],
                       [s.files.stem for s in samples], size, changed, source)


def _run_records(path: str) -> Optional[str]:
    """The ``records/`` folder of a synthesis run folder, or None."""
    folder = find_folder(path, SynthesisLayout.RECORDS)
    return folder if folder and find_folder(path, SynthesisLayout.PATCHES) else None


@dataclass
class SynthesisRun:
    """A synthesis run folder in memory (P patches of S px).

    Attributes:
        samples: the synthetic patches with the label maps they were made from (merged classes).
        real: uint8 [S, S, 3] per patch: the same crop of the real source image (the SDEdit start).
        changed: bool [S, S] per patch: nuclei GradMix placed or moved (all False for dataset labels).
        sources: the real source image of each patch.
    """

    path: str
    samples: List[LabeledImage]
    real: List[np.ndarray]
    changed: List[np.ndarray]
    sources: List[str]


def read_run(run_dir: str, table: ClassTable, progress: bool = True) -> SynthesisRun:
    """Read a synthesis run folder (``npy_patch/`` + ``records/``) and the real crops it started from."""
    # gradmix (scipy) and downstream.data (torch, MONAI) load on first use: crops imports neither
    from ...gradmix import changed_mask
    from ..data import synthetic_files

    records = _run_records(run_dir)
    if records is None:
        raise DiffMixError(f"{run_dir}: not a synthesis run folder (image_sample.py output with npy_patch/ and records/)")
    merged = identity_table(table.num_classes, table.names, name=f"{table.name} (merged)")
    samples = read_samples(synthetic_files(run_dir, table.num_classes), merged, what=f"synthesis run {run_dir}",
                           progress=progress)
    real, changed, sources = [], [], []
    for s in samples:
        rec_path = fileio.join(records, s.files.stem + ".json")
        if not fileio.exists(rec_path):
            raise DiffMixError(f"{s.files.image}: no record {rec_path} (an unfinished output?)")
        rec = fileio.read_json(rec_path)
        c = rec["crop"]
        window = (c["y0"], c["x0"], c["height"], c["width"])
        crop = fileio.read_image(rec["source_image"])[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]
        if crop.shape[:2] != s.inst_map.shape:
            raise DiffMixError(f"{rec['source_image']}: crop {c} does not match the patch {s.files.image}")
        mask = changed_mask(rec.get("label_source", ""), window)[1]
        real.append(crop)
        changed.append(np.zeros(s.inst_map.shape, bool) if mask is None else mask)
        sources.append(rec["source_image"])
    return SynthesisRun(run_dir, samples, real, changed, sources)


def run_nuclei(run: SynthesisRun, size: int) -> NucleusSet:
    """The nuclei of a synthesis run's patches, classes from their maps."""
    return from_samples(run.samples, size, run.changed, source=run.path)


def control_nuclei(run: SynthesisRun, size: int) -> NucleusSet:
    """The control of a synthesis run: each output's crop of the *real* source image under the
    output's own label map (same nuclei, same classes, no diffusion)."""
    s = run.samples
    return from_images(run.real, [x.inst_map for x in s], [x.type_map for x in s], [x.files.stem for x in s], size,
                       run.changed, source=f"{run.path} (control: real image)")


def is_synthesis_run(path: str) -> bool:
    return _run_records(path) is not None


def read_source(path: str, table: ClassTable, size: int, *, split: str = "Test", dataset_mode: str = "",
                progress: bool = True) -> NucleusSet:
    """The nuclei of one source (see the module docstring for the kinds; a synthesis run or GradMix
    folder is recognised by its layout, anything else is read as a dataset with ``split``).

    Synthetic sources hold merged classes already and are checked against ``table.num_classes``.
    """
    # gradmix (scipy) and downstream.data (torch, MONAI) load on first use: crops imports neither
    from ...gradmix import changed_mask
    from ..data import synthetic_files

    if is_synthesis_run(path):
        return run_nuclei(read_run(path, table, progress), size)
    if find_folder(path, GradMixLayout.RECORDS) and find_folder(path, GradMixLayout.IMAGES):
        merged = identity_table(table.num_classes, table.names, name=f"{table.name} (merged)")
        samples = read_samples(synthetic_files(path, table.num_classes), merged, what=f"GradMix images {path}",
                               progress=progress)
        return from_samples(samples, size, [changed_mask(s.files.label)[1] for s in samples], source=path)
    samples = read_dataset(path, table, split, progress=progress, dataset_mode=dataset_mode)
    return from_samples(samples, size, source=f"{path} ({split})")


@dataclass
class RealNuclei:
    """The real data of a nucleus command: class table, classes ``1..C-1`` with their names, and the
    nuclei of the train and held-out splits."""

    table: ClassTable
    classes: List[int]
    names: dict
    train: NucleusSet
    test: NucleusSet


def read_real_nuclei(cfg, size: int, progress: bool = True) -> RealNuclei:
    """The train and held-out nuclei of ``cfg`` (a :class:`~guided_diffusion.downstream.data.RealSplits`)."""
    # downstream.data and .train import torch and MONAI: they load on first use
    from ..data import split_overlap
    from ..train import resolve_table

    overlap = split_overlap(cfg, {})
    if overlap:
        raise DiffMixError(f"{overlap}; its nucleus scores would not be held out: choose another --test_split")
    table = resolve_table(cfg)
    classes = list(range(1, table.num_classes))

    def read(split):
        return read_source(cfg.data_dir, table, size, split=split, dataset_mode=cfg.dataset_mode, progress=progress)

    return RealNuclei(table, classes, {c: str(table.names[c]) for c in classes}, read(cfg.train_split),
                      read(cfg.test_split))
