"""Class tables: how raw nucleus type ids of a dataset are merged into the classes the model sees.

Merging happens in exactly one place: :func:`guided_diffusion.data.label_arrays.merge_types`, which
every label-file reader of the package (training, synthesis, GradMix, statistics, evaluation)
goes through. Label maps that this project writes after merging (GradMix outputs) carry the
``.mat`` keys ``classes_merged`` (= 1) and ``num_classes`` (= N); for those the table is not
applied again, the values are only checked against ``0..N-1`` (the official DiffMix sampler
merges such maps a second time, which silently relabels classes).

Whole datasets may also come already merged (many public CoNSeP copies carry the 4 merged
classes 1..4). ``labels_merged`` (``auto``/``yes``/``no``, the ``--labels_merged`` flag) says how
to read them; ``auto`` decides per dataset from the type values present
(:func:`guided_diffusion.data.readers.resolve_labels_form`, rule in :meth:`ClassTable.label_form`).
A table for already-merged data is :meth:`ClassTable.as_merged`: the identity over the merged
classes, with the same names.

Merged class 0 is always background. ``num_classes`` counts background, as the model does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ..infra import fileio
from ..infra.config import flag
from ..infra.errors import DiffMixError
from .formats import FORMAT_MODES, get_format

# consep/glysac/custom read the CoNSeP folder layout; the FORMAT_MODES read datasets as distributed
# (guided_diffusion/data/formats/).
DATASET_MODES = ("consep", "glysac", "custom") + FORMAT_MODES
# One meaning and one default for every command's --dataset_mode: the dataset's class table (which
# merges its raw type ids) and its reader. (evaluate.py alone leaves it optional: without it types
# are compared as stored.)
DEFAULT_DATASET_MODE = "consep"
DATASET_MODE_HELP = ("the dataset: its class table (consep, glysac; custom: --class_table or --num_classes) and "
                     "reader (pannuke, conic, lizard: as distributed, --split Train/Test = its folds)")


def dataset_mode_flag():
    """The ``--dataset_mode`` field of a settings dataclass (:data:`DEFAULT_DATASET_MODE`)."""
    return flag(DEFAULT_DATASET_MODE, DATASET_MODE_HELP)

LABELS_MERGED = ("auto", "yes", "no")
# Nuclei with ids that merging would change (CoNSeP 4, GLySAC 2) needed before "auto" reads a
# dataset without any raw-only ids as already merged; fewer cannot tell the forms apart.
MERGED_EVIDENCE = 30
LABELS_MERGED_HELP = (
    "are the label files' type ids already the merged classes? auto (default): decided per dataset "
    "from the ids present (consep: raw 1..7, merged 1..4; glysac: raw 1..10, merged 1..3), with a "
    "notice when it decides merged; yes: read them as merged; no: merge them with the class table"
)


@dataclass(frozen=True)
class ClassTable:
    """A raw-id -> merged-class lookup table.

    Attributes:
        name: short name ("consep", "glysac", "custom", ...), recorded in outputs.
        num_classes: merged classes including background (0).
        lut: ``lut[raw] = merged`` for every valid raw id ``0..len(lut)-1``; -1 marks a raw id
            that is not part of the table (reading it is a validation error). ``lut[0] == 0``.
        names: ``num_classes`` class names, index 0 = "background".
        minor: the dataset's rare classes (merged ids), GradMix's default ``minor``; empty = the
            DiffMix default (class 1).
        labels_merged: True for the form that reads already-merged labels (:meth:`as_merged`).
    """

    name: str
    num_classes: int
    lut: tuple
    names: tuple
    minor: tuple = ()
    labels_merged: bool = False

    def __post_init__(self):
        if self.num_classes < 2:
            raise DiffMixError(f"class table {self.name!r}: num_classes must be >= 2 (background + 1), got {self.num_classes}")
        if not self.lut or self.lut[0] != 0:
            raise DiffMixError(f"class table {self.name!r}: raw id 0 (background) must map to 0")
        bad = [m for m in self.lut if m != -1 and not 0 <= m < self.num_classes]
        if bad:
            raise DiffMixError(
                f"class table {self.name!r}: merged ids {sorted(set(bad))} outside 0..{self.num_classes - 1}"
            )
        if len(self.names) != self.num_classes:
            raise DiffMixError(
                f"class table {self.name!r}: {len(self.names)} names for {self.num_classes} classes"
            )
        if any(not 1 <= c < self.num_classes for c in self.minor):
            raise DiffMixError(f"class table {self.name!r}: minor classes {list(self.minor)} outside 1..{self.num_classes - 1}")

    @property
    def raw_ids(self) -> list:
        """Raw ids the table accepts (ascending)."""
        return [r for r, m in enumerate(self.lut) if m != -1]

    def unknown_raw_values(self, type_map: np.ndarray) -> list:
        """Raw values in ``type_map`` that the table does not map (sorted list of ints)."""
        values = np.unique(np.asarray(type_map))
        return [int(v) for v in values if not (0 <= v < len(self.lut)) or self.lut[int(v)] == -1]

    def merge(self, type_map: np.ndarray, source: str = "type_map") -> np.ndarray:
        """Map a raw type map (int [H, W]) to merged classes (int32 [H, W], values 0..num_classes-1).

        Raises:
            DiffMixError naming ``source`` if a value is not in the table.
        """
        unknown = self.unknown_raw_values(type_map)
        if unknown:
            raise DiffMixError(f"{source}: {self.describe_unknown(unknown)}")
        lut = np.asarray(self.lut, dtype=np.int32)
        return lut[np.asarray(type_map).astype(np.int64, copy=False)]

    def describe_unknown(self, unknown: Sequence[int]) -> str:
        if self.labels_merged:
            return (
                f"type values {list(unknown)} outside 0..{self.num_classes - 1}: the labels are read as "
                f"already-merged {self.name} classes (--labels_merged); raw ids need --labels_merged no"
            )
        return (
            f"type values {list(unknown)} are not in the {self.name} class table "
            f"(raw ids accepted: {self.raw_ids})"
        )

    @property
    def rare_classes(self) -> tuple:
        """The rare classes (merged ids): ``minor``, else DiffMix's default, class 1."""
        return tuple(self.minor) or (1,)

    def as_merged(self) -> "ClassTable":
        """The table that reads labels already holding this table's merged classes (identity, same names)."""
        if self.labels_merged:
            return self
        return dataclasses.replace(self, lut=tuple(range(self.num_classes)), labels_merged=True)

    def label_form(self, counts: Mapping[int, int]) -> str:
        """Which form nuclei type ids found in a whole dataset are: ``counts`` maps id -> nuclei.

        Returns ``"raw"`` when some id is >= num_classes (only raw ids go that high); ``"same"``
        when merging changes none of the ids present (both readings agree); ``"merged"`` when
        every id is a merged class, merging would change some (CoNSeP: 4 present, none of 5..7;
        GLySAC: 2 present, none of 4..10) and those ids hold at least :data:`MERGED_EVIDENCE`
        nuclei (a raw dataset with that many of them but none of its upper ids is implausible:
        spindle cells, 5..7, are a third of raw CoNSeP's nuclei); ``"unsure"`` below that.
        """
        present = {int(v): int(n) for v, n in counts.items() if int(v) != 0 and n}
        if any(v >= self.num_classes for v in present):
            return "raw"
        changed = sum(n for v, n in present.items() if not (v < len(self.lut) and self.lut[v] == v))
        if not changed:
            return "same"
        return "merged" if changed >= MERGED_EVIDENCE else "unsure"

    def to_json(self) -> dict:
        """The mapping-file form (see :func:`load_class_table`)."""
        out = {
            "name": self.name,
            "num_classes": self.num_classes,
            "map": {str(r): int(m) for r, m in enumerate(self.lut) if m != -1},
            "names": list(self.names),
            **({"minor": list(self.minor)} if self.minor else {}),
        }
        if self.labels_merged:
            out["labels_merged"] = True
        return out


def _table(name: str, groups: Mapping[int, Sequence[int]], names: Sequence[str], minor: Sequence[int] = ()) -> ClassTable:
    """Build a table from ``{merged: [raw ids]}``; background 0 -> 0 is implicit."""
    size = max(r for raws in groups.values() for r in raws) + 1
    lut = [-1] * size
    lut[0] = 0
    for merged, raws in groups.items():
        for r in raws:
            lut[r] = merged
    return ClassTable(name=name, num_classes=len(names), lut=tuple(lut), names=tuple(names), minor=tuple(minor))


# CoNSeP raw ids: 1 other, 2 inflammatory, 3 healthy epithelial, 4 dysplastic/malignant epithelial,
# 5 fibroblast, 6 muscle, 7 endothelial; merged as in HoVer-Net and DiffMix.
CONSEP = _table(
    "consep",
    {1: [1], 2: [2], 3: [3, 4], 4: [5, 6, 7]},
    ["background", "other", "inflammatory", "epithelial", "spindle"],
)

# GLySAC's 10 raw ids grouped into 3 classes as in SONNET and DiffMix. The class names follow the
# SONNET paper's grouping (miscellaneous, epithelial, lymphocyte); the ids are what matter.
GLYSAC = _table(
    "glysac",
    {1: [1, 2, 9, 10], 2: [4, 5, 6, 7], 3: [3, 8]},
    ["background", "other", "epithelial", "lymphocyte"],
)


def identity_table(num_classes: int, names: Optional[Sequence[str]] = None, name: str = "custom") -> ClassTable:
    """Table for data that is already merged: raw id k -> class k for k < num_classes."""
    if names is None:
        names = ["background"] + [f"class{k}" for k in range(1, num_classes)]
    return ClassTable(name=name, num_classes=num_classes, lut=tuple(range(num_classes)), names=tuple(names))


def load_class_table(path: str) -> ClassTable:
    """Read a mapping file.

    Format (JSON)::

        {"num_classes": 4, "map": {"1": 1, "2": 1, "3": 2, "4": 3}, "names": ["background", ...]}

    ``map`` takes raw ids (string keys) to merged classes; raw 0 always maps to 0 and raw ids absent
    from ``map`` are invalid. Without ``map`` the table is the identity over ``num_classes``.
    ``names`` and ``minor`` (the rare classes, GradMix's default minor) are optional.
    """
    obj = fileio.read_json(path)
    if not isinstance(obj, dict) or "num_classes" not in obj:
        raise DiffMixError(f"{path}: a class table file must be a JSON object with 'num_classes'")
    try:
        num_classes = int(obj["num_classes"])
        names = obj.get("names")
        if names is not None and len(names) != num_classes:
            raise DiffMixError(f"{path}: 'names' has {len(names)} entries, expected num_classes={num_classes}")
        default_names = ["background"] + [f"class{k}" for k in range(1, num_classes)]
        names = tuple(str(n) for n in (names or default_names))
        name = str(obj.get("name", "custom"))
        minor = tuple(int(c) for c in obj.get("minor", ()))
        if "map" not in obj:
            return dataclasses.replace(identity_table(num_classes, names, name=name), minor=minor)
        mapping = {int(k): int(v) for k, v in dict(obj["map"]).items()}
    except (TypeError, ValueError) as err:
        raise DiffMixError(f"{path}: malformed class table ({err})") from None
    if any(k < 0 for k in mapping):
        raise DiffMixError(f"{path}: raw ids must be >= 0, got {sorted(k for k in mapping if k < 0)}")
    if mapping.get(0, 0) != 0:
        raise DiffMixError(f"{path}: raw id 0 (background) must map to 0")
    lut = [-1] * (max(list(mapping) + [0]) + 1)
    lut[0] = 0
    for raw, merged in mapping.items():
        if not 0 <= merged < num_classes:
            raise DiffMixError(f"{path}: raw id {raw} maps to {merged}, outside 0..{num_classes - 1}")
        lut[raw] = merged
    return ClassTable(name=name, num_classes=num_classes, lut=tuple(lut), names=names, minor=minor)


def resolve_class_table(
    dataset_mode: str,
    class_table: Union[None, str, ClassTable] = None,
    num_classes: Optional[int] = None,
) -> ClassTable:
    """The class table for a dataset mode.

    Args:
        dataset_mode: one of :data:`DATASET_MODES`.
        class_table: for "custom" only: a :class:`ClassTable` or the path of a mapping file.
        num_classes: optional check for the fixed tables (consep 5, glysac 4, pannuke 6, conic and
            lizard 7); for "custom" without
            ``class_table`` it gives the identity table over ``num_classes`` classes.
    """
    mode = str(dataset_mode).lower()
    if mode not in DATASET_MODES:
        raise DiffMixError(f"dataset_mode {dataset_mode!r}: expected one of {', '.join(DATASET_MODES)}")
    if mode != "custom":
        if class_table is not None:
            raise DiffMixError(
                f"class_table is only used with dataset_mode custom (dataset_mode {mode} has a fixed table)"
            )
        if mode in FORMAT_MODES:
            table = get_format(mode).TABLE
        else:
            table = CONSEP if mode == "consep" else GLYSAC
        if num_classes is not None and int(num_classes) != table.num_classes:
            raise DiffMixError(
                f"num_classes={num_classes} does not match dataset_mode {mode} "
                f"({table.num_classes} classes including background)"
            )
        return table
    if isinstance(class_table, ClassTable):
        table = class_table
    elif class_table:
        table = load_class_table(str(class_table))
    elif num_classes is not None:
        return identity_table(int(num_classes))
    else:
        raise DiffMixError("dataset_mode custom needs num_classes (identity table) or a class_table mapping file")
    if num_classes is not None and int(num_classes) != table.num_classes:
        raise DiffMixError(
            f"num_classes={num_classes} does not match the class table {table.name!r} "
            f"({table.num_classes} classes)"
        )
    return table
