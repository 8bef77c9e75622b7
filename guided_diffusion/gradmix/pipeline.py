"""GradMix over a dataset split: outputs, JSON records, resume and class statistics.

Output layout (the DiffMix sampler relies on the names)::

    <out_dir>/Labels/<stem>__balance<k:03d>.mat   (and __enlarge<k:03d>.mat)
    <out_dir>/Records/<same name>.json
    <out_dir>/Images/<same name>.png              (balance maps, only with write_images)
    <out_dir>/class_counts.csv, class_counts.png   (class statistics, see ``stats``)

Label maps hold ``inst_map``, ``type_map``, ``inst_type``, ``inst_centroid`` (recomputed) plus
``classes_merged`` = 1 and ``num_classes`` = N, so readers never merge their classes twice.

A map is computed in full (label maps, and with ``write_images`` the source image read and the
GradMix image composed) before any of its files is written; then come the ``.mat``, the image and,
last, the record. Every file is written atomically, so "record exists" means "map complete";
a rerun skips complete maps and redoes the rest. Each map's random generator is derived from
(seed, stem, kind, k) alone (:func:`map_rng`), so results do not depend on processing order,
on which stems are selected, or on resuming.
"""

from __future__ import annotations

import functools
import hashlib
import posixpath
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..data.classes import resolve_class_table
from ..data.labels import instance_table, write_label_mat
from ..data.layouts import GradMixLayout
from ..data.readers import list_samples, read_label_arrays, read_sample_labels, resolve_labels_form, sample_image
from ..data.stats import write_comparison
from ..infra import fileio
from ..infra.completion import is_marked, refuse_changed_settings, write_marked
from ..infra.errors import DiffMixError
from . import KINDS
from .balance import balance_map, check_minor_major
from .donors import collect_donors
from .enlarge import enlarge_map
from .image import compose_gradmix_image
from .nuclei import class_counts
from .settings import GradMixConfig

_KIND_CODES = {"balance": 1, "enlarge": 2}
RECORD_VERSION = 1


def map_name(stem: str, kind: str, k: int) -> str:
    """Output name (no extension) of map ``k`` of ``kind`` for source ``stem``."""
    if kind not in KINDS:
        raise DiffMixError(f"unknown map kind {kind!r}: expected one of {', '.join(KINDS)}")
    return f"{stem}__{kind}{int(k):03d}"


def map_seed_entropy(seed: int, stem: str, kind: str, k: int) -> list:
    """The integers that seed map ``k`` of ``kind`` for ``stem`` (recorded in each JSON record)."""
    if int(seed) != seed or seed < 0:
        raise DiffMixError(f"seed must be a non-negative integer, got {seed}")
    digest = hashlib.sha256(str(stem).encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return [int(seed), *words, _KIND_CODES[kind], int(k)]


def map_rng(seed: int, stem: str, kind: str, k: int) -> np.random.Generator:
    """numpy Generator for one output map, from ``SeedSequence((seed, sha256(stem), kind, k))``."""
    return np.random.default_rng(np.random.SeedSequence(map_seed_entropy(seed, stem, kind, k)))


def default_classes(num_classes: int) -> tuple[tuple, tuple]:
    """DiffMix's default split: minor = (1,), major = every other class (2 .. num_classes-1)."""
    if num_classes < 3:
        raise DiffMixError(f"GradMix needs at least two nucleus classes (num_classes={num_classes} incl. background)")
    return (1,), tuple(range(2, num_classes))


def _parse_classes(value, name: str) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError:
            raise DiffMixError(f"{name}: expected comma-separated class ids, got {value!r}") from None
    return tuple(int(v) for v in value)


class _MapCache:
    """Label maps read during the donor pass, kept (up to ``budget_mb``) for the editing pass."""

    def __init__(self, read, budget_mb: float):
        self.read = read
        self.budget = budget_mb * 2**20
        self.used = 0
        self.maps: dict = {}

    def put(self, stem, maps) -> None:
        size = sum(a.nbytes for a in maps)
        if self.used + size <= self.budget:
            self.maps[stem] = maps
            self.used += size

    def get(self, files):
        return self.maps.pop(files.stem, None) or self.read(files)


def run_gradmix(cfg: GradMixConfig) -> dict:
    """Write ``cfg.counts()`` balancing and enlarging maps per source image of a split.

    ``cfg`` (:class:`~guided_diffusion.gradmix.settings.GradMixConfig`, the flags of
    ``scripts/gradmix.py``): the dataset (``data_dir``, ``dataset_mode``, ``split``; custom needs
    ``class_table`` or ``num_classes``; labels are class-merged by the data layer's class table),
    ``out_dir`` (local or remote), ``stems`` (only make maps for these sources; donors still come
    from the whole split), ``minor``/``major`` (class ids "1,2"; default minor: the class table's
    rare classes, major: every other class), the rules of :func:`balance_map` (``margin``,
    ``fraction``, ``size_ratio``, ``dilate``, ``max_tries``) and :func:`enlarge_map`
    (``enlarge_fraction``, ``max_shift``), ``seed`` (per-map generators from :func:`map_rng`),
    ``write_images`` (only then are the dataset's images read at all), ``stats`` (class counts
    before/after as CSV + PNG in ``out_dir``), ``cache_mb`` (label maps kept for the edits).

    Returns:
        Summary dict: ``written`` and ``skipped`` map names, ``settings``, and ``counts``
        (class counts, see :func:`class_count_summary`) when ``stats``.
    """
    cfg.validate()
    counts = cfg.counts()
    num_balance, num_enlarge = counts["balance"], counts["enlarge"]
    radii = cfg.radii()
    stems = cfg.stem_list()
    fileio.check_output_dir(cfg.out_dir, "--out_dir")
    table = resolve_class_table(cfg.dataset_mode, cfg.class_table, cfg.num_classes)
    default_classes(table.num_classes)  # enough classes for GradMix
    minor_p = _parse_classes(cfg.minor, "minor") or table.rare_classes
    major_p = _parse_classes(cfg.major, "major") or tuple(c for c in range(1, table.num_classes) if c not in minor_p)
    minor_t, major_t = check_minor_major(minor_p, major_p)
    bad = [c for c in minor_t + major_t if c >= table.num_classes]
    if bad:
        raise DiffMixError(f"classes {bad} do not exist: the {table.name} table has classes 1..{table.num_classes - 1}")

    samples = list_samples(cfg.data_dir, cfg.split, cfg.image_folder, cfg.label_folder, dataset_mode=cfg.dataset_mode)
    table = resolve_labels_form(table, [s.label for s in samples], cfg.labels_merged, what=f"dataset {cfg.data_dir}",
                                notice=cfg.verbose)
    settings = {
        "dataset_mode": str(cfg.dataset_mode).lower(),
        "class_table": table.name,
        "labels_merged": table.labels_merged,
        "num_classes": table.num_classes,
        "class_names": list(table.names),
        "split": cfg.split,
        "minor": list(minor_t),
        "major": list(major_t),
        "margin": float(cfg.margin),
        "fraction": float(cfg.fraction),
        "size_ratio": float(cfg.size_ratio),
        "dilate": int(cfg.dilate),
        "max_tries": int(cfg.max_tries),
        "enlarge_fraction": float(cfg.enlarge_fraction),
        "max_shift": int(cfg.max_shift),
        "write_images": bool(cfg.write_images),
        "median_radii": list(radii),
        "overlap_rule": "reject",
    }
    wanted = samples
    if stems is not None:
        have = {s.stem for s in samples}
        missing = [s for s in stems if s not in have]
        if missing:
            raise DiffMixError(f"{cfg.data_dir}: stems not found in split {cfg.split}: {missing}")
        wanted = [s for s in samples if s.stem in set(stems)]

    layout = GradMixLayout(cfg.out_dir)
    jobs, skipped = [], []
    for files in wanted:
        for kind, count in (("balance", num_balance), ("enlarge", num_enlarge)):
            for k in range(int(count)):
                name = map_name(files.stem, kind, k)
                if _is_complete(layout, name, kind, cfg.write_images, settings):
                    skipped.append(name)
                else:
                    jobs.append((files, kind, k, name))

    written = []
    if jobs:
        read = _label_reader(table)
        cache = _MapCache(read, cfg.cache_mb)
        need_sources = {files.stem for files, _, _, _ in jobs}
        bank = None
        if any(kind == "balance" for _, kind, _, _ in jobs):
            # Every map of the split is a possible donor source: read each once, keep the sources.
            def label_maps():
                for files in tqdm(samples, desc="reading donors", unit="map", disable=not cfg.progress):
                    maps = read(files)
                    if files.stem in need_sources:
                        cache.put(files.stem, maps)
                    yield files.stem, maps[0], maps[1]

            by_stem = {s.stem: s for s in samples}
            bank = collect_donors(label_maps(), minor=minor_t, margin=cfg.margin,
                                  image_loader=lambda stem: _read_image(by_stem[stem]))
            absent = [c for c in minor_t if not np.any(bank.classes == c)]
            if absent:
                # Balancing maps would silently equal their sources for these classes.
                raise DiffMixError(
                    f"{cfg.data_dir}: --minor {','.join(map(str, absent))}: no nucleus of class "
                    f"{', '.join(f'{c} ({table.names[c]})' for c in absent)} lies {cfg.margin:g} px or more from "
                    f"the border in split {cfg.split}, so there is no donor to balance with; nothing written"
                )
        for part in (layout.LABELS, layout.RECORDS) + ((layout.IMAGES,) if cfg.write_images else ()):
            fileio.makedirs(layout.folder(part))
        current = (None, None, None)
        for files, kind, k, name in tqdm(jobs, desc="gradmix maps", unit="map", disable=not cfg.progress):
            if current[0] != files.stem:
                maps = cache.get(files)
                current = (files.stem, maps, class_counts(instance_table(*maps)[1], table.num_classes))
            (inst, types), source_counts = current[1], current[2]
            rng = map_rng(cfg.seed, files.stem, kind, k)
            if kind == "balance":
                new_inst, new_type, edits = balance_map(
                    inst, types, bank, rng, source_stem=files.stem, minor=minor_t, major=major_t,
                    margin=cfg.margin, fraction=cfg.fraction, size_ratio=cfg.size_ratio, dilate=cfg.dilate, max_tries=cfg.max_tries,
                )
            else:
                new_inst, new_type, edits = enlarge_map(
                    inst, types, rng, fraction=cfg.enlarge_fraction, max_shift=cfg.max_shift, where=files.label
                )
            # Everything that can fail on bad input (reading the source and donor images, composing)
            # happens before the first file of this map is written, so an error leaves no half map.
            png = None
            if cfg.write_images and kind == "balance":
                source_image = bank.image(files.stem)
                if source_image.shape[:2] != inst.shape:
                    raise DiffMixError(
                        f"{files.image}: image size {source_image.shape[:2]} differs from its label {inst.shape}"
                    )
                image = compose_gradmix_image(source_image, inst, new_inst, edits, bank,
                                              dilate=cfg.dilate, median_radii=radii)
                png = fileio.png_bytes(image, compress_level=1)  # fast: one PNG per balancing map
            record = _record(files, kind, k, name, cfg.seed, settings, edits, source_counts)
            outputs = [(layout.label(name), functools.partial(
                write_label_mat, inst_map=new_inst, type_map=new_type,
                classes_merged=np.array(1), num_classes=np.array(table.num_classes)))]
            if png is not None:
                outputs.append((layout.image(name), functools.partial(fileio.write_bytes, data=png)))
            write_marked(outputs, layout.record(name), record, what=f"GradMix map {name}",
                         hint=lambda: (f"kept: {len(written) + len(skipped)} complete maps in {cfg.out_dir} ({name} has no "
                                       "record, so it counts as not written; rerun the same command to continue)"))
            written.append(name)

    summary = {"written": written, "skipped": skipped, "settings": settings}
    if cfg.stats and (written or skipped):
        summary["counts"] = save_class_stats(cfg.out_dir, table.names, sorted(written + skipped), verbose=cfg.verbose)
    return summary


def _label_reader(table):
    return lambda files: read_sample_labels(files, table)


def _read_image(files) -> np.ndarray:
    return sample_image(files)


def _is_complete(layout: GradMixLayout, name: str, kind: str, write_images: bool, settings: dict) -> bool:
    """True when map ``name`` was completed earlier (record present, label present, image if wanted).

    A complete map made with different settings is an error rather than silently kept or replaced.
    """
    record_path = layout.record(name)
    required = [layout.label(name)]
    if write_images and kind == "balance":
        required.append(layout.image(name))
    if not is_marked(record_path, required):
        return False
    old = fileio.read_json(record_path).get("settings", {})
    refuse_changed_settings(record_path, old, settings, _relevant_settings(kind), "this map",
                            "use a new out_dir or delete the old outputs")
    return True


def _relevant_settings(kind: str) -> tuple:
    common = ("dataset_mode", "class_table", "num_classes", "split")
    if kind == "balance":
        return common + ("minor", "major", "margin", "fraction", "size_ratio", "dilate", "max_tries", "overlap_rule")
    return common + ("enlarge_fraction", "max_shift")


def _record(files, kind, k, name, seed, settings, edits, source_counts) -> dict:
    after = np.array(source_counts, np.int64)
    if kind == "balance":
        done = [e for e in edits if e.get("donor_image") is not None]
        # Each replacement turns one target-class nucleus into one donor-class nucleus; every
        # other nucleus keeps its class, so this is exactly the output map's count.
        for e in done:
            after[e["target_class"]] -= 1
            after[e["donor_class"]] += 1
        summary = {"targets": len(edits), "replaced": len(done), "unchanged": len(edits) - len(done)}
    else:
        moved = sum(1 for e in edits if e["moved"])
        summary = {"picked": len(edits), "moved": moved, "not_moved": len(edits) - moved}
    return {
        "version": RECORD_VERSION,
        "name": name,
        "kind": kind,
        "index": int(k),
        "source_stem": files.stem,
        "source_image": files.image,
        "source_label": files.label,
        "seed": int(seed),
        "seed_entropy": map_seed_entropy(seed, files.stem, kind, k),
        "settings": settings,
        "class_counts": {"source": np.asarray(source_counts).tolist(), "output": after.tolist()},
        "summary": summary,
        "edits": edits,
    }


def _sibling(label_path: str, folder: str, ext: str) -> str:
    labels_dir, file_name = posixpath.split(str(label_path).replace("\\", "/"))
    return fileio.join(posixpath.dirname(labels_dir), folder, posixpath.splitext(file_name)[0] + ext)


def record_path(label_path: str) -> str:
    """The JSON record of the GradMix map at ``label_path`` (``<out_dir>/Labels/<name>.mat`` ->
    ``<out_dir>/Records/<name>.json``); the path is returned whether or not it exists."""
    return _sibling(label_path, GradMixLayout.RECORDS, ".json")


def image_path(label_path: str) -> str:
    """The GradMix image of the map at ``label_path`` (``<out_dir>/Images/<name>.png``; balancing maps
    written with ``write_images``); the path is returned whether or not it exists."""
    return _sibling(label_path, GradMixLayout.IMAGES, ".png")


def read_map_record(label_path: str) -> Optional[dict]:
    """The GradMix record of the map at ``label_path``, or None when it is not a GradMix map (the
    dataset's own labels, a HoVer-Net ``.npy``)."""
    path = record_path(label_path)
    return fileio.read_json(path) if label_path and fileio.exists(path) else None


def changed_ids(record: dict) -> list:
    """Instance ids (in the output map, full size) of the nuclei a GradMix map changed: the placed
    donors of a balancing map, the moved nuclei of an enlarging map."""
    if record["kind"] == "balance":
        return [int(e["target_id"]) for e in record["edits"] if e.get("donor_image") is not None]
    return [int(e["id"]) for e in record["edits"] if e.get("moved")]


def changed_mask(label_path: str, window: Optional[tuple] = None):
    """``(kind, mask bool [h, w])``: the nuclei a GradMix map changed (:func:`changed_ids`) inside
    ``window`` = ``(y0, x0, h, w)`` of the map at ``label_path`` (None: the whole map); ``(None, None)``
    when the file is not a GradMix map."""
    record = read_map_record(label_path)
    if record is None:
        return None, None
    label, problems = read_label_arrays(label_path, require_types=False)
    if label is None:
        raise DiffMixError("; ".join(problems))
    inst = label.inst_map
    if window is not None:
        y0, x0, h, w = (int(v) for v in window)
        inst = inst[y0 : y0 + h, x0 : x0 + w]
    return record["kind"], np.isin(inst, changed_ids(record))


def class_count_summary(out_dir: str, names: Sequence[str], num_classes: int) -> dict:
    """Nuclei per class over the maps ``names``, from their JSON records (no label map re-read).

    ``before`` adds each map's source counts (a source counted once per map made from it), so
    ``before`` and ``after`` cover the same number of maps and their shares compare directly.

    Returns:
        ``{"before": int64 [C], "after": int64 [C]}``, C = ``num_classes`` (index 0 = background).
    """
    before = np.zeros(num_classes, np.int64)
    after = np.zeros(num_classes, np.int64)
    for name in names:
        path = GradMixLayout(out_dir).record(name)
        rec = fileio.read_json(path)
        try:
            src = np.asarray(rec["class_counts"]["source"], np.int64)
            out = np.asarray(rec["class_counts"]["output"], np.int64)
        except (KeyError, TypeError) as err:
            raise DiffMixError(f"{path}: record without class counts ({err})") from None
        before[: src.size] += src[:num_classes]
        after[: out.size] += out[:num_classes]
    return {"before": before, "after": after}


def save_class_stats(out_dir: str, class_names: Sequence[str], names: Sequence[str], verbose: bool = True) -> dict:
    """Print and save class counts before/after GradMix over the maps ``names``.

    Writes ``<out_dir>/class_counts.csv`` and ``class_counts.png`` with the data layer's
    :func:`~guided_diffusion.data.stats.write_comparison`. Returns :func:`class_count_summary`'s
    dict plus the two paths.
    """
    counts = class_count_summary(out_dir, names, len(class_names))
    csv_path, png_path = write_comparison(
        counts["before"], counts["after"], out_dir, class_names=class_names, prefix="class_counts"
    )
    if verbose:
        b, a = counts["before"], counts["after"]
        tb, ta = max(1, int(b[1:].sum())), max(1, int(a[1:].sum()))
        print(f"nuclei per class over {len(names)} GradMix maps (before = their source maps):")
        print(f"  {'class':<16}{'before':>9}{'share':>8}{'after':>9}{'share':>8}")
        for c in range(1, len(class_names)):
            print(f"  {class_names[c]:<16}{b[c]:>9}{b[c] / tb:>8.3f}{a[c]:>9}{a[c] / ta:>8.3f}")
        print(f"saved {csv_path} and {png_path}")
    return {**counts, "csv": csv_path, "png": png_path}
