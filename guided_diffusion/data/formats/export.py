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

from ... import fileio
from ...errors import DiffMixError
from . import csv_text, get_format

ARRAY_FORMATS = ("pannuke", "conic")


def convert_to_consep(
    data_dir: str,
    dataset_mode: str,
    out_dir: str,
    splits: Sequence[str] = ("Train", "Test"),
    progress: bool = True,
    images: bool = True,
) -> Dict:
    """Write a PanNuke / CoNIC / Lizard dataset in the CoNSeP layout; returns the summary written to
    ``<out_dir>/conversion.json`` (source, mode, and the folder and stems of every split).

    ``images=False`` writes the labels only (ground truth for evaluation)."""
    from tqdm.auto import tqdm

    from ..labels import write_label_mat
    from ..readers import list_samples, read_sample_labels, sample_image

    fmt = get_format(dataset_mode)
    targets = [(s, fileio.join(out_dir, s)) for s in splits] if fmt.has_folds(data_dir) else [("all", out_dir)]
    written: Dict[str, List[str]] = {}
    listed = [list_samples(data_dir, split, dataset_mode=dataset_mode) for split, _ in targets]  # all checks first
    for (split, folder), samples in zip(targets, listed):
        fileio.makedirs(fileio.join(folder, "Labels"))
        for files in tqdm(samples, desc=f"converting {split}", unit="image", disable=not progress):
            inst, types = read_sample_labels(files, fmt.TABLE)
            if images:
                fileio.write_png(fileio.join(folder, "Images", files.stem + ".png"), sample_image(files))
            write_label_mat(fileio.join(folder, "Labels", files.stem + ".mat"), inst, types)
        written[split] = [f.stem for f in samples]
    fileio.write_json(fileio.join(out_dir, "class_table.json"), fmt.TABLE.to_json())
    summary = {"source": str(data_dir), "dataset_mode": fmt.TABLE.name, "layout": "consep",
               "splits": {s: {"folder": os.path.relpath(f, out_dir) if f != out_dir else ".", "stems": written[s]}
                          for s, f in targets}}
    fileio.write_json(fileio.join(out_dir, "conversion.json"), summary)  # last: marks completion
    return summary


def _write_patch_arrays(paths: Sequence[str], n: int, patch, progress: bool) -> None:
    """Write ``n`` patches into one ``.npy`` per path through memory maps (never all in memory),
    atomically: ``patch(i)`` returns patch ``i``'s arrays, one per path, of fixed shape and dtype."""
    from tqdm.auto import tqdm

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
    from ..readers import list_samples

    run = fileio.read_json(fileio.join(run_dir, "run.json"))
    mode = str(run.get("dataset_mode", "")).lower()
    if mode not in ARRAY_FORMATS:
        raise DiffMixError(f"{run_dir}/run.json: dataset_mode {mode!r}; source-format output exists for "
                           f"{', '.join(ARRAY_FORMATS)} only")
    fmt = get_format(mode)
    out_dir = out_dir or os.path.join(run_dir, "source_format")
    if fileio.is_remote(out_dir):
        raise DiffMixError(f"{out_dir}: source-format arrays are written to a local folder")
    records_dir = fileio.join(run_dir, "records")
    names = sorted(n[: -len(".json")] for n in fileio.listdir(records_dir) if n.endswith(".json"))
    if not names:
        raise DiffMixError(f"{records_dir}: no complete synthesis outputs to export")
    records = [fileio.read_json(fileio.join(records_dir, n + ".json")) for n in names]
    patch_paths = [fileio.join(run_dir, "npy_patch", n + ".npy") for n in names]

    def encoded(i: int):
        patch = fileio.read_npy(patch_paths[i])
        if patch.ndim != 3 or patch.shape[2] != 5:
            raise DiffMixError(f"{patch_paths[i]}: shape {patch.shape}, expected a HoVer-Net patch [H, W, 5]")
        try:
            return fmt.encode(patch[..., :3].astype(np.uint8), patch[..., 3].astype(np.int64), patch[..., 4].astype(np.int64))
        except DiffMixError as err:
            raise DiffMixError(f"{patch_paths[i]}: {err}") from None

    os.makedirs(out_dir, exist_ok=True)
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
