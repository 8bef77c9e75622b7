"""The checkpoint set of a training run folder: file names, completion markers, ``latest``, pruning.

Per saved step N a run folder holds ``model%06d.pt``, ``ema_<rate>_%06d.pt``, ``opt%06d.pt``,
``train_state%06d.pt`` and, written last, the marker ``checkpoint%06d.json`` listing those files
and their sizes (the protocol of :mod:`guided_diffusion.completion`). A checkpoint counts as
complete only when its marker is valid, so a killed process or a full disk never produces a
corrupt ``latest``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from . import fileio
from .completion import file_size, write_marked
from .errors import DiffMixError

_MARKER_RE = re.compile(r"^checkpoint(\d{6,})\.json$")
_STEP_RE = re.compile(r"(\d+)\.(?:pt|pth|safetensors)$")
_TMP_RE = re.compile(r"^\.(?:model|ema_.+_|opt|train_state|checkpoint)\d{6,}\.(?:pt|json)\..*\.tmp$")


def ema_filename(rate: float, step: int) -> str:
    """Official EMA file name: ``ema_<rate as Python prints it>_<step:06d>.pt`` (e.g. ema_0.9999_010000.pt)."""
    return f"ema_{rate}_{step:06d}.pt"


def checkpoint_filenames(step: int, ema_rates: Sequence[float]) -> list[str]:
    """All weight/state files of the checkpoint at ``step`` (the marker excluded), in write order."""
    return (
        [f"model{step:06d}.pt"]
        + [ema_filename(r, step) for r in ema_rates]
        + [f"opt{step:06d}.pt", f"train_state{step:06d}.pt"]
    )


def marker_filename(step: int) -> str:
    return f"checkpoint{step:06d}.json"


def parse_resume_step_from_filename(filename: str) -> int:
    """The step number at the end of a checkpoint name (``model005900.pt`` -> 5900); 0 if none."""
    m = _STEP_RE.search(os.path.basename(str(filename)))
    return int(m.group(1)) if m else 0


def valid_marker(folder: str, name: str) -> Optional[dict[str, Any]]:
    """The marker's content if it parses and every listed file exists with the recorded size."""
    try:
        marker = json.loads(fileio.read_bytes(fileio.join(folder, name)).decode())
    except (DiffMixError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(marker, dict) or not marker.get("complete") or not isinstance(marker.get("files"), dict):
        return None
    for fname, size in marker["files"].items():
        path = fileio.join(folder, fname)
        actual = file_size(path)
        if actual is None:
            if not fileio.exists(path):
                return None
        elif actual != size:
            return None
    return marker


def list_complete_checkpoints(folder: str) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, ascending (empty if the folder is absent)."""
    if not folder or not fileio.exists(folder):
        return []
    steps = []
    for name in fileio.listdir(folder):
        m = _MARKER_RE.match(name)
        if m and valid_marker(folder, name) is not None:
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_latest_checkpoint(folder: str) -> Optional[str]:
    """Path of the newest complete checkpoint's ``model%06d.pt`` in ``folder``, or None."""
    steps = list_complete_checkpoints(folder)
    return fileio.join(folder, f"model{steps[-1]:06d}.pt") if steps else None


def resolve_resume_checkpoint(resume: str, log_dir: str) -> Optional[str]:
    """Turn ``--resume_checkpoint`` into a weights-file path (None: start fresh). See module doc."""
    if not resume:
        return None
    if resume == "latest":
        return find_latest_checkpoint(log_dir)
    if not fileio.is_remote(resume) and os.path.isdir(resume):
        path = find_latest_checkpoint(resume)
        if path is None:
            raise DiffMixError(f"{resume}: --resume_checkpoint folder holds no complete checkpoint")
        return path
    if not fileio.exists(resume):
        raise DiffMixError(f"{resume}: --resume_checkpoint file not found")
    return resume


def _save_pt(path: str, obj: Any) -> None:
    with fileio.atomic_open(path, "wb") as f:
        torch.save(obj, f)


def write_checkpoint(
    folder: str,
    step: int,
    files: Mapping[str, Any],
    extra: Optional[Mapping[str, Any]] = None,
) -> None:
    """Write each ``{name: object}`` atomically, then the completion marker
    (:func:`guided_diffusion.completion.write_marked`).

    An object may be given as a zero-argument callable that builds it: it is called just before
    its file is written, so only one CPU copy (model, one EMA, or the optimizer) exists at a time.

    On a write error (full disk, lost mount) the files already written for this step are removed,
    the marker is never written, and :class:`DiffMixError` names the file; earlier checkpoints are
    untouched.
    """

    def save(obj: Any) -> Callable[[str], None]:
        return lambda path: _save_pt(path, obj() if callable(obj) else obj)

    def marker(sizes: dict) -> dict:
        named = {os.path.basename(p): (0 if n is None else n) for p, n in sizes.items()}
        return {"step": step, "complete": True, "files": named, "time": time.time(), **(extra or {})}

    def last_complete() -> str:
        prev = [s for s in list_complete_checkpoints(folder) if s != step]
        return f"the last complete checkpoint is {f'step {prev[-1]}' if prev else 'none'}"

    write_marked(
        [(fileio.join(folder, name), save(obj)) for name, obj in files.items()],
        fileio.join(folder, marker_filename(step)), marker, what=f"checkpoint of step {step}", hint=last_complete,
    )


def prune_checkpoints(folder: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` complete checkpoints (marker first); returns removed steps."""
    if keep <= 0 or fileio.is_remote(folder):
        return []
    steps = list_complete_checkpoints(folder)
    removed = []
    for step in steps[:-keep]:
        marker_path = fileio.join(folder, marker_filename(step))
        try:
            marker = json.loads(fileio.read_bytes(marker_path).decode())
        except (DiffMixError, ValueError):
            continue
        # Marker first: a crash half-way through leaves files no longer counted as a checkpoint.
        with contextlib.suppress(OSError):
            os.remove(marker_path)
        for name in marker.get("files", {}):
            with contextlib.suppress(OSError):
                os.remove(fileio.join(folder, name))
        removed.append(step)
    return removed


def remove_stale_temporaries(folder: str) -> None:
    """Delete temporary files that a killed run left behind while writing a checkpoint."""
    if fileio.is_remote(folder) or not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if _TMP_RE.match(name):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))

