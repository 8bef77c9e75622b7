"""Conversions: a distributed dataset to the CoNSeP layout, and synthesis outputs to the source format.

* :func:`convert_to_consep` writes ``<out>/<split>/Images/<stem>.png`` and
  ``<out>/<split>/Labels/<stem>.mat`` (``inst_map``, ``type_map``, ``inst_type``,
  ``inst_centroid``) for tools outside this project, plus ``class_table.json`` (read it back with
  ``--dataset_mode custom --class_table <out>/class_table.json``). A single PanNuke fold becomes one
  split folder (``<out>/Images``, ``<out>/Labels``).
* :func:`export_source_format` collects a synthesis run's HoVer-Net patches into the arrays of the
  dataset it was made from (PanNuke: ``images.npy``, ``masks.npy``, ``types.npy``; CoNIC:
  ``images.npy``, ``labels.npy``, ``patch_info.csv``), in output-name order, so they can be
  appended to the user's arrays (``np.concatenate``). CoNIC names keep the source image before the
  first ``-`` of the patch name, so synthetic patches split with their source image.

Every file is written under a temporary name and renamed; ``conversion.json`` / ``export.json``
are written last and mark a complete output.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from tqdm.auto import tqdm

from ...infra import fileio, runlock
from ...infra.completion import changed_settings
from ...infra.errors import DiffMixError
from ..image_arrays import rgb_uint8
from ..labels import write_label_mat
from ..layouts import SynthesisLayout
from ..readers import list_samples, read_sample_labels, sample_image
from . import csv_text, get_format

ARRAY_FORMATS = ("pannuke", "conic")


SETTINGS = "conversion_settings.json"  # written first: what the folder is a conversion of
RECORD = "conversion.json"  # written last: the conversion is complete
EXPORT_SETTINGS = "export_settings.json"  # written first by an export (export.json last)


def _conversion_of(record: dict) -> Dict:
    """The identity of a conversion from its settings or completion record: the source folder (real
    path), the dataset mode, the split names and whether images are written."""
    splits = record.get("splits") or []
    return {"source": os.path.realpath(str(record.get("source", ""))), "dataset_mode": record.get("dataset_mode"),
            "splits": sorted(splits), "images": record.get("images", True)}


def _export_of(record: dict) -> Dict:
    """The identity of a source-format export: the run folder it collects (real path)."""
    return {"run": os.path.realpath(str(record.get("run", "")))}


def check_output_folder(out_dir: str, settings: Dict, records: Sequence[str], identity, what: str,
                        flag: str = "--out_dir") -> None:
    """Refuse an ``out_dir`` that holds anything but a (complete or interrupted) ``what`` with these
    ``settings``: writing there would mix two outputs (or replace a dataset's own arrays).

    Args:
        records: the files (settings first, completion record last) that say what the folder holds.
        identity: ``record dict -> dict`` of the fields that must match ``identity(settings)``.

    Run-folder locks and temporary files do not count as content.

    Raises:
        DiffMixError naming ``out_dir`` and ``flag``: what differs, or what the folder holds.
    """
    if not os.path.isdir(out_dir):
        return
    entries = [n for n in sorted(os.listdir(out_dir)) if not (n.startswith(".lock") or n.endswith(".tmp"))]
    if not entries:
        return
    for name in records:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            record = fileio.read_json(path)
            theirs, mine = identity(record if isinstance(record, dict) else {}), identity(settings)
            changed = [f"{k} {theirs[k]!r}, here {mine[k]!r}" for k in changed_settings(theirs, mine, mine)]
            if changed:
                raise DiffMixError(f"{out_dir}: {flag} holds another {what} ({'; '.join(changed)}; see {path}); "
                                   f"writing into it would mix the two: choose a new or empty {flag}")
            return
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise DiffMixError(f"{out_dir}: {flag} is not empty and holds no {what} (found {shown}); "
                       f"choose a new or empty {flag}")


def convert_to_consep(
    data_dir: str,
    dataset_mode: str,
    out_dir: str,
    splits: Sequence[str] = ("Train", "Test"),
    progress: bool = True,
    images: bool = True,
    flag: str = "--out_dir",
) -> Dict:
    """Write a PanNuke / CoNIC / Lizard dataset in the CoNSeP layout; returns the summary written to
    ``<out_dir>/conversion.json`` (source, mode, and the folder and stems of every split).

    ``images=False`` writes the labels only (ground truth for evaluation). ``out_dir`` (named
    ``flag`` in errors) must be new, empty, or a conversion with the same settings (rerunning an
    interrupted conversion completes it; see :func:`check_output_folder`); it is locked for
    the run (:mod:`guided_diffusion.infra.runlock`), so two conversions never write one folder.
    """

    fileio.check_output_dir(out_dir, flag)
    fmt = get_format(dataset_mode)
    targets = [(s, fileio.join(out_dir, s)) for s in splits] if fmt.has_folds(data_dir) else [("all", out_dir)]
    written: Dict[str, List[str]] = {}
    listed = [list_samples(data_dir, split, dataset_mode=dataset_mode) for split, _ in targets]  # all checks first
    if images:  # the value range of each image array file (PanNuke, CoNIC), decided before anything is written
        for files in {f.member[0]: f for samples in listed for f in samples if f.member}.values():
            sample_image(files)
    settings = {"source": str(data_dir), "dataset_mode": fmt.TABLE.name, "splits": [s for s, _ in targets],
                "images": bool(images)}
    lock = runlock.acquire(out_dir, "conversion", flag=flag)
    try:
        # under the lock: a conversion that ended while this one was listing counts too
        check_output_folder(out_dir, settings, (SETTINGS, RECORD), _conversion_of, "conversion", flag)
        fileio.write_json(fileio.join(out_dir, SETTINGS), settings)
        for (split, folder), samples in zip(targets, listed):
            fileio.makedirs(fileio.join(folder, "Labels"))
            for files in tqdm(samples, desc=f"converting {split}", unit="image", disable=not progress):
                inst, types = read_sample_labels(files, fmt.TABLE)
                if images:
                    fileio.write_png(fileio.join(folder, "Images", files.stem + ".png"), sample_image(files))
                write_label_mat(fileio.join(folder, "Labels", files.stem + ".mat"), inst, types)
            written[split] = [f.stem for f in samples]
        fileio.write_json(fileio.join(out_dir, "class_table.json"), fmt.TABLE.to_json())
        summary = {"source": str(data_dir), "dataset_mode": fmt.TABLE.name, "layout": "consep", "images": bool(images),
                   "splits": {s: {"folder": os.path.relpath(f, out_dir) if f != out_dir else ".", "stems": written[s]}
                              for s, f in targets}}
        fileio.write_json(fileio.join(out_dir, RECORD), summary)  # last: marks completion
    finally:
        if lock is not None:
            lock.release()
    return summary


def _write_patch_arrays(paths: Sequence[str], n: int, patch, progress: bool) -> None:
    """Write ``n`` patches into one ``.npy`` per path through memory maps (never all in memory),
    atomically: ``patch(i)`` returns patch ``i``'s arrays, one per path, of fixed shape and dtype."""
    first = patch(0)
    tmps = [f"{p}.tmp-{os.getpid()}" for p in paths]
    try:
        outs = [np.lib.format.open_memmap(t, mode="w+", dtype=a.dtype, shape=(n,) + a.shape) for t, a in zip(tmps, first)]
        for i in tqdm(range(n), desc="source-format arrays", unit="patch", disable=not progress):
            for out, a in zip(outs, first if i == 0 else patch(i)):
                out[i] = a
        for out in outs:
            out.flush()
        del outs, out
        for t, p in zip(tmps, paths):
            os.replace(t, p)
    finally:
        for t in tmps:
            if os.path.exists(t):
                os.remove(t)


def export_source_format(run_dir: str, out_dir: Optional[str] = None, progress: bool = True) -> Dict:
    """Collect the complete outputs of a synthesis run into its dataset's array format.

    Args:
        run_dir: a synthesis run folder (``run.json``, ``records/``, ``npy_patch/``), made with
            dataset_mode pannuke or conic.
        out_dir: where the arrays go (default ``<run_dir>/source_format``; a local folder).

    Returns:
        The summary also written to ``<out_dir>/export.json`` (names in array order, paths).
    """

    layout = SynthesisLayout(run_dir)
    run = fileio.read_json(layout.run_record())
    mode = str(run.get("dataset_mode", "")).lower()
    if mode not in ARRAY_FORMATS:
        raise DiffMixError(f"{run_dir}/run.json: dataset_mode {mode!r}; source-format output exists for "
                           f"{', '.join(ARRAY_FORMATS)} only")
    fmt = get_format(mode)
    out_dir = out_dir or os.path.join(run_dir, "source_format")
    if fileio.is_remote(out_dir):
        raise DiffMixError(f"{out_dir}: source-format arrays are written to a local folder")
    records_dir = layout.folder(layout.RECORDS)
    names = sorted(n[: -len(".json")] for n in fileio.listdir(records_dir) if n.endswith(".json"))
    if not names:
        raise DiffMixError(f"{records_dir}: no complete synthesis outputs to export")
    records = [fileio.read_json(layout.record(n)) for n in names]
    patch_paths = [layout.npy(n) for n in names]

    def encoded(i: int):
        patch = fileio.read_npy(patch_paths[i])
        if patch.ndim != 3 or patch.shape[2] != 5:
            raise DiffMixError(f"{patch_paths[i]}: shape {patch.shape}, expected a HoVer-Net patch [H, W, 5]")
        try:
            return fmt.encode(rgb_uint8(patch[..., :3], patch_paths[i]), patch[..., 3].astype(np.int64), patch[..., 4].astype(np.int64))
        except DiffMixError as err:
            raise DiffMixError(f"{patch_paths[i]}: {err}") from None

    fileio.check_output_dir(out_dir, "--out_dir")
    # the arrays of a dataset folder (images.npy, masks.npy) must never be replaced by an export
    settings = {"run": str(run_dir), "dataset_mode": mode}
    lock = runlock.acquire(out_dir, "source-format export", flag="--out_dir")
    try:
        check_output_folder(out_dir, settings, (EXPORT_SETTINGS, "export.json"), _export_of, "export of a run")
        fileio.write_json(os.path.join(out_dir, EXPORT_SETTINGS), settings)
        return _export(run, run_dir, out_dir, mode, fmt, names, records, encoded, progress)
    finally:
        if lock is not None:
            lock.release()


def _export(run, run_dir, out_dir, mode, fmt, names, records, encoded, progress) -> Dict:
    """The writing part of :func:`export_source_format` (folder checked and locked)."""

    label_name = "masks.npy" if mode == "pannuke" else "labels.npy"
    _write_patch_arrays([os.path.join(out_dir, "images.npy"), os.path.join(out_dir, label_name)],
                        len(names), encoded, progress)
    files = ["images.npy", label_name]
    if mode == "pannuke":
        sources = {f.image: f for f in list_samples(run["data_dir"], run.get("split", "Train"), dataset_mode=mode)}
        missing = sorted({r["source_image"] for r in records} - set(sources))
        if missing:
            raise DiffMixError(f"{run['data_dir']}: source patches {missing[:3]} of this run are not in the dataset "
                               "(needed for the tissue types)")
        fileio.write_npy(os.path.join(out_dir, "types.npy"),
                         np.array([fmt.tissue(sources[r["source_image"]]) for r in records]))
        fileio.write_bytes(os.path.join(out_dir, "patch_names.csv"), csv_text("name", names))
        files += ["types.npy", "patch_names.csv"]
    else:
        fileio.write_bytes(os.path.join(out_dir, "patch_info.csv"), csv_text("patch_info", names))
        files += ["patch_info.csv"]
    summary = {"run": str(run_dir), "dataset_mode": mode, "count": len(names), "files": files, "names": names}
    fileio.write_json(os.path.join(out_dir, "export.json"), summary)  # last: marks completion
    return summary
