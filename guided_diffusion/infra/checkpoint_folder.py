"""The checkpoint set of a training run folder: file names, completion markers, ``latest``, pruning,
and a run's resume (plan, load, retiring newer checkpoints) and save.

Per saved step N a run folder holds ``model%06d.pt``, ``ema_<rate>_%06d.pt``, ``opt%06d.pt``,
``train_state%06d.pt`` and, written last, the marker ``checkpoint%06d.json`` listing those files
and their sizes (the protocol of :mod:`guided_diffusion.infra.completion`). A checkpoint counts as
complete only when its marker is valid, so a killed process or a full disk never produces a
corrupt ``latest``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed

from .. import dist_util, logger
from . import fileio
from .checkpoints import load_model_weights, load_state_dict, load_torch_file
from .completion import file_size, write_marked
from .errors import DiffMixError
from .train_state import capture_global_rng, load_sampler_state, restore_global_rng, sampler_state

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


def _save_pt(path: str, obj: Any) -> None:
    with fileio.atomic_open(path, "wb") as f:
        torch.save(obj, f)


def write_checkpoint(
    folder: str,
    step: int,
    files: Mapping[str, Any],
    extra: Optional[Mapping[str, Any]] = None,
    expected_bytes: Optional[int] = None,
) -> None:
    """Write each ``{name: object}`` atomically, then the completion marker
    (:func:`guided_diffusion.infra.completion.write_marked`).

    An object may be given as a zero-argument callable that builds it: it is called just before
    its file is written, so only one CPU copy (model, one EMA, or the optimizer) exists at a time.

    On a write error (full disk, lost mount) the files already written for this step are removed,
    the marker is never written, and :class:`DiffMixError` names the file; earlier checkpoints are
    untouched. Before anything is written, free space is checked against ``expected_bytes`` (default:
    the newest complete checkpoint's size, see :func:`check_free_space`).
    """
    check_free_space(folder, step, expected_bytes)

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


# --------------------------------------------------------------------------------------------
# A training run's resume and save (the loop's state in and out of a checkpoint set)
# --------------------------------------------------------------------------------------------

STATE_FORMAT = "diffmix-train-state"
STATE_VERSION = 1


def check_fresh_start(log_dir: str, resume_checkpoint: str) -> None:
    """Refuse to start a fresh run (no ``--resume_checkpoint``) in a folder that holds checkpoints.

    Training there would interleave two runs' checkpoints and overwrite ``config.json``.
    """
    if resume_checkpoint:
        return
    existing = list_complete_checkpoints(log_dir)
    if existing:
        raise DiffMixError(
            f"{log_dir}: already holds checkpoints (newest: step {existing[-1]}); "
            "pass --resume_checkpoint latest to continue that run, or choose another --log_dir"
        )


@dataclass(frozen=True)
class ResumePlan:
    """``--resume_checkpoint`` checked and resolved once per run: ``requested`` as given, ``path`` the
    weights file to load (None: start fresh), ``step`` parsed from its name."""

    requested: str
    path: Optional[str]

    @property
    def step(self) -> Optional[int]:
        return parse_resume_step_from_filename(self.path) if self.path else None


def plan_resume(resume_checkpoint: str, log_dir: str) -> ResumePlan:
    """:func:`check_fresh_start`, then :func:`resolve_resume_checkpoint` (cheap: folder listings;
    :func:`find_latest_checkpoint` names each newer checkpoint it skips)."""
    check_fresh_start(log_dir, resume_checkpoint)
    return ResumePlan(resume_checkpoint, resolve_resume_checkpoint(resume_checkpoint, log_dir))


def load_resume_checkpoint(loop: Any, path: str) -> None:
    """Load checkpoint ``path`` into a :class:`~guided_diffusion.infra.train_loop.TrainLoop` (see its
    module doc for what a complete checkpoint restores and what a weights-only file does).

    Reads and sets the loop's ``model``, ``ema_params``, ``opt``, ``scaler``, ``generator``,
    ``schedule_sampler``, ``data``, ``step``, ``last_saved_step`` and ``resumed_from``.
    """
    folder = os.path.dirname(path)
    step = parse_resume_step_from_filename(path)
    name = os.path.basename(path)
    marker = valid_marker(folder, marker_filename(step)) if name == f"model{step:06d}.pt" else None
    full = marker is not None and f"train_state{step:06d}.pt" in marker.get("files", {})
    logger.log(f"loading {'checkpoint' if full else 'weights only'} from {path} (step {step})")
    load_model_weights(loop.model, path, strict=True)
    names = [n for n, _ in loop.model.named_parameters()]
    for i, rate in enumerate(loop.ema_rates):
        ema_path = fileio.join(folder, ema_filename(rate, step))
        if fileio.exists(ema_path):
            sd = load_state_dict(ema_path)
            for j, n in enumerate(names):
                if n not in sd or sd[n].shape != loop.ema_params[i][j].shape:
                    found = tuple(sd[n].shape) if n in sd else "missing"
                    raise DiffMixError(
                        f"{ema_path}: EMA weights do not fit the model ({n}: {found}, "
                        f"model {tuple(loop.ema_params[i][j].shape)})"
                    )
                loop.ema_params[i][j].copy_(sd[n].to(loop.ema_params[i][j]))
        else:
            for e, p in zip(loop.ema_params[i], loop.params):
                e.copy_(p.detach())
            logger.log(f"{ema_path} not found; EMA rate {rate} starts from the loaded weights")
    opt_path = fileio.join(folder, f"opt{step:06d}.pt")
    if fileio.exists(opt_path):
        try:
            loop.opt.load_state_dict(load_torch_file(opt_path, map_location=loop.device))
        except (ValueError, KeyError, RuntimeError) as err:
            raise DiffMixError(f"{opt_path}: optimizer state does not match this model ({err})") from None
        for group in loop.opt.param_groups:
            group["weight_decay"] = loop.weight_decay  # this run's setting, not the saved one
    else:
        logger.log(f"{opt_path} not found; the optimizer starts fresh")
    loop.step = step
    loop.last_saved_step = step
    loop.resumed_from = path
    if full:
        _load_train_state(loop, load_torch_file(fileio.join(folder, f"train_state{step:06d}.pt")), folder, step)
    if loop.rank == 0:
        retire_newer_checkpoints(folder, step, loop.log_dir)


def retire_newer_checkpoints(folder: str, step: int, log_dir: str) -> None:
    """Resuming from an older checkpoint of the run folder starts a new branch: newer checkpoints
    lose their completion marker (their files stay, usable as weights) so that ``latest`` and
    pruning never mix the two branches. Only for ``folder`` == ``log_dir`` (local)."""
    if fileio.is_remote(folder) or not log_dir or fileio.is_remote(log_dir):
        return
    if os.path.realpath(folder or ".") != os.path.realpath(log_dir):
        return
    for newer in [s for s in list_complete_checkpoints(folder) if s > step]:
        with contextlib.suppress(OSError):
            os.remove(fileio.join(folder, marker_filename(newer)))
        logger.warn(f"resuming from step {step}: checkpoint of step {newer} in {folder} no longer counts as complete")


def _load_train_state(loop: Any, state: Any, folder: str, step: int) -> None:
    path = fileio.join(folder, f"train_state{step:06d}.pt")
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise DiffMixError(f"{path}: not a DiffMix training-state file")
    loop.step = int(state["step"])
    if state.get("scaler") and loop.scaler.is_enabled():
        loop.scaler.load_state_dict(state["scaler"])
    load_sampler_state(loop.schedule_sampler, state.get("sampler"))
    ranks = state.get("ranks", [])
    if int(state.get("world_size", 1)) == loop.world_size and len(ranks) == loop.world_size:
        mine = ranks[loop.rank]
        restore_global_rng(mine["rng"])
        loop.generator.set_state(mine["generator"].to(loop.generator.get_state().device))
        if mine.get("data") is not None and hasattr(loop.data, "load_state_dict"):
            loop.data.load_state_dict(mine["data"])
    else:
        logger.warn(
            f"{path}: saved with {state.get('world_size')} ranks, resuming with {loop.world_size}; "
            "random streams restart from --seed and the data stream restarts at the saved step"
        )
        # The data position (seed, step) is the same on every rank, so rank 0's entry serves all.
        if hasattr(loop.data, "load_state_dict") and ranks and ranks[0].get("data") is not None:
            loop.data.load_state_dict(ranks[0]["data"])


def rank_state(loop: Any) -> dict[str, Any]:
    """This rank's part of the resume state: global RNGs, the loop's generator, the data position."""
    return {
        "rng": capture_global_rng(),
        "generator": loop.generator.get_state().cpu(),
        "data": loop.data.state_dict() if hasattr(loop.data, "state_dict") else None,
    }


def save_checkpoint(loop: Any) -> None:
    """Write the loop's checkpoint of its current step (rank 0), then prune; a collective call.

    :func:`write_checkpoint` checks the free space first (rank 0); its error travels to every rank
    through the broadcast below.
    """
    ranks = [None] * loop.world_size
    mine = rank_state(loop)
    if loop.world_size > 1:
        torch.distributed.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    error = None
    if loop.rank == 0:
        step = loop.step
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "step": step,
            "world_size": loop.world_size,
            "seed": loop.seed,
            "ema_rates": list(loop.ema_rates),
            "precision": loop.precision,
            "scaler": loop.scaler.state_dict() if loop.scaler.is_enabled() else None,
            "sampler": sampler_state(loop.schedule_sampler),
            "ranks": ranks,
        }
        # Built lazily, one file at a time (a 256-channel model's optimizer state is GBs).
        files: dict[str, Any] = {
            f"model{step:06d}.pt": lambda: {k: v.detach().cpu() for k, v in loop.model.state_dict().items()}
        }
        for i, rate in enumerate(loop.ema_rates):
            files[ema_filename(rate, step)] = functools.partial(loop.ema_state_dict, i)
        files[f"opt{step:06d}.pt"] = lambda: _to_cpu(loop.opt.state_dict())
        files[f"train_state{step:06d}.pt"] = state
        try:
            write_checkpoint(loop.log_dir, step, files, {"seed": loop.seed, "world_size": loop.world_size},
                             expected_bytes=checkpoint_bytes(sum(p.numel() for p in loop.params), len(loop.ema_rates)))
            logger.log(f"saved checkpoint of step {step} to {loop.log_dir}")
            for s in prune_checkpoints(loop.log_dir, loop.keep_checkpoints):
                logger.log(f"removed checkpoint of step {s} (--keep_checkpoints {loop.keep_checkpoints})")
        except DiffMixError as err:
            error = str(err)
    error = dist_util.broadcast_object(error)
    if error is not None:
        raise DiffMixError(error)
    loop.last_saved_step = loop.step


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
