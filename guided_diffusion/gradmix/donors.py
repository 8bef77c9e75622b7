"""The donor bank: every minor-class nucleus of the training set, read once and kept as a small crop.

The official GradMix script re-reads every label file of the pool for every target nucleus; here
each label map is read once, its eligible minor-class nuclei are cut out as boolean crops, and
balancing then only looks at the bank's arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..infra.errors import DiffMixError
from . import BALANCE_DEFAULTS
from .nuclei import check_label_maps, nucleus_table


@dataclass
class DonorBank:
    """D donor nuclei with their shapes, from one or more label maps.

    Attributes:
        stems: names of the source maps; ``stem_index`` points into this list.
        stem_index: int64 [D] source map of each donor.
        ids: int64 [D] instance id of each donor in its source map.
        classes: int64 [D] class of each donor (one of the minor classes).
        areas: int64 [D] pixel count of each donor.
        centroids: float64 [D, 2] centroid (x, y) in the source map.
        origins: int64 [D, 2] (row, col) of the top-left corner of ``masks[d]`` in the source map.
        masks: D bool arrays [h_d, w_d], the donor's pixels in its bounding box.
        image_loader: optional ``stem -> uint8 [H, W, 3]`` used (once per stem, cached) when
            GradMix images are composed.
    """

    stems: list
    stem_index: np.ndarray
    ids: np.ndarray
    classes: np.ndarray
    areas: np.ndarray
    centroids: np.ndarray
    origins: np.ndarray
    masks: list
    image_loader: Optional[Callable[[str], np.ndarray]] = None
    _images: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.ids.size)

    def of_stem(self, stem: str) -> np.ndarray:
        """int64 [k]: indices of the donors taken from map ``stem`` (ascending id); empty if none."""
        if stem not in self.stems:
            return np.zeros(0, np.int64)
        return np.flatnonzero(self.stem_index == self.stems.index(stem))

    def search_order(self, source_stem: Optional[str], rng: np.random.Generator) -> np.ndarray:
        """int64 [D]: the order in which donors are tried for targets of map ``source_stem``.

        Donors of the source map itself come first (ascending id), then those of every other map,
        map by map in an order drawn from ``rng`` (ascending id inside each map), as in GradMix.
        """
        others = [s for s in range(len(self.stems)) if source_stem is None or self.stems[s] != source_stem]
        parts = [self.of_stem(source_stem)] if source_stem is not None else []
        for s in rng.permutation(np.asarray(others, dtype=np.int64)):
            parts.append(np.flatnonzero(self.stem_index == s))
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def image(self, stem: str) -> np.ndarray:
        """uint8 [H, W, 3] image of map ``stem``, loaded once through ``image_loader``."""
        if stem not in self._images:
            if self.image_loader is None:
                raise DiffMixError("GradMix images need the donor images: give collect_donors an image_loader")
            self._images[stem] = self.image_loader(stem)
        return self._images[stem]


def collect_donors(
    label_maps: Iterable | Mapping,
    minor: Sequence[int] = (1,),
    margin: float = BALANCE_DEFAULTS["margin"],
    image_loader: Optional[Callable[[str], np.ndarray]] = None,
) -> DonorBank:
    """Cut every eligible minor-class nucleus out of the given label maps.

    Args:
        label_maps: ``{stem: (inst_map, type_map)}`` or an iterable of ``(stem, inst_map,
            type_map)``; maps are int [H, W], ``type_map`` already class-merged. An iterable is
            consumed once, so a generator that reads files one by one keeps memory small.
        minor: the minor classes; a donor is any nucleus of one of them.
        margin: donors whose centroid lies closer than ``margin`` px to the image border are left
            out (the GradMix border rule, also applied to targets).
        image_loader: optional ``stem -> uint8 [H, W, 3]`` for composing GradMix images.

    Returns:
        A :class:`DonorBank` (donors ordered by map, then by id).
    """
    items = label_maps.items() if isinstance(label_maps, Mapping) else label_maps
    minor_arr = np.asarray(sorted(set(int(c) for c in minor)), dtype=np.int64)
    stems: list = []
    cols: dict = {k: [] for k in ("stem_index", "ids", "classes", "areas", "centroids", "origins")}
    masks: list = []
    for item in items:
        if isinstance(label_maps, Mapping):
            stem, (inst_map, type_map) = item
        else:
            stem, inst_map, type_map = item
        if stem in stems:
            raise DiffMixError(f"{stem}: label map given twice to the donor bank")
        inst_map, type_map = check_label_maps(inst_map, type_map, where=str(stem))
        table = nucleus_table(inst_map, type_map)
        stems.append(stem)
        keep = np.flatnonzero(np.isin(table.classes, minor_arr) & table.away_from_border(margin))
        for i in keep:
            box = table.boxes[i]
            cols["stem_index"].append(len(stems) - 1)
            cols["ids"].append(table.ids[i])
            cols["classes"].append(table.classes[i])
            cols["areas"].append(table.areas[i])
            cols["centroids"].append(table.centroids[i])
            cols["origins"].append((box[0].start, box[1].start))
            masks.append(table.mask(inst_map, i))
    return DonorBank(
        stems=stems,
        stem_index=np.asarray(cols["stem_index"], np.int64),
        ids=np.asarray(cols["ids"], np.int64),
        classes=np.asarray(cols["classes"], np.int64),
        areas=np.asarray(cols["areas"], np.int64),
        centroids=np.asarray(cols["centroids"], np.float64).reshape(-1, 2),
        origins=np.asarray(cols["origins"], np.int64).reshape(-1, 2),
        masks=masks,
        image_loader=image_loader,
    )
