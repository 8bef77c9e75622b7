"""Shipped models: export a finished training run as a small, self-describing model folder.

A model folder (e.g. ``models/consep256_cpu/``) holds

* ``model.safetensors`` -- the EMA weights of the run's newest complete checkpoint (fp32);
* ``config.json`` -- the run's resolved settings (model + training), read back by sampling exactly
  as for a training run folder (:func:`guided_diffusion.infra.config.load_config_for_checkpoint`);
* ``training.json`` -- how it was trained: data, every stage's settings, steps, wall time, seed,
  final losses, the recipe, the machine and the SHA-256 of the weights. A run that started from a
  model folder's weights (a copy with that folder's ``training.json`` beside it, as
  ``scripts/scripts_train/consep256_cpu_continue.sh`` makes) continues its record: the earlier
  stages come first and ``continued_from`` names the weights (SHA-256 checked);
* ``loss.png`` -- the loss curve of the exported runs' stages (a continued model: its new stages).

The weights are safetensors, so loading a shipped model never unpickles anything.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..infra import fileio
from ..infra.config import CONFIG_NAME, check_model_kind, load_config_for_checkpoint
from ..infra.errors import DiffMixError
from ..infra.plotting import plot_loss_curve, read_progress

WEIGHTS_NAME = "model.safetensors"
RECORD_NAME = "training.json"
# guided_diffusion/app/pretrained.py -> the repository root, three levels up.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The small real-data SDM shipped with the project (consep256_cpu.sh, then consep256_cpu_continue.sh: its card).
DEFAULT_MODEL = os.path.join(REPO_ROOT, "models", "consep256_cpu", WEIGHTS_NAME)
# The nucleus-type classifier shipped with it (scripts/export_classifier.py): the demo's label fidelity.
DEFAULT_CLASSIFIER = os.path.join(REPO_ROOT, "models", "consep256_nuclei")


# Training options beyond the paper's recipe (0 = off), recorded per stage so a retrain repeats them.
RECIPE_OPTIONS = ("crop_size", "t_max", "snr_gamma", "rare_crop_share")


def _stage_record(run_dir: str, steps: Sequence[int], until: Optional[int] = None) -> Dict[str, Any]:
    """One training stage: its settings, step range (``steps``: its complete checkpoints), wall time
    and last logged losses, up to step ``until`` where the next stage left it (None: to its end)."""
    config = fileio.read_json(fileio.join(run_dir, CONFIG_NAME))
    rows = [r for r in read_progress(run_dir) if "step" in r and (until is None or r["step"] <= until)]
    steps = [s for s in steps if until is None or s <= until]
    # Wall time from the logged throughput: each row covers the steps since the previous row.
    wall, prev = 0.0, None
    for r in rows:
        if r.get("steps_per_sec"):
            done = r["step"] - (prev if prev is not None else r["step"] - config.get("log_interval", 1))
            wall += done / r["steps_per_sec"]
        prev = r["step"]
    last = rows[-1] if rows else {}
    return {
        "run_dir": run_dir,
        "first_logged_step": int(rows[0]["step"]) if rows else None,
        "final_step": steps[-1] if steps else None,
        "wall_time_s": round(wall, 1),
        "final_loss": last.get("loss"),
        "final_mse": last.get("mse"),
        "settings": {**{k: config.get(k) for k in (
            "lr", "batch_size", "drop_rate", "ema_rate", "max_steps", "seed", "precision_resolved",
            "world_size", "resume_checkpoint", "data_dir", "dataset_mode", *RECIPE_OPTIONS)},
            # The crop side the stage trained on, also where it came from --image_size: stages chain by
            # strict loading of each other's weights, so e.g. 64 px with attention at 8 px is the final
            # 128 px U-Net with attention at 16 px, and a retrain at the final image_size repeats the crops.
            "crop_size": config.get("crop_size") or config.get("image_size")},
    }


_RESUMED = re.compile(r"^resumed from (.+) at step (\d+)$")


def _resumed_from(run_dir: str, config: Mapping[str, Any]) -> List[Tuple[str, Optional[int]]]:
    """Every checkpoint (or checkpoint folder) the run in ``run_dir`` started or resumed from, with
    the step it started at: its ``config.json`` ``resume_checkpoint`` (step None) and each ``resumed
    from PATH at step N`` line of its ``log.txt`` (a restart rewrites config.json, often with
    ``latest``; the log is appended)."""
    found: List[Tuple[str, Optional[int]]] = [(str(config.get("resume_checkpoint") or ""), None)]
    log = fileio.join(run_dir, "log.txt")
    if fileio.exists(log):
        found += [(m.group(1), int(m.group(2))) for line in fileio.read_bytes(log).decode(errors="replace").splitlines()
                  if (m := _RESUMED.match(line.strip()))]
    return [(p, step) for p, step in found if p and p != "latest"]


def _in_folder(path: str, folders: Sequence[str]) -> bool:
    """Whether checkpoint ``path`` (a file, or a folder when it has no extension) lies in one of
    ``folders``. Compared as written and as real paths: runs record paths relative to where they
    were started, which need not be where the export runs."""
    folder = os.path.dirname(path) if os.path.splitext(path)[1] else path
    return any(f and (os.path.normpath(folder) == os.path.normpath(f) or os.path.realpath(folder) == os.path.realpath(f))
               for f in folders)


def check_stage_order(run_dirs: Sequence[str], configs: Sequence[Mapping[str, Any]]) -> List[Optional[int]]:
    """Refuse training stages that do not chain: each stage after the first must have started (or
    resumed) from a checkpoint of the stage before it. Else the export would take the wrong
    stage's weights (``--run_dirs FINE,PRE`` exports the pre-training EMA) under a wrong record.

    Returns, for each stage but the last, the step at which the next one left it (None where no log
    says): a stage may have trained on after that, and those steps are not the model's.
    """
    from ..downstream.data import refuse_listed_twice  # lazy: downstream imports MONAI, matplotlib, scipy

    refuse_listed_twice(run_dirs, "--run_dirs")
    branches: List[Optional[int]] = []
    for (prev, prev_cfg), (cur, cur_cfg) in zip(zip(run_dirs, configs), zip(run_dirs[1:], configs[1:])):
        sources = [(p, step) for p, step in _resumed_from(cur, cur_cfg)
                   if not _in_folder(p, [cur, cur_cfg.get("log_dir", "")])]
        steps = [step for p, step in sources if _in_folder(p, [prev, prev_cfg.get("log_dir", "")])]
        if not steps:
            how = f"resumed from {sources[0][0]}" if sources else "started fresh"
            raise DiffMixError(f"--run_dirs: {cur} does not continue {prev} ({cur} {how}); list the training "
                               "stages in the order they ran, first stage first")
        known = [step for step in steps if step is not None]
        branches.append(min(known) if known else None)
    return branches


def _earlier_record(run_dir: str, config: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The training record of the model a first stage started from: the ``training.json`` beside the
    weights file it resumed from, whose SHA-256 must be that file's (else the record is another
    model's). None when the stage started fresh or from a plain checkpoint."""
    for path, _ in _resumed_from(run_dir, config):
        record_path = fileio.join(os.path.dirname(path), RECORD_NAME)
        if not os.path.splitext(path)[1] or not fileio.exists(record_path):
            continue
        earlier = fileio.read_json(record_path)
        actual = hashlib.sha256(fileio.read_bytes(path)).hexdigest()
        if earlier.get("sha256") != actual:
            raise DiffMixError(f"{record_path}: records weights with SHA-256 {earlier.get('sha256')}, but {path} "
                               f"(where {run_dir} started) has {actual}")
        return {**earlier, "path": path}
    return None


def export_model(run_dirs: Sequence[str], out_dir: str, recipe: str = "", command: str = "") -> Dict[str, Any]:
    """Export the last of ``run_dirs`` (training stages in order) into a model folder.

    Args:
        run_dirs: training run folders, first stage first (e.g. pre-training, then fine-tuning); the
            newest complete checkpoint of the last one is exported, all of them go into the record.
        out_dir: the model folder to write (created; existing files are replaced atomically).
        recipe / command: how the runs were made, for the record.

    Returns:
        The training record (also written as ``training.json``).
    """
    # torch only here: the demo's settings and reports read this module's names without it.
    import torch

    from ..infra.checkpoint_folder import ema_filename, list_complete_checkpoints
    from ..infra.checkpoints import load_state_dict, save_state_dict

    if not run_dirs:
        raise DiffMixError("export needs at least one training run folder")
    configs = []
    for d in run_dirs:
        config = load_config_for_checkpoint(fileio.join(d, WEIGHTS_NAME))  # the config.json of folder d
        if config is None:
            raise DiffMixError(f"{d}: not a training run folder (no {CONFIG_NAME})")
        check_model_kind(config, d, "sdm", "--run_dirs")
        configs.append(config)
    branches = check_stage_order(run_dirs, configs) + [None]
    last = run_dirs[-1]
    steps = list_complete_checkpoints(last)
    if not steps:
        raise DiffMixError(f"{last}: no complete checkpoint to export")
    config = configs[-1]
    rates = [float(r) for r in str(config.get("ema_rate", "")).split(",") if r.strip()]
    if not rates:
        raise DiffMixError(f"{last}/{CONFIG_NAME}: no ema_rate recorded")
    step = steps[-1]
    source = fileio.join(last, ema_filename(rates[0], step))
    state = load_state_dict(source)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    fileio.makedirs(out_dir)
    weights = fileio.join(out_dir, WEIGHTS_NAME)
    save_state_dict(weights, state)
    fileio.write_json(fileio.join(out_dir, CONFIG_NAME), config)
    plot_loss_curve([(os.path.basename(d.rstrip("/")), d) for d in run_dirs], fileio.join(out_dir, "loss.png"))
    stages = [_stage_record(d, list_complete_checkpoints(d), until) for d, until in zip(run_dirs, branches)]
    earlier = _earlier_record(run_dirs[0], configs[0])
    if earlier is not None:
        stages = earlier["stages"] + stages
    record = {
        "weights": WEIGHTS_NAME,
        "sha256": hashlib.sha256(fileio.read_bytes(weights)).hexdigest(),
        "exported_from": source,
        "step": step,
        "ema_rate": rates[0],
        "parameters": int(sum(v.numel() for v in state.values())),
        "data": {"data_dir": config.get("data_dir"), "dataset_mode": config.get("dataset_mode"),
                 "split": "Train" if config.get("is_train", True) else "Test"},
        "seed": config.get("seed"),
        "stages": stages,
        "total_wall_time_s": round(sum(s["wall_time_s"] for s in stages), 1),
        "recipe": recipe,
        "command": command,
        **({} if earlier is None else {"continued_from": {
            "weights": earlier["path"], "sha256": earlier["sha256"], "step": earlier["step"],
            "recipe": earlier.get("recipe", ""), "command": earlier.get("command", "")}}),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    fileio.write_json(fileio.join(out_dir, RECORD_NAME), record)
    return record


def describe(model_path: str) -> Optional[Dict[str, Any]]:
    """The training record beside a shipped model's weights, or None if there is none."""
    path = fileio.join(os.path.dirname(model_path) or ".", RECORD_NAME)
    return fileio.read_json(path) if fileio.exists(path) else None


def stage_lines(record: Dict[str, Any]) -> List[str]:
    """One Markdown line per training stage of a record (for reports)."""
    lines = []
    for s in record.get("stages", []):
        st = s["settings"]
        crop = f" of {st['crop_size']} px" if st.get("crop_size") else ""
        lines.append(
            f"- `{os.path.basename(str(s['run_dir']).rstrip('/'))}`: to step {s['final_step']}, lr {st['lr']}, "
            f"batch {st['batch_size']}{crop}, drop rate {st['drop_rate']}, EMA {st['ema_rate']}, "
            f"{s['wall_time_s'] / 60:.0f} min, final loss {s['final_loss']:.4f}"
        )
    return lines
