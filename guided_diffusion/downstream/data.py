"""Training sources for the downstream network and the seeded real/synthetic batch mix.

Real sources are dataset roots (or split folders) in the CoNSeP layout, read with the dataset's
class table (raw ids merged). Synthetic sources hold labels in *merged* classes already and are
read with the identity table over the same classes; a source may be

* an ``image_sample.py`` run folder (``npy_patch/*.npy``; its ``run.json`` must agree on
  ``num_classes``),
* a folder of HoVer-Net ``.npy`` patches (int [H, W, 5]: RGB, instance id, type), or
* a folder with ``Images/`` and ``Labels/`` such as ``gradmix.py --write_images true`` output
  (labels without an image -- enlarging maps -- are not used).

Batches: every step draws ``batch_size`` random crops (with rot90/flips); the number taken from the
synthetic pool at step k is ``floor((k+1) f B) - floor(k f B)`` for synthetic fraction f, so the
share is exact over any window of steps and no step depends on another. Each pool is visited in
seeded epochs. A batch is a pure function of (seed, step): resuming needs only the step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.classes import ClassTable, dataset_mode_flag, identity_table
from ..data.formats import get_format, is_format, parse_split
from ..data.labels import instance_table
from ..data.layouts import SynthesisLayout
from ..data.readers import (
    LABEL_EXT, NPY_EXT, LabeledImage, SampleFiles, find_folder, is_dir, list_images, read_dataset, read_samples,
    resolve_split_dir,
)
from ..data.training import CropPlan, TrainCropDataset
from ..infra import fileio
from ..infra.config import flag
from ..infra.errors import DiffMixError
from ..infra.train_state import derive_seed
from .targets import hovernet_targets

_TAG_REAL, _TAG_SYNTH = 11, 12


@dataclass
class RealSplits:
    """The real data of a study: dataset root, its class table, the train and held-out splits
    (the first flags of the studies and evidence commands)."""

    data_dir: str = flag("", "real dataset root holding the train and held-out splits")
    dataset_mode: str = dataset_mode_flag()
    num_classes: Optional[int] = flag(None, "classes incl. background (custom mode)")
    class_table: str = flag("", "custom mode: class table JSON")
    train_split: str = flag("Train", "split to train on")
    test_split: str = flag("Test", "held-out split to evaluate on")


def split_list(value: str) -> List[str]:
    """``"a,b"`` -> ``["a", "b"]`` (blanks dropped)."""
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


def synthetic_files(path: str, num_classes: int) -> List[SampleFiles]:
    """The labelled files of one synthetic source (layouts in the module docstring), by stem.

    Raises:
        DiffMixError: the folder is missing, holds no patches, or its run record disagrees with
        ``num_classes``.
    """
    if not is_dir(path):
        raise DiffMixError(f"{path}: synthetic source not found")
    run_json = SynthesisLayout(path).run_record()
    if fileio.exists(run_json):
        recorded = (fileio.read_json(run_json).get("model_config") or {}).get("num_classes")
        if recorded is not None and int(recorded) != int(num_classes):
            raise DiffMixError(
                f"{run_json}: synthesised with num_classes={recorded}, but this run uses num_classes={num_classes}"
            )
    folder = find_folder(path, SynthesisLayout.PATCHES) or path
    npys = [n for n in fileio.listdir(folder) if n.lower().endswith(NPY_EXT) and not n.startswith(".")]
    if npys:
        return [SampleFiles(n[: -len(NPY_EXT)], fileio.join(folder, n), fileio.join(folder, n)) for n in npys]
    label_dir = find_folder(path, "Labels")
    if find_folder(path, "Images") and label_dir:
        img_dir, images = list_images(path, split="")
        files = [
            SampleFiles(stem, images[stem], fileio.join(label_dir, stem + LABEL_EXT))
            for stem in sorted(images)
            if fileio.exists(fileio.join(label_dir, stem + LABEL_EXT))
        ]
        if files:
            return files
        raise DiffMixError(f"{path}: no image in {img_dir} has a label in {label_dir}")
    raise DiffMixError(
        f"{path}: no .npy patches (expected an image_sample.py run folder with npy_patch/, a folder of "
        ".npy patches, or Images/ + Labels/ as gradmix.py --write_images writes)"
    )


def folder_key(path: str) -> str:
    """What identifies a folder: its real path (``D``, ``D/`` and a link to ``D`` are one folder);
    remote paths as written, less a trailing slash."""
    return path.rstrip("/") if fileio.is_remote(path) else os.path.realpath(path)


def refuse_listed_twice(paths: Sequence[str], option: str) -> None:
    """Refuse a source listed twice in ``option`` (compared by :func:`folder_key`): its images would
    count twice in the pools."""
    seen: Dict[str, str] = {}
    for p in paths:
        key = folder_key(p)
        if key in seen:
            same = "" if seen[key] == p else f" (the same folder as {seen[key]})"
            raise DiffMixError(f"{p}: listed twice in {option}{same}; each source counts once, list it once")
        seen[key] = p


def split_overlap(splits: RealSplits, synthetic: Mapping[str, Sequence[str]]) -> Optional[str]:
    """Why the test split of ``splits`` is not held out, or None: its folder is also training data --
    the real training split's folder (``--test_split Train``; or a ``--data_dir`` that is itself a
    split folder, which every split name resolves to) or a synthetic source (``synthetic``:
    ``{flag: folders}``). Both splits must exist. A dataset read as distributed (pannuke, conic,
    lizard) overlaps when the two splits share a fold (or it is one fold folder, read whole)."""
    if is_format(splits.dataset_mode):
        test_folds, train_folds = parse_split(splits.test_split), parse_split(splits.train_split)
        if (not get_format(splits.dataset_mode).has_folds(splits.data_dir) or test_folds is None
                or train_folds is None or test_folds & train_folds):
            return (f"--test_split {splits.test_split}: its folds of {splits.data_dir} are also training data "
                    f"(--train_split {splits.train_split})")
        return None
    test, _ = resolve_split_dir(splits.data_dir, splits.test_split)
    train, _ = resolve_split_dir(splits.data_dir, splits.train_split)
    used = [(f"--train_split {splits.train_split}", train)] + [(f, d) for f, ds in synthetic.items() for d in ds]
    for what, folder in used:
        if folder_key(folder) == folder_key(test):
            return f"--test_split {splits.test_split}: its folder {test} is also training data ({what}: {folder})"
    return None


def read_real(data_dirs: Sequence[str], table: ClassTable, split: str, min_size: int, progress: bool = True,
              dataset_mode: str = "") -> List[LabeledImage]:
    """Every labelled image of ``split`` in each real dataset root (validated, classes merged);
    ``dataset_mode`` pannuke, conic or lizard reads the dataset as distributed (splits are folds)."""
    if not data_dirs:
        raise DiffMixError("no real training data: pass --data_dir")
    refuse_listed_twice(data_dirs, "--data_dir")
    out: List[LabeledImage] = []
    for d in data_dirs:
        out += read_dataset(d, table, split, min_size=min_size, progress=progress, dataset_mode=dataset_mode)
    return out


def refuse_distributed_format(dataset_mode: str, command: str) -> None:
    """Refuse ``--dataset_mode pannuke|conic|lizard`` in a command that predicts and scores a split
    folder in the CoNSeP layout (its predictions are ``.mat`` files beside ``Labels/``), naming the
    conversion that makes the dataset readable there."""
    if is_format(dataset_mode):
        mode = str(dataset_mode).lower()
        raise DiffMixError(
            f"--dataset_mode {dataset_mode}: {command} reads datasets in the CoNSeP layout (Images/ + Labels/) or "
            f".npy patches, not {mode} as distributed; convert it once (scripts/convert_dataset.py --data_dir D "
            f"--dataset_mode {mode} --out_dir D_consep) and pass --data_dir D_consep --dataset_mode custom "
            "--class_table D_consep/class_table.json")


def read_synthetic(paths: Sequence[str], table: ClassTable, min_size: int, progress: bool = True) -> List[LabeledImage]:
    """Every patch of the synthetic sources, labels checked against ``0..table.num_classes-1``."""
    refuse_listed_twice(paths, "--synthetic_dirs")
    merged = identity_table(table.num_classes, table.names, name=f"{table.name} (merged)")
    out: List[LabeledImage] = []
    for p in paths:
        files = synthetic_files(p, table.num_classes)
        out += read_samples(files, merged, min_size=min_size, what=f"synthetic source {p}", progress=progress)
    return out


def resolve_fraction(fraction: Optional[float], n_real: int, n_synth: int) -> float:
    """The synthetic share of each batch: ``fraction``, or by pool size when None (the union of the
    two pools sampled uniformly, as if the synthetic patches were added to the training set)."""
    if n_synth == 0:
        if fraction:
            raise DiffMixError(f"--synthetic_fraction {fraction} needs synthetic sources (--synthetic_dirs)")
        return 0.0
    if fraction is None:
        return n_synth / (n_real + n_synth)
    if not 0.0 <= fraction < 1.0:
        raise DiffMixError(f"--synthetic_fraction must be in [0, 1), got {fraction}")
    return float(fraction)


@dataclass
class MixedBatches:
    """Seeded training batches from a real pool and an optional synthetic pool.

    ``batch(step)`` returns ``(x float32 [B, 3, S, S] in [-1, 1], targets, n_synthetic)`` with
    ``targets`` as :func:`~.targets.hovernet_targets`.
    """

    real: TrainCropDataset
    synthetic: Optional[TrainCropDataset]
    batch_size: int
    fraction: float
    seed: int
    num_classes: int

    def __post_init__(self):
        self._plans = {
            "real": CropPlan(range(len(self.real)), 1, derive_seed(self.seed, _TAG_REAL)),
        }
        if self.synthetic is not None and self.fraction > 0:
            self._plans["synthetic"] = CropPlan(range(len(self.synthetic)), 1, derive_seed(self.seed, _TAG_SYNTH))

    def _synthetic_before(self, step: int) -> int:
        return math.floor(step * self.fraction * self.batch_size + 1e-9)

    def n_synthetic(self, step: int) -> int:
        return self._synthetic_before(step + 1) - self._synthetic_before(step)

    def keys(self, step: int) -> List[Tuple[str, int, int]]:
        """``(pool, index, crop seed)`` of each item of ``step``: synthetic items first."""
        s0, ns = self._synthetic_before(step), self.n_synthetic(step)
        r0 = step * self.batch_size - s0
        out = []
        for pool, first, count in (("synthetic", s0, ns), ("real", r0, self.batch_size - ns)):
            for g in range(first, first + count):
                index, crop_seed = self._plans[pool].batch_keys(g)[0]
                out.append((pool, index, crop_seed))
        return out

    def batch(self, step: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], int]:
        pools = {"real": self.real, "synthetic": self.synthetic}
        items = [pools[p][(i, s)] for p, i, s in self.keys(step)]
        x = torch.stack([it["image"] for it in items])
        inst = torch.stack([it["inst"] for it in items])
        types = torch.stack([it["type"] for it in items])
        return x, hovernet_targets(inst, types, self.num_classes), self.n_synthetic(step)


def pool_summary(samples: Sequence[LabeledImage], num_classes: int) -> Dict[str, Any]:
    """Image count and nuclei per class of a pool (for records and reports)."""
    counts = np.zeros(num_classes, np.int64)
    for s in samples:
        _, types, _ = instance_table(s.inst_map, s.type_map)
        counts += np.bincount(types, minlength=num_classes)[:num_classes]
    return {"images": len(samples), "nuclei_per_class": counts.tolist()}
