"""The checkpoint set of a training run folder: file names, completion markers, ``latest``, pruning.

Per saved step N a run folder holds ``model%06d.pt``, ``ema_<rate>_%06d.pt``, ``opt%06d.pt``,
``train_state%06d.pt`` and, written last, the marker ``checkpoint%06d.json`` listing those files
and their sizes. A checkpoint counts as complete only when its marker is valid, so a killed
process or a full disk never produces a corrupt ``latest``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import torch

from . import fileio
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


def _file_size(path: str) -> Optional[int]:
    if fileio.is_remote(path):
        return None
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


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
        actual = _file_size(path)
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


def incomplete_checkpoints(folder: str, after: int = -1) -> dict[int, str]:
    """Checkpoint steps > ``after`` with files in ``folder`` but no valid marker: ``{step: why}``."""
    if not folder or fileio.is_remote(folder) or not os.path.isdir(folder):
        return {}
    complete = set(list_complete_checkpoints(folder))
    found: dict[int, str] = {}
    for name in os.listdir(folder):
        m = _MARKER_RE.match(name) or re.match(r"^(?:model|ema_.+_|opt|train_state)(\d{6,})\.pt$", name)
        step = int(m.group(1)) if m else -1
        if step > after and step not in complete:
            marker = marker_filename(step)
            found[step] = (
                f"{marker} lists files that are missing or of another size"
                if os.path.exists(os.path.join(folder, marker))
                else f"no completion marker {marker} (the run stopped while saving it)"
            )
    return dict(sorted(found.items()))


_reported_incomplete: set = set()


def find_latest_checkpoint(folder: str) -> Optional[str]:
    """Path of the newest complete checkpoint's ``model%06d.pt`` in ``folder``, or None.

    Newer checkpoints without a valid completion marker are skipped, each named once on stderr.
    """
    steps = list_complete_checkpoints(folder)
    for step, why in incomplete_checkpoints(folder, steps[-1] if steps else -1).items():
        if (folder, step) not in _reported_incomplete:
            _reported_incomplete.add((folder, step))
            print(f"note: {folder}: skipping the checkpoint of step {step}: {why}", file=sys.stderr)
    return fileio.join(folder, f"model{steps[-1]:06d}.pt") if steps else None


def newest_ema_checkpoint(folder: str) -> tuple[str, str]:
    """The file to sample with from a training run folder: ``(path, why)``.

    The newest complete checkpoint's EMA weights (the highest rate when there are several, e.g.
    0.9999 over 0.999), else its model weights.
    """
    steps = list_complete_checkpoints(folder)
    if not steps:
        raise DiffMixError(f"{folder}: a training run folder without a complete checkpoint (no valid checkpoint*.json)")
    find_latest_checkpoint(folder)  # names skipped newer ones
    marker = valid_marker(folder, marker_filename(steps[-1])) or {}
    emas = sorted((n for n in marker.get("files", {}) if n.startswith("ema_")), key=lambda n: float(n.split("_")[1]))
    name = emas[-1] if emas else f"model{steps[-1]:06d}.pt"
    return fileio.join(folder, name), f"the newest complete checkpoint (step {steps[-1]}), {'EMA' if emas else 'model'} weights"


def checkpoint_bytes(num_params: int, num_ema: int) -> int:
    """Approximate size of one checkpoint: float32 model + EMAs + Adam's two moments."""
    return 4 * int(num_params) * (3 + int(num_ema)) + (1 << 20)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def disk_use_notice(folder: str, per_checkpoint: int, keep: int, max_steps: int, save_interval: int,
                    start_step: int = 0) -> Optional[str]:
    """A warning when the checkpoints this run will keep exceed the free space of ``folder`` (else None)."""
    if fileio.is_remote(folder) or not os.path.isdir(folder):
        return None
    free = shutil.disk_usage(folder).free
    if max_steps:
        saves = max(0, (max_steps - start_step) // max(1, save_interval)) + 1
        count = min(saves, keep) if keep else saves
        total = count * per_checkpoint
        if total <= free:
            return None
        return (f"warning: {folder}: the {count} checkpoints this run keeps take about {_gb(total)} "
                f"({_gb(per_checkpoint)} each) but only {_gb(free)} is free; lower --keep_checkpoints")
    if keep and keep * per_checkpoint <= free:
        return None
    bound = f"--keep_checkpoints {keep} needs {_gb(keep * per_checkpoint)}" if keep else "no --keep_checkpoints: every save is kept"
    return (f"warning: {folder}: no --max_steps and {bound} (about {_gb(per_checkpoint)} per checkpoint every "
            f"{save_interval} steps) with {_gb(free)} free; the run stops cleanly when the next one does not fit")


def check_free_space(folder: str, step: int, need: Optional[int]) -> None:
    """Refuse to start writing the checkpoint of ``step`` when ``need`` bytes (default: the size of
    the newest complete checkpoint) do not fit on the disk of ``folder``."""
    if fileio.is_remote(folder):
        return
    steps = list_complete_checkpoints(folder)
    if need is None and steps:
        marker = valid_marker(folder, marker_filename(steps[-1])) or {}
        need = sum(int(v) for v in marker.get("files", {}).values())
    if not need:
        return
    free = shutil.disk_usage(folder).free
    if free < need:
        last = f"step {steps[-1]}" if steps else "none"
        raise DiffMixError(
            f"{folder}: not enough disk space for the checkpoint of step {step} (needs about {_gb(need)}, "
            f"{_gb(free)} free); stopped before writing it. The last complete checkpoint is {last}; free space "
            "or pass --keep_checkpoints N, then resume with --resume_checkpoint latest"
        )


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


def _save_pt(path: str, obj: Any) -> int:
    with fileio.atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return _file_size(path) or 0


def load_pt(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a local or remote file, errors naming the file
    (see :func:`guided_diffusion.checkpoints.load_torch_file`)."""
    from .checkpoints import load_torch_file

    return load_torch_file(path, map_location=map_location)


def write_checkpoint(
    folder: str,
    step: int,
    files: Mapping[str, Any],
    extra: Optional[Mapping[str, Any]] = None,
    expected_bytes: Optional[int] = None,
) -> None:
    """Write each ``{name: object}`` atomically, then the completion marker.

    An object may be given as a zero-argument callable that builds it: it is called just before
    its file is written, so only one CPU copy (model, one EMA, or the optimizer) exists at a time.

    On a write error (full disk, lost mount) the files already written for this step are removed,
    the marker is never written, and :class:`DiffMixError` names the file; earlier checkpoints are
    untouched. Before anything is written, free space is checked against ``expected_bytes`` (default:
    the newest complete checkpoint's size, see :func:`check_free_space`).
    """
    check_free_space(folder, step, expected_bytes)
    written: list[str] = []
    sizes: dict[str, int] = {}
    current = folder
    try:
        for name, obj in files.items():
            current = fileio.join(folder, name)
            sizes[name] = _save_pt(current, obj() if callable(obj) else obj)
            written.append(current)
        marker = {"step": step, "complete": True, "files": sizes, "time": time.time(), **(extra or {})}
        current = fileio.join(folder, marker_filename(step))
        fileio.write_json(current, marker)
    except OSError as err:
        for path in written:
            with contextlib.suppress(OSError):
                if not fileio.is_remote(path):
                    os.remove(path)
        prev = [s for s in list_complete_checkpoints(folder) if s != step]
        last = f"step {prev[-1]}" if prev else "none"
        raise DiffMixError(
            f"{current}: cannot write checkpoint of step {step} ({err.strerror or err}); "
            f"the last complete checkpoint is {last}"
        ) from None


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
